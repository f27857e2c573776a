#include "session.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "error.h"
#include "profile.h"

namespace pkv {

namespace {

double now_seconds() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// A layer's pages hold its entries plus an eighth (at least one 16-slot page), so decoding moves
// pages rarely; when they fill up the run grows by the same rule.
int grown(int need) { return need + std::max(16, need / 8); }

}  // namespace

void AttentionSums::extend(int il, const std::vector<float> & chunk) {
    const int            n_kv  = (int) (chunk.size() / n_head_);
    std::vector<float> & acc   = layers_[il];
    const int            old_n = (int) (acc.size() / n_head_);
    std::vector<float>   grown((size_t) n_head_ * n_kv, 0.0f);
    for (int h = 0; h < n_head_; ++h) {
        for (int j = 0; j < std::min(old_n, n_kv); ++j) grown[(size_t) h * n_kv + j] = acc[(size_t) h * old_n + j];
        for (int j = 0; j < n_kv; ++j) grown[(size_t) h * n_kv + j] += chunk[(size_t) h * n_kv + j];
    }
    acc = std::move(grown);
}

void AttentionSums::keep(int il, int n_entries, const HeadSelection & entries) {
    std::vector<float> & acc = layers_[il];
    if (acc.size() != (size_t) n_head_ * n_entries || entries.empty()) return;
    const int          group = n_head_ / (int) entries.size();
    const int          keep  = (int) entries[0].size();
    std::vector<float> kept((size_t) n_head_ * keep);
    for (int h = 0; h < n_head_; ++h)
        for (int e = 0; e < keep; ++e)
            kept[(size_t) h * keep + e] = acc[(size_t) h * n_entries + entries[h / group][e]];
    acc = std::move(kept);
}

const float * AttentionSums::covering(int il, int n_entries) const {
    const std::vector<float> & acc = layers_[il];
    return acc.size() == (size_t) n_head_ * n_entries ? acc.data() : nullptr;
}

Session::Session(Engine & engine, const CompressionParams & params, int chunk_size)
    : Session(engine, params, chunk_size, engine.options().kv_type) {}

Session::Session(Engine & engine, const CompressionParams & params, int chunk_size, KvType kv_type)
    : engine_(engine),
      params_(params),
      chunk_size_(chunk_size),
      kv_type_(kv_type),
      accumulated_(engine.config().n_layer, engine.config().n_head) {
    if (!engine_.pool().supports(kv_type_)) {
        throw Error("kv_type", std::string(kv_type_name(kv_type_)) +
                                   " needs head_dim to be a multiple of 32 (the model's is " +
                                   std::to_string(engine_.config().head_dim) + "); accepted for this model: f16");
    }
    const std::string problem = validate_params(params_);
    if (!problem.empty()) throw Error("", problem);
    if (chunk_size_ < 0 || (chunk_size_ > 0 && chunk_size_ < params_.window)) {
        throw Error("--chunk-size", std::to_string(chunk_size_) + " must be 0 (one-shot) or >= --window (" +
                                        std::to_string(params_.window) + ")");
    }
    method_               = find_method(params_.method);
    const ModelConfig & c = engine_.config();
    pages_.assign(c.n_layer, KvPool::kNone);
    size_.assign(c.n_layer, 0);
    positions_.assign(c.n_layer, HeadSelection(c.n_head_kv));
}

Session::~Session() {
    for (KvPool::Handle h : pages_) engine_.pool().release(h);
}

SessionStats Session::stats() const {
    const KvPool & pool = engine_.pool();
    SessionStats   s;
    s.tokens_seen      = (int) tokens_.size();
    s.layer_kv_lengths = size_;
    size_t entries     = 0;
    for (size_t il = 0; il < size_.size(); ++il) {
        entries += size_[il];
        s.pool_bytes += (size_t) pool.pages(pages_[il]) * pool.bytes_per_page();
    }
    s.kv_bytes      = entries * pool.bytes_per_slot(kv_type_);
    s.full_kv_bytes = (size_t) s.tokens_seen * size_.size() * pool.bytes_per_slot(kv_type_);
    return s;
}

void Session::check_tokens(const int32_t * tokens, int n) const {
    const ModelConfig & c = engine_.config();
    if ((int) tokens_.size() + n > engine_.n_ctx()) {
        throw Error("prompt", std::to_string(tokens_.size() + n) + " tokens exceed the context of " +
                                  std::to_string(engine_.n_ctx()));
    }
    for (int i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= c.n_vocab) {
            throw Error("prompt",
                        "token id " + std::to_string(tokens[i]) + " outside [0, " + std::to_string(c.n_vocab) + ")");
        }
    }
}

