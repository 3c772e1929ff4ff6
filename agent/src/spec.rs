//! The subset of the OCI runtime spec the agent acts on, and its validation into the plain
//! settings the container helper applies ([`ProcessSettings`], [`RootSettings`]).
//!
//! Parsing is deliberately tolerant of fields the agent does not use (they are ignored) and
//! strict about the ones it does: a bad rlimit, a relative cwd or an empty argv is refused
//! here, before anything is mounted or forked, with an error naming the field and the value.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// A field of the spec that cannot be honoured.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The JSON does not parse as an OCI spec or process.
    #[error("invalid OCI {what} JSON")]
    Json {
        /// "spec" or "process".
        what: &'static str,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The spec has no `process` object.
    #[error("process: missing from the spec")]
    NoProcess,
    /// `process.args` is empty.
    #[error("process.args: must hold at least one element")]
    NoArgs,
    /// `process.cwd` is not absolute.
    #[error("process.cwd {cwd:?}: Cwd must be an absolute path")]
    RelativeCwd {
        /// The rejected cwd.
        cwd: String,
    },
    /// An rlimit type the kernel does not know.
    #[error("process.rlimits: wrong rlimit value: {name}")]
    UnknownRlimit {
        /// The rejected type name.
        name: String,
    },
    /// An rlimit whose soft value exceeds the hard one.
    #[error("process.rlimits: {name} soft limit {soft} exceeds hard limit {hard}")]
    RlimitSoftAboveHard {
        /// The rlimit type.
        name: String,
        /// Requested soft limit.
        soft: u64,
        /// Requested hard limit.
        hard: u64,
    },
    /// A capability name that is not known.
    #[error("process.capabilities.{set}: unknown capability {name:?}")]
    UnknownCapability {
        /// Which set held it.
        set: &'static str,
        /// The rejected name.
        name: String,
    },
    /// An environment entry without `=`.
    #[error("process.env: entry {entry:?} has no '='")]
    BadEnv {
        /// The rejected entry.
        entry: String,
    },
    /// A namespace type the agent does not create.
    #[error("linux.namespaces: type {kind:?} is not supported")]
    UnsupportedNamespace {
        /// The rejected type.
        kind: String,
    },
    /// A namespace with a `path` (joining an existing one) is not supported.
    #[error("linux.namespaces: joining the {kind} namespace at {path:?} is not supported")]
    NamespacePath {
        /// Namespace type.
        kind: String,
        /// The path given.
        path: String,
    },
    /// A mount destination that is not absolute.
    #[error("mounts: destination {destination:?} is not absolute")]
    RelativeMountDestination {
        /// The rejected destination.
        destination: String,
    },
}

/// The OCI runtime spec fields the agent reads (`config.json`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// The container's init process.
    #[serde(default)]
    pub process: Option<Process>,
    /// UTS hostname.
    #[serde(default)]
    pub hostname: Option<String>,
    /// Mounts, applied in order.
    #[serde(default)]
    pub mounts: Vec<Mount>,
    /// Root settings (`root.path` is ignored; the root comes from the request).
    #[serde(default)]
    pub root: Option<Root>,
    /// Linux-specific settings.
    #[serde(default)]
    pub linux: Option<Linux>,
}

/// `root`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Root {
    /// Mount the root read-only.
    #[serde(default)]
    pub readonly: bool,
}

/// `process`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    /// Attach a pty.
    #[serde(default)]
    pub terminal: bool,
    /// Initial pty size.
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
    /// User and groups.
    #[serde(default)]
    pub user: User,
    /// argv.
    #[serde(default)]
    pub args: Vec<String>,
    /// `KEY=VALUE` entries; values may contain `=`.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory (absolute).
    #[serde(default)]
    pub cwd: String,
    /// Capability sets; absent means "leave the sets as they are".
    #[serde(default)]
    pub capabilities: Option<Capabilities>,
    /// Resource limits.
    #[serde(default)]
    pub rlimits: Vec<Rlimit>,
    /// Set `PR_SET_NO_NEW_PRIVS`.
    #[serde(default)]
    pub no_new_privileges: bool,
}

/// `process.consoleSize`.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ConsoleSize {
    /// Rows.
    pub height: u32,
    /// Columns.
    pub width: u32,
}

