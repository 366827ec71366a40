use dispatch_scheduler::{Config, Scheduler};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_scheduler::SERVICE);
    let _telemetry = dispatch_service::init_telemetry(dispatch_scheduler::SERVICE, &config.common)?;
    let shutdown = dispatch_service::shutdown_on_signals();
    Scheduler::build(config).await?.run(shutdown).await?;
    Ok(())
}
