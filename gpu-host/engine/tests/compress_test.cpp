// Tests for the compression methods (docs/DESIGN.md §2): budgets against the published numbers and an
// independent transcription of the formula, selection on constructed attention patterns.
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "compress.h"

using namespace pkv;

namespace {

std::vector<int> arith(int first, int step, int count) {
    std::vector<int> v(count);
    for (int i = 0; i < count; ++i) {
        v[i] = first - i * step;
    }
    return v;
}

std::vector<int32_t> range(int a, int b) {
    std::vector<int32_t> v;
    for (int i = a; i < b; ++i) {
        v.push_back(i);
    }
    return v;
}

// Window probabilities [n_head][n_window][n], every row a (causal) softmax-like distribution.
struct Probs {
    int                n, n_head, n_head_kv, n_window;
    std::vector<float> data;

    Probs(int n_, int n_head_, int n_head_kv_, int n_window_)
        : n(n_),
          n_head(n_head_),
          n_head_kv(n_head_kv_),
          n_window(n_window_),
          data(static_cast<size_t>(n_) * n_head_ * n_window_, 0.0f) {}

    float & at(int h, int i, int j) { return data[(static_cast<size_t>(h) * n_window + i) * n + j]; }

    LayerAttention att() const {
        LayerAttention a;
        a.n            = n;
        a.n_head       = n_head;
        a.n_head_kv    = n_head_kv;
        a.n_window     = n_window;
        a.window_probs = data.data();
        return a;
    }

    // Uniform low background, then `mass` of every window row of head h put on position j.
    void background() {
        for (int h = 0; h < n_head; ++h) {
            for (int i = 0; i < n_window; ++i) {
                const int visible = n - n_window + i + 1;
                for (int j = 0; j < visible; ++j) {
                    at(h, i, j) = 1.0f / visible;
                }
            }
        }
    }

    void spike(int h, int j, float mass) {
        for (int i = 0; i < n_window; ++i) {
            at(h, i, j) += mass;
        }
    }

    void randomize(std::mt19937 & rng) {
        std::uniform_real_distribution<float> u(0.0f, 1.0f);
        for (int h = 0; h < n_head; ++h) {
            for (int i = 0; i < n_window; ++i) {
                const int visible = n - n_window + i + 1;
                float     sum     = 0.0f;
                for (int j = 0; j < visible; ++j) {
                    at(h, i, j) = u(rng);
                    sum += at(h, i, j);
                }
                for (int j = 0; j < visible; ++j) {
                    at(h, i, j) /= sum;
                }
            }
        }
    }
};

CompressionParams params(const std::string & method, int budget = 128) {
    CompressionParams p;
    p.method = method;
    p.budget = budget;
    return p;
}

void expect_well_formed(const HeadSelection & sel, int n_head_kv, int n) {
    ASSERT_EQ(static_cast<int>(sel.size()), n_head_kv);
    for (const auto & head : sel) {
        EXPECT_EQ(head.size(), sel[0].size());
        EXPECT_TRUE(std::is_sorted(head.begin(), head.end()));
        EXPECT_EQ(std::adjacent_find(head.begin(), head.end()), head.end()) << "duplicate position";
        if (!head.empty()) {
            EXPECT_GE(head.front(), 0);
            EXPECT_LT(head.back(), n);
        }
    }
}

bool contains(const std::vector<int32_t> & v, int x) { return std::find(v.begin(), v.end(), x) != v.end(); }

}  // namespace

// ---------------------------------------------------------------------------------------------
// Budgets
// ---------------------------------------------------------------------------------------------