/// `process.user`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// uid.
    #[serde(default)]
    pub uid: u32,
    /// gid.
    #[serde(default)]
    pub gid: u32,
    /// umask; absent means 0022.
    #[serde(default)]
    pub umask: Option<u32>,
    /// Supplementary groups, exactly as given.
    #[serde(default)]
    pub additional_gids: Vec<u32>,
}

/// `process.capabilities`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Capabilities {
    /// Bounding set.
    #[serde(default)]
    pub bounding: Vec<String>,
    /// Effective set.
    #[serde(default)]
    pub effective: Vec<String>,
    /// Inheritable set.
    #[serde(default)]
    pub inheritable: Vec<String>,
    /// Permitted set.
    #[serde(default)]
    pub permitted: Vec<String>,
    /// Ambient set.
    #[serde(default)]
    pub ambient: Vec<String>,
}

/// `process.rlimits[]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Rlimit {
    /// `RLIMIT_*` name.
    #[serde(rename = "type")]
    pub kind: String,
    /// Hard limit.
    pub hard: u64,
    /// Soft limit.
    pub soft: u64,
}

/// `mounts[]`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct Mount {
    /// Absolute path in the container.
    pub destination: String,
    /// File system type (`bind` for bind mounts).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Source device or path.
    #[serde(default)]
    pub source: Option<String>,
    /// mount(8)-style options.
    #[serde(default)]
    pub options: Vec<String>,
}

/// `linux`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Linux {
    /// Namespaces to create.
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    /// cgroup resource limits.
    #[serde(default)]
    pub resources: Option<Resources>,
    /// Paths hidden from the container.
    #[serde(default)]
    pub masked_paths: Vec<String>,
    /// Paths made read-only.
    #[serde(default)]
    pub readonly_paths: Vec<String>,
    /// Device nodes to create.
    #[serde(default)]
    pub devices: Vec<Device>,
    /// sysctls to write in the container's namespaces.
    #[serde(default)]
    pub sysctl: BTreeMap<String, String>,
}

/// `linux.namespaces[]`.
#[derive(Debug, Clone, Deserialize)]
pub struct Namespace {
    /// Namespace type.
    #[serde(rename = "type")]
    pub kind: String,
    /// Existing namespace to join.
    #[serde(default)]
    pub path: Option<String>,
}

/// `linux.devices[]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    /// `c`, `b`, `u` or `p`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Path in the container.
    pub path: String,
    /// Major number.
    #[serde(default)]
    pub major: u64,
    /// Minor number.
    #[serde(default)]
    pub minor: u64,
    /// Permission bits.
    #[serde(default)]
    pub file_mode: Option<u32>,
    /// Owner.
    #[serde(default)]
    pub uid: Option<u32>,
    /// Group.
    #[serde(default)]
    pub gid: Option<u32>,
}

/// `linux.resources` (the parts mapped onto cgroup v2).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Resources {
    /// Memory.
    #[serde(default)]
    pub memory: Option<MemoryResources>,
    /// CPU.
    #[serde(default)]
    pub cpu: Option<CpuResources>,
    /// Pids.
    #[serde(default)]
    pub pids: Option<PidsResources>,
}

/// `linux.resources.memory`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct MemoryResources {
    /// Limit in bytes; negative means unlimited.
    #[serde(default)]
    pub limit: Option<i64>,
    /// Limit of memory + swap in bytes.
    #[serde(default)]
    pub swap: Option<i64>,
}

/// `linux.resources.cpu`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CpuResources {
    /// CFS quota in microseconds per period.
    #[serde(default)]
    pub quota: Option<i64>,
    /// CFS period in microseconds.
    #[serde(default)]
    pub period: Option<u64>,
    /// cpuset CPU list.
    #[serde(default)]
    pub cpus: Option<String>,
    /// cpuset memory node list.
    #[serde(default)]
    pub mems: Option<String>,
}

/// `linux.resources.pids`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PidsResources {
    /// Maximum number of tasks; zero or negative means unlimited.
    #[serde(default)]
    pub limit: i64,
}

/// Which namespaces the container's init gets, beyond the mount namespace it always has.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct NamespaceSet {
    /// New PID namespace (the process is its PID 1).
    pub pid: bool,
    /// New UTS namespace.
    pub uts: bool,
    /// New IPC namespace.
    pub ipc: bool,
    /// New network namespace (only loopback, brought up).
    pub net: bool,
    /// New cgroup namespace.
    pub cgroup: bool,
}

