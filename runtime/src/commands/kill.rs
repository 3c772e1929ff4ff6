//! `squib kill`: sends a signal to the container's init (or, with `--all`, to every process
//! of the container) through the guest agent. A SIGKILL the agent does not take within
//! [`KILL_ANSWER_WAIT`] (a hung guest) has the monitor power the VM off instead, which ends
//! every process of the container; the container is then recorded stopped with status 137.

use anyhow::Context as _;
use squib_runtime::sandbox::KILL_ANSWER_WAIT;
use squib_runtime::state::Status;

use super::{Context, connect_agent, runtime};

/// `squib kill` arguments.
#[derive(Debug, clap::Args)]
pub struct KillArgs {
    /// Signal every process of the container.
    #[arg(short, long)]
    pub all: bool,
    /// The container's id.
    pub id: String,
    /// The signal: a name with or without `SIG` (any case) or a number.
    #[arg(default_value = "SIGTERM")]
    pub signal: String,
}

/// Signal names and numbers (Linux, x86_64 and aarch64 share them).
const SIGNALS: &[(&str, u32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("TRAP", 5),
    ("ABRT", 6),
    ("IOT", 6),
    ("BUS", 7),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
    ("STKFLT", 16),
    ("CHLD", 17),
    ("CONT", 18),
    ("STOP", 19),
    ("TSTP", 20),
    ("TTIN", 21),
    ("TTOU", 22),
    ("URG", 23),
    ("XCPU", 24),
    ("XFSZ", 25),
    ("VTALRM", 26),
    ("PROF", 27),
    ("WINCH", 28),
    ("IO", 29),
    ("POLL", 29),
    ("PWR", 30),
    ("SYS", 31),
];
/// SIGKILL's number.
const SIGKILL: u32 = 9;
/// The highest real-time signal number.
const SIGRTMAX: u32 = 64;
/// The lowest real-time signal number user programs may use.
const SIGRTMIN: u32 = 34;

/// Parses `KILL`, `SIGKILL`, `sigkill`, `9`, `RTMIN+3` or `SIGRTMAX-1`.
///
/// # Errors
///
/// An unknown name or a number outside 1..=64, named in the message.
pub fn parse_signal(s: &str) -> anyhow::Result<u32> {
    let bad = || anyhow::anyhow!("unknown signal {s:?}");
    if let Ok(n) = s.parse::<u32>() {
        return if (1..=SIGRTMAX).contains(&n) {
            Ok(n)
        } else {
            Err(bad())
        };
    }
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if let Some((_, n)) = SIGNALS.iter().find(|(n, _)| *n == name) {
        return Ok(*n);
    }
    let rt = |base: u32, rest: &str, add: bool| -> Option<u32> {
        let off = if rest.is_empty() {
            0
        } else {
            rest.get(1..)?.parse::<u32>().ok()?
        };
        let n = if add {
            base.checked_add(off)?
        } else {
            base.checked_sub(off)?
        };
        (SIGRTMIN..=SIGRTMAX).contains(&n).then_some(n)
    };
    let parsed = if let Some(rest) = name.strip_prefix("RTMIN") {
        (rest.is_empty() || rest.starts_with('+'))
            .then(|| rt(SIGRTMIN, rest, true))
            .flatten()
    } else if let Some(rest) = name.strip_prefix("RTMAX") {
        (rest.is_empty() || rest.starts_with('-'))
            .then(|| rt(SIGRTMAX, rest, false))
            .flatten()
    } else {
        None
    };
    parsed.ok_or_else(bad)
}

/// `squib kill`.
///
/// # Errors
///
/// Unknown signal or container, a container that is not running (without `--all`), or the
/// agent refused.
pub fn run(ctx: &Context, args: &KillArgs) -> anyhow::Result<u8> {
    let signal = parse_signal(&args.signal)?;
    let state = ctx.load(&args.id)?;
    match state.status {
        Status::Created | Status::Running | Status::Paused => {}
        // runc: signalling every process of a stopped container finds none, which is fine.
        Status::Stopped | Status::Creating if args.all => return Ok(0),
        Status::Stopped | Status::Creating => anyhow::bail!("container not running"),
    }
    let sent = runtime()?.block_on(async {
        let send = async {
            let agent = connect_agent(ctx, &state.id).await?;
            agent
                .signal_process(state.id.as_str(), "", signal, args.all)
                .await
                .map_err(anyhow::Error::from)
        };
        if signal != SIGKILL {
            return send.await;
        }
        tokio::time::timeout(KILL_ANSWER_WAIT, send)
            .await
            .unwrap_or_else(|_| {
                Err(anyhow::anyhow!(
                    "the guest agent did not answer within {} s",
                    KILL_ANSWER_WAIT.as_secs()
                ))
            })
    });
    let agent_answered = |e: &anyhow::Error| {
        matches!(
            e.downcast_ref(),
            Some(squib_runtime::agent_client::AgentClientError::Rpc { .. })
        )
    };
    match sent {
        Ok(()) => Ok(0),
        Err(e) if signal == SIGKILL && !agent_answered(&e) => {
            ctx.control(&state.id, "poweroff").with_context(|| {
                format!("powering the microVM off after the SIGKILL failed ({e:#})")
            })?;
            tracing::warn!(
                container_id = %state.id,
                error = %format!("{e:#}"),
                "powered the microVM off to carry out a SIGKILL"
            );
            Ok(0)
        }
        Err(e) => match e.downcast::<squib_runtime::agent_client::AgentClientError>() {
            // The process exited between the state check and the signal.
            Ok(squib_runtime::agent_client::AgentClientError::Rpc {
                code: squib_agent_protocol::ttrpc::Code::NOT_FOUND,
                ..
            }) if !args.all => anyhow::bail!("container not running"),
            Ok(squib_runtime::agent_client::AgentClientError::Rpc {
                code: squib_agent_protocol::ttrpc::Code::NOT_FOUND,
                ..
            }) => Ok(0),
            Ok(e) => Err(e.into()),
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_signal_accepts_names_prefixes_case_and_numbers() {
        for (s, n) in [
            ("KILL", 9),
            ("SIGKILL", 9),
            ("sigkill", 9),
            ("kill", 9),
            ("9", 9),
            ("TERM", 15),
            ("SIGUSR1", 10),
            ("WINCH", 28),
            ("64", 64),
            ("RTMIN", 34),
            ("SIGRTMIN+3", 37),
            ("RTMAX-1", 63),
        ] {
            assert_eq!(parse_signal(s).unwrap(), n, "{s}");
        }
    }

    #[test]
    fn test_parse_signal_rejects_unknown_naming_the_input() {
        for s in [
            "", "0", "65", "-9", "SIGFOO", "SIG", "RTMIN-1", "RTMAX+1", "9x",
        ] {
            let err = parse_signal(s).unwrap_err().to_string();
            assert!(err.contains("unknown signal"), "{s}: {err}");
            assert!(err.contains(&format!("{s:?}")), "{s}: {err}");
        }
    }
}
