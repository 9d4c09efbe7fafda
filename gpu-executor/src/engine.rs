//! The backend seam: one [`Engine`] is one model *instance* (an ONNX Runtime
//! session with its own thread budget, or an OpenVINO infer request on its
//! own CPU stream; later one CUDA stream each). The batcher only sees this
//! trait, so a backend is a module plus a match arm in [`load_model`].

use std::path::{Path, PathBuf};

use config::{Backend, ExecutorSection, GpuFallback, ModelSpec, Precision, PrecisionRequest};
use shm::ModelRuntime;

use crate::ExecError;

/// One model instance. It is owned by exactly one instance thread, so `run`
/// takes `&mut self` and may block.
pub trait Engine: Send {
    /// Runs `batch` samples laid out back to back in `input` (each
    /// `spec.input.elements()` values, in the model's layout) and returns
    /// `batch × outputs()` raw values, sample-major.
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError>;

    /// Runs like [`Engine::run`] when the batcher saw nothing else to do:
    /// no other batch of the model running, none queued, no sample in
    /// preprocessing. An engine may then use every core; under load it
    /// keeps to its own share.
    fn run_alone(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError> {
        self.run(input, batch)
    }

    /// Whether this instance is its model's latency lane (OpenVINO's, one
    /// stream over every core): the batcher gives it a batch found alone
    /// and, under load, critical samples and those of a tenant with
    /// nothing running, while the model's other instances run at a lower
    /// CPU priority (`scheduling.throughput_priority`), so that the lane's
    /// threads get the cores first and a light tenant's sample does not
    /// queue behind a flood's.
    fn latency_lane(&self) -> bool {
        false
    }

    /// Values per sample (equals `output.labels.len()`, checked at load).
    fn outputs(&self) -> usize;

    /// Whether the engine takes a batch straight from its shared-memory
    /// slots ([`Engine::run_slots`]: a GPU instance copying them to the
    /// device itself) rather than gathered into one host buffer.
    fn reads_slots(&self) -> bool {
        false
    }

    /// Runs a batch of samples still in their slots (float or uint8, as the
    /// model's `slot_dtype`). Called only when [`Engine::reads_slots`]; the
    /// slots stay leased until this returns, so the engine must be done
    /// reading them (its copies complete) by then.
    fn run_slots(
        &mut self,
        samples: &[crate::cuda::HostSample<'_>],
    ) -> Result<Vec<f32>, ExecError> {
        let _ = samples;
        Err(ExecError::Protocol(
            "this engine reads gathered host input, not slots".into(),
        ))
    }
}

/// What backends share across all models and instances of this process:
/// where their libraries are, and where compiled models are cached.
#[derive(Debug, Clone, Default)]
pub struct Backends {
    ort_library: PathBuf,
    openvino_library: PathBuf,
    cache_dir: Option<PathBuf>,
    /// The tensor pool's mapping (address, length), which a GPU backend
    /// registers with the driver so slot copies are asynchronous DMA.
    pool: Option<(usize, usize)>,
    /// `scheduling.throughput_priority`, for models with a latency lane.
    throughput_priority: config::ThroughputPriority,
}

impl Backends {
    /// `ort_library` is the absolute path of `libonnxruntime.so.*`; it is
    /// loaded the first time an ONNX Runtime model is loaded.
    pub fn new(ort_library: impl Into<PathBuf>) -> Self {
        Self {
            ort_library: ort_library.into(),
            ..Self::default()
        }
    }

    /// The libraries and cache folder of the config's `[executor]`.
    pub fn from_section(e: &ExecutorSection) -> Self {
        Self::new(&e.ort_library)
            .with_openvino(&e.openvino_library)
            .with_cache_dir((!e.cache_dir.is_empty()).then(|| PathBuf::from(&e.cache_dir)))
    }

    /// `libopenvino_c.so.*`, loaded the first time an OpenVINO model is.
    pub fn with_openvino(mut self, library: impl Into<PathBuf>) -> Self {
        self.openvino_library = library.into();
        self
    }

    /// The tensor pool a GPU backend registers with the driver.
    pub fn with_pool(mut self, range: (*const u8, usize)) -> Self {
        self.pool = Some((range.0 as usize, range.1));
        self
    }

    pub(crate) fn pool(&self) -> Option<(*const u8, usize)> {
        self.pool.map(|(p, l)| (p as *const u8, l))
    }

    /// The CPU priority of the throughput instances of a model with a
    /// latency lane (`scheduling.throughput_priority`).
    pub fn with_throughput_priority(mut self, p: config::ThroughputPriority) -> Self {
        self.throughput_priority = p;
        self
    }

    pub fn throughput_priority(&self) -> config::ThroughputPriority {
        self.throughput_priority
    }

    pub fn with_cache_dir(mut self, dir: Option<PathBuf>) -> Self {
        self.cache_dir = dir;
        self
    }

    pub fn ort_library(&self) -> &Path {
        &self.ort_library
    }

    pub fn openvino_library(&self) -> &Path {
        &self.openvino_library
    }

    /// The compiled-model cache of `spec` on `backend`: a folder per model
    /// file sha256, so retrained weights never meet a stale compilation.
    pub(crate) fn cache_for(&self, spec: &ModelSpec, backend: Backend) -> Option<PathBuf> {
        let (root, sha) = model_cache(self, spec, "")?;
        let dir = root.join(backend.as_str()).join(sha);
        match std::fs::create_dir_all(&dir) {
            Ok(()) => Some(dir),
            Err(e) => {
                tracing::warn!(model = %spec.name, "no compiled-model cache: {}: {e}", dir.display());
                None
            }
        }
    }
}

/// A runtime library's path made absolute (against the working directory,
/// which is what the config meant), checked to be a file; the error names
/// the library, the path and the setting that chooses it.
pub(crate) fn library_path(
    library: &'static str,
    path: &Path,
    setting: &str,
) -> Result<PathBuf, ExecError> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if path.is_file() {
        return Ok(path);
    }
    Err(ExecError::RuntimeLibrary {
        library,
        path,
        message: format!("no such file (run `make setup`, or set {setting})"),
    })
}

/// A model's cache root (`root` when set, else `executor.cache_dir`) and
/// its file's sha256; `None`, logged, when there is no cache.
pub(crate) fn model_cache(
    backends: &Backends,
    spec: &ModelSpec,
    root: &str,
) -> Option<(PathBuf, String)> {
    let root = if root.is_empty() {
        backends.cache_dir.clone()?
    } else {
        PathBuf::from(root)
    };
    match file_sha256(Path::new(&spec.file)) {
        Ok(sha) => Some((root, sha)),
        Err(e) => {
            tracing::warn!(model = %spec.name, "no compiled-model cache: reading {}: {e}", spec.file);
            None
        }
    }
}

fn file_sha256(path: &Path) -> std::io::Result<String> {
    use sha2::Digest;
    let mut hasher = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(config::hex(&hasher.finalize()))
}

/// Loads one ONNX Runtime instance of `spec`.
pub fn load(spec: &ModelSpec, backends: &Backends) -> Result<Box<dyn Engine>, ExecError> {
    let env = crate::onnxruntime::environment(backends.ort_library())?;
    Ok(Box::new(crate::onnxruntime::OrtSession::load(env, spec)?))
}

/// A model's engine instances, warmed up, and what actually runs them.
pub struct LoadedModel {
    pub engines: Vec<Box<dyn Engine>>,
    pub runtime: ModelRuntime,
    /// The CUDA device, for a model a GPU backend runs.
    pub device: Option<crate::cuda::Device>,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("engines", &self.engines.len())
            .field("runtime", &self.runtime)
            .finish()
    }
}

