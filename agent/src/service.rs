//! The ttrpc `Agent` service: decodes requests, calls the [`Manager`], and maps
//! [`ContainerError`]s onto ttrpc status codes (with a [`ProcessStartFailure`] detail when a
//! process could not be run).

use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use squib_agent_protocol::agent::{self, ProcessStartFailure};
use squib_agent_protocol::agent_ttrpc;
use squib_agent_protocol::protobuf::Message;
use ttrpc::{Code, TtrpcContext};

use crate::container::{ContainerError, Manager};

use squib_agent_protocol::ttrpc;

/// The service object registered with the ttrpc server.
pub struct AgentService {
    manager: Arc<Manager>,
    started: Instant,
    shutdown: Arc<dyn Fn() + Send + Sync>,
}

impl std::fmt::Debug for AgentService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentService")
            .field("manager", &self.manager)
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl AgentService {
    /// A service over `manager`; `shutdown` runs (on its own thread, after the reply) when
    /// the host asks for `Shutdown`.
    pub fn new(manager: Arc<Manager>, shutdown: Arc<dyn Fn() + Send + Sync>) -> Self {
        Self {
            manager,
            started: Instant::now(),
            shutdown,
        }
    }
}

/// The error text with its whole source chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn status(e: &ContainerError) -> ttrpc::Error {
    let code = match e {
        ContainerError::NotFound { .. } | ContainerError::ProcessNotFound { .. } => Code::NOT_FOUND,
        ContainerError::AlreadyExists { .. } => Code::ALREADY_EXISTS,
        ContainerError::BadId { .. }
        | ContainerError::Spec(_)
        | ContainerError::Stdio(_)
        | ContainerError::BadSignal { .. } => Code::INVALID_ARGUMENT,
        ContainerError::StartFailed { .. }
        | ContainerError::NotCreated { .. }
        | ContainerError::Stopped { .. }
        | ContainerError::NoTerminal { .. }
        | ContainerError::NoCgroup { .. } => Code::FAILED_PRECONDITION,
        ContainerError::Signal { .. } => Code::NOT_FOUND,
        _ => Code::INTERNAL,
    };
    let mut st = ttrpc::get_status(code, chain(e));
    if let ContainerError::StartFailed {
        exit_status,
        message,
    } = e
    {
        let mut detail = ProcessStartFailure::new();
        detail.exit_status = *exit_status;
        detail.message = message.clone();
        if let Ok(bytes) = detail.write_to_bytes() {
            let mut any = ttrpc::proto::Any::new();
            any.type_url = squib_agent_protocol::PROCESS_START_FAILURE_TYPE_URL.to_owned();
            any.value = bytes;
            st.details.push(any);
        }
    }
    tracing::debug!(error = %chain(e), "request failed");
    ttrpc::Error::RpcStatus(st)
}

type Res<T> = ttrpc::Result<T>;

impl agent_ttrpc::Agent for AgentService {
    fn ping(&self, _: &TtrpcContext, _: agent::PingRequest) -> Res<agent::PingResponse> {
        let mut r = agent::PingResponse::new();
        r.version = env!("CARGO_PKG_VERSION").to_owned();
        r.protocol = squib_agent_protocol::PROTOCOL_REVISION;
        r.uptime_secs = self.started.elapsed().as_secs();
        Ok(r)
    }

