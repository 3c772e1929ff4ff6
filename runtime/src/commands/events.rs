//! `squib events`: the container's resource statistics from the guest agent's cgroup, as
//! runc-style `{"type":"stats","id":...,"data":{...}}` JSON lines: once with `--stats`, else
//! every `--interval` until the container stops.

use std::time::Duration;

use squib_runtime::state::Status;

use super::{Context, connect_agent, runtime};

/// `squib events` arguments.
#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Print the statistics once and exit.
    #[arg(long)]
    pub stats: bool,
    /// Seconds between two statistics lines.
    #[arg(long, default_value_t = 5)]
    pub interval: u64,
    /// The container's id.
    pub id: String,
}

/// The runc-shaped stats event of one agent answer.
pub fn stats_event(id: &str, s: &squib_agent_protocol::agent::StatsResponse) -> serde_json::Value {
    serde_json::json!({
        "type": "stats",
        "id": id,
        "data": {
            "cpu": {"usage": {
                "total": s.cpu_usage_usec.saturating_mul(1000),
                "user": s.cpu_user_usec.saturating_mul(1000),
                "kernel": s.cpu_system_usec.saturating_mul(1000)
            }},
            "memory": {"usage": {"usage": s.memory_usage_bytes, "limit": s.memory_limit_bytes},
                       "oomKills": s.oom_kills},
            "pids": {"current": s.pids_current, "limit": s.pids_limit},
            "blkio": {"readBytes": s.io_read_bytes, "writeBytes": s.io_write_bytes}
        }
    })
}

/// `squib events`.
///
/// # Errors
///
/// Unknown or stopped container, or the agent failed.
pub fn run(ctx: &Context, args: &EventsArgs) -> anyhow::Result<u8> {
    let state = ctx.load(&args.id)?;
    if matches!(state.status, Status::Stopped | Status::Creating) {
        anyhow::bail!("container with id {} is not running", state.id);
    }
    runtime()?.block_on(async {
        let agent = connect_agent(ctx, &state.id).await?;
        loop {
            let s = agent.stats(state.id.as_str()).await?;
            println!("{}", stats_event(state.id.as_str(), &s));
            if args.stats {
                return Ok(0);
            }
            tokio::time::sleep(Duration::from_secs(args.interval.max(1))).await;
            if ctx.load(state.id.as_str())?.status == Status::Stopped {
                return Ok(0);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_stats_event_converts_microseconds_to_nanoseconds() {
        let mut s = squib_agent_protocol::agent::StatsResponse::new();
        s.cpu_usage_usec = 3;
        s.memory_usage_bytes = 4096;
        s.pids_current = 2;
        let v = stats_event("c1", &s);
        assert_eq!(v["type"], "stats");
        assert_eq!(v["id"], "c1");
        assert_eq!(v["data"]["cpu"]["usage"]["total"], 3000);
        assert_eq!(v["data"]["memory"]["usage"]["usage"], 4096);
        assert_eq!(v["data"]["pids"]["current"], 2);
    }
}
