//! `squib run`: create, start and wait for a container in the foreground, with the caller's
//! stdio attached, then delete it; exits with the container's status (137 after SIGKILL).
//! The CLI process itself is the monitor. With `--detach` it is `create` + `start`.

use std::path::PathBuf;

use super::{Context, create, write_pid_file};
use crate::monitor::{Booted, inherited_stdio};

/// `squib run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The bundle directory (config.json and the root file system).
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Return once the container started, leaving it running under a detached monitor.
    #[arg(short, long)]
    pub detach: bool,
    /// A Unix socket to receive the terminal's master (for `process.terminal`).
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Write the monitor's pid to this file.
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub no_pivot: bool,
    /// Accepted for runc compatibility.
    #[arg(long, hide = true)]
    pub no_new_keyring: bool,
    /// The container's id.
    pub id: String,
}

/// `squib run`.
///
/// # Errors
///
/// Anything `create` or `start` can fail with; the container is removed again.
pub fn run(ctx: &Context, args: &RunArgs) -> anyhow::Result<u8> {
    if args.detach {
        let pid =
            create::create_detached(ctx, &args.id, &args.bundle, args.console_socket.as_deref())?;
        let id = squib_runtime::state::ContainerId::new(&args.id)?;
        if let Err(e) = ctx.control(&id, "start") {
            let _ = super::delete::run(
                ctx,
                &super::delete::DeleteArgs {
                    force: true,
                    id: args.id.clone(),
                },
            );
            return Err(e);
        }
        if let Some(path) = &args.pid_file {
            write_pid_file(path, pid)?;
        }
        return Ok(0);
    }
    let prepared = create::prepare(
        ctx,
        &args.id,
        &args.bundle,
        false,
        args.console_socket.as_deref(),
    )?;
    let id = prepared.state.id.clone();
    let result = (|| -> anyhow::Result<i32> {
        if let Some(path) = &args.pid_file {
            write_pid_file(path, i32::try_from(std::process::id()).unwrap_or(0))?;
        }
        let terminal = prepared.terminal;
        let _raw = if terminal {
            super::tty::RawMode::enable_on_stdin()
        } else {
            None
        };
        super::block_on(async {
            let stdio = inherited_stdio(terminal);
            let booted = Booted::boot(ctx, prepared.state, &prepared.assets, stdio).await?;
            if terminal {
                super::tty::forward_resizes(booted.agent().clone(), id.to_string(), String::new());
            }
            booted.serve(ctx, true, None).await
        })?
    })();
    // Like runc, a foreground run leaves nothing behind, whatever happened.
    let _ = ctx.root.remove(&id);
    let status = result?;
    Ok(u8::try_from(status & 0xff).unwrap_or(1))
}
