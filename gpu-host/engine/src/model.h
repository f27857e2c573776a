// A Llama-family model read from GGUF into ggml tensors on one backend (CPU or CUDA), each
// weight in the fastest layout that backend offers for the op it feeds (docs/ENGINE.md "Weights
// layout"), plus the tokenizer / chat template / samplers from libllama loaded vocab-only.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"

struct llama_model;
struct llama_vocab;

namespace pkv {

struct ModelConfig {
    std::string arch;
    int         n_layer      = 0;
    int         n_embd       = 0;
    int         n_head       = 0;
    int         n_head_kv    = 0;
    int         head_dim     = 0;
    int         n_rot        = 0;
    int         n_ff         = 0;
    int         n_vocab      = 0;
    int         n_ctx_train  = 0;
    float       rms_eps      = 1e-5f;
    float       rope_base    = 10000.0f;
    float       rope_scale   = 1.0f;   // freq_scale: 1 / linear scaling factor
    int         rope_type    = 0;      // GGML_ROPE_TYPE_NORMAL or GGML_ROPE_TYPE_NEOX
    bool        has_qkv_bias = false;  // qwen2
    bool        has_qk_norm  = false;  // qwen3
};

// A layer's weights. Projections that read the same input and share a type are one tensor, their
// rows one after another (fuse_projections; docs/ENGINE.md "Weights layout"): wqkv replaces wq, wk
// and wv; wqk replaces wq and wk when wv's type differs (Q4_K_M's Q6_K V, say); ffn_gate_up
// replaces ffn_gate and ffn_up. A replaced tensor is null.
struct LayerWeights {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * wq = nullptr, *wk = nullptr, *wv = nullptr, *wo = nullptr;
    ggml_tensor * wqkv = nullptr, *wqk = nullptr;              // fused [n_embd, rows of q, k (, v)]
    ggml_tensor * bq = nullptr, *bk = nullptr, *bv = nullptr;  // qwen2
    ggml_tensor * q_norm = nullptr, *k_norm = nullptr;         // qwen3
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_gate = nullptr, *ffn_up = nullptr, *ffn_down = nullptr;
    ggml_tensor * ffn_gate_up = nullptr;  // fused [n_embd, 2 * n_ff]: the gate's rows, then up's

    // Its matmul weights, fused or not, in the order the graph uses them.
    std::vector<ggml_tensor *> matmul_weights() const {
        std::vector<ggml_tensor *> out;
        for (ggml_tensor * t : { wqkv, wqk, wq, wk, wv, wo, ffn_gate_up, ffn_gate, ffn_up, ffn_down })
            if (t) out.push_back(t);
        return out;
    }
};

// The op a weight feeds, which decides the buffer types it may live in.
enum class WeightUse { rows, matmul, mul, add, rope };

// The buffer types a weight may be placed in on `backend`, in order of preference. On the CPU with
// `repack`: the CPU's extra buffer types (repacking for other kernels, AMX) first, then the plain
// buffer; otherwise (no repacking, or another device) the backend's default buffer type alone.
std::vector<ggml_backend_buffer_type_t> weight_buffer_types(ggml_backend_t backend, bool repack);

// The first of `candidates` in which `backend`'s device can run the op `w` feeds (a probe node of
// that op over a 512-token ubatch, with `w` in that buffer type). `w` must not be allocated yet.
// Null when none can.
ggml_backend_buffer_type_t choose_weight_buffer_type(ggml_backend_t                                  backend,
                                                     const std::vector<ggml_backend_buffer_type_t> & candidates,
                                                     ggml_tensor * w, WeightUse use, const ModelConfig & c);

class Model {
  public:
    // Throws pkv::Error("--model", ...) for an unreadable file or an unsupported architecture.
    // `repack` false keeps every weight in the backend's default buffer type (--no-repack);
    // `fuse` false keeps every projection its own tensor (LayerWeights).
    Model(const std::string & path, ggml_backend_t backend, bool repack = true, bool fuse = true);
    ~Model();
    Model(const Model &)             = delete;
    Model & operator=(const Model &) = delete;

    const ModelConfig & config() const { return cfg_; }
    const std::string & path() const { return path_; }
    size_t              weight_bytes() const;
    // Bytes of weights per buffer type name ("CPU", "CPU_REPACK", "AMX", "CUDA0"), in load order.
    std::vector<std::pair<std::string, size_t>> weight_buffers() const;

    ggml_tensor *             token_embd  = nullptr;
    ggml_tensor *             output_norm = nullptr;
    ggml_tensor *             output      = nullptr;  // token_embd when tied (or a copy, repacked)
    ggml_tensor *             rope_freqs  = nullptr;  // Llama 3.x frequency factors, or null
    std::vector<LayerWeights> layers;

    // Tokenizer side (libllama, vocab only).
    const llama_vocab *  vocab() const { return vocab_; }
    const llama_model *  llama() const { return llama_; }  // vocab-only: metadata, chat template
    std::vector<int32_t> tokenize(const std::string & text, bool add_special) const;
    std::string          token_to_piece(int32_t token) const;
    std::string          detokenize(const std::vector<int32_t> & tokens) const;
    // The user message wrapped in the model's chat template (assistant turn opened). Falls back
    // to ChatML when the GGUF has no template.
    std::string apply_chat_template(const std::string & user_message) const;
    // End of a turn: EOS/EOT of the vocab, and <|im_end|> (some GGUFs report the wrong EOS).
    bool is_end_of_turn(int32_t token) const;

  private:
    void load(ggml_backend_t backend, bool repack, bool fuse);
    void release();

    std::string                        path_;
    ModelConfig                        cfg_;
    ggml_context *                     ctx_       = nullptr;  // the GGUF's tensors
    ggml_context *                     tied_ctx_  = nullptr;  // the tied output's copy, if any
    ggml_context *                     fused_ctx_ = nullptr;  // the fused projections
    std::vector<ggml_backend_buffer_t> buffers_;              // one per buffer type used
    llama_model *                      llama_  = nullptr;
    const llama_vocab *                vocab_  = nullptr;
    int32_t                            im_end_ = -1;
};

}  // namespace pkv