void Session::reserve(int n_more) {
    // Growth room only when every layer that grows can have it: otherwise the first layers would
    // take it and starve the last ones of the exact room they need. Refuse before moving anything.
    KvPool & pool  = engine_.pool();
    long     exact = 0, roomy = 0;
    for (size_t il = 0; il < pages_.size(); ++il) {
        const int need = size_[il] + n_more;
        const int have = pool.pages(pages_[il]);
        if (pages_[il] != KvPool::kNone && pool.slot_count(pages_[il]) >= need) continue;
        exact += std::max(0, pool.pages_for(need, kv_type_) - have);
        roomy += std::max(0, pool.pages_for(grown(need), kv_type_) - have);
    }
    if (exact == 0) return;
    if (exact > pool.free_pages()) {
        throw Error("kv_pool", "the KV pool is full: " + std::to_string(n_more) + " more entries per layer need " +
                                   std::to_string(exact * pool.bytes_per_page()) + " bytes; " +
                                   std::to_string(pool.free_bytes()) + " of " + std::to_string(pool.capacity_bytes()) +
                                   " bytes free");
    }
    const bool room = roomy <= pool.free_pages();
    for (size_t il = 0; il < pages_.size(); ++il) ensure_layer_capacity((int) il, size_[il] + n_more, room);
}

void Session::ensure_layer_capacity(int il, int need, bool room) {
    KvPool & pool = engine_.pool();
    if (pages_[il] != KvPool::kNone && pool.slot_count(pages_[il]) >= need) return;
    const int  want = room ? grown(need) : need;
    const bool ok   = pages_[il] == KvPool::kNone ? (pages_[il] = pool.allocate(want, kv_type_)) != KvPool::kNone
                                                  : pool.resize(pages_[il], want, size_[il]);
    if (!ok) {
        throw Error("kv_pool", "the KV pool is full: layer " + std::to_string(il) + " needs " + std::to_string(need) +
                                   " entries; " + std::to_string(pool.free_bytes()) + " of " +
                                   std::to_string(pool.capacity_bytes()) + " bytes free");
    }
}

void Session::appended(const int32_t * tokens, int n) {
    const int first = (int) tokens_.size();
    tokens_.insert(tokens_.end(), tokens, tokens + n);
    for (size_t il = 0; il < size_.size(); ++il) {
        size_[il] += n;
        for (auto & head : positions_[il]) {
            for (int i = 0; i < n; ++i) head.push_back(first + i);
        }
    }
}

void Session::evaluate(const int32_t * tokens, int n, bool last_of_segment, bool scores) {
    Engine::ForwardOptions fo;
    fo.want_logits = last_of_segment;
    fo.window_probs =
        last_of_segment && scores && (method_->needs_window_probs || keep_scores_) ? std::min(params_.window, n) : 0;
    fo.accumulate_probs = scores && (method_->needs_accumulated || keep_scores_);
    reserve(n);
    Engine::ForwardScores result = engine_.forward({ { this, tokens, n } }, fo);
    for (size_t il = 0; il < result.window_probs.size(); ++il) {
        if (!result.window_probs[il].empty()) window_probs_[il] = std::move(result.window_probs[il]);
        if (!result.attention_sums[il].empty()) accumulated_.extend((int) il, result.attention_sums[il]);
    }
}

