//! Parameters of VM snapshot creation and loading.
//!
//! Known limitation: snapshotting is not implemented. These types are validated and carried to
//! the event loop so the wire contract is settled, but the event loop answers both actions with
//! `VmmActionError::SnapshotNotSupported`. Implementing it needs the backend to save and
//! restore vCPU, device and memory state behind the hypervisor seam.

use std::path::{Path, PathBuf};

use crate::config::{ConfigError, DeviceId};

/// Whether a snapshot holds all of guest memory or only the pages dirtied since the last one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only pages dirtied since the previous snapshot.
    Diff,
}

/// A request to write the paused microVM's state and memory to files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotCreateParams {
    snapshot_type: SnapshotType,
    snapshot_path: PathBuf,
    mem_file_path: PathBuf,
}

impl SnapshotCreateParams {
    /// Builds the parameters.
    ///
    /// # Errors
    /// [`ConfigError::EmptyPath`] for an empty path.
    pub fn new(
        snapshot_type: SnapshotType,
        snapshot_path: PathBuf,
        mem_file_path: PathBuf,
    ) -> Result<Self, ConfigError> {
        if snapshot_path.as_os_str().is_empty() {
            return Err(ConfigError::EmptyPath {
                field: "snapshot_path",
            });
        }
        if mem_file_path.as_os_str().is_empty() {
            return Err(ConfigError::EmptyPath {
                field: "mem_file_path",
            });
        }
        Ok(Self {
            snapshot_type,
            snapshot_path,
            mem_file_path,
        })
    }
    /// Full or diff.
    pub fn snapshot_type(&self) -> SnapshotType {
        self.snapshot_type
    }
    /// File receiving the microVM state.
    pub fn snapshot_path(&self) -> &Path {
        &self.snapshot_path
    }
    /// File receiving guest memory.
    pub fn mem_file_path(&self) -> &Path {
        &self.mem_file_path
    }
}

/// Where guest memory comes from when a snapshot is loaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemoryBackend {
    /// A memory file written by snapshot creation.
    File(PathBuf),
    /// A Unix socket of a process serving page faults through userfaultfd.
    Uffd(PathBuf),
}

/// A request to restore a microVM from snapshot files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotLoadParams {
    snapshot_path: PathBuf,
    mem_backend: MemoryBackend,
    track_dirty_pages: bool,
    resume_vm: bool,
    network_overrides: Vec<(DeviceId, String)>,
    vsock_override: Option<PathBuf>,
}

impl SnapshotLoadParams {
    /// Builds the parameters.
    ///
    /// # Errors
    /// [`ConfigError::EmptyPath`] for an empty snapshot or memory path.
    pub fn new(
        snapshot_path: PathBuf,
        mem_backend: MemoryBackend,
        track_dirty_pages: bool,
        resume_vm: bool,
        network_overrides: Vec<(DeviceId, String)>,
        vsock_override: Option<PathBuf>,
    ) -> Result<Self, ConfigError> {
        if snapshot_path.as_os_str().is_empty() {
            return Err(ConfigError::EmptyPath {
                field: "snapshot_path",
            });
        }
        let (MemoryBackend::File(p) | MemoryBackend::Uffd(p)) = &mem_backend;
        if p.as_os_str().is_empty() {
            return Err(ConfigError::EmptyPath {
                field: "backend_path",
            });
        }
        Ok(Self {
            snapshot_path,
            mem_backend,
            track_dirty_pages,
            resume_vm,
            network_overrides,
            vsock_override,
        })
    }
    /// File holding the microVM state.
    pub fn snapshot_path(&self) -> &Path {
        &self.snapshot_path
    }
    /// Source of guest memory.
    pub fn mem_backend(&self) -> &MemoryBackend {
        &self.mem_backend
    }
    /// Whether dirty pages are tracked after the load.
    pub fn track_dirty_pages(&self) -> bool {
        self.track_dirty_pages
    }
    /// Whether the microVM runs right after the load.
    pub fn resume_vm(&self) -> bool {
        self.resume_vm
    }
    /// New TAP devices for restored interfaces.
    pub fn network_overrides(&self) -> &[(DeviceId, String)] {
        &self.network_overrides
    }
    /// New host socket for the restored vsock device.
    pub fn vsock_override(&self) -> Option<&Path> {
        self.vsock_override.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_snapshot_create_rejects_empty_paths() {
        let err = SnapshotCreateParams::new(SnapshotType::Full, PathBuf::new(), "/m".into());
        assert_eq!(
            err.unwrap_err(),
            ConfigError::EmptyPath {
                field: "snapshot_path"
            }
        );
        let err = SnapshotCreateParams::new(SnapshotType::Diff, "/s".into(), PathBuf::new());
        assert_eq!(
            err.unwrap_err(),
            ConfigError::EmptyPath {
                field: "mem_file_path"
            }
        );
    }

    #[test]
    fn test_snapshot_load_rejects_empty_backend_path() {
        let err = SnapshotLoadParams::new(
            "/s".into(),
            MemoryBackend::Uffd(PathBuf::new()),
            false,
            false,
            vec![],
            None,
        );
        assert_eq!(
            err.unwrap_err(),
            ConfigError::EmptyPath {
                field: "backend_path"
            }
        );
    }
}
