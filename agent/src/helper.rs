//! The container helper: a fresh exec of the agent binary that turns itself into one
//! container process.
//!
//! The agent clones a child into the new (or the container's) namespaces and makes it exec
//! `squib-agent` with [`HELPER_ARG`]; the child is therefore single-threaded and free to mount,
//! `setns`, drop privileges and finally `execve` the workload. It talks to the agent over two
//! descriptors:
//!
//! - fd [`CONTROL_FD`]: a `SOCK_SEQPACKET` socket. The helper sends [`HelperMessage`]s (a pty
//!   master travels with [`HelperMessage::Pty`] as `SCM_RIGHTS`); for an init process it then
//!   blocks until the agent writes one byte (start). The socket is close-on-exec, so end of
//!   file after `Ready` means the workload's `execve` succeeded.
//! - fd [`CONFIG_FD`]: a pipe carrying one JSON [`HelperConfig`].
//!
//! Every failure before the `execve` is reported as [`HelperMessage::Failed`] with runc's
//! wording and the conventional status (127 not found, 126 not executable, 1 otherwise).

use std::ffi::CString;
use std::fs;
use std::io::{IoSlice, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::socket::{ControlMessage, MsgFlags};
use nix::sys::stat::{Mode, SFlag};
use nix::unistd::{Gid, Uid};
use serde::{Deserialize, Serialize};

use crate::spec::{NamespaceSet, ProcessSettings, RootSettings};

/// `argv[1]` that selects helper mode.
pub const HELPER_ARG: &str = "__squib-container-helper";
/// Descriptor of the control socket in the helper.
pub const CONTROL_FD: RawFd = 3;
/// Descriptor of the config pipe in the helper.
pub const CONFIG_FD: RawFd = 4;

/// PATH used when the process environment has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What the helper should become.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HelperConfig {
    /// The process to run.
    pub process: ProcessSettings,
    /// A container's init or an exec'd process.
    pub mode: HelperMode,
}

/// The two kinds of helper.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HelperMode {
    /// A new container's first process; the clone already created its namespaces.
    Init {
        /// The prepared root (an overlay mount) in the agent's mount namespace.
        rootfs: String,
        /// Root settings from the spec.
        root: RootSettings,
        /// Namespaces that were created.
        namespaces: NamespaceSet,
    },
    /// A process joining a running container (the clone already entered its PID namespace).
    Exec {
        /// Agent-side pid of the container's init, whose namespaces to join.
        init_pid: i32,
        /// Namespaces the container has.
        namespaces: NamespaceSet,
    },
}

/// Messages from the helper to the agent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum HelperMessage {
    /// The pty master is attached as `SCM_RIGHTS`.
    Pty,
    /// Setup is complete; an init waits for the start byte, an exec execs at once.
    Ready,
    /// The process could not be set up or exec'd.
    Failed {
        /// 127, 126 or 1.
        exit_status: i32,
        /// runc-style description.
        message: String,
    },
}

/// A setup failure inside the helper.
#[derive(Debug)]
struct Failure {
    exit_status: i32,
    message: String,
}

impl Failure {
    fn new(message: impl Into<String>) -> Self {
        Self {
            exit_status: 1,
            message: message.into(),
        }
    }

    fn errno(what: impl std::fmt::Display, e: Errno) -> Self {
        Self::new(format!("{what}: {}", errno_text(e)))
    }
}

/// Lower-case strerror text, as Go prints it.
fn errno_text(e: Errno) -> String {
    let s = e.desc();
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    if let Some(first) = chars.next() {
        out.extend(first.to_lowercase());
    }
    out.extend(chars);
    out
}

/// Entry point of helper mode; never returns.
pub fn main() -> ! {
    // SAFETY: fd CONTROL_FD was placed by the agent's clone child and is owned by nothing else
    // in this freshly exec'd process.
    let control = unsafe { OwnedFd::from_raw_fd(CONTROL_FD) };
    let status = match run(&control) {
        Ok(never) => match never {},
        Err(f) => {
            let _ = send(
                &control,
                &HelperMessage::Failed {
                    exit_status: f.exit_status,
                    message: f.message,
                },
                None,
            );
            f.exit_status
        }
    };
    std::process::exit(status)
}

enum Never {}

