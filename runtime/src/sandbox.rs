//! One container's microVM with its VMM embedded in this process, and the agent inside it.
//!
//! [`Sandbox::boot`] starts a [`RuntimeApiController`] with the host's hypervisor backend (the
//! same controller `squib-vmm` serves over HTTP, so there is one path into the VMM), dispatches
//! the [`VmPlan`]'s pre-boot actions and `InstanceStart`, then connects to the agent through the
//! VM's hybrid vsock socket and pings it. Dropping the controller ends the event loop, which stops
//! the vCPUs and releases the VM; [`Sandbox::shutdown`] does that after asking the agent to stop.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use squib_api::{ControllerError, ControllerOptions, RuntimeApiController};
use squib_core::action::ApiAction;
use squib_core::config::SerialConfig;
use squib_core::vcpu::VmStopReason;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::agent_client::{AgentClient, AgentClientError, AgentEndpoint};
use crate::plan::VmPlan;

/// How long the agent may take to answer its first ping after `InstanceStart`. Generous: under
/// nested emulation a guest takes seconds to reach its init.
pub const DEFAULT_AGENT_DEADLINE: Duration = Duration::from_secs(120);

/// How long the agent may take to take a SIGKILL of a container's init before the shim, or
/// `squib kill`, powers the VM off instead (a guest that hangs never takes it).
pub const KILL_ANSWER_WAIT: Duration = Duration::from_secs(10);

/// A failure to boot or reach a sandbox.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The event loop thread could not be started.
    #[error("starting the VMM event loop")]
    StartEventLoop(#[source] std::io::Error),
    /// The controller refused an action of the plan, or `InstanceStart`.
    #[error("{action} was refused")]
    Dispatch {
        /// The action's name.
        action: &'static str,
        /// Why.
        #[source]
        source: ControllerError,
    },
    /// The guest stopped before its agent answered.
    #[error("the microVM stopped before its agent answered ({reason:?}); console log: {console}")]
    GuestStopped {
        /// Why the guest stopped.
        reason: VmStopReason,
        /// The console log to read.
        console: PathBuf,
    },
    /// The agent did not answer in time, or refused.
    #[error("the guest agent did not answer; console log: {console}")]
    Agent {
        /// The console log to read.
        console: PathBuf,
        /// The client's error.
        #[source]
        source: AgentClientError,
    },
}

/// What a sandbox boots from.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// The VM's id (usually the container id).
    pub id: String,
    /// The VM's configuration.
    pub plan: VmPlan,
    /// Where the guest console goes.
    pub console_log: PathBuf,
    /// How long to wait for the agent's first answer.
    pub agent_deadline: Duration,
}

/// A booted microVM with a connected agent.
pub struct Sandbox {
    id: String,
    controller: Option<Arc<RuntimeApiController>>,
    event_loop: Option<squib_api::controller::EventLoopThread>,
    stops: UnboundedReceiver<VmStopReason>,
    agent: AgentClient,
    vsock_uds: PathBuf,
    console_log: PathBuf,
    boot_time: Duration,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("vsock_uds", &self.vsock_uds)
            .field("console_log", &self.console_log)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Boots the VM described by `config` and waits for its agent.
    ///
    /// # Errors
    ///
    /// Any [`SandboxError`]; on error the VM is stopped and its vsock socket removed.
    pub async fn boot(config: SandboxConfig) -> Result<Self, SandboxError> {
        let started = Instant::now();
        let (backend, mut stops) = squib_core::vm::HypervisorBackend::new(
            squib_core::builder::ConsoleTarget::File(config.console_log.clone()),
        );
        let (controller, event_loop) = RuntimeApiController::start(
            &config.id,
            Box::new(backend),
            ControllerOptions::default(),
        )
        .map_err(SandboxError::StartEventLoop)?;
        let controller = Arc::new(controller);
        let vsock_uds = config.plan.vsock.uds_path().to_path_buf();
        let mut guard = BootGuard {
            controller: Some(controller.clone()),
            event_loop: Some(event_loop),
            vsock_uds: vsock_uds.clone(),
        };

        // The boot steps run in a block so that, on failure, this function's reference to the
        // controller is gone before `guard` drops: the guard ends the event loop by dropping the
        // last reference and then joins it, which would wait forever on a live reference.
        let result: Result<AgentClient, SandboxError> = async {
            let serial = SerialConfig {
                serial_out_path: Some(config.console_log.clone()),
            };
            let mut actions = vec![ApiAction::PutSerial(serial)];
            actions.extend(config.plan.actions());
            actions.push(ApiAction::InstanceStart);
            for action in actions {
                let name = action.name();
                controller
                    .dispatch(action)
                    .await
                    .map_err(|source| SandboxError::Dispatch {
                        action: name,
                        source,
                    })?;
            }

            let endpoint = AgentEndpoint::HybridVsock {
                uds_path: vsock_uds.clone(),
            };
            let connect = AgentClient::connect(endpoint, config.agent_deadline);
            let agent = tokio::select! {
                result = connect => result.map_err(|source| SandboxError::Agent {
                    console: config.console_log.clone(),
                    source,
                })?,
                Some(reason) = stops.recv() => {
                    return Err(SandboxError::GuestStopped {
                        reason,
                        console: config.console_log.clone(),
                    });
                }
            };
            Ok(agent)
        }
        .await;
        let agent = match result {
            Ok(agent) => agent,
            Err(e) => {
                drop(controller);
                return Err(e);
            }
        };
        let (controller, event_loop) = guard.disarm();
        tracing::info!(
            vm_id = %config.id,
            boot_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "sandbox ready"
        );
        Ok(Self {
            id: config.id,
            controller,
            event_loop,
            stops,
            agent,
            vsock_uds,
            console_log: config.console_log,
            boot_time: started.elapsed(),
        })
    }

