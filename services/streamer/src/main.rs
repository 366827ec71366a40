use dispatch_streamer::{Config, Streamer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_streamer::SERVICE);
    let _telemetry = dispatch_service::init_telemetry(dispatch_streamer::SERVICE, &config.common)?;
    let shutdown = dispatch_service::shutdown_on_signals();
    Streamer::build(config).await?.run(shutdown).await?;
    Ok(())
}
