// A minimal JSON writer for the CLI's --json outputs (objects, arrays, numbers, strings).
#pragma once

#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

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

}  // namespace pkv::json
