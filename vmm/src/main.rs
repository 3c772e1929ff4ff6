//! squib-vmm: a microVM monitor serving the Firecracker-compatible API on a Unix socket.
//!
//! `squib-vmm --api-sock PATH [--id ID]` starts the VMM event loop on a thread of its own and
//! serves the API on `PATH` until SIGTERM or SIGINT, then removes the socket.
//! `--config-file FILE` applies a Firecracker-style configuration file and boots it;
//! with `--no-api` no socket is served at all.

use std::io::ErrorKind;
use std::io::IsTerminal as _;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::Parser;
use squib_api::config_file::actions_from_config_file;
use squib_api::{ControllerOptions, RuntimeApiController};
use squib_core::action::ApiAction;
use squib_core::config::SerialConfig;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
use squib_core::event_loop::NoHypervisorBackend;
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};
use tracing_subscriber::EnvFilter;

/// Command line of squib-vmm.
#[derive(Debug, Parser)]
#[command(
    name = "squib-vmm",
    version,
    about = "squib microVM monitor with a Firecracker-compatible API"
)]
struct Args {
    /// Unix socket to serve the API on.
    #[arg(long, value_name = "PATH", required_unless_present = "no_api")]
    api_sock: Option<PathBuf>,

    /// Instance id reported by `GET /`: 1 to 64 characters of A-Z, a-z, 0-9, _ or -.
    #[arg(long, default_value = "anonymous-instance", value_parser = parse_instance_id)]
    id: String,

    /// Log filter (`error`, `info`, `squib_api=debug`, ...); defaults to RUST_LOG, then `info`.
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,

    /// File receiving the guest's serial console (default: stdout).
    #[arg(long, value_name = "PATH")]
    serial_out: Option<PathBuf>,

    /// Firecracker-style JSON configuration to apply, then boot.
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,

    /// Serve no API; needs --config-file.
    #[arg(long, requires = "config_file", conflicts_with = "api_sock")]
    no_api: bool,
}

fn parse_instance_id(text: &str) -> Result<String, String> {
    squib_core::config::DeviceId::new("--id", text.to_owned())
        .map(|id| id.to_string())
        .map_err(|err| err.to_string())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = match &args.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    };
    let filter = match filter {
        Ok(filter) => filter,
        Err(err) => {
            eprintln!("squib-vmm: invalid log filter: {err}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            error!(error = format!("{err:#}"), "squib-vmm failed");
            ExitCode::FAILURE
        }
    }
}

/// Runs the VMM; the value is the process exit status (see `VmStopReason::exit_code`).
fn run(args: Args) -> anyhow::Result<u8> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the async runtime")?;
    runtime.block_on(serve(args))
}

/// Prepares `path` for binding: refuses a live socket, removes a stale one.
fn claim_socket_path(path: &Path) -> anyhow::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(err) if err.kind() == ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err).with_context(|| format!("inspecting {}", path.display())),
    };
    if !meta.file_type().is_socket() {
        bail!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        );
    }
    match UnixStream::connect(path) {
        Ok(_) => bail!(
            "another process is serving on {}; refusing to take over a live socket",
            path.display()
        ),
        Err(err) if err.kind() == ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing stale API socket");
            std::fs::remove_file(path)
                .with_context(|| format!("removing stale socket {}", path.display()))
        }
        Err(err) => Err(err).with_context(|| format!("probing existing socket {}", path.display())),
    }
}

/// Removes the API socket when dropped, so every exit path cleans up.
struct SocketGuard(PathBuf);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.0)
            && err.kind() != ErrorKind::NotFound
        {
            error!(path = %self.0.display(), error = %err, "removing the API socket failed");
        }
    }
}

async fn apply_config_file(controller: &RuntimeApiController, path: &Path) -> anyhow::Result<()> {
    let contents =
        std::fs::read(path).with_context(|| format!("reading configuration {}", path.display()))?;
    let actions = actions_from_config_file(&contents)
        .with_context(|| format!("parsing configuration {}", path.display()))?;
    for action in actions {
        let name = action.name();
        controller
            .dispatch(action)
            .await
            .with_context(|| format!("applying {name} from {}", path.display()))?;
    }
    controller
        .dispatch(ApiAction::InstanceStart)
        .await
        .context("starting the microVM")?;
    Ok(())
}

async fn serve(args: Args) -> anyhow::Result<u8> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;

    // The guest console goes to stdout unless --serial-out or PUT /serial names a file. When
    // the guest ends the microVM (reboot, power-off, panic), its reason arrives on `vm_stops`
    // and the process exits with the reason's status.
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    let (backend, mut vm_stops) =
        squib_core::vm::HypervisorBackend::new(squib_core::builder::ConsoleTarget::Stdout);
    // squib builds guests for x86_64 and aarch64 only: elsewhere InstanceStart answers with a
    // "no hypervisor backend" error.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    let (backend, mut vm_stops) = {
        let (_tx, rx) = tokio::sync::mpsc::unbounded_channel::<squib_core::vcpu::VmStopReason>();
        (NoHypervisorBackend, rx)
    };
    let (controller, _event_loop) =
        RuntimeApiController::start(&args.id, Box::new(backend), ControllerOptions::default())
            .context("starting the VMM event loop")?;
    let controller = Arc::new(controller);

    if let Some(path) = &args.serial_out {
        let serial = SerialConfig {
            serial_out_path: Some(path.clone()),
        };
        controller
            .dispatch(ApiAction::PutSerial(serial))
            .await
            .context("setting --serial-out")?;
    }

    let listener = match &args.api_sock {
        Some(path) if !args.no_api => {
            claim_socket_path(path)?;
            let listener = UnixListener::bind(path)
                .with_context(|| format!("binding the API socket {}", path.display()))?;
            Some((listener, SocketGuard(path.clone())))
        }
        _ => None,
    };

    if let Some(path) = &args.config_file {
        apply_config_file(&controller, path).await?;
    }

    let exit_code = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let shutdown = {
        let exit_code = Arc::clone(&exit_code);
        async move {
            tokio::select! {
                _ = sigterm.recv() => info!("SIGTERM received, shutting down"),
                _ = sigint.recv() => info!("SIGINT received, shutting down"),
                Some(reason) = vm_stops.recv() => {
                    info!(?reason, "the microVM stopped, shutting down");
                    exit_code.store(reason.exit_code(), std::sync::atomic::Ordering::SeqCst);
                }
            }
        }
    };
    match listener {
        Some((listener, guard)) => {
            info!(vm_id = %args.id, socket = %guard.0.display(), "serving the API");
            squib_api::server::serve(listener, Arc::clone(&controller), shutdown).await;
            drop(guard);
        }
        None => shutdown.await,
    }
    Ok(exit_code.load(std::sync::atomic::Ordering::SeqCst))
}
