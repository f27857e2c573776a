#include "msgpack.h"

#include <algorithm>
#include <cstring>

namespace pkv::mp {

const char * type_name(Type t) {
    switch (t) {
        case Type::Nil: return "nil";
        case Type::Bool: return "bool";
        case Type::Int: return "int";
        case Type::UInt: return "uint";
        case Type::Float: return "float";
        case Type::Str: return "str";
        case Type::Bin: return "bin";
        case Type::Array: return "array";
        case Type::Map: return "map";
    }
    return "?";
}

// ---- Value -----------------------------------------------------------------------------------

Value Value::bin(std::string bytes) { return Value(Bin{ std::move(bytes) }); }

// The first key that occurs twice, or nullptr. Sorting views keeps this O(n log n) even for a
// hostile map of millions of keys.
static const std::string * duplicate_key(const Value::Map & m) {
    std::vector<const std::string *> keys;
    keys.reserve(m.size());
    for (const auto & kv : m) keys.push_back(&kv.first);
    auto less = [](const std::string * a, const std::string * b) { return *a < *b; };
    std::sort(keys.begin(), keys.end(), less);
    auto dup = std::adjacent_find(keys.begin(), keys.end(),
                                  [](const std::string * a, const std::string * b) { return *a == *b; });
    return dup == keys.end() ? nullptr : *dup;
}

Value Value::map(Map entries) {
    if (const std::string * dup = duplicate_key(entries)) throw Error("msgpack", "duplicate map key '" + *dup + "'");
    return Value(std::move(entries));
}

Value & Value::set(std::string key, Value v) {
    Map * m = std::get_if<Map>(&v_);
    if (!m) type_error("set", "map");
    for (auto & kv : *m) {
        if (kv.first == key) {
            kv.second = std::move(v);
            return *this;
        }
    }
    m->emplace_back(std::move(key), std::move(v));
    return *this;
}

Value & Value::push(Value v) {
    Array * a = std::get_if<Array>(&v_);
    if (!a) type_error("push", "array");
    a->push_back(std::move(v));
    return *this;
}

void Value::type_error(const char * what, const char * wanted) const {
    throw Error(what, std::string("must be ") + wanted + ", got " + type_name());
}

bool Value::as_bool(const char * what) const {
    if (auto * b = std::get_if<bool>(&v_)) return *b;
    type_error(what, "bool");
}

uint64_t Value::as_uint(const char * what) const {
    if (auto * u = std::get_if<uint64_t>(&v_)) return *u;
    type_error(what, "uint");
}

int64_t Value::as_int(const char * what) const {
    if (auto * i = std::get_if<int64_t>(&v_)) return *i;
    if (auto * u = std::get_if<uint64_t>(&v_)) {
        if (*u <= (uint64_t) INT64_MAX) return (int64_t) *u;
        throw Error(what, "must be an int64, got " + std::to_string(*u));
    }
    type_error(what, "int");
}

double Value::as_double(const char * what) const {
    if (auto * f = std::get_if<double>(&v_)) return *f;
    if (auto * i = std::get_if<int64_t>(&v_)) return (double) *i;
    if (auto * u = std::get_if<uint64_t>(&v_)) return (double) *u;
    type_error(what, "float");
}

const std::string & Value::as_str(const char * what) const {
    if (auto * s = std::get_if<std::string>(&v_)) return *s;
    type_error(what, "str");
}

const std::string & Value::as_bin(const char * what) const {
    if (auto * b = std::get_if<Bin>(&v_)) return b->bytes;
    type_error(what, "bin");
}

const Value::Array & Value::as_array(const char * what) const {
    if (auto * a = std::get_if<Array>(&v_)) return *a;
    type_error(what, "array");
}

const Value::Map & Value::as_map(const char * what) const {
    if (auto * m = std::get_if<Map>(&v_)) return *m;
    type_error(what, "map");
}

const Value * Value::find(std::string_view key) const {
    const Map * m = std::get_if<Map>(&v_);
    if (!m) return nullptr;
    for (const auto & kv : *m) {
        if (kv.first == key) return &kv.second;
    }
    return nullptr;
}

const Value & Value::at(std::string_view key) const {
    if (const Value * v = find(key)) return *v;
    throw Error(std::string(key), "missing field");
}

// The getters name the field in their errors, hence the std::string(key).c_str().
uint64_t Value::get_uint(std::string_view key, uint64_t def) const {
    const Value * v = find(key);
    return v ? v->as_uint(std::string(key).c_str()) : def;
}

int64_t Value::get_int(std::string_view key, int64_t def) const {
    const Value * v = find(key);
    return v ? v->as_int(std::string(key).c_str()) : def;
}

double Value::get_double(std::string_view key, double def) const {
    const Value * v = find(key);
    return v ? v->as_double(std::string(key).c_str()) : def;
}

bool Value::get_bool(std::string_view key, bool def) const {
    const Value * v = find(key);
    return v ? v->as_bool(std::string(key).c_str()) : def;
}

std::string Value::get_str(std::string_view key, const std::string & def) const {
    const Value * v = find(key);
    return v ? v->as_str(std::string(key).c_str()) : def;
}

size_t Value::size() const {
    switch (type()) {
        case Type::Str: return std::get<std::string>(v_).size();
        case Type::Bin: return std::get<Bin>(v_).bytes.size();
        case Type::Array: return std::get<Array>(v_).size();
        case Type::Map: return std::get<Map>(v_).size();
        default: return 0;
    }
}

bool Value::operator==(const Value & o) const { return v_ == o.v_; }

// ---- encode ----------------------------------------------------------------------------------

static void put_be(std::string & out, uint64_t v, int bytes) {
    for (int i = bytes - 1; i >= 0; --i) out += (char) ((v >> (8 * i)) & 0xff);
}

// A header for str/bin/array/map: the fix form when there is one, then the 8/16/32-bit forms.
// fix_max is the largest length the fix form holds (31 for str, 15 for array/map, none for bin).
static void put_len(std::string & out, size_t n, int fix_base, size_t fix_max, int op8, int op16, int op32) {
    if (fix_base >= 0 && n <= fix_max) {
        out += (char) (fix_base | (int) n);
    } else if (op8 >= 0 && n <= 0xff) {
        out += (char) op8;
        put_be(out, n, 1);
    } else if (n <= 0xffff) {
        out += (char) op16;
        put_be(out, n, 2);
    } else if ((uint64_t) n <= 0xffffffffULL) {
        out += (char) op32;
        put_be(out, n, 4);
    } else {
        throw Error("msgpack", "length " + std::to_string(n) + " exceeds the format's 2^32-1");
    }
}

void encode_to(std::string & out, const Value & v) {
    switch (v.type()) {
        case Type::Nil: out += (char) 0xc0; break;
        case Type::Bool: out += (char) (v.as_bool() ? 0xc3 : 0xc2); break;
        case Type::UInt: {
            uint64_t u = v.as_uint();
            if (u <= 0x7f) out += (char) u;
            else if (u <= 0xff) {
                out += (char) 0xcc;
                put_be(out, u, 1);
            } else if (u <= 0xffff) {
                out += (char) 0xcd;
                put_be(out, u, 2);
            } else if (u <= 0xffffffffULL) {
                out += (char) 0xce;
                put_be(out, u, 4);
            } else {
                out += (char) 0xcf;
                put_be(out, u, 8);
            }
            break;
        }
        case Type::Int: {  // always negative (see Type)
            int64_t i = v.as_int();
            if (i >= -32) out += (char) (uint8_t) i;  // negative fixint 0xe0..0xff
            else if (i >= INT8_MIN) {
                out += (char) 0xd0;
                put_be(out, (uint64_t) i, 1);
            } else if (i >= INT16_MIN) {
                out += (char) 0xd1;
                put_be(out, (uint64_t) i, 2);
            } else if (i >= INT32_MIN) {
                out += (char) 0xd2;
                put_be(out, (uint64_t) i, 4);
            } else {
                out += (char) 0xd3;
                put_be(out, (uint64_t) i, 8);
            }
            break;
        }
        case Type::Float: {
            double   d = v.as_double();
            uint64_t bits;
            std::memcpy(&bits, &d, 8);
            out += (char) 0xcb;
            put_be(out, bits, 8);
            break;
        }
        case Type::Str: {
            const std::string & s = v.as_str();
            put_len(out, s.size(), 0xa0, 31, 0xd9, 0xda, 0xdb);
            out += s;
            break;
        }
        case Type::Bin: {
            const std::string & b = v.as_bin();
            put_len(out, b.size(), -1, 0, 0xc4, 0xc5, 0xc6);
            out += b;
            break;
        }
        case Type::Array: {
            const Value::Array & a = v.as_array();
            put_len(out, a.size(), 0x90, 15, -1, 0xdc, 0xdd);
            for (const Value & x : a) encode_to(out, x);
            break;
        }
        case Type::Map: {
            const Value::Map & m = v.as_map();
            put_len(out, m.size(), 0x80, 15, -1, 0xde, 0xdf);
            for (const auto & kv : m) {
                put_len(out, kv.first.size(), 0xa0, 31, 0xd9, 0xda, 0xdb);
                out += kv.first;
                encode_to(out, kv.second);
            }
            break;
        }
    }
}

std::string encode(const Value & v) {
    std::string out;
    encode_to(out, v);
    return out;
}

// ---- decode ----------------------------------------------------------------------------------

class Decoder {
  public:
    Decoder(const uint8_t * p, size_t n, size_t max_values)
        : p_(p), end_(p + n), max_values_(max_values), values_left_(max_values) {}

