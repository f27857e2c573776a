#include "engine.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <thread>

#include "error.h"
#include "ggml-alloc.h"
#include "ggml-cpu.h"
#include "session.h"

namespace pkv {

namespace {

constexpr int kGraphSize = 32768;

// Concatenate column blocks [rows, n_i] into [rows, Σ n_i] as a balanced tree of ggml_concat.
ggml_tensor * concat_columns(ggml_context * ctx, std::vector<ggml_tensor *> parts) {
    while (parts.size() > 1) {
        std::vector<ggml_tensor *> next;
        for (size_t i = 0; i < parts.size(); i += 2) {
            next.push_back(i + 1 < parts.size() ? ggml_concat(ctx, parts[i], parts[i + 1], 1) : parts[i]);
        }
        parts.swap(next);
    }
    return parts[0];
}

ggml_backend_t init_backend(const std::string & device, int n_threads) {
    ggml_backend_t backend = nullptr;
    if (device == "gpu" || device == "auto") {
        backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_GPU, nullptr);
        if (!backend && device == "gpu") throw Error("--device", "gpu requested but no GPU backend is available");
    } else if (device != "cpu") {
        throw Error("--device", "'" + device + "' is not one of auto, cpu, gpu");
    }
    if (!backend) backend = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    if (!backend) throw Error("--device", "no ggml backend could be initialised");
    if (ggml_backend_is_cpu(backend)) {
        ggml_backend_cpu_set_n_threads(
            backend, n_threads > 0 ? n_threads : (int) std::max(1u, std::thread::hardware_concurrency()));
    }
    return backend;
}

}  // namespace

Engine::Engine(const EngineOptions & opt) : opt_(opt) {
    if (opt_.n_threads < 0) throw Error("--threads", std::to_string(opt_.n_threads) + " must be >= 0 (0 = all cores)");
    if (opt_.n_ubatch < 1) throw Error("--ubatch", std::to_string(opt_.n_ubatch) + " must be >= 1");
    if (opt_.n_ctx < 0) throw Error("--ctx-size", std::to_string(opt_.n_ctx) + " must be >= 0 (0 = the model's)");
    backend_ = init_backend(opt_.device, opt_.n_threads);
    try {
        model_ = std::make_unique<Model>(opt_.model_path, backend_);
    } catch (...) {
        ggml_backend_free(backend_);
        throw;
    }
    const ModelConfig & c          = model_->config();
    const size_t        per_slot   = 2 * (size_t) c.n_head_kv * c.head_dim * sizeof(ggml_fp16_t);
    const size_t        pool_bytes = opt_.kv_pool_bytes > 0 ? opt_.kv_pool_bytes
                                     : opt_.kv_pool_tokens > 0
                                         ? per_slot * c.n_layer * opt_.kv_pool_tokens
                                         : per_slot * c.n_layer * ((size_t) n_ctx() + opt_.n_ubatch + 64);
    try {
        pool_ = std::make_unique<KvPool>(backend_, c.head_dim, c.n_head_kv, pool_bytes);
    } catch (...) {
        model_.reset();
        ggml_backend_free(backend_);
        throw;
    }
    galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    graph_meta_.resize(ggml_tensor_overhead() * kGraphSize + ggml_graph_overhead_custom(kGraphSize, false));
}

Engine::~Engine() {
    ggml_gallocr_free(galloc_);
    pool_.reset();
    model_.reset();
    ggml_backend_free(backend_);
}

std::string Engine::device_name() const { return ggml_backend_name(backend_); }

Engine::Graph Engine::begin_graph() {
    ggml_init_params ip{ graph_meta_.size(), graph_meta_.data(), /*no_alloc=*/true };
    ggml_context *   ctx = ggml_init(ip);
    return { ctx, ggml_new_graph_custom(ctx, kGraphSize, false) };
}

void Engine::allocate(Graph & g) {
    if (!ggml_gallocr_alloc_graph(galloc_, g.gf)) {
        ggml_free(g.ctx);
        throw Error("engine", "cannot allocate the compute graph");
    }
}

void Engine::compute(Graph & g) {
    if (ggml_backend_graph_compute(backend_, g.gf) != GGML_STATUS_SUCCESS) {
        throw Error("engine", "graph computation failed");
    }
}

ggml_tensor * window_probs(ggml_context * ctx, ggml_tensor * k, ggml_tensor * q_window, ggml_tensor * mask,
                           float scale) {
    ggml_tensor * kq = ggml_mul_mat(ctx, k, q_window);  // [n_kv, n_window, n_head]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    return ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);
}

