#include "engine.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <thread>

#include "error.h"
#include "ggml-alloc.h"
#include "ggml-backend-impl.h"  // struct ggml_backend_buffer_type, for compute_buffer_type()
#include "ggml-cpu.h"
#include "profile.h"
#include "session.h"

namespace pkv {

namespace {

constexpr int kGraphSize = 32768;  // nodes of a graph at least (more for batches that need them)

// Where the engine's graphs put their tensors. ggml's CPU buffer type aligns tensors to 32 bytes,
// so half of them start in the middle of a cache line, and an AVX-512 kernel whose output rows do
// splits every 64-byte load and store: AMX's Q4_1 matmul for SmolLM2's FFN gate [1536, 512] takes
// 2.5 ms instead of 1.5 (docs/ENGINE.md "Compute buffers"). On the CPU the graphs go to ggml's own
// buffer type, copied, but for a 64-byte alignment (its buffers are 64-byte aligned already);
// other backends keep theirs (CUDA aligns to 128).
ggml_backend_buffer_type_t compute_buffer_type(ggml_backend_t backend, bool on_cpu) {
    ggml_backend_buffer_type_t own = ggml_backend_get_default_buffer_type(backend);
    if (!on_cpu) return own;
    static ggml_backend_buffer_type aligned = [own] {
        ggml_backend_buffer_type t = *own;
        t.iface.get_alignment      = [](ggml_backend_buffer_type_t) -> size_t { return kCpuTensorAlignment; };
        return t;
    }();
    return &aligned;
}

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
        // Fused projections are a CPU measure: ggml's CUDA backend already fuses a decode step's
        // gate and up matmuls with the GLU, and a GPU's matmul rounds by its tiling of the rows.
        model_ =
            std::make_unique<Model>(opt_.model_path, backend_, opt_.repack_weights, opt_.fuse_projections && on_cpu());
    } catch (...) {
        ggml_backend_free(backend_);
        throw;
    }
    const ModelConfig & c        = model_->config();
    const size_t        per_slot = kv_entry_bytes(opt_.kv_type, c.head_dim, c.n_head_kv);
    // Entries of a quantised type do not tile a page exactly: a run can lose one to the alignment
    // of its start, so a pool sized in entries gets a page per layer more (docs/ENGINE.md "KV pool").
    const size_t slack      = opt_.kv_type == KvType::F16
                                  ? 0
                                  : (size_t) c.n_layer * 16 * kv_entry_bytes(KvType::F16, c.head_dim, c.n_head_kv);
    const size_t pool_bytes = opt_.kv_pool_bytes > 0 ? opt_.kv_pool_bytes
                              : opt_.kv_pool_tokens > 0
                                  ? per_slot * c.n_layer * opt_.kv_pool_tokens + slack
                                  : per_slot * c.n_layer * ((size_t) n_ctx() + opt_.n_ubatch + 64) + slack;
    try {
        pool_ = std::make_unique<KvPool>(backend_, c.head_dim, c.n_head_kv, pool_bytes);
        if (!pool_->supports(opt_.kv_type)) {
            throw Error("--kv-type", std::string(kv_type_name(opt_.kv_type)) +
                                         " needs head_dim to be a multiple of 32 (the model's is " +
                                         std::to_string(c.head_dim) + "); accepted for this model: f16");
        }
    } catch (...) {
        model_.reset();
        ggml_backend_free(backend_);
        throw;
    }
    set_decode_attention(opt_.decode_attention);
    galloc_ = ggml_gallocr_new(compute_buffer_type(backend_, on_cpu()));
}

bool Engine::on_cpu() const {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend_);
    return dev && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
}

void Engine::set_decode_attention(DecodeAttention a) {
    // On a CPU the batched gather's copies cost more than the kernels they save (docs/BENCHMARKS.md
    // "Serving": 4k PyramidKV@128 sessions decode faster one kernel each, and every such step can
    // reuse its graph); on a GPU a kernel is a launch, and one per layer is the point.
    if (a == DecodeAttention::automatic) {
        a = on_cpu() ? DecodeAttention::per_session : DecodeAttention::batched;
    }
    opt_.decode_attention = a;
}

Engine::~Engine() {
    drop_kept();
    ggml_gallocr_free(galloc_);
    pool_.reset();
    model_.reset();
    ggml_backend_free(backend_);
}

