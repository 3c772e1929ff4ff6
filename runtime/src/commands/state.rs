//! `squib state`: prints the OCI state of a container.

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
    if let (Some(obj), Some(hit)) = (json.as_object_mut(), state.rootfs_cache_hit) {
        obj.insert("rootfsCacheHit".into(), hit.into());
    }
    println!("{}", serde_json::to_string_pretty(&json)?);
    Ok(0)
}
