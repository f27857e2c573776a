#include "paths.h"

#include <unistd.h>
#include <cstdlib>
#include <fstream>

namespace pkv {

std::string default_model_path() {
    static const char * kRelative = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (const char * env = std::getenv("PKV_MODEL"); env && *env) return env;
    char          exe[4096];
    const ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n > 0) {
        std::string dir(exe, n);
        // walk up from the binary (gpu-host/engine/build/pkv-engine) to the first dir holding models/
        for (int up = 0; up < 6; ++up) {
            dir = dir.substr(0, dir.find_last_of('/'));
            if (dir.empty()) break;
            const std::string candidate = dir + "/" + kRelative;
            if (std::ifstream(candidate).good()) return candidate;
        }
    }
    return kRelative;
}

}  // namespace pkv
