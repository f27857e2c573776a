// Every op of a graph runs on the one backend it is computed on. The engine hands each graph to
// one backend without a scheduler (nothing could move an op elsewhere), and a backend given an op
// it lacks aborts the process; checking ggml_backend_supports_op for every node first turns that
// into one line naming the op and the backend (docs/ENGINE.md "Backends").
#pragma once

#include <cstdint>
#include <functional>
#include <unordered_set>

#include "ggml-backend.h"
#include "ggml.h"

namespace pkv {

class OpCheck {
  public:
    // What the backend can run; by default ggml_backend_supports_op. Tests narrow it.
    using Supports = std::function<bool(ggml_backend_t, const ggml_tensor *)>;

    // Throws pkv::Error("--device", "<backend> cannot run <OP> ...") for the first node of `gf`
    // that `backend` cannot run. A graph of a shape checked before is not asked about again, so
    // a decode step costs one pass over its nodes to compute the shape, no supports_op call.
    void check(ggml_backend_t backend, const ggml_cgraph * gf);

    void   set_supports(Supports s);  // forgets the shapes checked so far
    size_t shapes_checked() const { return checked_.size(); }

    // The graph's shape: every node's op, op parameters, type, and its sources' types and buffer
    // types, in order — what a backend's support depends on in the engine's graphs. Lengths (keys
    // stored, tokens, sessions) are left out: they change every step, and no backend's support for
    // these ops depends on them; head sizes and the model's types are fixed for an engine.
    static uint64_t shape_of(const ggml_cgraph * gf);

  private:
    Supports                     supports_;
    std::unordered_set<uint64_t> checked_;
};

}  // namespace pkv
