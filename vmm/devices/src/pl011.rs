//! The Arm PL011 UART, the aarch64 guest's console (`ttyAMA0`), on the MMIO bus.
//!
//! Registers follow the PrimeCell UART (PL011) Technical Reference Manual. Output only, like the
//! x86_64 8250: bytes the guest writes to UARTDR go to a host sink; the receive FIFO is always
//! empty (host input is not wired up). Transmission completes at once, so the transmit FIFO
//! always reads empty and every write raises the transmit interrupt, which the guest clears
//! through UARTICR; the interrupt line is the level of `raw status & mask`.
//!
//! The peripheral and PrimeCell ID registers at the top of the page identify a PL011 r1p5, which
//! the Linux AMBA bus reads to bind its `amba-pl011` driver.

use std::io::Write;
use std::sync::Arc;

use crate::bus::BusDevice;
use crate::interrupt::InterruptLine;

/// Size of the register window.
pub const PL011_SIZE: u64 = 0x1000;

const UARTDR: u64 = 0x000;
const UARTRSR: u64 = 0x004;
const UARTFR: u64 = 0x018;
const UARTILPR: u64 = 0x020;
const UARTIBRD: u64 = 0x024;
const UARTFBRD: u64 = 0x028;
const UARTLCR_H: u64 = 0x02c;
const UARTCR: u64 = 0x030;
const UARTIFLS: u64 = 0x034;
const UARTIMSC: u64 = 0x038;
const UARTRIS: u64 = 0x03c;
const UARTMIS: u64 = 0x040;
const UARTICR: u64 = 0x044;
const UARTDMACR: u64 = 0x048;
const ID_BASE: u64 = 0xfe0;

/// UARTFR: receive FIFO empty.
const FR_RXFE: u32 = 1 << 4;
/// UARTFR: transmit FIFO empty.
const FR_TXFE: u32 = 1 << 7;
/// Interrupt bit: transmit.
const INT_TX: u32 = 1 << 5;
/// All eleven interrupt bits.
const INT_ALL: u32 = 0x7ff;
/// UARTCR after reset: transmit and receive enabled, UART disabled.
const CR_RESET: u32 = 0x300;
/// UARTIFLS after reset: both FIFOs at half.
const IFLS_RESET: u32 = 0x12;

/// PeriphID0..3 then PCellID0..3: part 0x011, designer Arm (0x41), revision 1; PrimeCell.
const IDS: [u8; 8] = [0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1];

/// A PL011 UART.
pub struct Pl011 {
    irq: Arc<dyn InterruptLine>,
    out: Box<dyn Write + Send>,
    line_high: bool,
    raw_status: u32,
    mask: u32,
    ilpr: u32,
    ibrd: u32,
    fbrd: u32,
    lcr_h: u32,
    cr: u32,
    ifls: u32,
    dmacr: u32,
}

impl std::fmt::Debug for Pl011 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pl011")
            .field("raw_status", &self.raw_status)
            .field("mask", &self.mask)
            .field("cr", &self.cr)
            .finish_non_exhaustive()
    }
}

impl Pl011 {
    /// A UART in its reset state that interrupts through `irq` and writes to `out`.
    pub fn new(irq: Arc<dyn InterruptLine>, out: Box<dyn Write + Send>) -> Self {
        Self {
            irq,
            out,
            line_high: false,
            raw_status: 0,
            mask: 0,
            ilpr: 0,
            ibrd: 0,
            fbrd: 0,
            lcr_h: 0,
            cr: CR_RESET,
            ifls: IFLS_RESET,
            dmacr: 0,
        }
    }

    /// Flushes console output to the sink.
    ///
    /// # Errors
    ///
    /// The sink's I/O error.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    fn update_line(&mut self) {
        let high = self.raw_status & self.mask != 0;
        if high == self.line_high {
            return;
        }
        match self.irq.set_level(high) {
            Ok(()) => self.line_high = high,
            // The guest drives this path at will: keep it quiet.
            Err(error) => tracing::debug!(device = "pl011", %error, "uart interrupt failed"),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            UARTDR | UARTRSR => 0,
            UARTFR => FR_RXFE | FR_TXFE,
            UARTILPR => self.ilpr,
            UARTIBRD => self.ibrd,
            UARTFBRD => self.fbrd,
            UARTLCR_H => self.lcr_h,
            UARTCR => self.cr,
            UARTIFLS => self.ifls,
            UARTIMSC => self.mask,
            UARTRIS => self.raw_status,
            UARTMIS => self.raw_status & self.mask,
            UARTDMACR => self.dmacr,
            ID_BASE..=0xffc if offset.is_multiple_of(4) => usize::try_from((offset - ID_BASE) / 4)
                .ok()
                .and_then(|i| IDS.get(i))
                .map_or(0, |id| u32::from(*id)),
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            UARTDR => {
                // Only the low 8 bits are data; the rest of the register is receive status.
                let byte = value.to_le_bytes()[0];
                if let Err(error) = self.out.write_all(&[byte]) {
                    tracing::debug!(device = "pl011", %error, "console write failed");
                }
                self.raw_status |= INT_TX;
            }
            // Writing the error clear register clears receive errors; there are none.
            UARTRSR => {}
            UARTILPR => self.ilpr = value & 0xff,
            UARTIBRD => self.ibrd = value & 0xffff,
            UARTFBRD => self.fbrd = value & 0x3f,
            UARTLCR_H => self.lcr_h = value & 0xff,
            UARTCR => self.cr = value & 0xff87,
            UARTIFLS => self.ifls = value & 0x3f,
            UARTIMSC => self.mask = value & INT_ALL,
            UARTICR => self.raw_status &= !(value & INT_ALL),
            UARTDMACR => self.dmacr = value & 0x7,
            // Read-only or reserved.
            _ => {}
        }
        self.update_line();
    }
}

