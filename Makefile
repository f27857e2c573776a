# pyramidkv — the two commands that matter: `make demo` and `make test`. Each installs what is
# missing (npm packages, llama.cpp source, the engine build, the embedded model) and is safe to
# re-run: a second build with no change finishes in seconds.
SHELL := /bin/bash
ENGINE_DIR := gpu-host/engine
BUILD_DIR  := $(ENGINE_DIR)/build
CMAKE_FLAGS ?=
# Warnings in the engine's own code are errors under CI (.ci/run sets CI); `make … WERROR=ON` locally.
WERROR ?= $(if $(CI),ON,OFF)
CMAKE_FLAGS += -DPKV_WERROR=$(WERROR)
# GPU hosts: make engine CUDA=1 (ggml built with CUDA; CUDA_ARCH defaults to 90 for H100/H200)
ifeq ($(CUDA),1)
CMAKE_FLAGS += -DPKV_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$(or $(CUDA_ARCH),90)
endif
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: all deps node llama model tools engine ts lint format demo demo-engine dev test test-engine test-ts test-worker test-e2e bench bench-deps clean

all: engine ts

deps: node llama model

node: node_modules/.package-lock.json
node_modules/.package-lock.json: package.json shared/package.json gpu-host/package.json worker/package.json
	npm install --no-audit --no-fund
	@touch $@

llama:
	@bash scripts/fetch-llama.sh

model:
	@bash scripts/fetch-model.sh

# The pinned clang-format (Biome comes with the npm packages).
tools:
	@bash scripts/fetch-tools.sh

# Formatting and lint: C++ by clang-format (.clang-format), TypeScript and JSON by Biome
# (biome.json). `make format` rewrites what `make lint` refuses.
lint: node tools
	@bash scripts/lint.sh

format: node tools
	@bash scripts/lint.sh --fix

# Re-configure when the CMake flags change (CUDA=1, WERROR=ON, …), not only when CMakeLists does.
$(BUILD_DIR)/cmake-flags: FORCE
	@mkdir -p $(BUILD_DIR)
	@echo '$(CMAKE_FLAGS)' | cmp -s - $@ || echo '$(CMAKE_FLAGS)' > $@

$(BUILD_DIR)/build.ninja: $(ENGINE_DIR)/CMakeLists.txt $(BUILD_DIR)/cmake-flags
	@bash scripts/fetch-llama.sh
	cmake -S $(ENGINE_DIR) -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

engine: llama $(BUILD_DIR)/build.ninja
	ninja -C $(BUILD_DIR) pkv-engine pkv-make-gguf pkv-tests

# TypeScript: compile, then link the workspace bins (npx pkv-engine) now that their targets exist.
ts: node
	npx tsc -b
	@npm rebuild --no-audit >/dev/null

# The full stack: a GPU host (CPU, embedded model) + the edge worker in Miniflare; a ~6k-token
# document as a session, two questions streamed, KV bytes vs FullKV and the tenant's quota usage.
demo: deps engine ts
	node gpu-host/dist/src/cli.js demo $(DEMO_ARGS)

# The engine alone: FullKV vs PyramidKV side by side on one needle prompt.
demo-engine: deps engine ts
	node gpu-host/dist/src/cli.js demo engine $(DEMO_ARGS)

dev: deps engine ts
	node gpu-host/dist/src/cli.js dev

# Lint first: a mis-formatted line fails in seconds, before the builds.
test: lint deps engine ts test-engine test-ts test-worker test-e2e

test-engine:
	cd $(BUILD_DIR) && ctest --output-on-failure -j 1

test-ts:
	node --test --test-reporter=spec "shared/dist/test/"*.test.js "gpu-host/dist/test/"*.test.js

# Worker unit tests inside the Workers runtime (vitest pool for Workers), and its type check with
# the types `wrangler types` generated (worker/worker-configuration.d.ts; tests included).
test-worker: node
	npx tsc -p worker/test/tsconfig.json
	cd worker && npx vitest run

# End to end: worker in Miniflare + two real GPU hosts + the engine; and the offline deploy build.
test-e2e:
	node --test --test-reporter=spec --test-concurrency=1 "test/dist/"*.test.js

# Benchmarks (not tests): llama.cpp's llama-bench from the same source, then ours beside it.
bench-deps: engine
	ninja -C $(BUILD_DIR) llama-bench llama-batched-bench

bench: deps bench-deps ts
	bash scripts/bench-all.sh $(BENCH_OUT)

clean:
	rm -rf $(BUILD_DIR) node_modules */dist

FORCE:
