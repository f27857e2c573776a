// A session: one sequence whose KV cache lives in the engine's pool, compressed after (or during)
// prefill by its method. Its life: append(tokens)… → decode (alone, or batched with other sessions
// through Engine::decode_batch) → append … ; positions always continue at the number of tokens
// seen, never at the stored length (docs/DESIGN.md §5 trap 1).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "compress.h"
#include "engine.h"
#include "kv_pool.h"

namespace pkv {

struct SessionStats {
    int              tokens_seen = 0;
    std::vector<int> layer_kv_lengths;
    size_t           kv_bytes      = 0;  // entries held × bytes per entry of the session's KV type
    size_t           full_kv_bytes = 0;  // what FullKV of the same type would hold for tokens_seen
    size_t           pool_bytes    = 0;  // pool pages the session holds × page bytes
};

// H2O's running sums, owned by the session: per layer, the attention that every prompt query so far
// gave each stored entry, [n_head][n_entries] in storage order. The engine hands over a chunk's
// sums (Engine::ForwardScores::attention_sums); compression keeps the sums of the entries that stay.
class AttentionSums {
  public:
    AttentionSums(int n_layer, int n_head) : n_head_(n_head), layers_(n_layer) {}
    // Adds a chunk's sums [n_head][n_kv] over the layer's entries: those held before the chunk,
    // then the chunk's own tokens. Entries without sums so far (decoded since the last chunk, or
    // the chunk's) start from 0.
    void extend(int il, const std::vector<float> & chunk);
    // After compression: keeps the sums of the entries that stay, entries[kv_head] (indices into
    // the layer's n_entries, ascending), query head h following KV head h / (n_head / n_head_kv).
    // Sums that do not cover the layer's n_entries entries are left as they are.
    void keep(int il, int n_entries, const HeadSelection & entries);
    // The layer's sums when they cover exactly its n_entries entries, else null.
    const float *                           covering(int il, int n_entries) const;
    const std::vector<std::vector<float>> & layers() const { return layers_; }

  private:
    int                             n_head_;
    std::vector<std::vector<float>> layers_;
};

class Session {
  public:
    // chunk_size > 0: chunked prefill, compressing after every chunk of that many tokens (peak KV
    // per layer ≤ budget + chunk); 0: one-shot (the whole input, then compress once).
    // kv_type: the storage type of its entries in the pool (default the engine's --kv-type).
    Session(Engine & engine, const CompressionParams & params, int chunk_size = 0);
    Session(Engine & engine, const CompressionParams & params, int chunk_size, KvType kv_type);
    ~Session();
    Session(const Session &)             = delete;
    Session & operator=(const Session &) = delete;

    // Evaluate tokens (in ubatches of EngineOptions::n_ubatch), compressing per the method and the
    // chunking mode. Leaves the logits of the last token. A multi-turn session appends each turn.
    // on_chunk(done, total) is called after every compressed chunk.
    void append(const std::vector<int32_t> & tokens, const std::function<void(int, int)> & on_chunk = {});
    // The same, one evaluation at a time (a server interleaves them with other sessions' decode
    // steps): plan_append(n) lists the steps for an input of n tokens; run them in order on the
    // same input. Compression happens after the steps marked compress_after.
    struct AppendStep {
        int  begin, end;      // token range of the input evaluated by this step
        bool segment_start;   // first evaluation after a compression (or of the input)
        bool compress_after;  // last evaluation of a segment: window scored, then compressed
    };
    std::vector<AppendStep> plan_append(int n) const;
    void                    run_append_step(const std::vector<int32_t> & tokens, const AppendStep & step);
    void                    prefill(const std::vector<int32_t> & tokens) { append(tokens); }
    // Append one token (its position = tokens seen) and compute its logits.
    void decode(int32_t token);
    // Make room for n more tokens in every layer (fails cleanly when the pool is full).
    void reserve(int n_more);

    // A new session holding this session's prefill compressed with other settings, without
    // recomputing it. Needs keep_scores (set before the prefill) and no compression applied yet
    // (a method that does not compress, e.g. exact_method()), i.e. an exact prefill.
    // The child stores its entries as `kv_type` (default: the source's type).
    std::unique_ptr<Session> fork(const CompressionParams & params) const { return fork(params, kv_type_); }
    std::unique_ptr<Session> fork(const CompressionParams & params, KvType kv_type) const;
    // Serialise the compressed state (tokens, positions, kept K/V, settings) / rebuild it.
    std::string                     save() const;
    static std::unique_ptr<Session> restore(Engine & engine, const std::string & bytes);

    const std::vector<float> & logits() const { return logits_; }
    SessionStats               stats() const;
    // Prompt positions kept per layer and KV head by the last compression (empty before).
    const std::vector<HeadSelection> & kept() const { return kept_; }
    // Positions held now, per layer and KV head, in storage order.
    const std::vector<HeadSelection> & positions() const { return positions_; }
    const std::vector<int32_t> &       tokens() const { return tokens_; }
    const CompressionParams &          params() const { return params_; }
    KvType                             kv_type() const { return kv_type_; }
    Engine &                           engine() const { return engine_; }
    double                             prefill_seconds() const { return prefill_seconds_; }
    int                                chunk_size() const { return chunk_size_; }

    // Keep the prefill's attention scores (needed by fork; tests inspect them): window
    // probabilities [n_head][n_window][n] and accumulated attention [n_head][n] per layer.
    void                                    set_keep_scores(bool on) { keep_scores_ = on; }
    const std::vector<std::vector<float>> & recorded_window_probs() const { return window_probs_; }
    const std::vector<std::vector<float>> & recorded_accumulated() const { return accumulated_.layers(); }

  private:
    friend class Engine;
    void evaluate(const int32_t * tokens, int n, bool last_of_input, bool scores);
    // Compress every layer whose stored entries exceed its budget for the tokens seen.
    void compress();
    // Keep, per layer, the listed entries of each KV head (storage indices, ascending), copying
    // them from `src` (this session or the one being forked) into this session's pages.
    void                       keep_entries(const std::vector<HeadSelection> & entries, const Session & src);
    std::vector<HeadSelection> select(const Method & method, const CompressionParams & p) const;
    void                       ensure_layer_capacity(int il, int need, bool growth_room);
    void                       check_tokens(const int32_t * tokens, int n) const;  // ids and context
    void                       appended(const int32_t * tokens, int n);            // bookkeeping after a forward

    Engine &                    engine_;
    CompressionParams           params_;
    const Method *              method_;
    int                         chunk_size_ = 0;
    KvType                      kv_type_    = KvType::F16;
    std::vector<KvPool::Handle> pages_;      // per layer
    std::vector<int>            size_;       // entries held per layer
    std::vector<HeadSelection>  positions_;  // [layer][kv_head][entry] → token position
    std::vector<HeadSelection>  kept_;
    std::vector<int32_t>        tokens_;
    std::vector<float>          logits_;
    // Scores of the current prefill, per layer, for the entries held when they were computed.
    std::vector<std::vector<float>> window_probs_;  // [n_head][n_window][n]
    AttentionSums                   accumulated_;   // H2O's, over every query of the prompt so far
    bool                            keep_scores_     = false;
    bool                            compressed_      = false;  // entries were dropped at least once
    double                          prefill_seconds_ = 0.0;
    double                          append_started_  = 0.0;
};

}  // namespace pkv
