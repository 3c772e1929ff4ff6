//! Validated VM configuration.
//!
//! Every type here is built through a constructor that checks its invariants, so a value of
//! one of these types is always acceptable to the VM builder: fields are private and exposed
//! through getters. The API crate turns wire bodies into these types; the event loop collects
//! them into a [`VmConfig`], which is what `InstanceStart` boots and what `GET /vm/config`
//! shows.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// Maximum number of vCPUs a microVM may have.
pub const MAX_VCPUS: u64 = 32;
/// Memory size a new microVM gets when no machine configuration was set, in MiB.
pub const DEFAULT_MEM_SIZE_MIB: u64 = 128;
/// vCPU count a new microVM gets when no machine configuration was set.
pub const DEFAULT_VCPU_COUNT: u8 = 1;
/// Smallest CID a guest may use: 0, 1 and 2 are reserved by the vsock specification.
pub const MIN_GUEST_CID: u64 = 3;
/// Link-local address the metadata service answers on when none is configured.
pub const DEFAULT_MMDS_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

/// Why a configuration value was refused. Each variant names the field and the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `vcpu_count` outside `1..=32`.
    #[error("vcpu_count {value} is out of range: the vCPU count must be between 1 and {MAX_VCPUS}")]
    VcpuCountOutOfRange {
        /// The refused count.
        value: u64,
    },
    /// SMT needs 1 or an even number of vCPUs.
    #[error("vcpu_count {value} is invalid with smt enabled: it must be 1 or an even number")]
    VcpuCountOddWithSmt {
        /// The refused count.
        value: u64,
    },
    /// SMT can only be enabled on x86_64 hosts.
    #[error("smt cannot be enabled on this architecture")]
    SmtUnsupported,
    /// `mem_size_mib` of zero.
    #[error("mem_size_mib {value} is invalid: the memory size must be at least 1 MiB")]
    MemSizeZero {
        /// The refused size.
        value: u64,
    },
    /// 2M huge pages need a memory size that is a multiple of 2 MiB.
    #[error("mem_size_mib {value} is invalid with huge_pages 2M: it must be a multiple of 2")]
    MemSizeNotHugePageAligned {
        /// The refused size.
        value: u64,
    },
    /// A required path was empty.
    #[error("{field} must not be empty")]
    EmptyPath {
        /// The wire name of the field.
        field: &'static str,
    },
    /// A device id was empty or used characters outside `[A-Za-z0-9_-]`.
    #[error("{field} {value:?} is invalid: ids are 1 to 64 characters of A-Z, a-z, 0-9, _ or -")]
    InvalidId {
        /// The wire name of the field.
        field: &'static str,
        /// The refused id.
        value: String,
    },
    /// A root-device `partuuid` was given for a drive that is not the root device.
    #[error("partuuid {value:?} is only meaningful when is_root_device is true")]
    PartuuidWithoutRoot {
        /// The refused partuuid.
        value: String,
    },
    /// A MAC address was not six colon-separated hex bytes.
    #[error("guest_mac {value:?} is not a MAC address of the form aa:bb:cc:dd:ee:ff")]
    InvalidMac {
        /// The refused text.
        value: String,
    },
    /// A network MTU outside `68..=65535`.
    #[error("mtu {value} is out of range: it must be between 68 and 65535")]
    MtuOutOfRange {
        /// The refused MTU.
        value: u64,
    },
    /// A guest CID below 3.
    #[error("guest_cid {value} is invalid: it must be at least {MIN_GUEST_CID}")]
    GuestCidTooSmall {
        /// The refused CID.
        value: u64,
    },
    /// A guest CID that does not fit the 32-bit CID space.
    #[error("guest_cid {value} is invalid: it must fit in 32 bits")]
    GuestCidTooLarge {
        /// The refused CID.
        value: u64,
    },
    /// A value that does not fit the type the device uses.
    #[error("{field} {value} is too large")]
    ValueTooLarge {
        /// The wire name of the field.
        field: &'static str,
        /// The refused value.
        value: u64,
    },
    /// The MMDS address is not a usable IPv4 link-local address.
    #[error(
        "ipv4_address {value:?} is not an IPv4 link-local address in 169.254.1.0 - 169.254.254.255"
    )]
    InvalidMmdsAddress {
        /// The refused text.
        value: String,
    },
    /// The MMDS configuration lists no interface.
    #[error("network_interfaces must name at least one interface")]
    MmdsWithoutInterfaces,
    /// Exactly one of `mem_file_path` and `mem_backend` must be given to load a snapshot.
    #[error("exactly one of mem_file_path and mem_backend must be given")]
    SnapshotMemSource,
}

fn require_path(field: &'static str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    if path.as_os_str().is_empty() {
        return Err(ConfigError::EmptyPath { field });
    }
    Ok(path)
}

