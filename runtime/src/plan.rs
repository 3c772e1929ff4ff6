//! From an OCI bundle to a VM plan: the validated machine-config, boot-source, drives, vsock
//! and entropy actions that build the container's microVM through the controller.
//!
//! Sizing rules (also in README):
//! - vCPUs: the number of CPUs in `linux.resources.cpu.cpus` (each must be a CPU this host lets
//!   squib use, as with runc, where a cpuset naming a missing CPU fails create), else
//!   `ceil(linux.resources.cpu.quota / period)` when both are set and positive, else the
//!   configured default (1); then clamped to 1..=32. The guest's cgroup gets no cpuset of its
//!   own: the VM's vCPUs are the container's CPUs, so `nproc` inside equals the cpuset's size.
//! - memory: `linux.resources.memory.limit` rounded up to MiB plus [`GUEST_OVERHEAD_MIB`] for
//!   the guest kernel, agent and page cache, at most the host's memory, else the configured
//!   default (256 MiB); never below [`MIN_GUEST_MEM_MIB`]. The limit itself is also written to
//!   the container's cgroup in the guest, so it holds for the container's processes whatever
//!   the VM's size. A limit below [`MIN_MEMORY_LIMIT_BYTES`] is refused before anything is
//!   built or booted; -1 and limits from [`UNLIMITED_MEMORY_BYTES`] up (the "unlimited"
//!   sentinels such as 9223372036854771712) mean no limit.

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
/// The smallest memory limit a container can start with (6 MiB, the floor Docker also
/// enforces): below it the container's first process would be OOM-killed at once, so the
/// limit is refused with an error instead.
pub const MIN_MEMORY_LIMIT_BYTES: i64 = 6 << 20;
/// Memory limits from here up mean "unlimited": 4 EiB is far beyond any host, and the
/// sentinels orchestrators use (`i64::MAX` rounded down to a page, 9223372036854771712 with
/// 4 KiB pages) are above it.
pub const UNLIMITED_MEMORY_BYTES: i64 = 1 << 62;
/// CPU numbers a cpuset may name (the kernel's `CPU_SETSIZE`).
pub const MAX_CPU_NUMBER: u32 = 1023;
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
    /// config.json could not be read.
    #[error("reading {path}")]
    ReadSpec {
        /// The config.json path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// config.json is not JSON, or a field of it does not have the type the OCI runtime spec
    /// gives it. `field` is the JSON path of the field (`linux.resources.memory.limit`), `.`
    /// when the document itself is wrong; serde's message names the value it found.
    #[error("{}: {field}: {message}", path.display())]
    BadSpec {
        /// The config.json path.
        path: PathBuf,
        /// The JSON path of the field.
        field: String,
        /// What is wrong there, with the line and column.
        message: String,
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
    /// A cpuset names a CPU the host does not let squib use.
    #[error(
        "config.json: linux.resources.cpu.cpus = {value:?}: CPU {cpu} is not available on this \
         host (available: {available})"
    )]
    CpuNotAvailable {
        /// The cpuset list.
        value: String,
        /// The first CPU that is missing.
        cpu: u32,
        /// The CPUs that are available, as a list.
        available: String,
    },
    /// A derived VM setting failed validation.
    #[error("building the VM configuration")]
    Config(#[from] ConfigError),
}

/// What the host lets a VM have: the bounds a spec's resources are checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostLimits {
    /// Total host memory in MiB.
    pub mem_mib: u64,
    /// The host CPUs this process may run on, ascending.
    pub cpus: Vec<u32>,
}

impl HostLimits {
    /// Reads this host's memory size and the CPUs this process may run on (its affinity, as
    /// the vCPU threads inherit it). A size that cannot be read leaves memory unbounded here;
    /// the VMM checks it again.
    pub fn probe() -> Self {
        use squib_api::host::HostMemory as _;
        let mem_mib = squib_api::host::SystemHostMemory
            .total_mib()
            .unwrap_or(u64::MAX);
        Self {
            mem_mib,
            cpus: usable_cpus(),
        }
    }
}

/// The CPUs this process may run on.
#[cfg(target_os = "linux")]
fn usable_cpus() -> Vec<u32> {
    match nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) {
        Ok(set) => (0..=MAX_CPU_NUMBER)
            .filter(|cpu| {
                usize::try_from(*cpu)
                    .ok()
                    .is_some_and(|c| set.is_set(c).unwrap_or(false))
            })
            .collect(),
        Err(_) => all_cpus(),
    }
}

/// The CPUs this process may run on: on hosts without affinity masks, every CPU.
#[cfg(not(target_os = "linux"))]
fn usable_cpus() -> Vec<u32> {
    all_cpus()
}

