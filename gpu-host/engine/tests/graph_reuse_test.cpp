// Decode graphs are kept and rerun while they fit (docs/ENGINE.md "Graph reuse"): a session's
// per-layer view covers kDecodeHeadroom entries more than it holds, masked, so only the inputs
// change between steps. The masked keys are skipped by the kernel, so a kept graph computes
// exactly what a graph built for the step computes: the logits are compared bit for bit with an
// engine that builds every step, and the graph count shows the reuse.
#include <cstring>

#include "test_util.h"

namespace pkv::test {
namespace {

Engine & engine_with_reuse(bool reuse) {
    static std::unique_ptr<Engine> engines[2];
    std::unique_ptr<Engine> &      e = engines[reuse ? 1 : 0];
    if (!e) {
        EngineOptions o;
        o.model_path          = embedded_model();
        o.device              = "cpu";
        o.n_threads           = 2;  // both the same: the kernels' split depends on it
        o.kv_pool_tokens      = 8000;
        o.reuse_decode_graphs = reuse;
        e                     = std::make_unique<Engine>(o);
    }
    return *e;
}

std::vector<int32_t> prompt_of(const Model & m, size_t chars, size_t offset) {
    const std::string text = essay_text(chars + offset).substr(offset);
    return m.tokenize(m.apply_chat_template(text + "\n\nWhat is this about?"), true);
}

CompressionParams params(const std::string & method, int budget) {
    CompressionParams p;
    p.method = method;
    p.budget = budget;
    return p;
}

CompressionParams full_params() { return CompressionParams{ "full" }; }

bool same_bits(const std::vector<float> & a, const std::vector<float> & b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// FullKV from ~420 entries to past kOwnKernelKv (where the view loses its headroom and the graph is
// built each step again), and PyramidKV@64 of a longer prompt (every layer well under it).
TEST(GraphReuse, AKeptDecodeGraphGivesTheLogitsOfAGraphBuiltForTheStepBitForBit) {
    Engine &      kept   = engine_with_reuse(true);
    Engine &      fresh  = engine_with_reuse(false);
    const Model & m      = kept.model();
    constexpr int kSteps = 150;
    struct Case {
        CompressionParams p;
        size_t            chars;
    };
    for (const Case & c : { Case{ full_params(), 1900 }, Case{ params("pyramidkv", 64), 2000 } }) {
        SCOPED_TRACE(c.p.method);
        const std::vector<int32_t> prompt = prompt_of(m, c.chars, 0);
        Session                    a(kept, c.p), b(fresh, c.p);
        a.prefill(prompt);
        b.prefill(prompt);
        ASSERT_TRUE(same_bits(a.logits(), b.logits()));
        std::printf("[graph reuse] %s: %zu prompt tokens\n", c.p.method.c_str(), prompt.size());
        const uint64_t kept0 = kept.graphs_built(), fresh0 = fresh.graphs_built();
        int            crossed_at = -1;  // the step whose FullKV layers reach kOwnKernelKv
        for (int step = 0; step < kSteps; ++step) {
            const int32_t tok = argmax(b.logits());  // both decode the same tokens
            if (crossed_at < 0 && a.stats().tokens_seen + 1 >= kOwnKernelKv && c.p.method == "full") crossed_at = step;
            a.decode(tok);
            b.decode(tok);
            ASSERT_TRUE(same_bits(a.logits(), b.logits())) << "step " << step;
            ASSERT_EQ(kept.last_graph().nodes, fresh.last_graph().nodes) << "step " << step;
        }
        const uint64_t built = kept.graphs_built() - kept0;
        EXPECT_EQ(fresh.graphs_built() - fresh0, (uint64_t) kSteps);
        if (c.p.method == "full") {
            ASSERT_GT(crossed_at, 0) << "the prompt must start under kOwnKernelKv and end past it";
            // Under kOwnKernelKv a graph per kDecodeHeadroom steps (and one at the edge); past
            // it, a graph per step, as without reuse.
            EXPECT_LE(built, (uint64_t) (crossed_at / kDecodeHeadroom + 2 + (kSteps - crossed_at)));
            EXPECT_GE(built, (uint64_t) (kSteps - crossed_at - 1));
        } else {
            EXPECT_LE(built, (uint64_t) (kSteps / kDecodeHeadroom + 2));
        }
    }
}

// Another session's prefill between two steps allocates its own graph in the same compute buffer:
// the kept graph is not run on it, and the logits stay those of a graph built for the step.
TEST(GraphReuse, AnotherGraphBetweenTwoStepsMakesTheNextStepBuildItsOwn) {
    Engine &      kept  = engine_with_reuse(true);
    Engine &      fresh = engine_with_reuse(false);
    const Model & m     = kept.model();
    const auto    p     = params("pyramidkv", 96);
    Session       a(kept, p), b(fresh, p);
    a.prefill(prompt_of(m, 1500, 0));
    b.prefill(prompt_of(m, 1500, 0));
    for (int step = 0; step < 24; ++step) {
        const int32_t tok = argmax(b.logits());
        if (step % 10 == 5) {
            // A one-off session, longer each time, prefills between two steps: its graph takes
            // the compute buffer (and grows it) while `a`'s views stay where they were.
            Session                    oa(kept, full_params()), ob(fresh, full_params());
            const std::vector<int32_t> other = prompt_of(m, 400 + 150 * step, 5000);
            oa.prefill(other);
            ob.prefill(other);
            ASSERT_TRUE(same_bits(oa.logits(), ob.logits())) << "step " << step;
            const uint64_t before = kept.graphs_built();
            a.decode(tok);
            EXPECT_EQ(kept.graphs_built(), before + 1) << "the kept graph ran after another graph was allocated";
        } else {
            a.decode(tok);
        }
        b.decode(tok);
        ASSERT_TRUE(same_bits(a.logits(), b.logits())) << "step " << step;
    }
}

}  // namespace
}  // namespace pkv::test