fn run(control: &OwnedFd) -> Result<Never, Failure> {
    close_other_fds();
    // The agent learns that the workload's execve succeeded from end of file on this socket.
    nix::fcntl::fcntl(
        control,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(|e| Failure::errno("mark the control socket close-on-exec", e))?;
    let config = read_config()?;
    let p = &config.process;
    let mut pty_master = None;
    match &config.mode {
        HelperMode::Init {
            rootfs,
            root,
            namespaces,
        } => {
            setup_root(Path::new(rootfs), root, *namespaces)?;
        }
        HelperMode::Exec {
            init_pid,
            namespaces,
        } => join_namespaces(*init_pid, *namespaces)?,
    }
    if p.terminal {
        pty_master = Some(setup_pty(p)?);
    } else {
        nix::unistd::setsid().map_err(|e| Failure::errno("setsid", e))?;
    }
    if let Some(master) = pty_master {
        send(control, &HelperMessage::Pty, Some(master.as_raw_fd()))
            .map_err(|e| Failure::errno("send pty master", e))?;
        drop(master);
    }
    prepare_cwd(p)?;
    for r in &p.rlimits {
        set_rlimit(r.resource, r.soft, r.hard)?;
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(p.umask));
    switch_user(p)?;
    let exe = resolve_executable(p)?;
    send(control, &HelperMessage::Ready, None).map_err(|e| Failure::errno("report ready", e))?;
    if matches!(config.mode, HelperMode::Init { .. }) {
        wait_for_start(control)?;
    }
    exec(&exe, p)
}

/// Closes every descriptor above the two the agent passed; a leaked agent descriptor must not
/// reach the workload.
fn close_other_fds() {
    // SAFETY: close_range only closes descriptors; none above CONFIG_FD is owned by Rust code
    // in this fresh process.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            CONFIG_FD + 1,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        );
    }
}

fn read_config() -> Result<HelperConfig, Failure> {
    // SAFETY: CONFIG_FD was placed by the agent and is owned by nothing else here.
    let mut pipe = fs::File::from(unsafe { OwnedFd::from_raw_fd(CONFIG_FD) });
    let mut buf = Vec::new();
    pipe.read_to_end(&mut buf)
        .map_err(|e| Failure::new(format!("read helper config: {e}")))?;
    serde_json::from_slice(&buf).map_err(|e| Failure::new(format!("parse helper config: {e}")))
}

fn send(control: &OwnedFd, msg: &HelperMessage, fd: Option<RawFd>) -> nix::Result<()> {
    let bytes = serde_json::to_vec(msg).map_err(|_| Errno::EINVAL)?;
    let iov = [IoSlice::new(&bytes)];
    let fds: Vec<RawFd> = fd.into_iter().collect();
    let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
        Vec::new()
    } else {
        vec![ControlMessage::ScmRights(&fds)]
    };
    nix::sys::socket::sendmsg::<()>(control.as_raw_fd(), &iov, &cmsgs, MsgFlags::empty(), None)?;
    Ok(())
}

fn wait_for_start(control: &OwnedFd) -> Result<(), Failure> {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(control, &mut byte) {
            Ok(1) => return Ok(()),
            // The agent went away or removed the container before starting it.
            Ok(_) => std::process::exit(1),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(Failure::errno("wait for start", e)),
        }
    }
}

fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), Failure> {
    nix::mount::mount(source, target, fstype, flags, data).map_err(|e| {
        Failure::errno(
            format!(
                "mount {} on {} (type {})",
                source.unwrap_or("none"),
                target.display(),
                fstype.unwrap_or("none")
            ),
            e,
        )
    })
}

/// Joins `dest` (absolute, in the container) to `root` without letting symlinks in the image
/// lead outside `root`: each symlink met on the way is resolved relative to `root`.
pub fn resolve_in_root(root: &Path, dest: &str) -> PathBuf {
    let mut pending: Vec<String> = dest
        .split('/')
        .filter(|c| !c.is_empty())
        .map(str::to_owned)
        .rev()
        .collect();
    let mut parts: Vec<String> = Vec::new();
    let mut links = 0;
    while let Some(c) = pending.pop() {
        match c.as_str() {
            "." => continue,
            ".." => {
                parts.pop();
                continue;
            }
            _ => {}
        }
        let candidate = root.join(parts.iter().collect::<PathBuf>()).join(&c);
        match fs::read_link(&candidate) {
            Ok(target) if links < 40 => {
                links += 1;
                let t = target.to_string_lossy().into_owned();
                if t.starts_with('/') {
                    parts.clear();
                }
                pending.extend(
                    t.split('/')
                        .filter(|c| !c.is_empty())
                        .map(str::to_owned)
                        .rev(),
                );
            }
            _ => parts.push(c),
        }
    }
    root.join(parts.iter().collect::<PathBuf>())
}

