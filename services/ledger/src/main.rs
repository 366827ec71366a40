use dispatch_ledger::{Config, Ledger};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_ledger::SERVICE);
    let _telemetry = dispatch_service::init_telemetry(dispatch_ledger::SERVICE, &config.common)?;
    let shutdown = dispatch_service::shutdown_on_signals();
    Ledger::build(config).await?.run(shutdown).await?;
    Ok(())
}