std::vector<Session::AppendStep> Session::plan_append(int n) const {
    // Segments are compressed one by one: the whole input (one-shot) or chunks. Inside a segment,
    // ubatches are split from the front as libllama splits them (so both run the same kernels);
    // the window queries must sit in the segment's last evaluation, so a short tail borrows
    // tokens from the ubatch (or chunk) before it.
    const int n_window = std::min(params_.window, n);
    auto      split    = [&](int from, int to, int step) {
        std::vector<int> b;
        for (int x = from; x < to; x += step) b.push_back(x);
        b.push_back(to);
        if (b.size() > 2 && to - b[b.size() - 2] < n_window) b[b.size() - 2] = to - n_window;
        return b;
    };
    std::vector<AppendStep> steps;
    const std::vector<int>  segments = split(0, n, chunk_size_ > 0 ? std::max(chunk_size_, n_window) : n);
    for (size_t si = 0; si + 1 < segments.size(); ++si) {
        const std::vector<int> ub =
            split(segments[si], segments[si + 1], std::max(engine_.options().n_ubatch, n_window));
        for (size_t i = 0; i + 1 < ub.size(); ++i) steps.push_back({ ub[i], ub[i + 1], i == 0, i + 2 == ub.size() });
    }
    return steps;
}

void Session::run_append_step(const std::vector<int32_t> & tokens, const AppendStep & step) {
    const ModelConfig & c = engine_.config();
    if (step.begin == 0) {
        if (tokens.empty()) throw Error("prompt", "nothing to append (empty input)");
        check_tokens(tokens.data(), (int) tokens.size());
        append_started_ = now_seconds();
    }
    if (step.segment_start) {
        // Accumulated attention needs no realignment here: entries decoded since the last scores
        // sit after the scored ones, and evaluate() extends the sums over them.
        window_probs_.assign(c.n_layer, {});
    }
    const bool scores = method_->needs_window_probs || method_->needs_accumulated || keep_scores_;
    evaluate(tokens.data() + step.begin, step.end - step.begin, step.compress_after, scores);
    if (step.compress_after) compress();
    if (step.end == (int) tokens.size()) prefill_seconds_ = now_seconds() - append_started_;
}

void Session::append(const std::vector<int32_t> & tokens, const std::function<void(int, int)> & on_chunk) {
    if (tokens.empty()) throw Error("prompt", "nothing to append (empty input)");
    for (const AppendStep & step : plan_append((int) tokens.size())) {
        run_append_step(tokens, step);
        if (step.compress_after && on_chunk) on_chunk(step.end, (int) tokens.size());
    }
}

void Session::decode(int32_t token) { engine_.decode_batch({ this }, { token }); }

std::vector<HeadSelection> Session::select(const Method & method, const CompressionParams & p) const {
    const ModelConfig &        c       = engine_.config();
    const std::vector<int>     budgets = method.layer_budgets(c.n_layer, (int) tokens_.size(), p);
    std::vector<HeadSelection> entries(c.n_layer);
    for (int il = 0; il < c.n_layer; ++il) {
        const int m = size_[il];
        if (m <= budgets[il]) {  // nothing to drop: every head keeps every entry
            HeadSelection all(c.n_head_kv, std::vector<int32_t>(m));
            for (auto & head : all)
                for (int e = 0; e < m; ++e) head[e] = e;
            entries[il] = std::move(all);
            continue;
        }
        LayerAttention att;
        att.n                 = m;
        att.n_head            = c.n_head;
        att.n_head_kv         = c.n_head_kv;
        att.n_window          = std::min(p.window, m);
        att.accumulated       = accumulated_.covering(il, m);
        const bool has_window = il < (int) window_probs_.size() && window_probs_[il].size() >= (size_t) c.n_head * m;
        if (method.needs_window_probs && !has_window)
            throw Error("engine", "window scores missing for layer " + std::to_string(il));
        if (method.needs_accumulated && !att.accumulated)
            throw Error("engine", "accumulated scores missing for layer " + std::to_string(il));
        att.n_window     = has_window ? (int) (window_probs_[il].size() / ((size_t) c.n_head * m)) : att.n_window;
        att.window_probs = has_window ? window_probs_[il].data() : nullptr;
        entries[il]      = method.select(att, budgets[il], p);
    }
    return entries;
}

void Session::compress() {
    profile::Scope                   scope(profile::Phase::compress);  // the gather's compute is booked as compute
    const ModelConfig &              c       = engine_.config();
    const std::vector<HeadSelection> entries = select(*method_, params_);
    bool                             shrinks = false;
    for (int il = 0; il < c.n_layer; ++il) shrinks |= (int) entries[il][0].size() < size_[il];
    if (shrinks) {
        // H2O keeps accumulating over later chunks: carry the sums of the entries that stay.
        for (int il = 0; il < c.n_layer; ++il) accumulated_.keep(il, size_[il], entries[il]);
        keep_entries(entries, *this);
        compressed_ = true;
    }
    kept_ = positions_;
    if (!keep_scores_) window_probs_.assign(c.n_layer, {});
}

