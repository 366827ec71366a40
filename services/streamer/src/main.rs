use dispatch_streamer::{Config, Streamer};

// One thread: the streamer relays one run event at a time, in order, so a pool of workers
// only hands each message from the thread that read it to the one that relays it. On
// the pool (2 workers here), a third of its CPU was threads parking and waking
// (`perf`, `cargo xtask bench e2e`): 1.34–1.68 ms per run; on one thread, 0.80.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config: Config = dispatch_service::config::parse(dispatch_streamer::SERVICE);
    let _telemetry = dispatch_service::init_telemetry(dispatch_streamer::SERVICE, &config.common)?;
    let shutdown = dispatch_service::shutdown_on_signals();
    Streamer::build(config).await?.run(shutdown).await?;
    Ok(())
}
