// FullKV: keeps every entry. The exact prefill every other method is measured against, and the
// only kind of session that can be forked.
#include <algorithm>

#include "methods.h"

namespace pkv {

namespace {

std::vector<int> budgets(int n_layers, int n, const CompressionParams &) {
    return std::vector<int>(std::max(n_layers, 0), std::max(n, 0));
}

HeadSelection select(const LayerAttention & att, int, const CompressionParams &) {
    return all_positions(att.n_head_kv, att.n);
}

}  // namespace

const Method kFullKV{ "full",
                      "FullKV: keeps every prompt position",
                      /*compresses=*/false,
                      /*needs_window_probs=*/false,
                      /*needs_accumulated=*/false,
                      /*keeps_window=*/true,
                      /*min_budget=*/2,
                      budgets,
                      select,
                      /*validate=*/nullptr };

}  // namespace pkv
