//! One measured boot: start a VMM (squib-vmm through its API socket, or QEMU's microvm machine)
//! on the guest kernel and agent initramfs, timestamp every console line as it arrives, wait
//! until the agent answers a ping over vsock, read the VMM's memory at that moment, then kill
//! the VMM by its PID. The result is one JSON object on stdout.
//!
//! squib's phases come from the host clock: API socket accepting (process start), InstanceStart
//! answered, first console line, the line where the kernel hands over to init (`Run /init`, or
//! with `quiet` the agent's first line), the agent's ready marker, and the first answered ping.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use squib_runtime::agent_client::{AgentClient, AgentEndpoint};

/// The line the agent prints on the console once it listens on vsock.
const READY_MARKER: &str = "squib-agent: ready";

/// Which VMM boots the guest.
#[derive(Debug, Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Vmm {
    /// squib-vmm, configured through its Firecracker-compatible API socket.
    Squib,
    /// `qemu-system-x86_64 -M microvm -accel kvm` with virtio-mmio devices and vhost-vsock.
    Qemu,
}

/// `squib-bench boot` arguments.
#[derive(Debug, clap::Args)]
pub struct BootArgs {
    /// The VMM to measure.
    #[arg(long, value_enum)]
    pub vmm: Vmm,
    /// The VMM binary (squib-vmm, or qemu-system-x86_64).
    #[arg(long)]
    pub bin: PathBuf,
    /// Guest kernel.
    #[arg(long)]
    pub kernel: PathBuf,
    /// Agent initramfs.
    #[arg(long)]
    pub initramfs: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 128)]
    pub mem_mib: u32,
    /// Kernel command line (QEMU's microvm adds its virtio-mmio devices, squib-vmm its own).
    #[arg(long)]
    pub boot_args: String,
    /// Scratch directory (sockets, console copy).
    #[arg(long)]
    pub workdir: PathBuf,
    /// Seconds to wait for the agent.
    #[arg(long, default_value_t = 240)]
    pub timeout_secs: u64,
}

/// Console lines with their arrival time since the VMM was spawned.
type Lines = Arc<Mutex<Vec<(Duration, String)>>>;

/// Runs one boot and prints its measurements as one JSON object.
pub fn run(args: &BootArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("creating workdir {}", args.workdir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("building the async runtime")?;
    let result = rt.block_on(boot(args))?;
    println!("{result}");
    Ok(())
}

/// Kills the VMM by PID when dropped, whatever happened.
struct Vm {
    child: Child,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_console_reader(child: &mut Child, start: Instant) -> anyhow::Result<Lines> {
    let out = child
        .stdout
        .take()
        .context("the VMM's stdout is not piped")?;
    let lines: Lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        let mut reader = BufReader::new(out);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let at = start.elapsed();
                    let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    if let Ok(mut l) = sink.lock() {
                        l.push((at, line));
                    }
                }
            }
        }
    });
    Ok(lines)
}

/// One HTTP/1.1 request over the API socket; returns the status code.
fn api_request(sock: &Path, method: &str, path: &str, body: &Value) -> anyhow::Result<u16> {
    let body = body.to_string();
    let mut s = UnixStream::connect(sock)
        .with_context(|| format!("connecting to the API socket {}", sock.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .context("setting the API read timeout")?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .with_context(|| format!("sending {method} {path}"))?;
    let mut resp = Vec::new();
    let mut chunk = [0u8; 4096];
    // Read until the status line is complete; the body does not matter unless it failed.
    loop {
        let n = s
            .read(&mut chunk)
            .with_context(|| format!("reading the answer to {method} {path}"))?;
        resp.extend_from_slice(chunk.get(..n).unwrap_or_default());
        if n == 0 || resp.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&resp);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .with_context(|| format!("no HTTP status in the answer to {method} {path}: {text:?}"))?;
    if !(200..300).contains(&status) {
        bail!("{method} {path} answered {status}: {text}");
    }
    Ok(status)
}

/// Memory of a process: total RSS and the RSS of its guest RAM mapping (the anonymous mapping
/// closest in size to the guest memory, at least that large), in KiB. Adjacent anonymous
/// mappings with the same permissions count as one: a VMM that advises parts of guest RAM
/// differently (huge pages or not, as squib-vmm did for a while) splits its one mapping into
/// several.
fn rss_kib(pid: u32, mem_mib: u32) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("reading /proc/{pid}/smaps"))?;
    let want_kib = u64::from(mem_mib) * 1024;
    let mut total = 0u64;
    // (start, end, perms, anonymous, rss KiB) of each mapping, in address order.
    let mut maps: Vec<(u64, u64, String, bool, u64)> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let Some(first) = words.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            let (a, b) = first.split_once('-').unwrap_or_default();
            let perms = words.next().unwrap_or_default().to_owned();
            let path = words.nth(3);
            let anon = path.is_none() || path.is_some_and(|p| p.starts_with("/memfd:"));
            let parse = |x: &str| u64::from_str_radix(x, 16).unwrap_or(0);
            maps.push((parse(a), parse(b), perms, anon, 0));
            continue;
        }
        if first == "Rss:" {
            let value = words
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
            total += value;
            if let Some(last) = maps.last_mut() {
                last.4 = value;
            }
        }
    }
    let mut merged: Vec<(u64, u64, u64)> = Vec::new(); // (start, end, rss) of anonymous runs
    let mut prev: Option<(u64, String)> = None; // (end, perms) of the last anonymous mapping
    for (start, end, perms, anon, rss) in maps {
        if !anon {
            prev = None;
            continue;
        }
        match (merged.last_mut(), &prev) {
            (Some(run), Some((prev_end, prev_perms)))
                if *prev_end == start && *prev_perms == perms =>
            {
                run.1 = end;
                run.2 += rss;
            }
            _ => merged.push((start, end, rss)),
        }
        prev = Some((end, perms));
    }
    let best = merged
        .iter()
        .map(|&(start, end, rss)| ((end - start) / 1024, rss))
        .filter(|&(size, _)| size >= want_kib)
        .min_by_key(|&(size, _)| size);
    Ok((total, best.map_or(0, |(_, rss)| rss)))
}

