//! `squib create`: checks the bundle, records the container, builds (or reuses) its root
//! image, hands a terminal's master to the console socket when the process has one, then
//! starts the detached monitor that boots the microVM and creates the container, and waits for
//! its one-line readiness report.

use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;
use command_fds::{CommandFdExt, FdMapping};
use squib_runtime::console::HostPty;
use squib_runtime::plan::GuestAssets;
use squib_runtime::rootfs::{CacheKey, ImageCache, ImageFormat};
use squib_runtime::state::{ContainerId, ContainerState, Status};

use super::{Context, IMAGE_CACHE_MAX_BYTES, guest_assets, write_pid_file};

/// The descriptor number the monitor receives its readiness pipe on.
pub const READY_FD: i32 = 3;
/// The descriptor number the monitor receives the slave of the container's host pty on.
pub const CONSOLE_FD: i32 = 4;

/// `squib create` arguments.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The bundle directory (config.json and the root file system).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// A Unix socket to receive the terminal's master (for `process.terminal`).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Write the monitor's pid (the container's host pid) to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility; the microVM has its own root.
    #[arg(long, hide = true)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub no_new_keyring: bool,
    /// The container's id.
    pub id: String,
}

/// A container recorded and with its root image ready, not yet booted.
#[derive(Debug)]
pub struct Prepared {
    /// Its recorded state (status `creating`).
    pub state: ContainerState,
    /// What its VM boots.
    pub assets: GuestAssets,
    /// `process.terminal` of its spec.
    pub terminal: bool,
    /// `process.consoleSize` of its spec as (rows, columns).
    pub console_size: Option<(u16, u16)>,
}

/// Checks the terminal options the way runc does: a process with a terminal that the runtime
/// does not attach to the caller (`create`, `run --detach`, `exec --detach`) needs a console
/// socket to hand the terminal over, and a console socket is only for such a process.
///
/// # Errors
///
/// Either mismatch, naming `process.terminal` and the flag.
pub fn check_console_socket(
    terminal: bool,
    detach: bool,
    console_socket: Option<&Path>,
) -> anyhow::Result<()> {
    if detach && terminal && console_socket.is_none() {
        anyhow::bail!(
            "process.terminal = true: cannot allocate tty if squib will detach without setting \
             console socket (--console-socket)"
        );
    }
    if let Some(path) = console_socket
        && !(detach && terminal)
    {
        anyhow::bail!(
            "--console-socket {}: cannot use console socket if squib will not detach or \
             allocate tty (process.terminal = {terminal})",
            path.display()
        );
    }
    Ok(())
}

