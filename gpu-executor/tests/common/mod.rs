//! Paths and inputs shared by the integration tests. The real ONNX Runtime
//! library and model must be installed: a missing `.deps` fails the tests
//! (with the command that fixes it) instead of skipping them.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use config::ModelSpec;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("gpu-executor lives in the workspace")
        .to_path_buf()
}

fn require(rel: &str) -> PathBuf {
    let p = root().join(rel);
    assert!(
        p.is_file(),
        "{} is missing: run `make setup` (scripts/setup.sh) in {} first",
        p.display(),
        root().display()
    );
    p
}

pub fn ort_library() -> PathBuf {
    require(".deps/onnxruntime/libonnxruntime.so.1.32.0")
}

pub fn openvino_library() -> PathBuf {
    require(".deps/openvino/libopenvino_c.so.2641")
}

/// The real engine libraries, no compiled-model cache.
pub fn executor_section() -> config::ExecutorSection {
    config::ExecutorSection {
        ort_library: ort_library().display().to_string(),
        openvino_library: openvino_library().display().to_string(),
        cache_dir: String::new(),
        ..config::ExecutorSection::default()
    }
}

pub fn backends() -> gpu_executor::Backends {
    gpu_executor::Backends::from_section(&executor_section())
}

/// The shipped open_nsfw spec, its model file checked to exist.
pub fn open_nsfw() -> ModelSpec {
    require(".deps/models/open-nsfw.onnx");
    ModelSpec::load(&root().join("configs/models/open_nsfw.toml")).expect("open_nsfw.toml loads")
}

/// A deterministic, image-like sample (roughly the mean-subtracted range),
/// different for each `seed`.
pub fn sample(spec: &ModelSpec, seed: u32) -> Vec<f32> {
    (0..spec.input.elements())
        .map(|i| {
            let x = (i as f32 * 0.013 + seed as f32 * 1.7).sin();
            let y = ((i / 672) as f32 * 0.05 + seed as f32).cos();
            60.0 * x + 40.0 * y
        })
        .collect()
}
