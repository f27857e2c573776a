#include "model.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <memory>

#include "error.h"
#include "ggml-alloc.h"
#include "gguf.h"
#include "huge_pages.h"
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

std::vector<ggml_backend_buffer_type_t> weight_buffer_types(ggml_backend_t backend, bool repack) {
    std::vector<ggml_backend_buffer_type_t> out;
    ggml_backend_dev_t                      dev = ggml_backend_get_device(backend);
    // libllama orders a CPU's extra buffer types before its plain one (they exist to be faster)
    // and a GPU's after its default one, where they never win: only the CPU's are worth asking.
    if (repack && dev && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU) {
        ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
        auto               get = reg ? (ggml_backend_dev_get_extra_bufts_t) ggml_backend_reg_get_proc_address(
                                           reg, "ggml_backend_dev_get_extra_bufts")
                                     : nullptr;
        for (ggml_backend_buffer_type_t * b = get ? get(dev) : nullptr; b && *b; ++b) out.push_back(*b);
    }
    out.push_back(ggml_backend_get_default_buffer_type(backend));
    return out;
}

ggml_backend_buffer_type_t choose_weight_buffer_type(ggml_backend_t                                  backend,
                                                     const std::vector<ggml_backend_buffer_type_t> & candidates,
                                                     ggml_tensor * w, WeightUse use, const ModelConfig & c) {
    if (w->buffer || w->data) throw Error("--model", std::string(w->name) + ": already placed");
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    // One node of the op the weight feeds, over the activations of a full ubatch (an extra
    // buffer type may take a weight for prompts and not for one token, or the reverse).
    const int                                           n = 512;
    ggml_init_params                                    ip{ ggml_tensor_overhead() * 8, nullptr, /*no_alloc=*/true };
    std::unique_ptr<ggml_context, decltype(&ggml_free)> ctx(ggml_init(ip), ggml_free);
    ggml_tensor *                                       op = nullptr;
    switch (use) {
        case WeightUse::rows: op = ggml_get_rows(ctx.get(), w, ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n)); break;
        case WeightUse::matmul:
            op = ggml_mul_mat(ctx.get(), w, ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, w->ne[0], n));
            break;
        case WeightUse::mul:
            op = ggml_mul(ctx.get(), ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, w->ne[0], n), w);
            break;
        case WeightUse::add:
            op = ggml_add(ctx.get(), ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, w->ne[0], n), w);
            break;
        case WeightUse::rope:
            op = ggml_rope_ext(ctx.get(), ggml_new_tensor_3d(ctx.get(), GGML_TYPE_F32, c.head_dim, c.n_head, n),
                               ggml_new_tensor_1d(ctx.get(), GGML_TYPE_I32, n), w, c.n_rot, c.rope_type, c.n_ctx_train,
                               c.rope_base, c.rope_scale, 0.0f, 1.0f, 32.0f, 1.0f);
            break;
    }
    for (ggml_backend_buffer_type_t buft : candidates) {
        // supports_op asks the buffer type of the weight's buffer: lend it an empty one.
        ggml_backend_buffer_t probe = ggml_backend_buft_alloc_buffer(buft, 0);
        if (!probe) continue;
        w->buffer     = probe;
        const bool ok = ggml_backend_dev_supports_op(dev, op);
        w->buffer     = nullptr;
        ggml_backend_buffer_free(probe);
        if (ok) return buft;
    }
    return nullptr;
}

Model::Model(const std::string & path, ggml_backend_t backend, bool repack, bool fuse) : path_(path) {
    try {
        load(backend, repack, fuse);
    } catch (...) {
        release();
        throw;
    }
}

