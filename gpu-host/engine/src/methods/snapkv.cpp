// SnapKV: the observation window's attention decides. Each KV head keeps its top B−α prefix
// positions by window score (window_scores: summed over the α queries, pooled, aggregated over its
// query heads) plus the α window positions. Uniform budget.
#include "methods.h"

namespace pkv {

HeadSelection snapkv_select(const LayerAttention & att, int keep, const CompressionParams & p) {
    if (keep >= att.n) return all_positions(att.n_head_kv, att.n);
    return top_k_plus_window(window_scores(att, p), att.n_head_kv, att.n, att.n_window, keep);
}

const Method kSnapKV{ "snapkv",
                      "SnapKV: observation-window scores, uniform budget",
                      /*compresses=*/true,
                      /*needs_window_probs=*/true,
                      /*needs_accumulated=*/false,
                      /*keeps_window=*/true,
                      /*min_budget=*/2,
                      uniform_layer_budgets,
                      snapkv_select,
                      /*validate=*/nullptr };

}  // namespace pkv
