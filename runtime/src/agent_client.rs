//! Host side of the guest agent protocol: a typed ttrpc client plus the standard-stream
//! plumbing.
//!
//! The agent listens on vsock port 1024 (control, ttrpc) and 1025 (streams). With a hybrid
//! vsock device the host reaches a guest port by connecting to the VM's Unix socket and
//! writing `CONNECT <port>\n`; the device answers `OK <host port>\n`. Every stream (stdin,
//! stdout, stderr, or one terminal connection) is its own connection to port 1025 that starts
//! with `SQUIB-STREAM <id>\n`; the host dials them *before* sending the create/exec request
//! that names them, so the guest never starts a process whose output has no reader, and no
//! socket files appear on the host.
//!
//! End of file is exact in both directions: the agent answers `WaitProcess` only after the
//! process's output reached end of file and was handed to the connection, and
//! [`ProcessIo::wait`] additionally waits until this side has copied every byte to its
//! destination, so the exit status is never reported before the last byte of output.
//! Closing stdin goes through [`ProcessIo::close_stdin`], which tells the agent how many bytes
//! were sent so the close cannot overtake data in flight.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use squib_agent_protocol::agent::{self, ProcessStartFailure};
use squib_agent_protocol::asynchronous::agent_ttrpc::AgentClient as RawClient;
use squib_agent_protocol::protobuf::{Message, MessageField};
use squib_agent_protocol::ttrpc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, oneshot};
use tokio::task::JoinHandle;

/// Timeout of ordinary control calls.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Timeout of create, start and exec (mounting and namespace setup happen there).
pub const DEFAULT_SETUP_TIMEOUT: Duration = Duration::from_secs(120);

/// Failures talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentClientError {
    /// The Unix socket could not be reached.
    #[error("connect to {}", path.display())]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hybrid vsock device refused or garbled the `CONNECT` handshake.
    #[error("vsock handshake for port {port} via {}: got {reply:?}", path.display())]
    Handshake {
        /// Socket path.
        path: PathBuf,
        /// Guest port.
        port: u32,
        /// What came back (empty when the connection closed).
        reply: String,
    },
    /// Writing the stream header failed.
    #[error("open stream {id:?}")]
    OpenStream {
        /// Stream id.
        id: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An operation did not finish in time.
    #[error("{op} timed out after {}s", after.as_secs())]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The agent answered with an error status.
    #[error("agent {op} failed ({code:?}): {message}")]
    Rpc {
        /// The call.
        op: &'static str,
        /// ttrpc status code.
        code: ttrpc::Code,
        /// The agent's message.
        message: String,
    },
    /// The process could not be run (missing binary, not executable, bad cwd ...).
    #[error("{message}")]
    StartFailed {
        /// 127 (not found), 126 (not executable) or 1.
        exit_status: i32,
        /// runc-style message, e.g. `exec: "x": executable file not found in $PATH`.
        message: String,
    },
    /// The ttrpc transport failed (connection lost, bad frame).
    #[error("agent {op}: transport error: {message}")]
    Transport {
        /// The call.
        op: &'static str,
        /// ttrpc's description.
        message: String,
    },
    /// A stream id could not be formed.
    #[error("invalid stream id")]
    StreamId(#[from] squib_agent_protocol::StreamIdError),
    /// Copying a stream on the host failed.
    #[error("copy {stream}")]
    Copy {
        /// Which stream.
        stream: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl AgentClientError {
    /// The exit status an engine should report when this error means "could not run the
    /// process": 127 or 126 (or 1 for other setup failures); `None` for other errors.
    pub fn start_exit_status(&self) -> Option<i32> {
        match self {
            Self::StartFailed { exit_status, .. } => Some(*exit_status),
            _ => None,
        }
    }
}

/// A connected byte stream to a guest port, whatever the transport.
pub trait GuestStream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> GuestStream for T {}

type BoxStream = Box<dyn GuestStream>;

/// How to reach the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// Kernel vsock (for example QEMU's vhost-vsock device): the guest's context id.
    #[cfg(target_os = "linux")]
    Vsock {
        /// Guest CID.
        cid: u32,
    },
    /// The VM's hybrid vsock Unix socket (`CONNECT <port>` handshake).
    HybridVsock {
        /// The socket the VMM serves.
        uds_path: PathBuf,
    },
    /// Plain Unix sockets served by `squib-agent serve` (host tests).
    Unix {
        /// Control socket.
        control: PathBuf,
        /// Stream socket.
        streams: PathBuf,
    },
}

impl AgentEndpoint {
    async fn dial(&self, port: u32) -> Result<BoxStream, AgentClientError> {
        match self {
            #[cfg(target_os = "linux")]
            Self::Vsock { cid } => {
                let s = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, port))
                    .await
                    .map_err(|source| AgentClientError::Connect {
                        path: PathBuf::from(format!("vsock://{cid}:{port}")),
                        source,
                    })?;
                Ok(Box::new(s))
            }
            Self::HybridVsock { uds_path } => Ok(Box::new(hybrid_connect(uds_path, port).await?)),
            Self::Unix { control, streams } => {
                let path = if port == squib_agent_protocol::CONTROL_PORT {
                    control
                } else {
                    streams
                };
                let s = UnixStream::connect(path).await.map_err(|source| {
                    AgentClientError::Connect {
                        path: path.clone(),
                        source,
                    }
                })?;
                Ok(Box::new(s))
            }
        }
    }
}

