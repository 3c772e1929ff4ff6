//! Wire schemas: the JSON bodies of Firecracker's API.
//!
//! Each `Raw*` struct mirrors one body with Firecracker's field names and defaults and refuses
//! unknown fields. `TryFrom<Raw*>` turns it into the validated `squib_core` type; the `From`
//! impls in the other direction render the configuration for `GET` answers. Nothing here
//! touches the controller.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use squib_core::action::VmState;
use squib_core::config::{
    BalloonConfig, BalloonStats, BalloonStatsUpdate, BalloonUpdate, BootSource, CacheType,
    ConfigError, CpuTemplate, DeviceId, DriveConfig, DriveUpdate, EntropyConfig, HugePages,
    IoEngine, LogLevel, LoggerConfig, MacAddr, MachineConfig, MachineConfigUpdate, MetricsConfig,
    MmdsConfig, MmdsVersion, NetworkInterfaceConfig, NetworkInterfaceUpdate, PmemConfig,
    RateLimiterConfig, SerialConfig, TokenBucket, VmConfig, VsockConfig,
};
use squib_core::mirror::ControllerSnapshot;
use squib_core::snapshot::{MemoryBackend, SnapshotCreateParams, SnapshotLoadParams, SnapshotType};

use crate::error::RequestError;

/// `GET /` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Instance id.
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// Version of this VMM.
    pub vmm_version: String,
    /// Application name.
    pub app_name: String,
}

impl From<&ControllerSnapshot> for InstanceInfo {
    fn from(snapshot: &ControllerSnapshot) -> Self {
        Self {
            id: snapshot.id.clone(),
            state: snapshot.state().as_str().to_owned(),
            vmm_version: snapshot.vmm_version.clone(),
            app_name: snapshot.app_name.clone(),
        }
    }
}

/// `GET /version` answer. The field name is Firecracker's, kept for tooling compatibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionInfo {
    /// Version of this VMM.
    pub firecracker_version: String,
}

/// Huge page backing on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RawHugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages.
    Transparent,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// CPU template on the wire; `None` means no template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RawCpuTemplate {
    /// Intel C3.
    C3,
    /// Intel T2.
    T2,
    /// Intel T2S.
    T2S,
    /// Intel T2CL.
    T2CL,
    /// AMD T2A.
    T2A,
    /// Arm V1N1.
    V1N1,
    /// No template.
    None,
}

fn huge_pages(raw: RawHugePages) -> HugePages {
    match raw {
        RawHugePages::None => HugePages::None,
        RawHugePages::Transparent => HugePages::Transparent,
        RawHugePages::Hugetlbfs2M => HugePages::Hugetlbfs2M,
    }
}

fn cpu_template(raw: RawCpuTemplate) -> Option<CpuTemplate> {
    match raw {
        RawCpuTemplate::C3 => Some(CpuTemplate::C3),
        RawCpuTemplate::T2 => Some(CpuTemplate::T2),
        RawCpuTemplate::T2S => Some(CpuTemplate::T2S),
        RawCpuTemplate::T2CL => Some(CpuTemplate::T2CL),
        RawCpuTemplate::T2A => Some(CpuTemplate::T2A),
        RawCpuTemplate::V1N1 => Some(CpuTemplate::V1N1),
        RawCpuTemplate::None => None,
    }
}

/// `PUT /machine-config` body; also the `machine-config` section of `GET /vm/config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMachineConfig {
    /// vCPU count, 1..=32.
    pub vcpu_count: u64,
    /// Memory size in MiB.
    pub mem_size_mib: u64,
    /// SMT; default off.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking; default off.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge page backing; default `None`.
    #[serde(default)]
    pub huge_pages: RawHugePages,
    /// CPU template; default none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<RawCpuTemplate>,
}

impl TryFrom<RawMachineConfig> for MachineConfig {
    type Error = RequestError;
    fn try_from(raw: RawMachineConfig) -> Result<Self, RequestError> {
        Ok(MachineConfig::new(
            raw.vcpu_count,
            raw.mem_size_mib,
            raw.smt,
            raw.track_dirty_pages,
            huge_pages(raw.huge_pages),
            raw.cpu_template.and_then(cpu_template),
        )?)
    }
}

impl From<&MachineConfig> for RawMachineConfig {
    fn from(config: &MachineConfig) -> Self {
        Self {
            vcpu_count: u64::from(config.vcpu_count()),
            mem_size_mib: config.mem_size_mib(),
            smt: config.smt(),
            track_dirty_pages: config.track_dirty_pages(),
            huge_pages: match config.huge_pages() {
                HugePages::None => RawHugePages::None,
                HugePages::Transparent => RawHugePages::Transparent,
                HugePages::Hugetlbfs2M => RawHugePages::Hugetlbfs2M,
            },
            cpu_template: config.cpu_template().map(|t| match t {
                CpuTemplate::C3 => RawCpuTemplate::C3,
                CpuTemplate::T2 => RawCpuTemplate::T2,
                CpuTemplate::T2S => RawCpuTemplate::T2S,
                CpuTemplate::T2CL => RawCpuTemplate::T2CL,
                CpuTemplate::T2A => RawCpuTemplate::T2A,
                CpuTemplate::V1N1 => RawCpuTemplate::V1N1,
            }),
        }
    }
}

