//! `dispatch up` as a process supervisor: its children — nats-server and one copy of
//! each service — are started, watched, started again when they die, and stopped in
//! order on Ctrl-C or SIGTERM.
//!
//! A child that exits unasked once the stack is up is started again after a backoff:
//! nats-server on the same store and port, a service with the same arguments (its log
//! appended to, so what it said before dying stays). Each exit and each restart is said
//! on stderr. The waits double from [`FIRST_DELAY`] to at most [`MAX_DELAY`], without
//! jitter (there is one of each child, no herd to spread), and start over once a child
//! has gone a whole [`WINDOW`] without exiting. A child that exits [`GIVE_UP_AFTER`]
//! times within a [`WINDOW`] is crash-looping: it is reported with its log and left
//! down, the rest of the stack running on, until SIGUSR1 (`kill -USR1 <pid of up>`)
//! asks for it again or the stack is started again.
//!
//! While the stack is starting, a child that dies is not restarted: `up` stops and says
//! which (a child that cannot start is a configuration to fix, not a crash to ride out).
//!
//! Not here: whether nats-server still stores writes (`store_watch`), which asks this
//! module to restart it.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use tokio::process::{Child, Command};

use crate::Failure;

/// The first wait before a child that exited is started again.
pub(crate) const FIRST_DELAY: Duration = Duration::from_millis(500);
/// The longest wait before a restart.
pub(crate) const MAX_DELAY: Duration = Duration::from_secs(30);
/// The window exits are counted in.
pub(crate) const WINDOW: Duration = Duration::from_secs(60);
/// Exits within [`WINDOW`] after which a child is left down.
pub(crate) const GIVE_UP_AFTER: usize = 5;

/// How to start a child, the first time and every time after.
pub(crate) enum Launch {
    /// `binary` with `args`, its stderr to `log`, its stdin a pipe this process holds,
    /// so it stops when `up` goes, however `up` goes (`DISPATCH_EXIT_WITH_PARENT`).
    Service {
        binary: PathBuf,
        args: Vec<OsString>,
        log: PathBuf,
    },
    /// The local nats-server, on its store and port.
    Nats(crate::up::LocalNats),
}

impl Launch {
    /// Starts the child; `first` truncates a service's log, later starts append to it.
    fn spawn(&self, first: bool) -> Result<Child, Failure> {
        match self {
            Launch::Nats(nats) => nats.start(),
            Launch::Service { binary, args, log } => {
                let log_file = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(first)
                    .append(!first)
                    .open(log)
                    .map_err(|e| Failure::new(format!("log file {}: {e}", log.display())))?;
                Command::new(binary)
                    .args(args)
                    .env(dispatch_service::EXIT_WITH_PARENT, "1")
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(log_file)
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| Failure::new(format!("start {}: {e}", binary.display())))
            }
        }
    }

    fn log(&self) -> &Path {
        match self {
            Launch::Nats(nats) => &nats.log,
            Launch::Service { log, .. } => log,
        }
    }
}

/// What to do about a child that exited.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Start it again after this long.
    RestartIn(Duration),
    /// It exited [`GIVE_UP_AFTER`] times within [`WINDOW`]: leave it down.
    GiveUp,
}

/// One child's exits and the backoff they have earned.
pub(crate) struct Restarts {
    exits: VecDeque<Instant>,
    backoff: ExponentialBackoff,
}

impl Default for Restarts {
    fn default() -> Self {
        Self {
            exits: VecDeque::new(),
            backoff: schedule(),
        }
    }
}

fn schedule() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(FIRST_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_factor(2.0)
        .without_max_times()
        .build()
}

impl Restarts {
    /// The child exited at `now`.
    pub(crate) fn exited(&mut self, now: Instant) -> Verdict {
        self.exits
            .retain(|&at| now.saturating_duration_since(at) < WINDOW);
        if self.exits.is_empty() {
            // Up a whole window since it last exited: a first exit again.
            self.backoff = schedule();
        }
        self.exits.push_back(now);
        if self.exits.len() >= GIVE_UP_AFTER {
            return Verdict::GiveUp;
        }
        Verdict::RestartIn(self.backoff.next().unwrap_or(MAX_DELAY))
    }
}

enum State {
    Running(Child),
    /// Exited; to be started again at this instant.
    Waiting(Instant),
    /// Crash-looped; left down until asked for.
    Down,
}

/// One supervised child.
pub(crate) struct Proc {
    name: String,
    launch: Launch,
    state: State,
    restarts: Restarts,
}

impl Proc {
    /// SIGTERM the child, if it runs, and wait for it, killing it after 10 s.
    async fn stop(&mut self) {
        let State::Running(child) = &mut self.state else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(pid.to_string())
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            errln!("{} did not stop within 10s; killing it", self.name);
            let _ = child.kill().await;
        }
        self.state = State::Down;
    }

    /// Starts the child again now; a child that cannot start has exited once more.
    fn start_again(&mut self) {
        match self.launch.spawn(false) {
            Ok(child) => {
                let pid = child.id().map_or("gone".to_owned(), |p| p.to_string());
                errln!("dispatch: {} restarted (pid {pid})", self.name);
                self.state = State::Running(child);
            }
            Err(e) => self.exited(&e.to_string()),
        }
    }

    /// The child exited (or could not start) for `why`: schedule its restart or give up.
    fn exited(&mut self, why: &str) {
        match self.restarts.exited(Instant::now()) {
            Verdict::RestartIn(delay) => {
                errln!(
                    "dispatch: {} exited ({why}); restarting it in {}",
                    self.name,
                    humantime::format_duration(delay)
                );
                self.state = State::Waiting(Instant::now() + delay);
            }
            Verdict::GiveUp => {
                errln!(
                    "dispatch: {} exited ({why}), {GIVE_UP_AFTER} times within {}; leaving it \
                     down. Its log: {}. Once it is fixed, `kill -USR1 {}` starts it again \
                     (or stop and start `dispatch up`)",
                    self.name,
                    humantime::format_duration(WINDOW),
                    self.launch.log().display(),
                    std::process::id()
                );
                self.state = State::Down;
            }
        }
    }
}

