// The engine against libllama (llama_decode) on the same model and tokens: FullKV on the embedded
// model and on random-weight GGUFs of every supported architecture (made here with
// pkv-make-gguf), and StreamingLLM against libllama with the evicted cells removed from its cache.
//
// Every comparison here is exact — logits within 1e-4 of their range and identical free-running
// greedy tokens — because both sides run the same arithmetic, which holds on any x86-64 CPU
// (docs/ENGINE.md, "Tests on any CPU"): the same ggml CPU kernels on the same operands in the same
// order. Whatever a CPU's SIMD width or instruction set does to the rounding, it does to both
// sides alike. What the tests pin to get there:
// - one thread (kThreads): for a single query over >= 512 keys, ggml's flash attention splits the
//   keys into one chunk per thread and accumulates V in f16 per chunk; libllama pads its KV view
//   to a multiple of 256 keys, so with several threads its chunks, and their rounding, would
//   differ from ours (up to ~4 % of the logit range on SmolLM2 after 600 tokens);
// - the same weight layout on both sides: each weight in the first of the CPU's extra buffer types
//   (repacked for other kernels, or AMX) that runs the op it feeds, else the plain buffer — the
//   engine's default and libllama's use_extra_bufts; or both plain (--no-repack against
//   use_extra_bufts off, RandomArch's Q4_0 case once more);
// - the same ubatch split (512 from the front) and the same order of KV cells (StreamingLLM below).
#include <cmath>
#include <functional>

#include "llama.h"
#include "test_util.h"

namespace pkv::test {
namespace {

constexpr int kThreads = 1;  // see the top of this file

// Same arithmetic on both sides: the logits may differ only by float noise far below this (they
// are bitwise equal in practice); any real difference in the computation is orders larger.
constexpr float kExactRel = 1e-4f;

// libllama logs every model load; the test output should show results, not loader chatter.
const bool kQuietLibllama = (llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr), true);

// libllama reference: decodes the prompt in ubatches of 512, then greedy tokens one at a time.
class Reference {
  public:
    // n_seq_max 2: room for a filler sequence (fill()) beside sequence 0.
    Reference(const std::string & path, int n_ctx, int n_seq_max = 1, bool repack = true) {
        llama_model_params mp = llama_model_default_params();
        mp.n_gpu_layers       = 0;
        // Which weights are repacked (Q4_0, Q4_K, IQ4_NL on AVX2, Q2_K on AVX-512) or handed to
        // AMX (Intel CPUs that have it) depends on the CPU, and a repacked weight is multiplied by
        // other kernels than a plain one: libllama must place every weight as the engine does.
        // Both ask the CPU's extra buffer types, in the CPU's order, whether they run the op the
        // weight feeds (docs/ENGINE.md "Weights layout"); `repack` false: neither asks.
        mp.use_extra_bufts      = repack;
        model_                  = llama_model_load_from_file(path.c_str(), mp);
        llama_context_params cp = llama_context_default_params();
        cp.n_ctx                = n_ctx;
        cp.n_batch              = 512;
        cp.n_ubatch             = 512;
        cp.n_seq_max            = n_seq_max;
        cp.kv_unified           = true;                           // one cell list for all sequences (see fill())
        cp.flash_attn_type      = LLAMA_FLASH_ATTN_TYPE_ENABLED;  // the engine always uses flash attention
        cp.no_perf              = true;
        cp.n_threads = cp.n_threads_batch = kThreads;
        ctx_                              = model_ ? llama_init_from_model(model_, cp) : nullptr;
        n_vocab_                          = model_ ? llama_vocab_n_tokens(llama_model_get_vocab(model_)) : 0;
    }
    ~Reference() {
        if (ctx_) llama_free(ctx_);
        if (model_) llama_model_free(model_);
    }
    bool               ok() const { return ctx_ != nullptr; }
    std::vector<float> decode(std::vector<int32_t> tokens) {
        for (size_t i = 0; i < tokens.size(); i += 512) {
            const int n = (int) std::min<size_t>(512, tokens.size() - i);
            EXPECT_EQ(llama_decode(ctx_, llama_batch_get_one(tokens.data() + i, n)), 0);
        }
        const float * l = llama_get_logits_ith(ctx_, -1);
        return std::vector<float>(l, l + n_vocab_);
    }
    // Drop sequence 0's positions [p0, p1) from the cache; the rest keep their positions.
    bool evict(int p0, int p1) { return llama_memory_seq_rm(llama_get_memory(ctx_), 0, p0, p1); }
    // Occupy the next free cells, in cell order, with `tokens` as sequence 1, which sequence 0
    // never attends to (masked -inf, and ggml's attention kernels skip masked keys).
    bool fill(const std::vector<int32_t> & tokens) {
        for (size_t i = 0; i < tokens.size(); i += 512) {
            const int   n = (int) std::min<size_t>(512, tokens.size() - i);
            llama_batch b = llama_batch_init(n, 0, 1);
            for (int j = 0; j < n; ++j) {
                b.token[j]     = tokens[i + j];
                b.pos[j]       = (llama_pos) (i + j);
                b.n_seq_id[j]  = 1;
                b.seq_id[j][0] = 1;
                b.logits[j]    = j == n - 1;
            }
            b.n_tokens   = n;
            const int rc = llama_decode(ctx_, b);
            llama_batch_free(b);
            if (rc != 0) return false;
        }
        return true;
    }