/// One validated resource limit.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct RlimitSetting {
    /// `RLIMIT_*` resource number.
    pub resource: i32,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

/// Validated capability sets, as kernel capability numbers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CapabilitySettings {
    /// Bounding set.
    pub bounding: Vec<u8>,
    /// Effective set.
    pub effective: Vec<u8>,
    /// Inheritable set.
    pub inheritable: Vec<u8>,
    /// Permitted set.
    pub permitted: Vec<u8>,
    /// Ambient set.
    pub ambient: Vec<u8>,
}

/// Everything the helper needs to turn itself into the process: validated `process` fields.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessSettings {
    /// argv, byte-exact.
    pub args: Vec<String>,
    /// Environment entries, byte-exact.
    pub env: Vec<String>,
    /// Absolute working directory.
    pub cwd: String,
    /// Create `cwd` when missing (the init process does, exec'd processes do not).
    pub create_cwd: bool,
    /// uid.
    pub uid: u32,
    /// gid.
    pub gid: u32,
    /// Exactly the supplementary groups.
    pub additional_gids: Vec<u32>,
    /// umask.
    pub umask: u32,
    /// Resource limits.
    pub rlimits: Vec<RlimitSetting>,
    /// `PR_SET_NO_NEW_PRIVS`.
    pub no_new_privileges: bool,
    /// Capability sets; `None` leaves them alone.
    pub capabilities: Option<CapabilitySettings>,
    /// Allocate a pty in the container.
    pub terminal: bool,
    /// Initial pty size.
    pub console_size: Option<ConsoleSize>,
}

/// Validated root-file-system settings of a new container.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct RootSettings {
    /// Hostname for a new UTS namespace.
    pub hostname: Option<String>,
    /// Mounts in order, destinations absolute.
    pub mounts: Vec<MountSetting>,
    /// Remount the root read-only after the mounts.
    pub readonly: bool,
    /// Paths to hide.
    pub masked_paths: Vec<String>,
    /// Paths to make read-only.
    pub readonly_paths: Vec<String>,
    /// Devices to create.
    pub devices: Vec<DeviceSetting>,
    /// sysctls.
    pub sysctl: BTreeMap<String, String>,
}

/// One mount, as the helper performs it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MountSetting {
    /// Absolute destination in the container.
    pub destination: String,
    /// File system type; `bind` for bind mounts.
    pub kind: String,
    /// Source.
    pub source: String,
    /// Raw options.
    pub options: Vec<String>,
}

/// One device node.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceSetting {
    /// `c`, `b`, `u` or `p`.
    pub kind: String,
    /// Absolute path.
    pub path: String,
    /// Major number.
    pub major: u64,
    /// Minor number.
    pub minor: u64,
    /// Mode bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// Parses a full spec.
///
/// # Errors
///
/// [`SpecError::Json`] when the bytes are not a spec.
pub fn parse_spec(json: &[u8]) -> Result<Spec, SpecError> {
    serde_json::from_slice(json).map_err(|source| SpecError::Json {
        what: "spec",
        source,
    })
}

/// Parses a `process` object (exec requests).
///
/// # Errors
///
/// [`SpecError::Json`] when the bytes are not a process object.
pub fn parse_process(json: &[u8]) -> Result<Process, SpecError> {
    serde_json::from_slice(json).map_err(|source| SpecError::Json {
        what: "process",
        source,
    })
}

