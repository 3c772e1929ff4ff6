//! VM test: containerd-shim-squib-v2 driven by a real containerd through `ctr`.
//!
//! One private containerd (scripts/containerd-private) serves every case, with the shim on its
//! PATH and a locally built busybox image imported; each case is a `ctr` command line and its
//! expected output, taken from the cases of other runtimes' bugs where one applies (c01, c02,
//! c04, c05, c08), plus the shim's own failure paths: ten containers at once, a SIGKILLed shim,
//! a SIGKILL of a container whose guest hangs, a containerd restart under a running container,
//! and a Debian minbase image. The cases run one after another and the test fails listing those
//! that failed, so one broken case does not hide the others. The harness is `shim_harness`.

// Everything here is test code: the helpers may unwrap like the tests they serve.
#![cfg(test)]

mod shim_harness;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shim_harness::{
    CMD_TIMEOUT, Case, CaseResult, Containerd, IMAGE, NS, describe, run_cases, shim_children,
    wait_child,
};
use squib_tests::process::output_with_timeout;
use squib_tests::vm_env;

fn case_echo(c: &Containerd) -> CaseResult {
    let out = c.run(&[], "echo", &["echo", "hello from squib"]);
    check!(
        out.status.code() == Some(0) && out.stdout == b"hello from squib\n",
        "echo: {}",
        describe(&out)
    );
    let out = c.run(&[], "uname", &["uname", "-a"]);
    let text = String::from_utf8_lossy(&out.stdout);
    check!(
        out.status.code() == Some(0) && text.starts_with("Linux "),
        "uname: {}",
        describe(&out)
    );
    eprintln!("guest kernel: {}", text.trim());
    Ok(())
}

fn case_exit_codes(c: &Containerd) -> CaseResult {
    for (id, args, want) in [
        ("c01a", &["sh", "-c", "exit 42"][..], 42),
        ("c01b", &["false"][..], 1),
        ("c01c", &["true"][..], 0),
        // c08 C: a PID-namespace init cannot SIGKILL itself.
        ("c08c", &["sh", "-c", "kill -9 $$; echo survived"][..], 0),
    ] {
        let out = c.run(&[], id, args);
        check!(
            out.status.code() == Some(want) && !out.timed_out,
            "{id} {args:?}: want {want}, got {}",
            describe(&out)
        );
    }
    Ok(())
}

fn case_c01_exec_failures(c: &Containerd) -> CaseResult {
    let out = c.run(&[], "c01d", &["nonexistent"]);
    let err = String::from_utf8_lossy(&out.stderr);
    check!(
        out.status.code() == Some(1)
            && err.contains("\"nonexistent\"")
            && err.contains("executable file not found in $PATH"),
        "c01d: {}",
        describe(&out)
    );
    let out = c.run(&[], "c01e", &["/etc"]);
    let err = String::from_utf8_lossy(&out.stderr);
    check!(
        out.status.code() == Some(1)
            && err.contains("/etc")
            && (err.contains("permission denied") || err.contains("is a directory")),
        "c01e: {}",
        describe(&out)
    );
    // Nothing is left of any c01 container.
    let tasks = c.ctr(&["task", "ls", "-q"]);
    let containers = c.ctr(&["container", "ls", "-q"]);
    let listed = format!(
        "{}{}",
        String::from_utf8_lossy(&tasks.stdout),
        String::from_utf8_lossy(&containers.stdout)
    );
    check!(!listed.contains("c01"), "c01 leftovers: {listed:?}");
    Ok(())
}

fn case_delete_leaves_nothing(c: &Containerd) -> CaseResult {
    let before_mounts = mounts();
    c.run_detached("gone")?;
    check!(
        !shim_children().is_empty(),
        "no shim process while the container runs"
    );
    check!(!vsock_sockets().is_empty(), "no vsock socket while running");
    c.remove("gone");
    // The shim exits after containerd's shutdown call.
    finish(c, &before_mounts, &["gone"])
}

/// The mount table now.
fn mounts() -> String {
    std::fs::read_to_string("/proc/self/mounts").unwrap()
}

