//! `gpu-executor --ipc-fd N --tensor-fd N --parent-pid P`: spawned by the
//! gateway, never by hand. `gpu-executor check-model …` (also reached as
//! `mmgate check-model …`) compares backends and precisions on images.

use std::io::IsTerminal;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// `check-model`'s command line.
#[derive(Debug, Parser)]
#[command(
    name = "mmgate check-model",
    about = "Score images on every backend and precision; print the differences in log-odds and the throughput of each"
)]
struct CheckModel {
    #[command(flatten)]
    args: gpu_executor::check_model::Args,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .init();
    if std::env::args().nth(1).as_deref() == Some("check-model") {
        let cmd = CheckModel::parse_from(std::env::args().skip(1));
        return match gpu_executor::check_model::run(cmd.args) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("check-model: {e:#}");
                std::process::ExitCode::from(2)
            }
        };
    }
    gpu_executor::serve::run(gpu_executor::serve::Args::parse())
}
