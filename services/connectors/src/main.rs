use clap::Parser;
use dispatch_connectors::{Config, Connectors};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    dispatch_service::init_tracing();
    let shutdown = dispatch_service::shutdown_on_signals();
    Connectors::build(config).await?.run(shutdown).await?;
    Ok(())
}
