// A minimal JSON writer for the CLI's --json outputs (objects, arrays, numbers, strings, and
// msgpack values as the protocol carries them).
#pragma once

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "error.h"
#include "msgpack.h"

namespace pkv::json {

inline std::string quote(const std::string & s) {
    std::string out = "\"";
    for (unsigned char ch : s) {
        switch (ch) {
            case '"': out += "\\\""; break;
            case '\\': out += "\\\\"; break;
            case '\n': out += "\\n"; break;
            case '\r': out += "\\r"; break;
            case '\t': out += "\\t"; break;
            default:
                if (ch < 0x20) {
                    char buf[8];
                    std::snprintf(buf, sizeof(buf), "\\u%04x", ch);
                    out += buf;
                } else {
                    out += (char) ch;
                }
        }
    }
    return out + "\"";
}

inline std::string number(double v) {
    if (!std::isfinite(v)) return "null";
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.6g", v);
    return buf;
}

template <typename T> std::string array(const std::vector<T> & values) {
    std::string out = "[";
    for (size_t i = 0; i < values.size(); ++i) {
        if (i) out += ", ";
        if constexpr (std::is_same_v<T, std::string>) out += values[i];  // pre-encoded elements
        else out += std::to_string(values[i]);
    }
    return out + "]";
}

// Builds {"k": v, ...} in insertion order from pre-encoded values.
class Object {
  public:
    Object & raw(const std::string & key, const std::string & encoded) {
        body_ += (body_.empty() ? "" : ", ") + quote(key) + ": " + encoded;
        return *this;
    }
    Object &    str(const std::string & key, const std::string & v) { return raw(key, quote(v)); }
    Object &    num(const std::string & key, double v) { return raw(key, number(v)); }
    Object &    integer(const std::string & key, long long v) { return raw(key, std::to_string(v)); }
    std::string dump() const { return "{" + body_ + "}"; }

  private:
    std::string body_;
};

// A msgpack value as JSON (the CLI prints what a protocol frame carries): maps in insertion order;
// bin has no JSON form and is refused.
inline std::string value(const mp::Value & v) {
    switch (v.type()) {
        case mp::Type::Nil: return "null";
        case mp::Type::Bool: return v.as_bool() ? "true" : "false";
        case mp::Type::Int: return std::to_string(v.as_int());
        case mp::Type::UInt: return std::to_string(v.as_uint());
        case mp::Type::Float: return number(v.as_double());
        case mp::Type::Str: return quote(v.as_str());
        case mp::Type::Bin: throw Error("json", "binary data has no JSON form");
        case mp::Type::Array: {
            std::vector<std::string> items;
            for (const mp::Value & x : v.as_array()) items.push_back(value(x));
            return array(items);
        }
        case mp::Type::Map: {
            Object o;
            for (const auto & [k, x] : v.as_map()) o.raw(k, value(x));
            return o.dump();
        }
    }
    return "null";
}

}  // namespace pkv::json
