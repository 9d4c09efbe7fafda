//! OpenVINO on the CPU. It reads the model's ONNX file directly and runs it
//! in BF16 where the CPU has AMX or AVX-512 BF16 (about twice to three and a
//! half times ONNX Runtime's FP32 throughput), else in f32.
//!
//! Layout: one compiled model with `num_streams` CPU streams shares
//! `threads` inference threads; each engine instance owns one infer request,
//! so instances run in parallel, one stream each. With `latency_lane`, one
//! more instance runs a second compiled model (one stream over every
//! thread): the batcher gives it a batch found alone (a lone request gets
//! the whole machine) and, under load, critical samples and those of a
//! tenant with nothing running, while the throughput instances run at a
//! lower CPU priority (`scheduling.throughput_priority`).
//!
//! The library is loaded at run time (`executor.openvino_library`); nothing
//! links at build time.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use config::{ModelSpec, Precision, PrecisionRequest, ThroughputPriority};
use openvino::{
    CompiledModel, Core, DeviceType, Dimension, ElementType, InferRequest, Node, PartialShape,
    PropertyKey, RwPropertyKey, Shape, Tensor,
};

use crate::{Engine, ExecError};

/// Loads the OpenVINO C library from `path` (once per process; later calls
/// are no-ops). The core, CPU plugin, ONNX frontend and TBB libraries must
/// sit next to it.
pub fn library(path: &Path) -> Result<(), ExecError> {
    static LOADED: Mutex<bool> = Mutex::new(false);
    let mut loaded = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    if *loaded {
        return Ok(());
    }
    let path = crate::engine::library_path("OpenVINO", path, "executor.openvino_library")?;
    openvino_sys::library::load_from(path.clone()).map_err(|message| {
        ExecError::RuntimeLibrary {
            library: "OpenVINO",
            path,
            message,
        }
    })?;
    *loaded = true;
    Ok(())
}

/// The CPU as OpenVINO sees it.
#[derive(Debug, Clone)]
pub struct CpuInfo {
    pub name: String,
    /// `OPTIMIZATION_CAPABILITIES`, e.g. `["BF16", "FP32", "INT8", …]`.
    pub capabilities: Vec<String>,
}

impl CpuInfo {
    /// Native BF16 (AMX or AVX-512 BF16).
    pub fn bf16(&self) -> bool {
        self.capabilities.iter().any(|c| c == "BF16")
    }
}

fn ov_err(what: &str) -> impl Fn(openvino::InferenceError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A fresh core (the library must be loaded) and what it says of the CPU.
pub fn core() -> Result<(Core, CpuInfo), ExecError> {
    let runtime = |m: String| ExecError::Runtime {
        library: "OpenVINO",
        message: m,
    };
    let core = Core::new().map_err(|e| runtime(e.to_string()))?;
    let prop = |key: PropertyKey| {
        core.get_property(&DeviceType::CPU, &key)
            .map_err(|e| runtime(format!("reading the CPU's properties: {e}")))
    };
    let name = prop(PropertyKey::DeviceFullName)?;
    let capabilities = prop(PropertyKey::DeviceCapabilities)?
        .split([' ', ','])
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    Ok((core, CpuInfo { name, capabilities }))
}

/// The precision to run, and a line saying why when it is not what was
/// asked for; an error when it cannot honour an explicit request.
pub fn choose_precision(
    request: PrecisionRequest,
    cpu: &CpuInfo,
) -> Result<(Precision, Option<String>), String> {
    match (request, cpu.bf16()) {
        (PrecisionRequest::F32, _) => Ok((Precision::F32, None)),
        (PrecisionRequest::Auto | PrecisionRequest::Bf16, true) => Ok((Precision::Bf16, None)),
        (PrecisionRequest::Auto, false) => Ok((
            Precision::F32,
            Some(format!(
                "precision auto: the CPU ({}) has no native BF16 (neither AMX nor AVX-512 BF16), so f32 runs",
                cpu.name
            )),
        )),
        (PrecisionRequest::Bf16, false) => Err(format!(
            "openvino.precision is bf16, but the CPU ({}) has no native BF16 (its capabilities: {}); use \"auto\" or \"f32\"",
            cpu.name,
            cpu.capabilities.join(", ")
        )),
    }
}

/// How a model's instances map onto OpenVINO streams and threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLayout {
    /// Infer requests (one per engine instance).
    pub requests: usize,
    pub streams: usize,
    pub threads: usize,
    /// Threads of the latency lane, when there is one.
    pub lane_threads: Option<usize>,
    /// The CPU priority of the throughput streams' threads
    /// (`scheduling.throughput_priority`; normal without a lane), so that
    /// the OS gives the lane's threads the cores first.
    pub throughput_priority: ThroughputPriority,
}

