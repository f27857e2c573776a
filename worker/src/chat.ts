// Conversations as the host receives them: a list of {role, content} messages (host protocol 2.1,
// append.messages). The engine renders them with the model's own chat template from its GGUF
// (ChatML only when the GGUF has none), tokenising content as plain text, so the edge neither
// knows the template nor can a user's text forge a turn. A session's later turns are sent alone:
// the engine renders them after the session's earlier messages.
export type Role = "system" | "user" | "assistant";
export interface Turn {
  role: Role;
  content: string;
}

/** The host's append.messages for turns. */
export const hostMessages = (turns: Turn[]): Record<string, unknown>[] =>
  turns.map((t) => ({ role: t.role, content: t.content }));
