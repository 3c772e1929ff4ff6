//! The monitor: the process that hosts one container's microVM for its whole life.
//!
//! `squib create` re-executes this binary as `squib --root R monitor ID`; `squib run` runs the
//! same code in its own process. The monitor boots the [`Sandbox`] (VMM embedded, agent reached
//! over `<state>/vsock.sock`, guest console in `<state>/console.log`), creates the container
//! through the agent with the monitor's own stdin/stdout/stderr as the container's stdio (as
//! runc's create hands its descriptors to the container) or, with `process.terminal`, with the
//! slave of the host pty whose master `create` sent to the console socket (`--console-fd`; the
//! slave becomes the monitor's controlling terminal so that resizes reach it), records
//! `created` with its pid and start time, and reports readiness to `create` through an
//! inherited pipe: one line, `ok` or `error <text>`.
//!
//! It then serves a line protocol on `<state>/monitor.sock` (`start`, `pause`, `resume`,
//! `poweroff`; each answered `ok` or `error <text>`; `poweroff` stops the VM at once without
//! asking the guest and records exit status 137, for a SIGKILL the agent cannot take) and the
//! Firecracker-compatible API on `<state>/api.sock` (the same controller). When the container's
//! init exits it records `stopped` with the exit status, shuts the VM down, removes its sockets
//! and exits. SIGTERM or SIGINT stop the VM the same way; in the foreground (`run`) they are
//! forwarded to the container's init instead.

