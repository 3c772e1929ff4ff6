//! cgroup v2 for containers: one group per container under the agent's cgroup root, with
//! the spec's limits, statistics, the freezer and OOM-kill counting.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::spec::Resources;

/// Controllers the agent enables for container groups (missing ones are skipped).
const CONTROLLERS: [&str; 5] = ["cpu", "cpuset", "io", "memory", "pids"];

/// Failures around a container's cgroup.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// A cgroup file could not be written.
    #[error("write {value:?} to {}", path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The value.
        value: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A cgroup file could not be read.
    #[error("read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The group could not be created or removed.
    #[error("{op} cgroup {}", path.display())]
    Dir {
        /// "create" or "remove".
        op: &'static str,
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The freezer did not settle in time.
    #[error("cgroup {} did not reach frozen={want} within 5 s", path.display())]
    FreezeTimeout {
        /// The group.
        path: PathBuf,
        /// The wanted state.
        want: u8,
    },
}

fn write(path: PathBuf, value: &str) -> Result<(), CgroupError> {
    fs::write(&path, value).map_err(|source| CgroupError::Write {
        path,
        value: value.to_owned(),
        source,
    })
}

fn read(path: PathBuf) -> Result<String, CgroupError> {
    fs::read_to_string(&path).map_err(|source| CgroupError::Read { path, source })
}

/// Enables the container controllers for children of `root` (best effort per controller).
pub fn enable_controllers(root: &Path) {
    for c in CONTROLLERS {
        if let Err(e) = fs::write(root.join("cgroup.subtree_control"), format!("+{c}")) {
            tracing::debug!(controller = c, error = %e, "controller not enabled");
        }
    }
}

/// One container's cgroup.
#[derive(Debug, Clone)]
pub struct Cgroup {
    path: PathBuf,
}

/// Resource usage of a container.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// memory.current.
    pub memory_usage_bytes: u64,
    /// memory.max (0 = unlimited).
    pub memory_limit_bytes: u64,
    /// cpu.stat usage_usec.
    pub cpu_usage_usec: u64,
    /// cpu.stat user_usec.
    pub cpu_user_usec: u64,
    /// cpu.stat system_usec.
    pub cpu_system_usec: u64,
    /// pids.current.
    pub pids_current: u64,
    /// pids.max (0 = unlimited).
    pub pids_limit: u64,
    /// io.stat rbytes summed over devices.
    pub io_read_bytes: u64,
    /// io.stat wbytes summed over devices.
    pub io_write_bytes: u64,
    /// memory.events oom_kill.
    pub oom_kills: u64,
}

impl Cgroup {
    /// Creates `<root>/<id>` and applies `resources`.
    ///
    /// # Errors
    ///
    /// The directory cannot be made or a limit is refused by the kernel (the group is
    /// removed again).
    pub fn create(
        root: &Path,
        id: &str,
        resources: Option<&Resources>,
    ) -> Result<Self, CgroupError> {
        let path = root.join(id);
        fs::create_dir_all(&path).map_err(|source| CgroupError::Dir {
            op: "create",
            path: path.clone(),
            source,
        })?;
        let cg = Self { path };
        if let Some(r) = resources
            && let Err(e) = cg.apply(r)
        {
            let _ = fs::remove_dir(&cg.path);
            return Err(e);
        }
        Ok(cg)
    }

    fn apply(&self, r: &Resources) -> Result<(), CgroupError> {
        if let Some(m) = &r.memory
            && let Some(limit) = m.limit
        {
            let v = if limit < 0 {
                "max".to_owned()
            } else {
                limit.to_string()
            };
            write(self.path.join("memory.max"), &v)?;
            if let Some(swap) = m.swap {
                // OCI's swap is memory + swap; cgroup v2 wants swap alone.
                let v = if swap < 0 {
                    "max".to_owned()
                } else {
                    swap.saturating_sub(limit.max(0)).to_string()
                };
                if self.path.join("memory.swap.max").exists() {
                    write(self.path.join("memory.swap.max"), &v)?;
                }
            }
        }
        if let Some(c) = &r.cpu {
            if c.quota.is_some() || c.period.is_some() {
                let quota = match c.quota {
                    Some(q) if q > 0 => q.to_string(),
                    _ => "max".to_owned(),
                };
                let period = c.period.unwrap_or(100_000);
                write(self.path.join("cpu.max"), &format!("{quota} {period}"))?;
            }
            if let Some(cpus) = c.cpus.as_ref().filter(|s| !s.is_empty()) {
                write(self.path.join("cpuset.cpus"), cpus)?;
            }
            if let Some(mems) = c.mems.as_ref().filter(|s| !s.is_empty()) {
                write(self.path.join("cpuset.mems"), mems)?;
            }
        }
        if let Some(p) = &r.pids {
            let v = if p.limit > 0 {
                p.limit.to_string()
            } else {
                "max".to_owned()
            };
            write(self.path.join("pids.max"), &v)?;
        }
        Ok(())
    }

