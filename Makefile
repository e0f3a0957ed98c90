# The two commands of the README: `make demo` and `make test`. Both install what is
# missing (Debian packages), configure and build, then run.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_MODEL ?= models/kvgate-tiny
DEMO_POLICY ?= fast_kvzip
DEMO_KEEP_RATIO ?= 0.3
DEMO_PROMPT ?= needle
DEMO_SERVE_FLAGS ?= --fast-kvzip-gate $(DEMO_MODEL)/gates/fast_kvzip.safetensors \
  --attention-gate $(DEMO_MODEL)/gates/attention_gate.safetensors

.PHONY: deps configure build demo test bench clean

deps:
	@scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

demo: build
	@scripts/demo.sh $(BUILD_DIR) $(DEMO_MODEL) $(DEMO_POLICY) $(DEMO_KEEP_RATIO) '$(DEMO_PROMPT)' $(DEMO_SERVE_FLAGS)

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) -LE gpu

bench: build
	@$(BUILD_DIR)/bench/engine_bench

clean:
	@rm -rf $(BUILD_DIR)
