//! Decides whether VM tests can run directly on this host: a real-mode guest counts down a
//! register from a large number and then writes one byte to a port and halts. A KVM that
//! runs guests on hardware finishes in tens of milliseconds; a KVM that emulates ordinary
//! guests (such as a paravirtual variant that only runs aware guests natively) either fails
//! or takes seconds, and the probe interrupts it at the deadline.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use crate::guest::{GuestError, GuestExit, RealModeGuest};

/// Byte the probe guest writes to [`PROBE_PORT`] after its loop.
pub const PROBE_BYTE: u8 = b'K';
/// Port the probe guest writes to (COM1's data register).
pub const PROBE_PORT: u16 = 0x3f8;

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The guest could not be set up or did not run to its `hlt`.
    #[error("probe guest failed")]
    Guest(#[from] GuestError),
    /// The guest was still running at the deadline (or KVM ran it at emulation speed).
    #[error("{iterations} guest loop iterations did not finish within {deadline:?}")]
    TooSlow {
        /// Loop iterations asked for.
        iterations: u32,
        /// The deadline.
        deadline: Duration,
    },
    /// The guest halted without writing [`PROBE_BYTE`] to [`PROBE_PORT`] exactly once.
    #[error(
        "probe guest exits were {exits:?}, expected one write of {PROBE_BYTE:#x} to port {PROBE_PORT:#x} and hlt"
    )]
    WrongExits {
        /// What the guest did.
        exits: Vec<GuestExit>,
    },
    /// Installing the signal handler that interrupts a slow guest failed.
    #[error("cannot install the vcpu interrupt signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be started or ended without a result.
    #[error("probe vcpu thread failed: {reason}")]
    Thread {
        /// What went wrong.
        reason: &'static str,
    },
}

/// What a successful probe measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeReport {
    /// Loop iterations the guest ran.
    pub iterations: u32,
    /// Time from the first `KVM_RUN` to `hlt`.
    pub elapsed: Duration,
}

/// The probe guest's code: `mov ecx, iterations; 1: dec ecx; jnz 1b; mov dx, PROBE_PORT;
/// mov al, PROBE_BYTE; out dx, al; hlt`, 16-bit.
#[must_use]
pub fn probe_code(iterations: u32) -> Vec<u8> {
    let mut code = vec![0x66, 0xb9];
    code.extend_from_slice(&iterations.to_le_bytes());
    code.extend_from_slice(&[0x66, 0x49, 0x75, 0xfc]);
    code.push(0xba);
    code.extend_from_slice(&PROBE_PORT.to_le_bytes());
    code.extend_from_slice(&[0xb0, PROBE_BYTE, 0xee, 0xf4]);
    code
}

extern "C" fn ignore_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Runs the probe guest with `iterations` loop turns and fails unless it halts, having
/// written [`PROBE_BYTE`], within `deadline` (measured from guest creation).
///
/// A guest still running at the deadline is interrupted with a signal (so `KVM_RUN` returns
/// `EINTR`) and the vCPU thread is joined before returning.
///
/// # Errors
/// [`ProbeError::TooSlow`] past the deadline, [`ProbeError::Guest`] when KVM refuses or
/// mis-runs the guest, [`ProbeError::WrongExits`] when the guest did something else.
pub fn probe(iterations: u32, deadline: Duration) -> Result<ProbeReport, ProbeError> {
    let signal = SIGRTMIN();
    register_signal_handler(signal, ignore_signal).map_err(ProbeError::SignalHandler)?;
    let code = probe_code(iterations);
    let (tx, rx) = mpsc::channel();
    let start = Instant::now();
    let handle = thread::Builder::new()
        .name("kvm-probe-vcpu".into())
        .spawn(move || {
            let result = RealModeGuest::new(&code).and_then(|mut guest| {
                let started = Instant::now();
                guest
                    .run_until_halt(16)
                    .map(|exits| (exits, started.elapsed()))
            });
            // The receiver may have given up at the deadline; nothing to do then.
            let _ = tx.send(result);
        })
        .map_err(|_| ProbeError::Thread {
            reason: "cannot spawn",
        })?;

    let outcome = rx.recv_timeout(deadline);
    let timed_out = matches!(outcome, Err(mpsc::RecvTimeoutError::Timeout));
    if timed_out {
        // Keep interrupting until the thread notices: a signal arriving between two KVM_RUN
        // calls would otherwise be missed.
        while !handle.is_finished() {
            let _ = handle.kill(signal);
            thread::sleep(Duration::from_millis(10));
        }
    }
    handle.join().map_err(|_| ProbeError::Thread {
        reason: "vcpu thread panicked",
    })?;
    if timed_out || start.elapsed() > deadline {
        return Err(ProbeError::TooSlow {
            iterations,
            deadline,
        });
    }
    let (exits, elapsed) = outcome.map_err(|_| ProbeError::Thread {
        reason: "vcpu thread ended without a result",
    })??;
    let expected = [
        GuestExit::IoOut {
            port: PROBE_PORT,
            data: vec![PROBE_BYTE],
        },
        GuestExit::Hlt,
    ];
    if exits != expected {
        return Err(ProbeError::WrongExits { exits });
    }
    Ok(ProbeReport {
        iterations,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_probe_code_loops_then_writes_and_halts() {
        let code = probe_code(0x0102_0304);
        assert_eq!(
            code,
            [
                0x66, 0xb9, 0x04, 0x03, 0x02, 0x01, // mov ecx, imm32
                0x66, 0x49, 0x75, 0xfc, // dec ecx; jnz back to dec
                0xba, 0xf8, 0x03, // mov dx, 0x3f8
                0xb0, b'K', 0xee, 0xf4, // mov al, 'K'; out dx, al; hlt
            ]
        );
    }
}
