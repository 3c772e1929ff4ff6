//! containerd-shim-squib-v2: the containerd task v2 shim that runs each container in its own
//! microVM, with the VMM embedded in the shim process.
//!
//! containerd runs the binary three ways:
//! - `… -id ID start`: spawn the long-lived server for this container, print its socket address;
//! - `… -id ID -socket ADDR` (no action): the server itself, serving the task API over ttrpc;
//! - `… -id ID delete`: clean up after a server that died (its VM died with it; its sockets,
//!   a leftover scratch mount and the process itself if it hangs are removed here).
//!
//! The server answers both `containerd.task.v2.Task` (containerd 1.6 and 1.7) and
//! `containerd.task.v3.Task` (containerd 2.x): the messages are the same.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use containerd_shim::Flags;
use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim_protos::api::DeleteResponse;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::create_task;
use containerd_shim_protos::ttrpc::r#async::Server;
use containerd_shim_squib_v2::service::{
    CLEANUP_FILE, CleanupRecord, ContainerdEvents, TaskService,
};

const TASK_V2: &str = "containerd.task.v2.Task";
const TASK_V3: &str = "containerd.task.v3.Task";

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let flags = match containerd_shim::parse(args.get(1..).unwrap_or_default()) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("containerd-shim-squib-v2: {e}");
            return ExitCode::FAILURE;
        }
    };
    if flags.version {
        println!("containerd-shim-squib-v2 {}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match flags.action.as_str() {
        "start" => start(&flags),
        "delete" => delete(&flags),
        "" => serve(&flags),
        other => Err(anyhow::anyhow!("unknown action {other:?}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("containerd-shim-squib-v2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn socket_path(address: &str) -> &Path {
    Path::new(address.strip_prefix("unix://").unwrap_or(address))
}

/// Starts the server for this container and prints its address for containerd.
fn start(flags: &Flags) -> anyhow::Result<()> {
    // containerd may write the runtime options to stdin; they also arrive with Create.
    if !std::io::stdin().is_terminal() {
        let mut ignored = Vec::new();
        let _ = std::io::stdin().take(10 << 20).read_to_end(&mut ignored);
    }
    let address = containerd_shim::socket_address(&flags.address, &flags.namespace, &flags.id);
    let path = socket_path(&address).to_path_buf();
    if std::os::unix::net::UnixStream::connect(&path).is_err() {
        let _ = std::fs::remove_file(&path);
        let exe = std::env::current_exe().context("locating this binary")?;
        let mut cmd = std::process::Command::new(exe);
        cmd.args(["-namespace", &flags.namespace, "-id", &flags.id])
            .args(["-address", &flags.address, "-socket", &address]);
        if !flags.publish_binary.is_empty() {
            cmd.args(["-publish-binary", &flags.publish_binary]);
        }
        if flags.debug {
            cmd.arg("-debug");
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .context("starting the shim server")?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait().context("waiting for the shim server")? {
                bail!("the shim server exited with {status} before listening on {address}");
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the shim server did not listen on {address} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    std::fs::write("address", &address).context("writing the address file")?;
    let mut out = std::io::stdout();
    out.write_all(address.as_bytes())
        .and_then(|()| out.flush())
        .context("writing the address")?;
    Ok(())
}

/// Whether `pid` runs this same binary (so a recycled pid is never killed).
fn is_our_shim(pid: u32) -> bool {
    let Ok(exe) = std::fs::read_link(format!("/proc/{pid}/exe")) else {
        return false;
    };
    let ours = std::env::current_exe().ok();
    ours.is_some_and(|o| o == exe)
}

/// Cleans up after a server that is gone or hung, and reports the task as killed.
fn delete(flags: &Flags) -> anyhow::Result<()> {
    let bundle = if flags.bundle.is_empty() {
        std::env::current_dir().context("reading the working directory")?
    } else {
        PathBuf::from(&flags.bundle)
    };
    let record_path = bundle.join(CLEANUP_FILE);
    if let Ok(text) = std::fs::read(&record_path) {
        let record: CleanupRecord = serde_json::from_slice(&text).unwrap_or_default();
        if record.shim_pid != 0
            && record.shim_pid != std::process::id()
            && is_our_shim(record.shim_pid)
            && let Ok(pid) = i32::try_from(record.shim_pid)
        {
            // The VM lives inside the server process: ending it ends the VM.
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            for _ in 0..100 {
                if nix::sys::signal::kill(pid, None).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if !record.vsock_uds.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&record.vsock_uds);
        }
        if !record.scratch.as_os_str().is_empty() && record.scratch.exists() {
            let _ = nix::mount::umount2(&record.scratch, nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_dir(&record.scratch);
        }
        let _ = std::fs::remove_file(&record_path);
    }
    // The dead server's ttrpc socket (outside the bundle, so containerd leaves it): remove it
    // unless something still answers there.
    if let Ok(address) = std::fs::read_to_string(bundle.join("address")) {
        let path = socket_path(address.trim());
        if !path.as_os_str().is_empty() && std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let response = DeleteResponse {
        pid: 0,
        exit_status: 137,
        exited_at: MessageField::some(
            containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp {
                seconds: i64::try_from(now.as_secs()).unwrap_or(i64::MAX),
                nanos: i32::try_from(now.subsec_nanos()).unwrap_or(0),
                ..Default::default()
            },
        ),
        ..Default::default()
    };
    let bytes = response.write_to_bytes().context("encoding the response")?;
    std::io::stdout()
        .write_all(&bytes)
        .context("writing the response")?;
    Ok(())
}

/// The long-lived server: the task service over ttrpc until containerd shuts it down.
fn serve(flags: &Flags) -> anyhow::Result<()> {
    if flags.socket.is_empty() {
        bail!("no -socket given and no action (start, delete)");
    }
    // Logs go to the `log` FIFO containerd created in the bundle; without one (a manual run)
    // the shim still serves, silently.
    let _ = containerd_shim::logger::init(flags.debug, "info", &flags.namespace, &flags.id);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_async(flags))
}

async fn serve_async(flags: &Flags) -> anyhow::Result<()> {
    let ttrpc_address = std::env::var("TTRPC_ADDRESS").context("TTRPC_ADDRESS is not set")?;
    let publisher = RemotePublisher::new(&ttrpc_address)
        .await
        .with_context(|| format!("connecting to containerd's events at {ttrpc_address}"))?;
    let exit = Arc::new(ExitSignal::default());
    let service = Arc::new(TaskService::new(
        &flags.namespace,
        Arc::new(ContainerdEvents::new(publisher, &flags.namespace)),
        exit.clone(),
    ));
    let mut services = create_task(service.clone());
    let mut v2 = create_task(service.clone());
    if let Some(task) = v2.remove(TASK_V3) {
        services.insert(TASK_V2.to_owned(), task);
    }
    let path = socket_path(&flags.socket).to_path_buf();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut server = Server::new()
        .bind(&flags.socket)
        .with_context(|| format!("listening on {}", flags.socket))?
        .register_service(services);
    server.start().await.context("starting the ttrpc server")?;
    log::info!("squib shim serving on {}", flags.socket);

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        () = exit.wait() => {}
        _ = term.recv() => log::info!("SIGTERM: stopping"),
    }
    service.settled(Duration::from_secs(10)).await;
    service.release().await;
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&path);
    Ok(())
}
