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
