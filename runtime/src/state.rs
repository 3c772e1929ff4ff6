//! Persistent container state under the runtime root, so that `state`, `kill` and `delete` work
//! from any later invocation.
//!
//! Each container has a directory `<root>/<id>/` holding `state.json` (written atomically: a
//! temporary file renamed over the old one) and the sockets of its monitor. [`ContainerId`]
//! refuses anything that could escape the root.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The OCI runtime spec version whose state format this module writes.
pub const OCI_VERSION: &str = "1.0.2";

/// A state-directory failure.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The id is empty, too long, or has characters other than `[A-Za-z0-9_.+-]`.
    #[error(
        "invalid container id {id:?}: use 1-1024 of A-Z a-z 0-9 _ . + -, not starting with '.'"
    )]
    InvalidId {
        /// The rejected id.
        id: String,
    },
    /// A container with this id exists already.
    #[error("container {id} already exists")]
    Exists {
        /// The id.
        id: String,
    },
    /// No container with this id exists.
    #[error("container {id} does not exist")]
    NotFound {
        /// The id.
        id: String,
    },
    /// Reading or writing the state failed.
    #[error("container state at {path}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// state.json is not valid.
    #[error("container state at {path} is corrupt")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
}

/// A container id that is safe to use as a directory name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ContainerId(String);

impl ContainerId {
    /// Validates `id`.
    ///
    /// # Errors
    ///
    /// [`StateError::InvalidId`].
    pub fn new(id: &str) -> Result<Self, StateError> {
        let ok = !id.is_empty()
            && id.len() <= 1024
            && !id.starts_with('.')
            && id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.+-".contains(c));
        if ok {
            Ok(Self(id.to_string()))
        } else {
            Err(StateError::InvalidId { id: id.to_string() })
        }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ContainerId {
    type Error = StateError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(&value)
    }
}

impl From<ContainerId> for String {
    fn from(id: ContainerId) -> Self {
        id.0
    }
}

impl std::fmt::Display for ContainerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The OCI lifecycle status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Being created.
    Creating,
    /// Created; the process has not been started.
    Created,
    /// The process runs.
    Running,
    /// The process and its VM are paused.
    Paused,
    /// The process exited.
    Stopped,
}

/// What the runtime remembers of one container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerState {
    /// The container's id.
    pub id: ContainerId,
    /// The bundle directory, absolute.
    pub bundle: PathBuf,
    /// The monitor process (the VMM hosting the container's microVM); 0 when none runs.
    pub monitor_pid: i32,
    /// Lifecycle status as last recorded; callers refresh it against the monitor.
    pub status: Status,
    /// Exit status of the container's process once it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_status: Option<i32>,
    /// Creation time, RFC 3339.
    pub created: String,
    /// The spec's annotations.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    /// The monitor's start time in clock ticks since boot (field 22 of `/proc/PID/stat`), so
    /// that a recycled pid is never mistaken for the monitor; 0 when unknown.
    #[serde(default)]
    pub monitor_start_time: u64,
    /// The root image the VM boots from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_image: Option<PathBuf>,
    /// Whether the root image came from the image cache without a build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_cache_hit: Option<bool>,
}

impl ContainerState {
    /// The state as the OCI runtime spec's `state` operation prints it.
    ///
    /// `pid` is the monitor's pid: the container's process lives inside the microVM and has no
    /// host pid, and the monitor is what a signal to "the container" must reach.
    pub fn to_oci_json(&self) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": OCI_VERSION,
            "id": self.id.as_str(),
            "status": self.status,
            "pid": if matches!(self.status, Status::Stopped) { 0 } else { self.monitor_pid },
            "bundle": self.bundle,
            "annotations": self.annotations,
        })
    }
}

/// The runtime root: one directory per container.
#[derive(Debug, Clone)]
pub struct StateRoot {
    root: PathBuf,
}

impl StateRoot {
    /// Uses `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The directory of container `id`.
    pub fn dir(&self, id: &ContainerId) -> PathBuf {
        self.root.join(id.as_str())
    }

    fn file(&self, id: &ContainerId) -> PathBuf {
        self.dir(id).join("state.json")
    }

