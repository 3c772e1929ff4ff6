//! The 8250/16550 UART the x86_64 guest uses as its console, built on `vm-superio`.
//!
//! Output only: guest writes go to a host sink (a log file or stdout), line-buffered so that
//! each guest byte (one VM exit each) costs no system call. Reads see an empty receiver; host
//! input to the console is not wired up.
//!
//! The sink also watches the byte stream for the kernel's panic banner (see [`PanicWatch`]):
//! a guest kernel without ACPI or PCI has no pvpanic device to report a panic through, and a
//! panicking kernel booted with `panic=N` resets the machine exactly as a requested reboot does.

use std::io::{self, LineWriter, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::interrupt::{InterruptError, InterruptLine};

/// The text Linux prints when it panics: `Kernel panic - not syncing: <reason>`.
const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";

/// Shared flag telling whether the guest printed the kernel panic banner.
#[derive(Debug, Clone, Default)]
pub struct PanicWatch(Arc<AtomicBool>);

impl PanicWatch {
    /// A fresh, unset flag.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the banner has been seen.
    pub fn panicked(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A writer that forwards bytes to its sink and scans them for [`PANIC_BANNER`].
///
/// # Limitations
///
/// The guest controls what it prints: a guest that prints the banner without panicking is
/// reported as panicked. That only changes how its own VMM reports the guest's end.
pub struct ConsoleSink {
    out: LineWriter<Box<dyn Write + Send>>,
    matched: usize,
    watch: PanicWatch,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("panicked", &self.watch.panicked())
            .finish_non_exhaustive()
    }
}

impl ConsoleSink {
    /// Wraps `out`; panics seen in the stream set `watch`.
    pub fn new(out: Box<dyn Write + Send>, watch: PanicWatch) -> Self {
        Self {
            out: LineWriter::new(out),
            matched: 0,
            watch,
        }
    }

    fn scan(&mut self, byte: u8) {
        // The banner's first byte occurs nowhere else in it, so restarting the match on a
        // mismatch cannot skip an occurrence.
        if PANIC_BANNER.get(self.matched) == Some(&byte) {
            self.matched += 1;
        } else {
            self.matched = usize::from(PANIC_BANNER.first() == Some(&byte));
        }
        if self.matched == PANIC_BANNER.len() {
            self.watch.0.store(true, Ordering::SeqCst);
            self.matched = 0;
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        for byte in buf.iter().take(n) {
            self.scan(*byte);
        }
        Ok(n)
    }

    /// Deliberately lazy: the UART model flushes after every byte, which would cost a system
    /// call per guest byte. Complete lines reach the sink as they end; call
    /// [`ConsoleSink::flush_all`] for a trailing partial line.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl ConsoleSink {
    /// Writes out everything buffered, partial line included.
    ///
    /// # Errors
    ///
    /// The sink's I/O error.
    pub fn flush_all(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// Raises the UART's interrupt through an [`InterruptLine`].
pub struct SerialInterrupt(Arc<dyn InterruptLine>);

impl std::fmt::Debug for SerialInterrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInterrupt").finish_non_exhaustive()
    }
}

impl Trigger for SerialInterrupt {
    type E = InterruptError;

    fn trigger(&self) -> Result<(), InterruptError> {
        self.0.trigger()
    }
}

/// An 8250 UART on the port I/O bus (8 registers).
pub struct SerialDevice {
    uart: Serial<SerialInterrupt, vm_superio::serial::NoEvents, ConsoleSink>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// Number of I/O ports the UART occupies.
    pub const PORT_COUNT: u64 = 8;

    /// A UART that interrupts through `irq` and writes to `sink`.
    pub fn new(irq: Arc<dyn InterruptLine>, sink: ConsoleSink) -> Self {
        Self {
            uart: Serial::new(SerialInterrupt(irq), sink),
        }
    }

    /// Flushes buffered console output to the sink.
    ///
    /// # Errors
    ///
    /// The sink's I/O error.
    pub fn flush(&mut self) -> io::Result<()> {
        self.uart.writer_mut().flush_all()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map_or(0, |o| self.uart.read(o));
        if let Some((first, rest)) = data.split_first_mut() {
            *first = value;
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(value)) = (u8::try_from(offset), data.first()) else {
            return;
        };
        if let Err(error) = self.uart.write(offset, *value) {
            // The guest can make this happen at will (it drives the UART): keep it quiet.
            tracing::debug!(device = "serial", %error, "uart write failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct CountingLine(AtomicUsize);

    impl InterruptLine for CountingLine {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn set_level(&self, _level: bool) -> Result<(), InterruptError> {
            Ok(())
        }
    }

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn test_serial_writes_reach_sink_after_newline() {
        let out = Shared::default();
        let line = Arc::new(CountingLine::default());
        let mut dev = SerialDevice::new(
            line.clone(),
            ConsoleSink::new(Box::new(out.clone()), PanicWatch::new()),
        );
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert!(out.0.lock().is_empty(), "line-buffered until newline");
        dev.write(0, b"\n");
        assert_eq!(out.0.lock().as_slice(), b"hi\n");
        dev.write(0, b"x");
        dev.flush().unwrap();
        assert_eq!(out.0.lock().as_slice(), b"hi\nx");
    }

    #[test]
    fn test_serial_raises_interrupt_when_tx_empty_enabled() {
        let line = Arc::new(CountingLine::default());
        let mut dev = SerialDevice::new(
            line.clone(),
            ConsoleSink::new(Box::new(io::sink()), PanicWatch::new()),
        );
        // IER (offset 1): enable the transmitter-holding-register-empty interrupt.
        dev.write(1, &[0x02]);
        dev.write(0, b"a");
        assert!(line.0.load(Ordering::SeqCst) >= 1);
        // LSR (offset 5) reports the transmitter empty.
        let mut lsr = [0u8; 1];
        dev.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn test_console_sink_detects_panic_banner_across_writes() {
        let watch = PanicWatch::new();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), watch.clone());
        sink.write_all(b"[ 1.0] Kernel pan").unwrap();
        assert!(!watch.panicked());
        sink.write_all(b"ic - not syncing: Attempted to kill init!\n")
            .unwrap();
        assert!(watch.panicked());
    }

    #[test]
    fn test_console_sink_ignores_near_misses() {
        let watch = PanicWatch::new();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), watch.clone());
        sink.write_all(b"KKernel panic - not synced\nKernel panic -- not syncing\n")
            .unwrap();
        assert!(!watch.panicked());
        sink.write_all(b"KKernel panic - not syncing").unwrap();
        assert!(watch.panicked());
    }
}