struct MountOptions {
    flags: MsFlags,
    propagation: MsFlags,
    data: Vec<String>,
}

fn parse_mount_options(options: &[String]) -> MountOptions {
    let mut flags = MsFlags::empty();
    let mut propagation = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        let (set, clear) = match o.as_str() {
            "ro" => (MsFlags::MS_RDONLY, MsFlags::empty()),
            "rw" => (MsFlags::empty(), MsFlags::MS_RDONLY),
            "nosuid" => (MsFlags::MS_NOSUID, MsFlags::empty()),
            "suid" => (MsFlags::empty(), MsFlags::MS_NOSUID),
            "nodev" => (MsFlags::MS_NODEV, MsFlags::empty()),
            "dev" => (MsFlags::empty(), MsFlags::MS_NODEV),
            "noexec" => (MsFlags::MS_NOEXEC, MsFlags::empty()),
            "exec" => (MsFlags::empty(), MsFlags::MS_NOEXEC),
            "sync" => (MsFlags::MS_SYNCHRONOUS, MsFlags::empty()),
            "async" => (MsFlags::empty(), MsFlags::MS_SYNCHRONOUS),
            "dirsync" => (MsFlags::MS_DIRSYNC, MsFlags::empty()),
            "noatime" => (MsFlags::MS_NOATIME, MsFlags::empty()),
            "atime" => (MsFlags::empty(), MsFlags::MS_NOATIME),
            "nodiratime" => (MsFlags::MS_NODIRATIME, MsFlags::empty()),
            "diratime" => (MsFlags::empty(), MsFlags::MS_NODIRATIME),
            "relatime" => (MsFlags::MS_RELATIME, MsFlags::empty()),
            "norelatime" => (MsFlags::empty(), MsFlags::MS_RELATIME),
            "strictatime" => (MsFlags::MS_STRICTATIME, MsFlags::empty()),
            "bind" => (MsFlags::MS_BIND, MsFlags::empty()),
            "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, MsFlags::empty()),
            "private" | "rprivate" | "shared" | "rshared" | "slave" | "rslave" | "unbindable"
            | "runbindable" => {
                let p = match o.trim_start_matches('r') {
                    "private" => MsFlags::MS_PRIVATE,
                    "shared" => MsFlags::MS_SHARED,
                    "slave" => MsFlags::MS_SLAVE,
                    _ => MsFlags::MS_UNBINDABLE,
                };
                propagation |= p;
                if o.starts_with('r') {
                    propagation |= MsFlags::MS_REC;
                }
                continue;
            }
            // Options that steer runtimes rather than the kernel.
            "tmpcopyup" | "rro" | "rrw" | "defaults" => continue,
            other => {
                data.push(other.to_owned());
                continue;
            }
        };
        flags |= set;
        flags &= !clear;
    }
    MountOptions {
        flags,
        propagation,
        data,
    }
}

