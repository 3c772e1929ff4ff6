//! The containerd task service: one container per shim, its microVM embedded in this process.
//!
//! `Create` builds (or finds) the root image from the snapshot's layers, boots the VM through
//! [`Sandbox::boot`], and has the guest agent create the container with its stdio connected to
//! containerd's FIFOs or log URIs; the init process waits in the guest until `Start`. Every
//! process gets a waiter task that asks the agent for its exit status and, only after every byte
//! of its output reached the host destination, records the exit, publishes `/tasks/exit` and
//! answers `Wait`. `Delete` of the init process stops the VM; nothing of the container remains
//! afterwards but the guest console log in the bundle, which containerd removes with it.
//!
//! Errors map to ttrpc codes in [`ShimError`]'s one `From` impl; a process that cannot be run
//! keeps the agent's runc-style message (`exec: "x": executable file not found in $PATH`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::empty::Empty;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message, MessageDyn, MessageField};
use containerd_shim_protos::shim_async::Task;
use containerd_shim_protos::topics;
use containerd_shim_protos::ttrpc::{self, r#async::TtrpcContext};
use oci_spec::runtime::{LinuxResources, Spec};
use squib_runtime::agent_client::{
    AgentClient, AgentClientError, CreateContainer, ProcessIo, StdioConfig,
};
use squib_runtime::mounts::{RootMount, RootSource};
use squib_runtime::plan::{HostLimits, VmPlan};
use squib_runtime::rootfs::ImageCache;
use squib_runtime::sandbox::{KILL_ANSWER_WAIT, Sandbox, SandboxConfig};
use tokio::sync::{Mutex, watch};

use crate::closable::{ClosableReader, StdinCloser};
use crate::config::ShimConfig;
use crate::stdio::{StdioUris, open_stdio};

/// Name of the guest console log in the bundle.
pub const CONSOLE_LOG: &str = "console.log";
/// Name of the file in the bundle that lets `delete` clean up after a crashed shim.
pub const CLEANUP_FILE: &str = "squib-cleanup.json";
/// Directory of the VMs' hybrid vsock sockets (bundle paths are too long for a socket).
pub const SOCKET_DIR: &str = "/run/squib";
/// Exit status reported when the guest or the agent vanished under a process.
pub const LOST_EXIT_STATUS: u32 = 255;
/// How long `Delete` lets the guest power off before the VM is stopped regardless.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Time allowed beyond the agent deadline for the VM's own set-up.
const BOOT_SLACK: Duration = Duration::from_secs(15);
/// How long a failed create waits to learn whether the guest stopped under it.
const STOP_REPORT_WAIT: Duration = Duration::from_millis(500);
/// How long the init process may take to be reported dead after the agent took its SIGKILL
/// before the VM is powered off.
const KILL_EXIT_WAIT: Duration = Duration::from_secs(30);
/// Linux's SIGKILL.
const SIGKILL: u32 = 9;
/// Exit status of a process ended by SIGKILL (128 + 9), as runc reports it.
const KILLED_EXIT_STATUS: u32 = 137;

/// Logs the end of a guest's console: the log itself goes with the bundle.
fn log_console_tail(container_id: &str, console: &Path) {
    tracing::error!(
        container_id,
        console = %squib_runtime::sandbox::console_tail(console, 40),
        "the end of the guest console"
    );
}

/// A task request that failed, carrying the ttrpc code containerd maps to its error kinds.
#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    /// The request is malformed or names something squib cannot run.
    #[error("{0}")]
    InvalidArgument(String),
    /// The container or process does not exist (or is already gone).
    #[error("{0}")]
    NotFound(String),
    /// The request does not fit the current state (start twice, delete while running...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The id is taken.
    #[error("{0}")]
    AlreadyExists(String),
    /// squib does not offer this operation.
    #[error("{0}")]
    Unimplemented(String),
    /// The process could not be run; the message is runc's wording.
    #[error("{0}")]
    StartFailed(String),
    /// Anything else: the message carries the whole cause chain.
    #[error("{0}")]
    Internal(String),
}

impl ShimError {
    fn chain(context: &str, err: &dyn std::error::Error) -> String {
        let mut msg = format!("{context}: {err}");
        let mut source = err.source();
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        msg
    }

    fn internal(context: &str, err: &dyn std::error::Error) -> Self {
        Self::Internal(Self::chain(context, err))
    }