/// Validates a `process` object. `create_cwd` is true for a container's init process.
///
/// # Errors
///
/// The first field that cannot be honoured.
pub fn process_settings(p: &Process, create_cwd: bool) -> Result<ProcessSettings, SpecError> {
    if p.args.is_empty() {
        return Err(SpecError::NoArgs);
    }
    let cwd = if p.cwd.is_empty() {
        "/".to_owned()
    } else {
        p.cwd.clone()
    };
    if !cwd.starts_with('/') {
        return Err(SpecError::RelativeCwd { cwd });
    }
    if let Some(entry) = p.env.iter().find(|e| !e.contains('=')) {
        return Err(SpecError::BadEnv {
            entry: entry.clone(),
        });
    }
    let mut rlimits = Vec::with_capacity(p.rlimits.len());
    for r in &p.rlimits {
        let resource = rlimit_resource(&r.kind).ok_or_else(|| SpecError::UnknownRlimit {
            name: r.kind.clone(),
        })?;
        if r.soft > r.hard {
            return Err(SpecError::RlimitSoftAboveHard {
                name: r.kind.clone(),
                soft: r.soft,
                hard: r.hard,
            });
        }
        rlimits.push(RlimitSetting {
            resource,
            soft: r.soft,
            hard: r.hard,
        });
    }
    let capabilities = p
        .capabilities
        .as_ref()
        .map(|c| -> Result<CapabilitySettings, SpecError> {
            Ok(CapabilitySettings {
                bounding: cap_numbers("bounding", &c.bounding)?,
                effective: cap_numbers("effective", &c.effective)?,
                inheritable: cap_numbers("inheritable", &c.inheritable)?,
                permitted: cap_numbers("permitted", &c.permitted)?,
                ambient: cap_numbers("ambient", &c.ambient)?,
            })
        })
        .transpose()?;
    Ok(ProcessSettings {
        args: p.args.clone(),
        env: p.env.clone(),
        cwd,
        create_cwd,
        uid: p.user.uid,
        gid: p.user.gid,
        additional_gids: p.user.additional_gids.clone(),
        umask: p.user.umask.unwrap_or(0o022),
        rlimits,
        no_new_privileges: p.no_new_privileges,
        capabilities,
        terminal: p.terminal,
        console_size: p.console_size,
    })
}

/// Validates the namespace list. The mount namespace is always created.
///
/// # Errors
///
/// [`SpecError::UnsupportedNamespace`] or [`SpecError::NamespacePath`].
pub fn namespace_set(spec: &Spec) -> Result<NamespaceSet, SpecError> {
    let mut set = NamespaceSet::default();
    for ns in spec.linux.iter().flat_map(|l| l.namespaces.iter()) {
        if let Some(path) = ns.path.as_ref().filter(|p| !p.is_empty()) {
            return Err(SpecError::NamespacePath {
                kind: ns.kind.clone(),
                path: path.clone(),
            });
        }
        match ns.kind.as_str() {
            "pid" => set.pid = true,
            "uts" => set.uts = true,
            "ipc" => set.ipc = true,
            "network" => set.net = true,
            "cgroup" => set.cgroup = true,
            "mount" => {}
            other => {
                return Err(SpecError::UnsupportedNamespace {
                    kind: other.to_owned(),
                });
            }
        }
    }
    Ok(set)
}

/// Validates the root-file-system part of a spec.
///
/// # Errors
///
/// [`SpecError::RelativeMountDestination`].
pub fn root_settings(spec: &Spec) -> Result<RootSettings, SpecError> {
    let mut mounts = Vec::with_capacity(spec.mounts.len());
    for m in &spec.mounts {
        if !m.destination.starts_with('/') {
            return Err(SpecError::RelativeMountDestination {
                destination: m.destination.clone(),
            });
        }
        let kind = m.kind.clone().unwrap_or_default();
        let is_bind = m.options.iter().any(|o| o == "bind" || o == "rbind");
        mounts.push(MountSetting {
            destination: m.destination.clone(),
            kind: if is_bind { "bind".to_owned() } else { kind },
            source: m.source.clone().unwrap_or_default(),
            options: m.options.clone(),
        });
    }
    let linux = spec.linux.clone().unwrap_or_default();
    Ok(RootSettings {
        hostname: spec.hostname.clone().filter(|h| !h.is_empty()),
        mounts,
        readonly: spec.root.as_ref().is_some_and(|r| r.readonly),
        masked_paths: linux.masked_paths,
        readonly_paths: linux.readonly_paths,
        devices: linux
            .devices
            .iter()
            .map(|d| DeviceSetting {
                kind: d.kind.clone(),
                path: d.path.clone(),
                major: d.major,
                minor: d.minor,
                mode: d.file_mode.unwrap_or(0o666),
                uid: d.uid.unwrap_or(0),
                gid: d.gid.unwrap_or(0),
            })
            .collect(),
        sysctl: linux.sysctl,
    })
}

fn cap_numbers(set: &'static str, names: &[String]) -> Result<Vec<u8>, SpecError> {
    names
        .iter()
        .map(|n| {
            n.parse::<caps::Capability>()
                .map(|c| c.index())
                .map_err(|_| SpecError::UnknownCapability {
                    set,
                    name: n.clone(),
                })
        })
        .collect()
}