/// A device identifier: 1 to 64 characters of `[A-Za-z0-9_-]`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

impl DeviceId {
    /// Checks `value` as the id held by the wire field `field`.
    ///
    /// # Errors
    /// [`ConfigError::InvalidId`] if it is empty, longer than 64 characters, or uses other
    /// characters.
    pub fn new(field: &'static str, value: String) -> Result<Self, ConfigError> {
        let ok = !value.is_empty()
            && value.len() <= 64
            && value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if ok {
            Ok(Self(value))
        } else {
            Err(ConfigError::InvalidId { field, value })
        }
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How guest memory is backed by huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Regular 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages requested with `madvise`.
    Transparent,
    /// Explicit 2 MiB hugetlbfs pages.
    Hugetlbfs2M,
}

/// A static CPU template (deprecated upstream; accepted for compatibility).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Intel C3 instance shape.
    C3,
    /// Intel T2 instance shape.
    T2,
    /// Intel T2 with the S variant.
    T2S,
    /// Intel T2 with Cascade Lake features.
    T2CL,
    /// AMD T2 shape.
    T2A,
    /// Arm Neoverse V1 shape.
    V1N1,
}

/// The machine shape: vCPUs, memory and CPU features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    vcpu_count: u8,
    mem_size_mib: u64,
    smt: bool,
    track_dirty_pages: bool,
    huge_pages: HugePages,
    cpu_template: Option<CpuTemplate>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: DEFAULT_VCPU_COUNT,
            mem_size_mib: DEFAULT_MEM_SIZE_MIB,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
        }
    }
}

/// A partial machine configuration: every present field replaces the current one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MachineConfigUpdate {
    /// New vCPU count, unchecked until applied.
    pub vcpu_count: Option<u64>,
    /// New memory size in MiB, unchecked until applied.
    pub mem_size_mib: Option<u64>,
    /// New SMT setting.
    pub smt: Option<bool>,
    /// New dirty-page tracking setting.
    pub track_dirty_pages: Option<bool>,
    /// New huge page backing.
    pub huge_pages: Option<HugePages>,
    /// New CPU template; `Some(None)` clears it.
    pub cpu_template: Option<Option<CpuTemplate>>,
}

impl MachineConfig {
    /// Builds a machine configuration.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the first field that is out of range: the vCPU count must be
    /// in `1..=32` (1 or even with SMT), memory at least 1 MiB (a multiple of 2 with 2M huge
    /// pages), and SMT is only available on x86_64.
    pub fn new(
        vcpu_count: u64,
        mem_size_mib: u64,
        smt: bool,
        track_dirty_pages: bool,
        huge_pages: HugePages,
        cpu_template: Option<CpuTemplate>,
    ) -> Result<Self, ConfigError> {
        Self::check(
            vcpu_count,
            mem_size_mib,
            smt,
            huge_pages,
            cfg!(target_arch = "x86_64"),
        )?;
        let vcpu_count = u8::try_from(vcpu_count)
            .map_err(|_| ConfigError::VcpuCountOutOfRange { value: vcpu_count })?;
        Ok(Self {
            vcpu_count,
            mem_size_mib,
            smt,
            track_dirty_pages,
            huge_pages,
            cpu_template,
        })
    }

    fn check(
        vcpu_count: u64,
        mem_size_mib: u64,
        smt: bool,
        huge_pages: HugePages,
        smt_available: bool,
    ) -> Result<(), ConfigError> {
        if !(1..=MAX_VCPUS).contains(&vcpu_count) {
            return Err(ConfigError::VcpuCountOutOfRange { value: vcpu_count });
        }
        if smt && !smt_available {
            return Err(ConfigError::SmtUnsupported);
        }
        if smt && vcpu_count > 1 && !vcpu_count.is_multiple_of(2) {
            return Err(ConfigError::VcpuCountOddWithSmt { value: vcpu_count });
        }
        if mem_size_mib == 0 {
            return Err(ConfigError::MemSizeZero {
                value: mem_size_mib,
            });
        }
        if huge_pages == HugePages::Hugetlbfs2M && !mem_size_mib.is_multiple_of(2) {
            return Err(ConfigError::MemSizeNotHugePageAligned {
                value: mem_size_mib,
            });
        }
        Ok(())
    }

    /// Returns this configuration with `update` applied, checked as a whole.
    ///
    /// # Errors
    /// As [`MachineConfig::new`] for the merged values; `self` is never changed.
    pub fn apply(&self, update: &MachineConfigUpdate) -> Result<Self, ConfigError> {
        Self::new(
            update.vcpu_count.unwrap_or(u64::from(self.vcpu_count)),
            update.mem_size_mib.unwrap_or(self.mem_size_mib),
            update.smt.unwrap_or(self.smt),
            update.track_dirty_pages.unwrap_or(self.track_dirty_pages),
            update.huge_pages.unwrap_or(self.huge_pages),
            update.cpu_template.unwrap_or(self.cpu_template),
        )
    }

