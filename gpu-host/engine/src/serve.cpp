#include "serve.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "chat.h"
#include "error.h"
#include "generate.h"
#include "ggml-cpu.h"
#include "llama.h"
#include "paths.h"
#include "protocol.h"
#include "sampling.h"
#include "session.h"

namespace pkv {

namespace {

using mp::Value;

// OpenAI's limit on top_logprobs, and llama-server's.
constexpr uint64_t kMaxTopLogprobs = 20;

// An append's tokens, made by a tokenizer thread from its frame (text, messages, tokens).
struct Tokenized {
    uint64_t                    ticket = 0;  // which job: results of dropped jobs are ignored
    uint64_t                    id     = 0;
    std::string                 session;
    std::vector<int32_t>        tokens;
    std::optional<Conversation> chat;           // the conversation with the new turns, kept if the append is accepted
    uint64_t                    reply = 0;      // the append's max_tokens
    std::string                 code, message;  // the append failed (code empty: it did not)
};

// What the reader thread and the tokenizer threads hand to the engine loop: a validated request,
// an append's tokens, or (neither) the end of input.
struct Inbound {
    std::optional<Value>       request;
    std::shared_ptr<Tokenized> tokenized;
};

class Inbox {
  public:
    void push(Inbound m) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            q_.push_back(std::move(m));
        }
        cv_.notify_one();
    }
    // Everything queued; waits for at least one message when `wait` is set.
    std::deque<Inbound> take(bool wait) {
        std::unique_lock<std::mutex> lock(mu_);
        if (wait) cv_.wait(lock, [&] { return !q_.empty(); });
        std::deque<Inbound> out;
        out.swap(q_);
        return out;
    }

  private:
    std::mutex              mu_;
    std::condition_variable cv_;
    std::deque<Inbound>     q_;
};

// msgpack read without building values (peek_request); every method returns false at a fault.
class Scanner {
  public:
    explicit Scanner(std::string_view bytes) : p_((const uint8_t *) bytes.data()), end_(p_ + bytes.size()) {}

    bool map_header(uint64_t & n) {
        if (p_ == end_) return false;
        const uint8_t op = *p_++;
        if ((op & 0xf0) == 0x80) return n = op & 0x0f, true;
        if (op == 0xde || op == 0xdf) return be(op == 0xde ? 2 : 4, n);
        return false;
    }
    bool next_is_str() const { return p_ < end_ && ((*p_ & 0xe0) == 0xa0 || (*p_ >= 0xd9 && *p_ <= 0xdb)); }
    bool next_is_uint() const { return p_ < end_ && (*p_ <= 0x7f || (*p_ >= 0xcc && *p_ <= 0xcf)); }
    bool str(std::string & out) {
        uint64_t n = 0;
        if (!next_is_str()) return false;
        const uint8_t op = *p_++;
        if ((op & 0xe0) == 0xa0) n = op & 0x1f;
        else if (!be(1 << (op - 0xd9), n)) return false;
        if (n > left()) return false;
        out.assign((const char *) p_, (size_t) n);
        p_ += n;
        return true;
    }
    bool uint(uint64_t & v) {
        if (!next_is_uint()) return false;
        const uint8_t op = *p_++;
        if (op <= 0x7f) return v = op, true;
        return be(1 << (op - 0xcc), v);
    }
    // Past one value, containers and all.
    bool skip() {
        for (uint64_t todo = 1; todo > 0; --todo) {
            if (p_ == end_) return false;
            const uint8_t op       = *p_++;
            uint64_t      n        = 0;  // bytes to pass, or elements to skip
            bool          elements = false;
            if (op <= 0x7f || op >= 0xe0 || op == 0xc0 || op == 0xc2 || op == 0xc3) continue;
            if ((op & 0xf0) == 0x80) n = 2 * (op & 0x0f), elements = true;
            else if ((op & 0xf0) == 0x90) n = op & 0x0f, elements = true;
            else if ((op & 0xe0) == 0xa0) n = op & 0x1f;
            else if (op >= 0xc4 && op <= 0xc6) {
                if (!be(1 << (op - 0xc4), n)) return false;
            } else if (op >= 0xd9 && op <= 0xdb) {
                if (!be(1 << (op - 0xd9), n)) return false;
            } else if (op == 0xca || op == 0xcb) n = op == 0xca ? 4 : 8;
            else if (op >= 0xcc && op <= 0xd3) n = (uint64_t) 1 << ((op - 0xcc) % 4);
            else if (op >= 0xdc && op <= 0xdf) {
                if (!be(op == 0xdc || op == 0xde ? 2 : 4, n)) return false;
                if (op >= 0xde) n *= 2;
                elements = true;
            } else return false;           // ext types, 0xc1
            if (n > left()) return false;  // an element takes a byte at least
            if (elements) todo += n;
            else p_ += n;
        }
        return true;
    }

  private:
    uint64_t left() const { return (uint64_t) (end_ - p_); }
    bool     be(int bytes, uint64_t & v) {
        if (left() < (uint64_t) bytes) return false;
        v = 0;
        for (int i = 0; i < bytes; ++i) v = (v << 8) | *p_++;
        return true;
    }

    const uint8_t * p_;
    const uint8_t * end_;
};

// The request id and session of a frame whose msgpack does not decode, read from the fields of
// its top-level map before the fault, so that the error names the request it fails. No id when
// the id comes after the fault, is no uint, or appears twice (which one was meant is unknowable).
struct Peeked {
    std::optional<uint64_t> id;
    std::string             session;
};

