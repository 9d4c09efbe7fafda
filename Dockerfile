# CPU image. Build: docker build -t mmgate .   Run: docker run -p 8080:8080 mmgate
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# Same set-up as on a developer machine: Debian packages, OpenVINO and ONNX
# Runtime libraries, model.
RUN bash scripts/setup.sh && cargo build --release --workspace --bins

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates libavcodec59 libavformat59 libavutil57 libswscale6 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY --from=build /src/target/release/mmgate /src/target/release/preprocess-worker \
     /src/target/release/gpu-executor /usr/local/bin/
COPY --from=build /src/configs ./configs
COPY --from=build /src/.deps/onnxruntime ./.deps/onnxruntime
COPY --from=build /src/.deps/openvino ./.deps/openvino
COPY --from=build /src/.deps/models ./.deps/models
# open_nsfw's calibration images, for its start-up precision check.
COPY --from=build /src/tests/fixtures/images ./tests/fixtures/images
# Compiled-model cache (executor.cache_dir); mount a volume to keep it.
RUN mkdir -p .deps/cache
EXPOSE 8080
CMD ["mmgate", "serve", "--config", "configs/default.toml", "--listen", "0.0.0.0:8080"]
