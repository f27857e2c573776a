// Compression through the real engine on the embedded model: budget ≥ prompt changes nothing,
// stored lengths shrink exactly to the budgets, bytes match the analytic count, and the SnapKV
// scoring graph selects per KV head on constructed Q/K.
#include <cmath>
#include <set>

#include "ggml-backend.h"
#include "ggml-cpu.h"
#include "test_util.h"

namespace pkv::test {
namespace {

std::vector<int32_t> chat_prompt(size_t chars, const char * question) {
    const Model & m = engine_for(embedded_model()).model();
    return m.tokenize(m.apply_chat_template(essay_text(chars) + "\n\n" + question), true);
}

std::vector<int32_t> greedy(Session & s, const std::vector<int32_t> & prompt, int steps) {
    s.prefill(prompt);
    std::vector<int32_t> out;
    for (int i = 0; i < steps; ++i) {
        out.push_back(argmax(s.logits()));
        s.decode(out.back());
    }
    return out;
}

class EngineMethod : public testing::TestWithParam<std::string> {};

// With nothing to drop, every method runs FullKV's arithmetic: the same ubatches through the same
// kernels on the same operands (scoring only adds graph nodes beside the attention), in one
// engine with one thread count. So the greedy tokens are identical on any CPU, not merely close.
TEST_P(EngineMethod, BudgetAtLeastPromptGivesFullKvTokens) {
    Engine &                   engine = engine_for(embedded_model());
    const std::vector<int32_t> prompt = chat_prompt(400, "Who is the author?");
    Session                    full(engine, CompressionParams{ "full" });
    const std::vector<int32_t> expected = greedy(full, prompt, 24);

    CompressionParams p;
    p.method = GetParam();
    p.budget = (int) prompt.size() + 5;
    Session s(engine, p);
    s.prefill(prompt);
    for (int len : s.stats().layer_kv_lengths) EXPECT_EQ(len, (int) prompt.size());
    Session again(engine, p);
    EXPECT_EQ(greedy(again, prompt, 24), expected);
    p.budget = (int) prompt.size();  // exactly the prompt: still nothing to drop
    Session exact(engine, p);
    EXPECT_EQ(greedy(exact, prompt, 24), expected);
}

TEST_P(EngineMethod, StoredLengthsShrinkToTheBudgets) {
    Engine &                   engine = engine_for(embedded_model());
    const ModelConfig &        c      = engine.config();
    const std::vector<int32_t> prompt = chat_prompt(4000, "What is the main argument?");
    const int                  n      = (int) prompt.size();
    ASSERT_GT(n, 800);
    for (int budget : { 64, 128 }) {
        CompressionParams p;
        p.method = GetParam();
        p.budget = budget;
        Session s(engine, p);
        s.prefill(prompt);
        const SessionStats     st       = s.stats();
        const std::vector<int> expected = find_method(p.method)->layer_budgets(c.n_layer, n, p);
        EXPECT_EQ(st.layer_kv_lengths, expected);
        size_t entries = 0;
        for (int len : st.layer_kv_lengths) entries += len;
        const size_t per_entry = 2 /* K and V */ * (size_t) c.n_head_kv * c.head_dim * sizeof(uint16_t) /* f16 */;
        EXPECT_EQ(st.kv_bytes, entries * per_entry);
        EXPECT_EQ(st.full_kv_bytes, (size_t) n * c.n_layer * per_entry);
        const Method & m = *find_method(p.method);
        if (m.compresses) {
            for (int len : st.layer_kv_lengths) EXPECT_LT(len, n);
            EXPECT_LT(st.kv_bytes * 4, st.full_kv_bytes);
        }
        // What was kept: per layer and KV head, sorted, unique, in range, window always there.
        ASSERT_EQ((int) s.kept().size(), c.n_layer);
        for (int il = 0; il < c.n_layer; ++il) {
            ASSERT_EQ((int) s.kept()[il].size(), c.n_head_kv);
            for (const auto & head : s.kept()[il]) {
                ASSERT_EQ((int) head.size(), expected[il]);
                EXPECT_TRUE(std::is_sorted(head.begin(), head.end()));
                EXPECT_EQ(std::set<int32_t>(head.begin(), head.end()).size(), head.size());
                EXPECT_GE(head.front(), 0);
                EXPECT_LT(head.back(), n);
                if (m.keeps_window) {
                    for (int w = n - p.window; w < n; ++w) EXPECT_TRUE(std::binary_search(head.begin(), head.end(), w));
                }
            }
        }
        // Decoding appends to every layer, whatever its budget.
        s.decode(argmax(s.logits()));
        s.decode(argmax(s.logits()));
        for (int il = 0; il < c.n_layer; ++il) EXPECT_EQ(s.stats().layer_kv_lengths[il], expected[il] + 2);
        EXPECT_EQ(s.stats().tokens_seen, n + 2);
    }
}

class ScoringMethod : public testing::TestWithParam<std::string> {};

TEST_P(ScoringMethod, SelectsDifferentTokensPerKvHead) {
    Engine &          engine = engine_for(embedded_model());
    CompressionParams p;
    p.method = GetParam();
    p.budget = 64;
    Session s(engine, p);
    s.prefill(chat_prompt(3000, "Summarise."));
    // Per-head selection is the point: in some layer, KV heads keep different positions.
    int layers_with_distinct_heads = 0;
    for (const auto & layer : s.kept()) layers_with_distinct_heads += layer[0] != layer[1];
    EXPECT_GT(layers_with_distinct_heads, 0);
}

std::vector<std::string> method_names(bool scoring_only) {
    std::vector<std::string> names;
    for (const Method * m : all_methods()) {
        if (!scoring_only || m->needs_window_probs || m->needs_accumulated) names.push_back(m->name);
    }
    return names;
}

INSTANTIATE_TEST_SUITE_P(Methods, EngineMethod, testing::ValuesIn(method_names(false)),
                         [](const testing::TestParamInfo<std::string> & i) { return i.param; });
INSTANTIATE_TEST_SUITE_P(Methods, ScoringMethod, testing::ValuesIn(method_names(true)),
                         [](const testing::TestParamInfo<std::string> & i) { return i.param; });

// The two in-graph score computations on a real prompt of several ubatches: window rows are
// causal probability distributions; accumulated attention (H2O) sums to one per prompt query,
// covers the window queries' share, and on the last key equals the last query's window row —
// only that query sees it. The tolerances are the math's, not a CPU's: softmax rows in f32 sum
// to one within n·2^-24 (< 1e-4 for n ≈ 1100), summed here in double; the two products behind
// window rows and accumulated sums may round their dot products differently (another column
// count), which moves a probability by ~1e-6. Masked keys are exactly 0 (ggml's exp of -inf).
TEST(Scores, WindowAndAccumulatedAttentionAreConsistent) {
    Engine &                   engine = engine_for(embedded_model());
    const ModelConfig &        c      = engine.config();
    const std::vector<int32_t> prompt = chat_prompt(4500, "What is the main argument?");
    const int                  n = (int) prompt.size(), nw = 8;
    ASSERT_GT(n, 1024);                              // accumulation crosses ubatch boundaries
    Session s(engine, CompressionParams{ "full" });  // an exact prefill keeping its scores (a fork source)
    s.set_keep_scores(true);
    s.prefill(prompt);
    const auto & win = s.recorded_window_probs();
    const auto & acc = s.recorded_accumulated();
    ASSERT_EQ((int) win.size(), c.n_layer);
    ASSERT_EQ((int) acc.size(), c.n_layer);
    for (int il = 0; il < c.n_layer; il += 7) {
        ASSERT_EQ(win[il].size(), (size_t) c.n_head * nw * n);
        ASSERT_EQ(acc[il].size(), (size_t) c.n_head * n);
        for (int h = 0; h < c.n_head; ++h) {
            const float * w = &win[il][(size_t) h * nw * n];
            const float * a = &acc[il][(size_t) h * n];
            for (int i = 0; i < nw; ++i) {
                double row = 0;
                for (int j = 0; j < n; ++j) row += w[(size_t) i * n + j];
                EXPECT_NEAR(row, 1.0, 1e-3) << "layer " << il << " head " << h << " window row " << i;
                for (int j = n - nw + i + 1; j < n; ++j) EXPECT_EQ(w[(size_t) i * n + j], 0.0f);
            }
            double total = 0;
            for (int j = 0; j < n; ++j) {
                total += a[j];
                double window_share = 0;
                for (int i = 0; i < nw; ++i) window_share += w[(size_t) i * n + j];
                EXPECT_GE(a[j] + 1e-4, window_share) << "layer " << il << " head " << h << " key " << j;
            }
            EXPECT_NEAR(total, n, n * 1e-3) << "layer " << il << " head " << h;
            EXPECT_NEAR(a[n - 1], w[(size_t) (nw - 1) * n + n - 1], 1e-4);
        }
    }
}

// The scoring graph on constructed Q/K: a prefix key that the window queries of KV head 1's query
// heads attend to dominantly is kept by head 1 only; the window is kept by every head.
TEST(Scoring, DominantKeyInOneKvHeadIsKeptByThatHeadOnly) {
    const int        d = 8, n = 32, n_head = 4, n_head_kv = 2, nw = 4, target = 9;
    ggml_init_params ip{ 16 * 1024 * 1024, nullptr, false };
    ggml_context *   ctx = ggml_init(ip);
    ggml_tensor *    k   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, n, n_head_kv);
    ggml_tensor *    q   = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, d, nw, n_head);
    auto kat = [&](int dim, int pos, int head) -> float & { return ((float *) k->data)[(head * n + pos) * d + dim]; };
    auto qat = [&](int dim, int row, int head) -> float & { return ((float *) q->data)[(head * nw + row) * d + dim]; };
    for (int h = 0; h < n_head_kv; ++h)
        for (int j = 0; j < n; ++j)
            for (int x = 0; x < d; ++x) kat(x, j, h) = 0.05f * std::sin(1.3f * j + 0.7f * x + h);
    kat(0, target, 1) = 6.0f;  // only KV head 1 holds a key aligned with dimension 0
    kat(0, target, 0) = -6.0f;
    for (int h = 0; h < n_head; ++h)
        for (int i = 0; i < nw; ++i)
            for (int x = 0; x < d; ++x) qat(x, i, h) = x == 0 ? 2.0f : 0.0f;
    // causal mask inside the window: window query i sits at position n - nw + i
    ggml_tensor * mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n, nw);
    for (int i = 0; i < nw; ++i)
        for (int j = 0; j < n; ++j)
            ((ggml_fp16_t *) mask->data)[i * n + j] = ggml_fp32_to_fp16(j > n - nw + i ? -INFINITY : 0.0f);
    ggml_tensor * probs = window_probs(ctx, k, q, mask, 1.0f / std::sqrt((float) d));
    ggml_cgraph * gf    = ggml_new_graph(ctx);
    ggml_build_forward_expand(gf, probs);
    ggml_backend_t cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    ASSERT_EQ(ggml_backend_graph_compute(cpu, gf), GGML_STATUS_SUCCESS);
    ggml_backend_free(cpu);

    const float * pr = (const float *) probs->data;  // [n_head][nw][n]
    for (int h = 0; h < n_head; ++h) {
        for (int i = 0; i < nw; ++i) {
            double sum = 0;
            for (int j = 0; j < n; ++j) {
                const float v = pr[(h * nw + i) * n + j];
                if (j > n - nw + i) {
                    EXPECT_EQ(v, 0.0f) << "causal mask inside the window";
                }
                sum += v;
            }
            EXPECT_NEAR(sum, 1.0, 1e-4);
        }
        // heads 2, 3 read KV head 1: the target dominates; heads 0, 1 read KV head 0: it is suppressed
        const float at_target = pr[(h * nw + 0) * n + target];
        if (h >= 2) EXPECT_GT(at_target, 0.5f);
        else EXPECT_LT(at_target, 0.01f);
    }

    LayerAttention att;
    att.n = n, att.n_head = n_head, att.n_head_kv = n_head_kv, att.n_window = nw, att.window_probs = pr;
    CompressionParams p;
    p.method = "snapkv", p.window = nw, p.kernel_size = 1;
    const HeadSelection kept = find_method("snapkv")->select(att, nw + 1, p);
    ASSERT_EQ(kept.size(), 2u);
    EXPECT_FALSE(std::binary_search(kept[0].begin(), kept[0].end(), target));
    EXPECT_TRUE(std::binary_search(kept[1].begin(), kept[1].end(), target));
    for (const auto & head : kept)
        for (int w = n - nw; w < n; ++w) EXPECT_TRUE(std::binary_search(head.begin(), head.end(), w));
    ggml_free(ctx);
}

