//! Builds a running microVM from a validated [`VmConfig`]: guest memory, the hypervisor VM, the
//! platform devices, the virtio-mmio devices, the kernel and its boot structures, and one
//! thread per vCPU.
//!
//! # Attaching virtio-mmio devices
//!
//! Every virtio device goes through [`MmioDevices::attach`], the one place that hands out
//! resources: the next 4 KiB window from `0xd000_0000` (x86_64), the next IOAPIC pin from 5,
//! an [`InterruptLine`](squib_devices::InterruptLine) for it, the registration on the MMIO bus
//! and the `virtio_mmio.device=4K@0x…:IRQ` entry on the kernel command line. To add a device
//! kind, construct it in [`attach_configured_devices`] from its part of the [`VmConfig`] and
//! call `attach`. Devices are attached in configuration order, root drive first, so the root
//! drive is `/dev/vda`.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use squib_devices::serial::{ConsoleSink, ConsoleWatch, SerialDevice};
use squib_devices::virtio::{Block, MmioTransport, Rng, VirtioDevice};
use squib_devices::{Bus, BusError};
use squib_hypervisor::{Hypervisor, HypervisorError, Vm};
use tracing::info;
use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::{self as arch, BootImages, layout};
use crate::config::VmConfig;
use crate::memory::{self, MemoryError};
use crate::vcpu::{
    self, StopCallback, StopNotifier, VcpuContext, VcpuControl, VcpuError, VmStopReason,
};
use crate::vm::MicroVm;

/// The kernel command line used when the boot source gives none: the serial console, reboot
/// through the keyboard controller, reboot one second after a panic (which squib reports as a
/// panic, see `squib_devices::serial`).
pub const DEFAULT_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

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
    #[error("no interrupt line left for virtio device {device} (pins {first}..={last} in use)")]
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

/// Hands out virtio-mmio windows and interrupt lines, and records the command-line entries.
pub struct MmioDevices<'a> {
    vm: &'a dyn Vm,
    memory: &'a GuestMemoryMmap,
    bus: &'a mut Bus,
    next_base: u64,
    next_irq: u32,
    cmdline_entries: Vec<String>,
}

impl std::fmt::Debug for MmioDevices<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioDevices")
            .field("next_base", &self.next_base)
            .field("next_irq", &self.next_irq)
            .finish_non_exhaustive()
    }
}

impl<'a> MmioDevices<'a> {
    fn new(vm: &'a dyn Vm, memory: &'a GuestMemoryMmap, bus: &'a mut Bus) -> Self {
        Self {
            vm,
            memory,
            bus,
            next_base: layout::VIRTIO_MMIO_START,
            next_irq: layout::VIRTIO_IRQ_START,
            cmdline_entries: Vec::new(),
        }
    }