fn setup_root(rootfs: &Path, root: &RootSettings, ns: NamespaceSet) -> Result<(), Failure> {
    mount(
        None,
        Path::new("/"),
        None,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None,
    )?;
    if ns.net {
        crate::system::loopback_up().map_err(|e| Failure::new(format!("bring up lo: {e}")))?;
    }
    let mut dev_is_tmpfs = false;
    for m in &root.mounts {
        let dest = resolve_in_root(rootfs, &m.destination);
        let opts = parse_mount_options(&m.options);
        let data = opts.data.join(",");
        let data = (!data.is_empty()).then_some(data.as_str());
        if m.kind == "bind" {
            let src = Path::new(&m.source);
            let src_is_dir = fs::metadata(src)
                .map(|md| md.is_dir())
                .map_err(|e| Failure::new(format!("bind mount source {}: {e}", src.display())))?;
            create_mount_point(&dest, src_is_dir)?;
            let base = MsFlags::MS_BIND | (opts.flags & MsFlags::MS_REC);
            mount(Some(&m.source), &dest, None, base, None)?;
            let remount = opts.flags & !(MsFlags::MS_BIND | MsFlags::MS_REC);
            if !remount.is_empty() {
                mount(
                    None,
                    &dest,
                    None,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | remount,
                    None,
                )?;
            }
        } else {
            create_mount_point(&dest, true)?;
            let (fstype, source) = match m.kind.as_str() {
                // The guest has cgroup v2 only.
                "cgroup" | "cgroup2" => ("cgroup2", "cgroup2"),
                other => (other, m.source.as_str()),
            };
            if m.destination == "/dev" && fstype == "tmpfs" {
                dev_is_tmpfs = true;
            }
            mount(Some(source), &dest, Some(fstype), opts.flags, data)?;
        }
        if !opts.propagation.is_empty() {
            mount(None, &dest, None, opts.propagation, None)?;
        }
    }
    if dev_is_tmpfs {
        default_devices(rootfs)?;
    }
    make_devices(rootfs, &root.devices)?;
    if ns.uts
        && let Some(h) = &root.hostname
    {
        nix::unistd::sethostname(h).map_err(|e| Failure::errno("sethostname", e))?;
    }
    pivot_into(rootfs)?;
    for (key, value) in &root.sysctl {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        fs::write(&path, value).map_err(|e| Failure::new(format!("write sysctl {key}: {e}")))?;
    }
    for p in &root.masked_paths {
        mask_path(p)?;
    }
    for p in &root.readonly_paths {
        readonly_path(p)?;
    }
    if root.readonly {
        mount(
            None,
            Path::new("/"),
            None,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            None,
        )?;
    }
    Ok(())
}

fn create_mount_point(dest: &Path, dir: bool) -> Result<(), Failure> {
    if dir {
        fs::create_dir_all(dest).map_err(|e| Failure::new(format!("mkdir {}: {e}", dest.display())))
    } else {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Failure::new(format!("mkdir {}: {e}", parent.display())))?;
        }
        if !dest.exists() {
            fs::File::create(dest)
                .map_err(|e| Failure::new(format!("create {}: {e}", dest.display())))?;
        }
        Ok(())
    }
}

fn default_devices(rootfs: &Path) -> Result<(), Failure> {
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        make_device(
            rootfs,
            &crate::spec::DeviceSetting {
                kind: "c".to_owned(),
                path: format!("/dev/{name}"),
                major,
                minor,
                mode: 0o666,
                uid: 0,
                gid: 0,
            },
        )?;
    }
    let dev = resolve_in_root(rootfs, "/dev");
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
        ("ptmx", "pts/ptmx"),
    ] {
        let path = dev.join(link);
        if fs::symlink_metadata(&path).is_err() {
            std::os::unix::fs::symlink(target, &path)
                .map_err(|e| Failure::new(format!("symlink {}: {e}", path.display())))?;
        }
    }
    Ok(())
}

/// Makes the spec's device nodes, as runc does: `/dev/ptmx` is left out (it is the symlink to
/// the container's own devpts, made with the default devices; the host's ptmx, which
/// `ctr run --privileged` lists, would otherwise resolve through it to the devpts instance's
/// own node), and a node that already exists and cannot be replaced is kept.
fn make_devices(rootfs: &Path, devices: &[crate::spec::DeviceSetting]) -> Result<(), Failure> {
    for d in devices {
        if Path::new(&d.path)
            .components()
            .eq(Path::new("/dev/ptmx").components())
        {
            continue;
        }
        make_device(rootfs, d)?;
    }
    Ok(())
}

