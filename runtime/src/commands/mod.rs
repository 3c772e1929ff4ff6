//! The CLI's commands, one module each, and what they share: the runtime [`Context`] built
//! from the global flags, state lookups that notice a dead monitor, guest asset discovery, the
//! monitor's control socket and the agent connection through the VM's vsock socket.

pub mod create;
pub mod delete;
pub mod events;
pub mod exec;
pub mod kill;
pub mod list;
pub mod pause;
pub mod ps;
pub mod run;
pub mod spec;
pub mod start;
pub mod state;
pub mod tty;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use squib_runtime::agent_client::{AgentClient, AgentEndpoint};
use squib_runtime::plan::GuestAssets;
use squib_runtime::state::{ContainerId, ContainerState, StateRoot, Status};

/// The runtime configuration file consulted after flags and environment.
pub const CONFIG_FILE: &str = "/etc/squib/config.json";
/// Where root images are cached unless configured otherwise.
pub const DEFAULT_IMAGE_CACHE: &str = "/var/cache/squib/images";
/// The most the image cache holds before evicting least recently used images.
pub const IMAGE_CACHE_MAX_BYTES: u64 = 8 << 30;
/// The monitor's control socket, inside the container's state directory.
pub const MONITOR_SOCKET: &str = "monitor.sock";
/// The Firecracker-compatible API socket of the container's VMM.
pub const API_SOCKET: &str = "api.sock";
/// The VM's hybrid vsock socket (the host side of the agent's transport).
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The guest console log.
pub const CONSOLE_LOG: &str = "console.log";
/// How long a CLI command waits for the agent's answer when connecting to a running VM.
pub const AGENT_CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// An error that exits with a code other than 1 (e.g. 255 for a failed `exec`).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// The process exit code.
    pub exit_code: u8,
    /// What went wrong.
    pub message: String,
}

/// A single container id argument.
#[derive(Debug, clap::Args)]
pub struct IdArg {
    /// The container's id.
    pub id: String,
}

