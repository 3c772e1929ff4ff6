//! VM test: the squib guest kernel boots with the busybox test initramfs under QEMU's
//! microvm machine on this machine's KVM and reaches its init, and a test script added to
//! the initramfs runs and reports its exit status.
//!
//! A third test gives the guest virtio-mmio devices (block, rng, vsock) declared on the kernel
//! command line and checks the container-facing features of the kernel from inside.
//!
//! QEMU's microvm has no i8042, so the kernel is told to reset through a triple fault
//! (`reboot=t`); `-no-reboot` turns that reset into QEMU's exit. `no_timer_check` keeps a
//! starved emulated L1 from failing the kernel's IO-APIC timer test.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use squib_tests::process::output_with_timeout;
use squib_tests::vm_env::{self, INIT_READY_MARKER, TEST_EXIT_MARKER};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

fn scratch_dir(name: &str) -> std::io::Result<PathBuf> {
    let base = vm_env::results_dir().unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("guest-kernel-boot-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Boots kernel + initramfs under `qemu-system-x86_64 -M microvm -accel kvm` and returns the
/// console log, or an error saying how QEMU failed to exit cleanly in time.
fn boot(initramfs: &Path, dir: &Path) -> Result<String, Box<dyn std::error::Error>> {
    boot_with(initramfs, dir, "microvm", &[])
}

/// [`boot`] with machine options and extra QEMU arguments (devices).
fn boot_with(
    initramfs: &Path,
    dir: &Path,
    machine: &str,
    extra_args: &[String],
) -> Result<String, Box<dyn std::error::Error>> {
    let kernel = vm_env::test_kernel()?;
    let console = dir.join("console.log");
    let out = output_with_timeout(
        Command::new("qemu-system-x86_64")
            .args([
                "-M",
                machine,
                "-accel",
                "kvm",
                "-cpu",
                "host",
                "-m",
                "256",
                "-smp",
                "1",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
                "-serial",
                &format!("file:{}", console.display()),
                "-kernel",
                &kernel.to_string_lossy(),
                "-initrd",
                &initramfs.to_string_lossy(),
                "-append",
                "console=ttyS0 reboot=t panic=-1 no_timer_check",
            ])
            .args(extra_args),
        BOOT_TIMEOUT,
    )?;
    let log = fs::read_to_string(&console).unwrap_or_default();
    if out.timed_out || !out.status.success() {
        return Err(format!(
            "qemu {} after {:?} (timed out: {}); stderr: {}; console log {}:\n{log}",
            out.status,
            out.elapsed,
            out.timed_out,
            String::from_utf8_lossy(&out.stderr),
            console.display(),
        )
        .into());
    }
    eprintln!("guest boot and reset took {:?}", out.elapsed);
    Ok(log)
}

#[test]
fn test_guest_kernel_reaches_init_marker_under_qemu_microvm() {
    let dir = scratch_dir("plain").unwrap();
    let log = boot(&vm_env::test_initramfs().unwrap(), &dir).unwrap();
    assert!(
        log.lines().any(|l| l.trim_end() == INIT_READY_MARKER),
        "no {INIT_READY_MARKER} line in the console log:\n{log}"
    );
    assert!(
        !log.contains(TEST_EXIT_MARKER),
        "plain initramfs ran a test script:\n{log}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_guest_initramfs_runs_added_test_script_and_reports_its_status() {
    let dir = scratch_dir("script").unwrap();
    let extra = dir.join("extra");
    fs::create_dir_all(&extra).unwrap();
    let script = extra.join("squib-test");
    fs::write(
        &script,
        "#!/bin/sh\necho \"squib-test ran as pid $$ with $(nproc) cpu on $(uname -r)\"\n\
         grep -q ' /proc proc ' /proc/mounts && echo squib-test-proc-mounted\nexit 7\n",
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let initramfs = dir.join("initramfs.cpio");
    vm_env::make_initramfs(&initramfs, Some(&extra)).unwrap();
    let log = boot(&initramfs, &dir).unwrap();
    let lines: Vec<&str> = log.lines().map(str::trim_end).collect();
    let ready = lines.iter().position(|l| *l == INIT_READY_MARKER);
    let ran = lines
        .iter()
        .position(|l| l.starts_with("squib-test ran as pid"));
    let proc_ok = lines.iter().position(|l| *l == "squib-test-proc-mounted");
    let exit = lines
        .iter()
        .position(|l| *l == format!("{TEST_EXIT_MARKER}7"));
    assert!(
        ready.is_some() && ready < ran && ran < proc_ok && proc_ok < exit,
        "expected marker, script output, proc check and exit status 7 in order:\n{log}"
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_guest_kernel_finds_cmdline_virtio_devices_and_container_features() {
    let dir = scratch_dir("features").unwrap();
    let extra = dir.join("extra");
    fs::create_dir_all(extra.join("mnt")).unwrap();
    let script = extra.join("squib-test");
    // Each check prints one line; the host side compares the whole set.
    fs::write(
        &script,
        r#"#!/bin/sh
for d in /sys/bus/virtio/devices/*; do echo "virtio-id $(cat $d/device)"; done
mount -t ext4 -o ro /dev/vda /mnt && echo "disk says $(cat /mnt/hello)"
head -c 32 /dev/hwrng | wc -c | sed 's/^ */hwrng-bytes /'
for fs in ext4 erofs overlay tmpfs devtmpfs cgroup2 proc sysfs fuse; do
    grep -qw "$fs" /proc/filesystems && echo "fs $fs"
done
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup &&
    echo "cgroup2 controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
test -e /sys/fs/cgroup/cgroup.freeze || echo "no root cgroup.freeze (expected)"
mkdir /sys/fs/cgroup/t && test -e /sys/fs/cgroup/t/cgroup.freeze && echo "cgroup freezer"
unshare -m -u -i -n -p -f sh -c 'echo "unshare pid $$"'
grep -q '^Seccomp:' /proc/self/status && echo seccomp
test -c /dev/ptmx && echo ptmx
exit 0
"#,
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let initramfs = dir.join("initramfs.cpio");
    vm_env::make_initramfs(&initramfs, Some(&extra)).unwrap();

    let disk_src = dir.join("disk");
    fs::create_dir_all(&disk_src).unwrap();
    fs::write(disk_src.join("hello"), "hello from the host\n").unwrap();
    let disk = dir.join("disk.ext4");
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&disk_src)
        .arg(&disk)
        .arg("8M")
        .output()
        .unwrap();
    assert!(
        mkfs.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&mkfs.stderr)
    );

    // acpi=off makes QEMU declare its virtio-mmio transports on the kernel command line.
    let devices = [
        "-drive".to_string(),
        format!(
            "file={},format=raw,if=none,id=disk0,readonly=on",
            disk.display()
        ),
        "-device".to_string(),
        "virtio-blk-device,drive=disk0".to_string(),
        "-device".to_string(),
        "virtio-rng-device".to_string(),
        "-device".to_string(),
        "vhost-vsock-device,guest-cid=3".to_string(),
    ];
    let log = boot_with(&initramfs, &dir, "microvm,acpi=off", &devices).unwrap();
    let lines: Vec<&str> = log.lines().map(str::trim_end).collect();
    for want in [
        "virtio-id 0x0002",
        "virtio-id 0x0004",
        "virtio-id 0x0013",
        "disk says hello from the host",
        "hwrng-bytes 32",
        "fs ext4",
        "fs erofs",
        "fs overlay",
        "fs tmpfs",
        "fs devtmpfs",
        "fs cgroup2",
        "fs fuse",
        "cgroup freezer",
        "unshare pid 1",
        "seccomp",
        "ptmx",
        "SQUIB-TEST-EXIT 0",
    ] {
        assert!(
            lines.contains(&want),
            "missing line '{want}' in the console log:\n{log}"
        );
    }
    let controllers = lines
        .iter()
        .find_map(|l| l.strip_prefix("cgroup2 controllers: "))
        .unwrap_or_else(|| panic!("no cgroup2 controllers line:\n{log}"));
    for c in ["cpu", "io", "memory", "pids"] {
        assert!(
            controllers.split_whitespace().any(|x| x == c),
            "cgroup2 controller {c} missing from '{controllers}'"
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}