    /// The VM's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The connected agent.
    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// The controller driving this VM (for pause, resume and the API front door).
    pub fn controller(&self) -> Option<&Arc<RuntimeApiController>> {
        self.controller.as_ref()
    }

    /// The VM's hybrid vsock socket.
    pub fn vsock_uds(&self) -> &Path {
        &self.vsock_uds
    }

    /// The guest console log.
    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Time from [`Sandbox::boot`]'s start to the agent's first answer.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Waits until the guest ends the VM on its own, and says why.
    pub async fn stopped(&mut self) -> Option<VmStopReason> {
        self.stops.recv().await
    }

    /// Why the guest ended the VM on its own, if it did so within `wait`.
    pub async fn stopped_within(&mut self, wait: Duration) -> Option<VmStopReason> {
        tokio::time::timeout(wait, self.stops.recv())
            .await
            .ok()
            .flatten()
    }

    /// Asks the agent to shut the guest down, then stops the VM and releases everything. The
    /// agent answers once it has removed every container and synced the guest's file systems,
    /// so with its answer the VM is stopped at once: the guest's own reboot would add nothing
    /// but time (about 0.27 s of every `ctr run --rm` in the VM test host, 2026-12-05). Without
    /// an answer within `grace` (the agent may already be gone), the guest gets up to `grace`
    /// more to end the VM itself before it is stopped regardless. The reason is the guest's,
    /// if it ended the VM first.
    pub async fn shutdown(mut self, grace: Duration) -> Option<VmStopReason> {
        let answered = matches!(
            tokio::time::timeout(grace, self.agent.shutdown()).await,
            Ok(Ok(()))
        );
        let reason = if answered {
            self.stops.try_recv().ok()
        } else {
            tokio::time::timeout(grace, self.stops.recv())
                .await
                .ok()
                .flatten()
        };
        self.release();
        reason
    }

    /// Stops the VM at once, without asking the guest, and releases everything: for a guest
    /// that no longer answers. Blocks until the vCPU threads have ended.
    pub fn power_off(mut self) {
        self.release();
    }

    fn release(&mut self) {
        self.controller.take();
        if let Some(event_loop) = self.event_loop.take()
            && event_loop.join().is_err()
        {
            tracing::warn!(vm_id = %self.id, "the VMM event loop panicked");
        }
        let _ = std::fs::remove_file(&self.vsock_uds);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.release();
    }
}

/// The last `lines` lines of the guest console log at `path` (read from its last 64 KiB), for
/// error reports: the log itself usually lives in a bundle that is removed with the container.
pub fn console_tail(path: &Path, lines: usize) -> String {
    use std::io::{Read as _, Seek as _, SeekFrom};
    const WINDOW: u64 = 64 * 1024;
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::new();
    if file
        .seek(SeekFrom::Start(len.saturating_sub(WINDOW)))
        .is_err()
        || file.take(WINDOW).read_to_end(&mut bytes).is_err()
    {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Stops a half-booted VM when boot fails part way.
struct BootGuard {
    controller: Option<Arc<RuntimeApiController>>,
    event_loop: Option<squib_api::controller::EventLoopThread>,
    vsock_uds: PathBuf,
}

impl BootGuard {
    fn disarm(
        &mut self,
    ) -> (
        Option<Arc<RuntimeApiController>>,
        Option<squib_api::controller::EventLoopThread>,
    ) {
        (self.controller.take(), self.event_loop.take())
    }
}

impl Drop for BootGuard {
    fn drop(&mut self) {
        // A disarmed guard hands the VM (and its live vsock socket) over to the Sandbox.
        if self.controller.is_none() && self.event_loop.is_none() {
            return;
        }
        if self.controller.take().is_some()
            && let Some(event_loop) = self.event_loop.take()
        {
            let _ = event_loop.join();
        }
        if self.event_loop.is_none() {
            let _ = std::fs::remove_file(&self.vsock_uds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_console_tail_keeps_the_last_lines_of_a_large_log() {
        let dir = std::env::temp_dir().join(format!("squib-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("console.log");
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, text).unwrap();
        assert_eq!(console_tail(&path, 3), "line 19997\nline 19998\nline 19999");
        assert_eq!(console_tail(&dir.join("missing"), 3), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
