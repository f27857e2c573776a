// The engine: one backend, one model, one KV pool, and the forward graph that every session's
// prefill chunks and every batched decode step run through (sessions: session.h).
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backend_check.h"
#include "compress.h"
#include "ggml-alloc.h"
#include "kv_pool.h"
#include "model.h"

namespace pkv {

// How a decode step over several sessions attends (docs/ENGINE.md "Batched decode").
enum class DecodeAttention {
    automatic,    // per backend, as measured: per_session on a CPU, batched on any other device
    batched,      // one flash attention per layer for every short session (gathered, padded, masked)
    per_session,  // one flash attention per session and layer (every graph reusable)
};

struct EngineOptions {
    std::string     model_path;
    int             n_threads           = 0;            // 0: all cores
    std::string     device              = "auto";       // auto | cpu | gpu
    int             n_ubatch            = 512;          // prompt tokens per graph evaluation
    int             n_ctx               = 0;            // longest session in tokens; 0: the model's training context
    size_t          kv_pool_bytes       = 0;            // pool capacity; 0: see kv_pool_tokens
    size_t          kv_pool_tokens      = 0;            // pool capacity as entries per layer (when bytes is 0);
                                                        // both 0: one FullKV session of n_ctx tokens + one ubatch
    KvType          kv_type             = KvType::F16;  // storage type of a session's entries unless it asks
    DecodeAttention decode_attention    = DecodeAttention::automatic;  // resolved when the engine starts
    bool            repack_weights      = true;  // false: weights in the plain buffer (--no-repack)
    bool            fuse_projections    = true;  // false: q, k, v, gate, up each their own matmul (bench --no-fuse)
    bool            reuse_decode_graphs = true;  // false: every decode step builds its graph (bench --no-graph-reuse)
};

// A decode step's session whose layer holds this many entries or more attends over its own pages
// instead of joining the layer's gathered batch: ggml's CPU flash attention splits the keys of a
// single query across threads from 512 keys on (with f16 partial sums, so a batched row would
// round differently than the session alone), and a long session would pad every other one.
constexpr int kOwnKernelKv = 512;

// Decode graphs are reused (docs/ENGINE.md "Graph reuse"): a session's per-layer view covers this
// many entries more than it holds, masked, so the next steps fit the same graph; never up to
// kOwnKernelKv, where ggml would switch to its split kernel and round differently.
constexpr int kDecodeHeadroom = 64;

// Every tensor of the engine's graphs on the CPU starts on a cache line (engine.cpp
// compute_buffer_type; ggml's CPU buffer type would align to 32 bytes).
constexpr size_t kCpuTensorAlignment = 64;

class Session;

// Default chunk size of chunked prefill in the CLI and the server (inputs up to this length are
// compressed once, as in the paper). Chosen from the accuracy measurement in docs/BENCHMARKS.md.
constexpr int kDefaultChunkSize = 8192;

class Engine {
  public:
    explicit Engine(const EngineOptions & opt);
    ~Engine();
    Engine(const Engine &)             = delete;
    Engine & operator=(const Engine &) = delete;

    const Model &         model() const { return *model_; }
    const ModelConfig &   config() const { return model_->config(); }
    ggml_backend_t        backend() const { return backend_; }
    const EngineOptions & options() const { return opt_; }
    std::string           device_name() const;
    int                   n_ctx() const { return opt_.n_ctx > 0 ? opt_.n_ctx : model_->config().n_ctx_train; }
    KvPool &              pool() { return *pool_; }
    const KvPool &        pool() const { return *pool_; }
    // Every graph's ops are checked against the backend before it is allocated (backend_check.h).
    OpCheck & op_check() { return op_check_; }

    // One decode step for several sessions in one graph evaluation (continuous batching): each
    // session appends its token and attends only to its own entries. Afterwards each session's
    // logits() hold its next-token logits.
    void decode_batch(const std::vector<Session *> & sessions, const std::vector<int32_t> & tokens);
    // The benchmark compares the layouts in one process.
    // `automatic` picks the backend's layout (options() then holds the layout picked).
    void set_decode_attention(DecodeAttention a);

    // The shape of the last forward (after decode_batch: of the step, summed over its graphs, one
    // per KV type present): its nodes and how many of them are flash attentions.
    struct GraphStats {
        int nodes           = 0;
        int attention_nodes = 0;
    };
    const GraphStats & last_graph() const { return last_graph_; }
    // Forward graphs built so far (a reused decode step builds none).
    uint64_t graphs_built() const { return graphs_built_; }

    struct Graph {
        ggml_context * ctx;
        ggml_cgraph *  gf;
    };
    // The graph's tensors live in `meta` (by default the engine's scratch, which the next graph
    // overwrites; a reused decode graph has its own).
    Graph begin_graph(int min_nodes = 0, std::vector<uint8_t> * meta = nullptr);
    void  allocate(Graph & g);  // after building, before setting inputs
    void  compute(Graph & g);