    /// Moves a process into the group.
    ///
    /// # Errors
    ///
    /// [`CgroupError::Write`].
    pub fn add(&self, pid: i32) -> Result<(), CgroupError> {
        write(self.path.join("cgroup.procs"), &pid.to_string())
    }

    /// Pids currently in the group.
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Freezes (`true`) or thaws the group and waits until the kernel reports it settled.
    ///
    /// # Errors
    ///
    /// [`CgroupError`] when the write fails or the state does not settle in 5 s.
    pub fn freeze(&self, frozen: bool) -> Result<(), CgroupError> {
        let want = u8::from(frozen);
        write(self.path.join("cgroup.freeze"), &want.to_string())?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let events = read(self.path.join("cgroup.events"))?;
            if events.lines().any(|l| l.trim() == format!("frozen {want}")) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::FreezeTimeout {
                    path: self.path.clone(),
                    want,
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The memory.events oom_kill counter (0 when unavailable).
    pub fn oom_kills(&self) -> u64 {
        let text = fs::read_to_string(self.path.join("memory.events")).unwrap_or_default();
        keyed(&text, "oom_kill")
    }

    /// Current usage.
    ///
    /// # Errors
    ///
    /// [`CgroupError::Read`] when memory.current cannot be read (the group is gone).
    pub fn stats(&self) -> Result<Stats, CgroupError> {
        let num = |file: &str| -> u64 {
            fs::read_to_string(self.path.join(file))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        };
        let memory_usage_bytes = read(self.path.join("memory.current"))?
            .trim()
            .parse()
            .unwrap_or(0);
        let cpu = fs::read_to_string(self.path.join("cpu.stat")).unwrap_or_default();
        let io = fs::read_to_string(self.path.join("io.stat")).unwrap_or_default();
        let (mut rb, mut wb) = (0u64, 0u64);
        for field in io.split_whitespace() {
            if let Some(v) = field.strip_prefix("rbytes=") {
                rb = rb.saturating_add(v.parse().unwrap_or(0));
            } else if let Some(v) = field.strip_prefix("wbytes=") {
                wb = wb.saturating_add(v.parse().unwrap_or(0));
            }
        }
        Ok(Stats {
            memory_usage_bytes,
            memory_limit_bytes: num("memory.max"),
            cpu_usage_usec: keyed(&cpu, "usage_usec"),
            cpu_user_usec: keyed(&cpu, "user_usec"),
            cpu_system_usec: keyed(&cpu, "system_usec"),
            pids_current: num("pids.current"),
            pids_limit: num("pids.max"),
            io_read_bytes: rb,
            io_write_bytes: wb,
            oom_kills: self.oom_kills(),
        })
    }

    /// Removes the (empty) group, retrying briefly while the last processes are torn down.
    ///
    /// # Errors
    ///
    /// [`CgroupError::Dir`] when it is still busy after 2 s.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(source) if Instant::now() >= deadline => {
                    return Err(CgroupError::Dir {
                        op: "remove",
                        path: self.path.clone(),
                        source,
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

/// Value of `key N` lines in a flat-keyed cgroup file.
fn keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|l| {
            let mut it = l.split_whitespace();
            (it.next() == Some(key)).then(|| it.next().and_then(|v| v.parse().ok()))?
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_keyed_reads_flat_keyed_files() {
        let text = "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n";
        assert_eq!(keyed(text, "user_usec"), 1000);
        assert_eq!(keyed(text, "nr_periods"), 0);
        assert_eq!(keyed("low 0\noom 2\noom_kill 1\n", "oom_kill"), 1);
    }
}