fn make_device(rootfs: &Path, d: &crate::spec::DeviceSetting) -> Result<(), Failure> {
    let path = resolve_in_root(rootfs, &d.path);
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent)
            .map_err(|e| Failure::new(format!("mkdir {}: {e}", parent.display())))?;
    }
    let kind = match d.kind.as_str() {
        "c" | "u" => SFlag::S_IFCHR,
        "b" => SFlag::S_IFBLK,
        "p" => SFlag::S_IFIFO,
        other => return Err(Failure::new(format!("device {}: type {other:?}", d.path))),
    };
    let _ = fs::remove_file(&path);
    let dev = nix::sys::stat::makedev(d.major, d.minor);
    match nix::sys::stat::mknod(&path, kind, Mode::from_bits_truncate(d.mode & 0o7777), dev) {
        // Something that could not be removed is there (a mount point, a directory).
        Err(Errno::EEXIST) => return Ok(()),
        r => r.map_err(|e| Failure::errno(format!("mknod {}", d.path), e))?,
    }
    fs::set_permissions(&path, fs::Permissions::from_mode(d.mode & 0o7777))
        .map_err(|e| Failure::new(format!("chmod {}: {e}", d.path)))?;
    nix::unistd::chown(
        &path,
        Some(Uid::from_raw(d.uid)),
        Some(Gid::from_raw(d.gid)),
    )
    .map_err(|e| Failure::errno(format!("chown {}", d.path), e))
}

fn pivot_into(rootfs: &Path) -> Result<(), Failure> {
    nix::unistd::chdir(rootfs).map_err(|e| Failure::errno("chdir to new root", e))?;
    nix::unistd::pivot_root(".", ".").map_err(|e| Failure::errno("pivot_root", e))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH)
        .map_err(|e| Failure::errno("detach old root", e))?;
    nix::unistd::chdir("/").map_err(|e| Failure::errno("chdir /", e))
}

fn mask_path(p: &str) -> Result<(), Failure> {
    let path = Path::new(p);
    match fs::metadata(path) {
        Err(_) => Ok(()),
        Ok(md) if md.is_dir() => {
            mount(Some("tmpfs"), path, Some("tmpfs"), MsFlags::MS_RDONLY, None)
        }
        Ok(_) => mount(Some("/dev/null"), path, None, MsFlags::MS_BIND, None),
    }
}

fn readonly_path(p: &str) -> Result<(), Failure> {
    let path = Path::new(p);
    if fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    mount(
        Some(p),
        path,
        None,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None,
    )?;
    mount(
        None,
        path,
        None,
        MsFlags::MS_BIND
            | MsFlags::MS_REMOUNT
            | MsFlags::MS_RDONLY
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None,
    )
}

fn join_namespaces(init_pid: i32, ns: NamespaceSet) -> Result<(), Failure> {
    // Open every namespace first: once the mount namespace changes, /proc is the container's.
    let mut wanted: Vec<(&str, CloneFlags)> = Vec::new();
    if ns.ipc {
        wanted.push(("ipc", CloneFlags::CLONE_NEWIPC));
    }
    if ns.uts {
        wanted.push(("uts", CloneFlags::CLONE_NEWUTS));
    }
    if ns.net {
        wanted.push(("net", CloneFlags::CLONE_NEWNET));
    }
    if ns.cgroup {
        wanted.push(("cgroup", CloneFlags::CLONE_NEWCGROUP));
    }
    wanted.push(("mnt", CloneFlags::CLONE_NEWNS));
    let mut opened = Vec::with_capacity(wanted.len());
    for (name, flag) in wanted {
        let path = format!("/proc/{init_pid}/ns/{name}");
        let f = fs::File::open(&path).map_err(|e| Failure::new(format!("open {path}: {e}")))?;
        opened.push((name, flag, f));
    }
    for (name, flag, f) in opened {
        nix::sched::setns(f, flag)
            .map_err(|e| Failure::errno(format!("join {name} namespace"), e))?;
    }
    nix::unistd::chdir("/").map_err(|e| Failure::errno("chdir /", e))
}