/// The VMs' hybrid vsock sockets (and anything else) under /run/squib.
fn vsock_sockets() -> Vec<PathBuf> {
    std::fs::read_dir("/run/squib")
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// The bundle directory containerd made for container `id`.
fn bundle_dir(c: &Containerd, id: &str) -> PathBuf {
    c.dir
        .join("state/io.containerd.runtime.v2.task")
        .join(NS)
        .join(id)
}

/// PIDs of the shim processes serving container `id` (`... -id ID ...` on their command line).
fn shim_pids_of(id: &str) -> Vec<u32> {
    shim_children()
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.windows(2)
                .any(|w| w[0] == b"-id" && w[1] == id.as_bytes())
        })
        .collect()
}

/// What is left of finished containers `ids`: shim processes, sockets under /run/squib, mounts
/// not in `before_mounts`, their bundles, tasks and containers. Empty when nothing is.
fn leftovers(c: &Containerd, before_mounts: &str, ids: &[&str]) -> Vec<String> {
    let mut left = Vec::new();
    let shims = shim_children();
    if !shims.is_empty() {
        left.push(format!("shim processes {shims:?}"));
    }
    let sockets = vsock_sockets();
    if !sockets.is_empty() {
        left.push(format!("sockets {sockets:?}"));
    }
    let after = mounts();
    let new: Vec<_> = after
        .lines()
        .filter(|l| !before_mounts.lines().any(|b| b == *l))
        .collect();
    if !new.is_empty() {
        left.push(format!("mounts {new:?}"));
    }
    for id in ids {
        let bundle = bundle_dir(c, id);
        if bundle.exists() {
            left.push(format!("bundle {}", bundle.display()));
        }
    }
    for what in ["task", "container"] {
        let out = c.ctr(&[what, "ls", "-q"]);
        let listed = String::from_utf8_lossy(&out.stdout);
        let ours: Vec<_> = listed.lines().filter(|l| ids.contains(l)).collect();
        if !out.status.success() || !ours.is_empty() {
            left.push(format!("{what}s {ours:?} ({})", describe(&out)));
        }
    }
    left
}

/// Waits up to a minute for nothing to be left of `ids` (see [`leftovers`]); if something is,
/// SIGKILLs their remaining shims by PID (so no VM outlives the case) and fails naming it all.
fn finish(c: &Containerd, before_mounts: &str, ids: &[&str]) -> CaseResult {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut left = leftovers(c, before_mounts, ids);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        left = leftovers(c, before_mounts, ids);
    }
    if left.is_empty() {
        return Ok(());
    }
    for id in ids {
        for pid in shim_pids_of(id) {
            sigkill(pid);
        }
    }
    Err(format!("left behind: {}", left.join("; ")))
}

/// Ends a case that ran containers `ids`: after a failure removes them whatever their state,
/// then [`finish`]es; the case's own error comes first.
fn settle(c: &Containerd, before_mounts: &str, ids: &[&str], result: CaseResult) -> CaseResult {
    if result.is_err() {
        for id in ids {
            c.remove(id);
        }
    }
    result.and(finish(c, before_mounts, ids))
}

fn sigkill(pid: u32) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    );
}

