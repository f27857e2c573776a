// KV-cache compression methods: per-layer budgets and per-KV-head token selection.
// Each method is one small unit (methods/*.cpp style: one function pair per method) registered
// in a table; the engine owns the plumbing (where K/V live, when compression runs).
// The exact method is specified in ../shared/DESIGN.md section 2.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pkv {

enum class Pooling { MaxPool, AvgPool, None };
enum class HeadAggregation { Mean, Max };

struct CompressionParams {
    std::string     method      = "pyramidkv";
    int             budget      = 128;  // average KV entries kept per layer per KV head, window included
    int             window      = 8;    // alpha: observation window (last prompt tokens), always kept
    int             beta        = 20;   // pyramid steepness (min = (B - alpha) / beta)
    int             kernel_size = 7;    // pooling kernel along positions (odd, >= 1)
    Pooling         pooling     = Pooling::MaxPool;
    HeadAggregation aggregation = HeadAggregation::Mean;  // over the G query heads of a KV head
};

// What a method may look at for one layer. Query heads are grouped as in llama.cpp / HF:
// query head h belongs to KV head h / (n_head / n_head_kv).
struct LayerAttention {
    int n         = 0;  // prompt length (positions 0 .. n-1 are stored before compression)
    int n_head    = 0;  // query heads
    int n_head_kv = 0;  // KV heads
    int n_window  = 0;  // rows in window_probs (= min(window, n))
    // Softmax (fp32) of the last n_window prompt queries (after RoPE) against all n keys, causal
    // inside the window, scale 1/sqrt(head_dim). Layout [n_head][n_window][n]; row i is the query
    // at position n - n_window + i. Null when the method does not ask for it.
    const float * window_probs = nullptr;
    // Attention accumulated over every prompt query (causal softmax rows summed), layout
    // [n_head][n]. Null when the method does not ask for it.
    const float * accumulated = nullptr;
};

// Kept prompt positions for one layer: kept[kv_head] is sorted ascending, every head the same size.
using HeadSelection = std::vector<std::vector<int32_t>>;

struct Method {
    const char * name;
    const char * description;
    bool         needs_window_probs;  // engine must compute LayerAttention::window_probs
    bool         needs_accumulated;   // engine must compute LayerAttention::accumulated (H2O)
    // Entries kept per KV head for each layer (window included); n_layers values, each <= n.
    std::vector<int> (*layer_budgets)(int n_layers, int n, const CompressionParams & p);
    // Positions kept by each KV head of one layer, `keep` of them (keep <= n).
    HeadSelection (*select)(const LayerAttention & att, int keep, const CompressionParams & p);
};

// Registry. find_method returns nullptr for an unknown name.
const std::vector<const Method *> & all_methods();
const Method *                      find_method(const std::string & name);
std::string                         method_names_joined(const char * sep = ", ");

// The official PyramidKV per-layer budget (DESIGN §2), window included. n < budget keeps all n.
std::vector<int> pyramid_budgets(int n_layers, int budget, int n, int window, int beta);
// Uniform budget (SnapKV, H2O, StreamingLLM): min(n, budget) everywhere.
std::vector<int> uniform_budgets(int n_layers, int budget, int n);

// Shared scoring (SnapKV / PyramidKV): window probabilities summed over the window queries for
// prefix positions 0 .. n-n_window-1, pooled along positions, aggregated over each KV head's
// query heads. Result layout [n_head_kv][n - n_window].
std::vector<float> window_scores(const LayerAttention & att, const CompressionParams & p);
// Per KV head: the top-(keep - n_window) prefix positions by score plus the n_window window
// positions, sorted ascending. scores layout [n_head_kv][n_prefix]. Ties go to the earlier position.
HeadSelection top_k_plus_window(const std::vector<float> & scores, int n_head_kv, int n, int n_window, int keep);

// The textual names of Pooling / HeadAggregation (CLI flags, protocol fields). Return an empty
// string on success, else one line naming `param`, the value and the accepted names.
std::string parse_pooling(const std::string & name, const char * param, Pooling & out);
std::string parse_aggregation(const std::string & name, const char * param, HeadAggregation & out);

// Validation of user-supplied parameters; returns an empty string when valid, otherwise one line
// naming the parameter, the value received and the accepted range.
std::string validate_params(const CompressionParams & p);

}  // namespace pkv
