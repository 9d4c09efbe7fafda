//! The backend seam: one [`Engine`] is one model *instance* (an ONNX Runtime
//! session with its own thread budget on CPU; later one CUDA stream each).
//! The batcher only sees this trait, so a backend is a module plus a match
//! arm in [`load`].

use std::path::{Path, PathBuf};

use spec::{Backend, ModelSpec};

use crate::ExecError;

/// One model instance. It is owned by exactly one instance thread, so `run`
/// takes `&mut self` and may block.
pub trait Engine: Send {
    /// Runs `batch` samples laid out back to back in `input` (each
    /// `spec.input.elements()` values, in the model's layout) and returns
    /// `batch × outputs()` raw values, sample-major.
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError>;

    /// Values per sample (equals `output.labels.len()`, checked at load).
    fn outputs(&self) -> usize;
}

/// What backends share across all models and instances of this process.
#[derive(Debug, Clone)]
pub struct Backends {
    ort_library: PathBuf,
}

impl Backends {
    /// `ort_library` is the absolute path of `libonnxruntime.so.*`; it is
    /// loaded the first time an ONNX Runtime model is loaded.
    pub fn new(ort_library: impl Into<PathBuf>) -> Self {
        Self {
            ort_library: ort_library.into(),
        }
    }

    pub fn ort_library(&self) -> &Path {
        &self.ort_library
    }
}

/// Loads one instance of `spec` on its backend.
pub fn load(spec: &ModelSpec, backends: &Backends) -> Result<Box<dyn Engine>, ExecError> {
    match spec.backend {
        Backend::OnnxruntimeCpu => {
            let env = crate::ort_cpu::environment(backends.ort_library())?;
            Ok(Box::new(crate::ort_cpu::OrtCpu::load(env, spec)?))
        }
    }
}

/// Loads `spec.instances.count` instances (in parallel: session creation
/// optimises the graph, which takes a while) and runs one warm-up batch of
/// `warmup_batch` zero samples on each.
pub fn load_instances(
    spec: &ModelSpec,
    backends: &Backends,
    warmup_batch: usize,
) -> Result<Vec<Box<dyn Engine>>, ExecError> {
    let n = spec.instances.count.max(1) as usize;
    let results: Vec<Result<Box<dyn Engine>, ExecError>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|_| {
                s.spawn(|| {
                    let mut engine = load(spec, backends)?;
                    warm_up(spec, engine.as_mut(), warmup_batch)?;
                    Ok(engine)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(ExecError::Instance {
                        model: spec.name.clone(),
                        message: "panicked while loading".into(),
                    })
                })
            })
            .collect()
    });
    results.into_iter().collect()
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
