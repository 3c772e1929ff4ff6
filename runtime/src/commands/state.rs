//! `squib state`: prints the OCI state of a container.

use squib_runtime::state::Status;

use super::{Context, IdArg};

/// `squib state`.
///
/// # Errors
///
/// Unknown container.
pub fn run(ctx: &Context, args: &IdArg) -> anyhow::Result<u8> {
    let state = ctx.load(&args.id)?;
    let mut json = state.to_oci_json();
    // Not part of the OCI state, but useful to callers and tests; extra fields are allowed.
    if let Some(obj) = json.as_object_mut() {
        if let Some(hit) = state.rootfs_cache_hit {
            obj.insert("rootfsCacheHit".into(), hit.into());
        }
        // The init's exit status once it is known (a stopped container whose monitor died
        // without recording one has none).
        if let (Status::Stopped, Some(status)) = (state.status, state.exit_status) {
            obj.insert("exitStatus".into(), status.into());
        }
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(0)
}