Peeked peek_request(std::string_view payload) {
    Peeked   out;
    Scanner  in(payload);
    uint64_t entries = 0;
    if (!in.map_header(entries)) return out;
    int ids = 0, sessions = 0;
    for (uint64_t i = 0; i < entries; ++i) {
        std::string key;
        if (!in.str(key)) break;
        uint64_t id = 0;
        if (key == "id" && in.next_is_uint()) {
            if (!in.uint(id)) break;
            out.id = id, ++ids;
        } else if (key == "session" && in.next_is_str()) {
            if (!in.str(out.session)) break;
            ++sessions;
        } else {
            ids += key == "id", sessions += key == "session";
            if (!in.skip()) break;
        }
    }
    if (ids != 1) out.id.reset();
    if (sessions != 1) out.session.clear();
    return out;
}

// A frame over the size limit throws (nothing was written: the request fails with too_large);
// a failed write means the supervisor has gone, and nobody is left to answer.
void send(const Value & v) {
    try {
        write_frame(stdout, v);
    } catch (const Error & e) {
        if (e.param != "stdout") throw;
        std::_Exit(0);
    }
}

void send_error(const Value * id, const std::string & session, const std::string & code, const std::string & message) {
    Value e = Value::map().set("type", "error");
    if (id && id->is_uint()) e.set("id", *id);
    if (!session.empty()) e.set("session", session);
    e.set("code", code).set("message", message);
    send(e);
}

// Error codes of the protocol from where an engine error came from.
std::string code_for(const Error & e) {
    if (e.param == "kv_pool") return "pool_full";
    if (e.param == "frame") return "too_large";
    if (e.param == "prompt") return "context_full";
    if (e.param == "engine") return "internal";
    return "invalid";
}

void read_loop(Inbox & inbox) {
    for (;;) {
        std::string payload, error, code;
        if (!read_frame(stdin, payload, error, &code)) {
            if (!error.empty())
                send_error(nullptr, "", code.empty() ? "bad_frame" : code, error + " (no further input is read)");
            inbox.push({});
            return;
        }
        Value v;
        try {
            v = mp::decode(payload);
        } catch (const Error & e) {
            const Peeked request = peek_request(payload);
            const Value  id      = request.id ? Value(*request.id) : Value();
            send_error(request.id ? &id : nullptr, request.session, "bad_frame", e.what());
            continue;
        }
        const std::string problem = validate_frame(v, "to_engine");
        if (!problem.empty()) {
            const Value * id      = v.is_map() ? v.find("id") : nullptr;
            const Value * t       = v.is_map() ? v.find("type") : nullptr;
            const bool    unknown = t && t->is_str() && !protocol_spec().message(t->as_str());
            const Value * s       = v.is_map() ? v.find("session") : nullptr;
            send_error(id, s && s->is_str() ? s->as_str() : "", unknown ? "unknown_type" : "invalid", problem);
            continue;
        }
        inbox.push({ std::move(v), nullptr });
    }
}

// An append as the engine loop hands it to a tokenizer thread: its frame, and what of the
// session the tokens depend on.
struct AppendJob {
    uint64_t                           ticket = 0;
    Value                              request;
    std::optional<Conversation>        chat;              // the session's conversation, a copy
    bool                               at_start = false;  // the session holds no token yet
    std::shared_ptr<std::atomic<bool>> dropped;           // cancelled or closed meanwhile
};

// The text (or rendered messages) of an append, tokenized. Pure: reads the model's vocabulary
// and the chat template, both const (libllama's tokenizer keeps its state per call, so threads
// can share a vocabulary). Errors name the field, as the engine loop's did.
Tokenized tokenize_append(AppendJob & job, const Model & model, const ChatTemplate & chat_template, int n_vocab) {
    const Value & m = job.request;
    Tokenized     r;
    r.ticket  = job.ticket;
    r.id      = m.at("id").as_uint();
    r.session = m.at("session").as_str();
    r.reply   = m.get_uint("max_tokens", 0);
    try {
        // Chat turns go through the session's conversation: rendered with the model's template
        // after the earlier turns, content as plain text.
        const bool as_chat = m.has("messages") || (m.has("text") && m.get_bool("chat", false));
        r.chat             = std::move(job.chat);
        if (as_chat) {
            if (m.has("messages") && !m.get_str("text", "").empty())
                throw Error("messages", "give messages or text, not both");
            if (m.has("tokens")) throw Error("messages", "give messages (or chat text) or tokens, not both");
            const std::vector<ChatMessage> msgs = m.has("messages")
                                                      ? chat_messages_from(m.at("messages"))
                                                      : std::vector<ChatMessage>{ { "user", m.at("text").as_str() } };
            if (msgs.empty()) throw Error("messages", "empty: give at least one message");
            if (!r.chat) r.chat.emplace(chat_template);
            const bool           first = r.chat->messages().empty() && !r.chat->awaiting_reply();
            std::vector<int32_t> t     = r.chat->append(msgs, m.get_bool("add_generation_prompt", true));
            // A conversation that follows raw text: its BOS belongs at the session's start only.
            if (first && !job.at_start && !t.empty() && t[0] == llama_vocab_bos(model.vocab())) t.erase(t.begin());
            r.tokens = std::move(t);
        } else if (m.has("text")) {
            r.tokens = model.tokenize(m.at("text").as_str(), job.at_start);
        }
        if (m.has("tokens")) {
            for (const Value & t : m.at("tokens").as_array()) {
                const uint64_t x = t.as_uint("tokens");
                if (x >= (uint64_t) n_vocab)
                    throw Error("tokens",
                                "token id " + std::to_string(x) + " outside [0, " + std::to_string(n_vocab) + ")");
                r.tokens.push_back((int32_t) x);
            }
        }
    } catch (const Error & e) {
        r.code = code_for(e), r.message = e.what();
    } catch (const std::exception & e) {
        r.code = "internal", r.message = e.what();
    }
    return r;
}