use std::fs::File;
use std::io::Write as _;
use std::os::fd::{FromRawFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use oci_spec::runtime::Spec;
use squib_runtime::agent_client::{
    AgentClient, AgentClientError, CreateContainer, ProcessIo, StdioConfig,
};
use squib_runtime::plan::{GuestAssets, HostLimits, SizingDefaults, VmPlan};
use squib_runtime::sandbox::{DEFAULT_AGENT_DEADLINE, Sandbox, SandboxConfig, console_tail};
use squib_runtime::state::{ContainerId, ContainerState, StateRoot, Status};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{SignalKind, signal};

use crate::commands::tty::ConsoleSlave;
use crate::commands::{
    self, API_SOCKET, CONSOLE_LOG, Context, MONITOR_SOCKET, VSOCK_SOCKET, process_start_time,
};

/// How long the guest gets to power off on its own before the VM is stopped regardless.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The exit status recorded when the monitor is told to stop (128 + SIGTERM).
const STOPPED_BY_SIGNAL_STATUS: i32 = 143;
/// SIGTERM's number.
const SIGTERM: u32 = 15;
/// SIGINT's number.
const SIGINT: u32 = 2;
/// The exit status recorded when the VM ended before the container's init reported an exit.
const VM_LOST_STATUS: i32 = 255;
/// The exit status recorded when the VM was powered off to carry out a SIGKILL (128 + 9).
const POWERED_OFF_STATUS: i32 = 137;

/// The hidden `monitor` subcommand's arguments.
#[derive(Debug, clap::Args)]
pub struct MonitorArgs {
    /// The container to host (its state must exist, status `creating`).
    pub id: String,
    /// The descriptor to report readiness on.
    #[arg(long)]
    pub ready_fd: Option<i32>,
    /// The descriptor holding the slave of the container's host pty (`process.terminal`),
    /// whose master `create` sent to the console socket.
    #[arg(long)]
    pub console_fd: Option<i32>,
}

/// Entry point of `squib monitor`.
///
/// # Errors
///
/// Anything that stops the container from being created; it is also reported on the
/// readiness descriptor.
pub fn run(ctx: &Context, args: &MonitorArgs) -> anyhow::Result<u8> {
    // Leave the caller's session so that its terminal hanging up does not end the VM.
    let _ = nix::unistd::setsid();
    let mut ready = args.ready_fd.map(ready_pipe).transpose()?;
    let outcome = args
        .console_fd
        .map(console_slave)
        .transpose()
        .and_then(|slave| {
            commands::block_on(async {
                let id = ContainerId::new(&args.id)?;
                let state = ctx.root.load(&id)?;
                let assets = commands::guest_assets(ctx)?;
                let console = slave.map(ConsoleSlave::attach).transpose()?;
                let stdio = match &console {
                    Some(c) => c.stdio()?,
                    None => inherited_stdio(false),
                };
                let booted = Booted::boot(ctx, state, &assets, stdio).await?;
                if let Some(c) = console {
                    c.forward(booted.agent().clone(), id.to_string(), String::new());
                }
                booted.serve(ctx, false, ready.take()).await
            })?
        });
    match outcome {
        Ok(_) => Ok(0),
        Err(e) => {
            if let Some(mut pipe) = ready {
                // The creator prints this and cleans up.
                let _ = writeln!(pipe, "error {}", one_line(&format!("{e:#}")));
            }
            Err(e)
        }
    }
}

/// Opens the readiness pipe handed over as descriptor `fd`.
pub fn ready_pipe(fd: i32) -> anyhow::Result<File> {
    // Reopening through /proc gives an owned handle to the same pipe without taking ownership
    // of a raw descriptor number.
    let path = PathBuf::from(format!("/proc/self/fd/{fd}"));
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .with_context(|| format!("opening the readiness descriptor {fd}"))
}

/// Takes the pty slave handed over as descriptor `fd`.
pub fn console_slave(fd: i32) -> anyhow::Result<OwnedFd> {
    // Only take ownership of a descriptor that is open (closing one that is not would be a bug
    // of its own).
    let link = PathBuf::from(format!("/proc/self/fd/{fd}"));
    std::fs::symlink_metadata(&link)
        .with_context(|| format!("the console descriptor {fd} is not open"))?;
    // SAFETY: `create` (or `exec --detach`) maps the pty slave onto this number for this process
    // alone and nothing else in this process opens, owns or closes it; it was just seen open,
    // and this is the only place that takes it, once per process.
    let slave = unsafe { OwnedFd::from_raw_fd(fd) };
    squib_runtime::console::window_size(&slave)
        .with_context(|| format!("the console descriptor {fd} is not a terminal"))?;
    Ok(slave)
}

/// Flattens an error chain onto one line for the line protocols.
pub fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The monitor's own stdio as the container's; with `terminal`, stdout carries the pty.
pub fn inherited_stdio(terminal: bool) -> StdioConfig {
    StdioConfig {
        stdin: Some(Box::new(tokio::io::stdin())),
        stdout: Some(Box::new(tokio::io::stdout())),
        stderr: if terminal {
            None
        } else {
            Some(Box::new(tokio::io::stderr()))
        },
        terminal,
    }
}

/// A booted VM with the container created in it.
pub struct Booted {
    id: ContainerId,
    dir: PathBuf,
    state: ContainerState,
    sandbox: Sandbox,
    agent: AgentClient,
    root: StateRoot,
    init: Option<ProcessIo>,
}

impl std::fmt::Debug for Booted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Booted")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Booted {
    /// Boots the VM of `state`'s container and creates the container through the agent,
    /// then records `created` with this process as the monitor.
    ///
    /// # Errors
    ///
    /// The spec, the boot or the agent's create failed; the VM is stopped again.
    pub async fn boot(
        ctx: &Context,
        mut state: ContainerState,
        assets: &GuestAssets,
        stdio: StdioConfig,
    ) -> anyhow::Result<Self> {
        let id = state.id.clone();
        let dir = ctx.dir(&id);
        let spec = squib_runtime::plan::load_spec(&state.bundle)?;
        let image = state
            .rootfs_image
            .clone()
            .with_context(|| format!("container {id} has no root image recorded"))?;
        let mut sizing = SizingDefaults::default();
        if let Some(m) = ctx.memory_mib {
            sizing.mem_mib = m;
        }
        let plan = VmPlan::new(
            &spec,
            &sizing,
            &HostLimits::probe(),
            assets,
            &image,
            &dir.join(VSOCK_SOCKET),
            &std::env::var("SQUIB_GUEST_BOOT_ARGS").unwrap_or_default(),
        )?;
        let console = dir.join(CONSOLE_LOG);
        let sandbox = Sandbox::boot(SandboxConfig {
            id: id.to_string(),
            plan,
            console_log: console.clone(),
            agent_deadline: DEFAULT_AGENT_DEADLINE,
        })
        .await
        .map_err(|e| boot_failure(&id, &anyhow::Error::new(e), &console))?;
        let agent = sandbox.agent().clone();
        let fstype = image
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or("erofs")
            .to_string();
        let request = CreateContainer {
            container_id: id.to_string(),
            oci_spec_json: guest_spec_json(&spec)?,
            rootfs_source: "/dev/vda".to_string(),
            rootfs_fstype: fstype,
        };
        let (_pid, init) = match agent.create_container(&request, stdio).await {
            Ok(r) => r,
            Err(e) => {
                let _ = sandbox.shutdown(SHUTDOWN_GRACE).await;
                return Err(e).with_context(|| format!("creating container {id} in its VM"));
            }
        };
        state.status = Status::Created;
        state.monitor_pid = i32::try_from(std::process::id()).unwrap_or(0);
        state.monitor_start_time = process_start_time(state.monitor_pid).unwrap_or(0);
        ctx.root.save(&state)?;
        tracing::info!(container_id = %id, "container created");
        Ok(Self {
            id,
            dir,
            state,
            sandbox,
            agent,
            root: ctx.root.clone(),
            init: Some(init),
        })
    }

    /// The connected agent.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// Serves the control and API sockets until the container's init exits (starting it
    /// first when `autostart`), records its exit status, stops the VM and removes the
    /// sockets. Returns the exit status.
    ///
    /// # Errors
    ///
    /// The sockets cannot be bound, or (with `autostart`) the process cannot be started.
    pub async fn serve(
        mut self,
        ctx: &Context,
        autostart: bool,
        ready: Option<File>,
    ) -> anyhow::Result<i32> {
        let control_path = self.dir.join(MONITOR_SOCKET);
        let api_path = self.dir.join(API_SOCKET);
        let bound = bind(&control_path).and_then(|c| Ok((c, bind(&api_path)?)));
        let (control, api) = match bound {
            Ok(l) => l,
            Err(e) => {
                self.finish(ctx, None, true).await;
                return Err(e);
            }
        };
        let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
        if let Some(controller) = self.sandbox.controller().cloned() {
            tokio::spawn(squib_api::server::serve(api, controller, async move {
                let _ = api_stopped.await;
            }));
        }
        let mut terms = signal(SignalKind::terminate()).context("watching SIGTERM")?;
        let mut ints = signal(SignalKind::interrupt()).context("watching SIGINT")?;

        // The init's exit is watched from creation on: a kill before start ends it too.
        let (exit_tx, mut exit_rx) = tokio::sync::oneshot::channel();
        let waiter = self.agent.clone();
        if let Some(mut init) = self.init.take() {
            tokio::spawn(async move {
                let _ = exit_tx.send(init.wait(&waiter).await);
            });
        }

        if autostart && let Err(e) = self.start().await {
            let _ = api_stop.send(());
            self.finish(ctx, None, true).await;
            return Err(e);
        }
        if let Some(mut pipe) = ready {
            pipe.write_all(b"ok\n").context("reporting readiness")?;
        }

        let mut powered_off = None;
        let status = loop {
            tokio::select! {
                exit = &mut exit_rx => {
                    break match exit {
                        Ok(Ok(status)) => status,
                        Ok(Err(e)) => {
                            tracing::error!(
                                container_id = %self.id,
                                error = %e,
                                "lost the init process"
                            );
                            VM_LOST_STATUS
                        }
                        Err(_) => VM_LOST_STATUS,
                    };
                }
                accepted = control.accept() => {
                    if let Ok((stream, _)) = accepted
                        && let Handled::PowerOff(reply) = self.handle(ctx, stream).await
                    {
                        powered_off = Some(reply);
                        break POWERED_OFF_STATUS;
                    }
                }
                // In the foreground (`run`) the caller's signals go to the container, as
                // runc forwards them; a detached monitor told to stop stops the VM.
                _ = terms.recv() => {
                    if !autostart {
                        break STOPPED_BY_SIGNAL_STATUS;
                    }
                    self.forward(SIGTERM);
                }
                _ = ints.recv() => {
                    if !autostart {
                        break STOPPED_BY_SIGNAL_STATUS;
                    }
                    self.forward(SIGINT);
                }
                reason = self.sandbox.stopped() => {
                    match reason {
                        Some(reason) => tracing::error!(
                            container_id = %self.id,
                            ?reason,
                            "the microVM stopped"
                        ),
                        None => tracing::error!(container_id = %self.id, "the microVM stopped"),
                    }
                    break VM_LOST_STATUS;
                }
            }
        };
        let _ = api_stop.send(());
        drop(control);
        self.finish(ctx, Some(status), powered_off.is_none()).await;
        if let Some(mut reply) = powered_off {
            let _ = reply.write_all(b"ok\n").await;
        }
        Ok(status)
    }

    /// Records `stopped`, stops the VM (`graceful`: letting the guest power off first) and
    /// removes the monitor's sockets.
    async fn finish(self, ctx: &Context, status: Option<i32>, graceful: bool) {
        let mut state = self.state;
        state.status = Status::Stopped;
        state.exit_status = status.or(Some(VM_LOST_STATUS));
        // The container may have been deleted under us (delete --force); nothing to record.
        let _ = ctx.root.save(&state);
        tracing::info!(
            container_id = %self.id,
            exit_status = ?state.exit_status,
            "container stopped"
        );
        if graceful {
            let _ = self.sandbox.shutdown(SHUTDOWN_GRACE).await;
        } else {
            tracing::warn!(container_id = %self.id, "powering the microVM off");
            let sandbox = self.sandbox;
            let _ = tokio::task::spawn_blocking(move || sandbox.power_off()).await;
        }
        for name in [MONITOR_SOCKET, API_SOCKET] {
            let _ = std::fs::remove_file(self.dir.join(name));
        }
    }

    /// Sends `signal` to the container's init without waiting for the agent's answer.
    fn forward(&self, signal: u32) {
        let agent = self.agent.clone();
        let id = self.id.to_string();
        tokio::spawn(async move {
            if let Err(e) = agent.signal_process(&id, "", signal, false).await {
                tracing::debug!(container_id = %id, error = %e, "forwarding a signal failed");
            }
        });
    }

    async fn start(&mut self) -> anyhow::Result<()> {
        match self.state.status {
            Status::Created => {}
            Status::Running | Status::Paused => {
                anyhow::bail!("cannot start an already running container")
            }
            Status::Stopped => anyhow::bail!("cannot start a container that has stopped"),
            Status::Creating => anyhow::bail!("cannot start a container that is being created"),
        }
        match self.agent.start_container(self.id.as_str()).await {
            Ok(()) => {}
            Err(e @ AgentClientError::StartFailed { .. }) => {
                anyhow::bail!("unable to start container process: {e}")
            }
            Err(e) => return Err(e).context("starting the container's process"),
        }
        self.state.status = Status::Running;
        self.save();
        tracing::info!(container_id = %self.id, "container started");
        Ok(())
    }

    async fn pause(&mut self, pause: bool) -> anyhow::Result<()> {
        match (self.state.status, pause) {
            (Status::Running, true) => {
                self.agent.pause_container(self.id.as_str()).await?;
                self.state.status = Status::Paused;
            }
            (Status::Paused, false) => {
                self.agent.resume_container(self.id.as_str()).await?;
                self.state.status = Status::Running;
            }
            (_, true) => anyhow::bail!("container not running"),
            (_, false) => anyhow::bail!("container not paused"),
        }
        self.save();
        Ok(())
    }

    fn save(&self) {
        if let Err(e) = self.root.save(&self.state) {
            tracing::warn!(container_id = %self.id, error = %e, "could not record the state");
        }
    }

    async fn handle(&mut self, _ctx: &Context, stream: UnixStream) -> Handled {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            BufReader::new(read).read_line(&mut line),
        )
        .await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            return Handled::Done;
        }
        let result = match line.trim() {
            // Answered once the VM is off (see `serve`).
            "poweroff" => return Handled::PowerOff(write),
            "start" => self.start().await,
            "pause" => self.pause(true).await,
            "resume" => self.pause(false).await,
            other => Err(anyhow::anyhow!("unknown request {other:?}")),
        };
        let reply = match result {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error {}\n", one_line(&format!("{e:#}"))),
        };
        let _ = write.write_all(reply.as_bytes()).await;
        Handled::Done
    }
}

