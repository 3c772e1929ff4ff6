//! `squib delete`: removes a stopped container (or, with `--force`, kills its monitor and with
//! it the VM first). Afterwards no process, socket or state file of the container remains: the
//! terminal helpers of detached execs that still run are stopped too.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use squib_runtime::state::{ContainerId, StateError, Status};

use super::exec::ATTACH_PREFIX;
use super::{Context, monitor_alive, process_start_time};

/// How long `delete --force` waits for a killed monitor to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// `squib delete` arguments.
#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Kill the container first if it still runs; a missing container is not an error.
    #[arg(short, long)]
    pub force: bool,
    /// The container's id.
    pub id: String,
}

/// `squib delete`.
///
/// # Errors
///
/// Unknown container (without `--force`), a container that is not stopped (without
/// `--force`), or its files cannot be removed.
pub fn run(ctx: &Context, args: &DeleteArgs) -> anyhow::Result<u8> {
    let state = match ctx.load(&args.id) {
        Ok(s) => s,
        Err(e) if args.force && is_not_found(&e) => return Ok(0),
        Err(e) => return Err(e),
    };
    if state.status != Status::Stopped {
        if !args.force {
            let status = serde_json::to_value(state.status)?;
            anyhow::bail!(
                "cannot delete container {} that is not stopped: {}",
                state.id,
                status.as_str().unwrap_or("unknown")
            );
        }
        kill_monitor(&state)?;
    }
    stop_attach_helpers(&ctx.dir(&state.id))?;
    remove(ctx, &state.id)?;
    Ok(0)
}

fn is_not_found(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<StateError>(),
        Some(StateError::NotFound { .. })
    )
}

/// SIGKILLs the monitor (which ends the VM it hosts) after checking that the pid still
/// belongs to it, and waits until it is gone.
fn kill_monitor(state: &squib_runtime::state::ContainerState) -> anyhow::Result<()> {
    if !monitor_alive(state) {
        return Ok(());
    }
    let pid = Pid::from_raw(state.monitor_pid);
    kill(pid, Signal::SIGKILL)
        .with_context(|| format!("killing the monitor (pid {pid}) of {}", state.id))?;
    let deadline = Instant::now() + KILL_WAIT;
    while monitor_alive(state) {
        // A zombie keeps its /proc entry until reaped by its parent (init for a detached
        // monitor); its start time is still ours, so look at its state too.
        if is_zombie(state.monitor_pid) {
            break;
        }
        if Instant::now() > deadline {
            anyhow::bail!("the monitor (pid {pid}) of {} did not exit", state.id);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// SIGKILLs every terminal helper registered in `dir` (a file `exec-attach.<pid>` holding its
/// start time) that still runs, and waits until each is gone. Helpers end by themselves once
/// the VM is gone; this makes sure none outlives `delete`.
fn stop_attach_helpers(dir: &std::path::Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(ATTACH_PREFIX))
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| *p > 0)
        else {
            continue;
        };
        let started = std::fs::read_to_string(entry.path())
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok());
        let alive = || started.is_some() && process_start_time(pid) == started && !is_zombie(pid);
        if !alive() {
            continue;
        }
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        let deadline = Instant::now() + KILL_WAIT;
        while alive() {
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the terminal helper (pid {pid}) in {} did not exit",
                    dir.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.get(s.rfind(')')?.checked_add(2)?..)?.to_string();
            after
                .split_whitespace()
                .next()
                .map(|st| st == "Z" || st == "X")
        })
        .unwrap_or(true)
}

/// Removes the container's directory: state, sockets, console log.
///
/// # Errors
///
/// The directory cannot be removed.
pub fn remove(ctx: &Context, id: &ContainerId) -> anyhow::Result<()> {
    ctx.root.remove(id)?;
    Ok(())
}
