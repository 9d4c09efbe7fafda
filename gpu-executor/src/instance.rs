//! An engine instance on its own OS thread: blocking inference never runs on
//! the async runtime. For each batch it gathers the samples from shared
//! memory into one reused buffer, runs the engine, postprocesses each sample
//! and answers each job; then it tells the batcher it is free again. A panic
//! anywhere in that work is caught: the batch's unanswered jobs get `Failed`
//! and the instance stays in service.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use config::{InputSpec, Postprocess, PreprocessSpec};
use shm::{FromExecutor, InferJob, Scores, SharedTensors};
use tokio::sync::mpsc::UnboundedSender;

use crate::cuda::HostSample;
use crate::{Engine, postprocess};

/// What every instance of one model needs to know.
#[derive(Debug, Clone)]
pub(crate) struct ModelInfo {
    pub name: String,
    pub elements: usize,
    pub max_batch: usize,
    pub postprocess: Postprocess,
    /// Set for a model whose slots hold uint8 pixels: how to turn them into
    /// its input while the batch is assembled.
    pub pixels: Option<Arc<(InputSpec, PreprocessSpec)>>,
}

impl ModelInfo {
    pub fn of(spec: &config::ModelSpec) -> Self {
        Self {
            name: spec.name.clone(),
            elements: spec.input.elements(),
            max_batch: (spec.batching.max_batch as usize).max(1),
            postprocess: spec.output.postprocess,
            pixels: (spec.slot_dtype == config::SlotDtype::Uint8)
                .then(|| Arc::new((spec.input.clone(), spec.preprocess.clone()))),
        }
    }
}

/// A job handed to an instance, with the time it spent in the queue.
#[derive(Debug)]
pub(crate) struct Queued {
    pub job: InferJob,
    pub queue_us: u64,
}

/// A batch for an instance. `alone`: the batcher had nothing else to do
/// (see [`Engine::run_alone`]).
#[derive(Debug)]
pub(crate) struct Batch {
    pub jobs: Vec<Queued>,
    pub alone: bool,
}

/// The batcher's side of one instance thread.
pub(crate) struct Instance {
    tx: std_mpsc::Sender<Batch>,
    thread: std::thread::JoinHandle<()>,
}

impl Instance {
    /// Starts the thread. It sends `id` on `free` after every batch and
    /// exits when the batcher drops this handle.
    pub fn spawn(
        id: usize,
        model: Arc<ModelInfo>,
        engine: Box<dyn Engine>,
        tensors: Arc<SharedTensors>,
        answers: UnboundedSender<FromExecutor>,
        free: UnboundedSender<usize>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std_mpsc::channel::<Batch>();
        let thread = std::thread::Builder::new()
            .name(format!("{}#{id}", model.name))
            .spawn(move || {
                // Reports the thread's end too, even by a panic that escaped
                // the guard: the batcher then finds it gone at its next
                // dispatch instead of waiting for it (a lone batch holds
                // every other batch back until its instance is free).
                let _exit = ReportExit(free.clone(), id);
                let mut worker = Worker {
                    model,
                    engine,
                    tensors,
                    answers,
                    input: Vec::new(),
                    batch: Vec::new(),
                    answered: Vec::new(),
                    alone: false,
                };
                for batch in rx {
                    worker.alone = batch.alone;
                    worker.guarded(batch.jobs, Worker::run);
                    if free.send(id).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Self { tx, thread })
    }

    /// Closes the instance's queue; the thread exits after its current
    /// batch (join the handle to wait for it).
    pub fn close(self) -> std::thread::JoinHandle<()> {
        self.thread
    }

    /// Hands a batch over; gives its jobs back if the thread is gone.
    pub fn dispatch(&self, batch: Batch) -> Result<(), Vec<Queued>> {
        self.tx.send(batch).map_err(|e| e.0.jobs)
    }
}

fn wrong_size(model: &ModelInfo, q: &Queued, len: usize) -> String {
    let slot = q.job.slot.slot;
    format!(
        "model {}: slot {slot} holds {len} values; the model's input needs {}",
        model.name, model.elements
    )
}

/// Each slot's sample as the engine takes it, or why it cannot be used
/// (`sized` checks its length, given its index).
fn samples<'a, T>(
    all: Vec<Result<&'a [T], shm::ShmError>>,
    wrap: fn(&'a [T]) -> HostSample<'a>,
    sized: &dyn Fn(usize, usize) -> Result<(), String>,
) -> Vec<Result<HostSample<'a>, String>> {
    all.into_iter()
        .enumerate()
        .map(|(i, r)| {
            let d = r.map_err(|e| e.to_string())?;
            sized(i, d.len()).map(|()| wrap(d))
        })
        .collect()
}

struct ReportExit(UnboundedSender<usize>, usize);

impl Drop for ReportExit {
    fn drop(&mut self) {
        let _ = self.0.send(self.1);
    }
}

struct Worker {
    model: Arc<ModelInfo>,
    engine: Box<dyn Engine>,
    tensors: Arc<SharedTensors>,
    answers: UnboundedSender<FromExecutor>,
    /// Reused input buffer: `max_batch × elements` floats.
    input: Vec<f32>,
    /// Jobs whose sample made it into `input`, in order.
    batch: Vec<Queued>,
    /// Ids of the current batch's jobs answered so far.
    answered: Vec<u64>,
    /// The current batch may use every core.
    alone: bool,
}

/// What a panic said, for the `Failed` message.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("no message")
}

