// The engine: one backend, one model, and sessions whose KV caches are compressed after prefill.
// A session's life: prefill(prompt) → [compress] → decode(token)… ; positions always continue at
// the number of tokens seen, never at the stored length (DESIGN trap 1).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "compress.h"
#include "ggml-alloc.h"
#include "kv_cache.h"
#include "model.h"

namespace pkv {

struct EngineOptions {
    std::string model_path;
    int         n_threads = 0;     // 0: all cores
    std::string device    = "auto";  // auto | cpu | gpu
    int         n_ubatch  = 512;   // prompt tokens per graph evaluation
    int         n_ctx     = 0;     // longest session in tokens; 0: the model's training context
};

class Engine {
  public:
    explicit Engine(const EngineOptions & opt);
    ~Engine();
    Engine(const Engine &) = delete;
    Engine & operator=(const Engine &) = delete;

    const Model &       model() const { return *model_; }
    const ModelConfig & config() const { return model_->config(); }
    ggml_backend_t      backend() const { return backend_; }
    const EngineOptions & options() const { return opt_; }
    std::string         device_name() const;
    int                 n_ctx() const { return opt_.n_ctx > 0 ? opt_.n_ctx : model_->config().n_ctx_train; }

    // Evaluate a graph built by `build` (inputs allocated by the engine's allocator, then set by
    // `set_inputs`). Reuses one compute buffer for every graph.
    struct Graph {
        ggml_context * ctx;
        ggml_cgraph *  gf;
    };
    Graph begin_graph();
    void  allocate(Graph & g);  // after building, before setting inputs
    void  compute(Graph & g);

  private:
    EngineOptions          opt_;
    ggml_backend_t         backend_ = nullptr;
    std::unique_ptr<Model> model_;
    ggml_gallocr_t         galloc_ = nullptr;
    std::vector<uint8_t>   graph_meta_;
};

struct SessionStats {
    int              tokens_seen = 0;
    std::vector<int> layer_kv_lengths;
    size_t           kv_bytes      = 0;  // entries held × bytes per entry
    size_t           full_kv_bytes = 0;  // what FullKV would hold for tokens_seen
};

class Session {
  public:
    Session(Engine & engine, const CompressionParams & params);
    ~Session();

    // Evaluate the prompt (in ubatches of EngineOptions::n_ubatch) with every entry kept, then
    // compress once with the session's method. Leaves the logits of the last prompt token.
    void prefill(const std::vector<int32_t> & tokens);
    // Append one token (its position = tokens seen) and compute its logits.
    void decode(int32_t token);
    // Make room for n more tokens in every layer without reallocating per token.
    void reserve(int n_more);

    const std::vector<float> & logits() const { return logits_; }
    SessionStats               stats() const;
    // Prompt positions kept per layer and KV head by the last compression (empty before).
    const std::vector<HeadSelection> & kept() const { return kept_; }
    const std::vector<int32_t> &       tokens() const { return tokens_; }
    const CompressionParams &          params() const { return params_; }
    Engine &                           engine() const { return engine_; }
    double                             prefill_seconds() const { return prefill_seconds_; }

  private:
    struct ForwardOptions {
        bool want_logits       = true;
        int  window_probs      = 0;  // score the last N queries against every key (SnapKV family)
        bool accumulate_probs  = false;  // H2O: attention summed over every query of the chunk
    };
    void eval(const int32_t * tokens, int n_tokens, const ForwardOptions & fo);
    void compress();
    // Rebuild the cache with new capacities, keeping per layer either the first size(l) entries or,
    // when `select` is given, the listed slots of each KV head.
    void rebuild(const std::vector<int> & capacity, const std::vector<HeadSelection> * select);

    Engine &                 engine_;
    CompressionParams        params_;
    const Method *           method_;
    std::unique_ptr<KvCache> kv_;
    std::vector<int32_t>     tokens_;
    std::vector<float>       logits_;
    std::vector<HeadSelection> kept_;
    // Scratch filled by eval() for compression.
    std::vector<std::vector<float>> window_probs_;  // per layer [n_head][n_window][n]
    std::vector<std::vector<float>> accumulated_;   // per layer [n_head][n]
    double prefill_seconds_ = 0.0;
};

// The SnapKV scoring product, one graph piece shared by the engine and its tests:
// k [head_dim, n_kv, n_head_kv] (after RoPE), q_window [head_dim, n_window, n_head] (after RoPE),
// mask F16 [n_kv, n_window] or null → softmax(q·kᵀ·scale + mask) in fp32, [n_kv, n_window, n_head].
// Query head h reads KV head h / (n_head / n_head_kv), as in the attention itself.
ggml_tensor * window_probs(ggml_context * ctx, ggml_tensor * k, ggml_tensor * q_window, ggml_tensor * mask, float scale);

// Greedy argmax of a logit row (ties: lowest id), the default sampler.
int32_t argmax(const std::vector<float> & logits);

}  // namespace pkv
