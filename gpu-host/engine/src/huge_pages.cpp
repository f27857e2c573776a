#include "huge_pages.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace pkv {

size_t advise_huge_pages(ggml_backend_buffer_t buffer) {
    // Host buffers (ggml's plain CPU type has no device) and the CPU's extra buffer types
    // (repacked, AMX), which do not say is_host but are host memory. A GPU's host-pinned buffers
    // say is_host too; advising their pages is harmless.
    if (!buffer) return 0;
    ggml_backend_dev_t dev       = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(buffer));
    const bool         cpu_extra = dev && ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU;
    if (!ggml_backend_buffer_is_host(buffer) && !cpu_extra) return 0;
    if (const char * env = std::getenv("PKV_HUGE_PAGES"); env && std::strcmp(env, "0") == 0) return 0;
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    constexpr uintptr_t kHuge = uintptr_t(2) << 20;
    const uintptr_t     base  = (uintptr_t) ggml_backend_buffer_get_base(buffer);
    const uintptr_t     lo    = (base + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t     hi    = (base + ggml_backend_buffer_get_size(buffer)) & ~(kHuge - 1);
    if (hi <= lo) return 0;
    // A hint: EINVAL (a kernel without THP) or anything else leaves 4 KiB pages, which still work.
    return madvise((void *) lo, hi - lo, MADV_HUGEPAGE) == 0 ? (size_t) (hi - lo) : 0;
#else
    return 0;
#endif
}

}  // namespace pkv