TEST(PyramidBudgets, PublishedExample30Layers) {
    const auto b = pyramid_budgets(30, 128, 4000, 8, 20);
    ASSERT_EQ(b.size(), 30u);
    EXPECT_EQ(b[0], 242);
    EXPECT_EQ(b[1], 235);
    EXPECT_EQ(b[28], 46);
    EXPECT_EQ(b[29], 39);
    for (size_t l = 1; l < b.size(); ++l) {
        EXPECT_EQ(b[l - 1] - b[l], 7) << "layer " << l;
    }
    EXPECT_EQ(b, arith(242, 7, 30));
    const double mean = std::accumulate(b.begin(), b.end(), 0.0) / b.size();
    EXPECT_DOUBLE_EQ(mean, 140.5);
}

TEST(PyramidBudgets, ShortPromptKeepsEverything) {
    EXPECT_EQ(pyramid_budgets(32, 128, 100, 8, 20), std::vector<int>(32, 100));
    EXPECT_EQ(pyramid_budgets(4, 128, 0, 8, 20), std::vector<int>(4, 0));
}

TEST(PyramidBudgets, MiddleRangeIsUniform) {
    EXPECT_EQ(pyramid_budgets(32, 128, 200, 8, 20), std::vector<int>(32, 128));
    EXPECT_EQ(pyramid_budgets(32, 128, 128, 8, 20), std::vector<int>(32, 128));
    EXPECT_EQ(pyramid_budgets(32, 128, 239, 8, 20), std::vector<int>(32, 128));
}

TEST(PyramidBudgets, MaxCappedByPromptLength) {
    // n = 2·(B−α) exactly: max is capped at n−α = 232, min becomes 8, steps 224 // 29 = 7.
    const auto b = pyramid_budgets(30, 128, 240, 8, 20);
    EXPECT_EQ(b, arith(240, 7, 30));
    EXPECT_EQ(b.back(), 37);
}

TEST(PyramidBudgets, OtherPublishedShapes) {
    EXPECT_EQ(pyramid_budgets(32, 512, 8192, 8, 20), arith(991, 30, 32));
    EXPECT_EQ(pyramid_budgets(30, 64, 8000, 8, 20), arith(118, 3, 30));
}

TEST(PyramidBudgets, SingleLayerDoesNotDivideByZero) {
    // steps = 0: the one layer keeps max + α = 2·120 − 6 + 8.
    EXPECT_EQ(pyramid_budgets(1, 128, 4000, 8, 20), std::vector<int>{ 242 });
    EXPECT_TRUE(pyramid_budgets(0, 128, 4000, 8, 20).empty());
}

namespace {

// docs/DESIGN.md §2, line by line, kept deliberately naive.
std::vector<int> design_reference(int L, int B, int n, int a, int beta) {
    std::vector<int> out;
    if (n < B) {
        for (int l = 0; l < L; ++l) {
            out.push_back(n);
        }
    } else if (n < 2 * (B - a)) {
        for (int l = 0; l < L; ++l) {
            out.push_back((B - a) + a);
        }
    } else {
        int min = (B - a) / beta;
        int max = 2 * (B - a) - min;
        if (max >= n - a) {
            max = n - a;
            min = 2 * (B - a) - max;
        }
        const int steps = (max - min) / (L - 1);
        for (int l = 0; l < L; ++l) {
            out.push_back((max - l * steps) + a);
        }
    }
    return out;
}

}  // namespace

TEST(PyramidBudgets, MatchesDesignFormulaOnRandomInputs) {
    std::mt19937 rng(1234);
    auto         uni           = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    int          formula_cases = 0;
    for (int iter = 0; iter < 5000; ++iter) {
        const int L = uni(2, 80);
        const int B = uni(9, 2048);
        // Bias half the draws towards the branch boundaries around B and 2·(B−α).
        const int  n    = iter % 2 ? uni(1, 40000) : uni(std::max(1, B - 20), 2 * B + 20);
        const int  a    = uni(1, std::min(64, B - 1));
        const int  beta = uni(1, 50);
        const auto got  = pyramid_budgets(L, B, n, a, beta);
        ASSERT_EQ(got, design_reference(L, B, n, a, beta))
            << "L=" << L << " B=" << B << " n=" << n << " a=" << a << " beta=" << beta;
        ASSERT_EQ(static_cast<int>(got.size()), L);
        for (int l = 0; l < L; ++l) {
            ASSERT_LE(got[l], n);
            ASSERT_GE(got[l], 0);
            if (n >= B) {
                ASSERT_GE(got[l], a) << "the window is always kept";
            } else {
                ASSERT_EQ(got[l], n);
            }
            if (l > 0) {
                ASSERT_LE(got[l], got[l - 1]) << "budgets never grow with depth";
            }
        }
        formula_cases += n >= 2 * (B - a);
    }
    EXPECT_GT(formula_cases, 1000) << "the pyramid branch must be exercised";
}

