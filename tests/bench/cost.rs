//! What one run makes the store do: the messages it stores in each stream (on disk
//! or in memory) and the fsyncs nats-server makes for them. Counted over a pass of
//! runs of their own, after the timed figures: the fsyncs are counted with `strace`
//! attached to nats-server, which slows it, so no timed figure comes from this pass.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use dispatch_bus::Bus;
use dispatch_bus::async_nats::jetstream::stream::StorageType;
use futures::TryStreamExt as _;
use serde_json::{Value, json};

/// Each stream's last sequence (one more per message ever stored, purged or not) and
/// whether it keeps its messages in memory.
pub async fn stored(bus: &Bus) -> Result<BTreeMap<String, (bool, u64)>> {
    let mut streams = bus.jetstream().streams();
    let mut out = BTreeMap::new();
    while let Some(info) = streams.try_next().await? {
        out.insert(
            info.config.name.clone(),
            (
                info.config.storage == StorageType::Memory,
                info.state.last_sequence,
            ),
        );
    }
    Ok(out)
}

/// `strace -c` attached to a process, counting its sync calls until [`Self::count`].
pub struct SyncCounter {
    child: tokio::process::Child,
    out: tempfile::NamedTempFile,
}

/// The calls that put written data on the disk.
const SYNC_CALLS: &str = "fsync,fdatasync,sync_file_range,msync";

impl SyncCounter {
    /// Attached to `pid` and every thread of it, or `None` when this machine has no
    /// `strace` (the figure is then said to be unmeasured, not guessed).
    pub async fn attach(pid: u32) -> Result<Option<Self>> {
        let out = tempfile::NamedTempFile::new()?;
        let spawned = tokio::process::Command::new("strace")
            .args(["-f", "-c", "-e", &format!("trace={SYNC_CALLS}"), "-o"])
            .arg(out.path())
            .args(["-p", &pid.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn();
        let Ok(child) = spawned else {
            return Ok(None);
        };
        // strace says nothing when it has attached; give it the moment it takes.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(Some(Self { child, out }))
    }

    /// Detaches and returns how many sync calls were made while attached.
    pub async fn count(mut self) -> Result<u64> {
        let pid = self.child.id().context("strace already ended")?;
        nix_interrupt(pid)?;
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .context("strace did not detach within 30 s")??;
        let summary = std::fs::read_to_string(self.out.path())?;
        Ok(calls_in(&summary))
    }
}

/// SIGINT, which makes strace detach and write its summary.
fn nix_interrupt(pid: u32) -> Result<()> {
    let status = std::process::Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()?;
    anyhow::ensure!(status.success(), "kill -INT {pid} failed");
    Ok(())
}

/// The `calls` column of an `strace -c` summary, summed over the sync calls.
fn calls_in(summary: &str) -> u64 {
    let names: Vec<&str> = SYNC_CALLS.split(',').collect();
    summary
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let name = fields.last()?;
            if !names.contains(name) {
                return None;
            }
            // % time, seconds, usecs/call, calls, [errors,] syscall
            fields.get(3)?.parse::<u64>().ok()
        })
        .sum()
}

/// Streams written on a clock whatever runs: each service's write probe, the tool
/// catalogue's refresh. Shown, not counted as what a run stores.
const PERIODIC: [&str; 2] = [
    dispatch_bus::streams::PROBE,
    dispatch_bus::catalogue::STREAM,
];

/// The per-run figures from the streams' sequences before and after `runs` runs.
pub fn per_run(
    before: &BTreeMap<String, (bool, u64)>,
    after: &BTreeMap<String, (bool, u64)>,
    runs: usize,
) -> (f64, f64, Vec<(String, bool, f64)>) {
    let mut by_stream = Vec::new();
    let (mut disk, mut memory) = (0.0, 0.0);
    for (name, &(in_memory, last)) in after {
        let was = before.get(name).map_or(0, |&(_, seq)| seq);
        let per = last.saturating_sub(was) as f64 / runs as f64;
        if per == 0.0 {
            continue;
        }
        match (PERIODIC.contains(&name.as_str()), in_memory) {
            (true, _) => {}
            (false, true) => memory += per,
            (false, false) => disk += per,
        }
        by_stream.push((name.clone(), in_memory, per));
    }
    (disk, memory, by_stream)
}

/// The figures as the results JSON holds them.
pub fn json(
    disk: f64,
    memory: f64,
    by_stream: &[(String, bool, f64)],
    fsyncs: Option<f64>,
) -> Value {
    json!({
        "stored_on_disk_per_run": disk,
        "stored_in_memory_per_run": memory,
        "by_stream": by_stream.iter().map(|(name, in_memory, per)| (name.clone(), json!({
            "memory": in_memory, "per_run": per,
        }))).collect::<serde_json::Map<_, _>>(),
        "fsyncs_per_run": fsyncs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_strace_summary_gives_the_sync_calls() {
        let summary = "% time     seconds  usecs/call     calls    errors syscall\n\
            ------ ----------- ----------- --------- --------- ----------------\n\
            100.00    0.512345         128      4000           fsync\n\
              0.00    0.000010          10         1         1 fdatasync\n\
            ------ ----------- ----------- --------- --------- ----------------\n\
            100.00    0.512355                  4001         1 total\n";
        assert_eq!(calls_in(summary), 4001);
    }
}
