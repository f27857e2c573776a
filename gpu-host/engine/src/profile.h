// Where a step's host time goes (pkv-engine bench --profile): a few phases of the forward pass and
// of compression, timed only while enabled (otherwise a scope costs one branch). Times are
// exclusive: a phase nested in another (compute inside a compression) is not counted twice.
#pragma once

#include <array>
#include <chrono>
#include <cstddef>

namespace pkv::profile {

enum class Phase {
    build,     // building the graph (Engine::build_forward)
    check,     // the op check's shape hash (and, once per shape, supports_op)
    allocate,  // ggml_gallocr: compute buffers for the graph
    inputs,    // filling the graph's inputs on the host and copying them to the backend
    compute,   // ggml_backend_graph_compute (every graph: forward passes and compaction gathers)
    read,      // copying logits and scores back from the backend
    compress,  // host side of compression: pooling, top-k, the gather's row lists
    count
};
constexpr int kPhases = (int) Phase::count;
const char *  name(Phase p);

struct Totals {
    std::array<double, kPhases> seconds{};
    size_t                      read_bytes = 0;  // bytes copied from the backend to the host
    Totals                      operator-(const Totals & o) const;
};

void   enable(bool on);
bool   enabled();
Totals totals();
void   add_read_bytes(size_t n);

class Scope {
  public:
    explicit Scope(Phase p);
    ~Scope();
    Scope(const Scope &)             = delete;
    Scope & operator=(const Scope &) = delete;

  private:
    Phase                                 phase_;
    bool                                  on_;
    Scope *                               outer_ = nullptr;
    std::chrono::steady_clock::time_point since_;
};

}  // namespace pkv::profile
