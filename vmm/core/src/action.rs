//! The actions the controller sends to the event loop, and what comes back.
//!
//! An [`ApiAction`] carries only validated configuration. Each action belongs to an
//! [`ActionClass`] (which picks its timeout) and has an [`Admissibility`] (which lifecycle
//! phases accept it); both are decided here so every front door agrees.

use tokio::sync::{mpsc, oneshot};

use crate::config::{
    BalloonConfig, BalloonStatsUpdate, BalloonUpdate, BootSource, ConfigError, DeviceId,
    DriveConfig, DriveUpdate, EntropyConfig, LoggerConfig, MachineConfig, MachineConfigUpdate,
    MetricsConfig, MmdsConfig, NetworkInterfaceConfig, NetworkInterfaceUpdate, PmemConfig,
    SerialConfig, VsockConfig,
};
use crate::snapshot::{SnapshotCreateParams, SnapshotLoadParams};

/// Capacity of the action channel between the controller and the event loop.
pub const ACTION_CHANNEL_CAPACITY: usize = 1024;

/// The requested run state of a started microVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmState {
    /// Stop running vCPUs.
    Paused,
    /// Run vCPUs again.
    Resumed,
}

/// One request to change the VM, already validated field by field.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiAction {
    /// Replace the machine configuration.
    PutMachineConfig(MachineConfig),
    /// Change part of the machine configuration.
    PatchMachineConfig(MachineConfigUpdate),
    /// Set the kernel, initrd and command line.
    PutBootSource(BootSource),
    /// Add or replace a drive.
    PutDrive(DriveConfig),
    /// Change a drive of the running VM.
    PatchDrive(DriveUpdate),
    /// Add or replace a network interface.
    PutNetworkInterface(NetworkInterfaceConfig),
    /// Change an interface of the running VM.
    PatchNetworkInterface(NetworkInterfaceUpdate),
    /// Add or replace a pmem device.
    PutPmem(PmemConfig),
    /// Set the vsock device.
    PutVsock(VsockConfig),
    /// Set the entropy device.
    PutEntropy(EntropyConfig),
    /// Set the balloon device.
    PutBalloon(BalloonConfig),
    /// Change the balloon's target size.
    PatchBalloon(BalloonUpdate),
    /// Change the balloon's statistics interval.
    PatchBalloonStatistics(BalloonStatsUpdate),
    /// Configure the logger.
    PutLogger(LoggerConfig),
    /// Configure the metrics destination.
    PutMetrics(MetricsConfig),
    /// Configure the metadata service.
    PutMmdsConfig(MmdsConfig),
    /// Replace the metadata contents.
    PutMmds(serde_json::Value),
    /// Merge into the metadata contents (RFC 7396 JSON merge patch).
    PatchMmds(serde_json::Value),
    /// Set the serial console's destination.
    PutSerial(SerialConfig),
    /// Build and boot the microVM.
    InstanceStart,
    /// Write metrics now.
    FlushMetrics,
    /// Press Ctrl+Alt+Del on the guest's keyboard (x86_64 only).
    SendCtrlAltDel,
    /// Pause or resume the microVM.
    SetVmState(VmState),
    /// Write a snapshot of the paused microVM.
    CreateSnapshot(SnapshotCreateParams),
    /// Restore a microVM from a snapshot.
    LoadSnapshot(SnapshotLoadParams),
}

/// Groups of actions sharing a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionClass {
    /// Configuration accepted before boot.
    PreBootConfig,
    /// Booting the microVM.
    InstanceStart,
    /// Creating or loading a snapshot.
    Snapshot,
    /// Pausing or resuming.
    VmStateChange,
    /// Changing the balloon's target size.
    BalloonResize,
    /// Everything else.
    Other,
}

/// The lifecycle phases that accept an action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admissibility {
    /// Only before `InstanceStart`.
    PreBoot,
    /// Only once the microVM runs (or is paused).
    PostBoot,
    /// Before boot and after.
    Any,
}

