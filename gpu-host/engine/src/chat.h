// Chat messages → tokens with the model's own chat template (docs/ENGINE.md, "Chat templates").
//
// The template is rendered by libllama's built-in renderer (llama_chat_apply_template over all
// messages). Message content is tokenized as plain text: only the template's own markup can
// become control tokens, so a user who writes "<|im_start|>system" gets the tokens of those
// characters, not a system turn.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "msgpack.h"

struct llama_model;
struct llama_vocab;

namespace pkv {

class Model;

struct ChatMessage {
    std::string role, content;
};

// The roles a message may have: system, user, assistant. ("tool" needs the template's own tool
// markup, which libllama's built-in renderer does not have for most models.)
const std::vector<std::string> & chat_roles();

// A protocol `messages` array ([{role, content}, ...]) as ChatMessages; errors name the element
// ("messages[2].role") and the accepted values.
std::vector<ChatMessage> chat_messages_from(const mp::Value & messages);

class ChatTemplate {
  public:
    // The GGUF's tokenizer.chat_template, or ChatML when the GGUF has none.
    explicit ChatTemplate(const Model & model);
    explicit ChatTemplate(const llama_model * model);  // a libllama model (vocab-only is enough)

    // "gguf" (the model's own template) or "chatml" (the GGUF has none).
    const std::string & source() const { return source_; }
    // The template text as libllama receives it ("chatml" for the fallback).
    const std::string & text() const { return text_; }
    // False when the GGUF's template is not one libllama's renderer recognises: rendering then
    // throws pkv::Error("messages", ...).
    bool supported() const { return supported_; }

    // Throws pkv::Error("messages[i].role" / "messages[i].content", ...) for an unknown role or
    // content holding a NUL byte; i counts from first_index.
    void validate(const std::vector<ChatMessage> & messages, size_t first_index = 0) const;

    // The conversation as the template renders it (libllama's text, markup and content alike).
    std::string render(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const;

    // The whole conversation as token ids: BOS when the vocabulary adds one, markup with its
    // control tokens, content as plain text.
    std::vector<int32_t> tokenize(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const;

  private:
    friend class Conversation;

    // A rendered conversation: its text, and where the content of each message lies in it.
    struct Rendered {
        std::string                            text;
        std::vector<std::pair<size_t, size_t>> content;  // [begin, end) per message; npos if absent
    };
    // A piece of the text being tokenized: raw text [b, e), or one special token.
    struct Fragment {
        bool    special = false;
        int32_t token   = -1;
        size_t  b = 0, e = 0;
    };
    Rendered render_spans(const std::vector<ChatMessage> & messages, bool add_generation_prompt) const;
    // libllama's split of text[from, end) into raw text and special tokens, except that control
    // tokens are not split out of the content spans.
    std::vector<Fragment> fragments(const Rendered & r, size_t from) const;
    // Tokens of text[from, end): control tokens only outside the content spans.
    std::vector<int32_t> tokenize_from(const Rendered & r, size_t from) const;

    const llama_vocab *  vocab_ = nullptr;
    std::string          source_, text_;
    bool                 supported_ = false;
    std::vector<int32_t> specials_;  // control / user-defined / unknown tokens, longest text first
};

// One session's chat: the messages so far and how much of their rendering the session's KV
// cache holds. Each append renders the whole conversation again and returns the tokens of what
// is new (the way llama.cpp's chat examples take the delta of the rendered text), so later turns
// use the same template as the first.
//
// A value type: to apply an append only if the caller accepts it (the context check), copy,
// append to the copy, and assign it back.
class Conversation {
  public:
    explicit Conversation(const ChatTemplate & tmpl) : tmpl_(&tmpl) {}

    // Tokens to append for `messages` after the earlier ones, opening the assistant turn when
    // add_generation_prompt. The first append starts with BOS when the vocabulary adds one.
    // Throws pkv::Error("messages…") for a bad message, or when the template would render the
    // earlier turns differently (a user turn while the assistant turn is open, for one); the
    // conversation is then unchanged.
    std::vector<int32_t> append(const std::vector<ChatMessage> & messages, bool add_generation_prompt);

    // True after an append that opened the assistant turn, until its reply is added.
    bool awaiting_reply() const { return open_; }

    // The assistant's reply, generated into the KV cache after the last append: `text` is what
    // the generated tokens say; end_token is the end-of-turn token the generation ended with when
    // that token is (or will be) in the KV cache too, else -1 (stopped by length or a stop
    // string). The next append first closes the turn with whatever markup the KV cache lacks.
    // Throws pkv::Error("messages", ...) when no assistant turn is open.
    void add_reply(const std::string & text, int32_t end_token);

    const std::vector<ChatMessage> & messages() const { return messages_; }

    // Bytes for save/restore (msgpack). restore() throws pkv::Error("state", ...) for bytes not
    // written by save() or saved under another chat template.
    std::string         save() const;
    static Conversation restore(const ChatTemplate & tmpl, const std::string & bytes);

  private:
    const ChatTemplate *     tmpl_;
    std::vector<ChatMessage> messages_;
    bool                     open_ = false;  // the rendering ends with the opened assistant turn
    size_t                   held_ = 0;      // bytes of render(messages_, open_) in the KV cache
};

}  // namespace pkv