  private:
    llama_model *   model_   = nullptr;
    llama_context * ctx_     = nullptr;
    int             n_vocab_ = 0;
};

struct Comparison {
    int   steps         = 0;  // greedy steps decoded with identical tokens
    float worst_prefill = 0, worst_decode = 0;
};

// `ours` has prefilled `prompt`; libllama prefills it, then `after_prefill` edits libllama's cache
// (to drop what ours dropped), then `steps` free-running greedy tokens on each side: the
// sequences must be identical and the logits agree to kExactRel of their range at every step.
Comparison compare_with_reference(Session & ours, Reference & ref, const std::vector<int32_t> & prompt, int steps,
                                  const std::function<void()> & after_prefill = {}) {
    Comparison         cmp;
    std::vector<float> ref_logits = ref.decode(prompt);
    const float        tol        = kExactRel * logit_range(ref_logits);
    cmp.worst_prefill             = max_abs_diff(ours.logits(), ref_logits);
    EXPECT_LE(cmp.worst_prefill, tol) << "prompt logits differ";
    if (after_prefill) after_prefill();
    std::vector<int32_t> ours_tokens, ref_tokens;
    for (int i = 0; i < steps; ++i) {
        ours_tokens.push_back(argmax(ours.logits()));
        ref_tokens.push_back(argmax(ref_logits));
        if (ours_tokens.back() != ref_tokens.back()) break;
        ours.decode(ours_tokens.back());
        ref_logits       = ref.decode({ ref_tokens.back() });
        cmp.worst_decode = std::max(cmp.worst_decode, max_abs_diff(ours.logits(), ref_logits));
        cmp.steps        = i + 1;
    }
    EXPECT_EQ(ours_tokens, ref_tokens);
    EXPECT_LE(cmp.worst_decode, tol) << "decode logits differ";
    return cmp;
}

void report(const char * what, const std::vector<int32_t> & prompt, const Comparison & c) {
    std::printf(
        "[reference] %s: %zu prompt tokens, %d greedy steps identical, max |dlogit| prefill %.6f, decode %.6f\n", what,
        prompt.size(), c.steps, c.worst_prefill, c.worst_decode);
}

std::vector<int32_t> essay_prompt(size_t chars, const char * question) {
    const Model & m = engine_for(embedded_model(), kThreads).model();
    return m.tokenize(m.apply_chat_template(essay_text(chars) + "\n\n" + question), true);
}

TEST(Reference, EmbeddedModelFullKvMatchesLibllamaExactly) {
    const std::vector<int32_t> prompt = essay_prompt(560, "Summarise the text above.");
    ASSERT_LT(prompt.size() + 64, 256u);
    Reference ref(embedded_model(), 256);
    ASSERT_TRUE(ref.ok());
    Session ours(engine_for(embedded_model(), kThreads), CompressionParams{ "full" });
    ours.prefill(prompt);
    const Comparison c = compare_with_reference(ours, ref, prompt, 64);
    EXPECT_EQ(c.steps, 64);
    report("SmolLM2 FullKV, free-running", prompt, c);
}

TEST(Reference, EmbeddedModelFullKvMatchesLibllamaOverSeveralUbatches) {
    const std::vector<int32_t> prompt = essay_prompt(2600, "Summarise the text above.");
    // Two ubatches, and decode over >= 512 keys: libllama's padded view takes ggml's split-KV
    // decode path, which on one thread is one chunk, the same sums as ours.
    ASSERT_GT(prompt.size(), 520u);
    Reference ref(embedded_model(), (int) prompt.size() + 72);
    ASSERT_TRUE(ref.ok());
    Session ours(engine_for(embedded_model(), kThreads), CompressionParams{ "full" });
    ours.prefill(prompt);
    const Comparison c = compare_with_reference(ours, ref, prompt, 64);
    EXPECT_EQ(c.steps, 64);
    report("SmolLM2 FullKV over 2 ubatches, free-running", prompt, c);
}

struct ArchCase {
    const char * name;
    const char * flags;
};

void PrintTo(const ArchCase & c, std::ostream * os) { *os << c.name << " (" << c.flags << ")"; }

class RandomArch : public testing::TestWithParam<ArchCase> {};

TEST_P(RandomArch, FullKvMatchesLibllama) {
    const ArchCase    c    = GetParam();
    const std::string path = testing::TempDir() + "pkv_random_" + c.name + ".gguf";
    const CliResult   made =
        run_cli(PKV_MAKE_GGUF_BIN, std::string(c.flags) + " --out " + path + " --vocab-from " + embedded_model());
    ASSERT_EQ(made.exit_code, 0) << made.err;
    std::vector<int32_t> prompt;
    for (int i = 0; i < 150; ++i) prompt.push_back((i * 7919 + 13) % 4000 + 100);
    Reference ref(path, 256);
    ASSERT_TRUE(ref.ok());
    Session ours(engine_for(path, kThreads), CompressionParams{ "full" });
    ours.prefill(prompt);
    const Comparison cmp = compare_with_reference(ours, ref, prompt, 64);
    EXPECT_EQ(cmp.steps, 64);
    report(c.name, prompt, cmp);
}

// f32 weights for every architecture; Q4_0 once more, a type both sides repack for other kernels
// on AVX2 CPUs (the engine's matmul weights then sit in an extra buffer type; weights_test checks
// that they do), and Q4_0 with a tied output, which both copy into the matmul layout.
INSTANTIATE_TEST_SUITE_P(
    Archs, RandomArch,
    testing::Values(ArchCase{ "llama", "--arch llama --preset tiny --seed 1" },
                    ArchCase{ "llama3_rope_freqs", "--arch llama --preset tiny --rope-freqs --seed 2" },
                    ArchCase{ "mistral3", "--arch mistral3 --preset tiny --seed 3" },
                    ArchCase{ "qwen2", "--arch qwen2 --preset tiny --seed 4" },
                    ArchCase{ "qwen3", "--arch qwen3 --preset tiny --seed 5" },
                    ArchCase{ "llama_q4_0", "--arch llama --preset tiny --type q4_0 --seed 6" },
                    ArchCase{ "llama_q4_0_tied", "--arch llama --preset tiny --type q4_0 --tied --seed 8" }),
    [](const testing::TestParamInfo<ArchCase> & i) { return std::string(i.param.name); });

// --no-repack against libllama without extra buffer types: both keep the Q4_0 weights plain and
// multiply them with ggml's vec_dot kernels.
TEST(Reference, PlainQ4_0WeightsMatchLibllamaWithoutExtraBufferTypes) {
    const std::string path = testing::TempDir() + "pkv_random_llama_q4_0_plain.gguf";
    const CliResult made = run_cli(PKV_MAKE_GGUF_BIN, "--arch llama --preset tiny --type q4_0 --seed 6 --out " + path +
                                                          " --vocab-from " + embedded_model());
    ASSERT_EQ(made.exit_code, 0) << made.err;
    std::vector<int32_t> prompt;
    for (int i = 0; i < 150; ++i) prompt.push_back((i * 7919 + 13) % 4000 + 100);
    Reference ref(path, 256, 1, /*repack=*/false);
    ASSERT_TRUE(ref.ok());
    EngineOptions o;
    o.model_path     = path;
    o.device         = "cpu";
    o.n_threads      = kThreads;
    o.repack_weights = false;
    Engine engine(o);
    for (const auto & [buft, bytes] : engine.model().weight_buffers()) EXPECT_EQ(buft, "CPU");
    Session ours(engine, CompressionParams{ "full" });
    ours.prefill(prompt);
    const Comparison cmp = compare_with_reference(ours, ref, prompt, 64);
    EXPECT_EQ(cmp.steps, 64);
    report("llama_q4_0 without repacking", prompt, cmp);
}

TEST(Reference, UnsupportedArchitectureIsRefused) {
    const std::string path = testing::TempDir() + "pkv_random_gpt2.gguf";
    ASSERT_EQ(
        run_cli(PKV_MAKE_GGUF_BIN, "--arch gpt2 --preset tiny --out " + path + " --vocab-from " + embedded_model())
            .exit_code,
        0);
    const CliResult r = run_cli(PKV_ENGINE_BIN, "generate --model " + path + " --prompt hello --max-new-tokens 1");
    EXPECT_EQ(r.exit_code, 2);
    EXPECT_NE(r.err.find("unsupported architecture 'gpt2'"), std::string::npos) << r.err;
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
}

// StreamingLLM keeps the same positions in every layer and head, which libllama can express:
// remove cells [4, n - (budget - 4)) of its cache, the rest keeping their positions. Decoding
// after that must match ours exactly — compaction, attention over a compressed store, and new
// tokens at position n (tokens seen), not at the stored length (which fails at the first step).
//
// The same arithmetic needs the same order of KV cells: ggml's decode kernel accumulates V in f16
// in cell order (skipping masked cells), and libllama would write seq 0's new tokens into the
// first free cells, between the sinks and the recent window, where we append after the window.
// A filler sequence takes the freed cells first, so libllama's new tokens land after the recent
// window too: seq 0 then sees sinks, recent window, new tokens — our order — and skips the filler.
TEST(Reference, StreamingLlmMatchesLibllamaWithEvictedCells) {
    const std::vector<int32_t> prompt = essay_prompt(2400, "What is this text about?");
    const int                  n = (int) prompt.size(), budget = 128, sinks = 4, steps = 32;
    ASSERT_GT(n, 2 * budget);
    CompressionParams p;
    p.method = "streamingllm";
    p.budget = budget;
    Session ours(engine_for(embedded_model(), kThreads), p);
    ours.prefill(prompt);
    for (int len : ours.stats().layer_kv_lengths) ASSERT_EQ(len, budget);

    Reference ref(embedded_model(), n + steps + 8, /*n_seq_max=*/2);
    ASSERT_TRUE(ref.ok());
    const int        evict_from = sinks, evict_to = n - (budget - sinks);
    const Comparison c = compare_with_reference(ours, ref, prompt, steps, [&] {
        ASSERT_TRUE(ref.evict(evict_from, evict_to));
        ASSERT_TRUE(ref.fill(std::vector<int32_t>(prompt.begin() + evict_from, prompt.begin() + evict_to)));
    });
    EXPECT_EQ(c.steps, steps);
    for (int len : ours.stats().layer_kv_lengths) EXPECT_EQ(len, budget + c.steps);
    report("SmolLM2 streamingllm@128 vs evicted libllama cells, free-running", prompt, c);
}

}  // namespace
}  // namespace pkv::test
