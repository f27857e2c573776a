// pkv-engine serve --stdio, driven like the supervisor drives it: frames in, frames out. Every bad
// frame gets an error frame while another session keeps generating; fork, save and restore work
// through the protocol; cancel stops a generation.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <map>

#include "msgpack.h"
#include "protocol.h"
#include "serve.h"
#include "test_util.h"

namespace pkv::test {
namespace {

using mp::Value;

class EngineProcess {
  public:
    explicit EngineProcess(const std::vector<std::string> & extra = {}) {
        int in[2], out[2];
        EXPECT_EQ(pipe(in), 0);
        EXPECT_EQ(pipe(out), 0);
        pid_ = fork();
        if (pid_ == 0) {
            dup2(in[0], 0);
            dup2(out[1], 1);
            close(in[1]);
            close(out[0]);
            std::vector<std::string> args = { PKV_ENGINE_BIN,   "serve",        "--stdio", "--model",
                                              embedded_model(), "--chunk-size", "256" };
            args.insert(args.end(), extra.begin(), extra.end());
            std::vector<char *> argv;
            for (auto & a : args) argv.push_back(a.data());
            argv.push_back(nullptr);
            execv(argv[0], argv.data());
            _exit(127);
        }
        close(in[0]);
        close(out[1]);
        to_   = in[1];
        from_ = out[0];
        signal(SIGPIPE, SIG_IGN);
    }
    ~EngineProcess() {
        if (to_ >= 0) close(to_);
        close(from_);
        if (!exited_) {
            kill(pid_, SIGKILL);
            waitpid(pid_, nullptr, 0);
        }
    }
    void send(const Value & v) { send_raw(encode_frame(v)); }
    void send_raw(const std::string & bytes) {
        ASSERT_EQ(write(to_, bytes.data(), bytes.size()), (ssize_t) bytes.size());
    }
    void close_input() {
        close(to_);
        to_ = -1;
    }
    // The next frame, or nil on end of output / timeout.
    Value next(int timeout_ms = 120000) {
        for (;;) {
            if (buf_.size() >= 4) {
                const uint32_t n =
                    (uint8_t) buf_[0] << 24 | (uint8_t) buf_[1] << 16 | (uint8_t) buf_[2] << 8 | (uint8_t) buf_[3];
                if (buf_.size() >= 4 + n) {
                    Value v = mp::decode(std::string_view(buf_).substr(4, n));
                    buf_.erase(0, 4 + n);
                    EXPECT_EQ(validate_frame(v, "from_engine"), "") << "the engine sent a frame outside the protocol";
                    return v;
                }
            }
            pollfd p{ from_, POLLIN, 0 };
            if (poll(&p, 1, timeout_ms) <= 0) return Value();
            char          chunk[65536];
            const ssize_t n = read(from_, chunk, sizeof(chunk));
            if (n <= 0) return Value();
            buf_.append(chunk, n);
        }
    }
    // Frames until one satisfies `done` (included); fails the test on timeout.
    std::vector<Value> until(const std::function<bool(const Value &)> & done) {
        std::vector<Value> seen;
        for (;;) {
            Value v = next();
            if (v.is_nil()) {
                ADD_FAILURE() << "no matching frame before the engine went quiet";
                return seen;
            }
            seen.push_back(v);
            if (done(v)) return seen;
        }
    }
    std::vector<Value> until_type(const std::string & type, uint64_t id) {
        return until([&](const Value & v) { return v.get_str("type", "") == type && v.get_uint("id", ~0ull) == id; });
    }
    int wait_exit() {
        int status = 0;
        waitpid(pid_, &status, 0);
        exited_ = true;
        return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    }

