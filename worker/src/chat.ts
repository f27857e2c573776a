// Conversations rendered as ChatML, the template of the embedded SmolLM2 (and of Qwen models):
//   <|im_start|>{role}\n{content}<|im_end|>\n … <|im_start|>assistant\n
// The same text the engine's `chat: true` produces for one user turn (libllama's chatml), extended
// to system/user/assistant turns; the worker renders it so that a whole conversation is one append
// (one prefill, compressed once). A turn the model left open (max_tokens reached, no <|im_end|>)
// is closed before the next one.
export type Role = "system" | "user" | "assistant";
export interface Turn {
  role: Role;
  content: string;
}

export const END_OF_TURN = "<|im_end|>";

export function renderTurns(turns: Turn[], opts: { continues?: boolean; openTurn?: boolean } = {}): string {
  let out = opts.openTurn ? END_OF_TURN : "";
  turns.forEach((t, i) => {
    if (i > 0 || opts.continues) out += "\n";
    out += `<|im_start|>${t.role}\n${t.content}${END_OF_TURN}`;
  });
  return out;
}

/** Turns followed by the assistant's opening: the prompt a generate continues. */
export function renderPrompt(turns: Turn[], opts: { continues?: boolean; openTurn?: boolean } = {}): string {
  return `${renderTurns(turns, opts)}\n<|im_start|>assistant\n`;
}
