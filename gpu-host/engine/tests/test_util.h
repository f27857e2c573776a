// Shared helpers for the engine tests: paths, the embedded model, running the CLI.
#pragma once

#include <gtest/gtest.h>

#include <sys/wait.h>
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "session.h"

namespace pkv::test {

inline std::string repo_root() { return PKV_REPO_ROOT; }
inline std::string embedded_model() { return repo_root() + "/models/SmolLM2-135M-Instruct.Q4_1.gguf"; }
// The project's test data sits beside the repository (../shared/data); PKV_SHARED_DATA overrides.
inline std::string shared_data() {
    const char * dir = std::getenv("PKV_SHARED_DATA");
    return dir != nullptr && *dir != '\0' ? std::string(dir) : repo_root() + "/../shared/data";
}

inline std::string read_file(const std::string & path) {
    std::ifstream     in(path, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

// The first `chars` characters of the needle-haystack essays: real English text for prompts.
inline std::string essay_text(size_t chars) {
    std::string text = read_file(shared_data() + "/haystack/paul_graham_essays/addiction.txt") +
                       read_file(shared_data() + "/haystack/paul_graham_essays/avg.txt") +
                       read_file(shared_data() + "/haystack/paul_graham_essays/founders.txt");
    if (text.empty()) {
        throw std::runtime_error(
            "test data missing: no essays under " + shared_data() +
            "/haystack/paul_graham_essays (clone the repository beside shared/, or set PKV_SHARED_DATA)");
    }
    return text.substr(0, std::min(chars, text.size()));
}

// Bytes as space-separated lowercase hex pairs ("81 a1 61 01"), for byte-level expectations.
inline std::string hex(const std::string & bytes) {
    static const char * d = "0123456789abcdef";
    std::string         out;
    for (unsigned char c : bytes) {
        if (!out.empty()) out += ' ';
        out += d[c >> 4];
        out += d[c & 15];
    }
    return out;
}

struct CliResult {
    int         exit_code = -1;
    std::string out, err;
};

// Runs `binary args…` through the shell, capturing stdout and stderr separately.
inline CliResult run_cli(const std::string & binary, const std::string & args) {
    const std::string err_path = testing::TempDir() + "pkv_cli_stderr.txt";
    const std::string cmd      = binary + " " + args + " 2>" + err_path;
    CliResult         r;
    FILE *            p = popen(cmd.c_str(), "r");
    if (!p) return r;
    std::array<char, 4096> buf;
    size_t                 n;
    while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
    const int status = pclose(p);
    r.exit_code      = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    r.err            = read_file(err_path);
    return r;
}

// A random-weight GGUF from pkv-make-gguf `flags`, with the embedded model's tokenizer, in the test
// temp dir as `pkv_<name>.gguf`.
inline std::string make_random_gguf(const std::string & name, const std::string & flags) {
    const std::string path = testing::TempDir() + "pkv_" + name + ".gguf";
    const CliResult   made = run_cli(PKV_MAKE_GGUF_BIN, flags + " --out " + path + " --vocab-from " + embedded_model());
    EXPECT_EQ(made.exit_code, 0) << made.err;
    return path;
}

inline int count_lines(const std::string & s) {
    int n = 0;
    for (char c : s) n += c == '\n';
    return n + (!s.empty() && s.back() != '\n');
}

// Comparing logit rows (see docs/ENGINE.md, "Tests on any CPU", for which comparisons are exact).
inline float max_abs_diff(const std::vector<float> & a, const std::vector<float> & b) {
    EXPECT_EQ(a.size(), b.size());
    float m = 0.0f;
    for (size_t i = 0; i < std::min(a.size(), b.size()); ++i) m = std::max(m, std::fabs(a[i] - b[i]));
    return m;
}

inline float logit_range(const std::vector<float> & a) {
    auto [lo, hi] = std::minmax_element(a.begin(), a.end());
    return *hi - *lo;
}

// Top logit minus the runner-up: the greedy choice cannot flip under a perturbation of every
// logit by less than half of it.
inline float top2_margin(const std::vector<float> & l) {
    std::vector<float> c = l;
    std::partial_sort(c.begin(), c.begin() + 2, c.end(), std::greater<float>());
    return c[0] - c[1];
}

// One Engine per (model path, threads) for the whole test binary (loading is the slow part).
// n_threads 0: all cores.
inline Engine & engine_for(const std::string & model_path, int n_threads = 0) {
    static std::vector<std::pair<std::string, std::unique_ptr<Engine>>> engines;
    const std::string key = model_path + "#" + std::to_string(n_threads);
    for (auto & [k, e] : engines) {
        if (k == key) return *e;
    }
    EngineOptions o;
    o.model_path = model_path;
    o.device     = "cpu";
    o.n_threads  = n_threads;
    engines.emplace_back(key, std::make_unique<Engine>(o));
    return *engines.back().second;
}

}  // namespace pkv::test