void Session::keep_entries(const std::vector<HeadSelection> & entries, const Session & src) {
    const ModelConfig &                                         c        = engine_.config();
    KvPool &                                                    pool     = engine_.pool();
    const bool                                                  in_place = &src == this;
    Engine::Graph                                               g        = engine_.begin_graph();
    std::vector<std::pair<ggml_tensor *, std::vector<int32_t>>> index_inputs;
    std::vector<int>                                            keep(c.n_layer);
    for (int il = 0; il < c.n_layer; ++il) {
        keep[il] = (int) entries[il][0].size();
        if (!in_place) {
            pages_[il] = pool.allocate(grown(keep[il]), kv_type_);  // room to decode without moving
            if (pages_[il] == KvPool::kNone) pages_[il] = pool.allocate(std::max(keep[il], 1), kv_type_);
            if (pages_[il] == KvPool::kNone) {
                ggml_free(g.ctx);
                throw Error("kv_pool", "the KV pool is full: cannot hold " + std::to_string(keep[il]) +
                                           " entries for layer " + std::to_string(il));
            }
        }
    }
    for (int il = 0; il < c.n_layer; ++il) {
        if (keep[il] == 0 || (in_place && keep[il] == size_[il])) continue;  // nothing moves
        // A different row list per KV head: get_rows takes absolute pool slots [n_keep, n_head_kv].
        const int32_t        from = pool.first_slot(src.pages_[il]);
        std::vector<int32_t> flat;
        for (const auto & head : entries[il])
            for (int32_t e : head) flat.push_back(from + e);
        ggml_tensor * idx = ggml_new_tensor_2d(g.ctx, GGML_TYPE_I32, keep[il], c.n_head_kv);
        ggml_set_input(idx);
        index_inputs.emplace_back(idx, std::move(flat));
        // ...and writes them at this session's first slots, every head alike.
        const int32_t        to = pool.first_slot(pages_[il]);
        std::vector<int32_t> dst_slots(keep[il]);
        for (int e = 0; e < keep[il]; ++e) dst_slots[e] = to + e;
        ggml_tensor * dst_idx = ggml_new_tensor_1d(g.ctx, GGML_TYPE_I32, keep[il]);
        ggml_set_input(dst_idx);
        index_inputs.emplace_back(dst_idx, std::move(dst_slots));
        // get_rows gives f32 (dequantised); set_rows stores it as this session's type. Between
        // sessions of one type this is exact: f16 -> f32 -> f16 is the identity, and so is
        // requantising a dequantised q8_0 / q4_0 block (its largest element sets the same scale
        // again and every value lands on its own integer), which kv_types_test checks bytewise.
        const std::pair<ggml_tensor *, ggml_tensor *> stores[2] = { { pool.k(src.kv_type_), pool.k(kv_type_) },
                                                                    { pool.v(src.kv_type_), pool.v(kv_type_) } };
        for (const auto & [from_store, to_store] : stores) {
            ggml_tensor * rows = ggml_get_rows(g.ctx, from_store, idx);  // [head_dim, n_keep, n_head_kv] f32
            ggml_build_forward_expand(g.gf, ggml_set_rows(g.ctx, to_store, rows, dst_idx));
        }
    }
    if (ggml_graph_n_nodes(g.gf) > 0) {
        engine_.allocate(g);
        for (auto & [t, data] : index_inputs) ggml_backend_tensor_set(t, data.data(), 0, ggml_nbytes(t));
        engine_.compute(g);
    }
    ggml_free(g.ctx);
    for (int il = 0; il < c.n_layer; ++il) {
        HeadSelection positions(c.n_head_kv);
        for (int h = 0; h < c.n_head_kv; ++h)
            for (int32_t e : entries[il][h]) positions[h].push_back(src.positions_[il][h][e]);
        positions_[il] = std::move(positions);
        size_[il]      = keep[il];
        if (in_place && pool.slot_count(pages_[il]) > grown(keep[il])) {
            pool.resize(pages_[il], grown(keep[il]), keep[il]);  // give back the pages compression freed
        }
    }
}

