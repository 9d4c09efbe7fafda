# mmgate: make setup | build | run | test | lint | bench
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
# For onnxruntime bindings that load the library at run time (e.g. ort's load-dynamic).
export ORT_DYLIB_PATH ?= $(CURDIR)/.deps/onnxruntime/libonnxruntime.so.1.32.0

.PHONY: setup build run test lint bench

setup:
	bash scripts/setup.sh

build: setup
	cargo build --release --workspace --bins

run: build
	$(TARGET_DIR)/release/mmgate serve --config configs/default.toml --listen 127.0.0.1:8080

# setup.sh test also builds the reference venv and .deps/expected/open_nsfw.json
test:
	bash scripts/setup.sh test
	cargo build --release --workspace --bins
	cargo test --release --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench: build
	bash load-tests/run.sh && bash load-tests/video.sh
