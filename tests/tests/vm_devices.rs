//! VM test of squib's virtio devices: squib-vmm boots the test kernel with a read-only and a
//! read-write virtio-blk drive, a vsock device and an entropy device, all configured through a
//! Firecracker-style configuration file. A script in the guest reads and writes the drives and
//! reads the entropy device; the guest helper `vsock-guest` echoes vsock streams, one opened by
//! the host through the hybrid Unix socket (`CONNECT 1234`) carrying 64 MiB each way, one
//! opened by the guest to host port 5000 (`<uds>_5000`).
//!
//! The VM runs once per test binary (a `OnceLock` fixture); each test checks one behaviour of
//! what that run recorded. The binaries come from the environment, set by `run-vm-tests`:
//! `SQUIB_VMM_BIN` (squib-vmm) and `SQUIB_VSOCK_GUEST_BIN` (the static guest helper).

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use squib_tests::process::output_with_timeout;
use squib_tests::vm_env::{self, TEST_EXIT_MARKER};

/// Upper bound for the whole guest run, boot included (nested virtualization is slow).
const VM_TIMEOUT: Duration = Duration::from_secs(900);
/// Bytes sent through the host-initiated vsock connection (and echoed back).
const BULK_BYTES: u64 = 64 << 20;
/// Bytes sent through the guest-initiated vsock connection (and echoed back).
const GUEST_CONN_BYTES: u64 = 1 << 20;
const DISK_BYTES: usize = 4 << 20;
const RW_MARKER: &[u8] = b"squib-rw-marker";
const RW_MARKER_OFFSET: usize = 8 * 512;

const GUEST_SCRIPT: &str = r#"#!/bin/sh
echo "BLK-VDA-SHA $(sha256sum /dev/vda | cut -d' ' -f1)"
echo "BLK-VDA-SERIAL $(cat /sys/block/vda/serial)"
echo "BLK-VDA-RO $(cat /sys/block/vda/ro) BLK-VDB-RO $(cat /sys/block/vdb/ro)"
if printf 'x' | dd of=/dev/vda bs=512 count=1 conv=sync,fsync 2>/dev/null; then
    echo "BLK-VDA-WRITE accepted"
else
    echo "BLK-VDA-WRITE refused"
fi
if printf 'squib-rw-marker' | dd of=/dev/vdb bs=512 seek=8 count=1 conv=sync,fsync 2>/dev/null; then
    echo "BLK-VDB-WRITE ok"
fi
sync
echo "RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
echo "RNG-BYTES $(head -c 64 /dev/hwrng | od -An -tx1 | tr -d ' \n')"
# Baseline for the vsock numbers: the same 64 MiB copied through a pipe inside the guest.
start=$(date +%s)
dd if=/dev/zero bs=65536 count=1024 2>/dev/null | cat >/dev/null
echo "GUEST-PIPE-64MIB-SECONDS $(($(date +%s) - start))"
/vsock-guest listen 1234 || echo "VSOCK-LISTEN-FAILED $?"
/vsock-guest connect 5000 || echo "VSOCK-CONNECT-FAILED $?"
"#;

/// Largest piece handled at once by [`pattern_at`].
const CHUNK: usize = 64 * 1024;
/// Period of the byte pattern: a prime, so it lines up with no buffer or page size.
const PERIOD: usize = 1_048_573;

/// `len` (at most [`CHUNK`]) bytes of the pattern the host sends, from stream offset `start`.
/// Precomputed once: comparing 64 MiB byte by byte in an unoptimized test binary under
/// emulation would cost more than the transfer being measured.
fn pattern_at(start: u64, len: usize) -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    let block = BLOCK.get_or_init(|| {
        (0..PERIOD + CHUNK)
            .map(|j| {
                let i = (j % PERIOD) as u64;
                ((i.wrapping_mul(131) ^ (i >> 7)) & 0xff) as u8
            })
            .collect()
    });
    let at = usize::try_from(start % PERIOD as u64).unwrap_or(0);
    &block[at..at + len.min(CHUNK)]
}

fn fill_pattern(buf: &mut [u8], start: u64) {
    for (k, piece) in buf.chunks_mut(CHUNK).enumerate() {
        let off = start + (k * CHUNK) as u64;
        piece.copy_from_slice(pattern_at(off, piece.len()));
    }
}