TEST(PyramidBudgets, PyramidKvMethodUsesThePyramid) {
    const Method * m = find_method("pyramidkv");
    ASSERT_NE(m, nullptr);
    CompressionParams p;
    p.method = "pyramidkv";
    p.budget = 24;
    EXPECT_EQ(m->layer_budgets(6, 300, p), pyramid_budgets(6, 24, 300, p.window, p.beta));
    EXPECT_GT(m->layer_budgets(6, 300, p).front(), m->layer_budgets(6, 300, p).back());
    EXPECT_TRUE(m->needs_window_probs);
}

TEST(UniformBudgets, MinOfPromptAndBudget) {
    EXPECT_EQ(uniform_budgets(3, 128, 4000), std::vector<int>(3, 128));
    EXPECT_EQ(uniform_budgets(3, 128, 50), std::vector<int>(3, 50));
}

// ---------------------------------------------------------------------------------------------
// Scoring and selection
// ---------------------------------------------------------------------------------------------

TEST(Selection, PerKvHeadSnapKv) {
    // G = 2: query heads 0,1 -> KV head 0; query heads 2,3 -> KV head 1.
    Probs pr(64, 4, 2, 8);
    pr.background();
    pr.spike(0, 40, 0.5f);
    pr.spike(1, 40, 0.5f);
    pr.spike(2, 20, 0.5f);
    pr.spike(3, 20, 0.5f);
    const CompressionParams p = params("snapkv");
    ASSERT_TRUE(find_method("snapkv")->needs_window_probs);
    const HeadSelection sel = find_method("snapkv")->select(pr.att(), 12, p);
    expect_well_formed(sel, 2, 64);
    for (const auto & head : sel) {
        EXPECT_EQ(head.size(), 12u);
        for (int j = 56; j < 64; ++j) {
            EXPECT_TRUE(contains(head, j)) << "window position " << j;
        }
    }
    EXPECT_TRUE(contains(sel[1], 20));
    EXPECT_FALSE(contains(sel[0], 20));
    EXPECT_TRUE(contains(sel[0], 40));
    EXPECT_FALSE(contains(sel[1], 40));
    // Max pooling (k = 7) spreads the spike, so the 4 selected sit right around it; ties break
    // towards the earlier position.
    EXPECT_EQ(std::vector<int32_t>(sel[1].begin(), sel[1].begin() + 4), (std::vector<int32_t>{ 17, 18, 19, 20 }));
    EXPECT_EQ(std::vector<int32_t>(sel[0].begin(), sel[0].begin() + 4), (std::vector<int32_t>{ 37, 38, 39, 40 }));
}

TEST(Selection, TopKTiesGoToEarlierPositions) {
    // One KV head, 6 prefix positions + 2 window, keep 5 -> 3 selected.
    const std::vector<float> scores = { 1.0f, 2.0f, 2.0f, 0.5f, 2.0f, 2.0f };
    const HeadSelection      sel    = top_k_plus_window(scores, 1, 8, 2, 5);
    EXPECT_EQ(sel[0], (std::vector<int32_t>{ 1, 2, 4, 6, 7 }));
    EXPECT_EQ(top_k_plus_window(scores, 1, 8, 2, 8)[0], range(0, 8));
    EXPECT_EQ(top_k_plus_window(scores, 1, 8, 2, 2)[0], (std::vector<int32_t>{ 6, 7 }));
}

