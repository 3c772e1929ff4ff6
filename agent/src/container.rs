//! Containers and their processes inside the guest: root file system, cgroup, the helper
//! processes that become the workload, and their life cycle.
//!
//! Data flow of a create: validate the spec ([`crate::spec`]) → mount the root (read-only
//! lower + tmpfs upper, overlay) → cgroup → claim the stream connections → clone a helper
//! into new namespaces (it execs `squib-agent` in helper mode, see [`crate::helper`]) → send
//! it the settings → wait for `Ready` (or the failure it reports). Start writes one byte to
//! the helper, which then execs the workload; end of file on the control socket means the
//! exec succeeded. Exec is the same with the helper cloned into the container's PID
//! namespace and joining its other namespaces.

use std::collections::HashMap;
use std::ffi::CString;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::signal::Signal;
use nix::sys::socket::{AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType};
use nix::unistd::Pid;

use squib_agent_protocol::agent::Stdio;

use crate::cgroup::{Cgroup, CgroupError, Stats};
use crate::helper::{CONFIG_FD, CONTROL_FD, HELPER_ARG, HelperConfig, HelperMessage, HelperMode};
use crate::reaper::{ExitCell, ExitInfo, Reaper, lock};
use crate::spec::{self, NamespaceSet, SpecError};
use crate::stdio::{Drain, PreparedIo, StdinControl, StdioError};
use crate::streams::StreamRegistry;