void Model::load(ggml_backend_t backend, bool repack, bool fuse) {
    const std::string & path = path_;
    if (!std::ifstream(path).good()) {
        throw Error("--model", "cannot read '" + path + "'");
    }
    gguf_init_params                                    gp{ /*no_alloc=*/true, /*ctx=*/&ctx_ };
    std::unique_ptr<gguf_context, decltype(&gguf_free)> g(gguf_init_from_file(path.c_str(), gp), gguf_free);
    if (!g) {
        throw Error("--model", "'" + path + "' is not a readable GGUF file");
    }
    cfg_ = read_config(g.get(), path);

    // Each weight, the op it feeds, and where its bytes are in the file (a fused weight's: its
    // parts' bytes, one after another).
    struct Part {
        size_t offset, bytes;
    };
    struct Placed {
        ggml_tensor *              t;
        WeightUse                  use;
        std::vector<Part>          parts;
        ggml_backend_buffer_type_t buft = nullptr;
    };
    std::vector<Placed> placed;
    const size_t        data_offset = gguf_get_data_offset(g.get());
    auto                tensor = [&](const std::string & name, WeightUse use, bool required = true) -> ggml_tensor * {
        ggml_tensor * t = ggml_get_tensor(ctx_, name.c_str());
        if (!t && required) throw Error("--model", path + ": missing tensor '" + name + "'");
        if (t)
            placed.push_back({ t,
                               use,
                               { { data_offset + gguf_get_tensor_offset(g.get(), gguf_find_tensor(g.get(), t->name)),
                                   ggml_nbytes(t) } } });
        return t;
    };
    // One matmul weight for `parts` (same type and input width): their rows one after another,
    // read from the file into one tensor (a repacking buffer sees it whole). The parts leave
    // `placed`; the fused tensor is placed where the first was.
    auto fused = [&](const std::string & name, std::initializer_list<ggml_tensor *> parts) -> ggml_tensor * {
        const ggml_tensor * first = *parts.begin();
        int64_t             rows  = 0;
        for (const ggml_tensor * t : parts) rows += t->ne[1];
        if (!fused_ctx_) {
            ggml_init_params ip{ ggml_tensor_overhead() * 2 * (size_t) cfg_.n_layer, nullptr, /*no_alloc=*/true };
            fused_ctx_ = ggml_init(ip);
            if (!fused_ctx_) throw Error("--model", "cannot allocate the fused weights' metadata");
        }
        ggml_tensor * f = ggml_new_tensor_2d(fused_ctx_, first->type, first->ne[0], rows);
        ggml_set_name(f, name.c_str());
        Placed     joined{ f, WeightUse::matmul, {} };
        const auto index_of = [&](const ggml_tensor * t) {
            return std::find_if(placed.begin(), placed.end(), [&](const Placed & p) { return p.t == t; }) -
                   placed.begin();
        };
        const auto at = index_of(first);
        for (const ggml_tensor * t : parts) {
            const auto i = index_of(t);
            joined.parts.push_back(placed[i].parts.front());
            placed.erase(placed.begin() + i);
        }
        placed.insert(placed.begin() + at, joined);
        return f;
    };
    token_embd   = tensor("token_embd.weight", WeightUse::rows);
    output_norm  = tensor("output_norm.weight", WeightUse::mul);
    output       = tensor("output.weight", WeightUse::matmul, false);
    rope_freqs   = tensor("rope_freqs.weight", WeightUse::rope, false);
    cfg_.n_vocab = (int) token_embd->ne[1];
    layers.resize(cfg_.n_layer);
    for (int il = 0; il < cfg_.n_layer; ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        LayerWeights &    l = layers[il];
        l.attn_norm         = tensor(p + "attn_norm.weight", WeightUse::mul);
        l.wq                = tensor(p + "attn_q.weight", WeightUse::matmul);
        l.wk                = tensor(p + "attn_k.weight", WeightUse::matmul);
        l.wv                = tensor(p + "attn_v.weight", WeightUse::matmul);
        l.wo                = tensor(p + "attn_output.weight", WeightUse::matmul);
        l.ffn_norm          = tensor(p + "ffn_norm.weight", WeightUse::mul);
        l.ffn_gate          = tensor(p + "ffn_gate.weight", WeightUse::matmul);
        l.ffn_up            = tensor(p + "ffn_up.weight", WeightUse::matmul);
        l.ffn_down          = tensor(p + "ffn_down.weight", WeightUse::matmul);
        if (cfg_.has_qkv_bias) {
            l.bq = tensor(p + "attn_q.bias", WeightUse::add);
            l.bk = tensor(p + "attn_k.bias", WeightUse::add);
            l.bv = tensor(p + "attn_v.bias", WeightUse::add);
        }
        if (cfg_.has_qk_norm) {
            l.q_norm = tensor(p + "attn_q_norm.weight", WeightUse::mul);
            l.k_norm = tensor(p + "attn_k_norm.weight", WeightUse::mul);
        }
        if (l.wq->ne[1] != (int64_t) cfg_.n_head * cfg_.head_dim ||
            l.wk->ne[1] != (int64_t) cfg_.n_head_kv * cfg_.head_dim || l.wv->ne[1] != l.wk->ne[1]) {
            throw Error("--model", path + ": attention tensor shapes do not match the head counts");
        }
        if (l.ffn_gate->ne[1] != l.ffn_up->ne[1] || l.ffn_down->ne[0] != l.ffn_up->ne[1]) {
            throw Error("--model", path + ": FFN tensor shapes do not agree (gate, up, down)");
        }
        if (!fuse) continue;
        // Each output row is the same dot product either way: bit for bit on the CPU, where every
        // kernel ggml picks for these types on x86 computes an element independently of the row
        // count. One matmul quantises its input once, and a layer has two or three nodes fewer.
        const auto alike = [](const ggml_tensor * a, const ggml_tensor * b) {
            return a->type == b->type && a->ne[0] == b->ne[0] && a->ne[2] == 1 && b->ne[2] == 1;
        };
        if (alike(l.wq, l.wk) && alike(l.wq, l.wv)) {
            l.wqkv = fused(p + "attn_qkv.weight", { l.wq, l.wk, l.wv });
            l.wq = l.wk = l.wv = nullptr;
        } else if (alike(l.wq, l.wk)) {
            l.wqk = fused(p + "attn_qk.weight", { l.wq, l.wk });
            l.wq = l.wk = nullptr;
        }
        if (alike(l.ffn_gate, l.ffn_up)) {
            l.ffn_gate_up = fused(p + "ffn_gate_up.weight", { l.ffn_gate, l.ffn_up });
            l.ffn_gate = l.ffn_up = nullptr;
        }
    }

    // Each weight goes to the first buffer type that can run the op it feeds (repacked layouts
    // only take matmul weights). A tied output feeds a matmul where token_embd feeds get_rows:
    // when those want different layouts, the output is a second copy of the same bytes.
    const std::vector<ggml_backend_buffer_type_t> candidates = weight_buffer_types(backend, repack);
    for (Placed & p : placed) {
        p.buft = choose_weight_buffer_type(backend, candidates, p.t, p.use, cfg_);
        if (!p.buft) {
            throw Error("--model", path + ": no buffer type of " + ggml_backend_name(backend) + " can run " +
                                       ggml_type_name(p.t->type) + " tensor '" + p.t->name + "'");
        }
    }
    if (!output) {
        output = token_embd;
        ggml_backend_buffer_type_t matmul_buft =
            choose_weight_buffer_type(backend, candidates, token_embd, WeightUse::matmul, cfg_);
        const Placed & embd = placed.front();
        if (!matmul_buft) {
            throw Error("--model", path + ": " + ggml_backend_name(backend) + " cannot multiply by the " +
                                       ggml_type_name(token_embd->type) + " token embeddings (tied output)");
        }
        if (matmul_buft != embd.buft) {
            ggml_init_params ip{ ggml_tensor_overhead(), nullptr, /*no_alloc=*/true };
            tied_ctx_ = ggml_init(ip);
            output    = ggml_dup_tensor(tied_ctx_, token_embd);
            ggml_set_name(output, "output.weight");
            placed.push_back({ output, WeightUse::matmul, embd.parts, matmul_buft });
        }
    }

    // One buffer per buffer type, the tensors laid out in it in load order.
    std::vector<ggml_backend_buffer_type_t> used;
    for (const Placed & p : placed)
        if (std::find(used.begin(), used.end(), p.buft) == used.end()) used.push_back(p.buft);
    for (ggml_backend_buffer_type_t buft : used) {
        const size_t align = ggml_backend_buft_get_alignment(buft);
        size_t       bytes = align;
        for (const Placed & p : placed)
            if (p.buft == buft) bytes += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, p.t), align);
        ggml_backend_buffer_t buffer = ggml_backend_buft_alloc_buffer(buft, bytes);
        if (!buffer) {
            throw Error("--model", "cannot allocate " + std::to_string(bytes) + " bytes of " +
                                       ggml_backend_buft_name(buft) + " for the weights");
        }
        ggml_backend_buffer_set_usage(buffer, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        advise_huge_pages(buffer);  // before the bytes below are written
        buffers_.push_back(buffer);
        ggml_tallocr alloc = ggml_tallocr_new(buffer);
        for (const Placed & p : placed) {
            if (p.buft == buft && ggml_tallocr_alloc(&alloc, p.t) != GGML_STATUS_SUCCESS) {
                throw Error("--model",
                            std::string("cannot place tensor '") + p.t->name + "' in " + ggml_backend_buft_name(buft));
            }
        }
    }

    // Stream each tensor's bytes from the file into its buffer (a repacking buffer converts them
    // as they are set, which needs the whole tensor at once).
    std::ifstream     in(path, std::ios::binary);
    std::vector<char> staging;
    for (const Placed & p : placed) {
        const size_t n = ggml_nbytes(p.t);
        staging.resize(n);
        size_t at = 0;
        for (const Part & part : p.parts) {
            in.seekg((std::streamoff) part.offset);
            if (at + part.bytes > n || !in.read(staging.data() + at, (std::streamsize) part.bytes)) {
                throw Error("--model", path + ": truncated data for tensor '" + std::string(p.t->name) + "'");
            }
            at += part.bytes;
        }
        ggml_backend_tensor_set(p.t, staging.data(), 0, n);
    }

    llama_model_params mp = llama_model_default_params();
    mp.vocab_only         = true;
    llama_                = llama_model_load_from_file(path.c_str(), mp);
    if (!llama_) throw Error("--model", path + ": libllama could not load the vocabulary");
    vocab_                            = llama_model_get_vocab(llama_);
    const std::vector<int32_t> im_end = tokenize("<|im_end|>", false);
    if (im_end.size() == 1) im_end_ = im_end[0];
}

Model::~Model() { release(); }

void Model::release() {
    if (llama_) llama_model_free(llama_);
    for (ggml_backend_buffer_t b : buffers_) ggml_backend_buffer_free(b);
    if (tied_ctx_) ggml_free(tied_ctx_);
    if (fused_ctx_) ggml_free(fused_ctx_);
    if (ctx_) ggml_free(ctx_);
    llama_    = nullptr;
    tied_ctx_ = fused_ctx_ = ctx_ = nullptr;
    buffers_.clear();
}

size_t Model::weight_bytes() const {
    size_t n = 0;
    for (ggml_backend_buffer_t b : buffers_) n += ggml_backend_buffer_get_size(b);
    return n;
}

std::vector<std::pair<std::string, size_t>> Model::weight_buffers() const {
    std::vector<std::pair<std::string, size_t>> out;
    for (ggml_backend_buffer_t b : buffers_)
        out.emplace_back(ggml_backend_buffer_name(b), ggml_backend_buffer_get_size(b));
    return out;
}

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