/// `PATCH /machine-config` body: any subset of the machine configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMachineConfigUpdate {
    /// New vCPU count.
    pub vcpu_count: Option<u64>,
    /// New memory size in MiB.
    pub mem_size_mib: Option<u64>,
    /// New SMT setting.
    pub smt: Option<bool>,
    /// New dirty page tracking.
    pub track_dirty_pages: Option<bool>,
    /// New huge page backing.
    pub huge_pages: Option<RawHugePages>,
    /// New CPU template.
    pub cpu_template: Option<RawCpuTemplate>,
}

impl From<RawMachineConfigUpdate> for MachineConfigUpdate {
    fn from(raw: RawMachineConfigUpdate) -> Self {
        Self {
            vcpu_count: raw.vcpu_count,
            mem_size_mib: raw.mem_size_mib,
            smt: raw.smt,
            track_dirty_pages: raw.track_dirty_pages,
            huge_pages: raw.huge_pages.map(huge_pages),
            cpu_template: raw.cpu_template.map(cpu_template),
        }
    }
}

/// `PUT /boot-source` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBootSource {
    /// Host path of the kernel.
    pub kernel_image_path: String,
    /// Host path of the initrd.
    #[serde(default)]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub boot_args: Option<String>,
}

impl TryFrom<RawBootSource> for BootSource {
    type Error = RequestError;
    fn try_from(raw: RawBootSource) -> Result<Self, RequestError> {
        Ok(BootSource::new(
            raw.kernel_image_path.into(),
            raw.initrd_path.map(PathBuf::from),
            raw.boot_args,
        )?)
    }
}

impl RawBootSource {
    /// The `boot-source` section of `GET /vm/config`: an empty kernel path when unset.
    pub fn view(boot: Option<&BootSource>) -> Self {
        match boot {
            None => Self {
                kernel_image_path: String::new(),
                initrd_path: None,
                boot_args: None,
            },
            Some(boot) => Self {
                kernel_image_path: boot.kernel_image_path().display().to_string(),
                initrd_path: boot.initrd_path().map(|p| p.display().to_string()),
                boot_args: boot.boot_args().map(str::to_owned),
            },
        }
    }
}

/// A token bucket on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenBucket {
    /// Capacity in tokens.
    pub size: u64,
    /// One-time initial burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Refill time in milliseconds.
    pub refill_time: u64,
}

/// A rate limiter on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimiter {
    /// Bytes bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<RawTokenBucket>,
    /// Operations bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<RawTokenBucket>,
}

impl From<RawTokenBucket> for TokenBucket {
    fn from(raw: RawTokenBucket) -> Self {
        Self {
            size: raw.size,
            one_time_burst: raw.one_time_burst,
            refill_time_ms: raw.refill_time,
        }
    }
}

impl From<&TokenBucket> for RawTokenBucket {
    fn from(b: &TokenBucket) -> Self {
        Self {
            size: b.size,
            one_time_burst: b.one_time_burst,
            refill_time: b.refill_time_ms,
        }
    }
}

impl From<RawRateLimiter> for RateLimiterConfig {
    fn from(raw: RawRateLimiter) -> Self {
        Self {
            bandwidth: raw.bandwidth.map(Into::into),
            ops: raw.ops.map(Into::into),
        }
    }
}

impl From<&RateLimiterConfig> for RawRateLimiter {
    fn from(r: &RateLimiterConfig) -> Self {
        Self {
            bandwidth: r.bandwidth.as_ref().map(Into::into),
            ops: r.ops.as_ref().map(Into::into),
        }
    }
}

/// Drive caching mode on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RawCacheType {
    /// Flushes are not synced to the host file.
    #[default]
    Unsafe,
    /// Flushes sync the host file.
    Writeback,
}

/// Drive I/O engine on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RawIoEngine {
    /// Blocking I/O.
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// `PUT /drives/{id}` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDrive {
    /// Drive id; must equal the path's.
    pub drive_id: String,
    /// Root partition UUID.
    #[serde(default)]
    pub partuuid: Option<String>,
    /// Whether this is the root device.
    pub is_root_device: bool,
    /// Caching mode.
    #[serde(default)]
    pub cache_type: RawCacheType,
    /// Read-only for the guest; default false.
    #[serde(default)]
    pub is_read_only: Option<bool>,
    /// Host path of the backing file.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// Rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RawRateLimiter>,
    /// I/O engine.
    #[serde(default)]
    pub io_engine: RawIoEngine,
    /// vhost-user socket (not supported by squib).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

impl TryFrom<RawDrive> for DriveConfig {
    type Error = RequestError;
    fn try_from(raw: RawDrive) -> Result<Self, RequestError> {
        if raw.socket.is_some() {
            return Err(RequestError::Unsupported {
                what: "vhost-user drives (socket)",
            });
        }
        let path = raw.path_on_host.ok_or(RequestError::MissingField {
            field: "path_on_host",
        })?;
        Ok(DriveConfig::new(
            DeviceId::new("drive_id", raw.drive_id)?,
            path.into(),
            raw.is_root_device,
            raw.is_read_only.unwrap_or(false),
            raw.partuuid,
            match raw.cache_type {
                RawCacheType::Unsafe => CacheType::Unsafe,
                RawCacheType::Writeback => CacheType::Writeback,
            },
            match raw.io_engine {
                RawIoEngine::Sync => IoEngine::Sync,
                RawIoEngine::Async => IoEngine::Async,
            },
            raw.rate_limiter.map(Into::into),
        )?)
    }
}

