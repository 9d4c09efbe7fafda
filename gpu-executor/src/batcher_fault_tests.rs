//! Instance threads that panic: outside the engine (the thread stays in
//! service), or past every guard (the batcher reports that no instance is
//! left). Real time: the threads are OS threads.

use std::time::Duration;

use tokio::time::timeout;

use super::*;

const WAIT: Duration = Duration::from_secs(10);

async fn answer(r: &mut Rig) -> FromExecutor {
    timeout(WAIT, r.answers.recv())
        .await
        .expect("no answer")
        .expect("answers closed")
}

#[tokio::test]
async fn a_panic_outside_the_engine_leaves_the_instance_in_service() {
    // The engine's panic payload panics again when the instance drops it,
    // after `engine.run` returned: outside the engine's own guard.
    let mut r = rig_with(&spec(8, 2_000, &[]), 1, false, false, 1);
    r.send(1, 0).await;
    match answer(&mut r).await {
        FromExecutor::Failed { job_id: 1, message } => {
            assert!(message.contains("panicked"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // The instance was reported free and still runs batches.
    r.send(2, 0).await;
    match answer(&mut r).await {
        FromExecutor::Scores(s) => assert_eq!((s.job_id, s.values), (2, vec![2.0, 1.0])),
        other => panic!("{other:?}"),
    }
    assert!(r.lost.try_recv().is_err());
}

#[tokio::test]
async fn losing_every_instance_is_reported_and_later_jobs_fail() {
    // Payloads that panic twice when dropped kill both instance threads.
    let mut r = rig_with(&spec(8, 2_000, &[]), 2, false, false, 2);
    r.send(1, 0).await;
    r.send(2, 0).await;
    for _ in 0..2 {
        assert!(matches!(answer(&mut r).await, FromExecutor::Failed { .. }));
    }
    let lost = timeout(WAIT, r.lost.recv())
        .await
        .expect("loss not reported");
    let message = lost.expect("lost channel closed").to_string();
    assert!(message.contains("no instances left"), "{message}");

    r.send(3, 0).await;
    match answer(&mut r).await {
        FromExecutor::Failed { job_id: 3, message } => {
            assert!(message.contains("no engine instance"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // Reported once; closing still finishes.
    assert!(r.lost.try_recv().is_err());
    timeout(WAIT, r.batcher.close()).await.expect("close hung");
}

/// Once the other instances are gone, the latency lane serves every class
/// (it takes only critical and light tenants' samples while they live).
#[tokio::test]
async fn once_only_the_lane_is_left_it_serves_every_class() {
    use config::Class::Batch;
    let scheduling = config::Scheduling::default();
    let mut r = rig_full(&spec(8, 2_000, &[]), 1, true, false, false, 2, &scheduling);
    // Not alone (more samples are coming): the throughput instance takes
    // it, and its thread dies.
    r.send_as(1, 9, Batch, "bulk").await;
    assert!(matches!(
        answer(&mut r).await,
        FromExecutor::Failed { job_id: 1, .. }
    ));
    for id in 2..4 {
        r.send_as(id, 9, Batch, "bulk").await;
        match answer(&mut r).await {
            FromExecutor::Scores(s) => assert_eq!(s.job_id, id),
            other => panic!("{other:?}"),
        }
    }
    assert!(r.lost.try_recv().is_err(), "the lane is still there");
    timeout(WAIT, r.batcher.close()).await.expect("close hung");
}