impl Worker {
    /// Runs `work` on a batch, catching any panic in it (gathering,
    /// postprocessing, …): every job of the batch not answered yet is then
    /// answered `Failed`, so none is left waiting and the thread goes on.
    fn guarded(&mut self, jobs: Vec<Queued>, work: impl FnOnce(&mut Self, Vec<Queued>)) {
        let ids: Vec<u64> = jobs.iter().map(|q| q.job.job_id).collect();
        self.answered.clear();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| work(self, jobs)));
        let Err(payload) = result else { return };
        let message = format!(
            "model {}: the instance panicked: {}",
            self.model.name,
            panic_message(payload.as_ref())
        );
        tracing::error!(model = %self.model.name, %message, "batch failed");
        self.batch.clear();
        self.input.clear();
        for job_id in ids {
            if !self.answered.contains(&job_id) {
                let message = message.clone();
                self.answer(job_id, FromExecutor::Failed { job_id, message });
            }
        }
    }

    /// Sends the answer to job `job_id`.
    fn answer(&mut self, job_id: u64, msg: FromExecutor) {
        self.answered.push(job_id);
        let _ = self.answers.send(msg);
    }

    fn run(&mut self, mut jobs: Vec<Queued>) {
        // Work nobody waits for any more is not run.
        jobs.retain(|q| {
            let expired = q.job.ctx.expired();
            if expired {
                let job_id = q.job.job_id;
                tracing::debug!(request_id = %q.job.ctx.request_id, job_id, "deadline passed; not run");
                self.answer(job_id, FromExecutor::Expired { job_id });
            }
            !expired
        });
        if jobs.is_empty() {
            return;
        }
        if self.engine.reads_slots() {
            return self.run_from_slots(jobs);
        }
        if jobs.len() == 1 && self.model.pixels.is_none() {
            let q = jobs.pop().expect("one job");
            return self.run_in_place(q);
        }
        self.gather(jobs);
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len();
        let input = std::mem::take(&mut self.input);
        let outcome = self.infer(&input, n);
        self.input = input;
        self.finish(outcome, n);
    }

    /// An engine that copies the samples to its device itself gets them
    /// where the workers wrote them; a slot that is stale, unfilled or of
    /// the wrong size is answered `Failed` and left out.
    fn run_from_slots(&mut self, jobs: Vec<Queued>) {
        let tensors = self.tensors.clone();
        let refs: Vec<_> = jobs.iter().map(|q| q.job.slot).collect();
        let elements = self.model.elements;
        let model = self.model.clone();
        let engine = &mut self.engine;
        let mut run = |samples: Vec<Result<HostSample<'_>, String>>| {
            let errors: Vec<Option<String>> =
                samples.iter().map(|s| s.as_ref().err().cloned()).collect();
            let good: Vec<HostSample<'_>> = samples.into_iter().filter_map(Result::ok).collect();
            if good.is_empty() {
                return (errors, None);
            }
            let start = Instant::now();
            let result = std::panic::catch_unwind(AssertUnwindSafe(|| engine.run_slots(&good)));
            let infer_us = start.elapsed().as_micros() as u64;
            let result = match result {
                Ok(Ok(values)) => Ok(values),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("the engine panicked".to_string()),
            };
            (errors, Some((result, infer_us)))
        };
        let sized = |i: usize, len: usize| {
            (len == elements).then_some(()).ok_or_else(|| {
                format!(
                    "model {}: slot {} holds {len} values; the model's input needs {elements}",
                    model.name, refs[i].slot
                )
            })
        };
        let (errors, outcome) = if self.model.pixels.is_some() {
            tensors.read_many_u8(&refs, |all| run(samples(all, HostSample::U8, &sized)))
        } else {
            tensors.read_many_f32(&refs, |all| run(samples(all, HostSample::F32, &sized)))
        };
        self.batch.clear();
        for (q, error) in jobs.into_iter().zip(errors) {
            match error {
                Some(message) => self.skip(&q, message),
                None => self.batch.push(q),
            }
        }
        if let Some(outcome) = outcome {
            let n = self.batch.len();
            self.finish(outcome, n);
        }
    }

    /// A batch of one runs on its sample where the worker wrote it: no copy
    /// (the gateway keeps the slot leased until this job is answered).
    fn run_in_place(&mut self, q: Queued) {
        let elements = self.model.elements;
        let tensors = self.tensors.clone();
        let read = tensors.read_f32(q.job.slot, |sample| {
            (sample.len() == elements)
                .then(|| self.infer(sample, 1))
                .ok_or(sample.len())
        });
        match read {
            Ok(Ok(outcome)) => {
                self.batch.clear();
                self.batch.push(q);
                self.finish(outcome, 1);
            }
            Ok(Err(len)) => self.skip(&q, wrong_size(&self.model, &q, len)),
            Err(e) => self.skip(&q, e.to_string()),
        }
    }

    /// Runs the engine on `n` samples; the result and its time in µs.
    fn infer(&mut self, input: &[f32], n: usize) -> (Result<Vec<f32>, String>, u64) {
        let start = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| {
            if self.alone {
                self.engine.run_alone(input, n)
            } else {
                self.engine.run(input, n)
            }
        }));
        let infer_us = start.elapsed().as_micros() as u64;
        let result = match result {
            Ok(Ok(values)) => Ok(values),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the engine panicked".to_string()),
        };
        (result, infer_us)
    }

    /// Postprocesses and answers each job of `self.batch` (`n` of them).
    fn finish(&mut self, (result, infer_us): (Result<Vec<f32>, String>, u64), n: usize) {
        let values = match result {
            Ok(values) => values,
            Err(message) => return self.fail_batch(&message),
        };
        if values.is_empty() || values.len() % n != 0 {
            let message = format!(
                "model {}: the engine returned {} values for a batch of {n}",
                self.model.name,
                values.len()
            );
            return self.fail_batch(&message);
        }
        let width = values.len() / n;
        let mut batch = std::mem::take(&mut self.batch);
        for (q, chunk) in batch.drain(..).zip(values.chunks_exact(width)) {
            let mut values = chunk.to_vec();
            postprocess::apply(self.model.postprocess, &mut values);
            let job_id = q.job.job_id;
            tracing::debug!(
                request_id = %q.job.ctx.request_id,
                tenant = %q.job.ctx.tenant,
                job_id,
                batch = n,
                infer_us,
                "scored"
            );
            let scores = Scores {
                job_id,
                values,
                queue_us: q.queue_us,
                infer_us,
                batch: n as u32,
            };
            self.answer(job_id, FromExecutor::Scores(scores));
        }
        self.batch = batch;
    }

    /// Copies each job's sample into `input` (one memcpy each, or the
    /// normalisation of its pixels for a uint8-slot model); a job whose
    /// slot is stale, unfilled or of the wrong size is answered `Failed` and
    /// left out of the batch.
    fn gather(&mut self, jobs: Vec<Queued>) {
        let elements = self.model.elements;
        self.input.clear();
        self.input.reserve(self.model.max_batch * elements);
        self.batch.clear();
        for q in jobs {
            let input = &mut self.input;
            let read = match &self.model.pixels {
                None => self.tensors.read_f32(q.job.slot, |sample| {
                    if sample.len() == elements {
                        input.extend_from_slice(sample);
                        Ok(())
                    } else {
                        Err(sample.len())
                    }
                }),
                Some(pixels) => self.tensors.read_u8(q.job.slot, |sample| {
                    if sample.len() == elements {
                        let at = input.len();
                        input.resize(at + elements, 0.0);
                        let (spec, pre) = &**pixels;
                        preprocess_worker::normalize_rgb8(sample, spec, pre, &mut input[at..]);
                        Ok(())
                    } else {
                        Err(sample.len())
                    }
                }),
            };
            match read {
                Ok(Ok(())) => self.batch.push(q),
                Ok(Err(len)) => self.skip(&q, wrong_size(&self.model, &q, len)),
                Err(e) => self.skip(&q, e.to_string()),
            }
        }
    }

    /// Answers `Failed` to a job whose sample cannot be read.
    fn skip(&mut self, q: &Queued, message: String) {
        let job_id = q.job.job_id;
        tracing::debug!(job_id, %message, "sample skipped");
        self.answer(job_id, FromExecutor::Failed { job_id, message });
    }

    fn fail_batch(&mut self, message: &str) {
        tracing::error!(model = %self.model.name, %message, "batch failed");
        let mut batch = std::mem::take(&mut self.batch);
        for q in batch.drain(..) {
            let job_id = q.job.job_id;
            let message = message.to_string();
            self.answer(job_id, FromExecutor::Failed { job_id, message });
        }
        self.batch = batch;
    }
}

