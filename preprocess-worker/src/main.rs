//! `preprocess-worker`: a child process of the gateway that decodes images
//! into tensors in shared memory. Parses its flags, starts logging, runs.

use clap::Parser;
use preprocess_worker::serve::{ServeOptions, run};

/// Started by the gateway, never by hand: the fds are inherited from it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Unix socket to the gateway (IPC messages).
    #[arg(long)]
    ipc_fd: i32,
    /// memfd of the shared tensor pool.
    #[arg(long)]
    tensor_fd: i32,
    /// memfd of this worker's input region.
    #[arg(long)]
    input_fd: i32,
    /// The gateway's pid; the worker dies with it.
    #[arg(long)]
    parent_pid: u32,
    /// Linux CPU list to pin the worker's threads to; empty = not pinned.
    #[arg(long, default_value = "")]
    cpus: String,
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    // Before any thread starts, so every decode thread inherits it.
    if let Err(e) = shm::pin_to_cpus(&cli.cpus) {
        tracing::error!("preprocess worker: {e}");
        std::process::exit(1);
    }
    let opts = ServeOptions {
        ipc_fd: cli.ipc_fd,
        tensor_fd: cli.tensor_fd,
        input_fd: cli.input_fd,
        parent_pid: cli.parent_pid,
    };
    if let Err(e) = run(opts) {
        tracing::error!("preprocess worker: {e:#}");
        std::process::exit(1);
    }
}
