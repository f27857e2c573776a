// pkv-make-gguf: writes a GGUF with random weights of a given Llama-family shape.
//
// Tests need tiny models of every architecture the engine supports, and benchmarks need
// real shapes (Llama-3-8B, ...) whose speed does not depend on the weight values, so
// neither needs a real checkpoint. The file is streamed: metadata first, then one tensor
// at a time in chunks, so an 8B model never sits in RAM.
//
// Usage errors print one line on stderr naming the flag and exit with 2; I/O failures
// while writing exit with 1 and remove the partial file.

#include "ggml.h"
#include "gguf.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------
// errors

// Bad user input: main() prints the message and exits with 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Failure while writing (disk full, ...): main() exits with 1.
struct IoError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------
// shape and options

struct Shape {
    std::string arch       = "llama";
    int64_t     n_layer    = 2;
    int64_t     n_embd     = 64;
    int64_t     n_head     = 4;
    int64_t     n_head_kv  = 2;
    int64_t     head_dim   = 16;
    int64_t     n_ff       = 128;
    int64_t     n_ctx      = 2048;
    float       rope_base  = 10000.0f;
    float       rms_eps    = 1e-5f;
    bool        tied       = false;
    bool        rope_freqs = false;
};

// Shapes of real models (from their HF config.json); "tiny" is the test default.
struct Preset {
    const char * name;
    Shape        shape;
};

Shape make_shape(const char * arch, int64_t layers, int64_t embd, int64_t heads, int64_t kv, int64_t hd, int64_t ff,
                 int64_t ctx, float base, float eps, bool tied) {
    Shape s;
    s.arch      = arch;
    s.n_layer   = layers;
    s.n_embd    = embd;
    s.n_head    = heads;
    s.n_head_kv = kv;
    s.head_dim  = hd;
    s.n_ff      = ff;
    s.n_ctx     = ctx;
    s.rope_base = base;
    s.rms_eps   = eps;
    s.tied      = tied;
    return s;
}

const std::vector<Preset> & presets() {
    static const std::vector<Preset> p = {
        { "tiny", make_shape("llama", 2, 64, 4, 2, 16, 128, 2048, 10000.0f, 1e-5f, false) },
        { "smollm2-135m", make_shape("llama", 30, 576, 9, 3, 64, 1536, 8192, 100000.0f, 1e-5f, true) },
        { "llama3-8b", make_shape("llama", 32, 4096, 32, 8, 128, 14336, 8192, 500000.0f, 1e-5f, false) },
        { "llama3.2-1b", make_shape("llama", 16, 2048, 32, 8, 64, 8192, 131072, 500000.0f, 1e-5f, true) },
        { "qwen2.5-0.5b", make_shape("qwen2", 24, 896, 14, 2, 64, 4864, 32768, 1000000.0f, 1e-6f, true) },
        { "qwen3-0.6b", make_shape("qwen3", 28, 1024, 16, 8, 128, 3072, 40960, 1000000.0f, 1e-6f, true) },
    };
    return p;
}

struct Options {
    std::string out;
    std::string preset = "tiny";
    std::string vocab_from;
    std::string chat_template_file;  // --chat-template FILE: tokenizer.chat_template from FILE
    bool        no_chat_template = false;
    int64_t     n_vocab_synth    = 0;  // --vocab N: synthetic tokenizer with N tokens
    ggml_type   type             = GGML_TYPE_F32;
    ggml_type   type_v           = GGML_TYPE_COUNT;  // --type-v: attn_v, ffn_down; COUNT: --type
    uint64_t    seed             = 42;
    Shape       shape;
    bool        help = false;
};

const char * kUsage =
    "usage: pkv-make-gguf --out FILE (--vocab-from MODEL.gguf | --vocab N) [options]\n"
    "  --arch NAME        llama|mistral3|qwen2|qwen3; any other name is written as-is\n"
    "  --preset NAME      tiny|smollm2-135m|llama3-8b|llama3.2-1b|qwen2.5-0.5b|qwen3-0.6b (default tiny)\n"
    "  --layers N --embd N --heads N --kv-heads N --head-dim N --ff N --ctx N\n"
    "                     override the preset; without --head-dim, an overridden --embd or\n"
    "                     --heads gives head_dim = embd/heads\n"
    "  --vocab-from FILE  copy every tokenizer.* key of FILE; n_vocab = its token count\n"
    "  --vocab N          synthetic SentencePiece-style tokenizer of N tokens (N >= 260)\n"
    "  --chat-template FILE\n"
    "                     tokenizer.chat_template = the text of FILE (a Jinja chat template),\n"
    "                     replacing the one --vocab-from copied\n"
    "  --no-chat-template no tokenizer.chat_template (engines fall back to ChatML)\n"
    "  --type T           f32|f16|q8_0|q4_0|q4_1 for 2-D weights (default f32)\n"
    "  --type-v T         attn_v and ffn_down weights in T instead (as Q4_K_M keeps them in Q6_K)\n"
    "  --rope-base F      rope.freq_base\n"
    "  --rope-freqs       add Llama-3.1-style rope_freqs.weight (llama only)\n"
    "  --tied             no output.weight (token_embd is reused)\n"
    "  --seed N           random seed (default 42)\n";

