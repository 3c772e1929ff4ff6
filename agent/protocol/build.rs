//! Generates the protobuf messages and the ttrpc service code from `proto/agent.proto` with the
//! pure-Rust protobuf parser (no protoc needed).

use std::path::PathBuf;

use ttrpc_codegen::{Codegen, Customize};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed=proto/agent.proto");

    let sync_dir = out.join("sync");
    std::fs::create_dir_all(&sync_dir)?;
    Codegen::new()
        .out_dir(&sync_dir)
        .input("proto/agent.proto")
        .include("proto")
        .rust_protobuf()
        .customize(Customize::default())
        .run()?;
    strip_inner_attributes(&sync_dir.join("agent.rs"))?;
    strip_inner_attributes(&sync_dir.join("agent_ttrpc.rs"))?;

    if std::env::var_os("CARGO_FEATURE_ASYNC").is_some() {
        let async_dir = out.join("async");
        std::fs::create_dir_all(&async_dir)?;
        Codegen::new()
            .out_dir(&async_dir)
            .input("proto/agent.proto")
            .include("proto")
            .rust_protobuf()
            .customize(Customize {
                async_all: true,
                ..Default::default()
            })
            .run()?;
        strip_inner_attributes(&async_dir.join("agent_ttrpc.rs"))?;
    }
    Ok(())
}

/// `include!` cannot take a file with inner attributes (`#![...]`) or inner doc comments; the generated files carry
/// lint allowances that way, so drop those lines and let `lib.rs` set the allowances on the
/// module that includes the file.
fn strip_inner_attributes(path: &std::path::Path) -> std::io::Result<()> {
    let text = std::fs::read_to_string(path)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            !t.starts_with("#![") && !t.starts_with("//!")
        })
        .collect();
    std::fs::write(path, kept.join("\n"))
}