    /// Number of vCPUs, in `1..=32`.
    pub fn vcpu_count(&self) -> u8 {
        self.vcpu_count
    }
    /// Guest memory size in MiB, at least 1.
    pub fn mem_size_mib(&self) -> u64 {
        self.mem_size_mib
    }
    /// Whether simultaneous multithreading is exposed to the guest.
    pub fn smt(&self) -> bool {
        self.smt
    }
    /// Whether dirty pages are tracked (for diff snapshots).
    pub fn track_dirty_pages(&self) -> bool {
        self.track_dirty_pages
    }
    /// Huge page backing of guest memory.
    pub fn huge_pages(&self) -> HugePages {
        self.huge_pages
    }
    /// The static CPU template, if any.
    pub fn cpu_template(&self) -> Option<CpuTemplate> {
        self.cpu_template
    }
}

/// The guest kernel, its initrd and its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSource {
    kernel_image_path: PathBuf,
    initrd_path: Option<PathBuf>,
    boot_args: Option<String>,
}

impl BootSource {
    /// Builds a boot source.
    ///
    /// # Errors
    /// [`ConfigError::EmptyPath`] if the kernel path (or a given initrd path) is empty.
    pub fn new(
        kernel_image_path: PathBuf,
        initrd_path: Option<PathBuf>,
        boot_args: Option<String>,
    ) -> Result<Self, ConfigError> {
        let kernel_image_path = require_path("kernel_image_path", kernel_image_path)?;
        let initrd_path = initrd_path
            .map(|p| require_path("initrd_path", p))
            .transpose()?;
        Ok(Self {
            kernel_image_path,
            initrd_path,
            boot_args,
        })
    }
    /// Host path of the kernel image.
    pub fn kernel_image_path(&self) -> &Path {
        &self.kernel_image_path
    }
    /// Host path of the initrd, if any.
    pub fn initrd_path(&self) -> Option<&Path> {
        self.initrd_path.as_deref()
    }
    /// Kernel command line; `None` means the VMM's default line.
    pub fn boot_args(&self) -> Option<&str> {
        self.boot_args.as_deref()
    }
}

/// A token bucket: `size` tokens refilled every `refill_time_ms` milliseconds, with an
/// optional initial burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Bucket capacity in tokens (bytes or operations).
    pub size: u64,
    /// Extra tokens available once at start.
    pub one_time_burst: Option<u64>,
    /// Time to refill a whole bucket, in milliseconds.
    pub refill_time_ms: u64,
}

/// An I/O rate limiter with independent bandwidth and operation buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimiterConfig {
    /// Bucket counting bytes.
    pub bandwidth: Option<TokenBucket>,
    /// Bucket counting operations.
    pub ops: Option<TokenBucket>,
}

/// Host caching of a drive's writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheType {
    /// Flush requests from the guest are acknowledged without syncing the host file.
    #[default]
    Unsafe,
    /// Flush requests from the guest sync the host file.
    Writeback,
}

/// How the block device does host I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoEngine {
    /// Blocking reads and writes on the device's worker.
    #[default]
    Sync,
    /// io_uring (Linux only).
    Async,
}

/// A file-backed virtio block device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveConfig {
    drive_id: DeviceId,
    path_on_host: PathBuf,
    is_root_device: bool,
    is_read_only: bool,
    partuuid: Option<String>,
    cache_type: CacheType,
    io_engine: IoEngine,
    rate_limiter: Option<RateLimiterConfig>,
}