// ---------------------------------------------------------------------------------------
// argument parsing

int64_t parse_int(const std::string & flag, const std::string & v, int64_t lo, int64_t hi) {
    errno               = 0;
    char *          end = nullptr;
    const long long x   = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end != '\0' || errno == ERANGE || x < lo || x > hi) {
        throw UsageError(flag + ": expected an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) +
                         "], got '" + v + "'");
    }
    return x;
}

uint64_t parse_seed(const std::string & v) {
    errno                        = 0;
    char *                   end = nullptr;
    const unsigned long long x   = std::strtoull(v.c_str(), &end, 10);
    if (v.empty() || v[0] == '-' || *end != '\0' || errno == ERANGE) {
        throw UsageError("--seed: expected an integer in [0, 18446744073709551615], got '" + v + "'");
    }
    return x;
}

float parse_rope_base(const std::string & v) {
    char *       end = nullptr;
    const double x   = std::strtod(v.c_str(), &end);
    if (v.empty() || *end != '\0' || !std::isfinite(x) || x <= 1.0 || x > 1e12) {
        throw UsageError("--rope-base: expected a number in (1, 1e12], got '" + v + "'");
    }
    return (float) x;
}

ggml_type parse_type(const std::string & v, const std::string & flag = "--type") {
    static const std::map<std::string, ggml_type> types = {
        { "f32", GGML_TYPE_F32 },   { "f16", GGML_TYPE_F16 },   { "q8_0", GGML_TYPE_Q8_0 },
        { "q4_0", GGML_TYPE_Q4_0 }, { "q4_1", GGML_TYPE_Q4_1 },
    };
    auto it = types.find(v);
    if (it == types.end()) {
        throw UsageError(flag + ": expected one of f32|f16|q8_0|q4_0|q4_1, got '" + v + "'");
    }
    return it->second;
}

const Preset & find_preset(const std::string & v) {
    for (const auto & p : presets()) {
        if (v == p.name) {
            return p;
        }
    }
    throw UsageError(
        "--preset: expected one of tiny|smollm2-135m|llama3-8b|llama3.2-1b|"
        "qwen2.5-0.5b|qwen3-0.6b, got '" +
        v + "'");
}

// Collects "--flag value" pairs first, so that the preset can be applied before the
// explicit flags regardless of their order on the command line.
std::map<std::string, std::string> collect_flags(int argc, char ** argv) {
    static const char * valued[]  = { "--out",           "--arch",     "--preset",   "--layers",    "--embd",
                                      "--heads",         "--kv-heads", "--head-dim", "--ff",        "--ctx",
                                      "--vocab-from",    "--vocab",    "--type",     "--rope-base", "--seed",
                                      "--chat-template", "--type-v" };
    static const char * boolean[] = { "--rope-freqs", "--tied", "--no-chat-template" };

    std::map<std::string, std::string> flags;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            flags["--help"] = "";
            return flags;
        }
        bool known = false;
        for (const char * b : boolean) {
            if (a == b) {
                flags[a] = "1";
                known    = true;
            }
        }
        for (const char * v : valued) {
            if (a != v) {
                continue;
            }
            if (i + 1 >= argc) {
                throw UsageError(a + ": missing value");
            }
            flags[a] = argv[++i];
            known    = true;
        }
        if (!known) {
            throw UsageError(a + ": unknown flag (see --help)");
        }
    }
    return flags;
}

// Cross-flag checks; each names the flag that has to change.
void validate_shape(const Shape & s, ggml_type type) {
    // Quantized rows are whole blocks; every 2-D weight has ne0 in {embd, heads*head_dim, ff}.
    const int64_t     blk   = ggml_blck_size(type);
    const std::string tname = ggml_type_name(type);
    if (s.n_embd % blk != 0) {
        throw UsageError("--embd: must be a multiple of " + std::to_string(blk) + " for --type " + tname + ", got " +
                         std::to_string(s.n_embd));
    }
    if ((s.n_head * s.head_dim) % blk != 0) {
        throw UsageError("--head-dim: heads*head_dim (" + std::to_string(s.n_head * s.head_dim) +
                         ") must be a multiple of " + std::to_string(blk) + " for --type " + tname);
    }
    if (s.n_ff % blk != 0) {
        throw UsageError("--ff: must be a multiple of " + std::to_string(blk) + " for --type " + tname + ", got " +
                         std::to_string(s.n_ff));
    }
    if (s.n_head % s.n_head_kv != 0) {  // GQA: each kv head serves a whole group of q heads
        throw UsageError("--kv-heads: must divide --heads (" + std::to_string(s.n_head) + "), got " +
                         std::to_string(s.n_head_kv));
    }
    if (s.head_dim % 2 != 0) {
        throw UsageError("--head-dim: must be even (rope rotates pairs), got " + std::to_string(s.head_dim) +
                         " (without --head-dim it is embd/heads)");
    }
    // qwen2 builds attn_q/attn_output as n_embd x n_embd, so the heads must tile n_embd.
    if (s.arch == "qwen2" && s.n_head * s.head_dim != s.n_embd) {
        throw UsageError("--head-dim: qwen2 needs heads*head_dim == embd (" + std::to_string(s.n_head) + "*" +
                         std::to_string(s.head_dim) + " != " + std::to_string(s.n_embd) + ")");
    }
    if (s.rope_freqs && s.arch != "llama") {
        throw UsageError("--rope-freqs: only valid with --arch llama (got '" + s.arch + "')");
    }
}