impl BusDevice for Pl011 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = self.read_register(offset).to_le_bytes();
        for (dst, src) in data
            .iter_mut()
            .zip(value.iter().chain(std::iter::repeat(&0)))
        {
            *dst = *src;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut value = [0u8; 4];
        for (dst, src) in value.iter_mut().zip(data) {
            *dst = *src;
        }
        self.write_register(offset, u32::from_le_bytes(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::InterruptError;
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Line(Mutex<Vec<bool>>);

    impl InterruptLine for Line {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.lock().extend([true, false]);
            Ok(())
        }
        fn set_level(&self, level: bool) -> Result<(), InterruptError> {
            self.0.lock().push(level);
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn uart() -> (Pl011, Arc<Line>, Sink) {
        let line = Arc::new(Line::default());
        let sink = Sink::default();
        (Pl011::new(line.clone(), Box::new(sink.clone())), line, sink)
    }

    fn read32(uart: &mut Pl011, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        uart.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn test_pl011_writes_bytes_and_reports_empty_fifos() {
        let (mut uart, _, sink) = uart();
        for byte in b"hi\n" {
            uart.write(UARTDR, &[*byte, 0, 0, 0]);
        }
        assert_eq!(*sink.0.lock(), b"hi\n");
        assert_eq!(read32(&mut uart, UARTFR), FR_RXFE | FR_TXFE);
        assert_eq!(read32(&mut uart, UARTDR), 0);
    }

    #[test]
    fn test_pl011_transmit_interrupt_follows_mask_and_clear() {
        let (mut uart, line, _) = uart();
        uart.write(UARTDR, b"a");
        assert!(line.0.lock().is_empty(), "masked: no interrupt");
        assert_eq!(read32(&mut uart, UARTRIS), INT_TX);
        assert_eq!(read32(&mut uart, UARTMIS), 0);
        uart.write(UARTIMSC, &INT_TX.to_le_bytes());
        assert_eq!(*line.0.lock(), vec![true]);
        assert_eq!(read32(&mut uart, UARTMIS), INT_TX);
        uart.write(UARTICR, &INT_TX.to_le_bytes());
        assert_eq!(*line.0.lock(), vec![true, false]);
        assert_eq!(read32(&mut uart, UARTRIS), 0);
        // Another byte raises it again.
        uart.write(UARTDR, b"b");
        assert_eq!(*line.0.lock(), vec![true, false, true]);
    }

    #[test]
    fn test_pl011_identifies_as_primecell_uart() {
        let (mut uart, _, _) = uart();
        let ids: Vec<u32> = (0..8).map(|i| read32(&mut uart, 0xfe0 + 4 * i)).collect();
        assert_eq!(ids, vec![0x11, 0x10, 0x14, 0x00, 0x0d, 0xf0, 0x05, 0xb1]);
        assert_eq!(read32(&mut uart, 0xfe2), 0, "unaligned id reads are zero");
    }

    #[test]
    fn test_pl011_control_registers_keep_their_bits() {
        let (mut uart, _, _) = uart();
        assert_eq!(read32(&mut uart, UARTCR), CR_RESET);
        uart.write(UARTCR, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&mut uart, UARTCR), 0xff87);
        uart.write(UARTLCR_H, &[0x70]);
        assert_eq!(read32(&mut uart, UARTLCR_H), 0x70);
        uart.write(UARTIBRD, &[0x34, 0x12, 0xff, 0xff]);
        assert_eq!(read32(&mut uart, UARTIBRD), 0x1234);
        // Byte reads see the low byte; writes past the window are ignored.
        let mut byte = [0u8; 1];
        uart.read(UARTIBRD, &mut byte);
        assert_eq!(byte, [0x34]);
        uart.write(0x2000, &[1]);
        let mut wide = [0xffu8; 8];
        uart.read(UARTFR, &mut wide);
        assert_eq!(wide, [0x90, 0, 0, 0, 0, 0, 0, 0]);
    }
}
