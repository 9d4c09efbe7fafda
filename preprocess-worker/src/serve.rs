//! The worker process around [`preprocess`](crate::preprocess): handshake
//! with the gateway on the inherited Unix socket, map the shared tensor pool
//! and input region, then decode jobs on `init.threads` threads, each writing
//! its tensor straight into the job's slot and answering on the socket.
//! Video jobs run on the same threads; the reader routes their `Grant` and
//! `Cancel` messages to the job's thread by job id.

use std::collections::HashMap;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use config::{Limits, ModelSpec, SlotDtype};
use crossbeam_channel::{Receiver, Sender};
use shm::{
    FromWorker, Hello, Input, InputRegion, Job, JobDone, JobError, JobErrorKind, PROTO_VERSION,
    SharedTensors, ShmError, ToWorker, VideoJob, WorkerInit, read_frame, take_inherited_fd,
    write_frame,
};

use crate::error::{internal, job_error};
use crate::preprocess;
use crate::video::{self, Control, VideoEnv};

/// A job for a decode thread.
enum Work {
    Image(Job),
    Video(VideoJob, Receiver<Control>),
}

/// Control channels of the running video jobs, by job id.
type Routes = Arc<Mutex<HashMap<u64, Sender<Control>>>>;

/// The fds and parent the gateway hands a worker on its command line.
#[derive(Debug, Clone, Copy)]
pub struct ServeOptions {
    pub ipc_fd: RawFd,
    pub tensor_fd: RawFd,
    pub input_fd: RawFd,
    pub parent_pid: u32,
}

/// What every decode thread shares.
struct Ctx {
    tensors: SharedTensors,
    inputs: InputRegion,
    models: Vec<ModelSpec>,
    limits: Limits,
    out: Mutex<UnixStream>,
}

impl Ctx {
    fn send(&self, msg: &FromWorker) {
        let mut w = self.out.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = write_frame(&mut *w, msg) {
            tracing::error!("cannot answer the gateway: {e}");
        }
    }
}

