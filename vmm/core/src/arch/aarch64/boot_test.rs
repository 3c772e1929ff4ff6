//! Boots a real arm64 Linux kernel through the aarch64 boot path on arm64 KVM: the `Image`
//! header, the memory map, the device tree, the PL011 console, the vGICv3, a virtio-rng device
//! on virtio-mmio, and PSCI for power-off. Needs `/dev/kvm` and a kernel and initrd named by
//! `SQUIB_ARM64_KERNEL` and `SQUIB_ARM64_INITRD`; the initrd's init prints `SQUIB_BOOT_OK`,
//! then `SQUIB_VIRTIO_OK` once it has read entropy from the virtio-rng device (loading the
//! virtio-mmio and virtio-rng modules if the kernel has them as modules), and powers off.
//! Reports itself skipped without them.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use squib_devices::Bus;
use squib_devices::pl011::Pl011;
use squib_devices::virtio::{MmioTransport, Rng};
use squib_hypervisor::kvm_aarch64::KvmAarch64;
use squib_hypervisor::{Hypervisor, VcpuKicker, VmExit};

use super::layout;
use super::{MachineShape, load_boot_images, prepare_boot, ram_regions};

#[derive(Clone, Default)]
struct Console(Arc<Mutex<Vec<u8>>>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        std::io::stderr().write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn test_arm64_kernel_boots_to_init_and_powers_off() {
    let (Ok(kernel_path), Ok(initrd_path)) = (
        std::env::var("SQUIB_ARM64_KERNEL"),
        std::env::var("SQUIB_ARM64_INITRD"),
    ) else {
        eprintln!("skipped: SQUIB_ARM64_KERNEL and SQUIB_ARM64_INITRD are not set");
        return;
    };
    if !std::path::Path::new("/dev/kvm").exists() {
        eprintln!("skipped: this host has no /dev/kvm");
        return;
    }
    let kernel = std::fs::read(kernel_path).unwrap();
    let initrd = std::fs::read(initrd_path).unwrap();
    let vcpus = 2;
    let mem_size: u64 = 256 << 20;
    let shape = MachineShape {
        vcpu_count: vcpus,
        mem_size,
        cmdline: "console=ttyAMA0 panic=-1 rdinit=/init",
        serial: true,
        virtio: &[layout::virtio_slot(0).unwrap()],
    };
    let boot = prepare_boot(&kernel, Some(initrd.len() as u64), &shape).unwrap();

    let memory = crate::memory::allocate(&ram_regions(mem_size)).unwrap();
    load_boot_images(&memory, &boot, &kernel, Some(&initrd)).unwrap();

    let hv = KvmAarch64::open(layout::gic_layout(vcpus).unwrap()).unwrap();
    let vm = hv.create_vm().unwrap();
    crate::memory::map_into(&*vm, &memory).unwrap();
    let console = Console::default();
    let serial = layout::serial_slot();
    let mut bus = Bus::new();
    bus.insert(
        serial.base,
        serial.size,
        Arc::new(Mutex::new(Pl011::new(
            vm.interrupt_line(serial.spi).unwrap(),
            Box::new(console.clone()),
        ))),
    )
    .unwrap();
    let rng = layout::virtio_slot(0).unwrap();
    let transport = MmioTransport::new(
        Box::new(Rng::new()),
        memory.clone(),
        vm.interrupt_line(rng.spi).unwrap(),
    )
    .unwrap();
    bus.insert(rng.base, rng.size, Arc::new(Mutex::new(transport)))
        .unwrap();
    let bus = Arc::new(bus);

    let stop = Arc::new(AtomicBool::new(false));
    let kickers: Arc<Mutex<Vec<Arc<dyn VcpuKicker>>>> = Arc::default();
    let outcome: Arc<Mutex<Option<&'static str>>> = Arc::default();
    let threads: Vec<_> = (0..vcpus)
        .map(|index| {
            let (vm, bus, stop, kickers, outcome) = (
                vm.clone(),
                bus.clone(),
                stop.clone(),
                kickers.clone(),
                outcome.clone(),
            );
            let setup = boot.vcpu;
            std::thread::spawn(move || {
                let mut vcpu = vm.create_vcpu(index, vcpus).unwrap();
                if index == 0 {
                    vcpu.configure_aarch64(&setup).unwrap();
                }
                kickers.lock().push(vcpu.kicker());
                let end = |what: &'static str| {
                    outcome.lock().get_or_insert(what);
                    stop.store(true, Ordering::SeqCst);
                    for kicker in kickers.lock().iter() {
                        kicker.kick();
                    }
                };
                while !stop.load(Ordering::SeqCst) {
                    match vcpu.run().unwrap() {
                        VmExit::MmioRead { addr, data } => {
                            bus.read(addr, data);
                        }
                        VmExit::MmioWrite { addr, data } => {
                            bus.write(addr, data);
                        }
                        VmExit::Interrupted => {}
                        VmExit::Shutdown => end("shutdown"),
                        VmExit::Reset => end("reset"),
                        other => panic!("vcpu {index}: unexpected exit {other:?}"),
                    }
                }
            })
        })
        .collect();
    // A watchdog: nested emulation is slow, but a boot that hangs must fail, not block.
    let deadline = Instant::now() + Duration::from_secs(600);
    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    if !stop.load(Ordering::SeqCst) {
        outcome.lock().get_or_insert("timeout");
        stop.store(true, Ordering::SeqCst);
        for kicker in kickers.lock().iter() {
            kicker.kick();
        }
    }
    for thread in threads {
        thread.join().unwrap();
    }
    // Guest memory outlives the VM.
    drop(vm);
    drop(memory);
    let text = String::from_utf8_lossy(&console.0.lock()).into_owned();
    assert_eq!(*outcome.lock(), Some("shutdown"), "console:\n{text}");
    assert!(text.contains("SQUIB_BOOT_OK"), "console:\n{text}");
    assert!(text.contains("SQUIB_VIRTIO_OK"), "console:\n{text}");
    assert!(
        text.contains("smp: Brought up 1 node, 2 CPUs"),
        "console:\n{text}"
    );
}