Options parse_args(int argc, char ** argv) {
    auto    flags = collect_flags(argc, argv);
    Options o;
    if (flags.count("--help")) {
        o.help = true;
        return o;
    }
    auto has = [&](const char * f) { return flags.count(f) > 0; };

    if (!has("--out") || flags["--out"].empty()) {
        throw UsageError("--out: required (path of the GGUF to write)");
    }
    o.out = flags["--out"];
    if (has("--preset")) {
        o.preset = flags["--preset"];
    }
    o.shape   = find_preset(o.preset).shape;
    Shape & s = o.shape;

    if (has("--arch")) {
        s.arch = flags["--arch"];
        if (s.arch.empty() || s.arch.find_first_of(" \t\n.") != std::string::npos) {
            throw UsageError(
                "--arch: expected llama|mistral3|qwen2|qwen3 or another name without "
                "spaces or dots, got '" +
                s.arch + "'");
        }
    }
    if (has("--layers")) s.n_layer = parse_int("--layers", flags["--layers"], 1, 512);
    if (has("--embd")) s.n_embd = parse_int("--embd", flags["--embd"], 1, 65536);
    if (has("--heads")) s.n_head = parse_int("--heads", flags["--heads"], 1, 1024);
    if (has("--kv-heads")) s.n_head_kv = parse_int("--kv-heads", flags["--kv-heads"], 1, 1024);
    if (has("--ff")) s.n_ff = parse_int("--ff", flags["--ff"], 1, 1 << 20);
    if (has("--ctx")) s.n_ctx = parse_int("--ctx", flags["--ctx"], 1, 1 << 24);
    if (has("--head-dim")) {
        s.head_dim = parse_int("--head-dim", flags["--head-dim"], 2, 1024);
    } else if (has("--embd") || has("--heads")) {
        // The preset's head_dim belongs to the preset's embd/heads; follow the new ones.
        if (s.n_embd % s.n_head != 0) {
            throw UsageError("--head-dim: required when --embd (" + std::to_string(s.n_embd) +
                             ") is not a multiple of --heads (" + std::to_string(s.n_head) + ")");
        }
        s.head_dim = s.n_embd / s.n_head;
    }
    if (!has("--kv-heads") && has("--heads") && s.n_head % s.n_head_kv != 0) {
        s.n_head_kv = s.n_head;  // keep the preset's GQA ratio only when it still fits
    }
    if (has("--rope-base")) s.rope_base = parse_rope_base(flags["--rope-base"]);
    if (has("--rope-freqs")) s.rope_freqs = true;
    if (has("--tied")) s.tied = true;
    if (has("--type")) o.type = parse_type(flags["--type"]);
    if (has("--type-v")) o.type_v = parse_type(flags["--type-v"], "--type-v");
    if (has("--seed")) o.seed = parse_seed(flags["--seed"]);

    if (has("--vocab-from") && has("--vocab")) {
        throw UsageError("--vocab: conflicts with --vocab-from (which takes n_vocab from its tokenizer)");
    }
    if (has("--vocab-from")) {
        o.vocab_from = flags["--vocab-from"];
    } else if (has("--vocab")) {
        o.n_vocab_synth = parse_int("--vocab", flags["--vocab"], 260, 1 << 22);
    } else {
        throw UsageError(
            "--vocab-from: required (a GGUF to copy the tokenizer from), "
            "or --vocab N (>= 260) for a synthetic tokenizer");
    }
    if (has("--chat-template") && has("--no-chat-template")) {
        throw UsageError("--no-chat-template: conflicts with --chat-template");
    }
    if (has("--chat-template")) {
        o.chat_template_file = flags["--chat-template"];
        if (o.chat_template_file.empty()) throw UsageError("--chat-template: expected a file name, got ''");
    }
    o.no_chat_template = has("--no-chat-template");
    validate_shape(s, o.type);
    if (o.type_v != GGML_TYPE_COUNT) validate_shape(s, o.type_v);
    return o;
}

// ---------------------------------------------------------------------------------------
// tokenizer

// gguf_init_from_file logs its own errors; silence ggml so a bad --vocab-from gives the
// one-line error below instead of several.
void quiet_log(ggml_log_level, const char *, void *) {}

