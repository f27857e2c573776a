#include "serve.h"

#include <algorithm>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <thread>

#include "error.h"
#include "generate.h"
#include "paths.h"
#include "protocol.h"
#include "session.h"

namespace pkv {

namespace {

using mp::Value;

// What the reader thread hands to the engine loop: a validated request, or the end of input.
struct Inbound {
    std::optional<Value> request;  // empty: stdin closed or unreadable
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
            send_error(nullptr, "", "bad_frame", e.what());
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
        inbox.push({ std::move(v) });
    }
}

// Bytes of `s` that end on a complete UTF-8 character: a token can end in the middle of one, and
// protocol strings must be valid UTF-8, so the tail waits for the next token.
size_t complete_utf8(const std::string & s) {
    size_t i = s.size(), back = 0;
    while (i > 0 && back < 4 && ((unsigned char) s[i - 1] & 0xC0) == 0x80) --i, ++back;
    if (i == 0) return s.size();
    const unsigned char lead = (unsigned char) s[i - 1];
    const size_t        need = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
    return need == back + 1 || need == 1 ? s.size() : i - 1;
}

struct Generation {
    uint64_t                 id         = 0;
    int                      max_tokens = kDefaultMaxTokens;
    int                      produced   = 0;
    std::string              text;
    size_t                   sent = 0;  // bytes of text already sent in token frames
    std::vector<std::string> stop;
    std::unique_ptr<Sampler> sampler;
};

struct Prefill {
    uint64_t                         id = 0;
    std::vector<int32_t>             tokens;
    std::vector<Session::AppendStep> steps;
    size_t                           next = 0;  // steps run so far
};

struct ServedSession {
    std::unique_ptr<Session>  session;
    std::optional<int32_t>    pending;  // sampled and sent, not yet in the KV cache
    std::optional<Generation> generation;
    std::optional<Prefill>    prefill;
    bool                      busy() const { return generation || prefill; }
};

class Server {
  public:
    Server(Engine & engine, int default_chunk) : engine_(engine), default_chunk_(default_chunk) {}

