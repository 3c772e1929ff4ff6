//! A minimal i8042 keyboard controller: enough for Linux's i8042 and atkbd drivers to probe
//! quickly, and the reset line.
//!
//! Linux booted with `reboot=k` reboots by writing command 0xfe ("pulse reset line") to the
//! command port 0x64; that calls the reset callback. Besides, the controller answers the
//! commands a probing driver sends (read/write the configuration byte, self tests) and
//! acknowledges keyboard commands as a keyboard with no keys pressed would, so that the
//! drivers' polling loops end at once instead of timing out. No key is ever reported.

use std::collections::VecDeque;
use std::sync::Arc;

use squib_devices::{BusDevice, InterruptLine};

/// Command byte that pulses the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_TEST_OK: u8 = 0x00;

const KBD_ACK: u8 = 0xfa;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_RESET_OK: u8 = 0xaa;
/// The id of a standard MF2 keyboard.
const KBD_ID: [u8; 2] = [0xab, 0x83];

/// Status register: output buffer full.
const STATUS_OUTPUT_FULL: u8 = 0x01;
/// Status register: system flag (set after a successful self test).
const STATUS_SYSTEM: u8 = 0x04;
/// Configuration byte: keyboard interrupt enabled.
const CTR_KBD_INTERRUPT: u8 = 0x01;
/// Offset of the command/status port (0x64) from the data port (0x60).
const COMMAND_OFFSET: u64 = 4;
/// Longest reply queued; more is dropped (a guest looping on commands cannot grow it).
const MAX_QUEUED: usize = 16;

/// What the next data-port write means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// A keyboard command.
    None,
    /// The new configuration byte.
    Ctr,
    /// The output port value (ignored).
    OutputPort,
}

/// An i8042 on ports 0x60..=0x64 that calls `on_reset` when the guest pulses the reset line.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
    irq: Option<Arc<dyn InterruptLine>>,
    ctr: u8,
    output: VecDeque<u8>,
    pending: Pending,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("ctr", &self.ctr)
            .field("output", &self.output)
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// First port.
    pub const BASE_PORT: u16 = 0x60;
    /// Ports covered (0x60..=0x64).
    pub const PORT_COUNT: u64 = 5;
    /// The keyboard's ISA interrupt.
    pub const IRQ: u32 = 1;

    /// A controller calling `on_reset` for each reset command, raising `irq` (IRQ 1) for
    /// keyboard replies when the guest enabled that interrupt.
    pub fn new(on_reset: Box<dyn Fn() + Send>, irq: Option<Arc<dyn InterruptLine>>) -> Self {
        Self {
            on_reset,
            irq,
            ctr: 0,
            output: VecDeque::new(),
            pending: Pending::None,
        }
    }

    fn push(&mut self, bytes: &[u8], from_keyboard: bool) {
        for b in bytes {
            if self.output.len() < MAX_QUEUED {
                self.output.push_back(*b);
            }
        }
        if from_keyboard
            && self.ctr & CTR_KBD_INTERRUPT != 0
            && let Some(irq) = &self.irq
            && let Err(error) = irq.trigger()
        {
            tracing::debug!(device = "i8042", %error, "keyboard interrupt failed");
        }
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_RESET_CPU => (self.on_reset)(),
            CMD_READ_CTR => {
                let ctr = self.ctr;
                self.push(&[ctr], false);
            }
            CMD_WRITE_CTR => self.pending = Pending::Ctr,
            CMD_WRITE_OUTPUT_PORT => self.pending = Pending::OutputPort,
            CMD_SELF_TEST => self.push(&[SELF_TEST_OK], false),
            CMD_KBD_TEST | CMD_AUX_TEST => self.push(&[INTERFACE_TEST_OK], false),
            // Enable/disable ports and everything else: accepted, no reply.
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Ctr => self.ctr = value,
            Pending::OutputPort => {}
            Pending::None => match value {
                KBD_CMD_RESET => self.push(&[KBD_ACK, KBD_RESET_OK], true),
                KBD_CMD_GET_ID => self.push(&[KBD_ACK, KBD_ID[0], KBD_ID[1]], true),
                _ => self.push(&[KBD_ACK], true),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = if offset == COMMAND_OFFSET {
            let full = if self.output.is_empty() {
                0
            } else {
                STATUS_OUTPUT_FULL
            };
            STATUS_SYSTEM | full
        } else if offset == 0 {
            self.output.pop_front().unwrap_or(0)
        } else {
            0
        };
        if let Some((first, rest)) = data.split_first_mut() {
            *first = value;
            rest.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else {
            return;
        };
        if offset == COMMAND_OFFSET {
            self.command(value);
        } else if offset == 0 {
            self.data(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn controller() -> (I8042, Arc<AtomicUsize>) {
        let count = Arc::new(AtomicUsize::new(0));
        let c = count.clone();
        let dev = I8042::new(
            Box::new(move || {
                c.fetch_add(1, Ordering::SeqCst);
            }),
            None,
        );
        (dev, count)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn test_i8042_reset_command_fires_only_on_command_port() {
        let (mut dev, count) = controller();
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xd1]);
        assert_eq!(count.load(Ordering::SeqCst), 0);
        dev.write(4, &[0xfe]);
        assert_eq!(count.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn test_i8042_configuration_byte_round_trips() {
        let (mut dev, _) = controller();
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
        dev.write(4, &[CMD_WRITE_CTR]);
        dev.write(0, &[0x47]);
        dev.write(4, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(read(&mut dev, 0), 0x47);
        assert_eq!(read(&mut dev, 4) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn test_i8042_answers_self_test_and_keyboard_reset() {
        let (mut dev, _) = controller();
        dev.write(4, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, 0), SELF_TEST_OK);
        dev.write(0, &[KBD_CMD_RESET]);
        assert_eq!(
            (read(&mut dev, 0), read(&mut dev, 0)),
            (KBD_ACK, KBD_RESET_OK)
        );
        dev.write(0, &[KBD_CMD_GET_ID]);
        assert_eq!(
            [read(&mut dev, 0), read(&mut dev, 0), read(&mut dev, 0)],
            [KBD_ACK, 0xab, 0x83]
        );
    }

    #[test]
    fn test_i8042_output_queue_is_bounded() {
        let (mut dev, _) = controller();
        for _ in 0..100 {
            dev.write(0, &[0xed]);
        }
        assert_eq!(dev.output.len(), MAX_QUEUED);
    }
}
