//! The 8250/16550 UART the x86_64 guest uses as its console, built on `vm-superio`.
//!
//! Output only: guest writes go to a host sink (a log file or stdout), line-buffered so that
//! each guest byte (one VM exit each) costs no system call. Reads see an empty receiver; host
//! input to the console is not wired up.
//!
//! The sink also watches the byte stream for the kernel's panic, power-off/halt and restart
//! banners (see [`ConsoleWatch`]): a guest kernel without ACPI or PCI has no pvpanic device to
//! report a panic through and no power-off method (its `poweroff` halts the CPUs forever), a
//! panicking kernel booted with `panic=N` resets the machine exactly as a requested reboot does,
//! and a reboot with `reboot=t` is a deliberate triple fault, just like a crash. The console is
//! the one channel such a kernel still uses.

use std::io::{self, LineWriter, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use vm_superio::{Serial, Trigger};

use crate::bus::BusDevice;
use crate::interrupt::{InterruptError, InterruptLine};

/// The text Linux prints when it panics: `Kernel panic - not syncing: <reason>`.
const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";
/// The lines Linux prints right before it powers off (`kernel_power_off`) or halts
/// (`kernel_halt`, which is also what a power-off becomes when the kernel has no power-off
/// method, as on x86_64 without ACPI).
const POWER_OFF_BANNERS: [&[u8]; 2] = [b"reboot: Power down", b"reboot: System halted"];
/// The line Linux prints right before it resets the machine for a reboot (`kernel_restart`).
const RESTART_BANNER: &[u8] = b"reboot: Restarting system";
/// Longest line prefix kept for matching; banners appear at the start of kernel log lines.
const LINE_KEEP: usize = 128;

const SEEN_PANIC: u8 = 1;
const SEEN_POWER_OFF: u8 = 2;
const STOP_PANIC: u8 = 4;
const STOP_POWER_OFF: u8 = 8;
const SEEN_RESTART: u8 = 16;

/// Why the console asks for the microVM to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsoleStop {
    /// The kernel printed its panic banner line.
    Panic,
    /// The kernel printed its power-off or halt line.
    PowerOff,
}

/// What the console saw, shared between the sink and the vCPU loop.
///
/// A banner is acted on once the line that holds it is complete, so the log keeps the panic
/// reason. [`ConsoleWatch::stop_request`] then says the VM should stop.
#[derive(Debug, Clone, Default)]
pub struct ConsoleWatch(Arc<AtomicU8>);

impl ConsoleWatch {
    /// A fresh watch with nothing seen.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the panic banner has been seen (its line need not be complete).
    pub fn panicked(&self) -> bool {
        self.0.load(Ordering::SeqCst) & SEEN_PANIC != 0
    }

    /// Whether the kernel announced a reboot (its restart line need not be complete). A reset
    /// that follows is the reboot it asked for; with `reboot=t` that reset is a deliberate
    /// triple fault, which is then no crash.
    pub fn restart_announced(&self) -> bool {
        self.0.load(Ordering::SeqCst) & SEEN_RESTART != 0
    }

    /// The stop the console asks for, once a banner's line is complete. A panic wins over a
    /// power-off.
    pub fn stop_request(&self) -> Option<ConsoleStop> {
        let flags = self.0.load(Ordering::Relaxed);
        if flags & STOP_PANIC != 0 {
            Some(ConsoleStop::Panic)
        } else if flags & STOP_POWER_OFF != 0 {
            Some(ConsoleStop::PowerOff)
        } else {
            None
        }
    }

    fn set(&self, bits: u8) {
        self.0.fetch_or(bits, Ordering::SeqCst);
    }
}

/// A writer that forwards bytes to its sink and scans them for the kernel's panic and
/// power-off banners.
///
/// # Limitations
///
/// The guest controls what it prints: a guest that prints a banner line without panicking or
/// powering off is treated as if it did. That only changes how its own VMM reports the
/// guest's end (and ends it).
pub struct ConsoleSink {
    out: LineWriter<Box<dyn Write + Send>>,
    line: Vec<u8>,
    watch: ConsoleWatch,
}

