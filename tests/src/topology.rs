//! The scale-out deployment, described once in `deploy/topology.toml`: compose.yaml is
//! rendered from it ([`Topology::compose`], written by `cargo xtask compose`), and
//! [`Deployment`] starts the same topology on loopback — the same nats nodes, replicas,
//! sync policy and copies of every service — for `cargo xtask cluster`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail, ensure};
use dispatch_bus::durability::SyncPolicy;
use dispatch_testkit::{NatsCluster, Service};
use serde::Deserialize;

/// Where the description lives, from the repository root.
pub const DESCRIPTION: &str = "deploy/topology.toml";
/// Set (to anything) to keep a deployment's workspace, with every copy's log, after
/// the test.
pub const KEEP_ENV: &str = "DISPATCH_KEEP_DEPLOYMENT";
/// The port every service of the compose file serves `/metrics` on.
pub const METRICS_PORT: u16 = 9464;
/// Where the compose file rendered from it lives, from the repository root.
pub const COMPOSE: &str = "compose.yaml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    pub nats: Nodes,
    /// Copies of each service, by service name.
    pub services: BTreeMap<String, usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nodes {
    pub image: String,
    pub nodes: usize,
    pub replicas: usize,
    pub sync: String,
}

impl Topology {
    /// Reads and checks the description in the repository at `root`.
    pub fn load(root: &Path) -> Result<Self> {
        let path = root.join(DESCRIPTION);
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        let topology: Self =
            toml::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
        topology
            .check()
            .with_context(|| format!("check {}", path.display()))?;
        Ok(topology)
    }

