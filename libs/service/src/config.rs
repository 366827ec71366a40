//! Configuration precedence for every service: built-in defaults < `dispatch.toml` in the
//! workspace < `DISPATCH_*` / `NATS_URL` environment variables < command-line flags.
//!
//! `dispatch.toml` holds settings shared by every service at the top level and each
//! service's own under a table named after it; keys are the flags' names with `_`:
//!
//! ```toml
//! nats_url = "nats://10.0.0.5:4222"
//!
//! [dispatcher]
//! lease_ms = 10000
//! max_runs = 64
//!
//! [ingress]
//! listen = "0.0.0.0:8080"
//! ```
//!
//! The file's values become the flags' defaults, so clap's own order does the rest. A
//! key that is no setting of the service is an error naming the key, not a silent no-op.
//!
//! A few settings are more than a value and live only in the file, read with
//! [`section`]: the connectors' MCP servers (`[[connectors.mcp]]`) and HTTP connector
//! (`[connectors.http]`).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The file's name in the workspace.
pub const FILE: &str = "dispatch.toml";

/// The table that configures the CLI; the services' tables are named after them
/// ([`crate::SERVICES`]). A table another process reads is skipped, not an error.
const CLI_TABLE: &str = "dispatch";

/// Keys of a service's table that [`section`] reads rather than the flags.
const STRUCTURED: [(&str, &str); 2] = [("connectors", "mcp"), ("connectors", "http")];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error(transparent)]
    Args(#[from] clap::Error),
}

/// Parses the process's arguments for `service`, with `dispatch.toml` applied; on an
/// error, prints it and exits (status 2, as clap does).
pub fn parse<C: clap::Parser>(service: &str) -> C {
    match parse_from(service, std::env::args_os()) {
        Ok(config) => config,
        Err(Error::Args(e)) => e.exit(),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    }
}

/// [`parse`] over given arguments (the first is the program name).
pub fn parse_from<C, I, T>(service: &str, args: I) -> Result<C, Error>
where
    C: clap::Parser,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = C::command();
    let path = workspace_of(&args).join(FILE);
    if path.is_file() {
        for (key, value) in settings(&path, service)? {
            let known = command.get_arguments().any(|a| a.get_id().as_str() == key);
            if !known {
                let names: Vec<String> = command
                    .get_arguments()
                    .filter(|a| a.get_long().is_some())
                    .map(|a| a.get_id().to_string())
                    .collect();
                return Err(Error::File {
                    path: path.display().to_string(),
                    message: format!(
                        "{key:?} is not a setting of {service}; known: {}",
                        names.join(", ")
                    ),
                });
            }
            command = command.mut_arg(key, |arg| arg.default_value(value));
        }
    }
    let matches = command.try_get_matches_from(args)?;
    Ok(C::from_arg_matches(&matches)?)
}

/// The workspace named by `--workspace`, `DISPATCH_WORKSPACE`, or the current directory.
fn workspace_of(args: &[OsString]) -> PathBuf {
    let mut iter = args.iter().skip(1);
    while let Some(arg) = iter.next() {
        let text = arg.to_string_lossy();
        if text == "--workspace" {
            if let Some(value) = iter.next() {
                return PathBuf::from(value);
            }
        } else if let Some(value) = text.strip_prefix("--workspace=") {
            return PathBuf::from(value);
        }
    }
    std::env::var_os("DISPATCH_WORKSPACE").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// The file's settings that apply to `service`: top-level keys, then its own table.
fn settings(path: &Path, service: &str) -> Result<Vec<(String, String)>, Error> {
    let fail = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(e.message().to_owned()))?;
    let mut out = Vec::new();
    for (key, value) in &table {
        match value {
            toml::Value::Table(section) if key == service => {
                for (key, value) in section {
                    if STRUCTURED.contains(&(service, key.as_str())) {
                        continue;
                    }
                    out.push((
                        key.clone(),
                        scalar(value).map_err(|m| fail(format!("[{service}] {key}: {m}")))?,
                    ));
                }
            }
            toml::Value::Table(_)
                if key == CLI_TABLE || crate::SERVICES.contains(&key.as_str()) => {}
            toml::Value::Table(_) => return Err(fail(format!("[{key}] is not a service"))),
            value => out.push((
                key.clone(),
                scalar(value).map_err(|m| fail(format!("{key}: {m}")))?,
            )),
        }
    }
    Ok(out)
}