// Threads that tokenize appends beside the engine loop, so that the tokenizer's time (seconds
// for a text of megabytes) stalls no decode step. Results go to the inbox; a job dropped before
// it starts is skipped. The threads run until the process exits (cmd_serve ends with _Exit).
class Tokenizer {
  public:
    static constexpr int kThreads = 2;  // one huge append leaves a thread for everyone else's

    Tokenizer(const Model & model, const ChatTemplate & chat_template, int n_vocab, Inbox & inbox)
        : model_(model), chat_template_(chat_template), n_vocab_(n_vocab), inbox_(inbox) {
        for (int i = 0; i < kThreads; ++i) std::thread([this] { work(); }).detach();
    }

    // Threads tokenizing now.
    int running() const { return running_.load(); }

    void submit(AppendJob job) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            jobs_.push_back(std::move(job));
        }
        cv_.notify_one();
    }

  private:
    void work() {
        for (;;) {
            AppendJob job;
            {
                std::unique_lock<std::mutex> lock(mu_);
                cv_.wait(lock, [&] { return !jobs_.empty(); });
                job = std::move(jobs_.front());
                jobs_.pop_front();
            }
            if (job.dropped->load()) continue;
            ++running_;
            auto r = std::make_shared<Tokenized>(tokenize_append(job, model_, chat_template_, n_vocab_));
            --running_;
            inbox_.push({ std::nullopt, std::move(r) });
        }
    }

    const Model &           model_;
    const ChatTemplate &    chat_template_;
    const int               n_vocab_;
    Inbox &                 inbox_;
    std::mutex              mu_;
    std::condition_variable cv_;
    std::deque<AppendJob>   jobs_;
    std::atomic<int>        running_{ 0 };
};

// A sampled token whose frame waits in the TokenStream (it could begin a stop string).
struct HeldToken {
    int32_t       token;
    TokenLogprobs logprobs;
};

struct Generation {
    uint64_t                 id           = 0;
    int                      max_tokens   = kDefaultMaxTokens;
    int                      produced     = 0;
    uint64_t                 seed         = 0;
    bool                     logprobs     = false;
    int                      top_logprobs = 0;
    TokenStream              stream;
    std::deque<HeldToken>    held;  // the stream's held tokens, oldest first
    std::unique_ptr<Sampler> sampler;
};

struct Prefill {
    uint64_t                         id = 0;
    std::vector<int32_t>             tokens;
    std::vector<Session::AppendStep> steps;
    size_t                           next = 0;  // steps run so far
};

struct ServedSession {
    std::unique_ptr<Session>           session;
    std::optional<int32_t>             pending;  // sampled and sent, not yet in the KV cache
    std::optional<Generation>          generation;
    std::optional<Prefill>             prefill;
    std::optional<Conversation>        chat;            // the chat turns so far (messages / chat text appends)
    uint64_t                           tokenizing = 0;  // the ticket of its append's tokens (0: none)
    std::shared_ptr<std::atomic<bool>> dropped;         // set to drop that job
    bool                               busy() const { return generation || prefill || tokenizing; }
    // An append whose tokens are still being made: its result will be ignored.
    void drop_tokenizing() {
        if (dropped) dropped->store(true);
        dropped.reset();
        tokenizing = 0;
    }
};

class Server {
  public:
    Server(Engine & engine, const ChatTemplate & chat_template, int default_chunk, Tokenizer & tokenizer)
        : engine_(engine), chat_template_(chat_template), default_chunk_(default_chunk), tokenizer_(tokenizer) {
        const int n = engine.options().n_threads;
        threads_    = n > 0 ? n : (int) std::max(1u, std::thread::hardware_concurrency());
        computing_  = threads_;
    }

    void run(Inbox & inbox) {
        for (;;) {
            // Appends being tokenized are work, but none for this loop: it waits for their tokens.
            const bool idle = !has_steps();
            for (Inbound & m : inbox.take(idle)) {
                if (m.tokenized) {
                    accept_tokens(*m.tokenized);
                    continue;
                }
                if (!m.request) {
                    if (!has_work()) return;  // stdin closed and nothing left to finish
                    closing_ = true;
                    continue;
                }
                if (!handle(*m.request)) return;  // shutdown
            }
            if (closing_ && !has_work()) return;
            fit_threads();
            step_prefill();
            step_decode();
        }
    }

  private:
    bool has_work() const {
        for (const auto & [name, s] : sessions_) {
            if (s.busy()) return true;
        }
        return false;
    }
    // While tokenizer threads run, the CPU backend computes with as many threads fewer: with
    // more threads than cores, ggml's workers would wait at each of a step's barriers for one the
    // tokenizer preempted, and decode would crawl (docs/BENCHMARKS.md, "A huge append").
    void fit_threads() {
        if (!ggml_backend_is_cpu(engine_.backend())) return;
        const int want = std::max(1, threads_ - tokenizer_.running());
        if (want == computing_) return;
        ggml_backend_cpu_set_n_threads(engine_.backend(), want);
        computing_ = want;
    }

    bool has_steps() const {
        for (const auto & [name, s] : sessions_) {
            if (s.generation || s.prefill) return true;
        }
        return false;
    }