TEST(Scores, PoolingModes) {
    // One query head, one window query; a spike of 1 at prefix position 10 (n_prefix 20).
    Probs pr(21, 1, 1, 1);
    pr.at(0, 0, 10)     = 1.0f;
    pr.at(0, 0, 20)     = 0.0f;
    CompressionParams p = params("snapkv");
    p.kernel_size       = 7;

    p.pooling = Pooling::MaxPool;
    auto s    = window_scores(pr.att(), p);
    ASSERT_EQ(s.size(), 20u);
    for (int j = 0; j < 20; ++j) {
        EXPECT_FLOAT_EQ(s[j], (j >= 7 && j <= 13) ? 1.0f : 0.0f) << "j=" << j;
    }

    p.pooling = Pooling::AvgPool;
    s         = window_scores(pr.att(), p);
    for (int j = 0; j < 20; ++j) {
        EXPECT_FLOAT_EQ(s[j], (j >= 7 && j <= 13) ? 1.0f / 7 : 0.0f) << "j=" << j;
    }

    p.pooling = Pooling::None;
    s         = window_scores(pr.att(), p);
    for (int j = 0; j < 20; ++j) {
        EXPECT_FLOAT_EQ(s[j], j == 10 ? 1.0f : 0.0f) << "j=" << j;
    }
}

TEST(Scores, PoolingAtTheEdges) {
    // All-ones prefix of 10: avg-pool counts padding in the divisor, max-pool ignores padding.
    Probs pr(11, 1, 1, 1);
    for (int j = 0; j < 11; ++j) {
        pr.at(0, 0, j) = 1.0f;
    }
    CompressionParams p = params("snapkv");
    p.kernel_size       = 7;
    p.pooling           = Pooling::AvgPool;
    auto s              = window_scores(pr.att(), p);
    ASSERT_EQ(s.size(), 10u);
    EXPECT_FLOAT_EQ(s[0], 4.0f / 7);
    EXPECT_FLOAT_EQ(s[1], 5.0f / 7);
    EXPECT_FLOAT_EQ(s[3], 1.0f);
    EXPECT_FLOAT_EQ(s[9], 4.0f / 7);
    p.pooling = Pooling::MaxPool;
    s         = window_scores(pr.att(), p);
    EXPECT_FLOAT_EQ(s[0], 1.0f);
    EXPECT_FLOAT_EQ(s[9], 1.0f);
}

TEST(Scores, SumsOverWindowQueriesOnPrefixOnly) {
    Probs pr(10, 1, 1, 3);
    pr.spike(0, 4, 0.25f);       // 3 window rows -> 0.75
    pr.at(0, 1, 8)      = 0.5f;  // window position: not scored
    CompressionParams p = params("snapkv");
    p.pooling           = Pooling::None;
    const auto s        = window_scores(pr.att(), p);
    ASSERT_EQ(s.size(), 7u);
    EXPECT_FLOAT_EQ(s[4], 0.75f);
    EXPECT_FLOAT_EQ(s[3], 0.0f);
}

