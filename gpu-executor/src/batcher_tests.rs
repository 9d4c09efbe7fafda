//! Batching-policy tests on paused tokio time, with a tiny in-test engine
//! (these test the batcher; `tests/onnxruntime.rs` tests real inference).

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use shm::{PoolLayout, SlotRef};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::time::timeout;

use super::*;

pub(crate) const ELEMS: usize = 4;
const SLOTS: u32 = 32;

/// Echoes each sample's first value; reports every batch it starts and, when
/// gated, blocks until the test releases it. With `bomb > 0` its first batch
/// panics with a `Bomb(bomb)`.
struct Echo {
    started: UnboundedSender<usize>,
    /// This instance's index, sent on `on` just before `started`.
    id: usize,
    on: UnboundedSender<usize>,
    /// Whether each batch was run alone (`run_alone`) or not.
    alone: UnboundedSender<bool>,
    gate: Option<std_mpsc::Receiver<()>>,
    fail: bool,
    bomb: u32,
    /// Plays the model's latency lane.
    lane: bool,
}

/// A panic payload whose drop panics again with `Bomb(n - 1)`, down to 0:
/// how a panic gets past `catch_unwind`, whose caller drops the payload.
pub(crate) struct Bomb(pub(crate) u32);

impl Drop for Bomb {
    fn drop(&mut self) {
        if self.0 > 0 {
            std::panic::panic_any(Bomb(self.0 - 1));
        }
    }
}

impl Engine for Echo {
    fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError> {
        let _ = self.alone.send(false);
        self.echo(input, batch)
    }
    fn run_alone(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError> {
        let _ = self.alone.send(true);
        self.echo(input, batch)
    }
    fn latency_lane(&self) -> bool {
        self.lane
    }
    fn outputs(&self) -> usize {
        2
    }
}

impl Echo {
    fn echo(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError> {
        assert_eq!(input.len(), batch * ELEMS);
        let _ = self.on.send(self.id);
        let _ = self.started.send(batch);
        if let Some(gate) = &self.gate {
            let _ = gate.recv();
        }
        if self.bomb > 0 {
            std::panic::panic_any(Bomb(std::mem::take(&mut self.bomb)));
        }
        if self.fail {
            return Err(ExecError::Inference {
                model: "m".into(),
                message: "boom".into(),
            });
        }
        Ok(input.chunks(ELEMS).flat_map(|s| [s[0], 1.0]).collect())
    }
}

pub(crate) fn spec(max_batch: u32, delay_us: u64, preferred: &[u32]) -> ModelSpec {
    use config::*;
    ModelSpec {
        name: "m".into(),
        file: "m.onnx".into(),
        backend: Backend::OnnxruntimeCpu,
        openvino: OpenvinoSpec::default(),
        gpu: GpuSpec::default(),
        slot_dtype: SlotDtype::Float32,
        precision: None,
        input: InputSpec {
            name: "x".into(),
            layout: Layout::Nhwc,
            dtype: DType::Float32,
            height: 2,
            width: 2,
            channels: 1,
        },
        preprocess: PreprocessSpec {
            resize: Size {
                width: 2,
                height: 2,
            },
            resize_mode: ResizeMode::Stretch,
            filter: Filter::Bilinear,
            crop: None,
            color_order: ColorOrder::Rgb,
            scale: 1.0,
            mean: [0.0; 3],
            std: [1.0; 3],
            pad_value: 0,
            jpeg_dct_scaling: false,
        },
        output: OutputSpec {
            name: String::new(),
            labels: vec!["a".into(), "b".into()],
            postprocess: Postprocess::None,
        },
        batching: BatchingSpec {
            max_batch,
            max_queue_delay_us: delay_us,
            preferred_sizes: preferred.to_vec(),
        },
        instances: InstanceSpec {
            count: 1,
            intra_threads: 1,
        },
        slots: 0,
    }
}

struct Rig {
    batcher: Batcher,
    lost: UnboundedReceiver<ExecError>,
    tensors: Arc<SharedTensors>,
    answers: mpsc::UnboundedReceiver<FromExecutor>,
    started: UnboundedReceiver<usize>,
    /// Which instance started each batch, in order.
    on: UnboundedReceiver<usize>,
    alone: UnboundedReceiver<bool>,
    gates: Vec<std_mpsc::Sender<()>>,
}

fn rig(spec: &ModelSpec, instances: usize, gated: bool, fail: bool) -> Rig {
    rig_with(spec, instances, gated, fail, 0)
}

fn rig_with(spec: &ModelSpec, instances: usize, gated: bool, fail: bool, bomb: u32) -> Rig {
    rig_scheduled(
        spec,
        instances,
        gated,
        fail,
        bomb,
        &config::Scheduling::default(),
    )
}

fn rig_scheduled(
    spec: &ModelSpec,
    instances: usize,
    gated: bool,
    fail: bool,
    bomb: u32,
    scheduling: &config::Scheduling,
) -> Rig {
    rig_full(spec, instances, false, gated, fail, bomb, scheduling)
}

/// `instances` gated instances and a latency lane after them (the last
/// gate, `started` tells which ran).
fn rig_lane(spec: &ModelSpec, instances: usize) -> Rig {
    let scheduling = config::Scheduling::default();
    rig_full(spec, instances, true, true, false, 0, &scheduling)
}

fn rig_full(
    spec: &ModelSpec,
    instances: usize,
    lane: bool,
    gated: bool,
    fail: bool,
    bomb: u32,
    scheduling: &config::Scheduling,
) -> Rig {
    let tensors = Arc::new(SharedTensors::create(PoolLayout::new(&[(SLOTS, ELEMS * 4)])).unwrap());
    let (started_tx, started) = unbounded_channel();
    let (alone_tx, alone) = unbounded_channel();
    let (on_tx, on) = unbounded_channel();
    let mut gates = Vec::new();
    let engines: Vec<Box<dyn Engine>> = (0..instances + usize::from(lane))
        .map(|i| {
            let gate = gated.then(|| {
                let (tx, rx) = std_mpsc::channel();
                gates.push(tx);
                rx
            });
            Box::new(Echo {
                started: started_tx.clone(),
                id: i,
                on: on_tx.clone(),
                alone: alone_tx.clone(),
                gate,
                fail,
                // The lane, when there is one, stays whole.
                bomb: if lane && i == instances { 0 } else { bomb },
                lane: lane && i == instances,
            }) as Box<dyn Engine>
        })
        .collect();
    let (tx, answers) = unbounded_channel();
    let (lost_tx, lost) = unbounded_channel();
    let batcher = Batcher::spawn(spec, engines, tensors.clone(), tx, lost_tx, scheduling).unwrap();
    Rig {
        batcher,
        lost,
        tensors,
        answers,
        started,
        on,
        alone,
        gates,
    }
}

impl Rig {
    /// Writes a sample whose first value is the job id into slot `job % SLOTS`
    /// and submits it.
    async fn send(&self, job_id: u64, pending: u32) {
        self.send_as(job_id, pending, config::Class::Standard, "t")
            .await;
    }

