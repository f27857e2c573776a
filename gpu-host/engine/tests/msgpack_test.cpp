// msgpack: encodings checked byte for byte against the msgpack spec, round trips at every format
// boundary, and hostile inputs that must end in a pkv::Error, never a crash or a huge allocation.
#include "msgpack.h"
#include "test_util.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <vector>

using pkv::mp::Type;
using pkv::mp::Value;

namespace {

using pkv::test::hex;

std::string unhex(const std::string & h) {
    std::string out;
    for (size_t i = 0; i < h.size();) {
        if (h[i] == ' ') {
            ++i;
            continue;
        }
        out += (char) std::stoi(h.substr(i, 2), nullptr, 16);
        i += 2;
    }
    return out;
}

Value round_trip(const Value & v) { return pkv::mp::decode(pkv::mp::encode(v)); }

void expect_rejected(const std::string & bytes, const char * why) {
    EXPECT_THROW(pkv::mp::decode(bytes), pkv::Error) << why << ": " << hex(bytes.substr(0, 16));
}

}  // namespace

TEST(Msgpack, KnownEncodingsMatchTheSpec) {
    const std::vector<std::pair<Value, std::string>> cases = {
        { Value::map().set("a", 1), "81 a1 61 01" },
        { Value(), "c0" },
        { Value(false), "c2" },
        { Value(true), "c3" },
        { Value(0), "00" },
        { Value(127), "7f" },
        { Value(128), "cc 80" },
        { Value(255), "cc ff" },
        { Value(256), "cd 01 00" },
        { Value(65535), "cd ff ff" },
        { Value(65536), "ce 00 01 00 00" },
        { Value(4294967295u), "ce ff ff ff ff" },
        { Value(uint64_t(1) << 32), "cf 00 00 00 01 00 00 00 00" },
        { Value(std::numeric_limits<uint64_t>::max()), "cf ff ff ff ff ff ff ff ff" },
        { Value(-1), "ff" },
        { Value(-32), "e0" },
        { Value(-33), "d0 df" },
        { Value(-128), "d0 80" },
        { Value(-129), "d1 ff 7f" },
        { Value(-32768), "d1 80 00" },
        { Value(-32769), "d2 ff ff 7f ff" },
        { Value(int64_t(INT32_MIN)), "d2 80 00 00 00" },
        { Value(int64_t(INT32_MIN) - 1), "d3 ff ff ff ff 7f ff ff ff" },
        { Value(std::numeric_limits<int64_t>::min()), "d3 80 00 00 00 00 00 00 00" },
        { Value(1.5), "cb 3f f8 00 00 00 00 00 00" },
        { Value(""), "a0" },
        { Value("hi"), "a2 68 69" },
        { Value::bin("\x01\x02", 2), "c4 02 01 02" },
        { Value::array_of(std::vector<int>{ 1, 2 }), "92 01 02" },
        { Value::map(), "80" },
        // One realistic frame payload; shared/test/protocol.test.ts expects the same bytes from msgpackr.
        { Value::map()
              .set("type", "open")
              .set("id", 7)
              .set("session", "s1")
              .set("method", "pyramidkv")
              .set("budget", 128),
          "85 a4 74 79 70 65 a4 6f 70 65 6e a2 69 64 07 a7 73 65 73 73 69 6f 6e a2 73 31 a6 6d 65 74 68 6f 64 "
          "a9 70 79 72 61 6d 69 64 6b 76 a6 62 75 64 67 65 74 cc 80" },
    };
    for (const auto & [value, expected] : cases) {
        EXPECT_EQ(hex(pkv::mp::encode(value)), expected);
        EXPECT_EQ(pkv::mp::decode(unhex(expected)), value) << expected;
    }
}