    fn create_container(
        &self,
        _: &TtrpcContext,
        req: agent::CreateContainerRequest,
    ) -> Res<agent::CreateContainerResponse> {
        let pid = self
            .manager
            .create(
                &req.container_id,
                &req.oci_spec_json,
                &req.rootfs_source,
                &req.rootfs_fstype,
                &req.stdio,
            )
            .map_err(|e| status(&e))?;
        let mut r = agent::CreateContainerResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn start_container(
        &self,
        _: &TtrpcContext,
        req: agent::StartContainerRequest,
    ) -> Res<agent::Empty> {
        self.manager
            .start(&req.container_id)
            .map_err(|e| status(&e))?;
        Ok(agent::Empty::new())
    }

    fn exec_process(
        &self,
        _: &TtrpcContext,
        req: agent::ExecProcessRequest,
    ) -> Res<agent::ExecProcessResponse> {
        let pid = self
            .manager
            .exec(
                &req.container_id,
                &req.exec_id,
                &req.oci_process_json,
                &req.stdio,
            )
            .map_err(|e| status(&e))?;
        let mut r = agent::ExecProcessResponse::new();
        r.pid = pid;
        Ok(r)
    }

    fn signal_process(
        &self,
        _: &TtrpcContext,
        req: agent::SignalProcessRequest,
    ) -> Res<agent::Empty> {
        self.manager
            .signal(&req.container_id, &req.exec_id, req.signal, req.all)
            .map_err(|e| status(&e))?;
        Ok(agent::Empty::new())
    }

    fn wait_process(
        &self,
        _: &TtrpcContext,
        req: agent::WaitProcessRequest,
    ) -> Res<agent::WaitProcessResponse> {
        let info = self
            .manager
            .wait(&req.container_id, &req.exec_id)
            .map_err(|e| status(&e))?;
        let mut r = agent::WaitProcessResponse::new();
        r.exit_status = info.status;
        r.exited_at_unix_nanos = info
            .at
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
            .unwrap_or(0);
        Ok(r)
    }

    fn resize_pty(&self, _: &TtrpcContext, req: agent::ResizePtyRequest) -> Res<agent::Empty> {
        self.manager
            .resize(&req.container_id, &req.exec_id, req.rows, req.cols)
            .map_err(|e| status(&e))?;
        Ok(agent::Empty::new())
    }

    fn close_stdin(&self, _: &TtrpcContext, req: agent::CloseStdinRequest) -> Res<agent::Empty> {
        self.manager
            .close_stdin(&req.container_id, &req.exec_id, req.stdin_bytes)
            .map_err(|e| status(&e))?;
        Ok(agent::Empty::new())
    }

    fn stats(&self, _: &TtrpcContext, req: agent::ContainerRequest) -> Res<agent::StatsResponse> {
        let s = self
            .manager
            .stats(&req.container_id)
            .map_err(|e| status(&e))?;
        let mut r = agent::StatsResponse::new();
        r.memory_usage_bytes = s.memory_usage_bytes;
        r.memory_limit_bytes = s.memory_limit_bytes;
        r.cpu_usage_usec = s.cpu_usage_usec;
        r.cpu_user_usec = s.cpu_user_usec;
        r.cpu_system_usec = s.cpu_system_usec;
        r.pids_current = s.pids_current;
        r.pids_limit = s.pids_limit;
        r.io_read_bytes = s.io_read_bytes;
        r.io_write_bytes = s.io_write_bytes;
        r.oom_kills = s.oom_kills;
        Ok(r)
    }

    fn pause_container(&self, _: &TtrpcContext, req: agent::ContainerRequest) -> Res<agent::Empty> {
        self.manager
            .freeze(&req.container_id, true)
            .map_err(|e| status(&e))?;
        Ok(agent::Empty::new())
    }

    fn resume_container(
        &self,
        _: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> Res<agent::Empty> {
        self.manager
            .freeze(&req.container_id, false)
            .map_err(|e| status(&e))?;
        Ok(agent::Empty::new())
    }

    fn get_oom_event(&self, _: &TtrpcContext, _: agent::Empty) -> Res<agent::OomEvent> {
        let mut r = agent::OomEvent::new();
        r.container_id = self.manager.next_oom();
        Ok(r)
    }

    fn remove_container(
        &self,
        _: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> Res<agent::Empty> {
        self.manager
            .remove(&req.container_id)
            .map_err(|e| status(&e))?;
        Ok(agent::Empty::new())
    }

    fn shutdown(&self, _: &TtrpcContext, _: agent::ShutdownRequest) -> Res<agent::Empty> {
        // Everything worth keeping is made safe before the answer, so the host may stop the VM
        // as soon as it has it instead of waiting for the guest's own reboot.
        for id in self.manager.ids() {
            if let Err(e) = self.manager.remove(&id) {
                tracing::warn!(container_id = %id, error = %e, "remove at shutdown failed");
            }
        }
        nix::unistd::sync();
        let hook = self.shutdown.clone();
        let spawned = std::thread::Builder::new()
            .name("shutdown".into())
            .spawn(move || {
                // Let the reply leave before the guest goes away.
                std::thread::sleep(std::time::Duration::from_millis(100));
                hook();
            });
        if let Err(e) = spawned {
            return Err(ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::INTERNAL,
                format!("spawn the shutdown thread: {e}"),
            )));
        }
        Ok(agent::Empty::new())
    }
}
