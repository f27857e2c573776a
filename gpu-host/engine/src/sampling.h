// Sampling as llama-server does it, through libllama's samplers: penalties, top-k, top-p, min-p,
// temperature, then greedy or a seeded draw; a GBNF grammar (or a JSON Schema turned into one by
// llama.cpp common's json_schema_to_grammar) constrains the draw; logprobs of the model's own
// distribution (docs/PROTOCOL.md, "Sampling").
#pragma once

#include <cstdint>
#include <deque>
#include <string>
#include <utility>
#include <vector>

struct llama_sampler;
struct llama_vocab;

namespace pkv {

struct SamplerOptions {
    float       temperature        = 0.0f;  // 0: greedy
    int         top_k              = 0;     // 0: off
    float       top_p              = 1.0f;  // 1: off
    uint32_t    seed               = 0;
    float       min_p              = 0.0f;  // 0: off
    float       presence_penalty   = 0.0f;  // OpenAI semantics; 0: off
    float       frequency_penalty  = 0.0f;  // OpenAI semantics; 0: off
    float       repetition_penalty = 1.0f;  // llama.cpp's repeat penalty; 1: off
    int         penalty_last_n     = 64;    // tokens the penalties look back over
    std::string grammar;                    // GBNF, root rule "root"; empty: unconstrained
    bool        penalties() const {
        return penalty_last_n > 0 && (presence_penalty != 0 || frequency_penalty != 0 || repetition_penalty != 1);
    }
};

// The sampler's seed from a request's: any uint64 folds into the 32 bits libllama's draw takes,
// avoiding LLAMA_DEFAULT_SEED (which would mean "random"); seeds below 2^32 - 1 stay as they are.
uint32_t fold_seed(uint64_t seed);
// A seed for a request that names none (reported back so the client can repeat the draw).
uint64_t random_seed();

// JSON Schema text → GBNF (llama.cpp common's json_schema_to_grammar); "{}" is any JSON object.
// Throws Error("json_schema", …) for text that is not JSON or a schema the converter refuses.
std::string grammar_from_json_schema(const std::string & schema_json);

// libllama's sampler chain over our logits, with an optional grammar sampler beside it (tried on
// the drawn token first, applied to every candidate only when it refuses it: llama-server's way).
class Sampler {
  public:
    explicit Sampler(const SamplerOptions & o, const llama_vocab * vocab = nullptr);
    ~Sampler();
    Sampler(const Sampler &)             = delete;
    Sampler & operator=(const Sampler &) = delete;
    // Draws a token; accept() it to move the penalties' history and the grammar on.
    int32_t pick(const std::vector<float> & logits);
    void    accept(int32_t token);
    // Tokens the output follows (the prompt): the penalties look back over them, the grammar not.
    void accept_history(const std::vector<int32_t> & tokens);
    // pick() + accept(), for callers that take every token.
    int32_t sample(const std::vector<float> & logits);

  private:
    int32_t draw(const std::vector<float> & logits, bool grammar_first);

    bool            plain_greedy_;  // argmax of the logits, nothing to apply
    llama_sampler * chain_   = nullptr;
    llama_sampler * grammar_ = nullptr;
};

// log softmax(logits)[token], and the n most likely tokens with theirs, best first: the model's
// distribution before temperature, penalties, truncation or grammar (llama-server's default).
struct TokenLogprobs {
    float                                  logprob = 0.0f;
    std::vector<std::pair<int32_t, float>> top;
};
TokenLogprobs token_logprobs(const std::vector<float> & logits, int32_t token, int n_top);

// The bytes of sampled tokens as the text of token frames. Stop strings are never emitted: a
// token whose bytes could begin one is held (its frame, not only its text, so logprobs stay with
// their token) until it cannot; once a stop string is complete, the tokens before it go out with
// the text before it and the rest is dropped. Frame texts are valid UTF-8: a character split
// across tokens goes out with the token that completes it, and bytes that can be no character
// (a lone continuation byte of a byte-level token) become U+FFFD. The frames' texts, joined,
// are text() — the generation's whole text — at every point.
class TokenStream {
  public:
    explicit TokenStream(std::vector<std::string> stops = {});
    struct Frame {
        size_t      index;  // which pushed token (0-based)
        std::string bytes;  // the token's own bytes (may be part of a character)
        std::string text;   // its share of the text
    };
    // A token's bytes: the frames that can go now, oldest first (none once stopped()).
    std::vector<Frame> push(const std::string & token_bytes);
    // The end of the generation (length, end of turn, cancel): every held frame, the last one
    // with whatever character remains incomplete (as U+FFFD).
    std::vector<Frame>  finish();
    bool                stopped() const { return stopped_; }
    const std::string & text() const { return text_; }
    const std::string & bytes() const { return bytes_; }

  private:
    struct Held {
        size_t index, begin, end;
    };
    // Frames of the held tokens up to `upto` (see the .cpp).
    void send(std::vector<Frame> & out, size_t upto, bool final);

    std::vector<std::string> stops_;
    size_t                   longest_ = 0;
    std::string              bytes_;     // every token's bytes
    size_t                   sent_ = 0;  // bytes whose text went out
    std::string              text_;
    std::deque<Held>         held_;
    size_t                   pushed_  = 0;
    bool                     stopped_ = false;
};

// `bytes` as valid UTF-8 (RFC 3629): what can be no character becomes U+FFFD, one for each
// maximal invalid subpart (as WHATWG's decoder does).
std::string valid_utf8(const std::string & bytes);

}  // namespace pkv
