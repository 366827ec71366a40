//! A budgeted fuzz loop on proptest, for the targets in `tests/targets.rs`.
//!
//! Each target feeds generated hostile input to one parser of untrusted input and
//! fails on a panic (proptest shrinks it to a minimal case) or on a crash of the test
//! process (a stack overflow aborts it). It runs until its case or time budget is
//! spent: `cargo xtask test` (CI) gives every target a few thousand cases;
//! `cargo xtask fuzz [SECONDS]` runs each for SECONDS, in a release build.
//!
//! proptest rather than cargo-fuzz: cargo-fuzz needs a nightly compiler, and these
//! targets must run on the pinned stable toolchain in CI.

use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// How long and how much each target runs: `DISPATCH_FUZZ_SECS` (default 20) and
/// `DISPATCH_FUZZ_CASES` (default 2,000), whichever runs out first.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub time: Duration,
    pub cases: u64,
}

impl Budget {
    pub fn from_env() -> Self {
        let number = |name: &str, default: u64| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        Self {
            time: Duration::from_secs(number("DISPATCH_FUZZ_SECS", 20)),
            cases: number("DISPATCH_FUZZ_CASES", 2_000),
        }
    }
}

/// Runs `target` on values of `strategy` within the budget; panics with the shrunk
/// failing input if the target panics on any.
pub fn fuzz<S>(name: &str, strategy: S, target: impl Fn(S::Value))
where
    S: Strategy,
    S::Value: std::fmt::Debug,
{
    const BATCH: u32 = 250;
    let budget = Budget::from_env();
    let started = Instant::now();
    let mut ran = 0u64;
    while ran < budget.cases && started.elapsed() < budget.time {
        // A runner counts its cases; a fresh one per batch, each with a random seed.
        let mut runner = TestRunner::new(Config {
            cases: BATCH,
            failure_persistence: None,
            ..Config::default()
        });
        let outcome = runner.run(&strategy, |value| {
            target(value);
            Ok::<(), TestCaseError>(())
        });
        if let Err(failure) = outcome {
            panic!("fuzz target {name} failed: {failure}");
        }
        ran += u64::from(BATCH);
    }
    eprintln!(
        "fuzz {name}: {ran} cases in {:.1}s, no failure",
        started.elapsed().as_secs_f64()
    );
}