// Copies one kv of src into dst with the typed setters (gguf_set_kv would copy all keys).
void copy_kv(gguf_context * dst, const gguf_context * src, int64_t i) {
    const char * key = gguf_get_key(src, i);
    switch (gguf_get_kv_type(src, i)) {
        case GGUF_TYPE_UINT8: gguf_set_val_u8(dst, key, gguf_get_val_u8(src, i)); break;
        case GGUF_TYPE_INT8: gguf_set_val_i8(dst, key, gguf_get_val_i8(src, i)); break;
        case GGUF_TYPE_UINT16: gguf_set_val_u16(dst, key, gguf_get_val_u16(src, i)); break;
        case GGUF_TYPE_INT16: gguf_set_val_i16(dst, key, gguf_get_val_i16(src, i)); break;
        case GGUF_TYPE_UINT32: gguf_set_val_u32(dst, key, gguf_get_val_u32(src, i)); break;
        case GGUF_TYPE_INT32: gguf_set_val_i32(dst, key, gguf_get_val_i32(src, i)); break;
        case GGUF_TYPE_FLOAT32: gguf_set_val_f32(dst, key, gguf_get_val_f32(src, i)); break;
        case GGUF_TYPE_UINT64: gguf_set_val_u64(dst, key, gguf_get_val_u64(src, i)); break;
        case GGUF_TYPE_INT64: gguf_set_val_i64(dst, key, gguf_get_val_i64(src, i)); break;
        case GGUF_TYPE_FLOAT64: gguf_set_val_f64(dst, key, gguf_get_val_f64(src, i)); break;
        case GGUF_TYPE_BOOL: gguf_set_val_bool(dst, key, gguf_get_val_bool(src, i)); break;
        case GGUF_TYPE_STRING: gguf_set_val_str(dst, key, gguf_get_val_str(src, i)); break;
        case GGUF_TYPE_ARRAY: {
            const gguf_type at = gguf_get_arr_type(src, i);
            const size_t    n  = gguf_get_arr_n(src, i);
            if (at == GGUF_TYPE_STRING) {
                std::vector<const char *> strs(n);
                for (size_t j = 0; j < n; ++j) {
                    strs[j] = gguf_get_arr_str(src, i, j);
                }
                gguf_set_arr_str(dst, key, strs.data(), n);
            } else if (at != GGUF_TYPE_ARRAY) {
                gguf_set_arr_data(dst, key, at, gguf_get_arr_data(src, i), n);
            }
            // nested arrays do not occur in tokenizer metadata; they are skipped
            break;
        }
        default: break;
    }
}

// Copies every tokenizer.* key of the --vocab-from GGUF; returns n_vocab.
int64_t copy_tokenizer(gguf_context * dst, const std::string & path) {
    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) {
        throw UsageError("--vocab-from: cannot open '" + path + "': " + std::strerror(errno));
    }
    std::fclose(f);

    gguf_init_params params = { /*no_alloc =*/true, /*ctx =*/nullptr };
    gguf_context *   src    = gguf_init_from_file(path.c_str(), params);
    if (!src) {
        throw UsageError("--vocab-from: '" + path + "' is not a readable GGUF file");
    }
    const int64_t tok = gguf_find_key(src, "tokenizer.ggml.tokens");
    if (tok < 0 || gguf_get_kv_type(src, tok) != GGUF_TYPE_ARRAY || gguf_get_arr_type(src, tok) != GGUF_TYPE_STRING ||
        gguf_get_arr_n(src, tok) == 0) {
        gguf_free(src);
        throw UsageError("--vocab-from: '" + path + "' has no tokenizer.ggml.tokens string array");
    }
    const int64_t n_vocab = (int64_t) gguf_get_arr_n(src, tok);
    for (int64_t i = 0; i < gguf_get_n_kv(src); ++i) {
        if (std::strncmp(gguf_get_key(src, i), "tokenizer.", 10) == 0) {
            copy_kv(dst, src, i);
        }
    }
    gguf_free(src);
    return n_vocab;
}

// The template text as it is, every byte (a GGUF string cannot hold a NUL).
std::string read_chat_template(const std::string & path) {
    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) {
        throw UsageError("--chat-template: cannot open '" + path + "': " + std::strerror(errno));
    }
    std::string text;
    char        buf[4096];
    size_t      n;
    while ((n = std::fread(buf, 1, sizeof(buf), f)) > 0) text.append(buf, n);
    std::fclose(f);
    if (text.empty()) throw UsageError("--chat-template: '" + path + "' is empty");
    if (text.find('\0') != std::string::npos) {
        throw UsageError("--chat-template: '" + path + "' holds a NUL byte (not a text file)");
    }
    return text;
}

// Unique printable piece for normal token k: "▁" + base-26 letters.
std::string synth_piece(int64_t k) {
    std::string s;
    do {
        s.insert(s.begin(), char('a' + k % 26));
        k = k / 26 - 1;
    } while (k >= 0);
    return "\xE2\x96\x81" + s;
}