TEST(Msgpack, IntegersRoundTripAtEveryFormatBoundary) {
    const std::vector<uint64_t> uints = {
        0, 1, 127, 128, 255, 256, 65535, 65536, 4294967295ull, 4294967296ull, std::numeric_limits<uint64_t>::max()
    };
    for (uint64_t u : uints) EXPECT_EQ(round_trip(Value(u)).as_uint(), u);
    const std::vector<int64_t> ints = {
        -1, -32, -33, -128, -129, -32768, -32769, INT32_MIN, int64_t(INT32_MIN) - 1, std::numeric_limits<int64_t>::min()
    };
    for (int64_t i : ints) {
        Value back = round_trip(Value(i));
        EXPECT_EQ(back.type(), Type::Int);
        EXPECT_EQ(back.as_int(), i);
    }
}

TEST(Msgpack, NonNegativeIntegersDecodeAsUintWhateverTheWireFormat) {
    for (const char * h : { "05", "cc 05", "cd 00 05", "ce 00 00 00 05", "cf 00 00 00 00 00 00 00 05", "d0 05",
                            "d1 00 05", "d2 00 00 00 05", "d3 00 00 00 00 00 00 00 05" }) {
        Value v = pkv::mp::decode(unhex(h));
        EXPECT_EQ(v.type(), Type::UInt) << h;
        EXPECT_EQ(v.as_uint(), 5u) << h;
    }
    EXPECT_EQ(pkv::mp::decode(unhex("d3 ff ff ff ff ff ff ff ff")).as_int(), -1);
}

TEST(Msgpack, FloatsDecodeAsDouble) {
    EXPECT_EQ(pkv::mp::decode(unhex("ca 3f c0 00 00")).as_double(), 1.5);  // float32
    EXPECT_EQ(pkv::mp::decode(unhex("ca 3f c0 00 00")).type(), Type::Float);
    for (double d : { 0.0, -0.0, 0.1, -2.5e300, std::numeric_limits<double>::infinity(), 1e-310 }) {
        EXPECT_EQ(round_trip(Value(d)).as_double(), d);
    }
    EXPECT_TRUE(std::isnan(round_trip(Value(std::nan(""))).as_double()));
}

TEST(Msgpack, StringsAndBinsRoundTripAtEveryLengthBoundary) {
    // length → the header byte the spec prescribes for str and for bin
    const std::vector<std::tuple<size_t, uint8_t, uint8_t>> cases = {
        { 0, 0xa0, 0xc4 },   { 31, 0xbf, 0xc4 },    { 32, 0xd9, 0xc4 },    { 255, 0xd9, 0xc4 },
        { 256, 0xda, 0xc5 }, { 65535, 0xda, 0xc5 }, { 65536, 0xdb, 0xc6 },
    };
    for (const auto & [n, str_op, bin_op] : cases) {
        std::string s(n, 'x');
        for (size_t i = 0; i < n; ++i) s[i] = (char) ('a' + i % 26);
        std::string enc = pkv::mp::encode(Value(s));
        EXPECT_EQ((uint8_t) enc[0], str_op) << n;
        EXPECT_EQ(pkv::mp::decode(enc).as_str(), s);

        std::string bytes(n, '\0');
        for (size_t i = 0; i < n; ++i) bytes[i] = (char) (i * 7);
        enc = pkv::mp::encode(Value::bin(bytes));
        EXPECT_EQ((uint8_t) enc[0], bin_op) << n;
        EXPECT_EQ(pkv::mp::decode(enc).as_bin(), bytes);
    }
}

