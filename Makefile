# mmgate: make setup | build | run | test | lint | bench | soak | fuzz
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
CONFIG ?= configs/default.toml

.PHONY: setup build run test lint bench soak fuzz

setup:
	bash scripts/setup.sh

build: setup
	cargo build --release --workspace --bins

run: build
	$(TARGET_DIR)/release/mmgate serve --config $(CONFIG) --listen 127.0.0.1:8080

# setup.sh test also builds the reference venv and .deps/expected/open_nsfw.json.
# The tests run under TEST_TIMEOUT seconds (about 10 minutes on 2 cores), so a
# hung test fails the run instead of holding CI to its limit.
TEST_TIMEOUT ?= 2400
test:
	bash scripts/setup.sh test
	cargo build --release --workspace --bins
	cargo test --release --workspace --no-run
	timeout --kill-after=30 $(TEST_TIMEOUT) cargo test --release --workspace

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

bench: build
	bash load-tests/run.sh && bash load-tests/video.sh

soak: build
	bash load-tests/soak.sh

# Coverage-guided fuzzing of the image decode path (AFL++ via afl.rs, stable
# Rust); FUZZ_SECONDS per run, one core. Exits non-zero on a crash or hang.
FUZZ_SECONDS ?= 300
fuzz: setup
	bash scripts/fuzz.sh $(FUZZ_SECONDS)