/// Runs `args` in the foreground, waits until it runs, then `ctr task kill`s it with
/// `kill_args`; returns the status and output of `ctr run`.
fn run_and_kill(
    c: &Containerd,
    id: &str,
    args: &[&str],
    kill_args: &[&str],
) -> Result<(Option<i32>, String, String), String> {
    let child: Child = c
        .run_command(IMAGE, &[], id, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CMD_TIMEOUT;
    let mut running = false;
    while Instant::now() < deadline {
        let ls = c.ctr(&["task", "ls"]);
        if String::from_utf8_lossy(&ls.stdout)
            .lines()
            .any(|l| l.starts_with(id) && l.contains("RUNNING"))
        {
            running = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Let the process install its trap.
    std::thread::sleep(Duration::from_secs(3));
    let mut kill = vec!["task", "kill"];
    kill.extend_from_slice(kill_args);
    kill.push(id);
    let killed = c.ctr(&kill);
    let out = wait_child(child, Duration::from_secs(120));
    if !running {
        c.remove(id);
        return Err(format!("{id} never ran; kill: {}", describe(&killed)));
    }
    out.ok_or_else(|| {
        c.remove(id);
        format!("ctr run {id} did not end after the kill")
    })
}

fn case_kill(c: &Containerd) -> CaseResult {
    // c08 B: `ctr task kill` sends SIGTERM, which a trap handles.
    let (code, stdout, stderr) = run_and_kill(
        c,
        "c08b",
        &[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; while :; do sleep 1; done",
        ],
        &[],
    )?;
    check!(
        code == Some(7) && stdout.contains("got TERM"),
        "c08b: status {code:?}, stdout {stdout:?}, stderr {stderr:?}"
    );
    // c02: SIGKILL from outside gives 137 to the waiting client.
    let (code, stdout, stderr) = run_and_kill(c, "c02b", &["sleep", "1000"], &["-s", "SIGKILL"])?;
    check!(
        code == Some(137),
        "c02b: status {code:?}, stdout {stdout:?}, stderr {stderr:?}"
    );
    Ok(())
}

/// The last lines of a guest console log, for a failure message.
fn console_end(path: &std::path::Path) -> String {
    let text = String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// SIGKILL of a container whose guest hangs: the agent cannot take the signal, so the shim must
/// power the VM off, report 137, and leave nothing behind. The container hangs its own guest on
/// purpose (a privileged container may: it is its own VM; see `vm_env::HANG_GUEST_SCRIPT`),
/// which leaves the vCPU spinning in the kernel's panic loop and the agent silent, like the
/// hangs `make bench` met in the VM test host.
fn case_hung_guest_sigkill(c: &Containerd) -> CaseResult {
    let id = "hung";
    let before_mounts = mounts();
    let child: Child = c
        .run_command(
            IMAGE,
            &["--privileged"],
            id,
            &["sh", "-c", vm_env::HANG_GUEST_SCRIPT],
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Some(child);
    let result = (|| {
        let console = bundle_dir(c, id).join("console.log");
        let deadline = Instant::now() + CMD_TIMEOUT;
        let mut hung = false;
        while !hung && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let log = std::fs::read(&console).unwrap_or_default();
            hung = String::from_utf8_lossy(&log).contains(vm_env::HANG_GUEST_MARK);
            if !hung
                && child
                    .as_mut()
                    .is_some_and(|ch| ch.try_wait().ok().flatten().is_some())
            {
                let out = child
                    .take()
                    .and_then(|ch| wait_child(ch, Duration::from_secs(5)));
                return Err(format!(
                    "ctr run {id} ended before its guest crashed: {out:?}"
                ));
            }
        }
        check!(
            hung,
            "the guest of {id} never crashed; its console ends: {}",
            console_end(&console)
        );
        let killed = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        check!(
            killed.status.success(),
            "ctr task kill -s SIGKILL {id} with a hung guest: {}",
            describe(&killed)
        );
        Ok(())
    })();
    let out = child.and_then(|ch| wait_child(ch, Duration::from_secs(120)));
    let result = result.and_then(|()| match &out {
        Some((code, stdout, stderr)) => {
            check!(
                *code == Some(137) && !stdout.contains("alive"),
                "ctr run {id}: status {code:?}, stdout {stdout:?}, stderr {stderr:?}; want 137"
            );
            Ok(())
        }
        None => Err(format!("ctr run {id} did not end after the SIGKILL")),
    });
    settle(c, &before_mounts, &[id], result)
}

fn case_exec(c: &Containerd) -> CaseResult {
    c.run_detached("ex")?;
    let result = (|| {
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "e3",
            "ex",
            "sh",
            "-c",
            "echo in-exec; exit 3",
        ]);
        check!(
            out.status.code() == Some(3) && out.stdout == b"in-exec\n",
            "exec e3: {}",
            describe(&out)
        );
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "k9",
            "ex",
            "sh",
            "-c",
            "kill -9 $$",
        ]);
        check!(
            out.status.code() == Some(137),
            "exec k9: {}",
            describe(&out)
        );
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "k15",
            "ex",
            "sh",
            "-c",
            "kill -TERM $$",
        ]);
        check!(
            out.status.code() == Some(143),
            "exec k15: {}",
            describe(&out)
        );
        let out = c.ctr(&["task", "exec", "--exec-id", "e2", "ex", "nosuchcmd"]);
        let err = String::from_utf8_lossy(&out.stderr);
        check!(
            out.status.code() != Some(0) && err.contains("executable file not found in $PATH"),
            "exec nosuchcmd: {}",
            describe(&out)
        );
        // Piped stdin reaches the exec'd process and CloseIO ends it.
        let mut cmd = c.ctr_cmd(&[
            "task",
            "exec",
            "--exec-id",
            "in",
            "ex",
            "sh",
            "-c",
            "wc -l; echo after-eof",
        ]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            let mut stdin = child.stdin.take().unwrap();
            stdin.write_all(b"a\nb\nc\n").unwrap();
        }
        let out = wait_child(child, CMD_TIMEOUT);
        check!(
            matches!(&out, Some((Some(0), so, _)) if so == "3\nafter-eof\n"),
            "exec with stdin: {out:?}"
        );
        let out = c.ctr(&["task", "metrics", "ex"]);
        let text = String::from_utf8_lossy(&out.stdout);
        check!(
            out.status.success() && text.contains("memory"),
            "metrics: {}",
            describe(&out)
        );
        let out = c.ctr(&["task", "pause", "ex"]);
        check!(out.status.success(), "pause: {}", describe(&out));
        let ls = c.ctr(&["task", "ls"]);
        let paused = String::from_utf8_lossy(&ls.stdout)
            .lines()
            .any(|l| l.starts_with("ex ") && l.contains("PAUSED"));
        let out = c.ctr(&["task", "resume", "ex"]);
        check!(
            paused && out.status.success(),
            "pause/resume: ls {}, resume {}",
            describe(&ls),
            describe(&out)
        );
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "after",
            "ex",
            "echo",
            "resumed",
        ]);
        check!(
            out.stdout == b"resumed\n",
            "exec after resume: {}",
            describe(&out)
        );
        Ok(())
    })();
    c.remove("ex");
    result
}

