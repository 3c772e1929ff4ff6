//! The flattened device tree an aarch64 guest boots with: CPUs started through PSCI, memory, a
//! GICv3, the architected timer, the PL011 console, the virtio-mmio devices and `/chosen`.
//!
//! Bindings used (Linux `Documentation/devicetree/bindings`): `arm/cpus.yaml` (reg = MPIDR
//! affinity), `arm/psci.yaml`, `interrupt-controller/arm,gic-v3.yaml` (three interrupt cells:
//! type, number, flags), `timer/arm,arch_timer.yaml`, `serial/pl011.yaml` with a fixed
//! `apb_pclk`, `virtio/mmio.yaml`, and `chosen.yaml`.

use squib_hypervisor::aarch64::{
    GICV3_DISTRIBUTOR_SIZE, GicV3Layout, TIMER_PPI_HYP, TIMER_PPI_NONSECURE_PHYS,
    TIMER_PPI_SECURE_PHYS, TIMER_PPI_VIRT, mpidr_of,
};
use vm_fdt::FdtWriter;

use super::layout::MmioSlot;

/// Interrupt specifier type cell: shared peripheral interrupt.
pub const GIC_SPI: u32 = 0;
/// Interrupt specifier type cell: private peripheral interrupt.
pub const GIC_PPI: u32 = 1;
/// Interrupt specifier flags: rising edge.
pub const IRQ_TYPE_EDGE_RISING: u32 = 1;
/// Interrupt specifier flags: active-high level.
pub const IRQ_TYPE_LEVEL_HIGH: u32 = 4;
/// Interrupt specifier flags: active-low level.
pub const IRQ_TYPE_LEVEL_LOW: u32 = 8;

const GIC_PHANDLE: u32 = 1;
const CLOCK_PHANDLE: u32 = 2;
/// The PL011's reference clock: any fixed rate works, the guest only divides it for baud rates.
const APB_PCLK_HZ: u32 = 24_000_000;

/// A failure to build the device tree.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// The writer refused a node or property (a name or size it cannot encode).
    #[error("writing the device tree failed")]
    Write(#[from] vm_fdt::Error),
    /// The command line holds a NUL byte, which cannot be a device tree string.
    #[error("kernel command line has a nul byte at offset {offset}")]
    CmdlineNul {
        /// Offset of the first NUL.
        offset: usize,
    },
    /// The built tree is larger than the space reserved for it.
    #[error("device tree is {len} bytes, more than the {max} reserved")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: u64,
    },
}

/// What the device tree describes.
#[derive(Debug, Clone)]
pub struct FdtConfig<'a> {
    /// RAM start (guest physical).
    pub mem_base: u64,
    /// RAM size in bytes.
    pub mem_size: u64,
    /// The GICv3, which also gives the vCPU count.
    pub gic: GicV3Layout,
    /// The PL011 console, when there is one; it becomes `stdout-path`.
    pub serial: Option<MmioSlot>,
    /// The virtio-mmio devices.
    pub virtio: &'a [MmioSlot],
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Initrd start and length.
    pub initrd: Option<(u64, u64)>,
}

fn node_name(kind: &str, base: u64) -> String {
    format!("{kind}@{base:x}")
}

