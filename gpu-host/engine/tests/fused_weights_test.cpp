// Projections that read one input and share a type are one matmul (docs/ENGINE.md "Weights
// layout"): q, k, v as one [n_embd, n_q + 2 n_kv] weight (q and k alone when v's type differs, as
// in Q4_K_M), gate and up as one [n_embd, 2 n_ff]. Every output row is the same dot product over
// the same quantised input, so an engine with fused weights gives the logits of one without, bit
// for bit: with qwen2's biases and qwen3's q/k norms (applied to views of the fused output), a V
// of another type, Q4_0 weights in the CPU's repacked layout, and the embedded model.
#include <cstring>

#include "test_util.h"

namespace pkv::test {
namespace {

std::string random_model(const std::string & name, const std::string & flags) {
    return make_random_gguf("fused_" + name, "--preset tiny --seed 11 " + flags);
}

std::unique_ptr<Engine> engine(const std::string & path, bool fuse) {
    EngineOptions o;
    o.model_path       = path;
    o.device           = "cpu";
    o.n_threads        = 2;  // both the same: the kernels' split depends on it
    o.kv_pool_tokens   = 2048;
    o.fuse_projections = fuse;
    return std::make_unique<Engine>(o);
}

bool same_bits(const std::vector<float> & a, const std::vector<float> & b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

// A prompt's logits, then `steps` greedy decode steps', FullKV and PyramidKV@32 (a compression,
// whose scores read the fused q and k): the same bits with and without fusion.
void expect_same_logits(Engine & fused, Engine & plain, int steps = 6) {
    std::vector<int32_t> prompt;
    for (int i = 0; i < 160; ++i) prompt.push_back(50 + (i * 7919) % 4000);
    for (const char * method : { "full", "pyramidkv" }) {
        SCOPED_TRACE(method);
        CompressionParams p;
        p.method = method;
        p.budget = 32;
        Session a(fused, p), b(plain, p);
        a.prefill(prompt);
        b.prefill(prompt);
        ASSERT_TRUE(same_bits(a.logits(), b.logits()))
            << "prefill, max |diff| " << max_abs_diff(a.logits(), b.logits());
        for (int s = 0; s < steps; ++s) {
            const int32_t next = argmax(a.logits());
            a.decode(next);
            b.decode(next);
            ASSERT_TRUE(same_bits(a.logits(), b.logits()))
                << "decode step " << s << ", max |diff| " << max_abs_diff(a.logits(), b.logits());
        }
    }
}

TEST(FusedWeights, QkvAndGateUpAreOneTensorEachWhenTheirTypesAgree) {
    auto          e = engine(random_model("llama_q4_0", "--arch llama --type q4_0"), true);
    const Model & m = e->model();
    const auto &  c = m.config();
    for (const LayerWeights & l : m.layers) {
        ASSERT_NE(l.wqkv, nullptr);
        EXPECT_EQ(l.wqkv->ne[1], (int64_t) (c.n_head + 2 * c.n_head_kv) * c.head_dim);
        EXPECT_EQ(l.wq, nullptr);
        EXPECT_EQ(l.wk, nullptr);
        EXPECT_EQ(l.wv, nullptr);
        EXPECT_EQ(l.wqk, nullptr);
        ASSERT_NE(l.ffn_gate_up, nullptr);
        EXPECT_EQ(l.ffn_gate_up->ne[1], 2 * (int64_t) c.n_ff);
        EXPECT_EQ(l.ffn_gate, nullptr);
        EXPECT_EQ(l.ffn_up, nullptr);
        EXPECT_EQ(l.matmul_weights().size(), 4u);
    }
    auto plain = engine(random_model("llama_q4_0", "--arch llama --type q4_0"), false);
    EXPECT_EQ(plain->model().layers[0].wqkv, nullptr);
    EXPECT_EQ(plain->model().layers[0].matmul_weights().size(), 7u);
    EXPECT_EQ(m.weight_bytes(), plain->model().weight_bytes()) << "fusing moves bytes, it adds none";
    expect_same_logits(*e, *plain);
}

TEST(FusedWeights, AVOfAnotherTypeStaysAloneAndQkAreFused) {
    const std::string path = random_model("llama_mixed", "--arch llama --type q4_0 --type-v q8_0");
    auto              e = engine(path, true), plain = engine(path, false);
    for (const LayerWeights & l : e->model().layers) {
        EXPECT_EQ(l.wqkv, nullptr);
        ASSERT_NE(l.wqk, nullptr);
        ASSERT_NE(l.wv, nullptr);
        EXPECT_EQ(l.wv->type, GGML_TYPE_Q8_0);
        EXPECT_EQ(l.ffn_down->type, GGML_TYPE_Q8_0);
        EXPECT_NE(l.ffn_gate_up, nullptr);
    }
    expect_same_logits(*e, *plain);
}

TEST(FusedWeights, Qwen2BiasesAndQwen3NormsApplyToTheFusedViews) {
    for (const char * arch : { "qwen2", "qwen3" }) {
        SCOPED_TRACE(arch);
        const std::string path = random_model(arch, std::string("--arch ") + arch + " --type q8_0");
        auto              e = engine(path, true), plain = engine(path, false);
        ASSERT_NE(e->model().layers[0].wqkv, nullptr);
        expect_same_logits(*e, *plain);
    }
}

TEST(FusedWeights, TheEmbeddedModelGivesTheSameLogits) {
    auto e = engine(embedded_model(), true), plain = engine(embedded_model(), false);
    int  fused = 0;
    for (const LayerWeights & l : e->model().layers) fused += (l.wqkv || l.wqk) + (l.ffn_gate_up != nullptr);
    EXPECT_GT(fused, 0);
    expect_same_logits(*e, *plain, 3);
}

}  // namespace
}  // namespace pkv::test