/// Loads `spec` on its backend, falling back as the spec allows (each
/// fallback logged once and listed in the runtime), checks a reduced
/// precision against f32 when the spec has `[precision]`, and warms every
/// instance up with a batch of `warmup_batch`.
pub fn load_model(
    spec: &ModelSpec,
    backends: &Backends,
    warmup_batch: usize,
) -> Result<LoadedModel, ExecError> {
    let mut fallbacks = Vec::new();
    let mut loaded = match spec.backend {
        Backend::OnnxruntimeCpu => ort_instances(spec, backends)?,
        Backend::OnnxruntimeCuda | Backend::OnnxruntimeTensorrt => {
            // Warm-up is part of the GPU attempt: TensorRT may build its
            // engines then, and a failure there falls back like any other.
            let gpu = crate::gpu::instances(spec, backends).and_then(|mut loaded| {
                warm_up_all(spec, &mut loaded.engines, &gpu_sizes(spec), true)?;
                if let (Some(d), Some(g)) = (&loaded.device, loaded.runtime.gpu.as_mut()) {
                    // After warm-up: the arenas have grown to max_batch.
                    g.memory_used_bytes = d.used_bytes().unwrap_or(g.memory_used_bytes);
                }
                Ok(loaded)
            });
            match gpu {
                Ok(loaded) => {
                    loaded
                        .runtime
                        .fallbacks
                        .iter()
                        .for_each(|l| fallbacks.push(l.clone()));
                    loaded
                }
                Err(e) if spec.gpu.fallback == GpuFallback::Cpu => {
                    let line = crate::gpu::fallback_line(&e);
                    tracing::warn!(model = %spec.name, "{line}");
                    fallbacks.push(line);
                    ort_instances(spec, backends)?
                }
                Err(e) => return Err(e),
            }
        }
        Backend::Openvino => match crate::openvino_cpu::library(backends.openvino_library())
            .and_then(|()| crate::backend_openvino::instances(spec, backends, &mut fallbacks))
        {
            Ok(loaded) => loaded,
            // A precision verdict (refused by the check, or bf16 asked of a
            // CPU without it) is the spec's decision, not a broken library.
            Err(e @ (ExecError::PrecisionCheck { .. } | ExecError::Precision { .. })) => {
                return Err(e);
            }
            // Any other OpenVINO failure under `auto` (library, plugin or
            // frontend missing, compile error): ONNX Runtime serves instead,
            // and reports a model that is really broken itself.
            Err(e) if spec.openvino.precision == PrecisionRequest::Auto => {
                let line = format!("{e}; precision is auto, so onnxruntime-cpu (f32) runs instead");
                tracing::warn!(model = %spec.name, "{line}");
                fallbacks.push(line);
                ort_instances(spec, backends)?
            }
            Err(e) => return Err(e),
        },
    };
    loaded.runtime.fallbacks = fallbacks;
    if !loaded.runtime.backend.is_gpu() {
        // Batches of one too: under contention batches hold one sample, and
        // a quiet service sends the latency lane little else.
        let mut sizes = vec![1, warmup_batch];
        sizes.dedup();
        warm_up_all(spec, &mut loaded.engines, &sizes, false)?;
    }
    Ok(loaded)
}