/// What every command needs from the global flags.
#[derive(Debug, Clone)]
pub struct Context {
    /// The state root.
    pub root: StateRoot,
    /// Its path (passed on to the monitor).
    pub root_path: PathBuf,
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initramfs`.
    pub initramfs: Option<PathBuf>,
    /// `--image-cache`.
    pub image_cache: Option<PathBuf>,
    /// `--memory-mib`.
    pub memory_mib: Option<u64>,
    /// `--log` (passed on to the monitor).
    pub log: Option<PathBuf>,
    /// `--log-format json`.
    pub log_json: bool,
    /// `--debug`.
    pub debug: bool,
}

impl Context {
    /// Collects the global flags.
    pub fn from_cli(cli: &crate::Cli) -> Self {
        let root_path = std::path::absolute(&cli.root).unwrap_or_else(|_| cli.root.clone());
        Self {
            root: StateRoot::new(&root_path),
            root_path,
            kernel: cli.kernel.clone(),
            initramfs: cli.initramfs.clone(),
            image_cache: cli.image_cache.clone(),
            memory_mib: cli.memory_mib,
            log: cli.log.clone(),
            log_json: cli.log_format == crate::LogFormat::Json,
            debug: cli.debug,
        }
    }

    /// The container's state directory.
    pub fn dir(&self, id: &ContainerId) -> PathBuf {
        self.root.dir(id)
    }

    /// The image cache directory: `--image-cache`, `$SQUIB_IMAGE_CACHE`, the default.
    pub fn image_cache_dir(&self) -> PathBuf {
        self.image_cache
            .clone()
            .or_else(|| std::env::var_os("SQUIB_IMAGE_CACHE").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_IMAGE_CACHE))
    }

    /// Reads a container's state and corrects it when its monitor is gone: a container whose
    /// monitor died without recording an exit is reported stopped (and recorded so).
    ///
    /// # Errors
    ///
    /// The id is invalid or the container does not exist.
    pub fn load(&self, id: &str) -> anyhow::Result<ContainerState> {
        let id = ContainerId::new(id)?;
        let mut state = self.root.load(&id)?;
        if !matches!(state.status, Status::Stopped | Status::Creating) && !monitor_alive(&state) {
            tracing::warn!(container_id = %id, pid = state.monitor_pid, "monitor is gone");
            state.status = Status::Stopped;
            // Best effort: another command may be deleting the container right now.
            let _ = self.root.save(&state);
        }
        Ok(state)
    }

    /// Sends one request line to the container's monitor and returns its `ok` payload.
    ///
    /// # Errors
    ///
    /// The monitor cannot be reached or answered `error ...`.
    pub fn control(&self, id: &ContainerId, request: &str) -> anyhow::Result<String> {
        let path = self.dir(id).join(MONITOR_SOCKET);
        let mut stream = UnixStream::connect(&path)
            .with_context(|| format!("connecting to the monitor of {id} at {}", path.display()))?;
        stream.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .with_context(|| format!("reading the monitor's answer to {request:?}"))?;
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("ok") {
            Ok(rest.trim_start().to_string())
        } else if let Some(msg) = line.strip_prefix("error ") {
            anyhow::bail!("{msg}")
        } else {
            anyhow::bail!("the monitor of {id} gave no answer to {request:?}")
        }
    }
}

/// Connects to the agent of a container whose VM runs.
///
/// # Errors
///
/// The VM's vsock socket cannot be reached or the agent does not answer.
pub async fn connect_agent(ctx: &Context, id: &ContainerId) -> anyhow::Result<AgentClient> {
    let uds_path = ctx.dir(id).join(VSOCK_SOCKET);
    AgentClient::connect(
        AgentEndpoint::HybridVsock { uds_path },
        AGENT_CONNECT_DEADLINE,
    )
    .await
    .with_context(|| format!("connecting to the guest agent of {id}"))
}

/// A current-thread tokio runtime for one command.
///
/// # Errors
///
/// The runtime cannot be built.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Runs `work` to completion on a [`runtime`] and returns without waiting for the runtime's
/// blocking tasks. tokio reads stdin on a blocking thread, and a read of a terminal or of a
/// pipe left open may never return: dropping the runtime would wait for it, and a foreground
/// `run` would go on after its container exited, until a key was pressed.
///
/// # Errors
///
/// The runtime cannot be built.
pub fn block_on<F: std::future::Future>(work: F) -> anyhow::Result<F::Output> {
    let rt = runtime()?;
    let output = rt.block_on(work);
    rt.shutdown_background();
    Ok(output)
}

/// Field 22 of `/proc/PID/stat`: the process's start time in clock ticks since boot.
pub fn process_start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: split after it.
    let after = stat.get(stat.rfind(')')?.checked_add(2)?..)?;
    // `after` starts at field 3, so field 22 is its 20th (index 19).
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the recorded monitor still runs (same pid and same start time).
pub fn monitor_alive(state: &ContainerState) -> bool {
    if state.monitor_pid <= 0 {
        return false;
    }
    match process_start_time(state.monitor_pid) {
        Some(t) => state.monitor_start_time == 0 || t == state.monitor_start_time,
        None => false,
    }
}

/// The guest kernel and initramfs: flags, then `$SQUIB_KERNEL`/`$SQUIB_INITRAMFS`, then
/// [`CONFIG_FILE`], then `${SQUIB_CACHE:-$HOME/.cache/squib}/guest/`, where `make guest-image`
/// installs them.
///
/// # Errors
///
/// Neither place has both files; the message names every place looked at.
pub fn guest_assets(ctx: &Context) -> anyhow::Result<GuestAssets> {
    let env = |k: &str| std::env::var_os(k).map(PathBuf::from);
    let config = read_config(Path::new(CONFIG_FILE));
    let cache = env("SQUIB_CACHE")
        .or_else(|| env("HOME").map(|h| h.join(".cache/squib")))
        .map(|c| c.join("guest"));
    let candidates: [(&str, Option<PathBuf>, Option<PathBuf>); 4] = [
        (
            "--kernel/--initramfs",
            ctx.kernel.clone(),
            ctx.initramfs.clone(),
        ),
        (
            "$SQUIB_KERNEL/$SQUIB_INITRAMFS",
            env("SQUIB_KERNEL"),
            env("SQUIB_INITRAMFS"),
        ),
        (CONFIG_FILE, config.0, config.1),
        (
            "the guest-image cache",
            cache.as_ref().map(|c| c.join("vmlinux")),
            cache.as_ref().map(|c| c.join("initramfs")),
        ),
    ];
    pick_assets(&candidates)
}

fn read_config(path: &Path) -> (Option<PathBuf>, Option<PathBuf>) {
    let Ok(body) = std::fs::read(path) else {
        return (None, None);
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        tracing::warn!(path = %path.display(), "ignoring a config file that is not JSON");
        return (None, None);
    };
    let get = |k: &str| v.get(k).and_then(|x| x.as_str()).map(PathBuf::from);
    (get("kernel"), get("initramfs"))
}

/// The first source that names a kernel or an initramfs decides (a flag is never silently
/// overridden by a later source); within it, a missing part falls back to later sources.
fn pick_assets(
    candidates: &[(&str, Option<PathBuf>, Option<PathBuf>)],
) -> anyhow::Result<GuestAssets> {
    let mut kernel = None;
    let mut initramfs = None;
    let mut looked = Vec::new();
    for (source, k, i) in candidates {
        for (slot, path, what) in [(&mut kernel, k, "kernel"), (&mut initramfs, i, "initramfs")] {
            if slot.is_some() {
                continue;
            }
            match path {
                Some(p) if p.is_file() => *slot = Some(p.clone()),
                Some(p) => looked.push(format!("{what} {} ({source}): not a file", p.display())),
                None => looked.push(format!("{what}: {source} not set")),
            }
        }
    }
    match (kernel, initramfs) {
        (Some(kernel), Some(initramfs)) => Ok(GuestAssets { kernel, initramfs }),
        _ => anyhow::bail!(
            "no guest kernel and initramfs found (run `make guest-image`); looked at: {}",
            looked.join("; ")
        ),
    }
}

/// Writes `pid` to `path` atomically (a temporary file renamed), as runc's `--pid-file`.
///
/// # Errors
///
/// The file cannot be written.
pub fn write_pid_file(path: &Path, pid: i32) -> anyhow::Result<()> {
    let tmp = path.with_extension("squib-tmp");
    std::fs::write(&tmp, pid.to_string())
        .with_context(|| format!("writing the pid file {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing the pid file {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_process_start_time_reads_own_process() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let t = process_start_time(pid).unwrap();
        assert!(t > 0);
        assert_eq!(process_start_time(pid), Some(t));
        assert_eq!(process_start_time(-5), None);
    }

    #[test]
    fn test_pick_assets_names_every_place_looked_at() {
        let err = pick_assets(&[
            ("--kernel/--initramfs", None, None),
            (
                "$SQUIB_KERNEL/$SQUIB_INITRAMFS",
                Some("/nonexistent/k".into()),
                None,
            ),
            (CONFIG_FILE, None, None),
            (
                "the guest-image cache",
                Some("/nonexistent/c/vmlinux".into()),
                None,
            ),
        ])
        .unwrap_err()
        .to_string();
        for part in [
            "--kernel",
            "/nonexistent/k",
            CONFIG_FILE,
            "/nonexistent/c/vmlinux",
        ] {
            assert!(err.contains(part), "{part} missing from: {err}");
        }
    }

    #[test]
    fn test_pick_assets_prefers_the_first_source_with_files() {
        let d = std::env::temp_dir().join(format!("squib-assets-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let (k1, i1, k2) = (d.join("k1"), d.join("i1"), d.join("k2"));
        for f in [&k1, &i1, &k2] {
            std::fs::write(f, b"x").unwrap();
        }
        let a = pick_assets(&[
            ("flags", Some(k2.clone()), None),
            ("env", Some(k1.clone()), Some(i1.clone())),
        ])
        .unwrap();
        assert_eq!(a.kernel, k2);
        assert_eq!(a.initramfs, i1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_monitor_alive_rejects_recycled_pid() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let mut s = ContainerState {
            id: ContainerId::new("x").unwrap(),
            bundle: "/b".into(),
            monitor_pid: pid,
            status: Status::Running,
            exit_status: None,
            created: String::new(),
            annotations: Default::default(),
            monitor_start_time: process_start_time(pid).unwrap(),
            rootfs_image: None,
            rootfs_cache_hit: None,
        };
        assert!(monitor_alive(&s));
        s.monitor_start_time += 1;
        assert!(!monitor_alive(&s));
        s.monitor_pid = 0;
        assert!(!monitor_alive(&s));
    }
}