async fn wait_agent(
    endpoint: &AgentEndpoint,
    vm: &mut Vm,
    deadline: Instant,
) -> anyhow::Result<()> {
    loop {
        // Zero deadline: one dial per call, so the loop polls every few milliseconds instead
        // of the client's own 50 ms retry step.
        match AgentClient::connect(endpoint.clone(), Duration::ZERO).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                if let Some(status) = vm.child.try_wait().context("checking the VMM")? {
                    bail!("the VMM exited with {status} before the agent answered ({e})");
                }
                if Instant::now() >= deadline {
                    bail!("the agent did not answer in time: {e}");
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

async fn boot(args: &BootArgs) -> anyhow::Result<Value> {
    let deadline_after = Duration::from_secs(args.timeout_secs);
    let uds = args.workdir.join("v.sock");
    let api = args.workdir.join("api.sock");
    let _ = std::fs::remove_file(&uds);
    let _ = std::fs::remove_file(&api);
    let stderr = std::fs::File::create(args.workdir.join("vmm-stderr.log"))
        .context("creating the VMM's stderr log")?;
    let mut phases = serde_json::Map::new();
    let start = Instant::now();
    let deadline = start + deadline_after;
    let (mut vm, lines, endpoint) = match args.vmm {
        Vmm::Squib => {
            let mut child = Command::new(&args.bin)
                .arg("--api-sock")
                .arg(&api)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("starting {}", args.bin.display()))?;
            let lines = spawn_console_reader(&mut child, start)?;
            let mut vm = Vm { child };
            while UnixStream::connect(&api).is_err() {
                if vm.child.try_wait().context("checking squib-vmm")?.is_some() {
                    bail!("squib-vmm exited before serving its API socket");
                }
                if Instant::now() >= deadline {
                    bail!("squib-vmm did not serve its API socket in time");
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            phases.insert("api_ready_s".into(), json!(secs(start.elapsed())));
            api_request(
                &api,
                "PUT",
                "/machine-config",
                &json!({"vcpu_count": 1, "mem_size_mib": args.mem_mib}),
            )?;
            api_request(
                &api,
                "PUT",
                "/boot-source",
                &json!({"kernel_image_path": args.kernel, "initrd_path": args.initramfs,
                        "boot_args": args.boot_args}),
            )?;
            api_request(
                &api,
                "PUT",
                "/vsock",
                &json!({"guest_cid": 3, "uds_path": uds}),
            )?;
            api_request(&api, "PUT", "/entropy", &json!({}))?;
            phases.insert("configured_s".into(), json!(secs(start.elapsed())));
            api_request(
                &api,
                "PUT",
                "/actions",
                &json!({"action_type": "InstanceStart"}),
            )?;
            phases.insert("instance_started_s".into(), json!(secs(start.elapsed())));
            (vm, lines, AgentEndpoint::HybridVsock { uds_path: uds })
        }
        Vmm::Qemu => {
            // vhost-vsock context ids are global to the host: derive one from our pid.
            let cid = 3 + std::process::id() % 1_000_000;
            let mut child = Command::new(&args.bin)
                .args(["-M", "microvm,acpi=off", "-accel", "kvm", "-cpu", "host"])
                .args(["-m", &args.mem_mib.to_string(), "-smp", "1"])
                .args([
                    "-nodefaults",
                    "-no-user-config",
                    "-display",
                    "none",
                    "-no-reboot",
                ])
                .args(["-serial", "stdio"])
                .arg("-kernel")
                .arg(&args.kernel)
                .arg("-initrd")
                .arg(&args.initramfs)
                .arg("-append")
                .arg(&args.boot_args)
                .args(["-device", "virtio-rng-device"])
                .arg("-device")
                .arg(format!("vhost-vsock-device,guest-cid={cid}"))
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(stderr)
                .spawn()
                .with_context(|| format!("starting {}", args.bin.display()))?;
            let lines = spawn_console_reader(&mut child, start)?;
            (Vm { child }, lines, AgentEndpoint::Vsock { cid })
        }
    };
    wait_agent(&endpoint, &mut vm, deadline).await?;
    let ready = start.elapsed();
    let (rss_total_kib, rss_guest_kib) = rss_kib(vm.child.id(), args.mem_mib)?;
    drop(vm);
    let lines = lines
        .lock()
        .map_err(|_| anyhow::anyhow!("console reader panicked"))?
        .clone();
    let console: String = lines
        .iter()
        .map(|(t, l)| format!("{:10.6} {l}\n", t.as_secs_f64()))
        .collect();
    std::fs::write(args.workdir.join("console.log"), console)
        .context("writing the console copy")?;
    if let Some((t, _)) = lines.first() {
        phases.insert("first_console_s".into(), json!(secs(*t)));
    }
    // Kernel to init: the kernel's own line when the console shows it; with `quiet`, the
    // first line that is not a kernel message (the agent's first log line).
    let init = lines
        .iter()
        .find(|(_, l)| l.contains("Run /init"))
        .or_else(|| lines.iter().find(|(_, l)| !l.starts_with('[')));
    if let Some((t, l)) = init {
        phases.insert("init_s".into(), json!(secs(*t)));
        phases.insert("init_line".into(), json!(l));
    }
    if let Some((t, _)) = lines.iter().find(|(_, l)| l.contains(READY_MARKER)) {
        phases.insert("marker_s".into(), json!(secs(*t)));
    }
    phases.insert("agent_ready_s".into(), json!(secs(ready)));
    phases.insert("console_lines".into(), json!(lines.len()));
    phases.insert(
        "console_bytes".into(),
        json!(lines.iter().map(|(_, l)| l.len() + 1).sum::<usize>()),
    );
    phases.insert("rss_total_kib".into(), json!(rss_total_kib));
    phases.insert("rss_guest_kib".into(), json!(rss_guest_kib));
    phases.insert(
        "vmm".into(),
        json!(format!("{:?}", args.vmm).to_lowercase()),
    );
    phases.insert("mem_mib".into(), json!(args.mem_mib));
    Ok(Value::Object(phases))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests below each make a 64 MiB mapping in this one process and ask `rss_kib` for
    /// "the" guest mapping: run together, one found the other's (a CI run, 2026-12-05).
    static ONE_GUEST_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn test_rss_kib_finds_the_guest_mapping_of_this_process() {
        let _one = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // A 64 MiB anonymous mapping with 8 MiB touched stands in for guest RAM.
        let len = 64 << 20;
        let mut v = vec![0u8; len];
        for b in v.iter_mut().take(8 << 20).step_by(4096) {
            *b = 1;
        }
        let (total, guest) = rss_kib(std::process::id(), 64).unwrap();
        assert!(guest >= 8 * 1024, "guest rss {guest} KiB");
        assert!(guest < 64 * 1024 + 4, "guest rss {guest} KiB");
        assert!(total >= guest);
        drop(v);
    }

    #[test]
    fn test_rss_kib_counts_a_guest_mapping_split_by_madvise_as_one() {
        // A VMM that advises parts of guest RAM differently splits the mapping: the touched
        // 4 MiB at each end of a 64 MiB mapping are in different pieces.
        let _one = ONE_GUEST_AT_A_TIME
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let len: usize = 64 << 20;
        // SAFETY: a fresh private anonymous mapping, unmapped below; nothing else uses it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let base = p.cast::<u8>();
        // SAFETY: the ranges are inside the mapping made above.
        unsafe {
            assert_eq!(libc::madvise(p, 16 << 20, libc::MADV_NOHUGEPAGE), 0);
            for off in (0..4 << 20).chain((len - (4 << 20))..len).step_by(4096) {
                base.add(off).write_volatile(1);
            }
        }
        let (_, guest) = rss_kib(std::process::id(), 64).unwrap();
        // SAFETY: unmaps exactly the mapping made above.
        unsafe { libc::munmap(p, len) };
        assert!(guest >= 8 * 1024, "guest rss {guest} KiB");
    }
}