impl From<&DriveConfig> for RawDrive {
    fn from(d: &DriveConfig) -> Self {
        Self {
            drive_id: d.drive_id().to_string(),
            partuuid: d.partuuid().map(str::to_owned),
            is_root_device: d.is_root_device(),
            cache_type: match d.cache_type() {
                CacheType::Unsafe => RawCacheType::Unsafe,
                CacheType::Writeback => RawCacheType::Writeback,
            },
            is_read_only: Some(d.is_read_only()),
            path_on_host: Some(d.path_on_host().display().to_string()),
            rate_limiter: d.rate_limiter().map(Into::into),
            io_engine: match d.io_engine() {
                IoEngine::Sync => RawIoEngine::Sync,
                IoEngine::Async => RawIoEngine::Async,
            },
            socket: None,
        }
    }
}

/// `PATCH /drives/{id}` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDriveUpdate {
    /// Drive id; must equal the path's.
    pub drive_id: String,
    /// New backing file.
    #[serde(default)]
    pub path_on_host: Option<String>,
    /// New rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RawRateLimiter>,
}

impl TryFrom<RawDriveUpdate> for DriveUpdate {
    type Error = RequestError;
    fn try_from(raw: RawDriveUpdate) -> Result<Self, RequestError> {
        if raw.path_on_host.as_deref() == Some("") {
            return Err(ConfigError::EmptyPath {
                field: "path_on_host",
            }
            .into());
        }
        Ok(DriveUpdate {
            drive_id: DeviceId::new("drive_id", raw.drive_id)?,
            path_on_host: raw.path_on_host.map(PathBuf::from),
            rate_limiter: raw.rate_limiter.map(Into::into),
        })
    }
}

/// `PUT /network-interfaces/{id}` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetworkInterface {
    /// Interface id; must equal the path's.
    pub iface_id: String,
    /// Host TAP device.
    pub host_dev_name: String,
    /// Guest MAC address.
    #[serde(default)]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u64>,
    /// Receive limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RawRateLimiter>,
    /// Transmit limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RawRateLimiter>,
}

impl TryFrom<RawNetworkInterface> for NetworkInterfaceConfig {
    type Error = RequestError;
    fn try_from(raw: RawNetworkInterface) -> Result<Self, RequestError> {
        Ok(NetworkInterfaceConfig::new(
            DeviceId::new("iface_id", raw.iface_id)?,
            raw.host_dev_name,
            raw.guest_mac.as_deref().map(MacAddr::parse).transpose()?,
            raw.mtu,
            raw.rx_rate_limiter.map(Into::into),
            raw.tx_rate_limiter.map(Into::into),
        )?)
    }
}

impl From<&NetworkInterfaceConfig> for RawNetworkInterface {
    fn from(i: &NetworkInterfaceConfig) -> Self {
        Self {
            iface_id: i.iface_id().to_string(),
            host_dev_name: i.host_dev_name().to_owned(),
            guest_mac: i.guest_mac().map(|m| m.to_string()),
            mtu: i.mtu().map(u64::from),
            rx_rate_limiter: i.rx_rate_limiter().map(Into::into),
            tx_rate_limiter: i.tx_rate_limiter().map(Into::into),
        }
    }
}

/// `PATCH /network-interfaces/{id}` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetworkInterfaceUpdate {
    /// Interface id; must equal the path's.
    pub iface_id: String,
    /// New receive limiter.
    #[serde(default)]
    pub rx_rate_limiter: Option<RawRateLimiter>,
    /// New transmit limiter.
    #[serde(default)]
    pub tx_rate_limiter: Option<RawRateLimiter>,
}

impl TryFrom<RawNetworkInterfaceUpdate> for NetworkInterfaceUpdate {
    type Error = RequestError;
    fn try_from(raw: RawNetworkInterfaceUpdate) -> Result<Self, RequestError> {
        Ok(NetworkInterfaceUpdate {
            iface_id: DeviceId::new("iface_id", raw.iface_id)?,
            rx_rate_limiter: raw.rx_rate_limiter.map(Into::into),
            tx_rate_limiter: raw.tx_rate_limiter.map(Into::into),
        })
    }
}

/// `PUT /pmem/{id}` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPmem {
    /// Device id; must equal the path's.
    pub id: String,
    /// Host path of the backing file.
    pub path_on_host: String,
    /// Whether the guest boots from it.
    #[serde(default)]
    pub root_device: bool,
    /// Whether the file is mapped read-only.
    #[serde(default)]
    pub read_only: bool,
}

impl TryFrom<RawPmem> for PmemConfig {
    type Error = RequestError;
    fn try_from(raw: RawPmem) -> Result<Self, RequestError> {
        Ok(PmemConfig::new(
            DeviceId::new("id", raw.id)?,
            raw.path_on_host.into(),
            raw.root_device,
            raw.read_only,
        )?)
    }
}

impl From<&PmemConfig> for RawPmem {
    fn from(p: &PmemConfig) -> Self {
        Self {
            id: p.id().to_string(),
            path_on_host: p.path_on_host().display().to_string(),
            root_device: p.root_device(),
            read_only: p.read_only(),
        }
    }
}

