#include "kv_pool.h"

#include <algorithm>
#include <climits>
#include <string>

#include "error.h"

namespace pkv {

namespace {

const char * kParam = "--kv-pool-bytes";

}  // namespace

KvPool::KvPool(ggml_backend_t backend, int head_dim, int n_head_kv, size_t capacity_bytes, int page_slots)
    : backend_(backend), head_dim_(head_dim), n_head_kv_(n_head_kv), page_slots_(page_slots) {
    if (!backend || head_dim <= 0 || n_head_kv <= 0 || page_slots <= 0) {
        throw Error("kv", "invalid KV pool shape (head_dim " + std::to_string(head_dim) + ", n_head_kv " +
                              std::to_string(n_head_kv) + ", page_slots " + std::to_string(page_slots) + ")");
    }
    const size_t page  = bytes_per_page();
    const size_t pages = capacity_bytes / page;
    // Slots are addressed with int: n_slots = n_pages * page_slots must fit.
    const size_t max_pages = (size_t) (INT_MAX / page_slots);
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
    n_pages_              = (int) pages;
    const int64_t n_slots = (int64_t) n_pages_ * page_slots_;

    ggml_init_params ip{ ggml_tensor_overhead() * 3, nullptr, /*no_alloc=*/true };
    ctx_ = ggml_init(ip);
    if (!ctx_) throw Error(kParam, "cannot create the KV pool's ggml context");
    k_ = ggml_new_tensor_3d(ctx_, GGML_TYPE_F16, head_dim, n_slots, n_head_kv);
    v_ = ggml_new_tensor_3d(ctx_, GGML_TYPE_F16, head_dim, n_slots, n_head_kv);
    ggml_set_name(k_, "kv_pool.k");
    ggml_set_name(v_, "kv_pool.v");
    buffer_ = ggml_backend_alloc_ctx_tensors(ctx_, backend);
    if (!buffer_) {
        ggml_free(ctx_);
        ctx_ = nullptr;
        throw Error(kParam, std::to_string(capacity_bytes) + " bytes (" + std::to_string(this->capacity_bytes()) +
                                " in whole pages) cannot be allocated on backend " + ggml_backend_name(backend) +
                                "; accepted range: " + std::to_string(page) + " bytes up to what the device has free");
    }
    // Zeroed once so slots that were never written hold finite values (masked attention reads them).
    ggml_backend_buffer_clear(buffer_, 0);
    page_owner_.assign((size_t) n_pages_, kNone);
}

KvPool::~KvPool() {
    if (buffer_) ggml_backend_buffer_free(buffer_);
    if (ctx_) ggml_free(ctx_);
}

size_t KvPool::bytes_per_slot() const { return 2 * (size_t) n_head_kv_ * (size_t) head_dim_ * sizeof(ggml_fp16_t); }

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

KvPool::Handle KvPool::allocate(int slots) {
    if (slots < 0) return kNone;
    const int pages = pages_for(slots);
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
    runs_[h] = Run{ first, pages, true };
    set_owner(first, pages, h);
    used_pages_ += pages;
    return h;
}

bool KvPool::resize(Handle h, int slots, int keep) {
    if (!is_live(h) || slots < 0) return false;
    Run &     r    = runs_[h];
    const int need = pages_for(slots);
    const int cur  = r.n_pages;
    keep           = std::max(0, std::min({ keep, cur * page_slots_, need * page_slots_ }));

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
    // one is fine: move_data stages each head's range through host memory).
    set_owner(r.first_page, cur, kNone);
    const int to = find_free_run(need);
    if (to >= 0) {
        if (keep > 0 && to != r.first_page)
            move_data(r.first_page * page_slots_, to * page_slots_, need * page_slots_, keep);
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

int KvPool::first_slot(Handle h) const { return is_live(h) ? runs_[h].first_page * page_slots_ : -1; }

int KvPool::slot_count(Handle h) const { return is_live(h) ? runs_[h].n_pages * page_slots_ : 0; }

void KvPool::compact(Handle last, int last_keep) {
    // Work queued on the backend (a graph writing K/V) must land before its data moves.
    ggml_backend_synchronize(backend_);

    const bool           has_last = is_live(last);
    std::vector<uint8_t> saved;
    if (has_last) {
        last_keep = std::max(0, std::min(last_keep, runs_[last].n_pages * page_slots_));
        if (last_keep > 0) {
            saved.resize((size_t) last_keep * bytes_per_slot());
            read_slots(runs_[last].first_page * page_slots_, last_keep, saved.data());
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
            move_data(r.first_page * page_slots_, next * page_slots_, r.n_pages * page_slots_, r.n_pages * page_slots_);
            r.first_page = next;
        }
        next += r.n_pages;
    }
    if (has_last) {
        runs_[last].first_page = next;
        if (last_keep > 0) write_slots(next * page_slots_, last_keep, saved.data());
        next += runs_[last].n_pages;
    }
    std::fill(page_owner_.begin(), page_owner_.end(), kNone);
    for (Handle h = 0; h < (Handle) runs_.size(); ++h) {
        if (runs_[h].live) set_owner(runs_[h].first_page, runs_[h].n_pages, h);
    }
    ++compactions_;
}

void KvPool::read_slots(int first_slot, int n, uint8_t * dst) const {
    const size_t row = k_->nb[1];
    for (ggml_tensor * t : { k_, v_ }) {
        for (int head = 0; head < n_head_kv_; ++head) {
            ggml_backend_tensor_get(t, dst, head * t->nb[2] + (size_t) first_slot * row, (size_t) n * row);
            dst += (size_t) n * row;
        }
    }
}

void KvPool::write_slots(int first_slot, int n, const uint8_t * src) const {
    const size_t row = k_->nb[1];
    for (ggml_tensor * t : { k_, v_ }) {
        for (int head = 0; head < n_head_kv_; ++head) {
            ggml_backend_tensor_set(t, src, head * t->nb[2] + (size_t) first_slot * row, (size_t) n * row);
            src += (size_t) n * row;
        }
    }
}

void KvPool::move_data(int from_slot, int to_slot, int slots, int keep_slots) {
    const int n = std::min(slots, keep_slots);
    if (n <= 0 || from_slot == to_slot) return;
    ggml_backend_synchronize(backend_);
    // One head's range at a time: read it whole, then write it, so overlapping ranges are safe
    // (ranges of different heads never overlap).
    const size_t bytes = (size_t) n * k_->nb[1];
    if (scratch_.size() < bytes) scratch_.resize(bytes);
    for (ggml_tensor * t : { k_, v_ }) {
        for (int head = 0; head < n_head_kv_; ++head) {
            const size_t base = head * t->nb[2];
            ggml_backend_tensor_get(t, scratch_.data(), base + (size_t) from_slot * t->nb[1], bytes);
            ggml_backend_tensor_set(t, scratch_.data(), base + (size_t) to_slot * t->nb[1], bytes);
        }
    }
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
