//! Builds a running microVM from a validated [`VmConfig`]: guest memory, the hypervisor VM, the
//! platform devices, the virtio-mmio devices, the kernel and its boot structures, and one
//! thread per vCPU. [`build`] is per architecture (`builder/x86_64.rs`, `builder/aarch64.rs`);
//! everything else here is shared.
//!
//! # Attaching virtio-mmio devices
//!
//! Every virtio device goes through [`MmioDevices::attach`], the one place that hands out
//! resources: the next virtio-mmio window and interrupt of the architecture's memory map
//! (x86_64: 4 KiB windows from `0xd000_0000` and IOAPIC pins from 5, announced to the guest as
//! `virtio_mmio.device=4K@0x…:IRQ` entries on the kernel command line; aarch64: the device
//! tree's virtio slots from `0x0a00_0000` and SPIs from 16), an
//! [`InterruptLine`](squib_devices::InterruptLine) for it and the registration on the MMIO bus.
//! To add a device kind, construct it in [`attach_configured_devices`] from its part of the
//! [`VmConfig`] and call `attach`. Devices are attached in configuration order, root drive
//! first, so the root drive is `/dev/vda`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use squib_devices::virtio::{Block, MmioTransport, Rng, VirtioDevice};
use squib_devices::{Bus, BusError};
use squib_hypervisor::{HypervisorError, Vm};
use tracing::info;
use vm_memory::GuestMemoryMmap;

#[cfg(target_arch = "aarch64")]
use crate::arch::aarch64 as arch;
#[cfg(target_arch = "x86_64")]
use crate::arch::x86_64 as arch;
use crate::config::VmConfig;
use crate::memory::MemoryError;
use crate::vcpu::{self, VcpuContext, VcpuError};
use crate::vm::MicroVm;

#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
pub use aarch64::build;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub use x86_64::build;

/// The kernel command line used when the boot source gives none: the serial console, reboot
/// through the keyboard controller, reboot one second after a panic (which squib reports as a
/// panic, see `squib_devices::serial`).
#[cfg(target_arch = "x86_64")]
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";
/// The kernel command line used when the boot source gives none: the PL011 console, reboot
/// one second after a panic (which squib reports as a panic, see `squib_devices::serial`).
#[cfg(target_arch = "aarch64")]
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyAMA0 panic=1";

/// A failure to build the microVM. Nothing it created survives the error.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// `InstanceStart` without a boot source.
    #[error("no boot source is configured")]
    MissingBootSource,
    /// The hypervisor refused an operation.
    #[error("hypervisor: {operation}")]
    Hypervisor {
        /// What was being done.
        operation: &'static str,
        /// The backend's error.
        #[source]
        source: HypervisorError,
    },
    /// The VM asks for more vCPUs than the host allows.
    #[error("vcpu_count {vcpu_count} exceeds the host's limit of {max}")]
    TooManyVcpus {
        /// Requested count.
        vcpu_count: u8,
        /// The host's limit.
        max: u32,
    },
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Loading the kernel or writing boot structures failed.
    #[error(transparent)]
    Boot(#[from] arch::BootError),
    /// A vCPU could not be started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The kernel or initrd file could not be read (aarch64 reads them whole before planning
    /// where they go).
    #[error("cannot read the {what} {path}")]
    BootFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path from the boot source.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The serial output file could not be opened.
    #[error("cannot open serial output {path}")]
    SerialOutput {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A device range collides with another.
    #[error("cannot register {device}")]
    Bus {
        /// The device.
        device: &'static str,
        /// The bus error.
        #[source]
        source: BusError,
    },
    /// Every virtio-mmio interrupt line is taken.
    #[error(
        "no virtio-mmio slot left for virtio device {device} (interrupts {first}..={last} in use)"
    )]
    OutOfIrqs {
        /// The device that did not fit.
        device: &'static str,
        /// First pin for virtio devices.
        first: u32,
        /// Last pin.
        last: u32,
    },
    /// A virtio device could not be created.
    #[error("cannot create virtio device {device}: {detail}")]
    Device {
        /// Which device (drive id, "vsock", "rng").
        device: String,
        /// The device's error with its sources.
        detail: String,
    },
}

/// Where the guest console goes when the configuration names no file.
#[derive(Debug, Clone, Default)]
pub enum ConsoleTarget {
    /// The VMM process's standard output.
    #[default]
    Stdout,
    /// Append to this file.
    File(PathBuf),
}

fn hv_error(operation: &'static str) -> impl FnOnce(HypervisorError) -> BuildError {
    move |source| BuildError::Hypervisor { operation, source }
}

fn render_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// A virtio-mmio device [`MmioDevices::attach`] placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedDevice {
    /// The device kind ("block", "vsock", "rng").
    pub name: &'static str,
    /// Base of its register window.
    pub base: u64,
    /// Size of the window.
    pub size: u64,
    /// Its interrupt: an IOAPIC pin (x86_64) or an SPI number (aarch64).
    pub irq: u32,
}