  private:
    friend class Session;
    struct ForwardItem {
        Session *       session;
        const int32_t * tokens;
        int             n_tokens;
    };
    struct ForwardOptions {
        bool want_logits      = true;
        int  window_probs     = 0;      // score the last N queries against every key (SnapKV family)
        bool accumulate_probs = false;  // H2O: attention summed over every query of the chunk
    };
    // One layer's attention of the decode items that share a kernel (empty items: none do).
    struct BatchedAttention {
        std::vector<int>     items;                 // indices into the forward's items, batch order
        int                  max_kv     = 0;        // entries of the longest, the others padded to it
        ggml_tensor *        rows       = nullptr;  // [max_kv * n_batch, n_head_kv] i32: pool slot of each row
        ggml_tensor *        mask       = nullptr;  // [max_kv, 1, 1, n_batch] f16: 0, or -inf for padding
        ggml_tensor *        query_rows = nullptr;  // [n_batch] i32: each one's token (when not all are)
        ggml_tensor *        columns    = nullptr;  // [n_total] i32: column of each token in the joined output
        std::vector<int32_t> column_of_token;       // the values of `columns`
    };
    // The tensors of one forward graph: build_forward() makes them, run_forward() fills the
    // inputs and reads the outputs.
    struct ForwardGraph {
        Graph                      g{};
        ggml_tensor *              tokens    = nullptr;  // [n_total] i32
        ggml_tensor *              positions = nullptr;  // [n_total] i32: RoPE positions
        std::vector<ggml_tensor *> slots;                // per layer, [n_total] i64: pool slot of each new row
        // Causal masks of items of several tokens, per (item, entries stored before them):
        // [n_stored + n_tokens, n_tokens] f16. A single token sees every key and needs none.
        std::map<std::pair<int, int>, ggml_tensor *> masks;
        std::vector<BatchedAttention>                batched;  // per layer
        ggml_tensor *              out_ids = nullptr;          // [n_items] i32: the row of each item's last token
        ggml_tensor *              logits  = nullptr;          // [n_vocab, n_items]
        std::vector<ggml_tensor *> window_probs;               // per layer, [n_kv, n_window, n_head] (or none)
        std::vector<ggml_tensor *> attention_sums;             // per layer, [1, n_kv, n_head] (or none)
        // A reusable decode graph (headroom): each item's view per layer, [layer][item] — its
        // first pool slot and the entries it covers — and its mask [view, 1] f16 per (item, layer):
        // 0 for the entries held, -inf beyond.
        bool                                         headroom = false;
        std::vector<std::vector<int64_t>>            view_first;
        std::vector<std::vector<int>>                view_kv;
        std::map<std::pair<int, int>, ggml_tensor *> view_masks;
    };
    // Attention statistics of a single-item forward, per layer (empty vectors when not asked for),
    // over the item's entries: those stored before it, then its own tokens.
    struct ForwardScores {
        std::vector<std::vector<float>> window_probs;    // [n_head][n_window][n_kv]
        std::vector<std::vector<float>> attention_sums;  // [n_head][n_kv]: every query's softmax row, summed
    };
    // Evaluates the items' tokens in one graph: appends their K, V to each session's store, leaves
    // each session its last token's logits (when wanted) and returns the scores (which apply only
    // to a single item).
    ForwardScores forward(const std::vector<ForwardItem> & items, const ForwardOptions & fo);
    ForwardGraph  build_forward(const std::vector<ForwardItem> & items, const ForwardOptions & fo,
                                bool headroom = false);
    // The decode items of layer `il` that share one batched kernel (none, or at least two).
    std::vector<int> batch_members(const std::vector<ForwardItem> & items, int il) const;
    bool             on_cpu() const;  // the backend's device is the CPU (layout and graph reuse choices)
    // A decode step whose graph can be kept for the next steps: logits only, one token per item,
    // every attention per session (a batched step's gather is rebuilt each step).
    bool reusable_decode(const std::vector<ForwardItem> & items, const ForwardOptions & fo) const;
    // The kept decode graph fits these items: same views, room for each one's new entry, and no
    // other graph allocated since (which may have moved the compute buffer).
    bool          decode_graph_fits(const std::vector<ForwardItem> & items) const;
    ggml_tensor * build_attention(ForwardGraph & fg, const std::vector<ForwardItem> & items, const ForwardOptions & fo,
                                  int il, ggml_tensor * q, ggml_tensor * kc, ggml_tensor * vc);
    void          build_scores(ForwardGraph & fg, const ForwardOptions & fo, int il, ggml_tensor * q, ggml_tensor * k,
                               ggml_tensor * mask);
    // Fills the inputs, computes, reads the logits ([n_items][n_vocab]) and the scores.
    ForwardScores run_forward(ForwardGraph & fg, const std::vector<ForwardItem> & items, std::vector<float> & logits);

    EngineOptions           opt_;
    ggml_backend_t          backend_ = nullptr;
    std::unique_ptr<Model>  model_;
    std::unique_ptr<KvPool> pool_;
    ggml_gallocr_t          galloc_ = nullptr;
    std::vector<uint8_t>    graph_meta_;
    GraphStats              last_graph_;
    OpCheck                 op_check_;
    uint64_t                graphs_built_ = 0;
    uint64_t                allocations_  = 0;  // graphs allocated in galloc_'s buffer so far
    struct KeptDecode {
        bool         valid = false;
        ForwardGraph fg;
        KvType       type       = KvType::F16;
        uint64_t     allocation = 0;  // allocations_ right after its own
        GraphStats   stats;
    };
    KeptDecode           kept_;
    std::vector<uint8_t> kept_meta_;
    void                 drop_kept();
};

// The SnapKV scoring product, one graph piece shared by the engine and its tests:
// k [head_dim, n_kv, n_head_kv] (after RoPE), q_window [head_dim, n_window, n_head] (after RoPE),
// mask F16 [n_kv, n_window] or null → softmax(q·kᵀ·scale + mask) in fp32, [n_kv, n_window, n_head].
// Query head h reads KV head h / (n_head / n_head_kv), as in the attention itself.
ggml_tensor * window_probs(ggml_context * ctx, ggml_tensor * k, ggml_tensor * q_window, ggml_tensor * mask,
                           float scale);

// Greedy argmax of a logit row (ties: lowest id), the default sampler.
int32_t argmax(const std::vector<float> & logits);

}  // namespace pkv