std::unique_ptr<Session> Session::fork(const CompressionParams & params, KvType kv_type) const {
    if (!keep_scores_) throw Error("fork", "the source session was not opened with keep_scores");
    if (compressed_)
        throw Error("fork", "the source session's prefill was already compressed (open it with method full)");
    if (tokens_.empty()) throw Error("fork", "the source session holds no tokens");
    auto child     = std::make_unique<Session>(engine_, params, chunk_size_, kv_type);
    child->tokens_ = tokens_;
    child->logits_ = logits_;
    child->keep_entries(select(*child->method_, params), *this);
    child->compressed_ = child->size_ != size_;
    child->kept_       = child->positions_;
    return child;
}

// ---------------------------------------------------------------------------------------------
// save / restore: a little-endian byte string
//   "PKVS" u32 version (2) | model: u32 n_layer, n_head_kv, head_dim, n_vocab | params | u32 chunk_size
//   | u8 kv_type (KvType: 0 f16, 1 q8_0, 2 q4_0) | u8 compressed | u32 n_tokens, i32 tokens[]
//   | u32 n_logits, f32 logits[]
//   | per layer: u32 size, per head i32 positions[size], then the size entries as the pool stores
//     them (per entry: the K row of every KV head, then the V rows; a row is head_dim f16 or
//     head_dim / 32 blocks of q8_0 / q4_0), kv_entry_bytes(kv_type) each
// Version 1 (0.6.0) has no kv_type (f16) and stores per layer every head's K rows, then V rows;
// it is still read.

namespace {

constexpr uint32_t kStateVersion = 2;

struct Writer {
    std::string                out;
    template <typename T> void put(T v) { out.append(reinterpret_cast<const char *>(&v), sizeof(T)); }
    void                       bytes(const void * p, size_t n) { out.append(static_cast<const char *>(p), n); }
    void                       str(const std::string & s) {
        put<uint32_t>((uint32_t) s.size());
        bytes(s.data(), s.size());
    }
};

struct Reader {
    const std::string & in;
    size_t              at = 0;
    void                need(size_t n) const {
        if (in.size() - at < n) throw Error("state", "truncated session state");
    }
    template <typename T> T get() {
        need(sizeof(T));
        T v;
        std::memcpy(&v, in.data() + at, sizeof(T));
        at += sizeof(T);
        return v;
    }
    void bytes(void * p, size_t n) {
        need(n);
        std::memcpy(p, in.data() + at, n);
        at += n;
    }
    std::string str() {
        const uint32_t n = get<uint32_t>();
        need(n);
        std::string s = in.substr(at, n);
        at += n;
        return s;
    }
};

}  // namespace

std::string Session::save() const {
    const ModelConfig & c    = engine_.config();
    const KvPool &      pool = engine_.pool();
    ggml_backend_synchronize(engine_.backend());
    Writer w;
    w.bytes("PKVS", 4);
    w.put<uint32_t>(kStateVersion);
    for (int v : { c.n_layer, c.n_head_kv, c.head_dim, c.n_vocab }) w.put<uint32_t>((uint32_t) v);
    w.str(params_.method);
    for (int v : { params_.budget, params_.window, params_.beta, params_.kernel_size, (int) params_.pooling,
                   (int) params_.aggregation, chunk_size_ })
        w.put<int32_t>(v);
    w.put<uint8_t>((uint8_t) kv_type_);
    w.put<uint8_t>(compressed_ ? 1 : 0);
    w.put<uint32_t>((uint32_t) tokens_.size());
    w.bytes(tokens_.data(), tokens_.size() * sizeof(int32_t));
    w.put<uint32_t>((uint32_t) logits_.size());
    w.bytes(logits_.data(), logits_.size() * sizeof(float));
    std::vector<uint8_t> entries;
    for (int il = 0; il < c.n_layer; ++il) {
        w.put<uint32_t>((uint32_t) size_[il]);
        for (const auto & head : positions_[il]) w.bytes(head.data(), head.size() * sizeof(int32_t));
        if (size_[il] == 0) continue;
        entries.resize(pool.bytes_per_slot(kv_type_) * size_[il]);
        pool.read_entries(pages_[il], 0, size_[il], entries.data());
        w.bytes(entries.data(), entries.size());
    }
    return w.out;
}

