//! ONNX Runtime: one session per instance. On CPU each has its own intra-op
//! thread budget (`instances.intra_threads`), spinning off so idle instances
//! leave the cores to the preprocess workers, one inter-op thread. On a GPU
//! (`onnxruntime-cuda`, `onnxruntime-tensorrt`) each session runs on its own
//! non-default CUDA stream, and a provider that cannot be registered is an
//! error with ONNX Runtime's reason, never a silent CPU run.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use config::{InputSpec, ModelSpec};
use ort::environment::Environment;
use ort::logging::LogLevel;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{Outlet, TensorElementType, TensorRef};

use crate::cuda::{DeviceInput, HostSample};
use crate::{Engine, ExecError};

/// The process-wide ONNX Runtime environment, loading the library from
/// `library` on the first call. ONNX Runtime allows one environment per
/// process, so later calls return the same one (whatever path they name).
pub fn environment(library: &Path) -> Result<Environment, ExecError> {
    static ENV: OnceLock<Environment> = OnceLock::new();
    static INIT: Mutex<()> = Mutex::new(());
    if let Some(env) = ENV.get() {
        return Ok(env.clone());
    }
    let _guard = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(env) = ENV.get() {
        return Ok(env.clone());
    }
    // ort resolves a relative path against the executable's folder first;
    // make the caller's meaning (the working directory) explicit instead.
    let path = crate::engine::library_path("ONNX Runtime", library, "executor.ort_library")?;
    let lib_err = |message: String| ExecError::RuntimeLibrary {
        library: "ONNX Runtime",
        path: path.clone(),
        message,
    };
    let env = ort::init_from(&path)
        .map_err(|e| lib_err(e.to_string()))?
        .with_name("mmgate")
        .with_logger(Arc::new(to_tracing))
        .build()
        .map_err(|e| ExecError::Runtime {
            library: "ONNX Runtime",
            message: e.to_string(),
        })?;
    Ok(ENV.get_or_init(|| env).clone())
}

/// ONNX Runtime's own log lines, as `tracing` events (target
/// `onnxruntime`): the reason a provider failed to load is only told there.
fn to_tracing(level: LogLevel, category: &str, _id: &str, location: &str, message: &str) {
    match level {
        LogLevel::Verbose => {
            tracing::trace!(target: "onnxruntime", category, location, "{message}")
        }
        LogLevel::Info => tracing::debug!(target: "onnxruntime", category, location, "{message}"),
        LogLevel::Warning => tracing::warn!(target: "onnxruntime", category, location, "{message}"),
        LogLevel::Error | LogLevel::Fatal => {
            tracing::error!(target: "onnxruntime", category, location, "{message}")
        }
    }
}

/// One ONNX Runtime session.
pub struct OrtSession {
    model: String,
    session: Session,
    input: InputSpec,
    input_name: String,
    output_name: String,
    outputs: usize,
    max_batch: usize,
    /// GPU providers: the batch is assembled on the device, on the
    /// session's own stream, straight from the slots.
    device_input: Option<DeviceInput>,
    device_id: i32,
    /// The CUDA stream the session computes on (GPU providers); declared
    /// after `session` so it is destroyed after it.
    _stream: Option<Arc<cudarc::driver::CudaStream>>,
}

impl std::fmt::Debug for OrtSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtSession")
            .field("model", &self.model)
            .field("input", &self.input_name)
            .field("output", &self.output_name)
            .finish()
    }
}

impl OrtSession {
    /// Creates a CPU session for `spec`; see [`OrtSession::load_on`].
    pub fn load(env: Environment, spec: &ModelSpec) -> Result<Self, ExecError> {
        Self::load_on(env, spec, None)
    }

