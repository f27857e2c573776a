// Tests for the shared KV pool (kv_pool.h): byte accounting, admission whenever the free pages
// suffice (fragmentation handled by compaction), data kept intact across moves and compaction, and
// clean refusals and errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "error.h"
#include "ggml-backend.h"
#include "kv_pool.h"

using namespace pkv;

namespace {

using Handle = KvPool::Handle;

class KvPoolTest : public ::testing::Test {
  protected:
    void SetUp() override {
        backend_ = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
        ASSERT_NE(backend_, nullptr);
    }
    void TearDown() override {
        if (backend_) ggml_backend_free(backend_);
    }
    ggml_backend_t backend_ = nullptr;
};

// Expected contents of one run: uint16 (f16 bits) laid out [tensor K,V][head][slot][dim] over
// the run's slot_count() slots.
struct Expected {
    int                   slots = 0;
    std::vector<uint16_t> v;
};

size_t offset_of(const ggml_tensor * t, int head, int slot) { return head * t->nb[2] + (size_t) slot * t->nb[1]; }

// Reads every slot of a live run, all heads of K and V, in Expected's layout.
std::vector<uint16_t> read_run(const KvPool & pool, Handle h) {
    const ggml_tensor *   k     = pool.k();
    const int             hd    = (int) k->ne[0];
    const int             nh    = (int) k->ne[2];
    const int             slots = pool.slot_count(h);
    std::vector<uint16_t> out((size_t) 2 * nh * slots * hd);
    size_t                pos = 0;
    for (ggml_tensor * t : { pool.k(), pool.v() }) {
        for (int head = 0; head < nh; ++head) {
            // One row at a time: a slot holds every head's K row, then the V rows (kv_pool.h).
            for (int s = 0; s < slots; ++s)
                ggml_backend_tensor_get(t, out.data() + pos + (size_t) s * hd,
                                        offset_of(t, head, pool.first_slot(h) + s), (size_t) hd * 2);
            pos += (size_t) slots * hd;
        }
    }
    return out;
}

// Writes fresh random values into slots [from, slot_count) of a run and records them.
void fill_run(const KvPool & pool, Handle h, int from, Expected & e, std::mt19937 & rng) {
    const int hd = (int) pool.k()->ne[0];
    const int nh = (int) pool.k()->ne[2];
    e.slots      = pool.slot_count(h);
    e.v.resize((size_t) 2 * nh * e.slots * hd);
    if (from >= e.slots) return;
    int ti = 0;
    for (ggml_tensor * t : { pool.k(), pool.v() }) {
        for (int head = 0; head < nh; ++head, ++ti) {
            uint16_t *   dst = e.v.data() + ((size_t) ti * e.slots + from) * hd;
            const size_t n   = (size_t) (e.slots - from) * hd;
            for (size_t i = 0; i < n; ++i) dst[i] = (uint16_t) rng();
            for (int s = from; s < e.slots; ++s)
                ggml_backend_tensor_set(t, dst + (size_t) (s - from) * hd, offset_of(t, head, pool.first_slot(h) + s),
                                        (size_t) hd * 2);
        }
    }
}

// After a resize to `slots` keeping `keep`: the expected layout for the new size, first `keep`
// slots carried over.
void relayout(const KvPool & pool, Expected & e, int new_slots, int keep) {
    const int             hd = (int) pool.k()->ne[0];
    const int             nh = (int) pool.k()->ne[2];
    std::vector<uint16_t> v((size_t) 2 * nh * new_slots * hd);
    for (int ti = 0; ti < 2 * nh; ++ti) {
        std::copy_n(e.v.begin() + (size_t) ti * e.slots * hd, (size_t) keep * hd,
                    v.begin() + (size_t) ti * new_slots * hd);
    }
    e.v     = std::move(v);
    e.slots = new_slots;
}

// Checks the first `keep` slots (all of them by default) of every tracked run.
void expect_data(const KvPool & pool, const std::map<Handle, Expected> & runs,
                 const std::map<Handle, int> * valid = nullptr) {
    const int hd = (int) pool.k()->ne[0];
    const int nh = (int) pool.k()->ne[2];
    for (const auto & [h, e] : runs) {
        ASSERT_EQ(pool.slot_count(h), e.slots) << "handle " << h;
        const std::vector<uint16_t> got = read_run(pool, h);
        const int                   n   = valid ? valid->at(h) : e.slots;
        for (int ti = 0; ti < 2 * nh; ++ti) {
            for (int i = 0; i < n * hd; ++i) {
                const size_t at = (size_t) ti * e.slots * hd + i;
                ASSERT_EQ(got[at], e.v[at]) << "handle " << h << (ti < nh ? " K" : " V") << " head " << ti % nh
                                            << " slot " << i / hd << " dim " << i % hd;
            }
        }
    }
}

TEST_F(KvPoolTest, AccountingInWholePages) {
    // head_dim 8, 2 KV heads: 2 * 2 * 8 * 2 = 64 bytes a slot, 1024 a page of 16 slots.
    KvPool pool(backend_, 8, 2, 10 * 1024 + 1000, 16);
    EXPECT_EQ(pool.bytes_per_slot(), 64u);
    EXPECT_EQ(pool.bytes_per_page(), 1024u);
    EXPECT_EQ(pool.n_pages(), 10);
    EXPECT_EQ(pool.capacity_bytes(), 10u * 1024);
    EXPECT_EQ(pool.used_bytes(), 0u);
    EXPECT_EQ(pool.free_bytes(), 10u * 1024);
    EXPECT_EQ(pool.free_pages(), 10);
    ASSERT_NE(pool.k(), nullptr);
    EXPECT_EQ(pool.k()->type, GGML_TYPE_F16);
    EXPECT_EQ(pool.k()->ne[0], 8);
    EXPECT_EQ(pool.k()->ne[1], 160);
    EXPECT_EQ(pool.k()->ne[2], 2);
    EXPECT_EQ(pool.v()->ne[1], 160);
    // K and V share the buffer, one entry (every head's K row, then the V rows) per slot.
    EXPECT_EQ((size_t) pool.k()->nb[1], pool.bytes_per_slot());
    EXPECT_EQ((size_t) pool.k()->ne[1] * pool.bytes_per_slot(), pool.capacity_bytes());

    EXPECT_EQ(pool.pages_for(0), 0);
    EXPECT_EQ(pool.pages_for(1), 1);
    EXPECT_EQ(pool.pages_for(16), 1);
    EXPECT_EQ(pool.pages_for(17), 2);
    EXPECT_EQ(pool.pages_for(160), 10);

    const Handle a = pool.allocate(17);
    ASSERT_NE(a, KvPool::kNone);
    EXPECT_EQ(pool.slot_count(a), 32);
    EXPECT_EQ(pool.first_slot(a), 0);
    EXPECT_EQ(pool.used_bytes(), 2u * 1024);
    EXPECT_EQ(pool.free_bytes(), 8u * 1024);
    const Handle b = pool.allocate(1);
    ASSERT_NE(b, KvPool::kNone);
    EXPECT_EQ(pool.first_slot(b), 32);
    EXPECT_EQ(pool.used_bytes(), 3u * 1024);
    EXPECT_TRUE(pool.check_invariants());

    // b grows in place (the pages after it are free); a must move past b.
    ASSERT_TRUE(pool.resize(b, 40, 1));
    EXPECT_EQ(pool.first_slot(b), 32);
    EXPECT_EQ(pool.slot_count(b), 48);
    EXPECT_EQ(pool.used_bytes(), 5u * 1024);
    ASSERT_TRUE(pool.resize(a, 33, 32));
    EXPECT_EQ(pool.slot_count(a), 48);
    EXPECT_EQ(pool.first_slot(a), 80);
    EXPECT_EQ(pool.used_bytes(), 6u * 1024);
    EXPECT_TRUE(pool.check_invariants());

    // Shrinking frees the tail in place.
    ASSERT_TRUE(pool.resize(a, 5, 5));
    EXPECT_EQ(pool.first_slot(a), 80);
    EXPECT_EQ(pool.slot_count(a), 16);
    EXPECT_EQ(pool.used_bytes(), 4u * 1024);
    pool.release(b);
    EXPECT_EQ(pool.used_bytes(), 1u * 1024);
    pool.release(a);
    EXPECT_EQ(pool.used_bytes(), 0u);
    EXPECT_EQ(pool.free_bytes(), pool.capacity_bytes());
    EXPECT_TRUE(pool.check_invariants());

    // In place is preferred to an earlier hole that would also fit.
    const Handle x = pool.allocate(16);  // page 0
    const Handle y = pool.allocate(16);  // page 1
    pool.release(x);
    ASSERT_TRUE(pool.resize(y, 32, 16));
    EXPECT_EQ(pool.first_slot(y), 16);
    EXPECT_EQ(pool.slot_count(y), 32);
    EXPECT_TRUE(pool.check_invariants());
    EXPECT_EQ(pool.compactions(), 0);
}

// Growth blocked by the next run moves into a run that overlaps the old one (the hole before it
// plus its own pages), without compacting; the kept slots arrive intact.
TEST_F(KvPoolTest, GrowthIntoAnOverlappingRunKeepsData) {
    std::mt19937               rng(5);
    KvPool                     pool(backend_, 4, 3, 6 * 4 * 48, 4);  // 6 pages of 4 slots
    std::map<Handle, Expected> runs;
    const Handle               x = pool.allocate(4);  // page 0
    const Handle               y = pool.allocate(8);  // pages 1-2
    const Handle               z = pool.allocate(4);  // page 3
    for (Handle h : { y, z }) fill_run(pool, h, 0, runs[h], rng);
    pool.release(x);
    ASSERT_TRUE(pool.resize(y, 12, 7));  // pages 0-2
    EXPECT_EQ(pool.first_slot(y), 0);
    EXPECT_EQ(pool.slot_count(y), 12);
    EXPECT_EQ(pool.compactions(), 0);
    EXPECT_TRUE(pool.check_invariants());
    relayout(pool, runs[y], 12, 7);
    std::map<Handle, int> valid{ { y, 7 }, { z, 4 } };
    expect_data(pool, runs, &valid);
}

TEST_F(KvPoolTest, ZeroSlotsHandlesAndNoOps) {
    KvPool       pool(backend_, 8, 2, 4 * 1024, 16);
    const Handle z = pool.allocate(0);
    ASSERT_NE(z, KvPool::kNone);
    EXPECT_EQ(pool.slot_count(z), 0);
    EXPECT_EQ(pool.used_bytes(), 0u);
    ASSERT_TRUE(pool.resize(z, 20, 0));
    EXPECT_EQ(pool.slot_count(z), 32);
    EXPECT_EQ(pool.used_bytes(), 2048u);
    ASSERT_TRUE(pool.resize(z, 0, 0));
    EXPECT_EQ(pool.slot_count(z), 0);
    EXPECT_EQ(pool.used_bytes(), 0u);
    EXPECT_EQ(pool.allocate(-1), KvPool::kNone);
    EXPECT_FALSE(pool.resize(z, -1, 0));

    // Released handles are reused; stale and unknown handles are harmless.
    pool.release(z);
    pool.release(z);
    pool.release(KvPool::kNone);
    pool.release(12345);
    EXPECT_EQ(pool.first_slot(z), -1);
    EXPECT_EQ(pool.slot_count(z), 0);
    EXPECT_FALSE(pool.resize(z, 16, 0));
    EXPECT_FALSE(pool.resize(KvPool::kNone, 16, 0));
    EXPECT_TRUE(pool.check_invariants());
    const Handle again = pool.allocate(16);
    EXPECT_EQ(again, z);
    EXPECT_EQ(pool.used_bytes(), 1024u);
    EXPECT_TRUE(pool.check_invariants());
}

TEST_F(KvPoolTest, CapacityBelowOnePageIsAnError) {
    for (size_t bytes : { (size_t) 0, (size_t) 1023, SIZE_MAX }) {
        try {
            KvPool pool(backend_, 8, 2, bytes, 16);
            ADD_FAILURE() << bytes << " bytes were accepted";
        } catch (const Error & e) {
            EXPECT_EQ(e.param, "--kv-pool-bytes");
            EXPECT_NE(std::string(e.what()).find("--kv-pool-bytes"), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find(std::to_string(bytes)), std::string::npos) << e.what();
            EXPECT_NE(std::string(e.what()).find("1024"), std::string::npos) << e.what();  // the smallest accepted
        }
    }
    KvPool one(backend_, 8, 2, 1024, 16);
    EXPECT_EQ(one.n_pages(), 1);
}

TEST_F(KvPoolTest, RefusalsChangeNothing) {
    std::mt19937 rng(7);
    KvPool       pool(backend_, 4, 3, 8 * 4 * 48, 4);  // 8 pages of 4 slots, 48 bytes a slot
    ASSERT_EQ(pool.n_pages(), 8);
    std::map<Handle, Expected> runs;
    const Handle               a = pool.allocate(10);
    const Handle               b = pool.allocate(6);
    ASSERT_NE(a, KvPool::kNone);
    ASSERT_NE(b, KvPool::kNone);
    fill_run(pool, a, 0, runs[a], rng);
    fill_run(pool, b, 0, runs[b], rng);
    const size_t used = pool.used_bytes();

    EXPECT_EQ(pool.allocate(8 * 4 + 1), KvPool::kNone);  // more than the capacity
    EXPECT_EQ(pool.allocate(3 * 4 + 1), KvPool::kNone);  // more than the free pages
    EXPECT_EQ(pool.used_bytes(), used);
    EXPECT_EQ(pool.compactions(), 0);
    EXPECT_FALSE(pool.resize(a, 8 * 4 + 1, 10));        // beyond capacity
    EXPECT_FALSE(pool.resize(a, (3 + 3) * 4 + 1, 10));  // own 3 pages + 3 free are not enough
    EXPECT_EQ(pool.used_bytes(), used);
    EXPECT_EQ(pool.first_slot(a), 0);
    EXPECT_EQ(pool.slot_count(a), 12);
    EXPECT_EQ(pool.compactions(), 0);
    EXPECT_TRUE(pool.check_invariants());
    expect_data(pool, runs);

    // Exactly the free pages: granted.
    const Handle c = pool.allocate(3 * 4);
    EXPECT_NE(c, KvPool::kNone);
    EXPECT_EQ(pool.free_pages(), 0);
    EXPECT_EQ(pool.allocate(1), KvPool::kNone);
    EXPECT_TRUE(pool.check_invariants());
    expect_data(pool, runs);
}

// Deterministic compaction: a hole in the middle plus the free tail serve one allocation, and the
// runs that slide keep their data for every head of K and V.
TEST_F(KvPoolTest, CompactionSlidesRunsAndKeepsTheirData) {
    std::mt19937               rng(11);
    KvPool                     pool(backend_, 4, 3, 10 * 4 * 48, 4);  // 10 pages of 4 slots
    std::map<Handle, Expected> runs;
    const Handle               a = pool.allocate(8);   // pages 0-1
    const Handle               b = pool.allocate(12);  // pages 2-4
    const Handle               c = pool.allocate(8);   // pages 5-6
    const Handle               d = pool.allocate(4);   // page 7
    for (Handle h : { a, b, c, d }) fill_run(pool, h, 0, runs[h], rng);
    pool.release(b);
    runs.erase(b);
    ASSERT_EQ(pool.free_pages(), 5);  // pages 2-4 and 8-9: no run of 5
    const Handle e = pool.allocate(20);
    ASSERT_NE(e, KvPool::kNone);
    EXPECT_EQ(pool.compactions(), 1);
    EXPECT_EQ(pool.first_slot(a), 0);
    EXPECT_EQ(pool.first_slot(c), 8);
    EXPECT_EQ(pool.first_slot(d), 16);
    EXPECT_EQ(pool.first_slot(e), 20);
    EXPECT_TRUE(pool.check_invariants());
    expect_data(pool, runs);

    // Growing a run in the middle when only compaction makes room: it is placed last.
    pool.release(e);
    pool.release(a);
    runs.erase(a);
    // free: pages 0-1 and 5-9; c (pages 2-3) grows to 7 pages: its 2 + 5 free, no run of 7.
    ASSERT_TRUE(pool.resize(c, 28, 6));
    EXPECT_EQ(pool.compactions(), 2);
    EXPECT_EQ(pool.first_slot(d), 0);
    EXPECT_EQ(pool.first_slot(c), 4);
    EXPECT_EQ(pool.slot_count(c), 28);
    EXPECT_TRUE(pool.check_invariants());
    std::map<Handle, int> valid{ { c, 6 }, { d, 4 } };
    relayout(pool, runs[c], 28, 6);
    expect_data(pool, runs, &valid);
}

// The property from the issue: sessions with different budgets open, grow and close at random;
// the pool admits any request that the free pages cover, refuses cleanly otherwise.
TEST_F(KvPoolTest, AdmitsWheneverFreePagesSufficeUnderRandomChurn) {
    std::mt19937 rng(20240611);
    auto         uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    KvPool       pool(backend_, 8, 2, 1500 * 1024, 16);
    ASSERT_EQ(pool.n_pages(), 1500);
    const int ps = pool.page_slots();

    std::vector<std::vector<Handle>> sessions;
    int                              admitted = 0, refused = 0, probes = 0, grown = 0, grow_refused = 0, big_probes = 0;
    int                              model_used = 0;  // pages, tracked independently of the pool

    auto checked_allocate = [&](int slots) -> Handle {
        const int    free_before = pool.free_pages();
        const int    comp_before = pool.compactions();
        const Handle h           = pool.allocate(slots);
        if (pool.pages_for(slots) <= free_before) {
            EXPECT_NE(h, KvPool::kNone) << slots << " slots with " << free_before << " free pages";
            if (h != KvPool::kNone) {
                EXPECT_GE(pool.slot_count(h), slots);
                EXPECT_EQ(pool.free_pages(), free_before - pool.pages_for(slots));
                model_used += pool.pages_for(slots);
                ++admitted;
            }
        } else {
            EXPECT_EQ(h, KvPool::kNone) << slots << " slots with " << free_before << " free pages";
            EXPECT_EQ(pool.free_pages(), free_before);
            EXPECT_EQ(pool.compactions(), comp_before);  // a refusal does not even compact
            ++refused;
        }
        return h;
    };

    for (int op = 0; op < 1000 && !HasFailure(); ++op) {
        const int r = uni(0, 99);
        if (r < 35 || sessions.empty()) {
            // Open a session: one run per layer, budgets shaped like the methods' (uniform,
            // pyramid, per-layer random).
            const int           layers = uni(1, 30);
            const int           shape  = uni(0, 2);
            const int           top    = uni(1, 300);
            std::vector<Handle> runs;
            for (int il = 0; il < layers; ++il) {
                int slots      = shape == 0 ? top : shape == 1 ? std::max(1, top - (top * il) / layers) : uni(1, 300);
                const Handle h = checked_allocate(slots);
                if (h != KvPool::kNone) runs.push_back(h);
            }
            sessions.push_back(std::move(runs));
        } else if (r < 60) {
            auto & s = sessions[uni(0, (int) sessions.size() - 1)];
            if (!s.empty()) {
                const Handle h           = s[uni(0, (int) s.size() - 1)];
                const int    cur         = pool.slot_count(h);
                const int    want        = cur + uni(1, 300);
                const int    extra       = pool.pages_for(want) - cur / ps;
                const int    free_before = pool.free_pages();
                const bool   ok          = pool.resize(h, want, uni(0, cur));
                EXPECT_EQ(ok, extra <= free_before) << "grow by " << extra << " pages with " << free_before << " free";
                if (ok) {
                    EXPECT_GE(pool.slot_count(h), want);
                    model_used += extra;
                    ++grown;
                } else {
                    EXPECT_EQ(pool.slot_count(h), cur);
                    ++grow_refused;
                }
            }
        } else if (r < 85) {
            const int i = uni(0, (int) sessions.size() - 1);
            for (Handle h : sessions[i]) {
                model_used -= pool.slot_count(h) / ps;
                pool.release(h);
            }
            sessions.erase(sessions.begin() + i);
        } else {
            // Probe: any request the free pages cover must be admitted, whatever the fragmentation.
            ++probes;
            const int free_pages = pool.free_pages();
            if (free_pages > 0) {
                const bool   big   = uni(0, 1) == 0;  // often the whole free space
                const int    slots = big ? uni((free_pages - 1) * ps + 1, free_pages * ps) : uni(1, free_pages * ps);
                const Handle h     = checked_allocate(slots);
                big_probes += big;
                if (h != KvPool::kNone) {
                    if (uni(0, 3) == 0) {
                        sessions.push_back({ h });  // sometimes it stays, as a one-layer session
                    } else {
                        model_used -= pool.slot_count(h) / ps;
                        pool.release(h);
                    }
                }
            }
            checked_allocate(pool.free_pages() * ps + uni(1, 100));  // must refuse
        }
        ASSERT_TRUE(pool.check_invariants()) << "after operation " << op;
        ASSERT_EQ(pool.used_bytes(), (size_t) model_used * pool.bytes_per_page()) << "after operation " << op;
    }
    // Without compaction none of this would prove anything.
    EXPECT_GT(pool.compactions(), 0);
    EXPECT_GT(admitted, 500);
    EXPECT_GT(refused, 50);
    EXPECT_GT(grown, 50);
    EXPECT_GT(grow_refused, 0);
    EXPECT_GT(big_probes, 20);
    RecordProperty("compactions", pool.compactions());
}

// Data integrity under churn: every live run's data (the first `keep` slots across a resize) is
// intact after in-place growth, moves, shrinks and compactions, for every head of K and V.
TEST_F(KvPoolTest, DataSurvivesMovesAndCompaction) {
    std::mt19937 rng(99);
    auto         uni = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    KvPool       pool(backend_, 4, 3, 300 * 4 * 48, 4);  // 300 pages of 4 slots, 3 KV heads
    ASSERT_EQ(pool.n_pages(), 300);
    const int                  ps = pool.page_slots();
    std::map<Handle, Expected> runs;
    int                        moves = 0, in_place = 0;

    for (int op = 0; op < 600 && !HasFailure(); ++op) {
        const int r = uni(0, 99);
        if (r < 40 || runs.empty()) {
            const int    slots = uni(1, 60);
            const int    free  = pool.free_pages();
            const Handle h     = pool.allocate(slots);
            ASSERT_EQ(h != KvPool::kNone, pool.pages_for(slots) <= free);
            if (h != KvPool::kNone) fill_run(pool, h, 0, runs[h], rng);
        } else if (r < 75) {
            auto it = runs.begin();
            std::advance(it, uni(0, (int) runs.size() - 1));
            const Handle h     = it->first;
            const int    cur   = pool.slot_count(h);
            const int    want  = uni(0, 4) == 0 ? uni(1, cur) : cur + uni(1, 80);
            const int    keep  = uni(0, std::min(cur, want));
            const int    first = pool.first_slot(h);
            if (pool.resize(h, want, keep)) {
                const int now = pool.slot_count(h);
                (pool.first_slot(h) == first ? in_place : moves) += keep > 0;
                relayout(pool, it->second, now, keep);
                fill_run(pool, h, keep, it->second, rng);  // the caller writes the rest
            } else {
                ASSERT_EQ(pool.first_slot(h), first);
                ASSERT_EQ(pool.slot_count(h), cur);
            }
        } else if (r < 92) {
            auto it = runs.begin();
            std::advance(it, uni(0, (int) runs.size() - 1));
            pool.release(it->first);
            runs.erase(it);
        } else if (pool.free_pages() > 0) {
            // A request for all the free pages: compacts whenever they are fragmented.
            const Handle h = pool.allocate(pool.free_pages() * ps);
            ASSERT_NE(h, KvPool::kNone);
            pool.release(h);
        }
        ASSERT_TRUE(pool.check_invariants()) << "after operation " << op;
        expect_data(pool, runs);
    }
    EXPECT_GT(pool.compactions(), 5);
    EXPECT_GT(moves, 10);
    EXPECT_GT(in_place, 10);
}

}  // namespace