    fn from_agent(context: &str, err: AgentClientError) -> Self {
        match err {
            AgentClientError::StartFailed { message, .. } => Self::StartFailed(message),
            AgentClientError::Rpc { code, message, .. } => {
                let msg = format!("{context}: {message}");
                match code {
                    ttrpc::Code::NOT_FOUND => Self::NotFound(msg),
                    ttrpc::Code::INVALID_ARGUMENT => Self::InvalidArgument(msg),
                    ttrpc::Code::FAILED_PRECONDITION => Self::FailedPrecondition(msg),
                    ttrpc::Code::ALREADY_EXISTS => Self::AlreadyExists(msg),
                    ttrpc::Code::UNIMPLEMENTED => Self::Unimplemented(msg),
                    _ => Self::Internal(msg),
                }
            }
            other => Self::internal(context, &other),
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        let code = match &e {
            ShimError::InvalidArgument(_) => ttrpc::Code::INVALID_ARGUMENT,
            ShimError::NotFound(_) => ttrpc::Code::NOT_FOUND,
            ShimError::FailedPrecondition(_) => ttrpc::Code::FAILED_PRECONDITION,
            ShimError::AlreadyExists(_) => ttrpc::Code::ALREADY_EXISTS,
            ShimError::Unimplemented(_) => ttrpc::Code::UNIMPLEMENTED,
            ShimError::StartFailed(_) | ShimError::Internal(_) => ttrpc::Code::UNKNOWN,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

/// Where task events go.
#[async_trait]
pub trait EventSink: Send + Sync {
    /// Publishes `event` under `topic`; failures are logged, never returned.
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>);
}

/// Publishes to containerd through its ttrpc events service.
pub struct ContainerdEvents {
    publisher: RemotePublisher,
    namespace: String,
}

impl std::fmt::Debug for ContainerdEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContainerdEvents")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl ContainerdEvents {
    /// Wraps a connected publisher for `namespace`.
    pub fn new(publisher: RemotePublisher, namespace: &str) -> Self {
        Self {
            publisher,
            namespace: namespace.to_owned(),
        }
    }
}

#[async_trait]
impl EventSink for ContainerdEvents {
    async fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let ctx = ttrpc::context::Context::default();
        if let Err(e) = self
            .publisher
            .publish(ctx, topic, &self.namespace, event)
            .await
        {
            tracing::warn!(topic, error = %e, "publishing a task event failed");
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or 128 + signal.
    pub status: u32,
    /// When, as seen by the host.
    pub at: SystemTime,
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
        ..Default::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

/// One process of the container: the init (exec id "") or an exec'd one.
struct Process {
    exec_id: String,
    uris: StdioUris,
    terminal: bool,
    /// The exec's `process` JSON (empty for the init).
    spec_json: Vec<u8>,
    pid: std::sync::atomic::AtomicU32,
    phase: std::sync::Mutex<Phase>,
    exit_tx: watch::Sender<Option<Exit>>,
    stdin: std::sync::Mutex<Option<StdinCloser>>,
    /// Set when the VM was powered off to carry out a SIGKILL: the process's lost connection
    /// is then that SIGKILL, not a vanished guest.
    powered_off: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("exec_id", &self.exec_id)
            .field("pid", &self.pid())
            .finish_non_exhaustive()
    }
}

impl Process {
    fn new(exec_id: &str, uris: StdioUris, terminal: bool, spec_json: Vec<u8>) -> Self {
        Self {
            exec_id: exec_id.to_owned(),
            uris,
            terminal,
            spec_json,
            pid: std::sync::atomic::AtomicU32::new(0),
            phase: std::sync::Mutex::new(Phase::Created),
            exit_tx: watch::channel(None).0,
            stdin: std::sync::Mutex::new(None),
            powered_off: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn pid(&self) -> u32 {
        self.pid.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn phase(&self) -> Phase {
        self.phase.lock().map_or(Phase::Stopped, |p| *p)
    }

    fn set_phase(&self, phase: Phase) {
        if let Ok(mut p) = self.phase.lock() {
            *p = phase;
        }
    }

    fn exit(&self) -> Option<Exit> {
        *self.exit_tx.borrow()
    }

    async fn wait(&self) -> Exit {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(exit) = *rx.borrow_and_update() {
                return exit;
            }
            if rx.changed().await.is_err() {
                return Exit {
                    status: LOST_EXIT_STATUS,
                    at: SystemTime::now(),
                };
            }
        }
    }

    fn close_stdin(&self) {
        if let Some(c) = self.stdin.lock().ok().and_then(|mut s| s.take()) {
            c.close();
        }
    }
}

/// The VM, shared with the task that may have to power it off to carry out a SIGKILL.
type SharedSandbox = Arc<std::sync::Mutex<Option<Sandbox>>>;

/// Powers the VM off at once (no request to the agent), after marking `procs` as ended by
/// SIGKILL so that their waiters report 137 for the connections this drops.
async fn power_off(container_id: &str, sandbox: &SharedSandbox, procs: &[Arc<Process>], why: &str) {
    for p in procs {
        p.powered_off
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }
    let Some(sandbox) = sandbox.lock().ok().and_then(|mut s| s.take()) else {
        return;
    };
    tracing::warn!(
        container_id,
        why,
        "powering the microVM off to carry out a SIGKILL"
    );
    log_console_tail(container_id, sandbox.console_log());
    let _ = tokio::task::spawn_blocking(move || sandbox.power_off()).await;
}

/// The container this shim serves.
struct Container {
    id: String,
    bundle: PathBuf,
    agent: AgentClient,
    sandbox: SharedSandbox,
    vm_mem_mib: u64,
    vm_vcpus: u64,
    init: Arc<Process>,
    execs: HashMap<String, Arc<Process>>,
    paused: bool,
}

/// Files outside the bundle that a crashed shim leaves behind, for `delete` to remove.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CleanupRecord {
    /// The shim server's pid.
    pub shim_pid: u32,
    /// The VM's hybrid vsock socket.
    pub vsock_uds: PathBuf,
    /// The scratch mount point used while merging layers.
    pub scratch: PathBuf,
}

/// The task service.
pub struct TaskService {
    namespace: String,
    events: Arc<dyn EventSink>,
    exit: Arc<ExitSignal>,
    container: Mutex<Option<Container>>,
    /// Serializes `Create`; the container lock is not held while the VM boots, so `State`
    /// keeps answering (from `creating`) during a boot that takes seconds.
    create_lock: Mutex<()>,
    /// Id and bundle of a container being created.
    creating: std::sync::Mutex<Option<(String, String)>>,
    /// Set once the init process was deleted: the shim may then exit.
    deleted: std::sync::atomic::AtomicBool,
    /// Requests whose answer must go out before the shim exits (see [`TaskService::settled`]).
    in_flight: watch::Sender<usize>,
}

/// Counts a request in [`TaskService::in_flight`] while it lives.
struct InFlight<'a>(&'a watch::Sender<usize>);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a watch::Sender<usize>) -> Self {
        counter.send_modify(|n| *n += 1);
        Self(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl std::fmt::Debug for TaskService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskService")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

/// The hybrid vsock socket path of container `id` in `namespace`.
pub fn vsock_path(namespace: &str, id: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{namespace}/{id}").as_bytes());
    let hex: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    Path::new(SOCKET_DIR).join(format!("{hex}.vsock"))
}

/// Removes what the spec asks for that cannot exist in a VM without a shared file system:
/// bind mounts of host paths. Returns the destinations dropped.
///
/// # Limitations
///
/// Host directories and files (volumes, nerdctl's /etc/hosts) are not visible in the guest
/// until squib has virtio-fs; the container sees the image's own files at those paths.
pub fn drop_host_binds(spec: &mut Spec) -> Vec<String> {
    let mut dropped = Vec::new();
    if let Some(mounts) = spec.mounts().clone() {
        let kept: Vec<_> = mounts
            .into_iter()
            .filter(|m| {
                let bind = m.typ().as_deref() == Some("bind")
                    || m.options()
                        .as_ref()
                        .is_some_and(|o| o.iter().any(|o| o == "bind" || o == "rbind"));
                if bind {
                    dropped.push(m.destination().display().to_string());
                }
                !bind
            })
            .collect();
        spec.set_mounts(Some(kept));
    }
    dropped
}

/// Converts the agent's cgroup statistics into containerd's cgroup v2 metrics.
pub fn metrics_from_stats(
    s: &squib_agent_protocol::agent::StatsResponse,
) -> containerd_shim_protos::cgroups_v2::metrics::Metrics {
    use containerd_shim_protos::cgroups_v2::metrics::{
        CPUStat, IOEntry, IOStat, MemoryEvents, MemoryStat, Metrics, PidsStat,
    };
    let mut m = Metrics::new();
    m.pids = MessageField::some(PidsStat {
        current: s.pids_current,
        limit: s.pids_limit,
        ..Default::default()
    });
    m.cpu = MessageField::some(CPUStat {
        usage_usec: s.cpu_usage_usec,
        user_usec: s.cpu_user_usec,
        system_usec: s.cpu_system_usec,
        ..Default::default()
    });
    m.memory = MessageField::some(MemoryStat {
        usage: s.memory_usage_bytes,
        usage_limit: s.memory_limit_bytes,
        ..Default::default()
    });
    m.memory_events = MessageField::some(MemoryEvents {
        oom_kill: s.oom_kills,
        ..Default::default()
    });
    m.io = MessageField::some(IOStat {
        usage: vec![IOEntry {
            // The guest's root drive, /dev/vda.
            major: 254,
            minor: 0,
            rbytes: s.io_read_bytes,
            wbytes: s.io_write_bytes,
            ..Default::default()
        }],
        ..Default::default()
    });
    m
}

/// Checks a resource update against the VM's fixed size.
///
/// # Errors
///
/// [`ShimError::InvalidArgument`] naming the field that exceeds the VM.
pub fn check_update(res: &LinuxResources, vm_mem_mib: u64, vm_vcpus: u64) -> Result<(), ShimError> {
    if let Some(limit) = res.memory().as_ref().and_then(|m| m.limit())
        && limit > 0
        && limit.unsigned_abs().div_ceil(1 << 20) > vm_mem_mib
    {
        return Err(ShimError::InvalidArgument(format!(
            "linux.resources.memory.limit = {limit}: larger than the VM's {vm_mem_mib} MiB"
        )));
    }
    if let Some(cpu) = res.cpu().as_ref()
        && let (Some(q), Some(p)) = (cpu.quota(), cpu.period())
        && q > 0
        && p > 0
        && q.unsigned_abs().div_ceil(p) > vm_vcpus
    {
        return Err(ShimError::InvalidArgument(format!(
            "linux.resources.cpu.quota = {q} (period {p}): more than the VM's {vm_vcpus} vCPUs"
        )));
    }
    Ok(())
}

fn any_value(any: &MessageField<Any>) -> &[u8] {
    any.as_ref().map_or(&[][..], |a| a.value.as_slice())
}

impl TaskService {
    /// A service for `namespace` publishing to `events`; `exit` is signalled when the shim
    /// should stop serving.
    pub fn new(namespace: &str, events: Arc<dyn EventSink>, exit: Arc<ExitSignal>) -> Self {
        Self {
            namespace: namespace.to_owned(),
            events,
            exit,
            container: Mutex::new(None),
            create_lock: Mutex::new(()),
            creating: std::sync::Mutex::new(None),
            deleted: std::sync::atomic::AtomicBool::new(false),
            in_flight: watch::channel(0).0,
        }
    }

    async fn process(&self, exec_id: &str) -> Result<Arc<Process>, ShimError> {
        let guard = self.container.lock().await;
        let c = guard
            .as_ref()
            .ok_or_else(|| ShimError::NotFound("container does not exist".into()))?;
        if exec_id.is_empty() {
            return Ok(c.init.clone());
        }
        c.execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("process {exec_id} does not exist")))
    }

    async fn agent_and_id(&self) -> Result<(AgentClient, String), ShimError> {
        let guard = self.container.lock().await;
        let c = guard
            .as_ref()
            .ok_or_else(|| ShimError::NotFound("container does not exist".into()))?;
        Ok((c.agent.clone(), c.id.clone()))
    }

    async fn open_io(
        &self,
        id: &str,
        proc_: &Process,
    ) -> Result<(StdioConfig, Option<tokio::process::Child>), ShimError> {
        let opened = open_stdio(&proc_.uris, proc_.terminal, id, &self.namespace)
            .await
            .map_err(|e| ShimError::internal("opening the process's stdio", &e))?;
        let stdin = opened.stdin.map(|r| {
            let (reader, closer) = ClosableReader::new(r);
            if let Ok(mut s) = proc_.stdin.lock() {
                *s = Some(closer);
            }
            Box::new(reader) as Box<dyn tokio::io::AsyncRead + Send + Unpin>
        });
        Ok((
            StdioConfig {
                stdin,
                stdout: opened.stdout,
                stderr: opened.stderr,
                terminal: proc_.terminal,
            },
            opened.logger,
        ))
    }

    /// Waits for `proc_` in the guest, then records and publishes its exit.
    fn spawn_waiter(
        &self,
        container_id: String,
        agent: AgentClient,
        proc_: Arc<Process>,
        mut io: ProcessIo,
        logger: Option<tokio::process::Child>,
    ) {
        let events = self.events.clone();
        tokio::spawn(async move {
            let status = match io.wait(&agent).await {
                Ok(s) => u32::try_from(s).unwrap_or(LOST_EXIT_STATUS),
                Err(_) if proc_.powered_off.load(std::sync::atomic::Ordering::SeqCst) => {
                    KILLED_EXIT_STATUS
                }
                Err(e) => {
                    tracing::error!(
                        container_id = %container_id,
                        exec_id = %proc_.exec_id,
                        error = %ShimError::chain("waiting for the process", &e),
                        "process lost"
                    );
                    LOST_EXIT_STATUS
                }
            };
            if let Some(mut child) = logger {
                // The logging binary exits once both of its pipes reached end of file.
                let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
            }
            let exit = Exit {
                status,
                at: SystemTime::now(),
            };
            proc_.set_phase(Phase::Stopped);
            tracing::info!(
                container_id = %container_id,
                exec_id = %proc_.exec_id,
                status,
                "process exited"
            );
            let id = if proc_.exec_id.is_empty() {
                container_id.clone()
            } else {
                proc_.exec_id.clone()
            };
            let event = TaskExit {
                container_id,
                id,
                pid: proc_.pid(),
                exit_status: status,
                exited_at: MessageField::some(timestamp(exit.at)),
                ..Default::default()
            };
            events
                .publish(topics::TASK_EXIT_EVENT_TOPIC, Box::new(event))
                .await;
            proc_.exit_tx.send_replace(Some(exit));
        });
    }

    fn spawn_oom_watch(&self, container_id: String, agent: AgentClient) {
        let events = self.events.clone();
        tokio::spawn(async move {
            while let Ok(id) = agent.next_oom_event().await {
                tracing::warn!(container_id = %id, "container hit its memory limit");
                let event = TaskOOM {
                    container_id: if id.is_empty() {
                        container_id.clone()
                    } else {
                        id
                    },
                    ..Default::default()
                };
                events
                    .publish(topics::TASK_OOM_EVENT_TOPIC, Box::new(event))
                    .await;
            }
        });
    }

    async fn do_create(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(
                "restoring a container from a checkpoint is not supported by squib".into(),
            ));
        }
        let _creating = self.create_lock.lock().await;
        if self.container.lock().await.is_some() {
            return Err(ShimError::AlreadyExists(format!(
                "this shim already serves a container; cannot create {}",
                req.id
            )));
        }
        if let Ok(mut c) = self.creating.lock() {
            *c = Some((req.id.clone(), req.bundle.clone()));
        }
        let result = self.create_vm(req).await;
        if let Ok(mut c) = self.creating.lock() {
            *c = None;
        }
        result
    }

