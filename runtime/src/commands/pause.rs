//! `squib pause` and `squib resume`: freeze or thaw every process of the container.
//!
//! The agent's cgroup freezer is used rather than pausing the VM's vCPUs: with the freezer the
//! agent keeps answering, so `kill` (including SIGKILL, which ends frozen tasks), `state`,
//! `events` and `delete --force` keep working on a paused container, as they do with runc.

use super::{Context, IdArg};

/// `squib pause` (`pause` true) or `squib resume`.
///
/// # Errors
///
/// Unknown container, wrong status, or the freezer failed.
pub fn run(ctx: &Context, args: &IdArg, pause: bool) -> anyhow::Result<u8> {
    let state = ctx.load(&args.id)?;
    ctx.control(&state.id, if pause { "pause" } else { "resume" })?;
    Ok(0)
}