std::string Engine::device_name() const { return ggml_backend_name(backend_); }

Engine::Graph Engine::begin_graph(int min_nodes, std::vector<uint8_t> * meta) {
    std::vector<uint8_t> & mem     = meta ? *meta : graph_meta_;
    const int              n_nodes = std::max(kGraphSize, min_nodes);
    const size_t           bytes   = ggml_tensor_overhead() * n_nodes + ggml_graph_overhead_custom(n_nodes, false);
    if (mem.size() < bytes) mem.resize(bytes);
    ggml_init_params ip{ mem.size(), mem.data(), /*no_alloc=*/true };
    ggml_context *   ctx = ggml_init(ip);
    return { ctx, ggml_new_graph_custom(ctx, n_nodes, false) };
}

void Engine::allocate(Graph & g) {
    profile::Scope scope(profile::Phase::allocate);
    try {
        op_check_.check(backend_, g.gf);  // one line naming the op, not an abort inside the backend
    } catch (...) {
        ggml_free(g.ctx);
        throw;
    }
    ++allocations_;  // from here on a kept decode graph's intermediate tensors may have moved
    if (!ggml_gallocr_alloc_graph(galloc_, g.gf)) {
        ggml_free(g.ctx);
        throw Error("engine", "cannot allocate the compute graph");
    }
}

void Engine::drop_kept() {
    if (kept_.valid) ggml_free(kept_.fg.g.ctx);
    kept_ = KeptDecode{};
}

void Engine::compute(Graph & g) {
    profile::Scope scope(profile::Phase::compute);
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
    // A graph writes and reads the pool tensors of one storage type: sessions of several types
    // decode in one graph per type (at most kKvTypes).
    GraphStats step;
    for (KvType t : all_kv_types()) {
        std::vector<ForwardItem> of_type;
        for (const ForwardItem & it : items)
            if (it.session->kv_type() == t) of_type.push_back(it);
        if (of_type.empty()) continue;
        forward(of_type, ForwardOptions{});
        step.nodes += last_graph_.nodes;
        step.attention_nodes += last_graph_.attention_nodes;
    }
    last_graph_ = step;
}

// ---------------------------------------------------------------------------------------------
// The forward pass: build the graph (math only), then run it (fill inputs, compute, read outputs).
// Prefill ubatches (one item of many tokens) and batched decode steps (many items of one token)
// share it; n_total is the number of tokens of all items together.

Engine::ForwardScores Engine::forward(const std::vector<ForwardItem> & items, const ForwardOptions & fo) {
    auto stats_of = [](const ForwardGraph & g) {
        GraphStats st{ ggml_graph_n_nodes(g.g.gf), 0 };
        for (int i = 0; i < st.nodes; ++i) {
            if (ggml_graph_node(g.g.gf, i)->op == GGML_OP_FLASH_ATTN_EXT) ++st.attention_nodes;
        }
        return st;
    };
    // A decode step runs the kept graph when it fits (only its inputs change), else builds one,
    // which it keeps when the next steps can reuse it (docs/ENGINE.md "Graph reuse").
    const bool     reusable = reusable_decode(items, fo);
    ForwardGraph   own;
    ForwardGraph * fg = &own;
    if (reusable && decode_graph_fits(items)) {
        fg = &kept_.fg;
    } else if (reusable) {
        drop_kept();  // its tensors live in kept_meta_, which the new graph takes
        ForwardGraph built = build_forward(items, fo, /*headroom=*/true);
        ++graphs_built_;
        allocate(built.g);  // frees the graph when it throws
        kept_.fg         = std::move(built);
        kept_.type       = items[0].session->kv_type();
        kept_.allocation = allocations_;
        kept_.stats      = stats_of(kept_.fg);
        kept_.valid      = true;
        fg               = &kept_.fg;
    } else {
        own = build_forward(items, fo);
        ++graphs_built_;
        allocate(own.g);
    }
    last_graph_ = fg == &kept_.fg ? kept_.stats : stats_of(own);
    std::vector<float> logits;
    ForwardScores      scores;
    try {
        scores = run_forward(*fg, items, logits);
    } catch (...) {
        if (fg == &own) ggml_free(own.g.ctx);
        else drop_kept();
        throw;
    }
    if (fg == &own) ggml_free(own.g.ctx);

    const int n_vocab = config().n_vocab;
    for (size_t b = 0; b < items.size(); ++b) {
        Session & s = *items[b].session;
        if (!logits.empty()) s.logits_.assign(logits.begin() + b * n_vocab, logits.begin() + (b + 1) * n_vocab);
        s.appended(items[b].tokens, items[b].n_tokens);
    }
    return scores;
}