/// The virtio-mmio window and interrupt of the `index`th device, `None` past the last one.
#[cfg(target_arch = "x86_64")]
fn virtio_window(index: usize) -> Option<(u64, u64, u32)> {
    use arch::layout;
    let irq = layout::VIRTIO_IRQ_START.checked_add(u32::try_from(index).ok()?)?;
    let offset = u64::try_from(index).ok()? * layout::VIRTIO_MMIO_SIZE;
    (irq <= layout::IRQ_MAX).then_some((
        layout::VIRTIO_MMIO_START + offset,
        layout::VIRTIO_MMIO_SIZE,
        irq,
    ))
}

/// The interrupts virtio devices may use, first and last, for [`BuildError::OutOfIrqs`].
#[cfg(target_arch = "x86_64")]
const VIRTIO_IRQS: (u32, u32) = (arch::layout::VIRTIO_IRQ_START, arch::layout::IRQ_MAX);

/// The virtio-mmio window and interrupt of the `index`th device, `None` past the last one.
#[cfg(target_arch = "aarch64")]
fn virtio_window(index: usize) -> Option<(u64, u64, u32)> {
    let slot = arch::layout::virtio_slot(u32::try_from(index).ok()?).ok()?;
    Some((slot.base, slot.size, slot.spi))
}

/// The interrupts virtio devices may use, first and last, for [`BuildError::OutOfIrqs`].
#[cfg(target_arch = "aarch64")]
const VIRTIO_IRQS: (u32, u32) = (
    arch::layout::VIRTIO_MMIO_FIRST_SPI,
    arch::layout::VIRTIO_MMIO_FIRST_SPI + arch::layout::VIRTIO_MMIO_COUNT - 1,
);

/// Hands out virtio-mmio windows and interrupt lines and records what went where.
pub struct MmioDevices<'a> {
    vm: &'a dyn Vm,
    memory: &'a GuestMemoryMmap,
    bus: &'a mut Bus,
    attached: Vec<AttachedDevice>,
}

impl std::fmt::Debug for MmioDevices<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioDevices")
            .field("attached", &self.attached)
            .finish_non_exhaustive()
    }
}

impl<'a> MmioDevices<'a> {
    fn new(vm: &'a dyn Vm, memory: &'a GuestMemoryMmap, bus: &'a mut Bus) -> Self {
        Self {
            vm,
            memory,
            bus,
            attached: Vec::new(),
        }
    }

    /// Puts `device` behind a virtio-mmio transport at the next free window and interrupt.
    /// Returns the window's base address and the interrupt.
    ///
    /// # Errors
    ///
    /// [`BuildError::OutOfIrqs`] when no window is left, [`BuildError::Hypervisor`] when the
    /// interrupt line cannot be had, [`BuildError::Device`] when the transport refuses the
    /// device, [`BuildError::Bus`] on a window collision.
    pub fn attach(&mut self, device: Box<dyn VirtioDevice>) -> Result<(u64, u32), BuildError> {
        let name = device.name();
        let Some((base, size, irq)) = virtio_window(self.attached.len()) else {
            return Err(BuildError::OutOfIrqs {
                device: name,
                first: VIRTIO_IRQS.0,
                last: VIRTIO_IRQS.1,
            });
        };
        let line = self
            .vm
            .interrupt_line(irq)
            .map_err(hv_error("get a virtio interrupt line"))?;
        let transport = MmioTransport::new(device, self.memory.clone(), line).map_err(|e| {
            BuildError::Device {
                device: name.to_string(),
                detail: render_chain(&e),
            }
        })?;
        self.bus
            .insert(base, size, Arc::new(Mutex::new(transport)))
            .map_err(|source| BuildError::Bus {
                device: name,
                source,
            })?;
        self.attached.push(AttachedDevice {
            name,
            base,
            size,
            irq,
        });
        info!(
            device = name,
            gpa = base,
            irq,
            "virtio-mmio device attached"
        );
        Ok((base, irq))
    }

    /// The devices attached so far, in order.
    pub fn attached(&self) -> &[AttachedDevice] {
        &self.attached
    }
}

/// Starts one thread per vCPU, vCPU `index` configured by `configure(index)` on its thread, then
/// lets them run; `flush_console` writes out the console when the microVM stops.
///
/// # Errors
///
/// [`BuildError::Vcpu`] when a vCPU cannot be created or configured; the vCPUs already started
/// are stopped and joined.
fn start_vcpus(
    vm: Arc<dyn Vm>,
    memory: GuestMemoryMmap,
    ctx: &VcpuContext,
    flush_console: Box<dyn Fn() + Send + Sync>,
    vcpu_count: u8,
    mut configure: impl FnMut(u8) -> vcpu::VcpuConfigure,
) -> Result<MicroVm, BuildError> {
    let mut microvm = MicroVm::new(
        vm.clone(),
        memory,
        ctx.control.clone(),
        flush_console,
        usize::from(vcpu_count),
    );
    for index in 0..vcpu_count {
        // On error `microvm` is dropped, which stops and joins the vCPUs already started.
        let handle = vcpu::spawn(vm.clone(), index, vcpu_count, configure(index), ctx.clone())?;
        microvm.add_vcpu_thread(handle);
    }
    ctx.control.resume();
    Ok(microvm)
}