    ServedSession * find(const Value & m, bool must_be_idle) {
        const std::string & name = m.at("session").as_str();
        auto                it   = sessions_.find(name);
        if (it == sessions_.end()) {
            send_error(&m.at("id"), name, "unknown_session", "no session '" + name + "'");
            return nullptr;
        }
        if (must_be_idle && it->second.busy()) {
            send_error(&m.at("id"), name, "busy",
                       "session '" + name + "' is " + (it->second.generation ? "generating" : "prefilling"));
            return nullptr;
        }
        return &it->second;
    }

    static CompressionParams params_from(const Value & m, CompressionParams p) {
        p.method            = m.get_str("method", p.method);
        p.budget            = (int) std::min<uint64_t>(m.get_uint("budget", p.budget), 1u << 30);
        p.window            = (int) std::min<uint64_t>(m.get_uint("window", p.window), 1u << 30);
        p.beta              = (int) std::min<uint64_t>(m.get_uint("beta", p.beta), 1u << 30);
        p.kernel_size       = (int) std::min<uint64_t>(m.get_uint("kernel_size", p.kernel_size), 1u << 30);
        std::string problem = parse_pooling(m.get_str("pooling", pooling_name(p.pooling)), "pooling", p.pooling);
        if (problem.empty())
            problem = parse_aggregation(m.get_str("head_aggregation", aggregation_name(p.aggregation)),
                                        "head_aggregation", p.aggregation);
        if (!problem.empty()) throw Error("", problem);
        return p;
    }

    // Feed a token that was sampled (and sent) but is not in the KV cache yet.
    void flush_pending(ServedSession & s) {
        if (!s.pending) return;
        const int32_t t = *s.pending;
        s.pending.reset();
        s.session->decode(t);
    }

    // A served session's state: the session's own (Session::save), or, with a conversation,
    // "PKVE" | u64 LE bytes of the session's state | that state | Conversation::save. restore
    // takes both, so states saved before conversations existed still restore.
    static std::string save_state(const ServedSession & s) {
        const std::string session = s.session->save();
        if (!s.chat) return session;
        std::string out = "PKVE";
        for (int i = 0; i < 8; ++i) out += (char) ((uint64_t) session.size() >> (8 * i));
        return out + session + s.chat->save();
    }

    void restore_state(ServedSession & s, const std::string & state) {
        if (state.compare(0, 4, "PKVE") != 0) {
            s.session = Session::restore(engine_, state);
            return;
        }
        uint64_t n = 0;
        for (int i = 0; i < 8 && 4 + i < (int) state.size(); ++i)
            n |= (uint64_t) (unsigned char) state[4 + i] << (8 * i);
        if (state.size() < 12 || n > state.size() - 12) throw Error("state", "truncated (conversation envelope)");
        auto session = Session::restore(engine_, state.substr(12, n));
        s.chat       = Conversation::restore(chat_template_, state.substr(12 + n));
        s.session    = std::move(session);
    }

    Value stats_of(uint64_t id, const std::string & name, const Session & s) const {
        const SessionStats st = s.stats();
        return Value::map()
            .set("type", "stats_result")
            .set("id", id)
            .set("session", name)
            .set("tokens_seen", st.tokens_seen)
            .set("layer_kv_lengths", Value::array_of(st.layer_kv_lengths))
            .set("kv_bytes", st.kv_bytes)
            .set("full_kv_bytes", st.full_kv_bytes);
    }

