//! `dispatch up` watches whether its NATS stores writes, and heals a full disk.
//!
//! When the disk under nats-server's store fills, the server does not come back by
//! itself once space is freed: it refuses writes ("insufficient resources", against a
//! limit it computed from the free space when it started), and a stream whose write
//! failed with "no space left on device" stops acknowledging writes until the server
//! restarts. Reads keep working, so nothing else looks wrong.
//!
//! Every [`EVERY`], `up` writes a probe to `DISPATCH_PROBE` and reads what its own
//! nats-server logged since the last look. A refused probe, or a log line saying a
//! write failed for want of space, starts an *episode*: `up` says what happened and
//! what to do. With its own nats-server, it restarts it once the store's file system
//! has room again (at least [`ROOM`], or 5% of it when smaller), at most once a
//! minute, doubling up to 15 minutes while the refusals go on; the services reconnect
//! by themselves. With an external NATS it only says the one command to run.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::time::{Duration, Instant};

use dispatch_bus::Bus;
use dispatch_bus::health::{WriteRefused, probe_writes};

use crate::Failure;
use crate::supervise::Supervisor;
use crate::up::{LocalNats, NATS};

/// How often the probe is written and the log read.
pub const EVERY: Duration = Duration::from_secs(2);

/// Free space that counts as room again (or 5% of the file system, when less).
const ROOM: u64 = 64 << 20;

/// The first wait between restarts, doubled up to [`MAX_BACKOFF`] while refusals go on.
const FIRST_BACKOFF: Duration = Duration::from_secs(60);
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);

/// The most of nats-server's log read per look.
const LOG_READ_MAX: u64 = 1 << 20;

/// What nats-server writes when a write failed for want of space.
const OUT_OF_SPACE: [&str; 4] = [
    "no space left on device",
    "resource limits exceeded",
    "out of resources",
    "insufficient resources",
];

pub struct StoreWatch {
    bus: Bus,
    local: Option<LocalNats>,
    log_offset: u64,
    /// Probes refused in a row: one may be a slow acknowledgement under load; an
    /// episode starts at [`REFUSALS`].
    refusals: u32,
    episode: Option<Episode>,
}

/// Refused probes in a row that start an episode (a logged write failure starts one
/// at once).
const REFUSALS: u32 = 3;

struct Episode {
    /// A stream's write failed: only a restart heals that, whatever the probe says.
    needs_restart: bool,
    restarts: u32,
    next_restart: Instant,
    last_told: Instant,
}

impl StoreWatch {
    pub fn new(bus: Bus, local: Option<LocalNats>) -> Self {
        // Only what the server logs from now on is news.
        let log_offset = local
            .as_ref()
            .and_then(|l| std::fs::metadata(&l.log).ok())
            .map_or(0, |m| m.len());
        Self {
            bus,
            local,
            log_offset,
            refusals: 0,
            episode: None,
        }
    }

    /// One look: probe, read the log, and act. `children` holds the nats-server to
    /// restart.
    pub async fn check(&mut self, children: &mut Supervisor) -> Result<(), Failure> {
        let probe = probe_writes(&self.bus, "up").await;
        let logged = self.read_log();
        match &probe {
            Err(WriteRefused::Refused(_)) => self.refusals += 1,
            // Disconnected says nothing about writes (a restart, say); it is not a
            // refusal and does not end a run of them.
            Err(WriteRefused::Disconnected) => {}
            Ok(()) => self.refusals = 0,
        }
        let refused = match (&probe, &logged) {
            (_, Some(line)) => Some(format!("nats-server logged: {line}")),
            (Err(WriteRefused::Refused(why)), None) if self.refusals >= REFUSALS => Some(format!(
                "{REFUSALS} probe writes in a row were not stored: {why}"
            )),
            (Err(_), None) if self.episode.is_some() => Some("still refused".to_owned()),
            _ => None,
        };
        match (&mut self.episode, refused) {
            (None, None) => return Ok(()),
            (None, Some(why)) => {
                self.episode = Some(Episode {
                    needs_restart: logged.is_some(),
                    restarts: 0,
                    next_restart: Instant::now(),
                    last_told: Instant::now(),
                });
                errln!("dispatch: NATS is not storing writes ({why})");
                self.tell();
            }
            (Some(episode), Some(_)) => {
                episode.needs_restart |= logged.is_some();
                if episode.last_told.elapsed() >= FIRST_BACKOFF {
                    episode.last_told = Instant::now();
                    self.tell();
                }
            }
            (Some(episode), None) => {
                if !episode.needs_restart && probe.is_ok() {
                    errln!("dispatch: NATS stores writes again");
                    self.episode = None;
                    return Ok(());
                }
            }
        }
        self.heal(children).await
    }

