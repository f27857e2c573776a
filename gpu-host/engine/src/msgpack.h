// A small msgpack value type for the engine's stdio frames (docs/PROTOCOL.md).
// Written for untrusted input: decode() checks every declared length against the bytes that are
// really there before allocating, bounds nesting, and reports everything as a pkv::Error.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <variant>
#include <vector>

#include "error.h"

namespace pkv::mp {

// An integer is held as UInt when it is >= 0 and as Int only when it is negative, whatever wire
// format carried it, so "is this a uint" has one answer (the protocol's "uint" type).
enum class Type { Nil, Bool, Int, UInt, Float, Str, Bin, Array, Map };

const char * type_name(Type t);  // "nil", "bool", "int", "uint", "float", "str", "bin", "array", "map"

constexpr int kMaxDepth = 64;  // containers nested deeper than this are refused by decode()
// A decoded value costs ~40 bytes of memory for as little as 1 byte of input, so a 64 MiB frame of
// fixints would need 2.7 GB; decode() refuses frames holding more values than this (a 4M-token
// array is still far beyond any context length).
constexpr size_t kMaxValues = size_t(1) << 22;

class Value {
  public:
    using Array = std::vector<Value>;
    using Map   = std::vector<std::pair<std::string, Value>>;  // insertion order, unique keys

    Value() = default;
    Value(std::nullptr_t) {}
    Value(bool b) : v_(b) {}
    template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0> Value(T v) {
        if constexpr (std::is_signed_v<T>) {
            if (v < 0) {
                v_ = (int64_t) v;
                return;
            }
        }
        v_ = (uint64_t) v;
    }
    Value(double d) : v_(d) {}
    Value(float d) : v_((double) d) {}
    Value(const char * s) : v_(std::string(s)) {}
    Value(std::string s) : v_(std::move(s)) {}
    Value(std::string_view s) : v_(std::string(s)) {}
    Value(Array a) : v_(std::move(a)) {}

    // Builders: bin and map cannot be told apart from str and array by a constructor argument.
    static Value bin(std::string bytes);
    static Value bin(const void * data, size_t n) { return bin(std::string((const char *) data, n)); }
    static Value map() { return Value(Map{}); }
    static Value map(Map entries);  // throws pkv::Error on a duplicate key; O(n log n), unlike n set()s
    static Value array() { return Value(Array{}); }
    template <typename T> static Value array_of(const std::vector<T> & items) {
        Array a;
        a.reserve(items.size());
        for (const T & x : items) a.emplace_back(x);
        return Value(std::move(a));
    }

    // Map building, chainable: Value::map().set("type", "token").set("id", id)
    // A key already present is replaced in place.
    Value & set(std::string key, Value v);
    Value & push(Value v);  // array append

    Type         type() const { return Type(v_.index()); }
    const char * type_name() const { return mp::type_name(type()); }
    bool         is_nil() const { return type() == Type::Nil; }
    bool         is_int() const { return type() == Type::Int || type() == Type::UInt; }
    bool         is_uint() const { return type() == Type::UInt; }
    bool         is_number() const { return is_int() || type() == Type::Float; }
    bool         is_str() const { return type() == Type::Str; }
    bool         is_bin() const { return type() == Type::Bin; }
    bool         is_map() const { return type() == Type::Map; }
    bool         is_array() const { return type() == Type::Array; }

    // Typed access; a wrong type throws pkv::Error naming `what` (a field name, if you have one).
    bool                as_bool(const char * what = "value") const;
    uint64_t            as_uint(const char * what = "value") const;
    int64_t             as_int(const char * what = "value") const;     // any integer within int64
    double              as_double(const char * what = "value") const;  // integers too
    const std::string & as_str(const char * what = "value") const;
    const std::string & as_bin(const char * what = "value") const;
    const Array &       as_array(const char * what = "value") const;
    const Map &         as_map(const char * what = "value") const;

    // Map lookups. find() returns nullptr when absent (or when this is not a map).
    const Value * find(std::string_view key) const;
    const Value & at(std::string_view key) const;  // throws pkv::Error(key, "missing field")
    bool          has(std::string_view key) const { return find(key) != nullptr; }
    // Optional fields with defaults; present with a wrong type throws pkv::Error(key, ...).
    uint64_t    get_uint(std::string_view key, uint64_t def) const;
    int64_t     get_int(std::string_view key, int64_t def) const;
    double      get_double(std::string_view key, double def) const;
    bool        get_bool(std::string_view key, bool def) const;
    std::string get_str(std::string_view key, const std::string & def) const;

    size_t size() const;  // elements of an array, entries of a map, bytes of a str/bin; 0 otherwise

    bool operator==(const Value & o) const;
    bool operator!=(const Value & o) const { return !(*this == o); }

  private:
    struct Bin {
        std::string bytes;
        bool        operator==(const Bin & o) const { return bytes == o.bytes; }
    };
    explicit Value(Map m) : v_(std::move(m)) {}
    explicit Value(Bin b) : v_(std::move(b)) {}
    [[noreturn]] void type_error(const char * what, const char * wanted) const;

    // Alternatives in the order of Type, so index() is the Type.
    std::variant<std::monostate, bool, int64_t, uint64_t, double, std::string, Bin, Array, Map> v_;

    friend class Decoder;
};

std::string encode(const Value & v);
void        encode_to(std::string & out, const Value & v);

// Throws pkv::Error("msgpack", ...) on malformed, truncated or over-deep input, trailing bytes,
// ext types, non-string or duplicate map keys, or more than max_values values.
Value        decode(const uint8_t * data, size_t size, size_t max_values = kMaxValues);
inline Value decode(std::string_view bytes) { return decode((const uint8_t *) bytes.data(), bytes.size()); }

}  // namespace pkv::mp
