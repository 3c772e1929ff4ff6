//! `squib`: a runc-compatible OCI runtime command line that runs each container in its own
//! microVM, so squib can be used without containerd (by hand, by scripts, or by any engine
//! that drives an OCI runtime binary).
//!
//! `create` builds the container's root image and starts a detached *monitor* (this binary
//! re-executed as the hidden `monitor` subcommand) that hosts the VMM, boots the VM, creates
//! the container through the guest agent and then serves `start`/`pause`/`resume` on a small
//! control socket in the container's state directory. `kill`, `exec`, `ps` and `events` talk
//! to the guest agent directly through the VM's hybrid vsock socket. `run` does all of it in
//! the foreground, the CLI process itself acting as the monitor.
//!
//! Exit codes follow runc: 0 on success, 1 on a runtime error, 255 when `exec` itself fails,
//! and the container's (or exec'd process's) own status for `run` and `exec`.

mod commands;
mod monitor;

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// Where container state lives unless `--root` says otherwise.
const DEFAULT_ROOT: &str = "/run/squib";

/// The runtime's command line.
#[derive(Debug, Parser)]
#[command(
    name = "squib",
    version,
    about = "Run OCI containers, each in its own microVM"
)]
struct Cli {
    /// Directory holding the state of every container.
    #[arg(long, global = true, default_value = DEFAULT_ROOT)]
    root: PathBuf,
    /// Write the runtime's own log to this file instead of stderr.
    #[arg(long, global = true)]
    log: Option<PathBuf>,
    /// Format of the runtime's log.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log at debug level.
    #[arg(long, global = true)]
    debug: bool,
    /// The guest kernel (else $SQUIB_KERNEL, /etc/squib/config.json, the guest-image cache).
    #[arg(long, global = true)]
    kernel: Option<PathBuf>,
    /// The agent initramfs (else $SQUIB_INITRAMFS, /etc/squib/config.json, the cache).
    #[arg(long, global = true)]
    initramfs: Option<PathBuf>,
    /// Directory of cached root images (else $SQUIB_IMAGE_CACHE, else /var/cache/squib/images).
    #[arg(long, global = true)]
    image_cache: Option<PathBuf>,
    /// Guest memory in MiB for a container whose spec sets no memory limit (default 256, at
    /// least 128), as the shim's `memory_mib`.
    #[arg(long, global = true, value_parser = parse_memory_mib)]
    memory_mib: Option<u64>,
    /// Accepted for runc compatibility; squib has no host cgroups to manage.
    #[arg(long, global = true, hide = true)]
    systemd_cgroup: bool,
    #[command(subcommand)]
    command: Command,
}

/// The format of the runtime's own log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a container: boot its microVM and prepare its process without starting it.
    Create(commands::create::CreateArgs),
    /// Start the process of a created container.
    Start(commands::IdArg),
    /// Print the OCI state of a container as JSON.
    State(commands::IdArg),
    /// Send a signal to the container's process (SIGTERM by default).
    Kill(commands::kill::KillArgs),
    /// Delete a container and everything it left behind.
    Delete(commands::delete::DeleteArgs),
    /// Create, start and wait for a container in the foreground, then delete it.
    Run(commands::run::RunArgs),
    /// Run another process in a running container.
    Exec(commands::exec::ExecArgs),
    /// List the containers under the root.
    List(commands::list::ListArgs),
    /// List the processes running in a container.
    Ps(commands::ps::PsArgs),
    /// Freeze every process of a container.
    Pause(commands::IdArg),
    /// Thaw a paused container.
    Resume(commands::IdArg),
    /// Print a container's resource statistics.
    Events(commands::events::EventsArgs),
    /// Write a default config.json to a bundle directory.
    Spec(commands::spec::SpecArgs),
    /// Host a created container's microVM (started by `create`; not for direct use).
    #[command(hide = true)]
    Monitor(monitor::MonitorArgs),
    /// Bridge a detached exec's terminal (started by `exec --detach --console-socket`).
    #[command(hide = true)]
    ExecAttach(commands::exec::AttachArgs),
}

/// `--memory-mib`: a whole number of MiB, at least 128.
fn parse_memory_mib(value: &str) -> Result<u64, String> {
    match value.parse::<u64>() {
        Ok(mib) if mib >= 128 => Ok(mib),
        Ok(mib) => Err(format!("{mib} MiB is too little: at least 128")),
        Err(e) => Err(format!("not a whole number of MiB: {e}")),
    }
}

