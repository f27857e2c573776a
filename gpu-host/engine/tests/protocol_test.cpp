// The stdio protocol: the embedded engine.json loads, every message type accepts a minimal frame
// built from its spec, each kind of mistake is reported with the message type and field (the
// same lines shared/test/protocol.test.ts expects from the TypeScript validator), and frame
// reading refuses oversized and truncated frames.
#include "protocol.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <string>
#include <thread>
#include <vector>

using pkv::mp::Value;

namespace {

// A value of each spec type, as small as it gets.
Value example_of(pkv::FieldType t) {
    switch (t) {
        case pkv::FieldType::UInt: return Value(1);
        case pkv::FieldType::Int: return Value(-1);
        case pkv::FieldType::Float: return Value(0.5);
        case pkv::FieldType::Str: return Value("s");
        case pkv::FieldType::Bin: return Value::bin("\x00\x01", 2);
        case pkv::FieldType::Bool: return Value(true);
        case pkv::FieldType::Map: return Value::map();
        case pkv::FieldType::StrArray: return Value::array().push("a");
        case pkv::FieldType::UIntArray: return Value::array().push(1).push(2);
        case pkv::FieldType::MapArray: return Value::array().push(Value::map().set("k", 1));
    }
    return Value();
}

Value example_frame(const pkv::MessageSpec & m, bool with_optional) {
    Value v = Value::map().set("type", m.name);
    for (const pkv::FieldSpec & f : m.fields) {
        if (f.required || with_optional) v.set(f.name, example_of(f.type));
    }
    return v;
}

Value open_frame() { return Value::map().set("type", "open").set("id", 1).set("session", "s"); }

using pkv::test::hex;

// A FILE* holding `bytes`, positioned at the start.
FILE * file_with(const std::string & bytes) {
    FILE * f = std::tmpfile();
    std::fwrite(bytes.data(), 1, bytes.size(), f);
    std::rewind(f);
    return f;
}

}  // namespace

TEST(Protocol, EmbeddedSpecLoads) {
    const pkv::ProtocolSpec & spec = pkv::protocol_spec();
    EXPECT_EQ(pkv::protocol_version(), 2);
    EXPECT_EQ(pkv::protocol_minor(), 2);
    EXPECT_EQ(pkv::max_frame_bytes(), 64u << 20);
    EXPECT_GE(spec.messages.size(), 20u);
    ASSERT_NE(spec.message("open"), nullptr);
    EXPECT_EQ(spec.message("open")->direction, "to_engine");
    EXPECT_TRUE(spec.message("open")->field("session")->required);
    EXPECT_FALSE(spec.message("open")->field("budget")->required);
    EXPECT_EQ(spec.message("hello")->direction, "from_engine");
    EXPECT_EQ(spec.message("nope"), nullptr);
    for (const pkv::MessageSpec & m : spec.messages) {
        // every request carries an id, echoed by its answers (engine.json's $comment)
        if (m.direction == "to_engine") {
            EXPECT_TRUE(m.field("id") && m.field("id")->required) << m.name;
        }
    }
}

TEST(Protocol, EveryMessageTypeAcceptsAMinimalAndAFullFrame) {
    for (const pkv::MessageSpec & m : pkv::protocol_spec().messages) {
        for (bool with_optional : { false, true }) {
            Value v = example_frame(m, with_optional);
            EXPECT_EQ(pkv::validate_frame(v, m.direction.c_str()), "") << m.name;
            EXPECT_EQ(pkv::validate_frame(v, nullptr), "") << m.name;
            Value back = pkv::mp::decode(pkv::mp::encode(v));  // what the other side receives
            EXPECT_EQ(back, v);
            EXPECT_EQ(pkv::validate_frame(back, m.direction.c_str()), "") << m.name;
        }
    }
}

TEST(Protocol, FloatFieldsAcceptIntegers) {
    Value v =
        Value::map().set("type", "generate").set("id", 1).set("session", "s").set("temperature", 1).set("top_p", -0.0);
    EXPECT_EQ(pkv::validate_frame(v, "to_engine"), "");
}