TEST(Scores, MeanVersusMaxAggregation) {
    // One KV head with G = 2 and a prefix of 2 positions (n 3, window 1). Head 0 scores
    // [0.9, 0.5], head 1 [0.0, 0.6]: mean 0.45 vs 0.55 keeps position 1, max 0.9 vs 0.6 keeps 0.
    Probs pr(3, 2, 1, 1);
    pr.at(0, 0, 0)      = 0.9f;
    pr.at(0, 0, 1)      = 0.5f;
    pr.at(1, 0, 0)      = 0.0f;
    pr.at(1, 0, 1)      = 0.6f;
    CompressionParams p = params("snapkv");
    p.pooling           = Pooling::None;

    p.aggregation = HeadAggregation::Mean;
    auto s        = window_scores(pr.att(), p);
    ASSERT_EQ(s.size(), 2u);
    EXPECT_FLOAT_EQ(s[0], 0.45f);
    EXPECT_FLOAT_EQ(s[1], 0.55f);
    EXPECT_EQ(find_method("snapkv")->select(pr.att(), 2, p)[0], (std::vector<int32_t>{ 1, 2 }));

    p.aggregation = HeadAggregation::Max;
    s             = window_scores(pr.att(), p);
    EXPECT_FLOAT_EQ(s[0], 0.9f);
    EXPECT_FLOAT_EQ(s[1], 0.6f);
    EXPECT_EQ(find_method("snapkv")->select(pr.att(), 2, p)[0], (std::vector<int32_t>{ 0, 2 }));
}

TEST(Methods, H2OPicksByAccumulatedAttention) {
    // n 32, 2 query heads, 1 KV head, window 4, keep 7 -> 3 heavy hitters.
    const int          n = 32;
    std::vector<float> acc(2 * n, 0.1f);
    acc[0 * n + 5]  = 3.0f;
    acc[1 * n + 5]  = 3.0f;
    acc[0 * n + 12] = 2.0f;
    acc[1 * n + 20] = 5.0f;  // mean over heads 2.55 > 2.0 (position 12: mean 1.05)
    acc[0 * n + 30] = 9.0f;  // inside the window: kept anyway, never competes
    LayerAttention att;
    att.n           = n;
    att.n_head      = 2;
    att.n_head_kv   = 1;
    att.n_window    = 4;
    att.accumulated = acc.data();
    const auto p    = params("h2o");
    ASSERT_TRUE(find_method("h2o")->needs_accumulated);
    const auto sel = find_method("h2o")->select(att, 7, p);
    expect_well_formed(sel, 1, n);
    EXPECT_EQ(sel[0], (std::vector<int32_t>{ 5, 12, 20, 28, 29, 30, 31 }));
}

TEST(Methods, StreamingLlmKeepsSinksAndRecent) {
    LayerAttention att;
    att.n          = 100;
    att.n_head     = 4;
    att.n_head_kv  = 2;
    att.n_window   = 8;
    const auto sel = find_method("streamingllm")->select(att, 20, params("streamingllm"));
    expect_well_formed(sel, 2, 100);
    std::vector<int32_t> want = range(0, 4);
    for (int j = 84; j < 100; ++j) {
        want.push_back(j);
    }
    EXPECT_EQ(sel[0], want);
    EXPECT_EQ(sel[1], want);
}

TEST(Methods, FullKeepsEverything) {
    LayerAttention att;
    att.n            = 50;
    att.n_head       = 4;
    att.n_head_kv    = 2;
    att.n_window     = 8;
    const Method * m = find_method("full");
    ASSERT_NE(m, nullptr);
    EXPECT_FALSE(m->compresses);
    EXPECT_EQ(m->layer_budgets(3, 50, params("full", 8 + 1)), std::vector<int>(3, 50));
    const auto sel = m->select(att, 50, params("full"));
    EXPECT_EQ(sel, HeadSelection(2, range(0, 50)));
}

class EveryMethod : public ::testing::TestWithParam<const Method *> {
  protected:
    // Inputs for whatever the method asks for, random but normalized per row.
    LayerAttention make(int n, int n_window, std::mt19937 & rng) {
        probs_ = std::make_unique<Probs>(n, 4, 2, n_window);
        probs_->randomize(rng);
        acc_.assign(static_cast<size_t>(4) * n, 0.0f);
        for (int h = 0; h < 4; ++h) {
            for (int i = 0; i < n_window; ++i) {
                for (int j = 0; j < n; ++j) {
                    acc_[static_cast<size_t>(h) * n + j] += probs_->at(h, i, j);
                }
            }
        }
        LayerAttention att = probs_->att();
        att.accumulated    = acc_.data();
        return att;
    }

