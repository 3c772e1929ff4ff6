//! Running a child process with a deadline: its output is collected on threads (so a chatty
//! child never blocks on a full pipe) and, past the deadline, it is killed by its PID.

use std::io::{self, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// Failures of [`output_with_timeout`].
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// The program could not be started.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// The spawn error.
        #[source]
        source: io::Error,
    },
    /// Waiting for or killing the child failed.
    #[error("cannot wait for {program} (pid {pid})")]
    Wait {
        /// The program.
        program: String,
        /// Its PID.
        pid: u32,
        /// The wait error.
        #[source]
        source: io::Error,
    },
}

/// What a child did.
#[derive(Debug)]
pub struct TimedOutput {
    /// Its exit status (after a kill, the status of the killed process).
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
    /// Whether it was killed at the deadline.
    pub timed_out: bool,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
}

fn drain(reader: Option<impl Read + Send + 'static>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut reader) = reader {
            // A read error ends the collection; what was read so far is still returned.
            let _ = reader.read_to_end(&mut buf);
        }
        buf
    })
}

fn wait_until(child: &mut Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `cmd` with stdin on /dev/null and stdout/stderr captured, killing it (SIGKILL to its
/// PID) if it has not exited after `timeout`.
///
/// # Limitations
/// Only the direct child is killed; a child that started its own background processes must
/// end them itself (the processes it runs here, QEMU and the VM test host, do).
///
/// # Errors
/// [`ProcessError::Spawn`] if the program cannot start, [`ProcessError::Wait`] if waiting
/// or killing fails.
pub fn output_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> Result<TimedOutput, ProcessError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ProcessError::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = child.id();
    let wait_err = |source| ProcessError::Wait {
        program: program.clone(),
        pid,
        source,
    };
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let (status, timed_out) = match wait_until(&mut child, start + timeout).map_err(wait_err)? {
        Some(status) => (status, false),
        None => {
            child.kill().map_err(wait_err)?;
            (child.wait().map_err(wait_err)?, true)
        }
    };
    let elapsed = start.elapsed();
    Ok(TimedOutput {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
        timed_out,
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_output_with_timeout_keeps_streams_apart() {
        let out = output_with_timeout(
            Command::new("sh").args(["-c", "printf out; printf err >&2; exit 4"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"out");
        assert_eq!(out.stderr, b"err");
        assert_eq!(out.status.code(), Some(4));
        assert!(!out.timed_out);
    }

    #[test]
    fn test_output_with_timeout_kills_at_deadline() {
        let out = output_with_timeout(Command::new("sleep").arg("30"), Duration::from_millis(200))
            .unwrap();
        assert!(out.timed_out);
        assert!(out.elapsed < Duration::from_secs(10));
    }
}
