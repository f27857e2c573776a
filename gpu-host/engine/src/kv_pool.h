// The KV pool: one fixed-capacity store shared by every session and every layer of a process.
//
// Every layer of a model has the same entry shape (K and V rows of head_dim for n_head_kv heads),
// so one pair of tensors K, V : [head_dim, n_slots, n_head_kv] (f16) serves all layers of all
// sessions. Space is handed out in pages of `page_slots` slots; an allocation is a run of
// contiguous pages owned by one (session, layer), so attention reads it as a plain strided view
// — no gather, no copy on the decode path. Because any page can serve any layer, sessions with
// different per-layer budgets (a pyramid, a uniform SnapKV budget, FullKV) share the pool without
// a per-layer partition running out first. When no contiguous run is free but enough pages are,
// the pool compacts: it slides live runs towards the start (copying their data) and retries, so
// an allocation succeeds whenever the free pages suffice.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"

namespace pkv {

class KvPool {
  public:
    using Handle                  = int32_t;  // stable id of an allocation; its position may move on compaction
    static constexpr Handle kNone = -1;

    // capacity_bytes is rounded down to whole pages. Throws pkv::Error("--kv-pool-bytes", ...) when
    // it cannot hold a single page or the backend cannot allocate it.
    KvPool(ggml_backend_t backend, int head_dim, int n_head_kv, size_t capacity_bytes, int page_slots = 16);
    ~KvPool();
    KvPool(const KvPool &)             = delete;
    KvPool & operator=(const KvPool &) = delete;

    ggml_tensor * k() const { return k_; }  // [head_dim, n_slots, n_head_kv] f16
    ggml_tensor * v() const { return v_; }
    int           page_slots() const { return page_slots_; }
    int           n_pages() const { return n_pages_; }
    size_t        bytes_per_slot() const;  // K + V, all KV heads, one slot
    size_t        bytes_per_page() const { return bytes_per_slot() * page_slots_; }
    size_t        capacity_bytes() const { return bytes_per_page() * n_pages_; }
    size_t        used_bytes() const { return bytes_per_page() * used_pages_; }
    size_t        free_bytes() const { return capacity_bytes() - used_bytes(); }
    int           free_pages() const { return n_pages_ - used_pages_; }
    int           pages_for(int slots) const {
        return slots <= 0 ? 0 : (int) (((int64_t) slots + page_slots_ - 1) / page_slots_);
    }

    // A run of at least `slots` contiguous slots, or kNone when the free pages do not suffice
    // (never throws for lack of space). May compact the pool first. `slots == 0` gives a live
    // handle that owns no page (resize grows it later); `slots < 0` gives kNone. Handles of
    // released allocations are reused by later allocations.
    Handle allocate(int slots);
    // Grow (or shrink) an allocation to at least `slots` slots keeping its first `keep` slots'
    // data: in place when the following pages are free, else by moving it. Returns false (and
    // leaves the allocation untouched) when the free pages do not suffice (its own pages count as
    // reusable), or for an unknown handle or `slots < 0`. Shrinking frees the tail pages in place.
    bool resize(Handle h, int slots, int keep);
    void release(Handle h);  // no-op for kNone and unknown or released handles

    int first_slot(Handle h) const;  // where the run starts now (-1 for an unknown handle)
    int slot_count(Handle h) const;  // slots it holds (whole pages; 0 for an unknown handle)

    // Number of compactions so far (a metric; tests use it to prove compaction happened).
    int compactions() const { return compactions_; }
    // Invariant check for tests: runs are disjoint, inside the pool, and the page counts add up.
    bool check_invariants() const;

  private:
    struct Run {
        int  first_page = 0;
        int  n_pages    = 0;
        bool live       = false;
    };
    bool is_live(Handle h) const { return h >= 0 && (size_t) h < runs_.size() && runs_[h].live; }
    int  find_free_run(int pages) const;   // first-fit, -1 when none
    void compact() { compact(kNone, 0); }  // slide every live run towards page 0, keeping order
    // Same, but `last` (with the data of its first `last_keep` slots) is placed after every other
    // run, so the free pages that follow it let it grow in place.
    void compact(Handle last, int last_keep);
    // Copies the first min(slots, keep_slots) slots of a run at from_slot to to_slot, for every
    // KV head of K and V (safe when the ranges overlap).
    void move_data(int from_slot, int to_slot, int slots, int keep_slots);
    // Every KV head of K then V, slots [first_slot, first_slot + n): to / from a host buffer laid
    // out tensor-major, head-major (2 * n_head_kv ranges of n * row bytes).
    void read_slots(int first_slot, int n, uint8_t * dst) const;
    void write_slots(int first_slot, int n, const uint8_t * src) const;
    void set_owner(int first_page, int n_pages, Handle h);

    ggml_backend_t        backend_;
    int                   head_dim_  = 0;
    int                   n_head_kv_ = 0;
    ggml_context *        ctx_       = nullptr;
    ggml_backend_buffer_t buffer_    = nullptr;
    ggml_tensor *         k_ = nullptr, *v_ = nullptr;
    int                   page_slots_  = 16;
    int                   n_pages_     = 0;
    int                   used_pages_  = 0;
    int                   compactions_ = 0;
    std::vector<Run>      runs_;  // indexed by Handle
    std::vector<Handle>   free_handles_;
    std::vector<Handle>   page_owner_;  // kNone for a free page
    std::vector<uint8_t>  scratch_;     // host staging for data moves
};

}  // namespace pkv