fn setup_pty(p: &ProcessSettings) -> Result<OwnedFd, Failure> {
    use nix::fcntl::OFlag;
    let master = nix::pty::posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)
        .map_err(|e| Failure::errno("open /dev/ptmx", e))?;
    nix::pty::grantpt(&master).map_err(|e| Failure::errno("grantpt", e))?;
    nix::pty::unlockpt(&master).map_err(|e| Failure::errno("unlockpt", e))?;
    let name = nix::pty::ptsname_r(&master).map_err(|e| Failure::errno("ptsname", e))?;
    let slave = nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY,
        Mode::empty(),
    )
    .map_err(|e| Failure::errno(format!("open {name}"), e))?;
    if let Some(size) = p.console_size {
        crate::stdio::set_window_size(&slave, size.height, size.width)
            .map_err(|e| Failure::errno("set the initial pty size", e))?;
    }
    nix::unistd::setsid().map_err(|e| Failure::errno("setsid", e))?;
    // SAFETY: TIOCSCTTY takes an integer argument; `slave` is an open tty descriptor.
    let rc = unsafe { libc::ioctl(slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    if rc < 0 {
        return Err(Failure::errno(
            "make the pty the controlling terminal",
            Errno::last(),
        ));
    }
    for target in 0..3 {
        dup_onto(&slave, target)?;
    }
    Ok(master.into())
}

fn dup_onto(fd: &OwnedFd, target: RawFd) -> Result<(), Failure> {
    // SAFETY: dup2 onto a standard descriptor number; the previous occupant (if any) is ours.
    let rc = unsafe { libc::dup2(fd.as_raw_fd(), target) };
    if rc < 0 {
        return Err(Failure::errno("dup2", Errno::last()));
    }
    Ok(())
}

fn prepare_cwd(p: &ProcessSettings) -> Result<(), Failure> {
    let cwd = Path::new(&p.cwd);
    if p.create_cwd {
        match fs::metadata(cwd) {
            Ok(md) if md.is_dir() => {}
            Ok(_) => {
                return Err(Failure::new(format!("mkdir {}: not a directory", p.cwd)));
            }
            Err(_) => fs::create_dir_all(cwd)
                .map_err(|e| Failure::new(format!("mkdir {}: {}", p.cwd, io_text(&e))))?,
        }
    }
    nix::unistd::chdir(cwd).map_err(|e| {
        Failure::new(format!(
            "chdir to cwd ({:?}) set in config.json failed: {}",
            p.cwd,
            errno_text(e)
        ))
    })
}

fn io_text(e: &std::io::Error) -> String {
    e.raw_os_error()
        .map(|c| errno_text(Errno::from_raw(c)))
        .unwrap_or_else(|| e.to_string())
}

fn set_rlimit(resource: i32, soft: u64, hard: u64) -> Result<(), Failure> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    let res = resource
        .try_into()
        .map_err(|_| Failure::new(format!("rlimit type {resource} is out of range")))?;
    // SAFETY: setrlimit reads the struct we pass; the resource number was validated.
    let rc = unsafe { libc::setrlimit(res, &lim) };
    if rc < 0 {
        return Err(Failure::errno(
            format!("error setting rlimit type {resource}"),
            Errno::last(),
        ));
    }
    Ok(())
}

fn switch_user(p: &ProcessSettings) -> Result<(), Failure> {
    use caps::{CapSet, Capability, CapsHashSet};
    let to_set = |v: &[u8]| -> CapsHashSet {
        caps::all()
            .into_iter()
            .filter(|c: &Capability| v.contains(&c.index()))
            .collect()
    };
    if let Some(c) = &p.capabilities {
        let bounding = to_set(&c.bounding);
        for cap in caps::all() {
            if !bounding.contains(&cap) {
                // Capabilities the running kernel does not know fail with EINVAL; skip them.
                let _ = caps::drop(None, CapSet::Bounding, cap);
            }
        }
    }
    let gids: Vec<Gid> = p
        .additional_gids
        .iter()
        .map(|g| Gid::from_raw(*g))
        .collect();
    nix::unistd::setgroups(&gids).map_err(|e| Failure::errno("setgroups", e))?;
    nix::unistd::setresgid(
        Gid::from_raw(p.gid),
        Gid::from_raw(p.gid),
        Gid::from_raw(p.gid),
    )
    .map_err(|e| Failure::errno(format!("setgid {}", p.gid), e))?;
    if p.capabilities.is_some() {
        // SAFETY: plain prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0) };
    }
    nix::unistd::setresuid(
        Uid::from_raw(p.uid),
        Uid::from_raw(p.uid),
        Uid::from_raw(p.uid),
    )
    .map_err(|e| Failure::errno(format!("setuid {}", p.uid), e))?;
    if let Some(c) = &p.capabilities {
        let cap_err = |what: &str, e: caps::errors::CapsError| {
            Failure::new(format!("set {what} capabilities: {e}"))
        };
        // Effective must stay a subset of permitted at every step: shrink it first.
        caps::set(None, CapSet::Effective, &to_set(&c.effective))
            .map_err(|e| cap_err("effective", e))?;
        caps::set(None, CapSet::Permitted, &to_set(&c.permitted))
            .map_err(|e| cap_err("permitted", e))?;
        caps::set(None, CapSet::Inheritable, &to_set(&c.inheritable))
            .map_err(|e| cap_err("inheritable", e))?;
        // The kernel raises an ambient capability only when it is both permitted and
        // inheritable (capabilities(7)). Specs written for runc often list ambient
        // capabilities without the matching inheritable ones (runc skips those), so raise only
        // the ones the kernel can accept instead of refusing to start the process.
        let permitted = to_set(&c.permitted);
        let inheritable = to_set(&c.inheritable);
        for cap in to_set(&c.ambient) {
            if permitted.contains(&cap) && inheritable.contains(&cap) {
                caps::raise(None, CapSet::Ambient, cap).map_err(|e| cap_err("ambient", e))?;
            }
        }
    }
    if p.no_new_privileges {
        // SAFETY: plain prctl with integer arguments.
        let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
        if rc < 0 {
            return Err(Failure::errno("set no_new_privs", Errno::last()));
        }
    }
    Ok(())
}

