//! ONNX Runtime on CPU: one session per instance, each with its own
//! intra-op thread budget (`instances.intra_threads`), spinning off so idle
//! instances leave the cores to the preprocess workers, one inter-op thread.

use std::path::Path;
use std::sync::{Mutex, OnceLock};

use config::{InputSpec, ModelSpec};
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::{GraphOptimizationLevel, SessionBuilder};
use ort::value::{Outlet, TensorElementType, TensorRef};

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
        .build()
        .map_err(|e| ExecError::Runtime {
            library: "ONNX Runtime",
            message: e.to_string(),
        })?;
    Ok(ENV.get_or_init(|| env).clone())
}

/// One ONNX Runtime CPU session.
pub struct OrtCpu {
    model: String,
    session: Session,
    input: InputSpec,
    input_name: String,
    output_name: String,
    outputs: usize,
    max_batch: usize,
}

impl std::fmt::Debug for OrtCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OrtCpu")
            .field("model", &self.model)
            .field("input", &self.input_name)
            .field("output", &self.output_name)
            .finish()
    }
}

impl OrtCpu {
    /// Creates a session for `spec` and checks the model against the spec:
    /// input name, element type and shape; output name, type and width.
    pub fn load(env: Environment, spec: &ModelSpec) -> Result<Self, ExecError> {
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
        })
    }
}

fn configure(env: &Environment, threads: usize) -> Result<SessionBuilder, ort::Error> {
    Ok(Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(threads)?
        .with_inter_threads(1)?
        .with_intra_op_spinning(false)?
        .with_inter_op_spinning(false)?)
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

impl Engine for OrtCpu {
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
        let outputs = self
            .session
            .run(ort::inputs![self.input_name.as_str() => tensor])
            .map_err(infer)?;
        let value = outputs
            .get(&self.output_name)
            .ok_or_else(|| ExecError::Inference {
                model: self.model.clone(),
                message: format!(
                    "output {:?} missing from the run's results",
                    self.output_name
                ),
            })?;
        let (_, data) = value.try_extract_tensor::<f32>().map_err(infer)?;
        if data.len() != batch * self.outputs {
            return Err(ExecError::OutputWidth {
                model: self.model.clone(),
                name: self.output_name.clone(),
                actual: data.len() / batch,
                expected: self.outputs,
            });
        }
        Ok(data.to_vec())
    }

    fn outputs(&self) -> usize {
        self.outputs
    }
}
