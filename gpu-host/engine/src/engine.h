// The engine: one backend, one model, one KV pool, and the forward graph that every session's
// prefill chunks and every batched decode step run through (sessions: session.h).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "compress.h"
#include "ggml-alloc.h"
#include "kv_pool.h"
#include "model.h"

namespace pkv {

struct EngineOptions {
    std::string model_path;
    int         n_threads      = 0;       // 0: all cores
    std::string device         = "auto";  // auto | cpu | gpu
    int         n_ubatch       = 512;     // prompt tokens per graph evaluation
    int         n_ctx          = 0;       // longest session in tokens; 0: the model's training context
    size_t      kv_pool_bytes  = 0;       // pool capacity; 0: see kv_pool_tokens
    size_t      kv_pool_tokens = 0;       // pool capacity as entries per layer (when bytes is 0);
                                          // both 0: one FullKV session of n_ctx tokens + one ubatch
};

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

    // One decode step for several sessions in one graph evaluation (continuous batching): each
    // session appends its token and attends only to its own entries. Afterwards each session's
    // logits() hold its next-token logits.
    void decode_batch(const std::vector<Session *> & sessions, const std::vector<int32_t> & tokens);

    struct Graph {
        ggml_context * ctx;
        ggml_cgraph *  gf;
    };
    Graph begin_graph();
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
    // Evaluates the items' tokens (appending their K, V to each session's store) in one graph.
    // Score options apply only to a single item.
    void forward(const std::vector<ForwardItem> & items, const ForwardOptions & fo);

    EngineOptions           opt_;
    ggml_backend_t          backend_ = nullptr;
    std::unique_ptr<Model>  model_;
    std::unique_ptr<KvPool> pool_;
    ggml_gallocr_t          galloc_ = nullptr;
    std::vector<uint8_t>    graph_meta_;
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
