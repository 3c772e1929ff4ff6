//! `kvm-probe`: exits 0 if this host's `/dev/kvm` runs an ordinary guest at hardware speed,
//! so VM tests can run directly here; exits 1 saying why not otherwise (then they run inside
//! the VM test host).
//!
//! Usage: `kvm-probe [ITERATIONS [DEADLINE_MS]]` (defaults: 100000000 iterations, 1000 ms;
//! hardware KVM needs well under 100 ms for the default loop).

#[cfg(target_arch = "x86_64")]
use std::time::Duration;

#[cfg(target_arch = "x86_64")]
use anyhow::Context;
use anyhow::Result;

#[cfg(target_arch = "x86_64")]
const DEFAULT_ITERATIONS: u32 = 100_000_000;
#[cfg(target_arch = "x86_64")]
const DEFAULT_DEADLINE_MS: u64 = 1000;

#[cfg(not(target_arch = "x86_64"))]
fn main() -> Result<()> {
    anyhow::bail!(
        "kvm-probe: the probe guest is x86 code; on this architecture tests/run-vm-tests \
         decides with --direct or --vmhost"
    )
}

#[cfg(target_arch = "x86_64")]
fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let iterations = match args.next() {
        Some(a) => a
            .parse()
            .with_context(|| format!("ITERATIONS '{a}' is not a u32"))?,
        None => DEFAULT_ITERATIONS,
    };
    let deadline_ms = match args.next() {
        Some(a) => a
            .parse()
            .with_context(|| format!("DEADLINE_MS '{a}' is not a number"))?,
        None => DEFAULT_DEADLINE_MS,
    };
    let deadline = Duration::from_millis(deadline_ms);
    match squib_tests::probe::probe(iterations, deadline) {
        Ok(report) => {
            println!(
                "kvm-probe: ok: {} guest loop iterations ran in {:?} (deadline {:?})",
                report.iterations, report.elapsed, deadline
            );
            Ok(())
        }
        Err(err) => {
            let mut msg = format!("kvm-probe: /dev/kvm cannot run VM tests here: {err}");
            let mut source = std::error::Error::source(&err);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            if matches!(err, squib_tests::probe::ProbeError::TooSlow { .. }) {
                eprintln!(
                    "kvm-probe: a hardware KVM finishes this loop in well under 100 ms; this one \
                     emulates ordinary guests (e.g. a paravirtual KVM)"
                );
            }
            std::process::exit(1);
        }
    }
}
