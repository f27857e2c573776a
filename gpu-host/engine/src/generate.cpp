#include "generate.h"

#include <chrono>

namespace pkv {

GenerationResult generate(Session & session, const std::vector<int32_t> & prompt, int max_new,
                          const SamplerOptions & so, const std::function<void(const std::string &)> & on_piece) {
    using clock = std::chrono::steady_clock;
    GenerationResult r;
    Sampler          sampler(so, session.engine().model().vocab());
    const Model &    model = session.engine().model();
    session.prefill(prompt);
    const SessionStats after_prefill = session.stats();
    r.prompt_kv_lengths              = after_prefill.layer_kv_lengths;
    r.prompt_kv_bytes                = after_prefill.kv_bytes;
    r.prompt_full_kv_bytes           = after_prefill.full_kv_bytes;
    r.prefill_seconds                = session.prefill_seconds();
    if (max_new <= 0) return r;
    session.reserve(max_new);

    double  decode_seconds = 0.0;
    int     decode_steps   = 0;
    int32_t token          = sampler.sample(session.logits());
    while (true) {
        if (model.is_end_of_turn(token)) break;
        r.tokens.push_back(token);
        const std::string piece = model.token_to_piece(token);
        r.text += piece;
        on_piece(piece);
        if ((int) r.tokens.size() >= max_new) break;
        const auto t0 = clock::now();
        session.decode(token);
        decode_seconds += std::chrono::duration<double>(clock::now() - t0).count();
        ++decode_steps;
        token = sampler.sample(session.logits());
    }
    r.new_tokens               = (int) r.tokens.size();
    r.decode_tokens_per_second = decode_steps > 0 ? decode_steps / decode_seconds : 0.0;
    return r;
}

}  // namespace pkv
