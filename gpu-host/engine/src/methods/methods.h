// The registered methods, one file each (compress.cpp lists them in its registry table).
#pragma once

#include "compress.h"

namespace pkv {

extern const Method kFullKV;        // full.cpp
extern const Method kStreamingLLM;  // streamingllm.cpp
extern const Method kH2O;           // h2o.cpp
extern const Method kSnapKV;        // snapkv.cpp
extern const Method kPyramidKV;     // pyramidkv.cpp

// The budgets of a uniform-budget method (SnapKV, H2O, StreamingLLM): uniform_budgets at p.budget.
std::vector<int> uniform_layer_budgets(int n_layers, int n, const CompressionParams & p);

// SnapKV's selection (snapkv.cpp), which PyramidKV shares: per KV head the top keep − α prefix
// positions by window score plus the α window positions.
HeadSelection snapkv_select(const LayerAttention & att, int keep, const CompressionParams & p);

}  // namespace pkv
