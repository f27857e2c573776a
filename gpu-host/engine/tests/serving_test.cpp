// Engine serving: sessions in one pool, chunked prefill bounds, batched decode, fork, save/restore.
#include "error.h"
#include "test_util.h"

namespace pkv::test {
namespace {

std::vector<int32_t> chat_tokens(const Model & m, size_t chars, size_t offset, const char * question) {
    const std::string text = essay_text(chars + offset).substr(offset);
    return m.tokenize(m.apply_chat_template(text + "\n\n" + question), true);
}

std::vector<int32_t> greedy_continue(Session & s, int steps) {
    std::vector<int32_t> out;
    for (int i = 0; i < steps; ++i) {
        out.push_back(argmax(s.logits()));
        s.decode(out.back());
    }
    return out;
}

CompressionParams params(const char * method, int budget) {
    CompressionParams p;
    p.method = method;
    p.budget = budget;
    return p;
}

// Exact equality: a restored session holds the same bytes (K/V f16 and logits copied verbatim)
// and decodes with the same kernels over the same number of entries: the same arithmetic.
TEST(Serving, SaveRestoreContinuesIdentically) {
    Engine &                   e      = engine_for(embedded_model());
    const std::vector<int32_t> prompt = chat_tokens(e.model(), 3000, 0, "What is this about?");
    for (const char * method : { "pyramidkv", "h2o", "full" }) {
        Session s(e, params(method, 64), 512);
        s.prefill(prompt);
        greedy_continue(s, 3);
        const std::string state = s.save();
        auto              r     = Session::restore(e, state);
        EXPECT_EQ(r->stats().layer_kv_lengths, s.stats().layer_kv_lengths);
        EXPECT_EQ(r->tokens(), s.tokens());
        EXPECT_EQ(r->positions(), s.positions());
        EXPECT_EQ(r->logits(), s.logits());
        const std::vector<int32_t> a = greedy_continue(s, 16), b = greedy_continue(*r, 16);
        EXPECT_EQ(a, b) << method;
        EXPECT_EQ(r->logits(), s.logits()) << method << ": logits after 16 more steps";
        EXPECT_EQ(r->save(), s.save()) << method << ": states equal after the same steps";
    }
}

TEST(Serving, RestoreRejectsDamagedStates) {
    Engine & e = engine_for(embedded_model());
    Session  s(e, params("snapkv", 64));
    s.prefill(chat_tokens(e.model(), 800, 0, "Why?"));
    const std::string good = s.save();
    const size_t      used = e.pool().used_bytes();
    for (const std::string & bad :
         { std::string(), good.substr(0, good.size() / 2), std::string("XXXX") + good.substr(4), good + "trailing" }) {
        EXPECT_THROW(Session::restore(e, bad), Error);
    }
    EXPECT_EQ(e.pool().used_bytes(), used) << "a failed restore leaves no pages behind";
}

TEST(Serving, ChunkedPrefillNeverHoldsMoreThanBudgetPlusChunk) {
    const int                  chunk = 256, budget = 64;
    Engine &                   shared_engine = engine_for(embedded_model());
    const std::vector<int32_t> prompt        = chat_tokens(shared_engine.model(), 9000, 0, "Summarise.");
    const int                  n             = (int) prompt.size();
    ASSERT_GT(n, 6 * chunk);
    CompressionParams   p = params("pyramidkv", budget);
    const ModelConfig & c = shared_engine.config();

    Session s(shared_engine, p, chunk);
    int     chunks = 0;
    s.append(prompt, [&](int done, int total) {
        ++chunks;
        EXPECT_EQ(total, n);
        const std::vector<int> budgets = find_method("pyramidkv")->layer_budgets(c.n_layer, done, p);
        const SessionStats     st      = s.stats();
        for (int il = 0; il < c.n_layer; ++il) {
            EXPECT_LE(st.layer_kv_lengths[il], std::max(budgets[il], 0)) << "after " << done << " tokens, layer " << il;
            EXPECT_LE(st.layer_kv_lengths[il], 2 * budget + chunk);
        }
    });
    EXPECT_EQ(chunks, (n + chunk - 1) / chunk);
    EXPECT_EQ(s.stats().layer_kv_lengths, find_method("pyramidkv")->layer_budgets(c.n_layer, n, p));

    // The bound is real: a pool with room for (largest layer budget + chunk + one ubatch of
    // slack) entries per layer admits the chunked prefill and refuses the one-shot one.
    EngineOptions o;
    o.model_path     = embedded_model();
    o.device         = "cpu";
    o.n_ubatch       = chunk;
    o.kv_pool_tokens = 2 * budget + chunk + 160;
    Engine  small(o);
    Session chunked(small, p, chunk);
    EXPECT_NO_THROW(chunked.prefill(prompt));
    Session one_shot(small, p, 0);
    try {
        one_shot.prefill(prompt);
        FAIL() << "a one-shot prefill of " << n << " tokens fit in a pool sized for budget + chunk";
    } catch (const Error & err) {
        EXPECT_EQ(err.param, "kv_pool");
        EXPECT_NE(std::string(err.what()).find("KV pool is full"), std::string::npos) << err.what();
    }
}

// Batched decode against each session decoding alone, both fed the same (alone's greedy) tokens.
// One graph for several sessions changes the arithmetic of one op only: every product with the
// Q4_1 weights is one ggml vec_dot per (row, column) whatever the column count, and attention runs
// per session over its own view; but the output projection (token_embd, Q8_0) takes llamafile's
// tinyBLAS for >= 2 columns and ggml's vec_dot for one. Both sum the same exact int8 block products
// in f32, in another order, so a logit may differ by a few f32 roundings of its ~20 block terms:
// far below kBatchRel of the logit range (and equal on some CPUs), while a session that read
// another's entries would be off by whole logits. So: logits within that bound at every step, and
// the same greedy token wherever alone's top-2 margin exceeds twice the bound (a near-tie may
// flip on some CPU). The K/V written stay bitwise equal, which keeps the comparison per step.
TEST(Serving, BatchedDecodeGivesEachSessionItsOwnTokens) {
    Engine & e = engine_for(embedded_model());
    struct Case {
        CompressionParams    p;
        std::vector<int32_t> prompt;
    };
    const std::vector<Case> cases = {
        { params("pyramidkv", 64), chat_tokens(e.model(), 2500, 0, "What is the main point?") },
        { params("full", 64), chat_tokens(e.model(), 600, 3000, "Name one idea.") },
        { params("snapkv", 96), chat_tokens(e.model(), 1800, 6000, "Who is the audience?") },
        { params("streamingllm", 64), chat_tokens(e.model(), 1200, 9000, "Give a title.") },
    };
    constexpr float                              kBatchRel = 1e-4f;
    const int                                    steps     = 16;
    std::vector<std::vector<int32_t>>            alone(cases.size());
    std::vector<std::vector<std::vector<float>>> alone_logits(cases.size());
    for (size_t i = 0; i < cases.size(); ++i) {
        Session s(e, cases[i].p);
        s.prefill(cases[i].prompt);
        for (int step = 0; step < steps; ++step) {
            alone_logits[i].push_back(s.logits());
            alone[i].push_back(argmax(s.logits()));
            s.decode(alone[i].back());
        }
    }
    std::vector<std::unique_ptr<Session>> sessions;
    std::vector<Session *>                ptrs;
    for (const Case & c : cases) {
        sessions.push_back(std::make_unique<Session>(e, c.p));
        sessions.back()->prefill(c.prompt);
        ptrs.push_back(sessions.back().get());
    }
    float worst    = 0;
    int   decisive = 0;
    for (int step = 0; step < steps; ++step) {
        std::vector<int32_t> next;
        for (size_t i = 0; i < ptrs.size(); ++i) {
            const std::vector<float> & want = alone_logits[i][step];
            const float                tol  = kBatchRel * logit_range(want);
            const float                diff = max_abs_diff(ptrs[i]->logits(), want);
            worst                           = std::max(worst, diff / logit_range(want));
            EXPECT_LE(diff, tol) << "session " << i << " (" << cases[i].p.method << "), step " << step;
            if (top2_margin(want) > 2 * tol) {
                ++decisive;
                EXPECT_EQ(argmax(ptrs[i]->logits()), alone[i][step])
                    << "session " << i << " (" << cases[i].p.method << "), step " << step;
            }
            next.push_back(alone[i][step]);
        }
        e.decode_batch(ptrs, next);
    }
    std::printf(
        "[batched] %zu sessions x %d steps: max |dlogit| %.2g of the range; greedy agrees on all %d steps "
        "whose margin exceeds the bound\n",
        cases.size(), steps, worst, decisive);
    EXPECT_THROW(e.decode_batch({ ptrs[0], ptrs[0] }, { 1, 2 }), Error);
}

// Exact equality: the fork's source and the independent session run the same prefill arithmetic
// (scores are graph nodes beside the attention, the same for both), select from the same scores,
// and keep K/V rows by copying (f16 → f32 → f16 is lossless): bitwise equal stores, so equal
// logits and tokens on any CPU.
TEST(Serving, ForkEqualsAnIndependentRun) {
    Engine &                   e      = engine_for(embedded_model());
    const std::vector<int32_t> prompt = chat_tokens(e.model(), 3500, 0, "What does the author recommend?");
    Session                    source(e, params("full", 128));
    source.set_keep_scores(true);
    source.prefill(prompt);
    const size_t source_bytes = source.stats().kv_bytes;
    for (const auto & [method, budget] : std::vector<std::pair<const char *, int>>{
             { "pyramidkv", 64 }, { "snapkv", 128 }, { "h2o", 64 }, { "streamingllm", 64 }, { "full", 0 } }) {
        auto    fork = source.fork(params(method, budget > 0 ? budget : 128));
        Session independent(e, params(method, budget > 0 ? budget : 128));
        independent.prefill(prompt);
        EXPECT_EQ(fork->kept(), independent.kept()) << method;
        EXPECT_EQ(fork->stats().layer_kv_lengths, independent.stats().layer_kv_lengths) << method;
        EXPECT_EQ(fork->logits(), independent.logits()) << method;
        EXPECT_EQ(greedy_continue(*fork, 12), greedy_continue(independent, 12)) << method;
    }
    EXPECT_EQ(source.stats().kv_bytes, source_bytes) << "forking leaves the source untouched";
    Session compressed(e, params("snapkv", 64));
    compressed.set_keep_scores(true);
    compressed.prefill(prompt);
    EXPECT_THROW(compressed.fork(params("h2o", 64)), Error) << "an already compressed prefill is not exact";
    Session no_scores(e, params("full", 64));
    no_scores.prefill(prompt);
    EXPECT_THROW(no_scores.fork(params("snapkv", 64)), Error);
}

TEST(Serving, MultiTurnKeepsTheCompressedHistoryAndAppends) {
    Engine & e = engine_for(embedded_model());
    Session  s(e, params("pyramidkv", 64), 512);
    s.append(chat_tokens(e.model(), 3000, 0, "What is the essay about?"));
    const int after_first = s.stats().tokens_seen;
    greedy_continue(s, 8);
    const std::vector<int32_t> turn2 =
        e.model().tokenize("\n" + e.model().apply_chat_template("And who wrote it?"), false);
    s.append(turn2);
    const SessionStats st = s.stats();
    EXPECT_EQ(st.tokens_seen, after_first + 8 + (int) turn2.size());
    const std::vector<int> budgets =
        find_method("pyramidkv")->layer_budgets(e.config().n_layer, st.tokens_seen, s.params());
    EXPECT_EQ(st.layer_kv_lengths, budgets) << "every turn is compressed to the budgets of the tokens seen";
    for (const auto & layer : s.positions())
        for (const auto & head : layer) EXPECT_EQ(head.back(), st.tokens_seen - 1) << "the newest token is always kept";
}

TEST(Serving, PoolFullIsACleanErrorAndOtherSessionsContinue) {
    EngineOptions o;
    o.model_path     = embedded_model();
    o.device         = "cpu";
    o.kv_pool_tokens = 700;
    Engine                     e(o);
    const std::vector<int32_t> prompt = chat_tokens(e.model(), 1500, 0, "Why?");
    Session                    a(e, params("pyramidkv", 64));
    a.prefill(prompt);
    Session b(e, params("full", 64));
    try {
        b.prefill(prompt);
        b.prefill(prompt);
        FAIL() << "the pool should have refused";
    } catch (const Error & err) {
        EXPECT_EQ(err.param, "kv_pool");
    }
    EXPECT_EQ(greedy_continue(a, 4).size(), 4u) << "the first session still decodes";
}

}  // namespace
}  // namespace pkv::test