    Value value(int depth) {
        if (values_left_ == 0) fail("more than " + std::to_string(max_values_) + " values");
        --values_left_;
        const uint8_t op = byte();
        if (op <= 0x7f) return Value((uint64_t) op);
        if (op >= 0xe0) return Value((int64_t) (int8_t) op);
        if ((op & 0xf0) == 0x80) return map(op & 0x0f, depth);
        if ((op & 0xf0) == 0x90) return array(op & 0x0f, depth);
        if ((op & 0xe0) == 0xa0) return Value(str(op & 0x1f));
        switch (op) {
            case 0xc0: return Value();
            case 0xc2: return Value(false);
            case 0xc3: return Value(true);
            case 0xc4: return Value::bin(str(be(1)));
            case 0xc5: return Value::bin(str(be(2)));
            case 0xc6: return Value::bin(str(be(4)));
            case 0xca: {
                uint32_t bits = (uint32_t) be(4);
                float    f;
                std::memcpy(&f, &bits, 4);
                return Value((double) f);
            }
            case 0xcb: {
                uint64_t bits = be(8);
                double   d;
                std::memcpy(&d, &bits, 8);
                return Value(d);
            }
            case 0xcc: return Value(be(1));
            case 0xcd: return Value(be(2));
            case 0xce: return Value(be(4));
            case 0xcf: return Value(be(8));
            case 0xd0: return Value((int64_t) (int8_t) be(1));
            case 0xd1: return Value((int64_t) (int16_t) be(2));
            case 0xd2: return Value((int64_t) (int32_t) be(4));
            case 0xd3: return Value((int64_t) be(8));
            case 0xd9: return Value(str(be(1)));
            case 0xda: return Value(str(be(2)));
            case 0xdb: return Value(str(be(4)));
            case 0xdc: return array(be(2), depth);
            case 0xdd: return array(be(4), depth);
            case 0xde: return map(be(2), depth);
            case 0xdf: return map(be(4), depth);
            case 0xc7:
            case 0xc8:
            case 0xc9:  // ext 8/16/32
            case 0xd4:
            case 0xd5:
            case 0xd6:
            case 0xd7:
            case 0xd8:  // fixext 1..16
                fail("ext types are not accepted");
            default:  // 0xc1 is never used
                fail("invalid byte 0x" + hex(op));
        }
    }

