use dispatch_dispatcher::{Config, Dispatcher};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_dispatcher::SERVICE);
    let _telemetry =
        dispatch_service::init_telemetry(dispatch_dispatcher::SERVICE, &config.common)?;
    let shutdown = dispatch_service::shutdown_on_signals();
    let providers = config.model.providers()?;
    Dispatcher::build(config, providers)
        .await?
        .run(shutdown)
        .await?;
    Ok(())
}
