//! The GPU backends, `onnxruntime-cuda` and `onnxruntime-tensorrt`: the
//! probe that decides whether they can run, their providers registered on
//! one CUDA stream per instance, TensorRT's batch profile and engine cache,
//! and the instances with what they report.
//!
//! Start-up never lies: every step that can fail (driver, device, provider
//! in the ONNX Runtime library, provider registration, session creation)
//! gives one reason, and the caller either falls back to CPU with that
//! reason logged and listed in the runtime, or refuses to start with it
//! (`[gpu] fallback`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use config::{Backend, ModelSpec, Precision, SlotDtype};
use cudarc::driver::CudaStream;
use ort::ep::{self, ExecutionProvider, ExecutionProviderDispatch};
use ort::session::builder::SessionBuilder;
use shm::{GpuState, ModelRuntime};

use crate::cuda::{self, Device, DeviceInput};
use crate::engine::{Backends, LoadedModel, joined};
use crate::onnxruntime::{OrtSession, environment};
use crate::{Engine, ExecError};

/// The provider options of one GPU model: what every session registers.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    pub model: String,
    pub backend: Backend,
    pub device_id: i32,
    /// Per-session arena limit, bytes.
    pub memory_limit: Option<usize>,
    pub fp16: bool,
    pub engine_cache: Option<PathBuf>,
    pub profile: Option<[String; 3]>,
}

impl ProviderOptions {
    /// Registers the providers on `builder`: TensorRT (when asked) then
    /// CUDA, both on `stream` when given, each with `error_on_failure`, so
    /// a provider that cannot load is an error naming ONNX Runtime's reason
    /// (never a silent CPU session).
    ///
    /// `stream` must be a live, non-default CUDA stream that outlives every
    /// session built from `builder`.
    pub fn register_on(
        &self,
        builder: SessionBuilder,
        stream: Option<*mut ()>,
    ) -> Result<SessionBuilder, ExecError> {
        let mut cuda = ep::CUDA::default()
            .with_device_id(self.device_id)
            // Exhaustive cuDNN search re-benchmarks every new batch size
            // (hundreds of ms each under dynamic batching); the heuristic
            // picks the same steady-state kernels for common convolutions.
            .with_conv_algorithm_search(ep::cuda::ConvAlgorithmSearch::Heuristic)
            .with_arena_extend_strategy(ep::ArenaExtendStrategy::SameAsRequested);
        if let Some(limit) = self.memory_limit {
            cuda = cuda.with_memory_limit(limit);
        }
        if let Some(raw) = stream {
            // SAFETY (of the provider option): the caller's contract above.
            #[allow(unsafe_code)]
            let with = unsafe { cuda.with_compute_stream(raw) };
            cuda = with;
        }
        let mut list: Vec<ExecutionProviderDispatch> = Vec::new();
        if self.backend == Backend::OnnxruntimeTensorrt {
            let mut trt = ep::TensorRT::default()
                .with_device_id(self.device_id)
                .with_fp16(self.fp16)
                .with_detailed_build_log(true);
            if let Some(dir) = &self.engine_cache {
                let dir = dir.display().to_string();
                trt = trt
                    .with_engine_cache(true)
                    .with_engine_cache_path(&dir)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&dir);
            }
            if let Some([min, opt, max]) = &self.profile {
                trt = trt
                    .with_profile_min_shapes(min)
                    .with_profile_opt_shapes(opt)
                    .with_profile_max_shapes(max);
            }
            if let Some(raw) = stream {
                // SAFETY: as for the CUDA provider, the same stream.
                #[allow(unsafe_code)]
                let with = unsafe { trt.with_compute_stream(raw) };
                trt = with;
            }
            list.push(trt.build().error_on_failure());
        }
        list.push(cuda.build().error_on_failure());
        builder
            .with_execution_providers(list)
            .map_err(|e| self.unavailable(format!("ONNX Runtime cannot register it: {e}")))
    }

    fn unavailable(&self, reason: String) -> ExecError {
        ExecError::GpuUnavailable {
            model: self.model.clone(),
            backend: self.backend.as_str(),
            reason,
        }
    }
}