#[cfg(test)]
mod tests {
    use shm::{PoolLayout, SlotRef};
    use tokio::sync::mpsc::unbounded_channel;

    use super::*;
    use crate::ExecError;

    struct Zeros;

    impl Engine for Zeros {
        fn run(&mut self, _: &[f32], batch: usize) -> Result<Vec<f32>, ExecError> {
            Ok(vec![0.0; batch])
        }
        fn outputs(&self) -> usize {
            1
        }
    }

    fn worker(tensors: Arc<SharedTensors>, answers: UnboundedSender<FromExecutor>) -> Worker {
        let model = Arc::new(ModelInfo {
            name: "m".into(),
            elements: 2,
            max_batch: 4,
            postprocess: Postprocess::None,
            pixels: None,
        });
        Worker {
            model,
            engine: Box::new(Zeros),
            tensors,
            answers,
            input: Vec::new(),
            batch: Vec::new(),
            answered: Vec::new(),
            alone: false,
        }
    }

    /// Each sample's sum: shows what the engine read.
    struct Sums;

    impl Engine for Sums {
        fn run(&mut self, input: &[f32], batch: usize) -> Result<Vec<f32>, ExecError> {
            Ok(input
                .chunks(input.len() / batch)
                .map(|s| s.iter().sum())
                .collect())
        }
        fn outputs(&self) -> usize {
            1
        }
    }

