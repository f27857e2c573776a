// The text of token frames (TokenStream): stop strings never emitted, frames held with their
// text, whole UTF-8 characters only, the frames' texts joined = the whole text. Model-free: the
// tokens are byte strings chosen to cut stop strings and characters where a model's might.
#include <gtest/gtest.h>

#include <cmath>

#include "sampling.h"

namespace pkv::test {
namespace {

struct Streamed {
    std::vector<TokenStream::Frame> frames;
    std::string                     joined;
    bool                            stopped = false;
};

Streamed run(const std::vector<std::string> & tokens, const std::vector<std::string> & stops, bool finish = true) {
    TokenStream s(stops);
    Streamed    r;
    for (const std::string & t : tokens) {
        for (auto & f : s.push(t)) r.frames.push_back(f);
        if (s.stopped()) break;
    }
    r.stopped = s.stopped();
    if (!r.stopped && finish) {
        for (auto & f : s.finish()) r.frames.push_back(f);
    }
    for (const auto & f : r.frames) r.joined += f.text;
    EXPECT_EQ(r.joined, s.text()) << "the frames' texts joined are the whole text";
    return r;
}

bool valid(const std::string & s) { return valid_utf8(s) == s; }

TEST(TokenStream, AStopStringOverThreeTokensIsNeverEmitted) {
    // "<|end|>" arrives as "<|" + "en" + "d|>": after "<|" and "en" the frames wait, then the
    // stop completes and neither its text nor its tokens' frames go out.
    const std::vector<std::string> tokens = { "Hello", " world", "<|", "en", "d|>", " after" };
    TokenStream                    s({ "<|end|>" });
    std::string                    streamed;
    std::vector<size_t>            sent;
    for (size_t i = 0; i < tokens.size() && !s.stopped(); ++i) {
        for (const auto & f : s.push(tokens[i])) streamed += f.text, sent.push_back(f.index);
        if (i == 2 || i == 3) {
            EXPECT_EQ(streamed, "Hello world") << "after token " << i << ": the start of the stop is held back";
        }
    }
    EXPECT_TRUE(s.stopped());
    EXPECT_EQ(streamed, "Hello world");
    EXPECT_EQ(s.text(), "Hello world");
    EXPECT_EQ(sent, (std::vector<size_t>{ 0, 1 })) << "the stop string's three tokens send no frame";
}

TEST(TokenStream, ATokenThatBeginsTheStopMidwaySendsTheTextBeforeIt) {
    const Streamed r = run({ "The answer", " is 4", "2.\n\nUs", "er: more" }, { "\n\nUser:" });
    EXPECT_TRUE(r.stopped);
    EXPECT_EQ(r.joined, "The answer is 42.");
    ASSERT_EQ(r.frames.size(), 3u);
    EXPECT_EQ(r.frames[2].text, "2.") << "the token that holds the stop's start keeps its frame, cut before it";
    EXPECT_EQ(r.frames[2].bytes, "2.\n\nUs") << "bytes stay the token's own (logprobs describe the whole token)";
}

TEST(TokenStream, HeldTextThatTurnsOutNoStopGoesOutWithItsFrames) {
    const Streamed r = run({ "a <", "|e", "x", "|> b" }, { "<|end|>" });
    EXPECT_FALSE(r.stopped);
    EXPECT_EQ(r.joined, "a <|ex|> b");
    ASSERT_EQ(r.frames.size(), 4u) << "one frame per token, none lost while held";
    for (size_t i = 0; i < r.frames.size(); ++i) EXPECT_EQ(r.frames[i].index, i);
    // A prefix of a stop string at the very end is released by finish().
    const Streamed tail = run({ "x", " <|en" }, { "<|end|>" });
    EXPECT_EQ(tail.joined, "x <|en");
    EXPECT_EQ(tail.frames.size(), 2u);
}

TEST(TokenStream, TheEarliestOfSeveralStopsWins) {
    const Streamed r = run({ "one two", " three four" }, { "four", "two" });
    EXPECT_TRUE(r.stopped);
    EXPECT_EQ(r.joined, "one ");
}

TEST(TokenStream, CharactersSplitAcrossTokensGoOutWhole) {
    // "é" = C3 A9 and "😀" = F0 9F 98 80, split over byte-level tokens.
    const Streamed r = run({ "caf", "\xC3", "\xA9 ", "\xF0\x9F", "\x98", "\x80!" }, {});
    EXPECT_EQ(r.joined, "caf\xC3\xA9 \xF0\x9F\x98\x80!");
    ASSERT_EQ(r.frames.size(), 6u);
    for (const auto & f : r.frames) EXPECT_TRUE(valid(f.text)) << "frame " << f.index;
    EXPECT_EQ(r.frames[1].text, "");
    EXPECT_EQ(r.frames[1].bytes, "\xC3") << "bytes carry the partial character";
    EXPECT_EQ(r.frames[2].text, "\xC3\xA9 ");
}

TEST(TokenStream, BytesThatAreNoCharacterNeverReachAFrame) {
    // A lone continuation byte (0x91, as a byte-level token emits it), an invalid lead, a
    // truncated sequence followed by ASCII, and a character left incomplete at the end.
    const Streamed r = run({ "a", "\x91", "b", "\xFF", "\xE2\x80", "c", "\xE2\x80" }, {});
    for (const auto & f : r.frames) EXPECT_TRUE(valid(f.text)) << "frame " << f.index << " is not UTF-8";
    EXPECT_EQ(r.joined,
              "a\xEF\xBF\xBD"
              "b\xEF\xBF\xBD\xEF\xBF\xBD"
              "c\xEF\xBF\xBD");
    EXPECT_EQ(r.frames.size(), 7u);
    // The same bytes converted at once give the same text: cuts never split a character.
    EXPECT_EQ(r.joined, valid_utf8("a\x91"
                                   "b\xFF\xE2\x80"
                                   "c\xE2\x80"));
}

TEST(TokenStream, ValidUtf8RefusesOverlongsSurrogatesAndBeyondUnicode) {
    for (const char * bad :
         { "\xC0\xAF", "\xE0\x80\xAF", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xF8\x88\x80\x80\x80" }) {
        const std::string out = valid_utf8(bad);
        EXPECT_TRUE(valid(out));
        EXPECT_NE(out, bad);
        EXPECT_NE(out.find("\xEF\xBF\xBD"), std::string::npos);
    }
    const std::string good = "ASCII \xC2\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80 \xF4\x8F\xBF\xBF";
    EXPECT_EQ(valid_utf8(good), good);
}

TEST(TokenStream, AStopAfterAnIncompleteCharacterKeepsTheTextValid) {
    const Streamed r = run({ "x\xE2\x80", "STOP" }, { "STOP" });
    EXPECT_TRUE(r.stopped);
    EXPECT_EQ(r.joined, "x\xEF\xBF\xBD");
    for (const auto & f : r.frames) EXPECT_TRUE(valid(f.text));
}

TEST(Sampling, SeedsFoldIntoLibllamasDrawWithoutMeaningRandom) {
    EXPECT_EQ(fold_seed(0), 0u);
    EXPECT_EQ(fold_seed(123456789), 123456789u);
    EXPECT_NE(fold_seed(0xFFFFFFFFull), 0xFFFFFFFFu) << "LLAMA_DEFAULT_SEED would make libllama pick a random seed";
    EXPECT_NE(fold_seed(1ull << 40), fold_seed(1ull << 41)) << "64-bit seeds keep their high bits";
    EXPECT_NE(random_seed(), 0xFFFFFFFFull);
}

TEST(Sampling, LogprobsAreTheModelsLogSoftmax) {
    const std::vector<float> logits = { 1.0f, 3.0f, 2.0f, 3.0f, -1.0f };
    const TokenLogprobs      lp     = token_logprobs(logits, 2, 3);
    double                   z      = 0;
    for (float l : logits) z += std::exp((double) l);
    EXPECT_NEAR(lp.logprob, 2.0 - std::log(z), 1e-5);
    ASSERT_EQ(lp.top.size(), 3u);
    EXPECT_EQ(lp.top[0].first, 1) << "ties go to the lower id, as argmax picks";
    EXPECT_EQ(lp.top[1].first, 3);
    EXPECT_EQ(lp.top[2].first, 2);
    EXPECT_FLOAT_EQ(lp.top[2].second, lp.logprob);
    EXPECT_GE(lp.top[0].second, lp.top[1].second);
}

}  // namespace
}  // namespace pkv::test
