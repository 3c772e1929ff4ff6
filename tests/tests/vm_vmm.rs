//! VM tests of squib-vmm itself on a real KVM: the guest kernel and the busybox test initramfs
//! booted through the Firecracker-compatible API, as a user of the API would.
//!
//! Each test starts its own `squib-vmm --api-sock … --serial-out …` and talks HTTP/1.1 over the
//! Unix socket. What is checked: the init marker reaches the serial log and `GET /` says
//! Running; `nproc` sees 2 and 4 vCPUs; `PATCH /vm` pauses (the guest's clock-driven output
//! stops) and resumes it; a guest reboot and a guest power-off end the process with status 0
//! and remove the socket; a guest kernel panic ends it with a non-zero status and the panic
//! text in the serial log; the same kernel as a bzImage boots through the Linux 64-bit boot
//! protocol (`boot_params`) to init and a clean exit; a guest that triple-faults ends it with
//! the triple-fault status (3) and an error in the VMM's log, with the registers at the fault
//! where the hypervisor keeps them (KVM on Intel; KVM on AMD, as in the VM test host, does not).

#[cfg(test)]
mod tests {
    use std::fs;
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, ExitStatus, Stdio};
    use std::time::{Duration, Instant};

    use squib_tests::vm_env::{self, INIT_READY_MARKER, TEST_EXIT_MARKER};

    /// Time allowed for a boot to reach init inside the VM test host (nested KVM under TCG). Boots
    /// of 4 vCPUs on L1's 2 run while other tests' guests boot too; on a loaded host one such boot
    /// was seen to take over 240 s, so the bound is generous.
    const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
    const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1";

    /// The squib-vmm binary next to this test binary's `deps/` directory, or `SQUIB_VMM_BIN`.
    fn vmm_binary() -> PathBuf {
        if let Some(path) = std::env::var_os("SQUIB_VMM_BIN") {
            return PathBuf::from(path);
        }
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let bin = profile_dir.join("squib-vmm");
        assert!(
            bin.exists(),
            "{} is missing: build it with `cargo build -p squib-vmm`",
            bin.display()
        );
        bin
    }

    fn scratch_dir(name: &str) -> PathBuf {
        let base = vm_env::results_dir().unwrap_or_else(std::env::temp_dir);
        let dir = base.join(format!("vmm-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// An initramfs whose init runs `script` (a shell script body) as /squib-test.
    fn initramfs_with_script(dir: &Path, script: &str) -> PathBuf {
        let extra = dir.join("extra");
        fs::create_dir_all(&extra).unwrap();
        let path = extra.join("squib-test");
        fs::write(&path, format!("#!/bin/sh\n{script}\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
        let out = dir.join("initramfs.cpio");
        vm_env::make_initramfs(&out, Some(&extra)).unwrap();
        out
    }

    /// One HTTP/1.1 exchange over the API socket; returns (status, body).
    fn api(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut stream = UnixStream::connect(sock).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let body = body.unwrap_or("");
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status: u16 = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("malformed response to {method} {path}: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    /// A running squib-vmm; killed (and its socket removed) on drop if still alive.
    struct Vmm {
        child: Child,
        sock: PathBuf,
        serial: PathBuf,
        started: Instant,
    }

    impl Vmm {
        fn spawn(dir: &Path) -> Self {
            // Unix sockets cannot be bound on the VM test host's 9p results share: keep the socket
            // on a local file system.
            let sock_dir = std::env::temp_dir().join(format!(
                "squib-vmm-sock-{}-{}",
                std::process::id(),
                dir.file_name().unwrap().to_string_lossy()
            ));
            fs::create_dir_all(&sock_dir).unwrap();
            let sock = sock_dir.join("api.sock");
            let serial = dir.join("serial.log");
            let log = fs::File::create(dir.join("vmm.log")).unwrap();
            let started = Instant::now();
            let child = Command::new(vmm_binary())
                .arg("--api-sock")
                .arg(&sock)
                .arg("--serial-out")
                .arg(&serial)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap();
            let vmm = Self {
                child,
                sock,
                serial,
                started,
            };
            // The socket file appears at bind(), a moment before listen(): wait for a connection.
            let deadline = Instant::now() + Duration::from_secs(30);
            while UnixStream::connect(&vmm.sock).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "squib-vmm does not accept on its socket"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            vmm
        }

        fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
            api(&self.sock, method, path, body)
        }

        /// Configures and starts a VM the way Firecracker's getting-started guide does.
        fn boot(&self, vcpus: u8, initrd: &Path, boot_args: &str) {
            self.boot_kernel(
                &vm_env::test_kernel().unwrap(),
                vcpus,
                Some(initrd),
                boot_args,
            );
        }

        /// Like [`Vmm::boot`] with a kernel image of the caller's choice.
        fn boot_kernel(&self, kernel: &Path, vcpus: u8, initrd: Option<&Path>, boot_args: &str) {
            let (status, body) = self.api(
                "PUT",
                "/machine-config",
                Some(&format!("{{\"vcpu_count\":{vcpus},\"mem_size_mib\":256}}")),
            );
            assert_eq!(status, 204, "machine-config: {body}");
            let initrd = initrd
                .map(|p| format!(",\"initrd_path\":\"{}\"", p.display()))
                .unwrap_or_default();
            let boot = format!(
                "{{\"kernel_image_path\":\"{}\"{initrd},\"boot_args\":\"{boot_args}\"}}",
                kernel.display(),
            );
            let (status, body) = self.api("PUT", "/boot-source", Some(&boot));
            assert_eq!(status, 204, "boot-source: {body}");
            let (status, body) = self.api(
                "PUT",
                "/actions",
                Some("{\"action_type\":\"InstanceStart\"}"),
            );
            assert_eq!(status, 204, "InstanceStart: {body}");
        }

        fn serial_log(&self) -> String {
            fs::read_to_string(&self.serial).unwrap_or_default()
        }

        /// What squib-vmm itself logged (its stderr).
        fn vmm_log(&self) -> String {
            fs::read_to_string(self.serial.with_file_name("vmm.log")).unwrap_or_default()
        }

        /// Waits until the serial log satisfies `pred`; returns the time since the VMM started.
        fn wait_serial(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> Duration {
            let deadline = Instant::now() + BOOT_TIMEOUT;
            loop {
                if pred(&self.serial_log()) {
                    return self.started.elapsed();
                }
                if let Some(status) = self.child.try_wait().unwrap() {
                    panic!(
                        "squib-vmm exited ({status}) before {what}; serial log:\n{}",
                        self.serial_log()
                    );
                }
                assert!(
                    Instant::now() < deadline,
                    "no {what} within {BOOT_TIMEOUT:?}; serial log:\n{}",
                    self.serial_log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }

        fn wait_exit(&mut self) -> ExitStatus {
            let deadline = Instant::now() + BOOT_TIMEOUT;
            loop {
                if let Some(status) = self.child.try_wait().unwrap() {
                    return status;
                }
                assert!(
                    Instant::now() < deadline,
                    "squib-vmm still running after {BOOT_TIMEOUT:?}; serial log:\n{}",
                    self.serial_log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    impl Drop for Vmm {
        fn drop(&mut self) {
            if self.child.try_wait().ok().flatten().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
            let _ = fs::remove_file(&self.sock);
            if let Some(parent) = self.sock.parent() {
                let _ = fs::remove_dir(parent);
            }
        }
    }

    fn count(log: &str, needle: &str) -> usize {
        log.matches(needle).count()
    }

    #[test]
    fn test_vmm_boots_guest_to_init_through_api_and_exits_on_reboot() {
        let dir = scratch_dir("boot");
        let initrd = vm_env::test_initramfs().unwrap();
        let mut vmm = Vmm::spawn(&dir);
        let (status, body) = vmm.api("GET", "/", None);
        assert_eq!(status, 200);
        assert!(body.contains("\"state\":\"Not started\""), "{body}");
        vmm.boot(1, &initrd, BOOT_ARGS);
        let (status, body) = vmm.api("GET", "/", None);
        assert_eq!(status, 200);
        assert!(body.contains("\"state\":\"Running\""), "{body}");
        let to_marker = vmm.wait_serial("init marker", |log| log.contains(INIT_READY_MARKER));
        eprintln!(
            "vm_vmm: VMM start -> init marker: {:.2} s",
            to_marker.as_secs_f64()
        );
        let status = vmm.wait_exit();
        assert!(
            status.success(),
            "guest reboot should end squib-vmm with 0, got {status}"
        );
        assert!(!vmm.sock.exists(), "the API socket is removed on exit");
        let log = vmm.serial_log();
        assert!(log.contains("reboot: Restarting system"), "{log}");
    }

    fn boot_and_count_cpus(vcpus: u8) {
        let dir = scratch_dir(&format!("smp{vcpus}"));
        let initrd = initramfs_with_script(
            &dir,
            "echo \"NPROC=$(nproc) CPUINFO=$(grep -c ^processor /proc/cpuinfo)\"; \
             echo \"CLOCKEVENT=$(cat /sys/devices/system/clockevents/clockevent0/current_device)\"; \
             dmesg | grep -i x2apic",
        );
        let mut vmm = Vmm::spawn(&dir);
        vmm.boot(vcpus, &initrd, BOOT_ARGS);
        vmm.wait_serial("test exit marker", |log| log.contains(TEST_EXIT_MARKER));
        let log = vmm.serial_log();
        let expected = format!("NPROC={vcpus} CPUINFO={vcpus}");
        assert!(log.contains(&expected), "expected {expected}:\n{log}");
        // The TSC-deadline timer squib advertises drives the guest's ticks, and the guest's
        // local APIC runs in x2APIC mode: both keep timer events and EOIs to plain MSR exits.
        assert!(
            log.contains("CLOCKEVENT=lapic-deadline"),
            "the guest's clock event device is not the TSC-deadline local APIC timer:\n{log}"
        );
        assert!(
            log.contains("x2apic enabled"),
            "the guest did not switch its local APIC to x2APIC mode:\n{log}"
        );
        assert!(log.contains(&format!("{TEST_EXIT_MARKER}0")), "{log}");
        assert!(vmm.wait_exit().success());
    }

    #[test]
    fn test_vmm_guest_sees_two_vcpus() {
        boot_and_count_cpus(2);
    }

    #[test]
    fn test_vmm_guest_sees_four_vcpus() {
        boot_and_count_cpus(4);
    }

    #[test]
    fn test_vmm_pause_stops_guest_and_resume_continues_it() {
        let dir = scratch_dir("pause");
        // Ticks every 100 ms of guest time, 150 of them: long enough to pause in the middle.
        let initrd = initramfs_with_script(
            &dir,
            "i=0; while [ $i -lt 150 ]; do echo TICK $i; i=$((i+1)); sleep 0.1; done",
        );
        let mut vmm = Vmm::spawn(&dir);
        vmm.boot(2, &initrd, BOOT_ARGS);
        vmm.wait_serial("TICK 3", |log| log.contains("TICK 3\r\n"));

        let (status, body) = vmm.api("PATCH", "/vm", Some("{\"state\":\"Paused\"}"));
        assert_eq!(status, 204, "pause: {body}");
        let (_, body) = vmm.api("GET", "/", None);
        assert!(body.contains("\"state\":\"Paused\""), "{body}");
        let paused_ticks = count(&vmm.serial_log(), "TICK ");
        std::thread::sleep(Duration::from_secs(3));
        let still = count(&vmm.serial_log(), "TICK ");
        assert_eq!(paused_ticks, still, "the guest printed while paused");

        let (status, body) = vmm.api("PATCH", "/vm", Some("{\"state\":\"Resumed\"}"));
        assert_eq!(status, 204, "resume: {body}");
        let (_, body) = vmm.api("GET", "/", None);
        assert!(body.contains("\"state\":\"Running\""), "{body}");
        vmm.wait_serial("ticks after resume", |log| count(log, "TICK ") > still + 3);
        vmm.wait_serial("test exit marker", |log| log.contains(TEST_EXIT_MARKER));
        assert!(vmm.wait_exit().success());
    }

    #[test]
    fn test_vmm_guest_poweroff_exits_zero() {
        let dir = scratch_dir("poweroff");
        let initrd = initramfs_with_script(&dir, "echo POWERING-OFF; poweroff -f");
        let mut vmm = Vmm::spawn(&dir);
        vmm.boot(1, &initrd, BOOT_ARGS);
        let status = vmm.wait_exit();
        let log = vmm.serial_log();
        assert!(
            status.success(),
            "power-off should end squib-vmm with 0, got {status}:\n{log}"
        );
        // Without ACPI the kernel has no power-off method and halts instead.
        assert!(
            log.contains("POWERING-OFF") && log.contains("reboot: System halted"),
            "{log}"
        );
        assert!(!vmm.sock.exists());
    }

    #[test]
    fn test_vmm_guest_kernel_panic_exits_nonzero_with_panic_in_log() {
        let dir = scratch_dir("panic");
        let initrd = vm_env::test_initramfs().unwrap();
        let mut vmm = Vmm::spawn(&dir);
        // busybox run as init without arguments prints its usage and exits: the kernel panics
        // with "Attempted to kill init!".
        vmm.boot(1, &initrd, &format!("{BOOT_ARGS} rdinit=/bin/busybox"));
        let status = vmm.wait_exit();
        let log = vmm.serial_log();
        assert!(
            !status.success(),
            "a guest panic must not end squib-vmm with 0:\n{log}"
        );
        assert!(
            log.contains("Kernel panic - not syncing: Attempted to kill init!"),
            "{log}"
        );
        assert!(!vmm.sock.exists());
    }

    #[test]
    fn test_vmm_boots_bzimage_through_boot_params_to_init_and_exits_zero() {
        let dir = scratch_dir("bzimage");
        let bzimage = vm_env::test_bzimage().unwrap();
        let initrd = vm_env::test_initramfs().unwrap();
        let mut vmm = Vmm::spawn(&dir);
        // earlyprintk: the decompressor reports its errors on the serial port and the kernel
        // prints from its first message on, so a boot that stops shows where on the console.
        // Without it a bzImage prints nothing until the kernel's console starts: under load in
        // the VM test host the decompression alone took 17-30 s of that silence.
        vmm.boot_kernel(
            &bzimage,
            1,
            Some(&initrd),
            &format!("{BOOT_ARGS} earlyprintk=serial"),
        );
        let to_console = vmm.wait_serial("console output", |log| !log.is_empty());
        let to_marker = vmm.wait_serial("init marker", |log| log.contains(INIT_READY_MARKER));
        eprintln!(
            "vm_vmm: bzImage: VMM start -> first console line {:.2} s, init marker {:.2} s",
            to_console.as_secs_f64(),
            to_marker.as_secs_f64()
        );
        let status = vmm.wait_exit();
        let log = vmm.serial_log();
        assert!(
            status.success(),
            "the bzImage guest's reboot should end squib-vmm with 0, got {status}:\n{log}"
        );
        assert!(log.contains("reboot: Restarting system"), "{log}");
        // The image was entered through the 64-bit boot protocol, not PVH.
        let vmm_log = vmm.vmm_log();
        assert!(vmm_log.contains("Linux64"), "{vmm_log}");
        assert!(!vmm.sock.exists());
    }

    /// A minimal x86_64 ELF executable without a PVH note, loaded at 1 MiB, whose entry point
    /// is `ud2`. squib enters it through the 64-bit protocol with an 8-byte IDT, so the #UD
    /// cannot be delivered, nor the #GP and #DF that follow: the vCPU triple-faults.
    fn triple_fault_elf() -> (Vec<u8>, u64) {
        const LOAD: u64 = 0x10_0000;
        const EHDR: u16 = 64;
        const PHDR: u16 = 56;
        let entry = LOAD + u64::from(EHDR + PHDR);
        let code = [0x0f, 0x0b, 0xf4, 0xeb, 0xfd]; // ud2; 1: hlt; jmp 1b
        let size = u64::from(EHDR + PHDR) + code.len() as u64;
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF");
        elf.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little-endian, version 1, System V
        elf.extend_from_slice(&[0; 8]);
        elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf.extend_from_slice(&1u32.to_le_bytes());
        elf.extend_from_slice(&entry.to_le_bytes());
        elf.extend_from_slice(&u64::from(EHDR).to_le_bytes()); // e_phoff
        elf.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        elf.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        elf.extend_from_slice(&EHDR.to_le_bytes());
        elf.extend_from_slice(&PHDR.to_le_bytes());
        elf.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        elf.extend_from_slice(&[0; 6]); // e_shentsize, e_shnum, e_shstrndx
        assert_eq!(elf.len(), usize::from(EHDR));
        elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
        elf.extend_from_slice(&0u64.to_le_bytes()); // p_offset
        elf.extend_from_slice(&LOAD.to_le_bytes()); // p_vaddr
        elf.extend_from_slice(&LOAD.to_le_bytes()); // p_paddr
        elf.extend_from_slice(&size.to_le_bytes()); // p_filesz
        elf.extend_from_slice(&size.to_le_bytes()); // p_memsz
        elf.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
        assert_eq!(elf.len(), usize::from(EHDR + PHDR));
        elf.extend_from_slice(&code);
        (elf, entry)
    }

    #[test]
    fn test_vmm_guest_triple_fault_exits_with_its_own_status_and_logs_registers() {
        let dir = scratch_dir("triple-fault");
        let (elf, entry) = triple_fault_elf();
        let kernel = dir.join("triple-fault.elf");
        fs::write(&kernel, elf).unwrap();
        let mut vmm = Vmm::spawn(&dir);
        vmm.boot_kernel(&kernel, 1, None, BOOT_ARGS);
        let status = vmm.wait_exit();
        let log = vmm.vmm_log();
        // 3 is VmStopReason::GuestTripleFault's status: neither a reboot (0), a guest panic (1)
        // nor a VMM failure (2).
        assert_eq!(status.code(), Some(3), "{log}");
        assert!(log.contains("ERROR"), "{log}");
        assert!(
            log.contains("guest triple fault: the guest crashed"),
            "{log}"
        );
        assert!(vmm.serial_log().is_empty(), "the guest never printed");
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap();
        if cpuinfo.contains("AuthenticAMD") {
            // KVM on AMD INITs the vCPU when it reports the triple fault: the registers at the
            // fault are gone, and squib says so rather than logging the INIT state.
            assert!(log.contains("registers at the fault are unknown"), "{log}");
            assert!(!log.contains("rip=0xfff0"), "{log}");
        } else {
            // Where it faulted, and the long-mode state squib set up for the 64-bit entry.
            for field in [
                format!("rip={entry:#x}"),
                "cr3=0x9000".to_string(),
                "efer=0x500".to_string(),
                "rsp=".to_string(),
                "cr0=".to_string(),
                "cr4=".to_string(),
            ] {
                assert!(
                    log.contains(&field),
                    "{field} missing from the VMM log:\n{log}"
                );
            }
        }
        assert!(!vmm.sock.exists());
    }
}
