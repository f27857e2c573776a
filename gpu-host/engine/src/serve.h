#pragma once
namespace pkv {
// `pkv-engine serve --stdio`: length-prefixed msgpack frames on stdin/stdout, as defined in
// shared/protocol/engine.json. Many sessions in one process; generating sessions decode together
// (one graph evaluation per step); prefill runs chunk by chunk between decode steps.
int cmd_serve(int argc, char ** argv);
}  // namespace pkv
