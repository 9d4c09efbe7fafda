//! `gpu-executor --ipc-fd N --tensor-fd N --parent-pid P`: spawned by the
//! gateway, never by hand.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

fn main() -> std::process::ExitCode {
    let args = gpu_executor::serve::Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    gpu_executor::serve::run(args)
}