    void run(Inbox & inbox) {
        for (;;) {
            const bool idle = !has_work();
            for (Inbound & m : inbox.take(idle)) {
                if (!m.request) {
                    if (!has_work()) return;  // stdin closed and nothing left to finish
                    closing_ = true;
                    continue;
                }
                if (!handle(*m.request)) return;  // shutdown
            }
            if (closing_ && !has_work()) return;
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
    bool handle(const Value & m) {
        const std::string & type = m.at("type").as_str();
        const uint64_t      id   = m.at("id").as_uint();
        const std::string   name = m.get_str("session", "");
        try {
            if (type == "shutdown") {
                send(Value::map().set("type", "bye").set("id", id));
                return false;
            }
            if (type == "open") {
                if (sessions_.count(name))
                    return send_error(&m.at("id"), name, "session_exists", "session '" + name + "' exists"), true;
                const int chunk = (int) std::min<uint64_t>(m.get_uint("chunk_size", default_chunk_), 1u << 24);
                auto      s     = std::make_unique<Session>(engine_, params_from(m, CompressionParams{}), chunk);
                s->set_keep_scores(m.get_bool("keep_scores", false));
                sessions_[name].session = std::move(s);
                send(Value::map().set("type", "opened").set("id", id).set("session", name));
            } else if (type == "append") {
                ServedSession * s = find(m, true);
                if (!s) return true;
                std::vector<int32_t> tokens;
                if (s->pending) tokens.push_back(*s->pending);
                if (m.has("text")) {
                    const std::string & text = m.at("text").as_str();
                    const bool          chat = m.get_bool("chat", false);
                    const std::string   full =
                        chat ? (s->session->tokens().empty() ? "" : "\n") + engine_.model().apply_chat_template(text)
                             : text;
                    const auto t = engine_.model().tokenize(full, s->session->tokens().empty());
                    tokens.insert(tokens.end(), t.begin(), t.end());
                }
                if (m.has("tokens")) {
                    for (const Value & t : m.at("tokens").as_array()) {
                        const uint64_t x = t.as_uint("tokens");
                        if (x >= (uint64_t) engine_.config().n_vocab)
                            throw Error("tokens", "token id " + std::to_string(x) + " outside [0, " +
                                                      std::to_string(engine_.config().n_vocab) + ")");
                        tokens.push_back((int32_t) x);
                    }
                }
                if (tokens.empty()) throw Error("append", "nothing to append: give text or tokens");
                if ((int) (s->session->tokens().size() + tokens.size()) > engine_.n_ctx()) {
                    throw Error("prompt", std::to_string(s->session->tokens().size() + tokens.size()) +
                                              " tokens exceed the context of " + std::to_string(engine_.n_ctx()));
                }
                s->pending.reset();
                Prefill p{ id, std::move(tokens), {}, 0 };
                p.steps    = s->session->plan_append((int) p.tokens.size());
                s->prefill = std::move(p);
            } else if (type == "generate") {
                ServedSession * s = find(m, true);
                if (!s) return true;
                flush_pending(*s);
                if (s->session->logits().empty())
                    throw Error("generate", "the session holds no tokens yet: append first");
                Generation g;
                g.id         = id;
                g.max_tokens = (int) std::min<uint64_t>(m.get_uint("max_tokens", kDefaultMaxTokens), 1u << 24);
                SamplerOptions so;
                so.temperature = (float) m.get_double("temperature", 0.0);
                so.top_k       = (int) std::min<uint64_t>(m.get_uint("top_k", 0), 1u << 30);
                so.top_p       = (float) m.get_double("top_p", 1.0);
                so.seed        = (uint32_t) m.get_uint("seed", 0);
                if (so.temperature < 0 || !(so.top_p > 0 && so.top_p <= 1))
                    throw Error("generate", "temperature must be >= 0 and top_p in (0, 1]");
                if (m.has("stop")) {
                    for (const Value & x : m.at("stop").as_array()) g.stop.push_back(x.as_str("stop"));
                }
                g.sampler     = std::make_unique<Sampler>(so);
                s->generation = std::move(g);
                if (s->generation->max_tokens == 0) finish(name, *s, "length");
                else emit(name, *s, s->generation->sampler->sample(s->session->logits()));
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
                send(Value::map().set("type", "cancelled").set("id", id).set("session", name));
            } else if (type == "close") {
                ServedSession * s = find(m, false);
                if (!s) return true;
                if (s->generation) finish(name, *s, "cancelled");
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
                const std::string state  = s->session->save();
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
                sessions_[name].session = Session::restore(engine_, state);
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
                send(Value::map().set("type", "forked").set("id", id).set("session", target));
            }
        } catch (const Error & e) {
            if (type == "restore" || type == "fork") {
                auto it = sessions_.find(type == "fork" ? m.get_str("new_session", "") : name);
                if (it != sessions_.end() && !it->second.session) sessions_.erase(it);
            }
            send_error(&m.at("id"), name, code_for(e), e.what());
        } catch (const std::exception & e) {
            send_error(&m.at("id"), name, "internal", e.what());
        }
        return true;
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
            emit(name, *s, s->generation->sampler->sample(s->session->logits()));
        }
    }

    // A sampled token: end of turn, or sent (and fed at the next step), then the stop checks.
    void emit(const std::string & name, ServedSession & s, int32_t token) {
        Generation & g = *s.generation;
        s.pending      = token;
        if (engine_.model().is_end_of_turn(token)) return finish(name, s, "end");
        g.text += engine_.model().token_to_piece(token);
        ++g.produced;
        const size_t ready = complete_utf8(g.text);
        send(Value::map()
                 .set("type", "token")
                 .set("id", g.id)
                 .set("session", name)
                 .set("token", (uint64_t) token)
                 .set("text", g.text.substr(g.sent, ready - g.sent)));
        g.sent = ready;
        for (const std::string & stop : g.stop) {
            const size_t at = stop.empty() ? std::string::npos : g.text.find(stop);
            if (at != std::string::npos) {
                g.text.resize(at);
                return finish(name, s, "stop");
            }
        }
        if (g.produced >= g.max_tokens) finish(name, s, "length");
    }

    void finish(const std::string & name, ServedSession & s, const char * reason) {
        Generation & g = *s.generation;
        g.text.resize(complete_utf8(g.text));
        if (std::string(reason) != "error") {
            send(Value::map()
                     .set("type", "done")
                     .set("id", g.id)
                     .set("session", name)
                     .set("reason", reason)
                     .set("new_tokens", (uint64_t) g.produced)
                     .set("text", g.text));
        }
        s.generation.reset();
    }

    Engine &                             engine_;
    int                                  default_chunk_;
    std::map<std::string, ServedSession> sessions_;
    std::string                          last_prefilled_;
    std::map<std::string, std::string>   partial_states_;  // restore pieces received so far
    bool                                 closing_ = false;
};

}  // namespace

mp::Value engine_catalog(int chunk_size) {
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
                             .set("max_tokens", kDefaultMaxTokens));
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
        else if (a == "--threads") o.n_threads = (int) number(i, a, 0, 1024);
        else if (a == "--ctx-size") o.n_ctx = (int) number(i, a, 0, 1 << 24);
        else if (a == "--kv-pool-bytes") o.kv_pool_bytes = (size_t) number(i, a, 1, std::numeric_limits<long>::max());
        else if (a == "--chunk-size") chunk = (int) number(i, a, 0, 1 << 24);
        else throw Error(a, "unknown option");
    }
    if (!stdio) throw Error("--stdio", "required (the only transport so far)");
    Engine            engine(o);
    const KvPool &    pool    = engine.pool();
    const std::string name    = o.model_path.substr(o.model_path.find_last_of('/') + 1);
    const Value       catalog = engine_catalog(chunk);
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
             .set("defaults", catalog.at("defaults")));
    Inbox       inbox;
    std::thread reader(read_loop, std::ref(inbox));
    reader.detach();  // blocked in fread until stdin closes; the process exits without joining it
    Server(engine, chunk).run(inbox);
    std::fflush(stdout);
    std::_Exit(0);
}

}  // namespace pkv
