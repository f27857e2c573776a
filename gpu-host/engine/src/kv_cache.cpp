#include "kv_cache.h"

#include "error.h"
#include "model.h"

namespace pkv {

KvCache::KvCache(ggml_backend_t backend, const ModelConfig & cfg, const std::vector<int> & capacity) {
    ggml_init_params ip{ ggml_tensor_overhead() * (2 * capacity.size() + 1), nullptr, /*no_alloc=*/true };
    ctx_ = ggml_init(ip);
    for (size_t il = 0; il < capacity.size(); ++il) {
        const int cap = std::max(capacity[il], 1);
        k_.push_back(ggml_new_tensor_3d(ctx_, GGML_TYPE_F16, cfg.head_dim, cap, cfg.n_head_kv));
        v_.push_back(ggml_new_tensor_3d(ctx_, GGML_TYPE_F16, cfg.head_dim, cap, cfg.n_head_kv));
    }
    size_.assign(capacity.size(), 0);
    buffer_ = ggml_backend_alloc_ctx_tensors(ctx_, backend);
    if (!buffer_) {
        ggml_free(ctx_);
        throw Error("kv", "cannot allocate the KV cache");
    }
}

KvCache::~KvCache() {
    ggml_backend_buffer_free(buffer_);
    ggml_free(ctx_);
}

size_t KvCache::bytes_per_entry() const {
    return k_.empty() ? 0 : 2 * ggml_row_size(k_[0]->type, k_[0]->ne[0]) * k_[0]->ne[2];
}

size_t KvCache::bytes_used() const {
    size_t n = 0;
    for (int s : size_) n += (size_t) s;
    return n * bytes_per_entry();
}

size_t KvCache::bytes_allocated() const { return ggml_backend_buffer_get_size(buffer_); }

}  // namespace pkv
