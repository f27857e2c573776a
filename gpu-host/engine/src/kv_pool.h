// The KV pool: one fixed-capacity store shared by every session and every layer of a process.
//
// Every layer of a model has the same entry shape (K and V rows of head_dim for n_head_kv heads),
// so one buffer serves all layers of all sessions. Space is handed out in pages of a fixed number
// of bytes (`page_slots` f16 entries); an allocation is a run of contiguous pages owned by one
// (session, layer) and holding entries of one storage type (KvType: f16, q8_0 or q4_0, the last two
// ggml's blocks of 32 along head_dim). Inside a run an entry is one slot: the K rows of all KV
// heads, then the V rows, so the run's entries sit at one stride and attention reads them as a
// plain strided view (prefill and a long session's decode read it in place; a decode step gathers
// short sessions' entries into one padded tensor: docs/ENGINE.md "Batched decode"). Because any
// page can serve any layer and any type, sessions with different per-layer budgets (a pyramid, a
// uniform SnapKV budget, FullKV) and different storage types share the pool without a partition
// running out first. When no contiguous run is free but enough pages are, the pool compacts: it
// slides live runs towards the start (copying their bytes) and retries, so an allocation succeeds
// whenever the free pages suffice. Layout and byte accounting: docs/ENGINE.md "KV pool".
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "ggml-backend.h"
#include "ggml.h"

namespace pkv {

// Storage type of pooled entries (--kv-type, open.kv_type).
enum class KvType { F16, Q8_0, Q4_0 };
constexpr int kKvTypes = 3;

const std::vector<KvType> & all_kv_types();  // f16, q8_0, q4_0
const char *                kv_type_name(KvType t);
ggml_type                   kv_ggml_type(KvType t);
// "" on success, else one line naming `param`, the value and the accepted names.
std::string parse_kv_type(const std::string & name, const char * param, KvType & out);
std::string kv_type_names_joined(const char * sep = ", ");
// Bytes of one entry (K and V rows of every KV head) stored as `t`: 2 * n_head_kv * row bytes,
// a row being head_dim * 2 (f16), head_dim / 32 * 34 (q8_0) or head_dim / 32 * 18 (q4_0).
size_t kv_entry_bytes(KvType t, int head_dim, int n_head_kv);

class KvPool {
  public:
    using Handle                  = int32_t;  // stable id of an allocation; its position may move on compaction
    static constexpr Handle kNone = -1;

    // capacity_bytes is rounded down to whole pages of page_slots f16 entries. Throws
    // pkv::Error("--kv-pool-bytes", ...) when it cannot hold a single page or the backend cannot
    // allocate it. Quantised types need head_dim to be a multiple of 32 (see supports()).
    KvPool(ggml_backend_t backend, int head_dim, int n_head_kv, size_t capacity_bytes, int page_slots = 16);
    ~KvPool();
    KvPool(const KvPool &)             = delete;
    KvPool & operator=(const KvPool &) = delete;

    // The entries of type t: [head_dim, n_slots(t), n_head_kv] of ggml type kv_ggml_type(t), nb[1]
    // the slot stride (bytes_per_slot(t)), nb[2] the head stride (one row). Slot i of K and of V is
    // one entry; slot numbers are per type (first_slot of a run of that type). Null when the type is
    // not supported by the shape.
    ggml_tensor * k(KvType t = KvType::F16) const { return k_[(int) t]; }
    ggml_tensor * v(KvType t = KvType::F16) const { return v_[(int) t]; }
    bool          supports(KvType t) const { return k_[(int) t] != nullptr; }
    int           page_slots() const { return page_slots_; }  // f16 entries per page
    int           n_pages() const { return n_pages_; }
    size_t        bytes_per_slot(KvType t = KvType::F16) const;  // K + V, all KV heads, one entry
    size_t        bytes_per_page() const { return page_bytes_; }
    size_t        capacity_bytes() const { return page_bytes_ * n_pages_; }
    size_t        used_bytes() const { return page_bytes_ * used_pages_; }
    size_t        free_bytes() const { return capacity_bytes() - used_bytes(); }
    int           free_pages() const { return n_pages_ - used_pages_; }
    // Entries of type t that a run of `pages` pages holds wherever it starts (a page boundary need
    // not fall on an entry boundary of a quantised type, so a run may lose up to one entry to the
    // alignment of its start; this is the count with the worst start).
    int slots_in(int pages, KvType t = KvType::F16) const;
    // Smallest number of pages whose slots_in() is at least `slots`.
    int pages_for(int slots, KvType t = KvType::F16) const;

