//! PID 1 duties: the guest's own file systems, loopback, kernel modules, the move off the
//! initramfs root, and power-off.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::Path;

use nix::errno::Errno;
use nix::mount::MsFlags;

/// A PID 1 setup step that failed.
#[derive(Debug, thiserror::Error)]
pub enum SystemError {
    /// A mount failed.
    #[error("mount {fstype} on {target}")]
    Mount {
        /// File system type.
        fstype: &'static str,
        /// Mount point.
        target: &'static str,
        /// The errno.
        #[source]
        source: Errno,
    },
    /// A file operation failed.
    #[error("{op} {path}")]
    File {
        /// What was attempted.
        op: &'static str,
        /// The path.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A system call failed.
    #[error("{op}")]
    Sys {
        /// What was attempted.
        op: &'static str,
        /// The errno.
        #[source]
        source: Errno,
    },
}

fn mount_fs(
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), SystemError> {
    let _ = fs::create_dir_all(target);
    match nix::mount::mount(Some(fstype), target, Some(fstype), flags, data) {
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(source) => Err(SystemError::Mount {
            fstype,
            target,
            source,
        }),
    }
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run and the cgroup2 hierarchy, and enables
/// the container controllers.
///
/// # Errors
///
/// The first mount that fails.
pub fn mount_filesystems() -> Result<(), SystemError> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", nosuid_nodev_noexec, None)?;
    mount_fs("sysfs", "/sys", nosuid_nodev_noexec, None)?;
    mount_fs("devtmpfs", "/dev", MsFlags::MS_NOSUID, Some("mode=0755"))?;
    mount_fs(
        "devpts",
        "/dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("gid=5,mode=0620,ptmxmode=0666"),
    )?;
    mount_fs(
        "tmpfs",
        "/dev/shm",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    mount_fs("cgroup2", "/sys/fs/cgroup", nosuid_nodev_noexec, None)?;
    crate::cgroup::enable_controllers(Path::new("/sys/fs/cgroup"));
    let _ = fs::create_dir_all("/sys/fs/cgroup/squib");
    crate::cgroup::enable_controllers(Path::new("/sys/fs/cgroup/squib"));
    Ok(())
}

/// True when `/` is a ramfs or tmpfs. For PID 1 started by the kernel (before
/// [`leave_initramfs`]) that means the initial ramfs, which `pivot_root` cannot leave.
pub fn root_is_initramfs() -> bool {
    // RAMFS_MAGIC from linux/magic.h (not exported by the libc crate).
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    nix::sys::statfs::statfs("/").is_ok_and(|s| {
        let t = s.filesystem_type();
        t == nix::sys::statfs::TMPFS_MAGIC
            || u64::try_from(t.0).is_ok_and(|v| v == u64::from(RAMFS_MAGIC))
    })
}

/// Moves the agent onto a fresh tmpfs root and re-execs it there, so that containers can
/// `pivot_root` away from the guest root (the kernel refuses that for the initial ramfs).
///
/// # Errors
///
/// Any step; on success this function does not return.
pub fn leave_initramfs(exe: &str) -> Result<std::convert::Infallible, SystemError> {
    let new_root = "/.squib-root";
    let _ = fs::create_dir_all(new_root);
    nix::mount::mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(|source| SystemError::Mount {
        fstype: "tmpfs",
        target: "/.squib-root",
        source,
    })?;
    let target = format!("{new_root}/init");
    fs::copy(exe, &target).map_err(|source| SystemError::File {
        op: "copy the agent to",
        path: target.clone(),
        source,
    })?;
    for d in ["dev", "proc", "sys", "run", "tmp"] {
        let _ = fs::create_dir_all(format!("{new_root}/{d}"));
    }
    let console = format!("{new_root}/dev/console");
    let _ = nix::sys::stat::mknod(
        console.as_str(),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(5, 1),
    );
    // Free the initramfs copy; the running image stays mapped.
    let _ = fs::remove_file(exe);
    nix::unistd::chdir(new_root).map_err(|source| SystemError::Sys {
        op: "chdir to the new root",
        source,
    })?;
    nix::mount::mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>).map_err(
        |source| SystemError::Sys {
            op: "move the new root onto /",
            source,
        },
    )?;
    nix::unistd::chroot(".").map_err(|source| SystemError::Sys {
        op: "chroot into the new root",
        source,
    })?;
    nix::unistd::chdir("/").map_err(|source| SystemError::Sys {
        op: "chdir /",
        source,
    })?;
    let path = std::ffi::CString::new("/init").map_err(|_| SystemError::Sys {
        op: "name /init",
        source: Errno::EINVAL,
    })?;
    let arg = std::ffi::CString::new("--switched-root").map_err(|_| SystemError::Sys {
        op: "name the argument",
        source: Errno::EINVAL,
    })?;
    let env: [std::ffi::CString; 0] = [];
    match nix::unistd::execve(&path, &[path.clone(), arg], &env) {
        Err(source) => Err(SystemError::Sys {
            op: "re-exec the agent",
            source,
        }),
        Ok(never) => match never {},
    }
}

/// Points stdin, stdout and stderr at /dev/console (the serial console). The kernel does this
/// only when the initramfs holds a /dev/console node; ours does not need one.
pub fn attach_console() {
    let Ok(console) = nix::fcntl::open(
        "/dev/console",
        nix::fcntl::OFlag::O_RDWR | nix::fcntl::OFlag::O_NOCTTY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    ) else {
        return;
    };
    for target in 0..3 {
        // SAFETY: dup2 onto the standard descriptors, which belong to this process.
        unsafe { libc::dup2(console.as_raw_fd(), target) };
    }
}

/// Brings the loopback interface up (`SIOCSIFFLAGS` with `IFF_UP`).
///
/// # Errors
///
/// The socket or an ioctl failed.
pub fn loopback_up() -> Result<(), SystemError> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|source| SystemError::Sys {
        op: "open a socket for interface ioctls",
        source,
    })?;
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0".iter()) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    // SAFETY: SIOCGIFFLAGS writes into the ifreq we own; the descriptor is a socket.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as _, &mut req) } < 0 {
        return Err(SystemError::Sys {
            op: "read the flags of lo",
            source: Errno::last(),
        });
    }
    // SAFETY: after SIOCGIFFLAGS the union holds ifru_flags.
    unsafe {
        req.ifr_ifru.ifru_flags |= libc::c_short::try_from(libc::IFF_UP).unwrap_or(1);
    }
    // SAFETY: SIOCSIFFLAGS reads the ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as _, &req) } < 0 {
        return Err(SystemError::Sys {
            op: "bring lo up",
            source: Errno::last(),
        });
    }
    Ok(())
}

