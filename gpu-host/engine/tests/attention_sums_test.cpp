// H2O's running sums, owned by the session (AttentionSums): extended by each chunk's sums over the
// entries held, narrowed to the entries a compression keeps, query heads following their KV head.
// Model-free: the engine's part (a chunk's sums) is Scores.WindowAndAccumulatedAttentionAreConsistent.
#include <gtest/gtest.h>

#include <vector>

#include "session.h"

namespace pkv::test {
namespace {

// A chunk's sums [n_head][n_kv] with distinct values: head h, entry j -> 100·h + j + offset.
std::vector<float> chunk(int n_head, int n_kv, float offset) {
    std::vector<float> c((size_t) n_head * n_kv);
    for (int h = 0; h < n_head; ++h)
        for (int j = 0; j < n_kv; ++j) c[(size_t) h * n_kv + j] = 100.0f * h + j + offset;
    return c;
}

TEST(AttentionSums, ChunksAddUpOverTheEntriesHeldAndNewEntriesStartFromZero) {
    AttentionSums sums(/*n_layer=*/2, /*n_head=*/2);
    EXPECT_EQ(sums.covering(1, 3), nullptr);
    sums.extend(1, chunk(2, 3, 0.5f));  // 3 entries
    ASSERT_NE(sums.covering(1, 3), nullptr);
    EXPECT_EQ(sums.covering(1, 4), nullptr) << "sums of 3 entries do not cover 4";
    // One entry decoded (no sums), then a chunk of 2 over all 3 + 1 + 2 entries.
    sums.extend(1, chunk(2, 6, 0.25f));
    const std::vector<float> & got = sums.layers()[1];
    ASSERT_EQ(got.size(), 12u);
    for (int h = 0; h < 2; ++h) {
        for (int j = 0; j < 6; ++j) {
            const float second = 100.0f * h + j + 0.25f;
            const float first  = j < 3 ? 100.0f * h + j + 0.5f : 0.0f;
            EXPECT_FLOAT_EQ(got[(size_t) h * 6 + j], first + second) << "head " << h << " entry " << j;
        }
    }
    EXPECT_TRUE(sums.layers()[0].empty()) << "other layers untouched";
}

TEST(AttentionSums, CompressionKeepsTheSumsOfTheKeptEntriesPerKvHead) {
    // 4 query heads over 2 KV heads: query heads 0, 1 follow KV head 0; 2, 3 follow KV head 1.
    AttentionSums sums(1, 4);
    sums.extend(0, chunk(4, 5, 0.0f));
    const HeadSelection kept = { { 0, 3, 4 }, { 1, 2, 4 } };
    sums.keep(0, 5, kept);
    ASSERT_NE(sums.covering(0, 3), nullptr);
    const std::vector<float> & got = sums.layers()[0];
    for (int h = 0; h < 4; ++h)
        for (int e = 0; e < 3; ++e) EXPECT_FLOAT_EQ(got[(size_t) h * 3 + e], 100.0f * h + kept[h / 2][e]);
    // Sums that do not cover the layer's entries (here: 3 held, the layer has 7) stay as they are.
    const std::vector<float> before = got;
    sums.keep(0, 7, { { 0 }, { 1 } });
    EXPECT_EQ(sums.layers()[0], before);
}

}  // namespace
}  // namespace pkv::test
