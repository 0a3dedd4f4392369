//! `aivmm serve`: the control daemon. The HTTP server (`aivmm_api::server`)
//! runs on a tokio runtime and hands typed requests over a channel to the
//! partition manager's thread ([`manager`]), which owns every partition
//! through one worker thread each ([`worker`]).

pub mod cli;
pub mod devices;
pub mod linux;
pub mod manager;
pub mod metrics;
pub mod models;
pub mod state;
pub mod stop_strings;
pub mod worker;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use aivmm_api::server::{self, ServerOptions};
use aivmm_api::socket::{self, SocketError};
use aivmm_api::types::Version;
use clap::Args;

use crate::host::{Placer, Topology};
use crate::isolation::ThreadKind;

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Unix socket of the API (created 0600; a stale one is replaced).
    #[arg(long, default_value = "/run/aivmm.sock")]
    pub api_sock: PathBuf,
    /// Also serve the API on this TCP address (e.g. 127.0.0.1:8080); needs --token-file.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// File holding the bearer token TCP clients must send.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Directory whose *.gguf files are offered as models, by file name
    /// (default: the model cache, ~/.cache/aivmm/models).
    #[arg(long)]
    pub model_dir: Option<PathBuf>,
    /// A model to offer: NAME=PATH (repeatable).
    #[arg(long = "model", value_parser = parse_named_model)]
    pub models: Vec<(String, PathBuf)>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Host CPUs kept for the host, never given to partitions (with their SMT
    /// siblings): a CPU list such as "0" or "0-1,8" (default: none).
    #[arg(long)]
    pub host_cpus: Option<String>,
    /// Where the partitions are saved, to be restored when the daemon starts
    /// again (default: beside --api-sock, e.g. /run/aivmm.state.json).
    #[arg(long)]
    pub state_file: Option<PathBuf>,
    /// Read the host topology under this directory instead of / (tests).
    #[arg(long, default_value = "/", hide = true)]
    pub sysfs_root: PathBuf,
    /// Run partitions without a cgroup of their own (cpuset per partition).
    #[arg(long)]
    pub no_cgroup: bool,
    /// No seccomp filters on the API, vCPU and partition event threads (debugging).
    #[arg(long)]
    pub no_seccomp: bool,
}

