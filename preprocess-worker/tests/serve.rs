//! The worker binary end to end: handshake, a good job written into a shared
//! slot, a bad job answered with its error kind, a stale slot refused, and a
//! clean exit when the gateway closes the socket.

mod harness;

use std::path::PathBuf;

use harness::Worker;
use shm::{FromWorker, Input, Job, JobErrorKind, SlotRef, ToWorker};

fn fixture(dir: &str, name: &str) -> Vec<u8> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    std::fs::read(root.join(dir).join(name)).unwrap()
}

fn job(job_id: u64, slot: SlotRef, input: Input) -> ToWorker {
    ToWorker::Job(Job {
        job_id,
        ctx: shm::RequestContext {
            request_id: format!("req-{job_id}"),
            ..Default::default()
        },
        slot,
        input,
    })
}

#[test]
fn worker_answers_jobs_through_shared_memory() {
    let mut w = Worker::start();
    let (s0, s1) = (w.lease(0), w.lease(1));
    // Never stamped by the "gateway": a stale handle.
    let stale = SlotRef {
        model: 0,
        slot: 2,
        generation: 999,
    };
    let jpeg = fixture("images", "coffee.jpg");
    w.inputs.write(1, &jpeg).unwrap();
    let shared = Input::Shared {
        index: 1,
        len: jpeg.len(),
    };
    w.send(&job(1, s0, shared));
    w.send(&job(2, s1, Input::Inline(b"not an image".to_vec())));
    w.send(&job(3, stale, Input::Inline(jpeg.clone())));
    let mut answers: Vec<FromWorker> = (0..3).map(|_| w.recv()).collect();
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
    let first = w.tensors.read_f32(s0, |t| t[0]).unwrap();
    assert!((-123.0..=151.0).contains(&first) && first != 0.0);
    let kind = |a: &FromWorker| match a {
        FromWorker::Failed { error, .. } => error.kind,
        other => panic!("expected a failure, got {other:?}"),
    };
    assert_eq!(kind(&answers[1]), JobErrorKind::Unsupported);
    assert_eq!(kind(&answers[2]), JobErrorKind::Stale);
    let status = w.close();
    assert!(status.success(), "{status}");
}