/// Finds the program like runc does (Go's `exec.LookPath` with the process's PATH) and words
/// failures the way runc does, so engines can map them to 127 and 126.
fn resolve_executable(p: &ProcessSettings) -> Result<PathBuf, Failure> {
    let arg0 = p.args.first().map(String::as_str).unwrap_or_default();
    let not_found = |detail: String| Failure {
        exit_status: 127,
        message: format!("exec: {arg0:?}: {detail}"),
    };
    let not_executable = |detail: &str| Failure {
        exit_status: 126,
        message: format!("exec: {arg0:?}: {detail}"),
    };
    if arg0.contains('/') {
        return match check_executable(Path::new(arg0)) {
            Ok(()) => Ok(PathBuf::from(arg0)),
            Err(Errno::ENOENT) | Err(Errno::ENOTDIR) => {
                Err(not_found(format!("stat {arg0}: no such file or directory")))
            }
            Err(Errno::EISDIR) => Err(not_executable("is a directory")),
            Err(e) => Err(not_executable(&errno_text(e))),
        };
    }
    let path_var = p
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        let candidate = Path::new(dir).join(arg0);
        if check_executable(&candidate).is_ok() {
            return Ok(candidate);
        }
    }
    Err(not_found("executable file not found in $PATH".to_owned()))
}

fn check_executable(path: &Path) -> Result<(), Errno> {
    let md = fs::metadata(path).map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))?;
    if md.is_dir() {
        return Err(Errno::EISDIR);
    }
    if md.mode() & 0o111 == 0 {
        return Err(Errno::EACCES);
    }
    nix::unistd::access(path, nix::unistd::AccessFlags::X_OK)
}

fn exec(exe: &Path, p: &ProcessSettings) -> Result<Never, Failure> {
    let cstr = |s: &str, what: &str| {
        CString::new(s).map_err(|_| Failure::new(format!("{what} {s:?} holds a NUL byte")))
    };
    let path = cstr(&exe.to_string_lossy(), "executable path")?;
    let args = p
        .args
        .iter()
        .map(|a| cstr(a, "process.args entry"))
        .collect::<Result<Vec<_>, _>>()?;
    let env = p
        .env
        .iter()
        .map(|e| cstr(e, "process.env entry"))
        .collect::<Result<Vec<_>, _>>()?;
    reset_signals();
    let e = match nix::unistd::execve(&path, &args, &env) {
        Err(e) => e,
        Ok(never) => match never {},
    };
    let arg0 = p.args.first().map(String::as_str).unwrap_or_default();
    let exit_status = match e {
        Errno::ENOENT => 127,
        _ => 126,
    };
    Err(Failure {
        exit_status,
        message: format!("exec: {arg0:?}: {}", errno_text(e)),
    })
}