TEST(Msgpack, ArraysAndMapsRoundTripAtEveryCountBoundary) {
    const std::vector<std::tuple<size_t, uint8_t, uint8_t>> cases = {
        { 0, 0x90, 0x80 }, { 15, 0x9f, 0x8f }, { 16, 0xdc, 0xde }, { 65535, 0xdc, 0xde }, { 65536, 0xdd, 0xdf },
    };
    for (const auto & [n, array_op, map_op] : cases) {
        Value      a = Value::array();
        Value::Map entries;
        for (size_t i = 0; i < n; ++i) {
            a.push(Value(i));
            entries.emplace_back("k" + std::to_string(i), Value(i));
        }
        const Value m   = Value::map(std::move(entries));
        std::string enc = pkv::mp::encode(a);
        EXPECT_EQ((uint8_t) enc[0], array_op) << n;
        EXPECT_EQ(pkv::mp::decode(enc), a);

        enc = pkv::mp::encode(m);
        EXPECT_EQ((uint8_t) enc[0], map_op) << n;
        Value back = pkv::mp::decode(enc);
        ASSERT_EQ(back.size(), n);
        EXPECT_EQ(back, m);  // insertion order kept
        if (n) {
            EXPECT_EQ(back.as_map().back().first, "k" + std::to_string(n - 1));
        }
    }
}

TEST(Msgpack, NestedValuesRoundTrip) {
    Value v = Value::map()
                  .set("nil", nullptr)
                  .set("list", Value::array().push(true).push(-7).push(2.25).push("x").push(Value::bin("\0\1", 2)))
                  .set("inner", Value::map().set("deep", Value::array().push(Value::map())));
    EXPECT_EQ(round_trip(v), v);
}

TEST(Msgpack, AccessorsAndDefaults) {
    Value v = Value::map().set("n", 5).set("s", "text").set("neg", -3).set("f", 0.5).set("b", true);
    EXPECT_EQ(v.get_uint("n", 0), 5u);
    EXPECT_EQ(v.get_uint("absent", 9), 9u);
    EXPECT_EQ(v.get_int("neg", 0), -3);
    EXPECT_EQ(v.get_int("n", 0), 5);
    EXPECT_EQ(v.get_double("n", 0), 5.0);  // integers are numbers too
    EXPECT_EQ(v.get_double("f", 0), 0.5);
    EXPECT_EQ(v.get_str("s", ""), "text");
    EXPECT_TRUE(v.get_bool("b", false));
    EXPECT_EQ(v.at("s").as_str(), "text");
    try {
        v.get_uint("s", 0);
        FAIL() << "expected pkv::Error";
    } catch (const pkv::Error & e) {
        EXPECT_EQ(e.param, "s");
        EXPECT_STREQ(e.what(), "s: must be uint, got str");
    }
    EXPECT_THROW(v.at("absent"), pkv::Error);
    EXPECT_THROW(Value::map({ { "a", 1 }, { "b", 2 }, { "a", 3 } }), pkv::Error);
    EXPECT_THROW(v.get_uint("neg", 0), pkv::Error);
    EXPECT_THROW(Value(std::numeric_limits<uint64_t>::max()).as_int(), pkv::Error);
    v.set("n", 6);  // replaces in place
    EXPECT_EQ(v.size(), 5u);
    EXPECT_EQ(v.get_uint("n", 0), 6u);
    EXPECT_EQ(v.as_map().front().first, "n");
}

TEST(Msgpack, TruncationAtEveryByteThrows) {
    Value             v   = Value::map()
                                .set("type", "open")
                                .set("tokens", Value::array_of(std::vector<uint32_t>{ 1, 300, 70000, 4000000000u }))
                                .set("f", 1.25)
                                .set("neg", -40000)
                                .set("bin", Value::bin(std::string(300, 'z')))
                                .set("long", std::string(40, 'q'));
    const std::string enc = pkv::mp::encode(v);
    ASSERT_EQ(pkv::mp::decode(enc), v);
    for (size_t n = 0; n < enc.size(); ++n) expect_rejected(enc.substr(0, n), "truncated");
}

TEST(Msgpack, LengthsLargerThanTheInputAreRefusedBeforeAllocating) {
    expect_rejected(unhex("db ff ff ff ff") + "hello", "str32");
    expect_rejected(unhex("c6 ff ff ff ff") + "hello", "bin32");
    expect_rejected(unhex("dd ff ff ff ff 01 02 03 04 05"), "array32");
    expect_rejected(unhex("df ff ff ff ff 01 02 03 04 05"), "map32");
    expect_rejected(unhex("dc ff ff 01"), "array16");
    expect_rejected(unhex("de 00 02 a1 61 01"), "map16 with one entry of two");
}

