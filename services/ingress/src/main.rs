use dispatch_ingress::{Config, Ingress};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_ingress::SERVICE);
    dispatch_service::init_tracing();
    let shutdown = dispatch_service::shutdown_on_signals();
    Ingress::build(config).await?.run(shutdown).await?;
    Ok(())
}
