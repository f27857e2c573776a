// The CLI contract: budgets JSON, generate --json keys, --dump-kept, and every user error →
// exit code 2 with exactly one line naming the parameter.
#include <fstream>

#include "protocol.h"
#include "serve.h"
#include "test_util.h"

namespace pkv::test {
namespace {

std::string engine() { return PKV_ENGINE_BIN; }

TEST(Cli, BudgetsJsonMatchesTheContract) {
    const CliResult r =
        run_cli(engine(), "budgets --layers 30 --budget 128 --prompt-len 4000 --window 8 --beta 20 --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(r.out.rfind("{\"layer_budgets\": [242, 235, 228, ", 0), 0u) << r.out;
    EXPECT_NE(r.out.find(", 46, 39]}\n"), std::string::npos) << r.out;
    EXPECT_EQ(count_lines(r.out), 1);
}

// The registry as the engine lists it without a model: every registered method with its traits,
// and the defaults (what serve's hello carries, with the built-in --chunk-size).
TEST(Cli, MethodsJsonListsTheRegistryAndTheDefaults) {
    const CliResult r = run_cli(engine(), "methods --json");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(count_lines(r.out), 1);
    const mp::Value listed = parse_json(r.out);
    EXPECT_EQ(listed, engine_catalog(kDefaultChunkSize));
    const auto & methods = listed.at("methods").as_array();
    ASSERT_EQ(methods.size(), all_methods().size());
    for (size_t i = 0; i < methods.size(); ++i) {
        const Method & m = *all_methods()[i];
        EXPECT_EQ(methods[i].at("name").as_str(), m.name);
        EXPECT_EQ(methods[i].at("compresses").as_bool(), m.compresses) << m.name;
        EXPECT_EQ(methods[i].at("min_budget").as_uint(), (uint64_t) m.min_budget) << m.name;
        EXPECT_EQ(methods[i].at("keeps_window").as_bool(), m.keeps_window) << m.name;
        EXPECT_EQ(methods[i].at("scores").size(), (size_t) m.needs_window_probs + m.needs_accumulated) << m.name;
    }
    const CompressionParams defaults;
    const mp::Value &       d = listed.at("defaults");
    EXPECT_EQ(d.at("method").as_str(), defaults.method);
    EXPECT_EQ(d.at("budget").as_uint(), (uint64_t) defaults.budget);
    EXPECT_EQ(d.at("window").as_uint(), (uint64_t) defaults.window);
    EXPECT_EQ(d.at("pooling").as_str(), pooling_name(defaults.pooling));
    EXPECT_EQ(d.at("chunk_size").as_uint(), (uint64_t) kDefaultChunkSize);
    EXPECT_EQ(d.at("max_tokens").as_uint(), (uint64_t) kDefaultMaxTokens);

    const CliResult text = run_cli(engine(), "methods");
    ASSERT_EQ(text.exit_code, 0) << text.err;
    for (const Method * m : all_methods()) EXPECT_NE(text.out.find(m->description), std::string::npos) << m->name;
}

struct BadInput {
    const char * name;
    const char * args;
    const char * param;  // the parameter the one-line error must name
};

void PrintTo(const BadInput & b, std::ostream * os) { *os << b.args; }

class CliErrors : public testing::TestWithParam<BadInput> {};

TEST_P(CliErrors, ExitTwoWithOneLineNamingTheParameter) {
    const BadInput    b    = GetParam();
    std::string       args = b.args;
    const std::string tmp  = testing::TempDir();
    std::ofstream(tmp + "pkv_empty.txt").close();
    {
        std::ofstream big(tmp + "pkv_huge.txt");
        for (int i = 0; i < 12000; ++i) big << "lorem ipsum dolor ";  // ~24k tokens > 8k context
    }
    std::ofstream(tmp + "pkv_not_a_model.gguf") << "not a gguf";
    for (auto [from, to] : { std::pair<std::string, std::string>{ "$TMP/", tmp } }) {
        for (size_t at; (at = args.find(from)) != std::string::npos;) args.replace(at, from.size(), to);
    }
    const CliResult r = run_cli(engine(), args);
    EXPECT_EQ(r.exit_code, 2) << args << "\n" << r.err;
    EXPECT_EQ(count_lines(r.err), 1) << r.err;
    EXPECT_EQ(r.err.rfind("error: ", 0), 0u) << r.err;
    EXPECT_NE(r.err.find(b.param), std::string::npos) << r.err;
    EXPECT_TRUE(r.out.empty()) << r.out;
}

INSTANTIATE_TEST_SUITE_P(
    Generate, CliErrors,
    testing::Values(BadInput{ "unknown_method", "generate --prompt hi --method magic", "--method" },
                    BadInput{ "budget_not_above_window", "generate --prompt hi --budget 8 --window 8", "--budget" },
                    BadInput{ "window_below_one", "generate --prompt hi --window 0", "--window" },
                    BadInput{ "beta_below_one", "generate --prompt hi --beta 0", "--beta" },
                    BadInput{ "kernel_even", "generate --prompt hi --kernel-size 4", "--kernel-size" },
                    BadInput{ "kernel_below_one", "generate --prompt hi --kernel-size 0", "--kernel-size" },
                    BadInput{ "budget_not_a_number", "generate --prompt hi --budget lots", "--budget" },
                    BadInput{ "missing_prompt_file", "generate --prompt-file $TMP/does_not_exist.txt",
                              "--prompt-file" },
                    BadInput{ "empty_prompt_file", "generate --prompt-file $TMP/pkv_empty.txt", "--prompt-file" },
                    BadInput{ "no_prompt", "generate", "--prompt" },
                    BadInput{ "unreadable_model", "generate --prompt hi --model $TMP/no_such_model.gguf", "--model" },
                    BadInput{ "not_a_gguf", "generate --prompt hi --model $TMP/pkv_not_a_model.gguf", "--model" },
                    BadInput{ "prompt_over_context", "generate --prompt-file $TMP/pkv_huge.txt --max-new-tokens 4",
                              "--prompt-file" },
                    BadInput{ "unknown_option", "generate --prompt hi --bogus 1", "--bogus" },
                    BadInput{ "unknown_pooling", "generate --prompt hi --pooling median", "--pooling" },
                    BadInput{ "budgets_missing_layers", "budgets --prompt-len 10", "--layers" },
                    BadInput{ "budgets_bad_window", "budgets --layers 4 --prompt-len 10 --window -1", "--window" },
                    BadInput{ "unknown_command", "frobnicate", "command" },
                    BadInput{ "methods_unknown_option", "methods --bogus", "--bogus" }),
    [](const testing::TestParamInfo<BadInput> & i) { return std::string(i.param.name); });

// bench --json: one row per test, one sample per repetition, whether or not it first warms up
// (one unmeasured prefill of each size and decode step of each row, as llama-bench).
TEST(Cli, BenchWarmsUpUnmeasuredAndReportsOneSamplePerRepetition) {
    const std::string model = make_random_gguf("cli_bench", "--arch llama --preset tiny --type q4_0 --seed 3");
    for (const bool warm : { true, false }) {
        SCOPED_TRACE(warm ? "warm-up" : "--no-warmup");
        const CliResult r = run_cli(engine(), "bench --model " + model +
                                                  " --threads 1 --repetitions 2 --prefill 16 --depths 0 --budgets 16"
                                                  " --budget-depth 32 --decode-tokens 3 --json" +
                                                  (warm ? "" : " --no-warmup"));
        ASSERT_EQ(r.exit_code, 0) << r.err;
        EXPECT_EQ(count_lines(r.out), 1) << r.out;
        const mp::Value          out = parse_json(r.out);
        std::vector<std::string> tests;
        for (const mp::Value & row : out.at("results").as_array()) {
            tests.push_back(row.at("test").as_str());
            EXPECT_EQ(row.at("samples").size(), 2u) << tests.back();
            EXPECT_GT(row.at("tokens_per_second").as_double(), 0.0) << tests.back();
        }
        EXPECT_EQ(tests, (std::vector<std::string>{ "pp16", "tg3@d0", "tg3@d32" }));
        for (const char * t : { "pp16", "tg3@d0", "tg3@d32" }) {
            const bool said = r.err.find(std::string("[bench] warm-up ") + t + "\n") != std::string::npos;
            EXPECT_EQ(said, warm) << t << "\n" << r.err;
        }
    }
}

TEST(Cli, GenerateJsonPrintsOneObjectWithTheContractKeys) {
    const std::string kept = testing::TempDir() + "pkv_kept.json";
    std::ofstream(testing::TempDir() + "pkv_doc.txt") << essay_text(3000);
    const CliResult r = run_cli(engine(), "generate --prompt-file " + testing::TempDir() +
                                              "pkv_doc.txt --question 'What is this about?' "
                                              "--method pyramidkv --budget 64 --max-new-tokens 8 --json --dump-kept " +
                                              kept);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_EQ(count_lines(r.out), 1) << r.out;
    EXPECT_EQ(r.out.front(), '{');
    for (const char * key : { "text", "model", "method", "budget", "prompt_tokens", "new_tokens", "layer_kv_lengths",
                              "kv_bytes", "full_kv_bytes", "prefill_seconds", "decode_tokens_per_second" }) {
        EXPECT_NE(r.out.find("\"" + std::string(key) + "\": "), std::string::npos) << key << " missing in " << r.out;
    }
    EXPECT_NE(r.out.find("\"method\": \"pyramidkv\""), std::string::npos);
    EXPECT_NE(r.out.find("\"model\": \"SmolLM2-135M-Instruct.Q4_1.gguf\""), std::string::npos);
    const std::string dump = read_file(kept);
    EXPECT_EQ(dump.rfind("{\"method\": \"pyramidkv\", \"budget\": 64, \"prompt_token_ids\": [", 0), 0u)
        << dump.substr(0, 200);
    EXPECT_NE(dump.find("\"kept\": [[["), std::string::npos);
}

TEST(Cli, GenerateStreamsTextThenASummary) {
    const CliResult r = run_cli(engine(), "generate --prompt 'Name a colour.' --max-new-tokens 6 --method snapkv");
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("method snapkv"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("KV bytes after prefill"), std::string::npos) << r.out;
    EXPECT_NE(r.out.find("decode"), std::string::npos) << r.out;
}

}  // namespace
}  // namespace pkv::test