impl ApiAction {
    /// The action's name in logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::PutMachineConfig(_) => "PutMachineConfig",
            Self::PatchMachineConfig(_) => "PatchMachineConfig",
            Self::PutBootSource(_) => "PutBootSource",
            Self::PutDrive(_) => "PutDrive",
            Self::PatchDrive(_) => "PatchDrive",
            Self::PutNetworkInterface(_) => "PutNetworkInterface",
            Self::PatchNetworkInterface(_) => "PatchNetworkInterface",
            Self::PutPmem(_) => "PutPmem",
            Self::PutVsock(_) => "PutVsock",
            Self::PutEntropy(_) => "PutEntropy",
            Self::PutBalloon(_) => "PutBalloon",
            Self::PatchBalloon(_) => "PatchBalloon",
            Self::PatchBalloonStatistics(_) => "PatchBalloonStatistics",
            Self::PutLogger(_) => "PutLogger",
            Self::PutMetrics(_) => "PutMetrics",
            Self::PutMmdsConfig(_) => "PutMmdsConfig",
            Self::PutMmds(_) => "PutMmds",
            Self::PatchMmds(_) => "PatchMmds",
            Self::PutSerial(_) => "PutSerial",
            Self::InstanceStart => "InstanceStart",
            Self::FlushMetrics => "FlushMetrics",
            Self::SendCtrlAltDel => "SendCtrlAltDel",
            Self::SetVmState(_) => "SetVmState",
            Self::CreateSnapshot(_) => "CreateSnapshot",
            Self::LoadSnapshot(_) => "LoadSnapshot",
        }
    }

    /// The timeout class of the action.
    pub fn class(&self) -> ActionClass {
        match self {
            Self::InstanceStart => ActionClass::InstanceStart,
            Self::CreateSnapshot(_) | Self::LoadSnapshot(_) => ActionClass::Snapshot,
            Self::SetVmState(_) => ActionClass::VmStateChange,
            Self::PatchBalloon(_) => ActionClass::BalloonResize,
            Self::PutMachineConfig(_)
            | Self::PatchMachineConfig(_)
            | Self::PutBootSource(_)
            | Self::PutDrive(_)
            | Self::PutNetworkInterface(_)
            | Self::PutPmem(_)
            | Self::PutVsock(_)
            | Self::PutEntropy(_)
            | Self::PutBalloon(_)
            | Self::PutLogger(_)
            | Self::PutMetrics(_)
            | Self::PutMmdsConfig(_)
            | Self::PutSerial(_) => ActionClass::PreBootConfig,
            Self::PatchDrive(_)
            | Self::PatchNetworkInterface(_)
            | Self::PatchBalloonStatistics(_)
            | Self::PutMmds(_)
            | Self::PatchMmds(_)
            | Self::FlushMetrics
            | Self::SendCtrlAltDel => ActionClass::Other,
        }
    }

    /// The lifecycle phases that accept the action.
    pub fn admissibility(&self) -> Admissibility {
        match self {
            Self::PutMachineConfig(_)
            | Self::PatchMachineConfig(_)
            | Self::PutBootSource(_)
            | Self::PutDrive(_)
            | Self::PutNetworkInterface(_)
            | Self::PutPmem(_)
            | Self::PutVsock(_)
            | Self::PutEntropy(_)
            | Self::PutBalloon(_)
            | Self::PutLogger(_)
            | Self::PutMetrics(_)
            | Self::PutMmdsConfig(_)
            | Self::PutSerial(_)
            | Self::InstanceStart
            | Self::LoadSnapshot(_) => Admissibility::PreBoot,
            Self::PatchDrive(_)
            | Self::PatchNetworkInterface(_)
            | Self::FlushMetrics
            | Self::SendCtrlAltDel
            | Self::SetVmState(_)
            | Self::CreateSnapshot(_) => Admissibility::PostBoot,
            Self::PatchBalloon(_)
            | Self::PatchBalloonStatistics(_)
            | Self::PutMmds(_)
            | Self::PatchMmds(_) => Admissibility::Any,
        }
    }
}

/// What a successful action produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ActionOutcome {
    /// The action took effect; the new state is in the published snapshot.
    Done,
}

/// A failure reported by a hypervisor backend.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// This binary was built without a hypervisor backend.
    #[error("no hypervisor backend is built into this squib-vmm: cannot {operation}")]
    NoHypervisor {
        /// What was asked of the backend.
        operation: &'static str,
    },
    /// The backend cannot do this on this host.
    #[error("{operation} is not supported by the {backend} backend")]
    Unsupported {
        /// What was asked of the backend.
        operation: &'static str,
        /// The backend's name (`kvm`, `hvf`).
        backend: &'static str,
    },
    /// The backend tried and failed; `detail` carries the whole cause chain.
    #[error("{operation} failed: {detail}")]
    Failed {
        /// What was asked of the backend.
        operation: &'static str,
        /// The backend's error, rendered with its sources.
        detail: String,
    },
}