    fn check(&self) -> Result<()> {
        let nats = &self.nats;
        ensure!(
            (1..=7).contains(&nats.nodes) && nats.nodes % 2 == 1,
            "nats.nodes must be odd, 1 to 7 (a quorum), not {}",
            nats.nodes
        );
        ensure!(
            (1..=nats.nodes).contains(&nats.replicas),
            "nats.replicas must be 1 to nats.nodes ({}), not {}",
            nats.nodes,
            nats.replicas
        );
        self.sync().map_err(anyhow::Error::msg)?;
        for name in self.services.keys() {
            ensure!(
                dispatch_service::SERVICES.contains(&name.as_str()),
                "services.{name}: no such service (the services are {})",
                dispatch_service::SERVICES.join(", ")
            );
        }
        for name in dispatch_service::SERVICES {
            let copies = self.services.get(name).copied().unwrap_or(0);
            ensure!(
                (1..=16).contains(&copies),
                "services.{name}: every service runs 1 to 16 copies, not {copies}"
            );
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<SyncPolicy, String> {
        self.nats.sync.parse()
    }

    /// Every copy as (service, copy number from 1), services in start order.
    pub fn copies(&self) -> Vec<(&'static str, usize)> {
        dispatch_service::SERVICES
            .iter()
            .flat_map(|name| (1..=self.services[*name]).map(move |n| (*name, n)))
            .collect()
    }

    fn node_names(&self) -> Vec<String> {
        (1..=self.nats.nodes).map(|n| format!("nats-{n}")).collect()
    }

    /// compose.yaml, rendered. Every copy is a service of its own (its own instance
    /// name; a ledger copy its own state volume; an ingress copy its own host ports),
    /// the nats nodes admit only Dispatch's identities (seeds and server configuration
    /// made by the one-shot `auth` service with `dispatch nats-config`), and everything
    /// waits for what it needs: the nodes for `auth`, the services for healthy nodes.
    pub fn compose(&self) -> String {
        let nodes = self.node_names();
        let urls: Vec<String> = nodes.iter().map(|n| format!("nats://{n}:4222")).collect();
        let mut y = String::new();
        let w = &mut y;
        let _ = writeln!(
            w,
            "# Generated from {DESCRIPTION} by `cargo xtask compose`: edit that file, not this one.\n\
             # `cargo xtask cluster` starts the same topology on loopback and kills pieces of it.\n\
             #\n\
             # {} nats-server nodes with JetStream (streams and buckets R{}, sync {}), and\n\
             # {} Dispatch processes: {}.\n\
             # Every process connects with its own nkey identity; the `auth` service writes the\n\
             # seeds and the servers' configuration once, into the `auth` volume.\n\
             # Each ingress copy is published on ports of its own (HTTP, gRPC): put your load\n\
             # balancer in front of them. Webhooks reach services through `/hooks/...` on any\n\
             # copy. Every process serves Prometheus metrics on :{METRICS_PORT}/metrics inside the\n\
             # network (nats nodes: :8222), logs JSON lines with trace ids, and exports traces\n\
             # over OTLP once OTEL_EXPORTER_OTLP_ENDPOINT is set in its environment.\n\
             #\n\
             #   docker build -t dispatch:local .\n\
             #   docker compose up -d\n",
            self.nats.nodes,
            self.nats.replicas,
            self.nats.sync,
            self.copies().len(),
            dispatch_service::SERVICES
                .iter()
                .map(|s| format!("{} {s}", self.services[*s]))
                .collect::<Vec<_>>()
                .join(", "),
        );
        let _ = writeln!(w, "services:");
        let _ = writeln!(
            w,
            "  auth:\n    image: dispatch:local\n    command: [\"dispatch\", \"nats-config\", \"--out\", \"/auth\", \"--sync\", \"{}\"]\n    volumes: [\"auth:/auth\"]\n    restart: \"no\"",
            self.nats.sync
        );
        for (i, node) in nodes.iter().enumerate() {
            let routes: Vec<String> = nodes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, n)| format!("nats://{n}:6222"))
                .collect();
            let _ = writeln!(
                w,
                "  {node}:\n    image: {image}\n    command: [\"-c\", \"/auth/nats.conf\", \"-js\", \"-n\", \"{node}\", \"--cluster_name\", \"dispatch\", \"--cluster\", \"nats://0.0.0.0:6222\", \"--routes\", \"{routes}\", \"--store_dir\", \"/data\", \"-m\", \"8222\"]\n    volumes: [\"{node}:/data\", \"auth:/auth:ro\"]\n    depends_on:\n      auth: {{ condition: service_completed_successfully }}\n    healthcheck:\n      test: [\"CMD\", \"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://127.0.0.1:8222/healthz?js-enabled-only=true\"]\n      interval: 2s\n      timeout: 2s\n      retries: 30\n    restart: unless-stopped",
                image = self.nats.image,
                routes = routes.join(","),
            );
        }
        for (service, n) in self.copies() {
            let instance = format!("{service}-{n}");
            let mut command = vec![format!("dispatch-{service}")];
            let mut volumes = vec!["workspace:/workspace".to_owned(), "auth:/auth:ro".into()];
            let mut ports = Vec::new();
            let mut env = vec![
                ("NATS_URL", urls.join(",")),
                ("DISPATCH_WORKSPACE", "/workspace".into()),
                ("DISPATCH_INSTANCE", instance.clone()),
                ("DISPATCH_NATS_NKEY", format!("/auth/{service}.nk")),
                ("DISPATCH_STREAM_REPLICAS", self.nats.replicas.to_string()),
                ("DISPATCH_METRICS_LISTEN", format!("0.0.0.0:{METRICS_PORT}")),
                ("DISPATCH_LOG_FORMAT", "json".into()),
                ("RUST_LOG", "info".into()),
            ];
            match service {
                "ingress" => {
                    command.extend(
                        ["--listen", "0.0.0.0:8080", "--grpc-listen", "0.0.0.0:8081"]
                            .map(String::from),
                    );
                    let http = 8080 + 2 * (n - 1);
                    ports.push(format!("{http}:8080"));
                    ports.push(format!("{}:8081", http + 1));
                }
                "ledger" => {
                    volumes.push(format!("{instance}:/state"));
                    env.push(("DISPATCH_LEDGER_STATE", "/state".into()));
                }
                _ => {}
            }
            let quoted = |items: &[String]| {
                items
                    .iter()
                    .map(|s| format!("\"{s}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                w,
                "  {instance}:\n    image: dispatch:local\n    command: [{}]\n    environment:",
                quoted(&command)
            );
            for (key, value) in &env {
                let _ = writeln!(w, "      {key}: \"{value}\"");
            }
            let _ = writeln!(w, "    volumes: [{}]", quoted(&volumes));
            if !ports.is_empty() {
                let _ = writeln!(w, "    ports: [{}]", quoted(&ports));
            }
            let _ = writeln!(w, "    depends_on:");
            for node in &nodes {
                let _ = writeln!(w, "      {node}: {{ condition: service_healthy }}");
            }
            let _ = writeln!(w, "    restart: unless-stopped");
        }
        let _ = writeln!(w, "\nvolumes:\n  workspace:\n  auth:");
        for node in &nodes {
            let _ = writeln!(w, "  {node}:");
        }
        for n in 1..=self.services["ledger"] {
            let _ = writeln!(w, "  ledger-{n}:");
        }
        y
    }
}

/// The topology running on loopback: the nats nodes clustered, every copy of every
/// service a process of its own, started all at once the way a fresh deployment starts.
pub struct Deployment {
    pub cluster: NatsCluster,
    pub workspace: tempfile::TempDir,
    pub services: Vec<Service>,
    pub api_key: String,
    replicas: String,
}

impl Deployment {
    /// Spawns the nodes and, without waiting for JetStream, every copy at once; returns
    /// when every copy answers its health check (each declares the streams it needs,
    /// racing the others on a cluster that may have no leader yet).
    pub async fn start(topology: &Topology) -> Result<Self> {
        let sync = topology.sync().map_err(anyhow::Error::msg)?;
        let cluster = NatsCluster::spawn_with(topology.nats.nodes, sync).await?;
        let mut workspace = tempfile::Builder::new()
            .prefix("dispatch-deploy-")
            .tempdir()?;
        // Logs and state to look at after a failing run.
        if std::env::var_os(KEEP_ENV).is_some() {
            workspace.disable_cleanup(true);
            eprintln!("deployment: keeping {}", workspace.path().display());
        }
        dispatch_runlog::seal::Sealer::load_or_create(&dispatch_service::layout::seal_key(
            workspace.path(),
        ))?;
        std::fs::write(
            workspace.path().join("test-policy.json"),
            crate::TEST_POLICY,
        )?;
        let api_key = crate::api_key(workspace.path())?;
        let mut deployment = Self {
            cluster,
            workspace,
            services: Vec::new(),
            api_key,
            replicas: topology.nats.replicas.to_string(),
        };
        let copies = topology.copies();
        let started = futures::future::join_all(
            copies
                .iter()
                .map(|(service, n)| deployment.start_copy(service, *n)),
        )
        .await;
        for (started, (service, n)) in started.into_iter().zip(&copies) {
            match started {
                Ok(copy) => deployment.services.push(copy),
                Err(e) => {
                    deployment.print_logs(40);
                    return Err(e.context(format!("{service} copy {n} did not start")));
                }
            }
        }
        Ok(deployment)
    }

    /// Starts copy `n` of `service` (again, after a kill) as the topology runs it.
    pub async fn start_copy(&self, service: &str, n: usize) -> Result<Service> {
        let root = self.workspace.path();
        let policy = root.join("test-policy.json");
        let state = ledger_state(root, n);
        let args: Vec<String> = match service {
            "policy" => vec!["--policy".into(), path_arg(&policy)?],
            "connectors" => vec!["--test-tools".into()],
            "ingress" => ["--listen", "127.0.0.1:0", "--grpc-listen", "127.0.0.1:0"]
                .map(String::from)
                .to_vec(),
            "ledger" => vec!["--state-dir".into(), path_arg(&state)?],
            _ => Vec::new(),
        };
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Service::start_with_env(
            service,
            &self.cluster,
            root,
            &args,
            &[("DISPATCH_STREAM_REPLICAS", self.replicas.as_str())],
        )
        .await
    }

    /// Every running ingress copy's HTTP address.
    pub fn ingress_addrs(&self) -> Vec<String> {
        self.services
            .iter()
            .filter(|s| s.name == "ingress")
            .filter_map(|s| s.health().detail["http_addr"].as_str().map(str::to_owned))
            .collect()
    }

    pub fn root(&self) -> &Path {
        self.workspace.path()
    }

    /// Every copy's log file, running or not.
    fn log_files(&self) -> impl Iterator<Item = PathBuf> {
        std::fs::read_dir(self.root())
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| path.extension().is_some_and(|e| e == "log"))
    }

    /// How much each copy logged: its log's name, its warnings and errors, and the
    /// message it repeated most among them with how often.
    pub fn log_volume(&self) -> Vec<LogVolume> {
        self.log_files()
            .map(|path| {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let mut messages: BTreeMap<String, usize> = BTreeMap::new();
                let mut warnings = 0;
                for line in text.lines() {
                    if line.contains("WARN") || line.contains("ERROR") {
                        warnings += 1;
                        *messages.entry(message_of(line)).or_default() += 1;
                    }
                }
                let loudest = messages.into_iter().max_by_key(|(_, n)| *n);
                LogVolume {
                    copy: path
                        .file_stem()
                        .map(|s| s.to_string_lossy().trim_start_matches('.').to_owned())
                        .unwrap_or_default(),
                    warnings,
                    loudest,
                }
            })
            .collect()
    }

    /// Prints the last `lines` lines of every copy's log, running or not (for a
    /// failing run).
    pub fn print_logs(&self, lines: usize) {
        for path in self.log_files() {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            eprintln!("--- {} ---", path.display());
            for line in &all[all.len().saturating_sub(lines)..] {
                eprintln!("{line}");
            }
        }
    }
}

/// What one copy logged beyond `info`.
#[derive(Debug)]
pub struct LogVolume {
    pub copy: String,
    pub warnings: usize,
    /// The warning or error said most often, and how many times.
    pub loudest: Option<(String, usize)>,
}

/// A log line's message without its colours, time, level, target and fields:
/// tracing's text format puts the target and `: ` before the message, and fields
/// (`key=value`) after it.
fn message_of(line: &str) -> String {
    let mut plain = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // A colour: ESC [ ... m.
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let after_target = plain
        .split_once(": ")
        .map_or(plain.as_str(), |(_, rest)| rest);
    after_target
        .split(' ')
        .take_while(|word| !word.contains('='))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Ledger copy `n`'s own state directory.
fn ledger_state(root: &Path, n: usize) -> PathBuf {
    root.join(format!(".dispatch/state/ledger-{n}"))
}

fn path_arg(path: &Path) -> Result<String> {
    match path.to_str() {
        Some(text) => Ok(text.to_owned()),
        None => bail!("{} is not UTF-8", path.display()),
    }
}
