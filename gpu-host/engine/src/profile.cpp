#include "profile.h"

namespace pkv::profile {

namespace {

bool    g_enabled = false;
Totals  g_totals;
Scope * g_current = nullptr;  // the innermost open scope (the host side is one thread)

double since(std::chrono::steady_clock::time_point t, std::chrono::steady_clock::time_point now) {
    return std::chrono::duration<double>(now - t).count();
}

}  // namespace

const char * name(Phase p) {
    static const char * const names[kPhases] = {
        "build", "check", "allocate", "inputs", "compute", "read", "compress"
    };
    return names[(int) p];
}

Totals Totals::operator-(const Totals & o) const {
    Totals d;
    for (int i = 0; i < kPhases; ++i) d.seconds[i] = seconds[i] - o.seconds[i];
    d.read_bytes = read_bytes - o.read_bytes;
    return d;
}

void enable(bool on) { g_enabled = on; }

bool enabled() { return g_enabled; }

Totals totals() { return g_totals; }

void add_read_bytes(size_t n) {
    if (g_enabled) g_totals.read_bytes += n;
}

// An inner scope pauses the outer one: the outer's time so far is booked when the inner opens,
// and its clock restarts when the inner closes.
Scope::Scope(Phase p) : phase_(p), on_(g_enabled) {
    if (!on_) return;
    since_ = std::chrono::steady_clock::now();
    outer_ = g_current;
    if (outer_) {
        g_totals.seconds[(int) outer_->phase_] += since(outer_->since_, since_);
    }
    g_current = this;
}

Scope::~Scope() {
    if (!on_) return;
    const auto now = std::chrono::steady_clock::now();
    g_totals.seconds[(int) phase_] += since(since_, now);
    g_current = outer_;
    if (outer_) outer_->since_ = now;
}

}  // namespace pkv::profile
