#include "kv_pool.h"

#include <algorithm>
#include <climits>
#include <numeric>
#include <string>

#include "error.h"
#include "huge_pages.h"

namespace pkv {

namespace {

const char * kParam = "--kv-pool-bytes";

}  // namespace

const std::vector<KvType> & all_kv_types() {
    static const std::vector<KvType> types = { KvType::F16, KvType::Q8_0, KvType::Q4_0 };
    return types;
}

const char * kv_type_name(KvType t) {
    switch (t) {
        case KvType::F16: return "f16";
        case KvType::Q8_0: return "q8_0";
        case KvType::Q4_0: return "q4_0";
    }
    return "f16";
}

ggml_type kv_ggml_type(KvType t) {
    switch (t) {
        case KvType::F16: return GGML_TYPE_F16;
        case KvType::Q8_0: return GGML_TYPE_Q8_0;
        case KvType::Q4_0: return GGML_TYPE_Q4_0;
    }
    return GGML_TYPE_F16;
}

std::string kv_type_names_joined(const char * sep) {
    std::string out;
    for (KvType t : all_kv_types()) out += (out.empty() ? "" : sep) + std::string(kv_type_name(t));
    return out;
}

std::string parse_kv_type(const std::string & name, const char * param, KvType & out) {
    for (KvType t : all_kv_types()) {
        if (name == kv_type_name(t)) {
            out = t;
            return "";
        }
    }
    return std::string(param) + ": '" + name + "' is not one of " + kv_type_names_joined();
}

size_t kv_entry_bytes(KvType t, int head_dim, int n_head_kv) {
    return 2 * (size_t) n_head_kv * ggml_row_size(kv_ggml_type(t), head_dim);
}

KvPool::KvPool(ggml_backend_t backend, int head_dim, int n_head_kv, size_t capacity_bytes, int page_slots)
    : backend_(backend), head_dim_(head_dim), n_head_kv_(n_head_kv), page_slots_(page_slots) {
    if (!backend || head_dim <= 0 || n_head_kv <= 0 || page_slots <= 0) {
        throw Error("kv", "invalid KV pool shape (head_dim " + std::to_string(head_dim) + ", n_head_kv " +
                              std::to_string(n_head_kv) + ", page_slots " + std::to_string(page_slots) + ")");
    }
    page_bytes_        = bytes_per_slot(KvType::F16) * page_slots_;
    const size_t page  = page_bytes_;
    const size_t pages = capacity_bytes / page;
    // Slots are addressed with int: the most slots of any type (the smallest entries) must fit.
    size_t smallest = bytes_per_slot(KvType::F16);
    for (KvType t : all_kv_types()) {
        if (t == KvType::F16 || head_dim % (int) ggml_blck_size(kv_ggml_type(t)) == 0)
            smallest = std::min(smallest, bytes_per_slot(t));
    }
    const size_t max_pages = (size_t) INT_MAX / ((page + smallest - 1) / smallest);
    if (pages < 1) {
        throw Error(kParam, std::to_string(capacity_bytes) + " bytes cannot hold one page of " + std::to_string(page) +
                                " bytes (" + std::to_string(page_slots) + " slots of " +
                                std::to_string(bytes_per_slot()) + " bytes); accepted range: " + std::to_string(page) +
                                " to " + std::to_string(max_pages * page) + " bytes");
    }
    if (pages > max_pages) {
        throw Error(kParam, std::to_string(capacity_bytes) + " bytes is more than " + std::to_string(max_pages) +
                                " pages of " + std::to_string(page) + " bytes; accepted range: " +
                                std::to_string(page) + " to " + std::to_string(max_pages * page) + " bytes");
    }
    n_pages_           = (int) pages;
    const size_t total = this->capacity_bytes();

    ggml_init_params ip{ ggml_tensor_overhead() * 3 * kKvTypes, nullptr, /*no_alloc=*/true };
    ctx_ = ggml_init(ip);
    if (!ctx_) throw Error(kParam, "cannot create the KV pool's ggml context");
    buffer_ = ggml_backend_alloc_buffer(backend, total);
    if (!buffer_) {
        ggml_free(ctx_);
        ctx_ = nullptr;
        throw Error(kParam, std::to_string(capacity_bytes) + " bytes (" + std::to_string(total) +
                                " in whole pages) cannot be allocated on backend " + ggml_backend_name(backend) +
                                "; accepted range: " + std::to_string(page) + " bytes up to what the device has free");
    }
    advise_huge_pages(buffer_);  // before the clear below first touches the pages
    // Every type's tensors cover the whole buffer: a run's pages hold entries of its own type only,
    // so the aliases never see each other's bytes where it matters.
    void * base = ggml_backend_buffer_get_base(buffer_);
    for (KvType t : all_kv_types()) {
        const ggml_type gt = kv_ggml_type(t);
        if (head_dim % (int) ggml_blck_size(gt) != 0) continue;  // quantised blocks must tile a row
        const int     i        = (int) t;
        const int64_t n_slot   = (int64_t) (total / bytes_per_slot(t));
        base_[i]               = ggml_new_tensor_3d(ctx_, gt, head_dim, 2 * n_head_kv, n_slot);
        const size_t row       = base_[i]->nb[1];
        const size_t slot      = base_[i]->nb[2];
        k_[i]                  = ggml_view_3d(ctx_, base_[i], head_dim, n_slot, n_head_kv, slot, row, 0);
        v_[i]                  = ggml_view_3d(ctx_, base_[i], head_dim, n_slot, n_head_kv, slot, row, n_head_kv * row);
        const std::string name = std::string("kv_pool.") + kv_type_name(t);
        ggml_set_name(base_[i], name.c_str());
        ggml_set_name(k_[i], (name + ".k").c_str());
        ggml_set_name(v_[i], (name + ".v").c_str());
        if (ggml_backend_tensor_alloc(buffer_, base_[i], base) != GGML_STATUS_SUCCESS ||
            ggml_backend_view_init(k_[i]) != GGML_STATUS_SUCCESS ||
            ggml_backend_view_init(v_[i]) != GGML_STATUS_SUCCESS) {
            ggml_backend_buffer_free(buffer_);
            ggml_free(ctx_);
            buffer_ = nullptr;
            ctx_    = nullptr;
            throw Error(kParam, std::string("cannot place the KV pool's ") + kv_type_name(t) + " tensors");
        }
    }
    // Zeroed once so slots that were never written hold finite values (masked attention reads
    // them): zero bytes are 0.0 in f16 and a zero scale in q8_0 / q4_0 blocks.
    ggml_backend_buffer_clear(buffer_, 0);
    page_owner_.assign((size_t) n_pages_, kNone);
}

KvPool::~KvPool() {
    if (buffer_) ggml_backend_buffer_free(buffer_);
    if (ctx_) ggml_free(ctx_);
}

size_t KvPool::bytes_per_slot(KvType t) const { return kv_entry_bytes(t, head_dim_, n_head_kv_); }

int KvPool::slots_in(int pages, KvType t) const {
    if (pages <= 0) return 0;
    // A run starting at a page boundary starts its first entry at the next multiple of the entry
    // size; page starts are multiples of gcd(page, entry) apart, so at most entry - gcd is lost.
    const size_t entry = bytes_per_slot(t);
    const size_t waste = entry - std::gcd(page_bytes_, entry);
    const size_t bytes = (size_t) pages * page_bytes_;
    return bytes < waste ? 0 : (int) ((bytes - waste) / entry);
}

int KvPool::pages_for(int slots, KvType t) const {
    if (slots <= 0) return 0;
    const size_t entry = bytes_per_slot(t);
    const size_t waste = entry - std::gcd(page_bytes_, entry);
    return (int) (((size_t) slots * entry + waste + page_bytes_ - 1) / page_bytes_);
}

int KvPool::slot_at(int page, KvType t) const {
    const size_t entry = bytes_per_slot(t);
    return (int) (((size_t) page * page_bytes_ + entry - 1) / entry);
}

void KvPool::set_owner(int first_page, int n_pages, Handle h) {
    std::fill(page_owner_.begin() + first_page, page_owner_.begin() + first_page + n_pages, h);
}

int KvPool::find_free_run(int pages) const {
    if (pages <= 0) return 0;
    int start = 0;
    while (start + pages <= n_pages_) {
        int end = start;
        while (end < start + pages && page_owner_[end] == kNone) ++end;
        if (end == start + pages) return start;
        start = end + 1;  // page `end` is owned: no run through it
    }
    return -1;
}

KvPool::Handle KvPool::allocate(int slots, KvType t) {
    if (!supports(t)) {
        throw Error("kv_type", std::string(kv_type_name(t)) + " needs head_dim to be a multiple of " +
                                   std::to_string(ggml_blck_size(kv_ggml_type(t))) + " (the model's is " +
                                   std::to_string(head_dim_) + "); accepted here: f16");
    }
    if (slots < 0) return kNone;
    const int pages = pages_for(slots, t);
    if (pages > free_pages()) return kNone;
    int first = 0;
    if (pages > 0) {
        first = find_free_run(pages);
        if (first < 0) {
            compact();
            first = find_free_run(pages);
            if (first < 0) return kNone;  // unreachable: compaction leaves every free page in one run
        }
    }
    Handle h;
    if (!free_handles_.empty()) {
        h = free_handles_.back();
        free_handles_.pop_back();
    } else {
        h = (Handle) runs_.size();
        runs_.emplace_back();
    }
    runs_[h] = Run{ first, pages, true, t };
    set_owner(first, pages, h);
    used_pages_ += pages;
    return h;
}

bool KvPool::resize(Handle h, int slots, int keep) {
    if (!is_live(h) || slots < 0) return false;
    Run &     r    = runs_[h];
    const int need = pages_for(slots, r.type);
    const int cur  = r.n_pages;
    keep           = std::max(0, std::min({ keep, slots_in(cur, r.type), slots_in(need, r.type) }));

    if (need <= cur) {  // shrink (or no change) in place: the first pages keep their data
        set_owner(r.first_page + need, cur - need, kNone);
        used_pages_ -= cur - need;
        r.n_pages = need;
        if (need == 0) r.first_page = 0;
        return true;
    }
    const int extra = need - cur;
    if (extra > free_pages()) return false;

    // 1. In place: the pages right after the run are free.
    if (cur > 0 && r.first_page + need <= n_pages_) {
        bool free_after = true;
        for (int p = r.first_page + cur; p < r.first_page + need && free_after; ++p)
            free_after = page_owner_[p] == kNone;
        if (free_after) {
            set_owner(r.first_page + cur, extra, h);
            used_pages_ += extra;
            r.n_pages = need;
            return true;
        }
    }
    // 2. Elsewhere, first-fit, where the run's own pages count as free (a run that overlaps the old
    // one is fine: move_data stages the bytes through host memory).
    set_owner(r.first_page, cur, kNone);
    const int to = find_free_run(need);
    if (to >= 0) {
        if (keep > 0 && to != r.first_page) move_data(r.type, r.first_page, to, keep);
        r.first_page = to;
        r.n_pages    = need;
        set_owner(to, need, h);
        used_pages_ += extra;
        return true;
    }
    set_owner(r.first_page, cur, h);
    // 3. Compact with this run placed last: every free page then follows it.
    compact(h, keep);
    set_owner(r.first_page + cur, extra, h);
    used_pages_ += extra;
    r.n_pages = need;
    return true;
}

void KvPool::release(Handle h) {
    if (!is_live(h)) return;
    Run & r = runs_[h];
    set_owner(r.first_page, r.n_pages, kNone);
    used_pages_ -= r.n_pages;
    r = Run{};
    free_handles_.push_back(h);
}

int KvPool::first_slot(Handle h) const { return is_live(h) ? slot_at(runs_[h].first_page, runs_[h].type) : -1; }

int KvPool::slot_count(Handle h) const { return is_live(h) ? slots_in(runs_[h].n_pages, runs_[h].type) : 0; }

int KvPool::pages(Handle h) const { return is_live(h) ? runs_[h].n_pages : 0; }

KvType KvPool::type(Handle h) const { return is_live(h) ? runs_[h].type : KvType::F16; }

void KvPool::read_entries(Handle h, int first, int n, uint8_t * dst) const {
    if (!is_live(h) || n <= 0) return;
    const Run &  r     = runs_[h];
    const size_t entry = bytes_per_slot(r.type);
    ggml_backend_tensor_get(base_[(int) r.type], dst, byte_at(r.first_page, r.type) + (size_t) first * entry,
                            (size_t) n * entry);
}

void KvPool::write_entries(Handle h, int first, int n, const uint8_t * src) const {
    if (!is_live(h) || n <= 0) return;
    const Run &  r     = runs_[h];
    const size_t entry = bytes_per_slot(r.type);
    ggml_backend_tensor_set(base_[(int) r.type], src, byte_at(r.first_page, r.type) + (size_t) first * entry,
                            (size_t) n * entry);
}

void KvPool::compact(Handle last, int last_keep) {
    // Work queued on the backend (a graph writing K/V) must land before its data moves.
    ggml_backend_synchronize(backend_);

    const bool           has_last = is_live(last);
    std::vector<uint8_t> saved;
    if (has_last) {
        last_keep = std::max(0, std::min(last_keep, slot_count(last)));
        if (last_keep > 0) {
            saved.resize((size_t) last_keep * bytes_per_slot(runs_[last].type));
            read_entries(last, 0, last_keep, saved.data());
        }
    }
    std::vector<Handle> order;
    for (Handle h = 0; h < (Handle) runs_.size(); ++h) {
        if (runs_[h].live && runs_[h].n_pages > 0 && h != last) order.push_back(h);
    }
    std::sort(order.begin(), order.end(),
              [&](Handle a, Handle b) { return runs_[a].first_page < runs_[b].first_page; });
    // In order of first page, each run's new start is at or before its old one, so a move only
    // overwrites pages already moved out (or the staged `last`).
    int next = 0;
    for (Handle h : order) {
        Run & r = runs_[h];
        if (r.first_page != next) {
            move_data(r.type, r.first_page, next, slots_in(r.n_pages, r.type));
            r.first_page = next;
        }
        next += r.n_pages;
    }
    if (has_last) {
        runs_[last].first_page = next;
        if (last_keep > 0) write_entries(last, 0, last_keep, saved.data());
        next += runs_[last].n_pages;
    }
    std::fill(page_owner_.begin(), page_owner_.end(), kNone);
    for (Handle h = 0; h < (Handle) runs_.size(); ++h) {
        if (runs_[h].live) set_owner(runs_[h].first_page, runs_[h].n_pages, h);
    }
    ++compactions_;
}

void KvPool::move_data(KvType t, int from, int to, int n) {
    if (n <= 0 || from == to) return;
    ggml_backend_synchronize(backend_);
    // The run's entries are one contiguous byte range: read it whole, then write it, so
    // overlapping ranges are safe.
    const size_t bytes = (size_t) n * bytes_per_slot(t);
    if (scratch_.size() < bytes) scratch_.resize(bytes);
    ggml_backend_tensor_get(base_[(int) t], scratch_.data(), byte_at(from, t), bytes);
    ggml_backend_tensor_set(base_[(int) t], scratch_.data(), byte_at(to, t), bytes);
}

bool KvPool::check_invariants() const {
    if ((int) page_owner_.size() != n_pages_ || used_pages_ < 0 || used_pages_ > n_pages_) return false;
    int              sum = 0;
    std::vector<int> owned((size_t) n_pages_, 0);
    for (Handle h = 0; h < (Handle) runs_.size(); ++h) {
        const Run & r = runs_[h];
        if (!r.live) {
            if (std::count(free_handles_.begin(), free_handles_.end(), h) != 1) return false;
            continue;
        }
        if (r.n_pages < 0 || r.first_page < 0 || r.first_page + r.n_pages > n_pages_) return false;
        for (int p = r.first_page; p < r.first_page + r.n_pages; ++p) {
            if (page_owner_[p] != h || ++owned[p] > 1) return false;
        }
        // The run's entries lie inside its pages.
        const size_t end =
            byte_at(r.first_page, r.type) + (size_t) slots_in(r.n_pages, r.type) * bytes_per_slot(r.type);
        if (r.n_pages > 0 && end > (size_t) (r.first_page + r.n_pages) * page_bytes_) return false;
        sum += r.n_pages;
    }
    if (sum != used_pages_) return false;
    for (int p = 0; p < n_pages_; ++p) {
        if (page_owner_[p] != kNone && owned[p] != 1) return false;  // owned by no live run
    }
    for (Handle h : free_handles_) {
        if (h < 0 || (size_t) h >= runs_.size() || runs_[h].live) return false;
    }
    return true;
}

}  // namespace pkv