/// `PUT /vsock` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVsock {
    /// Guest CID, at least 3.
    pub guest_cid: u64,
    /// Host Unix socket.
    pub uds_path: String,
    /// Deprecated device id, accepted and ignored.
    #[serde(default, skip_serializing)]
    pub vsock_id: Option<String>,
}

impl TryFrom<RawVsock> for VsockConfig {
    type Error = RequestError;
    fn try_from(raw: RawVsock) -> Result<Self, RequestError> {
        Ok(VsockConfig::new(raw.guest_cid, raw.uds_path.into())?)
    }
}

impl From<&VsockConfig> for RawVsock {
    fn from(v: &VsockConfig) -> Self {
        Self {
            guest_cid: u64::from(v.guest_cid()),
            uds_path: v.uds_path().display().to_string(),
            vsock_id: None,
        }
    }
}

/// `PUT /entropy` body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEntropy {
    /// Rate limiter.
    #[serde(default)]
    pub rate_limiter: Option<RawRateLimiter>,
}

impl From<RawEntropy> for EntropyConfig {
    fn from(raw: RawEntropy) -> Self {
        Self {
            rate_limiter: raw.rate_limiter.map(Into::into),
        }
    }
}

impl From<&EntropyConfig> for RawEntropy {
    fn from(e: &EntropyConfig) -> Self {
        Self {
            rate_limiter: e.rate_limiter.as_ref().map(Into::into),
        }
    }
}

/// `PUT /balloon` body; also `GET /balloon`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBalloon {
    /// Target size in MiB.
    pub amount_mib: u64,
    /// Whether the guest may deflate under memory pressure.
    pub deflate_on_oom: bool,
    /// Statistics interval in seconds; 0 disables.
    #[serde(default)]
    pub stats_polling_interval_s: u64,
    /// Free page hinting.
    #[serde(default)]
    pub free_page_hinting: bool,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl TryFrom<RawBalloon> for BalloonConfig {
    type Error = RequestError;
    fn try_from(raw: RawBalloon) -> Result<Self, RequestError> {
        Ok(BalloonConfig::new(
            raw.amount_mib,
            raw.deflate_on_oom,
            raw.stats_polling_interval_s,
            raw.free_page_hinting,
            raw.free_page_reporting,
        )?)
    }
}

impl From<&BalloonConfig> for RawBalloon {
    fn from(b: &BalloonConfig) -> Self {
        Self {
            amount_mib: u64::from(b.amount_mib()),
            deflate_on_oom: b.deflate_on_oom(),
            stats_polling_interval_s: u64::from(b.stats_polling_interval_s()),
            free_page_hinting: b.free_page_hinting(),
            free_page_reporting: b.free_page_reporting(),
        }
    }
}

/// `PATCH /balloon` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBalloonUpdate {
    /// New target size in MiB.
    pub amount_mib: u64,
}

impl TryFrom<RawBalloonUpdate> for BalloonUpdate {
    type Error = RequestError;
    fn try_from(raw: RawBalloonUpdate) -> Result<Self, RequestError> {
        let amount_mib = u32::try_from(raw.amount_mib).map_err(|_| ConfigError::ValueTooLarge {
            field: "amount_mib",
            value: raw.amount_mib,
        })?;
        Ok(Self { amount_mib })
    }
}

/// `PATCH /balloon/statistics` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBalloonStatsUpdate {
    /// New interval in seconds.
    pub stats_polling_interval_s: u64,
}

impl TryFrom<RawBalloonStatsUpdate> for BalloonStatsUpdate {
    type Error = RequestError;
    fn try_from(raw: RawBalloonStatsUpdate) -> Result<Self, RequestError> {
        let value = raw.stats_polling_interval_s;
        let stats_polling_interval_s =
            u16::try_from(value).map_err(|_| ConfigError::ValueTooLarge {
                field: "stats_polling_interval_s",
                value,
            })?;
        Ok(Self {
            stats_polling_interval_s,
        })
    }
}

/// `GET /balloon/statistics` answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RawBalloonStats {
    /// Target size in pages.
    pub target_pages: u32,
    /// Current size in pages.
    pub actual_pages: u32,
    /// Target size in MiB.
    pub target_mib: u32,
    /// Current size in MiB.
    pub actual_mib: u32,
    /// Guest free memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    /// Guest total memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    /// Guest available memory, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
}

impl From<&BalloonStats> for RawBalloonStats {
    fn from(s: &BalloonStats) -> Self {
        Self {
            target_pages: s.target_pages,
            actual_pages: s.actual_pages,
            target_mib: s.target_mib,
            actual_mib: s.actual_mib,
            free_memory: s.free_memory,
            total_memory: s.total_memory,
            available_memory: s.available_memory,
        }
    }
}

/// `PUT /logger` body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLogger {
    /// Log file or named pipe.
    #[serde(default)]
    pub log_path: Option<String>,
    /// `Error`, `Warning`, `Info`, `Debug`, `Trace` or `Off`, any case; default `Info`.
    #[serde(default)]
    pub level: Option<String>,
    /// Show levels.
    #[serde(default)]
    pub show_level: Option<bool>,
    /// Show source locations.
    #[serde(default)]
    pub show_log_origin: Option<bool>,
    /// Module filter.
    #[serde(default)]
    pub module: Option<String>,
}

