//! `squib exec`: runs another process in a running container through the guest agent, with
//! the caller's stdio attached, and exits with its status. The process is the container's
//! `process` from config.json with the command line's overrides, or `--process FILE`.
//!
//! `--detach` starts the process and returns. A detached process with a terminal needs
//! `--console-socket`: the master of a host pty goes there, as with `create`, and a detached
//! helper (this binary as the hidden `exec-attach` subcommand, in a session of its own with the
//! slave as its controlling terminal) copies between the slave and the guest pty, forwards
//! resizes and a hangup, and exits with the process. It registers itself in the container's
//! state directory so that `delete` stops it.

use std::io::{BufRead as _, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use command_fds::{CommandFdExt as _, FdMapping};
use serde_json::Value;
use squib_runtime::agent_client::StdioConfig;
use squib_runtime::console::HostPty;
use squib_runtime::state::{ContainerId, Status};

use super::create::{CONSOLE_FD, READY_FD, check_console_socket, self_command};
use super::{Context, Failure, block_on, connect_agent, process_start_time, tty, write_pid_file};

/// The prefix of the files with which detached terminal helpers register in the container's
/// state directory: `exec-attach.<pid>`, holding the helper's start time.
pub const ATTACH_PREFIX: &str = "exec-attach.";

/// runc's exit code when `exec` itself fails (as opposed to the exec'd process).
const EXEC_FAILED: u8 = 255;

/// `squib exec` arguments.
#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// Run the process on a terminal.
    #[arg(short, long)]
    pub tty: bool,
    /// Set an environment variable (repeatable).
    #[arg(short, long)]
    pub env: Vec<String>,
    /// The working directory.
    #[arg(long)]
    pub cwd: Option<String>,
    /// User to run as: `UID` or `UID:GID`.
    #[arg(short, long)]
    pub user: Option<String>,
    /// A JSON file with the whole OCI process to run (overrides the other options).
    #[arg(short, long)]
    pub process: Option<PathBuf>,
    /// Write the process's guest pid to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Start the process and return without waiting for it.
    #[arg(short, long)]
    pub detach: bool,
    /// With `--detach` and a terminal: a Unix socket to receive the terminal's master.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// The container's id.
    pub id: String,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

/// Parses `UID[:GID]`.
///
/// # Errors
///
/// Non-numeric parts, named in the message.
pub fn parse_user(s: &str) -> anyhow::Result<(u32, Option<u32>)> {
    let bad = || anyhow::anyhow!("--user {s:?}: expected UID[:GID] with numeric ids");
    let (uid, gid) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let uid = uid.parse().map_err(|_| bad())?;
    let gid = gid.map(|g| g.parse().map_err(|_| bad())).transpose()?;
    Ok((uid, gid))
}

/// The OCI process to exec: `base` (the container's `process`) with the overrides of `args`.
///
/// # Errors
///
/// No command, a malformed `--env` or `--user`.
pub fn build_process(base: &Value, args: &ExecArgs) -> anyhow::Result<Value> {
    let mut p = base.clone();
    let obj = p
        .as_object_mut()
        .context("config.json: process is not an object")?;
    if args.command.is_empty() {
        anyhow::bail!("exec: no command given");
    }
    obj.insert("args".into(), args.command.clone().into());
    obj.insert("terminal".into(), args.tty.into());
    obj.remove("consoleSize");
    if let Some(cwd) = &args.cwd {
        obj.insert("cwd".into(), cwd.clone().into());
    }
    if !args.env.is_empty() {
        let mut env: Vec<String> = obj
            .get("env")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        for kv in &args.env {
            let Some((k, _)) = kv.split_once('=') else {
                anyhow::bail!("--env {kv:?}: expected NAME=VALUE");
            };
            let prefix = format!("{k}=");
            env.retain(|e| !e.starts_with(&prefix));
            env.push(kv.clone());
        }
        obj.insert("env".into(), env.into());
    }
    if let Some(user) = &args.user {
        let (uid, gid) = parse_user(user)?;
        let mut u = serde_json::Map::new();
        u.insert("uid".into(), uid.into());
        u.insert("gid".into(), gid.unwrap_or(0).into());
        obj.insert("user".into(), Value::Object(u));
    }
    Ok(p)
}

/// `squib exec`.
///
/// # Errors
///
/// As a [`Failure`] with exit code 255: unknown or not running container, bad options, or the
/// process could not be started.
pub fn run(ctx: &Context, args: &ExecArgs) -> anyhow::Result<u8> {
    exec(ctx, args).map_err(|e| {
        anyhow::Error::new(Failure {
            exit_code: EXEC_FAILED,
            message: format!("exec failed: {e:#}"),
        })
    })
}

fn exec(ctx: &Context, args: &ExecArgs) -> anyhow::Result<u8> {
    let state = ctx.load(&args.id)?;
    match state.status {
        Status::Running => {}
        Status::Paused => anyhow::bail!("cannot exec in a paused container"),
        Status::Created | Status::Creating => {
            anyhow::bail!("cannot exec in a container that has not been started")
        }
        Status::Stopped => anyhow::bail!("cannot exec in a stopped container"),
    }
    let process = match &args.process {
        Some(path) => {
            let body = std::fs::read(path)
                .with_context(|| format!("reading the process file {}", path.display()))?;
            serde_json::from_slice::<Value>(&body)
                .with_context(|| format!("parsing the process file {}", path.display()))?
        }
        None => {
            let config = state.bundle.join("config.json");
            let body =
                std::fs::read(&config).with_context(|| format!("reading {}", config.display()))?;
            let spec: Value = serde_json::from_slice(&body)
                .with_context(|| format!("parsing {}", config.display()))?;
            build_process(spec.get("process").unwrap_or(&Value::Null), args)?
        }
    };
    let terminal = process
        .get("terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    check_console_socket(terminal, args.detach, args.console_socket.as_deref())?;
    let body = serde_json::to_vec(&process)?;
    let exec_id = format!(
        "exec-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .subsec_nanos()
    );
    if let Some(socket) = &args.console_socket {
        let pid = exec_on_console(ctx, &state.id, &exec_id, &process, socket)?;
        if let Some(path) = &args.pid_file {
            write_pid_file(path, pid)?;
        }
        return Ok(0);
    }
    let _raw = if terminal {
        tty::RawMode::enable_on_stdin()
    } else {
        None
    };
    let status = block_on(async {
        let agent = connect_agent(ctx, &state.id).await?;
        let stdio = if args.detach {
            StdioConfig {
                terminal,
                ..StdioConfig::default()
            }
        } else {
            crate::monitor::inherited_stdio(terminal)
        };
        let (pid, mut io) = agent
            .exec_process(state.id.as_str(), &exec_id, &body, stdio)
            .await?;
        if let Some(path) = &args.pid_file {
            write_pid_file(path, i32::try_from(pid).unwrap_or(0))?;
        }
        if args.detach {
            return Ok(0);
        }
        if terminal {
            tty::forward_resizes(agent.clone(), state.id.to_string(), exec_id.clone());
        }
        anyhow::Ok(io.wait(&agent).await?)
    })?;
    let status = status?;
    Ok(u8::try_from(status & 0xff).unwrap_or(1))
}

/// Sends a new pty's master to `socket` and starts the detached helper that runs the process
/// on its slave; returns the process's guest pid once it runs.
fn exec_on_console(
    ctx: &Context,
    id: &ContainerId,
    exec_id: &str,
    process: &Value,
    socket: &Path,
) -> anyhow::Result<i32> {
    let size = process.get("consoleSize").map(|b| {
        let dim = |k: &str| {
            b.get(k)
                .and_then(Value::as_u64)
                .map_or(0, |v| u16::try_from(v).unwrap_or(u16::MAX))
        };
        (dim("height"), dim("width"))
    });
    let slave = HostPty::open(size)
        .context("allocating the process's terminal")?
        .send_master(socket)?;
    let (read_end, write_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("creating the readiness pipe")?;
    let mut cmd = self_command(ctx)?;
    cmd.args([
        "exec-attach",
        "--ready-fd",
        &READY_FD.to_string(),
        "--console-fd",
        &CONSOLE_FD.to_string(),
        "--exec-id",
        exec_id,
        "--process-json",
        &serde_json::to_string(process)?,
        id.as_str(),
    ]);
    // The helper holds none of the caller's descriptors (see `create`).
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd.fd_mappings(vec![
        FdMapping {
            parent_fd: write_end,
            child_fd: READY_FD,
        },
        FdMapping {
            parent_fd: slave,
            child_fd: CONSOLE_FD,
        },
    ])
    .context("passing descriptors to the terminal helper")?;
    let mut child = cmd.spawn().context("starting the terminal helper")?;
    drop(cmd);
    let mut line = String::new();
    let read = BufReader::new(std::fs::File::from(read_end)).read_line(&mut line);
    let line = line.trim_end();
    if read.is_ok()
        && let Some(pid) = line.strip_prefix("ok ").and_then(|p| p.parse().ok())
    {
        return Ok(pid);
    }
    let _ = child.wait();
    match line.strip_prefix("error ") {
        Some(msg) => anyhow::bail!("{msg}"),
        None => anyhow::bail!("the terminal helper exited before the process started"),
    }
}

/// The hidden `exec-attach` subcommand's arguments (started by `exec --detach
/// --console-socket`; not for direct use).
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// The descriptor to report `ok <guest pid>` or `error <text>` on.
    #[arg(long)]
    pub ready_fd: i32,
    /// The descriptor holding the pty slave.
    #[arg(long)]
    pub console_fd: i32,
    /// The exec id of the process.
    #[arg(long)]
    pub exec_id: String,
    /// The OCI process to run, as JSON.
    #[arg(long)]
    pub process_json: String,
    /// The container's id.
    pub id: String,
}

/// Entry point of `squib exec-attach`: runs the process on the slave, bridges it to the guest
/// pty until the process exits, and exits with its status.
///
/// # Errors
///
/// The process could not be started (also reported on the readiness descriptor).
pub fn attach(ctx: &Context, args: &AttachArgs) -> anyhow::Result<u8> {
    // A session of its own, so that the slave can become its controlling terminal.
    let _ = nix::unistd::setsid();
    let mut ready = Some(crate::monitor::ready_pipe(args.ready_fd)?);
    let registration = ContainerId::new(&args.id).map(|id| {
        ctx.dir(&id)
            .join(format!("{ATTACH_PREFIX}{}", std::process::id()))
    });
    // The resize task may still wait for a signal; it must not keep the process alive.
    let outcome = block_on(async {
        let id = ContainerId::new(&args.id)?;
        let slave = crate::monitor::console_slave(args.console_fd)?;
        let console = tty::ConsoleSlave::attach(slave)?;
        if let Ok(path) = &registration {
            let pid = i32::try_from(std::process::id()).unwrap_or(0);
            let started = process_start_time(pid).unwrap_or(0);
            std::fs::write(path, started.to_string()).with_context(|| {
                format!("registering the terminal helper at {}", path.display())
            })?;
        }
        let agent = connect_agent(ctx, &id).await?;
        let (pid, mut io) = agent
            .exec_process(
                id.as_str(),
                &args.exec_id,
                args.process_json.as_bytes(),
                console.stdio()?,
            )
            .await?;
        if let Some(mut pipe) = ready.take() {
            writeln!(pipe, "ok {pid}").context("reporting the process's pid")?;
        }
        console.forward(agent.clone(), id.to_string(), args.exec_id.clone());
        anyhow::Ok(io.wait(&agent).await?)
    })?;
    if let Ok(path) = &registration {
        let _ = std::fs::remove_file(path);
    }
    match outcome {
        Ok(status) => Ok(u8::try_from(status & 0xff).unwrap_or(1)),
        Err(e) => {
            if let Some(mut pipe) = ready {
                let _ = writeln!(
                    pipe,
                    "error {}",
                    crate::monitor::one_line(&format!("{e:#}"))
                );
            }
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(cmd: &[&str]) -> ExecArgs {
        ExecArgs {
            tty: false,
            env: vec![],
            cwd: None,
            user: None,
            process: None,
            pid_file: None,
            detach: false,
            console_socket: None,
            id: "c".into(),
            command: cmd.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn test_build_process_overrides_args_cwd_env_and_user() {
        let base = serde_json::json!({"args": ["sleep", "1000"], "cwd": "/",
            "env": ["PATH=/bin", "FOO=bar"], "user": {"uid": 0, "gid": 0, "additionalGids": [5]},
            "terminal": true, "consoleSize": {"height": 1, "width": 2}});
        let mut a = args(&["sh", "-c", "pwd; echo $FOO"]);
        a.cwd = Some("/tmp".into());
        a.env = vec!["FOO=baz".into(), "NEW=1".into()];
        a.user = Some("1000:100".into());
        let p = build_process(&base, &a).unwrap();
        assert_eq!(p["args"], serde_json::json!(["sh", "-c", "pwd; echo $FOO"]));
        assert_eq!(p["cwd"], "/tmp");
        assert_eq!(
            p["env"],
            serde_json::json!(["PATH=/bin", "FOO=baz", "NEW=1"])
        );
        assert_eq!(p["user"], serde_json::json!({"uid": 1000, "gid": 100}));
        assert_eq!(p["terminal"], false);
        assert!(p.get("consoleSize").is_none());
    }

    #[test]
    fn test_build_process_keeps_spec_env_and_cwd_by_default() {
        let base = serde_json::json!({"args": ["x"], "cwd": "/w", "env": ["FOO=bar"]});
        let p = build_process(&base, &args(&["true"])).unwrap();
        assert_eq!(p["cwd"], "/w");
        assert_eq!(p["env"], serde_json::json!(["FOO=bar"]));
    }

    #[test]
    fn test_build_process_rejects_empty_command_and_bad_env() {
        let base = serde_json::json!({"args": ["x"], "cwd": "/"});
        assert!(build_process(&base, &args(&[])).is_err());
        let mut a = args(&["true"]);
        a.env = vec!["NOEQUALS".into()];
        let err = build_process(&base, &a).unwrap_err().to_string();
        assert!(err.contains("NOEQUALS"), "{err}");
    }

    #[test]
    fn test_parse_user_accepts_uid_and_uid_gid() {
        assert_eq!(parse_user("1000").unwrap(), (1000, None));
        assert_eq!(parse_user("65534:65534").unwrap(), (65534, Some(65534)));
        let err = parse_user("root").unwrap_err().to_string();
        assert!(err.contains("\"root\""), "{err}");
        assert!(parse_user("1:x").is_err());
    }
}