fn ort_instances(spec: &ModelSpec, backends: &Backends) -> Result<LoadedModel, ExecError> {
    let n = spec.instances.count.max(1) as usize;
    // In parallel: session creation optimises the graph, which takes a while.
    let results: Vec<Result<Box<dyn Engine>, ExecError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n).map(|_| s.spawn(|| load(spec, backends))).collect();
        handles
            .into_iter()
            .map(|h| joined(spec, h.join()))
            .collect()
    });
    let engines = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    Ok(LoadedModel {
        device: None,
        engines,
        runtime: ModelRuntime {
            model: spec.name.clone(),
            backend: Backend::OnnxruntimeCpu,
            precision: Precision::F32,
            device: cpu_name(),
            layout: format!(
                "{n} sessions × {} intra-op threads",
                spec.instances.intra_threads
            ),
            fallbacks: Vec::new(),
            calibration: None,
            gpu: None,
        },
    })
}

pub(crate) fn joined<T>(
    spec: &ModelSpec,
    r: std::thread::Result<Result<T, ExecError>>,
) -> Result<T, ExecError> {
    r.unwrap_or_else(|_| {
        Err(ExecError::Instance {
            model: spec.name.clone(),
            message: "panicked while loading".into(),
        })
    })
}

/// The CPU's model name from /proc/cpuinfo ("CPU" when unknown).
pub fn cpu_name() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "CPU".into())
}

/// Warms every instance up at once, so that instances sharing a compiled
/// model each warm their own request.
/// The batch sizes a GPU instance warms up with: every one, since TensorRT
/// builds (or loads) an engine per shape it has no profile for and cuDNN
/// picks kernels per shape, so no request pays for that later.
fn gpu_sizes(spec: &ModelSpec) -> Vec<usize> {
    (1..=spec.batching.max_batch as usize).collect()
}

/// Warms every instance up at once (`first_alone`: the first one before
/// the others, so that TensorRT builds each engine once and the others
/// load it from the cache instead of building it beside it).
fn warm_up_all(
    spec: &ModelSpec,
    engines: &mut [Box<dyn Engine>],
    sizes: &[usize],
    first_alone: bool,
) -> Result<(), ExecError> {
    let engines = match engines.split_first_mut() {
        Some((first, rest)) if first_alone => {
            sizes
                .iter()
                .try_for_each(|&n| warm_up(spec, first.as_mut(), n))?;
            rest
        }
        _ => engines,
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = engines
            .iter_mut()
            .map(|e| s.spawn(move || sizes.iter().try_for_each(|&n| warm_up(spec, e.as_mut(), n))))
            .collect();
        handles.into_iter().try_for_each(|h| joined(spec, h.join()))
    })?;
    Ok(())
}

/// Runs `batch` zero samples and checks the output size.
pub fn warm_up(spec: &ModelSpec, engine: &mut dyn Engine, batch: usize) -> Result<(), ExecError> {
    let input = vec![0.0f32; batch * spec.input.elements()];
    let out = engine.run(&input, batch)?;
    let want = batch * spec.output.labels.len();
    if out.len() != want {
        return Err(ExecError::OutputWidth {
            model: spec.name.clone(),
            name: spec.output.name.clone(),
            actual: out.len() / batch.max(1),
            expected: spec.output.labels.len(),
        });
    }
    Ok(())
}
