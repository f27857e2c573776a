#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <thread>

#include "error.h"
#include "ggml-alloc.h"
#include "ggml-cpu.h"

namespace pkv {

namespace {

constexpr int kGraphSize = 16384;

double now_seconds() {
    using clock = std::chrono::steady_clock;
    return std::chrono::duration<double>(clock::now().time_since_epoch()).count();
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
        ggml_backend_cpu_set_n_threads(backend, n_threads > 0 ? n_threads : (int) std::max(1u, std::thread::hardware_concurrency()));
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
    galloc_ = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend_));
    graph_meta_.resize(ggml_tensor_overhead() * kGraphSize + ggml_graph_overhead_custom(kGraphSize, false));
}

Engine::~Engine() {
    ggml_gallocr_free(galloc_);
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

ggml_tensor * window_probs(ggml_context * ctx, ggml_tensor * k, ggml_tensor * q_window, ggml_tensor * mask, float scale) {
    ggml_tensor * kq = ggml_mul_mat(ctx, k, q_window);  // [n_kv, n_window, n_head]
    ggml_prec_set_acc(kq, GGML_PREC_F32);
    return ggml_soft_max_ext(ctx, kq, mask, scale, 0.0f);
}

int32_t argmax(const std::vector<float> & logits) {
    return (int32_t) (std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// ---------------------------------------------------------------------------------------------
// Session

Session::Session(Engine & engine, const CompressionParams & params) : engine_(engine), params_(params) {
    const std::string problem = validate_params(params_);
    if (!problem.empty()) throw Error("", problem);
    method_ = find_method(params_.method);
    kv_     = std::make_unique<KvCache>(engine_.backend(), engine_.config(), std::vector<int>(engine_.config().n_layer, 0));
}

Session::~Session() = default;

SessionStats Session::stats() const {
    SessionStats s;
    s.tokens_seen      = (int) tokens_.size();
    s.layer_kv_lengths = kv_->sizes();
    s.kv_bytes         = kv_->bytes_used();
    s.full_kv_bytes    = (size_t) s.tokens_seen * kv_->bytes_per_entry() * kv_->n_layer();
    return s;
}

void Session::reserve(int n_more) {
    std::vector<int> cap(kv_->n_layer());
    bool             grow = false;
    for (int il = 0; il < kv_->n_layer(); ++il) {
        cap[il] = std::max(kv_->capacity(il), kv_->size(il) + n_more);
        grow |= cap[il] > kv_->capacity(il);
    }
    if (grow) rebuild(cap, nullptr);
}

void Session::rebuild(const std::vector<int> & capacity, const std::vector<HeadSelection> * select) {
    const ModelConfig & c     = engine_.config();
    auto                fresh = std::make_unique<KvCache>(engine_.backend(), c, capacity);
    Engine::Graph       g     = engine_.begin_graph();
    std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>> index_inputs;
    for (int il = 0; il < kv_->n_layer(); ++il) {
        const int n_keep = select ? (int) (*select)[il][0].size() : kv_->size(il);
        fresh->set_size(il, n_keep);
        if (n_keep == 0) continue;
        for (ggml_tensor * src : { kv_->k(il), kv_->v(il) }) {
            ggml_tensor * dst  = src == kv_->k(il) ? fresh->k(il) : fresh->v(il);
            ggml_tensor * rows = nullptr;
            if (select) {
                // A different row list per KV head: get_rows takes indices [n_keep, n_head_kv].
                ggml_tensor * idx = ggml_new_tensor_2d(g.ctx, GGML_TYPE_I32, n_keep, c.n_head_kv);
                ggml_set_input(idx);
                std::vector<int32_t> flat;
                for (const auto & head : (*select)[il]) flat.insert(flat.end(), head.begin(), head.end());
                index_inputs.emplace_back(idx, std::move(flat));
                rows = ggml_get_rows(g.ctx, src, idx);  // [head_dim, n_keep, n_head_kv] f32
            } else {
                rows = ggml_view_3d(g.ctx, src, c.head_dim, n_keep, c.n_head_kv, src->nb[1], src->nb[2], 0);
            }
            ggml_tensor * out = ggml_view_3d(g.ctx, dst, c.head_dim, n_keep, c.n_head_kv, dst->nb[1], dst->nb[2], 0);
            ggml_build_forward_expand(g.gf, ggml_cpy(g.ctx, rows, out));
        }
    }
    if (ggml_graph_n_nodes(g.gf) > 0) {
        engine_.allocate(g);
        for (auto & [t, data] : index_inputs) ggml_backend_tensor_set(t, data.data(), 0, ggml_nbytes(t));
        engine_.compute(g);
    }
    ggml_free(g.ctx);
    kv_ = std::move(fresh);
}

void Session::prefill(const std::vector<int32_t> & tokens) {
    if (tokens.empty()) throw Error("prompt", "the prompt is empty");
    const ModelConfig & c = engine_.config();
    if ((int) (tokens_.size() + tokens.size()) > engine_.n_ctx()) {
        throw Error("prompt", std::to_string(tokens_.size() + tokens.size()) + " tokens exceed the context of " +
                                  std::to_string(engine_.n_ctx()));
    }
    for (int32_t t : tokens) {
        if (t < 0 || t >= c.n_vocab) throw Error("prompt", "token id " + std::to_string(t) + " outside [0, " + std::to_string(c.n_vocab) + ")");
    }
    const double t0 = now_seconds();
    const int    n  = (int) tokens.size();
    reserve(n);
    window_probs_.assign(c.n_layer, {});
    accumulated_.assign(c.n_layer, {});

    // ubatches from the front, as libllama splits them (so both run the same kernels); the window
    // queries must sit in the last evaluation, so a short tail borrows tokens from the one before.
    const int n_window = std::min(params_.window, n);
    const int ub       = std::max(engine_.options().n_ubatch, n_window);
    std::vector<int> bounds;
    for (int b = 0; b < n; b += ub) bounds.push_back(b);
    bounds.push_back(n);
    if (bounds.size() > 2 && n - bounds[bounds.size() - 2] < n_window) bounds[bounds.size() - 2] = n - n_window;
    for (size_t i = 0; i + 1 < bounds.size(); ++i) {
        const bool     last = i + 2 == bounds.size();
        ForwardOptions fo;
        fo.want_logits      = last;
        fo.window_probs     = last && method_->needs_window_probs ? n_window : 0;
        fo.accumulate_probs = method_->needs_accumulated;
        eval(tokens.data() + bounds[i], bounds[i + 1] - bounds[i], fo);
    }
    compress();
    prefill_seconds_ = now_seconds() - t0;
}

void Session::decode(int32_t token) {
    const ModelConfig & c = engine_.config();
    if (token < 0 || token >= c.n_vocab) throw Error("token", std::to_string(token) + " outside [0, " + std::to_string(c.n_vocab) + ")");
    if ((int) tokens_.size() >= engine_.n_ctx()) throw Error("prompt", "the session reached the context of " + std::to_string(engine_.n_ctx()));
    reserve(1);
    eval(&token, 1, ForwardOptions{});
}

void Session::compress() {
    const ModelConfig & c = engine_.config();
    const int           n = (int) tokens_.size();
    const std::vector<int> budgets = method_->layer_budgets(c.n_layer, n, params_);
    kept_.assign(c.n_layer, {});
    bool shrinks = false;
    for (int il = 0; il < c.n_layer; ++il) {
        LayerAttention att;
        att.n            = n;
        att.n_head       = c.n_head;
        att.n_head_kv    = c.n_head_kv;
        att.n_window     = std::min(params_.window, n);
        att.window_probs = window_probs_[il].empty() ? nullptr : window_probs_[il].data();
        att.accumulated  = accumulated_[il].empty() ? nullptr : accumulated_[il].data();
        kept_[il]        = method_->select(att, budgets[il], params_);
        shrinks |= (int) kept_[il][0].size() < n;
    }
    window_probs_.clear();
    accumulated_.clear();
    if (!shrinks) return;  // budget >= prompt: the cache already holds exactly what is kept
    std::vector<int> cap(c.n_layer);
    for (int il = 0; il < c.n_layer; ++il) cap[il] = (int) kept_[il][0].size();
    rebuild(cap, &kept_);
}

void Session::eval(const int32_t * tokens, int n_tokens, const ForwardOptions & fo) {
    const ModelConfig & c      = engine_.config();
    const Model &       m      = engine_.model();
    const int           n_past = (int) tokens_.size();
    const float         kq_scale = 1.0f / std::sqrt((float) c.head_dim);
    Engine::Graph       g      = engine_.begin_graph();
    ggml_context *      ctx    = g.ctx;

    ggml_tensor * inp_tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tokens);
    ggml_tensor * inp_pos    = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tokens);
    ggml_set_input(inp_tokens);
    ggml_set_input(inp_pos);

    // Layers can hold different numbers of entries; each distinct length gets its own slot
    // indices and causal mask (keys = stored entries, all visible, then the new tokens).
    struct LengthInputs {
        ggml_tensor * slots = nullptr;  // I64 [n_tokens]
        ggml_tensor * mask  = nullptr;  // F16 [n_kv, n_tokens], null for a single token
    };
    std::map<int, LengthInputs> by_length;
    auto inputs_for = [&](int stored) -> LengthInputs & {
        LengthInputs & li = by_length[stored];
        if (!li.slots) {
            li.slots = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_tokens);
            ggml_set_input(li.slots);
            if (n_tokens > 1) {
                li.mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, stored + n_tokens, n_tokens);
                ggml_set_input(li.mask);
            }
        }
        return li;
    };

    std::vector<std::pair<int, ggml_tensor *>> window_out, accum_out;
    ggml_tensor * x = ggml_get_rows(ctx, m.token_embd, inp_tokens);  // [n_embd, n_tokens]
    for (int il = 0; il < c.n_layer; ++il) {
        const LayerWeights & w      = m.layers[il];
        const int            stored = kv_->size(il);
        const int            n_kv   = stored + n_tokens;
        LengthInputs &       li     = inputs_for(stored);
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
        q = ggml_reshape_3d(ctx, q, c.head_dim, c.n_head, n_tokens);     // [head_dim, n_head, n_tokens]
        k = ggml_reshape_3d(ctx, k, c.head_dim, c.n_head_kv, n_tokens);  // [head_dim, n_head_kv, n_tokens]
        v = ggml_reshape_3d(ctx, v, c.head_dim, c.n_head_kv, n_tokens);
        if (w.q_norm) {
            q = ggml_mul(ctx, ggml_rms_norm(ctx, q, c.rms_eps), w.q_norm);
            k = ggml_mul(ctx, ggml_rms_norm(ctx, k, c.rms_eps), w.k_norm);
        }
        q = ggml_rope_ext(ctx, q, inp_pos, m.rope_freqs, c.n_rot, c.rope_type, c.n_ctx_train, c.rope_base,
                          c.rope_scale, 0.0f, 1.0f, 32.0f, 1.0f);
        k = ggml_rope_ext(ctx, k, inp_pos, m.rope_freqs, c.n_rot, c.rope_type, c.n_ctx_train, c.rope_base,
                          c.rope_scale, 0.0f, 1.0f, 32.0f, 1.0f);

        // Append to the store: rows [head_dim] at slots stored..stored+n_tokens-1 of every KV head.
        // Reading through set_rows' result orders the write before the attention.
        ggml_tensor * kc = ggml_set_rows(ctx, kv_->k(il), ggml_permute(ctx, k, 0, 2, 1, 3), li.slots);
        ggml_tensor * vc = ggml_set_rows(ctx, kv_->v(il), ggml_permute(ctx, v, 0, 2, 1, 3), li.slots);
        ggml_tensor * kview = ggml_view_3d(ctx, kc, c.head_dim, n_kv, c.n_head_kv, kc->nb[1], kc->nb[2], 0);
        ggml_tensor * vview = ggml_view_3d(ctx, vc, c.head_dim, n_kv, c.n_head_kv, vc->nb[1], vc->nb[2], 0);
        ggml_tensor * qp    = ggml_permute(ctx, q, 0, 2, 1, 3);  // [head_dim, n_tokens, n_head]

        ggml_tensor * attn = ggml_flash_attn_ext(ctx, qp, kview, vview, li.mask, kq_scale, 0.0f, 0.0f);
        ggml_prec_set_acc(attn, GGML_PREC_F32);
        cur = ggml_reshape_2d(ctx, attn, c.head_dim * c.n_head, n_tokens);  // [n_head*head_dim, n_tokens]
        cur = ggml_mul_mat(ctx, w.wo, cur);

        if (fo.window_probs > 0) {
            // SnapKV scores: the last window queries against every key, an α×n product per layer.
            const int     nw = fo.window_probs;
            ggml_tensor * qw = ggml_view_3d(ctx, qp, c.head_dim, nw, c.n_head, qp->nb[1], qp->nb[2], (n_tokens - nw) * qp->nb[1]);
            ggml_tensor * mw = li.mask ? ggml_view_2d(ctx, li.mask, n_kv, nw, li.mask->nb[1], (n_tokens - nw) * li.mask->nb[1]) : nullptr;
            ggml_tensor * kq = window_probs(ctx, kview, qw, mw, kq_scale);
            ggml_set_output(kq);
            ggml_build_forward_expand(g.gf, kq);
            window_out.emplace_back(il, kq);
        }
        if (fo.accumulate_probs) {
            // H2O: every query of this chunk against every key, summed over queries.
            ggml_tensor * kq = window_probs(ctx, kview, qp, li.mask, kq_scale);  // [n_kv, n_tokens, n_head]
            kq = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, kq, 1, 0, 2, 3)));  // [1, n_kv, n_head]
            ggml_set_output(kq);
            ggml_build_forward_expand(g.gf, kq);
            accum_out.emplace_back(il, kq);
        }

        if (il == c.n_layer - 1 && fo.want_logits && n_tokens > 1) {
            // Only the last token's logits are needed: drop the other rows before the FFN.
            cur    = ggml_view_2d(ctx, cur, cur->ne[0], 1, cur->nb[1], (n_tokens - 1) * cur->nb[1]);
            inp_sa = ggml_view_2d(ctx, inp_sa, inp_sa->ne[0], 1, inp_sa->nb[1], (n_tokens - 1) * inp_sa->nb[1]);
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
        logits = ggml_mul_mat(ctx, m.output, x);  // [n_vocab, 1]
        ggml_set_output(logits);
        ggml_build_forward_expand(g.gf, logits);
    } else {
        ggml_build_forward_expand(g.gf, x);
    }

    engine_.allocate(g);
    std::vector<int32_t> pos(n_tokens);
    for (int i = 0; i < n_tokens; ++i) pos[i] = n_past + i;  // tokens seen, never the stored length
    ggml_backend_tensor_set(inp_tokens, tokens, 0, ggml_nbytes(inp_tokens));
    ggml_backend_tensor_set(inp_pos, pos.data(), 0, ggml_nbytes(inp_pos));
    std::vector<ggml_fp16_t> mask;
    std::vector<int64_t>     slots(n_tokens);
    for (auto & [stored, li] : by_length) {
        for (int i = 0; i < n_tokens; ++i) slots[i] = stored + i;
        ggml_backend_tensor_set(li.slots, slots.data(), 0, ggml_nbytes(li.slots));
        if (!li.mask) continue;
        const int n_kv = stored + n_tokens;
        mask.assign((size_t) n_kv * n_tokens, ggml_fp32_to_fp16(0.0f));
        const ggml_fp16_t neg_inf = ggml_fp32_to_fp16(-INFINITY);
        for (int i = 0; i < n_tokens; ++i) {
            for (int j = stored + i + 1; j < n_kv; ++j) mask[(size_t) i * n_kv + j] = neg_inf;
        }
        ggml_backend_tensor_set(li.mask, mask.data(), 0, ggml_nbytes(li.mask));
    }
    engine_.compute(g);

    for (auto & [il, t] : window_out) {
        // [n_kv, nw, n_head] is exactly LayerAttention's [n_head][n_window][n] layout.
        window_probs_[il].resize(ggml_nelements(t));
        ggml_backend_tensor_get(t, window_probs_[il].data(), 0, ggml_nbytes(t));
    }
    for (auto & [il, t] : accum_out) {
        const int           n_kv = (int) t->ne[1];
        std::vector<float>  chunk(ggml_nelements(t));
        ggml_backend_tensor_get(t, chunk.data(), 0, ggml_nbytes(t));
        const int           n_total = n_past + n_tokens;
        std::vector<float> & acc    = accumulated_[il];
        std::vector<float>   grown((size_t) c.n_head * n_total, 0.0f);
        const int            old_n = acc.empty() ? 0 : (int) (acc.size() / c.n_head);
        for (int h = 0; h < c.n_head; ++h) {
            for (int j = 0; j < old_n; ++j) grown[(size_t) h * n_total + j] = acc[(size_t) h * old_n + j];
            // keys of this layer's view are the stored entries then the new tokens; before any
            // compression the stored entries are exactly positions 0..n_past-1.
            for (int j = 0; j < n_kv; ++j) grown[(size_t) h * n_total + j] += chunk[(size_t) h * n_kv + j];
        }
        acc = std::move(grown);
    }
    if (logits) {
        logits_.resize(c.n_vocab);
        ggml_backend_tensor_get(logits, logits_.data(), 0, ggml_nbytes(logits));
    }
    ggml_free(ctx);

    tokens_.insert(tokens_.end(), tokens, tokens + n_tokens);
    for (int il = 0; il < c.n_layer; ++il) kv_->set_size(il, kv_->size(il) + n_tokens);
}

}  // namespace pkv