impl DriveConfig {
    /// Builds a drive.
    ///
    /// # Errors
    /// [`ConfigError::InvalidId`] for a bad id, [`ConfigError::EmptyPath`] for an empty path,
    /// [`ConfigError::PartuuidWithoutRoot`] for a partuuid on a non-root drive.
    #[expect(
        clippy::too_many_arguments,
        reason = "mirrors the wire fields one to one"
    )]
    pub fn new(
        drive_id: DeviceId,
        path_on_host: PathBuf,
        is_root_device: bool,
        is_read_only: bool,
        partuuid: Option<String>,
        cache_type: CacheType,
        io_engine: IoEngine,
        rate_limiter: Option<RateLimiterConfig>,
    ) -> Result<Self, ConfigError> {
        let path_on_host = require_path("path_on_host", path_on_host)?;
        if let Some(value) = partuuid.as_ref().filter(|_| !is_root_device) {
            return Err(ConfigError::PartuuidWithoutRoot {
                value: value.clone(),
            });
        }
        Ok(Self {
            drive_id,
            path_on_host,
            is_root_device,
            is_read_only,
            partuuid,
            cache_type,
            io_engine,
            rate_limiter,
        })
    }
    /// The drive's id.
    pub fn drive_id(&self) -> &DeviceId {
        &self.drive_id
    }
    /// Host path of the backing file.
    pub fn path_on_host(&self) -> &Path {
        &self.path_on_host
    }
    /// Whether this drive holds the guest's root file system.
    pub fn is_root_device(&self) -> bool {
        self.is_root_device
    }
    /// Whether the guest may only read the drive.
    pub fn is_read_only(&self) -> bool {
        self.is_read_only
    }
    /// Partition UUID of the root partition, for `root=PARTUUID=`.
    pub fn partuuid(&self) -> Option<&str> {
        self.partuuid.as_deref()
    }
    /// Host caching mode.
    pub fn cache_type(&self) -> CacheType {
        self.cache_type
    }
    /// Host I/O engine.
    pub fn io_engine(&self) -> IoEngine {
        self.io_engine
    }
    /// Rate limiter, if any.
    pub fn rate_limiter(&self) -> Option<&RateLimiterConfig> {
        self.rate_limiter.as_ref()
    }
    /// This drive with the present fields of `update` applied.
    pub fn with_update(&self, update: &DriveUpdate) -> Self {
        let mut next = self.clone();
        if let Some(path) = update
            .path_on_host
            .as_ref()
            .filter(|p| !p.as_os_str().is_empty())
        {
            next.path_on_host = path.clone();
        }
        if let Some(limiter) = update.rate_limiter {
            next.rate_limiter = Some(limiter);
        }
        next
    }
}

/// A post-boot change of a drive's backing file or rate limiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriveUpdate {
    /// The drive to change.
    pub drive_id: DeviceId,
    /// New backing file, if any.
    pub path_on_host: Option<PathBuf>,
    /// New rate limiter, if any.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// A MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr([u8; 6]);

impl MacAddr {
    /// Parses `aa:bb:cc:dd:ee:ff`.
    ///
    /// # Errors
    /// [`ConfigError::InvalidMac`] for any other text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let invalid = || ConfigError::InvalidMac {
            value: text.to_owned(),
        };
        let mut bytes = [0u8; 6];
        let mut parts = text.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(Self(bytes))
    }
    /// The six bytes.
    pub fn bytes(&self) -> [u8; 6] {
        self.0
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A virtio network interface backed by a host TAP device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterfaceConfig {
    iface_id: DeviceId,
    host_dev_name: String,
    guest_mac: Option<MacAddr>,
    mtu: Option<u16>,
    rx_rate_limiter: Option<RateLimiterConfig>,
    tx_rate_limiter: Option<RateLimiterConfig>,
}

impl NetworkInterfaceConfig {
    /// Builds a network interface.
    ///
    /// # Errors
    /// [`ConfigError::EmptyPath`] for an empty `host_dev_name`,
    /// [`ConfigError::MtuOutOfRange`] for an MTU outside `68..=65535`.
    pub fn new(
        iface_id: DeviceId,
        host_dev_name: String,
        guest_mac: Option<MacAddr>,
        mtu: Option<u64>,
        rx_rate_limiter: Option<RateLimiterConfig>,
        tx_rate_limiter: Option<RateLimiterConfig>,
    ) -> Result<Self, ConfigError> {
        if host_dev_name.is_empty() {
            return Err(ConfigError::EmptyPath {
                field: "host_dev_name",
            });
        }
        let mtu = mtu
            .map(|value| {
                u16::try_from(value)
                    .ok()
                    .filter(|m| *m >= 68)
                    .ok_or(ConfigError::MtuOutOfRange { value })
            })
            .transpose()?;
        Ok(Self {
            iface_id,
            host_dev_name,
            guest_mac,
            mtu,
            rx_rate_limiter,
            tx_rate_limiter,
        })
    }
    /// The interface's id.
    pub fn iface_id(&self) -> &DeviceId {
        &self.iface_id
    }
    /// Name of the host TAP device.
    pub fn host_dev_name(&self) -> &str {
        &self.host_dev_name
    }
    /// MAC address shown to the guest, if fixed.
    pub fn guest_mac(&self) -> Option<MacAddr> {
        self.guest_mac
    }
    /// MTU advertised to the guest, if any.
    pub fn mtu(&self) -> Option<u16> {
        self.mtu
    }
    /// Receive rate limiter.
    pub fn rx_rate_limiter(&self) -> Option<&RateLimiterConfig> {
        self.rx_rate_limiter.as_ref()
    }
    /// Transmit rate limiter.
    pub fn tx_rate_limiter(&self) -> Option<&RateLimiterConfig> {
        self.tx_rate_limiter.as_ref()
    }
    /// This interface with the present limiters of `update` applied.
    pub fn with_update(&self, update: &NetworkInterfaceUpdate) -> Self {
        let mut next = self.clone();
        if let Some(limiter) = update.rx_rate_limiter {
            next.rx_rate_limiter = Some(limiter);
        }
        if let Some(limiter) = update.tx_rate_limiter {
            next.tx_rate_limiter = Some(limiter);
        }
        next
    }
}

/// A post-boot change of an interface's rate limiters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterfaceUpdate {
    /// The interface to change.
    pub iface_id: DeviceId,
    /// New receive limiter, if any.
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// New transmit limiter, if any.
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// A virtio-pmem device backed by a host file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PmemConfig {
    id: DeviceId,
    path_on_host: PathBuf,
    root_device: bool,
    read_only: bool,
}