impl std::fmt::Debug for ConsoleSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleSink")
            .field("watch", &self.watch)
            .finish_non_exhaustive()
    }
}

impl ConsoleSink {
    /// Wraps `out`; banners seen in the stream are recorded in `watch`.
    pub fn new(out: Box<dyn Write + Send>, watch: ConsoleWatch) -> Self {
        Self {
            out: LineWriter::new(out),
            line: Vec::with_capacity(LINE_KEEP),
            watch,
        }
    }

    fn scan(&mut self, byte: u8) {
        if byte == b'\n' {
            let flags = self.watch.0.load(Ordering::SeqCst);
            if flags & SEEN_PANIC != 0 {
                self.watch.set(STOP_PANIC);
            }
            if flags & SEEN_POWER_OFF != 0 {
                self.watch.set(STOP_POWER_OFF);
            }
            self.line.clear();
            return;
        }
        if self.line.len() >= LINE_KEEP {
            return;
        }
        self.line.push(byte);
        if self.line.ends_with(PANIC_BANNER) {
            self.watch.set(SEEN_PANIC);
        } else if POWER_OFF_BANNERS.iter().any(|b| self.line.ends_with(b)) {
            self.watch.set(SEEN_POWER_OFF);
        } else if self.line.ends_with(RESTART_BANNER) {
            self.watch.set(SEEN_RESTART);
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
            ConsoleSink::new(Box::new(out.clone()), ConsoleWatch::new()),
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
            ConsoleSink::new(Box::new(io::sink()), ConsoleWatch::new()),
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
        let watch = ConsoleWatch::new();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), watch.clone());
        sink.write_all(b"[ 1.0] Kernel pan").unwrap();
        assert!(!watch.panicked());
        sink.write_all(b"ic - not syncing: Attempted to kill init!")
            .unwrap();
        assert!(watch.panicked());
        assert_eq!(watch.stop_request(), None, "waits for the end of the line");
        sink.write_all(b"\n").unwrap();
        assert_eq!(watch.stop_request(), Some(ConsoleStop::Panic));
    }

    #[test]
    fn test_console_sink_ignores_near_misses() {
        let watch = ConsoleWatch::new();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), watch.clone());
        sink.write_all(b"KKernel panic - not synced\nKernel panic -- not syncing\n")
            .unwrap();
        sink.write_all(b"reboot: Power dow\nn\nreboot: Restarting system\n")
            .unwrap();
        assert!(!watch.panicked());
        assert_eq!(watch.stop_request(), None);
        sink.write_all(b"KKernel panic - not syncing\n").unwrap();
        assert!(watch.panicked());
    }

    #[test]
    fn test_console_sink_notes_restart_banner_without_asking_to_stop() {
        let watch = ConsoleWatch::new();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), watch.clone());
        sink.write_all(b"[   3.0] reboot: Restarting syste\n")
            .unwrap();
        assert!(!watch.restart_announced(), "a near miss is no restart");
        sink.write_all(b"[   3.1] reboot: Restarting system")
            .unwrap();
        assert!(watch.restart_announced(), "noted before the line ends");
        sink.write_all(b"\r\n").unwrap();
        assert_eq!(
            watch.stop_request(),
            None,
            "the reset that follows ends the VM"
        );
        assert!(!watch.panicked());
    }

    #[test]
    fn test_console_sink_reports_power_off_after_its_line() {
        let watch = ConsoleWatch::new();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), watch.clone());
        sink.write_all(b"[   8.1] reboot: Power down").unwrap();
        assert_eq!(watch.stop_request(), None);
        sink.write_all(b"\n").unwrap();
        assert_eq!(watch.stop_request(), Some(ConsoleStop::PowerOff));
        assert!(!watch.panicked());
        let watch = ConsoleWatch::new();
        let mut sink = ConsoleSink::new(Box::new(io::sink()), watch.clone());
        sink.write_all(b"[  22.9] reboot: System halted\r\n")
            .unwrap();
        assert_eq!(watch.stop_request(), Some(ConsoleStop::PowerOff));
    }
}
