//! Host tests of the VM test host tool itself (`tests/vmhost/run`): each test boots its own
//! L1 machine from this host, so these run on the host, never inside L1.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use squib_tests::process::{ProcessError, TimedOutput, output_with_timeout};
use squib_tests::vm_env::repo_root;

const EXIT_SETUP: i32 = 249;
const EXIT_TIMEOUT: i32 = 250;

fn vmhost(cwd: &Path, opts: &[&str], cmd: &[&OsStr]) -> Result<TimedOutput, ProcessError> {
    let mut c = Command::new(repo_root().join("tests/vmhost/run"));
    c.current_dir(cwd)
        .args(["--mem", "1024"])
        .args(opts)
        .arg("--")
        .args(cmd);
    output_with_timeout(&mut c, Duration::from_secs(600))
}

fn scratch(name: &str) -> std::io::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("squib-vmhost-test-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn describe(out: &TimedOutput) -> String {
    format!(
        "status {} after {:?}, timed out {}\nstdout: {}\nstderr: {}",
        out.status,
        out.elapsed,
        out.timed_out,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn test_vmhost_returns_exact_streams_args_env_cwd_and_status() {
    let dir = scratch("exact").unwrap();
    // Arguments and environment with bytes that shells, quoting and UTF-8 all trip over.
    let arg_out = OsStr::from_bytes(b" two  spaces 'single' \"double\" $HOME `x` \\ \n\t\xff\n\n");
    let arg_err = OsStr::from_bytes(b"-n");
    let env_val = OsStr::from_bytes(b"a=b; $(false) \x01\xfe end\n");
    // A larger blob checks that streaming loses and reorders nothing.
    let blob: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    fs::write(dir.join("blob"), &blob).unwrap();
    let script = "printf '%s' \"$1\"; cat blob; printf '%s' \"$SQUIB_ODD_VALUE\"; pwd; \
                  printf '%s|' \"$2\" >&2; exit 3";
    let mut c = Command::new(repo_root().join("tests/vmhost/run"));
    c.current_dir(&dir)
        .env("SQUIB_ODD_VALUE", env_val)
        .args(["--mem", "1024", "--", "sh", "-c", script, "sh"])
        .arg(arg_out)
        .arg(arg_err);
    let out = output_with_timeout(&mut c, Duration::from_secs(600)).unwrap();

    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    let mut expected = arg_out.as_bytes().to_vec();
    expected.extend_from_slice(&blob);
    expected.extend_from_slice(env_val.as_bytes());
    expected.extend_from_slice(dir.canonicalize().unwrap().as_os_str().as_bytes());
    expected.push(b'\n');
    assert!(out.stdout == expected, "stdout differs: {}", describe(&out));
    assert_eq!(out.stderr, b"-n|", "{}", describe(&out));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_vmhost_aarch64_returns_exact_streams_args_env_cwd_and_status() {
    // The arm64 L1 cannot execute the host's x86_64 programs: `sh` here is the applet of the
    // arm64 busybox that the tool provides, and so are printf, pwd and test.
    let dir = scratch("aarch64").unwrap();
    let arg_out = OsStr::from_bytes(b" two  spaces 'single' \"double\" $HOME `x` \\ \n\t\xff\n\n");
    let env_val = OsStr::from_bytes(b"a=b; $(false) \x01\xfe end\n");
    let script = "printf '%s' \"$1\"; printf '%s' \"$SQUIB_ODD_VALUE\"; pwd; \
                  test -c /dev/kvm || exit 9; printf '%s|' \"$2\" >&2; exit 5";
    let mut c = Command::new(repo_root().join("tests/vmhost/run"));
    c.current_dir(&dir)
        .env("SQUIB_ODD_VALUE", env_val)
        .args([
            "--arch", "aarch64", "--mem", "1024", "--", "sh", "-c", script, "sh",
        ])
        .arg(arg_out)
        .arg("-n");
    let out = output_with_timeout(&mut c, Duration::from_secs(600)).unwrap();

    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    let mut expected = arg_out.as_bytes().to_vec();
    expected.extend_from_slice(env_val.as_bytes());
    expected.extend_from_slice(dir.canonicalize().unwrap().as_os_str().as_bytes());
    expected.push(b'\n');
    assert!(out.stdout == expected, "stdout differs: {}", describe(&out));
    assert_eq!(out.stderr, b"-n|", "{}", describe(&out));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_vmhost_returns_zero_and_keeps_writes_outside_results_in_l1() {
    let dir = scratch("writes").unwrap();
    let results = dir.join("results");
    let leak_tmp = dir.join("leak-in-cwd");
    let leak_var = PathBuf::from(format!("/var/tmp/squib-vmhost-leak-{}", std::process::id()));
    let script = format!(
        "set -e; echo in-l1 > '{}'; echo in-l1 > '{}'; echo kept > \"$SQUIB_VMHOST_RESULTS/kept\"; \
         test -c /dev/kvm; grep -q cgroup2 /proc/mounts; exit 0",
        leak_tmp.display(),
        leak_var.display()
    );
    let out = vmhost(
        &dir,
        &["--results", &results.to_string_lossy()],
        &[OsStr::new("sh"), OsStr::new("-c"), OsStr::new(&script)],
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_eq!(fs::read_to_string(results.join("kept")).unwrap(), "kept\n");
    assert!(
        !leak_tmp.exists(),
        "a write in L1 reached the host at {}",
        leak_tmp.display()
    );
    assert!(
        !leak_var.exists(),
        "a write in L1 reached the host at {}",
        leak_var.display()
    );
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_vmhost_reports_signal_death_as_128_plus_signal() {
    let dir = scratch("signal").unwrap();
    let out = vmhost(
        &dir,
        &[],
        &[
            OsStr::new("sh"),
            OsStr::new("-c"),
            OsStr::new("kill -KILL $$"),
        ],
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(137), "{}", describe(&out));
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_vmhost_kills_l1_at_timeout_and_says_so() {
    let dir = scratch("timeout").unwrap();
    let out = vmhost(
        &dir,
        &["--timeout", "20"],
        &[OsStr::new("sleep"), OsStr::new("600")],
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_TIMEOUT), "{}", describe(&out));
    assert!(out.elapsed < Duration::from_secs(120), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("timed out after 20 s"),
        "{}",
        describe(&out)
    );
    let pid = stderr
        .split("killed QEMU (pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse::<u32>().ok())
        .unwrap_or_else(|| panic!("no QEMU pid in the message: {}", describe(&out)));
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU pid {pid} still exists"
    );
    // The console log of the killed L1 is kept and named.
    let log = stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmhost: L1 console log: "))
        .unwrap_or_else(|| panic!("no console log path: {}", describe(&out)));
    assert!(Path::new(log).is_file(), "console log {log} missing");
    fs::remove_dir_all(Path::new(log).parent().unwrap()).unwrap();
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_vmhost_kills_l1_whose_heartbeat_stops_and_keeps_one_that_beats() {
    let dir = scratch("heartbeat").unwrap();
    let results = dir.join("results");
    let beat = results.join("beat");
    // Six beats 5 s apart outlive the 15 s limit; then the beats stop, as in a stalled L1.
    let script = "for i in 1 2 3 4 5 6; do date > \"$SQUIB_VMHOST_RESULTS/beat\"; sleep 5; done; \
                  echo beats-done; sleep 600";
    let out = vmhost(
        &dir,
        &[
            "--timeout",
            "400",
            "--results",
            results.to_str().unwrap(),
            "--heartbeat",
            beat.to_str().unwrap(),
            "--heartbeat-timeout",
            "15",
        ],
        &[OsStr::new("sh"), OsStr::new("-c"), OsStr::new(script)],
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(EXIT_TIMEOUT), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("beats-done"),
        "killed while still beating: {}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("L1 stalled") && stderr.contains("not written for 15 s"),
        "{}",
        describe(&out)
    );
    if let Some(log) = stderr
        .lines()
        .find_map(|l| l.strip_prefix("vmhost: L1 console log: "))
    {
        let _ = fs::remove_dir_all(Path::new(log).parent().unwrap());
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn test_vmhost_rejects_missing_command_without_booting() {
    let dir = scratch("usage").unwrap();
    let mut c = Command::new(repo_root().join("tests/vmhost/run"));
    c.current_dir(&dir).args(["--timeout", "5"]);
    let out = output_with_timeout(&mut c, Duration::from_secs(60)).unwrap();
    assert_eq!(out.status.code(), Some(EXIT_SETUP), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no command given"),
        "{}",
        describe(&out)
    );
    fs::remove_dir_all(&dir).unwrap();
}
