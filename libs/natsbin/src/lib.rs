//! Which `nats-server` Dispatch runs, shared by `cargo xtask`, `dispatch up` and the
//! test harness. Dependency-free so that xtask stays quick to build.
//!
//! Lookup order: `$DISPATCH_NATS_SERVER`, then `<project>/.tools/bin/nats-server`
//! (where `cargo xtask` installs the pinned release), then `PATH`. A server older than
//! [`MINIMUM`] is refused: earlier releases lack JetStream fixes Dispatch relies on.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The oldest nats-server Dispatch accepts.
pub const MINIMUM: Version = Version(2, 12, 3);

/// Where the project keeps tools it installs, relative to the project root.
pub const TOOLS_BIN: &str = ".tools/bin";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Parses `nats-server: v2.15.1` (or `2.15.1`, with any pre-release suffix ignored).
pub fn parse_version(output: &str) -> Option<Version> {
    let word = output.split_whitespace().find(|w| {
        w.trim_start_matches('v')
            .starts_with(|c: char| c.is_ascii_digit())
    })?;
    let mut parts = word.trim_start_matches('v').split(['.', '-', '+']);
    let mut next = || parts.next()?.parse().ok();
    Some(Version(next()?, next()?, next()?))
}

#[derive(Debug)]
pub enum Problem {
    NotFound,
    Unrunnable(PathBuf, String),
    TooOld(PathBuf, Version),
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::NotFound => write!(
                f,
                "no nats-server found (looked at $DISPATCH_NATS_SERVER, {TOOLS_BIN}/ and PATH); \
                 run `cargo xtask up` or `cargo xtask install`, which install nats-server 2.15.1 into {TOOLS_BIN}/"
            ),
            Problem::Unrunnable(path, why) => {
                write!(
                    f,
                    "{} does not run ({why}); remove it and run `cargo xtask install`",
                    path.display()
                )
            }
            Problem::TooOld(path, version) => write!(
                f,
                "{} is nats-server {version}, older than {MINIMUM}, which lacks JetStream fixes Dispatch \
                 needs; run `cargo xtask install` to put a current one in {TOOLS_BIN}/, or set \
                 DISPATCH_NATS_SERVER to a newer binary",
                path.display()
            ),
        }
    }
}

/// Candidates in lookup order.
pub fn candidates(project_root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(path) = std::env::var_os("DISPATCH_NATS_SERVER") {
        out.push(PathBuf::from(path));
    }
    out.push(project_root.join(TOOLS_BIN).join("nats-server"));
    if let Some(path) = std::env::var_os("PATH") {
        out.extend(std::env::split_paths(&path).map(|dir| dir.join("nats-server")));
    }
    out
}

/// The version a binary reports.
pub fn version_of(binary: &Path) -> Result<Version, Problem> {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .map_err(|e| Problem::Unrunnable(binary.to_path_buf(), e.to_string()))?;
    let text = String::from_utf8_lossy(&output.stdout);
    parse_version(&text).ok_or_else(|| {
        Problem::Unrunnable(
            binary.to_path_buf(),
            format!("unexpected --version output {text:?}"),
        )
    })
}

/// The first usable nats-server: the first candidate that exists decides, so a stale
/// binary earlier in the order is reported rather than silently skipped.
pub fn locate(project_root: &Path) -> Result<(PathBuf, Version), Problem> {
    let binary = candidates(project_root)
        .into_iter()
        .find(|p| p.is_file())
        .ok_or(Problem::NotFound)?;
    let version = check(&binary)?;
    Ok((binary, version))
}

/// The binary's version, if it runs and is at least [`MINIMUM`].
pub fn check(binary: &Path) -> Result<Version, Problem> {
    let version = version_of(binary)?;
    if version < MINIMUM {
        return Err(Problem::TooOld(binary.to_path_buf(), version));
    }
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_server(dir: &Path, says: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(format!("nats-server-{}", says.replace(' ', "_")));
        std::fs::write(&path, format!("#!/bin/sh\necho '{says}'\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    #[test]
    fn an_old_server_is_refused_with_the_reason_and_the_fix() {
        let dir = std::env::temp_dir().join(format!("natsbin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let old = fake_server(&dir, "nats-server: v2.9.10");
        let message = check(&old).unwrap_err().to_string();
        assert!(message.contains("2.9.10, older than 2.12.3"), "{message}");
        assert!(message.contains("JetStream fixes"), "{message}");
        assert!(message.contains("cargo xtask install"), "{message}");
        let new = fake_server(&dir, "nats-server: v2.15.1");
        assert_eq!(check(&new).unwrap(), Version(2, 15, 1));
        let odd = fake_server(&dir, "hello");
        assert!(matches!(check(&odd), Err(Problem::Unrunnable(..))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn versions_parse_and_compare() {
        assert_eq!(
            parse_version("nats-server: v2.15.1\n"),
            Some(Version(2, 15, 1))
        );
        assert_eq!(parse_version("v2.12.3-RC.1"), Some(Version(2, 12, 3)));
        assert_eq!(parse_version("garbage"), None);
        assert!(Version(2, 9, 10) < MINIMUM);
        assert!(Version(2, 12, 3) >= MINIMUM);
        assert!(Version(3, 0, 0) > MINIMUM);
    }
}