impl PmemConfig {
    /// Builds a pmem device.
    ///
    /// # Errors
    /// [`ConfigError::EmptyPath`] for an empty path.
    pub fn new(
        id: DeviceId,
        path_on_host: PathBuf,
        root_device: bool,
        read_only: bool,
    ) -> Result<Self, ConfigError> {
        let path_on_host = require_path("path_on_host", path_on_host)?;
        Ok(Self {
            id,
            path_on_host,
            root_device,
            read_only,
        })
    }
    /// The device's id.
    pub fn id(&self) -> &DeviceId {
        &self.id
    }
    /// Host path of the backing file.
    pub fn path_on_host(&self) -> &Path {
        &self.path_on_host
    }
    /// Whether the guest boots from this device.
    pub fn root_device(&self) -> bool {
        self.root_device
    }
    /// Whether the file is mapped read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// The virtio-vsock device; its host side is a Unix socket ("hybrid vsock").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    guest_cid: u32,
    uds_path: PathBuf,
}

impl VsockConfig {
    /// Builds a vsock device.
    ///
    /// # Errors
    /// [`ConfigError::GuestCidTooSmall`] below 3, [`ConfigError::GuestCidTooLarge`] above
    /// `u32::MAX`, [`ConfigError::EmptyPath`] for an empty socket path.
    pub fn new(guest_cid: u64, uds_path: PathBuf) -> Result<Self, ConfigError> {
        if guest_cid < MIN_GUEST_CID {
            return Err(ConfigError::GuestCidTooSmall { value: guest_cid });
        }
        let guest_cid = u32::try_from(guest_cid)
            .map_err(|_| ConfigError::GuestCidTooLarge { value: guest_cid })?;
        let uds_path = require_path("uds_path", uds_path)?;
        Ok(Self {
            guest_cid,
            uds_path,
        })
    }
    /// The guest's context id, at least 3.
    pub fn guest_cid(&self) -> u32 {
        self.guest_cid
    }
    /// Host Unix socket the VMM listens on for host-initiated connections.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }
}

/// The virtio-rng device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EntropyConfig {
    /// Rate limiter on bytes handed to the guest.
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// The virtio-balloon device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonConfig {
    amount_mib: u32,
    deflate_on_oom: bool,
    stats_polling_interval_s: u16,
    free_page_hinting: bool,
    free_page_reporting: bool,
}

impl BalloonConfig {
    /// Builds a balloon device. Whether `amount_mib` fits the guest's memory is a cross-field
    /// check made by the controller.
    ///
    /// # Errors
    /// [`ConfigError::ValueTooLarge`] if the amount does not fit 32 bits or the interval 16.
    pub fn new(
        amount_mib: u64,
        deflate_on_oom: bool,
        stats_polling_interval_s: u64,
        free_page_hinting: bool,
        free_page_reporting: bool,
    ) -> Result<Self, ConfigError> {
        let amount_mib = u32::try_from(amount_mib).map_err(|_| ConfigError::ValueTooLarge {
            field: "amount_mib",
            value: amount_mib,
        })?;
        let stats_polling_interval_s =
            u16::try_from(stats_polling_interval_s).map_err(|_| ConfigError::ValueTooLarge {
                field: "stats_polling_interval_s",
                value: stats_polling_interval_s,
            })?;
        Ok(Self {
            amount_mib,
            deflate_on_oom,
            stats_polling_interval_s,
            free_page_hinting,
            free_page_reporting,
        })
    }
    /// Target balloon size in MiB.
    pub fn amount_mib(&self) -> u32 {
        self.amount_mib
    }
    /// Whether the guest may deflate the balloon under memory pressure.
    pub fn deflate_on_oom(&self) -> bool {
        self.deflate_on_oom
    }
    /// Statistics polling interval in seconds; 0 disables statistics.
    pub fn stats_polling_interval_s(&self) -> u16 {
        self.stats_polling_interval_s
    }
    /// Whether free page hinting is offered.
    pub fn free_page_hinting(&self) -> bool {
        self.free_page_hinting
    }
    /// Whether free page reporting is offered.
    pub fn free_page_reporting(&self) -> bool {
        self.free_page_reporting
    }
    /// This configuration with a new target size.
    pub fn with_amount_mib(self, amount_mib: u32) -> Self {
        Self { amount_mib, ..self }
    }
    /// This configuration with a new statistics interval.
    pub fn with_stats_polling_interval_s(self, stats_polling_interval_s: u16) -> Self {
        Self {
            stats_polling_interval_s,
            ..self
        }
    }
}