    /// Creates a session for `spec`, on `gpu` when given (its providers
    /// registered with `error_on_failure`), and checks the model against
    /// the spec: input name, element type and shape; output name, type and
    /// width.
    pub fn load_on(
        env: Environment,
        spec: &ModelSpec,
        gpu: Option<&crate::gpu::Providers>,
    ) -> Result<Self, ExecError> {
        let model = spec.name.clone();
        let path = Path::new(&spec.file);
        if !path.is_file() {
            return Err(ExecError::ModelFileMissing {
                model,
                path: path.to_path_buf(),
            });
        }
        let load_err = |message: String| ExecError::ModelLoad {
            model: model.clone(),
            path: path.to_path_buf(),
            message,
        };
        let threads = spec.instances.intra_threads.max(1) as usize;
        let mut builder = configure(&env, threads).map_err(|e| load_err(e.to_string()))?;
        let mut stream = None;
        let mut device_input = None;
        if let Some(gpu) = gpu {
            let (b, s) = gpu.register(builder)?;
            builder = b;
            device_input = gpu.device_input(spec, &s);
            stream = Some(s);
        }
        let session = builder
            .commit_from_file(path)
            .map_err(|e| load_err(e.to_string()))?;

        let input_name = spec.input.name.clone();
        let input = find(session.inputs(), &input_name).ok_or_else(|| ExecError::NoSuchInput {
            model: model.clone(),
            name: input_name.clone(),
            available: names(session.inputs()),
        })?;
        check_f32(&model, input)?;
        check_input_shape(spec, input)?;

        let out = if spec.output.name.is_empty() {
            session
                .outputs()
                .first()
                .ok_or_else(|| ExecError::NoOutputs {
                    model: model.clone(),
                })?
        } else {
            find(session.outputs(), &spec.output.name).ok_or_else(|| ExecError::NoSuchOutput {
                model: model.clone(),
                name: spec.output.name.clone(),
                available: names(session.outputs()),
            })?
        };
        check_f32(&model, out)?;
        let labels = spec.output.labels.len();
        if let Some(width) = static_width(out)
            && width != labels
        {
            return Err(ExecError::OutputWidth {
                model,
                name: out.name().to_string(),
                actual: width,
                expected: labels,
            });
        }
        let output_name = out.name().to_string();
        tracing::debug!(
            model,
            input = input_name,
            output = output_name,
            threads,
            "session loaded"
        );
        Ok(Self {
            model,
            session,
            input: spec.input.clone(),
            input_name,
            output_name,
            outputs: labels,
            max_batch: spec.batching.max_batch as usize,
            device_input,
            device_id: spec.gpu.device as i32,
            _stream: stream,
        })
    }
}

fn configure(env: &Environment, threads: usize) -> Result<SessionBuilder, ort::Error> {
    Ok(Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(threads)?
        .with_inter_threads(1)?
        .with_intra_op_spinning(false)?
        .with_inter_op_spinning(false)?
        .with_log_level(LogLevel::Warning)?)
}

fn find<'a>(outlets: &'a [Outlet], name: &str) -> Option<&'a Outlet> {
    outlets.iter().find(|o| o.name() == name)
}

fn names(outlets: &[Outlet]) -> Vec<String> {
    outlets.iter().map(|o| o.name().to_string()).collect()
}

fn check_f32(model: &str, o: &Outlet) -> Result<(), ExecError> {
    match o.dtype().tensor_type() {
        Some(TensorElementType::Float32) => Ok(()),
        other => Err(ExecError::TensorType {
            model: model.to_string(),
            name: o.name().to_string(),
            actual: other.map_or_else(|| "not a tensor".to_string(), |t| format!("a {t:?} tensor")),
            expected: "a float32 tensor".into(),
        }),
    }
}

/// The model's input must be rank 4 in the spec's layout, with a dynamic
/// batch dimension (or a fixed 1 when `max_batch` is 1).
fn check_input_shape(spec: &ModelSpec, o: &Outlet) -> Result<(), ExecError> {
    let Some(actual) = o.dtype().tensor_shape() else {
        return Ok(());
    };
    let mut expected: Vec<i64> = spec
        .input
        .batch_shape(1)
        .iter()
        .map(|&d| d as i64)
        .collect();
    expected[0] = if spec.batching.max_batch == 1 { 1 } else { -1 };
    let fits = actual.len() == expected.len()
        && actual.iter().zip(&expected).all(|(&a, &e)| a < 0 || a == e);
    if fits {
        Ok(())
    } else {
        Err(ExecError::InputShape {
            model: spec.name.clone(),
            name: o.name().to_string(),
            actual: actual.to_vec(),
            expected,
        })
    }
}

/// Values per sample of an output, when its non-batch dims are all static.
fn static_width(o: &Outlet) -> Option<usize> {
    let shape = o.dtype().tensor_shape()?;
    let rest = shape.get(1..)?;
    rest.iter()
        .try_fold(1usize, |acc, &d| (d >= 0).then(|| acc * d as usize))
}