/// How the sessions of one GPU model register their providers, each on a
/// stream of its own.
#[derive(Debug)]
pub struct Providers {
    options: ProviderOptions,
    device: Device,
}

impl Providers {
    /// A new stream for one session, and the builder with the providers on
    /// it. The session keeps the stream (and drops it last).
    pub fn register(
        &self,
        builder: SessionBuilder,
    ) -> Result<(SessionBuilder, Arc<CudaStream>), ExecError> {
        let stream = self
            .device
            .new_stream()
            .map_err(|r| self.options.unavailable(r))?;
        let builder = self
            .options
            .register_on(builder, Some(cuda::raw_stream(&stream)))?;
        Ok((builder, stream))
    }

    /// The device-side batch assembly for a session on `stream`; `None`
    /// (the session then reads gathered host input, and the executor
    /// normalises uint8 slots on the CPU) if it cannot be set up, logged.
    pub fn device_input(&self, spec: &ModelSpec, stream: &Arc<CudaStream>) -> Option<DeviceInput> {
        let pixels = (spec.slot_dtype == SlotDtype::Uint8).then_some(&spec.preprocess);
        match DeviceInput::new(
            &self.device,
            stream.clone(),
            spec.batching.max_batch as usize,
            &spec.input,
            pixels,
        ) {
            Ok(d) => Some(d),
            Err(why) => {
                tracing::warn!(model = %spec.name, "samples go through host memory: {why}");
                None
            }
        }
    }
}

/// TensorRT's min/opt/max shape strings for the model's input: batch 1,
/// `max_batch` and `max_batch` (`"<input>:<n>x<d1>x…"`). ONNX Runtime's
/// parser splits on the first `:` and on `,`, so an input whose name holds
/// either cannot be given a profile; the error says so.
pub fn trt_profile(spec: &ModelSpec) -> Result<[String; 3], String> {
    let name = &spec.input.name;
    if name.contains([':', ',']) {
        return Err(format!(
            "input {name:?} contains ':' or ',', which ONNX Runtime's TensorRT profile syntax cannot express"
        ));
    }
    let shape = |n: usize| {
        let dims: Vec<String> = spec
            .input
            .batch_shape(n)
            .iter()
            .map(|d| d.to_string())
            .collect();
        format!("{name}:{}", dims.join("x"))
    };
    let max = spec.batching.max_batch as usize;
    Ok([shape(1), shape(max), shape(max)])
}

/// The folder of a TensorRT engine cache: under the root, one folder per
/// model file sha256 and one per batch profile and precision, so retrained
/// weights or another profile never reuse a stale engine (ONNX Runtime's
/// own engine key hashes the file *name*, not the weights).
pub fn engine_cache_dir(root: &Path, model_sha256: &str, spec: &ModelSpec) -> PathBuf {
    let precision = if spec.gpu.fp16 { "fp16" } else { "fp32" };
    let i = &spec.input;
    root.join(model_sha256).join(format!(
        "batch1-{}-{}x{}x{}-{precision}",
        spec.batching.max_batch, i.height, i.width, i.channels
    ))
}

/// The provider's availability in the loaded ONNX Runtime library, as the
/// third probe step (after driver and device).
fn provider_built_in(spec: &ModelSpec, backends: &Backends) -> Result<(), String> {
    let available = match spec.backend {
        Backend::OnnxruntimeTensorrt => ep::TensorRT::is_available(),
        _ => ep::CUDA::is_available(),
    };
    match available {
        Ok(true) => Ok(()),
        Ok(false) => Err(format!(
            "the ONNX Runtime library {} was built without the {} provider (use the onnxruntime-gpu build; see the README's GPU section)",
            backends.ort_library().display(),
            if spec.backend == Backend::OnnxruntimeTensorrt {
                "TensorRT"
            } else {
                "CUDA"
            },
        )),
        Err(e) => Err(format!("cannot list ONNX Runtime's providers: {e}")),
    }
}

/// TensorRT engines in a cache folder (not its timing cache).
fn count_engines(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| {
        d.flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "engine"))
            .count()
    })
}