// The same table is in shared/test/protocol.test.ts: both validators must answer identically.
TEST(Protocol, ErrorsNameTheMessageAndTheField) {
    const std::vector<std::pair<Value, std::string>> cases = {
        { Value::array().push(1), "frame must be a map, got array" },
        { Value::map(), "frame has no 'type' field" },
        { Value::map().set("type", 5), "field 'type' must be str, got uint" },
        { Value::map().set("type", "foo").set("id", 1), "unknown message type 'foo'" },
        { Value::map()
              .set("type", "hello")
              .set("protocol", 1)
              .set("model", "m")
              .set("n_layer", 1)
              .set("n_ctx", 1)
              .set("pool_bytes", 1)
              .set("page_bytes", 1),
          "hello: message goes from_engine, expected to_engine" },
        { Value::map().set("type", "open").set("session", "s"), "open: missing required field 'id'" },
        { Value::map().set("type", "open").set("id", 1), "open: missing required field 'session'" },
        { open_frame().set("budget", "128"), "open: field 'budget' must be uint, got str" },
        { open_frame().set("budget", -1), "open: field 'budget' must be uint, got int" },
        { open_frame().set("budget", 1.5), "open: field 'budget' must be uint, got float" },
        { open_frame().set("keep_scores", 1), "open: field 'keep_scores' must be bool, got uint" },
        { open_frame().set("session", nullptr), "open: field 'session' must be str, got nil" },
        { open_frame().set("budgte", 128), "open: unknown field 'budgte'" },
        { open_frame().set("zz", 1).set("aa", 2), "open: unknown field 'aa'" },
        { open_frame().set("budgte", "x").set("budget", "y"), "open: field 'budget' must be uint, got str" },
        { Value::map()
              .set("type", "generate")
              .set("id", 1)
              .set("session", "s")
              .set("stop", Value::array().push("a").push(2)),
          "generate: field 'stop' must be str[], got array (element 1 is uint)" },
        { Value::map().set("type", "generate").set("id", 1).set("session", "s").set("temperature", "hot"),
          "generate: field 'temperature' must be float, got str" },
        { Value::map()
              .set("type", "append")
              .set("id", 1)
              .set("session", "s")
              .set("tokens", Value::array().push(1).push(-2)),
          "append: field 'tokens' must be uint[], got array (element 1 is int)" },
        { Value::map().set("type", "append").set("id", 1).set("session", "s").set("tokens", "1 2"),
          "append: field 'tokens' must be uint[], got str" },
        { Value::map().set("type", "restore").set("id", 1).set("session", "s").set("state", "abc"),
          "restore: field 'state' must be bin, got str" },
        // untrusted text is kept on one line and cut at 64 characters
        { Value::map().set("type", "x\ny" + std::string(100, 'z')),
          "unknown message type 'x?y" + std::string(61, 'z') + "...'" },
    };
    for (const auto & [frame, expected] : cases) EXPECT_EQ(pkv::validate_frame(frame, "to_engine"), expected);
}

// Frames the engine sends; the same table is in shared/test/protocol.test.ts.
TEST(Protocol, ErrorsInFramesFromTheEngine) {
    auto hello = [] {
        return Value::map()
            .set("type", "hello")
            .set("protocol", 2)
            .set("model", "m")
            .set("n_layer", 1)
            .set("n_ctx", 1)
            .set("pool_bytes", 1)
            .set("page_bytes", 1);
    };
    EXPECT_EQ(pkv::validate_frame(hello(), "from_engine"), "") << "an older engine's hello (minor 0) is valid";
    const std::vector<std::pair<Value, std::string>> cases = {
        { hello().set("methods", Value::array().push(Value::map()).push(1)),
          "hello: field 'methods' must be map[], got array (element 1 is uint)" },
        { hello().set("methods", Value::map()), "hello: field 'methods' must be map[], got map" },
        { hello().set("defaults", Value::array()), "hello: field 'defaults' must be map, got array" },
        { hello().set("protocol_minor", "1"), "hello: field 'protocol_minor' must be uint, got str" },
    };
    for (const auto & [frame, expected] : cases) EXPECT_EQ(pkv::validate_frame(frame, "from_engine"), expected);
}