    std::unique_ptr<Probs> probs_;
    std::vector<float>     acc_;
};

TEST_P(EveryMethod, KeepAtLeastNKeepsAll) {
    const Method *    m = GetParam();
    std::mt19937      rng(7);
    CompressionParams p = params(m->name, 32);
    for (int n : { 1, 5, 8, 31, 40 }) {
        const LayerAttention att = make(n, std::min(p.window, n), rng);
        for (int keep : { n, n + 3 }) {
            EXPECT_EQ(m->select(att, keep, p), HeadSelection(2, range(0, n))) << "n=" << n << " keep=" << keep;
        }
    }
}

TEST_P(EveryMethod, StoredSizesEqualLayerBudgets) {
    const Method *    m = GetParam();
    std::mt19937      rng(11);
    CompressionParams p       = params(m->name, 24);
    const int         n       = 300;
    const int         L       = 6;
    const auto        budgets = m->layer_budgets(L, n, p);
    ASSERT_EQ(static_cast<int>(budgets.size()), L);
    for (int l = 0; l < L; ++l) {
        const LayerAttention att = make(n, std::min(p.window, n), rng);
        const HeadSelection  sel = m->select(att, budgets[l], p);
        expect_well_formed(sel, 2, n);
        for (const auto & head : sel) {
            EXPECT_EQ(static_cast<int>(head.size()), budgets[l]) << "layer " << l;
        }
        if (m->compresses) {
            EXPECT_LT(budgets[l], n) << "compression must really shrink the cache";
        } else {
            EXPECT_EQ(budgets[l], n) << "a method that does not compress keeps everything";
        }
        if (m->keeps_window) {
            for (const auto & head : sel) {
                for (int j = n - p.window; j < n; ++j) EXPECT_TRUE(contains(head, j)) << "window position " << j;
            }
        }
    }
}

// The score traits are what the engine computes: a method that does not declare a score selects
// without it (the engine passes null), on every budget.
TEST_P(EveryMethod, SelectsWithOnlyTheScoresItDeclares) {
    const Method *    m = GetParam();
    std::mt19937      rng(5);
    CompressionParams p   = params(m->name, 24);
    const int         n   = 120;
    LayerAttention    att = make(n, p.window, rng);
    if (!m->needs_window_probs) att.window_probs = nullptr;
    if (!m->needs_accumulated) att.accumulated = nullptr;
    // A method that does not compress is only ever asked to keep everything (its budgets are n).
    const std::vector<int> keeps =
        m->compresses ? std::vector<int>{ p.window + 1, 24, 60, n - 1 } : std::vector<int>{ n };
    for (int keep : keeps) {
        const HeadSelection sel = m->select(att, keep, p);
        expect_well_formed(sel, 2, n);
        EXPECT_EQ(sel[0].size(), (size_t) keep) << "keep " << keep;
    }
}

// min_budget is what validation accepts: with the smallest window, min_budget passes and one less
// fails naming --budget; with a larger window the budget must exceed it as well.
TEST_P(EveryMethod, ValidatesItsMinimumBudget) {
    const Method *    m = GetParam();
    CompressionParams p = params(m->name, m->min_budget);
    p.window            = 1;
    EXPECT_EQ(validate_params(p), "") << "budget " << p.budget;
    p.budget                = m->min_budget - 1;
    const std::string error = validate_params(p);
    EXPECT_EQ(error.rfind("--budget: " + std::to_string(p.budget) + " ", 0), 0u) << error;
    EXPECT_EQ(error.find('\n'), std::string::npos);
    p.window = m->min_budget + 5;
    p.budget = p.window;
    EXPECT_NE(validate_params(p), "") << "a budget must exceed the window";
    p.budget = p.window + 1;
    EXPECT_EQ(validate_params(p), "");
}

