//! The agent for real on the host: `squib-agent serve` runs as root inside a fresh mount and
//! PID namespace (so it is PID 1 there, like in the guest, and every mount it makes vanishes
//! with it), containers get a busybox root (guest-image/mktest-rootfs) bound in as the lower
//! layer, and the host-side client from squib-runtime drives it over Unix sockets.
//!
//! Needs root, util-linux `unshare` and busybox-static; reports itself skipped otherwise.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::pin::Pin;
    use std::process::{Child, Command, Stdio};
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use std::time::Duration;

    use serde_json::{Value, json};
    use sha2::Digest;
    use squib_runtime::agent_client::{
        AgentClient, AgentClientError, AgentEndpoint, CreateContainer, StdioConfig,
    };
    use tokio::io::AsyncWrite;

    fn skip_reason() -> Option<&'static str> {
        if !nix::unistd::Uid::effective().is_root() {
            return Some("needs root");
        }
        if Command::new("unshare").arg("--version").output().is_err() {
            return Some("needs unshare");
        }
        None
    }

    macro_rules! require_host {
        () => {
            if let Some(why) = skip_reason() {
                eprintln!("skipped: {why}");
                return;
            }
        };
    }

    struct HostAgent {
        child: Child,
        dir: PathBuf,
        client: AgentClient,
    }

    impl Drop for HostAgent {
        fn drop(&mut self) {
            // unshare --kill-child takes the agent (PID 1 of its namespace) and with it every
            // container process and mount down.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id().cast_signed()),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = self.child.wait();
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn repo_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    async fn start_agent(tag: &str) -> HostAgent {
        let dir =
            std::env::temp_dir().join(format!("squib-agent-host-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let rootfs = dir.join("rootfs");
        let st = Command::new(repo_root().join("guest-image/mktest-rootfs"))
            .arg(&rootfs)
            .status()
            .unwrap();
        assert!(st.success(), "mktest-rootfs failed");
        let control = dir.join("control.sock");
        let streams = dir.join("streams.sock");
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--pid",
                "--kill-child",
                "--propagation",
                "private",
                "--mount-proc",
                "--",
            ])
            .arg(env!("CARGO_BIN_EXE_squib-agent"))
            .arg("serve")
            .arg("--control")
            .arg(format!("unix:{}", control.display()))
            .arg("--streams")
            .arg(format!("unix:{}", streams.display()))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--log", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let client = AgentClient::connect(
            AgentEndpoint::Unix { control, streams },
            Duration::from_secs(20),
        )
        .await
        .unwrap();
        HostAgent { child, dir, client }
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
                {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
                 "options": ["nosuid", "noexec", "nodev"]},
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                               {"type": "uts"}, {"type": "mount"}],
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/sys/firmware"],
                "readonlyPaths": ["/proc/bus", "/proc/sys"]
            }
        })
    }

    /// An in-memory sink for a stream.
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

    struct Ran {
        status: i32,
        out: Sink,
        err: Sink,
    }

    fn io_for(stdin: Option<Vec<u8>>, out: &Sink, err: &Sink, terminal: bool) -> StdioConfig {
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

    fn create_req(agent: &HostAgent, id: &str, spec: &Value) -> CreateContainer {
        CreateContainer {
            container_id: id.to_owned(),
            oci_spec_json: serde_json::to_vec(spec).unwrap(),
            rootfs_source: agent.dir.join("rootfs").display().to_string(),
            rootfs_fstype: "bind".to_owned(),
        }
    }

    async fn run(agent: &HostAgent, id: &str, spec: &Value, stdin: Option<Vec<u8>>) -> Ran {
        let (out, err) = (Sink::default(), Sink::default());
        let (_, mut io) = agent
            .client
            .create_container(
                &create_req(agent, id, spec),
                io_for(stdin, &out, &err, false),
            )
            .await
            .unwrap();
        agent.client.start_container(id).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), io.wait(&agent.client))
            .await
            .expect("container did not finish in 60 s")
            .unwrap();
        agent.client.remove_container(id).await.unwrap();
        Ran { status, out, err }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_runs_echo_with_exit_status_and_separate_streams() {
        require_host!();
        let a = start_agent("echo").await;
        let r = run(&a, "echo", &base_spec(&["echo", "hello"]), None).await;
        assert_eq!(
            (r.status, r.out.text(), r.err.text()),
            (0, "hello\n".into(), String::new())
        );
        let r = run(&a, "exit42", &base_spec(&["sh", "-c", "exit 42"]), None).await;
        assert_eq!(r.status, 42);
        let r = run(
            &a,
            "split",
            &base_spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
            None,
        )
        .await;
        assert_eq!(
            (r.status, r.out.text(), r.err.text()),
            (3, "out\n".into(), "err\n".into())
        );
        // c13: argv byte for byte.
        let r = run(
            &a,
            "argv",
            &base_spec(&["sh", "-c", "echo \"$#:$1:$2:$3\"", "argv0", "", "x y"]),
            None,
        )
        .await;
        assert_eq!(r.out.text(), "2::x y:\n");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_delivers_large_output_completely_before_the_exit_status() {
        require_host!();
        let a = start_agent("large").await;
        let r = run(
            &a,
            "big",
            &base_spec(&[
                "sh",
                "-c",
                "head -c 33554432 /dev/urandom | tee /tmp/x; sha256sum /tmp/x >&2",
            ]),
            None,
        )
        .await;
        assert_eq!(r.status, 0);
        let out = r.out.bytes();
        assert_eq!(out.len(), 33_554_432);
        let digest = format!("{:x}", sha2::Sha256::digest(&out));
        assert!(
            r.err.text().starts_with(&digest),
            "stderr {:?} vs {digest}",
            r.err.text()
        );
        // c04: stdout and stderr both complete, nothing interleaved into the wrong stream.
        let r = run(
            &a,
            "seq",
            &base_spec(&["sh", "-c", "seq 1 200000; seq 1 200000 >&2"]),
            None,
        )
        .await;
        let expect: String = (1..=200_000).map(|i| format!("{i}\n")).collect();
        assert_eq!(r.out.text().len(), 1_288_895);
        assert!(r.out.text() == expect && r.err.text() == expect);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_stdin_reaches_eof() {
        require_host!();
        let a = start_agent("stdin").await;
        let r = run(&a, "cat", &base_spec(&["cat"]), Some(b"hello\n".to_vec())).await;
        assert_eq!((r.status, r.out.text()), (0, "hello\n".into()));
        let r = run(
            &a,
            "wc",
            &base_spec(&["sh", "-c", "wc -l; echo after-eof"]),
            Some(b"a\nb\nc\n".to_vec()),
        )
        .await;
        assert_eq!(
            r.out.text().split_whitespace().collect::<Vec<_>>(),
            ["3", "after-eof"]
        );
        let r = run(
            &a,
            "mib",
            &base_spec(&["wc", "-c"]),
            Some(vec![0u8; 1 << 20]),
        )
        .await;
        assert_eq!(r.out.text().trim(), "1048576");
        // Empty stdin: cat ends at once.
        let r = run(&a, "empty", &base_spec(&["cat"]), Some(Vec::new())).await;
        assert_eq!((r.status, r.out.text()), (0, String::new()));
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_applies_env_cwd_user_hostname_and_rlimits() {
        require_host!();
        let a = start_agent("spec").await;
        let mut spec = base_spec(&[
            "sh",
            "-c",
            "echo \"$A\"; pwd; id -u; id -g; id -G; hostname; ulimit -n; ulimit -Hn; ls -ld /does/not/exist | cut -c1-10; umask",
        ]);
        spec["process"]["env"] = json!(["PATH=/bin", "A=b=c=d"]);
        spec["process"]["cwd"] = json!("/does/not/exist");
        spec["process"]["user"] =
            json!({"uid": 1000, "gid": 1000, "additionalGids": [4242, 266], "umask": 63});
        spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 4096, "soft": 1024}]);
        let r = run(&a, "spec", &spec, None).await;
        assert_eq!(r.err.text(), "");
        assert_eq!(
            r.out.text(),
            "b=c=d\n/does/not/exist\n1000\n1000\n1000 266 4242\nsquib-test\n1024\n4096\ndrwxr-xr-x\n0077\n"
        );
        // c14: a relative cwd is refused before anything runs.
        let mut spec = base_spec(&["pwd"]);
        spec["process"]["cwd"] = json!("tmp");
        let err = a
            .client
            .create_container(&create_req(&a, "relcwd", &spec), StdioConfig::default())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("Cwd must be an absolute path"),
            "{err}"
        );
        // c16: soft above hard is refused.
        let mut spec = base_spec(&["true"]);
        spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 4096}]);
        assert!(
            a.client
                .create_container(&create_req(&a, "rl", &spec), StdioConfig::default())
                .await
                .is_err()
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_raises_only_ambient_capabilities_the_kernel_accepts() {
        require_host!();
        let a = start_agent("ambient").await;
        // Like runc's default spec: an ambient capability (CAP_AUDIT_WRITE) that is not
        // inheritable must not stop the process; the inheritable one (CAP_NET_BIND_SERVICE,
        // bit 10) must survive the switch to a non-root user.
        let mut spec = base_spec(&["sh", "-c", "grep CapAmb /proc/self/status"]);
        spec["process"]["user"] = json!({"uid": 1000, "gid": 1000});
        let caps = json!(["CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE", "CAP_KILL"]);
        spec["process"]["capabilities"] = json!({
            "bounding": caps, "effective": caps, "permitted": caps,
            "inheritable": ["CAP_NET_BIND_SERVICE"],
            "ambient": ["CAP_NET_BIND_SERVICE", "CAP_AUDIT_WRITE"]
        });
        let r = run(&a, "amb", &spec, None).await;
        assert_eq!(r.err.text(), "");
        assert_eq!(r.out.text(), "CapAmb:\t0000000000000400\n");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_reports_missing_and_unexecutable_programs_at_create() {
        require_host!();
        let a = start_agent("missing").await;
        let err = a
            .client
            .create_container(
                &create_req(&a, "nx", &base_spec(&["nonexistent"])),
                StdioConfig::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.start_exit_status(), Some(127), "{err}");
        assert_eq!(
            err.to_string(),
            r#"exec: "nonexistent": executable file not found in $PATH"#
        );
        let err = a
            .client
            .create_container(
                &create_req(&a, "nx", &base_spec(&["/etc"])),
                StdioConfig::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.start_exit_status(), Some(126), "{err}");
        assert!(err.to_string().contains("/etc"));
        // Nothing was left behind: the id is free again.
        let r = run(&a, "nx", &base_spec(&["true"]), None).await;
        assert_eq!(r.status, 0);
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_exec_runs_in_the_container_with_its_own_status() {
        require_host!();
        let a = start_agent("exec").await;
        let (out, err) = (Sink::default(), Sink::default());
        let id = "sleeper";
        let (_, mut init_io) = a
            .client
            .create_container(
                &create_req(&a, id, &base_spec(&["sleep", "60"])),
                io_for(None, &out, &err, false),
            )
            .await
            .unwrap();
        a.client.start_container(id).await.unwrap();
        let exec = |args: Vec<&str>, cwd: &str| {
            serde_json::to_vec(&json!({"args": args, "env": ["PATH=/bin", "FOO=bar"], "cwd": cwd, "user": {"uid": 0, "gid": 0}}))
                .unwrap()
        };
        let (eo, ee) = (Sink::default(), Sink::default());
        let (_, mut io) = a
            .client
            .exec_process(
                id,
                "e1",
                &exec(
                    vec![
                        "sh",
                        "-c",
                        "echo $FOO; hostname; cat /proc/1/cmdline; exit 3",
                    ],
                    "/tmp",
                ),
                io_for(None, &eo, &ee, false),
            )
            .await
            .unwrap();
        assert_eq!(io.wait(&a.client).await.unwrap(), 3);
        assert_eq!(eo.text(), "bar\nsquib-test\nsleep\x0060\0");
        // c02: an exec'd shell killing itself reports 128 + 9.
        let (_, mut io) = a
            .client
            .exec_process(
                id,
                "k9",
                &exec(vec!["sh", "-c", "kill -9 $$"], "/"),
                io_for(None, &eo, &ee, false),
            )
            .await
            .unwrap();
        assert_eq!(io.wait(&a.client).await.unwrap(), 137);
        // c10: missing program and missing cwd fail the exec call itself.
        let err = a
            .client
            .exec_process(
                id,
                "e2",
                &exec(vec!["/no/such/cmd"], "/"),
                StdioConfig::default(),
            )
            .await
            .unwrap_err();
        assert_eq!(err.start_exit_status(), Some(127));
        assert!(
            err.to_string().contains("no such file or directory"),
            "{err}"
        );
        let err = a
            .client
            .exec_process(
                id,
                "e3",
                &exec(vec!["pwd"], "/does/not/exist"),
                StdioConfig::default(),
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("chdir to cwd"), "{err}");
        // The container is still running; kill it.
        a.client.signal_process(id, "", 9, false).await.unwrap();
        assert_eq!(init_io.wait(&a.client).await.unwrap(), 137);
        a.client.remove_container(id).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_signals_follow_pid_namespace_rules() {
        require_host!();
        let a = start_agent("signals").await;
        // c08 B: a trapped SIGTERM runs the handler.
        let (out, err) = (Sink::default(), Sink::default());
        let spec = base_spec(&[
            "sh",
            "-c",
            "trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.1; done",
        ]);
        let (_, mut io) = a
            .client
            .create_container(
                &create_req(&a, "trap", &spec),
                io_for(None, &out, &err, false),
            )
            .await
            .unwrap();
        a.client.start_container("trap").await.unwrap();
        while !out.text().contains("ready") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.client
            .signal_process("trap", "", 15, false)
            .await
            .unwrap();
        assert_eq!(io.wait(&a.client).await.unwrap(), 7);
        assert_eq!(out.text(), "ready\ngot TERM\n");
        a.client.remove_container("trap").await.unwrap();
        // c08 A: without a handler PID 1 ignores SIGTERM; SIGKILL ends it with 137.
        let (_, mut io) = a
            .client
            .create_container(
                &create_req(&a, "noh", &base_spec(&["sleep", "60"])),
                io_for(None, &out, &err, false),
            )
            .await
            .unwrap();
        a.client.start_container("noh").await.unwrap();
        a.client.signal_process("noh", "", 15, false).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.client.signal_process("noh", "", 9, false).await.unwrap();
        assert_eq!(io.wait(&a.client).await.unwrap(), 137);
        a.client.remove_container("noh").await.unwrap();
        // c08 C: PID 1 cannot SIGKILL itself from inside its namespace.
        let r = run(
            &a,
            "self",
            &base_spec(&["sh", "-c", "kill -9 $$; echo survived"]),
            None,
        )
        .await;
        assert_eq!((r.status, r.out.text()), (0, "survived\n".into()));
        // c19: a created, never started container can be killed.
        let (_, mut io) = a
            .client
            .create_container(
                &create_req(&a, "created", &base_spec(&["sleep", "60"])),
                io_for(None, &out, &err, false),
            )
            .await
            .unwrap();
        a.client
            .signal_process("created", "", 9, false)
            .await
            .unwrap();
        assert_eq!(io.wait(&a.client).await.unwrap(), 137);
        assert!(a.client.start_container("created").await.is_err());
        a.client.remove_container("created").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_terminal_gets_size_and_resize() {
        require_host!();
        let a = start_agent("tty").await;
        let (out, err) = (Sink::default(), Sink::default());
        let mut spec = base_spec(&[
            "sh",
            "-c",
            "tty; [ -t 0 ] && echo stdin-is-tty; stty size; echo waiting; sleep 1; stty size; exit 5",
        ]);
        spec["process"]["terminal"] = json!(true);
        spec["process"]["consoleSize"] = json!({"height": 40, "width": 120});
        let (_, mut io) = a
            .client
            .create_container(
                &create_req(&a, "tty", &spec),
                io_for(Some(Vec::new()), &out, &err, true),
            )
            .await
            .unwrap();
        a.client.start_container("tty").await.unwrap();
        while !out.text().contains("waiting") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        a.client.resize_pty("tty", "", 50, 200).await.unwrap();
        assert_eq!(io.wait(&a.client).await.unwrap(), 5);
        assert_eq!(
            out.text(),
            "/dev/pts/0\r\nstdin-is-tty\r\n40 120\r\nwaiting\r\n50 200\r\n"
        );
        a.client.remove_container("tty").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_terminal_input_ends_with_close_stdin() {
        require_host!();
        let a = start_agent("ttyin").await;
        let (out, err) = (Sink::default(), Sink::default());
        let mut spec = base_spec(&["sh", "-c", "stty -echo; cat; echo cat-ended"]);
        spec["process"]["terminal"] = json!(true);
        // The input arrives, then the host's end of input becomes the pty's EOF character, so
        // `cat` ends: CloseStdin carried the byte count, so it cannot overtake the data.
        let (_, mut io) = a
            .client
            .create_container(
                &create_req(&a, "ttyin", &spec),
                io_for(Some(b"line one\n".to_vec()), &out, &err, true),
            )
            .await
            .unwrap();
        a.client.start_container("ttyin").await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(30), io.wait(&a.client))
            .await
            .expect("cat did not see the end of its terminal input")
            .unwrap();
        assert_eq!(status, 0);
        let text = out.text();
        assert!(
            text.ends_with("line one\r\ncat-ended\r\n"),
            "output {text:?}"
        );
        a.client.remove_container("ttyin").await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_honours_tmpfs_options_and_a_readonly_root() {
        require_host!();
        let a = start_agent("readonly").await;
        // c17: tmpfs size and mode apply; the read-only root refuses writes; masked paths
        // are empty.
        let mut spec = base_spec(&[
            "sh",
            "-c",
            "df -k /data | tail -1 | awk '{print $2}'; stat -c %a /data; \
             touch /rootfile; echo touch_rc=$?; cat /etc/passwd | wc -c",
        ]);
        spec["root"]["readonly"] = json!(true);
        spec["linux"]["maskedPaths"] = json!(["/etc/passwd"]);
        spec["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/data", "type": "tmpfs", "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", "size=65536k"]
        }));
        let r = run(&a, "ro", &spec, None).await;
        assert_eq!(
            r.out.text(),
            "65536\n1777\ntouch_rc=1\n0\n",
            "stderr {}",
            r.err.text()
        );
        assert!(
            r.err.text().contains("Read-only file system"),
            "{}",
            r.err.text()
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_reaps_orphans_as_pid_1() {
        require_host!();
        let a = start_agent("zombies").await;
        // Without a PID namespace the orphans re-parent to the agent, which must reap them.
        let mut spec = base_spec(&[
            "sh",
            "-c",
            "(for i in $(seq 50); do sleep 0.2 & done); sleep 2; n=0; for s in /proc/[0-9]*/stat; do case \"$(cut -d' ' -f3 $s 2>/dev/null)\" in Z) n=$((n+1));; esac; done; echo zombies=$n",
        ]);
        spec["linux"]["namespaces"] = json!([{"type": "mount"}, {"type": "ipc"}, {"type": "uts"}]);
        let r = run(&a, "zombies", &spec, None).await;
        assert_eq!(
            (r.status, r.out.text()),
            (0, "zombies=0\n".into()),
            "stderr: {}",
            r.err.text()
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn test_agent_unknown_container_is_not_found() {
        require_host!();
        let a = start_agent("unknown").await;
        let err = a.client.start_container("nope").await.unwrap_err();
        assert!(
            matches!(
                err,
                AgentClientError::Rpc {
                    code: squib_agent_protocol::ttrpc::Code::NOT_FOUND,
                    ..
                }
            ),
            "{err}"
        );
    }
}
