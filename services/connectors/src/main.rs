use dispatch_connectors::{Config, Connectors};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_connectors::SERVICE);
    let _telemetry =
        dispatch_service::init_telemetry(dispatch_connectors::SERVICE, &config.common)?;
    let shutdown = dispatch_service::shutdown_on_signals();
    Connectors::build(config).await?.run(shutdown).await?;
    Ok(())
}
