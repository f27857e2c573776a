// The engine's stdio protocol (pkv-engine serve --stdio). shared/protocol/engine.json is its only
// definition: CMake embeds it into a generated header, it is parsed once at start-up, and every
// frame is checked against it here — the TypeScript side (shared/src/protocol.ts) applies the
// same rules with the same messages to the same file.
//
// Framing: a 4-byte big-endian payload length, then one msgpack map with a string field 'type'.
#pragma once

#include <cstdio>
#include <string>
#include <string_view>
#include <vector>

#include "msgpack.h"

namespace pkv {

// The field types engine.json may use. "uint" is a non-negative integer, "int" any integer,
// "float" any number (integers included), "str[]"/"uint[]"/"map[]" arrays whose every element is
// one (a map's own fields are the message's business, not the spec's).
enum class FieldType { UInt, Int, Float, Str, Bin, Bool, Map, StrArray, UIntArray, MapArray };

struct FieldSpec {
    std::string name;
    std::string type_name;  // as written in engine.json: "uint", "str[]", ...
    FieldType   type     = FieldType::UInt;
    bool        required = false;
};

struct MessageSpec {
    std::string            name;
    std::string            direction;  // "to_engine" or "from_engine"
    std::vector<FieldSpec> fields;     // in engine.json order ('type' is implicit, never listed)
    const FieldSpec *      field(std::string_view name) const;
};

struct ProtocolSpec {
    int                      version         = 0;
    int                      minor           = 0;  // optional fields added since `version` (absent: 0)
    size_t                   max_frame_bytes = 0;
    std::vector<MessageSpec> messages;  // in engine.json order
    const MessageSpec *      message(std::string_view name) const;
};

// The embedded engine.json, parsed on first use. Throws pkv::Error("engine.json", ...) if the file
// the engine was built with is malformed (a build-time mistake, caught by the tests).
const ProtocolSpec & protocol_spec();
int                  protocol_version();
int                  protocol_minor();
size_t               max_frame_bytes();

// Exposed for tests: the parser behind protocol_spec(), and the tiny JSON reader it uses (JSON
// objects become maps in file order, integers uint/int, other numbers float).
ProtocolSpec parse_protocol_spec(std::string_view json);
mp::Value    parse_json(std::string_view text);

// "" when the frame is valid, else one line naming the message type and the field, e.g.
// "open: missing required field 'session'", "open: field 'budget' must be uint, got str",
// "open: unknown field 'budgte'", "unknown message type 'foo'". direction ("to_engine" or
// "from_engine") is checked too unless nullptr. Checks run in a fixed order (the TypeScript
// validator's order): map → 'type' → known type → direction → the spec's fields in file order
// (missing, then wrong type) → unknown fields (the smallest such key in byte order, so the
// answer does not depend on the map's wire order).
std::string validate_frame(const mp::Value & v, const char * direction);

// Reads one frame's payload. Returns false with `error` empty at a clean end of input (before the
// first byte of a frame). Returns false with `error` set (and `code`, if given, set to the error
// frame code "too_large" or "bad_frame") when a declared length exceeds max_frame_bytes — the
// payload is then neither read nor allocated — or the input ends inside a frame. After such an
// error the next frame's start is unknown (the stream cannot be resynchronised): the server should
// send one error frame and stop reading.
bool read_frame(FILE * in, std::string & payload, std::string & error, std::string * code = nullptr);

// The 4-byte length + msgpack bytes of a frame. Throws pkv::Error("frame", ...) beyond
// max_frame_bytes, which the other side would refuse.
std::string encode_frame(const mp::Value & v);

// Writes and flushes one frame. Thread-safe (one mutex for every writer), so decode threads and
// the request loop can answer on the same stdout without interleaving bytes. Throws pkv::Error
// ("frame", ...) if the frame is too large (nothing written) and pkv::Error("stdout", ...) if the
// write fails (the supervisor has gone).
void write_frame(FILE * out, const mp::Value & v);

}  // namespace pkv
