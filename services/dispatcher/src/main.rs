use dispatch_dispatcher::{Config, Dispatcher};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_dispatcher::SERVICE);
    dispatch_service::init_tracing();
    let shutdown = dispatch_service::shutdown_on_signals();
    let provider = std::sync::Arc::new(dispatch_models::offline::Offline);
    Dispatcher::build(config, provider)
        .await?
        .run(shutdown)
        .await?;
    Ok(())
}
