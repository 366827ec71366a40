use dispatch_ledger::{Config, Ledger};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_ledger::SERVICE);
    dispatch_service::init_tracing();
    let shutdown = dispatch_service::shutdown_on_signals();
    Ledger::build(config).await?.run(shutdown).await?;
    Ok(())
}