/// Loads the instances of a GPU model: probe in order (driver, device,
/// provider), then the first instance alone (TensorRT builds its engine
/// there, once) and the others in parallel, which load the cached engine.
pub fn instances(spec: &ModelSpec, backends: &Backends) -> Result<LoadedModel, ExecError> {
    let unavailable = |reason: String| ExecError::GpuUnavailable {
        model: spec.name.clone(),
        backend: spec.backend.as_str(),
        reason,
    };
    let device = cuda::probe(spec.gpu.device).map_err(unavailable)?;
    let env = environment(backends.ort_library())?;
    provider_built_in(spec, backends).map_err(unavailable)?;

    let trt = spec.backend == Backend::OnnxruntimeTensorrt;
    let engine_cache = if trt {
        crate::engine::model_cache(backends, spec, &spec.gpu.engine_cache_dir)
            .map(|(root, sha)| {
                // The default root is shared with other backends' caches.
                let root = if spec.gpu.engine_cache_dir.is_empty() {
                    root.join(Backend::OnnxruntimeTensorrt.as_str())
                } else {
                    root
                };
                engine_cache_dir(&root, &sha, spec)
            })
            .and_then(|dir| match std::fs::create_dir_all(&dir) {
                Ok(()) => Some(dir),
                Err(e) => {
                    tracing::warn!(model = %spec.name, "no TensorRT engine cache: {}: {e}", dir.display());
                    None
                }
            })
    } else {
        None
    };
    let profile = if trt {
        match trt_profile(spec) {
            Ok(p) => Some(p),
            Err(why) => {
                tracing::warn!(
                    model = %spec.name,
                    "no explicit TensorRT profile: {why}; TensorRT builds an engine per batch size, and warm-up builds them all at start"
                );
                None
            }
        }
    } else {
        None
    };
    let providers = Providers {
        options: ProviderOptions {
            model: spec.name.clone(),
            backend: spec.backend,
            device_id: device.ordinal as i32,
            memory_limit: (spec.gpu.memory_limit_mb > 0)
                .then(|| (spec.gpu.memory_limit_mb as usize).saturating_mul(1 << 20)),
            fp16: spec.gpu.fp16,
            engine_cache: engine_cache.clone(),
            profile,
        },
        device: device.clone(),
    };
    let pinned = pin_pool(&device, backends);
    let cached_before = engine_cache.as_deref().map_or(0, count_engines);
    let load = || -> Result<Box<dyn Engine>, ExecError> {
        Ok(Box::new(OrtSession::load_on(
            env.clone(),
            spec,
            Some(&providers),
        )?))
    };

    let n = spec.instances.count.max(1) as usize;
    let started = Instant::now();
    if trt {
        tracing::info!(
            model = %spec.name,
            cache = ?engine_cache,
            cached = cached_before,
            "loading the first TensorRT instance: with an empty cache this builds the engine, which can take minutes"
        );
    }
    let first = load()?;
    if trt {
        tracing::info!(
            model = %spec.name,
            seconds = started.elapsed().as_secs_f64(),
            "first TensorRT instance ready"
        );
    }
    let rest: Vec<Result<Box<dyn Engine>, ExecError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (1..n).map(|_| s.spawn(load)).collect();
        handles
            .into_iter()
            .map(|h| joined(spec, h.join()))
            .collect()
    });
    let on_device = first.reads_slots();
    let mut engines = vec![first];
    for e in rest {
        engines.push(e?);
    }

    let engine_cache_state = match (&engine_cache, trt) {
        (_, false) => "none",
        (None, true) => "off",
        (Some(_), true) if cached_before > 0 => "loaded",
        (Some(_), true) => "built",
    };
    let (sm_major, sm_minor) = device.sm;
    let mut fallbacks = Vec::new();
    if !on_device {
        fallbacks.push(
            "batches go through host memory (the device input could not be set up; see the log), and uint8 slots are normalised on the CPU"
                .to_string(),
        );
    }
    Ok(LoadedModel {
        device: Some(device.clone()),
        engines,
        runtime: ModelRuntime {
            model: spec.name.clone(),
            backend: spec.backend,
            precision: if trt && spec.gpu.fp16 {
                Precision::F16
            } else {
                Precision::F32
            },
            device: format!("{} (sm_{sm_major}{sm_minor})", device.name),
            layout: format!("{n} sessions, one CUDA stream each"),
            fallbacks,
            calibration: None,
            gpu: Some(GpuState {
                ordinal: device.ordinal,
                memory_used_bytes: device.used_bytes().unwrap_or(0),
                memory_total_bytes: device.total_bytes as u64,
                engine_cache: engine_cache_state.into(),
                pinned_slots: pinned,
                slots_to_device: on_device,
                engine_cache_dir: engine_cache.map(|d| d.display().to_string()),
            }),
        },
    })
}

