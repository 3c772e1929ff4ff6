//! The aarch64 build: an arm64 `Image` with its initrd and a device tree, the PL011 console and
//! the virtio-mmio devices on the MMIO bus (found by the guest through the device tree), a
//! GICv3 and PSCI from the hypervisor. The same code runs on KVM (Linux arm64) and on
//! Hypervisor.framework (macOS): only [`squib_hypervisor::probe_aarch64`] differs.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use squib_devices::Bus;
use squib_devices::pl011::Pl011;
use squib_devices::serial::{ConsoleSink, ConsoleWatch};
use tracing::info;

use super::{
    BuildError, ConsoleTarget, MmioDevices, attach_configured_devices, hv_error, kernel_cmdline,
    open_console, start_vcpus,
};
use crate::arch::aarch64::layout::{self, MmioSlot};
use crate::arch::aarch64::{self as arch, MachineShape};
use crate::config::VmConfig;
use crate::memory;
use crate::vcpu::{StopCallback, StopNotifier, VcpuContext, VcpuControl};
use crate::vm::MicroVm;

/// The console sink as the PL011 sees it: [`ConsoleSink`] only writes out a partial line when
/// asked with `flush_all`, and the UART's `flush` is that request (it never flushes per byte).
struct FlushingSink(ConsoleSink);

impl Write for FlushingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush_all()
    }
}

fn read_boot_file(what: &'static str, path: &Path) -> Result<Vec<u8>, BuildError> {
    std::fs::read(path).map_err(|source| BuildError::BootFile {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Builds the microVM `config` describes on the host's hypervisor and starts its vCPUs: the
/// boot vCPU at the kernel's entry, the others powered off until the guest starts them with
/// PSCI CPU_ON. `on_stop` is called once, from a vCPU thread, when the guest resets, powers off
/// or a vCPU fails; the console is flushed before.
///
/// # Errors
///
/// [`BuildError`] for the first step that failed; everything created so far is released.
pub fn build(
    config: &VmConfig,
    console: &ConsoleTarget,
    on_stop: StopCallback,
) -> Result<MicroVm, BuildError> {
    let boot = config
        .boot_source
        .as_ref()
        .ok_or(BuildError::MissingBootSource)?;
    let vcpu_count = config.machine_config.vcpu_count();
    let max = layout::max_vcpus();
    if u32::from(vcpu_count) > max {
        return Err(BuildError::TooManyVcpus { vcpu_count, max });
    }
    let mem_size_bytes = config.machine_config.mem_size_mib() << 20;
    // Read before anything is created: a bad path is the most likely error.
    let kernel = read_boot_file("kernel", boot.kernel_image_path())?;
    let initrd = boot
        .initrd_path()
        .map(|path| read_boot_file("initrd", path))
        .transpose()?;

    let gic = layout::gic_layout(u32::from(vcpu_count)).map_err(arch::BootError::from)?;
    let hypervisor = squib_hypervisor::probe_aarch64(gic, layout::GIC_REDISTRIBUTOR_SPACE)
        .map_err(hv_error("open the hypervisor"))?;
    let vm = hypervisor.create_vm().map_err(hv_error("create the vm"))?;
    let guest_memory = memory::allocate(&arch::ram_regions(mem_size_bytes))?;
    memory::map_into(vm.as_ref(), &guest_memory)?;

    let control = VcpuControl::new_paused();
    let console_watch = ConsoleWatch::new();

    let serial_slot = layout::serial_slot();
    let serial_line = vm
        .interrupt_line(serial_slot.spi)
        .map_err(hv_error("get the serial interrupt line"))?;
    let serial = Arc::new(Mutex::new(Pl011::new(
        serial_line,
        Box::new(FlushingSink(ConsoleSink::new(
            open_console(config, console)?,
            console_watch.clone(),
        ))),
    )));
    let stop = {
        let serial = serial.clone();
        Arc::new(StopNotifier::new(Box::new(move |reason| {
            let _ = serial.lock().flush();
            on_stop(reason);
        })))
    };
    let mut mmio_bus = Bus::new();
    mmio_bus
        .insert(serial_slot.base, serial_slot.size, serial.clone())
        .map_err(|source| BuildError::Bus {
            device: "pl011",
            source,
        })?;

    let mut devices = MmioDevices::new(vm.as_ref(), &guest_memory, &mut mmio_bus);
    attach_configured_devices(&mut devices, config)?;
    // The device tree lists the devices at the slots they were attached at, in that order.
    let slots: Vec<MmioSlot> = devices
        .attached()
        .iter()
        .map(|d| MmioSlot {
            base: d.base,
            size: d.size,
            spi: d.irq,
        })
        .collect();
    // The guest finds virtio devices in the device tree: no command-line entries.
    let cmdline = kernel_cmdline(config, &[]);

    let shape = MachineShape {
        vcpu_count: u32::from(vcpu_count),
        mem_size: mem_size_bytes,
        cmdline: &cmdline,
        serial: true,
        virtio: &slots,
    };
    let initrd_len = initrd
        .as_ref()
        .map(|bytes| u64::try_from(bytes.len()).unwrap_or(u64::MAX));
    let setup = arch::prepare_boot(&kernel, initrd_len, &shape)?;
    arch::load_boot_images(&guest_memory, &setup, &kernel, initrd.as_deref())?;
    info!(
        entry = setup.vcpu.entry,
        fdt = setup.vcpu.fdt_addr,
        %cmdline,
        vcpus = vcpu_count,
        mem_mib = mem_size_bytes >> 20,
        "kernel loaded"
    );

    let ctx = VcpuContext {
        mmio_bus: Arc::new(mmio_bus),
        // arm64 has no port I/O.
        io_bus: Arc::new(Bus::new()),
        control,
        stop,
        console: console_watch,
    };
    let boot_state = setup.vcpu;
    start_vcpus(
        vm,
        guest_memory,
        &ctx,
        Box::new(move || {
            let _ = serial.lock().flush();
        }),
        vcpu_count,
        |index| {
            Box::new(move |vcpu| {
                if index == 0 {
                    vcpu.configure_aarch64(&boot_state)
                } else {
                    // Secondary vCPUs stay powered off until PSCI CPU_ON gives them an entry.
                    Ok(())
                }
            })
        },
    )
}