    /// [`send`](Self::send) for a tenant of a class.
    async fn send_as(&self, job_id: u64, pending: u32, class: config::Class, tenant: &str) {
        let slot = SlotRef {
            model: 0,
            slot: (job_id % SLOTS as u64) as u32,
            generation: job_id + 1,
        };
        self.tensors.stamp(slot).unwrap();
        self.tensors
            .write_f32(slot, |s| s.fill(job_id as f32))
            .unwrap();
        let ctx = shm::RequestContext {
            request_id: format!("test-{job_id}"),
            class,
            tenant: tenant.into(),
            ..Default::default()
        };
        self.submit_ctx(job_id, slot, pending, ctx).await;
    }

    async fn submit(&self, job_id: u64, slot: SlotRef, pending: u32) {
        // The same tenant as `send`'s: their samples batch together.
        let ctx = shm::RequestContext {
            request_id: format!("test-{job_id}"),
            tenant: "t".into(),
            ..Default::default()
        };
        self.submit_ctx(job_id, slot, pending, ctx).await;
    }

    async fn submit_ctx(&self, job_id: u64, slot: SlotRef, pending: u32, ctx: shm::RequestContext) {
        let job = InferJob {
            job_id,
            ctx,
            slot,
            pending,
        };
        self.batcher.submit(job).await.unwrap();
    }

    async fn scores(&mut self) -> shm::Scores {
        match self.answers.recv().await.unwrap() {
            FromExecutor::Scores(s) => {
                assert_eq!(
                    s.values,
                    vec![s.job_id as f32, 1.0],
                    "answer routed to the wrong job"
                );
                s
            }
            other => panic!("expected Scores, got {other:?}"),
        }
    }

