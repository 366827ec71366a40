use dispatch_ingress::{Config, Ingress};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_ingress::SERVICE);
    let _telemetry = dispatch_service::init_telemetry(dispatch_ingress::SERVICE, &config.common)?;
    let shutdown = dispatch_service::shutdown_on_signals();
    Ingress::build(config).await?.run(shutdown).await?;
    Ok(())
}