/// `up`'s children, in start order.
#[derive(Default)]
pub(crate) struct Supervisor {
    procs: Vec<Proc>,
}

impl Supervisor {
    /// Starts a child for the first time; its pid.
    pub(crate) fn start(&mut self, name: &str, launch: Launch) -> Result<u32, Failure> {
        let child = launch.spawn(true)?;
        let pid = child.id().unwrap_or_default();
        self.procs.push(Proc {
            name: name.to_owned(),
            launch,
            state: State::Running(child),
            restarts: Restarts::default(),
        });
        Ok(pid)
    }

    /// While the stack starts: an error naming the first child that exited.
    pub(crate) fn check_alive(&mut self) -> Result<(), Failure> {
        for proc in &mut self.procs {
            if let State::Running(child) = &mut proc.state
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(Failure::new(format!("{} exited ({status})", proc.name)));
            }
        }
        Ok(())
    }

    /// Once the stack is up: notes the children that exited, and starts again the
    /// ones whose wait is over.
    pub(crate) fn tend(&mut self) {
        let now = Instant::now();
        for proc in &mut self.procs {
            match &mut proc.state {
                State::Running(child) => match child.try_wait() {
                    Ok(None) => {}
                    Ok(Some(status)) => proc.exited(&describe(status)),
                    Err(e) => proc.exited(&format!("cannot be waited for: {e}")),
                },
                State::Waiting(at) if *at <= now => proc.start_again(),
                State::Waiting(_) | State::Down => {}
            }
        }
    }

    /// Starts again, now, every child left down (SIGUSR1), with its exits forgotten.
    pub(crate) fn revive(&mut self) {
        for proc in &mut self.procs {
            if matches!(proc.state, State::Down) {
                errln!("dispatch: starting {} again, as asked", proc.name);
                proc.restarts = Restarts::default();
                proc.start_again();
            }
        }
    }

    /// Stops the child named `name` and starts it again at once: asked for, so not
    /// counted as an exit (a start that fails is one, and is retried as any other).
    pub(crate) async fn restart(&mut self, name: &str) {
        if let Some(proc) = self.procs.iter_mut().find(|p| p.name == name) {
            proc.stop().await;
            proc.start_again();
        }
    }

    /// SIGTERM every child, newest first (services before nats-server), and wait.
    pub(crate) async fn stop_all(&mut self) {
        while let Some(mut proc) = self.procs.pop() {
            proc.stop().await;
        }
    }
}

/// An exit status as people read it: `exit status: 1`, `killed by SIGKILL`.
fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt as _;
    match status.signal() {
        Some(9) => "killed by SIGKILL".to_owned(),
        Some(signal) => format!("killed by signal {signal}"),
        None => status.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_and_a_crash_loop_is_given_up() {
        let start = Instant::now();
        let mut restarts = Restarts::default();
        // Exits one after another: waits of 0.5, 1, 2 and 4 s, then the fifth exit
        // within the window leaves it down.
        let mut at = start;
        let mut waits = Vec::new();
        while let Verdict::RestartIn(wait) = restarts.exited(at) {
            waits.push(wait);
            at += wait + Duration::from_millis(100);
        }
        assert_eq!(
            waits,
            [500, 1000, 2000, 4000].map(Duration::from_millis),
            "{waits:?}"
        );
        assert!(at - start < WINDOW);
    }

    #[test]
    fn a_child_that_stays_up_a_window_starts_over_and_slow_exits_are_never_given_up() {
        let start = Instant::now();
        let mut restarts = Restarts::default();
        assert_eq!(restarts.exited(start), Verdict::RestartIn(FIRST_DELAY));
        assert_eq!(
            restarts.exited(start + Duration::from_secs(1)),
            Verdict::RestartIn(FIRST_DELAY * 2)
        );
        // A whole window without an exit: the first wait again.
        assert_eq!(
            restarts.exited(start + Duration::from_secs(1) + WINDOW),
            Verdict::RestartIn(FIRST_DELAY)
        );

        // An exit every 20 s is never five within a minute: restarted every time, the
        // wait growing to its cap.
        let mut restarts = Restarts::default();
        let mut last = Duration::ZERO;
        for n in 0..20 {
            match restarts.exited(start + Duration::from_secs(20 * n)) {
                Verdict::RestartIn(wait) => last = wait,
                Verdict::GiveUp => panic!("given up at exit {n}"),
            }
        }
        assert_eq!(last, MAX_DELAY);
    }

    #[test]
    fn exits_read_as_people_say_them() {
        use std::os::unix::process::ExitStatusExt as _;
        assert_eq!(describe(ExitStatus::from_raw(9)), "killed by SIGKILL");
        assert_eq!(describe(ExitStatus::from_raw(15)), "killed by signal 15");
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exit status: 1");
    }
}
