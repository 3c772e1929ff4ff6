//! `squib ps`: the processes of a container.
//!
//! The agent has no process-listing call, so this runs the image's own `ps` in the container
//! (through the same path as `exec`): the pids are the container's own (its pid namespace
//! inside the guest), not host pids, and an image without `ps` cannot be listed.

use serde_json::Value;
use squib_runtime::agent_client::StdioConfig;
use squib_runtime::state::Status;
use tokio::io::AsyncWrite;

use super::{Context, connect_agent, runtime};

/// `squib ps` arguments.
#[derive(Debug, clap::Args)]
pub struct PsArgs {
    /// `table` (ps's own output) or `json` (a list of pids).
    #[arg(short, long, default_value = "table")]
    pub format: String,
    /// The container's id.
    pub id: String,
    /// Options passed to `ps` in the container (table format only).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub ps_args: Vec<String>,
}

/// A writer that collects bytes in memory.
#[derive(Debug, Clone, Default)]
struct Collect(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl AsyncWrite for Collect {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Ok(mut v) = self.0.lock() {
            v.extend_from_slice(buf);
        }
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The pids in `ps -o pid,comm` output, leaving out the header and `ps` itself.
pub fn parse_pids(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let pid = f.next()?.parse().ok()?;
            (f.next() != Some("ps")).then_some(pid)
        })
        .collect()
}

/// `squib ps`.
///
/// # Errors
///
/// Unknown or not running container, no `ps` in the image, or an unknown format.
pub fn run(ctx: &Context, args: &PsArgs) -> anyhow::Result<u8> {
    let json = match args.format.as_str() {
        "json" => true,
        "table" => false,
        other => anyhow::bail!("--format {other:?}: expected table or json"),
    };
    let state = ctx.load(&args.id)?;
    if !matches!(state.status, Status::Running | Status::Paused) {
        anyhow::bail!("container {} is not running", state.id);
    }
    let config = std::fs::read(state.bundle.join("config.json"))?;
    let spec: Value = serde_json::from_slice(&config)?;
    let mut process = spec.get("process").cloned().unwrap_or(Value::Null);
    let mut argv = vec!["ps".to_string()];
    if json {
        argv.extend(["-o".to_string(), "pid,comm".to_string()]);
    } else {
        argv.extend(args.ps_args.iter().cloned());
    }
    if let Some(obj) = process.as_object_mut() {
        obj.insert("args".into(), argv.into());
        obj.insert("terminal".into(), false.into());
        obj.insert("cwd".into(), "/".into());
    }
    let body = serde_json::to_vec(&process)?;
    let out = Collect::default();
    let err = Collect::default();
    let exec_id = format!("ps-{}", std::process::id());
    let rt = runtime()?;
    let status = rt.block_on(async {
        let agent = connect_agent(ctx, &state.id).await?;
        let stdio = StdioConfig {
            stdin: None,
            stdout: Some(Box::new(out.clone())),
            stderr: Some(Box::new(err.clone())),
            terminal: false,
        };
        let (_, mut io) = agent
            .exec_process(state.id.as_str(), &exec_id, &body, stdio)
            .await?;
        anyhow::Ok(io.wait(&agent).await?)
    });
    rt.shutdown_background();
    let status = status?;
    let text = |c: &Collect| {
        String::from_utf8_lossy(&c.0.lock().map(|v| v.clone()).unwrap_or_default()).into_owned()
    };
    if status != 0 {
        anyhow::bail!(
            "ps in container {} exited with {status}: {}",
            state.id,
            text(&err).trim()
        );
    }
    if json {
        let pids = parse_pids(&text(&out));
        println!("{}", serde_json::to_string(&pids)?);
    } else {
        print!("{}", text(&out));
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_pids_skips_header_and_blank_lines() {
        assert_eq!(
            parse_pids("  PID COMMAND\n    1 sleep\n   12 sh\n   13 ps\n\n"),
            vec![1, 12]
        );
    }
}