    async fn scores_n(&mut self, n: usize) -> Vec<shm::Scores> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.scores().await);
        }
        v.sort_by_key(|s| s.job_id);
        v
    }

    fn release(&self, instance: usize) {
        self.gates[instance].send(()).unwrap();
    }

    /// Asserts that no batch has started since the last one read.
    fn quiet(&mut self) {
        let got = self.started.try_recv();
        assert!(got.is_err(), "a batch started: {got:?}");
    }

    /// The job ids of the next `n` answers, sorted.
    async fn job_ids(&mut self, n: usize) -> Vec<u64> {
        self.scores_n(n).await.iter().map(|s| s.job_id).collect()
    }

    /// The instance that started the last batch `started` told of.
    fn last_on(&mut self) -> usize {
        let mut last = None;
        while let Ok(id) = self.on.try_recv() {
            last = Some(id);
        }
        last.expect("a batch started")
    }
}

/// The next batch size an instance started, failing after 5 s instead of
/// hanging (a batch routed to an instance the test does not release).
async fn started(r: &mut Rig) -> Option<usize> {
    timeout(Duration::from_secs(5), r.started.recv())
        .await
        .expect("no batch started")
}

#[test]
fn policy_decides_from_queue_length_wait_and_flush() {
    let p = BatchPolicy::from_spec(&spec(8, 2_000, &[6, 2, 4]).batching);
    assert_eq!(p.preferred, vec![6, 4, 2]);
    let early = Duration::from_micros(100);
    let late = Duration::from_micros(2_000);
    assert_eq!(p.ready(0, late, true), None);
    assert_eq!(p.ready(1, early, false), None);
    assert_eq!(p.ready(1, late, false), Some(1));
    assert_eq!(p.ready(1, early, true), Some(1));
    assert_eq!(p.ready(3, early, false), Some(2));
    assert_eq!(p.ready(5, early, false), Some(4));
    assert_eq!(p.ready(7, early, false), Some(6));
    assert_eq!(p.ready(7, late, false), Some(7));
    assert_eq!(p.ready(20, early, false), Some(8));
}

/// While the instance is busy, queued samples are taken by class, then by
/// fair shares of tenants within a class: a flooding tenant's backlog does
/// not hold back another tenant's sample that came after it.
#[tokio::test(start_paused = true)]
async fn queued_samples_run_by_class_then_fair_share() {
    use config::Class::{Batch, Critical, Standard};
    let mut r = rig(&spec(1, 0, &[]), 1, true, false);
    r.send_as(0, 9, Standard, "a").await;
    assert_eq!(r.started.recv().await, Some(1), "job 0 runs first");
    r.send_as(1, 9, Batch, "bulk").await;
    for id in 2..6 {
        r.send_as(id, 9, Standard, "a").await;
    }
    r.send_as(6, 9, Standard, "b").await;
    r.send_as(7, 9, Critical, "vip").await;
    tokio::task::yield_now().await;
    let mut order = Vec::new();
    for _ in 0..8 {
        r.release(0);
        order.push(r.scores().await.job_id);
    }
    // Critical first; then a and b alternate (b's sample ties with a's
    // next one and came later), then the rest of a's backlog; batch last.
    assert_eq!(order, [0, 7, 2, 6, 3, 4, 5, 1]);
}

/// By default a batch holds one tenant's samples of one class; with
/// `mix_tenants_in_batches` it fills from everyone, in scheduling order.
#[tokio::test(start_paused = true)]
async fn batches_hold_one_tenant_and_class_unless_mixing_is_on() {
    use config::Class::{Critical, Standard};
    for mix in [false, true] {
        let scheduling = config::Scheduling {
            mix_tenants_in_batches: mix,
            ..Default::default()
        };
        let mut r = rig_scheduled(&spec(4, 0, &[]), 1, true, false, 0, &scheduling);
        r.send_as(0, 9, Standard, "a").await;
        assert_eq!(r.started.recv().await, Some(1));
        r.send_as(1, 9, Standard, "a").await;
        r.send_as(2, 9, Standard, "a").await;
        r.send_as(3, 9, Standard, "b").await;
        r.send_as(4, 9, Critical, "vip").await;
        tokio::task::yield_now().await;
        r.release(0);
        let mut sizes = Vec::new();
        while sizes.iter().sum::<usize>() < 4 {
            sizes.push(r.started.recv().await.unwrap());
            r.release(0);
        }
        let mut order = Vec::new();
        for _ in 0..5 {
            order.push(r.scores().await.job_id);
        }
        let want: &[usize] = if mix { &[4] } else { &[1, 1, 1, 1] };
        assert_eq!(sizes, want, "mix = {mix}");
        // Critical first, then a and b alternate by fair share.
        assert_eq!(order, [0, 4, 1, 3, 2], "mix = {mix}");
    }
}