/// Connects to guest `port` through a hybrid vsock socket.
///
/// # Errors
///
/// [`AgentClientError::Connect`] or [`AgentClientError::Handshake`].
pub async fn hybrid_connect(uds_path: &Path, port: u32) -> Result<UnixStream, AgentClientError> {
    let mut s =
        UnixStream::connect(uds_path)
            .await
            .map_err(|source| AgentClientError::Connect {
                path: uds_path.to_owned(),
                source,
            })?;
    let handshake_err = |reply: String| AgentClientError::Handshake {
        path: uds_path.to_owned(),
        port,
        reply,
    };
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| handshake_err(format!("<write failed: {e}>")))?;
    // Read the reply byte by byte: whatever follows the newline belongs to the guest.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut b = [0u8; 1];
        match s.read(&mut b).await {
            Ok(1) if b == [b'\n'] => break,
            Ok(1) => {
                line.extend_from_slice(&b);
                if line.len() > 64 {
                    return Err(handshake_err(String::from_utf8_lossy(&line).into_owned()));
                }
            }
            Ok(_) => return Err(handshake_err(String::from_utf8_lossy(&line).into_owned())),
            Err(e) => return Err(handshake_err(format!("<read failed: {e}>"))),
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    if !reply.starts_with("OK ") {
        return Err(handshake_err(reply));
    }
    Ok(s)
}

/// Where a process's standard streams go on the host.
#[derive(Default)]
pub struct StdioConfig {
    /// Source of stdin (or terminal input); `None` leaves stdin at /dev/null.
    pub stdin: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// Destination of stdout (or terminal output).
    pub stdout: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Destination of stderr (unused with a terminal).
    pub stderr: Option<Box<dyn AsyncWrite + Send + Unpin>>,
    /// Run the process on a pty (must match `process.terminal` in the spec).
    pub terminal: bool,
}

impl std::fmt::Debug for StdioConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StdioConfig")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("terminal", &self.terminal)
            .finish()
    }
}

/// Which streams a [`StdioConfig`] connects.
#[derive(Debug, Clone, Copy)]
struct StreamWants {
    stdin: bool,
    stdout: bool,
    stderr: bool,
    terminal: bool,
}

impl StreamWants {
    fn of(io: &StdioConfig) -> Self {
        Self {
            stdin: io.stdin.is_some(),
            stdout: io.stdout.is_some(),
            stderr: io.stderr.is_some(),
            terminal: io.terminal,
        }
    }
}

/// A create or exec request without its streams.
#[derive(Debug, Clone, Default)]
pub struct CreateContainer {
    /// Container id.
    pub container_id: String,
    /// OCI `config.json` bytes.
    pub oci_spec_json: Vec<u8>,
    /// Guest block device with the root file system, e.g. `/dev/vda`.
    pub rootfs_source: String,
    /// Its file system type (`ext4`, `erofs`, or `bind` for a guest directory).
    pub rootfs_fstype: String,
}