/// Checks `bundle` (and, see [`check_console_socket`], its terminal against `detach` and
/// `console_socket`), records container `id` and readies its root image. Nothing is left
/// behind on error.
///
/// # Errors
///
/// Invalid id, bad spec (naming the field and value), missing root, terminal options that do
/// not fit, no guest assets, duplicate id, or a failed image build.
pub fn prepare(
    ctx: &Context,
    id: &str,
    bundle: &Path,
    detach: bool,
    console_socket: Option<&Path>,
) -> anyhow::Result<Prepared> {
    let id = ContainerId::new(id)?;
    let bundle =
        std::path::absolute(bundle).with_context(|| format!("bundle path {}", bundle.display()))?;
    if !bundle.join("config.json").is_file() {
        anyhow::bail!("bundle {}: config.json not found", bundle.display());
    }
    let spec = squib_runtime::plan::load_spec(&bundle)?;
    let root_rel = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_default();
    let rootfs = bundle.join(&root_rel);
    if !rootfs.is_dir() {
        anyhow::bail!(
            "config.json: root.path = {:?}: {} is not a directory",
            root_rel.display().to_string(),
            rootfs.display()
        );
    }
    let terminal = spec
        .process()
        .as_ref()
        .and_then(|p| p.terminal())
        .unwrap_or(false);
    check_console_socket(terminal, detach, console_socket)?;
    // Sizes beyond a terminal's 16 bits are clamped; the guest agent applies the same spec.
    let console_size = spec
        .process()
        .as_ref()
        .and_then(|p| p.console_size())
        .map(|b| {
            let clamp = |v: u64| u16::try_from(v).unwrap_or(u16::MAX);
            (clamp(b.height()), clamp(b.width()))
        });
    let assets = guest_assets(ctx)?;
    let mut state = ContainerState {
        id: id.clone(),
        bundle,
        monitor_pid: 0,
        status: Status::Creating,
        exit_status: None,
        created: now_rfc3339(),
        annotations: spec
            .annotations()
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        monitor_start_time: 0,
        rootfs_image: None,
        rootfs_cache_hit: None,
    };
    ctx.root.create(&state)?;
    let built = (|| -> anyhow::Result<()> {
        let cache = ImageCache::open(ctx.image_cache_dir(), IMAGE_CACHE_MAX_BYTES)?;
        let format = ImageFormat::default();
        let key = CacheKey::for_directory(format, &rootfs)?;
        let image = cache
            .get_or_build(&key, &rootfs, format)
            .with_context(|| format!("building the root image of {}", rootfs.display()))?;
        tracing::debug!(container_id = %id, image = %image.path.display(), hit = image.hit, "root image");
        state.rootfs_image = Some(image.path);
        state.rootfs_cache_hit = Some(image.hit);
        ctx.root.save(&state)?;
        Ok(())
    })();
    if let Err(e) = built {
        let _ = ctx.root.remove(&id);
        return Err(e);
    }
    Ok(Prepared {
        state,
        assets,
        terminal,
        console_size,
    })
}

/// `squib create`.
///
/// # Errors
///
/// See [`prepare`]; and the monitor's own report when the VM or the container could not be
/// created.
pub fn run(ctx: &Context, args: &CreateArgs) -> anyhow::Result<u8> {
    let pid = create_detached(ctx, &args.id, &args.bundle, args.console_socket.as_deref())?;
    if let Some(path) = &args.pid_file {
        write_pid_file(path, pid)?;
    }
    Ok(0)
}

/// Creates the container with a detached monitor; returns the monitor's pid.
///
/// With `process.terminal`, a host pty sized to `process.consoleSize` is allocated, its master
/// is sent to `console_socket` before the VM boots, and the monitor keeps the slave: it copies
/// between the slave and the guest pty and forwards resizes made on the master.
///
/// # Errors
///
/// As [`run`]; and the console socket cannot be reached.
pub fn create_detached(
    ctx: &Context,
    id: &str,
    bundle: &Path,
    console_socket: Option<&Path>,
) -> anyhow::Result<i32> {
    let prepared = prepare(ctx, id, bundle, true, console_socket)?;
    let cid = prepared.state.id.clone();
    let spawned = (|| -> anyhow::Result<i32> {
        let console = match console_socket {
            Some(path) if prepared.terminal => {
                let pty = HostPty::open(prepared.console_size)
                    .context("allocating the container's terminal")?;
                Some(pty.send_master(path)?)
            }
            _ => None,
        };
        spawn_monitor(ctx, &cid, console)
    })();
    match spawned {
        Ok(pid) => Ok(pid),
        Err(e) => {
            let _ = ctx.root.remove(&cid);
            Err(e)
        }
    }
}

