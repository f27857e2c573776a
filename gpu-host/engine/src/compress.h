// KV-cache compression methods (docs/DESIGN.md §2): per-layer budgets and per-KV-head selection.
// Each method is one file in methods/ holding only its idea — its traits, how many entries each
// layer keeps, which ones — and one line in the registry (compress.cpp). The scoring, pooling and
// top-k helpers they share are here; the plumbing (where K/V live, when compression runs, which
// scores the engine computes) belongs to the session and the engine, which ask a method's traits
// and never its name.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace pkv {

enum class Pooling { MaxPool, AvgPool, None };
enum class HeadAggregation { Mean, Max };

// The defaults here are the engine's defaults everywhere (CLI flags, protocol fields, hello).
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
    // Traits: what the engine, the host and the tests may rely on without asking which method it is.
    bool compresses;          // false: keeps every entry (FullKV); its budget changes nothing
    bool needs_window_probs;  // the engine computes LayerAttention::window_probs for it
    bool needs_accumulated;   // the engine computes LayerAttention::accumulated for it
    bool keeps_window;        // the `window` most recent positions are always among those kept
    int  min_budget;          // smallest budget accepted with the smallest window (1); any budget
                              // must also exceed the window
    // Entries kept per KV head for each layer (window included); n_layers values, each <= n.
    std::vector<int> (*layer_budgets)(int n_layers, int n, const CompressionParams & p);
    // Positions kept by each KV head of one layer, `keep` of them (keep <= n).
    HeadSelection (*select)(const LayerAttention & att, int keep, const CompressionParams & p);
    // The method's own rules for its parameters, checked after validate_params' shared ones: ""
    // or one line naming the parameter, the value and the accepted range. Null: no rules of its own.
    std::string (*validate)(const CompressionParams & p);
};

// Registry (compress.cpp), in a fixed order (help texts, the engine's hello). find_method returns
// nullptr for an unknown name.
const std::vector<const Method *> & all_methods();
const Method *                      find_method(const std::string & name);
std::string                         method_names_joined(const char * sep = ", ");
// The registered method that keeps every entry (compresses false): the exact prefill that FullKV
// baselines and fork sources use.
const Method & exact_method();

// The official PyramidKV per-layer budget (docs/DESIGN.md §2), window included. n < budget keeps
// all n.
std::vector<int> pyramid_budgets(int n_layers, int budget, int n, int window, int beta);
// Uniform budget (SnapKV, H2O, StreamingLLM): min(n, budget) everywhere.
std::vector<int> uniform_budgets(int n_layers, int budget, int n);

// Every position 0 .. n-1 for each KV head: what a layer keeps when nothing needs to go.
HeadSelection all_positions(int n_head_kv, int n);
// Reduces per-query-head scores [n_head][len] to per-KV-head scores [n_head_kv][len] (mean or
// max over each KV head's G query heads): selection happens per KV head so the cache stays
// n_head_kv wide (docs/DESIGN.md §5 trap 2).
std::vector<float> aggregate_heads(const std::vector<float> & per_head, int n_head, int n_head_kv, int len,
                                   HeadAggregation agg);
// Shared scoring (SnapKV / PyramidKV): window probabilities summed over the window queries for
// prefix positions 0 .. n-n_window-1, pooled along positions, aggregated over each KV head's
// query heads. Result layout [n_head_kv][n - n_window].
std::vector<float> window_scores(const LayerAttention & att, const CompressionParams & p);
// Per KV head: the top-(keep - n_window) prefix positions by score plus the n_window window
// positions, sorted ascending. scores layout [n_head_kv][n_prefix]. Ties go to the earlier position.
HeadSelection top_k_plus_window(const std::vector<float> & scores, int n_head_kv, int n, int n_window, int keep);

// The textual names of Pooling / HeadAggregation (CLI flags, protocol fields). The parsers return
// an empty string on success, else one line naming `param`, the value and the accepted names.
std::string  parse_pooling(const std::string & name, const char * param, Pooling & out);
std::string  parse_aggregation(const std::string & name, const char * param, HeadAggregation & out);
const char * pooling_name(Pooling p);
const char * aggregation_name(HeadAggregation a);

// Validation of user-supplied parameters: the rules every method shares, then the method's own.
// Returns an empty string when valid, otherwise one line naming the parameter, the value received
// and the accepted range.
std::string validate_params(const CompressionParams & p);

}  // namespace pkv