/// Runs the worker until the gateway closes the socket (`Ok`) or the
/// protocol breaks (`Err`). Initialisation failures are reported with
/// `Fatal` before returning.
pub fn run(opts: ServeOptions) -> anyhow::Result<()> {
    shm::die_with_parent(opts.parent_pid).context("parent-death signal")?;
    let stream = UnixStream::from(take_inherited_fd(opts.ipc_fd).context("--ipc-fd")?);
    let mut reader = stream.try_clone().context("cloning the IPC socket")?;
    let mut writer = stream;
    let hello = Hello {
        proto_version: PROTO_VERSION,
        pid: std::process::id(),
    };
    write_frame(&mut writer, &FromWorker::Hello(hello)).context("sending Hello")?;
    let init = match read_frame::<ToWorker>(&mut reader).context("reading Init")? {
        Some(ToWorker::Init(init)) => init,
        Some(_) => bail!("the gateway sent a job before Init"),
        None => return Ok(()),
    };
    let threads = init.threads.max(1) as usize;
    let ctx = match setup(init, &opts, writer.try_clone()?) {
        Ok(ctx) => Arc::new(ctx),
        Err(e) => {
            let _ = write_frame(&mut writer, &FromWorker::Fatal(format!("{e:#}")));
            return Err(e);
        }
    };
    write_frame(&mut writer, &FromWorker::Ready).context("sending Ready")?;
    tracing::info!(threads, "preprocess worker ready");
    let (tx, rx) = crossbeam_channel::bounded::<Work>(threads);
    let routes: Routes = Arc::default();
    for i in 0..threads {
        let (ctx, rx, routes) = (ctx.clone(), rx.clone(), routes.clone());
        std::thread::Builder::new()
            .name(format!("decode-{i}"))
            .spawn(move || {
                rx.iter().for_each(|work| match work {
                    Work::Image(job) => answer(&ctx, job),
                    Work::Video(job, control) => answer_video(&ctx, &routes, job, control),
                })
            })
            .context("spawning a decode thread")?;
    }
    loop {
        let msg = read_frame::<ToWorker>(&mut reader).context("reading a job")?;
        match msg {
            Some(ToWorker::Job(job)) => tx
                .send(Work::Image(job))
                .context("decode threads are gone")?,
            Some(ToWorker::Video(job)) => {
                let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
                lock(&routes).insert(job.job_id, ctl_tx);
                tx.send(Work::Video(job, ctl_rx))
                    .context("decode threads are gone")?;
            }
            Some(ToWorker::Grant { job_id, slot }) => route(&routes, job_id, Control::Grant(slot)),
            Some(ToWorker::Cancel { job_id }) => route(&routes, job_id, Control::Cancel),
            Some(ToWorker::Init(_)) => tracing::warn!("ignoring a second Init"),
            None => return Ok(()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hands a control message to its running video job; one for a job that
/// already ended is dropped (the gateway frees that job's slots itself).
fn route(routes: &Routes, job_id: u64, c: Control) {
    match lock(routes).get(&job_id) {
        Some(tx) => {
            let _ = tx.send(c);
        }
        None => tracing::debug!(job_id, ?c, "control message for a finished video job"),
    }
}

/// Runs one video job, streaming its frames, and sends its last message,
/// even when decoding panics. Its route is removed before that last message
/// goes out, so every later Grant is known to be unused.
fn answer_video(ctx: &Ctx, routes: &Routes, job: VideoJob, control: Receiver<Control>) {
    let job_id = job.job_id;
    let _span = tracing::debug_span!("video", request_id = %job.ctx.request_id, tenant = %job.ctx.tenant, job_id).entered();
    let send = |m: &FromWorker| ctx.send(m);
    let model = match ctx.models.get(usize::from(job.model)) {
        Some(m) => m,
        None => {
            lock(routes).remove(&job_id);
            let message = format!(
                "video job names model index {}, worker has {}",
                job.model,
                ctx.models.len()
            );
            ctx.send(&FromWorker::Failed {
                job_id,
                error: internal(message),
            });
            return;
        }
    };
    let env = VideoEnv {
        tensors: &ctx.tensors,
        model,
        limits: &ctx.limits,
        send: &send,
        control,
    };
    let last = catch_unwind(AssertUnwindSafe(|| video::run(&env, &ctx.inputs, &job)))
        .unwrap_or_else(|_| FromWorker::Failed {
            job_id,
            error: internal("the preprocess worker panicked on this video"),
        });
    lock(routes).remove(&job_id);
    match &last {
        FromWorker::Failed { error, .. } => tracing::debug!("video job failed: {}", error.message),
        other => tracing::debug!(?other, "video job done"),
    }
    ctx.send(&last);
}

fn setup(init: WorkerInit, opts: &ServeOptions, out: UnixStream) -> anyhow::Result<Ctx> {
    let tensor_fd: OwnedFd = take_inherited_fd(opts.tensor_fd).context("--tensor-fd")?;
    let input_fd: OwnedFd = take_inherited_fd(opts.input_fd).context("--input-fd")?;
    let tensors = SharedTensors::open(tensor_fd, init.layout.clone()).context("tensor pool")?;
    let inputs =
        InputRegion::open(input_fd, init.threads, init.input_slot_bytes).context("input region")?;
    Ok(Ctx {
        tensors,
        inputs,
        models: init.models,
        limits: init.limits,
        out: Mutex::new(out),
    })
}

/// Runs one job and sends its answer, even when the pipeline panics.
fn answer(ctx: &Ctx, job: Job) {
    let job_id = job.job_id;
    let _span = tracing::debug_span!("job", request_id = %job.ctx.request_id, tenant = %job.ctx.tenant, job_id).entered();
    let msg = match catch_unwind(AssertUnwindSafe(|| run_job(ctx, &job))) {
        Ok(Ok(done)) => {
            tracing::debug!(decode_us = done.decode_us, "image preprocessed");
            FromWorker::Done(done)
        }
        Ok(Err(error)) => {
            tracing::debug!("job failed: {}", error.message);
            FromWorker::Failed { job_id, error }
        }
        Err(_) => FromWorker::Failed {
            job_id,
            error: JobError {
                kind: JobErrorKind::Internal,
                message: "the preprocess worker panicked on this input".into(),
            },
        },
    };
    ctx.send(&msg);
}

fn run_job(ctx: &Ctx, job: &Job) -> Result<JobDone, JobError> {
    let start = Instant::now();
    let deadline = start + Duration::from_millis(ctx.limits.decode_deadline_ms);
    let data: &[u8] = match &job.input {
        Input::Inline(bytes) => bytes,
        Input::Shared { index, len } => ctx.inputs.read(*index, *len).map_err(internal)?,
    };
    let model = ctx.models.get(usize::from(job.slot.model)).ok_or_else(|| {
        internal(format!(
            "job names model index {}, worker has {}",
            job.slot.model,
            ctx.models.len()
        ))
    })?;
    let written = match model.slot_dtype {
        SlotDtype::Float32 => ctx.tensors.write_f32(job.slot, |buf| {
            preprocess(data, model, &ctx.limits, deadline, buf)
        }),
        SlotDtype::Uint8 => ctx.tensors.write_u8(job.slot, |buf| {
            preprocess(data, model, &ctx.limits, deadline, buf)
        }),
    };
    let info = match written {
        Ok(Ok(info)) => info,
        Ok(Err(e)) => return Err(job_error(&e)),
        Err(e @ ShmError::StaleSlot { .. }) => {
            return Err(JobError {
                kind: JobErrorKind::Stale,
                message: e.to_string(),
            });
        }
        Err(e) => return Err(internal(e)),
    };
    Ok(JobDone {
        job_id: job.job_id,
        width: info.width,
        height: info.height,
        format: info.format.to_string(),
        decode_us: start.elapsed().as_micros() as u64,
    })
}
