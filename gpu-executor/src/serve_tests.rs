//! `serve` when a model loses every engine instance: the job is answered,
//! then `serve` returns an error (the process exits 1 and is restarted).

use std::time::Duration;

use shm::{InferJob, PoolLayout, SlotRef, read_frame};

use super::*;
use crate::Engine;
use crate::batcher::tests::{Bomb, ELEMS, spec};

/// Panics with a payload that panics twice more when dropped: it gets past
/// every guard and ends the instance thread.
struct Doomed;

impl Engine for Doomed {
    fn run(&mut self, _: &[f32], _: usize) -> Result<Vec<f32>, ExecError> {
        std::panic::panic_any(Bomb(2))
    }
    fn outputs(&self) -> usize {
        2
    }
}

#[tokio::test]
async fn serve_exits_with_an_error_when_a_model_has_no_instance_left() {
    let tensors = Arc::new(SharedTensors::create(PoolLayout::new(&[(4, ELEMS * 4)])).unwrap());
    let slot = SlotRef {
        model: 0,
        slot: 1,
        generation: 1,
    };
    tensors.stamp(slot).unwrap();
    tensors.write_f32(slot, |s| s.fill(1.0)).unwrap();
    let loaded = Loaded {
        tensors,
        models: vec![(
            spec(8, 0, &[]),
            Some(LoadedModel {
                device: None,
                engines: vec![Box::new(Doomed) as Box<dyn Engine>],
                runtime: shm::ModelRuntime {
                    model: "m".into(),
                    backend: config::Backend::OnnxruntimeCpu,
                    precision: config::Precision::F32,
                    device: "test".into(),
                    layout: "one doomed engine".into(),
                    fallbacks: vec![],
                    calibration: None,
                    gpu: None,
                },
            }),
        )],
        scheduling: config::Scheduling::default(),
        heartbeat: Duration::from_secs(60),
    };
    let (mut gateway, ours) = UnixStream::pair().unwrap();
    // The gateway's side: one job, then read until the executor hangs up.
    let gateway = std::thread::spawn(move || {
        let job = InferJob {
            job_id: 7,
            ctx: shm::RequestContext {
                request_id: "test-7".into(),
                ..Default::default()
            },
            slot,
            pending: 0,
        };
        write_frame(&mut gateway, &ToExecutor::Infer(job)).unwrap();
        let mut got = Vec::new();
        while let Ok(Some(msg)) = read_frame::<FromExecutor>(&mut gateway) {
            got.push(msg);
        }
        got
    });
    let result = tokio::time::timeout(Duration::from_secs(20), serve(ours, loaded))
        .await
        .expect("serve kept running with no instance left");
    let message = result.expect_err("serve must fail").to_string();
    assert!(message.contains("no instances left"), "{message}");
    let got = gateway.join().unwrap();
    assert!(
        matches!(got.as_slice(), [FromExecutor::Failed { job_id: 7, .. }]),
        "{got:?}"
    );
}
