#pragma once
namespace pkv {
// `pkv-engine bench`: prefill and decode speed of the engine (FullKV and compressed), optionally
// beside llama.cpp's llama-bench built from the same source, measured in the same run.
int cmd_bench(int argc, char ** argv);
}  // namespace pkv