std::vector<int> Engine::batch_members(const std::vector<ForwardItem> & items, int il) const {
    std::vector<int> members;
    if (items.size() < 2 || opt_.decode_attention != DecodeAttention::batched) return members;
    for (int b = 0; b < (int) items.size(); ++b) {
        const int n_kv = items[b].session->size_[il] + items[b].n_tokens;
        if (items[b].n_tokens == 1 && n_kv < kOwnKernelKv) members.push_back(b);
    }
    if (members.size() < 2) members.clear();  // one session gains nothing from a gather
    return members;
}

bool Engine::reusable_decode(const std::vector<ForwardItem> & items, const ForwardOptions & fo) const {
    if (!opt_.reuse_decode_graphs || !fo.want_logits || fo.window_probs > 0 || fo.accumulate_probs) return false;
    // The headroom's slots hold whatever their pages held last (another session's entries, or
    // another KV type's blocks, which read as f16 can be Inf or NaN). ggml's CPU kernel skips a
    // -inf key before reading it; a GPU kernel reads it and adds 0 x V, which is NaN for such
    // bytes. So decode graphs are kept on a CPU only.
    if (!on_cpu()) return false;
    for (const ForwardItem & it : items) {
        if (it.n_tokens != 1 || it.session->kv_type() != items[0].session->kv_type()) return false;
    }
    for (int il = 0; il < config().n_layer; ++il) {
        if (!batch_members(items, il).empty()) return false;
    }
    return true;
}

bool Engine::decode_graph_fits(const std::vector<ForwardItem> & items) const {
    if (!kept_.valid || kept_.allocation != allocations_ || kept_.type != items[0].session->kv_type()) return false;
    if (kept_.fg.view_kv.empty() || kept_.fg.view_kv[0].size() != items.size()) return false;
    for (int il = 0; il < config().n_layer; ++il) {
        for (size_t b = 0; b < items.size(); ++b) {
            const Session & s    = *items[b].session;
            const int       n_kv = s.size_[il] + 1;
            const int       view = kept_.fg.view_kv[il][b];
            if (pool_->first_slot(s.pages_[il]) != kept_.fg.view_first[il][b] || n_kv > view) return false;
            // A view at or past kOwnKernelKv has no headroom: ggml's kernel depends on its length.
            if (view >= kOwnKernelKv && view != n_kv) return false;
        }
    }
    return true;
}