/// How long helper setup may take before the request fails.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Failures of container operations, mapped to ttrpc codes by the service.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// No container with this id.
    #[error("container {container_id:?} does not exist")]
    NotFound {
        /// The id.
        container_id: String,
    },
    /// No exec with this id in the container.
    #[error("process {exec_id:?} does not exist in container {container_id:?}")]
    ProcessNotFound {
        /// Container id.
        container_id: String,
        /// Exec id.
        exec_id: String,
    },
    /// The id is taken.
    #[error("{what} {id:?} already exists")]
    AlreadyExists {
        /// "container" or "exec".
        what: &'static str,
        /// The id.
        id: String,
    },
    /// The id holds characters that cannot name a directory.
    #[error("{what} id {id:?} must be 1-128 bytes of [A-Za-z0-9._-]")]
    BadId {
        /// Which id.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// The spec is invalid.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The streams are invalid or missing.
    #[error(transparent)]
    Stdio(#[from] StdioError),
    /// The cgroup could not be set up or read.
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    /// The container has no cgroup (the agent runs without one).
    #[error("container {container_id:?} has no cgroup")]
    NoCgroup {
        /// Container id.
        container_id: String,
    },
    /// Mounting the root failed.
    #[error("mount {what} at {}", target.display())]
    Mount {
        /// What was mounted.
        what: String,
        /// Where.
        target: PathBuf,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// A directory for the container could not be created.
    #[error("create {}", path.display())]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The helper process could not be created or talked to.
    #[error("{op} the container helper")]
    Helper {
        /// What failed.
        op: &'static str,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// The process could not be started; carries runc's wording and 127/126/1.
    #[error("{message}")]
    StartFailed {
        /// Conventional status.
        exit_status: i32,
        /// Description.
        message: String,
    },
    /// Start on a container that is not in the created state.
    #[error("container {container_id:?} cannot be started: {state}")]
    NotCreated {
        /// Container id.
        container_id: String,
        /// Why.
        state: &'static str,
    },
    /// Exec into a container whose init has exited.
    #[error("cannot exec in a stopped container {container_id:?}")]
    Stopped {
        /// Container id.
        container_id: String,
    },
    /// The process has no terminal.
    #[error("process {exec_id:?} of container {container_id:?} has no terminal")]
    NoTerminal {
        /// Container id.
        container_id: String,
        /// Exec id ("" for init).
        exec_id: String,
    },
    /// kill(2) failed.
    #[error("signal {signal} to pid {pid}")]
    Signal {
        /// Signal number.
        signal: i32,
        /// Target.
        pid: i32,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// An unknown signal number.
    #[error("signal {signal} is not a valid signal number")]
    BadSignal {
        /// The number.
        signal: u32,
    },
    /// An ioctl on the pty failed.
    #[error("resize the pty")]
    Resize(#[source] Errno),
    /// A thread could not be spawned or a descriptor duplicated.
    #[error("start stream copies")]
    Io(#[source] std::io::Error),
}

/// Where the agent keeps things.
#[derive(Debug, Clone)]
pub struct AgentPaths {
    /// Per-container directories (mount points, upper layers).
    pub state_dir: PathBuf,
    /// Parent cgroup of container groups; `None` runs containers without cgroups.
    pub cgroup_root: Option<PathBuf>,
    /// The agent binary, exec'd in helper mode.
    pub helper_exe: PathBuf,
}

#[derive(Debug)]
struct Proc {
    pid: Pid,
    exit: Arc<ExitCell>,
    drain: Arc<Drain>,
    stdin: Option<Arc<StdinControl>>,
    pty: Option<OwnedFd>,
}

#[derive(Debug)]
struct Container {
    id: String,
    dir: PathBuf,
    namespaces: NamespaceSet,
    cgroup: Option<Cgroup>,
    init: Arc<Proc>,
    /// The init helper's control socket until StartContainer consumed it.
    start: Mutex<StartState>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    oom_seen: AtomicU64,
}

#[derive(Debug)]
enum StartState {
    Created(OwnedFd),
    Started,
}

/// All containers of this guest.
#[derive(Debug)]
pub struct Manager {
    paths: AgentPaths,
    reaper: Arc<Reaper>,
    streams: Arc<StreamRegistry>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

fn check_id(what: &'static str, id: &str) -> Result<(), ContainerError> {
    squib_agent_protocol::validate_stream_id(id).map_err(|_| ContainerError::BadId {
        what,
        id: id.to_owned(),
    })?;
    if id.starts_with('.') {
        return Err(ContainerError::BadId {
            what,
            id: id.to_owned(),
        });
    }
    Ok(())
}

impl Manager {
    /// A manager using `reaper` for every child and `streams` for stdio connections.
    pub fn new(paths: AgentPaths, reaper: Arc<Reaper>, streams: Arc<StreamRegistry>) -> Self {
        Self {
            paths,
            reaper,
            streams,
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn container(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.containers)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound {
                container_id: id.to_owned(),
            })
    }

    fn process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<(Arc<Container>, Arc<Proc>), ContainerError> {
        let c = self.container(id)?;
        if exec_id.is_empty() {
            let p = c.init.clone();
            return Ok((c, p));
        }
        let p = lock(&c.execs).get(exec_id).cloned().ok_or_else(|| {
            ContainerError::ProcessNotFound {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
            }
        })?;
        Ok((c, p))
    }

    /// Creates a container whose init waits, set up, just before its exec. Returns its pid.
    ///
    /// # Errors
    ///
    /// Any [`ContainerError`]; nothing (mount, cgroup, process) is left behind on failure.
    pub fn create(
        &self,
        id: &str,
        spec_json: &[u8],
        rootfs_source: &str,
        rootfs_fstype: &str,
        stdio: &Stdio,
    ) -> Result<u32, ContainerError> {
        check_id("container", id)?;
        if lock(&self.containers).contains_key(id) {
            return Err(ContainerError::AlreadyExists {
                what: "container",
                id: id.to_owned(),
            });
        }
        let spec = spec::parse_spec(spec_json)?;
        let process = spec.process.as_ref().ok_or(SpecError::NoProcess)?;
        let settings = spec::process_settings(process, true)?;
        let namespaces = spec::namespace_set(&spec)?;
        let root = spec::root_settings(&spec)?;
        let dir = self.paths.state_dir.join("containers").join(id);
        let rootfs = mount_rootfs(&dir, rootfs_source, rootfs_fstype)?;
        let cleanup_mounts = |e: ContainerError| {
            unmount_rootfs(&dir);
            e
        };
        let cgroup = match &self.paths.cgroup_root {
            Some(root) => Some(
                Cgroup::create(
                    root,
                    id,
                    spec.linux.as_ref().and_then(|l| l.resources.as_ref()),
                )
                .map_err(|e| cleanup_mounts(e.into()))?,
            ),
            None => None,
        };
        let fail = |e: ContainerError| {
            if let Some(cg) = &cgroup {
                let _ = cg.remove();
            }
            cleanup_mounts(e)
        };
        let io = PreparedIo::prepare(stdio, settings.terminal, &self.streams)
            .map_err(|e| fail(e.into()))?;
        let mut flags = CloneFlags::CLONE_NEWNS;
        if namespaces.pid {
            flags |= CloneFlags::CLONE_NEWPID;
        }
        if namespaces.uts {
            flags |= CloneFlags::CLONE_NEWUTS;
        }
        if namespaces.ipc {
            flags |= CloneFlags::CLONE_NEWIPC;
        }
        if namespaces.net {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        let config = HelperConfig {
            process: settings,
            mode: HelperMode::Init {
                rootfs: rootfs.to_string_lossy().into_owned(),
                root,
                namespaces,
            },
        };
        let helper = self
            .spawn_helper(&config, flags, &io, None, cgroup.as_ref())
            .map_err(fail)?;
        let (control, pty) = match helper.wait_ready() {
            Ok(v) => v,
            Err(e) => {
                let _ = nix::sys::signal::kill(helper.pid, Signal::SIGKILL);
                helper.exit.wait();
                return Err(fail(e));
            }
        };
        let drain = Arc::new(Drain::default());
        let stdin = match io.start(&drain, pty.as_ref()) {
            Ok(s) => s,
            Err(e) => {
                let _ = nix::sys::signal::kill(helper.pid, Signal::SIGKILL);
                helper.exit.wait();
                return Err(fail(ContainerError::Io(e)));
            }
        };
        let init = Arc::new(Proc {
            pid: helper.pid,
            exit: helper.exit.clone(),
            drain: drain.clone(),
            stdin,
            pty,
        });
        watch_exit(&init);
        let c = Arc::new(Container {
            id: id.to_owned(),
            dir,
            namespaces,
            cgroup,
            oom_seen: AtomicU64::new(0),
            init,
            start: Mutex::new(StartState::Created(control)),
            execs: Mutex::new(HashMap::new()),
        });
        lock(&self.containers).insert(id.to_owned(), c);
        tracing::info!(
            container_id = id,
            pid = helper.pid.as_raw(),
            "container created"
        );
        u32::try_from(helper.pid.as_raw()).map_err(|_| ContainerError::Helper {
            op: "read the pid of",
            source: Errno::EINVAL,
        })
    }

    /// Lets the init process exec its workload.
    ///
    /// # Errors
    ///
    /// [`ContainerError::StartFailed`] when the exec failed, [`ContainerError::NotCreated`]
    /// when already started or exited.
    pub fn start(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.container(id)?;
        let mut st = lock(&c.start);
        if c.init.exit.get().is_some() {
            return Err(ContainerError::NotCreated {
                container_id: id.to_owned(),
                state: "it has stopped",
            });
        }
        let control = match std::mem::replace(&mut *st, StartState::Started) {
            StartState::Created(fd) => fd,
            StartState::Started => {
                return Err(ContainerError::NotCreated {
                    container_id: id.to_owned(),
                    state: "it is already running",
                });
            }
        };
        drop(st);
        nix::unistd::write(&control, &[1]).map_err(|source| ContainerError::Helper {
            op: "signal start to",
            source,
        })?;
        match recv_message(&control)? {
            None => {
                tracing::info!(container_id = id, "container started");
                Ok(())
            }
            Some((
                HelperMessage::Failed {
                    exit_status,
                    message,
                },
                _,
            )) => {
                c.init.exit.wait();
                Err(ContainerError::StartFailed {
                    exit_status,
                    message,
                })
            }
            Some(_) => Err(ContainerError::Helper {
                op: "understand",
                source: Errno::EPROTO,
            }),
        }
    }

    /// Runs a new process in a running container.
    ///
    /// # Errors
    ///
    /// Any [`ContainerError`]; a process that cannot be run reports
    /// [`ContainerError::StartFailed`].
    pub fn exec(
        &self,
        id: &str,
        exec_id: &str,
        process_json: &[u8],
        stdio: &Stdio,
    ) -> Result<u32, ContainerError> {
        check_id("exec", exec_id)?;
        let c = self.container(id)?;
        if c.init.exit.get().is_some() {
            return Err(ContainerError::Stopped {
                container_id: id.to_owned(),
            });
        }
        if lock(&c.execs).contains_key(exec_id) {
            return Err(ContainerError::AlreadyExists {
                what: "exec",
                id: exec_id.to_owned(),
            });
        }
        let process = spec::parse_process(process_json)?;
        let settings = spec::process_settings(&process, false)?;
        let io = PreparedIo::prepare(stdio, settings.terminal, &self.streams)?;
        let config = HelperConfig {
            process: settings,
            mode: HelperMode::Exec {
                init_pid: c.init.pid.as_raw(),
                namespaces: c.namespaces,
            },
        };
        let pidns = c.namespaces.pid.then_some(c.init.pid);
        let helper =
            self.spawn_helper(&config, CloneFlags::empty(), &io, pidns, c.cgroup.as_ref())?;
        let pty = match helper.wait_ready() {
            Ok((control, pty)) => {
                // The exec helper does not wait for a start byte: end of file follows its exec.
                match recv_message(&control)? {
                    None => pty,
                    Some((
                        HelperMessage::Failed {
                            exit_status,
                            message,
                        },
                        _,
                    )) => {
                        helper.exit.wait();
                        return Err(ContainerError::StartFailed {
                            exit_status,
                            message,
                        });
                    }
                    Some(_) => {
                        return Err(ContainerError::Helper {
                            op: "understand",
                            source: Errno::EPROTO,
                        });
                    }
                }
            }
            Err(e) => {
                let _ = nix::sys::signal::kill(helper.pid, Signal::SIGKILL);
                helper.exit.wait();
                return Err(e);
            }
        };
        let drain = Arc::new(Drain::default());
        let stdin = io.start(&drain, pty.as_ref()).map_err(ContainerError::Io)?;
        let p = Arc::new(Proc {
            pid: helper.pid,
            exit: helper.exit,
            drain,
            stdin,
            pty,
        });
        watch_exit(&p);
        lock(&c.execs).insert(exec_id.to_owned(), p);
        tracing::debug!(
            container_id = id,
            exec_id,
            pid = helper.pid.as_raw(),
            "exec started"
        );
        u32::try_from(helper.pid.as_raw()).map_err(|_| ContainerError::Helper {
            op: "read the pid of",
            source: Errno::EINVAL,
        })
    }

    fn spawn_helper(
        &self,
        config: &HelperConfig,
        flags: CloneFlags,
        io: &PreparedIo,
        pidns_of: Option<Pid>,
        cgroup: Option<&Cgroup>,
    ) -> Result<Helper, ContainerError> {
        let helper_err = |op| move |source| ContainerError::Helper { op, source };
        let (agent_end, helper_end) = nix::sys::socket::socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(helper_err("create the control socket of"))?;
        let (cfg_r, cfg_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(helper_err("create the config pipe of"))?;
        let exe =
            CString::new(self.paths.helper_exe.as_os_str().as_encoded_bytes()).map_err(|_| {
                ContainerError::Helper {
                    op: "name",
                    source: Errno::EINVAL,
                }
            })?;
        let arg = CString::new(HELPER_ARG).map_err(|_| ContainerError::Helper {
            op: "name",
            source: Errno::EINVAL,
        })?;
        let [fd0, fd1, fd2] = &io.child_fds;
        let fds: [(RawFd, RawFd); 5] = [
            (fd0.as_raw_fd(), 0),
            (fd1.as_raw_fd(), 1),
            (fd2.as_raw_fd(), 2),
            (helper_end.as_raw_fd(), CONTROL_FD),
            (cfg_r.as_raw_fd(), CONFIG_FD),
        ];
        let reaper = self.reaper.clone();
        let clone_child = move || -> Result<(Pid, Arc<ExitCell>), Errno> {
            if let Some(init) = pidns_of {
                // Children of this thread are created in the container's PID namespace.
                let ns = std::fs::File::open(format!("/proc/{}/ns/pid", init.as_raw()))
                    .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)))?;
                nix::sched::setns(ns, CloneFlags::CLONE_NEWPID)?;
            }
            reaper.spawn(|| clone_helper(&exe, &arg, &fds, flags))
        };
        let (pid, exit) = if pidns_of.is_some() {
            // setns(CLONE_NEWPID) changes where the calling thread's children go, so do it on
            // a throw-away thread.
            std::thread::scope(|s| s.spawn(clone_child).join().unwrap_or(Err(Errno::EAGAIN)))
        } else {
            clone_child()
        }
        .map_err(helper_err("clone"))?;
        drop(helper_end);
        drop(cfg_r);
        let helper = Helper {
            pid,
            exit,
            control: agent_end,
        };
        if let Some(cg) = cgroup
            && let Err(e) = cg.add(pid.as_raw())
        {
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            helper.exit.wait();
            return Err(e.into());
        }
        let bytes = serde_json::to_vec(config).map_err(|_| ContainerError::Helper {
            op: "encode the config of",
            source: Errno::EINVAL,
        })?;
        let mut pipe = std::fs::File::from(cfg_w);
        // The helper reads its config first thing; a failed write means it already died and
        // the control socket will say why.
        let _ = pipe.write_all(&bytes);
        drop(pipe);
        Ok(helper)
    }

    /// Delivers `signal` to one process, or to every process of the container.
    ///
    /// # Errors
    ///
    /// [`ContainerError::Signal`] when kill(2) fails for the named process.
    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or(ContainerError::BadSignal { signal })?;
        let (c, p) = self.process(id, exec_id)?;
        if all {
            let mut pids = c.cgroup.as_ref().map(Cgroup::pids).unwrap_or_default();
            if pids.is_empty() && p.exit.get().is_none() {
                pids.push(p.pid.as_raw());
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        if p.exit.get().is_some() {
            // Already exited: nothing to signal (runc reports "not running" here).
            return Err(ContainerError::Signal {
                signal: sig as i32,
                pid: p.pid.as_raw(),
                source: Errno::ESRCH,
            });
        }
        nix::sys::signal::kill(p.pid, sig).map_err(|source| ContainerError::Signal {
            signal: sig as i32,
            pid: p.pid.as_raw(),
            source,
        })
    }

    /// Blocks until the process exited and its output is drained.
    ///
    /// # Errors
    ///
    /// [`ContainerError::NotFound`] / [`ContainerError::ProcessNotFound`].
    pub fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo, ContainerError> {
        let (_, p) = self.process(id, exec_id)?;
        let info = p.exit.wait();
        p.drain.mark_exited();
        p.drain.wait();
        Ok(info)
    }

    /// Resizes the process's pty.
    ///
    /// # Errors
    ///
    /// [`ContainerError::NoTerminal`] or the ioctl's error.
    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ContainerError> {
        let (_, p) = self.process(id, exec_id)?;
        let pty = p.pty.as_ref().ok_or_else(|| ContainerError::NoTerminal {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
        })?;
        crate::stdio::set_window_size(pty, rows, cols).map_err(ContainerError::Resize)
    }

    /// Closes the process's input after `total` bytes.
    ///
    /// # Errors
    ///
    /// [`ContainerError::NotFound`] / [`ContainerError::ProcessNotFound`].
    pub fn close_stdin(&self, id: &str, exec_id: &str, total: u64) -> Result<(), ContainerError> {
        let (_, p) = self.process(id, exec_id)?;
        if let Some(s) = &p.stdin {
            s.close_after(total);
        }
        Ok(())
    }

    fn cgroup_of(&self, id: &str) -> Result<Cgroup, ContainerError> {
        let c = self.container(id)?;
        c.cgroup.clone().ok_or_else(|| ContainerError::NoCgroup {
            container_id: id.to_owned(),
        })
    }

    /// Resource usage of the container.
    ///
    /// # Errors
    ///
    /// [`ContainerError::NoCgroup`] or a cgroup read error.
    pub fn stats(&self, id: &str) -> Result<Stats, ContainerError> {
        Ok(self.cgroup_of(id)?.stats()?)
    }

    /// Freezes or thaws the container.
    ///
    /// # Errors
    ///
    /// [`ContainerError::NoCgroup`] or a freezer error.
    pub fn freeze(&self, id: &str, frozen: bool) -> Result<(), ContainerError> {
        Ok(self.cgroup_of(id)?.freeze(frozen)?)
    }

    /// Blocks until a container's cgroup records a new OOM kill; returns its id.
    pub fn next_oom(&self) -> String {
        loop {
            let containers: Vec<Arc<Container>> =
                lock(&self.containers).values().cloned().collect();
            for c in containers {
                let Some(cg) = &c.cgroup else { continue };
                let now = cg.oom_kills();
                let seen = c.oom_seen.load(Ordering::SeqCst);
                if now > seen
                    && c.oom_seen
                        .compare_exchange(seen, now, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok()
                {
                    return c.id.clone();
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills whatever is left of the container, unmounts its root and forgets it.
    ///
    /// # Errors
    ///
    /// [`ContainerError::NotFound`], or the cgroup cannot be removed.
    pub fn remove(&self, id: &str) -> Result<(), ContainerError> {
        let c = self.container(id)?;
        // Stop an unstarted init from ever running its workload.
        *lock(&c.start) = StartState::Started;
        let mut pids: Vec<i32> = c.cgroup.as_ref().map(Cgroup::pids).unwrap_or_default();
        // Only processes not reaped yet: a reaped pid may already belong to someone else.
        if c.init.exit.get().is_none() {
            pids.push(c.init.pid.as_raw());
        }
        pids.extend(
            lock(&c.execs)
                .values()
                .filter(|p| p.exit.get().is_none())
                .map(|p| p.pid.as_raw()),
        );
        if let Some(cg) = &c.cgroup {
            // A frozen group would keep SIGKILLed tasks around.
            let _ = cg.freeze(false);
        }
        for pid in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut procs = vec![c.init.clone()];
        procs.extend(lock(&c.execs).values().cloned());
        for p in procs {
            let left = deadline.saturating_duration_since(Instant::now());
            if p.exit.wait_timeout(left).is_none() {
                tracing::warn!(
                    container_id = id,
                    pid = p.pid.as_raw(),
                    "process survived SIGKILL"
                );
            }
        }
        unmount_rootfs(&c.dir);
        if let Some(cg) = &c.cgroup {
            cg.remove()?;
        }
        lock(&self.containers).remove(id);
        tracing::info!(container_id = id, "container removed");
        Ok(())
    }

    /// Ids of all containers.
    pub fn ids(&self) -> Vec<String> {
        lock(&self.containers).keys().cloned().collect()
    }
}

/// A helper process right after the clone.
struct Helper {
    pid: Pid,
    exit: Arc<ExitCell>,
    control: OwnedFd,
}

impl Helper {
    /// Reads helper messages up to `Ready`; returns the control socket and the pty master.
    fn wait_ready(&self) -> Result<(OwnedFd, Option<OwnedFd>), ContainerError> {
        let tv =
            nix::sys::time::TimeVal::new(i64::try_from(SETUP_TIMEOUT.as_secs()).unwrap_or(60), 0);
        let _ = nix::sys::socket::setsockopt(
            &self.control,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &tv,
        );
        let mut pty = None;
        loop {
            match recv_message(&self.control)? {
                Some((HelperMessage::Pty, fd)) => pty = fd,
                Some((HelperMessage::Ready, _)) => break,
                Some((
                    HelperMessage::Failed {
                        exit_status,
                        message,
                    },
                    _,
                )) => {
                    return Err(ContainerError::StartFailed {
                        exit_status,
                        message,
                    });
                }
                None => {
                    let info = self.exit.wait_timeout(Duration::from_secs(5));
                    return Err(ContainerError::StartFailed {
                        exit_status: 1,
                        message: format!(
                            "container helper exited during setup (status {})",
                            info.map_or(-1, |i| i.status)
                        ),
                    });
                }
            }
        }
        let zero = nix::sys::time::TimeVal::new(0, 0);
        let _ = nix::sys::socket::setsockopt(
            &self.control,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &zero,
        );
        let control = self.control.try_clone().map_err(ContainerError::Io)?;
        Ok((control, pty))
    }
}

/// Receives one helper message (and a descriptor, if one came with it); `None` at end of file.
fn recv_message(
    control: &OwnedFd,
) -> Result<Option<(HelperMessage, Option<OwnedFd>)>, ContainerError> {
    let mut buf = vec![0u8; 64 * 1024];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let (len, fd) = loop {
        let mut iov = [IoSliceMut::new(&mut buf)];
        match nix::sys::socket::recvmsg::<()>(
            control.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(msg) => {
                let mut fd = None;
                if let Ok(cmsgs) = msg.cmsgs() {
                    for c in cmsgs {
                        if let ControlMessageOwned::ScmRights(fds) = c {
                            for raw in fds {
                                // SAFETY: SCM_RIGHTS installed this descriptor in our table
                                // just now; nothing else owns it.
                                let owned = unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) };
                                fd = Some(owned);
                            }
                        }
                    }
                }
                break (msg.bytes, fd);
            }
            Err(Errno::EINTR) => continue,
            Err(source) => {
                return Err(ContainerError::Helper {
                    op: "read from",
                    source,
                });
            }
        }
    };
    if len == 0 {
        return Ok(None);
    }
    let bytes = buf.get(..len).unwrap_or_default();
    let msg = serde_json::from_slice(bytes).map_err(|_| ContainerError::Helper {
        op: "decode a message of",
        source: Errno::EPROTO,
    })?;
    Ok(Some((msg, fd)))
}

/// Clones the helper; the child only rearranges descriptors and execs (async-signal-safe
/// calls only, since the agent is multi-threaded).
fn clone_helper(
    exe: &CString,
    arg: &CString,
    fds: &[(RawFd, RawFd); 5],
    flags: CloneFlags,
) -> Result<Pid, Errno> {
    let argv = [exe.as_ptr(), arg.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let mut stack = vec![0u8; 256 * 1024];
    let child = Box::new(move || -> isize {
        let mut moved = [-1 as RawFd; 5];
        for (slot, (src, _)) in moved.iter_mut().zip(fds.iter()) {
            // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor inherited from the parent.
            *slot = unsafe { libc::fcntl(*src, libc::F_DUPFD_CLOEXEC, 10) };
            if *slot < 0 {
                return 127;
            }
        }
        for (tmp, (_, target)) in moved.iter().zip(fds.iter()) {
            // SAFETY: dup2 onto a small fixed descriptor number; clears close-on-exec there.
            if unsafe { libc::dup2(*tmp, *target) } < 0 {
                return 127;
            }
        }
        // SAFETY: argv and envp are NUL-terminated arrays of valid C strings that outlive
        // this call (they live in the parent's copied address space).
        unsafe { libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        127
    });
    // SAFETY: no CLONE_VM: the child runs on its own copy of memory and only makes the
    // async-signal-safe calls above before execve or returning.
    unsafe { nix::sched::clone(child, &mut stack, flags, Some(libc::SIGCHLD)) }
}

fn watch_exit(p: &Arc<Proc>) {
    let exit = p.exit.clone();
    let drain = p.drain.clone();
    let spawned = std::thread::Builder::new()
        .name("exit-watch".into())
        .spawn(move || {
            exit.wait();
            drain.mark_exited();
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot watch a process exit; idle output pipes stay open");
    }
}

fn mkdirs(path: &Path) -> Result<(), ContainerError> {
    std::fs::create_dir_all(path).map_err(|source| ContainerError::StateDir {
        path: path.to_owned(),
        source,
    })
}

fn do_mount(
    what: &str,
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), ContainerError> {
    nix::mount::mount(source, target, fstype, flags, data).map_err(|source| ContainerError::Mount {
        what: what.to_owned(),
        target: target.to_owned(),
        source,
    })
}

/// Mounts `source` read-only as the lower layer and an overlay with a tmpfs upper layer;
/// returns the overlay's mount point.
fn mount_rootfs(dir: &Path, source: &str, fstype: &str) -> Result<PathBuf, ContainerError> {
    let lower = dir.join("lower");
    let rw = dir.join("rw");
    let rootfs = dir.join("rootfs");
    for d in [&lower, &rw, &rootfs] {
        mkdirs(d)?;
    }
    let fstype = if fstype.is_empty() { "ext4" } else { fstype };
    let result = (|| {
        if fstype == "bind" {
            do_mount(
                source,
                Some(source),
                &lower,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None,
            )?;
            do_mount(
                source,
                None,
                &lower,
                None,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                None,
            )?;
        } else {
            do_mount(
                source,
                Some(source),
                &lower,
                Some(fstype),
                MsFlags::MS_RDONLY,
                None,
            )?;
        }
        // The upper layer gets its own tmpfs so it never sits on a file system overlayfs
        // refuses as upper (such as another overlay).
        do_mount(
            "tmpfs",
            Some("tmpfs"),
            &rw,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        )?;
        mkdirs(&rw.join("upper"))?;
        mkdirs(&rw.join("work"))?;
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.display(),
            rw.join("upper").display(),
            rw.join("work").display()
        );
        do_mount(
            "overlay",
            Some("overlay"),
            &rootfs,
            Some("overlay"),
            MsFlags::empty(),
            Some(&data),
        )
    })();
    if let Err(e) = result {
        unmount_rootfs(dir);
        return Err(e);
    }
    Ok(rootfs)
}

fn unmount_rootfs(dir: &Path) {
    for sub in ["rootfs", "rw", "lower"] {
        let p = dir.join(sub);
        let _ = nix::mount::umount2(&p, MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_dir_all(dir);
}