impl TryFrom<RawLogger> for LoggerConfig {
    type Error = RequestError;
    fn try_from(raw: RawLogger) -> Result<Self, RequestError> {
        let level = match raw.level.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("info") => LogLevel::Info,
            Some("error") => LogLevel::Error,
            Some("warning" | "warn") => LogLevel::Warning,
            Some("debug") => LogLevel::Debug,
            Some("trace") => LogLevel::Trace,
            Some("off") => LogLevel::Off,
            Some(_) => {
                return Err(RequestError::InvalidLogLevel {
                    value: raw.level.unwrap_or_default(),
                });
            }
        };
        if raw.log_path.as_deref() == Some("") {
            return Err(ConfigError::EmptyPath { field: "log_path" }.into());
        }
        Ok(LoggerConfig {
            log_path: raw.log_path.map(PathBuf::from),
            level,
            show_level: raw.show_level.unwrap_or(false),
            show_log_origin: raw.show_log_origin.unwrap_or(false),
            module: raw.module,
        })
    }
}

impl From<&LoggerConfig> for RawLogger {
    fn from(l: &LoggerConfig) -> Self {
        let level = match l.level {
            LogLevel::Off => "Off",
            LogLevel::Error => "Error",
            LogLevel::Warning => "Warning",
            LogLevel::Info => "Info",
            LogLevel::Debug => "Debug",
            LogLevel::Trace => "Trace",
        };
        Self {
            log_path: l.log_path.as_ref().map(|p| p.display().to_string()),
            level: Some(level.to_owned()),
            show_level: Some(l.show_level),
            show_log_origin: Some(l.show_log_origin),
            module: l.module.clone(),
        }
    }
}

/// `PUT /metrics` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// File or named pipe receiving metrics.
    pub metrics_path: String,
}

impl TryFrom<RawMetrics> for MetricsConfig {
    type Error = RequestError;
    fn try_from(raw: RawMetrics) -> Result<Self, RequestError> {
        Ok(MetricsConfig::new(raw.metrics_path.into())?)
    }
}

/// `PUT /serial` body.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSerial {
    /// File or named pipe receiving the guest console.
    #[serde(default)]
    pub serial_out_path: Option<String>,
}

impl TryFrom<RawSerial> for SerialConfig {
    type Error = RequestError;
    fn try_from(raw: RawSerial) -> Result<Self, RequestError> {
        if raw.serial_out_path.as_deref() == Some("") {
            return Err(ConfigError::EmptyPath {
                field: "serial_out_path",
            }
            .into());
        }
        Ok(SerialConfig {
            serial_out_path: raw.serial_out_path.map(PathBuf::from),
        })
    }
}

/// MMDS version on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RawMmdsVersion {
    /// Version 1.
    #[default]
    V1,
    /// Version 2 (session tokens).
    V2,
}

/// `PUT /mmds/config` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMmdsConfig {
    /// Protocol version; default V1.
    #[serde(default)]
    pub version: RawMmdsVersion,
    /// Interfaces intercepting MMDS traffic.
    pub network_interfaces: Vec<String>,
    /// Link-local address; default 169.254.169.254.
    #[serde(default)]
    pub ipv4_address: Option<String>,
    /// EC2 IMDS compatible answers.
    #[serde(default)]
    pub imds_compat: bool,
}

impl TryFrom<RawMmdsConfig> for MmdsConfig {
    type Error = RequestError;
    fn try_from(raw: RawMmdsConfig) -> Result<Self, RequestError> {
        let ids = raw
            .network_interfaces
            .into_iter()
            .map(|id| DeviceId::new("network_interfaces", id))
            .collect::<Result<Vec<_>, _>>()?;
        let version = match raw.version {
            RawMmdsVersion::V1 => MmdsVersion::V1,
            RawMmdsVersion::V2 => MmdsVersion::V2,
        };
        Ok(MmdsConfig::new(
            version,
            ids,
            raw.ipv4_address.as_deref(),
            raw.imds_compat,
        )?)
    }
}

impl From<&MmdsConfig> for RawMmdsConfig {
    fn from(m: &MmdsConfig) -> Self {
        Self {
            version: match m.version() {
                MmdsVersion::V1 => RawMmdsVersion::V1,
                MmdsVersion::V2 => RawMmdsVersion::V2,
            },
            network_interfaces: m
                .network_interfaces()
                .iter()
                .map(ToString::to_string)
                .collect(),
            ipv4_address: Some(m.ipv4_address().to_string()),
            imds_compat: m.imds_compat(),
        }
    }
}

/// `/actions` action types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RawActionType {
    /// Flush metrics.
    FlushMetrics,
    /// Boot the microVM.
    InstanceStart,
    /// Send Ctrl+Alt+Del.
    SendCtrlAltDel,
}

/// `PUT /actions` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAction {
    /// Which action.
    pub action_type: RawActionType,
}

/// VM state on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RawVmStateValue {
    /// Pause.
    Paused,
    /// Resume.
    Resumed,
}

/// `PATCH /vm` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVmState {
    /// Requested state.
    pub state: RawVmStateValue,
}

impl From<RawVmState> for VmState {
    fn from(raw: RawVmState) -> Self {
        match raw.state {
            RawVmStateValue::Paused => VmState::Paused,
            RawVmStateValue::Resumed => VmState::Resumed,
        }
    }
}

/// Snapshot type on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RawSnapshotType {
    /// Whole memory.
    Full,
    /// Dirty pages only.
    Diff,
}

