# mmgate: make setup | build | run | test | lint | bench | soak
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)

.PHONY: setup build run test lint bench soak

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

soak: build
	bash load-tests/soak.sh