impl StreamLayout {
    pub fn of(spec: &ModelSpec, throughput_priority: ThroughputPriority) -> Self {
        let ov = &spec.openvino;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let requests = spec.instances.count.max(1) as usize;
        let threads = if ov.threads == 0 {
            cores
        } else {
            ov.threads as usize
        };
        let streams = if ov.num_streams == 0 {
            requests
        } else {
            ov.num_streams as usize
        }
        .clamp(1, threads);
        let lane = ov.latency_lane && streams > 1;
        Self {
            requests,
            streams,
            threads,
            lane_threads: lane.then_some(threads),
            throughput_priority: if lane {
                throughput_priority
            } else {
                ThroughputPriority::Normal
            },
        }
    }

    pub fn describe(&self) -> String {
        let per = self.threads.div_ceil(self.streams);
        let mut s = format!(
            "{} infer requests on {} streams × {per} threads",
            self.requests, self.streams
        );
        if let Some(t) = self.lane_threads {
            s.push_str(&format!(
                ", and a latency lane instance on 1 stream × {t} threads"
            ));
            match self.throughput_priority {
                ThroughputPriority::Idle => s.push_str(" (the other streams at idle priority)"),
                ThroughputPriority::Low => s.push_str(" (the other streams at nice +10)"),
                ThroughputPriority::Normal => {}
            }
        }
        s
    }
}

/// Lowers the calling thread's CPU priority (always allowed: only raising
/// it needs privileges). On Linux priority is per thread, and threads
/// started from this one inherit it.
fn lower_thread_priority(model: &str, priority: ThroughputPriority) {
    use thread_priority::{
        NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
        set_thread_priority_and_policy, thread_native_id, thread_schedule_policy,
    };
    let tid = rustix::thread::gettid();
    let nice = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
    let result = match priority {
        ThroughputPriority::Normal => return,
        ThroughputPriority::Idle => {
            let idle = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle);
            let set = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, idle);
            // That also sets nice 0 after the policy (refused to a process
            // running niced, unprivileged): keep the thread's own.
            let _ = rustix::process::setpriority_process(Some(tid), nice);
            match thread_schedule_policy() {
                Ok(p) if p == idle => Ok(()),
                _ => Err(format!("{set:?}")),
            }
        }
        ThroughputPriority::Low => {
            rustix::process::setpriority_process(Some(tid), (nice + 10).min(19))
                .map_err(|e| e.to_string())
        }
    };
    if let Err(e) = result {
        tracing::warn!(model, "cannot lower the throughput streams' priority: {e}");
    }
}

/// Runs one sample of zeros on `request` (which binds its own input again
/// at its next run).
fn first_run(spec: &ModelSpec, request: &mut InferRequest) -> Result<(), ExecError> {
    let err = |e: openvino::InferenceError| ExecError::Inference {
        model: spec.name.clone(),
        message: format!("first run: {e}"),
    };
    let dims = batch_dims(spec.input.batch_shape(1), 1);
    let mut tensor =
        Tensor::new(ElementType::F32, &Shape::new(&dims).map_err(err)?).map_err(err)?;
    tensor.get_data_mut::<f32>().map_err(err)?.fill(0.0);
    request.set_tensor(&spec.input.name, &tensor).map_err(err)?;
    request.infer().map_err(err)
}

/// One compilation's settings.
struct Compile<'a> {
    spec: &'a ModelSpec,
    precision: Precision,
    streams: usize,
    threads: usize,
    cache_dir: Option<&'a Path>,
}

