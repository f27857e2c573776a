#pragma once
#include <string>
namespace pkv {
// The embedded model: $PKV_MODEL, else models/SmolLM2-135M-Instruct.Q4_1.gguf at the repository
// root (found from the executable's location), else the same path under the working directory.
std::string default_model_path();
}  // namespace pkv