// Every tensor the engine's graphs hold starts on a cache line on the CPU: ggml's CPU buffer type
// aligns to 32 bytes, and an AVX-512 kernel whose output rows start mid-line splits every 64-byte
// load and store (AMX's Q4_1 matmul ran 1.6x slower so). Tensors of 8 floats (32 bytes) one
// after another would alternate between the two halves of a line.
TEST(ComputeBuffer, EveryTensorOfAGraphStartsOnACacheLineOnTheCpu) {
    Engine &      e = engine_for(embedded_model(), 1);
    Engine::Graph g = e.begin_graph();
    ggml_tensor * x = ggml_new_tensor_1d(g.ctx, GGML_TYPE_F32, 8);
    ggml_set_input(x);
    std::vector<ggml_tensor *> nodes{ x };
    for (int i = 0; i < 16; ++i) nodes.push_back(ggml_scale(g.ctx, nodes.back(), 2.0f));
    // Every result is read again by the sums, so many 32-byte tensors lie side by side at once.
    ggml_tensor * sum = nodes[1];
    for (size_t i = 2; i < nodes.size(); ++i) sum = ggml_add(g.ctx, sum, nodes[i]);
    ggml_set_output(sum);
    ggml_build_forward_expand(g.gf, sum);
    e.allocate(g);
    for (int i = 0; i < ggml_graph_n_nodes(g.gf); ++i) {
        const ggml_tensor * t = ggml_graph_node(g.gf, i);
        EXPECT_EQ((uintptr_t) t->data % kCpuTensorAlignment, 0u) << t->name << " at " << t->data;
    }
    EXPECT_EQ((uintptr_t) x->data % kCpuTensorAlignment, 0u);
    ggml_free(g.ctx);
}

}  // namespace
}  // namespace pkv::test
