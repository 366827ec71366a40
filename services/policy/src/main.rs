use dispatch_policy::{Config, PolicyService};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_policy::SERVICE);
    let _telemetry = dispatch_service::init_telemetry(dispatch_policy::SERVICE, &config.common)?;
    let shutdown = dispatch_service::shutdown_on_signals();
    PolicyService::build(config).await?.run(shutdown).await?;
    Ok(())
}
