// H2O: heavy hitters. Keeps the B−α prefix positions with the highest attention accumulated over
// every prompt query (the session sums it chunk by chunk, never n×n at once) plus the α most
// recent. Uniform budget.
#include <algorithm>
#include <cstddef>

#include "methods.h"

namespace pkv {

namespace {

HeadSelection select(const LayerAttention & att, int keep, const CompressionParams & p) {
    if (keep >= att.n) return all_positions(att.n_head_kv, att.n);
    const int          n_prefix = att.n - att.n_window;
    std::vector<float> per_head(static_cast<size_t>(att.n_head) * n_prefix);
    for (int h = 0; h < att.n_head; ++h) {
        std::copy_n(att.accumulated + static_cast<size_t>(h) * att.n, n_prefix,
                    per_head.begin() + static_cast<ptrdiff_t>(h) * n_prefix);
    }
    const auto scores = aggregate_heads(per_head, att.n_head, att.n_head_kv, n_prefix, p.aggregation);
    return top_k_plus_window(scores, att.n_head_kv, att.n, att.n_window, keep);
}

}  // namespace

const Method kH2O{ "h2o",
                   "H2O: heavy hitters by attention accumulated over all prompt queries",
                   /*compresses=*/true,
                   /*needs_window_probs=*/false,
                   /*needs_accumulated=*/true,
                   /*keeps_window=*/true,
                   /*min_budget=*/2,
                   uniform_layer_budgets,
                   select,
                   /*validate=*/nullptr };

}  // namespace pkv
