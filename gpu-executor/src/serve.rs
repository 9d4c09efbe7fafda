//! The executor process: handshake with the gateway, load every model
//! (warm-up included) before saying `Ready`, then route `Infer` jobs to the
//! model's batcher; every answer goes back through one writer task.

use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use config::ModelSpec;
use shm::{
    ExecutorInit, FromExecutor, Hello, PROTO_VERSION, SharedTensors, ToExecutor, read_frame,
    write_frame,
};
use tokio::net::unix::OwnedReadHalf;
use tokio::sync::mpsc;

use crate::{Backends, Batcher, ExecError, LoadedModel, load_model};

/// Samples in each instance's warm-up batch: `max_batch`, so the first full
/// batch under load does not pay for growing ONNX Runtime's arena, and any
/// shape problem shows up before `Ready` rather than on the first burst.
fn warmup_batch(spec: &ModelSpec) -> usize {
    (spec.batching.max_batch as usize).max(1)
}

/// Command line: every value comes from the gateway that spawns us.
#[derive(Debug, clap::Parser)]
#[command(
    name = "gpu-executor",
    version,
    about = "mmgate executor (spawned by the gateway)"
)]
pub struct Args {
    /// Inherited Unix stream socket to the gateway.
    #[arg(long)]
    pub ipc_fd: i32,
    /// Inherited memfd of the tensor pool.
    #[arg(long)]
    pub tensor_fd: i32,
    /// The gateway's pid: we die with it.
    #[arg(long)]
    pub parent_pid: u32,
    /// Linux CPU list to pin the executor and its engine threads to;
    /// empty = not pinned.
    #[arg(long, default_value = "")]
    pub cpus: String,
}

/// Runs the executor until the gateway closes the socket (exit 0); any
/// startup failure is reported as `Fatal` when the socket is up (exit 1).
pub fn run(args: Args) -> ExitCode {
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::from(1)
        }
    }
}