/// `PUT /snapshot/create` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshotCreate {
    /// Full (default) or Diff.
    #[serde(default)]
    pub snapshot_type: Option<RawSnapshotType>,
    /// File for the microVM state.
    pub snapshot_path: String,
    /// File for guest memory.
    pub mem_file_path: String,
}

impl TryFrom<RawSnapshotCreate> for SnapshotCreateParams {
    type Error = RequestError;
    fn try_from(raw: RawSnapshotCreate) -> Result<Self, RequestError> {
        let kind = match raw.snapshot_type {
            None | Some(RawSnapshotType::Full) => SnapshotType::Full,
            Some(RawSnapshotType::Diff) => SnapshotType::Diff,
        };
        Ok(SnapshotCreateParams::new(
            kind,
            raw.snapshot_path.into(),
            raw.mem_file_path.into(),
        )?)
    }
}

/// Memory backend type on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RawMemoryBackendType {
    /// A memory file.
    File,
    /// A userfaultfd page server.
    Uffd,
}

/// Memory backend on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMemoryBackend {
    /// Kind of backend.
    pub backend_type: RawMemoryBackendType,
    /// File or socket path.
    pub backend_path: String,
}

/// A TAP override on snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNetworkOverride {
    /// Interface to change.
    pub iface_id: String,
    /// New TAP device.
    pub host_dev_name: String,
}

/// A vsock socket override on snapshot load.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVsockOverride {
    /// New host socket.
    pub uds_path: String,
}

/// `PUT /snapshot/load` body.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSnapshotLoad {
    /// File holding the microVM state.
    pub snapshot_path: String,
    /// Deprecated memory file; exclusive with `mem_backend`.
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Memory backend; exclusive with `mem_file_path`.
    #[serde(default)]
    pub mem_backend: Option<RawMemoryBackend>,
    /// Deprecated alias of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages after the load.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// Resume after the load.
    #[serde(default)]
    pub resume_vm: Option<bool>,
    /// TAP overrides.
    #[serde(default)]
    pub network_overrides: Option<Vec<RawNetworkOverride>>,
    /// Vsock socket override.
    #[serde(default)]
    pub vsock_override: Option<RawVsockOverride>,
    /// Advance the guest clock by the time elapsed (x86_64).
    #[serde(default)]
    pub clock_realtime: Option<bool>,
}

impl TryFrom<RawSnapshotLoad> for SnapshotLoadParams {
    type Error = RequestError;
    fn try_from(raw: RawSnapshotLoad) -> Result<Self, RequestError> {
        let backend = match (raw.mem_file_path, raw.mem_backend) {
            (Some(path), None) => MemoryBackend::File(path.into()),
            (None, Some(b)) => match b.backend_type {
                RawMemoryBackendType::File => MemoryBackend::File(b.backend_path.into()),
                RawMemoryBackendType::Uffd => MemoryBackend::Uffd(b.backend_path.into()),
            },
            _ => return Err(ConfigError::SnapshotMemSource.into()),
        };
        let overrides = raw
            .network_overrides
            .unwrap_or_default()
            .into_iter()
            .map(|o| Ok((DeviceId::new("iface_id", o.iface_id)?, o.host_dev_name)))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(SnapshotLoadParams::new(
            raw.snapshot_path.into(),
            backend,
            raw.track_dirty_pages
                .or(raw.enable_diff_snapshots)
                .unwrap_or(false),
            raw.resume_vm.unwrap_or(false),
            overrides,
            raw.vsock_override.map(|o| PathBuf::from(o.uds_path)),
        )?)
    }
}

/// `GET /vm/config` answer: Firecracker's shape, hyphenated top-level keys, `null` for unset
/// sections and `[]` for empty lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FullVmConfigView {
    /// Balloon device.
    pub balloon: Option<RawBalloon>,
    /// Block devices.
    pub drives: Vec<RawDrive>,
    /// Kernel and command line.
    #[serde(rename = "boot-source")]
    pub boot_source: RawBootSource,
    /// CPU configuration (custom templates are not supported: always `null`).
    #[serde(rename = "cpu-config")]
    pub cpu_config: Option<serde_json::Value>,
    /// Logger.
    pub logger: Option<RawLogger>,
    /// Machine shape.
    #[serde(rename = "machine-config")]
    pub machine_config: RawMachineConfig,
    /// Metrics.
    pub metrics: Option<RawMetrics>,
    /// Memory hotplug (not supported: always `null`).
    #[serde(rename = "memory-hotplug")]
    pub memory_hotplug: Option<serde_json::Value>,
    /// Metadata service.
    #[serde(rename = "mmds-config")]
    pub mmds_config: Option<RawMmdsConfig>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces")]
    pub network_interfaces: Vec<RawNetworkInterface>,
    /// Pmem devices.
    pub pmem: Vec<RawPmem>,
    /// Vsock device.
    pub vsock: Option<RawVsock>,
    /// Entropy device.
    pub entropy: Option<RawEntropy>,
}

impl From<&VmConfig> for FullVmConfigView {
    fn from(c: &VmConfig) -> Self {
        Self {
            balloon: c.balloon.as_ref().map(Into::into),
            drives: c.drives.iter().map(Into::into).collect(),
            boot_source: RawBootSource::view(c.boot_source.as_ref()),
            cpu_config: None,
            logger: c.logger.as_ref().map(Into::into),
            machine_config: (&c.machine_config).into(),
            metrics: c.metrics.as_ref().map(|m| RawMetrics {
                metrics_path: m.metrics_path().display().to_string(),
            }),
            memory_hotplug: None,
            mmds_config: c.mmds_config.as_ref().map(Into::into),
            network_interfaces: c.network_interfaces.iter().map(Into::into).collect(),
            pmem: c.pmem.iter().map(Into::into).collect(),
            vsock: c.vsock.as_ref().map(Into::into),
            entropy: c.entropy.as_ref().map(Into::into),
        }
    }
}

