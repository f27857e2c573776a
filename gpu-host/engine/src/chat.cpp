#include "chat.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <string_view>

#include "error.h"
#include "llama.h"
#include "model.h"

namespace pkv {

namespace {

constexpr size_t npos = std::string::npos;

// A message's content goes through libllama's renderer as a sentinel: an index between bytes no
// template writes, padded on both sides with whitespace no template writes either, so the
// rendering shows where each content lands and whether the template trimmed it (libllama's
// renderers trim some roles' content: Llama 3's all, Mistral v3's assistant turns).
constexpr char kMarkOpen  = '\x01';
constexpr char kMarkClose = '\x02';
const char *   kPad       = "\v\f";

bool is_space(char c) { return std::isspace((unsigned char) c) != 0; }

std::string trim_left(const std::string & s) {
    size_t b = 0;
    while (b < s.size() && is_space(s[b])) ++b;
    return s.substr(b);
}

std::string trim_right(const std::string & s) {
    size_t e = s.size();
    while (e > 0 && is_space(s[e - 1])) --e;
    return s.substr(0, e);
}

std::string joined_roles() {
    std::string out;
    for (const std::string & r : chat_roles()) out += (out.empty() ? "" : ", ") + r;
    return out;
}

// libllama's renderer into a string; -1 when it does not know the template.
int render_with(const std::string & tmpl, const std::vector<llama_chat_message> & msgs, bool add_ass,
                std::string & out) {
    size_t guess = 256;
    for (const llama_chat_message & m : msgs) guess += 2 * std::strlen(m.content) + 64;
    std::vector<char> buf(guess);
    int32_t           n =
        llama_chat_apply_template(tmpl.c_str(), msgs.data(), msgs.size(), add_ass, buf.data(), (int32_t) buf.size());
    if (n > (int32_t) buf.size()) {
        buf.resize(n);
        n = llama_chat_apply_template(tmpl.c_str(), msgs.data(), msgs.size(), add_ass, buf.data(),
                                      (int32_t) buf.size());
    }
    if (n < 0) return -1;
    out.assign(buf.data(), n);
    return 0;
}

uint64_t fnv1a(const std::string & s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}

std::string fingerprint(const std::string & text) {
    char buf[17];
    std::snprintf(buf, sizeof(buf), "%016llx", (unsigned long long) fnv1a(text));
    return buf;
}

}  // namespace

const std::vector<std::string> & chat_roles() {
    static const std::vector<std::string> roles = { "system", "user", "assistant" };
    return roles;
}

std::vector<ChatMessage> chat_messages_from(const mp::Value & messages) {
    std::vector<ChatMessage> out;
    const mp::Value::Array & items = messages.as_array("messages");
    for (size_t i = 0; i < items.size(); ++i) {
        const std::string at = "messages[" + std::to_string(i) + "]";
        if (!items[i].is_map()) {
            throw Error(at, std::string("expected a map {role, content}, got ") + items[i].type_name());
        }
        for (const auto & [key, value] : items[i].as_map()) {
            if (key != "role" && key != "content")
                throw Error(at, "unknown field '" + key + "' (accepted: role, content)");
        }
        ChatMessage m;
        for (const char * field : { "role", "content" }) {
            const mp::Value * v = items[i].find(field);
            if (!v) throw Error(at + "." + field, "missing");
            if (!v->is_str()) throw Error(at + "." + field, std::string("expected a string, got ") + v->type_name());
            (std::string(field) == "role" ? m.role : m.content) = v->as_str();
        }
        out.push_back(std::move(m));
    }
    return out;
}

ChatTemplate::ChatTemplate(const Model & model) : ChatTemplate(model.llama()) {}

ChatTemplate::ChatTemplate(const llama_model * model) : vocab_(llama_model_get_vocab(model)) {
    const char * gguf = llama_model_chat_template(model, nullptr);
    if (gguf != nullptr && *gguf != '\0') {
        source_ = "gguf";
        text_   = gguf;
    } else {
        source_ = "chatml";
        text_   = "chatml";
    }
    std::string              probe;
    const llama_chat_message one{ "user", "x" };
    supported_ = render_with(text_, { one }, true, probe) == 0;

    // The tokens libllama's tokenizer splits out before running the tokenizer model, in its order
    // (the same predicate and the same sort over the same ids as llama-vocab.cpp's cache), so that
    // our fragments are libllama's fragments.
    const int32_t n = llama_vocab_n_tokens(vocab_);
    for (int32_t id = 0; id < n; ++id) {
        if (llama_vocab_get_attr(vocab_, id) &
            (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_USER_DEFINED | LLAMA_TOKEN_ATTR_UNKNOWN)) {
            specials_.push_back(id);
        }
    }
    std::sort(specials_.begin(), specials_.end(), [&](int32_t a, int32_t b) {
        return std::strlen(llama_vocab_get_text(vocab_, a)) > std::strlen(llama_vocab_get_text(vocab_, b));
    });
}

void ChatTemplate::validate(const std::vector<ChatMessage> & messages, size_t first_index) const {
    const auto & roles = chat_roles();
    for (size_t i = 0; i < messages.size(); ++i) {
        const std::string at = "messages[" + std::to_string(first_index + i) + "]";
        if (std::find(roles.begin(), roles.end(), messages[i].role) == roles.end()) {
            throw Error(at + ".role", "'" + messages[i].role +
                                          "' is not a role the engine renders (accepted: " + joined_roles() + ")");
        }
        if (messages[i].content.find('\0') != npos) {
            throw Error(at + ".content", "contains a NUL character");
        }
    }
}

ChatTemplate::Rendered ChatTemplate::render_spans(const std::vector<ChatMessage> & messages,
                                                  bool                             add_generation_prompt) const {
    validate(messages);
    if (!supported_) {
        throw Error("messages",
                    "the model's chat template (GGUF tokenizer.chat_template) is not one libllama's "
                    "renderer knows; send text or tokens instead");
    }
    const std::string               pad = kPad;
    std::vector<std::string>        sentinels;
    std::vector<llama_chat_message> msgs;
    for (size_t i = 0; i < messages.size(); ++i) {
        sentinels.push_back(pad + kMarkOpen + "pkv" + std::to_string(i) + kMarkClose + pad);
    }
    for (size_t i = 0; i < messages.size(); ++i) msgs.push_back({ messages[i].role.c_str(), sentinels[i].c_str() });
    std::string marked;
    if (render_with(text_, msgs, add_generation_prompt, marked) != 0) {
        throw Error("messages", "libllama could not render the chat template");
    }

    const Error unexpected("messages",
                           "the model's chat template changes message content in a way the engine "
                           "cannot tell from its markup; send text or tokens instead");
    Rendered    r;
    r.content.assign(messages.size(), { npos, npos });
    size_t at = 0;
    while (true) {
        const size_t open = marked.find(kMarkOpen, at);
        if (open == npos) {
            r.text.append(marked, at, npos);
            break;
        }
        const size_t close = marked.find(kMarkClose, open);
        if (close == npos || marked.compare(open + 1, 3, "pkv") != 0) throw unexpected;
        size_t i = 0;
        try {
            i = std::stoul(marked.substr(open + 4, close - open - 4));
        } catch (const std::exception &) {
            throw unexpected;
        }
        if (i >= messages.size() || r.content[i].first != npos) throw unexpected;
        // The pads show what the template kept: a whole pad means untouched, none means trimmed.
        const bool   keep_left  = open >= at + pad.size() && marked.compare(open - pad.size(), pad.size(), pad) == 0;
        const bool   keep_right = marked.compare(close + 1, pad.size(), pad) == 0;
        const size_t markup_end = keep_left ? open - pad.size() : open;
        auto         pad_byte   = [&](size_t k) { return k < marked.size() && pad.find(marked[k]) != npos; };
        if ((!keep_left && open > at && pad_byte(open - 1)) || (!keep_right && pad_byte(close + 1))) {
            throw unexpected;  // part of a pad survived: not a trim we can follow
        }
        r.text.append(marked, at, markup_end - at);
        std::string content = messages[i].content;
        if (!keep_left) content = trim_left(content);
        if (!keep_right) content = trim_right(content);
        r.content[i] = { r.text.size(), r.text.size() + content.size() };
        r.text += content;
        at = close + 1 + (keep_right ? pad.size() : 0);
    }

    // The same conversation with its real content must render to exactly the text assembled here.
    std::vector<llama_chat_message> real;
    for (const ChatMessage & m : messages) real.push_back({ m.role.c_str(), m.content.c_str() });
    std::string plain;
    if (render_with(text_, real, add_generation_prompt, plain) != 0 || plain != r.text) throw unexpected;
    return r;
}

std::string ChatTemplate::render(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const {
    return render_spans(messages, add_generation_prompt).text;
}

std::vector<int32_t> ChatTemplate::tokenize(const std::vector<ChatMessage> & messages,
                                            bool                             add_generation_prompt) const {
    return tokenize_from(render_spans(messages, add_generation_prompt), 0);
}

std::vector<ChatTemplate::Fragment> ChatTemplate::fragments(const Rendered & r, size_t from) const {
    const std::string &   text = r.text;
    std::vector<Fragment> frags;
    if (from < text.size()) frags.push_back({ false, -1, from, text.size() });
    // Bytes of content: control tokens may not start or end in them, so content stays plain text.
    std::vector<uint8_t> in_content(text.size() - std::min(from, text.size()), 0);
    for (const auto & [b, e] : r.content) {
        if (b == npos) continue;
        for (size_t k = std::max(b, from); k < e; ++k) in_content[k - from] = 1;
    }
    auto touches_content = [&](size_t b, size_t e) {
        for (size_t k = b; k < e; ++k) {
            if (in_content[k - from]) return true;
        }
        return false;
    };

    // libllama's partition (llama-vocab.cpp, tokenizer_st_partition): for each special token,
    // longest first, split every raw fragment at its occurrences, with the token's lstrip/rstrip.
    for (const int32_t id : specials_) {
        const char * t           = llama_vocab_get_text(vocab_, id);
        const size_t len         = std::strlen(t);
        const auto   attr        = llama_vocab_get_attr(vocab_, id);
        const bool   markup_only = attr & (LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_UNKNOWN);
        if (len == 0) continue;
        std::vector<Fragment> next;
        bool                  split = false;
        for (const Fragment & f : frags) {
            if (f.special) {
                next.push_back(f);
                continue;
            }
            size_t b = f.b, e = f.e, search = f.b;
            while (true) {
                const size_t m = std::string_view(text.data(), e).find(std::string_view(t, len), search);
                if (m == npos) break;
                if (markup_only && touches_content(m, m + len)) {
                    search = m + 1;
                    continue;
                }
                split       = true;
                size_t left = m;
                if (attr & LLAMA_TOKEN_ATTR_LSTRIP) {
                    while (left > b && is_space(text[left - 1])) --left;
                }
                if (left > b) next.push_back({ false, -1, b, left });
                next.push_back({ true, id, m, m + len });
                b = m + len;
                if (attr & LLAMA_TOKEN_ATTR_RSTRIP) {
                    while (b < e && is_space(text[b])) ++b;
                }
                search = b;
            }
            if (b < e) next.push_back({ false, -1, b, e });
        }
        if (split) frags = std::move(next);
    }
    return frags;
}

std::vector<int32_t> ChatTemplate::tokenize_from(const Rendered & r, size_t from) const {
    std::vector<int32_t> out;
    if (from == 0 && !r.text.empty() && llama_vocab_get_add_bos(vocab_)) out.push_back(llama_vocab_bos(vocab_));
    for (const Fragment & f : fragments(r, from)) {
        if (f.special) {
            out.push_back(f.token);
            continue;
        }
        // Each raw fragment on its own, as libllama tokenizes the fragments of a whole text
        // (SentencePiece's space prefix included: every raw fragment follows a special token or
        // starts the text). parse_special=false: user-defined tokens are still split, as in
        // libllama, but no control token can come out of it.
        const char *         p = r.text.data() + f.b;
        const int32_t        n = (int32_t) (f.e - f.b);
        std::vector<int32_t> buf(f.e - f.b + 8);
        int32_t              k = llama_tokenize(vocab_, p, n, buf.data(), (int32_t) buf.size(), false, false);
        if (k < 0) {
            buf.resize(-k);
            k = llama_tokenize(vocab_, p, n, buf.data(), (int32_t) buf.size(), false, false);
        }
        out.insert(out.end(), buf.begin(), buf.begin() + std::max(k, 0));
    }
    return out;
}

std::vector<int32_t> Conversation::append(const std::vector<ChatMessage> & messages, bool add_generation_prompt) {
    tmpl_->validate(messages, messages_.size());
    std::vector<ChatMessage> all = messages_;
    all.insert(all.end(), messages.begin(), messages.end());
    const ChatTemplate::Rendered next = tmpl_->render_spans(all, add_generation_prompt);
    if (held_ > 0) {
        const std::string before = tmpl_->render(messages_, open_);
        if (next.text.compare(0, held_, before, 0, held_) != 0) {
            if (open_) {
                throw Error("messages",
                            "the assistant turn is open (the last append had add_generation_prompt): "
                            "generate its reply, or send it as an assistant message, before another turn");
            }
            throw Error("messages",
                        "the model's chat template renders the earlier turns differently once these "
                        "messages follow, so they cannot be appended to this session; start a new one");
        }
    }
    std::vector<int32_t> tokens = tmpl_->tokenize_from(next, held_);
    messages_                   = std::move(all);
    open_                       = add_generation_prompt;
    held_                       = next.text.size();
    return tokens;
}

void Conversation::add_reply(const std::string & text, int32_t end_token) {
    if (!open_) {
        throw Error("messages", "no assistant turn is open: append messages with add_generation_prompt first");
    }
    std::vector<ChatMessage> all     = messages_;
    std::string              content = text;
    content.erase(std::remove(content.begin(), content.end(), '\0'), content.end());  // libllama takes C strings
    all.push_back({ "assistant", content });
    const ChatTemplate::Rendered r = tmpl_->render_spans(all, false);
    const auto [b, e]              = r.content.back();
    if (b == npos) throw Error("messages", "the model's chat template does not render the assistant's reply");
    size_t held = e;
    // The end-of-turn token the generation sampled is in the KV cache: when it is the token the
    // template closes the turn with, the next append starts after it.
    if (end_token >= 0) {
        const std::vector<ChatTemplate::Fragment> after = tmpl_->fragments(r, e);
        if (!after.empty() && after[0].special && after[0].token == end_token && after[0].b == e) held = after[0].e;
    }
    messages_ = std::move(all);
    open_     = false;
    held_     = held;
}

std::string Conversation::save() const {
    mp::Value msgs = mp::Value::array();
    for (const ChatMessage & m : messages_) msgs.push(mp::Value::map().set("role", m.role).set("content", m.content));
    return mp::encode(mp::Value::map()
                          .set("version", 1)
                          .set("template", fingerprint(tmpl_->text()))
                          .set("messages", std::move(msgs))
                          .set("open", open_)
                          .set("held", (uint64_t) held_));
}

Conversation Conversation::restore(const ChatTemplate & tmpl, const std::string & bytes) {
    Conversation c(tmpl);
    try {
        const mp::Value v = mp::decode(bytes);
        if (v.get_uint("version", 0) != 1) throw Error("state", "not a saved conversation (version 1)");
        if (v.get_str("template", "") != fingerprint(tmpl.text())) {
            throw Error("state", "the conversation was saved under another chat template");
        }
        c.messages_ = chat_messages_from(v.at("messages"));
        c.open_     = v.at("open").as_bool("open");
        c.held_     = v.at("held").as_uint("held");
        tmpl.validate(c.messages_);
        if (c.held_ > tmpl.render(c.messages_, c.open_).size()) {
            throw Error("state", "the saved conversation holds more than its rendering");
        }
    } catch (const Error & e) {
        if (e.param == "state") throw;
        throw Error("state", std::string("saved conversation: ") + e.what());
    }
    return c;
}

}  // namespace pkv
