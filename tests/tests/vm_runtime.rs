//! VM test: the `squib` OCI runtime CLI runs busybox (and Debian minbase) bundles, each in its
//! own microVM, through its whole lifecycle: run, create/start/state/kill/delete, exec, ps,
//! pause/resume, events, the root image cache, runc's exit codes and error rules, and nothing
//! left behind afterwards. Cases c01, c02, c08, c10, c19 and c20 in their `squib` form.
//!
//! Inputs: SQUIB_BIN (the runner sets it), the guest kernel SQUIB_TEST_KERNEL and the agent
//! initramfs SQUIB_AGENT_INITRAMFS (or the guest-image cache), busybox-static on the host, and
//! for the minbase test the cached Debian minbase from `scripts/mk-minbase`.

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::time::{Duration, Instant};

    use serde_json::{Value, json};
    use squib_tests::process::{TimedOutput, output_with_timeout};
    use squib_tests::vm_env;

    /// Every CLI call that may boot a VM; inside the VM test host things are 30-50x slower.
    const SLOW: Duration = Duration::from_secs(400);

    fn squib_bin() -> PathBuf {
        std::env::var_os("SQUIB_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| vm_env::repo_root().join("target/debug/squib"))
    }

    /// One test's world: a state root, an image cache and bundles under a scratch directory.
    struct World {
        dir: PathBuf,
        root: PathBuf,
        cache: PathBuf,
    }

    impl World {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("squib-rt-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let w = Self {
                root: dir.join("root"),
                cache: dir.join("cache"),
                dir,
            };
            std::fs::create_dir_all(&w.root).unwrap();
            w
        }

        fn cmd(&self) -> Command {
            let mut c = Command::new(squib_bin());
            c.arg("--root")
                .arg(&self.root)
                .arg("--image-cache")
                .arg(&self.cache)
                .env("SQUIB_KERNEL", vm_env::test_kernel().unwrap())
                .env("SQUIB_INITRAMFS", vm_env::agent_initramfs());
            c
        }

        /// Runs `squib ARGS` to completion with captured output (not for create: its monitor
        /// would hold the pipes).
        fn run(&self, args: &[&str]) -> TimedOutput {
            let out = output_with_timeout(self.cmd().args(args), SLOW).unwrap();
            assert!(!out.timed_out, "squib {args:?} timed out");
            out
        }

        /// `squib create` with the container's stdio on files; returns (status, stderr).
        fn create(&self, bundle: &Path, id: &str) -> (ExitStatus, String) {
            let log = self.dir.join(format!("{id}.create.err"));
            let mut child = self
                .cmd()
                .arg("create")
                .arg("--bundle")
                .arg(bundle)
                .arg(id)
                .stdin(Stdio::null())
                .stdout(File::create(self.dir.join(format!("{id}.out"))).unwrap())
                .stderr(File::create(&log).unwrap())
                .spawn()
                .unwrap();
            let status = wait(&mut child, SLOW);
            (status, std::fs::read_to_string(&log).unwrap_or_default())
        }

        /// The container's `state` JSON, or `None` when `state` fails.
        fn state(&self, id: &str) -> Option<Value> {
            let out = self.run(&["state", id]);
            out.status
                .success()
                .then(|| serde_json::from_slice(&out.stdout).unwrap())
        }

        /// A bundle `name` over a busybox rootfs with `process.args = args` and `edit` applied.
        fn bundle(&self, name: &str, args: &[&str], edit: impl FnOnce(&mut Value)) -> PathBuf {
            let b = self.dir.join(name);
            std::fs::create_dir_all(&b).unwrap();
            let rootfs = self.dir.join("busybox-rootfs");
            if !rootfs.is_dir() {
                let st = Command::new(vm_env::repo_root().join("guest-image/mktest-rootfs"))
                    .arg(&rootfs)
                    .status()
                    .unwrap();
                assert!(st.success(), "mktest-rootfs failed");
            }
            let _ = std::fs::remove_file(b.join("rootfs"));
            std::os::unix::fs::symlink(&rootfs, b.join("rootfs")).unwrap();
            let mut spec = base_spec(args);
            edit(&mut spec);
            std::fs::write(
                b.join("config.json"),
                serde_json::to_vec_pretty(&spec).unwrap(),
            )
            .unwrap();
            b
        }

        /// Asserts that nothing of container `id` remains: no state directory, no monitor
        /// process, no socket or mount under the root.
        fn assert_gone(&self, id: &str) {
            assert!(
                !self.root.join(id).exists(),
                "state directory of {id} left: {:?}",
                std::fs::read_dir(self.root.join(id))
                    .map(|d| d.flatten().map(|e| e.file_name()).collect::<Vec<_>>())
            );
            let root = self.root.to_string_lossy().into_owned();
            for entry in std::fs::read_dir("/proc").unwrap().flatten() {
                let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                    continue;
                };
                let args: Vec<String> = cmdline
                    .split(|b| *b == 0)
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                let ours = args.iter().any(|a| a == &root)
                    && args.iter().any(|a| a == "monitor")
                    && args.last().map(String::as_str) == Some(id);
                assert!(!ours, "monitor of {id} still runs: {args:?}");
            }
            let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
            assert!(!mounts.contains(&root), "a mount under {root} remains");
        }
    }

    impl Drop for World {
        fn drop(&mut self) {
            // Stop whatever a failed test left running, then remove the files.
            if let Ok(entries) = std::fs::read_dir(&self.root) {
                for e in entries.flatten() {
                    let id = e.file_name().to_string_lossy().into_owned();
                    let _ = output_with_timeout(
                        self.cmd().args(["delete", "--force", &id]),
                        Duration::from_secs(60),
                    );
                }
            }
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn wait(child: &mut Child, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("child {} timed out", child.id());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn base_spec(args: &[&str]) -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": args,
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "FOO=bar"],
                "cwd": "/",
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
                {"destination": "/sys", "type": "sysfs", "source": "sysfs",
                 "options": ["nosuid", "noexec", "nodev", "ro"]}
            ],
            "linux": {
                "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                               {"type": "uts"}, {"type": "mount"}]
            }
        })
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    fn code(out: &TimedOutput) -> Option<i32> {
        out.status.code()
    }

    #[test]
    fn test_runtime_run_prints_guest_kernel_release_and_exit_codes() {
        let w = World::new("run");
        let b = w.bundle("uname", &["uname", "-r"], |_| {});
        let out = w.run(&["run", "--bundle", b.to_str().unwrap(), "demo"]);
        assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
        let release = text(&out.stdout).trim().to_string();
        let host = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
        assert!(
            release.starts_with("6.") && release != host.trim(),
            "guest release {release:?} (host {host:?})"
        );
        w.assert_gone("demo");

        // c01 in its OCI-runtime form.
        let b = w.bundle(
            "exit42",
            &["sh", "-c", "echo out; echo err >&2; exit 42"],
            |_| {},
        );
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "c01"]);
        assert_eq!(code(&out), Some(42), "stderr: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "out\n");
        assert!(text(&out.stderr).contains("err\n"), "{}", text(&out.stderr));
        w.assert_gone("c01");

        let b = w.bundle("missing", &["nonexistent"], |_| {});
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "c01d"]);
        assert_ne!(code(&out), Some(0));
        let err = text(&out.stderr);
        assert!(
            err.contains("nonexistent") && err.contains("executable file not found in $PATH"),
            "{err}"
        );
        w.assert_gone("c01d");
    }

    #[test]
    fn test_runtime_run_reports_137_after_sigkill_and_keeps_pid_namespace_signal_rules() {
        let w = World::new("kill");
        // c08 A + c02b: SIGTERM is ignored by an init without a handler; SIGKILL gives 137.
        let b = w.bundle("sleep", &["sleep", "1000"], |_| {});
        let mut child = w
            .cmd()
            .args(["run", "-b", b.to_str().unwrap(), "c08a"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(w.dir.join("c08a.err")).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + SLOW;
        while w
            .state("c08a")
            .and_then(|s| s["status"].as_str().map(String::from))
            != Some("running".into())
        {
            assert!(Instant::now() < deadline, "c08a never ran");
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(code(&w.run(&["kill", "c08a"])), Some(0));
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(w.state("c08a").unwrap()["status"], "running");
        assert_eq!(code(&w.run(&["kill", "c08a", "KILL"])), Some(0));
        let st = wait(&mut child, SLOW);
        assert_eq!(st.code(), Some(137));
        w.assert_gone("c08a");

        // c08 B: a trapped SIGTERM runs the handler, whether sent with `squib kill` or to the
        // foreground `squib run` process (which forwards it, as runc does).
        let b = w.bundle(
            "trap",
            &[
                "sh",
                "-c",
                "trap 'echo got TERM; exit 7' TERM; while :; do sleep 1; done",
            ],
            |_| {},
        );
        for (id, via_kill) in [("c08b", true), ("c08f", false)] {
            let out_path = w.dir.join(format!("{id}.out"));
            let mut child = w
                .cmd()
                .args(["run", "-b", b.to_str().unwrap(), id])
                .stdin(Stdio::null())
                .stdout(File::create(&out_path).unwrap())
                .stderr(File::create(w.dir.join(format!("{id}.err"))).unwrap())
                .spawn()
                .unwrap();
            let deadline = Instant::now() + SLOW;
            while w
                .state(id)
                .and_then(|s| s["status"].as_str().map(String::from))
                != Some("running".into())
            {
                assert!(Instant::now() < deadline, "{id} never ran");
                std::thread::sleep(Duration::from_millis(500));
            }
            // Let the shell install its trap before the signal arrives.
            std::thread::sleep(Duration::from_secs(3));
            if via_kill {
                assert_eq!(code(&w.run(&["kill", id, "TERM"])), Some(0));
            } else {
                let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
                nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
            }
            let st = wait(&mut child, SLOW);
            assert_eq!(st.code(), Some(7), "{id}");
            assert_eq!(
                std::fs::read_to_string(&out_path).unwrap(),
                "got TERM\n",
                "{id}"
            );
            w.assert_gone(id);
        }

        // SIGKILL of a container whose guest hangs: the agent cannot take it, so the monitor
        // powers the VM off and 137 is reported. The container hangs its own guest (see
        // `vm_env::HANG_GUEST_SCRIPT`; this spec has no readonlyPaths).
        let b = w.bundle("hang", &["sh", "-c", vm_env::HANG_GUEST_SCRIPT], |_| {});
        let out_path = w.dir.join("hung.out");
        let mut child = w
            .cmd()
            .args(["run", "-b", b.to_str().unwrap(), "hung"])
            .stdin(Stdio::null())
            .stdout(File::create(&out_path).unwrap())
            .stderr(File::create(w.dir.join("hung.err")).unwrap())
            .spawn()
            .unwrap();
        let console = w.root.join("hung").join("console.log");
        let deadline = Instant::now() + SLOW;
        while !text(&std::fs::read(&console).unwrap_or_default()).contains(vm_env::HANG_GUEST_MARK)
        {
            assert!(Instant::now() < deadline, "the guest of hung never crashed");
            std::thread::sleep(Duration::from_millis(500));
        }
        let killed = w.run(&["kill", "hung", "KILL"]);
        assert_eq!(code(&killed), Some(0), "{}", text(&killed.stderr));
        let st = wait(&mut child, SLOW);
        assert_eq!(st.code(), Some(137));
        assert_eq!(std::fs::read_to_string(&out_path).unwrap(), "");
        w.assert_gone("hung");

        // c08 C: PID 1 cannot SIGKILL itself from inside its namespace.
        let b = w.bundle(
            "selfkill",
            &["sh", "-c", "kill -9 $$; echo survived"],
            |_| {},
        );
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "c08c"]);
        assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "survived\n");
    }

    #[test]
    fn test_runtime_lifecycle_create_start_exec_pause_kill_delete() {
        let w = World::new("life");
        let b = w.bundle("sleep", &["sleep", "1000"], |_| {});
        let bs = b.to_str().unwrap();

        // c19: kill a created container, then start fails and delete frees it.
        let (st, err) = w.create(&b, "c19");
        assert!(st.success(), "create: {err}");
        let s = w.state("c19").unwrap();
        assert_eq!(s["status"], "created");
        assert!(s["pid"].as_i64().unwrap() > 0);
        assert_eq!(s["rootfsCacheHit"], false, "first create builds the image");
        let (st, err) = w.create(&b, "c19");
        assert!(!st.success() && err.contains("already exists"), "{err}");
        assert_eq!(code(&w.run(&["kill", "c19", "KILL"])), Some(0));
        let deadline = Instant::now() + SLOW;
        while w.state("c19").unwrap()["status"] != "stopped" {
            assert!(Instant::now() < deadline, "c19 never stopped");
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(w.state("c19").unwrap()["pid"], 0);
        let out = w.run(&["start", "c19"]);
        assert_eq!(code(&out), Some(1));
        assert!(text(&out.stderr).contains("cannot start a container that has stopped"));
        assert_eq!(code(&w.run(&["delete", "c19"])), Some(0));
        let out = w.run(&["state", "c19"]);
        assert_eq!(code(&out), Some(1));
        assert!(
            text(&out.stderr).contains("does not exist"),
            "{}",
            text(&out.stderr)
        );
        w.assert_gone("c19");

        // c20 A with exec, ps, pause/resume, events; the second create hits the image cache.
        let (st, err) = w.create(&b, "c20a");
        assert!(st.success(), "create: {err}");
        assert_eq!(w.state("c20a").unwrap()["rootfsCacheHit"], true);
        assert_eq!(code(&w.run(&["start", "c20a"])), Some(0));
        assert_eq!(w.state("c20a").unwrap()["status"], "running");
        let out = w.run(&["start", "c20a"]);
        assert_eq!(code(&out), Some(1));
        assert!(text(&out.stderr).contains("cannot start an already running container"));

        // c10 e3/e4/e1.
        let out = w.run(&["exec", "c20a", "sh", "-c", "exit 3"]);
        assert_eq!(code(&out), Some(3));
        let out = w.run(&[
            "exec",
            "--cwd",
            "/tmp",
            "c20a",
            "sh",
            "-c",
            "pwd; echo $FOO",
        ]);
        assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "/tmp\nbar\n");
        let out = w.run(&["exec", "c20a", "/no/such/cmd"]);
        assert_eq!(code(&out), Some(255));
        assert!(
            text(&out.stderr).contains("no such file or directory"),
            "{}",
            text(&out.stderr)
        );

        let out = w.run(&["exec", "c20a", "nosuchcmd"]);
        assert_eq!(code(&out), Some(255));
        let err = text(&out.stderr);
        assert!(
            err.contains("nosuchcmd") && err.contains("executable file not found in $PATH"),
            "{err}"
        );
        let out = w.run(&["exec", "--cwd", "/does/not/exist", "c20a", "pwd"]);
        assert_ne!(code(&out), Some(0));

        // c11: exec from a process JSON as another user, with real permission checks.
        let out = w.run(&[
            "exec",
            "c20a",
            "sh",
            "-c",
            "echo secret > /tmp/secret && chmod 600 /tmp/secret",
        ]);
        assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
        let process = w.dir.join("exec-process.json");
        let p = json!({"terminal": false,
            "user": {"uid": 65534, "gid": 65534, "additionalGids": [266]},
            "args": ["sh", "-c", "id -u; id -g; id -G; cat /tmp/secret; echo cat_rc=$?"],
            "env": ["PATH=/bin"], "cwd": "/"});
        std::fs::write(&process, serde_json::to_vec(&p).unwrap()).unwrap();
        let out = w.run(&["exec", "-p", process.to_str().unwrap(), "c20a"]);
        assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "65534\n65534\n65534 266\ncat_rc=1\n");
        assert!(
            text(&out.stderr).contains("Permission denied"),
            "{}",
            text(&out.stderr)
        );

        let out = w.run(&["ps", "--format", "json", "c20a"]);
        assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
        assert_eq!(
            serde_json::from_slice::<Value>(&out.stdout).unwrap(),
            json!([1])
        );

        assert_eq!(code(&w.run(&["pause", "c20a"])), Some(0));
        assert_eq!(w.state("c20a").unwrap()["status"], "paused");
        assert_eq!(code(&w.run(&["resume", "c20a"])), Some(0));
        assert_eq!(w.state("c20a").unwrap()["status"], "running");
        let out = w.run(&["events", "--stats", "c20a"]);
        assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
        let ev: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(ev["type"], "stats");
        assert!(ev["data"]["pids"]["current"].as_u64().unwrap() >= 1, "{ev}");

        let out = w.run(&["kill", "c20a", "SIGFOO"]);
        assert_eq!(code(&out), Some(1));
        assert!(text(&out.stderr).contains("unknown signal \"SIGFOO\""));
        let out = w.run(&["delete", "c20a"]);
        assert_eq!(code(&out), Some(1));
        assert!(
            text(&out.stderr).contains("cannot delete container c20a that is not stopped: running"),
            "{}",
            text(&out.stderr)
        );
        assert_eq!(w.state("c20a").unwrap()["status"], "running");
        assert_eq!(code(&w.run(&["delete", "--force", "c20a"])), Some(0));
        assert_eq!(code(&w.run(&["state", "c20a"])), Some(1));
        w.assert_gone("c20a");

        // c20 B: a process that exits by itself.
        let b1 = w.bundle("sleep1", &["sleep", "1"], |_| {});
        let (st, err) = w.create(&b1, "c20b");
        assert!(st.success(), "create: {err}");
        assert_eq!(code(&w.run(&["start", "c20b"])), Some(0));
        let deadline = Instant::now() + SLOW;
        while w.state("c20b").unwrap()["status"] != "stopped" {
            assert!(Instant::now() < deadline, "c20b never stopped");
            std::thread::sleep(Duration::from_millis(500));
        }
        for _ in 0..3 {
            let s = w.state("c20b").unwrap();
            assert_eq!(
                (s["status"].clone(), s["pid"].clone()),
                (json!("stopped"), json!(0))
            );
        }
        assert_eq!(code(&w.run(&["kill", "c20b", "KILL"])), Some(1));
        assert_eq!(code(&w.run(&["kill", "--all", "c20b", "KILL"])), Some(0));
        assert_eq!(code(&w.run(&["exec", "c20b", "true"])), Some(255));
        assert_eq!(code(&w.run(&["delete", "c20b"])), Some(0));
        assert_eq!(code(&w.run(&["delete", "c20b"])), Some(1));
        assert_eq!(code(&w.run(&["delete", "-f", "c20b"])), Some(0));
        w.assert_gone("c20b");
        let _ = bs;
    }

    #[test]
    fn test_runtime_rejects_bad_bundles_leaving_nothing_behind() {
        let w = World::new("bad");
        let check = |bundle: &Path, id: &str, want: &[&str]| {
            let out = w.run(&["run", "-b", bundle.to_str().unwrap(), id]);
            assert_eq!(code(&out), Some(1), "{id}");
            let err = text(&out.stderr);
            for part in want {
                assert!(err.contains(part), "{id}: {part:?} not in {err}");
            }
            w.assert_gone(id);
            assert!(
                std::fs::read_dir(&w.root).unwrap().next().is_none(),
                "{id} left state"
            );
        };
        let b = w.bundle("malformed", &["true"], |_| {});
        std::fs::write(b.join("config.json"), b"{\"ociVersion\": ").unwrap();
        check(&b, "malformed", &["config.json"]);
        let b = w.bundle("noroot", &["true"], |s| {
            s["root"]["path"] = json!("nothere")
        });
        check(&b, "noroot", &["root.path", "nothere", "not a directory"]);
        let b = w.bundle("noargs", &[], |_| {});
        check(&b, "noargs", &["process.args"]);
        let b = w.bundle("emptyarg", &[""], |_| {});
        check(&b, "emptyarg", &["process.args[0]"]);
        let b = w.bundle("ok", &["true"], |_| {});
        check(&b, "bad/id", &["invalid container id"]);
        for (args, want) in [
            (vec!["state", "nosuch"], "container nosuch does not exist"),
            (vec!["start", "nosuch"], "container nosuch does not exist"),
            (
                vec!["kill", "nosuch", "KILL"],
                "container nosuch does not exist",
            ),
            (vec!["delete", "nosuch"], "container nosuch does not exist"),
        ] {
            let out = w.run(&args);
            assert_eq!(code(&out), Some(1), "{args:?}");
            assert!(
                text(&out.stderr).contains(want),
                "{args:?}: {}",
                text(&out.stderr)
            );
        }
        let out = w.run(&["exec", "nosuch", "true"]);
        assert_eq!(code(&out), Some(255));
        assert_eq!(code(&w.run(&["delete", "--force", "nosuch"])), Some(0));
        let out = w.run(&["list", "--format", "json"]);
        assert_eq!(code(&out), Some(0));
        assert_eq!(
            serde_json::from_slice::<Value>(&out.stdout).unwrap(),
            json!([])
        );
    }

    #[test]
    fn test_runtime_run_applies_console_size_cpuset_and_memory_sentinel() {
        let w = World::new("limits");
        // c07 in its OCI form: `consoleSize` is the size the process starts with. stdin and
        // stdout are pipes here, so `squib run` has no terminal of its own to resize to.
        let b = w.bundle("console", &["sh", "-c", "stty size; tty"], |s| {
            s["process"]["terminal"] = json!(true);
            s["process"]["consoleSize"] = json!({"height": 40, "width": 120});
        });
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "c07"]);
        assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
        let stdout = text(&out.stdout).replace('\r', "");
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(lines.first(), Some(&"40 120"), "{stdout:?}");
        assert!(
            lines.get(1).is_some_and(|l| l.starts_with("/dev/pts/")),
            "{stdout:?}"
        );
        w.assert_gone("c07");

        // A terminal run whose stdin stays open and silent still returns when the process
        // exits: squib forwards stdin on a thread that may never see another byte, and the
        // run must not wait for it (it did, until a key was pressed).
        let b = w.bundle("console-open", &["sh", "-c", "exit 3"], |s| {
            s["process"]["terminal"] = json!(true);
        });
        let mut child = w
            .cmd()
            .args(["run", "-b", b.to_str().unwrap(), "c07open"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        let status = wait(&mut child, SLOW);
        drop(stdin);
        assert_eq!(status.code(), Some(3));
        w.assert_gone("c07open");

        // c22 in its OCI form: a cpuset gives the VM exactly that many CPUs.
        let host_cpus = std::thread::available_parallelism().unwrap().get();
        assert!(
            (2..64).contains(&host_cpus),
            "c22 needs a host with 2 to 63 CPUs, this one has {host_cpus}"
        );
        fn cpus(list: &'static str) -> impl FnOnce(&mut Value) {
            move |s: &mut Value| s["linux"]["resources"] = json!({"cpu": {"cpus": list}})
        }
        let b = w.bundle("cpu0", &["nproc"], cpus("0"));
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "c22cpu0"]);
        assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "1\n");
        w.assert_gone("c22cpu0");
        let b = w.bundle(
            "cpu01",
            &[
                "sh",
                "-c",
                "nproc; grep Cpus_allowed_list /proc/self/status",
            ],
            cpus("0-1"),
        );
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "c22cpu01"]);
        assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "2\nCpus_allowed_list:\t0-1\n");
        w.assert_gone("c22cpu01");
        // A CPU the host does not have fails create, as with runc, naming the field.
        let b = w.bundle("cpu63", &["nproc"], cpus("63"));
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "c22cpu63"]);
        assert_ne!(code(&out), Some(0), "stdout: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(
            err.contains("linux.resources.cpu.cpus") && err.contains("\"63\""),
            "{err}"
        );
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
        w.assert_gone("c22cpu63");
        // The "unlimited" sentinel is no limit, not a VM of 8 EiB.
        let b = w.bundle("unlimited", &["echo", "hi"], |s| {
            s["linux"]["resources"] = json!({"memory": {"limit": 9_223_372_036_854_771_712i64}});
        });
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "c22mem"]);
        assert_eq!(code(&out), Some(0), "stderr: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "hi\n");
        w.assert_gone("c22mem");
    }

    #[test]
    fn test_runtime_runs_debian_minbase() {
        let w = World::new("minbase");
        let out = Command::new(vm_env::repo_root().join("scripts/mk-minbase"))
            .output()
            .unwrap();
        assert!(out.status.success(), "mk-minbase: {}", text(&out.stderr));
        let minbase = PathBuf::from(text(&out.stdout).trim());
        let b = w.dir.join("minbase");
        std::fs::create_dir_all(&b).unwrap();
        std::os::unix::fs::symlink(&minbase, b.join("rootfs")).unwrap();
        let spec = base_spec(&["sh", "-c", "cat /etc/os-release; apt-get --version"]);
        std::fs::write(b.join("config.json"), serde_json::to_vec(&spec).unwrap()).unwrap();
        let out = w.run(&["run", "-b", b.to_str().unwrap(), "deb"]);
        assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        assert!(stdout.contains("ID=debian"), "{stdout}");
        assert!(stdout.contains("apt "), "{stdout}");
        w.assert_gone("deb");
    }

    /// The receiving end of a console socket, as a caller of `create --console-socket` has it.
    struct ConsoleReceiver {
        path: PathBuf,
        listener: std::os::unix::net::UnixListener,
    }

    impl ConsoleReceiver {
        fn bind(path: PathBuf) -> Self {
            let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
            listener.set_nonblocking(true).unwrap();
            Self { path, listener }
        }

        /// Accepts the runtime's connection and receives the one message it sends: a name and
        /// exactly one descriptor, the pty master. Returns the master and the connection.
        fn receive(&self, timeout: Duration) -> (File, std::os::unix::net::UnixStream) {
            use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
            use std::io::IoSliceMut;
            use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
            let deadline = Instant::now() + timeout;
            let conn = loop {
                match self.listener.accept() {
                    Ok((c, _)) => break c,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        assert!(
                            Instant::now() < deadline,
                            "nothing connected to {:?}",
                            self.path
                        );
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => panic!("accept: {e}"),
                }
            };
            conn.set_nonblocking(false).unwrap();
            conn.set_read_timeout(Some(timeout)).unwrap();
            let mut name = [0u8; 4096];
            let mut iov = [IoSliceMut::new(&mut name)];
            let mut space = nix::cmsg_space!([RawFd; 4]);
            let msg = recvmsg::<()>(
                conn.as_raw_fd(),
                &mut iov,
                Some(&mut space),
                MsgFlags::MSG_CMSG_CLOEXEC,
            )
            .unwrap();
            assert!(msg.bytes > 0, "an empty message");
            let mut fds = Vec::new();
            for c in msg.cmsgs().unwrap() {
                match c {
                    ControlMessageOwned::ScmRights(r) => fds.extend(r),
                    other => panic!("unexpected control message {other:?}"),
                }
            }
            assert_eq!(fds.len(), 1, "one descriptor in the message");
            // SAFETY: just received; nothing else owns it.
            let master = unsafe { OwnedFd::from_raw_fd(fds[0]) };
            (File::from(master), conn)
        }
    }

    /// Reads the pty master until `needle` appeared in everything read so far (returned), the
    /// other side is gone (EIO) or `timeout` passes.
    fn read_master_until(master: &File, needle: &str, timeout: Duration) -> String {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::io::Read;
        use std::os::fd::AsFd;
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while !text(&seen).contains(needle) && Instant::now() < deadline {
            let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(500u16)).unwrap() == 0 {
                continue;
            }
            let mut buf = [0u8; 4096];
            match (&*master).read(&mut buf) {
                Ok(0) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => break,
                Err(e) => panic!("reading the master: {e}"),
            }
        }
        text(&seen)
    }

    fn master_winsize(master: &File) -> (u16, u16) {
        use std::os::fd::AsRawFd;
        let mut ws = libc::winsize {
            ws_row: 0,
            ws_col: 0,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCGWINSZ writes one winsize into the live local.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGWINSZ, &raw mut ws) };
        assert_eq!(rc, 0, "TIOCGWINSZ on the master");
        (ws.ws_row, ws.ws_col)
    }

    fn set_master_winsize(master: &File, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from the live local.
        let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &raw const ws) };
        assert_eq!(rc, 0, "TIOCSWINSZ on the master");
    }

    #[test]
    fn test_runtime_create_hands_the_terminal_master_to_the_console_socket() {
        let w = World::new("console");
        let b = w.bundle(
            "tty",
            &["sh", "-c", "stty size; tty; read line; echo got:$line"],
            |s| {
                s["process"]["terminal"] = json!(true);
                s["process"]["consoleSize"] = json!({"height": 40, "width": 120});
            },
        );
        let receiver = ConsoleReceiver::bind(w.dir.join("console.sock"));
        // Output captured through pipes: create must not leave its caller's pipes open in the
        // monitor, or a caller reading them to the end would wait for the container's end.
        let out = w.run(&[
            "create",
            "--bundle",
            b.to_str().unwrap(),
            "--console-socket",
            receiver.path.to_str().unwrap(),
            "tty1",
        ]);
        assert_eq!(code(&out), Some(0), "create: {}", text(&out.stderr));
        assert_eq!(w.state("tty1").unwrap()["status"], "created");
        let (master, mut conn) = receiver.receive(Duration::from_secs(10));
        assert_eq!(master_winsize(&master), (40, 120));
        // One message and nothing else: the runtime closed its end of the connection.
        let mut rest = Vec::new();
        std::io::Read::read_to_end(&mut conn, &mut rest).unwrap();
        assert!(rest.is_empty(), "more after the descriptor: {rest:?}");

        assert_eq!(code(&w.run(&["start", "tty1"])), Some(0));
        let seen = read_master_until(&master, "/dev/pts/0\r\n", SLOW);
        assert!(
            seen.contains("40 120\r\n") && seen.contains("/dev/pts/0\r\n"),
            "{seen:?}"
        );

        // A resize made on the master reaches the guest pty.
        set_master_winsize(&master, 50, 200);
        let deadline = Instant::now() + SLOW;
        loop {
            let out = w.run(&["exec", "tty1", "stty", "-F", "/dev/pts/0", "size"]);
            assert_eq!(code(&out), Some(0), "{}", text(&out.stderr));
            if text(&out.stdout) == "50 200\n" {
                break;
            }
            assert!(Instant::now() < deadline, "size {:?}", text(&out.stdout));
            std::thread::sleep(Duration::from_secs(1));
        }

        // exec --detach -t: the same hand-over through a console socket of its own.
        let receiver2 = ConsoleReceiver::bind(w.dir.join("exec.sock"));
        let pid_file = w.dir.join("exec.pid");
        let out = w.run(&[
            "exec",
            "-d",
            "-t",
            "--console-socket",
            receiver2.path.to_str().unwrap(),
            "--pid-file",
            pid_file.to_str().unwrap(),
            "tty1",
            "sh",
            "-c",
            "read l; stty size; tty; echo exec:$l; exit 4",
        ]);
        assert_eq!(code(&out), Some(0), "exec: {}", text(&out.stderr));
        let pid: i64 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(pid > 1, "guest pid {pid}");
        let (master2, _conn2) = receiver2.receive(Duration::from_secs(10));
        set_master_winsize(&master2, 30, 90);
        let deadline = Instant::now() + SLOW;
        loop {
            let out = w.run(&["exec", "tty1", "stty", "-F", "/dev/pts/1", "size"]);
            if text(&out.stdout) == "30 90\n" {
                break;
            }
            assert!(Instant::now() < deadline, "size {:?}", text(&out.stdout));
            std::thread::sleep(Duration::from_secs(1));
        }
        std::io::Write::write_all(&mut &master2, b"x\r").unwrap();
        let seen = read_master_until(&master2, "exec:x\r\n", SLOW);
        assert!(
            seen.contains("30 90\r\n") && seen.contains("/dev/pts/1\r\n"),
            "{seen:?}"
        );
        assert!(seen.contains("exec:x\r\n"), "{seen:?}");
        // The helper exits with the process: nobody holds that slave any more. The master
        // reads EIO as the helper closes the slave, a moment before the helper has exited.
        read_master_until(&master2, "\u{0}never", SLOW);
        wait_no_attach_helpers(&w, "the helper outlived its process");

        // Closing the master hangs up the helper's terminal: it passes SIGHUP on to the
        // process, which dies of it, and the helper ends with it.
        let receiver3 = ConsoleReceiver::bind(w.dir.join("exec3.sock"));
        let out = w.run(&[
            "exec",
            "-d",
            "-t",
            "--console-socket",
            receiver3.path.to_str().unwrap(),
            "tty1",
            "sleep",
            "1000",
        ]);
        assert_eq!(code(&out), Some(0), "exec: {}", text(&out.stderr));
        let (master3, conn3) = receiver3.receive(Duration::from_secs(10));
        assert_eq!(attach_helpers(&w).len(), 1);
        drop((master3, conn3));
        wait_no_attach_helpers(&w, "the helper outlived its hangup");

        // A detached exec that outlives its container: its helper ends with the VM, and
        // delete would stop it otherwise.
        let receiver4 = ConsoleReceiver::bind(w.dir.join("exec4.sock"));
        let out = w.run(&[
            "exec",
            "-d",
            "-t",
            "--console-socket",
            receiver4.path.to_str().unwrap(),
            "tty1",
            "sleep",
            "1000",
        ]);
        assert_eq!(code(&out), Some(0), "exec: {}", text(&out.stderr));
        let (master4, _conn4) = receiver4.receive(Duration::from_secs(10));
        assert_eq!(attach_helpers(&w).len(), 1);

        std::io::Write::write_all(&mut &master, b"hello squib\r").unwrap();
        let seen = read_master_until(&master, "got:hello squib\r\n", SLOW);
        assert!(seen.contains("got:hello squib\r\n"), "{seen:?}");
        let deadline = Instant::now() + SLOW;
        while w.state("tty1").unwrap()["status"] != "stopped" {
            assert!(Instant::now() < deadline, "tty1 never stopped");
            std::thread::sleep(Duration::from_millis(500));
        }
        assert_eq!(w.state("tty1").unwrap()["exitStatus"], 0);
        // Once the monitor is gone nobody holds the slave: the master reads EIO.
        let rest = read_master_until(&master, "\u{0}never", SLOW);
        assert!(!rest.contains("got:"), "{rest:?}");
        assert_eq!(code(&w.run(&["delete", "tty1"])), Some(0));
        w.assert_gone("tty1");
        assert_eq!(attach_helpers(&w), Vec::<i32>::new());
        read_master_until(&master4, "\u{0}never", SLOW);
    }

    /// Waits until none of this world's detached-exec terminal helpers runs; fails with `what`
    /// naming them after a minute (a helper has only its own exit left to do, or one signal to
    /// pass on to the guest).
    fn wait_no_attach_helpers(w: &World, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let left = attach_helpers(w);
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {left:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The pids of this world's detached-exec terminal helpers that still run.
    fn attach_helpers(w: &World) -> Vec<i32> {
        let root = w.root.to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                continue;
            };
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if args.iter().any(|a| a == &root) && args.iter().any(|a| a == "exec-attach") {
                pids.push(pid);
            }
        }
        pids
    }

    #[test]
    fn test_runtime_refuses_a_detached_terminal_without_console_socket() {
        let w = World::new("noconsole");
        let tty = w.bundle("tty", &["sh", "-c", "tty"], |s| {
            s["process"]["terminal"] = json!(true);
        });
        let plain = w.bundle("plain", &["true"], |_| {});
        let sock = w.dir.join("console.sock");
        let missing = w.dir.join("nobody-listens.sock");
        let cases: [(&str, Vec<&str>, &[&str]); 5] = [
            (
                "c1",
                vec!["create", "-b", tty.to_str().unwrap()],
                &[
                    "process.terminal",
                    "cannot allocate tty",
                    "--console-socket",
                ],
            ),
            (
                "c2",
                vec!["run", "-d", "-b", tty.to_str().unwrap()],
                &[
                    "process.terminal",
                    "cannot allocate tty",
                    "--console-socket",
                ],
            ),
            (
                "c3",
                vec![
                    "create",
                    "-b",
                    plain.to_str().unwrap(),
                    "--console-socket",
                    sock.to_str().unwrap(),
                ],
                &["cannot use console socket", "process.terminal = false"],
            ),
            (
                "c4",
                vec![
                    "run",
                    "-b",
                    tty.to_str().unwrap(),
                    "--console-socket",
                    sock.to_str().unwrap(),
                ],
                &["cannot use console socket"],
            ),
            (
                "c5",
                vec![
                    "create",
                    "-b",
                    tty.to_str().unwrap(),
                    "--console-socket",
                    missing.to_str().unwrap(),
                ],
                &["console socket", "nobody-listens.sock"],
            ),
        ];
        for (id, mut args, want) in cases {
            args.push(id);
            let out = w.run(&args);
            assert_eq!(code(&out), Some(1), "{id}: {}", text(&out.stderr));
            let err = text(&out.stderr);
            for part in want {
                assert!(err.contains(part), "{id}: {part:?} not in {err}");
            }
            w.assert_gone(id);
            assert!(
                std::fs::read_dir(&w.root).unwrap().next().is_none(),
                "{id} left state"
            );
        }
        let out = w.run(&["exec", "-d", "-t", "nosuch", "true"]);
        assert_eq!(code(&out), Some(255));
    }

    #[test]
    fn test_runtime_refuses_a_detached_exec_terminal_without_console_socket() {
        let w = World::new("execconsole");
        let b = w.bundle("sleep", &["sleep", "1000"], |_| {});
        let (st, err) = w.create(&b, "ex1");
        assert!(st.success(), "create: {err}");
        assert_eq!(code(&w.run(&["start", "ex1"])), Some(0));
        let sock = w.dir.join("console.sock");
        for (args, want) in [
            (
                vec!["exec", "-d", "-t", "ex1", "true"],
                &["cannot allocate tty", "--console-socket"][..],
            ),
            (
                vec![
                    "exec",
                    "-t",
                    "--console-socket",
                    sock.to_str().unwrap(),
                    "ex1",
                    "true",
                ],
                &["cannot use console socket"][..],
            ),
            (
                vec![
                    "exec",
                    "-d",
                    "--console-socket",
                    sock.to_str().unwrap(),
                    "ex1",
                    "true",
                ],
                &["cannot use console socket", "process.terminal = false"][..],
            ),
        ] {
            let out = w.run(&args);
            assert_eq!(code(&out), Some(255), "{args:?}");
            for part in want {
                assert!(
                    text(&out.stderr).contains(part),
                    "{args:?}: {part:?} not in {}",
                    text(&out.stderr)
                );
            }
        }
        assert_eq!(attach_helpers(&w), Vec::<i32>::new());
        assert_eq!(w.state("ex1").unwrap()["status"], "running");
        assert_eq!(code(&w.run(&["delete", "--force", "ex1"])), Some(0));
        w.assert_gone("ex1");
    }
}
