// One error type for everything a user can get wrong: it names the parameter so the CLI (and
// later the stdio server) can answer with one line instead of a stack trace or an abort.
#pragma once

#include <stdexcept>
#include <string>

namespace pkv {

struct Error : std::runtime_error {
    std::string param;  // "--budget", "--model", "prompt", ...
    Error(std::string param_, const std::string & message)
        : std::runtime_error(param_.empty() ? message : param_ + ": " + message), param(std::move(param_)) {}
};

}  // namespace pkv