/// What one guest run recorded.
struct Run {
    console: String,
    exit: Option<String>,
    ro_sha_host: String,
    ro_unchanged: bool,
    rw_marker_found: bool,
    host_to_guest: Result<Duration, String>,
    guest_to_host: Result<(), String>,
    uds_left_behind: bool,
}

type Res<T> = Result<T, String>;

/// Turns any error into a message naming what was being done.
fn ctx<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn env_path(name: &str) -> Res<PathBuf> {
    let value = std::env::var_os(name).ok_or(format!("{name} is unset: run via run-vm-tests"))?;
    let path = PathBuf::from(value);
    if !path.is_file() {
        return Err(format!("{name}={} is not a file", path.display()));
    }
    Ok(path)
}

fn sha256_of(path: &Path) -> Res<String> {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .map_err(ctx("running sha256sum"))?;
    if !out.status.success() {
        return Err(format!("sha256sum {} failed", path.display()));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn json_str(p: &Path) -> Res<String> {
    match p.to_str() {
        Some(s) if !s.contains(['"', '\\']) => Ok(format!("\"{s}\"")),
        _ => Err(format!("path {} cannot go into JSON verbatim", p.display())),
    }
}

/// Sends `total` pattern bytes on `stream` while reading the echo; checks every byte.
fn echo_exchange(stream: UnixStream, total: u64, deadline: Instant) -> Result<(), String> {
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    let sender = thread::spawn(move || -> Result<(), String> {
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        while sent < total {
            let n = usize::try_from((total - sent).min(buf.len() as u64)).unwrap_or(buf.len());
            fill_pattern(&mut buf[..n], sent);
            writer
                .write_all(&buf[..n])
                .map_err(|e| format!("write at {sent}: {e}"))?;
            sent += n as u64;
        }
        writer
            .shutdown(std::net::Shutdown::Write)
            .map_err(|e| e.to_string())
    });
    let mut reader = stream;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let mut result = Ok(());
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        reader
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| e.to_string())?;
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                result = Err(format!("read after {got} bytes: {e}"));
                break;
            }
        };
        let want = pattern_at(got, n);
        if &buf[..n] != want {
            let k = buf[..n]
                .iter()
                .zip(want)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!(
                "echoed byte {} is {:#x}, sent {:#x}",
                got + k as u64,
                buf[k],
                want[k]
            ));
        }
        got += n as u64;
    }
    sender.join().map_err(|_| "sender panicked".to_owned())??;
    result?;
    if got == total {
        Ok(())
    } else {
        Err(format!("echo ended after {got} of {total} bytes"))
    }
}

/// Host side of the host-initiated connection: retries `CONNECT 1234` until the guest's
/// helper listens, then runs the bulk echo.
fn host_connects(uds: &Path, deadline: Instant, vm_gone: &AtomicBool) -> Result<Duration, String> {
    let mut last = String::from("never tried");
    while Instant::now() < deadline && !vm_gone.load(Ordering::SeqCst) {
        let attempt = (|| -> Result<Option<UnixStream>, String> {
            let mut s = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
            s.write_all(b"CONNECT 1234\n").map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(30)))
                .map_err(|e| e.to_string())?;
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().map_err(|e| e.to_string())?);
            // The reply is one short line; nothing else arrives before we send data.
            r.read_line(&mut line).map_err(|e| e.to_string())?;
            if line.is_empty() {
                return Ok(None);
            }
            let port = line
                .strip_prefix("OK ")
                .and_then(|p| p.trim_end().parse::<u32>().ok())
                .ok_or_else(|| format!("bad reply {line:?}"))?;
            if port == 0 {
                return Err(format!("bad host port in {line:?}"));
            }
            Ok(Some(s))
        })();
        match attempt {
            Ok(Some(stream)) => {
                let start = Instant::now();
                echo_exchange(stream, BULK_BYTES, deadline)?;
                return Ok(start.elapsed());
            }
            Ok(None) => last = "guest refused (not listening yet)".into(),
            Err(e) => last = e,
        }
        thread::sleep(Duration::from_millis(200));
    }
    Err(format!("no vsock connection to the guest: {last}"))
}

/// Host side of the guest-initiated connection to port 5000.
fn host_accepts(
    listener: UnixListener,
    deadline: Instant,
    vm_gone: &AtomicBool,
) -> Result<(), String> {
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    while Instant::now() < deadline && !vm_gone.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(|e| e.to_string())?;
                return echo_exchange(stream, GUEST_CONN_BYTES, deadline);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("accept: {e}")),
        }
    }
    Err("the guest never connected to host port 5000".into())
}