/// A change of the balloon's target size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonUpdate {
    /// New target size in MiB.
    pub amount_mib: u32,
}

/// A change of the balloon's statistics interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BalloonStatsUpdate {
    /// New interval in seconds.
    pub stats_polling_interval_s: u16,
}

/// Latest balloon statistics reported by the guest; published by a running backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BalloonStats {
    /// Target size in 4 KiB pages.
    pub target_pages: u32,
    /// Current size in 4 KiB pages.
    pub actual_pages: u32,
    /// Target size in MiB.
    pub target_mib: u32,
    /// Current size in MiB.
    pub actual_mib: u32,
    /// Free memory in the guest, bytes.
    pub free_memory: Option<u64>,
    /// Total memory in the guest, bytes.
    pub total_memory: Option<u64>,
    /// Available memory in the guest, bytes.
    pub available_memory: Option<u64>,
}

/// Log verbosity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogLevel {
    /// Nothing is logged.
    Off,
    /// Errors only.
    Error,
    /// Warnings and errors.
    Warning,
    /// Lifecycle information.
    #[default]
    Info,
    /// Per-request detail.
    Debug,
    /// Hot-path detail.
    Trace,
}

/// Where and how the VMM logs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoggerConfig {
    /// File or named pipe to log to; `None` keeps the current destination.
    pub log_path: Option<PathBuf>,
    /// Verbosity.
    pub level: LogLevel,
    /// Whether lines carry their level.
    pub show_level: bool,
    /// Whether lines carry their source location.
    pub show_log_origin: bool,
    /// Module path filter.
    pub module: Option<String>,
}

/// Where metrics are flushed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    metrics_path: PathBuf,
}

impl MetricsConfig {
    /// Builds a metrics destination.
    ///
    /// # Errors
    /// [`ConfigError::EmptyPath`] for an empty path.
    pub fn new(metrics_path: PathBuf) -> Result<Self, ConfigError> {
        Ok(Self {
            metrics_path: require_path("metrics_path", metrics_path)?,
        })
    }
    /// File or named pipe receiving JSON metrics.
    pub fn metrics_path(&self) -> &Path {
        &self.metrics_path
    }
}

/// The serial console's destination.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SerialConfig {
    /// File or named pipe receiving guest console output; `None` means the VMM's stdout.
    pub serial_out_path: Option<PathBuf>,
}

/// MMDS protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MmdsVersion {
    /// Plain GETs.
    #[default]
    V1,
    /// Session tokens required.
    V2,
}

/// The microVM metadata service configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MmdsConfig {
    version: MmdsVersion,
    network_interfaces: Vec<DeviceId>,
    ipv4_address: Ipv4Addr,
    imds_compat: bool,
}

impl MmdsConfig {
    /// Builds an MMDS configuration. Whether the interfaces exist is checked when applied.
    ///
    /// # Errors
    /// [`ConfigError::MmdsWithoutInterfaces`] for an empty interface list,
    /// [`ConfigError::InvalidMmdsAddress`] for an address outside 169.254.1.0-169.254.254.255.
    pub fn new(
        version: MmdsVersion,
        network_interfaces: Vec<DeviceId>,
        ipv4_address: Option<&str>,
        imds_compat: bool,
    ) -> Result<Self, ConfigError> {
        if network_interfaces.is_empty() {
            return Err(ConfigError::MmdsWithoutInterfaces);
        }
        let ipv4_address = match ipv4_address {
            None => DEFAULT_MMDS_IPV4,
            Some(text) => {
                let invalid = || ConfigError::InvalidMmdsAddress {
                    value: text.to_owned(),
                };
                let addr: Ipv4Addr = text.parse().map_err(|_| invalid())?;
                let [a, b, c, _] = addr.octets();
                // RFC 3927 section 2.1: the first and last 256 addresses of 169.254/16 are
                // reserved.
                if a != 169 || b != 254 || c == 0 || c == 255 {
                    return Err(invalid());
                }
                addr
            }
        };
        Ok(Self {
            version,
            network_interfaces,
            ipv4_address,
            imds_compat,
        })
    }
    /// Protocol version.
    pub fn version(&self) -> MmdsVersion {
        self.version
    }
    /// Interfaces whose traffic to the MMDS address is intercepted.
    pub fn network_interfaces(&self) -> &[DeviceId] {
        &self.network_interfaces
    }
    /// The link-local address the service answers on.
    pub fn ipv4_address(&self) -> Ipv4Addr {
        self.ipv4_address
    }
    /// Whether answers are EC2 IMDS compatible (`text/plain`).
    pub fn imds_compat(&self) -> bool {
        self.imds_compat
    }
}