TEST(Msgpack, NestingIsBounded) {
    auto nested = [](int depth) { return std::string(depth, (char) 0x91) + std::string(1, (char) 0xc0); };
    EXPECT_NO_THROW(pkv::mp::decode(nested(pkv::mp::kMaxDepth)));
    expect_rejected(nested(pkv::mp::kMaxDepth + 1), "65 deep");
    expect_rejected(nested(100), "100 deep");
    expect_rejected(std::string(100000, (char) 0x81), "maps 100000 deep");
}

TEST(Msgpack, MalformedInputsThrow) {
    expect_rejected("", "empty");
    expect_rejected(unhex("01 02"), "trailing byte");
    expect_rejected(unhex("81 a1 61 01 ff"), "trailing byte after a map");
    expect_rejected(unhex("c1"), "never-used byte");
    expect_rejected(unhex("d4 01 00"), "fixext 1");
    expect_rejected(unhex("d6 ff 00 00 00 00"), "timestamp ext");
    expect_rejected(unhex("c7 01 05 00"), "ext 8");
    expect_rejected(unhex("c8 00 01 05 00"), "ext 16");
    expect_rejected(unhex("c9 00 00 00 01 05 00"), "ext 32");
    expect_rejected(unhex("81 01 02"), "integer map key");
    expect_rejected(unhex("82 a1 61 01 a1 61 02"), "duplicate map key");
    EXPECT_THROW(pkv::mp::decode((const uint8_t *) "\x93\x01\x02\x03", 4, 3), pkv::Error);  // value budget
    EXPECT_NO_THROW(pkv::mp::decode((const uint8_t *) "\x93\x01\x02\x03", 4, 4));
}

TEST(Msgpack, AMaximalFrameOfTinyValuesIsRefusedCheaply) {
    // 64 MiB of fixints in one array32 would cost ~2.7 GB as Values: refused before reserving.
    std::string bytes = std::string("\xdd\x04\x00\x00\x00", 5) + std::string(64u << 20, '\x01');
    EXPECT_THROW(pkv::mp::decode(bytes), pkv::Error);
    bytes[0] = (char) 0xdf;  // map32 of 32M entries
    bytes[1] = 0x02;
    EXPECT_THROW(pkv::mp::decode(bytes), pkv::Error);
    // 64 nested arrays, each declaring 1M elements: nothing is allocated for the declared counts.
    std::string nested;
    for (int i = 0; i < pkv::mp::kMaxDepth; ++i) nested += std::string("\xdd\x00\x0f\xff\xff", 5);
    nested += std::string(64u << 20, '\xc0');
    EXPECT_THROW(pkv::mp::decode(nested), pkv::Error);
}

TEST(Msgpack, RandomAndMutatedInputsNeverCrash) {
    std::mt19937      rng(42);
    const std::string valid   = pkv::mp::encode(Value::map()
                                                    .set("type", "append")
                                                    .set("id", 3)
                                                    .set("tokens", Value::array_of(std::vector<int>{ 1, 2, 300 }))
                                                    .set("text", "hello"));
    size_t            decoded = 0;
    for (int iter = 0; iter < 20000; ++iter) {
        std::string bytes;
        if (iter % 2) {
            bytes = valid;
            for (int k = 0; k < 3; ++k) bytes[rng() % bytes.size()] = (char) rng();
        } else {
            bytes.resize(rng() % 24);
            for (char & c : bytes) c = (char) rng();
        }
        try {
            pkv::mp::decode(bytes);
            ++decoded;
        } catch (const pkv::Error &) {}
    }
    EXPECT_GT(decoded, 0u);  // the mutations are not all fatal: both paths were exercised
}