    // A run of at least `slots` contiguous entries of type t, or kNone when the free pages do not
    // suffice (never throws for lack of space; throws Error("kv_type") for a type the shape does not
    // support). May compact the pool first. `slots == 0` gives a live handle that owns no page
    // (resize grows it later); `slots < 0` gives kNone. Handles of released allocations are reused.
    Handle allocate(int slots, KvType t = KvType::F16);
    // Grow (or shrink) an allocation to at least `slots` entries keeping its first `keep` entries'
    // data: in place when the following pages are free, else by moving it. Returns false (and
    // leaves the allocation untouched) when the free pages do not suffice (its own pages count as
    // reusable), or for an unknown handle or `slots < 0`. Shrinking frees the tail pages in place.
    bool resize(Handle h, int slots, int keep);
    void release(Handle h);  // no-op for kNone and unknown or released handles

    int    first_slot(Handle h) const;  // where the run starts now, in slots of its type (-1: unknown)
    int    slot_count(Handle h) const;  // entries it holds (slots_in its pages; 0 for an unknown handle)
    int    pages(Handle h) const;       // pages it holds (0 for an unknown handle)
    KvType type(Handle h) const;        // its entries' type (f16 for an unknown handle)

    // The bytes of entries [first, first + n) of a run, as stored (for each entry: K rows of every
    // head, then V rows): save/restore copy them without converting.
    void read_entries(Handle h, int first, int n, uint8_t * dst) const;
    void write_entries(Handle h, int first, int n, const uint8_t * src) const;

    // Number of compactions so far (a metric; tests use it to prove compaction happened).
    int compactions() const { return compactions_; }
    // Invariant check for tests: runs are disjoint, inside the pool, and the page counts add up.
    bool check_invariants() const;

  private:
    struct Run {
        int    first_page = 0;
        int    n_pages    = 0;
        bool   live       = false;
        KvType type       = KvType::F16;
    };
    bool is_live(Handle h) const { return h >= 0 && (size_t) h < runs_.size() && runs_[h].live; }
    int  find_free_run(int pages) const;   // first-fit, -1 when none
    void compact() { compact(kNone, 0); }  // slide every live run towards page 0, keeping order
    // Same, but `last` (with the data of its first `last_keep` entries) is placed after every other
    // run, so the free pages that follow it let it grow in place.
    void compact(Handle last, int last_keep);
    // First slot of type t in a run starting at page `page`: the first entry boundary at or after it.
    int    slot_at(int page, KvType t) const;
    size_t byte_at(int page, KvType t) const { return (size_t) slot_at(page, t) * bytes_per_slot(t); }
    // Copies the first `n` entries of a run of type t from the run starting at page `from` to the
    // one starting at page `to` (safe when the ranges overlap).
    void move_data(KvType t, int from, int to, int n);
    void set_owner(int first_page, int n_pages, Handle h);

    ggml_backend_t        backend_;
    int                   head_dim_  = 0;
    int                   n_head_kv_ = 0;
    ggml_context *        ctx_       = nullptr;
    ggml_backend_buffer_t buffer_    = nullptr;
    ggml_tensor *         base_[kKvTypes]{};  // [head_dim, 2 * n_head_kv, n_slots(t)] over the whole buffer
    ggml_tensor *         k_[kKvTypes]{};
    ggml_tensor *         v_[kKvTypes]{};
    int                   page_slots_  = 16;
    size_t                page_bytes_  = 0;
    int                   n_pages_     = 0;
    int                   used_pages_  = 0;
    int                   compactions_ = 0;
    std::vector<Run>      runs_;  // indexed by Handle
    std::vector<Handle>   free_handles_;
    std::vector<Handle>   page_owner_;  // kNone for a free page
    std::vector<uint8_t>  scratch_;     // host staging for data moves
};

}  // namespace pkv
