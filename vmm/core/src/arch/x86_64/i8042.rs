//! The part of the i8042 keyboard controller a microVM guest uses: the reset line.
//!
//! Linux booted with `reboot=k` reboots by writing command 0xfe ("pulse reset line") to the
//! command port 0x64. Status reads return 0 (both buffers empty) so the kernel's wait loops end
//! at once; the data port reads as 0. Everything else is ignored.

use squib_devices::BusDevice;

/// Command byte that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;

/// An i8042 on ports 0x60..=0x64 that calls `on_reset` when the guest pulses the reset line.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// First port.
    pub const BASE_PORT: u16 = 0x60;
    /// Ports covered (0x60..=0x64).
    pub const PORT_COUNT: u64 = 5;

    /// A controller calling `on_reset` for each reset command.
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Self { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn test_i8042_reset_command_fires_only_on_command_port() {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let mut dev = I8042::new(Box::new(move || {
            c.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xd1]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
        let mut status = [0xffu8];
        dev.read(4, &mut status);
        assert_eq!(status, [0]);
    }
}