fn parse_named_model(text: &str) -> Result<(String, PathBuf), String> {
    let (name, path) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: write NAME=PATH"))?;
    aivmm_api::types::validate_model_name(name)?;
    Ok((name.to_string(), PathBuf::from(path)))
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("/dev/kvm not found: the daemon runs partitions on KVM; load kvm_intel or kvm_amd")]
    NoKvm,
    #[error(transparent)]
    Socket(#[from] SocketError),
    #[error("--listen needs --token-file: TCP clients must authenticate with a bearer token")]
    ListenWithoutToken,
    #[error("cannot read the token file {path}")]
    TokenFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the token in {0} is shorter than 16 characters: put a longer secret in it")]
    WeakToken(PathBuf),
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the daemon's runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot start the partition manager")]
    Manager(#[source] std::io::Error),
    #[error("cannot read the host topology")]
    Topology(#[from] crate::host::TopologyError),
    #[error("--host-cpus: {0}")]
    HostCpus(String),
    #[error("cannot read the daemon's CPU affinity")]
    Affinity(#[source] std::io::Error),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error(transparent)]
    Seccomp(#[from] crate::isolation::SeccompError),
}

fn read_token(path: &Path) -> Result<String, ServeError> {
    let token = std::fs::read_to_string(path).map_err(|source| ServeError::TokenFile {
        path: path.into(),
        source,
    })?;
    let token = token.trim().to_string();
    if token.len() < 16 {
        return Err(ServeError::WeakToken(path.into()));
    }
    Ok(token)
}

fn default_model_dir() -> Option<PathBuf> {
    let cache = std::env::var_os("AIVMM_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/aivmm"))
        })?;
    Some(cache.join("models"))
}

/// Runs the daemon until SIGINT or SIGTERM; then stops every partition.
pub fn cmd_serve(args: ServeArgs) -> Result<(), ServeError> {
    serve(args, wait_for_signal())
}

/// Runs the daemon until `shutdown` completes; then stops every partition.
pub fn serve(
    args: ServeArgs,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    if !Path::new("/dev/kvm").exists() {
        return Err(ServeError::NoKvm);
    }
    let token = match (&args.listen, &args.token_file) {
        (Some(_), None) => return Err(ServeError::ListenWithoutToken),
        (_, Some(path)) => Some(read_token(path)?),
        (None, None) => None,
    };
    let mut placer = Placer::new(Topology::discover(&args.sysfs_root)?);
    let host_cpus = match &args.host_cpus {
        Some(list) => crate::host::topology::parse_cpulist(list).map_err(ServeError::HostCpus)?,
        None => Vec::new(),
    };
    placer
        .reserve_for_host(&host_cpus)
        .map_err(|error| ServeError::HostCpus(error.to_string()))?;
    placer.restrict_to(&crate::run::allowed_cpus().map_err(ServeError::Affinity)?);
    let state_file = args
        .state_file
        .clone()
        .unwrap_or_else(|| state::default_path(&args.api_sock));
    let api_socket = socket::bind(&args.api_sock)?;
    let model_dir = args.model_dir.clone().or_else(default_model_dir);
    let registry = models::ModelRegistry::new(model_dir.as_deref(), &args.models);

    worker::set_isolation(!args.no_cgroup, !args.no_seccomp);
    if !args.no_seccomp {
        probe_api_filter()?;
    }

    let (requests, inbox) = tokio::sync::mpsc::unbounded_channel();
    let devices = devices::DeviceClaims::new(args.sysfs_root.clone());
    let manager = manager::Manager::new(registry, placer, devices, Some(state_file))?;
    let manager_thread = std::thread::Builder::new()
        .name("partition-manager".into())
        .spawn(move || manager.run(inbox))
        .map_err(ServeError::Manager)?;

    let seccomp = !args.no_seccomp;
    // The manager thread (which spawns the partitions' threads) exists
    // already: only the API threads get the API filter.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api")
        .on_thread_start(move || {
            if seccomp {
                if let Err(error) = crate::isolation::seccomp::apply(ThreadKind::Api) {
                    // Checked by probe_api_filter; cannot happen short of a kernel change.
                    eprintln!(
                        "aivmm serve: an API thread runs WITHOUT its seccomp filter: {error}"
                    );
                }
            }
        })
        .enable_all()
        .build()
        .map_err(ServeError::Runtime)?;
    let options = ServerOptions {
        max_body_bytes: args.max_body_bytes,
        ..ServerOptions::default()
    };
    let version = Version {
        version: env!("CARGO_PKG_VERSION").into(),
        api_version: aivmm_api::API_VERSION.into(),
        guest_abi: aivmm_guest_abi::ABI_VERSION,
    };
    let result = runtime.block_on(async {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        api_socket
            .listener
            .set_nonblocking(true)
            .map_err(ServeError::Runtime)?;
        let unix = std::sync::Arc::new(
            tokio::net::UnixListener::from_std(
                api_socket
                    .listener
                    .try_clone()
                    .map_err(ServeError::Runtime)?,
            )
            .map_err(ServeError::Runtime)?,
        );
        let app = server::router(requests.clone(), version.clone(), options.clone(), None);
        let mut servers = Vec::new();
        servers.push(tokio::spawn(server::serve(
            move || {
                let unix = unix.clone();
                async move { unix.accept().await.map(|(stream, _)| stream) }
            },
            app,
            options.clone(),
            stopped.clone(),
        )));
        if let Some(addr) = args.listen {
            let tcp = std::sync::Arc::new(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServeError::Listen { addr, source })?,
            );
            let app = server::router(requests.clone(), version.clone(), options.clone(), token);
            servers.push(tokio::spawn(server::serve(
                move || {
                    let tcp = tcp.clone();
                    async move {
                        let (stream, _) = tcp.accept().await?;
                        let _ = stream.set_nodelay(true);
                        Ok(stream)
                    }
                },
                app,
                options.clone(),
                stopped.clone(),
            )));
            eprintln!("aivmm serve: API on tcp://{addr} (bearer token required)");
        }
        eprintln!("aivmm serve: API on {}", api_socket.path().display());
        shutdown.await;
        eprintln!("aivmm serve: stopping partitions");
        let _ = stop.send(true);
        for server in servers {
            let _ = server.await;
        }
        Ok::<(), ServeError>(())
    });
    // In-flight connections end with the runtime; the manager stops every
    // partition once the last sender is gone.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    drop(requests);
    let _ = manager_thread.join();
    drop(api_socket);
    result
}

/// Installs the API filter on a throwaway thread, so that a kernel without
/// seccomp is refused at start-up rather than logged per thread.
fn probe_api_filter() -> Result<(), ServeError> {
    std::thread::Builder::new()
        .name("seccomp-probe".into())
        .spawn(|| crate::isolation::seccomp::apply(ThreadKind::Api))
        .map_err(ServeError::Runtime)?
        .join()
        .unwrap_or(Ok(()))
        .map_err(ServeError::Seccomp)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the daemon runs until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Command {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn placement_and_state_options_parse() {
        let args = Command::try_parse_from([
            "serve",
            "--host-cpus",
            "0-1,4",
            "--state-file",
            "/tmp/s.json",
        ])
        .unwrap()
        .serve;
        assert_eq!(args.host_cpus.as_deref(), Some("0-1,4"));
        assert_eq!(args.state_file.as_deref(), Some(Path::new("/tmp/s.json")));
        let args = Command::try_parse_from(["serve"]).unwrap().serve;
        assert_eq!((args.host_cpus, args.state_file), (None, None));
        assert_eq!(args.sysfs_root, Path::new("/"));
    }
}

/// An empty directory for a unit test, removed when dropped.
#[cfg(test)]
pub(crate) struct Scratch(pub std::path::PathBuf);

#[cfg(test)]
impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("aivmm-daemon-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

#[cfg(test)]
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
