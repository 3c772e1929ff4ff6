//! The read mirror: what the event loop publishes after every change, and what every read of
//! the API is served from without a round trip to the event loop.
//!
//! The event loop is the only writer ([`SnapshotPublisher`]); readers hold a
//! [`SnapshotReader`] and load the latest [`ControllerSnapshot`] lock-free.

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{BalloonStats, VmConfig};

/// Name the instance reports as its application.
pub const APP_NAME: &str = "squib";
/// Version the instance reports.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Where the microVM is in its life. Internal: the wire shows [`InstanceState`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LifecyclePhase {
    /// Accepting configuration; `InstanceStart` not yet sent.
    #[default]
    NotStarted,
    /// `InstanceStart` is being carried out; every action is refused meanwhile.
    Booting,
    /// vCPUs are running.
    Running,
    /// vCPUs are paused.
    Paused,
    /// The guest or the VMM ended the microVM; nothing more is accepted.
    ShutDown,
}

/// The public state, as shown by `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Not booted yet (including while booting).
    NotStarted,
    /// Running (or ended: the process keeps answering until it exits).
    Running,
    /// Paused.
    Paused,
}

impl InstanceState {
    /// The wire text.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "Not started",
            Self::Running => "Running",
            Self::Paused => "Paused",
        }
    }
}

impl LifecyclePhase {
    /// The public state this phase shows as.
    pub fn public_state(self) -> InstanceState {
        match self {
            Self::NotStarted | Self::Booting => InstanceState::NotStarted,
            Self::Running | Self::ShutDown => InstanceState::Running,
            Self::Paused => InstanceState::Paused,
        }
    }

    /// Whether the VM was started (running, paused or ended).
    pub fn is_started(self) -> bool {
        matches!(self, Self::Running | Self::Paused | Self::ShutDown)
    }
}

/// Everything the API reads, as one immutable value.
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerSnapshot {
    /// Instance id (`--id`).
    pub id: String,
    /// Lifecycle phase.
    pub phase: LifecyclePhase,
    /// Version of this VMM.
    pub vmm_version: String,
    /// Application name.
    pub app_name: String,
    /// The VM configuration as applied so far.
    pub vm_config: VmConfig,
    /// Latest balloon statistics, when a running backend reports them.
    pub balloon_stats: Option<BalloonStats>,
}

impl ControllerSnapshot {
    /// The snapshot of a fresh instance called `id`.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            phase: LifecyclePhase::NotStarted,
            vmm_version: VMM_VERSION.to_owned(),
            app_name: APP_NAME.to_owned(),
            vm_config: VmConfig::default(),
            balloon_stats: None,
        }
    }

    /// The public state.
    pub fn state(&self) -> InstanceState {
        self.phase.public_state()
    }
}

/// Read access to the mirror; cheap to clone.
#[derive(Debug, Clone)]
pub struct SnapshotReader(Arc<ArcSwap<ControllerSnapshot>>);

impl SnapshotReader {
    /// The latest published snapshot.
    pub fn load(&self) -> Arc<ControllerSnapshot> {
        self.0.load_full()
    }
}

/// Write access to the mirror. There is one; the event loop owns it.
#[derive(Debug)]
pub struct SnapshotPublisher(Arc<ArcSwap<ControllerSnapshot>>);

impl SnapshotPublisher {
    /// Replaces the published snapshot.
    pub fn publish(&self, snapshot: ControllerSnapshot) {
        self.0.store(Arc::new(snapshot));
    }

    /// The snapshot currently published.
    pub fn current(&self) -> Arc<ControllerSnapshot> {
        self.0.load_full()
    }
}

/// Creates the mirror holding `initial`, returning its single writer and a reader.
pub fn snapshot_mirror(initial: ControllerSnapshot) -> (SnapshotPublisher, SnapshotReader) {
    let shared = Arc::new(ArcSwap::from_pointee(initial));
    (
        SnapshotPublisher(Arc::clone(&shared)),
        SnapshotReader(shared),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_phase_public_state_hides_booting_and_shutdown() {
        assert_eq!(
            LifecyclePhase::Booting.public_state().as_str(),
            "Not started"
        );
        assert_eq!(
            LifecyclePhase::NotStarted.public_state().as_str(),
            "Not started"
        );
        assert_eq!(LifecyclePhase::Running.public_state().as_str(), "Running");
        assert_eq!(LifecyclePhase::Paused.public_state().as_str(), "Paused");
        assert_eq!(LifecyclePhase::ShutDown.public_state().as_str(), "Running");
    }

    #[test]
    fn test_mirror_publish_is_seen_by_reader() {
        let (publisher, reader) = snapshot_mirror(ControllerSnapshot::new("vm0"));
        assert_eq!(reader.load().phase, LifecyclePhase::NotStarted);
        let mut next = (*publisher.current()).clone();
        next.phase = LifecyclePhase::Running;
        publisher.publish(next);
        assert_eq!(reader.load().phase, LifecyclePhase::Running);
        assert_eq!(reader.load().id, "vm0");
    }
}
