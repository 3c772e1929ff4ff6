//! From an OCI bundle to a VM plan: the validated machine-config, boot-source, drives, vsock
//! and entropy actions that build the container's microVM through the controller.
//!
//! Sizing rules (also in README):
//! - vCPUs: `ceil(linux.resources.cpu.quota / period)` when both are set and positive, else the
//!   number of CPUs in `linux.resources.cpu.cpus`, else the configured default (1); then clamped
//!   to 1..=32.
//! - memory: `linux.resources.memory.limit` rounded up to MiB plus [`GUEST_OVERHEAD_MIB`] for
//!   the guest kernel, agent and page cache, else the configured default (256 MiB); never below
//!   [`MIN_GUEST_MEM_MIB`].

use std::path::{Path, PathBuf};

use oci_spec::runtime::Spec;
use squib_core::action::ApiAction;
use squib_core::config::{
    BootSource, CacheType, ConfigError, DeviceId, DriveConfig, EntropyConfig, HugePages, IoEngine,
    MachineConfig, VsockConfig,
};

/// Memory the guest needs beside the container's own limit: kernel, agent, page cache.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// The smallest guest squib boots.
pub const MIN_GUEST_MEM_MIB: u64 = 128;
/// The most vCPUs a guest gets.
pub const MAX_VCPUS: u64 = 32;
/// The guest's vsock context id (each VM has its own vsock device, so one value serves all).
pub const GUEST_CID: u64 = 3;
/// The drive id of the container's root image.
pub const ROOT_DRIVE_ID: &str = "rootfs";
/// The kernel command line squib boots with, before the devices' own entries.
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=-1 quiet i8042.noaux i8042.nomux i8042.dumbkbd nomodule";

/// A bundle the runtime cannot run, naming the field and the value.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// config.json could not be read or parsed.
    #[error("reading {path}")]
    LoadSpec {
        /// The config.json path.
        path: PathBuf,
        /// The parse or I/O error.
        #[source]
        source: oci_spec::OciSpecError,
    },
    /// A required field is absent.
    #[error("config.json: {field} is required")]
    Missing {
        /// The JSON path of the field.
        field: &'static str,
    },
    /// A field holds a value squib cannot honour.
    #[error("config.json: {field} = {value:?}: {reason}")]
    Unsupported {
        /// The JSON path of the field.
        field: &'static str,
        /// The value found.
        value: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// A derived VM setting failed validation.
    #[error("building the VM configuration")]
    Config(#[from] ConfigError),
}

/// Defaults for what a spec does not say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SizingDefaults {
    /// vCPUs when the spec sets no CPU limit.
    pub vcpus: u64,
    /// Guest memory in MiB when the spec sets no memory limit.
    pub mem_mib: u64,
}

impl Default for SizingDefaults {
    fn default() -> Self {
        Self {
            vcpus: 1,
            mem_mib: 256,
        }
    }
}

/// Loads and checks `bundle/config.json`.
///
/// # Errors
///
/// [`PlanError::LoadSpec`] for unreadable or malformed JSON, [`PlanError::Missing`] or
/// [`PlanError::Unsupported`] for specs squib cannot run.
pub fn load_spec(bundle: &Path) -> Result<Spec, PlanError> {
    let path = bundle.join("config.json");
    let spec = Spec::load(&path).map_err(|source| PlanError::LoadSpec { path, source })?;
    check_spec(&spec)?;
    Ok(spec)
}

/// Refuses specs squib cannot run, naming the field.
///
/// # Errors
///
/// [`PlanError::Missing`] or [`PlanError::Unsupported`].
pub fn check_spec(spec: &Spec) -> Result<(), PlanError> {
    let process = spec
        .process()
        .as_ref()
        .ok_or(PlanError::Missing { field: "process" })?;
    let args = process.args().as_ref().ok_or(PlanError::Missing {
        field: "process.args",
    })?;
    match args.first() {
        None => {
            return Err(PlanError::Missing {
                field: "process.args",
            });
        }
        Some(a) if a.is_empty() => {
            return Err(PlanError::Unsupported {
                field: "process.args[0]",
                value: String::new(),
                reason: "the command must not be empty",
            });
        }
        Some(_) => {}
    }
    if !process.cwd().is_absolute() {
        return Err(PlanError::Unsupported {
            field: "process.cwd",
            value: process.cwd().display().to_string(),
            reason: "must be an absolute path",
        });
    }
    if let Some(env) = process.env() {
        for entry in env {
            if !entry.contains('=') {
                return Err(PlanError::Unsupported {
                    field: "process.env",
                    value: entry.clone(),
                    reason: "each entry must be NAME=VALUE",
                });
            }
        }
    }
    if spec.root().is_none() {
        return Err(PlanError::Missing { field: "root" });
    }
    Ok(())
}