    bool              at_end() const { return p_ == end_; }
    size_t            left() const { return (size_t) (end_ - p_); }
    [[noreturn]] void fail(const std::string & msg) const { throw Error("msgpack", msg); }

  private:
    static std::string hex(uint8_t b) {
        const char * d = "0123456789abcdef";
        return { d[b >> 4], d[b & 15] };
    }

    uint8_t byte() {
        if (p_ == end_) fail("truncated input");
        return *p_++;
    }

    uint64_t be(int bytes) {
        if (left() < (size_t) bytes) fail("truncated input");
        uint64_t v = 0;
        for (int i = 0; i < bytes; ++i) v = (v << 8) | *p_++;
        return v;
    }

    std::string str(uint64_t n) {
        if (n > left())
            fail("declared length " + std::to_string(n) + " exceeds the " + std::to_string(left()) + " bytes left");
        std::string s((const char *) p_, (size_t) n);
        p_ += n;
        return s;
    }

    // Each element takes at least one byte (a map entry two), so a count larger than that is a
    // lie we can refuse at once, as is a count over the value budget.
    void check_count(uint64_t n, size_t values_each, int depth) {
        if (depth >= kMaxDepth) fail("nesting deeper than " + std::to_string(kMaxDepth));
        if (n > left() / values_each)
            fail("declared " + std::to_string(n) + " elements exceed the " + std::to_string(left()) + " bytes left");
        if (n > values_left_ / values_each) fail("more than " + std::to_string(max_values_) + " values");
    }

    // Reserve at most kReserve up front: 64 nested containers each declaring millions of elements
    // would otherwise allocate gigabytes before their first element is read. Beyond that, memory
    // grows with the elements really decoded.
    static constexpr uint64_t kReserve = 4096;

    Value array(uint64_t n, int depth) {
        check_count(n, 1, depth);
        Value::Array a;
        a.reserve((size_t) std::min(n, kReserve));
        for (uint64_t i = 0; i < n; ++i) a.push_back(value(depth + 1));
        return Value(std::move(a));
    }

    Value map(uint64_t n, int depth) {
        check_count(n, 2, depth);
        Value::Map m;
        m.reserve((size_t) std::min(n, kReserve));
        for (uint64_t i = 0; i < n; ++i) {
            Value key = value(depth + 1);
            if (!key.is_str()) fail(std::string("map keys must be str, got ") + key.type_name());
            Value val = value(depth + 1);
            m.emplace_back(std::move(std::get<std::string>(key.v_)), std::move(val));
        }
        // Duplicate keys would be read differently by different decoders (first or last wins).
        return Value::map(std::move(m));
    }

    const uint8_t * p_;
    const uint8_t * end_;
    size_t          max_values_;
    size_t          values_left_;
};

Value decode(const uint8_t * data, size_t size, size_t max_values) {
    Decoder d(data, size, max_values);
    Value   v = d.value(0);
    if (!d.at_end()) d.fail(std::to_string(d.left()) + " trailing bytes after the value");
    return v;
}

}  // namespace pkv::mp