fn compile(core: &mut Core, c: &Compile) -> Result<CompiledModel, ExecError> {
    let spec = c.spec;
    let load_err = |message: String| ExecError::ModelLoad {
        model: spec.name.clone(),
        path: PathBuf::from(&spec.file),
        message,
    };
    if !Path::new(&spec.file).is_file() {
        return Err(ExecError::ModelFileMissing {
            model: spec.name.clone(),
            path: PathBuf::from(&spec.file),
        });
    }
    let streams = c.streams.to_string();
    let threads = c.threads.to_string();
    let mut props = vec![
        (RwPropertyKey::HintInferencePrecision, c.precision.as_str()),
        (RwPropertyKey::NumStreams, streams.as_str()),
        (RwPropertyKey::InferenceNumThreads, threads.as_str()),
    ];
    // OpenVINO keys its cache by the model and the CPU only, not by
    // precision or streams: one folder per compilation setting.
    let cache = c.cache_dir.map(|d| {
        d.join(format!(
            "{}-s{}-t{}",
            c.precision.as_str(),
            c.streams,
            c.threads
        ))
        .display()
        .to_string()
    });
    if let Some(dir) = &cache {
        props.push((RwPropertyKey::CacheDir, dir.as_str()));
    }
    core.set_properties(&DeviceType::CPU, props)
        .map_err(|e| load_err(format!("setting CPU properties: {e}")))?;
    let mut model = core
        .read_model_from_file(&spec.file, "")
        .map_err(|e| load_err(e.to_string()))?;
    let inputs = model_inputs(&model);
    let input = find_port(&inputs, &spec.input.name).ok_or_else(|| ExecError::NoSuchInput {
        model: spec.name.clone(),
        name: spec.input.name.clone(),
        available: port_names(&inputs),
    })?;
    check_f32(spec, &inputs[input])?;
    drop(inputs);
    let dims: Vec<Dimension> = spec
        .input
        .batch_shape(1)
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            let (lo, hi) = if i == 0 {
                (1, spec.batching.max_batch.max(1) as i64)
            } else {
                (d as i64, d as i64)
            };
            Dimension::new(lo, hi)
        })
        .collect();
    let shape = PartialShape::new(4, &dims).map_err(|e| load_err(e.to_string()))?;
    model
        .reshape_input_by_name(&spec.input.name, &shape)
        .map_err(|e| {
            load_err(format!(
                "input {:?} cannot take shape {:?} (batch 1..={}): {e}",
                spec.input.name,
                spec.input.batch_shape(1),
                spec.batching.max_batch
            ))
        })?;
    core.compile_model(&model, DeviceType::CPU)
        .map_err(|e| load_err(format!("compiling for the CPU: {e}")))
}

fn model_inputs(model: &openvino::Model) -> Vec<Node> {
    let n = model.get_inputs_len().unwrap_or(0);
    (0..n)
        .filter_map(|i| model.get_input_by_index(i).ok())
        .collect()
}

fn find_port(ports: &[Node], name: &str) -> Option<usize> {
    ports
        .iter()
        .position(|p| p.get_name().is_ok_and(|n| n == name))
}

fn port_names(ports: &[Node]) -> Vec<String> {
    ports.iter().filter_map(|p| p.get_name().ok()).collect()
}

fn check_f32(spec: &ModelSpec, port: &Node) -> Result<(), ExecError> {
    match port.get_element_type() {
        Ok(ElementType::F32) => Ok(()),
        other => Err(ExecError::TensorType {
            model: spec.name.clone(),
            name: port.get_name().unwrap_or_default(),
            actual: format!("{other:?}"),
            expected: "a float32 tensor".into(),
        }),
    }
}

/// The output the spec names (or the first), as an index, checked to be f32
/// with `labels` values per sample.
fn output_index(spec: &ModelSpec, compiled: &CompiledModel) -> Result<usize, ExecError> {
    let n = compiled.get_output_size().unwrap_or(0);
    let ports: Vec<Node> = (0..n)
        .filter_map(|i| compiled.get_output_by_index(i).ok())
        .collect();
    if ports.is_empty() {
        return Err(ExecError::NoOutputs {
            model: spec.name.clone(),
        });
    }
    let index = if spec.output.name.is_empty() {
        0
    } else {
        find_port(&ports, &spec.output.name).ok_or_else(|| ExecError::NoSuchOutput {
            model: spec.name.clone(),
            name: spec.output.name.clone(),
            available: port_names(&ports),
        })?
    };
    check_f32(spec, &ports[index])?;
    Ok(index)
}