/// While critical samples flow, one instance stays free for them: a
/// standard sample waits rather than take it, a critical one runs at once,
/// and a second after the last critical sample the instance is shared
/// again. (Real time: a paused clock would jump to the batcher's own
/// timer whenever the test waits for an instance thread.)
#[tokio::test]
async fn an_instance_stays_free_for_critical_samples_while_they_flow() {
    use config::Class::{Critical, Standard};
    let mut r = rig(&spec(1, 0, &[]), 2, true, false);
    r.send_as(0, 9, Critical, "vip").await;
    assert_eq!(started(&mut r).await, Some(1));
    r.release(0);
    assert_eq!(r.scores().await.job_id, 0);
    r.send_as(1, 9, Standard, "a").await;
    assert_eq!(started(&mut r).await, Some(1), "one instance is shared");
    r.send_as(2, 9, Standard, "a").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    r.quiet();
    r.send_as(3, 9, Critical, "vip").await;
    assert_eq!(started(&mut r).await, Some(1), "critical runs at once");
    r.release(1);
    assert_eq!(r.scores().await.job_id, 3);
    tokio::time::sleep(Duration::from_millis(600)).await;
    r.quiet();
    assert_eq!(started(&mut r).await, Some(1), "shared again");
    r.release(0);
    r.release(1);
    assert_eq!(r.job_ids(2).await, [1, 2]);
}