/// The guest's vCPU count and memory size for `spec`.
///
/// # Errors
///
/// [`PlanError::Unsupported`] for a malformed `linux.resources.cpu.cpus` list or a negative
/// memory limit.
pub fn sizing(spec: &Spec, defaults: &SizingDefaults) -> Result<(u64, u64), PlanError> {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let from_quota = cpu.and_then(|c| match (c.quota(), c.period()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some(q.unsigned_abs().div_ceil(p)),
        _ => None,
    });
    let from_cpuset = match cpu.and_then(|c| c.cpus().as_deref()) {
        Some(list) if !list.trim().is_empty() => Some(count_cpu_list(list)?),
        _ => None,
    };
    let vcpus = from_quota
        .or(from_cpuset)
        .unwrap_or(defaults.vcpus)
        .clamp(1, MAX_VCPUS);

    let limit = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit());
    let mem_mib = match limit {
        // -1 means "unlimited" in the runtime spec.
        None | Some(-1) => defaults.mem_mib,
        Some(bytes) if bytes > 0 => bytes
            .unsigned_abs()
            .div_ceil(1 << 20)
            .saturating_add(GUEST_OVERHEAD_MIB),
        Some(bytes) => {
            return Err(PlanError::Unsupported {
                field: "linux.resources.memory.limit",
                value: bytes.to_string(),
                reason: "must be positive or -1",
            });
        }
    };
    Ok((vcpus, mem_mib.max(MIN_GUEST_MEM_MIB)))
}

/// Counts the CPUs in a cpuset list such as `0-3,6`.
fn count_cpu_list(list: &str) -> Result<u64, PlanError> {
    let bad = || PlanError::Unsupported {
        field: "linux.resources.cpu.cpus",
        value: list.to_string(),
        reason: "expected a list such as 0-3,6",
    };
    let mut count = 0u64;
    for part in list.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.parse::<u64>(), hi.parse::<u64>()),
            None => (part.parse::<u64>(), part.parse::<u64>()),
        };
        let (lo, hi) = (lo.map_err(|_| bad())?, hi.map_err(|_| bad())?);
        if hi < lo {
            return Err(bad());
        }
        count = count.saturating_add(hi - lo + 1);
    }
    Ok(count)
}

/// The guest kernel and initramfs a VM boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestAssets {
    /// The guest kernel (`vmlinux` or `bzImage`).
    pub kernel: PathBuf,
    /// The initramfs whose /init is the agent.
    pub initramfs: PathBuf,
}

/// Everything that shapes one container's microVM.
#[derive(Debug, Clone)]
pub struct VmPlan {
    /// vCPUs and memory.
    pub machine: MachineConfig,
    /// Kernel, initramfs and command line.
    pub boot: BootSource,
    /// The container's root image, read-only.
    pub root_drive: DriveConfig,
    /// The agent's transport.
    pub vsock: VsockConfig,
    /// Entropy for the guest.
    pub entropy: EntropyConfig,
}

impl VmPlan {
    /// Plans the VM of `spec`, booting `assets`, with `root_image` as its root drive and the
    /// hybrid vsock socket at `vsock_uds`.
    ///
    /// # Errors
    ///
    /// Any [`PlanError`] from sizing or from building the validated configuration.
    pub fn new(
        spec: &Spec,
        defaults: &SizingDefaults,
        assets: &GuestAssets,
        root_image: &Path,
        vsock_uds: &Path,
        extra_boot_args: &str,
    ) -> Result<Self, PlanError> {
        let (vcpus, mem_mib) = sizing(spec, defaults)?;
        let machine = MachineConfig::new(vcpus, mem_mib, false, false, HugePages::None, None)?;
        let mut args = DEFAULT_BOOT_ARGS.to_string();
        if !extra_boot_args.trim().is_empty() {
            args.push(' ');
            args.push_str(extra_boot_args.trim());
        }
        let boot = BootSource::new(
            assets.kernel.clone(),
            Some(assets.initramfs.clone()),
            Some(args),
        )?;
        let root_drive = DriveConfig::new(
            DeviceId::new("drive_id", ROOT_DRIVE_ID.to_string())?,
            root_image.to_path_buf(),
            false,
            true,
            None,
            CacheType::Unsafe,
            IoEngine::Sync,
            None,
        )?;
        let vsock = VsockConfig::new(GUEST_CID, vsock_uds.to_path_buf())?;
        Ok(Self {
            machine,
            boot,
            root_drive,
            vsock,
            entropy: EntropyConfig::default(),
        })
    }