    /// Creates the directory of a new container and records its first state.
    ///
    /// # Errors
    ///
    /// [`StateError::Exists`] when the id is taken, [`StateError::Io`] otherwise.
    pub fn create(&self, state: &ContainerState) -> Result<PathBuf, StateError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        let dir = self.dir(&state.id);
        match fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StateError::Exists {
                    id: state.id.to_string(),
                });
            }
            Err(e) => return Err(io(&dir)(e)),
        }
        if let Err(e) = self.save(state) {
            let _ = fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(dir)
    }

    /// Replaces the recorded state atomically.
    ///
    /// # Errors
    ///
    /// [`StateError::NotFound`] when the container's directory is gone, [`StateError::Io`].
    pub fn save(&self, state: &ContainerState) -> Result<(), StateError> {
        let dir = self.dir(&state.id);
        if !dir.is_dir() {
            return Err(StateError::NotFound {
                id: state.id.to_string(),
            });
        }
        let path = self.file(&state.id);
        let tmp = dir.join(".state.json.tmp");
        let body = serde_json::to_vec_pretty(state).map_err(|source| StateError::Corrupt {
            path: path.clone(),
            source,
        })?;
        fs::write(&tmp, body).map_err(|source| StateError::Io {
            path: tmp.clone(),
            source,
        })?;
        fs::rename(&tmp, &path).map_err(|source| StateError::Io { path, source })
    }

    /// Reads the recorded state of `id`.
    ///
    /// # Errors
    ///
    /// [`StateError::NotFound`], [`StateError::Corrupt`] or [`StateError::Io`].
    pub fn load(&self, id: &ContainerId) -> Result<ContainerState, StateError> {
        let path = self.file(id);
        let body = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StateError::NotFound { id: id.to_string() });
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&body).map_err(|source| StateError::Corrupt { path, source })
    }

    /// The ids of every recorded container, sorted.
    ///
    /// # Errors
    ///
    /// [`StateError::Io`] when the root cannot be read (a missing root is an empty list).
    pub fn list(&self) -> Result<Vec<ContainerId>, StateError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(StateError::Io {
                    path: self.root.clone(),
                    source,
                });
            }
        };
        let mut ids: Vec<ContainerId> = entries
            .flatten()
            .filter(|e| e.path().join("state.json").is_file())
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|s| ContainerId::new(s).ok())
            })
            .collect();
        ids.sort();
        Ok(ids)
    }

    /// Removes the container's directory and everything in it.
    ///
    /// # Errors
    ///
    /// [`StateError::Io`] other than "already gone".
    pub fn remove(&self, id: &ContainerId) -> Result<(), StateError> {
        let dir = self.dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path: dir, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> (StateRoot, PathBuf) {
        let d = std::env::temp_dir().join(format!(
            "squib-state-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        (StateRoot::new(&d), d)
    }

    fn state(id: &str) -> ContainerState {
        ContainerState {
            id: ContainerId::new(id).unwrap(),
            bundle: "/b".into(),
            monitor_pid: 42,
            status: Status::Created,
            exit_status: None,
            created: "2026-01-01T00:00:00Z".into(),
            annotations: BTreeMap::from([("a".to_string(), "b".to_string())]),
            monitor_start_time: 0,
            rootfs_image: None,
            rootfs_cache_hit: None,
        }
    }

    #[test]
    fn test_container_id_rejects_path_escapes() {
        for bad in ["", "..", ".hidden", "a/b", "a b", "x\0"] {
            assert!(
                matches!(ContainerId::new(bad), Err(StateError::InvalidId { .. })),
                "{bad:?}"
            );
        }
        assert!(ContainerId::new("c01a-1.2_x+y").is_ok());
    }

    #[test]
    fn test_state_root_create_load_save_list_remove() {
        let (root, dir) = root();
        let mut s = state("c1");
        root.create(&s).unwrap();
        assert!(matches!(root.create(&s), Err(StateError::Exists { .. })));
        assert_eq!(root.load(&s.id).unwrap(), s);
        s.status = Status::Stopped;
        s.exit_status = Some(137);
        root.save(&s).unwrap();
        assert_eq!(root.load(&s.id).unwrap().exit_status, Some(137));
        root.create(&state("c0")).unwrap();
        let ids: Vec<_> = root.list().unwrap().iter().map(|i| i.to_string()).collect();
        assert_eq!(ids, ["c0", "c1"]);
        root.remove(&s.id).unwrap();
        assert!(matches!(root.load(&s.id), Err(StateError::NotFound { .. })));
        assert!(!dir.join("c1").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn test_oci_state_reports_monitor_pid_until_stopped() {
        let mut s = state("c2");
        s.status = Status::Running;
        let v = s.to_oci_json();
        assert_eq!(v["status"], "running");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["ociVersion"], OCI_VERSION);
        assert_eq!(v["annotations"]["a"], "b");
        s.status = Status::Stopped;
        assert_eq!(s.to_oci_json()["pid"], 0);
    }

    #[test]
    fn test_state_root_load_reports_corrupt_file() {
        let (root, dir) = root();
        let s = state("c3");
        root.create(&s).unwrap();
        fs::write(dir.join("c3/state.json"), b"{not json").unwrap();
        assert!(matches!(root.load(&s.id), Err(StateError::Corrupt { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