int32_t argmax(const std::vector<float> & logits) {
    return (int32_t) (std::max_element(logits.begin(), logits.end()) - logits.begin());
}

void Engine::decode_batch(const std::vector<Session *> & sessions, const std::vector<int32_t> & tokens) {
    if (sessions.size() != tokens.size()) throw Error("tokens", "one token per session");
    if (sessions.empty()) return;
    std::vector<ForwardItem> items;
    for (size_t i = 0; i < sessions.size(); ++i) {
        Session * s = sessions[i];
        for (size_t j = 0; j < i; ++j) {
            if (sessions[j] == s) throw Error("sessions", "a session appears twice in one decode step");
        }
        s->check_tokens(&tokens[i], 1);
        s->reserve(1);
        items.push_back({ s, &tokens[i], 1 });
    }
    forward(items, ForwardOptions{});
}

void Engine::forward(const std::vector<ForwardItem> & items, const ForwardOptions & fo) {
    const ModelConfig & c        = config();
    const Model &       m        = *model_;
    const float         kq_scale = 1.0f / std::sqrt((float) c.head_dim);
    const int           n_items  = (int) items.size();
    int                 n_total  = 0;
    for (const ForwardItem & it : items) n_total += it.n_tokens;
    const bool     scores = n_items == 1 && (fo.window_probs > 0 || fo.accumulate_probs);
    Graph          g      = begin_graph();
    ggml_context * ctx    = g.ctx;

    ggml_tensor * inp_tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_total);
    ggml_tensor * inp_pos    = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_total);
    ggml_set_input(inp_tokens);
    ggml_set_input(inp_pos);
    // Each token's slot in the pool, per layer (sessions' pages are anywhere in the pool).
    std::vector<ggml_tensor *> inp_slots(c.n_layer);
    for (auto & t : inp_slots) {
        t = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_total);
        ggml_set_input(t);
    }
    // Causal masks for items of several tokens, one per (item, stored length): keys are the stored
    // entries (all visible) followed by the new tokens.
    std::map<std::pair<int, int>, ggml_tensor *> masks;
    auto                                         mask_for = [&](int item, int stored) -> ggml_tensor * {
        ggml_tensor *& t = masks[{ item, stored }];
        if (!t) {
            t = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, stored + items[item].n_tokens, items[item].n_tokens);
            ggml_set_input(t);
        }
        return t;
    };
    // Rows whose logits are wanted: the last token of every item.
    ggml_tensor * out_ids = nullptr;
    if (fo.want_logits && n_total > n_items) {
        out_ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_items);
        ggml_set_input(out_ids);
    }

    std::vector<std::pair<int, ggml_tensor *>> window_out, accum_out;
    ggml_tensor *                              x = ggml_get_rows(ctx, m.token_embd, inp_tokens);  // [n_embd, n_total]
    for (int il = 0; il < c.n_layer; ++il) {
        const LayerWeights & w      = m.layers[il];
        ggml_tensor *        inp_sa = x;

        ggml_tensor * cur = ggml_mul(ctx, ggml_rms_norm(ctx, x, c.rms_eps), w.attn_norm);
        ggml_tensor * q   = ggml_mul_mat(ctx, w.wq, cur);
        ggml_tensor * k   = ggml_mul_mat(ctx, w.wk, cur);
        ggml_tensor * v   = ggml_mul_mat(ctx, w.wv, cur);
        if (w.bq) {
            q = ggml_add(ctx, q, w.bq);
            k = ggml_add(ctx, k, w.bk);
            v = ggml_add(ctx, v, w.bv);
        }
        q = ggml_reshape_3d(ctx, q, c.head_dim, c.n_head, n_total);     // [head_dim, n_head, n_total]
        k = ggml_reshape_3d(ctx, k, c.head_dim, c.n_head_kv, n_total);  // [head_dim, n_head_kv, n_total]
        v = ggml_reshape_3d(ctx, v, c.head_dim, c.n_head_kv, n_total);
        if (w.q_norm) {
            q = ggml_mul(ctx, ggml_rms_norm(ctx, q, c.rms_eps), w.q_norm);
            k = ggml_mul(ctx, ggml_rms_norm(ctx, k, c.rms_eps), w.k_norm);
        }
        q = ggml_rope_ext(ctx, q, inp_pos, m.rope_freqs, c.n_rot, c.rope_type, c.n_ctx_train, c.rope_base, c.rope_scale,
                          0.0f, 1.0f, 32.0f, 1.0f);
        k = ggml_rope_ext(ctx, k, inp_pos, m.rope_freqs, c.n_rot, c.rope_type, c.n_ctx_train, c.rope_base, c.rope_scale,
                          0.0f, 1.0f, 32.0f, 1.0f);

        // Append every token's K, V at its session's next slot of this layer. Reading the store
        // through set_rows' result orders these writes before the attention.
        ggml_tensor * kc = ggml_set_rows(ctx, pool_->k(), ggml_permute(ctx, k, 0, 2, 1, 3), inp_slots[il]);
        ggml_tensor * vc = ggml_set_rows(ctx, pool_->v(), ggml_permute(ctx, v, 0, 2, 1, 3), inp_slots[il]);
        ggml_tensor * qp = ggml_permute(ctx, q, 0, 2, 1, 3);  // [head_dim, n_total, n_head]

        std::vector<ggml_tensor *> attn_parts;
        for (int b = 0, offset = 0; b < n_items; offset += items[b].n_tokens, ++b) {
            const Session & s      = *items[b].session;
            const int       n_tok  = items[b].n_tokens;
            const int       stored = s.size_[il];
            const int       n_kv   = stored + n_tok;
            const size_t    first  = (size_t) pool_->first_slot(s.pages_[il]);
            // This session's entries: a strided view of its pages, [head_dim, n_kv, n_head_kv].
            ggml_tensor * kview =
                ggml_view_3d(ctx, kc, c.head_dim, n_kv, c.n_head_kv, kc->nb[1], kc->nb[2], first * kc->nb[1]);
            ggml_tensor * vview =
                ggml_view_3d(ctx, vc, c.head_dim, n_kv, c.n_head_kv, vc->nb[1], vc->nb[2], first * vc->nb[1]);
            ggml_tensor * qb   = n_items == 1 ? qp
                                              : ggml_view_3d(ctx, qp, c.head_dim, n_tok, c.n_head, qp->nb[1], qp->nb[2],
                                                             offset * qp->nb[1]);
            ggml_tensor * mask = n_tok > 1 ? mask_for(b, stored) : nullptr;
            ggml_tensor * attn = ggml_flash_attn_ext(ctx, qb, kview, vview, mask, kq_scale, 0.0f, 0.0f);
            ggml_prec_set_acc(attn, GGML_PREC_F32);
            attn_parts.push_back(ggml_reshape_2d(ctx, attn, c.head_dim * c.n_head, n_tok));  // [n_head*head_dim, n_tok]

            if (scores && fo.window_probs > 0) {
                // SnapKV scores: the last window queries against every key, an α×n product per layer.
                const int     nw = fo.window_probs;
                ggml_tensor * qw =
                    ggml_view_3d(ctx, qb, c.head_dim, nw, c.n_head, qb->nb[1], qb->nb[2], (n_tok - nw) * qb->nb[1]);
                ggml_tensor * mw =
                    mask ? ggml_view_2d(ctx, mask, n_kv, nw, mask->nb[1], (n_tok - nw) * mask->nb[1]) : nullptr;
                ggml_tensor * p = window_probs(ctx, kview, qw, mw, kq_scale);
                ggml_set_output(p);
                ggml_build_forward_expand(g.gf, p);
                window_out.emplace_back(il, p);
            }
            if (scores && fo.accumulate_probs) {
                // H2O: every query of this chunk against every key, summed over queries.
                ggml_tensor * p = window_probs(ctx, kview, qb, mask, kq_scale);            // [n_kv, n_tok, n_head]
                p = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, p, 1, 0, 2, 3)));  // [1, n_kv, n_head]
                ggml_set_output(p);
                ggml_build_forward_expand(g.gf, p);
                accum_out.emplace_back(il, p);
            }
        }
        cur = ggml_mul_mat(ctx, w.wo, concat_columns(ctx, attn_parts));

        if (il == c.n_layer - 1 && out_ids) {
            // Only the last token of each item needs logits: drop the other rows before the FFN.
            cur    = ggml_get_rows(ctx, cur, out_ids);
            inp_sa = ggml_get_rows(ctx, inp_sa, out_ids);
        }
        x = ggml_add(ctx, cur, inp_sa);

        ggml_tensor * ffn_inp = x;
        cur                   = ggml_mul(ctx, ggml_rms_norm(ctx, x, c.rms_eps), w.ffn_norm);
        ggml_tensor * gate    = ggml_mul_mat(ctx, w.ffn_gate, cur);
        ggml_tensor * up      = ggml_mul_mat(ctx, w.ffn_up, cur);
        cur                   = ggml_mul_mat(ctx, w.ffn_down, ggml_swiglu_split(ctx, gate, up));
        x                     = ggml_add(ctx, cur, ffn_inp);
    }
    ggml_tensor * logits = nullptr;
    if (fo.want_logits) {
        x      = ggml_mul(ctx, ggml_rms_norm(ctx, x, c.rms_eps), m.output_norm);
        logits = ggml_mul_mat(ctx, m.output, x);  // [n_vocab, n_items]
        ggml_set_output(logits);
        ggml_build_forward_expand(g.gf, logits);
    } else {
        ggml_build_forward_expand(g.gf, x);
    }
    allocate(g);

    std::vector<int32_t> tok(n_total), pos(n_total), last(n_items);
    for (int b = 0, o = 0; b < n_items; o += items[b].n_tokens, ++b) {
        const int n_seen = (int) items[b].session->tokens_.size();
        for (int i = 0; i < items[b].n_tokens; ++i) {
            tok[o + i] = items[b].tokens[i];
            pos[o + i] = n_seen + i;  // tokens seen, never the stored length
        }
        last[b] = o + items[b].n_tokens - 1;
    }
    ggml_backend_tensor_set(inp_tokens, tok.data(), 0, ggml_nbytes(inp_tokens));
    ggml_backend_tensor_set(inp_pos, pos.data(), 0, ggml_nbytes(inp_pos));
    if (out_ids) ggml_backend_tensor_set(out_ids, last.data(), 0, ggml_nbytes(out_ids));
    std::vector<int64_t> slots(n_total);
    for (int il = 0; il < c.n_layer; ++il) {
        for (int b = 0, o = 0; b < n_items; o += items[b].n_tokens, ++b) {
            const Session & s     = *items[b].session;
            const int64_t   first = pool_->first_slot(s.pages_[il]) + s.size_[il];
            for (int i = 0; i < items[b].n_tokens; ++i) slots[o + i] = first + i;
        }
        ggml_backend_tensor_set(inp_slots[il], slots.data(), 0, ggml_nbytes(inp_slots[il]));
    }
    std::vector<ggml_fp16_t> mask;
    const ggml_fp16_t        zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
    for (auto & [key, t] : masks) {
        const int stored = key.second, n_tok = items[key.first].n_tokens, n_kv = stored + n_tok;
        mask.assign((size_t) n_kv * n_tok, zero);
        for (int i = 0; i < n_tok; ++i) {
            for (int j = stored + i + 1; j < n_kv; ++j) mask[(size_t) i * n_kv + j] = neg_inf;
        }
        ggml_backend_tensor_set(t, mask.data(), 0, ggml_nbytes(t));
    }
    compute(g);

    if (scores) {
        Session & s = *items[0].session;
        for (auto & [il, t] : window_out) {
            // [n_kv, nw, n_head] is exactly LayerAttention's [n_head][n_window][n] layout.
            s.window_probs_[il].resize(ggml_nelements(t));
            ggml_backend_tensor_get(t, s.window_probs_[il].data(), 0, ggml_nbytes(t));
        }
        for (auto & [il, t] : accum_out) {
            // Entries of this layer's view: those stored before (whose sums we hold) then the chunk.
            const int          n_kv = (int) t->ne[1];
            std::vector<float> chunk(ggml_nelements(t));
            ggml_backend_tensor_get(t, chunk.data(), 0, ggml_nbytes(t));
            std::vector<float> & acc   = s.accumulated_[il];
            const int            old_n = acc.empty() ? 0 : (int) (acc.size() / c.n_head);
            std::vector<float>   grown((size_t) c.n_head * n_kv, 0.0f);
            for (int h = 0; h < c.n_head; ++h) {
                for (int j = 0; j < std::min(old_n, n_kv); ++j)
                    grown[(size_t) h * n_kv + j] = acc[(size_t) h * old_n + j];
                for (int j = 0; j < n_kv; ++j) grown[(size_t) h * n_kv + j] += chunk[(size_t) h * n_kv + j];
            }
            acc = std::move(grown);
        }
    }
    std::vector<float> all_logits;
    if (logits) {
        all_logits.resize(ggml_nelements(logits));
        ggml_backend_tensor_get(logits, all_logits.data(), 0, ggml_nbytes(logits));
    }
    ggml_free(ctx);

    for (int b = 0; b < n_items; ++b) {
        Session & s = *items[b].session;
        if (logits)
            s.logits_.assign(all_logits.begin() + (size_t) b * c.n_vocab,
                             all_logits.begin() + (size_t) (b + 1) * c.n_vocab);
        s.appended(items[b].tokens, items[b].n_tokens);
    }
}

}  // namespace pkv
