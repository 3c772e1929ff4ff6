//! squib-agent: PID 1 of every squib microVM. Mounts the guest's file systems, listens on vsock
//! and runs the container's processes.
//!
//! Modes:
//! - no arguments as PID 1 (the kernel runs `/init`): leave the initramfs root, mount /proc,
//!   /sys, /dev, /run, cgroup2, bring up lo, load modules if any, then serve the control port
//!   (vsock 1024) and the stream port (vsock 1025) and print `squib-agent: ready` on the
//!   console.
//! - `serve --control unix:PATH --streams unix:PATH --state-dir DIR [--cgroup-root DIR]`: the
//!   same service over Unix sockets without touching the system (host tests; run it inside a
//!   fresh mount and PID namespace).
//! - the hidden helper mode ([`helper::HELPER_ARG`]) that becomes one container process.
//!
//! Logging goes to stderr (the serial console for PID 1) at the level from `squib.log=` on the
//! kernel command line or `--log`, default `info`.

mod cgroup;
mod container;
mod helper;
mod reaper;
mod service;
mod spec;
mod stdio;
mod streams;
mod system;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use squib_agent_protocol::ttrpc;
use squib_agent_protocol::{CONTROL_PORT, STREAM_PORT, agent_ttrpc};

use crate::container::{AgentPaths, Manager};
use crate::streams::ListenAddr;

/// Marker line benchmarks and tests wait for on the console.
const READY_MARKER: &str = "squib-agent: ready";

struct Options {
    control: ListenAddr,
    streams: ListenAddr,
    paths: AgentPaths,
    log: String,
    pid1: bool,
}

fn parse_addr(s: &str) -> anyhow::Result<ListenAddr> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(ListenAddr::Unix(PathBuf::from(p)));
    }
    if let Some(p) = s.strip_prefix("vsock:") {
        return Ok(ListenAddr::Vsock(
            p.parse().with_context(|| format!("vsock port {p:?}"))?,
        ));
    }
    bail!("address {s:?} must be unix:PATH or vsock:PORT")
}

fn parse_serve(args: &[String]) -> anyhow::Result<Options> {
    let mut o = Options {
        control: ListenAddr::Vsock(CONTROL_PORT),
        streams: ListenAddr::Vsock(STREAM_PORT),
        paths: AgentPaths {
            state_dir: PathBuf::from("/run/squib"),
            cgroup_root: None,
            helper_exe: std::env::current_exe().context("find the agent binary")?,
        },
        log: "info".to_owned(),
        pid1: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--control" => o.control = parse_addr(value()?)?,
            "--streams" => o.streams = parse_addr(value()?)?,
            "--state-dir" => o.paths.state_dir = PathBuf::from(value()?),
            "--cgroup-root" => o.paths.cgroup_root = Some(PathBuf::from(value()?)),
            "--log" => o.log = value()?.clone(),
            other => bail!("unknown argument {other:?}"),
        }
    }
    Ok(o)
}

fn init_logging(level: &str) {
    let level = match level {
        "trace" => tracing::Level::TRACE,
        "debug" => tracing::Level::DEBUG,
        "warn" => tracing::Level::WARN,
        "error" => tracing::Level::ERROR,
        _ => tracing::Level::INFO,
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .without_time()
        .with_target(false)
        .try_init();
}

fn pid1_setup() -> anyhow::Result<Options> {
    let args: Vec<String> = std::env::args().collect();
    if system::root_is_initramfs() && !args.iter().any(|a| a == "--switched-root") {
        system::leave_initramfs("/init").context("leave the initramfs root")?;
    }
    system::mount_filesystems().context("mount the guest file systems")?;
    system::attach_console();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let log = system::cmdline_value(&cmdline, "squib.log").unwrap_or_else(|| "info".to_owned());
    init_logging(&log);
    if let Err(e) = system::loopback_up() {
        tracing::warn!(error = %format!("{e:#}"), "loopback not up");
    }
    let n = system::load_modules().context("load kernel modules")?;
    tracing::debug!(modules = n, "kernel modules loaded");
    let _ = std::fs::create_dir_all("/tmp");
    Ok(Options {
        control: ListenAddr::Vsock(CONTROL_PORT),
        streams: ListenAddr::Vsock(STREAM_PORT),
        paths: AgentPaths {
            state_dir: PathBuf::from("/run/squib"),
            cgroup_root: Some(PathBuf::from("/sys/fs/cgroup/squib")),
            helper_exe: PathBuf::from("/init"),
        },
        log,
        pid1: true,
    })
}

fn serve(o: Options) -> anyhow::Result<()> {
    if !o.pid1 {
        init_logging(&o.log);
        // Outside the guest, adopt orphans the way PID 1 does.
        // SAFETY: plain prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    std::fs::create_dir_all(&o.paths.state_dir)
        .with_context(|| format!("create {}", o.paths.state_dir.display()))?;
    let reaper = reaper::Reaper::start().context("start the reaper")?;
    let registry = Arc::new(streams::StreamRegistry::default());
    let listener = streams::listen(&o.streams).context("listen for streams")?;
    let r2 = registry.clone();
    std::thread::Builder::new()
        .name("streams".into())
        .spawn(move || streams::serve(listener, r2))
        .context("start the stream listener")?;
    let manager = Arc::new(Manager::new(o.paths.clone(), reaper, registry));
    let pid1 = o.pid1;
    // Runs after Shutdown has removed every container and answered.
    let shutdown: Arc<dyn Fn() + Send + Sync> = Arc::new(move || {
        if pid1 {
            system::power_off();
        }
        std::process::exit(0);
    });
    let svc = service::AgentService::new(manager, shutdown);
    let control = o.control.to_string();
    if let ListenAddr::Unix(p) = &o.control {
        let _ = std::fs::remove_file(p);
    }
    let mut server = ttrpc::Server::new()
        .bind(&control)
        .with_context(|| format!("bind {control}"))?
        .register_service(agent_ttrpc::create_agent(Arc::new(svc)));
    server.start().context("start the ttrpc server")?;
    tracing::info!(control = %control, streams = %o.streams, "agent listening");
    eprintln!("{READY_MARKER}");
    loop {
        std::thread::park();
    }
}

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(helper::HELPER_ARG) {
        helper::main();
    }
    let opts = if args.first().map(String::as_str) == Some("serve") {
        parse_serve(args.get(1..).unwrap_or_default())
    } else if std::process::id() == 1 {
        pid1_setup()
    } else {
        Err(anyhow::anyhow!(
            "usage: squib-agent (as PID 1) | squib-agent serve --control unix:PATH \
             --streams unix:PATH [--state-dir DIR] [--cgroup-root DIR] [--log LEVEL]"
        ))
    };
    let result = opts.and_then(serve);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("squib-agent: {e:#}");
            if std::process::id() == 1 {
                // PID 1 must not exit (the kernel would panic); power off instead.
                system::power_off();
            }
            std::process::ExitCode::FAILURE
        }
    }
}
