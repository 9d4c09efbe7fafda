//! `mmgate serve --config FILE [--listen ADDR]`, `mmgate check-model …`.

use clap::Parser;
use gateway::settings::{Cli, Command};

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::CheckModel { args } => return gateway::settings::check_model(args),
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = args.config()?;
    tracing::info!(config = %gateway::settings::redacted(&cfg), "starting");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(gateway::run(cfg))?;
    Ok(std::process::ExitCode::SUCCESS)
}