Engine::ForwardGraph Engine::build_forward(const std::vector<ForwardItem> & items, const ForwardOptions & fo,
                                           bool headroom) {
    profile::Scope      scope(profile::Phase::build);
    const ModelConfig & c       = config();
    const Model &       m       = *model_;
    const int           n_items = (int) items.size();
    int                 n_total = 0;
    for (const ForwardItem & it : items) n_total += it.n_tokens;
    ForwardGraph fg;
    // Every item that attends on its own adds a handful of nodes per layer (views, kernel, join).
    fg.g        = begin_graph(4096 + c.n_layer * (64 + 8 * n_items), headroom ? &kept_meta_ : nullptr);
    fg.headroom = headroom;
    if (headroom) {
        fg.view_first.assign(c.n_layer, std::vector<int64_t>(n_items));
        fg.view_kv.assign(c.n_layer, std::vector<int>(n_items));
    }
    ggml_context * ctx = fg.g.ctx;

    fg.tokens    = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_total);
    fg.positions = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_total);
    ggml_set_input(fg.tokens);
    ggml_set_input(fg.positions);
    // Each token's slot in the pool, per layer (sessions' pages are anywhere in the pool).
    fg.slots.resize(c.n_layer);
    for (auto & t : fg.slots) {
        t = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, n_total);
        ggml_set_input(t);
    }
    if (fo.want_logits && n_total > n_items) {
        fg.out_ids = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_items);
        ggml_set_input(fg.out_ids);
    }
    fg.batched.assign(c.n_layer, BatchedAttention{});
    fg.window_probs.assign(c.n_layer, nullptr);
    fg.attention_sums.assign(c.n_layer, nullptr);

    const KvType kv_type = items[0].session->kv_type();
    for (const ForwardItem & it : items) {
        if (it.session->kv_type() != kv_type) throw Error("engine", "one forward graph holds one KV storage type");
    }
    ggml_tensor * x = ggml_get_rows(ctx, m.token_embd, fg.tokens);  // [n_embd, n_total]
    for (int il = 0; il < c.n_layer; ++il) {
        const LayerWeights & w      = m.layers[il];
        ggml_tensor *        inp_sa = x;

        ggml_tensor * cur = ggml_mul(ctx, ggml_rms_norm(ctx, x, c.rms_eps), w.attn_norm);
        // q [head_dim, n_head, n_total], k and v [head_dim, n_head_kv, n_total]: views of one
        // fused projection's rows, or each its own.
        ggml_tensor *q = nullptr, *k = nullptr, *v = nullptr;
        {
            const int64_t n_q = (int64_t) c.n_head * c.head_dim, n_k = (int64_t) c.n_head_kv * c.head_dim;
            ggml_tensor * qkv   = w.wqkv  ? ggml_mul_mat(ctx, w.wqkv, cur)
                                  : w.wqk ? ggml_mul_mat(ctx, w.wqk, cur)
                                          : nullptr;
            const auto    heads = [&](ggml_tensor * t, int n_heads, int64_t first_row) {
                return ggml_view_3d(ctx, t, c.head_dim, n_heads, n_total, t->nb[0] * c.head_dim, t->nb[1],
                                    t->nb[0] * first_row);
            };
            // A projection of its own adds its bias right after its matmul (the pair a GPU backend
            // fuses); a view of the fused product adds it per head.
            const auto alone = [&](ggml_tensor * wt, ggml_tensor * b, int n_heads) {
                ggml_tensor * t = ggml_mul_mat(ctx, wt, cur);
                return heads(b ? ggml_add(ctx, t, b) : t, n_heads, 0);
            };
            const auto biased = [&](ggml_tensor * t, ggml_tensor * b, int n_heads) {
                return b ? ggml_add(ctx, t, ggml_reshape_2d(ctx, b, c.head_dim, n_heads)) : t;
            };
            q = qkv ? biased(heads(qkv, c.n_head, 0), w.bq, c.n_head) : alone(w.wq, w.bq, c.n_head);
            k = qkv ? biased(heads(qkv, c.n_head_kv, n_q), w.bk, c.n_head_kv) : alone(w.wk, w.bk, c.n_head_kv);
            v = w.wqkv ? biased(heads(qkv, c.n_head_kv, n_q + n_k), w.bv, c.n_head_kv) : alone(w.wv, w.bv, c.n_head_kv);
        }
        if (w.q_norm) {
            q = ggml_mul(ctx, ggml_rms_norm(ctx, q, c.rms_eps), w.q_norm);
            k = ggml_mul(ctx, ggml_rms_norm(ctx, k, c.rms_eps), w.k_norm);
        }
        q = ggml_rope_ext(ctx, q, fg.positions, m.rope_freqs, c.n_rot, c.rope_type, c.n_ctx_train, c.rope_base,
                          c.rope_scale, 0.0f, 1.0f, 32.0f, 1.0f);
        k = ggml_rope_ext(ctx, k, fg.positions, m.rope_freqs, c.n_rot, c.rope_type, c.n_ctx_train, c.rope_base,
                          c.rope_scale, 0.0f, 1.0f, 32.0f, 1.0f);

        // Append every token's K, V at its session's next slot of this layer. Reading the store
        // through set_rows' result orders these writes before the attention.
        // Quantised types are quantised here, row by row (ggml's blocks of 32 along head_dim).
        ggml_tensor * kc = ggml_set_rows(ctx, pool_->k(kv_type), ggml_permute(ctx, k, 0, 2, 1, 3), fg.slots[il]);
        ggml_tensor * vc = ggml_set_rows(ctx, pool_->v(kv_type), ggml_permute(ctx, v, 0, 2, 1, 3), fg.slots[il]);
        ggml_tensor * qp = ggml_permute(ctx, q, 0, 2, 1, 3);  // [head_dim, n_total, n_head]

        cur = build_attention(fg, items, fo, il, qp, kc, vc);  // [n_head * head_dim, n_total]
        cur = ggml_mul_mat(ctx, w.wo, cur);                    // [n_embd, n_total]

        if (il == c.n_layer - 1 && fg.out_ids) {
            // Only the last token of each item needs logits: drop the other rows before the FFN.
            cur    = ggml_get_rows(ctx, cur, fg.out_ids);  // [n_embd, n_items]
            inp_sa = ggml_get_rows(ctx, inp_sa, fg.out_ids);
        }
        x = ggml_add(ctx, cur, inp_sa);

        ggml_tensor * ffn_inp = x;
        cur                   = ggml_mul(ctx, ggml_rms_norm(ctx, x, c.rms_eps), w.ffn_norm);
        // silu(gate) * up [n_ff, n_rows]; ggml_swiglu of the fused [2 * n_ff, n_rows] takes its
        // first half as the gate.
        ggml_tensor * act = w.ffn_gate_up ? ggml_swiglu(ctx, ggml_mul_mat(ctx, w.ffn_gate_up, cur))
                                          : ggml_swiglu_split(ctx, ggml_mul_mat(ctx, w.ffn_gate, cur),
                                                              ggml_mul_mat(ctx, w.ffn_up, cur));
        cur               = ggml_mul_mat(ctx, w.ffn_down, act);  // [n_embd, n_rows]
        x                 = ggml_add(ctx, cur, ffn_inp);
    }
    if (fo.want_logits) {
        x         = ggml_mul(ctx, ggml_rms_norm(ctx, x, c.rms_eps), m.output_norm);
        fg.logits = ggml_mul_mat(ctx, m.output, x);  // [n_vocab, n_items]
        ggml_set_output(fg.logits);
        ggml_build_forward_expand(fg.g.gf, fg.logits);
    } else {
        ggml_build_forward_expand(fg.g.gf, x);
    }
    return fg;
}