#[tokio::test(start_paused = true)]
async fn pending_zero_dispatches_at_once() {
    let mut r = rig(&spec(8, 2_000, &[]), 1, false, false);
    r.send(1, 0).await;
    let s = r.scores().await;
    assert_eq!((s.batch, s.queue_us), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn partial_batch_waits_for_max_queue_delay() {
    let mut r = rig(&spec(8, 2_000, &[]), 1, false, false);
    for id in 0..3 {
        r.send(id, 5).await;
    }
    assert!(
        timeout(Duration::from_micros(1_900), r.answers.recv())
            .await
            .is_err(),
        "dispatched before the delay ran out"
    );
    let s = r.scores_n(3).await;
    assert!(
        s.iter().all(|s| s.batch == 3 && s.queue_us == 2_000),
        "{s:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn full_batch_dispatches_without_waiting() {
    let mut r = rig(&spec(4, 2_000, &[]), 1, false, false);
    for id in 0..4 {
        r.send(id, 9).await;
    }
    let s = r.scores_n(4).await;
    assert!(s.iter().all(|s| s.batch == 4 && s.queue_us == 0), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn preferred_size_dispatches_early_and_the_rest_waits() {
    // One instance: the last sample's timer starts when it is free again,
    // so the answers' order and timing are deterministic.
    let mut r = rig(&spec(8, 2_000, &[2]), 1, false, false);
    for id in 0..3 {
        r.send(id, 9).await;
    }
    let s = r.scores_n(2).await;
    assert_eq!(s.iter().map(|s| s.job_id).collect::<Vec<_>>(), vec![0, 1]);
    assert!(s.iter().all(|s| s.batch == 2 && s.queue_us == 0), "{s:?}");
    let last = r.scores().await;
    assert_eq!((last.job_id, last.batch, last.queue_us), (2, 1, 2_000));
}

#[tokio::test(start_paused = true)]
async fn samples_accumulate_while_every_instance_is_busy() {
    let mut r = rig(&spec(4, 2_000, &[]), 1, true, false);
    r.send(0, 0).await;
    assert_eq!(r.started.recv().await, Some(1));
    for id in 1..=6 {
        r.send(id, 0).await;
    }
    // Nothing else may start while the only instance is busy, even with
    // pending = 0 and the delay long gone.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(r.started.try_recv().is_err());
    r.release(0);
    assert_eq!(r.scores().await.batch, 1);
    assert_eq!(
        r.started.recv().await,
        Some(4),
        "max_batch caps the backlog"
    );
    r.release(0);
    assert_eq!(r.started.recv().await, Some(2));
    r.release(0);
    let s = r.scores_n(6).await;
    assert_eq!(
        s.iter().map(|s| s.batch).collect::<Vec<_>>(),
        [4, 4, 4, 4, 2, 2]
    );
    assert!(s.iter().all(|s| s.queue_us >= 50_000), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn free_instances_run_batches_in_parallel() {
    let mut r = rig(&spec(8, 2_000, &[]), 2, true, false);
    // Another sample is in preprocessing: the first batch does not run
    // alone, and leaves when its delay runs out.
    r.send(0, 1).await;
    assert_eq!(r.started.recv().await, Some(1));
    r.send(1, 0).await;
    // The second job starts on the other instance while the first still runs.
    assert_eq!(r.started.recv().await, Some(1));
    r.release(1);
    r.release(0);
    let s = r.scores_n(2).await;
    assert!(s.iter().all(|s| s.batch == 1), "{s:?}");
    assert!(s.iter().any(|s| s.queue_us == 0), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_stale_slot_fails_alone_and_the_batch_still_runs() {
    let mut r = rig(&spec(8, 2_000, &[]), 1, false, false);
    r.send(1, 9).await;
    let stale = SlotRef {
        model: 0,
        slot: 2,
        generation: 99,
    };
    r.tensors
        .stamp(SlotRef {
            generation: 100,
            ..stale
        })
        .unwrap();
    r.submit(2, stale, 9).await;
    r.send(3, 0).await;
    let mut scores = Vec::new();
    let mut failed = Vec::new();
    for _ in 0..3 {
        match r.answers.recv().await.unwrap() {
            FromExecutor::Scores(s) => scores.push((s.job_id, s.batch)),
            FromExecutor::Failed { job_id, message } => failed.push((job_id, message)),
            other => panic!("{other:?}"),
        }
    }
    scores.sort();
    assert_eq!(scores, vec![(1, 2), (3, 2)]);
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, 2);
    assert!(failed[0].1.contains("reused"), "{}", failed[0].1);
}

#[tokio::test(start_paused = true)]
async fn an_engine_error_fails_every_job_of_the_batch() {
    let mut r = rig(&spec(8, 2_000, &[]), 1, false, true);
    r.send(1, 1).await;
    r.send(2, 0).await;
    for _ in 0..2 {
        match r.answers.recv().await.unwrap() {
            FromExecutor::Failed { message, .. } => assert!(message.contains("boom"), "{message}"),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn close_runs_what_is_queued() {
    let r = rig(&spec(8, 60_000_000, &[]), 1, false, false);
    r.send(1, 9).await;
    r.send(2, 9).await;
    let Rig {
        batcher,
        mut answers,
        ..
    } = r;
    batcher.close().await;
    let mut s = Vec::new();
    while let Some(FromExecutor::Scores(x)) = answers.recv().await {
        s.push(x);
    }
    assert_eq!(s.len(), 2);
    assert!(
        s.iter().all(|s| s.batch == 2 && s.queue_us < 60_000_000),
        "{s:?}"
    );
}

#[path = "batcher_fault_tests.rs"]
mod faults;

/// A batch may take every core only when the batcher had nothing else:
/// no other instance busy, nothing left queued, nothing in preprocessing.
/// While it runs, no other batch starts: they would share its cores.
#[tokio::test(start_paused = true)]
async fn only_a_batch_with_nothing_else_around_runs_alone() {
    let mut r = rig(&spec(4, 1_000, &[]), 2, true, false);
    // Idle batcher, no sample in preprocessing: alone.
    r.send(1, 0).await;
    assert_eq!(r.started.recv().await, Some(1));
    assert_eq!(r.alone.recv().await, Some(true));
    // Job 2 waits for the lone batch, though instance 1 is free.
    r.send(2, 0).await;
    assert!(
        timeout(Duration::from_secs(5), r.started.recv())
            .await
            .is_err(),
        "a batch started next to one running alone"
    );
    r.gates[0].send(()).unwrap();
    r.scores().await;
    // Then it has the machine to itself: alone too, on the instance just
    // freed.
    assert_eq!(r.started.recv().await, Some(1));
    assert_eq!(r.alone.recv().await, Some(true));
    r.gates[0].send(()).unwrap();
    r.scores().await;
    // Idle again, but another sample is still in preprocessing: not alone
    // (the batch leaves when its delay runs out).
    r.send(3, 1).await;
    assert_eq!(r.started.recv().await, Some(1));
    assert_eq!(r.alone.recv().await, Some(false));
    r.gates[1].send(()).unwrap();
    r.gates[0].send(()).unwrap();
    r.scores().await;
}

/// `tenant_headroom`: while another tenant's image is in preprocessing
/// (announced by `Expect`), a tenant may not take the last free instance;
/// the announced sample runs at once on it; a hold whose sample never
/// comes (a failed decode) ends by itself.
#[tokio::test]
async fn an_instance_is_held_for_another_tenants_announced_sample() {
    use config::Class::Standard;
    let scheduling = config::Scheduling {
        tenant_headroom: 1,
        critical_headroom: 0,
        ..config::Scheduling::default()
    };
    let mut r = rig_scheduled(&spec(1, 0, &[]), 2, true, false, 0, &scheduling);
    let expect_b = || shm::Expect {
        model: 0,
        tenant: "b".into(),
        class: Standard,
    };
    r.batcher.expect(expect_b());
    r.send_as(0, 9, Standard, "a").await;
    assert_eq!(started(&mut r).await, Some(1), "a takes one instance");
    r.send_as(1, 9, Standard, "a").await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    r.quiet();
    r.send_as(2, 9, Standard, "b").await;
    assert_eq!(started(&mut r).await, Some(1), "b's sample runs at once");
    r.release(1);
    assert_eq!(r.scores().await.job_id, 2);
    r.release(0);
    assert_eq!(r.scores().await.job_id, 0);
    assert_eq!(started(&mut r).await, Some(1), "then a's next");
    // On whichever instance the batcher heard of first: an instance
    // answers before it reports itself free.
    let next = r.last_on();
    r.release(next);
    assert_eq!(r.scores().await.job_id, 1);

    // Announced, never sent: a gets the instance back after the hold.
    r.batcher.expect(expect_b());
    r.send_as(3, 9, Standard, "a").await;
    r.send_as(4, 9, Standard, "a").await;
    assert_eq!(started(&mut r).await, Some(1));
    tokio::time::sleep(Duration::from_millis(20)).await;
    r.quiet();
    assert_eq!(started(&mut r).await, Some(1), "the hold ended");
    r.release(0);
    r.release(1);
    assert_eq!(r.job_ids(2).await, [3, 4]);
}

/// The latency lane: a lone batch runs on it, alone; under a flood the
/// flood keeps to the other instances and a light tenant's sample runs on
/// the lane at once; critical samples take it whoever runs; batch never.
#[tokio::test]
async fn the_latency_lane_serves_lone_batches_light_tenants_and_critical_samples() {
    use config::Class::{Batch, Critical, Standard};
    let mut r = rig_lane(&spec(1, 0, &[]), 2);
    let lane = 2;
    // Idle, nothing in preprocessing: alone, on the lane.
    r.send_as(0, 0, Standard, "a").await;
    assert_eq!(started(&mut r).await, Some(1));
    assert_eq!(r.alone.recv().await, Some(true));
    r.release(lane);
    assert_eq!(r.scores().await.job_id, 0);

    // A flood: a's samples take both instances, not the lane.
    for id in 1..6 {
        r.send_as(id, 9, Standard, "a").await;
    }
    assert_eq!(started(&mut r).await, Some(1));
    assert_eq!(started(&mut r).await, Some(1));
    tokio::time::sleep(Duration::from_millis(20)).await;
    r.quiet();
    // b has nothing running: its sample goes to the lane at once.
    r.send_as(6, 9, Standard, "b").await;
    assert_eq!(started(&mut r).await, Some(1), "b's sample runs at once");
    r.release(lane);
    assert_eq!(r.scores().await.job_id, 6);
    // Batch work never takes the lane; critical work does, even though
    // its tenant is a's.
    r.send_as(7, 9, Batch, "bulk").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    r.quiet();
    r.send_as(8, 9, Critical, "a").await;
    assert_eq!(
        r.started.recv().await,
        Some(1),
        "the critical sample runs at once"
    );
    r.release(lane);
    assert_eq!(r.scores().await.job_id, 8);
    // The rest drains on the two instances.
    for _ in 0..6 {
        r.release(0);
        r.release(1);
    }
    assert_eq!(r.job_ids(6).await, [1, 2, 3, 4, 5, 7]);
}

/// With a lane, while critical samples flow a standard batch never runs
/// alone: a lone batch holds every other batch back, and the lane stays
/// the critical samples' to take.
#[tokio::test]
async fn while_critical_samples_flow_no_other_batch_runs_alone_on_the_lane() {
    use config::Class::{Critical, Standard};
    let mut r = rig_lane(&spec(1, 0, &[]), 2);
    let lane = 2;
    r.send_as(0, 0, Critical, "vip").await;
    assert_eq!(started(&mut r).await, Some(1));
    assert_eq!(r.alone.recv().await, Some(true), "critical runs alone");
    r.release(lane);
    assert_eq!(r.scores().await.job_id, 0);
    r.send_as(1, 0, Standard, "a").await;
    assert_eq!(started(&mut r).await, Some(1));
    assert_eq!(
        r.alone.recv().await,
        Some(false),
        "not alone after critical"
    );
    // Not alone: another batch may start beside it.
    r.send_as(2, 0, Critical, "vip").await;
    assert_eq!(started(&mut r).await, Some(1), "critical starts beside it");
    for i in 0..3 {
        r.release(i);
    }
    assert_eq!(r.job_ids(2).await, [1, 2]);
}

/// The rest protects the other instances' work: while none runs a batch,
/// the lane takes a light tenant's sample at once, even right after a
/// long standard batch.
#[tokio::test]
async fn the_lane_does_not_rest_while_no_other_instance_runs() {
    use config::Class::Standard;
    let mut r = rig_lane(&spec(1, 0, &[]), 2);
    let lane = 2;
    r.send_as(1, 9, Standard, "x").await;
    assert_eq!(started(&mut r).await, Some(1));
    let first = r.last_on();
    assert_ne!(first, lane, "one tenant alone: a throughput instance");
    r.send_as(2, 9, Standard, "y").await;
    assert_eq!(started(&mut r).await, Some(1));
    assert_eq!(r.last_on(), lane, "y, with nothing running, takes the lane");
    r.release(first);
    assert_eq!(r.scores().await.job_id, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.release(lane);
    assert_eq!(r.scores().await.job_id, 2);
    // An instance answers, then reports itself free.
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.send_as(3, 9, Standard, "x").await;
    assert_eq!(started(&mut r).await, Some(1));
    assert_eq!(
        r.last_on(),
        lane,
        "nothing else runs: the lane does not rest"
    );
    r.release(lane);
    assert_eq!(r.scores().await.job_id, 3);
}

/// A tenant that sends one sample at a time always has nothing running,
/// and so would two that alternate. After a standard batch, the lane takes
/// no standard sample for as long as that batch ran, whoever's it is: the
/// light tenants together cannot hold the lane (and the cores) against
/// the flood's share. A critical sample does not wait for the rest, and
/// leaves it as it was.
#[tokio::test]
async fn standard_samples_share_one_rest_from_the_lane() {
    use config::Class::{Critical, Standard};
    let mut r = rig_lane(&spec(1, 0, &[]), 2);
    let lane = 2;
    for id in 1..4 {
        r.send_as(id, 9, Standard, "flood").await;
    }
    assert_eq!(started(&mut r).await, Some(1));
    assert_eq!(started(&mut r).await, Some(1));
    r.send_as(4, 9, Standard, "x").await;
    assert_eq!(started(&mut r).await, Some(1), "x takes the lane");
    r.send_as(5, 9, Standard, "y").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    r.release(lane);
    let released = Instant::now();
    assert_eq!(r.scores().await.job_id, 4);
    // The lane rests about 500 ms: not y either, who has nothing running.
    tokio::time::sleep(Duration::from_millis(20)).await;
    r.quiet();
    r.send_as(6, 9, Critical, "vip").await;
    assert_eq!(started(&mut r).await, Some(1), "critical does not rest");
    r.release(lane);
    assert_eq!(r.scores().await.job_id, 6);
    tokio::time::sleep(Duration::from_millis(20)).await;
    r.quiet();
    // The rest ends and the lane wakes for y, as long after x's batch as
    // that batch ran.
    assert_eq!(started(&mut r).await, Some(1), "y after the rest");
    let rested = released.elapsed();
    assert!(rested >= Duration::from_millis(450), "rested {rested:?}");
    r.release(lane);
    assert_eq!(r.scores().await.job_id, 5);
    for _ in 0..3 {
        r.release(0);
        r.release(1);
    }
    assert_eq!(r.job_ids(3).await, [1, 2, 3]);
}