/// How many bytes large_output streams: 100 MiB on a hardware KVM (or with SQUIB_SHIM_100MIB
/// set and not empty), 16 MiB in the emulated VM test host.
///
/// There the 100 MiB stream set off the host's own faults in 3 of 8 runs on 2026-12-05 (README,
/// "Known faults of the VM test host"): the 1-vCPU guest triple-faulted or hung in it, and
/// L1's kernel panicked ("TASK stack guard page was hit" in squib's vcpu0 thread), with and
/// without that day's memory change; a CI run lost all three of vm_shim's L1 boots. At 16 MiB
/// the case passed 8 runs of 8 there with no fault.
///
/// Every byte still goes through the same path (agent, vsock, shim, containerd's FIFOs): 16 MiB
/// is 64 times the vsock credit window and 256 times a pipe buffer. The arm64 VM test host,
/// which has not shown these faults, streams 100 MiB through the agent on every run
/// (tests/run-arm64-vm-tests, vm_agent's stdout_100mib).
fn large_output_len() -> usize {
    let forced = std::env::var_os("SQUIB_SHIM_100MIB").is_some_and(|v| !v.is_empty());
    if forced || !vm_env::in_emulated_host() {
        100 << 20
    } else {
        16 << 20
    }
}

fn case_large_output(c: &Containerd) -> CaseResult {
    // A known pattern, compared byte for byte on the host.
    const LINE: &[u8] = b"squib-large-output-0123456789abcdefghijklmnopqrstuvwxyz\n";
    let len = large_output_len();
    let script =
        format!("yes squib-large-output-0123456789abcdefghijklmnopqrstuvwxyz | head -c {len}");
    let out = c.run(&[], "big", &["sh", "-c", &script]);
    check!(out.status.code() == Some(0), "big: {}", describe(&out));
    check!(
        out.stdout.len() == len,
        "big: got {} bytes of {len}",
        out.stdout.len()
    );
    let first_bad = out
        .stdout
        .iter()
        .enumerate()
        .find(|(i, b)| LINE[i % LINE.len()] != **b)
        .map(|(i, _)| i);
    check!(
        first_bad.is_none(),
        "big: content differs at byte {first_bad:?}"
    );
    // c04: a known text, compared byte for byte.
    let out = c.run(&[], "seq", &["seq", "1", "200000"]);
    let mut expected = String::new();
    for i in 1..=200_000 {
        let _ = writeln!(expected, "{i}");
    }
    check!(
        out.stdout == expected.as_bytes(),
        "seq 1 200000: {} bytes, content differs",
        out.stdout.len()
    );
    Ok(())
}