/// Maps an `RLIMIT_*` name to its resource number.
pub fn rlimit_resource(name: &str) -> Option<i32> {
    let r = match name {
        "RLIMIT_AS" => libc::RLIMIT_AS,
        "RLIMIT_CORE" => libc::RLIMIT_CORE,
        "RLIMIT_CPU" => libc::RLIMIT_CPU,
        "RLIMIT_DATA" => libc::RLIMIT_DATA,
        "RLIMIT_FSIZE" => libc::RLIMIT_FSIZE,
        "RLIMIT_LOCKS" => libc::RLIMIT_LOCKS,
        "RLIMIT_MEMLOCK" => libc::RLIMIT_MEMLOCK,
        "RLIMIT_MSGQUEUE" => libc::RLIMIT_MSGQUEUE,
        "RLIMIT_NICE" => libc::RLIMIT_NICE,
        "RLIMIT_NOFILE" => libc::RLIMIT_NOFILE,
        "RLIMIT_NPROC" => libc::RLIMIT_NPROC,
        "RLIMIT_RSS" => libc::RLIMIT_RSS,
        "RLIMIT_RTPRIO" => libc::RLIMIT_RTPRIO,
        "RLIMIT_RTTIME" => libc::RLIMIT_RTTIME,
        "RLIMIT_SIGPENDING" => libc::RLIMIT_SIGPENDING,
        "RLIMIT_STACK" => libc::RLIMIT_STACK,
        _ => return None,
    };
    i32::try_from(r).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(json: &str) -> Process {
        parse_process(json.as_bytes()).unwrap()
    }

    #[test]
    fn test_process_settings_rejects_relative_cwd() {
        let err = process_settings(&process(r#"{"args":["pwd"],"cwd":"tmp"}"#), true).unwrap_err();
        assert!(
            err.to_string().contains("Cwd must be an absolute path"),
            "{err}"
        );
    }

    #[test]
    fn test_process_settings_rejects_bad_rlimits() {
        let err = process_settings(
            &process(r#"{"args":["true"],"cwd":"/","rlimits":[{"type":"RLIMIT_BOGUS","hard":1,"soft":1}]}"#),
            true,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("wrong rlimit value: RLIMIT_BOGUS"),
            "{err}"
        );
        let err = process_settings(
            &process(r#"{"args":["true"],"cwd":"/","rlimits":[{"type":"RLIMIT_NOFILE","hard":1024,"soft":4096}]}"#),
            true,
        )
        .unwrap_err();
        assert!(
            matches!(err, SpecError::RlimitSoftAboveHard { .. }),
            "{err}"
        );
    }

    #[test]
    fn test_process_settings_keeps_env_values_with_equals() {
        let s = process_settings(
            &process(r#"{"args":["env"],"cwd":"/","env":["A=b=c","PATH=/bin"]}"#),
            false,
        )
        .unwrap();
        assert_eq!(s.env, vec!["A=b=c".to_owned(), "PATH=/bin".to_owned()]);
        assert_eq!(s.umask, 0o022);
    }

    #[test]
    fn test_process_settings_maps_capabilities() {
        let s = process_settings(
            &process(
                r#"{"args":["x"],"cwd":"/","capabilities":{"bounding":["CAP_CHOWN","CAP_KILL"]}}"#,
            ),
            true,
        )
        .unwrap();
        assert_eq!(s.capabilities.unwrap().bounding, vec![0, 5]);
        let err = process_settings(
            &process(r#"{"args":["x"],"cwd":"/","capabilities":{"effective":["CAP_NOPE"]}}"#),
            true,
        )
        .unwrap_err();
        assert!(matches!(err, SpecError::UnknownCapability { .. }));
    }

    #[test]
    fn test_namespace_set_refuses_user_namespace() {
        let spec =
            parse_spec(br#"{"linux":{"namespaces":[{"type":"pid"},{"type":"user"}]}}"#).unwrap();
        assert!(matches!(
            namespace_set(&spec),
            Err(SpecError::UnsupportedNamespace { .. })
        ));
        let spec = parse_spec(
            br#"{"linux":{"namespaces":[{"type":"pid"},{"type":"mount"},{"type":"uts"}]}}"#,
        )
        .unwrap();
        let set = namespace_set(&spec).unwrap();
        assert!(set.pid && set.uts && !set.ipc && !set.net);
    }
}
