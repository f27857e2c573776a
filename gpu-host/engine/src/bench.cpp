#include "bench.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "engine.h"
#include "error.h"
#include "json.h"
#include "paths.h"

namespace pkv {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    const size_t n = v.size();
    return n == 0 ? 0.0 : (n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]));
}

std::vector<int> int_list(const std::string & flag, const std::string & s, int lo) {
    std::vector<int>  out;
    std::stringstream ss(s);
    std::string       item;
    while (std::getline(ss, item, ',')) {
        char *     end = nullptr;
        const long v   = std::strtol(item.c_str(), &end, 10);
        if (item.empty() || *end || v < lo || v > (1 << 24)) {
            throw Error(flag, "'" + item + "' is not an integer in [" + std::to_string(lo) + ", 16777216]");
        }
        out.push_back((int) v);
    }
    return out;
}

std::vector<int32_t> random_tokens(int n, int n_vocab, uint32_t seed) {
    std::mt19937         rng(seed);
    std::vector<int32_t> t(n);
    for (auto & x : t) x = (int32_t) (rng() % (uint32_t) n_vocab);
    return t;
}

struct Row {
    std::string test;    // "pp512", "tg32@d8192"
    std::string method;  // full / pyramidkv
    int         budget = 0;
    double      tokens_per_second = 0.0;  // median
    std::vector<double> samples;
    double      kv_mib = 0.0;
    double      llama_tokens_per_second = 0.0;  // llama-bench, same run (0 = not measured)
};

// llama-bench -o csv: pick avg_ts per (n_prompt, n_gen, n_depth).
std::map<std::string, double> run_llama_bench(const std::string & bin, const std::string & model, int threads, int reps,
                                              const std::vector<int> & prefill, const std::vector<int> & depths, int n_gen) {
    std::string cmd = bin + " -m '" + model + "' -t " + std::to_string(threads) + " -r " + std::to_string(reps) +
                      " -fa 1 -o csv -p ";
    for (size_t i = 0; i < prefill.size(); ++i) cmd += (i ? "," : "") + std::to_string(prefill[i]);
    cmd += " -n " + std::to_string(n_gen) + " -d ";
    for (size_t i = 0; i < depths.size(); ++i) cmd += (i ? "," : "") + std::to_string(depths[i]);
    cmd += " 2>/dev/null";
    std::fprintf(stderr, "[bench] %s\n", cmd.c_str());
    FILE * f = popen(cmd.c_str(), "r");
    if (!f) throw Error("--llama-bench", "cannot run '" + bin + "'");
    std::map<std::string, int>    col;
    std::map<std::string, double> out;
    char                          line[8192];
    auto split = [](const std::string & s) {
        std::vector<std::string> v;
        std::string              cur;
        bool                     quoted = false;
        for (char ch : s) {
            if (ch == '"') quoted = !quoted;
            else if (ch == ',' && !quoted) v.push_back(cur), cur.clear();
            else if (ch != '\n' && ch != '\r') cur += ch;
        }
        v.push_back(cur);
        return v;
    };
    while (std::fgets(line, sizeof(line), f)) {
        const std::vector<std::string> cells = split(line);
        if (col.empty()) {
            for (size_t i = 0; i < cells.size(); ++i) col[cells[i]] = (int) i;
            if (!col.count("avg_ts") || !col.count("n_prompt")) throw Error("--llama-bench", "unexpected output header");
            continue;
        }
        const int pp = std::stoi(cells[col["n_prompt"]]), tg = std::stoi(cells[col["n_gen"]]);
        const int d  = col.count("n_depth") ? std::stoi(cells[col["n_depth"]]) : 0;
        const std::string key = pp > 0 ? "pp" + std::to_string(pp) : "tg" + std::to_string(tg) + "@d" + std::to_string(d);
        out[key] = std::stod(cells[col["avg_ts"]]);
    }
    if (pclose(f) != 0 && out.empty()) throw Error("--llama-bench", "'" + bin + "' failed");
    return out;
}

}  // namespace