TEST(Protocol, FrameEncodingIsLengthPrefixed) {
    Value open = Value::map()
                     .set("type", "open")
                     .set("id", 7)
                     .set("session", "s1")
                     .set("method", "pyramidkv")
                     .set("budget", 128);
    // Same bytes as shared/test/protocol.test.ts expects from encodeFrame().
    EXPECT_EQ(hex(pkv::encode_frame(open)),
              "00 00 00 34 85 a4 74 79 70 65 a4 6f 70 65 6e a2 69 64 07 a7 73 65 73 73 69 6f 6e a2 73 31 a6 6d 65 74 "
              "68 6f 64 a9 70 79 72 61 6d 69 64 6b 76 a6 62 75 64 67 65 74 cc 80");
    EXPECT_THROW(pkv::encode_frame(Value::bin(std::string(pkv::max_frame_bytes(), 'x'))), pkv::Error);
}

TEST(Protocol, ReadFrameReadsFramesThenACleanEnd) {
    Value       a = open_frame(), b = Value::map().set("type", "close").set("id", 2).set("session", "s");
    FILE *      f = file_with(pkv::encode_frame(a) + pkv::encode_frame(b));
    std::string payload, error;
    ASSERT_TRUE(pkv::read_frame(f, payload, error));
    EXPECT_EQ(pkv::mp::decode(payload), a);
    ASSERT_TRUE(pkv::read_frame(f, payload, error));
    EXPECT_EQ(pkv::mp::decode(payload), b);
    EXPECT_FALSE(pkv::read_frame(f, payload, error));
    EXPECT_EQ(error, "");  // end of input, not an error
    std::fclose(f);
}

TEST(Protocol, ReadFrameRefusesAnOversizedLengthWithoutReadingIt) {
    const size_t too_big = pkv::max_frame_bytes() + 1;
    std::string  bytes   = { (char) (too_big >> 24), (char) (too_big >> 16), (char) (too_big >> 8), (char) too_big };
    bytes += "payload that must stay unread";
    FILE *      f = file_with(bytes);
    std::string payload, error, code;
    EXPECT_FALSE(pkv::read_frame(f, payload, error, &code));
    EXPECT_EQ(code, "too_large");
    EXPECT_EQ(error, "frame of 67108865 bytes exceeds max_frame_bytes 67108864");
    EXPECT_EQ(std::ftell(f), 4);  // only the header was consumed
    EXPECT_TRUE(payload.empty());
    std::fclose(f);

    f = file_with(std::string("\xff\xff\xff\xff", 4));
    EXPECT_FALSE(pkv::read_frame(f, payload, error, &code));
    EXPECT_EQ(code, "too_large");
    std::fclose(f);
}

TEST(Protocol, ReadFrameRefusesTruncatedFrames) {
    std::string payload, error, code;
    FILE *      f =
        file_with(std::string("\x00\x00\x00\x0a"
                              "abc",
                              7));  // declares 10, holds 3
    EXPECT_FALSE(pkv::read_frame(f, payload, error, &code));
    EXPECT_EQ(code, "bad_frame");
    EXPECT_EQ(error, "input ended inside a frame (3 of 10 bytes)");
    std::fclose(f);

    f = file_with(std::string("\x00\x00", 2));  // half a header
    EXPECT_FALSE(pkv::read_frame(f, payload, error, &code));
    EXPECT_EQ(code, "bad_frame");
    EXPECT_EQ(error, "input ended inside a frame header");
    std::fclose(f);
}