/// The workload starts with default dispositions and nothing blocked, whatever the agent (and
/// Rust's runtime, which ignores SIGPIPE) had.
fn reset_signals() {
    use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, signal};
    for sig in Signal::iterator() {
        if sig == Signal::SIGKILL || sig == Signal::SIGSTOP {
            continue;
        }
        // SAFETY: installing SIG_DFL runs no code of ours.
        let _ = unsafe { signal(sig, SigHandler::SigDfl) };
    }
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_resolve_in_root_keeps_symlinks_inside_root() {
        let dir = std::env::temp_dir().join(format!("squib-resolve-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("escape")).unwrap();
        std::os::unix::fs::symlink("../../real", dir.join("rel")).unwrap();
        assert_eq!(
            resolve_in_root(&dir, "/escape/passwd"),
            dir.join("etc/passwd")
        );
        assert_eq!(resolve_in_root(&dir, "/rel/x"), dir.join("real/x"));
        assert_eq!(resolve_in_root(&dir, "/../../a/./b"), dir.join("a/b"));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_make_devices_leaves_ptmx_alone_and_keeps_what_cannot_be_replaced() {
        let root = std::env::temp_dir().join(format!("squib-devs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("dev/pts")).unwrap();
        fs::create_dir_all(root.join("dev/busy")).unwrap();
        std::os::unix::fs::symlink("pts/ptmx", root.join("dev/ptmx")).unwrap();
        let dev = |path: &str, major, minor| crate::spec::DeviceSetting {
            kind: "c".to_owned(),
            path: path.to_owned(),
            major,
            minor,
            mode: 0o666,
            uid: 0,
            gid: 0,
        };
        let devices = [
            dev("/dev/ptmx", 5, 2),
            dev("//dev/./ptmx", 5, 2),
            dev("/dev/busy", 1, 3),
            dev("/dev/null", 1, 3),
        ];
        let made = make_devices(&root, &devices);
        let ptmx = fs::read_link(root.join("dev/ptmx"));
        let pts_empty = fs::read_dir(root.join("dev/pts")).unwrap().next().is_none();
        let busy_is_dir = root.join("dev/busy").is_dir();
        let null = fs::symlink_metadata(root.join("dev/null")).map(|m| m.file_type());
        fs::remove_dir_all(&root).unwrap();
        assert!(made.is_ok(), "{:?}", made.err().map(|f| f.message));
        assert_eq!(ptmx.unwrap(), Path::new("pts/ptmx"));
        assert!(pts_empty, "a node was made through the ptmx symlink");
        assert!(busy_is_dir);
        assert!(std::os::unix::fs::FileTypeExt::is_char_device(
            &null.unwrap()
        ));
    }

    #[test]
    fn test_mount_options_split_flags_and_data() {
        let o = parse_mount_options(&[
            "nosuid".into(),
            "nodev".into(),
            "mode=1777".into(),
            "size=65536k".into(),
            "rprivate".into(),
            "ro".into(),
        ]);
        assert_eq!(
            o.flags,
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_RDONLY
        );
        assert_eq!(
            o.data,
            vec!["mode=1777".to_owned(), "size=65536k".to_owned()]
        );
        assert_eq!(o.propagation, MsFlags::MS_PRIVATE | MsFlags::MS_REC);
    }

    #[test]
    fn test_resolve_executable_uses_runc_wording() {
        let p = ProcessSettings {
            args: vec!["nonexistent".into()],
            env: vec!["PATH=/nonexistent-dir".into()],
            ..Default::default()
        };
        let f = resolve_executable(&p).unwrap_err();
        assert_eq!(f.exit_status, 127);
        assert_eq!(
            f.message,
            r#"exec: "nonexistent": executable file not found in $PATH"#
        );
        let p = ProcessSettings {
            args: vec!["/etc".into()],
            ..Default::default()
        };
        let f = resolve_executable(&p).unwrap_err();
        assert_eq!(
            (f.exit_status, f.message.as_str()),
            (126, r#"exec: "/etc": is a directory"#)
        );
        let p = ProcessSettings {
            args: vec!["/no/such/cmd".into()],
            ..Default::default()
        };
        let f = resolve_executable(&p).unwrap_err();
        assert_eq!(f.exit_status, 127);
        assert!(
            f.message.contains("no such file or directory"),
            "{}",
            f.message
        );
    }
}
