use dispatch_connectors::{Config, Connectors};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_connectors::SERVICE);
    dispatch_service::init_tracing();
    let shutdown = dispatch_service::shutdown_on_signals();
    Connectors::build(config).await?.run(shutdown).await?;
    Ok(())
}