int cmd_bench(int argc, char ** argv) {
    std::map<std::string, std::string> a;
    const std::vector<std::string>     valued = { "--model", "--threads", "--repetitions", "--prefill", "--depths",
                                                  "--budgets", "--decode-tokens", "--llama-bench", "--device", "--budget-depth" };
    for (int i = 2; i < argc; ++i) {
        const std::string k = argv[i];
        if (k == "--json") { a[k] = "1"; continue; }
        if (std::find(valued.begin(), valued.end(), k) == valued.end()) throw Error(k, "unknown option");
        if (i + 1 >= argc) throw Error(k, "missing value");
        a[k] = argv[++i];
    }
    auto get = [&](const std::string & k, const std::string & d) { return a.count(k) ? a[k] : d; };
    const std::vector<int> prefill  = int_list("--prefill", get("--prefill", "512,4096"), 1);
    const std::vector<int> depths   = int_list("--depths", get("--depths", "0,2048,8192"), 0);
    const std::vector<int> budgets  = int_list("--budgets", get("--budgets", "64,128,512"), 9);
    const int budget_depth = int_list("--budget-depth", get("--budget-depth", std::to_string(*std::max_element(depths.begin(), depths.end()))), 1)[0];
    const int n_gen  = int_list("--decode-tokens", get("--decode-tokens", "32"), 1)[0];
    const int reps   = int_list("--repetitions", get("--repetitions", "3"), 1)[0];
    const int threads = int_list("--threads", get("--threads", std::to_string(std::max(1u, std::thread::hardware_concurrency()))), 1)[0];

    EngineOptions eo;
    eo.model_path = get("--model", default_model_path());
    eo.n_threads  = threads;
    eo.device     = get("--device", "auto");
    int longest   = std::max(*std::max_element(prefill.begin(), prefill.end()), budget_depth);
    for (int d : depths) longest = std::max(longest, d);
    eo.n_ctx = longest + n_gen * reps + 1;  // like llama-bench: the context is what the test needs
    Engine engine(eo);
    const int n_vocab = engine.config().n_vocab;
    std::vector<Row> rows;

    for (int n : prefill) {
        Row r;
        r.test = "pp" + std::to_string(n), r.method = "full";
        const std::vector<int32_t> toks = random_tokens(n, n_vocab, 1234 + n);
        for (int rep = 0; rep < reps; ++rep) {
            Session s(engine, CompressionParams{ "full" });
            const auto t0 = std::chrono::steady_clock::now();
            s.prefill(toks);
            r.samples.push_back(n / seconds_since(t0));
        }
        rows.push_back(r);
        std::fprintf(stderr, "[bench] %s %.1f tok/s\n", r.test.c_str(), median(r.samples));
    }
    auto decode_row = [&](int depth, const CompressionParams & p) {
        Row r;
        r.test = "tg" + std::to_string(n_gen) + "@d" + std::to_string(depth), r.method = p.method, r.budget = p.method == "full" ? 0 : p.budget;
        Session s(engine, p);
        // llama-bench starts a generation at depth 0 from one token; our prefill needs >= 1 token.
        s.prefill(random_tokens(std::max(depth, 1), n_vocab, 99 + depth));
        r.kv_mib = s.stats().kv_bytes / 1048576.0;
        s.reserve(n_gen * reps);
        int32_t tok = argmax(s.logits());
        for (int rep = 0; rep < reps; ++rep) {
            const auto t0 = std::chrono::steady_clock::now();
            for (int i = 0; i < n_gen; ++i) {
                s.decode(tok);
                tok = argmax(s.logits());
            }
            r.samples.push_back(n_gen / seconds_since(t0));
        }
        std::fprintf(stderr, "[bench] %s %s%s %.1f tok/s\n", r.test.c_str(), r.method.c_str(),
                     r.budget ? ("@" + std::to_string(r.budget)).c_str() : "", median(r.samples));
        return r;
    };
    for (int d : depths) rows.push_back(decode_row(d, CompressionParams{ "full" }));
    for (int b : budgets) {
        CompressionParams p;
        p.method = "pyramidkv";
        p.budget = b;
        rows.push_back(decode_row(budget_depth, p));
    }
    for (auto & r : rows) r.tokens_per_second = median(r.samples);

    if (a.count("--llama-bench")) {
        const auto ref = run_llama_bench(a["--llama-bench"], eo.model_path, threads, reps, prefill, depths, n_gen);
        for (auto & r : rows) {
            if (r.method == "full" && ref.count(r.test)) r.llama_tokens_per_second = ref.at(r.test);
        }
    }

    std::map<std::string, double> full_at;
    for (const auto & r : rows) if (r.method == "full") full_at[r.test] = r.tokens_per_second;
    if (a.count("--json")) {
        std::vector<std::string> items;
        for (const auto & r : rows) {
            json::Object o;
            o.str("test", r.test).str("method", r.method).integer("budget", r.budget).num("tokens_per_second", r.tokens_per_second);
            std::vector<std::string> samples;
            for (double x : r.samples) samples.push_back(json::number(x));
            o.raw("samples", json::array(samples)).num("kv_mib", r.kv_mib);
            if (r.llama_tokens_per_second > 0) o.num("llama_cpp_tokens_per_second", r.llama_tokens_per_second);
            if (r.method != "full" && full_at.count(r.test)) o.num("speedup_vs_full", r.tokens_per_second / full_at[r.test]);
            items.push_back(o.dump());
        }
        std::cout << json::Object()
                         .str("model", eo.model_path.substr(eo.model_path.find_last_of('/') + 1))
                         .str("device", engine.device_name())
                         .integer("threads", threads)
                         .integer("repetitions", reps)
                         .raw("results", json::array(items))
                         .dump()
                  << "\n";
        return 0;
    }
    std::printf("model %s | %s | %d threads | median of %d\n", eo.model_path.c_str(), engine.device_name().c_str(), threads, reps);
    std::printf("%-14s %-16s %12s %10s %14s %10s\n", "test", "method", "tok/s", "KV MiB", "llama.cpp", "ratio");
    for (const auto & r : rows) {
        std::string m = r.method + (r.budget ? "@" + std::to_string(r.budget) : "");
        char        ref[32] = "-", ratio[32] = "-";
        if (r.llama_tokens_per_second > 0) {
            std::snprintf(ref, sizeof(ref), "%.1f", r.llama_tokens_per_second);
            std::snprintf(ratio, sizeof(ratio), "%.2fx", r.tokens_per_second / r.llama_tokens_per_second);
        } else if (r.method != "full" && full_at.count(r.test)) {
            std::snprintf(ratio, sizeof(ratio), "%.2fx full", r.tokens_per_second / full_at[r.test]);
        }
        std::printf("%-14s %-16s %12.1f %10.2f %14s %10s\n", r.test.c_str(), m.c_str(), r.tokens_per_second, r.kv_mib, ref, ratio);
    }
    return 0;
}

}  // namespace pkv