    // Returns false on shutdown.
    bool handle(Value & m) {
        const std::string type = m.at("type").as_str();  // copies: an append moves m away
        const uint64_t    id   = m.at("id").as_uint();
        const std::string name = m.get_str("session", "");
        const Value       id_v = m.at("id");
        try {
            if (type == "shutdown") {
                send(Value::map().set("type", "bye").set("id", id));
                return false;
            }
            if (type == "open") {
                if (sessions_.count(name))
                    return send_error(&m.at("id"), name, "session_exists", "session '" + name + "' exists"), true;
                const int         chunk = (int) std::min<uint64_t>(m.get_uint("chunk_size", default_chunk_), 1u << 24);
                KvType            kv_type = engine_.options().kv_type;
                const std::string bad_type =
                    m.has("kv_type") ? parse_kv_type(m.at("kv_type").as_str(), "open.kv_type", kv_type) : "";
                if (!bad_type.empty()) return send_error(&m.at("id"), name, "invalid", bad_type), true;
                auto s = std::make_unique<Session>(engine_, params_from(m, CompressionParams{}), chunk, kv_type);
                s->set_keep_scores(m.get_bool("keep_scores", false));
                sessions_[name].session = std::move(s);
                send(Value::map().set("type", "opened").set("id", id).set("session", name));
            } else if (type == "append") {
                ServedSession * s = find(m, true);
                if (!s) return true;
                // Tokenized on a tokenizer thread (accept_tokens takes the result); the session is
                // busy meanwhile, so nothing it depends on changes.
                AppendJob job;
                job.ticket    = ++tickets_;
                job.chat      = s->chat;
                job.at_start  = s->session->tokens().empty();
                job.dropped   = std::make_shared<std::atomic<bool>>(false);
                job.request   = std::move(m);
                s->tokenizing = job.ticket;
                s->dropped    = job.dropped;
                tokenizer_.submit(std::move(job));
            } else if (type == "generate") {
                ServedSession * s = find(m, true);
                if (!s) return true;
                flush_pending(*s);
                if (s->session->logits().empty())
                    throw Error("generate", "the session holds no tokens yet: append first");
                if (s->session->tokens().size() >= (size_t) engine_.n_ctx())
                    throw Error("prompt", "the session holds " + std::to_string(s->session->tokens().size()) +
                                              " tokens, the whole context of " + std::to_string(engine_.n_ctx()) +
                                              ": no room for a generated token");
                s->generation = start_generation(m, *s->session);
                if (s->generation->max_tokens == 0) finish(name, *s, "length");
                else sample(name, *s);
            } else if (type == "cancel") {
                ServedSession * s = find(m, false);
                if (!s) return true;
                if (s->generation) finish(name, *s, "cancelled");
                if (s->prefill) {
                    const size_t done = s->prefill->next ? s->prefill->steps[s->prefill->next - 1].end : 0;
                    send_error(&m.at("id"), name, "cancelled",
                               "prefill cancelled after " + std::to_string(done) + " tokens");
                    s->prefill.reset();
                }
                if (s->tokenizing) {
                    send_error(&m.at("id"), name, "cancelled", "append cancelled while its text was tokenized");
                    s->drop_tokenizing();
                }
                send(Value::map().set("type", "cancelled").set("id", id).set("session", name));
            } else if (type == "close") {
                ServedSession * s = find(m, false);
                if (!s) return true;
                if (s->generation) finish(name, *s, "cancelled");
                s->drop_tokenizing();
                sessions_.erase(name);
                send(Value::map().set("type", "closed").set("id", id).set("session", name));
            } else if (type == "stats") {
                if (name.empty()) {
                    const KvPool & pool = engine_.pool();
                    send(Value::map()
                             .set("type", "stats_result")
                             .set("id", id)
                             .set("pool_bytes", pool.capacity_bytes())
                             .set("pool_used_bytes", pool.used_bytes())
                             .set("sessions", sessions_.size()));
                } else if (ServedSession * s = find(m, false)) {
                    send(stats_of(id, name, *s->session));
                }
            } else if (type == "save") {
                ServedSession * s = find(m, true);
                if (!s) return true;
                flush_pending(*s);
                // A state bigger than one frame goes out in pieces: the caller asks again from the
                // next offset until it has `total` bytes.
                const std::string state  = save_state(*s);
                const uint64_t    cap    = max_frame_bytes() - (1u << 20);
                const uint64_t    offset = m.get_uint("offset", 0);
                const uint64_t    piece  = std::min(std::max<uint64_t>(m.get_uint("max_bytes", cap), 1), cap);
                if (offset > state.size())
                    throw Error("offset", std::to_string(offset) + " is beyond the state's " +
                                              std::to_string(state.size()) + " bytes");
                send(Value::map()
                         .set("type", "saved")
                         .set("id", id)
                         .set("session", name)
                         .set("state", Value::bin(state.substr(offset, piece)))
                         .set("offset", offset)
                         .set("total", state.size()));
            } else if (type == "restore") {
                // Pieces arrive in order; the session exists once the last one is in.
                const std::string & piece  = m.at("state").as_bin();
                const uint64_t      offset = m.get_uint("offset", 0);
                const uint64_t      total  = m.get_uint("total", offset + piece.size());
                std::string &       buffer = partial_states_[name];
                if (offset == 0) buffer.clear();
                if (offset == 0 && sessions_.count(name)) {
                    partial_states_.erase(name);
                    return send_error(&m.at("id"), name, "session_exists", "session '" + name + "' exists"), true;
                }
                if (offset != buffer.size() || offset + piece.size() > total || total > (uint64_t(1) << 40)) {
                    const std::string why = "piece at " + std::to_string(offset) + " of " +
                                            std::to_string(piece.size()) + " bytes does not continue the " +
                                            std::to_string(buffer.size()) + " bytes received (total " +
                                            std::to_string(total) + ")";
                    partial_states_.erase(name);
                    throw Error("offset", why);
                }
                buffer += piece;
                if (buffer.size() < total) {
                    send(Value::map()
                             .set("type", "restored")
                             .set("id", id)
                             .set("session", name)
                             .set("received", buffer.size()));
                    return true;
                }
                const std::string state = std::move(buffer);
                partial_states_.erase(name);
                if (sessions_.count(name))
                    return send_error(&m.at("id"), name, "session_exists", "session '" + name + "' exists"), true;
                restore_state(sessions_[name], state);
                send(Value::map()
                         .set("type", "restored")
                         .set("id", id)
                         .set("session", name)
                         .set("received", state.size()));
            } else if (type == "fork") {
                const std::string & target = m.at("new_session").as_str();
                if (sessions_.count(target))
                    return send_error(&m.at("id"), target, "session_exists", "session '" + target + "' exists"), true;
                ServedSession * s = find(m, true);
                if (!s) return true;
                flush_pending(*s);
                auto child                = s->session->fork(params_from(m, CompressionParams{}));
                sessions_[target].session = std::move(child);
                sessions_[target].chat    = s->chat;
                send(Value::map().set("type", "forked").set("id", id).set("session", target));
            }
        } catch (const Error & e) {
            if (type == "restore" || type == "fork") {
                auto it = sessions_.find(type == "fork" ? m.get_str("new_session", "") : name);
                if (it != sessions_.end() && !it->second.session) sessions_.erase(it);
            }
            send_error(&id_v, name, code_for(e), e.what());
        } catch (const std::exception & e) {
            send_error(&id_v, name, "internal", e.what());
        }
        return true;
    }

