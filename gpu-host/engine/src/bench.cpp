#include "bench.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "error.h"
#include "json.h"
#include "paths.h"
#include "profile.h"
#include "session.h"

namespace pkv {

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

double process_cpu_seconds() {
    timespec ts{};
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
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

// The exact prefill every row is measured against (FullKV) and the method the budget rows use.
CompressionParams exact_params() {
    CompressionParams p;
    p.method = exact_method().name;
    return p;
}

bool compresses(const std::string & method) { return find_method(method)->compresses; }

// "full", "pyramidkv@128": a method that does not compress has no budget to show.
std::string label(const std::string & method, int budget) {
    return compresses(method) ? method + "@" + std::to_string(budget) : method;
}

struct Row {
    std::string         test;    // "pp512", "tg32@d8192"
    std::string         method;  // the exact baseline, or the default method at a budget
    int                 budget            = 0;
    double              tokens_per_second = 0.0;  // median
    std::vector<double> samples;
    double              kv_mib                  = 0.0;
    double              llama_tokens_per_second = 0.0;  // llama-bench, same run (0 = not measured)
    // --profile: host phases summed over the measured samples, their wall time and step count
    profile::Totals prof;
    double          prof_wall  = 0.0;
    int             prof_steps = 0;
};

// Times the measured part of a row (one prefill, or n_gen decode steps) into its profile.
template <typename F> double profiled(Row & r, int steps, F && run) {
    const profile::Totals before = profile::totals();
    const auto            t0     = std::chrono::steady_clock::now();
    run();
    const double secs = seconds_since(t0);
    if (profile::enabled()) {
        const profile::Totals d = profile::totals() - before;
        for (int i = 0; i < profile::kPhases; ++i) r.prof.seconds[i] += d.seconds[i];
        r.prof.read_bytes += d.read_bytes;
        r.prof_wall += secs;
        r.prof_steps += steps;
    }
    return secs;
}

// Percent of the wall time per phase, "other" for the rest (bookkeeping outside the phases).
json::Object profile_json(const Row & r) {
    json::Object pct;
    double       sum = 0;
    for (int i = 0; i < profile::kPhases; ++i) {
        pct.num(profile::name((profile::Phase) i), 100.0 * r.prof.seconds[i] / r.prof_wall);
        sum += r.prof.seconds[i];
    }
    pct.num("other", 100.0 * (r.prof_wall - sum) / r.prof_wall);
    return json::Object()
        .integer("steps", r.prof_steps)
        .num("ms_per_step", 1000.0 * r.prof_wall / r.prof_steps)
        .num("read_bytes_per_step", (double) r.prof.read_bytes / r.prof_steps)
        .raw("percent", pct.dump());
}

// llama-bench -o csv: avg_ts per test, keyed like our rows ("pp512", "tg32@d8192").
std::map<std::string, double> run_llama_bench_once(const std::string & cmd) {
    std::fprintf(stderr, "[bench] %s\n", cmd.c_str());
    FILE * f = popen((cmd + " 2>/dev/null").c_str(), "r");
    if (!f) throw Error("--llama-bench", "cannot run '" + cmd + "'");
    std::map<std::string, int>    col;
    std::map<std::string, double> out;
    char                          line[8192];
    auto                          split = [](const std::string & s) {
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
            if (!col.count("avg_ts") || !col.count("n_prompt") || !col.count("n_gen")) {
                pclose(f);
                throw Error("--llama-bench", "unexpected output header");
            }
            continue;
        }
        const int pp = std::stoi(cells[col["n_prompt"]]), tg = std::stoi(cells[col["n_gen"]]);
        const int d = col.count("n_depth") ? std::stoi(cells[col["n_depth"]]) : 0;
        out[pp > 0 ? "pp" + std::to_string(pp) : "tg" + std::to_string(tg) + "@d" + std::to_string(d)] =
            std::stod(cells[col["avg_ts"]]);
    }
    if (pclose(f) != 0 && out.empty()) throw Error("--llama-bench", "'" + cmd + "' failed");
    return out;
}

std::string joined(const std::vector<int> & v) {
    std::string s;
    for (size_t i = 0; i < v.size(); ++i) s += (i ? "," : "") + std::to_string(v[i]);
    return s;
}

// Two runs: prefill from an empty cache, then generation at each depth (llama-bench would
// otherwise also run every prefill size at every depth).
std::map<std::string, double> run_llama_bench(const std::string & bin, const std::string & model, int threads, int reps,
                                              const std::vector<int> & prefill, const std::vector<int> & depths,
                                              int n_gen) {
    const std::string base =
        bin + " -m '" + model + "' -t " + std::to_string(threads) + " -r " + std::to_string(reps) + " -fa 1 -o csv";
    std::map<std::string, double> out = run_llama_bench_once(base + " -p " + joined(prefill) + " -n 0");
    for (const auto & kv : run_llama_bench_once(base + " -p 0 -n " + std::to_string(n_gen) + " -d " + joined(depths)))
        out.insert(kv);
    return out;
}

}  // namespace