/// Runs batches on one infer request, reusing its input tensor while the
/// batch size stays the same.
struct Request {
    request: InferRequest,
    tensor: Option<(usize, Tensor)>,
}

impl Request {
    fn run(&mut self, m: &Shared, input: &[f32], batch: usize) -> Result<Vec<f32>, String> {
        if self.tensor.as_ref().is_none_or(|(b, _)| *b != batch) {
            let dims = batch_dims(m.input_shape, batch);
            let shape = Shape::new(&dims).map_err(ov_err("input shape"))?;
            let tensor = Tensor::new(ElementType::F32, &shape).map_err(ov_err("input tensor"))?;
            self.request
                .set_tensor(&m.input_name, &tensor)
                .map_err(ov_err("binding the input"))?;
            self.tensor = Some((batch, tensor));
        }
        let (_, tensor) = self.tensor.as_mut().expect("set above");
        tensor
            .get_data_mut::<f32>()
            .map_err(ov_err("input data"))?
            .copy_from_slice(input);
        self.request.infer().map_err(ov_err("infer"))?;
        let out = self
            .request
            .get_output_tensor_by_index(m.output)
            .map_err(ov_err("output"))?;
        let data = out.get_data::<f32>().map_err(ov_err("output data"))?;
        if data.len() != batch * m.outputs {
            return Err(format!(
                "the output has {} values for a batch of {batch}; expected {} per sample",
                data.len(),
                m.outputs
            ));
        }
        Ok(data.to_vec())
    }
}

/// What every instance of one compiled model shares.
struct Shared {
    model: String,
    input_name: String,
    input_shape: [usize; 4],
    elements: usize,
    outputs: usize,
    output: usize,
    max_batch: usize,
    // Kept alive for the requests (OpenVINO counts references too).
    _compiled: Vec<Mutex<CompiledModel>>,
}

/// A model input's shape (`batch_shape(1)`) for a batch of `batch`.
fn batch_dims(shape: [usize; 4], batch: usize) -> Vec<i64> {
    let mut d: Vec<i64> = shape.iter().map(|&x| x as i64).collect();
    d[0] = batch as i64;
    d
}

/// One OpenVINO engine instance: its own infer request, on a stream of the
/// throughput layout or, for the latency lane, on the lane's one stream.
pub struct OpenvinoCpu {
    shared: Arc<Shared>,
    own: Request,
    lane: bool,
}

impl std::fmt::Debug for OpenvinoCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenvinoCpu")
            .field("model", &self.shared.model)
            .finish()
    }
}

/// What [`load`] compiled.
pub struct Loaded {
    pub engines: Vec<Box<dyn Engine>>,
    /// The precision the compiled model reports it runs in.
    pub precision: Precision,
    pub layout: StreamLayout,
}