    // An append's tokens from the tokenizer: refused when they cannot fit (before any prefill),
    // else its prefill starts. Tokens of a job dropped meanwhile (cancel, close) are ignored.
    void accept_tokens(Tokenized & r) {
        auto it = sessions_.find(r.session);
        if (it == sessions_.end() || it->second.tokenizing != r.ticket) return;
        ServedSession & s = it->second;
        s.drop_tokenizing();
        const Value id = Value(r.id);
        if (!r.code.empty()) return send_error(&id, r.session, r.code, r.message);
        try {
            std::vector<int32_t> tokens;
            if (s.pending) tokens.push_back(*s.pending);
            tokens.insert(tokens.end(), r.tokens.begin(), r.tokens.end());
            if (tokens.empty()) throw Error("append", "nothing to append: give text, messages or tokens");
            // Refused before any prefill: the prompt, and room for the reply the caller will ask.
            const uint64_t seen = s.session->tokens().size();
            if (seen + tokens.size() + std::min<uint64_t>(r.reply, 1u << 30) > (uint64_t) engine_.n_ctx()) {
                throw Error("prompt", std::to_string(seen) + " tokens seen + " + std::to_string(tokens.size()) +
                                          " new" + (r.reply ? " + " + std::to_string(r.reply) + " max_tokens" : "") +
                                          " exceed the context of " + std::to_string(engine_.n_ctx()));
            }
            Prefill p{ r.id, std::move(tokens), {}, 0 };
            p.steps = s.session->plan_append((int) p.tokens.size());
            s.pending.reset();
            s.chat    = std::move(r.chat);
            s.prefill = std::move(p);
        } catch (const Error & e) {
            send_error(&id, r.session, code_for(e), e.what());
        } catch (const std::exception & e) {
            send_error(&id, r.session, "internal", e.what());
        }
    }

    // One evaluation (≤ one ubatch) of a pending prefill, round-robin over the sessions that have
    // one, so prefills of long inputs do not stall other sessions' decode steps.
    void step_prefill() {
        std::vector<std::string> waiting;
        for (auto & [name, s] : sessions_) {
            if (s.prefill) waiting.push_back(name);
        }
        if (waiting.empty()) return;
        auto              pick = std::upper_bound(waiting.begin(), waiting.end(), last_prefilled_);
        const std::string name = pick == waiting.end() ? waiting.front() : *pick;
        last_prefilled_        = name;
        ServedSession & s      = sessions_[name];
        Prefill &       p      = *s.prefill;
        const Value     id     = Value(p.id);
        try {
            const Session::AppendStep & step = p.steps[p.next++];
            s.session->run_append_step(p.tokens, step);
            if (p.next < p.steps.size()) {
                send(Value::map()
                         .set("type", "progress")
                         .set("id", id)
                         .set("session", name)
                         .set("done", step.end)
                         .set("total", p.tokens.size()));
                return;
            }
            const SessionStats st = s.session->stats();
            send(Value::map()
                     .set("type", "appended")
                     .set("id", id)
                     .set("session", name)
                     .set("tokens_seen", st.tokens_seen)
                     .set("kv_bytes", st.kv_bytes));
            s.prefill.reset();
        } catch (const Error & e) {
            send_error(&id, name, code_for(e), e.what());
            s.prefill.reset();
        }
    }

    // One decode step for every generating session, in one graph evaluation.
    void step_decode() {
        std::vector<std::pair<std::string, ServedSession *>> active;
        for (auto & [name, s] : sessions_) {
            if (s.generation) active.emplace_back(name, &s);
        }
        if (active.empty()) return;
        std::vector<Session *>                               batch;
        std::vector<int32_t>                                 tokens;
        std::vector<std::pair<std::string, ServedSession *>> stepping;
        for (auto & [name, s] : active) {
            // Engine::decode_batch refuses the whole step when one session is at the context:
            // such a session ends here, alone (emit() normally ends it one token earlier).
            if (s->session->tokens().size() + 1 > (size_t) engine_.n_ctx()) {
                finish(name, *s, "length");
                continue;
            }
            try {
                s->session->reserve(1);  // a full pool fails this session only
            } catch (const Error & e) {
                const Value id = Value(s->generation->id);
                send_error(&id, name, code_for(e), e.what());
                finish(name, *s, "error");
                continue;
            }
            batch.push_back(s->session.get());
            tokens.push_back(*s->pending);
            stepping.emplace_back(name, s);
        }
        if (batch.empty()) return;
        try {
            engine_.decode_batch(batch, tokens);
        } catch (const Error & e) {
            for (auto & [name, s] : stepping) {
                const Value id = Value(s->generation->id);
                send_error(&id, name, code_for(e), e.what());
                finish(name, *s, "error");
            }
            return;
        }
        for (auto & [name, s] : stepping) {
            s->pending.reset();
            sample(name, *s);
        }
    }

