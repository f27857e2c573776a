# pyramidkv — the two commands that matter: `make demo` and `make test`. Each installs what is
# missing (npm packages, llama.cpp source, the engine build, the embedded model) and is safe to
# re-run: a second build with no change finishes in seconds.
SHELL := /bin/bash
ENGINE_DIR := gpu-host/engine
BUILD_DIR  := $(ENGINE_DIR)/build
CMAKE_FLAGS ?=
# GPU hosts: make engine CUDA=1 (ggml built with CUDA; CUDA_ARCH defaults to 90 for H100/H200)
ifeq ($(CUDA),1)
CMAKE_FLAGS += -DPKV_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=$(or $(CUDA_ARCH),90)
endif
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf

.PHONY: all deps node llama model engine ts demo test test-engine test-ts bench bench-deps clean

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

$(BUILD_DIR)/build.ninja: $(ENGINE_DIR)/CMakeLists.txt
	@bash scripts/fetch-llama.sh
	cmake -S $(ENGINE_DIR) -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS)

engine: llama $(BUILD_DIR)/build.ninja
	ninja -C $(BUILD_DIR) pkv-engine pkv-make-gguf pkv-tests

# TypeScript: compile, then link the workspace bins (npx pkv-engine) now that their targets exist.
ts: node
	npx tsc -b
	@npm rebuild --no-audit >/dev/null

demo: deps engine ts
	node gpu-host/dist/src/cli.js demo $(DEMO_ARGS)

test: deps engine ts test-engine test-ts

test-engine:
	cd $(BUILD_DIR) && ctest --output-on-failure -j 1

test-ts:
	node --test --test-reporter=spec "shared/dist/test/"*.test.js "gpu-host/dist/test/"*.test.js

# Benchmarks (not tests): llama.cpp's llama-bench from the same source, then ours beside it.
bench-deps: engine
	ninja -C $(BUILD_DIR) llama-bench llama-batched-bench

bench: deps bench-deps ts
	bash scripts/bench-all.sh $(BENCH_OUT)

clean:
	rm -rf $(BUILD_DIR) node_modules */dist
