//! `squib start`: asks the container's monitor to start the container's process.

use squib_runtime::state::Status;

use super::{Context, IdArg};

/// `squib start`.
///
/// # Errors
///
/// Unknown container, a container that is not `created`, or the process cannot be run.
pub fn run(ctx: &Context, args: &IdArg) -> anyhow::Result<u8> {
    let state = ctx.load(&args.id)?;
    match state.status {
        Status::Created => {}
        Status::Running | Status::Paused => {
            anyhow::bail!("cannot start an already running container")
        }
        Status::Stopped => anyhow::bail!("cannot start a container that has stopped"),
        Status::Creating => anyhow::bail!("cannot start a container that is being created"),
    }
    ctx.control(&state.id, "start")?;
    Ok(0)
}