TEST_P(EveryMethod, IsRegisteredUnderItsNameWithADescription) {
    const Method * m = GetParam();
    EXPECT_EQ(find_method(m->name), m);
    EXPECT_NE(std::string(m->description), "");
    EXPECT_NE(method_names_joined().find(m->name), std::string::npos);
    EXPECT_EQ(validate_params(params(m->name)), "") << "the default parameters are valid for " << m->name;
    if (m->needs_window_probs || m->needs_accumulated) {
        EXPECT_TRUE(m->compresses) << "scores only matter to compress";
    }
}

INSTANTIATE_TEST_SUITE_P(All, EveryMethod, ::testing::ValuesIn(all_methods()),
                         [](const ::testing::TestParamInfo<const Method *> & info) {
                             return std::string(info.param->name);
                         });

// ---------------------------------------------------------------------------------------------
// Validation and registry
// ---------------------------------------------------------------------------------------------

TEST(Validate, DefaultsAreValid) {
    EXPECT_EQ(validate_params(CompressionParams{}), "");
    for (const Method * m : all_methods()) {
        EXPECT_EQ(validate_params(params(m->name)), "") << m->name;
    }
}

TEST(Validate, ErrorsNameTheFlagAndValue) {
    auto err = [](auto mutate) {
        CompressionParams p;
        mutate(p);
        return validate_params(p);
    };
    const std::string method = err([](CompressionParams & p) { p.method = "foo"; });
    EXPECT_EQ(method, "--method: unknown method 'foo' (accepted: " + method_names_joined() + ")");

    const std::string budget = err([](CompressionParams & p) { p.budget = 8; });
    EXPECT_EQ(budget, "--budget: 8 must be greater than --window (8)");

    const std::string window = err([](CompressionParams & p) { p.window = 0; });
    EXPECT_EQ(window, "--window: 0 must be >= 1");

    const std::string beta = err([](CompressionParams & p) { p.beta = 0; });
    EXPECT_EQ(beta, "--beta: 0 must be >= 1");

    const std::string kernel = err([](CompressionParams & p) { p.kernel_size = 4; });
    EXPECT_EQ(kernel, "--kernel-size: 4 must be odd and >= 1");
    EXPECT_NE(err([](CompressionParams & p) { p.kernel_size = -1; }).find("--kernel-size"), std::string::npos);
}

TEST(Validate, StreamingLlmNeedsRoomBeyondItsSinks) {
    const Method * m = find_method("streamingllm");
    ASSERT_NE(m, nullptr);
    EXPECT_EQ(m->min_budget, 5) << "4 attention sinks + 1";
    CompressionParams p;
    p.method                = "streamingllm";
    p.window                = 2;
    p.budget                = 4;
    const std::string sinks = validate_params(p);
    EXPECT_EQ(sinks, "--budget: 4 must be greater than 4 for streamingllm (its attention sinks)");
    // The same budget is fine for a method without attention sinks.
    p.method = "snapkv";
    EXPECT_EQ(validate_params(p), "");
}

TEST(Registry, LookupAndNames) {
    EXPECT_EQ(find_method("nope"), nullptr);
    EXPECT_EQ(find_method(""), nullptr);
    ASSERT_FALSE(all_methods().empty());
    std::string           joined, piped;
    std::set<std::string> names;
    for (const Method * m : all_methods()) {
        EXPECT_TRUE(names.insert(m->name).second) << m->name << " registered twice";
        EXPECT_EQ(find_method(m->name), m);
        joined += (joined.empty() ? "" : ", ") + std::string(m->name);
        piped += (piped.empty() ? "" : "|") + std::string(m->name);
    }
    EXPECT_EQ(method_names_joined(), joined);
    EXPECT_EQ(method_names_joined("|"), piped);
    EXPECT_NE(find_method(CompressionParams{}.method), nullptr) << "the default method is registered";
    EXPECT_FALSE(exact_method().compresses);
    EXPECT_EQ(find_method(exact_method().name), &exact_method());
}