    async fn create_vm(&self, req: &api::CreateTaskRequest) -> Result<u32, ShimError> {
        let bundle = PathBuf::from(&req.bundle);
        let config = ShimConfig::for_task(req.options.as_ref())
            .map_err(|e| ShimError::InvalidArgument(ShimError::chain("runtime options", &e)))?;
        let mut spec = squib_runtime::plan::load_spec(&bundle)
            .map_err(|e| ShimError::InvalidArgument(ShimError::chain("bundle", &e)))?;
        // Resource limits squib cannot honour fail here, before any image is built or VM
        // booted.
        let host = HostLimits::probe();
        squib_runtime::plan::sizing(&spec, &config.sizing, &host)
            .map_err(|e| ShimError::InvalidArgument(ShimError::chain("resources", &e)))?;
        let dropped = drop_host_binds(&mut spec);
        if !dropped.is_empty() {
            tracing::warn!(
                container_id = %req.id,
                mounts = ?dropped,
                "host bind mounts are not visible in the VM; dropped"
            );
        }
        let spec_json = serde_json::to_vec(&squib_runtime::plan::guest_spec(&spec))
            .map_err(|e| ShimError::internal("serializing the spec", &e))?;

        // The root image: built from the snapshot's immutable layers, cached by them.
        let mounts: Vec<RootMount> = req
            .rootfs
            .iter()
            .map(|m| RootMount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let source = RootSource::from_mounts(&mounts, &bundle.join("rootfs"))
            .map_err(|e| ShimError::InvalidArgument(ShimError::chain("rootfs", &e)))?;
        let vsock_uds = vsock_path(&self.namespace, &req.id);
        let scratch = bundle.join("squib-layers");
        let record = CleanupRecord {
            shim_pid: std::process::id(),
            vsock_uds: vsock_uds.clone(),
            scratch: scratch.clone(),
        };
        if let Ok(text) = serde_json::to_vec(&record) {
            let _ = std::fs::write(bundle.join(CLEANUP_FILE), text);
        }
        let (format, cache_dir, cache_max) = (
            config.image_format,
            config.rootfs_cache.clone(),
            config.rootfs_cache_max_bytes,
        );
        let image = tokio::task::spawn_blocking(move || {
            let cache = ImageCache::open(cache_dir, cache_max)?;
            squib_runtime::mounts::build_root_image(&source, &cache, format, &scratch)
        })
        .await
        .map_err(|e| ShimError::internal("building the root image", &e))?
        .map_err(|e| ShimError::internal("building the root image", &e))?;
        tracing::info!(
            container_id = %req.id,
            image = %image.path.display(),
            cached = image.hit,
            "root image ready"
        );

        std::fs::create_dir_all(SOCKET_DIR)
            .map_err(|e| ShimError::internal(&format!("creating {SOCKET_DIR}"), &e))?;
        let _ = std::fs::remove_file(&vsock_uds);
        let plan = VmPlan::new(
            &spec,
            &config.sizing,
            &host,
            &config.assets,
            &image.path,
            &vsock_uds,
            &config.boot_args,
        )
        .map_err(|e| ShimError::InvalidArgument(ShimError::chain("planning the VM", &e)))?;
        let (vm_vcpus, vm_mem_mib) = (
            u64::from(plan.machine.vcpu_count()),
            plan.machine.mem_size_mib(),
        );
        let console = bundle.join(CONSOLE_LOG);
        let boot = Sandbox::boot(SandboxConfig {
            id: req.id.clone(),
            plan,
            console_log: console.clone(),
            agent_deadline: config.agent_timeout,
        });
        // A bound on the whole boot, in case a stopped guest leaves a vsock handshake hanging;
        // dropping the boot future stops the VM.
        let mut sandbox = tokio::time::timeout(config.agent_timeout + BOOT_SLACK, boot)
            .await
            .map_err(|_| {
                log_console_tail(&req.id, &console);
                ShimError::Internal(format!(
                    "booting the microVM: the guest agent did not answer within {} s; console log: {}",
                    config.agent_timeout.as_secs(),
                    console.display()
                ))
            })?
            .map_err(|e| {
                log_console_tail(&req.id, &console);
                ShimError::internal("booting the microVM", &e)
            })?;
        let agent = sandbox.agent().clone();

        let init = Arc::new(Process::new(
            "",
            StdioUris {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
            },
            req.terminal,
            Vec::new(),
        ));
        let created = async {
            let (io, logger) = self.open_io(&req.id, &init).await?;
            let create = CreateContainer {
                container_id: req.id.clone(),
                oci_spec_json: spec_json,
                rootfs_source: "/dev/vda".into(),
                rootfs_fstype: image.format.name().into(),
            };
            let (pid, pio) = agent
                .create_container(&create, io)
                .await
                .map_err(|e| ShimError::from_agent("creating the container", e))?;
            Ok::<_, ShimError>((pid, pio, logger))
        }
        .await;
        let (pid, pio, logger) = match created {
            Ok(v) => v,
            Err(e) => {
                // A lost connection usually means the guest died under the request: say how.
                let died = sandbox.stopped_within(STOP_REPORT_WAIT).await;
                let e = match died {
                    Some(reason) => {
                        log_console_tail(&req.id, &console);
                        ShimError::Internal(format!(
                            "{e} (the microVM stopped: {reason:?}; the shim's log has the end of \
                             its console)"
                        ))
                    }
                    None => {
                        // Not a refusal from the agent but a lost or silent guest: the console
                        // may say why.
                        if matches!(e, ShimError::Internal(_)) {
                            log_console_tail(&req.id, &console);
                        }
                        e
                    }
                };
                sandbox.shutdown(SHUTDOWN_GRACE).await;
                let _ = std::fs::remove_file(bundle.join(CLEANUP_FILE));
                return Err(e);
            }
        };
        init.pid.store(pid, std::sync::atomic::Ordering::SeqCst);
        self.spawn_waiter(req.id.clone(), agent.clone(), init.clone(), pio, logger);
        self.spawn_oom_watch(req.id.clone(), agent.clone());
        *self.container.lock().await = Some(Container {
            id: req.id.clone(),
            bundle,
            agent,
            sandbox: Arc::new(std::sync::Mutex::new(Some(sandbox))),
            vm_mem_mib,
            vm_vcpus,
            init,
            execs: HashMap::new(),
            paused: false,
        });
        tracing::info!(container_id = %req.id, pid, "container created");
        let event = TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            io: MessageField::some(TaskIO {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
                ..Default::default()
            }),
            pid,
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_CREATE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(pid)
    }

    async fn do_start(&self, exec_id: &str) -> Result<u32, ShimError> {
        let proc_ = self.process(exec_id).await?;
        let (agent, id) = self.agent_and_id().await?;
        match proc_.phase() {
            Phase::Created if proc_.exit().is_none() => {}
            Phase::Running => {
                return Err(ShimError::FailedPrecondition(
                    "cannot start an already running container".into(),
                ));
            }
            _ => {
                return Err(ShimError::FailedPrecondition(
                    "cannot start a container that has stopped".into(),
                ));
            }
        }
        if exec_id.is_empty() {
            agent
                .start_container(&id)
                .await
                .map_err(|e| ShimError::from_agent("starting the container", e))?;
            proc_.set_phase(Phase::Running);
            let pid = proc_.pid();
            tracing::info!(container_id = %id, pid, "container started");
            let event = TaskStart {
                container_id: id,
                pid,
                ..Default::default()
            };
            self.events
                .publish(topics::TASK_START_EVENT_TOPIC, Box::new(event))
                .await;
            return Ok(pid);
        }
        let (io, logger) = self.open_io(exec_id, &proc_).await?;
        let (pid, pio) = match agent.exec_process(&id, exec_id, &proc_.spec_json, io).await {
            Ok(v) => v,
            Err(e) => {
                // The exec never ran: it is stopped, with the shell's status for the failure.
                let status = e.start_exit_status().unwrap_or(1);
                proc_.set_phase(Phase::Stopped);
                proc_.exit_tx.send_replace(Some(Exit {
                    status: u32::try_from(status).unwrap_or(1),
                    at: SystemTime::now(),
                }));
                return Err(ShimError::from_agent("exec", e));
            }
        };
        proc_.pid.store(pid, std::sync::atomic::Ordering::SeqCst);
        proc_.set_phase(Phase::Running);
        self.spawn_waiter(id.clone(), agent, proc_.clone(), pio, logger);
        let event = TaskExecStarted {
            container_id: id,
            exec_id: exec_id.to_owned(),
            pid,
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_EXEC_STARTED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(pid)
    }

    async fn do_delete(&self, exec_id: &str) -> Result<(u32, Exit), ShimError> {
        if !exec_id.is_empty() {
            let mut guard = self.container.lock().await;
            let c = guard
                .as_mut()
                .ok_or_else(|| ShimError::NotFound("container does not exist".into()))?;
            let p =
                c.execs.get(exec_id).cloned().ok_or_else(|| {
                    ShimError::NotFound(format!("process {exec_id} does not exist"))
                })?;
            let exit = match (p.phase(), p.exit()) {
                (Phase::Running, _) => {
                    return Err(ShimError::FailedPrecondition(format!(
                        "cannot delete process {exec_id}: it is running"
                    )));
                }
                (_, Some(exit)) => exit,
                (_, None) => Exit {
                    status: 0,
                    at: SystemTime::now(),
                },
            };
            c.execs.remove(exec_id);
            return Ok((p.pid(), exit));
        }

        let init = self.process("").await?;
        if init.phase() == Phase::Running && init.exit().is_none() {
            let id = self.agent_and_id().await?.1;
            return Err(ShimError::FailedPrecondition(format!(
                "cannot delete container {id} that is not stopped: running"
            )));
        }
        let Some(c) = self.container.lock().await.take() else {
            return Err(ShimError::NotFound("container does not exist".into()));
        };
        if init.exit().is_none() {
            // Created but never started: end the waiting init first.
            let _ = c.agent.signal_process(&c.id, "", 9, false).await;
        }
        let exit = match tokio::time::timeout(SHUTDOWN_GRACE, init.wait()).await {
            Ok(exit) => exit,
            Err(_) => Exit {
                status: 137,
                at: SystemTime::now(),
            },
        };
        if let Err(e) = c.agent.remove_container(&c.id).await {
            tracing::debug!(container_id = %c.id, error = %e, "agent remove failed");
        }
        let sandbox = c.sandbox.lock().ok().and_then(|mut s| s.take());
        if let Some(sandbox) = sandbox {
            sandbox.shutdown(SHUTDOWN_GRACE).await;
        }
        let _ = std::fs::remove_file(c.bundle.join(CLEANUP_FILE));
        self.deleted
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tracing::info!(container_id = %c.id, status = exit.status, "container deleted");
        let event = TaskDelete {
            container_id: c.id.clone(),
            pid: init.pid(),
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            id: c.id.clone(),
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_DELETE_EVENT_TOPIC, Box::new(event))
            .await;
        Ok((init.pid(), exit))
    }

    /// SIGKILL of the init process: it ends the container whatever the guest does. The agent
    /// gets the signal first, so output written before it still arrives; a guest that does not
    /// take it within [`KILL_ANSWER_WAIT`] (hung, or its agent starved), or does not report the
    /// exit within [`KILL_EXIT_WAIT`] after taking it, is powered off, and every process of the
    /// container is reported as ended by SIGKILL (137).
    async fn kill_init(&self, all: bool) -> Result<Empty, ShimError> {
        let (agent, id, sandbox, procs) = {
            let guard = self.container.lock().await;
            let c = guard
                .as_ref()
                .ok_or_else(|| ShimError::NotFound("container does not exist".into()))?;
            let procs: Vec<Arc<Process>> = std::iter::once(&c.init)
                .chain(c.execs.values())
                .cloned()
                .collect();
            (c.agent.clone(), c.id.clone(), c.sandbox.clone(), procs)
        };
        let answer = tokio::time::timeout(
            KILL_ANSWER_WAIT,
            agent.signal_process(&id, "", SIGKILL, all),
        )
        .await;
        match answer {
            Ok(Ok(())) => {
                let init = procs.first().cloned();
                tokio::spawn(async move {
                    let Some(init) = init else { return };
                    if tokio::time::timeout(KILL_EXIT_WAIT, init.wait())
                        .await
                        .is_err()
                    {
                        let why = "the guest took the SIGKILL but did not report the exit";
                        power_off(&id, &sandbox, &procs, why).await;
                    }
                });
            }
            // The agent answered: the process is unknown or already gone.
            Ok(Err(e @ (AgentClientError::Rpc { .. } | AgentClientError::StartFailed { .. }))) => {
                return Err(ShimError::from_agent("signalling the process", e));
            }
            Ok(Err(e)) => {
                let why = ShimError::chain("the guest agent did not take the SIGKILL", &e);
                tokio::spawn(async move { power_off(&id, &sandbox, &procs, &why).await });
            }
            Err(_) => {
                let why = format!(
                    "the guest agent did not answer the SIGKILL within {} s",
                    KILL_ANSWER_WAIT.as_secs()
                );
                tokio::spawn(async move { power_off(&id, &sandbox, &procs, &why).await });
            }
        }
        // The VM is powered off after this answer is on its way, as runc's kill returns before
        // the process is reaped.
        Ok(Empty::new())
    }

    /// Waits up to `limit` for the requests counted in `in_flight` to be answered. A `Kill` can
    /// outlive its container: the exit it causes lets `ctr run --rm` delete the task and have the
    /// shim shut down while the `Kill` itself has not been answered yet, and the caller would
    /// then see its connection closed instead of the answer.
    pub async fn settled(&self, limit: Duration) {
        let mut rx = self.in_flight.subscribe();
        if *rx.borrow() == 0 {
            return;
        }
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
        // The answer is queued once the handler returns; give the connection a moment to send it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Stops the VM if one still runs (the shim is exiting without a delete).
    pub async fn release(&self) {
        if let Some(c) = self.container.lock().await.take()
            && let Some(sandbox) = c.sandbox.lock().ok().and_then(|mut s| s.take())
        {
            sandbox.shutdown(Duration::from_secs(2)).await;
            let _ = std::fs::remove_file(c.bundle.join(CLEANUP_FILE));
        }
    }

    fn state_response(&self, c: &Container, p: &Process) -> api::StateResponse {
        let status = match (p.phase(), p.exit()) {
            (_, Some(_)) | (Phase::Stopped, _) => api::Status::STOPPED,
            (Phase::Running, None) if c.paused => api::Status::PAUSED,
            (Phase::Running, None) => api::Status::RUNNING,
            (Phase::Created, None) => api::Status::CREATED,
        };
        let exit = p.exit();
        api::StateResponse {
            id: if p.exec_id.is_empty() {
                c.id.clone()
            } else {
                p.exec_id.clone()
            },
            bundle: c.bundle.display().to_string(),
            pid: p.pid(),
            status: EnumOrUnknown::new(status),
            stdin: p.uris.stdin.clone(),
            stdout: p.uris.stdout.clone(),
            stderr: p.uris.stderr.clone(),
            terminal: p.terminal,
            exit_status: exit.map_or(0, |e| e.status),
            exited_at: exit.map_or(MessageField::none(), |e| {
                MessageField::some(timestamp(e.at))
            }),
            exec_id: p.exec_id.clone(),
            ..Default::default()
        }
    }
}

#[async_trait]
impl Task for TaskService {
    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        if req.exec_id.is_empty()
            && let Some((id, bundle)) = self.creating.lock().ok().and_then(|c| c.clone())
        {
            return Ok(api::StateResponse {
                id,
                bundle,
                status: EnumOrUnknown::new(api::Status::CREATED),
                ..Default::default()
            });
        }
        let p = self.process(&req.exec_id).await?;
        let guard = self.container.lock().await;
        let c = guard
            .as_ref()
            .ok_or_else(|| ShimError::NotFound("container does not exist".into()))?;
        Ok(self.state_response(c, &p))
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        match self.do_create(&req).await {
            Ok(pid) => Ok(api::CreateTaskResponse {
                pid,
                ..Default::default()
            }),
            Err(e) => {
                tracing::error!(container_id = %req.id, error = %e, "create failed");
                Err(e.into())
            }
        }
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        match self.do_start(&req.exec_id).await {
            Ok(pid) => Ok(api::StartResponse {
                pid,
                ..Default::default()
            }),
            Err(e) => {
                tracing::error!(container_id = %req.id, exec_id = %req.exec_id, error = %e, "start failed");
                Err(e.into())
            }
        }
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        let (pid, exit) = self.do_delete(&req.exec_id).await?;
        Ok(api::DeleteResponse {
            pid,
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        _req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        let guard = self.container.lock().await;
        let c = guard
            .as_ref()
            .ok_or_else(|| ShimError::NotFound("container does not exist".into()))?;
        let mut processes = Vec::new();
        for p in std::iter::once(&c.init).chain(c.execs.values()) {
            if p.exit().is_none() && p.pid() != 0 {
                processes.push(api::ProcessInfo {
                    pid: p.pid(),
                    ..Default::default()
                });
            }
        }
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, _req: api::PauseRequest) -> ttrpc::Result<Empty> {
        let (agent, id) = self.agent_and_id().await?;
        agent
            .pause_container(&id)
            .await
            .map_err(|e| ShimError::from_agent("pausing the container", e))?;
        if let Some(c) = self.container.lock().await.as_mut() {
            c.paused = true;
        }
        let event = TaskPaused {
            container_id: id,
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_PAUSED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, _req: api::ResumeRequest) -> ttrpc::Result<Empty> {
        let (agent, id) = self.agent_and_id().await?;
        agent
            .resume_container(&id)
            .await
            .map_err(|e| ShimError::from_agent("resuming the container", e))?;
        if let Some(c) = self.container.lock().await.as_mut() {
            c.paused = false;
        }
        let event = TaskResumed {
            container_id: id,
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_RESUMED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(ShimError::Unimplemented("checkpoint is not supported by squib".into()).into())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        let _in_flight = InFlight::enter(&self.in_flight);
        let p = self.process(&req.exec_id).await?;
        if p.exit().is_some() {
            if req.all {
                return Ok(Empty::new());
            }
            return Err(ShimError::NotFound("process already finished".into()).into());
        }
        if req.signal == SIGKILL && req.exec_id.is_empty() {
            return self.kill_init(req.all).await.map_err(Into::into);
        }
        let (agent, id) = self.agent_and_id().await?;
        agent
            .signal_process(&id, &req.exec_id, req.signal, req.all)
            .await
            .map_err(|e| ShimError::from_agent("signalling the process", e))?;
        Ok(Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        if req.exec_id.is_empty() {
            return Err(ShimError::InvalidArgument("exec id must not be empty".into()).into());
        }
        let spec_json = any_value(&req.spec).to_vec();
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec_json)
            .map_err(|e| ShimError::InvalidArgument(ShimError::chain("exec process spec", &e)))?;
        let id = {
            let mut guard = self.container.lock().await;
            let c = guard
                .as_mut()
                .ok_or_else(|| ShimError::NotFound("container does not exist".into()))?;
            if c.init.exit().is_some() {
                return Err(ShimError::FailedPrecondition(
                    "cannot exec in a stopped container".into(),
                )
                .into());
            }
            if c.execs.contains_key(&req.exec_id) {
                return Err(ShimError::AlreadyExists(format!(
                    "process {} already exists",
                    req.exec_id
                ))
                .into());
            }
            let p = Process::new(
                &req.exec_id,
                StdioUris {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                },
                req.terminal,
                spec_json,
            );
            c.execs.insert(req.exec_id.clone(), Arc::new(p));
            c.id.clone()
        };
        let event = TaskExecAdded {
            container_id: id,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        self.events
            .publish(topics::TASK_EXEC_ADDED_EVENT_TOPIC, Box::new(event))
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        let p = self.process(&req.exec_id).await?;
        if !p.terminal {
            return Ok(Empty::new());
        }
        let (agent, id) = self.agent_and_id().await?;
        agent
            .resize_pty(&id, &req.exec_id, req.height, req.width)
            .await
            .map_err(|e| ShimError::from_agent("resizing the terminal", e))?;
        Ok(Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> ttrpc::Result<Empty> {
        let p = self.process(&req.exec_id).await?;
        if req.stdin {
            p.close_stdin();
        }
        Ok(Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> ttrpc::Result<Empty> {
        let res: LinuxResources = serde_json::from_slice(any_value(&req.resources))
            .map_err(|e| ShimError::InvalidArgument(ShimError::chain("resources", &e)))?;
        let (mem, vcpus) = {
            let guard = self.container.lock().await;
            let c = guard
                .as_ref()
                .ok_or_else(|| ShimError::NotFound("container does not exist".into()))?;
            (c.vm_mem_mib, c.vm_vcpus)
        };
        check_update(&res, mem, vcpus)?;
        // Known limitation: the guest agent has no call to change a running container's
        // cgroup yet, so an update that fits the VM is refused rather than ignored.
        Err(ShimError::Unimplemented(
            "updating the resources of a running container is not supported by squib yet".into(),
        )
        .into())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        let p = self.process(&req.exec_id).await?;
        let exit = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        _req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        let (agent, id) = self.agent_and_id().await?;
        let s = agent
            .stats(&id)
            .await
            .map_err(|e| ShimError::from_agent("reading statistics", e))?;
        let metrics = metrics_from_stats(&s);
        let value = metrics
            .write_to_bytes()
            .map_err(|e| ShimError::internal("encoding metrics", &e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(Any {
                type_url: "io.containerd.cgroups.v2.Metrics".into(),
                value,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        let task_pid = match self.container.lock().await.as_ref() {
            Some(c) => c.init.pid(),
            None => 0,
        };
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        req: api::ShutdownRequest,
    ) -> ttrpc::Result<Empty> {
        let idle = self.container.lock().await.is_none();
        if req.now || idle || self.deleted.load(std::sync::atomic::Ordering::SeqCst) {
            self.exit.signal();
        }
        Ok(Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[derive(Default)]
    struct Recorder(StdMutex<Vec<String>>);

    #[async_trait]
    impl EventSink for Recorder {
        async fn publish(&self, topic: &str, _event: Box<dyn MessageDyn>) {
            self.0.lock().unwrap().push(topic.to_owned());
        }
    }

    fn service() -> (TaskService, Arc<Recorder>, Arc<ExitSignal>) {
        let rec = Arc::new(Recorder::default());
        let exit = Arc::new(ExitSignal::default());
        (
            TaskService::new("default", rec.clone(), exit.clone()),
            rec,
            exit,
        )
    }

    fn ctx() -> TtrpcContext {
        TtrpcContext {
            mh: Default::default(),
            metadata: Default::default(),
            timeout_nano: 0,
            connection_data: Default::default(),
        }
    }

    fn code(e: ttrpc::Error) -> ttrpc::Code {
        match e {
            ttrpc::Error::RpcStatus(s) => s.code(),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[tokio::test]
    async fn test_service_answers_not_found_without_a_container() {
        let (s, _, _) = service();
        let e = s
            .state(&ctx(), api::StateRequest::default())
            .await
            .unwrap_err();
        assert_eq!(code(e), ttrpc::Code::NOT_FOUND);
        let e = s
            .kill(&ctx(), api::KillRequest::default())
            .await
            .unwrap_err();
        assert_eq!(code(e), ttrpc::Code::NOT_FOUND);
        let e = s
            .wait(&ctx(), api::WaitRequest::default())
            .await
            .unwrap_err();
        assert_eq!(code(e), ttrpc::Code::NOT_FOUND);
    }

    #[tokio::test]
    async fn test_checkpoint_is_refused_as_unimplemented() {
        let (s, _, _) = service();
        let e = s
            .checkpoint(&ctx(), api::CheckpointTaskRequest::default())
            .await
            .unwrap_err();
        match e {
            ttrpc::Error::RpcStatus(st) => {
                assert_eq!(st.code(), ttrpc::Code::UNIMPLEMENTED);
                assert!(st.message.contains("not supported"), "{}", st.message);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn test_create_fails_cleanly_on_a_bad_bundle() {
        let (s, rec, _) = service();
        let dir = std::env::temp_dir().join(format!("squib-shim-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), b"{not json").unwrap();
        let req = api::CreateTaskRequest {
            id: "bad".into(),
            bundle: dir.display().to_string(),
            ..Default::default()
        };
        let e = s.create(&ctx(), req).await.unwrap_err();
        assert_eq!(code(e), ttrpc::Code::INVALID_ARGUMENT);
        assert!(rec.0.lock().unwrap().is_empty());
        assert!(!dir.join(CLEANUP_FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn test_create_refuses_checkpoint_restore() {
        let (s, _, _) = service();
        let req = api::CreateTaskRequest {
            id: "c".into(),
            checkpoint: "/x".into(),
            ..Default::default()
        };
        let e = s.create(&ctx(), req).await.unwrap_err();
        assert_eq!(code(e), ttrpc::Code::UNIMPLEMENTED);
    }

    #[tokio::test]
    async fn test_shutdown_exits_when_idle() {
        let (s, _, exit) = service();
        s.shutdown(&ctx(), api::ShutdownRequest::default())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(1), exit.wait())
            .await
            .unwrap();
    }

    #[test]
    fn test_start_failure_keeps_runc_wording() {
        let e = ShimError::from_agent(
            "creating the container",
            AgentClientError::StartFailed {
                exit_status: 127,
                message: r#"exec: "nonexistent": executable file not found in $PATH"#.into(),
            },
        );
        let t: ttrpc::Error = e.into();
        match t {
            ttrpc::Error::RpcStatus(st) => {
                assert_eq!(
                    st.message,
                    r#"exec: "nonexistent": executable file not found in $PATH"#
                );
            }
            other => panic!("{other:?}"),
        }
        let e = ShimError::from_agent(
            "signal",
            AgentClientError::Rpc {
                op: "signal process",
                code: ttrpc::Code::NOT_FOUND,
                message: "gone".into(),
            },
        );
        assert!(matches!(e, ShimError::NotFound(_)));
    }

    #[test]
    fn test_drop_host_binds_keeps_guest_mounts() {
        let mut spec: Spec = serde_json::from_value(serde_json::json!({
            "ociVersion": "1.0.2",
            "root": {"path": "rootfs"},
            "process": {"user": {"uid": 0, "gid": 0}, "args": ["sh"], "cwd": "/"},
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/etc/hosts", "type": "bind", "source": "/var/x/hosts",
                 "options": ["rbind", "ro"]},
                {"destination": "/data", "source": "/srv/data", "options": ["bind"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}
            ]
        }))
        .unwrap();
        let dropped = drop_host_binds(&mut spec);
        assert_eq!(dropped, vec!["/etc/hosts".to_string(), "/data".to_string()]);
        let left: Vec<_> = spec
            .mounts()
            .as_ref()
            .unwrap()
            .iter()
            .map(|m| m.destination().display().to_string())
            .collect();
        assert_eq!(left, vec!["/proc", "/tmp"]);
    }

    #[test]
    fn test_metrics_carry_the_agent_statistics() {
        let s = squib_agent_protocol::agent::StatsResponse {
            memory_usage_bytes: 10,
            memory_limit_bytes: 20,
            cpu_usage_usec: 30,
            pids_current: 2,
            oom_kills: 1,
            io_read_bytes: 5,
            ..Default::default()
        };
        let m = metrics_from_stats(&s);
        assert_eq!(m.memory.usage, 10);
        assert_eq!(m.memory.usage_limit, 20);
        assert_eq!(m.cpu.usage_usec, 30);
        assert_eq!(m.pids.current, 2);
        assert_eq!(m.memory_events.oom_kill, 1);
        assert_eq!(m.io.usage[0].rbytes, 5);
    }

    #[test]
    fn test_check_update_names_the_field_beyond_the_vm() {
        let res: LinuxResources =
            serde_json::from_value(serde_json::json!({"memory": {"limit": 1073741824i64}}))
                .unwrap();
        let err = check_update(&res, 512, 1).unwrap_err().to_string();
        assert!(err.contains("memory.limit") && err.contains("512"), "{err}");
        let res: LinuxResources =
            serde_json::from_value(serde_json::json!({"cpu": {"quota": 300000, "period": 100000}}))
                .unwrap();
        let err = check_update(&res, 512, 2).unwrap_err().to_string();
        assert!(err.contains("cpu.quota"), "{err}");
        let res: LinuxResources =
            serde_json::from_value(serde_json::json!({"memory": {"limit": 104857600}})).unwrap();
        assert!(check_update(&res, 512, 1).is_ok());
    }

    #[test]
    fn test_vsock_path_is_short_and_distinct() {
        let a = vsock_path("default", &"x".repeat(76));
        let b = vsock_path("k8s.io", &"x".repeat(76));
        assert_ne!(a, b);
        assert!(a.as_os_str().len() < 100);
    }
}