    /// A worker over 4 slots of 2 floats whose engine sums each sample,
    /// and the receiver of its answers.
    fn summing_worker() -> (
        Arc<SharedTensors>,
        Worker,
        tokio::sync::mpsc::UnboundedReceiver<FromExecutor>,
    ) {
        let tensors = Arc::new(SharedTensors::create(PoolLayout::new(&[(4, 8)])).unwrap());
        let (tx, rx) = unbounded_channel();
        let mut w = worker(tensors.clone(), tx);
        w.engine = Box::new(Sums);
        (tensors, w, rx)
    }

    #[test]
    fn a_lone_sample_is_read_in_place_and_a_bad_slot_fails_only_its_job() {
        let (tensors, mut w, mut rx) = summing_worker();
        let mut next = || match rx.try_recv() {
            Ok(FromExecutor::Scores(s)) => Ok((s.job_id, s.values, s.batch)),
            Ok(FromExecutor::Failed { job_id, message }) => Err((job_id, message)),
            other => panic!("{other:?}"),
        };
        // One job (in place) and two (gathered) score alike.
        w.guarded(vec![job(&tensors, 0)], Worker::run);
        assert_eq!(next(), Ok((0, vec![2.0], 1)));
        assert!(w.input.is_empty(), "a lone sample is not copied");
        w.guarded(vec![job(&tensors, 1), job(&tensors, 2)], Worker::run);
        assert_eq!(next(), Ok((1, vec![2.0], 2)));
        assert_eq!(next(), Ok((2, vec![2.0], 2)));
        // A stale handle fails its job alone.
        let mut stale = job(&tensors, 3);
        stale.job.slot.generation = 2;
        w.guarded(vec![stale], Worker::run);
        assert!(matches!(next(), Err((3, _))));
        // A sample of the wrong size too.
        w.model = Arc::new(ModelInfo {
            elements: 3,
            ..(*w.model).clone()
        });
        w.guarded(vec![job(&tensors, 0)], Worker::run);
        let (id, message) = next().unwrap_err();
        assert_eq!(id, 0);
        assert!(message.contains("holds 2 values"), "{message}");
    }