/// Builds the device tree blob.
///
/// # Errors
///
/// [`FdtError`] for a command line with NUL, a writer failure, or a tree larger than
/// [`super::layout::FDT_MAX_SIZE`].
pub fn build_fdt(config: &FdtConfig<'_>) -> Result<Vec<u8>, FdtError> {
    if let Some(offset) = config.cmdline.find('\0') {
        return Err(FdtError::CmdlineNul { offset });
    }
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_string("model", "squib")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for index in 0..config.gic.vcpu_count {
        let mpidr = mpidr_of(index);
        let cpu = fdt.begin_node(&format!("cpu@{mpidr:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", mpidr)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let memory = fdt.begin_node(&node_name("memory", config.mem_base))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[config.mem_base, config.mem_size])?;
    fdt.end_node(memory)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".to_string(), "arm,psci-0.2".to_string()],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let gic = fdt.begin_node(&node_name("intc", config.gic.distributor_base))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_null("interrupt-controller")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_u32("#redistributor-regions", 1)?;
    fdt.property_array_u64(
        "reg",
        &[
            config.gic.distributor_base,
            GICV3_DISTRIBUTOR_SIZE,
            config.gic.redistributor_base,
            config.gic.redistributor_region_size(),
        ],
    )?;
    fdt.property_phandle(GIC_PHANDLE)?;
    fdt.end_node(gic)?;

    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    fdt.property_null("always-on")?;
    let mut timer_irqs = Vec::new();
    for ppi in [
        TIMER_PPI_SECURE_PHYS,
        TIMER_PPI_NONSECURE_PHYS,
        TIMER_PPI_VIRT,
        TIMER_PPI_HYP,
    ] {
        timer_irqs.extend_from_slice(&[GIC_PPI, ppi, IRQ_TYPE_LEVEL_LOW]);
    }
    fdt.property_array_u32("interrupts", &timer_irqs)?;
    fdt.end_node(timer)?;

    let mut stdout_path = None;
    if let Some(serial) = config.serial {
        let clock = fdt.begin_node("apb-pclk")?;
        fdt.property_string("compatible", "fixed-clock")?;
        fdt.property_u32("#clock-cells", 0)?;
        fdt.property_u32("clock-frequency", APB_PCLK_HZ)?;
        fdt.property_string("clock-output-names", "clk24mhz")?;
        fdt.property_phandle(CLOCK_PHANDLE)?;
        fdt.end_node(clock)?;

        let name = node_name("pl011", serial.base);
        let uart = fdt.begin_node(&name)?;
        fdt.property_string_list(
            "compatible",
            vec!["arm,pl011".to_string(), "arm,primecell".to_string()],
        )?;
        fdt.property_array_u64("reg", &[serial.base, serial.size])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, serial.spi, IRQ_TYPE_LEVEL_HIGH])?;
        fdt.property_array_u32("clocks", &[CLOCK_PHANDLE, CLOCK_PHANDLE])?;
        fdt.property_string_list(
            "clock-names",
            vec!["uartclk".to_string(), "apb_pclk".to_string()],
        )?;
        fdt.end_node(uart)?;
        stdout_path = Some(format!("/{name}"));
    }

    for device in config.virtio {
        let node = fdt.begin_node(&node_name("virtio_mmio", device.base))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[device.base, device.size])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, device.spi, IRQ_TYPE_EDGE_RISING])?;
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", config.cmdline)?;
    if let Some(path) = &stdout_path {
        fdt.property_string("stdout-path", path)?;
    }
    if let Some((start, len)) = config.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", start.saturating_add(len))?;
    }
    fdt.end_node(chosen)?;

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    let max = super::layout::FDT_MAX_SIZE;
    if u64::try_from(blob.len()).unwrap_or(u64::MAX) > max {
        return Err(FdtError::TooLarge {
            len: blob.len(),
            max,
        });
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::super::layout::{DRAM_BASE, gic_layout, serial_slot, virtio_slot};
    use super::*;
    use std::process::Command;

    /// Decompiles a blob with dtc (Debian's device-tree-compiler, installed by
    /// scripts/install-deps). A missing dtc fails the test.
    fn decompile(blob: &[u8]) -> String {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("squib-fdt-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tree.dtb");
        std::fs::write(&path, blob).unwrap();
        let output = Command::new("dtc")
            .args(["-I", "dtb", "-O", "dts"])
            .arg(&path)
            .output()
            .expect("dtc (device-tree-compiler) must be installed: run scripts/install-deps");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            output.status.success(),
            "dtc failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Whether `text` holds a string-list property in either of dtc's renderings
    /// (`"a", "b"` or, in older versions, `"a\0b"`).
    fn has_strings(text: &str, name: &str, items: &[&str]) -> bool {
        let modern = format!("{name} = \"{}\";", items.join("\", \""));
        let older = format!("{name} = \"{}\";", items.join("\\0"));
        text.contains(&modern) || text.contains(&older)
    }

    /// The text of the node called `name` up to its closing brace, from dtc output.
    fn node<'a>(dts: &'a str, name: &str) -> &'a str {
        let start = dts
            .find(&format!("\t{name} {{"))
            .unwrap_or_else(|| panic!("no node {name} in:\n{dts}"));
        let rest = &dts[start..];
        let indent = rest.len() - rest.trim_start_matches('\t').len();
        let close = format!("\n{}}};", "\t".repeat(indent));
        &rest[..rest.find(&close).unwrap()]
    }

    #[test]
    fn test_fdt_describes_cpus_memory_gic_timer_console_virtio_and_chosen() {
        let virtio = [virtio_slot(0).unwrap(), virtio_slot(1).unwrap()];
        let config = FdtConfig {
            mem_base: DRAM_BASE,
            mem_size: 512 << 20,
            gic: gic_layout(2).unwrap(),
            serial: Some(serial_slot()),
            virtio: &virtio,
            cmdline: "console=ttyAMA0 reboot=k panic=1",
            initrd: Some((0x9f00_0000, 0x10_0000)),
        };
        let dts = decompile(&build_fdt(&config).unwrap());

        assert!(dts.contains("compatible = \"linux,dummy-virt\";"), "{dts}");
        assert!(dts.contains("interrupt-parent = <0x01>;"), "{dts}");

        let cpu1 = node(&dts, "cpu@1");
        assert!(cpu1.contains("enable-method = \"psci\";"), "{cpu1}");
        assert!(cpu1.contains("reg = <0x00 0x01>;"), "{cpu1}");
        assert!(cpu1.contains("device_type = \"cpu\";"), "{cpu1}");
        assert!(dts.contains("cpu@0 {"));
        assert!(!dts.contains("cpu@2 {"));

        let memory = node(&dts, "memory@80000000");
        assert!(
            memory.contains("reg = <0x00 0x80000000 0x00 0x20000000>;"),
            "{memory}"
        );
        assert!(memory.contains("device_type = \"memory\";"));

        let psci = node(&dts, "psci");
        assert!(
            has_strings(psci, "compatible", &["arm,psci-1.0", "arm,psci-0.2"]),
            "{psci}"
        );
        assert!(psci.contains("method = \"hvc\";"));

        let gic = node(&dts, "intc@8000000");
        assert!(gic.contains("compatible = \"arm,gic-v3\";"), "{gic}");
        assert!(gic.contains("#interrupt-cells = <0x03>;"), "{gic}");
        assert!(gic.contains("interrupt-controller;"), "{gic}");
        assert!(gic.contains("phandle = <0x01>;"), "{gic}");
        assert!(
            gic.contains("reg = <0x00 0x8000000 0x00 0x10000 0x00 0x80a0000 0x00 0x40000>;"),
            "{gic}"
        );

        let timer = node(&dts, "timer");
        assert!(
            timer.contains("compatible = \"arm,armv8-timer\";"),
            "{timer}"
        );
        assert!(
            timer.contains(
                "interrupts = <0x01 0x0d 0x08 0x01 0x0e 0x08 0x01 0x0b 0x08 0x01 0x0a 0x08>;"
            ),
            "{timer}"
        );

        let uart = node(&dts, "pl011@9000000");
        assert!(
            has_strings(uart, "compatible", &["arm,pl011", "arm,primecell"]),
            "{uart}"
        );
        assert!(
            uart.contains("reg = <0x00 0x9000000 0x00 0x1000>;"),
            "{uart}"
        );
        assert!(uart.contains("interrupts = <0x00 0x01 0x04>;"), "{uart}");
        assert!(uart.contains("clocks = <0x02 0x02>;"), "{uart}");
        assert!(
            has_strings(uart, "clock-names", &["uartclk", "apb_pclk"]),
            "{uart}"
        );
        let clock = node(&dts, "apb-pclk");
        assert!(clock.contains("phandle = <0x02>;"), "{clock}");
        assert!(clock.contains("clock-frequency = <0x16e3600>;"), "{clock}");

        let v1 = node(&dts, "virtio_mmio@a001000");
        assert!(v1.contains("compatible = \"virtio,mmio\";"), "{v1}");
        assert!(v1.contains("reg = <0x00 0xa001000 0x00 0x1000>;"), "{v1}");
        assert!(v1.contains("interrupts = <0x00 0x11 0x01>;"), "{v1}");
        assert!(dts.contains("virtio_mmio@a000000 {"));

        let chosen = node(&dts, "chosen");
        assert!(
            chosen.contains("bootargs = \"console=ttyAMA0 reboot=k panic=1\";"),
            "{chosen}"
        );
        assert!(
            chosen.contains("stdout-path = \"/pl011@9000000\";"),
            "{chosen}"
        );
        assert!(
            chosen.contains("linux,initrd-start = <0x00 0x9f000000>;"),
            "{chosen}"
        );
        assert!(
            chosen.contains("linux,initrd-end = <0x00 0x9f100000>;"),
            "{chosen}"
        );
    }

    #[test]
    fn test_fdt_without_console_or_initrd_omits_them() {
        let config = FdtConfig {
            mem_base: DRAM_BASE,
            mem_size: 128 << 20,
            gic: gic_layout(1).unwrap(),
            serial: None,
            virtio: &[],
            cmdline: "",
            initrd: None,
        };
        let dts = decompile(&build_fdt(&config).unwrap());
        assert!(!dts.contains("pl011"), "{dts}");
        assert!(!dts.contains("stdout-path"), "{dts}");
        assert!(!dts.contains("linux,initrd"), "{dts}");
        assert!(!dts.contains("virtio"), "{dts}");
        assert!(node(&dts, "chosen").contains("bootargs"), "{dts}");
    }

    #[test]
    fn test_fdt_rejects_nul_in_cmdline() {
        let config = FdtConfig {
            mem_base: DRAM_BASE,
            mem_size: 128 << 20,
            gic: gic_layout(1).unwrap(),
            serial: None,
            virtio: &[],
            cmdline: "a\0b",
            initrd: None,
        };
        assert!(matches!(
            build_fdt(&config),
            Err(FdtError::CmdlineNul { offset: 1 })
        ));
    }
}
