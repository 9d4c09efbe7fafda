//! An engine instance on its own OS thread: blocking inference never runs on
//! the async runtime. For each batch it gathers the samples from shared
//! memory into one reused buffer, runs the engine, postprocesses each sample
//! and answers each job; then it tells the batcher it is free again.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Instant;

use shm::{FromExecutor, InferJob, Scores, SharedTensors};
use spec::Postprocess;
use tokio::sync::mpsc::UnboundedSender;

use crate::{Engine, postprocess};

/// What every instance of one model needs to know.
#[derive(Debug, Clone)]
pub(crate) struct ModelInfo {
    pub name: String,
    pub elements: usize,
    pub max_batch: usize,
    pub postprocess: Postprocess,
}

/// A job handed to an instance, with the time it spent in the queue.
#[derive(Debug)]
pub(crate) struct Queued {
    pub job: InferJob,
    pub queue_us: u64,
}

/// The batcher's side of one instance thread.
pub(crate) struct Instance {
    tx: std_mpsc::Sender<Vec<Queued>>,
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
        let (tx, rx) = std_mpsc::channel::<Vec<Queued>>();
        let thread = std::thread::Builder::new()
            .name(format!("{}#{id}", model.name))
            .spawn(move || {
                let mut worker = Worker {
                    model,
                    engine,
                    tensors,
                    answers,
                    input: Vec::new(),
                    batch: Vec::new(),
                };
                for jobs in rx {
                    worker.run(jobs);
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

    /// Hands a batch over; gives it back if the thread is gone.
    pub fn dispatch(&self, jobs: Vec<Queued>) -> Result<(), Vec<Queued>> {
        self.tx.send(jobs).map_err(|e| e.0)
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
}

impl Worker {
    fn run(&mut self, jobs: Vec<Queued>) {
        self.gather(jobs);
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len();
        let start = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| self.engine.run(&self.input, n)));
        let infer_us = start.elapsed().as_micros() as u64;
        let values = match result {
            Ok(Ok(values)) => values,
            Ok(Err(e)) => return self.fail_batch(&e.to_string()),
            Err(_) => return self.fail_batch("the engine panicked"),
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
        for (q, chunk) in self.batch.drain(..).zip(values.chunks_exact(width)) {
            let mut values = chunk.to_vec();
            postprocess::apply(self.model.postprocess, &mut values);
            let _ = self.answers.send(FromExecutor::Scores(Scores {
                job_id: q.job.job_id,
                values,
                queue_us: q.queue_us,
                infer_us,
                batch: n as u32,
            }));
        }
    }

    /// Copies each job's sample into `input` (one memcpy each); a job whose
    /// slot is stale, unfilled or of the wrong size is answered `Failed` and
    /// left out of the batch.
    fn gather(&mut self, jobs: Vec<Queued>) {
        let elements = self.model.elements;
        self.input.clear();
        self.input.reserve(self.model.max_batch * elements);
        self.batch.clear();
        for q in jobs {
            let input = &mut self.input;
            let read = self.tensors.read_f32(q.job.slot, |sample| {
                if sample.len() == elements {
                    input.extend_from_slice(sample);
                    Ok(())
                } else {
                    Err(sample.len())
                }
            });
            let message = match read {
                Ok(Ok(())) => {
                    self.batch.push(q);
                    continue;
                }
                Ok(Err(len)) => format!(
                    "model {}: slot {} holds {len} values; the model's input needs {elements}",
                    self.model.name, q.job.slot.slot
                ),
                Err(e) => e.to_string(),
            };
            tracing::debug!(job_id = q.job.job_id, %message, "sample skipped");
            let _ = self.answers.send(FromExecutor::Failed {
                job_id: q.job.job_id,
                message,
            });
        }
    }

    fn fail_batch(&mut self, message: &str) {
        tracing::error!(model = %self.model.name, %message, "batch failed");
        for q in self.batch.drain(..) {
            let _ = self.answers.send(FromExecutor::Failed {
                job_id: q.job.job_id,
                message: message.to_string(),
            });
        }
    }
}
