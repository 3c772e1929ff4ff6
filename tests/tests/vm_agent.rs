//! VM test: the squib guest image (guest kernel + agent initramfs) boots, and the host-side
//! agent client runs containers in it from a busybox ext4 block device.
//!
//! One guest serves every case of a VMM, so a boot is paid once; each case reports on its own
//! and the test fails listing the cases that failed. The VMM today is QEMU's microvm with a
//! vhost-vsock device (kernel vsock on the host side, guest CID unique per run); a second
//! transport, the hybrid vsock Unix socket of squib-vmm, uses the same cases once squib-vmm
//! boots guests with virtio-blk and virtio-vsock.
//!
//! Inputs: SQUIB_TEST_KERNEL (the runner sets it), the agent initramfs from
//! SQUIB_AGENT_INITRAMFS or `${SQUIB_CACHE:-$HOME/.cache/squib}/guest/initramfs` (`make
//! guest-image`), busybox-static and mkfs.ext4 for the container's root.

#[cfg(test)]
mod tests {
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};
    use std::pin::Pin;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};
    use squib_runtime::agent_client::{AgentClient, AgentEndpoint, CreateContainer, StdioConfig};
    use squib_tests::vm_env;
    use tokio::io::AsyncWrite;

    /// sha256 of the first 100 MiB of `yes abcdefghijklmnopqrstuvwxyz0123456789`.
    const PATTERN_SHA256: &str = "82efcf8be22ee6f7c232d60552ad7ad3e38733fabe2821f513085bc663c1f523";
    /// Control calls inside the VM test host take 30-50 times longer than on hardware.
    const CALL_TIMEOUT: Duration = Duration::from_secs(180);
    /// Everything inside the nested guest is slow; this bounds one case.
    const CASE_TIMEOUT: Duration = Duration::from_secs(300);
    const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

    fn scratch_dir(name: &str) -> PathBuf {
        let base = vm_env::results_dir().unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("agent-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    struct Guest {
        child: Child,
        console: PathBuf,
        client: AgentClient,
        /// Removed when the guest is dropped (the hybrid vsock socket's directory).
        sock_dir: Option<PathBuf>,
    }

    impl Drop for Guest {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id().cast_signed()),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.child.wait();
            if let Some(d) = &self.sock_dir {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }

    fn console_tail(path: &Path) -> String {
        let log = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }

    #[cfg(target_arch = "x86_64")]
    async fn boot_qemu(dir: &Path, rootfs_image: &Path) -> Guest {
        let kernel = vm_env::test_kernel().unwrap();
        let initramfs = vm_env::agent_initramfs();
        assert!(
            initramfs.is_file(),
            "no agent initramfs at {}: run `make guest-image`",
            initramfs.display()
        );
        let console = dir.join("console.log");
        // vhost-vsock CIDs are global to the host; derive one from our pid.
        let cid = 3 + std::process::id() % 1_000_000;
        let child = Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,acpi=off",
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                "512",
                "-smp",
                "2",
            ])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args(["-append", "console=ttyS0 reboot=t panic=-1 squib.log=debug"])
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=disk0,readonly=on",
                rootfs_image.display()
            ))
            .args(["-device", "virtio-blk-device,drive=disk0"])
            .args(["-device", "virtio-rng-device"])
            .arg("-device")
            .arg(format!("vhost-vsock-device,guest-cid={cid}"))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let client = AgentClient::connect(AgentEndpoint::Vsock { cid }, BOOT_TIMEOUT)
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "agent not reachable: {e}; console:\n{}",
                    console_tail(&console)
                )
            });
        eprintln!("agent answered {:?} after QEMU started", started.elapsed());
        let client = client.with_timeouts(CALL_TIMEOUT, CALL_TIMEOUT);
        Guest {
            child,
            console,
            client,
            sock_dir: None,
        }
    }

    fn base_spec(args: &[&str]) -> Value {
        let caps = json!([
            "CAP_CHOWN",
            "CAP_DAC_OVERRIDE",
            "CAP_FSETID",
            "CAP_FOWNER",
            "CAP_MKNOD",
            "CAP_NET_RAW",
            "CAP_SETGID",
            "CAP_SETUID",
            "CAP_SETFCAP",
            "CAP_SETPCAP",
            "CAP_NET_BIND_SERVICE",
            "CAP_SYS_CHROOT",
            "CAP_KILL",
            "CAP_AUDIT_WRITE"
        ]);
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
                "cwd": "/",
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs", "readonly": false},
            "hostname": "squib-test",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
                {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                 "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]},
                {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
                 "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                               {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                "readonlyPaths": ["/proc/bus", "/proc/sys"]
            }
        })
    }

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl Sink {
        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().clone()
        }
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.bytes()).into_owned()
        }
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn io(stdin: Option<Vec<u8>>, out: &Sink, err: &Sink, terminal: bool) -> StdioConfig {
        StdioConfig {
            stdin: stdin.map(|b| {
                Box::new(std::io::Cursor::new(b)) as Box<dyn tokio::io::AsyncRead + Send + Unpin>
            }),
            stdout: Some(Box::new(out.clone())),
            stderr: (!terminal)
                .then(|| Box::new(err.clone()) as Box<dyn AsyncWrite + Send + Unpin>),
            terminal,
        }
    }

    fn req(id: &str, spec: &Value) -> CreateContainer {
        CreateContainer {
            container_id: id.to_owned(),
            oci_spec_json: serde_json::to_vec(spec).unwrap(),
            rootfs_source: "/dev/vda".to_owned(),
            rootfs_fstype: "ext4".to_owned(),
        }
    }

    type CaseResult = Result<(), String>;

    macro_rules! check {
        ($cond:expr, $($fmt:tt)*) => {
            if !$cond {
                return Err(format!($($fmt)*));
            }
        };
    }

    struct Ran {
        status: i32,
        out: Sink,
        err: Sink,
    }

    async fn run(
        c: &AgentClient,
        id: &str,
        spec: &Value,
        stdin: Option<Vec<u8>>,
    ) -> Result<Ran, String> {
        let (out, err) = (Sink::default(), Sink::default());
        let (_, mut pio) = c
            .create_container(&req(id, spec), io(stdin, &out, &err, false))
            .await
            .map_err(|e| format!("create {id}: {e}"))?;
        c.start_container(id)
            .await
            .map_err(|e| format!("start {id}: {e}"))?;
        let status = pio.wait(c).await.map_err(|e| format!("wait {id}: {e}"))?;
        c.remove_container(id)
            .await
            .map_err(|e| format!("remove {id}: {e}"))?;
        Ok(Ran { status, out, err })
    }

    async fn case_echo(c: &AgentClient) -> CaseResult {
        let r = run(c, "echo", &base_spec(&["echo", "hello"]), None).await?;
        check!(
            r.status == 0 && r.out.text() == "hello\n" && r.err.text().is_empty(),
            "status {} out {:?} err {:?}",
            r.status,
            r.out.text(),
            r.err.text()
        );
        Ok(())
    }

    async fn case_exit_42(c: &AgentClient) -> CaseResult {
        let r = run(c, "exit42", &base_spec(&["sh", "-c", "exit 42"]), None).await?;
        check!(r.status == 42, "status {}", r.status);
        Ok(())
    }

    async fn case_stderr_separate(c: &AgentClient) -> CaseResult {
        let r = run(
            c,
            "split",
            &base_spec(&["sh", "-c", "echo to-out; echo to-err >&2"]),
            None,
        )
        .await?;
        check!(
            r.out.text() == "to-out\n" && r.err.text() == "to-err\n",
            "out {:?} err {:?}",
            r.out.text(),
            r.err.text()
        );
        Ok(())
    }

    async fn case_100mib_stdout(c: &AgentClient) -> CaseResult {
        const LEN: usize = 100 * 1024 * 1024;
        let line = b"abcdefghijklmnopqrstuvwxyz0123456789\n";
        let started = Instant::now();
        let r = run(
            c,
            "big",
            &base_spec(&[
                "sh",
                "-c",
                &format!(
                    "y() {{ yes abcdefghijklmnopqrstuvwxyz0123456789 | head -c {LEN}; }}; y; y | sha256sum >&2"
                ),
            ]),
            None,
        )
        .await?;
        eprintln!("100 MiB of stdout took {:?}", started.elapsed());
        check!(r.status == 0, "status {}", r.status);
        // The stream is checked byte for byte against the pattern (a memcmp: cheap even in an
        // unoptimised test binary inside the VM test host, where hashing 100 MiB is not), and
        // the guest's own sha256 of the same generator output must be the pattern's.
        let out = r.out.bytes();
        check!(out.len() == LEN, "got {} bytes of stdout", out.len());
        let mut expected = line.repeat(LEN / line.len() + 1);
        expected.truncate(LEN);
        check!(out == expected, "stdout differs from the pattern");
        let guest_sum = r.err.text();
        check!(
            guest_sum.starts_with(PATTERN_SHA256),
            "guest sha256 {guest_sum:?}"
        );
        Ok(())
    }

    async fn case_stdin_eof(c: &AgentClient) -> CaseResult {
        let r = run(c, "cat", &base_spec(&["cat"]), Some(b"hello\n".to_vec())).await?;
        check!(
            r.status == 0 && r.out.text() == "hello\n",
            "status {} out {:?}",
            r.status,
            r.out.text()
        );
        let r = run(
            c,
            "wc",
            &base_spec(&["sh", "-c", "wc -l; echo after-eof"]),
            Some(b"a\nb\nc\n".to_vec()),
        )
        .await?;
        let words: Vec<String> = r.out.text().split_whitespace().map(str::to_owned).collect();
        check!(words == ["3", "after-eof"], "out {:?}", r.out.text());
        Ok(())
    }

    async fn case_terminal_resize(c: &AgentClient) -> CaseResult {
        let (out, err) = (Sink::default(), Sink::default());
        let mut spec = base_spec(&[
            "sh",
            "-c",
            "tty; stty size; echo waiting; sleep 3; stty size; exit 5",
        ]);
        spec["process"]["terminal"] = json!(true);
        spec["process"]["consoleSize"] = json!({"height": 40, "width": 120});
        let (_, mut pio) = c
            .create_container(&req("tty", &spec), io(Some(Vec::new()), &out, &err, true))
            .await
            .map_err(|e| e.to_string())?;
        c.start_container("tty").await.map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !out.text().contains("waiting") {
            check!(
                Instant::now() < deadline,
                "no 'waiting' line: {:?}",
                out.text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.resize_pty("tty", "", 50, 200)
            .await
            .map_err(|e| e.to_string())?;
        let status = pio.wait(c).await.map_err(|e| e.to_string())?;
        c.remove_container("tty").await.map_err(|e| e.to_string())?;
        check!(
            status == 5 && out.text() == "/dev/pts/0\r\n40 120\r\nwaiting\r\n50 200\r\n",
            "status {status} out {:?}",
            out.text()
        );
        Ok(())
    }

    async fn case_spec_fields(c: &AgentClient) -> CaseResult {
        let mut spec = base_spec(&["sh", "-c", "echo \"$A\"; pwd; id; hostname; ulimit -n"]);
        spec["process"]["env"] = json!(["PATH=/bin", "A=b=c"]);
        spec["process"]["cwd"] = json!("/does/not/exist");
        spec["process"]["user"] = json!({"uid": 1000, "gid": 1000});
        spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 2048}]);
        let r = run(c, "spec", &spec, None).await?;
        // No additionalGids: no supplementary groups at all (runc does the same), so busybox
        // prints no groups= part.
        let want = "b=c\n/does/not/exist\nuid=1000(user) gid=1000(user)\nsquib-test\n2048\n";
        check!(
            r.status == 0 && r.out.text() == want,
            "status {} out {:?} err {:?}",
            r.status,
            r.out.text(),
            r.err.text()
        );
        Ok(())
    }

    async fn case_exec(c: &AgentClient) -> CaseResult {
        let (out, err) = (Sink::default(), Sink::default());
        let (_, mut init) = c
            .create_container(
                &req("sleeper", &base_spec(&["sleep", "600"])),
                io(None, &out, &err, false),
            )
            .await
            .map_err(|e| e.to_string())?;
        c.start_container("sleeper")
            .await
            .map_err(|e| e.to_string())?;
        let proc_json = |args: &[&str]| {
            serde_json::to_vec(
                &json!({"args": args, "env": ["PATH=/bin"], "cwd": "/", "user": {"uid": 0, "gid": 0}}),
            )
            .unwrap()
        };
        let (eo, ee) = (Sink::default(), Sink::default());
        let (_, mut e1) = c
            .exec_process(
                "sleeper",
                "e1",
                &proc_json(&["sh", "-c", "cat /proc/1/cmdline; exit 3"]),
                io(None, &eo, &ee, false),
            )
            .await
            .map_err(|e| e.to_string())?;
        let s1 = e1.wait(c).await.map_err(|e| e.to_string())?;
        let (_, mut e2) = c
            .exec_process(
                "sleeper",
                "k9",
                &proc_json(&["sh", "-c", "kill -9 $$"]),
                io(None, &eo, &ee, false),
            )
            .await
            .map_err(|e| e.to_string())?;
        let s2 = e2.wait(c).await.map_err(|e| e.to_string())?;
        let stats = c
            .stats("sleeper")
            .await
            .map_err(|e| format!("stats: {e}"))?;
        c.pause_container("sleeper")
            .await
            .map_err(|e| format!("pause: {e}"))?;
        c.resume_container("sleeper")
            .await
            .map_err(|e| format!("resume: {e}"))?;
        c.signal_process("sleeper", "", 9, false)
            .await
            .map_err(|e| e.to_string())?;
        let s0 = init.wait(c).await.map_err(|e| e.to_string())?;
        c.remove_container("sleeper")
            .await
            .map_err(|e| e.to_string())?;
        check!(
            s1 == 3 && eo.text() == "sleep\x00600\0",
            "exec status {s1} out {:?}",
            eo.text()
        );
        check!(s2 == 137, "kill -9 $$ in an exec gave {s2}");
        check!(s0 == 137, "SIGKILL of init gave {s0}");
        check!(
            stats.memory_usage_bytes > 0 && stats.pids_current >= 1,
            "stats {stats:?}"
        );
        Ok(())
    }

    async fn case_sigterm_trap(c: &AgentClient) -> CaseResult {
        let (out, err) = (Sink::default(), Sink::default());
        let spec = base_spec(&[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 1; done",
        ]);
        let (_, mut pio) = c
            .create_container(&req("trap", &spec), io(None, &out, &err, false))
            .await
            .map_err(|e| e.to_string())?;
        c.start_container("trap").await.map_err(|e| e.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !out.text().contains("ready") {
            check!(Instant::now() < deadline, "no 'ready' line");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.signal_process("trap", "", 15, false)
            .await
            .map_err(|e| e.to_string())?;
        let status = pio.wait(c).await.map_err(|e| e.to_string())?;
        c.remove_container("trap")
            .await
            .map_err(|e| e.to_string())?;
        check!(
            status == 7 && out.text() == "ready\ngot TERM\n",
            "status {status} out {:?}",
            out.text()
        );
        Ok(())
    }

    async fn case_zombies(c: &AgentClient) -> CaseResult {
        // No PID namespace: the orphans re-parent to the agent (the guest's PID 1).
        let mut spec = base_spec(&[
            "sh",
            "-c",
            "(for i in $(seq 50); do sleep 1 & done); sleep 4; n=0; for s in /proc/[0-9]*/stat; do case \"$(cut -d' ' -f3 $s 2>/dev/null)\" in Z) n=$((n+1));; esac; done; echo zombies=$n",
        ]);
        spec["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]);
        let r = run(c, "zombies", &spec, None).await?;
        check!(
            r.status == 0 && r.out.text() == "zombies=0\n",
            "status {} out {:?} err {:?}",
            r.status,
            r.out.text(),
            r.err.text()
        );
        Ok(())
    }

    async fn case_missing_binary(c: &AgentClient) -> CaseResult {
        let err = match c
            .create_container(
                &req("nx", &base_spec(&["nonexistent"])),
                StdioConfig::default(),
            )
            .await
        {
            Ok(_) => return Err("create of a missing binary succeeded".into()),
            Err(e) => e,
        };
        check!(
            err.start_exit_status() == Some(127),
            "status {:?}: {err}",
            err.start_exit_status()
        );
        check!(
            err.to_string() == r#"exec: "nonexistent": executable file not found in $PATH"#,
            "message {err}"
        );
        Ok(())
    }

    /// What [`run_cases`] found: the report, the names of failed cases, and whether any of
    /// them failed by running out of time.
    struct CaseRun {
        report: String,
        failed: Vec<&'static str>,
        timed_out: bool,
    }

    /// Runs every case against one guest (stdout_100mib only `with_100mib`).
    async fn run_cases(c: &AgentClient, with_100mib: bool) -> CaseRun {
        let mut report = String::new();
        let mut failed = Vec::new();
        let mut timed_out = false;
        macro_rules! case {
            ($name:literal, $f:expr) => {{ case!($name, $f, CASE_TIMEOUT) }};
            ($name:literal, $f:expr, $limit:expr) => {{
                let started = Instant::now();
                let r = match tokio::time::timeout($limit, $f).await {
                    Ok(r) => r,
                    Err(_) => {
                        timed_out = true;
                        Err(format!("timed out after {:?}", $limit))
                    }
                };
                let verdict = match &r {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => format!("FAILED: {e}"),
                };
                let line = format!("{:<20} {:>10.1?} {verdict}", $name, started.elapsed());
                // Printed at once too: a run killed by the runner's timeout still shows how
                // far it got.
                eprintln!("agent case {line}");
                let _ = writeln!(report, "{line}");
                if r.is_err() {
                    failed.push($name);
                }
            }};
        }
        case!("echo", case_echo(c));
        case!("exit_42", case_exit_42(c));
        case!("stderr_separate", case_stderr_separate(c));
        case!("stdin_eof", case_stdin_eof(c));
        case!("terminal_resize", case_terminal_resize(c));
        case!("spec_fields", case_spec_fields(c));
        case!("exec_stats_pause", case_exec(c));
        case!("sigterm_trap", case_sigterm_trap(c));
        case!("zombies_reaped", case_zombies(c));
        case!("missing_binary", case_missing_binary(c));
        if with_100mib {
            // Two runs of the generator in the guest plus 100 MiB through vsock: about 50 s
            // through QEMU's vhost-vsock in the VM test host. Six times that means the guest
            // hung (below).
            case!(
                "stdout_100mib",
                case_100mib_stdout(c),
                Duration::from_secs(300)
            );
        } else {
            let _ = writeln!(report, "{:<20} {:>10} left out", "stdout_100mib", "-");
        }
        CaseRun {
            report,
            failed,
            timed_out,
        }
    }

    /// The container's root: the ext4 image named by SQUIB_TEST_ROOTFS_IMAGE when set (the
    /// arm64 runner makes it on the x86_64 host, since nothing but static aarch64 programs runs
    /// in the arm64 VM test host; guests only read it), else a fresh one from mktest-rootfs.
    fn rootfs_image(dir: &Path) -> PathBuf {
        if let Some(image) = std::env::var_os("SQUIB_TEST_ROOTFS_IMAGE") {
            return PathBuf::from(image);
        }
        let image = dir.join("rootfs.ext4");
        let st = Command::new(vm_env::repo_root().join("guest-image/mktest-rootfs"))
            .arg(dir.join("rootfs"))
            .arg(&image)
            .status()
            .unwrap();
        assert!(st.success(), "mktest-rootfs failed");
        image
    }

    /// Whether the VMM of `guest` ended by itself because its guest crashed at the CPU level
    /// (waiting a few seconds for it to exit): squib-vmm exits with status 3 on a guest triple
    /// fault; QEMU (`-no-reboot`) exits on a triple fault or reset, which without a panic on
    /// the console is the same crash. Says how, for the log.
    async fn guest_crashed(vmm: &str, guest: &mut Guest) -> Option<String> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let status = loop {
            match guest.child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => return None,
            }
        };
        let console = std::fs::read_to_string(&guest.console).unwrap_or_default();
        let crashed = if vmm == "squib-vmm" {
            status.code() == Some(3)
        } else {
            !console.contains("Kernel panic")
        };
        crashed.then(|| format!("{vmm} exited by itself ({status}) with no panic on the console"))
    }

    /// Whether the VMM of `guest` still runs but its agent no longer answers a ping (within
    /// 30 s). A VMM that has exited is not this case: an agent that died as PID 1 panics the
    /// guest, and the VMM ends with the guest.
    async fn agent_gone(guest: &mut Guest) -> bool {
        if !matches!(guest.child.try_wait(), Ok(None)) {
            return false;
        }
        !matches!(
            tokio::time::timeout(Duration::from_secs(30), guest.client.ping()).await,
            Ok(Ok(_))
        )
    }

    /// Runs the cases against `guest`, shuts it down and reports. A guest that crashed at the
    /// CPU level ([`guest_crashed`]) or stopped answering (a case ran out of time, or
    /// [`agent_gone`]) is reported as `Err` with the reason, so that the caller can boot a
    /// fresh one; any other failure panics.
    async fn finish(
        vmm: &str,
        mut guest: Guest,
        dir: &Path,
        with_100mib: bool,
    ) -> Result<(), String> {
        let CaseRun {
            mut report,
            mut failed,
            timed_out,
        } = run_cases(&guest.client, with_100mib).await;
        let broken = if failed.is_empty() {
            None
        } else if let Some(how) = guest_crashed(vmm, &mut guest).await {
            Some(how)
        } else if timed_out {
            // The test host's other fault: a vCPU that loops on a page-table walk forever
            // (README, "Known faults of the VM test host"). The guest answers nothing more, so
            // Shutdown would only wait out its own timeout too.
            Some(format!("a case ran out of time while {vmm} still ran"))
        } else if agent_gone(&mut guest).await {
            // The same fault without a case that waited: the guest's kernel stopped, so its
            // vsock refuses or drops connections at once, while the VMM runs on.
            Some(format!("the agent stopped answering while {vmm} still ran"))
        } else {
            None
        };
        if let Some(how) = broken {
            let console = guest.console.clone();
            drop(guest);
            if let Some(results) = vm_env::results_dir() {
                let _ = std::fs::copy(
                    &console,
                    results.join(format!("agent-{vmm}-crashed-console.log")),
                );
            }
            return Err(format!("{how}; cases so far:\n{report}"));
        }
        // Last: Shutdown ends the VM (the VMM process exits on the guest's reset).
        let started = Instant::now();
        let verdict = match guest.client.shutdown().await {
            Err(e) => Err(format!("shutdown call: {e}")),
            Ok(()) => loop {
                match guest.child.try_wait() {
                    Ok(Some(_)) => break Ok(()),
                    Ok(None) if started.elapsed() < Duration::from_secs(120) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Ok(None) => break Err("the VMM still runs 120 s after Shutdown".to_owned()),
                    Err(e) => break Err(format!("wait for the VMM: {e}")),
                }
            },
        };
        let _ = writeln!(
            report,
            "{:<20} {:>10.1?} {}",
            "shutdown",
            started.elapsed(),
            match &verdict {
                Ok(()) => "ok".to_owned(),
                Err(e) => format!("FAILED: {e}"),
            }
        );
        if verdict.is_err() {
            failed.push("shutdown");
        }
        eprintln!("agent VM cases ({vmm}):\n{report}");
        let console = guest.console.clone();
        drop(guest);
        if let Some(results) = vm_env::results_dir() {
            let _ = std::fs::write(results.join(format!("agent-{vmm}-report.txt")), &report);
            let _ = std::fs::copy(&console, results.join(format!("agent-{vmm}-console.log")));
        }
        assert!(
            failed.is_empty(),
            "failed cases {failed:?}:\n{report}\nconsole tail:\n{}",
            console_tail(&console)
        );
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    /// How many times [`run_guest`] boots a guest whose predecessor crashed or hung.
    const GUEST_BOOTS: usize = 2;

    /// Boots a guest with `boot` and runs [`finish`] on it; a guest that crashed at the CPU
    /// level or hung is replaced by a fresh boot, up to [`GUEST_BOOTS`] boots in all.
    ///
    /// Test-host fault, not the VMM's: in the VM test host, TCG's nested SVM now and then
    /// corrupts a guest's memory, and the guest triple-faults or a vCPU never comes back. The
    /// 100 MiB case (left out unless asked for, see [`with_100mib`]) triggers it far more
    /// often than anything else here, in QEMU's guest and squib-vmm's alike; it is reproduced
    /// with plain busybox guests too (README, "Known faults of the VM test host").
    async fn run_guest<F, Fut>(vmm: &str, dir: &Path, with_100mib: bool, boot: F)
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Guest>,
    {
        let mut crashes = Vec::new();
        while crashes.len() < GUEST_BOOTS {
            match finish(vmm, boot().await, dir, with_100mib).await {
                Ok(()) => return,
                Err(crash) => {
                    eprintln!(
                        "agent VM ({vmm}): the guest crashed or hung (test-host fault?): {crash}"
                    );
                    crashes.push(crash);
                }
            }
        }
        panic!(
            "the {vmm} guest crashed or hung in each of {GUEST_BOOTS} boots:\n{}",
            crashes.join("\n")
        );
    }

    /// Whether the guests run the stdout_100mib case: only when SQUIB_AGENT_100MIB is set and
    /// not empty. tests/run-arm64-vm-tests sets it: the arm64 VM test host has not shown the
    /// faults below.
    ///
    /// In the x86_64 VM test host this case brings on the host's faults far more than anything else
    /// in the suite. QEMU's 2-vCPU guest failed it in 4 runs of 4 (two hung, two took L1's
    /// kernel down with it), and in 4 boots of 8 with the guest's xAPIC instead of x2APIC
    /// (crashed at once, or hung); squib-vmm's 2-vCPU guest had one vCPU stop for good in it
    /// (both L1 boots of a CI run) or triple-faulted at its start. A hung guest holds the case
    /// for its whole timeout. The behaviour stays covered on every run: the arm64 VM test host
    /// runs this case, and vm_shim's large_output streams from a container through the shim,
    /// this client and the agent (a 1-vCPU squib-vmm guest; 16 MiB in the x86_64 VM test host,
    /// whose faults the 100 MiB stream set off in 3 runs of 8 even there) and compares it byte
    /// for byte.
    fn with_100mib() -> bool {
        std::env::var_os("SQUIB_AGENT_100MIB").is_some_and(|v| !v.is_empty())
    }

    /// QEMU's microvm machine is x86 only; on aarch64 the squib-vmm guest below is the test.
    #[cfg(target_arch = "x86_64")]
    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_runs_containers_in_a_qemu_microvm_guest() {
        let dir = scratch_dir("qemu");
        let image = rootfs_image(&dir);
        run_guest("qemu-microvm", &dir, with_100mib(), || {
            boot_qemu(&dir, &image)
        })
        .await;
    }

    #[cfg(target_arch = "x86_64")]
    const SQUIB_VMM_BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=-1 squib.log=debug";
    #[cfg(target_arch = "aarch64")]
    const SQUIB_VMM_BOOT_ARGS: &str = "console=ttyAMA0 panic=-1 squib.log=debug";

    /// squib-vmm from SQUIB_VMM_BIN (the runner sets it) with the rootfs as a read-only drive
    /// and a hybrid vsock device; the client goes through `CONNECT <port>`.
    async fn boot_squib_vmm(dir: &Path, rootfs_image: &Path) -> Guest {
        let vmm = std::env::var_os("SQUIB_VMM_BIN")
            .map(PathBuf::from)
            .expect("SQUIB_VMM_BIN is not set");
        let kernel = vm_env::test_kernel().unwrap();
        let initramfs = vm_env::agent_initramfs();
        assert!(
            initramfs.is_file(),
            "no agent initramfs at {}: run `make guest-image`",
            initramfs.display()
        );
        // Unix socket paths are short and cannot live on the results share.
        let sock_dir = std::env::temp_dir().join(format!("squib-agent-vmm-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&sock_dir);
        std::fs::create_dir_all(&sock_dir).unwrap();
        let uds = sock_dir.join("v.sock");
        let console = dir.join("console.log");
        let config = dir.join("vm.json");
        let cfg = json!({
            "boot-source": {
                "kernel_image_path": kernel,
                "initrd_path": initramfs,
                "boot_args": SQUIB_VMM_BOOT_ARGS
            },
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 512},
            "drives": [{"drive_id": "rootfs", "path_on_host": rootfs_image, "is_root_device": false, "is_read_only": true}],
            "vsock": {"guest_cid": 3, "uds_path": uds},
            "entropy": {}
        });
        std::fs::write(&config, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
        let child = Command::new(&vmm)
            .arg("--no-api")
            .arg("--config-file")
            .arg(&config)
            .arg("--serial-out")
            .arg(&console)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let client =
            AgentClient::connect(AgentEndpoint::HybridVsock { uds_path: uds }, BOOT_TIMEOUT)
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "agent not reachable: {e}; console:\n{}",
                        console_tail(&console)
                    )
                });
        eprintln!(
            "agent answered {:?} after squib-vmm started",
            started.elapsed()
        );
        let client = client.with_timeouts(CALL_TIMEOUT, CALL_TIMEOUT);
        let guest = Guest {
            child,
            console,
            client,
            sock_dir: Some(sock_dir),
        };
        // Both vCPUs came up (on aarch64 the second one through PSCI CPU_ON): a guest left with
        // one would pass every case.
        let log = std::fs::read_to_string(&guest.console).unwrap_or_default();
        assert!(
            log.contains("smp: Brought up 1 node, 2 CPUs"),
            "the guest did not bring up both vCPUs; console:\n{}",
            console_tail(&guest.console)
        );
        guest
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_runs_containers_in_a_squib_vmm_guest() {
        let dir = scratch_dir("squib-vmm");
        let image = rootfs_image(&dir);
        run_guest("squib-vmm", &dir, with_100mib(), || {
            boot_squib_vmm(&dir, &image)
        })
        .await;
    }
}