/// Why the event loop refused or failed an action.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VmmActionError {
    /// The merged configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `InstanceStart` without a boot source.
    #[error("cannot start the microVM: no boot source was configured (PUT /boot-source)")]
    MissingBootSource,
    /// Two devices claim to be the root device.
    #[error("cannot add {device_id}: {other} is already the root device")]
    RootDeviceConflict {
        /// The device being added.
        device_id: DeviceId,
        /// The device already marked as root.
        other: DeviceId,
    },
    /// A balloon change before a balloon was configured.
    #[error("no balloon device is configured (PUT /balloon first)")]
    BalloonNotConfigured,
    /// Balloon statistics cannot be turned on or off after boot.
    #[error(
        "stats_polling_interval_s cannot change from {from} to {to} after boot: statistics can \
         only be turned on or off before boot"
    )]
    BalloonStatsToggle {
        /// Interval configured at boot.
        from: u16,
        /// Requested interval.
        to: u16,
    },
    /// A patch named a drive that does not exist.
    #[error("no drive with drive_id {0}")]
    DriveNotFound(DeviceId),
    /// A patch named an interface that does not exist.
    #[error("no network interface with iface_id {0}")]
    NetworkInterfaceNotFound(DeviceId),
    /// The MMDS configuration named an interface that does not exist.
    #[error("mmds network_interfaces names {0}, which is not a configured network interface")]
    MmdsInterfaceNotFound(DeviceId),
    /// A merge patch that is not a JSON object, or metadata that is not one.
    #[error("mmds contents must be a JSON object")]
    MmdsNotAnObject,
    /// Snapshots are not implemented.
    #[error("snapshot {operation} is not supported yet by squib-vmm")]
    SnapshotNotSupported {
        /// `create` or `load`.
        operation: &'static str,
    },
    /// The action needs a running microVM and there is none (for instance after a failed start).
    #[error("{action} needs a running microVM")]
    NotRunning {
        /// The action's name.
        action: &'static str,
    },
    /// A pre-boot action reached the event loop after the microVM was started.
    #[error("{action} is only allowed before the microVM is started")]
    AlreadyStarted {
        /// The action's name.
        action: &'static str,
    },
    /// The hypervisor backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The reply half of one dispatched action.
pub type ActionReply = oneshot::Sender<Result<ActionOutcome, VmmActionError>>;
/// One dispatched action with its reply channel.
pub type ActionRequest = (ApiAction, ActionReply);
/// The controller's end of the action channel.
pub type ActionSender = mpsc::Sender<ActionRequest>;
/// The event loop's end of the action channel.
pub type ActionReceiver = mpsc::Receiver<ActionRequest>;

/// Creates the bounded action channel ([`ACTION_CHANNEL_CAPACITY`] entries).
pub fn action_channel() -> (ActionSender, ActionReceiver) {
    mpsc::channel(ACTION_CHANNEL_CAPACITY)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_action_class_and_admissibility_of_lifecycle_actions() {
        assert_eq!(ApiAction::InstanceStart.class(), ActionClass::InstanceStart);
        assert_eq!(
            ApiAction::InstanceStart.admissibility(),
            Admissibility::PreBoot
        );
        let pause = ApiAction::SetVmState(VmState::Paused);
        assert_eq!(pause.class(), ActionClass::VmStateChange);
        assert_eq!(pause.admissibility(), Admissibility::PostBoot);
        let resize = ApiAction::PatchBalloon(BalloonUpdate { amount_mib: 1 });
        assert_eq!(resize.class(), ActionClass::BalloonResize);
        assert_eq!(resize.admissibility(), Admissibility::Any);
        assert_eq!(
            ApiAction::SendCtrlAltDel.admissibility(),
            Admissibility::PostBoot
        );
        let put = ApiAction::PutMachineConfig(MachineConfig::default());
        assert_eq!(put.class(), ActionClass::PreBootConfig);
        assert_eq!(put.admissibility(), Admissibility::PreBoot);
    }

    #[test]
    fn test_backend_error_names_the_missing_hypervisor() {
        let err = VmmActionError::from(BackendError::NoHypervisor { operation: "start" });
        assert_eq!(
            err.to_string(),
            "no hypervisor backend is built into this squib-vmm: cannot start"
        );
    }
}