TEST(Protocol, WriteFrameIsThreadSafe) {
    FILE *                   f = std::tmpfile();
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([f, t] {
            for (int i = 0; i < 200; ++i) {
                pkv::write_frame(f, Value::map()
                                        .set("type", "token")
                                        .set("id", t)
                                        .set("session", "s")
                                        .set("token", i)
                                        .set("text", std::string(1 + i % 50, 'a' + t)));
            }
        });
    }
    for (auto & th : threads) th.join();
    std::rewind(f);
    std::string payload, error;
    int         n = 0;
    while (pkv::read_frame(f, payload, error)) {
        Value v = pkv::mp::decode(payload);  // interleaved bytes would not decode
        EXPECT_EQ(pkv::validate_frame(v, "from_engine"), "");
        ++n;
    }
    EXPECT_EQ(error, "");
    EXPECT_EQ(n, 800);
    std::fclose(f);
}

TEST(Protocol, SpecParserRefusesMistakesInEngineJson) {
    auto spec_with = [](const std::string & field) {
        return R"({"version": 1, "max_frame_bytes": 1024, "messages": {"m": {"direction": "to_engine", "fields": {)" +
               field + "}}}}";
    };
    EXPECT_NO_THROW(pkv::parse_protocol_spec(spec_with(R"("a": {"type": "uint[]", "required": true, "doc": "x"})")));
    EXPECT_EQ(pkv::parse_protocol_spec(spec_with(R"("a": {"type": "map[]"})")).messages[0].fields[0].type,
              pkv::FieldType::MapArray);
    EXPECT_EQ(pkv::parse_protocol_spec(spec_with("")).minor, 0) << "no 'minor': 0";
    EXPECT_EQ(pkv::parse_protocol_spec(R"({"version": 2, "minor": 3, "max_frame_bytes": 1024, "messages": {}})").minor,
              3);
    EXPECT_THROW(pkv::parse_protocol_spec(R"({"version": 2, "minor": -1, "max_frame_bytes": 1024, "messages": {}})"),
                 pkv::Error);
    EXPECT_THROW(pkv::parse_protocol_spec(R"({"version": 2, "minr": 1, "max_frame_bytes": 1024, "messages": {}})"),
                 pkv::Error);
    EXPECT_THROW(pkv::parse_protocol_spec(spec_with(R"("a": {"type": "uint64"})")), pkv::Error);
    EXPECT_THROW(pkv::parse_protocol_spec(spec_with(R"("a": {"type": "uint", "requried": true})")), pkv::Error);
    EXPECT_THROW(pkv::parse_protocol_spec(spec_with(R"("type": {"type": "str"})")), pkv::Error);
    EXPECT_THROW(pkv::parse_protocol_spec(spec_with(R"("a": {"type": "uint"}, "a": {"type": "str"})")), pkv::Error);
    EXPECT_THROW(
        pkv::parse_protocol_spec(
            R"({"version": 1, "max_frame_bytes": 1024, "messages": {"m": {"direction": "up", "fields": {}}}})"),
        pkv::Error);
    EXPECT_THROW(pkv::parse_protocol_spec(R"({"version": 1, "messages": {}})"), pkv::Error);
    EXPECT_THROW(pkv::parse_protocol_spec("{"), pkv::Error);
}

TEST(Protocol, JsonReader) {
    Value v = pkv::parse_json(
        R"( {"s": "a\"b\\c\n\u00e9\ud83d\ude00", "n": [0, -12, 3.5, 1e3, true, false, null], "o": {}} )");
    EXPECT_EQ(v.at("s").as_str(), "a\"b\\c\n\xc3\xa9\xf0\x9f\x98\x80");
    const auto & n = v.at("n").as_array();
    ASSERT_EQ(n.size(), 7u);
    EXPECT_EQ(n[0].as_uint(), 0u);
    EXPECT_EQ(n[1].as_int(), -12);
    EXPECT_EQ(n[2].as_double(), 3.5);
    EXPECT_EQ(n[3].as_double(), 1000.0);
    EXPECT_TRUE(n[4].as_bool());
    EXPECT_FALSE(n[5].as_bool());
    EXPECT_TRUE(n[6].is_nil());
    EXPECT_EQ(v.at("o").size(), 0u);
    for (const char * bad : { "", "[1,]", "{\"a\" 1}", "\"abc", "[1] x", "-", "tru", "\"\\x\"", "01x" }) {
        EXPECT_THROW(pkv::parse_json(bad), pkv::Error) << bad;
    }
}
