//! Child reaping for PID 1 without the reaper/waiter race.
//!
//! One thread owns `waitpid`: it sleeps in `waitid(P_ALL, WEXITED | WNOWAIT)` (which does not
//! consume the zombie), then takes the table lock and reaps every zombie with `WNOHANG`. A
//! child is only ever forked inside [`Reaper::spawn`], which holds the same lock from the fork
//! until the pid is registered, so a fast-exiting child can never be reaped before anyone
//! knows it is supervised. Children nobody registered (orphans re-parented to PID 1, a
//! container's processes after its PID namespace died) are reaped and forgotten. Nobody else
//! in the agent calls `wait*`.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// How a supervised process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Exit code, or 128 + signal number.
    pub status: i32,
    /// When the reaper saw it.
    pub at: SystemTime,
}

/// Exit status converted the shell's way.
pub fn exit_status(ws: WaitStatus) -> Option<i32> {
    match ws {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// The exit of one supervised process, once known.
#[derive(Debug, Default)]
pub struct ExitCell {
    info: Mutex<Option<ExitInfo>>,
    cond: Condvar,
}

impl ExitCell {
    fn set(&self, info: ExitInfo) {
        let mut g = lock(&self.info);
        *g = Some(info);
        self.cond.notify_all();
    }

    /// The exit, if it happened.
    pub fn get(&self) -> Option<ExitInfo> {
        *lock(&self.info)
    }

    /// Blocks until the process exited.
    pub fn wait(&self) -> ExitInfo {
        let mut g = lock(&self.info);
        loop {
            if let Some(info) = *g {
                return info;
            }
            g = self.cond.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Blocks until the process exited or `timeout` passed.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitInfo> {
        let g = lock(&self.info);
        let (g, _) = self
            .cond
            .wait_timeout_while(g, timeout, |i| i.is_none())
            .unwrap_or_else(|p| p.into_inner());
        *g
    }
}

/// A poisoned lock only means another thread panicked while holding it; the data (a table of
/// pids) stays consistent, so keep going.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Default)]
struct Table {
    supervised: HashMap<i32, Arc<ExitCell>>,
    /// Bumped by every spawn, so the reaper knows children may exist again after ECHILD.
    generation: u64,
}

/// The agent's single reaper.
#[derive(Debug, Default)]
pub struct Reaper {
    table: Mutex<Table>,
    children: Condvar,
}

impl Reaper {
    /// Starts the reaper thread.
    ///
    /// # Errors
    ///
    /// The thread could not be spawned.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let r = Arc::new(Self::default());
        let r2 = r.clone();
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r2.run())?;
        Ok(r)
    }

    /// Runs `fork` (which must create exactly one child and return its pid) with the table
    /// locked, and registers the child before the lock is released.
    ///
    /// # Errors
    ///
    /// Whatever `fork` returns.
    pub fn spawn<E>(
        &self,
        fork: impl FnOnce() -> Result<Pid, E>,
    ) -> Result<(Pid, Arc<ExitCell>), E> {
        let mut t = lock(&self.table);
        let pid = fork()?;
        let cell = Arc::new(ExitCell::default());
        t.supervised.insert(pid.as_raw(), cell.clone());
        t.generation += 1;
        drop(t);
        self.children.notify_all();
        Ok((pid, cell))
    }

    fn run(&self) {
        loop {
            match nix::sys::wait::waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT) {
                Ok(_) => self.reap_all(),
                Err(Errno::EINTR) => {}
                Err(Errno::ECHILD) => self.wait_for_children(),
                Err(e) => {
                    tracing::warn!(error = %e, "waitid failed");
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }

    fn wait_for_children(&self) {
        let t = lock(&self.table);
        let seen = t.generation;
        // A spawn bumps the generation; also re-check now and then for children that did not
        // come through `spawn` (re-parented orphans need no wake-up: they exist only while
        // some child of ours exists).
        let _ = self
            .children
            .wait_timeout_while(t, Duration::from_secs(1), |t| t.generation == seen);
    }

    fn reap_all(&self) {
        let mut t = lock(&self.table);
        loop {
            match nix::sys::wait::waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => break,
                Ok(ws) => {
                    let (Some(pid), Some(status)) = (ws.pid(), exit_status(ws)) else {
                        continue;
                    };
                    let info = ExitInfo {
                        status,
                        at: SystemTime::now(),
                    };
                    match t.supervised.remove(&pid.as_raw()) {
                        Some(cell) => {
                            tracing::debug!(pid = pid.as_raw(), status, "process exited");
                            cell.set(info);
                        }
                        None => tracing::trace!(pid = pid.as_raw(), status, "reaped orphan"),
                    }
                }
                Err(Errno::EINTR) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_exit_status_maps_signals_to_128_plus_n() {
        let pid = Pid::from_raw(5);
        assert_eq!(exit_status(WaitStatus::Exited(pid, 42)), Some(42));
        assert_eq!(
            exit_status(WaitStatus::Signaled(
                pid,
                nix::sys::signal::Signal::SIGKILL,
                false
            )),
            Some(137)
        );
        assert_eq!(
            exit_status(WaitStatus::Signaled(
                pid,
                nix::sys::signal::Signal::SIGTERM,
                true
            )),
            Some(143)
        );
        assert_eq!(exit_status(WaitStatus::StillAlive), None);
    }
}