/// What became of one request on the monitor socket.
enum Handled {
    /// Answered.
    Done,
    /// `poweroff`: to be answered on this stream once the VM is off.
    PowerOff(tokio::net::unix::OwnedWriteHalf),
}

fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

/// The spec as the agent receives it.
fn guest_spec_json(spec: &Spec) -> anyhow::Result<Vec<u8>> {
    serde_json::to_vec(&squib_runtime::plan::guest_spec(spec))
        .context("encoding the container's spec")
}

/// The error of a failed boot. The console log named in it goes with the container's
/// directory when the create fails, so its last lines are quoted here.
fn boot_failure(id: &ContainerId, error: &anyhow::Error, console: &Path) -> anyhow::Error {
    let tail = console_tail(console, BOOT_FAILURE_CONSOLE_LINES);
    if tail.is_empty() {
        anyhow::anyhow!("booting the microVM of {id}: {error:#} (the console printed nothing)")
    } else {
        anyhow::anyhow!(
            "booting the microVM of {id}: {error:#}\nthe end of the console (its log is removed with the container):\n{tail}"
        )
    }
}

/// How many console lines a failed boot's error quotes.
const BOOT_FAILURE_CONSOLE_LINES: usize = 20;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_boot_failure_quotes_the_console_that_goes_with_the_container() {
        let dir = std::env::temp_dir().join(format!("squib-monitor-boot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let console = dir.join(CONSOLE_LOG);
        let lines: Vec<String> = (0..100).map(|i| format!("console line {i}")).collect();
        std::fs::write(&console, lines.join("\n")).unwrap();
        let id = ContainerId::new("c1").unwrap();
        let cause = anyhow::anyhow!("the guest agent did not answer");
        let quoted = boot_failure(&id, &cause, &console).to_string();
        let silent = boot_failure(&id, &cause, &dir.join("missing")).to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            quoted.starts_with("booting the microVM of c1: the guest agent did not answer\n"),
            "{quoted}"
        );
        assert!(
            quoted.ends_with("console line 98\nconsole line 99"),
            "{quoted}"
        );
        assert!(!quoted.contains("console line 79\n"), "{quoted}");
        assert!(quoted.contains("console line 80\n"), "{quoted}");
        assert!(
            silent.ends_with("(the console printed nothing)"),
            "{silent}"
        );
    }
}
