//! `mmgate serve --config FILE [--listen ADDR]`, `mmgate check-model …`,
//! `mmgate tune …`, `mmgate keys new`.

use clap::Parser;
use gateway::settings::{Cli, Command, KeysCommand};

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = Cli::parse();
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::CheckModel { args } => return gateway::settings::check_model(args),
        Command::Tune(args) => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(gateway::tune::run(args))?;
            return Ok(std::process::ExitCode::SUCCESS);
        }
        Command::Keys(KeysCommand::New) => {
            let key = gateway::settings::new_key()?;
            println!("key (give it to the tenant; it is not stored): {key}");
            println!("for the tenant's [[tenants]] entry:");
            println!("key_hashes = [\"{}\"]", config::key_hash(&key));
            return Ok(std::process::ExitCode::SUCCESS);
        }
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
        .block_on(gateway::run(cfg, move || args.config()))?;
    Ok(std::process::ExitCode::SUCCESS)
}