impl OrtSession {
    fn run_on_device(&mut self, samples: &[HostSample<'_>]) -> Result<Vec<f32>, ExecError> {
        let batch = samples.len();
        self.check_batch(batch)?;
        let infer = |message: String| ExecError::Inference {
            model: self.model.clone(),
            message,
        };
        let dev = self
            .device_input
            .as_mut()
            .ok_or_else(|| infer("no device input on this session".into()))?;
        let ptr = dev.assemble(samples).map_err(infer)?;
        let info = ort::memory::MemoryInfo::new(
            ort::memory::AllocationDevice::CUDA,
            self.device_id,
            ort::memory::AllocatorType::Device,
            ort::memory::MemoryType::Default,
        )
        .map_err(|e| infer(e.to_string()))?;
        let shape = ort::value::Shape::from(self.input.batch_shape(batch));
        // SAFETY: `ptr` is the device buffer `assemble` filled, holding at
        // least `batch × elements` f32s on this session's device; it lives
        // in `self.device_input`, which outlives this run, and nothing else
        // writes it until the run is over (one thread owns the session).
        #[allow(unsafe_code)]
        let tensor = unsafe {
            ort::value::TensorRefMut::<f32>::from_raw(info, ptr as *mut std::ffi::c_void, shape)
        }
        .map_err(|e| infer(e.to_string()))?;
        self.infer(tensor, batch)
    }

    /// Runs the session on one input value of `batch` samples; the scores.
    fn infer<'v>(
        &mut self,
        input: impl Into<ort::session::SessionInputValue<'v>>,
        batch: usize,
    ) -> Result<Vec<f32>, ExecError> {
        let input: ort::session::SessionInputValue<'v> = input.into();
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => input])
            .map_err(|e| ExecError::Inference {
                model: self.model.clone(),
                message: e.to_string(),
            })?;
        scores(
            &self.model,
            &self.output_name,
            self.outputs,
            &outputs,
            batch,
        )
    }

    fn check_batch(&self, batch: usize) -> Result<(), ExecError> {
        if batch == 0 || batch > self.max_batch {
            return Err(ExecError::BatchTooLarge {
                model: self.model.clone(),
                batch,
                max_batch: self.max_batch,
            });
        }
        Ok(())
    }
}

/// The named output of a finished run of `model`: `batch × width` values.
fn scores(
    model: &str,
    output_name: &str,
    width: usize,
    outputs: &ort::session::SessionOutputs<'_>,
    batch: usize,
) -> Result<Vec<f32>, ExecError> {
    let value = outputs
        .get(output_name)
        .ok_or_else(|| ExecError::Inference {
            model: model.to_string(),
            message: format!("output {output_name:?} missing from the run's results"),
        })?;
    let (_, data) = value
        .try_extract_tensor::<f32>()
        .map_err(|e| ExecError::Inference {
            model: model.to_string(),
            message: e.to_string(),
        })?;
    if data.len() != batch * width {
        return Err(ExecError::OutputWidth {
            model: model.to_string(),
            name: output_name.to_string(),
            actual: data.len() / batch,
            expected: width,
        });
    }
    Ok(data.to_vec())
}

impl Engine for OrtSession {
    fn reads_slots(&self) -> bool {
        self.device_input.is_some()
    }

    /// The batch is copied from the slots into the device buffer and (for
    /// uint8 slots) normalised there, all on the session's stream, then
    /// run from device memory with no further copy. ONNX Runtime
    /// synchronises its compute stream (ours) before `run` returns, so the
    /// copies out of the slots are complete when this returns.
    fn run_slots(&mut self, samples: &[HostSample<'_>]) -> Result<Vec<f32>, ExecError> {
        let result = self.run_on_device(samples);
        if result.is_err()
            && let Some(dev) = &self.device_input
        {
            // Copies already queued must finish before the slots are
            // answered (and may be leased again).
            let _ = dev.stream().synchronize();
        }
        result
    }

    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError> {
        if batch == 0 || batch > self.max_batch {
            return Err(ExecError::BatchTooLarge {
                model: self.model.clone(),
                batch,
                max_batch: self.max_batch,
            });
        }
        let expected = batch * self.input.elements();
        if input.len() != expected {
            return Err(ExecError::InputSize {
                model: self.model.clone(),
                batch,
                expected,
                actual: input.len(),
            });
        }
        let infer = |e: ort::Error| ExecError::Inference {
            model: self.model.clone(),
            message: e.to_string(),
        };
        let tensor =
            TensorRef::from_array_view((self.input.batch_shape(batch), input)).map_err(infer)?;
        self.infer(tensor, batch)
    }

    fn outputs(&self) -> usize {
        self.outputs
    }
}
