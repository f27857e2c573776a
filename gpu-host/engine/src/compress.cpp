// What the compression methods share (docs/DESIGN.md §2): the registry, budgets, scoring, pooling,
// top-k, validation. Budgets and selection are pure functions of the attention statistics the
// engine hands over, so they are tested without a model. The methods themselves: methods/*.cpp.
#include "compress.h"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "methods/methods.h"

namespace pkv {

// ---------------------------------------------------------------------------------------------
// Budgets
// ---------------------------------------------------------------------------------------------

std::vector<int> pyramid_budgets(int n_layers, int budget, int n, int window, int beta) {
    if (n_layers <= 0) {
        return {};
    }
    n = std::max(n, 0);
    // 64-bit intermediates: budget and window come from the command line.
    const int64_t B     = budget;
    const int64_t alpha = window;
    if (n < B) {
        return std::vector<int>(n_layers, n);
    }
    if (n < 2 * (B - alpha)) {
        return std::vector<int>(n_layers, budget);
    }
    // Transcribed from the official implementation, including its floored `steps`: the mean over
    // layers can exceed B slightly, and that is what the published numbers were measured with.
    int64_t lo = (B - alpha) / std::max(beta, 1);
    int64_t hi = 2 * (B - alpha) - lo;
    if (hi >= n - alpha) {
        hi = n - alpha;
        lo = 2 * (B - alpha) - hi;
    }
    const int64_t    steps = n_layers > 1 ? (hi - lo) / (n_layers - 1) : 0;
    std::vector<int> out(n_layers);
    for (int l = 0; l < n_layers; ++l) {
        out[l] = static_cast<int>(hi - l * steps + alpha);
    }
    return out;
}

std::vector<int> uniform_budgets(int n_layers, int budget, int n) {
    return std::vector<int>(std::max(n_layers, 0), std::max(0, std::min(n, budget)));
}

std::vector<int> uniform_layer_budgets(int n_layers, int n, const CompressionParams & p) {
    return uniform_budgets(n_layers, p.budget, n);
}

// ---------------------------------------------------------------------------------------------
// Scoring and selection
// ---------------------------------------------------------------------------------------------

namespace {

// Pools one row along positions like torch F.max_pool1d / F.avg_pool1d(count_include_pad=True)
// with stride 1 and padding k/2: padded cells never win a max but do count in an average's
// divisor. Kernels are small (default 7), so the direct O(n·k) loop is cheap and exact.
void pool_row(const float * in, float * out, int len, int k, Pooling pooling) {
    const int pad = k / 2;
    for (int j = 0; j < len; ++j) {
        const int a = std::max(j - pad, 0);
        const int b = std::min(j - pad + k, len);  // exclusive
        if (pooling == Pooling::MaxPool) {
            float m = -std::numeric_limits<float>::infinity();
            for (int t = a; t < b; ++t) {
                m = std::max(m, in[t]);
            }
            out[j] = m;
        } else {
            float s = 0.0f;
            for (int t = a; t < b; ++t) {
                s += in[t];
            }
            out[j] = s / static_cast<float>(k);
        }
    }
}

// NaN (a broken model, not a user error) must not break nth_element's strict weak ordering.
float rank_key(float s) { return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s; }

}  // namespace

std::vector<float> aggregate_heads(const std::vector<float> & per_head, int n_head, int n_head_kv, int len,
                                   HeadAggregation agg) {
    const int          G = n_head / n_head_kv;
    std::vector<float> out(static_cast<size_t>(n_head_kv) * len);
    for (int kv = 0; kv < n_head_kv; ++kv) {
        float * dst = out.data() + static_cast<size_t>(kv) * len;
        for (int g = 0; g < G; ++g) {
            const float * src = per_head.data() + static_cast<size_t>(kv * G + g) * len;
            for (int j = 0; j < len; ++j) {
                if (g == 0) {
                    dst[j] = src[j];
                } else if (agg == HeadAggregation::Max) {
                    dst[j] = std::max(dst[j], src[j]);
                } else {
                    dst[j] += src[j];
                }
            }
        }
        if (agg == HeadAggregation::Mean && G > 1) {
            for (int j = 0; j < len; ++j) {
                dst[j] /= static_cast<float>(G);
            }
        }
    }
    return out;
}

HeadSelection all_positions(int n_head_kv, int n) {
    std::vector<int32_t> all(std::max(n, 0));
    std::iota(all.begin(), all.end(), 0);
    return HeadSelection(std::max(n_head_kv, 0), all);
}

std::vector<float> window_scores(const LayerAttention & att, const CompressionParams & p) {
    const int n_prefix = std::max(att.n - att.n_window, 0);
    if (n_prefix == 0 || att.n_head_kv <= 0) {
        return {};
    }
    std::vector<float> summed(static_cast<size_t>(att.n_head) * n_prefix, 0.0f);
    for (int h = 0; h < att.n_head; ++h) {
        float * dst = summed.data() + static_cast<size_t>(h) * n_prefix;
        for (int i = 0; i < att.n_window; ++i) {
            const float * row = att.window_probs + (static_cast<size_t>(h) * att.n_window + i) * att.n;
            for (int j = 0; j < n_prefix; ++j) {
                dst[j] += row[j];
            }
        }
    }
    if (p.pooling != Pooling::None && p.kernel_size > 1) {
        std::vector<float> pooled(summed.size());
        for (int h = 0; h < att.n_head; ++h) {
            const size_t off = static_cast<size_t>(h) * n_prefix;
            pool_row(summed.data() + off, pooled.data() + off, n_prefix, p.kernel_size, p.pooling);
        }
        summed.swap(pooled);
    }
    return aggregate_heads(summed, att.n_head, att.n_head_kv, n_prefix, p.aggregation);
}

HeadSelection top_k_plus_window(const std::vector<float> & scores, int n_head_kv, int n, int n_window, int keep) {
    if (keep >= n) {
        return all_positions(n_head_kv, n);
    }
    keep     = std::max(keep, 0);
    n_window = std::clamp(n_window, 0, n);
    // A keep below the window cannot hold the whole window; the most recent positions matter most.
    const int n_recent = std::min(n_window, keep);
    const int n_sel    = keep - n_recent;
    const int n_prefix = n - n_window;

    HeadSelection        kept(std::max(n_head_kv, 0));
    std::vector<int32_t> order(n_prefix);
    for (int kv = 0; kv < n_head_kv; ++kv) {
        const float * s = scores.data() + static_cast<size_t>(kv) * n_prefix;
        std::iota(order.begin(), order.end(), 0);
        // Higher score first, earlier position on ties, so results are deterministic.
        auto better = [s](int32_t a, int32_t b) {
            const float sa = rank_key(s[a]);
            const float sb = rank_key(s[b]);
            return sa != sb ? sa > sb : a < b;
        };
        if (n_sel > 0 && n_sel < n_prefix) {
            std::nth_element(order.begin(), order.begin() + n_sel, order.end(), better);
        }
        std::vector<int32_t> & out = kept[kv];
        out.assign(order.begin(), order.begin() + n_sel);
        std::sort(out.begin(), out.end());
        for (int j = n - n_recent; j < n; ++j) {
            out.push_back(j);
        }
    }
    return kept;
}

// ---------------------------------------------------------------------------------------------
// Registry: one line per method (each in its own file in methods/)
// ---------------------------------------------------------------------------------------------

const std::vector<const Method *> & all_methods() {
    static const std::vector<const Method *> methods = { &kFullKV, &kStreamingLLM, &kH2O, &kSnapKV, &kPyramidKV };
    return methods;
}

const Method * find_method(const std::string & name) {
    for (const Method * m : all_methods()) {
        if (name == m->name) {
            return m;
        }
    }
    return nullptr;
}

std::string method_names_joined(const char * sep) {
    std::string out;
    for (const Method * m : all_methods()) {
        if (!out.empty()) {
            out += sep;
        }
        out += m->name;
    }
    return out;
}

const Method & exact_method() {
    for (const Method * m : all_methods()) {
        if (!m->compresses) {
            return *m;
        }
    }
    throw std::logic_error("no registered method keeps every entry");
}

std::string validate_params(const CompressionParams & p) {
    const Method * m = find_method(p.method);
    if (m == nullptr) {
        return "--method: unknown method '" + p.method + "' (accepted: " + method_names_joined() + ")";
    }
    if (p.window < 1) {
        return "--window: " + std::to_string(p.window) + " must be >= 1";
    }
    // The budget includes the window, so it must leave room for at least one selected position.
    if (p.budget <= p.window) {
        return "--budget: " + std::to_string(p.budget) + " must be greater than --window (" + std::to_string(p.window) +
               ")";
    }
    if (m->validate != nullptr) {
        const std::string own = m->validate(p);
        if (!own.empty()) {
            return own;
        }
    }
    if (p.beta < 1) {
        return "--beta: " + std::to_string(p.beta) + " must be >= 1";
    }
    if (p.kernel_size < 1 || p.kernel_size % 2 == 0) {
        return "--kernel-size: " + std::to_string(p.kernel_size) + " must be odd and >= 1";
    }
    return "";
}

std::string parse_pooling(const std::string & name, const char * param, Pooling & out) {
    if (name == "maxpool") out = Pooling::MaxPool;
    else if (name == "avgpool") out = Pooling::AvgPool;
    else if (name == "none") out = Pooling::None;
    else return std::string(param) + ": '" + name + "' is not one of maxpool, avgpool, none";
    return "";
}

const char * pooling_name(Pooling p) {
    switch (p) {
        case Pooling::MaxPool: return "maxpool";
        case Pooling::AvgPool: return "avgpool";
        case Pooling::None: return "none";
    }
    return "?";
}

const char * aggregation_name(HeadAggregation a) { return a == HeadAggregation::Max ? "max" : "mean"; }

std::string parse_aggregation(const std::string & name, const char * param, HeadAggregation & out) {
    if (name == "mean") out = HeadAggregation::Mean;
    else if (name == "max") out = HeadAggregation::Max;
    else return std::string(param) + ": '" + name + "' is not one of mean, max";
    return "";
}

}  // namespace pkv
