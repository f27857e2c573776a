// The KV store of one session: per layer, exactly the entries it keeps. K is stored after RoPE,
// so slot i of one KV head may hold a different token than slot i of the next head — per-head
// selection costs nothing, and all heads of a layer share one mask and one length.
#pragma once

#include <vector>

#include "ggml-backend.h"
#include "ggml.h"

namespace pkv {

struct ModelConfig;

class KvCache {
  public:
    // capacity[il]: slots allocated per KV head in layer il.
    KvCache(ggml_backend_t backend, const ModelConfig & cfg, const std::vector<int> & capacity);
    ~KvCache();
    KvCache(const KvCache &) = delete;
    KvCache & operator=(const KvCache &) = delete;

    int           n_layer() const { return (int) k_.size(); }
    ggml_tensor * k(int il) const { return k_[il]; }  // [head_dim, capacity, n_head_kv] f16
    ggml_tensor * v(int il) const { return v_[il]; }  // [head_dim, capacity, n_head_kv] f16
    int           capacity(int il) const { return (int) k_[il]->ne[1]; }
    int           size(int il) const { return size_[il]; }
    void          set_size(int il, int n) { size_[il] = n; }
    std::vector<int> sizes() const { return size_; }

    // Bytes of K and V for one entry of one layer (all KV heads).
    size_t bytes_per_entry() const;
    size_t bytes_used() const;       // entries held, all layers
    size_t bytes_allocated() const;  // backend buffer

  private:
    ggml_context *             ctx_    = nullptr;
    ggml_backend_buffer_t      buffer_ = nullptr;
    std::vector<ggml_tensor *> k_, v_;
    std::vector<int>           size_;
};

}  // namespace pkv