  private:
    pid_t       pid_ = -1;
    int         to_ = -1, from_ = -1;
    bool        exited_ = false;
    std::string buf_;
};

Value msg(const char * type, uint64_t id) { return Value::map().set("type", type).set("id", id); }

Value open_msg(uint64_t id, const char * session, const char * method, int budget) {
    return msg("open", id).set("session", session).set("method", method).set("budget", budget);
}

Value append_msg(uint64_t id, const char * session, const std::string & text) {
    return msg("append", id).set("session", session).set("text", text).set("chat", true);
}

std::string frame_of_payload(const std::string & payload) {
    std::string    f(4, '\0');
    const uint32_t n = (uint32_t) payload.size();
    f[0] = (char) (n >> 24), f[1] = (char) (n >> 16), f[2] = (char) (n >> 8), f[3] = (char) n;
    return f + payload;
}

TEST(Serve, HelloOpenAppendGenerate) {
    EngineProcess e;
    const Value   hello = e.next();
    ASSERT_EQ(hello.get_str("type", ""), "hello");
    EXPECT_EQ(hello.at("protocol").as_uint(), (uint64_t) protocol_version());
    EXPECT_EQ(hello.at("n_layer").as_uint(), 30u);
    EXPECT_GT(hello.at("pool_bytes").as_uint(), 0u);
    EXPECT_EQ(hello.at("protocol_minor").as_uint(), (uint64_t) protocol_minor());
    EXPECT_EQ(hello.at("page_bytes").as_uint() % hello.at("page_slots").as_uint(), 0u);
    // The methods and defaults `pkv-engine methods --json` prints, with this server's --chunk-size.
    const Value catalog = engine_catalog(256);
    EXPECT_EQ(hello.at("methods"), catalog.at("methods"));
    EXPECT_EQ(hello.at("defaults"), catalog.at("defaults"));
    EXPECT_EQ(hello.at("defaults").at("chunk_size").as_uint(), 256u);

    e.send(open_msg(1, "s1", "pyramidkv", 64));
    EXPECT_EQ(e.until_type("opened", 1).back().at("session").as_str(), "s1");
    e.send(append_msg(2, "s1", essay_text(3000) + "\n\nWhat is this text about?"));
    const std::vector<Value> prefill  = e.until_type("appended", 2);
    int                      progress = 0;
    for (const Value & v : prefill) progress += v.get_str("type", "") == "progress";
    EXPECT_GE(progress, 2) << "an input of several chunks reports progress";
    EXPECT_GT(prefill.back().at("tokens_seen").as_uint(), 600u);

    e.send(msg("generate", 3).set("session", "s1").set("max_tokens", 8));
    const std::vector<Value> out = e.until_type("done", 3);
    std::string              text;
    int                      tokens = 0;
    for (const Value & v : out) {
        if (v.get_str("type", "") == "token") text += v.at("text").as_str(), ++tokens;
    }
    EXPECT_EQ(out.back().at("text").as_str(), text);
    EXPECT_EQ(out.back().at("new_tokens").as_uint(), (uint64_t) tokens);
    EXPECT_TRUE(out.back().at("reason").as_str() == "length" || out.back().at("reason").as_str() == "end");

    e.send(msg("stats", 4).set("session", "s1"));
    const Value st = e.until_type("stats_result", 4).back();
    EXPECT_EQ(st.at("layer_kv_lengths").size(), 30u);
    EXPECT_LT(st.at("kv_bytes").as_uint() * 4, st.at("full_kv_bytes").as_uint());
    e.send(msg("shutdown", 5));
    e.until_type("bye", 5);
    EXPECT_EQ(e.wait_exit(), 0);
}

TEST(Serve, EveryBadFrameGetsAnErrorWhileAnotherSessionKeepsGenerating) {
    EngineProcess e;
    e.next();
    e.send(open_msg(1, "s1", "snapkv", 64));
    e.send(append_msg(2, "s1", essay_text(1500) + "\n\nSummarise."));
    e.until_type("appended", 2);
    e.send(msg("generate", 3).set("session", "s1").set("max_tokens", 40));

    struct Bad {
        std::string frame, code, says;
    };
    const std::vector<Bad> bad = {
        { frame_of_payload("\xc1"), "bad_frame", "msgpack" },
        { frame_of_payload(mp::encode(Value(42))), "invalid", "map" },
        { encode_frame(msg("frobnicate", 10)), "unknown_type", "frobnicate" },
        { encode_frame(msg("open", 11)), "invalid", "missing required field 'session'" },
        { encode_frame(msg("open", 12).set("session", 5)), "invalid", "field 'session' must be str" },
        { encode_frame(msg("open", 13).set("session", "x").set("budgte", 5)), "invalid", "unknown field 'budgte'" },
        { encode_frame(msg("generate", 14).set("session", "nope")), "unknown_session", "nope" },
        { encode_frame(open_msg(15, "s1", "full", 64)), "session_exists", "s1" },
        { encode_frame(append_msg(16, "s1", "more")), "busy", "generating" },
        { encode_frame(open_msg(17, "x", "magic", 64)), "invalid", "--method" },
        { encode_frame(open_msg(18, "y", "pyramidkv", 4)), "invalid", "--budget" },
        { encode_frame(msg("restore", 19).set("session", "z").set("state", Value::bin("not a state"))), "invalid",
          "state" },
        { encode_frame(msg("hello", 20)), "invalid", "from_engine" },
    };
    for (const Bad & b : bad) e.send_raw(b.frame);
    std::vector<Value>       errors;
    const std::vector<Value> seen   = e.until([&](const Value & v) { return v.get_str("type", "") == "done"; });
    uint64_t                 tokens = 0;
    for (const Value & v : seen) {
        if (v.get_str("type", "") == "error") errors.push_back(v);
        tokens += v.get_str("type", "") == "token";
    }
    while (errors.size() < bad.size()) {  // error frames that came after the generation finished
        const Value v = e.next(20000);
        ASSERT_FALSE(v.is_nil()) << "missing error frames: got " << errors.size() << " of " << bad.size();
        if (v.get_str("type", "") == "error") errors.push_back(v);
    }
    ASSERT_EQ(errors.size(), bad.size());
    // Frames rejected by validation are answered by the reader, the others by the engine loop, so
    // the answers are matched by request id (frames without a readable id, in order).
    std::vector<Value>        without_id;
    std::map<uint64_t, Value> by_id;
    for (const Value & v : errors) {
        if (v.has("id")) by_id[v.at("id").as_uint()] = v;
        else without_id.push_back(v);
    }
    for (size_t i = 0, anonymous = 0; i < bad.size(); ++i) {
        const bool has_id = i >= 2;
        ASSERT_TRUE(has_id ? by_id.count(8 + i) > 0 : anonymous < without_id.size()) << "no answer to bad frame " << i;
        const Value & err = has_id ? by_id[8 + i] : without_id[anonymous++];
        EXPECT_EQ(err.at("code").as_str(), bad[i].code) << i << ": " << err.at("message").as_str();
        EXPECT_NE(err.at("message").as_str().find(bad[i].says), std::string::npos)
            << i << ": " << err.at("message").as_str();
    }
    // The generation ran to its end despite the bad frames: all 40 tokens, or fewer if the greedy
    // text ends its turn first. Which one depends on the CPU: this text passes near-ties (top-2
    // margins down to ~0.015 logits) that another instruction set may resolve otherwise
    // (docs/ENGINE.md, "Tests on any CPU"), so both are accepted and the count checked either way.
    const std::string reason     = seen.back().at("reason").as_str();
    const uint64_t    new_tokens = seen.back().at("new_tokens").as_uint();
    EXPECT_TRUE(reason == "length" ? new_tokens == 40u : reason == "end" && new_tokens < 40u)
        << reason << " after " << new_tokens << " tokens";
    EXPECT_EQ(tokens, new_tokens) << "one token frame per generated token";

    // An oversized frame cannot be skipped (its end is unknown): one error, then no more input,
    // but the engine finishes and exits cleanly.
    e.send_raw(std::string("\xff\xff\xff\xf0", 4));
    const Value too_large = e.until([](const Value & v) { return v.get_str("type", "") == "error"; }).back();
    EXPECT_EQ(too_large.at("code").as_str(), "too_large");
    EXPECT_EQ(e.wait_exit(), 0);
}

TEST(Serve, ForkSaveRestoreAndCancelThroughFrames) {
    EngineProcess e;
    e.next();
    e.send(open_msg(1, "src", "full", 128).set("keep_scores", true).set("chunk_size", 0));
    e.send(append_msg(2, "src", essay_text(2500) + "\n\nWho is the author?"));
    e.until_type("appended", 2);
    e.send(msg("fork", 3).set("session", "src").set("new_session", "b").set("method", "pyramidkv").set("budget", 64));
    e.until_type("forked", 3);
    e.send(msg("save", 4).set("session", "b"));
    const std::string state = e.until_type("saved", 4).back().at("state").as_bin();
    EXPECT_GT(state.size(), 1000u);
    e.send(msg("restore", 5).set("session", "c").set("state", Value::bin(state)));
    e.until_type("restored", 5);

    auto generate = [&](uint64_t id, const char * s) {
        e.send(msg("generate", id).set("session", s).set("max_tokens", 12));
        return e.until_type("done", id).back().at("text").as_str();
    };
    // b and c decode alone, over the same bytes with the same kernels: the same arithmetic, so
    // equal text on any CPU. b is not empty on any CPU either: its first greedy token ("The") leads
    // every end-of-turn token by ~10 logits, far more than CPUs' rounding can move a logit.
    const std::string b = generate(6, "b"), c = generate(7, "c");
    EXPECT_FALSE(b.empty());
    EXPECT_EQ(b, c) << "a restored session continues exactly like the original";

    e.send(msg("generate", 8).set("session", "src").set("max_tokens", 100000));
    e.until([](const Value & v) { return v.get_str("type", "") == "token"; });
    e.send(msg("cancel", 9).set("session", "src"));
    const std::vector<Value> cancel         = e.until_type("cancelled", 9);
    bool                     done_cancelled = false;
    for (const Value & v : cancel)
        done_cancelled |= v.get_str("type", "") == "done" && v.at("reason").as_str() == "cancelled";
    EXPECT_TRUE(done_cancelled);

    e.send(msg("close", 10).set("session", "b"));
    e.until_type("closed", 10);
    e.send(msg("stats", 11).set("session", "b"));
    EXPECT_EQ(e.until_type("error", 11).back().at("code").as_str(), "unknown_session");
    e.close_input();  // end of input: the engine exits once idle
    EXPECT_EQ(e.wait_exit(), 0);
}

TEST(Serve, AStateLargerThanAFrameIsSavedAndRestoredInPieces) {
    EngineProcess e;
    e.next();
    e.send(open_msg(1, "big", "full", 128).set("chunk_size", 0));
    Value tokens = Value::array();
    for (int i = 0; i < 3000; ++i) tokens.push(100 + (i * 37) % 4000);  // FullKV state ≈ 69 MB > one 64 MiB frame
    e.send(msg("append", 2).set("session", "big").set("tokens", tokens));
    e.until_type("appended", 2);
    std::string state;
    uint64_t    total = 1, id = 10;
    while (state.size() < total) {
        e.send(msg("save", id).set("session", "big").set("offset", state.size()));
        const Value saved = e.until_type("saved", id++).back();
        EXPECT_EQ(saved.at("offset").as_uint(), state.size());
        total = saved.at("total").as_uint();
        state += saved.at("state").as_bin();
    }
    EXPECT_GT(total, (uint64_t) max_frame_bytes()) << "the state needed more than one frame";
    EXPECT_GE(id, 12u);
    // restore in pieces of 40 MB; a piece out of order is refused and resets the transfer
    e.send(msg("restore", 20)
               .set("session", "copy")
               .set("state", Value::bin(state.substr(0, 1000)))
               .set("offset", 5)
               .set("total", state.size()));
    EXPECT_EQ(e.until_type("error", 20).back().at("code").as_str(), "invalid");
    const size_t piece = 40u << 20;
    for (size_t at = 0, i = 0; at < state.size(); at += piece, ++i) {
        e.send(msg("restore", 21 + i)
                   .set("session", "copy")
                   .set("state", Value::bin(state.substr(at, piece)))
                   .set("offset", at)
                   .set("total", state.size()));
        EXPECT_EQ(e.until_type("restored", 21 + i).back().at("received").as_uint(), std::min(state.size(), at + piece));
    }
    auto generate = [&](uint64_t gid, const char * s) {
        e.send(msg("generate", gid).set("session", s).set("max_tokens", 6));
        return e.until_type("done", gid).back().at("text").as_str();
    };
    EXPECT_EQ(generate(30, "big"), generate(31, "copy"));  // same bytes, same kernels: exact
    e.send(msg("stats", 32).set("session", "big"));
    // 3000 prompt tokens + 6 generated, the last of which enters the cache with the next request
    EXPECT_EQ(e.until_type("stats_result", 32).back().at("tokens_seen").as_uint(), 3005u)
        << "the engine and the session live on";
}

}  // namespace
}  // namespace pkv::test