namespace {

using Flags = std::map<std::string, std::string>;

std::string flag(const Flags & a, const std::string & k, const std::string & d) {
    auto it = a.find(k);
    return it == a.end() ? d : it->second;
}

// --kv-type: the storage type of every session a benchmark opens (default f16).
KvType bench_kv_type(const Flags & a) {
    KvType            t       = KvType::F16;
    const std::string problem = parse_kv_type(flag(a, "--kv-type", kv_type_name(t)), "--kv-type", t);
    if (!problem.empty()) throw Error("", problem);
    return t;
}

int default_threads() { return (int) std::max(1u, std::thread::hardware_concurrency()); }

// The engine options every benchmark takes from its flags (--model, --device, --kv-type and the
// A/B switches); the caller sizes the context and the pool.
EngineOptions bench_engine_options(const Flags & a, int threads) {
    EngineOptions eo;
    eo.model_path          = flag(a, "--model", default_model_path());
    eo.n_threads           = threads;
    eo.device              = flag(a, "--device", "auto");
    eo.kv_type             = bench_kv_type(a);
    eo.repack_weights      = !a.count("--no-repack");
    eo.fuse_projections    = !a.count("--no-fuse");
    eo.reuse_decode_graphs = !a.count("--no-graph-reuse");
    return eo;
}

long peak_rss_kib() {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_maxrss;
}

int bench_single(const Flags & a);
int bench_sessions(const Flags & a);
int bench_prefill_memory(const Flags & a);
int bench_pool_fit(const Flags & a);

}  // namespace

int cmd_bench(int argc, char ** argv) {
    Flags                          a;
    const std::vector<std::string> valued = { "--model",          "--threads",        "--repetitions",
                                              "--prefill",        "--depths",         "--budgets",
                                              "--decode-tokens",  "--llama-bench",    "--llama-batched-bench",
                                              "--device",         "--budget-depth",   "--sessions",
                                              "--prompt-len",     "--methods",        "--budget",
                                              "--prefill-memory", "--chunk-size",     "--kv-pool-bytes",
                                              "--pool-fit",       "--child",          "--decode-attention",
                                              "--kv-type",        "--prefill-budgets" };
    for (int i = 2; i < argc; ++i) {
        const std::string k = argv[i];
        if (k == "--json" || k == "--no-repack" || k == "--profile" || k == "--no-graph-reuse" || k == "--no-fuse" ||
            k == "--no-warmup") {
            a[k] = "1";
            continue;
        }
        if (std::find(valued.begin(), valued.end(), k) == valued.end()) throw Error(k, "unknown option");
        if (i + 1 >= argc) throw Error(k, "missing value");
        a[k] = argv[++i];
    }
    if (a.count("--sessions")) return bench_sessions(a);
    if (a.count("--prefill-memory")) return bench_prefill_memory(a);
    if (a.count("--pool-fit")) return bench_pool_fit(a);
    return bench_single(a);
}

