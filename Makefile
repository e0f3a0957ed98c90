# The two commands of the README: `make demo` and `make test`. Both install what is
# missing (Debian packages), configure and build, then run.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
DEMO_MODEL ?= ../shared/models/tinystories-656k
DEMO_PROMPT ?= Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends. One day, Lily found a big red ball under a tree. She picked it up and ran to her mom. "Mom, look what I found!" she said. Her mom smiled and said, "That is a very nice ball, Lily. Let us go and play with it." They played with the ball all afternoon. Then
DEMO_POLICY ?= snapkv

.PHONY: deps configure build demo test bench clean

deps:
	@scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo $(CMAKE_FLAGS)

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

demo: build
	@scripts/demo.sh $(BUILD_DIR) $(DEMO_MODEL) '$(DEMO_PROMPT)' $(DEMO_POLICY)

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) -LE gpu

bench: build
	@$(BUILD_DIR)/bench/engine_bench

clean:
	@rm -rf $(BUILD_DIR)