// Attention of every item over its own session's entries (those stored, then its new tokens).
// Single-token items (decode) whose layer holds fewer than kOwnKernelKv entries share one flash
// attention: their entries are gathered into one padded tensor, each session's padding masked
// (docs/ENGINE.md "Batched decode"). Other items — prompt chunks, and long sessions, which the
// CPU kernel splits across threads and which padding would make everyone pay for — get one
// flash attention over a strided view of their own pages, with no copy.
// q [head_dim, n_total, n_head]; kc, vc: the pool after this layer's writes.
ggml_tensor * Engine::build_attention(ForwardGraph & fg, const std::vector<ForwardItem> & items,
                                      const ForwardOptions & fo, int il, ggml_tensor * q, ggml_tensor * kc,
                                      ggml_tensor * vc) {
    const ModelConfig & c        = config();
    ggml_context *      ctx      = fg.g.ctx;
    const float         kq_scale = 1.0f / std::sqrt((float) c.head_dim);
    const int           n_items  = (int) items.size();
    const int           n_total  = (int) q->ne[1];
    std::vector<int>    offsets(n_items);  // each item's first token among all
    for (int b = 1; b < n_items; ++b) offsets[b] = offsets[b - 1] + items[b - 1].n_tokens;

    BatchedAttention ba;
    ba.items = batch_members(items, il);
    for (int b : ba.items) ba.max_kv = std::max(ba.max_kv, items[b].session->size_[il] + 1);

    std::vector<ggml_tensor *> parts;  // [n_head * head_dim, n_tok] per kernel: the batch first, then the others
    std::vector<int32_t>       order;  // item of each column of the joined parts
    if (!ba.items.empty()) {
        const int n_b = (int) ba.items.size(), n_kv = ba.max_kv;
        // Row j of session i in the batch, per KV head: its pool slot (padding repeats a real one).
        ba.rows = ggml_new_tensor_2d(ctx, GGML_TYPE_I32, (int64_t) n_kv * n_b, c.n_head_kv);
        ba.mask = ggml_new_tensor_4d(ctx, GGML_TYPE_F16, n_kv, 1, 1, n_b);  // 0, or -inf for padding
        ggml_set_input(ba.rows);
        ggml_set_input(ba.mask);
        // get_rows dequantises to f32; casting back to the pool's type restores the stored values
        // exactly (f16 and the pool's block types round-trip), so the kernel sees the same operands
        // as over the session's own view.
        auto gather = [&](ggml_tensor * pool) {
            ggml_tensor * g =
                ggml_cast(ctx, ggml_get_rows(ctx, pool, ba.rows), pool->type);  // [hd, n_kv*n_b, n_head_kv]
            g = ggml_reshape_4d(ctx, g, c.head_dim, n_kv, n_b, c.n_head_kv);
            return ggml_permute(ctx, g, 0, 1, 3, 2);  // [head_dim, n_kv, n_head_kv, n_b]
        };
        // The batch's queries, [head_dim, 1, n_head, n_b]: one token each, in batch order. q is a
        // permuted view whose memory is [head_dim, n_head, n_total], one token's heads contiguous.
        ggml_tensor * qb = nullptr;
        if (n_b < n_total) {
            ba.query_rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_b);
            ggml_set_input(ba.query_rows);
            qb = ggml_get_rows(ctx, ggml_view_2d(ctx, q, c.head_dim * c.n_head, n_total, q->nb[1], 0), ba.query_rows);
            qb = ggml_reshape_4d(ctx, qb, c.head_dim, 1, c.n_head, n_b);
        } else {
            qb = ggml_view_4d(ctx, q, c.head_dim, 1, c.n_head, n_total, q->nb[1], q->nb[2], q->nb[1], 0);
        }
        ggml_tensor * attn = ggml_flash_attn_ext(ctx, qb, gather(kc), gather(vc), ba.mask, kq_scale, 0.0f,
                                                 0.0f);  // [head_dim, n_head, 1, n_b]
        ggml_prec_set_acc(attn, GGML_PREC_F32);
        parts.push_back(ggml_reshape_2d(ctx, attn, c.head_dim * c.n_head, n_b));
        for (int b : ba.items) order.push_back(offsets[b]);
    }
    for (int b = 0, offset = 0; b < n_items; offset += items[b].n_tokens, ++b) {
        if (std::find(ba.items.begin(), ba.items.end(), b) != ba.items.end()) continue;
        const Session & s      = *items[b].session;
        const int       n_tok  = items[b].n_tokens;
        const int       stored = s.size_[il];
        const int       n_kv   = stored + n_tok;
        const size_t    first  = (size_t) pool_->first_slot(s.pages_[il]);
        // A reusable decode graph's view covers the next steps' entries too (masked until they
        // are written), up to the pool's end and short of ggml's split kernel.
        int n_view = n_kv;
        if (fg.headroom && n_kv < kOwnKernelKv) {
            n_view = (int) std::min<int64_t>(
                { (int64_t) n_kv + kDecodeHeadroom, kOwnKernelKv - 1, kc->ne[1] - (int64_t) first });
        }
        // This session's entries: a strided view of its pages, [head_dim, n_view, n_head_kv].
        ggml_tensor * kview =
            ggml_view_3d(ctx, kc, c.head_dim, n_view, c.n_head_kv, kc->nb[1], kc->nb[2], first * kc->nb[1]);
        ggml_tensor * vview =
            ggml_view_3d(ctx, vc, c.head_dim, n_view, c.n_head_kv, vc->nb[1], vc->nb[2], first * vc->nb[1]);
        // This item's queries, [head_dim, n_tok, n_head].
        ggml_tensor * qb =
            n_items == 1 ? q : ggml_view_3d(ctx, q, c.head_dim, n_tok, c.n_head, q->nb[1], q->nb[2], offset * q->nb[1]);
        ggml_tensor * mask = nullptr;
        if (fg.headroom) {
            fg.view_first[il][b] = (int64_t) first;
            fg.view_kv[il][b]    = n_view;
            mask                 = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_view, 1);
            ggml_set_input(mask);
            fg.view_masks[{ b, il }] = mask;
        } else if (n_tok > 1) {
            ggml_tensor *& t = fg.masks[{ b, stored }];
            if (!t) {
                t = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_kv, n_tok);
                ggml_set_input(t);
            }
            mask = t;
        }
        ggml_tensor * attn =
            ggml_flash_attn_ext(ctx, qb, kview, vview, mask, kq_scale, 0.0f, 0.0f);  // [head_dim, n_head, n_tok]
        ggml_prec_set_acc(attn, GGML_PREC_F32);
        parts.push_back(ggml_reshape_2d(ctx, attn, c.head_dim * c.n_head, n_tok));  // [n_head * head_dim, n_tok]
        for (int i = 0; i < n_tok; ++i) order.push_back(offset + i);
        if (n_items == 1 && !fg.headroom) build_scores(fg, fo, il, qb, kview, mask);
    }
    ggml_tensor * out = concat_columns(ctx, parts);  // [n_head * head_dim, n_total], token `order[i]` in column i
    if (!std::is_sorted(order.begin(), order.end())) {
        // Back to token order: row r of the result is the column that holds token r.
        ba.column_of_token.assign(n_total, 0);
        for (int col = 0; col < n_total; ++col) ba.column_of_token[order[col]] = col;
        ba.columns = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_total);
        ggml_set_input(ba.columns);
        out = ggml_get_rows(ctx, out, ba.columns);
    }
    fg.batched[il] = std::move(ba);
    return out;
}

