// Transparent huge pages for the big host buffers that every step streams through: the weights
// (a decode step reads all of them once) and the KV pool (its attention reads each session's
// entries). With 4 KiB pages a 4 GiB model spans a million pages, and every few KiB of a
// matrix-vector product costs a TLB miss and stops the hardware prefetcher at a page edge; 2 MiB
// pages remove both (docs/BENCHMARKS.md "Weights layout": decode measured with and without).
#pragma once

#include <cstddef>

#include "ggml-backend.h"

namespace pkv {

// Asks the kernel to back `buffer` with transparent huge pages (madvise MADV_HUGEPAGE on its
// 2 MiB-aligned interior). Call it before the buffer is first written: the pages are chosen when
// they are first touched. Does nothing for a buffer of another device than the CPU, where the kernel has THP off or
// without madvise, or when PKV_HUGE_PAGES=0 (the before/after of the benchmark). Returns the
// bytes advised (0: none).
size_t advise_huge_pages(ggml_backend_buffer_t buffer);

}  // namespace pkv