/// The host side of one process's streams.
#[derive(Debug)]
pub struct ProcessIo {
    container_id: String,
    exec_id: String,
    outputs: Vec<JoinHandle<Result<u64, AgentClientError>>>,
    stdin_bytes: Arc<AtomicU64>,
    stdin_stop: Mutex<Option<oneshot::Sender<()>>>,
    stdin_task: Mutex<Option<JoinHandle<()>>>,
    terminal: bool,
}

impl ProcessIo {
    /// Container id.
    pub fn container_id(&self) -> &str {
        &self.container_id
    }

    /// Exec id ("" for the init process).
    pub fn exec_id(&self) -> &str {
        &self.exec_id
    }

    /// Waits until every output stream reached end of file and was written to its host
    /// destination; returns the byte counts (stdout first).
    ///
    /// # Errors
    ///
    /// [`AgentClientError::Copy`] when a destination failed.
    pub async fn wait_output(&mut self) -> Result<Vec<u64>, AgentClientError> {
        let mut counts = Vec::with_capacity(self.outputs.len());
        for h in self.outputs.drain(..) {
            match h.await {
                Ok(r) => counts.push(r?),
                Err(e) => {
                    return Err(AgentClientError::Copy {
                        stream: "output",
                        source: std::io::Error::other(e),
                    });
                }
            }
        }
        Ok(counts)
    }
}

/// A connected agent client.
#[derive(Clone)]
pub struct AgentClient {
    endpoint: AgentEndpoint,
    raw: RawClient,
    call_timeout: Duration,
    setup_timeout: Duration,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("endpoint", &self.endpoint)
            .field("call_timeout", &self.call_timeout)
            .finish_non_exhaustive()
    }
}

fn ctx(timeout: Option<Duration>) -> ttrpc::context::Context {
    match timeout {
        Some(t) => ttrpc::context::with_timeout(i64::try_from(t.as_nanos()).unwrap_or(i64::MAX)),
        None => ttrpc::context::Context::default(),
    }
}

fn map_err(op: &'static str, e: ttrpc::Error) -> AgentClientError {
    match e {
        ttrpc::Error::RpcStatus(st) => {
            if let Some(d) = st
                .details
                .iter()
                .find(|d| d.type_url == squib_agent_protocol::PROCESS_START_FAILURE_TYPE_URL)
                && let Ok(f) = ProcessStartFailure::parse_from_bytes(&d.value)
            {
                return AgentClientError::StartFailed {
                    exit_status: f.exit_status,
                    message: f.message,
                };
            }
            let code = st.code();
            AgentClientError::Rpc {
                op,
                code,
                message: st.message,
            }
        }
        other => AgentClientError::Transport {
            op,
            message: other.to_string(),
        },
    }
}

async fn within<T>(
    op: &'static str,
    limit: Option<Duration>,
    fut: impl std::future::Future<Output = ttrpc::Result<T>>,
) -> Result<T, AgentClientError> {
    match limit {
        // A little slack over the ttrpc deadline so the agent's own timeout answer wins.
        Some(t) => tokio::time::timeout(t + Duration::from_secs(1), fut)
            .await
            .map_err(|_| AgentClientError::Timeout { op, after: t })?
            .map_err(|e| map_err(op, e)),
        None => fut.await.map_err(|e| map_err(op, e)),
    }
}

static STREAM_NONCE: AtomicU64 = AtomicU64::new(0);