    /// An engine that takes its samples from the slots, as a GPU instance
    /// does: each sample's sum, and what kind of slot it read.
    struct SlotSums(Vec<&'static str>);

    impl Engine for SlotSums {
        fn run(&mut self, _: &[f32], _: usize) -> Result<Vec<f32>, ExecError> {
            panic!("a slot-reading engine is never given gathered input");
        }
        fn outputs(&self) -> usize {
            1
        }
        fn reads_slots(&self) -> bool {
            true
        }
        fn run_slots(&mut self, samples: &[HostSample<'_>]) -> Result<Vec<f32>, ExecError> {
            Ok(samples
                .iter()
                .map(|s| match s {
                    HostSample::F32(d) => {
                        self.0.push("f32");
                        d.iter().sum()
                    }
                    HostSample::U8(d) => {
                        self.0.push("u8");
                        d.iter().map(|&b| f32::from(b)).sum()
                    }
                })
                .collect())
        }
    }

    #[test]
    fn a_slot_reading_engine_gets_the_batch_in_place_and_bad_slots_fail_alone() {
        let (tensors, mut w, mut rx) = summing_worker();
        w.engine = Box::new(SlotSums(Vec::new()));
        let mut stale = job(&tensors, 1);
        stale.job.slot.generation = 9;
        w.guarded(vec![job(&tensors, 0), stale, job(&tensors, 2)], Worker::run);
        let mut got = Vec::new();
        while let Ok(m) = rx.try_recv() {
            got.push(match m {
                FromExecutor::Scores(s) => format!("{} {:?} batch {}", s.job_id, s.values, s.batch),
                FromExecutor::Failed { job_id, .. } => format!("{job_id} failed"),
                other => panic!("{other:?}"),
            });
        }
        got.sort();
        assert_eq!(got, ["0 [2.0] batch 2", "1 failed", "2 [2.0] batch 2"]);
        assert!(w.input.is_empty(), "nothing gathered on the host");

        // uint8 slots are handed over as bytes, not normalised on the host.
        let tensors = Arc::new(SharedTensors::create(PoolLayout::new(&[(2, 2)])).unwrap());
        let (tx, mut rx) = unbounded_channel();
        let mut w = worker(tensors.clone(), tx);
        w.engine = Box::new(SlotSums(Vec::new()));
        let spec = crate::batcher::tests::spec(4, 1000, &[]);
        w.model = Arc::new(ModelInfo {
            elements: 2,
            pixels: Some(Arc::new((spec.input.clone(), spec.preprocess.clone()))),
            ..(*w.model).clone()
        });
        let slot = SlotRef {
            model: 0,
            slot: 0,
            generation: 1,
        };
        tensors.stamp(slot).unwrap();
        tensors
            .write_u8(slot, |b| b.copy_from_slice(&[200, 55]))
            .unwrap();
        w.guarded(vec![job_at(slot, 7)], Worker::run);
        match rx.try_recv() {
            Ok(FromExecutor::Scores(s)) => assert_eq!((s.job_id, s.values), (7, vec![255.0])),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jobs_past_their_deadline_are_answered_expired_and_not_run() {
        let (tensors, mut w, mut rx) = summing_worker();
        let mut late = job(&tensors, 0);
        late.job.ctx.deadline_ns = shm::monotonic_ns() - 1;
        let mut on_time = job(&tensors, 1);
        on_time.job.ctx.deadline_ns = shm::monotonic_ns() + 60_000_000_000;
        w.guarded(vec![late, on_time], Worker::run);
        assert!(matches!(
            rx.try_recv(),
            Ok(FromExecutor::Expired { job_id: 0 })
        ));
        match rx.try_recv() {
            // The other ran alone: a batch of one.
            Ok(FromExecutor::Scores(s)) => assert_eq!((s.job_id, s.batch), (1, 1)),
            other => panic!("{other:?}"),
        }
        assert!(rx.try_recv().is_err());
    }

    fn job(tensors: &SharedTensors, job_id: u64) -> Queued {
        let slot = SlotRef {
            model: 0,
            slot: job_id as u32,
            generation: 1,
        };
        tensors.stamp(slot).unwrap();
        tensors.write_f32(slot, |s| s.fill(1.0)).unwrap();
        job_at(slot, job_id)
    }

    fn job_at(slot: SlotRef, job_id: u64) -> Queued {
        let job = InferJob {
            job_id,
            ctx: shm::RequestContext {
                request_id: format!("test-{job_id}"),
                ..Default::default()
            },
            slot,
            pending: 0,
        };
        Queued { job, queue_us: 0 }
    }

    #[test]
    fn a_panic_outside_the_engine_fails_every_unanswered_job_once() {
        let tensors = Arc::new(SharedTensors::create(PoolLayout::new(&[(4, 8)])).unwrap());
        let (tx, mut rx) = unbounded_channel();
        let mut w = worker(tensors.clone(), tx);
        let jobs: Vec<Queued> = (0..3).map(|id| job(&tensors, id)).collect();
        // Answers job 0, then panics as postprocessing might.
        w.guarded(jobs, |w, jobs| {
            w.gather(jobs);
            let q = w.batch.remove(0);
            let job_id = q.job.job_id;
            let message = "answered".to_string();
            w.answer(job_id, FromExecutor::Failed { job_id, message });
            panic!("postprocess blew up");
        });
        let mut got = Vec::new();
        while let Ok(FromExecutor::Failed { job_id, message }) = rx.try_recv() {
            got.push((job_id, message));
        }
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!(got[0], (0, "answered".to_string()));
        for (id, (job_id, message)) in got.iter().enumerate().skip(1) {
            assert_eq!(*job_id, id as u64);
            assert!(message.contains("postprocess blew up"), "{message}");
        }
        assert!(w.batch.is_empty() && w.input.is_empty());

        // The worker still runs the next batch.
        w.guarded(vec![job(&tensors, 3)], Worker::run);
        match rx.try_recv() {
            Ok(FromExecutor::Scores(s)) => assert_eq!((s.job_id, s.values), (3, vec![0.0])),
            other => panic!("{other:?}"),
        }
    }
}