    /// The pre-boot actions that configure this VM, in the order they are dispatched.
    pub fn actions(&self) -> Vec<ApiAction> {
        vec![
            ApiAction::PutMachineConfig(self.machine.clone()),
            ApiAction::PutBootSource(self.boot.clone()),
            ApiAction::PutDrive(self.root_drive.clone()),
            ApiAction::PutVsock(self.vsock.clone()),
            ApiAction::PutEntropy(self.entropy),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    const BASE: &str = r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
        "process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}"#;

    fn with(extra: &str) -> Spec {
        spec(&format!("{BASE}{extra}}}"))
    }

    #[test]
    fn test_sizing_uses_defaults_without_limits() {
        assert_eq!(
            sizing(&with(""), &SizingDefaults::default()).unwrap(),
            (1, 256)
        );
    }

    #[test]
    fn test_sizing_rounds_cpu_quota_up_and_adds_memory_overhead() {
        let s = with(
            r#","linux":{"resources":{"cpu":{"quota":150000,"period":100000},
            "memory":{"limit":536870912}}}"#,
        );
        assert_eq!(
            sizing(&s, &SizingDefaults::default()).unwrap(),
            (2, 512 + GUEST_OVERHEAD_MIB)
        );
    }

    #[test]
    fn test_sizing_counts_cpuset_and_clamps() {
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"0-3,6"}}}"#);
        assert_eq!(sizing(&s, &SizingDefaults::default()).unwrap().0, 5);
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"0-63"}}}"#);
        assert_eq!(sizing(&s, &SizingDefaults::default()).unwrap().0, 32);
        let s = with(r#","linux":{"resources":{"memory":{"limit":1048576}}}"#);
        assert_eq!(
            sizing(&s, &SizingDefaults::default()).unwrap().1,
            MIN_GUEST_MEM_MIB
        );
    }

    #[test]
    fn test_sizing_rejects_bad_cpuset_naming_field() {
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"3-1"}}}"#);
        let err = sizing(&s, &SizingDefaults::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linux.resources.cpu.cpus") && err.contains("3-1"),
            "{err}"
        );
    }

    #[test]
    fn test_check_spec_rejects_empty_args_and_bad_env() {
        let s = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
            "process":{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}}"#,
        );
        assert!(matches!(
            check_spec(&s),
            Err(PlanError::Missing {
                field: "process.args"
            })
        ));
        let s = spec(
            r#"{"ociVersion":"1.0.2","root":{"path":"rootfs"},
            "process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/","env":["NOEQUALS"]}}"#,
        );
        let err = check_spec(&s).unwrap_err().to_string();
        assert!(
            err.contains("process.env") && err.contains("NOEQUALS"),
            "{err}"
        );
        let s = spec(
            r#"{"ociVersion":"1.0.2","process":{"user":{"uid":0,"gid":0},"args":["sh"],"cwd":"/"}}"#,
        );
        assert!(matches!(
            check_spec(&s),
            Err(PlanError::Missing { field: "root" })
        ));
        assert!(check_spec(&with("")).is_ok());
    }

    #[test]
    fn test_plan_actions_configure_machine_boot_root_vsock_entropy() {
        let assets = GuestAssets {
            kernel: "/k/vmlinux".into(),
            initramfs: "/k/initramfs".into(),
        };
        let plan = VmPlan::new(
            &with(""),
            &SizingDefaults::default(),
            &assets,
            Path::new("/cache/root.erofs"),
            Path::new("/run/squib/c1/vsock.sock"),
            "squib.log=debug",
        )
        .unwrap();
        let actions = plan.actions();
        assert_eq!(actions.len(), 5);
        assert!(matches!(&actions[0], ApiAction::PutMachineConfig(m) if m.vcpu_count() == 1));
        assert!(matches!(&actions[2], ApiAction::PutDrive(d) if d.is_read_only()));
        assert!(
            plan.boot.boot_args().unwrap().ends_with("squib.log=debug"),
            "{:?}",
            plan.boot.boot_args()
        );
    }
}