// Minimal SentencePiece ("llama") vocab that libllama accepts: <unk> <s> </s>, the 256
// byte tokens (so any text tokenizes and "\n" has a token), then n-259 normal pieces.
int64_t synth_tokenizer(gguf_context * dst, int64_t n) {
    enum { NORMAL = 1, UNKNOWN = 2, CONTROL = 3, BYTE = 6 };  // llama_token_type
    std::vector<std::string> text;
    std::vector<float>       scores;
    std::vector<int32_t>     types;
    auto                     add = [&](std::string t, float sc, int32_t ty) {
        text.push_back(std::move(t));
        scores.push_back(sc);
        types.push_back(ty);
    };
    add("<unk>", 0.0f, UNKNOWN);
    add("<s>", 0.0f, CONTROL);
    add("</s>", 0.0f, CONTROL);
    for (int b = 0; b < 256; ++b) {
        char buf[8];
        std::snprintf(buf, sizeof(buf), "<0x%02X>", b);
        add(buf, 0.0f, BYTE);
    }
    for (int64_t k = 0; (int64_t) text.size() < n; ++k) {
        add(synth_piece(k), -(float) k, NORMAL);  // shorter pieces score higher
    }
    std::vector<const char *> ptrs(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
        ptrs[i] = text[i].c_str();
    }
    gguf_set_val_str(dst, "tokenizer.ggml.model", "llama");
    gguf_set_arr_str(dst, "tokenizer.ggml.tokens", ptrs.data(), ptrs.size());
    gguf_set_arr_data(dst, "tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, scores.data(), scores.size());
    gguf_set_arr_data(dst, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types.data(), types.size());
    gguf_set_val_u32(dst, "tokenizer.ggml.bos_token_id", 1);
    gguf_set_val_u32(dst, "tokenizer.ggml.eos_token_id", 2);
    gguf_set_val_u32(dst, "tokenizer.ggml.unknown_token_id", 0);
    return n;
}

// ---------------------------------------------------------------------------------------
// metadata

uint32_t file_type_of(ggml_type t) {
    switch (t) {  // llama_ftype values (llama.h), so libllama prints the right type
        case GGML_TYPE_F16: return 1;
        case GGML_TYPE_Q4_0: return 2;
        case GGML_TYPE_Q4_1: return 3;
        case GGML_TYPE_Q8_0: return 7;
        default: return 0;
    }
}

void set_metadata(gguf_context * g, const Options & o, int64_t n_vocab) {
    const Shape &     s   = o.shape;
    const std::string a   = s.arch + ".";
    auto              u32 = [&](const char * k, int64_t v) { gguf_set_val_u32(g, (a + k).c_str(), (uint32_t) v); };

    gguf_set_val_str(g, "general.architecture", s.arch.c_str());
    gguf_set_val_str(g, "general.name", ("pkv random " + o.preset).c_str());
    gguf_set_val_u32(g, "general.file_type", file_type_of(o.type));
    if (ggml_is_quantized(o.type) || (o.type_v != GGML_TYPE_COUNT && ggml_is_quantized(o.type_v))) {
        gguf_set_val_u32(g, "general.quantization_version", GGML_QNT_VERSION);
    }
    u32("vocab_size", n_vocab);
    u32("context_length", s.n_ctx);
    u32("embedding_length", s.n_embd);
    u32("feed_forward_length", s.n_ff);
    u32("block_count", s.n_layer);
    u32("attention.head_count", s.n_head);
    u32("attention.head_count_kv", s.n_head_kv);
    u32("attention.key_length", s.head_dim);
    u32("attention.value_length", s.head_dim);
    u32("rope.dimension_count", s.head_dim);
    gguf_set_val_f32(g, (a + "rope.freq_base").c_str(), s.rope_base);
    gguf_set_val_f32(g, (a + "attention.layer_norm_rms_epsilon").c_str(), s.rms_eps);
}

// ---------------------------------------------------------------------------------------
// tensor plan

enum class Kind { Matrix, Norm, Bias, RopeFreqs };

struct TensorSpec {
    std::string name;
    int64_t     ne0, ne1;  // ne1 == 0: 1-D
    Kind        kind;
};

std::vector<TensorSpec> plan_tensors(const Shape & s, int64_t n_vocab) {
    const int64_t           q = s.n_head * s.head_dim, kv = s.n_head_kv * s.head_dim;
    std::vector<TensorSpec> t;
    t.push_back({ "token_embd.weight", s.n_embd, n_vocab, Kind::Matrix });
    if (s.rope_freqs) {
        t.push_back({ "rope_freqs.weight", s.head_dim / 2, 0, Kind::RopeFreqs });
    }
    for (int64_t i = 0; i < s.n_layer; ++i) {
        const std::string b = "blk." + std::to_string(i) + ".";
        t.push_back({ b + "attn_norm.weight", s.n_embd, 0, Kind::Norm });
        t.push_back({ b + "attn_q.weight", s.n_embd, q, Kind::Matrix });
        t.push_back({ b + "attn_k.weight", s.n_embd, kv, Kind::Matrix });
        t.push_back({ b + "attn_v.weight", s.n_embd, kv, Kind::Matrix });
        if (s.arch == "qwen2") {
            t.push_back({ b + "attn_q.bias", q, 0, Kind::Bias });
            t.push_back({ b + "attn_k.bias", kv, 0, Kind::Bias });
            t.push_back({ b + "attn_v.bias", kv, 0, Kind::Bias });
        }
        if (s.arch == "qwen3") {
            t.push_back({ b + "attn_q_norm.weight", s.head_dim, 0, Kind::Norm });
            t.push_back({ b + "attn_k_norm.weight", s.head_dim, 0, Kind::Norm });
        }
        t.push_back({ b + "attn_output.weight", q, s.n_embd, Kind::Matrix });
        t.push_back({ b + "ffn_norm.weight", s.n_embd, 0, Kind::Norm });
        t.push_back({ b + "ffn_gate.weight", s.n_embd, s.n_ff, Kind::Matrix });
        t.push_back({ b + "ffn_up.weight", s.n_embd, s.n_ff, Kind::Matrix });
        t.push_back({ b + "ffn_down.weight", s.n_ff, s.n_embd, Kind::Matrix });
    }
    t.push_back({ "output_norm.weight", s.n_embd, 0, Kind::Norm });
    if (!s.tied) {
        t.push_back({ "output.weight", s.n_embd, n_vocab, Kind::Matrix });
    }
    return t;
}

// Norms, biases and rope factors stay f32 as in real GGUFs; only matrices take --type (attn_v and
// ffn_down --type-v when given).
ggml_type type_of(const TensorSpec & t, const Options & o) {
    if (t.kind != Kind::Matrix) return GGML_TYPE_F32;
    const auto ends_with = [&](const char * suffix) {
        const size_t n = std::strlen(suffix);
        return t.name.size() >= n && t.name.compare(t.name.size() - n, n, suffix) == 0;
    };
    if (o.type_v != GGML_TYPE_COUNT && (ends_with("attn_v.weight") || ends_with("ffn_down.weight"))) return o.type_v;
    return o.type;
}

// ---------------------------------------------------------------------------------------
// random values

uint64_t splitmix64(uint64_t & state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z          = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z          = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// Row-keyed stream, so the values do not depend on the thread count or chunking.
uint64_t row_state(uint64_t seed, uint64_t tensor, uint64_t row) {
    uint64_t s = seed;
    uint64_t h = splitmix64(s) ^ (tensor * 0xD6E8FEB86659FD93ull);
    h          = splitmix64(h) ^ (row * 0xA0761D6478BD642Full);
    return splitmix64(h);
}

// Approximately standard normal: sum of four 16-bit uniforms (Irwin-Hall, n=4), centred
// and scaled to unit variance. One PRNG call per value; tails are cut at ~3.5 sigma,
// which is all random test weights need.
inline float normalish(uint64_t & state) {
    const uint64_t r = splitmix64(state);
    const uint32_t sum =
        uint32_t(r & 0xFFFF) + uint32_t((r >> 16) & 0xFFFF) + uint32_t((r >> 32) & 0xFFFF) + uint32_t(r >> 48);
    return (float(sum) - 131070.0f) * (1.7320508f / 65536.0f);
}

// Llama-3.1 rope scaling (factor 8, low 1, high 4, original context 8192), as
// convert_hf_to_gguf.py computes rope_freqs: 1 for high frequencies, 8 for low ones.
std::vector<float> llama3_rope_factors(int64_t head_dim, float base) {
    const double       factor = 8.0, low = 1.0, high = 4.0, old_ctx = 8192.0;
    const double       low_wavelen = old_ctx / low, high_wavelen = old_ctx / high;
    std::vector<float> out;
    for (int64_t i = 0; i < head_dim; i += 2) {
        const double freq    = 1.0 / std::pow((double) base, (double) i / (double) head_dim);
        const double wavelen = 2.0 * 3.14159265358979323846 / freq;
        if (wavelen < high_wavelen) {
            out.push_back(1.0f);
        } else if (wavelen > low_wavelen) {
            out.push_back((float) factor);
        } else {
            const double smooth = (old_ctx / wavelen - low) / (high - low);
            out.push_back((float) (1.0 / ((1.0 - smooth) / factor + smooth)));
        }
    }
    return out;
}

// Fills rows [r0, r1) of tensor `ti` (row length ne0) into dst (row r0 at dst[0]).
void fill_rows(const TensorSpec & t, uint64_t seed, uint64_t ti, int64_t r0, int64_t r1, float * dst) {
    // std = 1/sqrt(fan_in) keeps matmul outputs at unit scale whatever the width.
    const float std_w = t.kind == Kind::Matrix ? 1.0f / std::sqrt((float) t.ne0) : 0.02f;
    for (int64_t r = r0; r < r1; ++r) {
        uint64_t st  = row_state(seed, ti, (uint64_t) r);
        float *  row = dst + (r - r0) * t.ne0;
        for (int64_t j = 0; j < t.ne0; ++j) {
            const float x = normalish(st) * std_w;
            row[j]        = t.kind == Kind::Norm ? 1.0f + x : x;  // norm weights sit around 1
        }
    }
}

// ---------------------------------------------------------------------------------------
// streaming writer

struct Writer {
    FILE *   f       = nullptr;
    uint64_t written = 0;  // bytes of the data section so far

    void put(const void * p, size_t n) {
        if (n && std::fwrite(p, 1, n, f) != n) {
            throw IoError(std::string("--out: write failed: ") + std::strerror(errno));
        }
        written += n;
    }
    void pad(size_t align) {
        static const char zeros[256] = {};
        size_t            n          = GGML_PAD(written, align) - written;
        while (n) {
            const size_t k = std::min(n, sizeof(zeros));
            put(zeros, k);
            n -= k;
        }
    }
};

// Generates and converts one chunk of rows in parallel: each thread owns a row range.
void make_chunk(const TensorSpec & t, ggml_type type, uint64_t seed, uint64_t ti, int64_t r0, int64_t nrows,
                std::vector<float> & f32, std::vector<uint8_t> & out, int n_threads) {
    const size_t row_bytes = ggml_row_size(type, t.ne0);
    auto         work      = [&](int64_t a, int64_t b) {  // rows [a, b) relative to the chunk
        if (a >= b) {
            return;
        }
        fill_rows(t, seed, ti, r0 + a, r0 + b, f32.data() + a * t.ne0);
        if (type == GGML_TYPE_F32) {
            std::memcpy(out.data() + a * row_bytes, f32.data() + a * t.ne0, (b - a) * row_bytes);
        } else {
            ggml_quantize_chunk(type, f32.data(), out.data(), a * t.ne0, b - a, t.ne0, nullptr);
        }
    };
    // Thread start-up costs more than small chunks (norms, tiny models) take to compute.
    if (n_threads <= 1 || nrows * t.ne0 < (1 << 16)) {
        work(0, nrows);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t            per = (nrows + n_threads - 1) / n_threads;
    for (int k = 0; k < n_threads; ++k) {
        pool.emplace_back(work, std::min(nrows, k * per), std::min(nrows, (k + 1) * per));
    }
    for (auto & th : pool) {
        th.join();
    }
}

void write_tensor(Writer & w, const TensorSpec & t, ggml_type type, uint64_t seed, uint64_t ti, int n_threads) {
    const int64_t nrows = std::max<int64_t>(t.ne1, 1);
    // ~8M values per chunk: 32 MB of f32 scratch, whatever the model size.
    const int64_t        chunk = std::max<int64_t>(1, (int64_t(8) << 20) / t.ne0);
    std::vector<float>   f32(std::min(chunk, nrows) * t.ne0);
    std::vector<uint8_t> out(std::min(chunk, nrows) * ggml_row_size(type, t.ne0));
    for (int64_t r0 = 0; r0 < nrows; r0 += chunk) {
        const int64_t n = std::min(chunk, nrows - r0);
        make_chunk(t, type, seed, ti, r0, n, f32, out, n_threads);
        w.put(out.data(), n * ggml_row_size(type, t.ne0));
    }
}

// RAII owners, so every error path frees the contexts and closes the file.
struct GgufFree {
    void operator()(gguf_context * g) const { gguf_free(g); }
};
struct GgmlFree {
    void operator()(ggml_context * c) const { ggml_free(c); }
};
struct FileClose {
    void operator()(FILE * f) const { std::fclose(f); }
};
using GgufPtr = std::unique_ptr<gguf_context, GgufFree>;
using GgmlPtr = std::unique_ptr<ggml_context, GgmlFree>;
using FilePtr = std::unique_ptr<FILE, FileClose>;

// The tokenizer decides n_vocab, which the arch keys and embeddings need; it is built in a
// scratch context first so that general.* and the arch keys lead the file, as usual.
GgufPtr build_metadata(const Options & o, int64_t * n_vocab) {
    GgufPtr tok(gguf_init_empty());
    *n_vocab =
        o.vocab_from.empty() ? synth_tokenizer(tok.get(), o.n_vocab_synth) : copy_tokenizer(tok.get(), o.vocab_from);
    if (!o.chat_template_file.empty()) {
        const std::string text = read_chat_template(o.chat_template_file);
        gguf_set_val_str(tok.get(), "tokenizer.chat_template", text.c_str());
    }
    if (o.no_chat_template) gguf_remove_key(tok.get(), "tokenizer.chat_template");
    GgufPtr g(gguf_init_empty());
    set_metadata(g.get(), o, *n_vocab);
    for (int64_t i = 0; i < gguf_get_n_kv(tok.get()); ++i) {
        copy_kv(g.get(), tok.get(), i);
    }
    return g;
}

// Tensor infos go through a no_alloc ggml context: shapes and types only, never data.
GgmlPtr add_tensor_infos(gguf_context * g, const std::vector<TensorSpec> & plan, const Options & o) {
    ggml_init_params ip = { ggml_tensor_overhead() * (plan.size() + 1), nullptr, /*no_alloc =*/true };
    GgmlPtr          ctx(ggml_init(ip));
    if (!ctx) {
        throw IoError("ggml_init failed");
    }
    for (const auto & t : plan) {
        const ggml_type type = type_of(t, o);
        ggml_tensor *   x =
            t.ne1 ? ggml_new_tensor_2d(ctx.get(), type, t.ne0, t.ne1) : ggml_new_tensor_1d(ctx.get(), type, t.ne0);
        ggml_set_name(x, t.name.c_str());
        gguf_add_tensor(g, x);
    }
    return ctx;
}

// Streams the data section, one tensor at a time; returns the parameter count.
double write_data(Writer & w, const gguf_context * g, const std::vector<TensorSpec> & plan, const Options & o) {
    ggml_quantize_init(o.type);  // once, before worker threads use the type
    if (o.type_v != GGML_TYPE_COUNT) ggml_quantize_init(o.type_v);
    const int    n_threads = (int) std::max(1u, std::min(64u, std::thread::hardware_concurrency()));
    const size_t align     = gguf_get_alignment(g);
    double       n_params  = 0;
    for (size_t i = 0; i < plan.size(); ++i) {
        // the header promised this offset; anything else is a bug in this tool
        if (w.written != gguf_get_tensor_offset(g, (int64_t) i)) {
            throw IoError("internal error: offset mismatch at " + plan[i].name);
        }
        if (plan[i].kind == Kind::RopeFreqs) {
            const auto fac = llama3_rope_factors(o.shape.head_dim, o.shape.rope_base);
            w.put(fac.data(), fac.size() * sizeof(float));
        } else {
            write_tensor(w, plan[i], type_of(plan[i], o), o.seed, i, n_threads);
        }
        w.pad(align);
        n_params += double(plan[i].ne0) * double(std::max<int64_t>(plan[i].ne1, 1));
    }
    return n_params;
}

struct Result {
    uint64_t bytes     = 0;
    size_t   n_tensors = 0;
    int64_t  n_vocab   = 0;
    double   n_params  = 0;
};

Result write_model(const Options & o, const std::string & tmp_path) {
    Result     res;
    GgufPtr    g    = build_metadata(o, &res.n_vocab);
    const auto plan = plan_tensors(o.shape, res.n_vocab);
    GgmlPtr    ctx  = add_tensor_infos(g.get(), plan, o);

    FilePtr f(std::fopen(tmp_path.c_str(), "wb"));
    if (!f) {
        throw UsageError("--out: cannot create '" + tmp_path + "': " + std::strerror(errno));
    }
    // only_meta writes the kv pairs, the tensor infos and the padding up to the data section
    if (!gguf_write_to_file_ptr(g.get(), f.get(), /*only_meta =*/true)) {
        throw IoError("--out: writing the GGUF header failed");
    }
    Writer w{ f.get(), 0 };
    res.n_params  = write_data(w, g.get(), plan, o);
    res.n_tensors = plan.size();
    res.bytes     = (uint64_t) gguf_get_meta_size(g.get()) + w.written;

    const bool io_error = std::ferror(f.get()) != 0;
    if (std::fclose(f.release()) != 0 || io_error) {  // fclose flushes: disk full shows here
        throw IoError(std::string("--out: write failed: ") + std::strerror(errno));
    }
    return res;
}

int run(int argc, char ** argv) {
    const Options o = parse_args(argc, argv);
    if (o.help) {
        std::fputs(kUsage, stdout);
        return 0;
    }
    ggml_log_set(quiet_log, nullptr);

    // write next to the target and rename, so a failed run never leaves a half GGUF
    const std::string tmp = o.out + ".partial";
    const auto        t0  = std::chrono::steady_clock::now();
    Result            r;
    try {
        r = write_model(o, tmp);
    } catch (...) {
        std::remove(tmp.c_str());
        throw;
    }
    if (std::rename(tmp.c_str(), o.out.c_str()) != 0) {
        std::remove(tmp.c_str());
        throw IoError("--out: cannot rename to '" + o.out + "': " + std::strerror(errno));
    }
    const double  secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const Shape & s    = o.shape;
    std::printf(
        "wrote %s: arch %s, %lld layers, embd %lld, heads %lld/%lld, head_dim %lld, ff %lld, "
        "vocab %lld, %s%s%s%s, %zu tensors, %.1fM params, %.1f MiB in %.1f s\n",
        o.out.c_str(), s.arch.c_str(), (long long) s.n_layer, (long long) s.n_embd, (long long) s.n_head,
        (long long) s.n_head_kv, (long long) s.head_dim, (long long) s.n_ff, (long long) r.n_vocab,
        ggml_type_name(o.type),
        o.type_v != GGML_TYPE_COUNT ? (std::string(" (attn_v, ffn_down ") + ggml_type_name(o.type_v) + ")").c_str()
                                    : "",
        s.tied ? ", tied" : "", s.rope_freqs ? ", rope_freqs" : "", r.n_tensors, r.n_params / 1e6, r.bytes / 1048576.0,
        secs);
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    try {
        return run(argc, argv);
    } catch (const UsageError & e) {
        std::fprintf(stderr, "pkv-make-gguf: %s\n", e.what());
        return 2;
    } catch (const std::exception & e) {
        std::fprintf(stderr, "pkv-make-gguf: %s\n", e.what());
        return 1;
    }
}
