//! Drives the real squib-vmm binary over its API socket with raw HTTP/1.1.
//!
//! Each test starts its own process on a socket in a private temporary directory; guards kill
//! the process by PID and remove the directory even when an assertion fails.

// Helpers unwrap and panic freely: everything here is test code.
#[cfg(test)]
mod harness {

    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    use serde_json::{Value, json};

    const BIN: &str = env!("CARGO_BIN_EXE_squib-vmm");

    /// A private directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::SeqCst);
            let path =
                std::env::temp_dir().join(format!("squib-vmm-test-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir(&path).unwrap();
            Self(path)
        }

        fn path(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A squib-vmm child killed (by PID) and reaped on drop.
    struct Vmm {
        child: Option<Child>,
        socket: PathBuf,
    }

    impl Vmm {
        fn spawn(socket: &Path, extra: &[&str]) -> Child {
            Command::new(BIN)
                .arg("--api-sock")
                .arg(socket)
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        }

        fn start(socket: &Path) -> Self {
            let mut vmm = Self {
                child: Some(Self::spawn(socket, &["--id", "it-vm"])),
                socket: socket.to_owned(),
            };
            vmm.wait_for_socket();
            vmm
        }

        fn pid(&self) -> Pid {
            Pid::from_raw(i32::try_from(self.child.as_ref().unwrap().id()).unwrap())
        }

        /// Waits until the socket answers `GET /`: a connect alone could reach another
        /// listener (see [`stale_socket`]).
        fn wait_for_socket(&mut self) {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if answers_get(&self.socket) {
                    return;
                }
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!("squib-vmm exited early with {status}: {}", self.stderr());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            panic!("squib-vmm did not serve {} in time", self.socket.display());
        }

        fn stderr(&mut self) -> String {
            let mut text = String::new();
            if let Some(mut err) = self.child.as_mut().and_then(|c| c.stderr.take()) {
                let _ = err.read_to_string(&mut text);
            }
            text
        }

        fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
            let deadline = Instant::now() + timeout;
            loop {
                if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                    return status;
                }
                if Instant::now() >= deadline {
                    let child = self.child.as_mut().unwrap();
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "squib-vmm did not exit within {timeout:?}; its log:\n{}",
                        self.stderr()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Whether a server on `socket` answers `GET /` with 200.
    fn answers_get(socket: &Path) -> bool {
        let Ok(mut stream) = UnixStream::connect(socket) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let request = b"GET / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n";
        if stream.write_all(request).is_err() {
            return false;
        }
        let mut line = String::new();
        BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("HTTP/1.1 200")
    }

    /// Leaves a stale socket file at `path`: bound, never listening. A listener bound and
    /// closed here would not do: a test spawning a process on another thread at that moment
    /// gives the child a copy of every descriptor until it execs, so the closed listener can
    /// still accept a connect for a while, and a squib-vmm probing it then rightly refuses it
    /// as live.
    fn stale_socket(path: &Path) {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, bind, socket};
        // Close-on-exec where the flag exists; a copy a child kept would never listen either.
        #[cfg(target_os = "linux")]
        let flags = SockFlag::SOCK_CLOEXEC;
        #[cfg(not(target_os = "linux"))]
        let flags = SockFlag::empty();
        let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None).unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
        drop(fd);
        assert!(path.exists());
    }

    impl Drop for Vmm {
        fn drop(&mut self) {
            if let Some(mut child) = self.child.take() {
                if child.try_wait().ok().flatten().is_none() {
                    let _ = child.kill();
                }
                let _ = child.wait();
            }
        }
    }

    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Value,
    }

    impl Response {
        fn fault(&self) -> &str {
            self.body["fault_message"]
                .as_str()
                .unwrap_or_else(|| panic!("no fault_message in {}", self.body))
        }

        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// One keep-alive HTTP/1.1 connection.
    struct Client {
        reader: BufReader<UnixStream>,
    }

    impl Client {
        fn connect(socket: &Path) -> Self {
            let stream = UnixStream::connect(socket).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Self {
                reader: BufReader::new(stream),
            }
        }

        fn raw(&mut self, method: &str, path: &str, body: &[u8]) -> Response {
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let stream = self.reader.get_mut();
            stream.write_all(head.as_bytes()).unwrap();
            stream.write_all(body).unwrap();
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            let status: u16 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
            let mut headers = Vec::new();
            let mut length = 0usize;
            loop {
                line.clear();
                self.reader.read_line(&mut line).unwrap();
                let trimmed = line.trim_end();
                if trimmed.is_empty() {
                    break;
                }
                let (k, v) = trimmed.split_once(':').unwrap();
                if k.eq_ignore_ascii_case("content-length") {
                    length = v.trim().parse().unwrap();
                }
                headers.push((k.to_owned(), v.trim().to_owned()));
            }
            let mut bytes = vec![0u8; length];
            self.reader.read_exact(&mut bytes).unwrap();
            let body = if bytes.is_empty() {
                Value::Null
            } else {
                serde_json::from_slice(&bytes).unwrap()
            };
            Response {
                status,
                headers,
                body,
            }
        }

        fn call(&mut self, method: &str, path: &str, body: Value) -> Response {
            let bytes = if body.is_null() {
                Vec::new()
            } else {
                serde_json::to_vec(&body).unwrap()
            };
            self.raw(method, path, &bytes)
        }
    }

    #[test]
    fn test_vmm_serves_every_endpoint_over_its_socket() {
        let dir = TempDir::new();
        let vmm = Vmm::start(&dir.path("api.sock"));
        // Every request below goes over one keep-alive connection.
        let mut c = Client::connect(&vmm.socket);

        let info = c.call("GET", "/", Value::Null);
        assert_eq!(info.status, 200);
        assert_eq!(info.body["id"], "it-vm");
        assert_eq!(info.body["state"], "Not started");
        assert_eq!(info.body["app_name"], "squib");
        assert!(info.body["vmm_version"].is_string());
        assert_eq!(info.header("content-type"), Some("application/json"));
        assert!(c.call("GET", "/version", Value::Null).body["firecracker_version"].is_string());

        let put = c.call(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 256}),
        );
        assert_eq!(put.status, 204);
        assert!(put.body.is_null());
        let config = c.call("GET", "/vm/config", Value::Null);
        assert_eq!(config.status, 200);
        assert_eq!(config.body["machine-config"]["vcpu_count"], 2);
        assert_eq!(config.body["machine-config"]["mem_size_mib"], 256);
        assert_eq!(config.body["boot-source"]["kernel_image_path"], "");
        assert_eq!(config.body["drives"], json!([]));
        assert!(config.body["vsock"].is_null());
        assert_eq!(
            c.call("PATCH", "/machine-config", json!({"smt": false}))
                .status,
            204
        );
        assert_eq!(
            c.call("GET", "/machine-config", Value::Null).body["vcpu_count"],
            2
        );

        let puts = [
            (
                "/boot-source",
                json!({"kernel_image_path": "/k", "boot_args": "console=ttyS0"}),
            ),
            (
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": "/r.img", "is_root_device": true}),
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "tap0"}),
            ),
            ("/pmem/pm0", json!({"id": "pm0", "path_on_host": "/p.img"})),
            ("/vsock", json!({"guest_cid": 3, "uds_path": "/tmp/v.sock"})),
            (
                "/entropy",
                json!({"rate_limiter": {"bandwidth": {"size": 1024, "refill_time": 100}}}),
            ),
            (
                "/balloon",
                json!({"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
            ),
            ("/logger", json!({"level": "Info"})),
            ("/metrics", json!({"metrics_path": "/tmp/m.json"})),
            ("/mmds/config", json!({"network_interfaces": ["eth0"]})),
            ("/mmds", json!({"latest": {"meta-data": {}}})),
            ("/serial", json!({"serial_out_path": "/tmp/console.log"})),
        ];
        for (path, body) in puts {
            let r = c.call("PUT", path, body);
            assert_eq!(r.status, 204, "PUT {path}: {}", r.body);
        }
        assert_eq!(
            c.call("PATCH", "/balloon", json!({"amount_mib": 32}))
                .status,
            204
        );
        assert_eq!(
            c.call(
                "PATCH",
                "/balloon/statistics",
                json!({"stats_polling_interval_s": 5})
            )
            .status,
            204
        );
        assert_eq!(
            c.call("PATCH", "/mmds", json!({"latest": {"x": 1}})).status,
            204
        );
        assert_eq!(
            c.call("GET", "/balloon", Value::Null).body["amount_mib"],
            32
        );
        assert_eq!(
            c.call("GET", "/mmds", Value::Null).body,
            json!({"latest": {"meta-data": {}, "x": 1}})
        );
        let config = c.call("GET", "/vm/config", Value::Null).body;
        assert_eq!(config["drives"][0]["drive_id"], "rootfs");
        assert_eq!(config["network-interfaces"][0]["host_dev_name"], "tap0");
        assert_eq!(config["mmds-config"]["network_interfaces"], json!(["eth0"]));

        // Bad input.
        let r = c.raw("PUT", "/machine-config", b"{\"vcpu_count\": 2,");
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("invalid JSON"), "{}", r.fault());
        let r = c.call(
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 256, "cpus": 4}),
        );
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("unknown field `cpus`"), "{}", r.fault());
        for (vcpus, mem, field) in [
            (0, 256, "vcpu_count"),
            (33, 256, "vcpu_count"),
            (1, 0, "mem_size_mib"),
        ] {
            let r = c.call(
                "PUT",
                "/machine-config",
                json!({"vcpu_count": vcpus, "mem_size_mib": mem}),
            );
            assert_eq!(r.status, 400);
            assert!(r.fault().contains(field), "{}", r.fault());
        }
        assert_eq!(
            c.call("GET", "/machine-config", Value::Null).body["vcpu_count"],
            2
        );
        let r = c.call(
            "PUT",
            "/drives/a",
            json!({"drive_id": "b", "path_on_host": "/b", "is_root_device": false}),
        );
        assert_eq!(r.status, 400);

        // Post-boot actions before boot.
        let r = c.call("PATCH", "/vm", json!({"state": "Paused"}));
        assert_eq!(r.status, 400);
        assert!(
            r.fault().contains("after the microVM is started"),
            "{}",
            r.fault()
        );
        let r = c.call("PUT", "/actions", json!({"action_type": "SendCtrlAltDel"}));
        assert_eq!(r.status, 400);

        // Snapshots are not supported.
        let r = c.call(
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": "/s", "mem_file_path": "/m"}),
        );
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("not supported"));
        // Booting fails: either no hypervisor backend is built in (500), or the backend
        // cannot open the kernel and drive paths above, which do not exist (400).
        let r = c.call("PUT", "/actions", json!({"action_type": "InstanceStart"}));
        if r.fault().contains("no hypervisor backend") {
            assert_eq!(r.status, 500);
        } else {
            assert_eq!(r.status, 400, "{}", r.fault());
            assert!(
                r.fault().contains("start the microVM failed"),
                "{}",
                r.fault()
            );
        }
        assert_eq!(c.call("GET", "/", Value::Null).body["state"], "Not started");
        // The failed start left the configuration editable.
        assert_eq!(
            c.call("PATCH", "/machine-config", json!({"vcpu_count": 1}))
                .status,
            204
        );

        // Routing errors.
        let r = c.call("GET", "/no/such/path", Value::Null);
        assert_eq!(r.status, 404);
        assert!(r.fault().contains("/no/such/path"));
        let r = c.call("DELETE", "/machine-config", Value::Null);
        assert_eq!(r.status, 405);
        assert_eq!(r.header("allow"), Some("GET, PUT, PATCH"));
        assert_eq!(
            c.call("POST", "/actions", json!({"action_type": "InstanceStart"}))
                .status,
            405
        );
    }

    #[test]
    fn test_vmm_refuses_a_live_socket_and_replaces_a_stale_one() {
        let dir = TempDir::new();
        let socket = dir.path("api.sock");
        stale_socket(&socket);
        let first = Vmm::start(&socket);

        let mut second = Vmm {
            child: Some(Vmm::spawn(&socket, &[])),
            socket: socket.clone(),
        };
        let status = second.wait_exit(Duration::from_secs(20));
        assert!(!status.success());
        let stderr = second.stderr();
        assert!(
            stderr.contains("refusing to take over a live socket"),
            "{stderr}"
        );

        // The first instance still serves on the untouched socket.
        assert_eq!(
            Client::connect(&first.socket)
                .call("GET", "/", Value::Null)
                .status,
            200
        );
    }

    #[test]
    fn test_vmm_removes_its_socket_on_sigterm_and_sigint() {
        for signal in [Signal::SIGTERM, Signal::SIGINT] {
            let dir = TempDir::new();
            let mut vmm = Vmm::start(&dir.path("api.sock"));
            kill(vmm.pid(), signal).unwrap();
            let status = vmm.wait_exit(Duration::from_secs(20));
            assert!(status.success(), "{signal}: {status}");
            assert!(!vmm.socket.exists(), "{signal}: socket left behind");
        }
    }

    #[test]
    fn test_vmm_rejects_a_regular_file_at_the_socket_path() {
        let dir = TempDir::new();
        let path = dir.path("not-a-socket");
        std::fs::write(&path, b"keep me").unwrap();
        let mut vmm = Vmm {
            child: Some(Vmm::spawn(&path, &[])),
            socket: path.clone(),
        };
        assert!(!vmm.wait_exit(Duration::from_secs(20)).success());
        assert_eq!(std::fs::read(&path).unwrap(), b"keep me");
    }

    #[test]
    fn test_vmm_config_file_without_api_reports_failed_boot() {
        let dir = TempDir::new();
        let config = dir.path("vm.json");
        std::fs::write(
            &config,
            serde_json::to_vec(&json!({
                "boot-source": {"kernel_image_path": "/k"},
                "machine-config": {"vcpu_count": 1, "mem_size_mib": 64}
            }))
            .unwrap(),
        )
        .unwrap();
        let child = Command::new(BIN)
            .arg("--no-api")
            .arg("--config-file")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut vmm = Vmm {
            child: Some(child),
            socket: dir.path("none"),
        };
        assert!(!vmm.wait_exit(Duration::from_secs(20)).success());
        let stderr = vmm.stderr();
        assert!(stderr.contains("starting the microVM"), "{stderr}");
    }
}