fn all_cpus() -> Vec<u32> {
    let n = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    (0..u32::try_from(n).unwrap_or(MAX_CPU_NUMBER)).collect()
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
/// [`PlanError::ReadSpec`] for an unreadable file, [`PlanError::BadSpec`] for malformed JSON
/// or a field of the wrong type, [`PlanError::Missing`] or [`PlanError::Unsupported`] for specs
/// squib cannot run.
pub fn load_spec(bundle: &Path) -> Result<Spec, PlanError> {
    let path = bundle.join("config.json");
    let body = match std::fs::read(&path) {
        Ok(body) => body,
        Err(source) => return Err(PlanError::ReadSpec { path, source }),
    };
    let spec = parse_spec(&body).map_err(|(field, message)| PlanError::BadSpec {
        path,
        field,
        message,
    })?;
    check_spec(&spec)?;
    Ok(spec)
}

/// Parses a config.json body; on failure, the JSON path of the offending field (serde's own
/// error gives only a line and column) and serde's message.
fn parse_spec(body: &[u8]) -> Result<Spec, (String, String)> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let spec: Spec = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        (field, e.into_inner().to_string())
    })?;
    de.end().map_err(|e| (".".to_owned(), e.to_string()))?;
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

/// The guest's vCPU count and memory size for `spec` on `host`.
///
/// # Errors
///
/// [`PlanError::Unsupported`] naming the field and value for a malformed
/// `linux.resources.cpu.cpus` list or one naming a CPU `host` does not offer, and for a memory
/// limit that is negative (other than -1) or below [`MIN_MEMORY_LIMIT_BYTES`].
pub fn sizing(
    spec: &Spec,
    defaults: &SizingDefaults,
    host: &HostLimits,
) -> Result<(u64, u64), PlanError> {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = resources.and_then(|r| r.cpu().as_ref());
    let from_quota = cpu.and_then(|c| match (c.quota(), c.period()) {
        (Some(q), Some(p)) if q > 0 && p > 0 => Some(q.unsigned_abs().div_ceil(p)),
        _ => None,
    });
    let from_cpuset = match cpu.and_then(|c| c.cpus().as_deref()) {
        Some(list) if !list.trim().is_empty() => Some(count_cpu_list(list, &host.cpus)?),
        _ => None,
    };
    // A cpuset decides the CPU count, as `nproc` under runc shows it; a quota alone sizes the
    // VM to the CPUs it can keep busy, and is enforced in the guest either way.
    let vcpus = from_cpuset
        .or(from_quota)
        .unwrap_or(defaults.vcpus)
        .clamp(1, MAX_VCPUS);

    let limit = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit());
    let mem_mib = match limit {
        None | Some(-1) => defaults.mem_mib,
        Some(bytes) if bytes >= UNLIMITED_MEMORY_BYTES => defaults.mem_mib,
        Some(bytes) if bytes >= MIN_MEMORY_LIMIT_BYTES => bytes
            .unsigned_abs()
            .div_ceil(1 << 20)
            .saturating_add(GUEST_OVERHEAD_MIB)
            .min(host.mem_mib),
        Some(bytes) if bytes >= 0 => {
            return Err(PlanError::Unsupported {
                field: "linux.resources.memory.limit",
                value: bytes.to_string(),
                reason: "below the minimum memory limit of 6291456 bytes (6 MiB) a container \
                         starts with",
            });
        }
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

/// Counts the CPUs in a cpuset list such as `0-3,6`, each of which must be in `host_cpus`.
fn count_cpu_list(list: &str, host_cpus: &[u32]) -> Result<u64, PlanError> {
    let bad = |reason| PlanError::Unsupported {
        field: "linux.resources.cpu.cpus",
        value: list.to_string(),
        reason,
    };
    let mut cpus = std::collections::BTreeSet::new();
    for part in list.split(',').map(str::trim) {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim().parse::<u32>(), hi.trim().parse::<u32>()),
            None => (part.parse::<u32>(), part.parse::<u32>()),
        };
        let (Ok(lo), Ok(hi)) = (lo, hi) else {
            return Err(bad("expected a list such as 0-3,6"));
        };
        if hi < lo {
            return Err(bad("expected a list such as 0-3,6"));
        }
        if hi > MAX_CPU_NUMBER {
            return Err(bad("CPU numbers go up to 1023"));
        }
        for cpu in lo..=hi {
            if host_cpus.binary_search(&cpu).is_err() {
                return Err(PlanError::CpuNotAvailable {
                    value: list.to_string(),
                    cpu,
                    available: format_cpu_list(host_cpus),
                });
            }
            cpus.insert(cpu);
        }
    }
    Ok(u64::try_from(cpus.len()).unwrap_or(u64::MAX))
}