// The scores compression reads, beside the attention (never n×n at once). q [head_dim, n_tok,
// n_head], k [head_dim, n_kv, n_head_kv], mask [n_kv, n_tok] or null.
void Engine::build_scores(ForwardGraph & fg, const ForwardOptions & fo, int il, ggml_tensor * q, ggml_tensor * k,
                          ggml_tensor * mask) {
    ggml_context * ctx      = fg.g.ctx;
    const float    kq_scale = 1.0f / std::sqrt((float) config().head_dim);
    const int      n_tok = (int) q->ne[1], n_kv = (int) k->ne[1];
    // Quantised keys are dequantised to f32 for the scores: the product with a quantised K would
    // round the queries to q8_0 as well, so the only difference from f16's scores is the keys'
    // own rounding (docs/ENGINE.md "KV types").
    if (ggml_is_quantized(k->type)) k = ggml_cast(ctx, k, GGML_TYPE_F32);
    if (fo.window_probs > 0) {
        // SnapKV: the last window queries against every key, an α×n product per layer.
        const int     nw = fo.window_probs;
        ggml_tensor * qw = ggml_view_3d(ctx, q, q->ne[0], nw, q->ne[2], q->nb[1], q->nb[2], (n_tok - nw) * q->nb[1]);
        ggml_tensor * mw = mask ? ggml_view_2d(ctx, mask, n_kv, nw, mask->nb[1], (n_tok - nw) * mask->nb[1]) : nullptr;
        ggml_tensor * p  = window_probs(ctx, k, qw, mw, kq_scale);  // [n_kv, nw, n_head]
        ggml_set_output(p);
        ggml_build_forward_expand(fg.g.gf, p);
        fg.window_probs[il] = p;
    }
    if (fo.accumulate_probs) {
        // H2O: every query of this chunk against every key, summed over queries.
        ggml_tensor * p = window_probs(ctx, k, q, mask, kq_scale);  // [n_kv, n_tok, n_head]
        p               = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_permute(ctx, p, 1, 0, 2, 3)));  // [1, n_kv, n_head]
        ggml_set_output(p);
        ggml_build_forward_expand(fg.g.gf, p);
        fg.attention_sums[il] = p;
    }
}

