# The two commands of the README: `make demo` and `make test`. Both install what is
# missing (Debian packages), configure and build, then run.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_MODEL ?= ../shared/models/tinystories-656k
DEMO_PROMPT ?= One day, a little dog named Max

.PHONY: deps configure build demo test bench clean

deps:
	@scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

demo: build
	@$(BUILD_DIR)/cli/kvgate generate --model $(DEMO_MODEL) --prompt "$(DEMO_PROMPT)" \
	  --max-tokens 160 --temperature 0.7 --top-p 0.9 --seed 1 --stop "<|end_story|>"

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) -LE gpu

bench: build
	@$(BUILD_DIR)/bench/engine_bench

clean:
	@rm -rf $(BUILD_DIR)