    // A generate request's settings, each checked against its range.
    Generation start_generation(const Value & m, const Session & session) {
        Generation g;
        g.id         = m.at("id").as_uint();
        g.max_tokens = (int) std::min<uint64_t>(m.get_uint("max_tokens", kDefaultMaxTokens), 1u << 24);
        auto real    = [&](const char * field, double def, double lo, double hi, bool lo_open, const char * range) {
            const double v = m.get_double(field, def);
            if (!std::isfinite(v) || v < lo || v > hi || (lo_open && v == lo)) {
                char buf[64];
                std::snprintf(buf, sizeof(buf), "%g", v);
                throw Error(field, std::string(buf) + " is not a number in " + range);
            }
            return (float) v;
        };
        SamplerOptions so;
        so.temperature        = real("temperature", 0.0, 0.0, 1e9, false, "[0, inf) (0 = greedy)");
        so.top_p              = real("top_p", 1.0, 0.0, 1.0, true, "(0, 1]");
        so.min_p              = real("min_p", 0.0, 0.0, 1.0, false, "[0, 1] (0 = off)");
        so.presence_penalty   = real("presence_penalty", 0.0, -2.0, 2.0, false, "[-2, 2] (0 = off)");
        so.frequency_penalty  = real("frequency_penalty", 0.0, -2.0, 2.0, false, "[-2, 2] (0 = off)");
        so.repetition_penalty = real("repetition_penalty", 1.0, 0.0, 10.0, true, "(0, 10] (1 = off)");
        // top_k beyond the vocabulary keeps every token, as the vocabulary's size does.
        so.top_k              = (int) std::min<uint64_t>(m.get_uint("top_k", 0), (uint64_t) engine_.config().n_vocab);
        const uint64_t last_n = m.get_uint("penalty_last_n", so.penalty_last_n);
        if (last_n > (uint64_t) engine_.n_ctx())
            throw Error("penalty_last_n", std::to_string(last_n) + " is not in [0, " + std::to_string(engine_.n_ctx()) +
                                              "] (the context)");
        so.penalty_last_n     = (int) last_n;
        const uint64_t top_lp = m.get_uint("top_logprobs", 0);
        if (top_lp > kMaxTopLogprobs)
            throw Error("top_logprobs",
                        std::to_string(top_lp) + " is not in [0, " + std::to_string(kMaxTopLogprobs) + "]");
        g.top_logprobs = (int) top_lp;
        g.logprobs     = m.get_bool("logprobs", false) || m.has("top_logprobs");
        g.seed         = m.has("seed") ? m.at("seed").as_uint() : random_seed();
        so.seed        = fold_seed(g.seed);
        if (m.has("grammar") && m.has("json_schema"))
            throw Error("json_schema", "give grammar or json_schema, not both");
        if (m.has("grammar")) {
            so.grammar = m.at("grammar").as_str();
            if (so.grammar.empty()) throw Error("grammar", "empty: give a GBNF grammar with a rule 'root', or omit it");
        }
        if (m.has("json_schema")) so.grammar = grammar_from_json_schema(m.at("json_schema").as_str());
        std::vector<std::string> stops;
        if (m.has("stop")) {
            for (const Value & x : m.at("stop").as_array()) {
                if (!x.as_str("stop").empty()) stops.push_back(x.as_str("stop"));
            }
        }
        g.stream  = TokenStream(std::move(stops));
        g.sampler = std::make_unique<Sampler>(so, engine_.model().vocab());
        // The penalties look back over the prompt too, as llama-server's do.
        const std::vector<int32_t> & seen = session.tokens();
        if (so.penalties()) {
            const size_t from = seen.size() > (size_t) so.penalty_last_n ? seen.size() - so.penalty_last_n : 0;
            g.sampler->accept_history(std::vector<int32_t>(seen.begin() + from, seen.end()));
        }
        return g;
    }

    void send_frames(const std::string & name, Generation & g, const std::vector<TokenStream::Frame> & frames) {
        for (const TokenStream::Frame & fr : frames) {
            const HeldToken h = std::move(g.held.front());
            g.held.pop_front();
            Value f = Value::map()
                          .set("type", "token")
                          .set("id", g.id)
                          .set("session", name)
                          .set("token", (uint64_t) h.token)
                          .set("text", fr.text);
            if (g.logprobs) {
                f.set("logprob", h.logprobs.logprob).set("bytes", Value::bin(fr.bytes));
                if (g.top_logprobs > 0) {
                    Value top = Value::array();
                    for (const auto & [token, lp] : h.logprobs.top) {
                        top.push(Value::map()
                                     .set("token", (uint64_t) token)
                                     .set("bytes", Value::bin(engine_.model().token_to_piece(token)))
                                     .set("logprob", lp));
                    }
                    f.set("top_logprobs", top);
                }
            }
            send(f);
        }
        if (g.stream.stopped()) g.held.clear();
    }

    // The next token of a generating session; a failure (a grammar no token can continue) ends
    // this generation only.
    void sample(const std::string & name, ServedSession & s) {
        try {
            emit(name, s, s.generation->sampler->pick(s.session->logits()));
        } catch (const Error & e) {
            const Value id = Value(s.generation->id);
            send_error(&id, name, code_for(e), e.what());
            if (s.generation) finish(name, s, "error");
        }
    }

    // A sampled token: end of turn, or held (and fed at the next step); then the frames that can
    // go, the stop strings, the length and the context.
    void emit(const std::string & name, ServedSession & s, int32_t token) {
        Generation & g = *s.generation;
        s.pending      = token;
        if (engine_.model().is_end_of_turn(token)) return finish(name, s, "end");
        HeldToken h{ token, {} };
        if (g.logprobs) h.logprobs = token_logprobs(s.session->logits(), token, g.top_logprobs);
        g.sampler->accept(token);
        g.held.push_back(std::move(h));
        ++g.produced;
        send_frames(name, g, g.stream.push(engine_.model().token_to_piece(token)));
        if (g.stream.stopped()) return finish(name, s, "stop");
        if (g.produced >= g.max_tokens) return finish(name, s, "length");
        // The token just sampled enters the KV cache at the next step; one more needs room too.
        if (s.session->tokens().size() + 2 > (size_t) engine_.n_ctx()) finish(name, s, "length");
    }