    /// Puts `device` behind a virtio-mmio transport at the next free window and pin.
    /// Returns the window's base address and the pin.
    ///
    /// # Errors
    ///
    /// [`BuildError::OutOfIrqs`] when no pin is left, [`BuildError::Hypervisor`] when the
    /// interrupt line cannot be had, [`BuildError::Device`] when the transport refuses the
    /// device, [`BuildError::Bus`] on a window collision.
    pub fn attach(&mut self, device: Box<dyn VirtioDevice>) -> Result<(u64, u32), BuildError> {
        let name = device.name();
        if self.next_irq > layout::IRQ_MAX {
            return Err(BuildError::OutOfIrqs {
                device: name,
                first: layout::VIRTIO_IRQ_START,
                last: layout::IRQ_MAX,
            });
        }
        let (base, irq) = (self.next_base, self.next_irq);
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
            .insert(
                base,
                layout::VIRTIO_MMIO_SIZE,
                Arc::new(Mutex::new(transport)),
            )
            .map_err(|source| BuildError::Bus {
                device: name,
                source,
            })?;
        self.cmdline_entries
            .push(format!("virtio_mmio.device=4K@{base:#x}:{irq}"));
        self.next_base += layout::VIRTIO_MMIO_SIZE;
        self.next_irq += 1;
        info!(
            device = name,
            gpa = base,
            irq,
            "virtio-mmio device attached"
        );
        Ok((base, irq))
    }
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

/// Builds the microVM `config` describes on `hypervisor` and starts its vCPUs. `on_stop` is
/// called once, from a vCPU thread, when the guest resets, powers off or a vCPU fails; the
/// console is flushed before.
///
/// # Errors
///
/// [`BuildError`] for the first step that failed; everything created so far is released.
pub fn build(
    hypervisor: &dyn Hypervisor,
    config: &VmConfig,
    console: &ConsoleTarget,
    on_stop: StopCallback,
) -> Result<MicroVm, BuildError> {
    let boot = config
        .boot_source
        .as_ref()
        .ok_or(BuildError::MissingBootSource)?;
    let vcpu_count = config.machine_config.vcpu_count();
    if u32::from(vcpu_count) > hypervisor.max_vcpus() {
        return Err(BuildError::TooManyVcpus {
            vcpu_count,
            max: hypervisor.max_vcpus(),
        });
    }
    let mem_size_bytes = config.machine_config.mem_size_mib() << 20;

    let vm = hypervisor.create_vm().map_err(hv_error("create the vm"))?;
    let guest_memory = memory::allocate(&layout::ram_regions(mem_size_bytes))?;
    memory::map_into(vm.as_ref(), &guest_memory)?;

    let control = VcpuControl::new_paused();
    let console_watch = ConsoleWatch::new();

    // Platform devices on the port I/O bus.
    let serial_line = vm
        .interrupt_line(layout::SERIAL_IRQ)
        .map_err(hv_error("get the serial interrupt line"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_line,
        ConsoleSink::new(open_console(config, console)?, console_watch.clone()),
    )));
    let stop = {
        let serial = serial.clone();
        Arc::new(StopNotifier::new(Box::new(move |reason| {
            let _ = serial.lock().flush();
            on_stop(reason);
        })))
    };
    let mut io_bus = Bus::new();
    io_bus
        .insert(
            u64::from(layout::SERIAL_PORT),
            SerialDevice::PORT_COUNT,
            serial.clone(),
        )
        .map_err(|source| BuildError::Bus {
            device: "serial",
            source,
        })?;
    let i8042 = {
        let control = control.clone();
        let stop = stop.clone();
        let watch = console_watch.clone();
        arch::i8042::I8042::new(
            Box::new(move || {
                let reason = if watch.panicked() {
                    VmStopReason::GuestPanic
                } else {
                    VmStopReason::GuestReset
                };
                info!(?reason, "guest pulsed the i8042 reset line");
                control.stop();
                stop.notify(reason);
            }),
            Some(
                vm.interrupt_line(arch::i8042::I8042::IRQ)
                    .map_err(hv_error("get the keyboard interrupt line"))?,
            ),
        )
    };
    io_bus
        .insert(
            u64::from(arch::i8042::I8042::BASE_PORT),
            arch::i8042::I8042::PORT_COUNT,
            Arc::new(Mutex::new(i8042)),
        )
        .map_err(|source| BuildError::Bus {
            device: "i8042",
            source,
        })?;

    let mut mmio_bus = Bus::new();
    let mut devices = MmioDevices::new(vm.as_ref(), &guest_memory, &mut mmio_bus);
    attach_configured_devices(&mut devices, config)?;
    let virtio_entries = std::mem::take(&mut devices.cmdline_entries);
    let cmdline = kernel_cmdline(config, &virtio_entries);

    let images = BootImages {
        kernel: boot.kernel_image_path(),
        initrd: boot.initrd_path(),
        cmdline: &cmdline,
    };
    let entry = arch::load_boot_images(&guest_memory, mem_size_bytes, vcpu_count, &images)?;
    info!(?entry, %cmdline, vcpus = vcpu_count, mem_mib = mem_size_bytes >> 20, "kernel loaded");

    let supported_cpuid = vm
        .supported_cpuid()
        .map_err(hv_error("list supported cpuid"))?;
    let ctx = VcpuContext {
        mmio_bus: Arc::new(mmio_bus),
        io_bus: Arc::new(io_bus),
        control: control.clone(),
        stop,
        console: console_watch,
    };
    let mut microvm = MicroVm::new(
        vm.clone(),
        guest_memory,
        control.clone(),
        serial,
        usize::from(vcpu_count),
    );
    for index in 0..vcpu_count {
        let cpuid = supported_cpuid.clone();
        let configure: vcpu::VcpuConfigure = Box::new(move |vcpu| {
            let tsc_khz = vcpu.tsc_khz()?;
            let setup = arch::vcpu_setup(&entry, &cpuid, index, vcpu_count, tsc_khz);
            vcpu.configure_x86_64(&setup)
        });
        // On error `microvm` is dropped, which stops and joins the vCPUs already started.
        let handle = vcpu::spawn(vm.clone(), index, vcpu_count, configure, ctx.clone())?;
        microvm.add_vcpu_thread(handle);
    }
    control.resume();
    Ok(microvm)
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
