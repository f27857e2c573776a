#include "model.h"

#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>

#include "error.h"
#include "gguf.h"
#include "llama.h"

namespace pkv {

namespace {

const char * const kSupportedArchs = "llama, mistral3, qwen2, qwen3";

int64_t find_key(const gguf_context * g, const std::string & key) { return gguf_find_key(g, key.c_str()); }

long get_int(const gguf_context * g, const std::string & key, long fallback) {
    const int64_t id = find_key(g, key);
    if (id < 0) return fallback;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8: return gguf_get_val_u8(g, id);
        case GGUF_TYPE_INT8: return gguf_get_val_i8(g, id);
        case GGUF_TYPE_UINT16: return gguf_get_val_u16(g, id);
        case GGUF_TYPE_INT16: return gguf_get_val_i16(g, id);
        case GGUF_TYPE_UINT32: return (long) gguf_get_val_u32(g, id);
        case GGUF_TYPE_INT32: return gguf_get_val_i32(g, id);
        case GGUF_TYPE_UINT64: return (long) gguf_get_val_u64(g, id);
        case GGUF_TYPE_INT64: return (long) gguf_get_val_i64(g, id);
        default: return fallback;
    }
}

float get_float(const gguf_context * g, const std::string & key, float fallback) {
    const int64_t id = find_key(g, key);
    if (id < 0) return fallback;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(g, id);
        case GGUF_TYPE_FLOAT64: return (float) gguf_get_val_f64(g, id);
        default: return (float) get_int(g, key, (long) fallback);
    }
}

std::string get_string(const gguf_context * g, const std::string & key) {
    const int64_t id = find_key(g, key);
    if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) return "";
    return gguf_get_val_str(g, id);
}

ModelConfig read_config(const gguf_context * g, const std::string & path) {
    ModelConfig c;
    c.arch = get_string(g, "general.architecture");
    if (c.arch != "llama" && c.arch != "mistral3" && c.arch != "qwen2" && c.arch != "qwen3") {
        throw Error("--model", path + ": unsupported architecture '" + c.arch + "' (supported: " + kSupportedArchs +
                                   "; Mistral 7B GGUFs use 'llama')");
    }
    const std::string a = c.arch + ".";
    c.n_layer           = (int) get_int(g, a + "block_count", 0);
    c.n_embd            = (int) get_int(g, a + "embedding_length", 0);
    c.n_head            = (int) get_int(g, a + "attention.head_count", 0);
    c.n_head_kv         = (int) get_int(g, a + "attention.head_count_kv", c.n_head);
    c.n_ff              = (int) get_int(g, a + "feed_forward_length", 0);
    c.n_ctx_train       = (int) get_int(g, a + "context_length", 2048);
    c.rms_eps           = get_float(g, a + "attention.layer_norm_rms_epsilon", 1e-5f);
    c.rope_base         = get_float(g, a + "rope.freq_base", 10000.0f);
    if (c.n_layer <= 0 || c.n_embd <= 0 || c.n_head <= 0 || c.n_head_kv <= 0 || c.n_ff <= 0 ||
        c.n_head % c.n_head_kv != 0) {
        throw Error("--model", path + ": incomplete or inconsistent hyperparameters for '" + c.arch + "'");
    }
    c.head_dim = (int) get_int(g, a + "attention.key_length", c.n_embd / c.n_head);
    if (get_int(g, a + "attention.value_length", c.head_dim) != c.head_dim) {
        throw Error("--model", path + ": key and value head sizes differ (not a Llama-family attention)");
    }
    c.n_rot = (int) get_int(g, a + "rope.dimension_count", c.head_dim);
    if (get_int(g, a + "expert_count", 0) > 0) {
        throw Error("--model", path + ": mixture-of-experts models are not supported");
    }
    const std::string scaling = get_string(g, a + "rope.scaling.type");
    if (!scaling.empty() && scaling != "none" && scaling != "linear") {
        throw Error("--model", path + ": rope scaling '" + scaling + "' is not supported (none, linear)");
    }
    const float factor = get_float(g, a + "rope.scaling.factor", get_float(g, a + "rope.scale_linear", 0.0f));
    if (scaling == "linear" && factor > 0.0f) c.rope_scale = 1.0f / factor;
    if (get_float(g, a + "attention.temperature_scale", 0.0f) != 0.0f) {
        throw Error("--model", path + ": attention temperature scaling is not supported");
    }
    c.rope_type    = (c.arch == "qwen2" || c.arch == "qwen3") ? GGML_ROPE_TYPE_NEOX : GGML_ROPE_TYPE_NORMAL;
    c.has_qkv_bias = c.arch == "qwen2";
    c.has_qk_norm  = c.arch == "qwen3";
    return c;
}

}  // namespace