namespace {

int bench_single(const Flags & a) {
    auto                   get          = [&](const std::string & k, const std::string & d) { return flag(a, k, d); };
    const std::vector<int> prefill      = int_list("--prefill", get("--prefill", "512,4096"), 1);
    const std::vector<int> depths       = int_list("--depths", get("--depths", "0,2048,8192"), 0);
    const std::vector<int> budgets      = int_list("--budgets", get("--budgets", "64,128,512"), 9);
    const int              budget_depth = int_list(
        "--budget-depth", get("--budget-depth", std::to_string(*std::max_element(depths.begin(), depths.end()))), 1)[0];
    const int              n_gen   = int_list("--decode-tokens", get("--decode-tokens", "32"), 1)[0];
    const int              reps    = int_list("--repetitions", get("--repetitions", "3"), 1)[0];
    const int              threads = int_list("--threads", get("--threads", std::to_string(default_threads())), 1)[0];
    const std::vector<int> prefill_budgets =
        a.count("--prefill-budgets") ? int_list("--prefill-budgets", a.at("--prefill-budgets"), 9) : std::vector<int>{};
    const int chunk = int_list("--chunk-size", get("--chunk-size", std::to_string(kDefaultChunkSize)), 0)[0];

    EngineOptions eo      = bench_engine_options(a, threads);
    int           longest = std::max(*std::max_element(prefill.begin(), prefill.end()), budget_depth);
    for (int d : depths) longest = std::max(longest, d);
    eo.n_ctx = longest + n_gen + 1;  // like llama-bench: the context is what the test needs
    {
        // The prefill rows one at a time; every depth's prefill, kept; one fork at a time.
        size_t tokens = longest + 128 + budget_depth + 128;
        for (int d : depths) tokens += d + 128;
        tokens += longest + n_gen + 128;
        eo.kv_pool_tokens = tokens;
    }
    Engine           engine(eo);
    const int        n_vocab = engine.config().n_vocab;
    std::vector<Row> rows;
    profile::enable(a.count("--profile") > 0);

    // As llama-bench: one unmeasured run of every prefill size, and one decode step of every
    // decode row, before the measured ones (the first graph of a shape allocates, the first touch
    // of a buffer faults its pages in); --no-warmup as llama-bench's.
    const bool warmup  = !a.count("--no-warmup");
    auto       warm_up = [&](const std::string & label, const std::function<void()> & run) {
        if (!warmup) return;
        std::fprintf(stderr, "[bench] warm-up %s\n", label.c_str());
        run();
    };
    for (int n : prefill) {
        Row r;
        r.test = "pp" + std::to_string(n), r.method = exact_method().name;
        const std::vector<int32_t> toks = random_tokens(n, n_vocab, 1234 + n);
        warm_up(r.test, [&] { Session(engine, exact_params()).prefill(toks); });
        for (int rep = 0; rep < reps; ++rep) {
            Session s(engine, exact_params());
            r.samples.push_back(n / profiled(r, 1, [&] { s.prefill(toks); }));
        }
        rows.push_back(r);
        std::fprintf(stderr, "[bench] %s %.1f tok/s\n", r.test.c_str(), median(r.samples));
    }
    // --prefill-budgets: the same prefills with the default method at each budget, in chunks of
    // --chunk-size (the serving default): each compression's window-score readback, pooling and
    // top-k and its gather are in the row (with --profile: the read and compress phases).
    for (int b : prefill_budgets) {
        CompressionParams p;
        p.budget = b;
        for (int n : prefill) {
            Row r;
            r.test = "pp" + std::to_string(n), r.method = p.method, r.budget = b;
            const std::vector<int32_t> toks = random_tokens(n, n_vocab, 1234 + n);
            warm_up(r.test + " " + p.method + "@" + std::to_string(b),
                    [&] { Session(engine, p, chunk).prefill(toks); });
            for (int rep = 0; rep < reps; ++rep) {
                Session s(engine, p, chunk);
                r.samples.push_back(n / profiled(r, 1, [&] { s.prefill(toks); }));
            }
            rows.push_back(r);
            std::fprintf(stderr, "[bench] %s %s@%d %.1f tok/s\n", r.test.c_str(), p.method.c_str(), b,
                         median(r.samples));
        }
    }
    // Decode rows: every depth is prefilled once (keeping its scores, so it can be forked), and
    // each repetition decodes n_gen tokens on a fresh fork of it, as llama-bench clears its cache
    // and refills the depth before each repetition: every sample runs at the row's depth, not
    // after the previous repetitions' tokens. The budget rows fork the prefill at --budget-depth
    // with their budget (which equals compressing it independently). Repetitions run round-robin
    // over the rows, so a slow phase of the machine hits every row alike; forks are not timed.
    struct DecodeRow {
        Row               row;
        const Session *   from = nullptr;
        CompressionParams params;
    };
    std::vector<DecodeRow>                decode;
    std::vector<std::unique_ptr<Session>> prefilled;
    auto                                  prefilled_at = [&](int depth) -> const Session * {
        for (auto & s : prefilled)
            if (s->stats().tokens_seen == std::max(depth, 1)) return s.get();
        auto s = std::make_unique<Session>(engine, exact_params());
        s->set_keep_scores(true);
        // llama-bench starts a generation at depth 0 from one token; our prefill needs >= 1 token.
        s->prefill(random_tokens(std::max(depth, 1), n_vocab, 99 + depth));
        prefilled.push_back(std::move(s));
        return prefilled.back().get();
    };
    auto add_row = [&](int depth, const CompressionParams & p) {
        DecodeRow d;
        d.row.test   = "tg" + std::to_string(n_gen) + "@d" + std::to_string(depth);
        d.row.method = p.method, d.row.budget = compresses(p.method) ? p.budget : 0;
        d.from = prefilled_at(depth), d.params = p;
        decode.push_back(std::move(d));
    };
    for (int d : depths) add_row(d, exact_params());
    for (int b : budgets) {
        CompressionParams p;  // the default method
        p.budget = b;
        add_row(budget_depth, p);
    }
    for (auto & d : decode)
        warm_up(d.row.test, [&] {
            std::unique_ptr<Session> s = d.from->fork(d.params);
            s->decode(argmax(s->logits()));
        });
    for (int rep = 0; rep < reps; ++rep) {
        for (auto & d : decode) {
            std::unique_ptr<Session> s = d.from->fork(d.params);
            s->reserve(n_gen);
            d.row.kv_mib = s->stats().kv_bytes / 1048576.0;
            int32_t tok  = argmax(s->logits());
            d.row.samples.push_back(n_gen / profiled(d.row, n_gen, [&] {
                                        for (int i = 0; i < n_gen; ++i) {
                                            s->decode(tok);
                                            tok = argmax(s->logits());
                                        }
                                    }));
        }
    }
    for (auto & d : decode) {
        std::fprintf(stderr, "[bench] %s %s%s %.1f tok/s\n", d.row.test.c_str(), d.row.method.c_str(),
                     d.row.budget ? ("@" + std::to_string(d.row.budget)).c_str() : "", median(d.row.samples));
        rows.push_back(d.row);
    }
    for (auto & r : rows) r.tokens_per_second = median(r.samples);

    if (a.count("--llama-bench")) {
        const auto ref = run_llama_bench(a.at("--llama-bench"), eo.model_path, threads, reps, prefill, depths, n_gen);
        for (auto & r : rows) {
            if (!compresses(r.method) && ref.count(r.test)) r.llama_tokens_per_second = ref.at(r.test);
        }
    }

    std::map<std::string, double> full_at;
    for (const auto & r : rows)
        if (!compresses(r.method)) full_at[r.test] = r.tokens_per_second;
    if (a.count("--json")) {
        std::vector<std::string> items;
        for (const auto & r : rows) {
            json::Object o;
            o.str("test", r.test)
                .str("method", r.method)
                .integer("budget", r.budget)
                .num("tokens_per_second", r.tokens_per_second);
            std::vector<std::string> samples;
            for (double x : r.samples) samples.push_back(json::number(x));
            o.raw("samples", json::array(samples)).num("kv_mib", r.kv_mib);
            if (r.llama_tokens_per_second > 0) o.num("llama_cpp_tokens_per_second", r.llama_tokens_per_second);
            if (compresses(r.method) && full_at.count(r.test))
                o.num("speedup_vs_full", r.tokens_per_second / full_at[r.test]);
            if (r.prof_steps > 0) o.raw("profile", profile_json(r).dump());
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
    std::printf("model %s | %s | %d threads | median of %d\n", eo.model_path.c_str(), engine.device_name().c_str(),
                threads, reps);
    std::printf("%-14s %-16s %12s %10s %14s %10s\n", "test", "method", "tok/s", "KV MiB", "llama.cpp", "ratio");
    for (const auto & r : rows) {
        std::string m       = label(r.method, r.budget);
        char        ref[32] = "-", ratio[32] = "-";
        if (r.llama_tokens_per_second > 0) {
            std::snprintf(ref, sizeof(ref), "%.1f", r.llama_tokens_per_second);
            std::snprintf(ratio, sizeof(ratio), "%.2fx", r.tokens_per_second / r.llama_tokens_per_second);
        } else if (compresses(r.method) && full_at.count(r.test)) {
            std::snprintf(ratio, sizeof(ratio), "%.2fx full", r.tokens_per_second / full_at[r.test]);
        }
        std::printf("%-14s %-16s %12.1f %10.2f %14s %10s\n", r.test.c_str(), m.c_str(), r.tokens_per_second, r.kv_mib,
                    ref, ratio);
    }
    if (profile::enabled()) {
        std::printf("\nhost profile: %% of each step's wall time (a step: one prefill, or one decode token)\n");
        std::printf("%-14s %-16s %9s", "test", "method", "ms/step");
        for (int i = 0; i < profile::kPhases; ++i) std::printf(" %8s", profile::name((profile::Phase) i));
        std::printf(" %8s %14s\n", "other", "read KiB/step");
        for (const auto & r : rows) {
            if (r.prof_steps == 0) continue;
            double sum = 0;
            std::printf("%-14s %-16s %9.3f", r.test.c_str(), label(r.method, r.budget).c_str(),
                        1000.0 * r.prof_wall / r.prof_steps);
            for (int i = 0; i < profile::kPhases; ++i) {
                std::printf(" %7.2f%%", 100.0 * r.prof.seconds[i] / r.prof_wall);
                sum += r.prof.seconds[i];
            }
            std::printf(" %7.2f%% %14.1f\n", 100.0 * (r.prof_wall - sum) / r.prof_wall,
                        r.prof.read_bytes / 1024.0 / r.prof_steps);
        }
    }
    return 0;
}

// Aggregate decode speed of N concurrent sessions sharing one prefill of --prompt-len random
// tokens (forked, so the prompt is computed once, like llama-batched-bench -pps), per method.
int bench_sessions(const Flags & a) {
    const std::vector<int> counts = int_list("--sessions", flag(a, "--sessions", "1,4,16,64"), 1);
    const int              n      = int_list("--prompt-len", flag(a, "--prompt-len", "4096"), 16)[0];
    const int              n_gen  = int_list("--decode-tokens", flag(a, "--decode-tokens", "32"), 1)[0];
    const int              budget = int_list("--budget", flag(a, "--budget", "128"), 9)[0];
    const int threads = int_list("--threads", flag(a, "--threads", std::to_string(default_threads())), 1)[0];
    const int reps    = int_list("--repetitions", flag(a, "--repetitions", "1"), 1)[0];
    // --decode-attention both: the batched layout and the per-session one of 0.6, interleaved in
    // one run (the before/after of docs/BENCHMARKS.md).
    std::vector<DecodeAttention> layouts;
    {
        const std::string l = flag(a, "--decode-attention", "auto");
        if (l == "auto") layouts.push_back(DecodeAttention::automatic);
        if (l == "batched" || l == "both") layouts.push_back(DecodeAttention::batched);
        if (l == "per-session" || l == "both") layouts.push_back(DecodeAttention::per_session);
        if (layouts.empty())
            throw Error("--decode-attention", "'" + l + "' is not one of auto, batched, per-session, both");
    }
    auto layout_name = [](DecodeAttention l) { return l == DecodeAttention::batched ? "batched" : "per-session"; };
    std::vector<std::string> methods;
    {
        std::stringstream ss(flag(a, "--methods", std::string(exact_method().name) + "," + CompressionParams{}.method));
        for (std::string m; std::getline(ss, m, ',');) {
            if (!find_method(m))
                throw Error("--methods", "unknown method '" + m + "' (accepted: " + method_names_joined() + ")");
            methods.push_back(m);
        }
    }
    const int     most = *std::max_element(counts.begin(), counts.end());
    EngineOptions eo   = bench_engine_options(a, threads);
    eo.n_ctx           = n + n_gen + 1;
    eo.kv_pool_bytes   = a.count("--kv-pool-bytes") ? std::stoull(a.at("--kv-pool-bytes")) : 0;
    // FullKV for every session plus the source prefill, with page and growth slack.
    eo.kv_pool_tokens = (size_t) (most + 1) * (n + n / 8 + n_gen + 128);
    Engine engine(eo);
    for (DecodeAttention & l : layouts) {  // auto: the layout the engine picked for its backend
        if (l == DecodeAttention::automatic) l = engine.options().decode_attention;
    }
    std::fprintf(stderr, "[bench] pool %.2f GiB, prefill %d tokens once\n",
                 engine.pool().capacity_bytes() / 1073741824.0, n);
    Session source(engine, exact_params());
    source.set_keep_scores(true);
    source.prefill(random_tokens(n, engine.config().n_vocab, 7));

    struct Result {
        std::string         method;
        int                 sessions;
        double              tokens_per_second, kv_mib_per_session;  // median of the repetitions
        DecodeAttention     layout;
        Engine::GraphStats  graph;  // of the last decode step
        std::vector<double> samples;
        // The same per second of the process's CPU time: on a machine other processes share, wall
        // time measures them too (meaningful with --threads 1: ggml's threads spin at barriers).
        double              cpu_tokens_per_second = 0.0;
        std::vector<double> cpu_samples;
    };
    std::vector<Result> results;
    for (const std::string & m : methods) {
        CompressionParams p;
        p.method = m;
        p.budget = budget;
        for (int count : counts) {
            const size_t first = results.size();
            for (DecodeAttention l : layouts) results.push_back({ m, count, 0.0, 0.0, l, {}, {}, 0.0, {} });
            // Repetitions round-robin over the layouts, each on fresh forks (the same KV lengths).
            for (int rep = 0; rep < reps; ++rep) {
                for (size_t li = 0; li < layouts.size(); ++li) {
                    Result & r = results[first + li];
                    engine.set_decode_attention(r.layout);
                    std::vector<std::unique_ptr<Session>> sessions;
                    for (int i = 0; i < count; ++i) sessions.push_back(source.fork(p));
                    std::vector<Session *> ptrs;
                    std::vector<int32_t>   toks;
                    for (auto & s : sessions) ptrs.push_back(s.get()), toks.push_back(argmax(s->logits()));
                    r.kv_mib_per_session = sessions[0]->stats().kv_bytes / 1048576.0;
                    const auto   t0      = std::chrono::steady_clock::now();
                    const double cpu0    = process_cpu_seconds();
                    for (int step = 0; step < n_gen; ++step) {
                        engine.decode_batch(ptrs, toks);
                        for (size_t i = 0; i < ptrs.size(); ++i) toks[i] = argmax(ptrs[i]->logits());
                    }
                    r.samples.push_back(count * n_gen / seconds_since(t0));
                    r.cpu_samples.push_back(count * n_gen / (process_cpu_seconds() - cpu0));
                    r.graph = engine.last_graph();
                }
            }
            for (size_t li = 0; li < layouts.size(); ++li) {
                Result & r              = results[first + li];
                r.tokens_per_second     = median(r.samples);
                r.cpu_tokens_per_second = median(r.cpu_samples);
                std::fprintf(stderr, "[bench] %s x%d (%s attention): %.1f tok/s aggregate, %d nodes, %d attention\n",
                             m.c_str(), count, layout_name(r.layout), r.tokens_per_second, r.graph.nodes,
                             r.graph.attention_nodes);
            }
        }
    }
    std::map<int, double> llama;
    if (a.count("--llama-batched-bench")) {
        std::string cmd = a.at("--llama-batched-bench") + " -m '" + eo.model_path + "' -t " + std::to_string(threads) +
                          " -fa 1 -pps -npp " + std::to_string(n) + " -ntg " + std::to_string(n_gen) + " -c " +
                          std::to_string((n + n_gen) * (most + 1)) + " -npl ";
        for (size_t i = 0; i < counts.size(); ++i) cmd += (i ? "," : "") + std::to_string(counts[i]);
        cmd += " --output-format jsonl 2>/dev/null";
        std::fprintf(stderr, "[bench] %s\n", cmd.c_str());
        if (FILE * f = popen(cmd.c_str(), "r")) {
            char line[4096];
            while (std::fgets(line, sizeof(line), f)) {
                // {"n_kv_max": …, "pl": 4, …, "speed_tg": 73.2, …}
                const char * pl = std::strstr(line, "\"pl\": ");
                const char * tg = std::strstr(line, "\"speed_tg\": ");
                if (pl && tg) llama[std::atoi(pl + 6)] = std::atof(tg + 12);
            }
            pclose(f);
        }
    }
    if (a.count("--json")) {
        std::vector<std::string> items;
        for (const auto & r : results) {
            json::Object o;
            o.str("method", r.method)
                .integer("sessions", r.sessions)
                .num("tokens_per_second", r.tokens_per_second)
                .num("kv_mib_per_session", r.kv_mib_per_session)
                .str("decode_attention", layout_name(r.layout))
                .integer("graph_nodes", r.graph.nodes)
                .integer("attention_nodes", r.graph.attention_nodes);
            std::vector<std::string> samples;
            for (double x : r.samples) samples.push_back(json::number(x));
            o.raw("samples", json::array(samples)).num("cpu_tokens_per_second", r.cpu_tokens_per_second);
            if (llama.count(r.sessions)) o.num("llama_cpp_tokens_per_second", llama[r.sessions]);
            items.push_back(o.dump());
        }
        std::cout << json::Object()
                         .integer("prompt_tokens", n)
                         .integer("decode_tokens", n_gen)
                         .integer("threads", threads)
                         .integer("repetitions", reps)
                         .str("device", engine.device_name())
                         .raw("results", json::array(items))
                         .dump()
                  << "\n";
        return 0;
    }
    std::printf("aggregate decode: %d sessions sharing a %d-token prefill, %d tokens each | %s | %d threads\n", most, n,
                n_gen, engine.device_name().c_str(), threads);
    std::printf("%-14s %9s %14s %16s %18s %12s %12s %16s\n", "method", "sessions", "tok/s (sum)", "KV MiB/session",
                "llama-batched-bench", "attention", "nodes/step", "attention nodes");
    for (const auto & r : results) {
        std::printf("%-14s %9d %14.1f %16.2f %18s %12s %12d %16d\n", label(r.method, budget).c_str(), r.sessions,
                    r.tokens_per_second, r.kv_mib_per_session,
                    llama.count(r.sessions) && !compresses(r.method) ? json::number(llama[r.sessions]).c_str() : "-",
                    layout_name(r.layout), r.graph.nodes, r.graph.attention_nodes);
    }
    return 0;
}

// Peak RSS of one session prefilling N random tokens with chunked prefill. Each length runs in
// a child process (peak RSS is per process), so one command yields the whole table.
int bench_prefill_memory(const Flags & a) {
    const std::vector<int> lengths = int_list("--prefill-memory", flag(a, "--prefill-memory", "2048,8192,32768"), 16);
    const int              chunk   = int_list("--chunk-size", flag(a, "--chunk-size", "1024"), 0)[0];
    const int              budget  = int_list("--budget", flag(a, "--budget", "128"), 9)[0];
    const std::string      model   = flag(a, "--model", default_model_path());
    const int threads = int_list("--threads", flag(a, "--threads", std::to_string(default_threads())), 1)[0];
    if (lengths.size() > 1 || !a.count("--child")) {
        std::printf("peak RSS of one %s session prefilling N tokens, chunk %d | model %s\n",
                    label(CompressionParams{}.method, budget).c_str(), chunk, model.c_str());
        std::printf("%10s %12s %12s %14s\n", "tokens", "peak MiB", "seconds", "KV MiB after");
        for (int n : lengths) {
            char          exe[4096];
            const ssize_t len = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
            if (len <= 0) throw Error("bench", "cannot locate the engine binary");
            const std::string cmd = std::string(exe, len) + " bench --prefill-memory " + std::to_string(n) +
                                    " --chunk-size " + std::to_string(chunk) + " --budget " + std::to_string(budget) +
                                    " --model '" + model + "' --threads " + std::to_string(threads) +
                                    (a.count("--no-repack") ? " --no-repack" : "") +
                                    (a.count("--no-fuse") ? " --no-fuse" : "") + " --child 1 2>/dev/null";
            FILE *            f   = popen(cmd.c_str(), "r");
            char              line[512] = "";
            if (f) {
                if (!std::fgets(line, sizeof(line), f)) line[0] = 0;
                pclose(f);
            }
            std::printf("%10d %s", n, line[0] ? line : "  (failed)\n");
            std::fflush(stdout);
        }
        return 0;
    }
    const int     n  = lengths[0];
    EngineOptions eo = bench_engine_options(a, threads);
    eo.n_ctx         = n + 1;
    // budget + chunk per layer, plus page and growth slack: the bound chunked prefill promises
    // (the largest pyramid layer keeps up to 2 × budget)
    eo.kv_pool_tokens = (size_t) (chunk > 0 ? 2 * budget + chunk + eo.n_ubatch : n) + 256;
    Engine            engine(eo);
    CompressionParams p;  // the default method
    p.budget = budget;
    Session    s(engine, p, chunk);
    const auto t0 = std::chrono::steady_clock::now();
    s.prefill(random_tokens(n, engine.config().n_vocab, 11));
    std::printf("%12.1f %12.1f %14.2f\n", peak_rss_kib() / 1024.0, seconds_since(t0), s.stats().kv_bytes / 1048576.0);
    return 0;
}

// How many sessions of --prompt-len tokens fit in a --kv-pool-bytes pool (default 1 GiB),
// FullKV vs pyramidkv@budget: sessions are forked from one prefill until the pool refuses.
int bench_pool_fit(const Flags & a) {
    const int     n      = int_list("--prompt-len", flag(a, "--prompt-len", "8192"), 16)[0];
    const int     budget = int_list("--budget", flag(a, "--budget", "128"), 9)[0];
    const size_t  pool   = a.count("--kv-pool-bytes") ? std::stoull(a.at("--kv-pool-bytes")) : (size_t) 1 << 30;
    EngineOptions eo =
        bench_engine_options(a, int_list("--threads", flag(a, "--threads", std::to_string(default_threads())), 1)[0]);
    eo.n_ctx         = n + 1;
    eo.kv_pool_bytes = pool;
    Engine  engine(eo);
    Session source(engine, exact_params());
    source.set_keep_scores(true);
    source.prefill(random_tokens(n, engine.config().n_vocab, 5));
    const size_t source_bytes = source.stats().pool_bytes;
    std::printf(
        "sessions of %d tokens in a %.2f GiB KV pool (the source prefill's %.1f MiB counted as free), KV type %s | "
        "%s\n",
        n, pool / 1073741824.0, source_bytes / 1048576.0, kv_type_name(eo.kv_type), eo.model_path.c_str());
    std::vector<std::pair<std::string, int>> fits;
    for (const std::string & m : { std::string(exact_method().name), CompressionParams{}.method }) {
        CompressionParams p;
        p.method = m;
        p.budget = budget;
        std::vector<std::unique_ptr<Session>> held;
        try {
            for (;;) held.push_back(source.fork(p));
        } catch (const Error &) {
            // the pool refused: `held` is what fits beside the source
        }
        // The source occupies pool space too; count how many more sessions its pages would hold.
        const size_t per  = held.empty() ? source_bytes : held[0]->stats().pool_bytes;
        const int    more = per ? (int) (source_bytes / per) : 0;
        fits.emplace_back(m, (int) held.size() + more);
        std::printf("%-14s %8d sessions  (%.2f MiB of pool each)\n", label(m, budget).c_str(), fits.back().second,
                    per / 1048576.0);
    }
    if (fits[0].second > 0)
        std::printf("ratio: %.1fx more sessions with %s\n", (double) fits[1].second / fits[0].second,
                    label(fits[1].first, budget).c_str());
    return 0;
}

}  // namespace

}  // namespace pkv
