//! The x86_64 build: PVH or bzImage boot, the 8250 serial port and the i8042 reset line on the
//! port I/O bus, virtio-mmio devices announced on the kernel command line.

use std::sync::Arc;

use parking_lot::Mutex;
use squib_devices::Bus;
use squib_devices::serial::{ConsoleSink, ConsoleWatch, SerialDevice};
use squib_hypervisor::Hypervisor;
use tracing::info;

use super::{
    BuildError, ConsoleTarget, MmioDevices, attach_configured_devices, hv_error, kernel_cmdline,
    open_console, start_vcpus,
};
use crate::arch::x86_64::{self as arch, BootImages, layout};
use crate::config::VmConfig;
use crate::memory;
use crate::vcpu::{StopCallback, StopNotifier, VcpuContext, VcpuControl, VmStopReason};
use crate::vm::MicroVm;

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
    let virtio_entries: Vec<String> = devices
        .attached()
        .iter()
        .map(|d| format!("virtio_mmio.device=4K@{:#x}:{}", d.base, d.irq))
        .collect();
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
        control,
        stop,
        console: console_watch,
    };
    start_vcpus(
        vm,
        guest_memory,
        &ctx,
        Box::new(move || {
            let _ = serial.lock().flush();
        }),
        vcpu_count,
        |index| {
            let cpuid = supported_cpuid.clone();
            Box::new(move |vcpu| {
                let tsc_khz = vcpu.tsc_khz()?;
                let setup = arch::vcpu_setup(&entry, &cpuid, index, vcpu_count, tsc_khz);
                vcpu.configure_x86_64(&setup)
            })
        },
    )
}