/// The whole VM configuration as collected before boot.
///
/// Devices keep insertion order; putting a device with an existing id replaces it in place.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VmConfig {
    /// Machine shape; defaults until set.
    pub machine_config: MachineConfig,
    /// Whether the machine configuration was set explicitly (rather than defaulted).
    pub machine_config_set: bool,
    /// Kernel, initrd and command line.
    pub boot_source: Option<BootSource>,
    /// Block devices.
    pub drives: Vec<DriveConfig>,
    /// Network interfaces.
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    /// Persistent memory devices.
    pub pmem: Vec<PmemConfig>,
    /// The vsock device.
    pub vsock: Option<VsockConfig>,
    /// The entropy device.
    pub entropy: Option<EntropyConfig>,
    /// The balloon device.
    pub balloon: Option<BalloonConfig>,
    /// Logger settings.
    pub logger: Option<LoggerConfig>,
    /// Metrics destination.
    pub metrics: Option<MetricsConfig>,
    /// Metadata service settings.
    pub mmds_config: Option<MmdsConfig>,
    /// Metadata service contents (a JSON document); `None` until first put.
    pub mmds_data: Option<serde_json::Value>,
    /// Serial console destination.
    pub serial: SerialConfig,
}

impl VmConfig {
    /// Inserts `drive`, replacing a drive with the same id in place.
    pub fn upsert_drive(&mut self, drive: DriveConfig) {
        upsert(&mut self.drives, drive, |d| d.drive_id().clone());
    }
    /// Inserts `iface`, replacing an interface with the same id in place.
    pub fn upsert_network_interface(&mut self, iface: NetworkInterfaceConfig) {
        upsert(&mut self.network_interfaces, iface, |i| {
            i.iface_id().clone()
        });
    }
    /// Inserts `pmem`, replacing a device with the same id in place.
    pub fn upsert_pmem(&mut self, pmem: PmemConfig) {
        upsert(&mut self.pmem, pmem, |p| p.id().clone());
    }
}