fn run_guest() -> Res<Run> {
    let vmm = env_path("SQUIB_VMM_BIN")?;
    let helper = env_path("SQUIB_VSOCK_GUEST_BIN")?;
    let kernel = vm_env::test_kernel().map_err(ctx("test kernel"))?;
    // Sockets cannot live on the results share; everything but the console stays local.
    let dir = std::env::temp_dir().join(format!("squib-vm-devices-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).map_err(ctx("creating the scratch dir"))?;

    let extra = dir.join("extra");
    fs::create_dir_all(&extra).map_err(ctx("creating the initramfs extra dir"))?;
    fs::write(extra.join("squib-test"), GUEST_SCRIPT).map_err(ctx("writing the guest script"))?;
    fs::set_permissions(extra.join("squib-test"), fs::Permissions::from_mode(0o755))
        .map_err(ctx("chmod of the guest script"))?;
    fs::copy(&helper, extra.join("vsock-guest")).map_err(ctx("copying vsock-guest"))?;
    let initramfs = dir.join("initramfs.cpio");
    vm_env::make_initramfs(&initramfs, Some(&extra)).map_err(ctx("building the initramfs"))?;

    let ro = dir.join("ro.img");
    let mut data = vec![0u8; DISK_BYTES];
    fill_pattern(&mut data, 7);
    fs::write(&ro, &data).map_err(ctx("writing ro.img"))?;
    let ro_sha_host = sha256_of(&ro)?;
    let rw = dir.join("rw.img");
    fs::write(&rw, vec![0u8; DISK_BYTES]).map_err(ctx("writing rw.img"))?;

    let uds = dir.join("v.sock");
    let listener =
        UnixListener::bind(dir.join("v.sock_5000")).map_err(ctx("binding v.sock_5000"))?;
    let console = dir.join("console.log");
    let config = dir.join("vm.json");
    fs::write(
        &config,
        format!(
            r#"{{
  "boot-source": {{
    "kernel_image_path": {kernel},
    "initrd_path": {initrd},
    "boot_args": "console=ttyS0 reboot=k panic=-1"
  }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": 256 }},
  "drives": [
    {{ "drive_id": "data", "path_on_host": {ro}, "is_root_device": false, "is_read_only": true }},
    {{ "drive_id": "scratch", "path_on_host": {rw}, "is_root_device": false, "is_read_only": false }}
  ],
  "vsock": {{ "guest_cid": 3, "uds_path": {uds} }},
  "entropy": {{}}
}}"#,
            kernel = json_str(&kernel)?,
            initrd = json_str(&initramfs)?,
            ro = json_str(&ro)?,
            rw = json_str(&rw)?,
            uds = json_str(&uds)?,
        ),
    )
    .map_err(ctx("writing the VM configuration"))?;

    let deadline = Instant::now() + VM_TIMEOUT;
    let uds2 = uds.clone();
    // Set once squib-vmm has exited, so that the host side stops waiting for a guest that is
    // gone instead of running into the deadline.
    let vm_gone = Arc::new(AtomicBool::new(false));
    let gone = vm_gone.clone();
    let to_guest = thread::spawn(move || host_connects(&uds2, deadline, &gone));
    let gone = vm_gone.clone();
    let from_guest = thread::spawn(move || host_accepts(listener, deadline, &gone));
    let out = output_with_timeout(
        Command::new(&vmm).args([
            "--no-api".as_ref(),
            "--config-file".as_ref(),
            config.as_os_str(),
            "--serial-out".as_ref(),
            console.as_os_str(),
        ]),
        VM_TIMEOUT,
    )
    .map_err(ctx("running squib-vmm"))?;
    let log = fs::read_to_string(&console).unwrap_or_default();
    if let Some(results) = vm_env::results_dir() {
        let _ = fs::write(results.join("vm-devices-console.log"), &log);
        let _ = fs::write(results.join("vm-devices-vmm-stderr.log"), &out.stderr);
    }
    eprintln!(
        "squib-vmm exited with {} after {:?} (timed out: {})",
        out.status, out.elapsed, out.timed_out
    );
    vm_gone.store(true, Ordering::SeqCst);
    let host_to_guest = to_guest.join().unwrap_or_else(|_| Err("panicked".into()));
    let guest_to_host = from_guest.join().unwrap_or_else(|_| Err("panicked".into()));

    let disk = fs::read(&rw).map_err(ctx("reading rw.img"))?;
    let rw_marker_found = disk
        .get(RW_MARKER_OFFSET..RW_MARKER_OFFSET + RW_MARKER.len())
        .is_some_and(|m| m == RW_MARKER);
    let ro_unchanged = sha256_of(&ro)? == ro_sha_host;
    let exit = log
        .lines()
        .find_map(|l| l.trim().strip_prefix(TEST_EXIT_MARKER))
        .map(|s| s.trim().to_owned());
    // The socket file goes away with the device; the rest is ours to remove.
    let uds_left_behind = uds.exists();
    let _ = fs::remove_dir_all(&dir);
    Ok(Run {
        console: log,
        exit,
        ro_sha_host,
        ro_unchanged,
        rw_marker_found,
        host_to_guest,
        guest_to_host,
        uds_left_behind,
    })
}

/// The one guest run of this binary, or why it did not get as far as its script's end.
fn run() -> Res<&'static Run> {
    // One VM run for all tests; a failed setup is recorded once instead of retried per test.
    static RUN: OnceLock<Res<Run>> = OnceLock::new();
    let run = RUN
        .get_or_init(run_guest)
        .as_ref()
        .map_err(|e| format!("running the guest failed: {e}"))?;
    if run.exit.as_deref() != Some("0") {
        return Err(format!(
            "guest script did not finish (exit {:?}); console:\n{}",
            run.exit, run.console
        ));
    }
    Ok(run)
}

