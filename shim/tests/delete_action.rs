//! The `delete` action cleans up after a shim server that died: its VM socket and its scratch
//! directory go, and containerd gets a DeleteResponse saying the task was killed.

use std::process::Command;

use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::Message;

#[test]
fn test_delete_action_removes_leftovers_and_reports_kill() {
    let base = std::env::temp_dir().join(format!("squib-shim-delete-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let bundle = base.join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    let sock = base.join("vm.vsock");
    std::fs::write(&sock, b"").unwrap();
    let scratch = bundle.join("squib-layers");
    std::fs::create_dir_all(&scratch).unwrap();
    // A pid that is not a shim: it must not be signalled.
    let bystander = Command::new("sleep").arg("30").spawn().unwrap();
    let record = serde_json::json!({
        "shim_pid": bystander.id(),
        "vsock_uds": sock,
        "scratch": scratch,
    });
    std::fs::write(bundle.join("squib-cleanup.json"), record.to_string()).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_containerd-shim-squib-v2"))
        .args([
            "-namespace",
            "default",
            "-id",
            "c1",
            "-address",
            "/nonexistent.sock",
            "delete",
        ])
        .current_dir(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let resp = DeleteResponse::parse_from_bytes(&out.stdout).unwrap();
    assert_eq!(resp.exit_status, 137);
    assert!(resp.exited_at.seconds > 0);
    assert!(!sock.exists());
    assert!(!scratch.exists());
    assert!(!bundle.join("squib-cleanup.json").exists());

    let mut bystander = bystander;
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "an unrelated process was killed"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();
    std::fs::remove_dir_all(&base).unwrap();
}
