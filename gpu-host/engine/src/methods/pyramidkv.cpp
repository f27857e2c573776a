// PyramidKV: SnapKV's selection with the official pyramid of per-layer budgets (pyramid_budgets:
// the lower layers keep more, the mean stays near B).
#include "methods.h"

namespace pkv {

namespace {

std::vector<int> budgets(int n_layers, int n, const CompressionParams & p) {
    return pyramid_budgets(n_layers, p.budget, n, p.window, p.beta);
}

}  // namespace

const Method kPyramidKV{ "pyramidkv",
                         "PyramidKV: observation-window scores, pyramid per-layer budgets",
                         /*compresses=*/true,
                         /*needs_window_probs=*/true,
                         /*needs_accumulated=*/false,
                         /*keeps_window=*/true,
                         /*min_budget=*/2,
                         budgets,
                         snapkv_select,
                         /*validate=*/nullptr };

}  // namespace pkv