fn init_logging(cli: &Cli) -> anyhow::Result<()> {
    let level = if cli.debug { "debug" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SQUIB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match (&cli.log, cli.log_format) {
        (Some(path), format) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| anyhow::anyhow!("opening the log file {}: {e}", path.display()))?;
            let builder = builder
                .with_ansi(false)
                .with_writer(std::sync::Mutex::new(file));
            if format == LogFormat::Json {
                builder.json().init();
            } else {
                builder.init();
            }
        }
        // The monitor's stderr is the container's stderr: without --log it logs nowhere; nor
        // does the detached terminal helper, whose stderr is /dev/null.
        (None, _) if matches!(cli.command, Command::Monitor(_) | Command::ExecAttach(_)) => {}
        // Colours only for a terminal: a log redirected to a file keeps plain text that grep
        // finds (`reason=GuestTripleFault`, not escape codes between the field and its value).
        (None, LogFormat::Json) => builder.with_writer(std::io::stderr).json().init(),
        (None, LogFormat::Text) => builder
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = init_logging(&cli) {
        eprintln!("squib: {e:#}");
        return ExitCode::from(1);
    }
    let ctx = commands::Context::from_cli(&cli);
    let result = match cli.command {
        Command::Create(a) => commands::create::run(&ctx, &a),
        Command::Start(a) => commands::start::run(&ctx, &a),
        Command::State(a) => commands::state::run(&ctx, &a),
        Command::Kill(a) => commands::kill::run(&ctx, &a),
        Command::Delete(a) => commands::delete::run(&ctx, &a),
        Command::Run(a) => commands::run::run(&ctx, &a),
        Command::Exec(a) => commands::exec::run(&ctx, &a),
        Command::List(a) => commands::list::run(&ctx, &a),
        Command::Ps(a) => commands::ps::run(&ctx, &a),
        Command::Pause(a) => commands::pause::run(&ctx, &a, true),
        Command::Resume(a) => commands::pause::run(&ctx, &a, false),
        Command::Events(a) => commands::events::run(&ctx, &a),
        Command::Spec(a) => commands::spec::run(&a),
        Command::Monitor(a) => monitor::run(&ctx, &a),
        Command::ExecAttach(a) => commands::exec::attach(&ctx, &a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = e
                .downcast_ref::<commands::Failure>()
                .map_or(1, |f| f.exit_code);
            eprintln!("squib: {e:#}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("squib").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn test_cli_parses_runc_style_create_with_global_root() {
        let cli = parse(&[
            "--root",
            "/tmp/r",
            "create",
            "-b",
            "/b",
            "--pid-file",
            "/p",
            "c1",
        ]);
        assert_eq!(cli.root, PathBuf::from("/tmp/r"));
        let Command::Create(a) = cli.command else {
            panic!("not create")
        };
        assert_eq!(a.bundle, PathBuf::from("/b"));
        assert_eq!(a.pid_file, Some(PathBuf::from("/p")));
        assert_eq!(a.id, "c1");
    }

    #[test]
    fn test_cli_defaults_root_and_bundle() {
        let cli = parse(&["run", "demo"]);
        assert_eq!(cli.root, PathBuf::from(DEFAULT_ROOT));
        let Command::Run(a) = cli.command else {
            panic!("not run")
        };
        assert_eq!(a.bundle, PathBuf::from("."));
        assert!(!a.detach);
    }

    #[test]
    fn test_cli_kill_takes_optional_signal_and_all() {
        let Command::Kill(a) = parse(&["kill", "--all", "c1", "KILL"]).command else {
            panic!("not kill")
        };
        assert!(a.all);
        assert_eq!(a.signal, "KILL");
        let Command::Kill(a) = parse(&["kill", "c1"]).command else {
            panic!("not kill")
        };
        assert_eq!(a.signal, "SIGTERM");
    }

    #[test]
    fn test_cli_exec_keeps_command_arguments_verbatim() {
        let cli = parse(&[
            "exec",
            "-e",
            "A=1",
            "--cwd",
            "/tmp",
            "-u",
            "1000:1000",
            "c1",
            "sh",
            "-c",
            "echo -n x",
        ]);
        let Command::Exec(a) = cli.command else {
            panic!("not exec")
        };
        assert_eq!(a.env, ["A=1"]);
        assert_eq!(a.user.as_deref(), Some("1000:1000"));
        assert_eq!(a.command, ["sh", "-c", "echo -n x"]);
        let Command::Exec(a) = parse(&["exec", "-t", "c1", "--", "ls", "-l"]).command else {
            panic!("not exec")
        };
        assert!(a.tty);
        assert_eq!(a.command, ["ls", "-l"]);
    }

    #[test]
    fn test_cli_takes_console_socket_for_create_run_and_exec() {
        let Command::Create(a) = parse(&["create", "--console-socket", "/s", "c1"]).command else {
            panic!("not create")
        };
        assert_eq!(a.console_socket, Some(PathBuf::from("/s")));
        let Command::Run(a) = parse(&["run", "-d", "--console-socket", "/s", "c1"]).command else {
            panic!("not run")
        };
        assert!(a.detach);
        assert_eq!(a.console_socket, Some(PathBuf::from("/s")));
        let Command::Exec(a) =
            parse(&["exec", "-d", "-t", "--console-socket", "/s", "c1", "sh"]).command
        else {
            panic!("not exec")
        };
        assert!(a.detach && a.tty);
        assert_eq!(a.console_socket, Some(PathBuf::from("/s")));
        assert_eq!(a.command, ["sh"]);
    }

    #[test]
    fn test_cli_rejects_missing_id_and_unknown_command() {
        assert!(Cli::try_parse_from(["squib", "start"]).is_err());
        assert!(Cli::try_parse_from(["squib", "frobnicate", "x"]).is_err());
        assert!(Cli::try_parse_from(["squib", "--log-format", "xml", "list"]).is_err());
    }
}
