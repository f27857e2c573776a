// pkv-engine: the engine's command line. Thin: parse, call, print. Contract in README.md.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iostream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "bench.h"
#include "compress.h"
#include "error.h"
#include "generate.h"
#include "json.h"
#include "llama.h"
#include "paths.h"
#include "serve.h"
#include "session.h"

using namespace pkv;

namespace {

// Flags of the form --name value or --switch. Unknown flags are errors naming the flag.
class Args {
  public:
    Args(int argc, char ** argv, int first, const std::vector<std::string> & switches,
         const std::vector<std::string> & valued) {
        for (int i = first; i < argc; ++i) {
            const std::string a = argv[i];
            if (std::find(switches.begin(), switches.end(), a) != switches.end()) {
                values_[a] = "1";
            } else if (std::find(valued.begin(), valued.end(), a) != valued.end()) {
                if (i + 1 >= argc) throw Error(a, "missing value");
                values_[a] = argv[++i];
            } else {
                throw Error(a, "unknown option");
            }
        }
    }
    bool        has(const std::string & k) const { return values_.count(k) > 0; }
    std::string str(const std::string & k, const std::string & fallback = "") const {
        auto it = values_.find(k);
        return it == values_.end() ? fallback : it->second;
    }
    long integer(const std::string & k, long fallback, long lo, long hi) const {
        if (!has(k)) return fallback;
        const std::string v   = str(k);
        char *            end = nullptr;
        const long        x   = std::strtol(v.c_str(), &end, 10);
        if (v.empty() || *end != '\0' || x < lo || x > hi) {
            throw Error(k, "'" + v + "' is not an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
        }
        return x;
    }
    double real(const std::string & k, double fallback, double lo, double hi) const {
        if (!has(k)) return fallback;
        const std::string v   = str(k);
        char *            end = nullptr;
        const double      x   = std::strtod(v.c_str(), &end);
        if (v.empty() || *end != '\0' || !(x >= lo && x <= hi)) {
            throw Error(k, "'" + v + "' is not a number in [" + json::number(lo) + ", " + json::number(hi) + "]");
        }
        return x;
    }

  private:
    std::map<std::string, std::string> values_;
};

const std::vector<std::string> kCompressionFlags = { "--method",      "--budget",  "--window",          "--beta",
                                                     "--kernel-size", "--pooling", "--head-aggregation" };

CompressionParams compression_params(const Args & a) {
    CompressionParams p;
    p.method = a.str("--method", p.method);
    // Ranges here only guard the integer parse; validate_params owns the real rules.
    p.budget            = (int) a.integer("--budget", p.budget, -1000000000, 1000000000);
    p.window            = (int) a.integer("--window", p.window, -1000000000, 1000000000);
    p.beta              = (int) a.integer("--beta", p.beta, -1000000000, 1000000000);
    p.kernel_size       = (int) a.integer("--kernel-size", p.kernel_size, -1000000000, 1000000000);
    std::string problem = parse_pooling(a.str("--pooling", pooling_name(p.pooling)), "--pooling", p.pooling);
    if (problem.empty())
        problem = parse_aggregation(a.str("--head-aggregation", aggregation_name(p.aggregation)), "--head-aggregation",
                                    p.aggregation);
    if (problem.empty()) problem = validate_params(p);
    if (!problem.empty()) throw Error("", problem);
    return p;
}

std::string read_prompt(const Args & a) {
    if (a.has("--prompt-file") == a.has("--prompt"))
        throw Error("--prompt-file", "give exactly one of --prompt-file F or --prompt T");
    std::string text;
    if (a.has("--prompt")) {
        text = a.str("--prompt");
    } else {
        const std::string path = a.str("--prompt-file");
        std::ifstream     in(path, std::ios::binary);
        if (!in) throw Error("--prompt-file", "cannot read '" + path + "'");
        std::stringstream ss;
        ss << in.rdbuf();
        text = ss.str();
    }
    if (text.find_first_not_of(" \t\r\n") == std::string::npos) {
        throw Error(a.has("--prompt") ? "--prompt" : "--prompt-file", "the prompt is empty");
    }
    return text;
}

EngineOptions engine_options(const Args & a) {
    EngineOptions o;
    o.model_path     = a.str("--model", default_model_path());
    o.n_threads      = (int) a.integer("--threads", 0, 0, 1024);
    o.device         = a.str("--device", "auto");
    o.repack_weights = !a.has("--no-repack");
    o.n_ubatch       = (int) a.integer("--ubatch", 512, 1, 65536);
    o.n_ctx          = (int) a.integer("--ctx-size", 0, 0, 1 << 24);
    o.kv_pool_bytes  = (size_t) a.integer("--kv-pool-bytes", 0, 0, std::numeric_limits<long>::max());

    const std::string problem = parse_kv_type(a.str("--kv-type", kv_type_name(o.kv_type)), "--kv-type", o.kv_type);
    if (!problem.empty()) throw Error("", problem);
    return o;
}

int cmd_budgets(int argc, char ** argv) {
    Args a(argc, argv, 2, { "--json" }, { "--layers", "--budget", "--prompt-len", "--window", "--beta", "--method" });
    if (!a.has("--layers")) throw Error("--layers", "required (number of layers, >= 1)");
    if (!a.has("--prompt-len")) throw Error("--prompt-len", "required (prompt length in tokens, >= 1)");
    const int              layers = (int) a.integer("--layers", 0, 1, 100000);
    const int              n      = (int) a.integer("--prompt-len", 0, 1, 1 << 30);
    CompressionParams      p      = compression_params(a);
    const std::vector<int> b      = find_method(p.method)->layer_budgets(layers, n, p);
    double                 mean   = 0;
    for (int x : b) mean += x;
    mean /= b.size();
    if (a.has("--json")) {
        std::cout << json::Object().raw("layer_budgets", json::array(b)).dump() << "\n";
    } else {
        std::cout << "method " << p.method << ", budget " << p.budget << ", window " << p.window << ", beta " << p.beta
                  << ", prompt " << n << " tokens, " << layers << " layers\n";
        for (size_t l = 0; l < b.size(); ++l) std::cout << "layer " << l << ": " << b[l] << "\n";
        std::cout << "mean " << json::number(mean) << " (min " << b.back() << ", max " << b.front() << ")\n";
    }
    return 0;
}

void write_kept(const std::string & path, const Session & s) {
    std::ofstream out(path);
    if (!out) throw Error("--dump-kept", "cannot write '" + path + "'");
    std::vector<std::string> layers;
    for (const HeadSelection & layer : s.kept()) {
        std::vector<std::string> heads;
        for (const auto & head : layer) heads.push_back(json::array(head));
        layers.push_back(json::array(heads));
    }
    out << json::Object()
               .str("method", s.params().method)
               .integer("budget", s.params().budget)
               .raw("prompt_token_ids", json::array(std::vector<int32_t>(s.tokens().begin(), s.tokens().end())))
               .raw("kept", json::array(layers))
               .dump()
        << "\n";
}

int cmd_generate(int argc, char ** argv) {
    Args                    a(argc, argv, 2, { "--json", "--no-chat-template", "--no-repack" },
                              { "--model",       "--method",        "--budget",   "--window",
                                "--beta",        "--kernel-size",   "--pooling",  "--head-aggregation",
                                "--prompt-file", "--prompt",        "--question", "--max-new-tokens",
                                "--threads",     "--device",        "--ubatch",   "--dump-kept",
                                "--temperature", "--top-k",         "--top-p",    "--seed",
                                "--chunk-size",  "--kv-pool-bytes", "--ctx-size", "--kv-type" });
    const CompressionParams p        = compression_params(a);
    const int               max_new  = (int) a.integer("--max-new-tokens", 128, 0, 1 << 20);
    const std::string       document = read_prompt(a);
    const bool              as_json  = a.has("--json");
    SamplerOptions          so;
    so.temperature = (float) a.real("--temperature", 0.0, 0.0, 100.0);
    so.top_k       = (int) a.integer("--top-k", 0, 0, 1 << 30);
    so.top_p       = (float) a.real("--top-p", 1.0, 0.0, 1.0);
    so.seed        = (uint32_t) a.integer("--seed", 0, 0, 4294967295L);

    Engine        engine(engine_options(a));
    const Model & model = engine.model();
    std::string   user  = document;
    if (a.has("--question")) user += "\n\n" + a.str("--question");
    const std::string          text   = a.has("--no-chat-template") ? user : model.apply_chat_template(user);
    const std::vector<int32_t> prompt = model.tokenize(text, true);
    if ((int) prompt.size() + max_new > engine.n_ctx()) {
        throw Error(a.has("--prompt") ? "--prompt" : "--prompt-file",
                    std::to_string(prompt.size()) + " prompt tokens + " + std::to_string(max_new) +
                        " new tokens exceed the model's context of " + std::to_string(engine.n_ctx()));
    }

    const int chunk = (int) a.integer("--chunk-size", kDefaultChunkSize, 0, 1 << 24);
    if (chunk > 0 && chunk < p.window)
        throw Error("--chunk-size",
                    std::to_string(chunk) + " must be 0 (one-shot) or >= --window (" + std::to_string(p.window) + ")");
    Session          session(engine, p, chunk);
    GenerationResult r = generate(session, prompt, max_new, so, [&](const std::string & piece) {
        if (!as_json) {
            std::cout << piece << std::flush;
        }
    });
    if (a.has("--dump-kept")) write_kept(a.str("--dump-kept"), session);

    const SessionStats st         = session.stats();
    const std::string  model_name = model.path().substr(model.path().find_last_of('/') + 1);
    if (as_json) {
        std::cout << json::Object()
                         .str("text", r.text)
                         .str("model", model_name)
                         .str("method", p.method)
                         .integer("budget", p.budget)
                         .str("kv_type", kv_type_name(session.kv_type()))
                         .integer("prompt_tokens", (long long) prompt.size())
                         .integer("new_tokens", r.new_tokens)
                         .raw("layer_kv_lengths", json::array(r.prompt_kv_lengths))
                         .integer("kv_bytes", (long long) r.prompt_kv_bytes)
                         .integer("full_kv_bytes", (long long) r.prompt_full_kv_bytes)
                         .num("prefill_seconds", r.prefill_seconds)
                         .num("decode_tokens_per_second", r.decode_tokens_per_second)
                         .dump()
                  << "\n";
    } else {
        int    mn = r.prompt_kv_lengths[0], mx = mn;
        double mean = 0;
        for (int x : r.prompt_kv_lengths) mn = std::min(mn, x), mx = std::max(mx, x), mean += x;
        mean /= r.prompt_kv_lengths.size();
        std::printf("\n\n--- %s | method %s | budget %d (window %d, beta %d)\n", model_name.c_str(), p.method.c_str(),
                    p.budget, p.window, p.beta);
        std::printf("prompt tokens %zu | kept per layer min %d / mean %.1f / max %d\n", prompt.size(), mn, mean, mx);
        std::printf("KV bytes after prefill: FullKV %.2f MiB, kept %.2f MiB, ratio %.1fx (now %zu tokens: %.2f MiB)\n",
                    r.prompt_full_kv_bytes / 1048576.0, r.prompt_kv_bytes / 1048576.0,
                    (double) r.prompt_full_kv_bytes / std::max<size_t>(1, r.prompt_kv_bytes), (size_t) st.tokens_seen,
                    st.kv_bytes / 1048576.0);
        std::printf("prefill %.2f s (%.1f tok/s) | decode %d tokens, %.1f tok/s | %s\n", r.prefill_seconds,
                    prompt.size() / std::max(1e-9, r.prefill_seconds), r.new_tokens, r.decode_tokens_per_second,
                    engine.device_name().c_str());
    }
    return 0;
}

// Token ids of a text and the byte offset where each token's piece starts (the eval harness
// places needles and sizes prompts in tokens). The text is tokenized as given: no chat template.
int cmd_tokenize(int argc, char ** argv) {
    Args a(argc, argv, 2, { "--json" }, { "--model", "--prompt-file", "--prompt", "--threads", "--kv-pool-bytes" });
    const std::string          text = read_prompt(a);
    Engine                     engine(engine_options(a));
    const std::vector<int32_t> tokens = engine.model().tokenize(text, false);
    std::vector<long long>     offsets;
    long long                  at = 0;
    for (int32_t t : tokens) {
        offsets.push_back(at);
        at += (long long) engine.model().token_to_piece(t).size();
    }
    std::cout << json::Object().raw("tokens", json::array(tokens)).raw("offsets", json::array(offsets)).dump() << "\n";
    return 0;
}

// The methods and defaults the engine offers, without a model or a session: what serve's hello
// lists (with the built-in --chunk-size).
int cmd_methods(int argc, char ** argv) {
    Args            a(argc, argv, 2, { "--json" }, {});
    const mp::Value catalog = engine_catalog(kDefaultChunkSize);
    if (a.has("--json")) {
        std::cout << json::value(catalog) << "\n";
        return 0;
    }
    for (const Method * m : all_methods()) {
        std::printf("%-14s %s\n", m->name, m->description);
        std::printf("%-14s compresses %s, min budget %d (and > --window), scores: %s\n", "",
                    m->compresses ? "yes" : "no", m->min_budget,
                    m->needs_window_probs  ? "window"
                    : m->needs_accumulated ? "accumulated"
                                           : "none");
    }
    std::cout << "defaults: " << json::value(catalog.at("defaults")) << "\n";
    return 0;
}

void usage() {
    std::fprintf(
        stderr,
        "usage: pkv-engine <command> [options]\n"
        "  budgets  --layers L --prompt-len N [--budget B --window A --beta b --method M] [--json]\n"
        "  generate [--model M] [--method %s] [--budget 128] [--window 8] [--beta 20]\n"
        "           [--kernel-size 7] [--pooling maxpool|avgpool|none] [--head-aggregation mean|max]\n"
        "           (--prompt-file F | --prompt T) [--question Q] [--max-new-tokens N] [--no-chat-template]\n"
        "           [--temperature T --top-k K --top-p P --seed S] [--threads N] [--device auto|cpu|gpu] "
        "[--no-repack]\n"
        "           [--chunk-size %d (0 = one-shot)] [--kv-pool-bytes N] [--kv-type f16|q8_0|q4_0] [--ctx-size N]\n"
        "           [--dump-kept FILE] [--json]\n"
        "  tokenize (--prompt-file F | --prompt T) [--model M] --json   token ids and byte offsets\n"
        "  methods  [--json]   the compression methods, their traits and the defaults (no model needed)\n"
        "  bench    [--model M] [--threads N] [--repetitions R] [--prefill 512,4096] [--depths 0,2048,8192]\n"
        "           [--budgets 64,128,512] [--decode-tokens N] [--llama-bench PATH] [--no-repack] [--no-fuse]\n"
        "           [--no-graph-reuse] [--no-warmup] [--profile] [--json]\n"
        "  bench    --sessions 1,4,16,64 [--prompt-len 4096] [--methods full,pyramidkv] [--budget 128] "
        "[--llama-batched-bench PATH]\n"
        "  bench    --prefill-memory 2048,8192,32768 [--chunk-size N] [--budget 128]\n"
        "  bench    --pool-fit 1 [--prompt-len 8192] [--kv-pool-bytes 1073741824] [--budget 128]\n"
        "           (every bench also takes [--kv-type f16|q8_0|q4_0])\n"
        "  serve    --stdio [--model M] [--kv-pool-bytes N] [--kv-type f16|q8_0|q4_0] [--chunk-size N] [--ctx-size N]\n"
        "           [--threads N] [--device D] [--no-repack]\n",
        method_names_joined("|").c_str(), kDefaultChunkSize);
}

}  // namespace

int main(int argc, char ** argv) {
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);  // libllama chatter off
    if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
        usage();
        return argc < 2 ? 2 : 0;
    }
    const std::string cmd = argv[1];
    try {
        if (cmd == "budgets") return cmd_budgets(argc, argv);
        if (cmd == "generate") return cmd_generate(argc, argv);
        if (cmd == "bench") return cmd_bench(argc, argv);
        if (cmd == "serve") return cmd_serve(argc, argv);
        if (cmd == "tokenize") return cmd_tokenize(argc, argv);
        if (cmd == "methods") return cmd_methods(argc, argv);
        throw Error("command", "unknown command '" + cmd + "' (budgets, generate, bench, serve, tokenize, methods)");
    } catch (const Error & e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 2;
    } catch (const std::exception & e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
