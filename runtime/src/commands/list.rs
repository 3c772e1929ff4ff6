//! `squib list`: the containers under the root, as a table or JSON.

use super::Context;

/// `squib list` arguments.
#[derive(Debug, clap::Args)]
pub struct ListArgs {
    /// `table` or `json`.
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// Print only the ids.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `squib list`.
///
/// # Errors
///
/// The root cannot be read, or an unknown format.
pub fn run(ctx: &Context, args: &ListArgs) -> anyhow::Result<u8> {
    let mut states = Vec::new();
    for id in ctx.root.list()? {
        // A container deleted while listing is simply not listed.
        if let Ok(s) = ctx.load(id.as_str()) {
            states.push(s);
        }
    }
    if args.quiet {
        for s in &states {
            println!("{}", s.id);
        }
        return Ok(0);
    }
    match args.format.as_str() {
        "json" => {
            let all: Vec<_> = states.iter().map(|s| s.to_oci_json()).collect();
            println!("{}", serde_json::to_string(&all)?);
        }
        "table" => {
            println!(
                "{:<24} {:<8} {:<10} {:<40} CREATED",
                "ID", "PID", "STATUS", "BUNDLE"
            );
            for s in &states {
                let v = s.to_oci_json();
                println!(
                    "{:<24} {:<8} {:<10} {:<40} {}",
                    s.id.as_str(),
                    v["pid"].to_string(),
                    v["status"].as_str().unwrap_or(""),
                    s.bundle.display(),
                    s.created
                );
            }
        }
        other => anyhow::bail!("--format {other:?}: expected table or json"),
    }
    Ok(0)
}