Model::Model(const std::string & path, ggml_backend_t backend) : path_(path) {
    if (!std::ifstream(path).good()) {
        throw Error("--model", "cannot read '" + path + "'");
    }
    gguf_init_params                                    gp{ /*no_alloc=*/true, /*ctx=*/&ctx_ };
    std::unique_ptr<gguf_context, decltype(&gguf_free)> g(gguf_init_from_file(path.c_str(), gp), gguf_free);
    if (!g) {
        throw Error("--model", "'" + path + "' is not a readable GGUF file");
    }
    cfg_ = read_config(g.get(), path);

    auto tensor = [&](const std::string & name, bool required = true) -> ggml_tensor * {
        ggml_tensor * t = ggml_get_tensor(ctx_, name.c_str());
        if (!t && required) throw Error("--model", path + ": missing tensor '" + name + "'");
        return t;
    };
    token_embd  = tensor("token_embd.weight");
    output_norm = tensor("output_norm.weight");
    output      = tensor("output.weight", false);
    if (!output) output = token_embd;
    rope_freqs   = tensor("rope_freqs.weight", false);
    cfg_.n_vocab = (int) token_embd->ne[1];
    layers.resize(cfg_.n_layer);
    for (int il = 0; il < cfg_.n_layer; ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        LayerWeights &    l = layers[il];
        l.attn_norm         = tensor(p + "attn_norm.weight");
        l.wq                = tensor(p + "attn_q.weight");
        l.wk                = tensor(p + "attn_k.weight");
        l.wv                = tensor(p + "attn_v.weight");
        l.wo                = tensor(p + "attn_output.weight");
        l.ffn_norm          = tensor(p + "ffn_norm.weight");
        l.ffn_gate          = tensor(p + "ffn_gate.weight");
        l.ffn_up            = tensor(p + "ffn_up.weight");
        l.ffn_down          = tensor(p + "ffn_down.weight");
        if (cfg_.has_qkv_bias) {
            l.bq = tensor(p + "attn_q.bias");
            l.bk = tensor(p + "attn_k.bias");
            l.bv = tensor(p + "attn_v.bias");
        }
        if (cfg_.has_qk_norm) {
            l.q_norm = tensor(p + "attn_q_norm.weight");
            l.k_norm = tensor(p + "attn_k_norm.weight");
        }
        if (l.wq->ne[1] != (int64_t) cfg_.n_head * cfg_.head_dim ||
            l.wk->ne[1] != (int64_t) cfg_.n_head_kv * cfg_.head_dim) {
            throw Error("--model", path + ": attention tensor shapes do not match the head counts");
        }
    }

    buffer_ = ggml_backend_alloc_ctx_tensors(ctx_, backend);
    if (!buffer_)
        throw Error("--model", "cannot allocate " + std::to_string(ggml_get_mem_size(ctx_)) + " bytes for the weights");
    ggml_backend_buffer_set_usage(buffer_, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);

    // Stream each tensor's bytes from the file into its backend buffer.
    std::ifstream     in(path, std::ios::binary);
    const size_t      data_offset = gguf_get_data_offset(g.get());
    std::vector<char> staging;
    for (int64_t i = 0; i < gguf_get_n_tensors(g.get()); ++i) {
        ggml_tensor * t = ggml_get_tensor(ctx_, gguf_get_tensor_name(g.get(), i));
        const size_t  n = ggml_nbytes(t);
        staging.resize(n);
        in.seekg((std::streamoff) (data_offset + gguf_get_tensor_offset(g.get(), i)));
        if (!in.read(staging.data(), (std::streamsize) n)) {
            throw Error("--model", path + ": truncated data for tensor '" + std::string(t->name) + "'");
        }
        ggml_backend_tensor_set(t, staging.data(), 0, n);
    }

    llama_model_params mp = llama_model_default_params();
    mp.vocab_only         = true;
    llama_                = llama_model_load_from_file(path.c_str(), mp);
    if (!llama_) throw Error("--model", path + ": libllama could not load the vocabulary");
    vocab_                            = llama_model_get_vocab(llama_);
    const std::vector<int32_t> im_end = tokenize("<|im_end|>", false);
    if (im_end.size() == 1) im_end_ = im_end[0];
}

Model::~Model() {
    if (llama_) llama_model_free(llama_);
    if (buffer_) ggml_backend_buffer_free(buffer_);
    if (ctx_) ggml_free(ctx_);
}

size_t Model::weight_bytes() const { return buffer_ ? ggml_backend_buffer_get_size(buffer_) : 0; }

std::vector<int32_t> Model::tokenize(const std::string & text, bool add_special) const {
    std::vector<int32_t> out(text.size() + 16);
    int                  n =
        llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special, true);
    if (n < 0) {
        out.resize(-n);
        n = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(), add_special,
                           true);
    }
    out.resize(std::max(n, 0));
    return out;
}

std::string Model::token_to_piece(int32_t token) const {
    char      buf[256];
    const int n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, false);
    if (n >= 0) return std::string(buf, n);
    std::string big(-n, '\0');
    llama_token_to_piece(vocab_, token, big.data(), (int32_t) big.size(), 0, false);
    return big;
}

std::string Model::detokenize(const std::vector<int32_t> & tokens) const {
    std::string out;
    for (int32_t t : tokens) out += token_to_piece(t);
    return out;
}

std::string Model::apply_chat_template(const std::string & user_message) const {
    const char *             tmpl = llama_model_chat_template(llama_, nullptr);
    const llama_chat_message msg{ "user", user_message.c_str() };
    std::vector<char>        buf(user_message.size() * 2 + 512);
    int n = llama_chat_apply_template(tmpl ? tmpl : "chatml", &msg, 1, true, buf.data(), (int32_t) buf.size());
    if (n > (int) buf.size()) {
        buf.resize(n);
        n = llama_chat_apply_template(tmpl ? tmpl : "chatml", &msg, 1, true, buf.data(), (int32_t) buf.size());
    }
    if (n < 0) {  // a template libllama cannot interpret: ChatML is what SmolLM2 and Qwen use
        return "<|im_start|>user\n" + user_message + "<|im_end|>\n<|im_start|>assistant\n";
    }
    return std::string(buf.data(), n);
}

bool Model::is_end_of_turn(int32_t token) const { return token == im_end_ || llama_vocab_is_eog(vocab_, token); }

}  // namespace pkv