impl AgentClient {
    /// Connects to the agent's control port, retrying until `deadline` passes (the guest may
    /// still be booting), then checks it answers `Ping`.
    ///
    /// # Errors
    ///
    /// The last connection error, or [`AgentClientError::Timeout`].
    pub async fn connect(
        endpoint: AgentEndpoint,
        deadline: Duration,
    ) -> Result<Self, AgentClientError> {
        let start = tokio::time::Instant::now();
        let stream = loop {
            match endpoint.dial(squib_agent_protocol::CONTROL_PORT).await {
                Ok(s) => break s,
                Err(e) if start.elapsed() >= deadline => return Err(e),
                Err(e) => {
                    tracing::trace!(error = %e, "agent not reachable yet");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        let raw = RawClient::new(ttrpc::r#async::Client::new(
            ttrpc::r#async::transport::Socket::new(stream),
        ));
        let c = Self {
            endpoint,
            raw,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            setup_timeout: DEFAULT_SETUP_TIMEOUT,
        };
        c.ping().await?;
        Ok(c)
    }

    /// Changes the timeouts of ordinary calls and of create/start/exec.
    pub fn with_timeouts(mut self, call: Duration, setup: Duration) -> Self {
        self.call_timeout = call;
        self.setup_timeout = setup;
        self
    }

    /// Agent version and uptime.
    ///
    /// # Errors
    ///
    /// Transport errors or a timeout.
    pub async fn ping(&self) -> Result<agent::PingResponse, AgentClientError> {
        let t = Some(self.call_timeout);
        within("ping", t, self.raw.ping(ctx(t), &agent::PingRequest::new())).await
    }

    async fn open_stream(&self, id: &str) -> Result<BoxStream, AgentClientError> {
        let header = squib_agent_protocol::stream_header(id)?;
        let mut s = self
            .endpoint
            .dial(squib_agent_protocol::STREAM_PORT)
            .await?;
        s.write_all(header.as_bytes())
            .await
            .map_err(|source| AgentClientError::OpenStream {
                id: id.to_owned(),
                source,
            })?;
        Ok(s)
    }

    /// Dials the streams `io` asks for and returns the request message plus the
    /// connections in stdin/stdout/stderr (or terminal) order.
    async fn dial_streams(
        &self,
        container_id: &str,
        exec_id: &str,
        wants: StreamWants,
    ) -> Result<(agent::Stdio, Vec<(&'static str, BoxStream)>), AgentClientError> {
        // Only flags cross the awaits below: the boxed endpoints are Send but not Sync, and a
        // reference to them would keep callers' futures from being Send.
        let io = wants;
        let nonce = STREAM_NONCE.fetch_add(1, Ordering::Relaxed);
        let base = format!(
            "{}.{}.{}-{nonce}",
            container_id,
            if exec_id.is_empty() { "init" } else { exec_id },
            std::process::id()
        );
        let mut stdio = agent::Stdio::new();
        let mut conns = Vec::new();
        if io.terminal {
            stdio.terminal = true;
            if io.stdin || io.stdout {
                let id = format!("{base}.tty");
                conns.push(("terminal", self.open_stream(&id).await?));
                stdio.terminal_stream = id;
            }
            return Ok((stdio, conns));
        }
        if io.stdin {
            let id = format!("{base}.in");
            conns.push(("stdin", self.open_stream(&id).await?));
            stdio.stdin_stream = id;
        }
        if io.stdout {
            let id = format!("{base}.out");
            conns.push(("stdout", self.open_stream(&id).await?));
            stdio.stdout_stream = id;
        }
        if io.stderr {
            let id = format!("{base}.err");
            conns.push(("stderr", self.open_stream(&id).await?));
            stdio.stderr_stream = id;
        }
        Ok((stdio, conns))
    }

    fn start_copies(
        &self,
        container_id: &str,
        exec_id: &str,
        io: StdioConfig,
        conns: Vec<(&'static str, BoxStream)>,
    ) -> ProcessIo {
        let StdioConfig {
            mut stdin,
            mut stdout,
            mut stderr,
            terminal,
        } = io;
        let stdin_bytes = Arc::new(AtomicU64::new(0));
        let mut outputs = Vec::new();
        let mut stdin_stop = None;
        let mut stdin_task = None;
        for (kind, conn) in conns {
            let (rd, wr) = tokio::io::split(conn);
            let input = match kind {
                "stdin" | "terminal" => stdin.take(),
                _ => None,
            };
            let output = match kind {
                "stdout" | "terminal" => stdout.take(),
                "stderr" => stderr.take(),
                _ => None,
            };
            if let Some(src) = input {
                let (tx, rx) = oneshot::channel();
                stdin_stop = Some(tx);
                let client = self.clone();
                let counter = stdin_bytes.clone();
                let (cid, eid) = (container_id.to_owned(), exec_id.to_owned());
                stdin_task = Some(tokio::spawn(async move {
                    copy_stdin(src, wr, rx, &counter).await;
                    // In-band end of file already closed a plain stdin stream; the call makes
                    // it explicit (and is the only way to end a terminal's input).
                    let total = counter.load(Ordering::SeqCst);
                    if let Err(e) = client.close_stdin_raw(&cid, &eid, total).await {
                        tracing::debug!(error = %e, container_id = %cid, "close stdin failed");
                    }
                }));
            } else {
                drop(wr);
            }
            if let Some(dst) = output {
                outputs.push(tokio::spawn(copy_output(kind, rd, dst)));
            }
        }
        ProcessIo {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            outputs,
            stdin_bytes,
            stdin_stop: Mutex::new(stdin_stop),
            stdin_task: Mutex::new(stdin_task),
            terminal,
        }
    }

    /// Creates a container (its init stays stopped before exec until
    /// [`AgentClient::start_container`]); returns the guest pid and its streams.
    ///
    /// # Errors
    ///
    /// [`AgentClientError::StartFailed`] when the process cannot be run, other variants for
    /// invalid specs, missing devices or transport problems.
    pub async fn create_container(
        &self,
        req: &CreateContainer,
        io: StdioConfig,
    ) -> Result<(u32, ProcessIo), AgentClientError> {
        let wants = StreamWants::of(&io);
        let (stdio, conns) = self.dial_streams(&req.container_id, "", wants).await?;
        let mut m = agent::CreateContainerRequest::new();
        m.container_id = req.container_id.clone();
        m.oci_spec_json = req.oci_spec_json.clone();
        m.rootfs_source = req.rootfs_source.clone();
        m.rootfs_fstype = req.rootfs_fstype.clone();
        m.stdio = MessageField::some(stdio);
        let t = Some(self.setup_timeout);
        let r = within("create container", t, self.raw.create_container(ctx(t), &m)).await?;
        Ok((r.pid, self.start_copies(&req.container_id, "", io, conns)))
    }

    /// Lets the container's init exec its workload.
    ///
    /// # Errors
    ///
    /// [`AgentClientError::StartFailed`] when the exec fails.
    pub async fn start_container(&self, container_id: &str) -> Result<(), AgentClientError> {
        let mut m = agent::StartContainerRequest::new();
        m.container_id = container_id.to_owned();
        let t = Some(self.setup_timeout);
        within("start container", t, self.raw.start_container(ctx(t), &m)).await?;
        Ok(())
    }

    /// Runs a process (OCI `process` JSON) in a running container.
    ///
    /// # Errors
    ///
    /// [`AgentClientError::StartFailed`] when it cannot be run.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        oci_process_json: &[u8],
        io: StdioConfig,
    ) -> Result<(u32, ProcessIo), AgentClientError> {
        let wants = StreamWants::of(&io);
        let (stdio, conns) = self.dial_streams(container_id, exec_id, wants).await?;
        let mut m = agent::ExecProcessRequest::new();
        m.container_id = container_id.to_owned();
        m.exec_id = exec_id.to_owned();
        m.oci_process_json = oci_process_json.to_vec();
        m.stdio = MessageField::some(stdio);
        let t = Some(self.setup_timeout);
        let r = within("exec process", t, self.raw.exec_process(ctx(t), &m)).await?;
        Ok((r.pid, self.start_copies(container_id, exec_id, io, conns)))
    }

    /// Sends `signal` to a process ("" = init), or to all of the container's processes.
    ///
    /// # Errors
    ///
    /// Unknown container/process, or the process already exited (`NOT_FOUND`).
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentClientError> {
        let mut m = agent::SignalProcessRequest::new();
        m.container_id = container_id.to_owned();
        m.exec_id = exec_id.to_owned();
        m.signal = signal;
        m.all = all;
        let t = Some(self.call_timeout);
        within("signal process", t, self.raw.signal_process(ctx(t), &m)).await?;
        Ok(())
    }

    /// Waits for the process's exit status (code or 128 + signal) without timeout. Pair it
    /// with [`ProcessIo::wait`] to also have the output fully copied.
    ///
    /// # Errors
    ///
    /// Unknown process or transport errors.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<agent::WaitProcessResponse, AgentClientError> {
        let mut m = agent::WaitProcessRequest::new();
        m.container_id = container_id.to_owned();
        m.exec_id = exec_id.to_owned();
        within("wait process", None, self.raw.wait_process(ctx(None), &m)).await
    }

    /// Sets the pty size of a terminal process.
    ///
    /// # Errors
    ///
    /// The process has no terminal, or is unknown.
    pub async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentClientError> {
        let mut m = agent::ResizePtyRequest::new();
        m.container_id = container_id.to_owned();
        m.exec_id = exec_id.to_owned();
        m.rows = rows;
        m.cols = cols;
        let t = Some(self.call_timeout);
        within("resize pty", t, self.raw.resize_pty(ctx(t), &m)).await?;
        Ok(())
    }

    async fn close_stdin_raw(
        &self,
        container_id: &str,
        exec_id: &str,
        total: u64,
    ) -> Result<(), AgentClientError> {
        let mut m = agent::CloseStdinRequest::new();
        m.container_id = container_id.to_owned();
        m.exec_id = exec_id.to_owned();
        m.stdin_bytes = total;
        let t = Some(self.call_timeout);
        within("close stdin", t, self.raw.close_stdin(ctx(t), &m)).await?;
        Ok(())
    }

    /// cgroup statistics of a container.
    ///
    /// # Errors
    ///
    /// Unknown container or no cgroup.
    pub async fn stats(
        &self,
        container_id: &str,
    ) -> Result<agent::StatsResponse, AgentClientError> {
        let mut m = agent::ContainerRequest::new();
        m.container_id = container_id.to_owned();
        let t = Some(self.call_timeout);
        within("stats", t, self.raw.stats(ctx(t), &m)).await
    }

    /// Freezes the container's cgroup.
    ///
    /// # Errors
    ///
    /// Unknown container or freezer failure.
    pub async fn pause_container(&self, container_id: &str) -> Result<(), AgentClientError> {
        let mut m = agent::ContainerRequest::new();
        m.container_id = container_id.to_owned();
        let t = Some(self.call_timeout);
        within("pause container", t, self.raw.pause_container(ctx(t), &m)).await?;
        Ok(())
    }

    /// Thaws the container's cgroup.
    ///
    /// # Errors
    ///
    /// Unknown container or freezer failure.
    pub async fn resume_container(&self, container_id: &str) -> Result<(), AgentClientError> {
        let mut m = agent::ContainerRequest::new();
        m.container_id = container_id.to_owned();
        let t = Some(self.call_timeout);
        within("resume container", t, self.raw.resume_container(ctx(t), &m)).await?;
        Ok(())
    }

    /// Blocks until some container is OOM-killed; returns its id.
    ///
    /// # Errors
    ///
    /// Transport errors.
    pub async fn next_oom_event(&self) -> Result<String, AgentClientError> {
        let r = within(
            "get oom event",
            None,
            self.raw.get_oom_event(ctx(None), &agent::Empty::new()),
        )
        .await?;
        Ok(r.container_id)
    }

    /// Kills what is left of the container and frees its guest resources.
    ///
    /// # Errors
    ///
    /// Unknown container or cleanup failure.
    pub async fn remove_container(&self, container_id: &str) -> Result<(), AgentClientError> {
        let mut m = agent::ContainerRequest::new();
        m.container_id = container_id.to_owned();
        let t = Some(self.call_timeout);
        within("remove container", t, self.raw.remove_container(ctx(t), &m)).await?;
        Ok(())
    }

    /// Asks the agent to remove every container, sync and power the guest off. The answer
    /// comes after the sync, before the power-off.
    ///
    /// # Errors
    ///
    /// Transport errors.
    pub async fn shutdown(&self) -> Result<(), AgentClientError> {
        let t = Some(self.call_timeout);
        within(
            "shutdown",
            t,
            self.raw.shutdown(ctx(t), &agent::ShutdownRequest::new()),
        )
        .await?;
        Ok(())
    }
}

impl ProcessIo {
    /// Stops forwarding stdin (after what was already read from the host source) and makes
    /// the process see end of file once every forwarded byte has arrived.
    ///
    /// # Errors
    ///
    /// Never fails today; reserved for reporting the agent's answer.
    pub async fn close_stdin(&self) -> Result<(), AgentClientError> {
        if let Some(tx) = self.stdin_stop.lock().await.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.stdin_task.lock().await.take() {
            let _ = h.await;
        }
        Ok(())
    }

    /// Bytes forwarded to the guest's stdin so far.
    pub fn stdin_bytes(&self) -> u64 {
        self.stdin_bytes.load(Ordering::SeqCst)
    }

    /// Whether the process runs on a pty.
    pub fn is_terminal(&self) -> bool {
        self.terminal
    }

    /// Waits for the exit status through `client` and then for the output copies, so the
    /// status is returned only after the last byte of output reached its destination.
    ///
    /// # Errors
    ///
    /// Wait or copy failures.
    pub async fn wait(&mut self, client: &AgentClient) -> Result<i32, AgentClientError> {
        let r = client
            .wait_process(&self.container_id, &self.exec_id)
            .await?;
        self.wait_output().await?;
        Ok(r.exit_status)
    }
}

async fn copy_stdin(
    mut src: Box<dyn AsyncRead + Send + Unpin>,
    mut dst: tokio::io::WriteHalf<BoxStream>,
    mut stop: oneshot::Receiver<()>,
    counter: &AtomicU64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            biased;
            _ = &mut stop => break,
            r = src.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        let Some(chunk) = buf.get(..n) else { break };
        if dst.write_all(chunk).await.is_err() {
            break;
        }
        counter.fetch_add(n as u64, Ordering::SeqCst);
    }
    // Half-close: in-band end of file for a plain stdin stream (a terminal's input is ended
    // by the CloseStdin call that follows).
    let _ = dst.shutdown().await;
}

/// Bytes one read from the guest's output stream may return (see `copy_output`).
const OUTPUT_COPY_BYTES: usize = 256 * 1024;

async fn copy_output(
    stream: &'static str,
    src: tokio::io::ReadHalf<BoxStream>,
    mut dst: Box<dyn AsyncWrite + Send + Unpin>,
) -> Result<u64, AgentClientError> {
    // tokio's `copy` moves 8 KiB per read and write; a bulk stream then costs eight times the
    // system calls and wake-ups of this buffer's size.
    let mut src = tokio::io::BufReader::with_capacity(OUTPUT_COPY_BYTES, src);
    let n = tokio::io::copy_buf(&mut src, &mut dst)
        .await
        .map_err(|source| AgentClientError::Copy { stream, source })?;
    dst.flush()
        .await
        .map_err(|source| AgentClientError::Copy { stream, source })?;
    dst.shutdown()
        .await
        .map_err(|source| AgentClientError::Copy { stream, source })?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn fake_device(dir: &Path, reply: &'static str) -> PathBuf {
        let path = dir.join("vsock.sock");
        let l = UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await.unwrap();
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(reply.as_bytes()).await.unwrap();
            s.write_all(b"payload").await.unwrap();
        });
        path
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("squib-ac-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn test_hybrid_connect_keeps_bytes_after_the_ok_line() {
        let d = tempdir("ok");
        let path = fake_device(&d, "OK 1073741824\n").await;
        let mut s = hybrid_connect(&path, 1024).await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"payload");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[tokio::test]
    async fn test_hybrid_connect_rejects_a_refusal() {
        let d = tempdir("refused");
        let path = fake_device(&d, "FAILURE\n").await;
        let err = hybrid_connect(&path, 1024).await.unwrap_err();
        assert!(
            matches!(&err, AgentClientError::Handshake { port: 1024, reply, .. } if reply == "FAILURE"),
            "{err}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn test_start_failure_detail_becomes_typed_error() {
        let mut f = ProcessStartFailure::new();
        f.exit_status = 127;
        f.message = r#"exec: "x": executable file not found in $PATH"#.into();
        let mut any = ttrpc::proto::Any::new();
        any.type_url = squib_agent_protocol::PROCESS_START_FAILURE_TYPE_URL.into();
        any.value = f.write_to_bytes().unwrap();
        let mut st = ttrpc::get_status(ttrpc::Code::FAILED_PRECONDITION, "whatever");
        st.details.push(any);
        let e = map_err("create container", ttrpc::Error::RpcStatus(st));
        assert_eq!(e.start_exit_status(), Some(127));
        assert!(e.to_string().contains("executable file not found in $PATH"));
        let e = map_err(
            "stats",
            ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::NOT_FOUND, "nope")),
        );
        assert!(matches!(
            e,
            AgentClientError::Rpc {
                code: ttrpc::Code::NOT_FOUND,
                ..
            }
        ));
    }
}