/// `cpus` (ascending) as a cpuset list such as `0-3,6`.
fn format_cpu_list(cpus: &[u32]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut iter = cpus.iter().copied().peekable();
    while let Some(lo) = iter.next() {
        let mut hi = lo;
        while iter.peek() == Some(&hi.saturating_add(1)) {
            hi = hi.saturating_add(1);
            iter.next();
        }
        parts.push(if hi == lo {
            lo.to_string()
        } else {
            format!("{lo}-{hi}")
        });
    }
    parts.join(",")
}

/// The spec the guest agent applies: the host's `spec` without the cpuset
/// (`linux.resources.cpu.cpus` and `mems`), which names host CPUs and memory nodes. The VM
/// has exactly as many vCPUs as the cpuset has CPUs (see [`sizing`]), numbered from 0, so
/// inside the guest the container simply gets all of them.
pub fn guest_spec(spec: &Spec) -> Spec {
    let mut guest = spec.clone();
    if let Some(linux) = guest.linux_mut().as_mut()
        && let Some(resources) = linux.resources_mut().as_mut()
        && let Some(cpu) = resources.cpu_mut().as_mut()
    {
        cpu.set_cpus(None);
        cpu.set_mems(None);
    }
    guest
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
    /// Plans the VM of `spec` on `host`, booting `assets`, with `root_image` as its root drive
    /// and the hybrid vsock socket at `vsock_uds`.
    ///
    /// # Errors
    ///
    /// Any [`PlanError`] from sizing or from building the validated configuration.
    pub fn new(
        spec: &Spec,
        defaults: &SizingDefaults,
        host: &HostLimits,
        assets: &GuestAssets,
        root_image: &Path,
        vsock_uds: &Path,
        extra_boot_args: &str,
    ) -> Result<Self, PlanError> {
        let (vcpus, mem_mib) = sizing(spec, defaults, host)?;
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
    fn test_parse_spec_names_the_field_and_value_of_a_wrong_type() {
        let cases = [
            (
                r#","linux":{"resources":{"memory":{"limit":"abc"}}}"#,
                "linux.resources.memory.limit",
                "\"abc\"",
            ),
            (
                r#","linux":{"resources":{"pids":{"limit":true}}}"#,
                "linux.resources.pids.limit",
                "true",
            ),
        ];
        for (extra, field, value) in cases {
            let json = format!("{BASE}{extra}}}");
            let (got_field, message) = parse_spec(json.as_bytes()).unwrap_err();
            assert_eq!(got_field, field, "{json}: {message}");
            assert!(message.contains(value), "{json}: {message}");
        }
        let bogus = BASE.replace(
            r#""cwd":"/""#,
            r#""cwd":"/","rlimits":[{"type":"RLIMIT_BOGUS","hard":1,"soft":1}]"#,
        );
        let (field, message) = parse_spec(format!("{bogus}}}").as_bytes()).unwrap_err();
        assert!(field.starts_with("process.rlimits"), "{field}: {message}");
        assert!(message.contains("RLIMIT_BOGUS"), "{field}: {message}");
    }

    #[test]
    fn test_parse_spec_refuses_trailing_text_and_accepts_a_valid_spec() {
        let (field, message) = parse_spec(format!("{BASE}}} x").as_bytes()).unwrap_err();
        assert_eq!(field, ".");
        assert!(message.contains("trailing"), "{message}");
        let spec = parse_spec(format!("{BASE}}}").as_bytes()).unwrap();
        assert_eq!(
            spec.root().as_ref().map(|r| r.path().clone()),
            Some("rootfs".into())
        );
    }

    #[test]
    fn test_load_spec_error_names_the_file_and_the_field() {
        let dir = std::env::temp_dir().join(format!("squib-plan-load-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{BASE},"linux":{{"resources":{{"memory":{{"limit":"abc"}}}}}}}}"#),
        )
        .unwrap();
        let err = load_spec(&dir).unwrap_err().to_string();
        let missing = load_spec(&dir.join("nope")).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            err.contains("config.json: linux.resources.memory.limit: "),
            "{err}"
        );
        assert!(err.contains("\"abc\""), "{err}");
        assert!(matches!(missing, PlanError::ReadSpec { .. }), "{missing}");
    }

    /// A host with 64 CPUs and 8 GiB.
    fn host() -> HostLimits {
        HostLimits {
            mem_mib: 8192,
            cpus: (0..64).collect(),
        }
    }

    fn limit(bytes: &str) -> Spec {
        with(&format!(
            r#","linux":{{"resources":{{"memory":{{"limit":{bytes}}}}}}}"#
        ))
    }

    #[test]
    fn test_sizing_refuses_memory_limits_below_minimum_naming_value() {
        for bytes in ["0", "4096", "1048576", "6291455"] {
            let err = sizing(&limit(bytes), &SizingDefaults::default(), &host())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("linux.resources.memory.limit") && err.contains(bytes),
                "{err}"
            );
        }
        let err = sizing(&limit("-2"), &SizingDefaults::default(), &host()).unwrap_err();
        assert!(err.to_string().contains("must be positive or -1"), "{err}");
        let (_, mem) = sizing(&limit("6291456"), &SizingDefaults::default(), &host()).unwrap();
        assert_eq!(mem, MIN_GUEST_MEM_MIB);
    }

    #[test]
    fn test_sizing_treats_unlimited_sentinels_as_no_limit() {
        for bytes in ["-1", "9223372036854771712", "9223372036854775807"] {
            assert_eq!(
                sizing(&limit(bytes), &SizingDefaults::default(), &host()).unwrap(),
                (1, 256),
                "{bytes}"
            );
        }
    }

    #[test]
    fn test_sizing_caps_memory_at_host_size() {
        // 16 GiB on an 8 GiB host: the limit cannot bind, the VM gets the whole host.
        let (_, mem) = sizing(&limit("17179869184"), &SizingDefaults::default(), &host()).unwrap();
        assert_eq!(mem, 8192);
    }

    #[test]
    fn test_sizing_refuses_cpuset_naming_cpu_host_lacks() {
        let two = HostLimits {
            mem_mib: 8192,
            cpus: vec![0, 1],
        };
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"63"}}}"#);
        let err = sizing(&s, &SizingDefaults::default(), &two)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("linux.resources.cpu.cpus")
                && err.contains("\"63\"")
                && err.contains("0-1"),
            "{err}"
        );
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"0-1"}}}"#);
        assert_eq!(sizing(&s, &SizingDefaults::default(), &two).unwrap().0, 2);
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"0-99999999"}}}"#);
        assert!(sizing(&s, &SizingDefaults::default(), &two).is_err());
    }

    #[test]
    fn test_sizing_takes_cpu_count_from_cpuset_before_quota() {
        let s =
            with(r#","linux":{"resources":{"cpu":{"cpus":"0","quota":200000,"period":100000}}}"#);
        assert_eq!(
            sizing(&s, &SizingDefaults::default(), &host()).unwrap().0,
            1
        );
    }

    #[test]
    fn test_guest_spec_drops_cpuset_keeps_other_limits() {
        let s = with(
            r#","linux":{"resources":{"cpu":{"cpus":"2-3","mems":"0","quota":100000},
            "memory":{"limit":268435456}}}"#,
        );
        let g = guest_spec(&s);
        let r = g.linux().as_ref().unwrap().resources().as_ref().unwrap();
        let cpu = r.cpu().as_ref().unwrap();
        assert_eq!(
            (cpu.cpus(), cpu.mems(), cpu.quota()),
            (&None, &None, Some(100000))
        );
        assert_eq!(r.memory().as_ref().unwrap().limit(), Some(268435456));
    }

    #[test]
    fn test_format_cpu_list_joins_ranges() {
        assert_eq!(format_cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn test_sizing_uses_defaults_without_limits() {
        assert_eq!(
            sizing(&with(""), &SizingDefaults::default(), &host()).unwrap(),
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
            sizing(&s, &SizingDefaults::default(), &host()).unwrap(),
            (2, 512 + GUEST_OVERHEAD_MIB)
        );
    }

    #[test]
    fn test_sizing_counts_cpuset_and_clamps() {
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"0-3,6"}}}"#);
        assert_eq!(
            sizing(&s, &SizingDefaults::default(), &host()).unwrap().0,
            5
        );
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"0-63"}}}"#);
        assert_eq!(
            sizing(&s, &SizingDefaults::default(), &host()).unwrap().0,
            32
        );
        let s = with(r#","linux":{"resources":{"memory":{"limit":8388608}}}"#);
        assert_eq!(
            sizing(&s, &SizingDefaults::default(), &host()).unwrap().1,
            MIN_GUEST_MEM_MIB
        );
    }

    #[test]
    fn test_sizing_rejects_bad_cpuset_naming_field() {
        let s = with(r#","linux":{"resources":{"cpu":{"cpus":"3-1"}}}"#);
        let err = sizing(&s, &SizingDefaults::default(), &host())
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
            &host(),
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
