#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>

#include "engine.h"
#include "error.h"
#include "json-schema-to-grammar.h"
#include "llama.h"

namespace pkv {

uint32_t fold_seed(uint64_t seed) {
    const uint32_t s = (uint32_t) (seed ^ (seed >> 32));
    return s == LLAMA_DEFAULT_SEED ? s - 1 : s;
}

uint64_t random_seed() {
    std::random_device rd;
    return fold_seed(rd());
}

std::string grammar_from_json_schema(const std::string & schema_json) {
    common_json schema;
    try {
        schema = common_json::parse(schema_json);
    } catch (const std::exception & e) {
        throw Error("json_schema", std::string("not JSON: ") + e.what());
    }
    try {
        return json_schema_to_grammar(schema);
    } catch (const std::exception & e) {
        throw Error("json_schema", std::string("not a schema the grammar converter accepts: ") + e.what());
    }
}

Sampler::Sampler(const SamplerOptions & o, const llama_vocab * vocab)
    : plain_greedy_(o.temperature <= 0.0f && !o.penalties() && o.grammar.empty()) {
    if (!o.grammar.empty()) {
        if (!vocab) throw Error("grammar", "needs the model's vocabulary");
        grammar_ = llama_sampler_init_grammar(vocab, o.grammar.c_str(), "root");
        if (!grammar_) throw Error("grammar", "not a GBNF grammar with a rule 'root' (the engine's log says where)");
    }
    if (plain_greedy_) return;
    // llama-server's order: penalties, top-k, top-p, min-p, temperature, then the draw.
    chain_ = llama_sampler_chain_init(llama_sampler_chain_default_params());
    if (o.penalties()) {
        if (!vocab) throw Error("repetition_penalty", "needs the model's vocabulary");
        llama_sampler_chain_add(
            chain_, llama_sampler_init_penalties(llama_vocab_n_tokens(vocab), o.penalty_last_n, o.repetition_penalty,
                                                 o.frequency_penalty, o.presence_penalty));
    }
    if (o.temperature <= 0.0f) {
        llama_sampler_chain_add(chain_, llama_sampler_init_greedy());
        return;
    }
    if (o.top_k > 0) llama_sampler_chain_add(chain_, llama_sampler_init_top_k(o.top_k));
    if (o.top_p < 1.0f) llama_sampler_chain_add(chain_, llama_sampler_init_top_p(o.top_p, 1));
    if (o.min_p > 0.0f) llama_sampler_chain_add(chain_, llama_sampler_init_min_p(o.min_p, 1));
    llama_sampler_chain_add(chain_, llama_sampler_init_temp(o.temperature));
    llama_sampler_chain_add(chain_, llama_sampler_init_dist(o.seed));
}

Sampler::~Sampler() {
    if (chain_) llama_sampler_free(chain_);
    if (grammar_) llama_sampler_free(grammar_);
}

int32_t Sampler::draw(const std::vector<float> & logits, bool grammar_first) {
    std::vector<llama_token_data> cand(logits.size());
    for (size_t i = 0; i < logits.size(); ++i) cand[i] = { (llama_token) i, logits[i], 0.0f };
    llama_token_data_array arr{ cand.data(), cand.size(), -1, false };
    if (grammar_first) llama_sampler_apply(grammar_, &arr);
    llama_sampler_apply(chain_, &arr);
    if (arr.selected < 0 || arr.selected >= (int64_t) arr.size || !std::isfinite(arr.data[arr.selected].logit))
        throw Error("grammar", "no token can continue the output under the grammar");
    return arr.data[arr.selected].id;
}

int32_t Sampler::pick(const std::vector<float> & logits) {
    if (plain_greedy_) return argmax(logits);
    const int32_t token = draw(logits, false);
    if (!grammar_) return token;
    // Most drawn tokens fit the grammar: check the one, and constrain every candidate only when
    // it does not (the draw is then repeated over the tokens the grammar allows).
    llama_token_data       one{ token, 1.0f, 0.0f };
    llama_token_data_array single{ &one, 1, -1, false };
    llama_sampler_apply(grammar_, &single);
    if (std::isfinite(one.logit)) return token;
    return draw(logits, true);
}

void Sampler::accept(int32_t token) {
    if (plain_greedy_) return;
    llama_sampler_accept(chain_, token);
    if (grammar_) {
        try {
            llama_sampler_accept(grammar_, token);
        } catch (const std::exception & e) {
            throw Error("grammar", e.what());
        }
    }
}

void Sampler::accept_history(const std::vector<int32_t> & tokens) {
    if (!chain_) return;
    for (int32_t t : tokens) llama_sampler_accept(chain_, t);
}

int32_t Sampler::sample(const std::vector<float> & logits) {
    const int32_t token = pick(logits);
    accept(token);
    return token;
}

TokenLogprobs token_logprobs(const std::vector<float> & logits, int32_t token, int n_top) {
    TokenLogprobs r;
    if (logits.empty()) return r;
    const float max = *std::max_element(logits.begin(), logits.end());
    double      sum = 0.0;
    for (float l : logits) sum += std::exp((double) l - max);
    const float log_z = max + (float) std::log(sum);
    r.logprob         = logits[token] - log_z;
    const int n       = std::min<int>(n_top, (int) logits.size());
    if (n <= 0) return r;
    std::vector<int32_t> ids(logits.size());
    for (size_t i = 0; i < ids.size(); ++i) ids[i] = (int32_t) i;
    std::partial_sort(ids.begin(), ids.begin() + n, ids.end(),
                      [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
    for (int i = 0; i < n; ++i) r.top.emplace_back(ids[i], logits[ids[i]] - log_z);
    return r;
}

namespace {

// The length of the well-formed character at p (RFC 3629: no overlongs, surrogates or code
// points past U+10FFFF); 0: a valid start that `avail` bytes do not complete; -k: the k bytes at
// p begin no character.
int utf8_char(const unsigned char * p, size_t avail) {
    const unsigned char b = p[0];
    if (b < 0x80) return 1;
    const int need = b >= 0xC2 && b <= 0xDF ? 2 : b >= 0xE0 && b <= 0xEF ? 3 : b >= 0xF0 && b <= 0xF4 ? 4 : 0;
    if (need == 0) return -1;
    for (int i = 1; i < need; ++i) {
        if ((size_t) i >= avail) return 0;
        unsigned char lo = 0x80, hi = 0xBF;
        if (i == 1) {
            if (b == 0xE0) lo = 0xA0;
            if (b == 0xED) hi = 0x9F;
            if (b == 0xF0) lo = 0x90;
            if (b == 0xF4) hi = 0x8F;
        }
        if (p[i] < lo || p[i] > hi) return -i;
    }
    return need;
}

// Bytes at the end of s[0, end) that begin a character the next bytes may complete.
size_t incomplete_tail(const std::string & s, size_t end) {
    for (size_t k = 1; k <= 3 && k <= end; ++k) {
        if (((unsigned char) s[end - k] & 0xC0) == 0x80) continue;
        return utf8_char((const unsigned char *) s.data() + end - k, k) == 0 ? k : 0;
    }
    return 0;
}

}  // namespace

std::string valid_utf8(const std::string & bytes) {
    std::string out;
    for (size_t i = 0; i < bytes.size();) {
        const int n = utf8_char((const unsigned char *) bytes.data() + i, bytes.size() - i);
        if (n > 0) {
            out.append(bytes, i, n);
            i += n;
        } else {
            out += "\xEF\xBF\xBD";
            i += n == 0 ? bytes.size() - i : -n;
        }
    }
    return out;
}

TokenStream::TokenStream(std::vector<std::string> stops) : stops_(std::move(stops)) {
    stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
    for (const std::string & s : stops_) longest_ = std::max(longest_, s.size());
}

// Not final: the held tokens that end at or before `upto` (the first byte that could begin a
// stop string), each with the text from the last cut to its end, less a character the next
// token completes (a token whose last character nothing completes yet waits). Final: every
// token that begins before `upto` (a stop string, or the end), the last one's text cut exactly
// there; the rest are dropped.
void TokenStream::send(std::vector<Frame> & out, size_t upto, bool final) {
    auto goes = [&](const Held & h) {
        if (final) return h.begin < upto || h.end <= upto;
        if (h.end > upto) return false;
        const size_t cut = h.end - incomplete_tail(bytes_, h.end);
        return cut == h.end || utf8_char((const unsigned char *) bytes_.data() + cut, upto - cut) != 0;
    };
    while (!held_.empty() && goes(held_.front())) {
        const Held h    = held_.front();
        const bool last = final && (held_.size() == 1 || !goes(held_[1]));
        held_.pop_front();
        size_t cut = std::min(h.end, upto);
        if (!last) cut -= incomplete_tail(bytes_, cut);
        cut = std::max(cut, sent_);
        Frame f{ h.index, bytes_.substr(h.begin, h.end - h.begin), valid_utf8(bytes_.substr(sent_, cut - sent_)) };
        sent_ = cut;
        text_ += f.text;
        out.push_back(std::move(f));
    }
    if (final) held_.clear();
}

std::vector<TokenStream::Frame> TokenStream::push(const std::string & token_bytes) {
    std::vector<Frame> out;
    if (stopped_) return out;
    held_.push_back({ pushed_++, bytes_.size(), bytes_.size() + token_bytes.size() });
    bytes_ += token_bytes;
    // No stop string begins before sent_: that text could begin none when it went out.
    size_t at = std::string::npos;
    for (const std::string & stop : stops_) at = std::min(at, bytes_.find(stop, sent_));
    if (at != std::string::npos) {
        stopped_ = true;
        send(out, at, true);
        return out;
    }
    size_t hold = bytes_.size();
    for (size_t p = std::max(sent_, bytes_.size() - std::min(bytes_.size(), longest_)); p < bytes_.size(); ++p) {
        const size_t n   = bytes_.size() - p;
        bool         may = false;
        for (const std::string & stop : stops_) may |= stop.compare(0, n, bytes_, p, n) == 0;
        if (may) {
            hold = p;
            break;
        }
    }
    send(out, hold, false);
    return out;
}

std::vector<TokenStream::Frame> TokenStream::finish() {
    std::vector<Frame> out;
    send(out, bytes_.size(), true);
    return out;
}

}  // namespace pkv