    void finish(const std::string & name, ServedSession & s, const char * reason) {
        Generation & g = *s.generation;
        // The conversation's reply is what the KV cache holds: every sampled token (a stop
        // string's too), and the end-of-turn token, which enters with the next append.
        if (s.chat && s.chat->awaiting_reply()) {
            const bool ended = std::string(reason) == "end" && s.pending;
            try {
                s.chat->add_reply(valid_utf8(g.stream.bytes()), ended ? *s.pending : -1);
            } catch (const Error &) {
                s.chat.reset();  // a reply the template cannot render: later turns start a new conversation
            }
        }
        if (std::string(reason) != "error") {
            send_frames(name, g, g.stream.finish());
            send(Value::map()
                     .set("type", "done")
                     .set("id", g.id)
                     .set("session", name)
                     .set("reason", reason)
                     .set("new_tokens", (uint64_t) g.produced)
                     .set("text", g.stream.text())
                     .set("seed", g.seed));
        }
        s.generation.reset();
    }

    Engine &                             engine_;
    const ChatTemplate &                 chat_template_;
    int                                  default_chunk_;
    std::map<std::string, ServedSession> sessions_;
    std::string                          last_prefilled_;
    std::map<std::string, std::string>   partial_states_;  // restore pieces received so far
    Tokenizer &                          tokenizer_;
    uint64_t                             tickets_ = 0;                  // appends handed to the tokenizer
    int                                  threads_ = 1, computing_ = 1;  // the backend's threads: configured, now
    bool                                 closing_ = false;
};

}  // namespace

mp::Value engine_catalog(int chunk_size, KvType kv_type) {
    mp::Value methods = mp::Value::array();
    for (const Method * m : all_methods()) {
        mp::Value scores = mp::Value::array();
        if (m->needs_window_probs) scores.push("window");
        if (m->needs_accumulated) scores.push("accumulated");
        methods.push(mp::Value::map()
                         .set("name", m->name)
                         .set("description", m->description)
                         .set("compresses", m->compresses)
                         .set("min_budget", m->min_budget)
                         .set("keeps_window", m->keeps_window)
                         .set("scores", scores));
    }
    const CompressionParams d;
    return mp::Value::map()
        .set("methods", methods)
        .set("defaults", mp::Value::map()
                             .set("method", d.method)
                             .set("budget", d.budget)
                             .set("window", d.window)
                             .set("beta", d.beta)
                             .set("kernel_size", d.kernel_size)
                             .set("pooling", pooling_name(d.pooling))
                             .set("head_aggregation", aggregation_name(d.aggregation))
                             .set("chunk_size", chunk_size)
                             .set("max_tokens", kDefaultMaxTokens)
                             .set("kv_type", kv_type_name(kv_type)));
}

int cmd_serve(int argc, char ** argv) {
    EngineOptions o;
    o.model_path = default_model_path();
    bool stdio   = false;
    int  chunk   = kDefaultChunkSize;
    auto number  = [&](int & i, const std::string & flag, long lo, long hi) -> long {
        if (i + 1 >= argc) throw Error(flag, "missing value");
        char *     end = nullptr;
        const long v   = std::strtol(argv[++i], &end, 10);
        if (*end || v < lo || v > hi)
            throw Error(flag, "'" + std::string(argv[i]) + "' is not an integer in [" + std::to_string(lo) + ", " +
                                  std::to_string(hi) + "]");
        return v;
    };
    for (int i = 2; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--stdio") stdio = true;
        else if (a == "--model" && i + 1 < argc) o.model_path = argv[++i];
        else if (a == "--device" && i + 1 < argc) o.device = argv[++i];
        else if (a == "--no-repack") o.repack_weights = false;
        else if (a == "--threads") o.n_threads = (int) number(i, a, 0, 1024);
        else if (a == "--ctx-size") o.n_ctx = (int) number(i, a, 0, 1 << 24);
        else if (a == "--kv-pool-bytes") o.kv_pool_bytes = (size_t) number(i, a, 1, std::numeric_limits<long>::max());
        else if (a == "--chunk-size") chunk = (int) number(i, a, 0, 1 << 24);
        else if (a == "--kv-type") {
            const std::string problem = parse_kv_type(i + 1 < argc ? argv[++i] : "", "--kv-type", o.kv_type);
            if (!problem.empty()) throw Error("", problem);
        } else throw Error(a, "unknown option");
    }
    if (!stdio) throw Error("--stdio", "required (the only transport so far)");
    Engine             engine(o);
    const KvPool &     pool    = engine.pool();
    const std::string  name    = o.model_path.substr(o.model_path.find_last_of('/') + 1);
    const Value        catalog = engine_catalog(chunk, o.kv_type);
    const ChatTemplate chat_template(engine.model());
    send(Value::map()
             .set("type", "hello")
             .set("protocol", protocol_version())
             .set("model", name)
             .set("n_layer", engine.config().n_layer)
             .set("n_ctx", engine.n_ctx())
             .set("pool_bytes", pool.capacity_bytes())
             .set("page_bytes", pool.bytes_per_page())
             .set("protocol_minor", protocol_minor())
             .set("page_slots", pool.page_slots())
             .set("methods", catalog.at("methods"))
             .set("defaults", catalog.at("defaults"))
             .set("chat_template", chat_template.source()));
    Inbox       inbox;
    Tokenizer   tokenizer(engine.model(), chat_template, engine.config().n_vocab, inbox);
    std::thread reader(read_loop, std::ref(inbox));
    reader.detach();  // blocked in fread until stdin closes; the process exits without joining it
    Server(engine, chat_template, chunk, tokenizer).run(inbox);
    std::fflush(stdout);
    std::_Exit(0);
}

}  // namespace pkv