/// This binary with the global flags of `ctx`, ready for a hidden subcommand.
///
/// # Errors
///
/// The binary's path cannot be found.
pub fn self_command(ctx: &Context) -> anyhow::Result<Command> {
    let exe = std::env::current_exe().context("finding the squib binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(&ctx.root_path);
    for (flag, value) in [
        ("--kernel", &ctx.kernel),
        ("--initramfs", &ctx.initramfs),
        ("--image-cache", &ctx.image_cache),
        ("--log", &ctx.log),
    ] {
        if let Some(v) = value {
            cmd.arg(flag).arg(v);
        }
    }
    if let Some(m) = ctx.memory_mib {
        cmd.arg("--memory-mib").arg(m.to_string());
    }
    if ctx.log_json {
        cmd.args(["--log-format", "json"]);
    }
    if ctx.debug {
        cmd.arg("--debug");
    }
    Ok(cmd)
}

fn spawn_monitor(ctx: &Context, id: &ContainerId, console: Option<OwnedFd>) -> anyhow::Result<i32> {
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the readiness pipe")?;
    let mut cmd = self_command(ctx)?;
    cmd.args(["monitor", "--ready-fd", &READY_FD.to_string()]);
    let mut mappings = vec![FdMapping {
        parent_fd: write_end,
        child_fd: READY_FD,
    }];
    if let Some(slave) = console {
        // The container's stdio is the pty. The monitor holds none of the caller's
        // descriptors, so a caller reading create's output to its end is not kept waiting
        // for as long as the container lives.
        cmd.args(["--console-fd", &CONSOLE_FD.to_string()]);
        mappings.push(FdMapping {
            parent_fd: slave,
            child_fd: CONSOLE_FD,
        });
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
    } else {
        // The container's stdio is the caller's, as with runc create.
        cmd.stdin(Stdio::inherit())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
    }
    cmd.arg(id.as_str());
    cmd.fd_mappings(mappings)
        .context("passing descriptors to the monitor")?;
    let mut child = cmd.spawn().context("starting the monitor")?;
    // Drop our copy of the write end (the mapping keeps it in the child only).
    drop(cmd);
    let pid = i32::try_from(child.id()).unwrap_or(0);
    let mut line = String::new();
    let read = BufReader::new(std::fs::File::from(read_end)).read_line(&mut line);
    let line = line.trim_end();
    if read.is_ok() && line == "ok" {
        return Ok(pid);
    }
    // The monitor failed; it stops its VM itself. Reap it so no zombie or VM is left.
    let _ = child.wait();
    match line.strip_prefix("error ") {
        Some(msg) => anyhow::bail!("{msg}"),
        None => anyhow::bail!("the monitor of {id} exited before reporting readiness"),
    }
}

/// The current time as RFC 3339 UTC, with nanoseconds.
pub fn now_rfc3339() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(now.as_secs(), now.subsec_nanos())
}

fn rfc3339(secs: u64, nanos: u32) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a (year, month, day) date in the proleptic Gregorian calendar.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01 so that leap days fall at the end of each 400-year era.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_check_console_socket_follows_runc_rules() {
        let sock = Path::new("/run/c.sock");
        // Detached with a terminal: the socket is required.
        let err = check_console_socket(true, true, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("process.terminal = true")
                && err.contains("cannot allocate tty")
                && err.contains("--console-socket"),
            "{err}"
        );
        check_console_socket(true, true, Some(sock)).unwrap();
        // A socket is refused without a terminal or in the foreground.
        for (terminal, detach) in [(false, true), (true, false), (false, false)] {
            let err = check_console_socket(terminal, detach, Some(sock))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("cannot use console socket") && err.contains("/run/c.sock"),
                "{err}"
            );
        }
        // Neither: nothing to check (a foreground terminal uses the caller's).
        check_console_socket(true, false, None).unwrap();
        check_console_socket(false, true, None).unwrap();
    }

    #[test]
    fn test_self_command_passes_the_guest_memory_on_to_the_monitor() {
        let cli = <crate::Cli as clap::Parser>::try_parse_from([
            "squib",
            "--root",
            "/run/squib-test",
            "--memory-mib",
            "192",
            "list",
        ])
        .unwrap();
        let cmd = self_command(&Context::from_cli(&cli)).unwrap();
        let args: Vec<_> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let at = args
            .iter()
            .position(|a| a == "--memory-mib")
            .expect("--memory-mib passed on");
        assert_eq!(args.get(at + 1).map(String::as_str), Some("192"));
        // Below the smallest guest the runtime boots: refused, naming the flag.
        let err =
            <crate::Cli as clap::Parser>::try_parse_from(["squib", "--memory-mib", "64", "list"])
                .unwrap_err()
                .to_string();
        assert!(err.contains("--memory-mib") && err.contains("64"), "{err}");
    }

    #[test]
    fn test_rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_796_395_332, 0), "2026-12-04T14:42:12.000000000Z");
    }
}