fn run_inner(args: Args) -> anyhow::Result<()> {
    shm::die_with_parent(args.parent_pid).context("setting the parent-death signal")?;
    // Before the engines start their threads, so they all inherit it.
    shm::pin_to_cpus(&args.cpus).context("pinning to CPUs")?;
    let ipc =
        shm::take_inherited_fd(args.ipc_fd).with_context(|| format!("--ipc-fd {}", args.ipc_fd))?;
    let tensor_fd = shm::take_inherited_fd(args.tensor_fd)
        .with_context(|| format!("--tensor-fd {}", args.tensor_fd))?;
    let ipc = UnixStream::from(ipc);
    let mut writer = ipc.try_clone().context("cloning the IPC socket")?;
    let mut reader = ipc.try_clone().context("cloning the IPC socket")?;

    let hello = Hello {
        proto_version: PROTO_VERSION,
        pid: std::process::id(),
    };
    write_frame(&mut writer, &FromExecutor::Hello(hello)).context("sending Hello")?;
    let init = match read_frame::<ToExecutor>(&mut reader).context("reading Init")? {
        None => return Ok(()),
        Some(ToExecutor::Init(init)) => init,
        Some(other) => {
            let msg = format!("expected Init first, got {other:?}");
            let _ = write_frame(&mut writer, &FromExecutor::Fatal(msg.clone()));
            anyhow::bail!(msg);
        }
    };
    let loaded = match load(init, tensor_fd) {
        Ok(loaded) => loaded,
        Err(e) => {
            let msg = e.to_string();
            let _ = write_frame(&mut writer, &FromExecutor::Fatal(msg.clone()));
            anyhow::bail!(msg);
        }
    };
    let runtimes = loaded
        .models
        .iter()
        .filter_map(|(_, m)| m.as_ref().map(|m| m.runtime.clone()))
        .collect();
    write_frame(&mut writer, &FromExecutor::Ready(runtimes)).context("sending Ready")?;
    drop((writer, reader));
    tracing::info!(
        models = loaded.models.iter().filter(|(_, m)| m.is_some()).count(),
        "ready"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let served = rt.block_on(serve(ipc, loaded));
    // An error may leave batchers draining: do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(1));
    Ok(served?)
}

/// Everything `Init` asked for, loaded and warmed up.
pub struct Loaded {
    pub tensors: Arc<SharedTensors>,
    /// Every model of `Init`, in order; `None` for one it said not to load.
    pub models: Vec<(ModelSpec, Option<LoadedModel>)>,
    /// How batchers order and group queued samples.
    pub scheduling: config::Scheduling,
    /// How often to tell the gateway we are alive.
    pub heartbeat: Duration,
}

/// Maps the tensor pool and loads `instances.count` warmed-up engines per
/// model (but those of `init.unloaded`). Model `i` of `init.models` is
/// region `i` of the pool and the `slot.model` index of its jobs.
pub fn load(init: ExecutorInit, tensor_fd: std::os::fd::OwnedFd) -> Result<Loaded, ExecError> {
    let scheduling = init.scheduling.clone();
    let heartbeat = Duration::from_millis(init.executor.heartbeat_ms.max(1));
    if init.models.len() != init.layout.regions.len() {
        return Err(ExecError::Protocol(format!(
            "Init has {} models but the tensor pool has {} regions",
            init.models.len(),
            init.layout.regions.len()
        )));
    }
    for (spec, region) in init.models.iter().zip(&init.layout.regions) {
        if region.sample_bytes != spec.slot_bytes() {
            return Err(ExecError::Protocol(format!(
                "model {}: pool slots hold {} bytes, the model's slots need {}",
                spec.name,
                region.sample_bytes,
                spec.slot_bytes()
            )));
        }
    }
    let tensors = Arc::new(SharedTensors::open(tensor_fd, init.layout)?);
    let backends = Backends::from_section(&init.executor)
        .with_pool(tensors.mapped_range())
        .with_throughput_priority(scheduling.throughput_priority);
    let mut models = Vec::with_capacity(init.models.len());
    for spec in init.models {
        if init.unloaded.contains(&spec.name) {
            tracing::info!(model = %spec.name, "model not loaded (unloaded by the admin API)");
            models.push((spec, None));
            continue;
        }
        let start = std::time::Instant::now();
        let loaded = load_model(&spec, &backends, warmup_batch(&spec))?;
        let r = &loaded.runtime;
        tracing::info!(
            model = %spec.name,
            backend = r.backend.as_str(),
            precision = r.precision.as_str(),
            device = %r.device,
            layout = %r.layout,
            ms = start.elapsed().as_millis() as u64,
            "model loaded and warmed up"
        );
        models.push((spec, Some(loaded)));
    }
    Ok(Loaded {
        tensors,
        models,
        scheduling,
        heartbeat,
    })
}

/// How long, once a model has no instance left, the batchers get to answer
/// what they hold before the process exits anyway.
const DRAIN_ON_ERROR: Duration = Duration::from_secs(10);

/// Routes jobs until the gateway closes the socket, then lets every batcher
/// finish what it holds. Returns an error (the process exits 1, and the
/// gateway restarts it) when the socket fails or a model has lost every
/// engine instance: queued jobs are answered first, within `DRAIN_ON_ERROR`.
pub async fn serve(ipc: UnixStream, loaded: Loaded) -> Result<(), ExecError> {
    ipc.set_nonblocking(true)?;
    let (mut rd, mut wr) = tokio::net::UnixStream::from_std(ipc)?.into_split();
    let (answers, mut outbox) = mpsc::unbounded_channel::<FromExecutor>();
    let writer = tokio::spawn(async move {
        while let Some(msg) = outbox.recv().await {
            if let Err(e) = shm::send(&mut wr, &msg).await {
                tracing::warn!("cannot answer the gateway: {e}");
                break;
            }
        }
    });
    // Alive while this runtime runs: a hung or stopped process goes silent.
    let beats = answers.clone();
    let heartbeat = tokio::spawn(async move {
        let first = tokio::time::Instant::now() + loaded.heartbeat;
        let mut every = tokio::time::interval_at(first, loaded.heartbeat);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            if beats.send(FromExecutor::Heartbeat).is_err() {
                break;
            }
        }
    });
    let (lost_tx, mut lost) = mpsc::unbounded_channel::<ExecError>();
    let batchers = loaded
        .models
        .into_iter()
        .map(|(spec, model)| {
            let Some(model) = model else { return Ok(None) };
            let (tensors, answers, lost) =
                (loaded.tensors.clone(), answers.clone(), lost_tx.clone());
            Batcher::spawn(
                &spec,
                model.engines,
                tensors,
                answers,
                lost,
                &loaded.scheduling,
            )
            .map(Some)
        })
        .collect::<Result<Vec<_>, _>>()?;
    drop(lost_tx);

    let outcome = tokio::select! {
        biased;
        Some(e) = lost.recv() => Err(e),
        r = route(&mut rd, &batchers, &answers) => r,
    };
    heartbeat.abort();
    let drain = async {
        for b in batchers.into_iter().flatten() {
            b.close().await;
        }
        drop(answers);
        let _ = writer.await;
    };
    match &outcome {
        Ok(()) => {
            tracing::info!("gateway closed the socket; draining");
            drain.await;
        }
        Err(e) => {
            tracing::error!("{e}; answering what is queued, then exiting");
            let _ = tokio::time::timeout(DRAIN_ON_ERROR, drain).await;
        }
    }
    outcome
}

/// Hands each `Infer` job to its model's batcher until the socket closes.
async fn route(
    rd: &mut OwnedReadHalf,
    batchers: &[Option<Batcher>],
    answers: &mpsc::UnboundedSender<FromExecutor>,
) -> Result<(), ExecError> {
    while let Some(msg) = shm::recv::<ToExecutor>(rd).await? {
        match msg {
            ToExecutor::Infer(job) => match batchers.get(job.slot.model as usize) {
                Some(Some(b)) => b.submit(job).await?,
                Some(None) => {
                    let _ = answers.send(FromExecutor::NotLoaded { job_id: job.job_id });
                }
                None => {
                    let _ = answers.send(FromExecutor::Failed {
                        job_id: job.job_id,
                        message: format!(
                            "model index {} does not exist (the executor has {})",
                            job.slot.model,
                            batchers.len()
                        ),
                    });
                }
            },
            ToExecutor::Expect(e) => {
                if let Some(Some(b)) = batchers.get(e.model as usize) {
                    b.expect(e);
                }
            }
            ToExecutor::Init(_) => tracing::warn!("ignoring a second Init"),
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "serve_tests.rs"]
mod tests;