/// Creates and attaches the virtio devices `config` asks for: drives (root first), vsock,
/// entropy.
///
/// # Errors
///
/// [`BuildError::Device`] naming the device that could not be created, or an error from
/// [`MmioDevices::attach`].
pub fn attach_configured_devices(
    devices: &mut MmioDevices<'_>,
    config: &VmConfig,
) -> Result<(), BuildError> {
    let mut drives: Vec<_> = config.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device());
    for drive in drives {
        let id = drive.drive_id().as_str();
        let block = Block::new(id, drive.path_on_host(), drive.is_read_only()).map_err(|e| {
            BuildError::Device {
                device: format!("drive {id}"),
                detail: render_chain(&e),
            }
        })?;
        devices.attach(Box::new(block))?;
    }
    if let Some(vsock) = &config.vsock {
        attach_vsock(devices, vsock)?;
    }
    if config.entropy.is_some() {
        devices.attach(Box::new(Rng::new()))?;
    }
    Ok(())
}

fn attach_vsock(
    devices: &mut MmioDevices<'_>,
    vsock: &crate::config::VsockConfig,
) -> Result<(), BuildError> {
    let device = squib_devices::virtio::Vsock::new(u64::from(vsock.guest_cid()), vsock.uds_path())
        .map_err(|e| BuildError::Device {
            device: "vsock".to_string(),
            detail: render_chain(&e),
        })?;
    devices.attach(Box::new(device))?;
    Ok(())
}

/// The kernel command line: the configured boot arguments (or [`DEFAULT_BOOT_ARGS`]), a
/// `root=/dev/vda` when a root drive exists and the arguments name no root, then the
/// virtio-mmio device entries.
pub fn kernel_cmdline(config: &VmConfig, virtio_entries: &[String]) -> String {
    let boot_args = config
        .boot_source
        .as_ref()
        .and_then(|b| b.boot_args())
        .unwrap_or(DEFAULT_BOOT_ARGS);
    let mut parts: Vec<String> = vec![boot_args.trim().to_string()];
    let names_root = boot_args.split_whitespace().any(|w| w.starts_with("root="));
    if let Some(root) = config.drives.iter().find(|d| d.is_root_device())
        && !names_root
    {
        parts.push("root=/dev/vda".to_string());
        parts.push(if root.is_read_only() { "ro" } else { "rw" }.to_string());
    }
    parts.extend(virtio_entries.iter().cloned());
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

fn open_console(
    config: &VmConfig,
    default: &ConsoleTarget,
) -> Result<Box<dyn Write + Send>, BuildError> {
    let path = config
        .serial
        .serial_out_path
        .clone()
        .or_else(|| match default {
            ConsoleTarget::File(p) => Some(p.clone()),
            ConsoleTarget::Stdout => None,
        });
    match path {
        Some(path) => {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|source| BuildError::SerialOutput { path, source })?;
            Ok(Box::new(file))
        }
        None => Ok(Box::new(std::io::stdout())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BootSource, DriveConfig};

    fn config_with(boot_args: Option<&str>, root_ro: Option<bool>) -> VmConfig {
        let mut config = VmConfig {
            boot_source: Some(
                BootSource::new(PathBuf::from("/k"), None, boot_args.map(str::to_string)).unwrap(),
            ),
            ..VmConfig::default()
        };
        if let Some(ro) = root_ro {
            config.drives.push(
                DriveConfig::new(
                    crate::config::DeviceId::new("drive_id", "rootfs".to_string()).unwrap(),
                    PathBuf::from("/r.ext4"),
                    true,
                    ro,
                    None,
                    Default::default(),
                    Default::default(),
                    None,
                )
                .unwrap(),
            );
        }
        config
    }

    #[test]
    fn test_kernel_cmdline_defaults_and_appends_virtio_entries() {
        let config = config_with(None, None);
        let entries = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        assert_eq!(
            kernel_cmdline(&config, &entries),
            "console=ttyS0 reboot=k panic=1 virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn test_kernel_cmdline_adds_root_for_root_drive_unless_named() {
        let config = config_with(Some("console=ttyS0"), Some(true));
        assert_eq!(
            kernel_cmdline(&config, &[]),
            "console=ttyS0 root=/dev/vda ro"
        );
        let config = config_with(Some("console=ttyS0 root=/dev/vdb"), Some(false));
        assert_eq!(kernel_cmdline(&config, &[]), "console=ttyS0 root=/dev/vdb");
    }
}