/// Registers the tensor pool with the driver, once per process (portable,
/// so every model's context sees it): copies out of the slots are then
/// asynchronous DMA. Whether it is registered; a failure is logged and the
/// copies stay synchronous.
fn pin_pool(device: &Device, backends: &Backends) -> bool {
    static POOL: std::sync::Mutex<Option<cuda::Registered>> = std::sync::Mutex::new(None);
    let Some(range) = backends.pool() else {
        return false;
    };
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.as_ref().is_some_and(|r| r.covers(range)) {
        return true;
    }
    match cuda::Registered::new(device, range) {
        Ok(r) => {
            tracing::info!(
                bytes = r.len(),
                "tensor pool registered with the CUDA driver (pinned slots)"
            );
            *pool = Some(r);
            true
        }
        Err(why) => {
            tracing::warn!("slots are not pinned, so copies from them are synchronous: {why}");
            false
        }
    }
}

/// The one line a fallback logs and lists: why the GPU backend could not
/// run, and what runs instead.
pub fn fallback_line(e: &ExecError) -> String {
    match e {
        ExecError::GpuUnavailable {
            backend, reason, ..
        } => format!(
            "{backend} cannot run: {reason}; gpu.fallback is \"cpu\", so onnxruntime-cpu runs instead"
        ),
        other => format!(
            "GPU backend failed: {other}; gpu.fallback is \"cpu\", so onnxruntime-cpu runs instead"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(input: &str, max_batch: u32) -> ModelSpec {
        let mut s = crate::batcher::tests::spec(max_batch, 1000, &[]);
        s.input.name = input.into();
        s.input.height = 224;
        s.input.width = 224;
        s.input.channels = 3;
        s.input.layout = config::Layout::Nchw;
        s
    }

    #[test]
    fn the_trt_profile_spans_batch_1_to_max_in_the_models_layout() {
        let [min, opt, max] = trt_profile(&spec("images", 8)).unwrap();
        assert_eq!(min, "images:1x3x224x224");
        assert_eq!(opt, "images:8x3x224x224");
        assert_eq!(max, "images:8x3x224x224");
    }

    #[test]
    fn an_input_name_the_profile_syntax_cannot_hold_is_refused() {
        for name in ["input:0", "a,b"] {
            let e = trt_profile(&spec(name, 4)).unwrap_err();
            assert!(e.contains(name) && e.contains("cannot express"), "{e}");
        }
    }

    #[test]
    fn the_engine_cache_is_keyed_by_weights_profile_and_precision() {
        let root = Path::new("/cache");
        let mut s = spec("images", 4);
        let a = engine_cache_dir(root, "aa11", &s);
        assert_eq!(a, Path::new("/cache/aa11/batch1-4-224x224x3-fp32"));
        // Retrained weights (another sha256), another max batch, FP16,
        // another input size: each a folder of its own, so no stale engine
        // is ever loaded.
        assert_ne!(engine_cache_dir(root, "bb22", &s), a);
        s.batching.max_batch = 8;
        let b = engine_cache_dir(root, "aa11", &s);
        s.gpu.fp16 = true;
        let c = engine_cache_dir(root, "aa11", &s);
        s.input.height = 320;
        let d = engine_cache_dir(root, "aa11", &s);
        let all = [&a, &b, &c, &d];
        for (i, x) in all.iter().enumerate() {
            for y in &all[i + 1..] {
                assert_ne!(x, y);
            }
        }
    }
}