/// Compiles `spec` at `precision` and makes `layout.requests` instances.
/// The library must be loaded ([`library`]).
pub fn load(
    spec: &ModelSpec,
    precision: Precision,
    layout: StreamLayout,
    cache_dir: Option<&Path>,
) -> Result<Loaded, ExecError> {
    let (mut core, _) = core()?;
    // The lane first, at the process's priority: its stream thread, and
    // the thread pool's workers if this starts them, keep that priority.
    let instance_err = |e: openvino::InferenceError| ExecError::Instance {
        model: spec.name.clone(),
        message: format!("creating an infer request: {e}"),
    };
    let mut lane = None;
    if let Some(threads) = layout.lane_threads {
        let mut c = compile(
            &mut core,
            &Compile {
                spec,
                precision,
                streams: 1,
                threads,
                cache_dir,
            },
        )?;
        let mut r = c.create_infer_request().map_err(instance_err)?;
        // Its first run starts the thread pool's workers (which streams of
        // several threads share) at the process's priority, before a
        // throughput stream could start them at its own.
        first_run(spec, &mut r)?;
        lane = Some((c, r));
    }
    // OpenVINO runs each stream's inference on threads it starts when it
    // compiles (a synchronous `infer` hands over to them): compiled from a
    // thread of lower priority, they inherit it.
    let throughput = Compile {
        spec,
        precision,
        streams: layout.streams,
        threads: layout.threads,
        cache_dir,
    };
    let mut main = if layout.throughput_priority != ThroughputPriority::Normal {
        std::thread::scope(|s| {
            let core = &mut core;
            let throughput = &throughput;
            let compiled = s.spawn(move || {
                lower_thread_priority(&spec.name, layout.throughput_priority);
                compile(core, throughput)
            });
            crate::engine::joined(spec, compiled.join())
        })?
    } else {
        compile(&mut core, &throughput)?
    };
    let output = output_index(spec, &main)?;
    let actual = compiled_precision(spec, &main)?;
    let request = |c: &mut CompiledModel| -> Result<Request, ExecError> {
        let request = c.create_infer_request().map_err(instance_err)?;
        Ok(Request {
            request,
            tensor: None,
        })
    };
    let mut own = Vec::with_capacity(layout.requests);
    for _ in 0..layout.requests {
        own.push(request(&mut main)?);
    }
    let mut compiled = vec![];
    let lane = lane.map(|(c, request)| {
        compiled.push(Mutex::new(c));
        Request {
            request,
            tensor: None,
        }
    });
    compiled.push(Mutex::new(main));
    let shared = Arc::new(Shared {
        model: spec.name.clone(),
        input_name: spec.input.name.clone(),
        input_shape: spec.input.batch_shape(1),
        elements: spec.input.elements(),
        outputs: spec.output.labels.len(),
        output,
        max_batch: spec.batching.max_batch.max(1) as usize,
        _compiled: compiled,
    });
    let engines = own
        .into_iter()
        .map(|r| (r, false))
        .chain(lane.map(|r| (r, true)))
        .map(|(own, lane)| {
            Box::new(OpenvinoCpu {
                shared: shared.clone(),
                own,
                lane,
            }) as Box<dyn Engine>
        })
        .collect();
    Ok(Loaded {
        engines,
        precision: actual,
        layout,
    })
}

impl std::fmt::Debug for Loaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loaded")
            .field("engines", &self.engines.len())
            .field("precision", &self.precision)
            .field("layout", &self.layout)
            .finish()
    }
}

/// The precision the compiled model says it runs in.
fn compiled_precision(spec: &ModelSpec, c: &CompiledModel) -> Result<Precision, ExecError> {
    let hint = c
        .get_property(&PropertyKey::Rw(RwPropertyKey::HintInferencePrecision))
        .map_err(|e| ExecError::ModelLoad {
            model: spec.name.clone(),
            path: PathBuf::from(&spec.file),
            message: format!("reading the compiled precision: {e}"),
        })?;
    match hint.as_ref() {
        "bf16" => Ok(Precision::Bf16),
        "f32" => Ok(Precision::F32),
        other => Err(ExecError::ModelLoad {
            model: spec.name.clone(),
            path: PathBuf::from(&spec.file),
            message: format!("the compiled model runs in {other:?}, which mmgate does not expect"),
        }),
    }
}

impl OpenvinoCpu {
    fn checked(&self, input: &[f32], batch: usize) -> Result<(), ExecError> {
        let m = &*self.shared;
        if batch == 0 || batch > m.max_batch {
            return Err(ExecError::BatchTooLarge {
                model: m.model.clone(),
                batch,
                max_batch: m.max_batch,
            });
        }
        if input.len() != batch * m.elements {
            return Err(ExecError::InputSize {
                model: m.model.clone(),
                batch,
                expected: batch * m.elements,
                actual: input.len(),
            });
        }
        Ok(())
    }
}

impl Engine for OpenvinoCpu {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError> {
        self.checked(input, batch)?;
        let m = &*self.shared;
        self.own
            .run(m, input, batch)
            .map_err(|message| ExecError::Inference {
                model: m.model.clone(),
                message,
            })
    }

    fn latency_lane(&self) -> bool {
        self.lane
    }

    fn outputs(&self) -> usize {
        self.shared.outputs
    }
}
