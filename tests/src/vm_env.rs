//! What the VM test runner (`tests/run-vm-tests`) hands to VM tests through the environment:
//! the guest kernel, the test initramfs and a directory for results that outlive the run.
//! Inside the VM test host these are host paths, visible because L1 sees the host's files.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable naming the guest kernel (`vmlinux`, from `make guest-kernel`).
pub const KERNEL_ENV: &str = "SQUIB_TEST_KERNEL";
/// Environment variable naming the same guest kernel as a `bzImage` (also from
/// `make guest-kernel`), for tests of the Linux boot protocol's load path.
pub const BZIMAGE_ENV: &str = "SQUIB_TEST_BZIMAGE";
/// Environment variable naming the busybox test initramfs (from `make test-initramfs`).
pub const INITRAMFS_ENV: &str = "SQUIB_TEST_INITRAMFS";
/// Environment variable naming a directory whose contents survive the VM test host.
pub const RESULTS_ENV: &str = "SQUIB_TEST_RESULTS";

/// The line the test initramfs's `/init` prints once it runs.
pub const INIT_READY_MARKER: &str = "SQUIB-TEST-INIT-READY";
/// The prefix of the line the test initramfs prints after `/squib-test`, before its status.
pub const TEST_EXIT_MARKER: &str = "SQUIB-TEST-EXIT ";

/// Why a test input is missing.
#[derive(Debug, thiserror::Error)]
pub enum VmEnvError {
    /// The variable is not set: the test was not started by `tests/run-vm-tests`.
    #[error("{var} is not set; run VM tests through tests/run-vm-tests (or set {var} yourself)")]
    Unset {
        /// The variable.
        var: &'static str,
    },
    /// The variable names something that is not a file.
    #[error("{var}={} is not a file", path.display())]
    NotAFile {
        /// The variable.
        var: &'static str,
        /// Its value.
        path: PathBuf,
    },
    /// `guest-image/mkinitramfs` could not be run or failed.
    #[error("guest-image/mkinitramfs {} failed: {detail}", out.display())]
    MakeInitramfs {
        /// The archive it was asked to write.
        out: PathBuf,
        /// Its exit status or the spawn error, and its stderr.
        detail: String,
    },
}

fn file_from_env(var: &'static str) -> Result<PathBuf, VmEnvError> {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .ok_or(VmEnvError::Unset { var })?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(VmEnvError::NotAFile { var, path })
    }
}

/// The guest kernel to boot, from [`KERNEL_ENV`].
///
/// # Errors
/// [`VmEnvError::Unset`] or [`VmEnvError::NotAFile`].
pub fn test_kernel() -> Result<PathBuf, VmEnvError> {
    file_from_env(KERNEL_ENV)
}

/// The guest kernel as a `bzImage`, from [`BZIMAGE_ENV`].
///
/// # Errors
/// [`VmEnvError::Unset`] or [`VmEnvError::NotAFile`].
pub fn test_bzimage() -> Result<PathBuf, VmEnvError> {
    file_from_env(BZIMAGE_ENV)
}

/// The test initramfs, from [`INITRAMFS_ENV`].
///
/// # Errors
/// [`VmEnvError::Unset`] or [`VmEnvError::NotAFile`].
pub fn test_initramfs() -> Result<PathBuf, VmEnvError> {
    file_from_env(INITRAMFS_ENV)
}

/// A directory for files worth keeping (console logs of failed boots), from [`RESULTS_ENV`];
/// `None` when the runner did not provide one.
#[must_use]
pub fn results_dir() -> Option<PathBuf> {
    std::env::var_os(RESULTS_ENV)
        .map(PathBuf::from)
        .filter(|p| p.is_dir())
}

/// Environment variable that `tests/run-vm-tests` sets (to `1`) when the tests run inside the
/// emulated VM test host rather than on a hardware KVM.
pub const EMULATED_HOST_ENV: &str = "SQUIB_VM_TEST_EMULATED";

/// Whether the tests run inside the emulated VM test host ([`EMULATED_HOST_ENV`]), whose
/// emulation of nested virtualization fails on its own under some loads (README, "Known faults
/// of the VM test host"); a test may size such a load down there.
#[must_use]
pub fn in_emulated_host() -> bool {
    std::env::var_os(EMULATED_HOST_ENV).is_some_and(|v| v == "1")
}

/// The agent initramfs that `make guest-image` builds: `SQUIB_AGENT_INITRAMFS` when set (the
/// VM test runner sets it), else `guest/initramfs` in the squib cache (`SQUIB_CACHE`, by default
/// `~/.cache/squib`). Not checked: a test that boots it reports a missing file.
#[must_use]
pub fn agent_initramfs() -> PathBuf {
    if let Some(p) = std::env::var_os("SQUIB_AGENT_INITRAMFS") {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("SQUIB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/squib")
        });
    cache.join("guest/initramfs")
}

/// The repository's root directory (where the Makefile is).
#[must_use]
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Builds a test initramfs at `out` with the files of `extra_dir` added (an executable
/// `squib-test` there runs after [`INIT_READY_MARKER`]), using `guest-image/mkinitramfs`.
///
/// # Errors
/// [`VmEnvError::MakeInitramfs`] if the script cannot run or fails.
pub fn make_initramfs(out: &Path, extra_dir: Option<&Path>) -> Result<(), VmEnvError> {
    let mut cmd = Command::new(repo_root().join("guest-image/mkinitramfs"));
    cmd.arg(out);
    if let Some(extra) = extra_dir {
        cmd.arg(extra);
    }
    let fail = |detail: String| VmEnvError::MakeInitramfs {
        out: out.to_path_buf(),
        detail,
    };
    let output = cmd.output().map_err(|e| fail(e.to_string()))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(fail(format!(
            "{}: {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )))
    }
}

/// A shell command line for a container to hang its own guest for good, as a guest that stops
/// answering does, and the console line that says it did ([`HANG_GUEST_MARK`]).
///
/// The container must be allowed to write to `/proc/sys` and `/proc/sysrq-trigger` (privileged,
/// or a spec without `readonlyPaths`). The guest kernel is told to stay in its panic loop
/// (`kernel.panic = 0`) and to print nothing on the console (`kernel.printk = 0`: squib-vmm
/// stops a VM whose console shows the end of a panic), then crashed through sysrq: the vCPU
/// spins in the panic loop, and the agent never answers again. If any step fails the command
/// prints `alive` and exits 0.
pub const HANG_GUEST_SCRIPT: &str = concat!(
    "echo 0 > /proc/sys/kernel/panic && echo 0 > /proc/sys/kernel/printk",
    " && echo c > /proc/sysrq-trigger; echo alive"
);

/// What the guest console shows once [`HANG_GUEST_SCRIPT`] crashed the guest.
pub const HANG_GUEST_MARK: &str = "sysrq: Trigger a crash";
