#include "backend_check.h"

#include <cstring>
#include <string>

#include "error.h"
#include "profile.h"

namespace pkv {

namespace {

// FNV-1a over 64-bit words (a word at a time: a decode step hashes every node).
struct Hash {
    uint64_t h = 1469598103934665603ull;
    void     word(uint64_t w) { h = (h ^ w) * 1099511628211ull; }
};

// Ops that only describe memory: every backend runs them, and their parameters (a view's offset
// into a session's pages) change from step to step.
bool describes_memory(ggml_op op) {
    return op == GGML_OP_NONE || op == GGML_OP_VIEW || op == GGML_OP_RESHAPE || op == GGML_OP_PERMUTE ||
           op == GGML_OP_TRANSPOSE;
}

std::string describe(const ggml_tensor * node) {
    std::string s = std::string(ggml_op_desc(node)) + " (";
    if (node->name[0]) s += "'" + std::string(node->name) + "', ";
    s += ggml_type_name(node->type);
    for (int i = 0; i < GGML_MAX_SRC && node->src[i]; ++i) {
        s += std::string(i == 0 ? " from " : ", ") + ggml_type_name(node->src[i]->type);
        if (node->src[i]->buffer) s += std::string(" in ") + ggml_backend_buffer_name(node->src[i]->buffer);
    }
    return s + ")";
}

}  // namespace

uint64_t OpCheck::shape_of(const ggml_cgraph * gf) {
    Hash          h;
    ggml_cgraph * g = const_cast<ggml_cgraph *>(gf);  // ggml's accessors take a non-const graph
    const int     n = ggml_graph_n_nodes(g);
    h.word((uint64_t) n);
    for (int i = 0; i < n; ++i) {
        const ggml_tensor * t = ggml_graph_node(g, i);
        h.word((uint64_t) t->op << 32 | (uint32_t) t->type);
        if (describes_memory(t->op)) continue;
        uint64_t params[GGML_MAX_OP_PARAMS / 8];
        std::memcpy(params, t->op_params, sizeof(params));
        for (uint64_t w : params) h.word(w);
        for (int s = 0; s < GGML_MAX_SRC && t->src[s]; ++s) {
            const ggml_tensor * src = t->src[s];
            h.word((uint64_t) src->type);
            h.word((uint64_t) (uintptr_t) (src->buffer ? ggml_backend_buffer_get_type(src->buffer) : nullptr));
        }
    }
    return h.h;
}

void OpCheck::set_supports(Supports s) {
    supports_ = std::move(s);
    checked_.clear();
}

void OpCheck::check(ggml_backend_t backend, const ggml_cgraph * gf) {
    profile::Scope scope(profile::Phase::check);
    const uint64_t shape = shape_of(gf);
    if (checked_.count(shape)) return;
    ggml_cgraph * g = const_cast<ggml_cgraph *>(gf);
    for (int i = 0; i < ggml_graph_n_nodes(g); ++i) {
        const ggml_tensor * node = ggml_graph_node(g, i);
        if (describes_memory(node->op)) continue;
        const bool ok = supports_ ? supports_(backend, node) : ggml_backend_supports_op(backend, node);
        if (!ok) {
            throw Error("--device", std::string(ggml_backend_name(backend)) + " cannot run " + describe(node) +
                                        "; the engine runs every op of a graph on one backend");
        }
    }
    checked_.insert(shape);
}

}  // namespace pkv