/// The structured setting `key` of `service`'s table in the workspace's
/// `dispatch.toml` (`T::default()` when the file or the key is absent). A mistake in it
/// is an error naming the file and the key.
pub fn section<T>(workspace: &Path, service: &str, key: &str) -> Result<T, Error>
where
    T: serde::de::DeserializeOwned + Default,
{
    debug_assert!(STRUCTURED.contains(&(service, key)));
    let path = workspace.join(FILE);
    let fail = |message: String| Error::File {
        path: path.display().to_string(),
        message,
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(T::default()),
        Err(e) => return Err(fail(e.to_string())),
    };
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| fail(e.message().to_owned()))?;
    match table.get(service).and_then(|s| s.get(key)) {
        None => Ok(T::default()),
        Some(value) => T::deserialize(value.clone())
            .map_err(|e| fail(format!("[{service}.{key}]: {}", e.message()))),
    }
}

fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        other => Err(format!(
            "expected a string, number or boolean, found {}",
            other.type_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Demo {
        #[command(flatten)]
        common: crate::CommonArgs,
        #[arg(long, default_value_t = 30_000)]
        lease_ms: u64,
        #[arg(long)]
        test_tools: bool,
    }

    fn workspace(toml: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE), toml).unwrap();
        dir
    }

    fn parse(dir: &Path, extra: &[&str]) -> Result<Demo, Error> {
        let mut args = vec![
            "demo".to_owned(),
            "--workspace".into(),
            dir.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        parse_from("dispatcher", args)
    }

    #[test]
    fn the_file_beats_defaults_and_flags_beat_the_file() {
        let dir = workspace(
            "nats_url = \"nats://10.1.2.3:4222\"\n[dispatcher]\nlease_ms = 5000\ntest_tools = true\n[ingress]\nlisten = \"0.0.0.0:1\"\n",
        );
        let demo = parse(dir.path(), &[]).unwrap();
        assert_eq!(demo.common.nats_url, "nats://10.1.2.3:4222");
        assert_eq!(demo.lease_ms, 5000);
        assert!(demo.test_tools);
        let demo = parse(dir.path(), &["--lease-ms", "700"]).unwrap();
        assert_eq!(demo.lease_ms, 700);
        let without = tempfile::tempdir().unwrap();
        assert_eq!(parse(without.path(), &[]).unwrap().lease_ms, 30_000);
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Server {
        name: String,
        #[serde(default)]
        args: Vec<String>,
    }

    #[test]
    fn structured_settings_are_read_apart_from_the_flags() {
        let dir = workspace(
            "[connectors]\nlease_ms = 5\n[[connectors.mcp]]\nname = \"fs\"\nargs = [\"a\"]\n[[connectors.mcp]]\nname = \"time\"\n",
        );
        let servers: Vec<Server> = section(dir.path(), "connectors", "mcp").unwrap();
        assert_eq!(servers.len(), 2);
        assert_eq!(servers[0].args, ["a"]);
        // The flags of the service do not see the structured key.
        let mut args = vec!["demo".to_owned(), "--workspace".into()];
        args.push(dir.path().display().to_string());
        let demo: Demo = parse_from("connectors", args).unwrap();
        assert_eq!(demo.lease_ms, 5);
        let none: Vec<Server> =
            section(tempfile::tempdir().unwrap().path(), "connectors", "mcp").unwrap();
        assert!(none.is_empty());
        let dir = workspace("[[connectors.mcp]]\nname = \"fs\"\ncommand = 1\n");
        let err = section::<Vec<Server>>(dir.path(), "connectors", "mcp")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[connectors.mcp]") && err.contains("command"),
            "{err}"
        );
    }

    #[test]
    fn mistakes_in_the_file_are_named() {
        let cases = [
            (
                "[dispatcher]\nlease_mss = 1\n",
                "\"lease_mss\" is not a setting of dispatcher",
            ),
            (
                "[dispatchr]\nlease_ms = 1\n",
                "[dispatchr] is not a service",
            ),
            (
                "[dispatcher]\nlease_ms = [1]\n",
                "lease_ms: expected a string, number or boolean",
            ),
            ("lease_ms = \n", "dispatch.toml"),
        ];
        for (toml, expect) in cases {
            let dir = workspace(toml);
            let err = parse(dir.path(), &[]).unwrap_err().to_string();
            assert!(err.contains(expect), "{toml:?}: {err}");
        }
        let dir = workspace("[dispatcher]\nlease_ms = \"soon\"\n");
        let err = parse(dir.path(), &[]).unwrap_err().to_string();
        assert!(err.contains("soon"), "{err}");
    }
}