fn console_value<'a>(run: &'a Run, key: &str) -> Res<&'a str> {
    run.console
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
        .ok_or_else(|| format!("no {key} line on the console:\n{}", run.console))
}

#[test]
fn test_blk_guest_reads_drive_with_host_checksum_and_id() -> Res<()> {
    let run = run()?;
    assert_eq!(console_value(run, "BLK-VDA-SHA")?, run.ro_sha_host);
    assert_eq!(console_value(run, "BLK-VDA-SERIAL")?, "data");
    Ok(())
}

#[test]
fn test_blk_read_only_drive_refuses_writes() -> Res<()> {
    let run = run()?;
    assert_eq!(console_value(run, "BLK-VDA-RO")?, "1 BLK-VDB-RO 0");
    assert_eq!(console_value(run, "BLK-VDA-WRITE")?, "refused");
    assert!(run.ro_unchanged, "the read-only image changed");
    Ok(())
}

#[test]
fn test_blk_guest_writes_reach_host_file() -> Res<()> {
    let run = run()?;
    assert_eq!(console_value(run, "BLK-VDB-WRITE")?, "ok");
    assert!(
        run.rw_marker_found,
        "the marker written by the guest is not in the host file"
    );
    Ok(())
}

#[test]
fn test_rng_guest_reads_host_entropy() -> Res<()> {
    let run = run()?;
    assert!(console_value(run, "RNG-CURRENT")?.starts_with("virtio_rng"));
    let hex = console_value(run, "RNG-BYTES")?;
    assert_eq!(hex.len(), 128, "expected 64 bytes, got {hex:?}");
    assert!(hex.chars().any(|c| c != '0'), "entropy is all zero: {hex}");
    Ok(())
}

#[test]
fn test_vsock_host_initiated_64_mib_echo_is_unchanged() -> Res<()> {
    let run = run()?;
    match &run.host_to_guest {
        Ok(elapsed) => eprintln!(
            "64 MiB each way through vsock took {elapsed:?}; a 64 MiB pipe copy inside the \
             guest took {} s",
            console_value(run, "GUEST-PIPE-64MIB-SECONDS")?
        ),
        Err(e) => panic!(
            "host-initiated vsock echo failed: {e}\nconsole:\n{}",
            run.console
        ),
    }
    assert!(
        run.console
            .contains(&format!("VSOCK-GUEST-DONE {BULK_BYTES}"))
    );
    assert!(
        !run.uds_left_behind,
        "squib-vmm left its vsock socket behind"
    );
    Ok(())
}

#[test]
fn test_vsock_guest_initiated_echo_is_unchanged() -> Res<()> {
    let run = run()?;
    if let Err(e) = &run.guest_to_host {
        panic!(
            "guest-initiated vsock echo failed: {e}\nconsole:\n{}",
            run.console
        );
    }
    assert!(
        run.console
            .contains(&format!("VSOCK-GUEST-DONE {GUEST_CONN_BYTES}"))
    );
    Ok(())
}