Engine::ForwardScores Engine::run_forward(ForwardGraph & fg, const std::vector<ForwardItem> & items,
                                          std::vector<float> & logits) {
    profile::Scope       scope(profile::Phase::inputs);  // until the reads below
    const ModelConfig &  c       = config();
    const int            n_items = (int) items.size();
    const int            n_total = (int) fg.tokens->ne[0];
    std::vector<int32_t> tok(n_total), pos(n_total), last(n_items);
    for (int b = 0, o = 0; b < n_items; o += items[b].n_tokens, ++b) {
        const int n_seen = (int) items[b].session->tokens_.size();
        for (int i = 0; i < items[b].n_tokens; ++i) {
            tok[o + i] = items[b].tokens[i];
            pos[o + i] = n_seen + i;  // tokens seen, never the stored length
        }
        last[b] = o + items[b].n_tokens - 1;
    }
    ggml_backend_tensor_set(fg.tokens, tok.data(), 0, ggml_nbytes(fg.tokens));
    ggml_backend_tensor_set(fg.positions, pos.data(), 0, ggml_nbytes(fg.positions));
    if (fg.out_ids) ggml_backend_tensor_set(fg.out_ids, last.data(), 0, ggml_nbytes(fg.out_ids));
    std::vector<int64_t> slots(n_total);
    for (int il = 0; il < c.n_layer; ++il) {
        for (int b = 0, o = 0; b < n_items; o += items[b].n_tokens, ++b) {
            const Session & s     = *items[b].session;
            const int64_t   first = pool_->first_slot(s.pages_[il]) + s.size_[il];
            for (int i = 0; i < items[b].n_tokens; ++i) slots[o + i] = first + i;
        }
        ggml_backend_tensor_set(fg.slots[il], slots.data(), 0, ggml_nbytes(fg.slots[il]));
    }
    // Keys are the stored entries (all visible) followed by the new tokens (causal).
    std::vector<ggml_fp16_t> mask;
    const ggml_fp16_t        zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
    for (auto & [key, t] : fg.masks) {
        const int stored = key.second, n_tok = items[key.first].n_tokens, n_kv = stored + n_tok;
        mask.assign((size_t) n_kv * n_tok, zero);
        for (int i = 0; i < n_tok; ++i) {
            for (int j = stored + i + 1; j < n_kv; ++j) mask[(size_t) i * n_kv + j] = neg_inf;
        }
        ggml_backend_tensor_set(t, mask.data(), 0, ggml_nbytes(t));
    }
    // A reusable decode graph's views: the entries held (the new one included), then headroom.
    for (auto & [key, t] : fg.view_masks) {
        const int n_kv = items[key.first].session->size_[key.second] + 1;
        mask.assign((size_t) t->ne[0], neg_inf);
        std::fill(mask.begin(), mask.begin() + n_kv, zero);
        ggml_backend_tensor_set(t, mask.data(), 0, ggml_nbytes(t));
    }
    // The batched attention of each layer: every session's slots (padding repeats its last, which
    // the mask hides), its mask row, its query and where the joined output puts each token.
    std::vector<int32_t> rows, query_rows;
    for (int il = 0; il < c.n_layer; ++il) {
        const BatchedAttention & ba = fg.batched[il];
        if (ba.items.empty()) continue;
        const int n_b = (int) ba.items.size(), n_kv = ba.max_kv;
        rows.resize((size_t) n_kv * n_b * c.n_head_kv);
        mask.assign((size_t) n_kv * n_b, neg_inf);
        query_rows.clear();
        for (int i = 0; i < n_b; ++i) {
            const Session & s     = *items[ba.items[i]].session;
            const int32_t   first = pool_->first_slot(s.pages_[il]);
            const int       n_own = s.size_[il] + 1;
            for (int j = 0; j < n_kv; ++j) rows[(size_t) i * n_kv + j] = first + std::min(j, n_own - 1);
            std::fill(mask.begin() + (size_t) i * n_kv, mask.begin() + (size_t) i * n_kv + n_own, zero);
            int offset = 0;
            for (int b = 0; b < ba.items[i]; ++b) offset += items[b].n_tokens;
            query_rows.push_back(offset);
        }
        for (int h = 1; h < c.n_head_kv; ++h) {
            std::copy(rows.begin(), rows.begin() + (size_t) n_kv * n_b, rows.begin() + (size_t) h * n_kv * n_b);
        }
        ggml_backend_tensor_set(ba.rows, rows.data(), 0, ggml_nbytes(ba.rows));
        ggml_backend_tensor_set(ba.mask, mask.data(), 0, ggml_nbytes(ba.mask));
        if (ba.query_rows) ggml_backend_tensor_set(ba.query_rows, query_rows.data(), 0, ggml_nbytes(ba.query_rows));
        if (ba.columns) ggml_backend_tensor_set(ba.columns, ba.column_of_token.data(), 0, ggml_nbytes(ba.columns));
    }
    compute(fg.g);

    profile::Scope reading(profile::Phase::read);
    auto           read = [](ggml_tensor * t) {
        std::vector<float> out;
        if (t) {
            out.resize(ggml_nelements(t));
            ggml_backend_tensor_get(t, out.data(), 0, ggml_nbytes(t));
            profile::add_read_bytes(ggml_nbytes(t));
        }
        return out;
    };
    logits = read(fg.logits);
    ForwardScores scores;
    for (int il = 0; il < c.n_layer; ++il) {
        // [n_kv, nw, n_head] and [1, n_kv, n_head] are exactly [n_head][nw][n_kv] and [n_head][n_kv].
        scores.window_probs.push_back(read(fg.window_probs[il]));
        scores.attention_sums.push_back(read(fg.attention_sums[il]));
    }
    return scores;
}

}  // namespace pkv
