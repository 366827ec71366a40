use dispatch_streamer::{Config, Streamer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_streamer::SERVICE);
    dispatch_service::init_tracing();
    let shutdown = dispatch_service::shutdown_on_signals();
    Streamer::build(config).await?.run(shutdown).await?;
    Ok(())
}