fn case_terminal(c: &Containerd) -> CaseResult {
    let config = c.config.display().to_string();
    let inner = format!(
        "ctr -a {} -n {NS} run --runtime io.containerd.squib.v2 --runtime-config-path {config} -t --rm {IMAGE} tty1 sh -c 'tty; [ -t 0 ] && echo stdin-is-tty; exit 5'; echo rc=$?",
        c.sock
    );
    let out = output_with_timeout(
        Command::new("script").args(["-qc", &inner, "/dev/null"]),
        CMD_TIMEOUT,
    )
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    check!(
        text.contains("/dev/pts/0") && text.contains("stdin-is-tty") && text.contains("rc=5"),
        "terminal: {}",
        describe(&out)
    );
    Ok(())
}

fn case_run_stdin(c: &Containerd) -> CaseResult {
    // ctr run (which always attaches stdin): the init process's stdin comes from the client; its end (CloseIO) ends cat.
    // The input is written once the task runs: containerd 1.6's ctr drops the close of an
    // input that is already at end of file before the task starts (a client-side race).
    let config = c.config.display().to_string();
    let mut child = c
        .ctr_cmd(&[
            "run",
            "--runtime",
            "io.containerd.squib.v2",
            "--runtime-config-path",
            &config,
            "--rm",
            IMAGE,
            "rin",
            "sh",
            "-c",
            "cat; echo after-eof",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + CMD_TIMEOUT;
    while Instant::now() < deadline {
        let ls = c.ctr(&["task", "ls"]);
        if String::from_utf8_lossy(&ls.stdout)
            .lines()
            .any(|l| l.starts_with("rin") && l.contains("RUNNING"))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        // A failed run closed the pipe early: the check below reports its output.
        let _ = stdin.write_all(b"hello\nworld\n");
    }
    let out = wait_child(child, CMD_TIMEOUT);
    if out.is_none() {
        c.remove("rin");
    }
    check!(
        matches!(&out, Some((Some(0), so, _)) if so == "hello\nworld\nafter-eof\n"),
        "run with stdin: {out:?}"
    );
    Ok(())
}

/// What the shim says when a guest died or went silent under it: the CPU-level crash squib
/// reports, or the agent's silence. See [`case_parallel_10`].
fn guest_fault(out: &squib_tests::process::TimedOutput) -> bool {
    let err = String::from_utf8_lossy(&out.stderr);
    err.contains("GuestTripleFault")
        || err.contains("Request deadline elapsed")
        || err.contains("did not answer")
}

/// Ten `ctr run --rm` at once: ten shims booting ten VMs side by side.
///
/// Test-host fault, not squib's: in the VM test host, ten guests running at once on L1's two
/// emulated CPUs now and then find their own memory corrupted. A guest then triple-faults, or
/// its vCPU loops on a page-table walk that leads outside its RAM, so its agent never answers
/// (both seen with L1's kvm trace events, and reproduced with a plain busybox guest and no
/// virtio device at all). Under the same load L1's own kernel panics ("TASK stack guard page
/// was hit") in QEMU's threads when QEMU is the VMM: no user process can do that, which points
/// at TCG's emulation of nested SVM rather than at the VMM. A container whose guest failed so is
/// run once more, alone, and must pass then; at most two of the ten may need it. Any other
/// failure fails the case at once, and the cleanup checks cover every container.
fn case_parallel_10(c: &Containerd) -> CaseResult {
    // Ten boots share L1's two vCPUs: far slower than one.
    const LIMIT: Duration = Duration::from_secs(600);
    const MAX_GUEST_FAULTS: usize = 2;
    let before_mounts = mounts();
    let ids: Vec<String> = (0..10).map(|i| format!("par{i}")).collect();
    let outs: Vec<_> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| s.spawn(move || c.run_image(IMAGE, &[], id, &["echo", id], LIMIT)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let passed = |id: &str, out: &squib_tests::process::TimedOutput| {
        out.status.code() == Some(0) && out.stdout == format!("{id}\n").as_bytes()
    };
    let mut failures = Vec::new();
    let mut guest_faults = 0;
    for (id, out) in ids.iter().zip(&outs) {
        if passed(id, out) {
            continue;
        }
        c.remove(id);
        if guest_fault(out) && guest_faults < MAX_GUEST_FAULTS {
            guest_faults += 1;
            eprintln!(
                "parallel_10: {id}'s guest failed (test-host fault, see case_parallel_10): {}; \
                 running it again alone",
                describe(out)
            );
            let again = c.run_image(IMAGE, &[], id, &["echo", id], LIMIT);
            if passed(id, &again) {
                continue;
            }
            c.remove(id);
            failures.push(format!(
                "{id}: {}; again alone: {}",
                describe(out),
                describe(&again)
            ));
        } else {
            failures.push(format!("{id}: {}", describe(out)));
        }
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let left = finish(c, &before_mounts, &ids);
    check!(failures.is_empty(), "{}", failures.join("\n"));
    left
}

/// The shim dies by SIGKILL under a running container: containerd's dead-shim path (`shim
/// delete`) must clean up everything and report the task exited.
fn case_shim_sigkill_cleanup(c: &Containerd) -> CaseResult {
    let id = "sk";
    let before_mounts = mounts();
    c.run_detached(id)?;
    let result = (|| {
        let pids = shim_pids_of(id);
        check!(pids.len() == 1, "shim processes of {id}: {pids:?}");
        let address =
            std::fs::read_to_string(bundle_dir(c, id).join("address")).unwrap_or_default();
        let shim_socket = PathBuf::from(address.trim().trim_start_matches("unix://"));
        check!(
            shim_socket.exists(),
            "no shim socket {} while running",
            shim_socket.display()
        );
        let events = c.events();
        // Let `ctr events` subscribe before anything happens.
        std::thread::sleep(Duration::from_secs(5));
        sigkill(pids[0]);
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut stopped = false;
        while Instant::now() < deadline {
            let ls = c.ctr(&["task", "ls"]);
            let text = String::from_utf8_lossy(&ls.stdout);
            if ls.status.success()
                && !text
                    .lines()
                    .any(|l| l.starts_with(&format!("{id} ")) && !l.contains("STOPPED"))
            {
                stopped = true;
                eprintln!("after the shim's SIGKILL, ctr task ls: {text:?}");
                break;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        // The exit event comes with the cleanup; give it a moment to arrive.
        std::thread::sleep(Duration::from_secs(3));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(events.id()).unwrap()),
            nix::sys::signal::Signal::SIGKILL,
        );
        let events = events.wait_with_output().unwrap();
        let events = String::from_utf8_lossy(&events.stdout);
        check!(stopped, "task {id} still listed as not stopped after 120 s");
        check!(
            events.lines().any(|l| l.contains("/tasks/exit")
                && l.contains(&format!("\"container_id\":\"{id}\""))
                && l.contains("\"exit_status\":137")),
            "no /tasks/exit event with status 137 for {id}; events: {events:?}"
        );
        check!(
            !shim_socket.exists(),
            "shim socket {} left",
            shim_socket.display()
        );
        let out = c.ctr(&["task", "delete", id]);
        let err = String::from_utf8_lossy(&out.stderr);
        check!(
            out.status.success() || err.contains("not found"),
            "task delete: {}",
            describe(&out)
        );
        eprintln!(
            "after the shim's SIGKILL, ctr task delete: {}",
            describe(&out)
        );
        let out = c.ctr(&["container", "delete", id]);
        check!(out.status.success(), "container delete: {}", describe(&out));
        Ok(())
    })();
    settle(c, &before_mounts, &[id], result)
}

/// containerd restarts under a running container: it reconnects to the shim, which goes on
/// serving the task.
fn case_containerd_restart(c: &Containerd) -> CaseResult {
    let id = "rs";
    let before_mounts = mounts();
    c.run_detached(id)?;
    let result = (|| {
        let shims = shim_pids_of(id);
        check!(shims.len() == 1, "shim processes of {id}: {shims:?}");
        c.restart()?;
        check!(
            shim_pids_of(id) == shims,
            "the shim did not survive containerd's restart: {:?} then {:?}",
            shims,
            shim_pids_of(id)
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut ls = c.ctr(&["task", "ls"]);
        while !String::from_utf8_lossy(&ls.stdout)
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains("RUNNING"))
        {
            check!(
                Instant::now() < deadline,
                "task {id} not RUNNING after the restart: {}",
                describe(&ls)
            );
            std::thread::sleep(Duration::from_millis(500));
            ls = c.ctr(&["task", "ls"]);
        }
        let out = c.ctr(&[
            "task",
            "exec",
            "--exec-id",
            "after-restart",
            id,
            "sh",
            "-c",
            "echo still-here; exit 5",
        ]);
        check!(
            out.status.code() == Some(5) && out.stdout == b"still-here\n",
            "exec after the restart: {}",
            describe(&out)
        );
        let out = c.ctr(&["task", "kill", "-s", "SIGKILL", id]);
        check!(
            out.status.success(),
            "kill after the restart: {}",
            describe(&out)
        );
        // The kill is asynchronous: delete succeeds once the init's exit is recorded.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut out = c.ctr(&["task", "delete", id]);
        while !out.status.success() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            out = c.ctr(&["task", "delete", id]);
        }
        check!(
            out.status.success(),
            "task delete after the restart: {}",
            describe(&out)
        );
        let out = c.ctr(&["container", "delete", id]);
        check!(
            out.status.success(),
            "container delete after the restart: {}",
            describe(&out)
        );
        Ok(())
    })();
    settle(c, &before_mounts, &[id], result)
}

/// A Debian minbase root (scripts/mk-minbase) as an OCI image through containerd and the shim.
fn case_debian_minbase(c: &Containerd) -> CaseResult {
    // 200 MB of files: importing and converting them is slow under emulation.
    const LIMIT: Duration = Duration::from_secs(600);
    const IMAGE_NAME: &str = "squib/squib-debian-minbase:latest";
    let id = "deb";
    let minbase = |args: &[&str]| {
        let out = output_with_timeout(
            Command::new(vm_env::repo_root().join("scripts/mk-minbase")).args(args),
            LIMIT,
        )
        .unwrap();
        check!(
            out.status.success(),
            "mk-minbase {args:?}: {}",
            describe(&out)
        );
        Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    };
    let root = minbase(&[])?;
    let t = Instant::now();
    let tar = minbase(&["--oci"])?;
    eprintln!("debian_minbase: image tarball ready in {:?}", t.elapsed());
    // /etc/os-release is a relative link into usr/lib: it resolves inside the minbase.
    let want = std::fs::read(root.join("etc/os-release")).unwrap();
    let before_mounts = mounts();
    let result = (|| {
        let t = Instant::now();
        let out = output_with_timeout(
            &mut c.ctr_cmd(&["image", "import", tar.to_str().unwrap()]),
            LIMIT,
        )
        .unwrap();
        check!(out.status.success(), "import: {}", describe(&out));
        eprintln!("debian_minbase: image imported in {:?}", t.elapsed());
        let out = c.run_image(IMAGE_NAME, &[], id, &["cat", "/etc/os-release"], LIMIT);
        check!(
            out.status.code() == Some(0)
                && out.stdout == want
                && String::from_utf8_lossy(&out.stdout).contains("ID=debian"),
            "cat /etc/os-release: {}; want {:?}",
            describe(&out),
            String::from_utf8_lossy(&want)
        );
        Ok(())
    })();
    let result = settle(c, &before_mounts, &[id], result);
    let _ = c.ctr(&["image", "rm", IMAGE_NAME]);
    result
}

#[test]
fn test_shim_runs_containers_through_containerd() {
    vm_env::test_kernel().expect("SQUIB_TEST_KERNEL: run VM tests through tests/run-vm-tests");
    let cases: &[Case] = &[
        ("echo", case_echo),
        ("exit_codes", case_exit_codes),
        ("c01_exec_failures", case_c01_exec_failures),
        ("delete_leaves_nothing", case_delete_leaves_nothing),
        ("kill", case_kill),
        ("hung_guest_sigkill", case_hung_guest_sigkill),
        ("exec_stdin_metrics_pause", case_exec),
        ("large_output", case_large_output),
        ("terminal", case_terminal),
        ("run_stdin", case_run_stdin),
        ("parallel_10", case_parallel_10),
        ("shim_sigkill_cleanup", case_shim_sigkill_cleanup),
        ("containerd_restart", case_containerd_restart),
        ("debian_minbase", case_debian_minbase),
    ];
    run_cases(cases);
}