fn upsert<T>(list: &mut Vec<T>, item: T, key: impl Fn(&T) -> DeviceId) {
    let id = key(&item);
    match list.iter_mut().find(|existing| key(existing) == id) {
        Some(slot) => *slot = item,
        None => list.push(item),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new("drive_id", s.to_owned()).unwrap()
    }

    #[test]
    fn test_machine_config_rejects_vcpu_count_zero_and_33() {
        for v in [0, 33, 300] {
            let err = MachineConfig::new(v, 128, false, false, HugePages::None, None).unwrap_err();
            assert_eq!(err, ConfigError::VcpuCountOutOfRange { value: v });
            assert!(err.to_string().contains("vcpu_count"));
        }
        assert!(MachineConfig::new(1, 128, false, false, HugePages::None, None).is_ok());
        assert!(MachineConfig::new(32, 128, false, false, HugePages::None, None).is_ok());
    }

    #[test]
    fn test_machine_config_rejects_zero_memory() {
        let err = MachineConfig::new(1, 0, false, false, HugePages::None, None).unwrap_err();
        assert_eq!(err, ConfigError::MemSizeZero { value: 0 });
        assert!(err.to_string().contains("mem_size_mib"));
    }

    #[test]
    fn test_machine_config_rejects_odd_vcpus_with_smt() {
        let err = MachineConfig::check(3, 128, true, HugePages::None, true).unwrap_err();
        assert_eq!(err, ConfigError::VcpuCountOddWithSmt { value: 3 });
        assert!(MachineConfig::check(1, 128, true, HugePages::None, true).is_ok());
        assert!(MachineConfig::check(4, 128, true, HugePages::None, true).is_ok());
    }

    #[test]
    fn test_machine_config_rejects_smt_where_unavailable() {
        let err = MachineConfig::check(2, 128, true, HugePages::None, false).unwrap_err();
        assert_eq!(err, ConfigError::SmtUnsupported);
    }

    #[test]
    fn test_machine_config_rejects_odd_memory_with_2m_pages() {
        let err = MachineConfig::new(1, 127, false, false, HugePages::Hugetlbfs2M, None);
        assert_eq!(
            err.unwrap_err(),
            ConfigError::MemSizeNotHugePageAligned { value: 127 }
        );
        assert!(MachineConfig::new(1, 127, false, false, HugePages::Transparent, None).is_ok());
    }

    #[test]
    fn test_machine_config_apply_merges_and_leaves_original_on_error() {
        let base = MachineConfig::new(2, 256, false, false, HugePages::None, None).unwrap();
        let merged = base
            .apply(&MachineConfigUpdate {
                mem_size_mib: Some(512),
                ..Default::default()
            })
            .unwrap();
        assert_eq!((merged.vcpu_count(), merged.mem_size_mib()), (2, 512));
        let err = base.apply(&MachineConfigUpdate {
            vcpu_count: Some(0),
            ..Default::default()
        });
        assert!(err.is_err());
        assert_eq!(base.mem_size_mib(), 256);
    }

    #[test]
    fn test_device_id_rejects_empty_long_and_odd_characters() {
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            let err = DeviceId::new("drive_id", bad.to_owned()).unwrap_err();
            assert!(matches!(
                err,
                ConfigError::InvalidId {
                    field: "drive_id",
                    ..
                }
            ));
        }
        assert_eq!(id("root-fs_1").as_str(), "root-fs_1");
    }

    #[test]
    fn test_drive_rejects_empty_path_and_partuuid_without_root() {
        let err = DriveConfig::new(
            id("a"),
            PathBuf::new(),
            false,
            false,
            None,
            CacheType::Unsafe,
            IoEngine::Sync,
            None,
        );
        assert_eq!(
            err.unwrap_err(),
            ConfigError::EmptyPath {
                field: "path_on_host"
            }
        );
        let err = DriveConfig::new(
            id("a"),
            "/x".into(),
            false,
            false,
            Some("abcd".into()),
            CacheType::Unsafe,
            IoEngine::Sync,
            None,
        );
        assert_eq!(
            err.unwrap_err(),
            ConfigError::PartuuidWithoutRoot {
                value: "abcd".into()
            }
        );
    }

    #[test]
    fn test_mac_parse_accepts_only_six_hex_bytes() {
        assert_eq!(
            MacAddr::parse("06:00:AC:10:00:02").unwrap().to_string(),
            "06:00:ac:10:00:02"
        );
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "0g:00:00:00:00:00",
            "6:0:0:0:0:0",
        ] {
            assert!(MacAddr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_network_interface_rejects_bad_mtu_and_empty_tap() {
        let iface = |mtu, tap: &str| {
            NetworkInterfaceConfig::new(id("eth0"), tap.into(), None, mtu, None, None)
        };
        assert_eq!(
            iface(Some(67), "tap0").unwrap_err(),
            ConfigError::MtuOutOfRange { value: 67 }
        );
        assert!(iface(Some(65536), "tap0").is_err());
        assert!(iface(Some(1500), "tap0").is_ok());
        assert_eq!(
            iface(None, "").unwrap_err(),
            ConfigError::EmptyPath {
                field: "host_dev_name"
            }
        );
    }

    #[test]
    fn test_vsock_rejects_reserved_and_oversized_cids() {
        assert_eq!(
            VsockConfig::new(2, "/v.sock".into()).unwrap_err(),
            ConfigError::GuestCidTooSmall { value: 2 }
        );
        assert!(VsockConfig::new(1 << 32, "/v.sock".into()).is_err());
        assert_eq!(
            VsockConfig::new(3, "/v.sock".into()).unwrap().guest_cid(),
            3
        );
        assert!(VsockConfig::new(3, PathBuf::new()).is_err());
    }

    #[test]
    fn test_balloon_rejects_oversized_values() {
        assert!(BalloonConfig::new(u64::from(u32::MAX) + 1, false, 0, false, false).is_err());
        assert!(BalloonConfig::new(64, false, 70_000, false, false).is_err());
        assert_eq!(
            BalloonConfig::new(64, true, 1, false, false)
                .unwrap()
                .amount_mib(),
            64
        );
    }

    #[test]
    fn test_mmds_config_checks_address_and_interfaces() {
        let ifaces = vec![id("eth0")];
        assert_eq!(
            MmdsConfig::new(MmdsVersion::V2, ifaces.clone(), None, false)
                .unwrap()
                .ipv4_address(),
            DEFAULT_MMDS_IPV4
        );
        for bad in ["10.0.0.1", "169.254.0.1", "169.254.255.1", "nope"] {
            assert!(MmdsConfig::new(MmdsVersion::V1, ifaces.clone(), Some(bad), false).is_err());
        }
        assert_eq!(
            MmdsConfig::new(MmdsVersion::V1, vec![], None, false).unwrap_err(),
            ConfigError::MmdsWithoutInterfaces
        );
    }

    #[test]
    fn test_vm_config_upsert_replaces_same_id_in_place() {
        let drive = |name: &str, path: &str| {
            DriveConfig::new(
                id(name),
                path.into(),
                false,
                false,
                None,
                CacheType::Unsafe,
                IoEngine::Sync,
                None,
            )
            .unwrap()
        };
        let mut config = VmConfig::default();
        config.upsert_drive(drive("a", "/1"));
        config.upsert_drive(drive("b", "/2"));
        config.upsert_drive(drive("a", "/3"));
        let paths: Vec<_> = config
            .drives
            .iter()
            .map(|d| d.path_on_host().to_owned())
            .collect();
        assert_eq!(paths, [PathBuf::from("/3"), PathBuf::from("/2")]);
    }
}
