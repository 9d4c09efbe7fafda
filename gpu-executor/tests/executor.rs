//! The executor binary end to end: spawned with a real socketpair and a real
//! memfd tensor pool mapped in as fds, driven over the IPC protocol.

mod common;

use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use command_fds::{CommandFdExt, FdMapping};
use config::{ExecutorSection, ModelSpec};
use shm::{
    ExecutorInit, FromExecutor, InferJob, ModelRuntime, PROTO_VERSION, PoolLayout, SharedTensors,
    SlotRef, ToExecutor, read_frame, write_frame,
};

/// A running executor; killed on drop if a test fails half-way.
struct Executor {
    child: Child,
    ipc: UnixStream,
    pool: SharedTensors,
    /// Models `init` tells the executor not to load.
    unloaded: Vec<String>,
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Executor {
    fn spawn(models: &[ModelSpec], slots: u32) -> Self {
        let layout = PoolLayout::new(
            &models
                .iter()
                .map(|m| (slots, m.input.sample_bytes()))
                .collect::<Vec<_>>(),
        );
        let pool = SharedTensors::create(layout).unwrap();
        let (ipc, theirs) = UnixStream::pair().unwrap();
        ipc.set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_gpu-executor"))
            .args(["--ipc-fd", "3", "--tensor-fd", "4", "--parent-pid"])
            .arg(std::process::id().to_string())
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .fd_mappings(vec![
                FdMapping {
                    parent_fd: theirs.into(),
                    child_fd: 3,
                },
                FdMapping {
                    parent_fd: pool.fd().try_clone_to_owned().unwrap(),
                    child_fd: 4,
                },
            ])
            .unwrap()
            .spawn()
            .unwrap();
        let mut ex = Self {
            child,
            ipc,
            pool,
            unloaded: Vec::new(),
        };
        match ex.recv() {
            FromExecutor::Hello(h) => {
                assert_eq!(h.proto_version, PROTO_VERSION);
                assert_eq!(h.pid, ex.child.id());
            }
            other => panic!("expected Hello, got {other:?}"),
        }
        ex
    }

    fn init(&mut self, models: Vec<ModelSpec>, executor: ExecutorSection) -> FromExecutor {
        let layout = self.pool.layout().clone();
        self.send(ToExecutor::Init(ExecutorInit {
            layout,
            models,
            executor,
            scheduling: config::Scheduling::default(),
            unloaded: self.unloaded.clone(),
        }));
        self.recv()
    }

    /// Sends Init and expects Ready; returns what runs each model.
    fn ready(&mut self, models: Vec<ModelSpec>, executor: ExecutorSection) -> Vec<ModelRuntime> {
        match self.init(models, executor) {
            FromExecutor::Ready(r) => r,
            other => panic!("expected Ready, got {other:?}"),
        }
    }

    fn send(&mut self, msg: ToExecutor) {
        write_frame(&mut self.ipc, &msg).unwrap();
    }

    /// The next message but heartbeats.
    fn recv(&mut self) -> FromExecutor {
        loop {
            match self.recv_any() {
                FromExecutor::Heartbeat => continue,
                msg => return msg,
            }
        }
    }

    fn recv_any(&mut self) -> FromExecutor {
        read_frame(&mut self.ipc)
            .unwrap()
            .expect("executor closed the socket")
    }

    /// Fills `slot` with `data`, sends job `job_id` for it (nothing else
    /// pending) and returns the executor's answer.
    fn infer(&mut self, job_id: u64, slot: SlotRef, data: &[f32]) -> FromExecutor {
        self.fill(slot, data);
        self.send(ToExecutor::Infer(InferJob {
            job_id,
            ctx: shm::RequestContext {
                request_id: "test".into(),
                ..Default::default()
            },
            slot,
            pending: 0,
        }));
        self.recv()
    }

    /// Leases `slot` under `generation` as the gateway would, and fills it.
    fn fill(&self, slot: SlotRef, data: &[f32]) {
        self.pool.stamp(slot).unwrap();
        self.pool
            .write_f32(slot, |s| s.copy_from_slice(data))
            .unwrap();
    }

    /// Waits for the process to exit after the socket is closed.
    fn exit_status(mut self) -> std::process::ExitStatus {
        let _ = self.ipc.shutdown(std::net::Shutdown::Both);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "executor did not exit on EOF");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn small(mut spec: ModelSpec) -> ModelSpec {
    spec.instances.count = 1;
    spec
}

fn slot(slot: u32, generation: u64) -> SlotRef {
    SlotRef {
        model: 0,
        slot,
        generation,
    }
}

#[test]
fn scores_a_sample_from_shared_memory_and_fails_a_stale_one() {
    let spec = small(common::open_nsfw());
    let mut ex = Executor::spawn(std::slice::from_ref(&spec), 4);
    let runtime = ex.ready(vec![spec.clone()], common::executor_section());
    assert_eq!(runtime[0].backend, config::Backend::Openvino, "{runtime:?}");

    let s = slot(0, 1);
    ex.fill(s, &common::sample(&spec, 0));
    ex.send(ToExecutor::Infer(InferJob {
        job_id: 11,
        ctx: shm::RequestContext {
            request_id: "test".into(),
            ..Default::default()
        },
        slot: s,
        pending: 0,
    }));
    let first = match ex.recv() {
        FromExecutor::Scores(sc) => {
            assert_eq!((sc.job_id, sc.batch), (11, 1));
            assert_eq!(sc.values.len(), 2);
            assert!((sc.values.iter().sum::<f32>() - 1.0).abs() < 1e-4, "{sc:?}");
            assert!(sc.infer_us > 0, "{sc:?}");
            sc.values
        }
        other => panic!("expected Scores, got {other:?}"),
    };

    // The same sample through a different slot gives the same scores.
    let s2 = slot(3, 8);
    ex.fill(s2, &common::sample(&spec, 0));
    ex.send(ToExecutor::Infer(InferJob {
        job_id: 12,
        ctx: shm::RequestContext {
            request_id: "test".into(),
            ..Default::default()
        },
        slot: s2,
        pending: 0,
    }));
    match ex.recv() {
        FromExecutor::Scores(sc) => {
            assert_eq!(sc.job_id, 12);
            for (a, b) in sc.values.iter().zip(&first) {
                assert!((a - b).abs() < 1e-5, "{:?} vs {first:?}", sc.values);
            }
        }
        other => panic!("expected Scores, got {other:?}"),
    }

    // The gateway re-leased slot 1 (generation 6): a job holding 5 is stale.
    ex.fill(slot(1, 5), &common::sample(&spec, 1));
    ex.pool.stamp(slot(1, 6)).unwrap();
    ex.send(ToExecutor::Infer(InferJob {
        job_id: 13,
        ctx: shm::RequestContext {
            request_id: "test".into(),
            ..Default::default()
        },
        slot: slot(1, 5),
        pending: 0,
    }));
    match ex.recv() {
        FromExecutor::Failed { job_id, message } => {
            assert_eq!(job_id, 13);
            assert!(message.contains("reused"), "{message}");
        }
        other => panic!("expected Failed, got {other:?}"),
    }

    // A slot leased but never filled is refused too.
    ex.pool.stamp(slot(2, 9)).unwrap();
    ex.send(ToExecutor::Infer(InferJob {
        job_id: 14,
        ctx: shm::RequestContext {
            request_id: "test".into(),
            ..Default::default()
        },
        slot: slot(2, 9),
        pending: 0,
    }));
    assert!(matches!(ex.recv(), FromExecutor::Failed { job_id: 14, .. }));

    // An unknown model index is answered, not fatal.
    ex.send(ToExecutor::Infer(InferJob {
        job_id: 15,
        ctx: shm::RequestContext {
            request_id: "test".into(),
            ..Default::default()
        },
        slot: SlotRef {
            model: 7,
            slot: 0,
            generation: 1,
        },
        pending: 0,
    }));
    assert!(matches!(ex.recv(), FromExecutor::Failed { job_id: 15, .. }));

    assert_eq!(ex.exit_status().code(), Some(0));
}

#[test]
fn heartbeats_come_while_serving_and_an_unloaded_model_refuses_its_jobs() {
    let spec = small(common::open_nsfw());
    let mut other = spec.clone();
    other.name = "second".into();
    let models = vec![spec.clone(), other];
    let mut ex = Executor::spawn(&models, 4);
    ex.unloaded = vec!["second".into()];
    let mut section = common::executor_section();
    section.heartbeat_ms = 50;
    let runtimes = ex.ready(models, section);
    // Only the loaded model runs.
    assert_eq!(
        runtimes
            .iter()
            .map(|r| r.model.as_str())
            .collect::<Vec<_>>(),
        [spec.name.as_str()]
    );
    // Heartbeats every 50 ms, from a task of their own.
    let start = Instant::now();
    for _ in 0..5 {
        assert_eq!(ex.recv_any(), FromExecutor::Heartbeat);
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(150) && took < Duration::from_secs(2),
        "5 heartbeats took {took:?}"
    );
    // A job for the unloaded model (index 1) is answered, not run.
    ex.send(ToExecutor::Infer(InferJob {
        job_id: 21,
        ctx: shm::RequestContext {
            request_id: "test".into(),
            ..Default::default()
        },
        slot: SlotRef {
            model: 1,
            slot: 0,
            generation: 1,
        },
        pending: 0,
    }));
    assert_eq!(ex.recv(), FromExecutor::NotLoaded { job_id: 21 });
    // The loaded one serves.
    assert!(matches!(
        ex.infer(22, slot(0, 1), &common::sample(&spec, 0)),
        FromExecutor::Scores(_)
    ));
    assert_eq!(ex.exit_status().code(), Some(0));
}

#[test]
fn a_burst_is_batched_when_the_last_job_says_nothing_is_pending() {
    let mut spec = small(common::open_nsfw());
    // Long enough that only the `pending == 0` hint can close the batch.
    spec.batching.max_queue_delay_us = 30_000_000;
    spec.batching.max_batch = 8;
    let mut ex = Executor::spawn(std::slice::from_ref(&spec), 8);
    ex.ready(vec![spec.clone()], common::executor_section());
    for k in 0..8u32 {
        let s = slot(k, 100 + k as u64);
        ex.fill(s, &common::sample(&spec, k));
        ex.send(ToExecutor::Infer(InferJob {
            job_id: k as u64,
            ctx: shm::RequestContext {
                request_id: "test".into(),
                ..Default::default()
            },
            slot: s,
            pending: 7 - k,
        }));
    }
    let mut seen = Vec::new();
    for _ in 0..8 {
        match ex.recv() {
            FromExecutor::Scores(sc) => {
                assert_eq!(sc.batch, 8, "{sc:?}");
                assert!(sc.queue_us < 30_000_000, "{sc:?}");
                seen.push(sc.job_id);
            }
            other => panic!("expected Scores, got {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, (0..8).collect::<Vec<_>>());
    assert_eq!(ex.exit_status().code(), Some(0));
}

#[test]
fn missing_runtime_library_is_fatal_and_names_the_path() {
    let mut spec = small(common::open_nsfw());
    spec.backend = config::Backend::OnnxruntimeCpu;
    let mut ex = Executor::spawn(std::slice::from_ref(&spec), 2);
    let bad = "/nonexistent/libonnxruntime.so.1.32.0";
    let mut section = common::executor_section();
    section.ort_library = bad.into();
    match ex.init(vec![spec], section) {
        FromExecutor::Fatal(msg) => assert!(msg.contains(bad), "{msg}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
    assert_eq!(ex.exit_status().code(), Some(1));
}

/// An explicit OpenVINO precision with the library missing: refuse, naming
/// the path.
#[test]
fn missing_openvino_library_with_an_explicit_precision_is_fatal_and_names_the_path() {
    let mut spec = small(common::open_nsfw());
    spec.openvino.precision = config::PrecisionRequest::F32;
    let mut ex = Executor::spawn(std::slice::from_ref(&spec), 2);
    let bad = "/nonexistent/libopenvino_c.so.2641";
    let mut section = common::executor_section();
    section.openvino_library = bad.into();
    match ex.init(vec![spec], section) {
        FromExecutor::Fatal(msg) => {
            assert!(msg.contains(bad) && msg.contains("OpenVINO"), "{msg}")
        }
        other => panic!("expected Fatal, got {other:?}"),
    }
    assert_eq!(ex.exit_status().code(), Some(1));
}

/// `precision = "auto"` with the OpenVINO library missing: ONNX Runtime f32
/// serves, and the runtime says why.
#[test]
fn missing_openvino_library_with_auto_falls_back_to_onnx_runtime_and_says_so() {
    let spec = small(common::open_nsfw());
    assert_eq!(spec.openvino.precision, config::PrecisionRequest::Auto);
    let mut ex = Executor::spawn(std::slice::from_ref(&spec), 2);
    let bad = "/nonexistent/libopenvino_c.so.2641";
    let mut section = common::executor_section();
    section.openvino_library = bad.into();
    let runtime = ex.ready(vec![spec.clone()], section);
    let r = &runtime[0];
    assert_eq!(r.backend, config::Backend::OnnxruntimeCpu, "{r:?}");
    assert_eq!(r.precision, config::Precision::F32, "{r:?}");
    assert!(
        r.fallbacks.len() == 1 && r.fallbacks[0].contains(bad),
        "{r:?}"
    );
    // And it serves.
    assert!(matches!(
        ex.infer(1, slot(0, 1), &common::sample(&spec, 0)),
        FromExecutor::Scores(_)
    ));
    assert_eq!(ex.exit_status().code(), Some(0));
}

#[test]
fn missing_model_file_is_fatal_and_names_the_path() {
    let mut spec = small(common::open_nsfw());
    spec.file = "/nonexistent/model.onnx".into();
    let mut ex = Executor::spawn(std::slice::from_ref(&spec), 2);
    match ex.init(vec![spec], common::executor_section()) {
        FromExecutor::Fatal(msg) => assert!(msg.contains("/nonexistent/model.onnx"), "{msg}"),
        other => panic!("expected Fatal, got {other:?}"),
    }
    assert_eq!(ex.exit_status().code(), Some(1));
}
