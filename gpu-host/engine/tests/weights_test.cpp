// Where the weights live (model.cpp: each in the first buffer type that runs the op it feeds) and
// the op check every graph passes before it runs (backend_check.cpp). Whether a repacked layout
// computes what libllama's computes is reference_test's business; here: the placement itself, and
// one line instead of an abort for an op the backend lacks.
#include "backend_check.h"
#include "error.h"
#include "ggml-cpu.h"
#include "huge_pages.h"
#include "test_util.h"

namespace pkv::test {
namespace {

std::string random_q4_0(const std::string & name, const std::string & flags = "") {
    return make_random_gguf("weights_" + name, "--arch llama --preset tiny --type q4_0 --seed 7 " + flags);
}

std::unique_ptr<Engine> cpu_engine(const std::string & path, bool repack) {
    EngineOptions o;
    o.model_path     = path;
    o.device         = "cpu";
    o.n_threads      = 1;
    o.repack_weights = repack;
    return std::make_unique<Engine>(o);
}

ggml_backend_buffer_type_t buft_of(const ggml_tensor * t) { return ggml_backend_buffer_get_type(t->buffer); }

// The buffer type the loader's rule picks for a fresh tensor of `t`'s type and shape.
ggml_backend_buffer_type_t expected_buft(const Engine & e, const ggml_tensor * t, WeightUse use, bool repack) {
    ggml_init_params           ip{ ggml_tensor_overhead(), nullptr, true };
    ggml_context *             ctx   = ggml_init(ip);
    ggml_tensor *              fresh = ggml_dup_tensor(ctx, t);
    ggml_backend_buffer_type_t b =
        choose_weight_buffer_type(e.backend(), weight_buffer_types(e.backend(), repack), fresh, use, e.config());
    ggml_free(ctx);
    return b;
}

TEST(Weights, Q4_0MatmulWeightsGoToTheCpusRepackingTypeAndGetRowsStaysPlain) {
    const std::string          path  = random_q4_0("tied", "--tied");
    auto                       e     = cpu_engine(path, true);
    const Model &              m     = e->model();
    ggml_backend_buffer_type_t plain = ggml_backend_cpu_buffer_type();
    ASSERT_EQ(weight_buffer_types(e->backend(), true).back(), plain);
    // get_rows reads rows in ggml's block layout: no extra buffer type takes it.
    EXPECT_EQ(buft_of(m.token_embd), plain);
    EXPECT_EQ(buft_of(m.output_norm), plain);
    for (const LayerWeights & l : m.layers) {
        EXPECT_EQ(buft_of(l.attn_norm), plain);
        EXPECT_EQ(buft_of(l.ffn_norm), plain);
        for (const ggml_tensor * w : l.matmul_weights())
            EXPECT_EQ(buft_of(w), expected_buft(*e, w, WeightUse::matmul, true)) << w->name;
    }
    EXPECT_EQ(buft_of(m.output), expected_buft(*e, m.token_embd, WeightUse::matmul, true));
    if (ggml_cpu_has_avx2()) {
        // Every x86-64 CPU the suite runs on has AVX2, where ggml repacks Q4_0 for its 8x8
        // kernels (or AMX takes it first): the matmul weights and the tied output must move.
        const ggml_tensor * first = m.layers[0].matmul_weights().front();
        EXPECT_NE(buft_of(first), plain) << ggml_backend_buft_name(buft_of(first));
        EXPECT_NE(m.output, m.token_embd) << "the tied output must be a copy in the matmul layout";
        EXPECT_NE(buft_of(m.output), plain);
        EXPECT_GE(m.weight_buffers().size(), 2u);
    }
    // Placed weights decode: the logits of a few tokens are finite.
    Session s(*e, CompressionParams{ "full" });
    s.prefill({ 100, 200, 300, 400 });
    s.decode(argmax(s.logits()));
    for (float x : s.logits()) ASSERT_TRUE(std::isfinite(x));
}

TEST(Weights, NoRepackKeepsEveryWeightInThePlainBuffer) {
    const std::string path = random_q4_0("tied_plain", "--tied");
    auto              e    = cpu_engine(path, false);
    const Model &     m    = e->model();
    ASSERT_EQ(weight_buffer_types(e->backend(), false).size(), 1u);
    ASSERT_EQ(m.weight_buffers().size(), 1u);
    EXPECT_EQ(m.weight_buffers()[0].first, "CPU");
    EXPECT_EQ(m.output, m.token_embd) << "tied output shares token_embd when both are plain";
    for (const LayerWeights & l : m.layers)
        for (const ggml_tensor * w : l.matmul_weights()) EXPECT_EQ(buft_of(w), ggml_backend_cpu_buffer_type());
}

// On Intel CPUs with AMX ggml's CPU lists an `AMX` extra buffer type first, and the embedded
// model's Q4_1 projections go there, as libllama's do. Its kernels must run: built by GCC 12
// without the -fno-dse that CMakeLists.txt gives ggml's amx/mmq.cpp, the first matmul faulted
// (SIGSEGV in ldtilecfg; every test on the model, and llama-bench, died). The prompt spans several
// of AMX's 32-row tile blocks and a short tail; then single-token steps (its VNNI path). Whether
// the numbers are libllama's is reference_test's business (both sides hand the weights to AMX,
// and FullKV matches bit for bit); AMX and the plain layout round differently (docs/ENGINE.md "AMX").
TEST(Weights, OnAnAmxCpuQ4_1ProjectionsGoToAmxAndMultiply) {
    auto                e     = cpu_engine(embedded_model(), true);
    const Model &       m     = e->model();
    const ggml_tensor * first = m.layers[0].matmul_weights().front();
    if (std::string(ggml_backend_buft_name(buft_of(first))) != "AMX")
        GTEST_SKIP() << "no AMX on this CPU (" << ggml_backend_buft_name(buft_of(first)) << ")";
    for (const LayerWeights & l : m.layers)
        for (const ggml_tensor * w : l.matmul_weights()) EXPECT_STREQ(ggml_backend_buft_name(buft_of(w)), "AMX");
    std::vector<int32_t> prompt;
    for (int i = 0; i < 100; ++i) prompt.push_back(1000 + 37 * i);
    Session s(*e, CompressionParams{ "full" });
    s.prefill(prompt);
    for (int step = 0; step < 4; ++step) {
        for (float x : s.logits()) ASSERT_TRUE(std::isfinite(x)) << "step " << step;
        s.decode(argmax(s.logits()));
    }
    EXPECT_EQ(s.tokens().size(), prompt.size() + 4);
}

// A graph of one node: `w` [64, 8] times `x` [64, 4].
struct OneMatmul {
    ggml_context * ctx = nullptr;
    ggml_cgraph *  gf  = nullptr;
    OneMatmul(ggml_type w_type, ggml_type x_type, int n = 4) {
        ggml_init_params ip{ ggml_tensor_overhead() * 8 + ggml_graph_overhead(), nullptr, true };
        ctx             = ggml_init(ip);
        ggml_tensor * w = ggml_new_tensor_2d(ctx, w_type, 64, 8);
        ggml_tensor * x = ggml_new_tensor_2d(ctx, x_type, 64, n);
        gf              = ggml_new_graph(ctx);
        ggml_build_forward_expand(gf, ggml_mul_mat(ctx, w, x));
    }
    ~OneMatmul() { ggml_free(ctx); }
};

TEST(OpCheck, AnOpTheCpuLacksIsOneLineNamingTheOpAndTheBackend) {
    ggml_backend_t cpu = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    ASSERT_NE(cpu, nullptr);
    // The CPU multiplies Q4_0 by f32 (or by its Q8_0 vec_dot type), never by f16.
    OneMatmul bad(GGML_TYPE_Q4_0, GGML_TYPE_F16);
    ASSERT_FALSE(ggml_backend_supports_op(cpu, ggml_graph_node(bad.gf, 0)));
    OpCheck check;
    try {
        check.check(cpu, bad.gf);
        ADD_FAILURE() << "no error";
    } catch (const Error & e) {
        const std::string msg = e.what();
        EXPECT_EQ(e.param, "--device");
        EXPECT_NE(msg.find("MUL_MAT"), std::string::npos) << msg;
        EXPECT_NE(msg.find("CPU cannot run"), std::string::npos) << msg;
        EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
    EXPECT_EQ(check.shapes_checked(), 0u) << "a refused shape is not remembered as checked";
    OneMatmul good(GGML_TYPE_Q4_0, GGML_TYPE_F32);
    EXPECT_NO_THROW(check.check(cpu, good.gf));
    ggml_backend_free(cpu);
}

TEST(OpCheck, EachShapeIsAskedOnceWhateverItsLengths) {
    ggml_backend_t cpu   = ggml_backend_init_by_type(GGML_BACKEND_DEVICE_TYPE_CPU, nullptr);
    int            asked = 0;
    OpCheck        check;
    check.set_supports([&](ggml_backend_t b, const ggml_tensor * t) {
        ++asked;
        return ggml_backend_supports_op(b, t);
    });
    OneMatmul a(GGML_TYPE_Q4_0, GGML_TYPE_F32, 4), longer(GGML_TYPE_Q4_0, GGML_TYPE_F32, 77);
    OneMatmul other(GGML_TYPE_Q8_0, GGML_TYPE_F32, 4);
    check.check(cpu, a.gf);
    EXPECT_EQ(asked, 1);
    check.check(cpu, a.gf);
    check.check(cpu, longer.gf);  // same ops and types, another length: the same shape
    EXPECT_EQ(asked, 1);
    EXPECT_EQ(OpCheck::shape_of(a.gf), OpCheck::shape_of(longer.gf));
    EXPECT_NE(OpCheck::shape_of(a.gf), OpCheck::shape_of(other.gf));
    check.check(cpu, other.gf);
    EXPECT_EQ(asked, 2);
    EXPECT_EQ(check.shapes_checked(), 2u);
    ggml_backend_free(cpu);
}

// Through the engine: a backend that lacks flash attention (a narrowed check standing in for
// one) refuses the prefill with one line instead of aborting, and decode steps of one shape are
// checked once.
TEST(OpCheck, TheEngineRefusesAGraphItsBackendCannotRun) {
    auto e     = cpu_engine(random_q4_0("opcheck"), true);
    int  asked = 0;
    e->op_check().set_supports([&](ggml_backend_t b, const ggml_tensor * t) {
        ++asked;
        return ggml_backend_supports_op(b, t);
    });
    Session s(*e, CompressionParams{ "full" });
    s.prefill({ 100, 200, 300 });
    s.decode(argmax(s.logits()));
    const int after_first_step = asked;
    EXPECT_GT(after_first_step, 0);
    for (int i = 0; i < 5; ++i) s.decode(argmax(s.logits()));
    EXPECT_EQ(asked, after_first_step) << "decode steps of one shape are checked once";

    e->op_check().set_supports([](ggml_backend_t b, const ggml_tensor * t) {
        return t->op != GGML_OP_FLASH_ATTN_EXT && ggml_backend_supports_op(b, t);
    });
    Session other(*e, CompressionParams{ "full" });
    try {
        other.prefill({ 100, 200, 300 });
        ADD_FAILURE() << "no error";
    } catch (const Error & err) {
        const std::string msg = err.what();
        EXPECT_NE(msg.find("CPU cannot run FLASH_ATTN_EXT"), std::string::npos) << msg;
        EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
    }
}

// --- Transparent huge pages (huge_pages.cpp) ---------------------------------------------------

// The kernel's THP mode: "always", "madvise" or "never" ("" without THP).
std::string thp_mode() {
    std::ifstream f("/sys/kernel/mm/transparent_hugepage/enabled");
    std::string   line;
    std::getline(f, line);
    const size_t a = line.find('['), b = line.find(']');
    return a == std::string::npos || b == std::string::npos ? "" : line.substr(a + 1, b - a - 1);
}

// smaps' THPeligible of the mapping that holds `p`: 1 when the kernel may back it with huge pages
// (in madvise mode: only where MADV_HUGEPAGE was asked), -1 when the address is in no mapping.
int thp_eligible(const void * p) {
    std::ifstream   f("/proc/self/smaps");
    const uintptr_t a  = (uintptr_t) p;
    bool            in = false;
    for (std::string line; std::getline(f, line);) {
        uintptr_t lo = 0, hi = 0;
        if (std::sscanf(line.c_str(), "%lx-%lx ", &lo, &hi) == 2 && line.find(':') > line.find('-')) {
            in = a >= lo && a < hi;
        } else if (in && line.rfind("THPeligible:", 0) == 0) {
            return std::atoi(line.c_str() + 12);
        }
    }
    return -1;
}

// In "always" mode every anonymous mapping is eligible, advised or not: only "madvise" can show
// that the engine asked. PKV_HUGE_PAGES set by the caller would decide for the test.
bool can_see_advice(std::string & why) {
    const std::string mode = thp_mode();
    if (std::getenv("PKV_HUGE_PAGES")) why = "PKV_HUGE_PAGES is set";
    else if (mode != "madvise") why = "THP mode '" + mode + "' (only madvise shows the advice)";
    return why.empty();
}

// The middle of a tensor's buffer, when the buffer holds a whole 2 MiB page there.
const char * middle_of_buffer(const ggml_tensor * t) {
    const size_t bytes = ggml_backend_buffer_get_size(t->buffer);
    if (bytes < (size_t(6) << 20)) return nullptr;
    return static_cast<const char *>(ggml_backend_buffer_get_base(t->buffer)) + bytes / 2;
}

TEST(HugePages, TheWeightsAndTheKvPoolAreAdvisedBeforeTheyAreWritten) {
    std::string why;
    if (!can_see_advice(why)) GTEST_SKIP() << why;
    // The embedded model (98 MB, plain buffer on most CPUs, AMX on some) and a Q4_0 one whose
    // projections go to the repacking buffer type: every weight buffer of either, whatever type.
    const std::string models[] = { embedded_model(), random_q4_0("huge", "--ff 4096 --embd 1024") };
    for (const std::string & path : models) {
        SCOPED_TRACE(path);
        EngineOptions o;
        o.model_path    = path;
        o.device        = "cpu";
        o.n_threads     = 1;
        o.kv_pool_bytes = size_t(64) << 20;
        Engine        e(o);
        const Model & m       = e.model();
        int           checked = 0;
        for (const ggml_tensor * t : { m.token_embd, m.output, m.layers[m.layers.size() / 2].matmul_weights().front(),
                                       m.layers[m.layers.size() / 2].ffn_down, m.output_norm }) {
            const char * mid = middle_of_buffer(t);
            if (!mid) continue;  // a buffer too small to hold a huge page
            EXPECT_EQ(thp_eligible(mid), 1) << t->name << " in " << ggml_backend_buffer_name(t->buffer);
            ++checked;
        }
        EXPECT_GT(checked, 0);
        const char * pool = static_cast<const char *>(e.pool().k()->data);
        EXPECT_EQ(thp_eligible(pool + e.pool().capacity_bytes() / 2), 1);
    }
}

TEST(HugePages, AHostBufferIsAdvisedOnItsAlignedInteriorAndPkvHugePages0TurnsItOff) {
    std::string why;
    if (!can_see_advice(why)) GTEST_SKIP() << why;
    const size_t          bytes = size_t(16) << 20;
    ggml_backend_buffer_t b     = ggml_backend_buft_alloc_buffer(ggml_backend_cpu_buffer_type(), bytes);
    ASSERT_NE(b, nullptr);
    const size_t advised = advise_huge_pages(b);
    // At least the 2 MiB-aligned pages inside the buffer, never more than the buffer.
    EXPECT_GE(advised, bytes - (size_t(4) << 20));
    EXPECT_LE(advised, bytes);
    const char * mid = static_cast<const char *>(ggml_backend_buffer_get_base(b)) + bytes / 2;
    EXPECT_EQ(thp_eligible(mid), 1);
    ggml_backend_buffer_free(b);

    setenv("PKV_HUGE_PAGES", "0", 1);
    ggml_backend_buffer_t off = ggml_backend_buft_alloc_buffer(ggml_backend_cpu_buffer_type(), bytes);
    EXPECT_EQ(advise_huge_pages(off), 0u);
    ggml_backend_buffer_free(off);
    unsetenv("PKV_HUGE_PAGES");  // it was not set (can_see_advice)
}

}  // namespace
}  // namespace pkv::test