    /// Says what is wrong with the disk and what will happen or must be done.
    fn tell(&self) {
        match &self.local {
            Some(local) => match free_space(&local.store) {
                Some(space) if space.has_room() => errln!(
                    "dispatch: the store's disk has room ({} free); restarting nats-server",
                    mib(space.available)
                ),
                Some(space) => errln!(
                    "dispatch: the disk holding {} has {} of {} free. Free some space there: \
                     dispatch up restarts nats-server once {} are free",
                    local.store.display(),
                    mib(space.available),
                    mib(space.total),
                    mib(space.room())
                ),
                None => errln!(
                    "dispatch: cannot read the free space of {}; free space there, then \
                     stop and start `dispatch up`",
                    local.store.display()
                ),
            },
            None => errln!(
                "dispatch: free space on the external nats-server's store, then restart \
                 nats-server (`nats-server --signal stop` and start it again); the services \
                 reconnect by themselves"
            ),
        }
    }

    /// Restarts the local nats-server if the episode calls for it and the disk has room.
    async fn heal(&mut self, children: &mut Supervisor) -> Result<(), Failure> {
        let (Some(local), Some(episode)) = (&self.local, &mut self.episode) else {
            return Ok(());
        };
        if Instant::now() < episode.next_restart
            || !free_space(&local.store).is_some_and(|s| s.has_room())
        {
            return Ok(());
        }
        errln!("dispatch: restarting nats-server so it stores writes again");
        children.restart(NATS).await;
        episode.needs_restart = false;
        episode.restarts += 1;
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << episode.restarts.min(8).saturating_sub(1))
            .min(MAX_BACKOFF);
        episode.next_restart = Instant::now() + backoff;
        // What the old server logged is history now.
        self.log_offset = std::fs::metadata(&local.log).map_or(0, |m| m.len());
        Ok(())
    }

    /// The first out-of-space line nats-server logged since the last look.
    fn read_log(&mut self) -> Option<String> {
        let local = self.local.as_ref()?;
        let mut file = std::fs::File::open(&local.log).ok()?;
        let len = file.metadata().ok()?.len();
        if len < self.log_offset {
            // A new log file: read it from its start.
            self.log_offset = 0;
        }
        file.seek(SeekFrom::Start(self.log_offset)).ok()?;
        let mut text = Vec::new();
        let read = file.take(LOG_READ_MAX).read_to_end(&mut text).ok()?;
        self.log_offset += read as u64;
        String::from_utf8_lossy(&text)
            .lines()
            .find(|line| OUT_OF_SPACE.iter().any(|m| line.contains(m)))
            .map(|line| crate::format::clip(line, 300))
    }
}

struct Space {
    available: u64,
    total: u64,
}

impl Space {
    fn room(&self) -> u64 {
        ROOM.min(self.total / 20)
    }

    fn has_room(&self) -> bool {
        self.available >= self.room()
    }
}

fn free_space(path: &Path) -> Option<Space> {
    let stats = rustix::fs::statvfs(path).ok()?;
    Some(Space {
        available: stats.f_bavail.saturating_mul(stats.f_frsize),
        total: stats.f_blocks.saturating_mul(stats.f_frsize),
    })
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_is_64_mib_or_a_twentieth_of_a_small_disk() {
        let big = Space {
            available: 63 << 20,
            total: 100 << 30,
        };
        assert!(!big.has_room());
        let small = Space {
            available: 2 << 20,
            total: 32 << 20,
        };
        assert!(small.has_room());
        assert!(free_space(Path::new("/")).is_some_and(|s| s.total > 0));
    }
}
