//! The worker binary end to end: handshake, a good job written into a shared
//! slot, a bad job answered with its error kind, a stale slot refused, and a
//! clean exit when the gateway closes the socket.

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::Duration;

use command_fds::{CommandFdExt, FdMapping};
use shm::{
    FromWorker, Input, InputRegion, Job, JobErrorKind, PROTO_VERSION, PoolLayout, SharedTensors,
    SlotRef, ToWorker, WorkerInit, read_frame, write_frame,
};
use spec::{Limits, ModelSpec};

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn fixture(dir: &str, name: &str) -> Vec<u8> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    std::fs::read(root.join(dir).join(name)).unwrap()
}

fn recv(s: &mut UnixStream) -> FromWorker {
    read_frame::<FromWorker>(s)
        .unwrap()
        .expect("worker closed the socket")
}

fn job(job_id: u64, slot: SlotRef, input: Input) -> ToWorker {
    ToWorker::Job(Job {
        job_id,
        request_id: format!("req-{job_id}"),
        slot,
        input,
    })
}

#[test]
fn worker_answers_jobs_through_shared_memory() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let model = ModelSpec::load(&root.join("configs/models/open_nsfw.toml")).unwrap();
    let layout = PoolLayout::new(&[(4, model.input.sample_bytes())]);
    let tensors = SharedTensors::create(layout.clone()).unwrap();
    let inputs = InputRegion::create(2, 1 << 20).unwrap();
    let (mut gw, child_end) = UnixStream::pair().unwrap();
    gw.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_preprocess-worker"));
    cmd.args([
        "--ipc-fd",
        "3",
        "--tensor-fd",
        "4",
        "--input-fd",
        "5",
        "--parent-pid",
    ])
    .arg(std::process::id().to_string())
    .fd_mappings(vec![
        FdMapping {
            parent_fd: child_end.into(),
            child_fd: 3,
        },
        FdMapping {
            parent_fd: dup(tensors.fd()),
            child_fd: 4,
        },
        FdMapping {
            parent_fd: dup(inputs.fd().as_fd()),
            child_fd: 5,
        },
    ])
    .unwrap();
    let mut worker = Worker(cmd.spawn().unwrap());

    let FromWorker::Hello(hello) = recv(&mut gw) else {
        panic!("expected Hello")
    };
    assert_eq!(hello.proto_version, PROTO_VERSION);
    let init = WorkerInit {
        worker_id: 0,
        threads: 2,
        layout,
        input_slot_bytes: 1 << 20,
        models: vec![model],
        limits: Limits::default(),
    };
    write_frame(&mut gw, &ToWorker::Init(init)).unwrap();
    assert_eq!(recv(&mut gw), FromWorker::Ready);

    let slot = |slot, generation| SlotRef {
        model: 0,
        slot,
        generation,
    };
    for s in [slot(0, 7), slot(1, 8)] {
        tensors.stamp(s).unwrap();
    }
    let jpeg = fixture("images", "coffee.jpg");
    inputs.write(1, &jpeg).unwrap();
    write_frame(
        &mut gw,
        &job(
            1,
            slot(0, 7),
            Input::Shared {
                index: 1,
                len: jpeg.len(),
            },
        ),
    )
    .unwrap();
    write_frame(
        &mut gw,
        &job(2, slot(1, 8), Input::Inline(b"not an image".to_vec())),
    )
    .unwrap();
    write_frame(&mut gw, &job(3, slot(2, 9), Input::Inline(jpeg.clone()))).unwrap();
    let mut answers: Vec<FromWorker> = (0..3).map(|_| recv(&mut gw)).collect();
    answers.sort_by_key(|a| match a {
        FromWorker::Done(d) => d.job_id,
        FromWorker::Failed { job_id, .. } => *job_id,
        _ => 0,
    });
    let FromWorker::Done(done) = &answers[0] else {
        panic!("{:?}", answers[0])
    };
    assert_eq!(
        (done.width, done.height, done.format.as_str()),
        (600, 400, "jpeg")
    );
    let first = tensors.read_f32(slot(0, 7), |t| t[0]).unwrap();
    assert!((-123.0..=151.0).contains(&first) && first != 0.0);
    let kind = |a: &FromWorker| match a {
        FromWorker::Failed { error, .. } => error.kind,
        other => panic!("expected a failure, got {other:?}"),
    };
    assert_eq!(kind(&answers[1]), JobErrorKind::Unsupported);
    assert_eq!(kind(&answers[2]), JobErrorKind::Stale);

    drop(gw);
    let status = worker.0.wait().unwrap();
    assert!(status.success(), "{status}");
}
