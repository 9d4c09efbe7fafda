//! open_nsfw on ONNX Runtime's CUDA and TensorRT providers scores the
//! reference photos as its CPU provider does (within the reference
//! tolerance), from float slots and from uint8 slots normalised on the
//! device.
//!
//! Needs a GPU and the onnxruntime-gpu library:
//! `MMGATE_GPU_TESTS=1 MMGATE_ORT_GPU_LIBRARY=/…/libonnxruntime.so.1.31.1`
//! (`load-tests/gpu-check.sh` runs it). Elsewhere it passes after printing
//! why it did not run. One ONNX Runtime library per process, so the CPU
//! scores come from the GPU library's own CPU provider.

mod common;

use std::time::{Duration, Instant};

use config::{Backend, GpuFallback, Limits, ModelSpec, SlotDtype};
use gpu_executor::cuda::HostSample;
use gpu_executor::{Backends, load_model};

fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-7, 1.0 - 1e-7);
    (p / (1.0 - p)).ln()
}

/// nsfw of each photo, one batch of all of them through `run_slots` when
/// the engine reads slots (it does on a GPU), else `run`.
fn scores(spec: &ModelSpec, backends: &Backends, photos: &[Vec<u8>]) -> (String, Vec<f64>) {
    let mut loaded = load_model(spec, backends, 1).unwrap();
    let runtime = format!("{:?}", loaded.runtime);
    let n = spec.input.elements();
    let far = Instant::now() + Duration::from_secs(30);
    let engine = &mut loaded.engines[0];
    let mut out = Vec::new();
    for chunk in photos.chunks(spec.batching.max_batch as usize) {
        let values = match spec.slot_dtype {
            SlotDtype::Float32 => {
                let mut t = vec![0f32; chunk.len() * n];
                for (p, o) in chunk.iter().zip(t.chunks_exact_mut(n)) {
                    preprocess_worker::preprocess(p, spec, &Limits::default(), far, o).unwrap();
                }
                if engine.reads_slots() {
                    let s: Vec<_> = t.chunks_exact(n).map(HostSample::F32).collect();
                    engine.run_slots(&s).unwrap()
                } else {
                    engine.run(&t, chunk.len()).unwrap()
                }
            }
            SlotDtype::Uint8 => {
                let mut t = vec![0u8; chunk.len() * n];
                for (p, o) in chunk.iter().zip(t.chunks_exact_mut(n)) {
                    preprocess_worker::preprocess(p, spec, &Limits::default(), far, o).unwrap();
                }
                let s: Vec<_> = t.chunks_exact(n).map(HostSample::U8).collect();
                assert!(engine.reads_slots(), "a GPU engine reads slots");
                engine.run_slots(&s).unwrap()
            }
        };
        out.extend(values.chunks_exact(2).map(|v| f64::from(v[1])));
    }
    (runtime, out)
}

/// TensorRT 10's library on `LD_LIBRARY_PATH` or in the loader's cache.
fn tensorrt_present() -> bool {
    let on_path = std::env::var("LD_LIBRARY_PATH").is_ok_and(|p| {
        p.split(':')
            .any(|d| std::path::Path::new(d).join("libnvinfer.so.10").exists())
    });
    on_path
        || std::process::Command::new("ldconfig")
            .arg("-p")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libnvinfer.so.10"))
}

#[test]
fn cuda_and_tensorrt_score_as_the_cpu_does() {
    let (Ok("1"), Ok(lib)) = (
        std::env::var("MMGATE_GPU_TESTS").as_deref(),
        std::env::var("MMGATE_ORT_GPU_LIBRARY"),
    ) else {
        println!(
            "skipped: needs MMGATE_GPU_TESTS=1 and MMGATE_ORT_GPU_LIBRARY (the onnxruntime-gpu library) on a GPU host"
        );
        return;
    };
    let backends =
        Backends::new(&lib).with_cache_dir(Some(std::env::temp_dir().join("mmgate-gpu-cache")));
    let dir = common::root().join("tests/fixtures/images");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    let photos: Vec<Vec<u8>> = names
        .iter()
        .map(|p| std::fs::read(p).unwrap())
        .filter(|d| {
            let far = Instant::now() + Duration::from_secs(30);
            let spec = common::open_nsfw();
            let mut t = vec![0f32; spec.input.elements()];
            preprocess_worker::preprocess(d, &spec, &Limits::default(), far, &mut t).is_ok()
        })
        .collect();
    let mut cpu = common::open_nsfw();
    cpu.backend = Backend::OnnxruntimeCpu;
    let (_, want) = scores(&cpu, &backends, &photos);
    let trt = tensorrt_present();
    if !trt {
        println!("TensorRT rows skipped: libnvinfer.so.10 is not on the loader's path");
    }
    let mut failed = Vec::new();
    for (backend, fp16, slots) in [
        (Backend::OnnxruntimeCuda, false, SlotDtype::Float32),
        (Backend::OnnxruntimeCuda, false, SlotDtype::Uint8),
        (Backend::OnnxruntimeTensorrt, false, SlotDtype::Float32),
        (Backend::OnnxruntimeTensorrt, true, SlotDtype::Uint8),
    ] {
        if backend == Backend::OnnxruntimeTensorrt && !trt {
            continue;
        }
        let mut spec = common::open_nsfw();
        spec.backend = backend;
        spec.slot_dtype = slots;
        spec.gpu.fp16 = fp16;
        spec.gpu.fallback = GpuFallback::Fail;
        let t = Instant::now();
        let result = std::panic::catch_unwind(|| scores(&spec, &backends, &photos));
        let Ok((runtime, got)) = result else {
            failed.push(format!(
                "{} fp16={fp16} {slots:?}: did not load or run",
                backend.as_str()
            ));
            continue;
        };
        let worst = want
            .iter()
            .zip(&got)
            .map(|(w, g)| (logit(*w) - logit(*g)).abs())
            .fold(0.0, f64::max);
        println!(
            "{} fp16={fp16} {slots:?}: worst Δlog-odds {worst:.4} over {} photos, loaded and run in {:?}; {runtime}",
            backend.as_str(),
            photos.len(),
            t.elapsed()
        );
        if worst > 0.3 {
            failed.push(format!(
                "{} fp16={fp16} {slots:?}: Δ {worst}",
                backend.as_str()
            ));
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
