// A stand-in for `pkv-engine serve --stdio` that speaks engine protocol 2.2 with made-up numbers,
// for host tests of fields the real engine may not implement yet: it validates every frame the
// host sends against engine.json (the decoder refuses unknown fields and wrong types), logs each
// one, and answers as the contract says (hello.chat_template, append.max_tokens -> context_full,
// token logprobs, done.seed, kv_type's entry size). Run through fakeEngineBin() below.
//
// Its KV: 2 layers, an f16 entry is 128 bytes, q8_0 68 (the ggml block ratio), q4_0 40 (not the
// ratio's 36, so a test can tell a measured size from an estimated one). A session keeps
// min(tokens, budget) entries per layer (FullKV: all).
//
// Faults (host-faults.test.ts): PKV_FAKE_CONTROL names a JSON file of FakeFaults, read again
// before each frame, so a test switches faults on and off while the engine runs.
import { appendFileSync, chmodSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

import { encodeFrame, FrameDecoder, type FromEngineMessage, type ToEngineMessage } from "@pyramidkv/shared";

export const FAKE_N_LAYER = 2;
export const FAKE_ENTRY_BYTES: Record<string, number> = { f16: 128, q8_0: 68, q4_0: 40 };
export const FAKE_RANDOM_SEED = 987654321;

/** An executable that runs this file with node, logging received frames as JSON lines to `log`.
 * `env`: PKV_FAKE_CHAT_TEMPLATE (absent: a hello without chat_template, an engine before 2.2),
 * PKV_FAKE_KV_TYPE (the engine's default KV type when the command line names none). */
export function fakeEngineBin(log: string, env: Record<string, string> = { PKV_FAKE_CHAT_TEMPLATE: "gguf" }): string {
  const bin = join(tmpdir(), `pkv-fake-engine-${process.pid}-${Math.random().toString(36).slice(2)}.sh`);
  const vars = Object.entries({ ...env, PKV_FAKE_LOG: log })
    .map(([k, v]) => `${k}='${v}' `)
    .join("");
  writeFileSync(bin, `#!/bin/sh\n${vars}exec '${process.execPath}' '${fileURLToPath(import.meta.url)}' "$@"\n`);
  chmodSync(bin, 0o755);
  return bin;
}

/** Faults a fake engine injects (PKV_FAKE_CONTROL's file; absent fields: none). */
export interface FakeFaults {
  /** engine session names whose save is answered error{internal} (a disk error, say) */
  fail_save?: string[];
  /** request types answered by an error frame without an id (with the request's session) */
  no_id_error?: string[];
  /** request types never answered */
  silent?: string[];
  /** answer nothing at all any more (a hung engine) */
  hang?: boolean;
  /** request types after which the engine sends bad_frame "(no further input is read)", without
   * an id, and reads nothing more (a frame it could not skip) */
  dead_after?: string[];
  /** request types acted on at once but answered `ms` later (say, a close done in the engine
   * whose answer is still on its way) */
  late_answer?: Record<string, number>;
}

/** Writes the faults a fake engine started with PKV_FAKE_CONTROL=`file` injects from now on. */
export function setFaults(file: string, faults: FakeFaults): void {
  writeFileSync(file, JSON.stringify(faults));
}

/** The frames a fake engine received (and its argv first, as {type: "argv", argv}). */
export type Logged = Record<string, unknown> & { type: string };

function main(): void {
  const log = process.env.PKV_FAKE_LOG;
  const record = (m: unknown) => {
    if (log) appendFileSync(log, `${JSON.stringify(m, (_k, v) => (v instanceof Uint8Array ? [...v] : v))}\n`);
  };
  const argv = process.argv.slice(2);
  record({ type: "argv", argv });
  const flag = (name: string) => {
    const i = argv.indexOf(name);
    return i < 0 ? undefined : argv[i + 1];
  };
  const nCtx = Number(flag("--ctx-size") ?? 256) || 256;
  const defaultType = flag("--kv-type") ?? process.env.PKV_FAKE_KV_TYPE ?? "f16";
  // ms: the answers of the frame being handled go out this much later (the handlers answer
  // synchronously, so only that frame's answers are delayed; later frames' may overtake them)
  let late = 0;
  const send = (m: FromEngineMessage): void => {
    const frame = encodeFrame(m);
    if (late > 0) setTimeout(() => process.stdout.write(frame), late);
    else process.stdout.write(frame);
  };
  const template = process.env.PKV_FAKE_CHAT_TEMPLATE;
  send({
    type: "hello",
    protocol: 2,
    protocol_minor: 2,
    model: "fake-model",
    n_layer: FAKE_N_LAYER,
    n_ctx: nCtx,
    pool_bytes: 64 << 20,
    page_bytes: 16 * FAKE_ENTRY_BYTES.f16!,
    page_slots: 16,
    ...(template !== undefined ? { chat_template: template } : {}),
    defaults: { kv_type: defaultType },
  });
  type S = { tokens: number; method: string; budget: number; kvType: string };
  const sessions = new Map<string, S>();
  const entries = (s: S) => (s.method === "full" ? s.tokens : Math.min(s.tokens, s.budget));
  const stats = (id: number, name: string, s: S): FromEngineMessage => {
    const e = entries(s);
    const bytes = FAKE_ENTRY_BYTES[s.kvType]!;
    return {
      type: "stats_result",
      id,
      session: name,
      tokens_seen: s.tokens,
      layer_kv_lengths: Array(FAKE_N_LAYER).fill(e),
      kv_bytes: FAKE_N_LAYER * e * bytes,
      full_kv_bytes: FAKE_N_LAYER * s.tokens * bytes,
    };
  };
  const faults = (): FakeFaults => {
    const file = process.env.PKV_FAKE_CONTROL;
    if (!file) return {};
    try {
      return JSON.parse(readFileSync(file, "utf8")) as FakeFaults;
    } catch {
      return {};
    }
  };
  let deaf = false;
  const handle = (m: ToEngineMessage) => {
    const f = faults();
    const session = "session" in m && m.session !== undefined ? m.session : undefined;
    late = f.late_answer?.[m.type] ?? 0;
    if (f.hang || f.silent?.includes(m.type)) return;
    if (f.no_id_error?.includes(m.type))
      return send({ type: "error", ...(session !== undefined ? { session } : {}), code: "internal", message: "fault" });
    if (f.dead_after?.includes(m.type)) {
      deaf = true;
      return send({
        type: "error",
        code: "bad_frame",
        message: "input ended inside a frame (no further input is read)",
      });
    }
    if (m.type === "save" && session !== undefined && f.fail_save?.includes(session))
      return send({ type: "error", id: m.id, session, code: "internal", message: "save: disk error (fault)" });
    const fail = (code: string, message: string) =>
      send({ type: "error", id: m.id, ...("session" in m ? { session: m.session } : {}), code, message });
    const s = "session" in m && m.session !== undefined ? sessions.get(m.session) : undefined;
    switch (m.type) {
      case "open":
        sessions.set(m.session, {
          tokens: 0,
          method: m.method ?? "pyramidkv",
          budget: m.budget ?? 128,
          kvType: m.kv_type ?? defaultType,
        });
        return send({ type: "opened", id: m.id, session: m.session });
      case "append": {
        if (!s) return fail("unknown_session", m.session);
        const rendered = (m.messages ?? []).reduce((n, x) => n + 4 + String(x.content).length, 0);
        const added =
          (m.tokens?.length ?? 0) +
          (m.text === undefined ? 0 : Buffer.byteLength(m.text)) +
          rendered +
          (m.messages && m.add_generation_prompt !== false ? 3 : 0);
        if (m.max_tokens !== undefined && s.tokens + added + m.max_tokens > nCtx)
          return fail("context_full", `prompt of ${s.tokens + added} tokens + max_tokens ${m.max_tokens} > ${nCtx}`);
        s.tokens += added;
        send({ type: "progress", id: m.id, session: m.session, done: added, total: added });
        const st = stats(m.id, m.session, s) as { kv_bytes: number };
        return send({ type: "appended", id: m.id, session: m.session, tokens_seen: s.tokens, kv_bytes: st.kv_bytes });
      }
      case "generate": {
        if (!s) return fail("unknown_session", m.session);
        const n = Math.min(m.max_tokens ?? 4, nCtx - s.tokens);
        const withLogprobs = m.logprobs === true || (m.top_logprobs ?? 0) > 0;
        let text = "";
        for (let i = 0; i < n; i++) {
          const piece = `w${i} `;
          text += piece;
          const bytes = new TextEncoder().encode(piece);
          send({
            type: "token",
            id: m.id,
            session: m.session,
            token: 100 + i,
            text: piece,
            ...(withLogprobs ? { logprob: -0.5 * (i + 1), bytes } : {}),
            ...((m.top_logprobs ?? 0) > 0
              ? {
                  top_logprobs: Array.from({ length: m.top_logprobs! }, (_, j) => ({
                    token: 100 + i + j,
                    bytes: new TextEncoder().encode(`a${j}`),
                    logprob: -0.5 * (i + 1) - j,
                  })),
                }
              : {}),
          });
        }
        s.tokens += n;
        return send({
          type: "done",
          id: m.id,
          session: m.session,
          reason: "length",
          new_tokens: n,
          text,
          seed: m.seed ?? FAKE_RANDOM_SEED,
        });
      }
      case "stats":
        if (m.session === undefined)
          return send({ type: "stats_result", id: m.id, pool_bytes: 64 << 20, pool_used_bytes: 0, sessions: 0 });
        if (!s) return fail("unknown_session", m.session);
        return send(stats(m.id, m.session, s));
      case "save":
        if (!s) return fail("unknown_session", m.session);
        {
          const state = new TextEncoder().encode(JSON.stringify(s));
          return send({ type: "saved", id: m.id, session: m.session, state, offset: 0, total: state.length });
        }
      case "restore":
        sessions.set(m.session, JSON.parse(new TextDecoder().decode(m.state)) as S);
        return send({ type: "restored", id: m.id, session: m.session, received: m.state.length });
      case "close":
        sessions.delete(m.session);
        return send({ type: "closed", id: m.id, session: m.session });
      case "cancel":
        return send({ type: "cancelled", id: m.id, session: m.session });
      case "shutdown":
        send({ type: "bye", id: m.id });
        return process.exit(0);
      default:
        return fail("invalid", `the fake engine does not do ${m.type}`);
    }
  };
  const decoder = new FrameDecoder("to_engine");
  process.stdin.on("data", (chunk: Buffer) => {
    if (deaf) return;
    for (const f of decoder.push(chunk)) {
      if (deaf) break;
      if (!f.ok) {
        record({ type: "refused", code: f.code, error: f.error });
        send({ type: "error", ...(f.id !== undefined ? { id: f.id } : {}), code: f.code, message: f.error });
        continue;
      }
      record(f.message);
      handle(f.message as ToEngineMessage);
    }
  });
  process.stdin.on("end", () => process.exit(0));
}

if (process.argv[1] === fileURLToPath(import.meta.url)) main();