/// A Firecracker-style configuration file (`--config-file`): the same sections as
/// `GET /vm/config`, each optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfigFile {
    /// Machine shape.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<RawMachineConfig>,
    /// Kernel and command line.
    #[serde(rename = "boot-source", default)]
    pub boot_source: Option<RawBootSource>,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<RawDrive>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<RawNetworkInterface>,
    /// Pmem devices.
    #[serde(default)]
    pub pmem: Vec<RawPmem>,
    /// Vsock device.
    #[serde(default)]
    pub vsock: Option<RawVsock>,
    /// Entropy device.
    #[serde(default)]
    pub entropy: Option<RawEntropy>,
    /// Balloon device.
    #[serde(default)]
    pub balloon: Option<RawBalloon>,
    /// Logger.
    #[serde(default)]
    pub logger: Option<RawLogger>,
    /// Metrics.
    #[serde(default)]
    pub metrics: Option<RawMetrics>,
    /// Metadata service.
    #[serde(rename = "mmds-config", default)]
    pub mmds_config: Option<RawMmdsConfig>,
    /// Unsupported section; accepted only when `null`.
    #[serde(rename = "cpu-config", default)]
    pub cpu_config: Option<serde_json::Value>,
    /// Unsupported section; accepted only when `null`.
    #[serde(rename = "memory-hotplug", default)]
    pub memory_hotplug: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
        serde_json::from_value(v).map_err(|e| e.to_string())
    }

    #[test]
    fn test_machine_config_defaults_follow_firecracker() {
        let raw: RawMachineConfig = parse(json!({"vcpu_count": 2, "mem_size_mib": 256})).unwrap();
        let config = MachineConfig::try_from(raw).unwrap();
        assert!(!config.smt() && !config.track_dirty_pages());
        assert_eq!(config.huge_pages(), HugePages::None);
        assert_eq!(config.cpu_template(), None);
        let view = serde_json::to_value(RawMachineConfig::from(&config)).unwrap();
        assert_eq!(
            view,
            json!({"vcpu_count": 2, "mem_size_mib": 256, "smt": false,
                   "track_dirty_pages": false, "huge_pages": "None"})
        );
    }

    #[test]
    fn test_machine_config_rejects_unknown_field_by_name() {
        let err = parse::<RawMachineConfig>(json!({"vcpu_count": 1, "mem_size_mib": 1, "foo": 1}))
            .unwrap_err();
        assert!(err.contains("unknown field `foo`"), "{err}");
    }

    #[test]
    fn test_machine_config_rejects_out_of_range_values() {
        for (v, m) in [(0, 128), (33, 128), (1, 0)] {
            let raw: RawMachineConfig = parse(json!({"vcpu_count": v, "mem_size_mib": m})).unwrap();
            assert!(MachineConfig::try_from(raw).is_err());
        }
        let raw: RawMachineConfig =
            parse(json!({"vcpu_count": 1, "mem_size_mib": 3, "huge_pages": "2M"})).unwrap();
        assert!(MachineConfig::try_from(raw).is_err());
        assert!(parse::<RawMachineConfig>(json!({"vcpu_count": 1})).is_err());
        assert!(parse::<RawMachineConfig>(json!({"vcpu_count": -1, "mem_size_mib": 1})).is_err());
    }

    #[test]
    fn test_cpu_template_none_means_no_template() {
        let raw: RawMachineConfig =
            parse(json!({"vcpu_count": 1, "mem_size_mib": 8, "cpu_template": "None"})).unwrap();
        assert_eq!(MachineConfig::try_from(raw).unwrap().cpu_template(), None);
        let raw: RawMachineConfig =
            parse(json!({"vcpu_count": 1, "mem_size_mib": 8, "cpu_template": "T2"})).unwrap();
        assert_eq!(
            MachineConfig::try_from(raw).unwrap().cpu_template(),
            Some(CpuTemplate::T2)
        );
    }

    #[test]
    fn test_drive_defaults_and_required_fields() {
        let raw: RawDrive =
            parse(json!({"drive_id": "rootfs", "path_on_host": "/r.img", "is_root_device": true}))
                .unwrap();
        let drive = DriveConfig::try_from(raw).unwrap();
        assert!(!drive.is_read_only());
        assert_eq!(drive.cache_type(), CacheType::Unsafe);
        assert_eq!(drive.io_engine(), IoEngine::Sync);
        assert!(parse::<RawDrive>(json!({"drive_id": "a", "path_on_host": "/a"})).is_err());
        let raw: RawDrive = parse(json!({"drive_id": "a", "is_root_device": false})).unwrap();
        assert!(matches!(
            DriveConfig::try_from(raw),
            Err(RequestError::MissingField {
                field: "path_on_host"
            })
        ));
        let raw: RawDrive =
            parse(json!({"drive_id": "a", "is_root_device": false, "socket": "/s"})).unwrap();
        assert!(matches!(
            DriveConfig::try_from(raw),
            Err(RequestError::Unsupported { .. })
        ));
        assert!(
            parse::<RawDrive>(
                json!({"drive_id": "a", "is_root_device": false, "cache_type": "Never"})
            )
            .is_err()
        );
    }

    #[test]
    fn test_rate_limiter_round_trips() {
        let body = json!({"bandwidth": {"size": 1000, "refill_time": 100},
                          "ops": {"size": 10, "one_time_burst": 5, "refill_time": 1}});
        let raw: RawRateLimiter = parse(body.clone()).unwrap();
        let config = RateLimiterConfig::from(raw);
        assert_eq!(config.ops.unwrap().one_time_burst, Some(5));
        assert_eq!(
            serde_json::to_value(RawRateLimiter::from(&config)).unwrap(),
            body
        );
        assert!(parse::<RawRateLimiter>(json!({"bandwidth": {"size": 1}})).is_err());
    }

    #[test]
    fn test_network_interface_checks_mac() {
        let raw: RawNetworkInterface = parse(
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:00:00:00:01"}),
        )
        .unwrap();
        assert!(NetworkInterfaceConfig::try_from(raw).is_ok());
        let raw: RawNetworkInterface =
            parse(json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "nope"}))
                .unwrap();
        let err = NetworkInterfaceConfig::try_from(raw).unwrap_err();
        assert!(err.to_string().contains("guest_mac"), "{err}");
    }

    #[test]
    fn test_vsock_rejects_small_cid_and_accepts_deprecated_id() {
        let raw: RawVsock = parse(json!({"guest_cid": 2, "uds_path": "/v"})).unwrap();
        assert!(
            VsockConfig::try_from(raw)
                .unwrap_err()
                .to_string()
                .contains("guest_cid")
        );
        let raw: RawVsock =
            parse(json!({"vsock_id": "v", "guest_cid": 3, "uds_path": "/v"})).unwrap();
        assert!(VsockConfig::try_from(raw).is_ok());
    }

    #[test]
    fn test_logger_level_is_case_insensitive() {
        let raw: RawLogger = parse(json!({"level": "debug"})).unwrap();
        assert_eq!(LoggerConfig::try_from(raw).unwrap().level, LogLevel::Debug);
        let raw: RawLogger = parse(json!({"level": "Loud"})).unwrap();
        assert!(
            LoggerConfig::try_from(raw)
                .unwrap_err()
                .to_string()
                .contains("Loud")
        );
    }

    #[test]
    fn test_action_type_unknown_variant_lists_accepted_ones() {
        let err = parse::<RawAction>(json!({"action_type": "Reboot"})).unwrap_err();
        assert!(
            err.contains("Reboot") && err.contains("InstanceStart"),
            "{err}"
        );
    }

    #[test]
    fn test_snapshot_load_needs_exactly_one_memory_source() {
        let raw: RawSnapshotLoad = parse(json!({"snapshot_path": "/s"})).unwrap();
        assert!(SnapshotLoadParams::try_from(raw).is_err());
        let raw: RawSnapshotLoad = parse(json!({"snapshot_path": "/s", "mem_file_path": "/m",
            "mem_backend": {"backend_type": "File", "backend_path": "/m"}}))
        .unwrap();
        assert!(SnapshotLoadParams::try_from(raw).is_err());
        let raw: RawSnapshotLoad = parse(json!({"snapshot_path": "/s",
            "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}}))
        .unwrap();
        let params = SnapshotLoadParams::try_from(raw).unwrap();
        assert_eq!(params.mem_backend(), &MemoryBackend::Uffd("/u".into()));
    }

    #[test]
    fn test_full_vm_config_view_of_fresh_config() {
        let view = serde_json::to_value(FullVmConfigView::from(&VmConfig::default())).unwrap();
        assert_eq!(view["boot-source"]["kernel_image_path"], "");
        assert_eq!(view["machine-config"]["vcpu_count"], 1);
        assert_eq!(view["machine-config"]["mem_size_mib"], 128);
        assert_eq!(view["drives"], json!([]));
        assert_eq!(view["network-interfaces"], json!([]));
        for key in [
            "balloon",
            "vsock",
            "logger",
            "metrics",
            "mmds-config",
            "entropy",
            "cpu-config",
        ] {
            assert!(view[key].is_null(), "{key}");
        }
    }

    #[test]
    fn test_mmds_config_defaults_and_address_check() {
        let raw: RawMmdsConfig = parse(json!({"network_interfaces": ["eth0"]})).unwrap();
        let config = MmdsConfig::try_from(raw).unwrap();
        assert_eq!(config.version(), MmdsVersion::V1);
        let raw: RawMmdsConfig =
            parse(json!({"network_interfaces": ["eth0"], "ipv4_address": "1.2.3.4"})).unwrap();
        assert!(
            MmdsConfig::try_from(raw)
                .unwrap_err()
                .to_string()
                .contains("1.2.3.4")
        );
    }

    #[test]
    fn test_config_file_parses_sections() {
        let file: RawConfigFile = parse(json!({
            "boot-source": {"kernel_image_path": "/k", "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
            "drives": [{"drive_id": "r", "path_on_host": "/r", "is_root_device": true}]
        }))
        .unwrap();
        assert_eq!(file.drives.len(), 1);
        assert!(parse::<RawConfigFile>(json!({"boot_source": {}})).is_err());
    }
}