/// Loads the modules listed in `/lib/modules/<release>/squib.load` (one path per line,
/// relative to that directory), in order. Without that directory this does nothing: the
/// minimal guest kernel has everything built in.
///
/// # Errors
///
/// A listed module cannot be opened or loaded.
pub fn load_modules() -> Result<usize, SystemError> {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = Path::new("/lib/modules").join(&release);
    let Ok(list) = fs::read_to_string(dir.join("squib.load")) else {
        return Ok(0);
    };
    let mut n = 0;
    for line in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = dir.join(line);
        let f = fs::File::open(&path).map_err(|source| SystemError::File {
            op: "open module",
            path: path.display().to_string(),
            source,
        })?;
        match nix::kmod::finit_module(&f, c"", nix::kmod::ModuleInitFlags::empty()) {
            Ok(()) | Err(Errno::EEXIST) => n += 1,
            Err(source) => {
                return Err(SystemError::Sys {
                    op: "load a kernel module",
                    source,
                });
            }
        }
    }
    Ok(n)
}

/// Syncs and ends the guest. On x86_64 the microVM has no ACPI, so power-off could only halt;
/// a reset (the kernel's `reboot=k` or `reboot=t`) is what makes the VMM exit. On aarch64
/// PSCI `SYSTEM_OFF` powers off.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let mode = if cfg!(target_arch = "x86_64") {
        nix::sys::reboot::RebootMode::RB_AUTOBOOT
    } else {
        nix::sys::reboot::RebootMode::RB_POWER_OFF
    };
    let _ = nix::sys::reboot::reboot(mode);
    loop {
        std::thread::park();
    }
}

/// The value of `key=` on the kernel command line.
pub fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline.split_whitespace().find_map(|w| {
        w.strip_prefix(key)
            .and_then(|r| r.strip_prefix('='))
            .map(str::to_owned)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cmdline_value_finds_the_log_level() {
        let c = "console=ttyS0 squib.log=debug quiet squib.logx=1";
        assert_eq!(cmdline_value(c, "squib.log").as_deref(), Some("debug"));
        assert_eq!(cmdline_value(c, "squib.nothing"), None);
    }
}