std::unique_ptr<Session> Session::restore(Engine & engine, const std::string & bytes) {
    const ModelConfig & c = engine.config();
    Reader              r{ bytes };
    char                magic[4];
    r.bytes(magic, 4);
    if (std::memcmp(magic, "PKVS", 4) != 0) throw Error("state", "not a pyramidkv session state");
    const uint32_t version = r.get<uint32_t>();
    if (version != 1 && version != kStateVersion) throw Error("state", "unsupported session state version");
    for (int v : { c.n_layer, c.n_head_kv, c.head_dim, c.n_vocab }) {
        if (r.get<uint32_t>() != (uint32_t) v) throw Error("state", "the state was saved with a different model shape");
    }
    CompressionParams p;
    p.method = r.str();
    p.budget = r.get<int32_t>(), p.window = r.get<int32_t>(), p.beta = r.get<int32_t>(),
    p.kernel_size         = r.get<int32_t>();
    const int32_t pooling = r.get<int32_t>(), aggregation = r.get<int32_t>(), chunk = r.get<int32_t>();
    if (pooling < 0 || pooling > 2 || aggregation < 0 || aggregation > 1)
        throw Error("state", "corrupt compression settings");
    p.pooling      = (Pooling) pooling;
    p.aggregation  = (HeadAggregation) aggregation;
    KvType kv_type = KvType::F16;
    if (version >= 2) {
        const uint8_t t = r.get<uint8_t>();
        if (t >= kKvTypes) throw Error("state", "corrupt KV type");
        kv_type = (KvType) t;
    }
    auto s                  = std::make_unique<Session>(engine, p, chunk, kv_type);  // validates the settings
    s->compressed_          = r.get<uint8_t>() != 0;
    const uint32_t n_tokens = r.get<uint32_t>();
    r.need((size_t) n_tokens * sizeof(int32_t));
    s->tokens_.resize(n_tokens);
    r.bytes(s->tokens_.data(), (size_t) n_tokens * sizeof(int32_t));
    if ((int) n_tokens > engine.n_ctx()) throw Error("state", "the state holds more tokens than the context");
    for (int32_t t : s->tokens_) {
        if (t < 0 || t >= c.n_vocab) throw Error("state", "corrupt token ids");
    }
    const uint32_t n_logits = r.get<uint32_t>();
    if (n_logits != 0 && n_logits != (uint32_t) c.n_vocab) throw Error("state", "corrupt logits");
    s->logits_.resize(n_logits);
    r.bytes(s->logits_.data(), (size_t) n_logits * sizeof(float));
    KvPool &             pool  = engine.pool();
    const size_t         entry = pool.bytes_per_slot(kv_type);
    const size_t         row   = entry / (2 * (size_t) c.n_head_kv);
    std::vector<uint8_t> entries, rows;
    for (int il = 0; il < c.n_layer; ++il) {
        const uint32_t size = r.get<uint32_t>();
        if (size > n_tokens) throw Error("state", "corrupt layer size");
        for (auto & head : s->positions_[il]) {
            head.resize(size);
            r.bytes(head.data(), (size_t) size * sizeof(int32_t));
            for (int32_t pos : head) {
                if (pos < 0 || pos >= (int32_t) n_tokens) throw Error("state", "corrupt positions");
            }
        }
        s->ensure_layer_capacity(il, (int) size, false);
        s->size_[il] = (int) size;
        if (size == 0) continue;
        entries.resize(entry * size);
        if (version >= 2) {
            r.bytes(entries.data(), entries.size());
        } else {  // per head K rows, then V rows: regroup them per entry
            rows.resize(row * size);
            for (int kv = 0; kv < 2; ++kv) {
                for (int h = 0; h < c.n_head_kv; ++h) {
                    r.bytes(rows.data(), rows.size());
                    for (uint32_t e = 0; e < size; ++e)
                        std::memcpy(entries.data() + e * entry + ((size_t) kv * c.n_head_kv + h) * row,
                                    rows.data() + e * row, row);
                }
            }
        }
        pool.write_entries(s->pages_[il], 0, (int) size, entries.data());
    }
    if (r.at != bytes.size()) throw Error("state", "trailing bytes after the session state");
    s->kept_ = s->positions_;
    return s;
}

}  // namespace pkv
