//! The runtime API controller: the one door into the VMM event loop.
//!
//! Every front door (the HTTP server, the in-process shim) calls
//! [`RuntimeApiController::dispatch`] with a validated [`ApiAction`] and reads state with
//! [`RuntimeApiController::snapshot`]. Dispatch checks, without touching the event loop, that
//! the lifecycle phase admits the action and that cross-field limits hold (memory against the
//! host, balloon against memory, device counts), then sends the action over the bounded
//! channel and waits for the answer at most as long as the action's class allows.
//!
//! Dispatches are serialised by an admission lock held until the event loop answers, so the
//! limits checked against the current state still hold when the action is applied. The one
//! exception is `InstanceStart`: it marks the controller as booting and releases the lock, so
//! requests arriving during a boot are refused at once instead of queueing behind it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use squib_core::action::{
    ActionClass, ActionOutcome, ActionSender, Admissibility, ApiAction, VmmActionError,
    action_channel,
};
use squib_core::config::{ConfigError, DeviceId, MachineConfig, VmConfig};
use squib_core::event_loop::{EventLoop, VmBackend};
use squib_core::mirror::{ControllerSnapshot, LifecyclePhase, SnapshotReader, snapshot_mirror};
use tokio::sync::{Mutex, oneshot};
use tracing::{debug, error};

use crate::host::{Arch, HostMemory, HostMemoryError, SystemHostMemory};

/// Most drives a microVM may have.
pub const MAX_DRIVES: usize = 8;
/// Most network interfaces a microVM may have.
pub const MAX_NETWORK_INTERFACES: usize = 8;
/// Most pmem devices a microVM may have.
pub const MAX_PMEM_DEVICES: usize = 4;
/// Memory the guest keeps out of the balloon's reach, in MiB.
pub const BALLOON_RESERVED_MIB: u64 = 32;

/// How long the controller waits for the event loop, per action class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutTable {
    /// Pre-boot configuration.
    pub pre_boot_config: Duration,
    /// `InstanceStart`.
    pub instance_start: Duration,
    /// Snapshot create and load.
    pub snapshot: Duration,
    /// Pause and resume.
    pub vm_state_change: Duration,
    /// Balloon resize.
    pub balloon_resize: Duration,
    /// Everything else.
    pub other: Duration,
}

impl Default for TimeoutTable {
    fn default() -> Self {
        Self {
            pre_boot_config: Duration::from_secs(5),
            instance_start: Duration::from_secs(30),
            snapshot: Duration::from_secs(5 * 60),
            vm_state_change: Duration::from_secs(5),
            balloon_resize: Duration::from_secs(30),
            other: Duration::from_secs(5),
        }
    }
}

impl TimeoutTable {
    /// The same timeout for every class.
    pub fn uniform(timeout: Duration) -> Self {
        Self {
            pre_boot_config: timeout,
            instance_start: timeout,
            snapshot: timeout,
            vm_state_change: timeout,
            balloon_resize: timeout,
            other: timeout,
        }
    }

    /// The timeout of `class`.
    pub fn for_class(&self, class: ActionClass) -> Duration {
        match class {
            ActionClass::PreBootConfig => self.pre_boot_config,
            ActionClass::InstanceStart => self.instance_start,
            ActionClass::Snapshot => self.snapshot,
            ActionClass::VmStateChange => self.vm_state_change,
            ActionClass::BalloonResize => self.balloon_resize,
            ActionClass::Other => self.other,
        }
    }
}

/// What the controller checks requests against.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// Per-class timeouts.
    pub timeouts: TimeoutTable,
    /// Source of the host's memory size.
    pub host_memory: Arc<dyn HostMemory>,
    /// Architecture whose rules apply.
    pub arch: Arch,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            timeouts: TimeoutTable::default(),
            host_memory: Arc::new(SystemHostMemory),
            arch: Arch::host(),
        }
    }
}

/// Device kinds with a count limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// Block devices.
    Drive,
    /// Network interfaces.
    NetworkInterface,
    /// Pmem devices.
    Pmem,
}

impl DeviceKind {
    fn name(self) -> &'static str {
        match self {
            Self::Drive => "drives",
            Self::NetworkInterface => "network interfaces",
            Self::Pmem => "pmem devices",
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Why the controller refused or failed an action.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// A pre-boot action after the microVM started.
    #[error("{action} is only allowed before the microVM is started")]
    NotAllowedAfterBoot {
        /// The action.
        action: &'static str,
    },
    /// A post-boot action before the microVM started.
    #[error("{action} is only allowed after the microVM is started (PUT /actions InstanceStart)")]
    NotAllowedBeforeBoot {
        /// The action.
        action: &'static str,
    },
    /// Any action while `InstanceStart` is under way.
    #[error("{action} is refused while the microVM is booting")]
    Booting {
        /// The action.
        action: &'static str,
    },
    /// Any action after the microVM ended.
    #[error("{action} is refused: the microVM has shut down")]
    ShutDown {
        /// The action.
        action: &'static str,
    },
    /// An action the architecture does not have.
    #[error("{action} is not available on {arch}")]
    UnsupportedOnArch {
        /// The action.
        action: &'static str,
        /// The architecture.
        arch: &'static str,
    },
    /// More memory than the host has.
    #[error("mem_size_mib {mem_size_mib} exceeds the host's memory of {host_mib} MiB")]
    HostMemoryExceeded {
        /// Requested memory.
        mem_size_mib: u64,
        /// Host memory.
        host_mib: u64,
    },
    /// The host's memory size could not be read.
    #[error(transparent)]
    HostMemory(#[from] HostMemoryError),
    /// A balloon larger than guest memory allows.
    #[error(
        "balloon amount_mib {amount_mib} is too large for mem_size_mib {mem_size_mib}: at most \
         {max_mib} MiB (memory minus {BALLOON_RESERVED_MIB} MiB)"
    )]
    BalloonTooLarge {
        /// Requested balloon size.
        amount_mib: u64,
        /// Guest memory.
        mem_size_mib: u64,
        /// Largest balloon allowed.
        max_mib: u64,
    },
    /// A new device beyond the limit of its kind.
    #[error("cannot add {id}: a microVM has at most {max} {kind}")]
    TooManyDevices {
        /// The device kind.
        kind: DeviceKind,
        /// The limit.
        max: usize,
        /// The refused device's id.
        id: DeviceId,
    },
    /// The merged configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The event loop did not answer in time.
    #[error("{action} timed out after {after:?} waiting for the VMM event loop")]
    Timeout {
        /// The action.
        action: &'static str,
        /// The timeout that expired.
        after: Duration,
    },
    /// The event loop has ended.
    #[error("{action} cannot be carried out: the VMM event loop has stopped")]
    EventLoopGone {
        /// The action.
        action: &'static str,
    },
    /// The event loop refused or failed the action.
    #[error(transparent)]
    Vmm(#[from] VmmActionError),
}

/// Ids of the devices the event loop has accepted, counted against the limits.
#[derive(Debug, Default)]
struct DeviceCounts {
    drives: BTreeSet<DeviceId>,
    network_interfaces: BTreeSet<DeviceId>,
    pmem: BTreeSet<DeviceId>,
}

impl DeviceCounts {
    fn from_config(config: &VmConfig) -> Self {
        Self {
            drives: config.drives.iter().map(|d| d.drive_id().clone()).collect(),
            network_interfaces: config
                .network_interfaces
                .iter()
                .map(|i| i.iface_id().clone())
                .collect(),
            pmem: config.pmem.iter().map(|p| p.id().clone()).collect(),
        }
    }

    /// Counts every device the published configuration holds. An action that succeeded after
    /// its caller timed out was never recorded here, but its device is in the snapshot.
    fn absorb(&mut self, config: &VmConfig) {
        let published = Self::from_config(config);
        self.drives.extend(published.drives);
        self.network_interfaces.extend(published.network_interfaces);
        self.pmem.extend(published.pmem);
    }

    fn slot(&mut self, kind: DeviceKind) -> (&mut BTreeSet<DeviceId>, usize) {
        match kind {
            DeviceKind::Drive => (&mut self.drives, MAX_DRIVES),
            DeviceKind::NetworkInterface => (&mut self.network_interfaces, MAX_NETWORK_INTERFACES),
            DeviceKind::Pmem => (&mut self.pmem, MAX_PMEM_DEVICES),
        }
    }

    /// Refuses a new id once the kind is full; replacing an existing id is always fine.
    fn check(&mut self, kind: DeviceKind, id: &DeviceId) -> Result<(), ControllerError> {
        let (ids, max) = self.slot(kind);
        if !ids.contains(id) && ids.len() >= max {
            return Err(ControllerError::TooManyDevices {
                kind,
                max,
                id: id.clone(),
            });
        }
        Ok(())
    }

    fn record(&mut self, kind: DeviceKind, id: DeviceId) {
        self.slot(kind).0.insert(id);
    }

    /// How many devices of `kind` are counted.
    fn count(&self, kind: DeviceKind) -> usize {
        match kind {
            DeviceKind::Drive => self.drives.len(),
            DeviceKind::NetworkInterface => self.network_interfaces.len(),
            DeviceKind::Pmem => self.pmem.len(),
        }
    }
}

fn device_of(action: &ApiAction) -> Option<(DeviceKind, DeviceId)> {
    match action {
        ApiAction::PutDrive(d) => Some((DeviceKind::Drive, d.drive_id().clone())),
        ApiAction::PutNetworkInterface(i) => {
            Some((DeviceKind::NetworkInterface, i.iface_id().clone()))
        }
        ApiAction::PutPmem(p) => Some((DeviceKind::Pmem, p.id().clone())),
        _ => None,
    }
}

/// The controller. Cheap to share behind an `Arc`; all methods take `&self`.
#[derive(Debug)]
pub struct RuntimeApiController {
    sender: ActionSender,
    reader: SnapshotReader,
    options: ControllerOptions,
    admission: Mutex<DeviceCounts>,
    booting: AtomicBool,
}

/// The event loop's thread, started by [`RuntimeApiController::start`].
#[derive(Debug)]
pub struct EventLoopThread(std::thread::JoinHandle<()>);

impl EventLoopThread {
    /// Waits for the loop to end (after every controller is dropped).
    ///
    /// # Errors
    /// The panic payload if the loop panicked.
    pub fn join(self) -> std::thread::Result<()> {
        self.0.join()
    }
}

impl RuntimeApiController {
    /// A controller sending to `sender` and reading `reader`; the caller runs the event loop.
    pub fn new(sender: ActionSender, reader: SnapshotReader, options: ControllerOptions) -> Self {
        let counts = DeviceCounts::from_config(&reader.load().vm_config);
        Self {
            sender,
            reader,
            options,
            admission: Mutex::new(counts),
            booting: AtomicBool::new(false),
        }
    }

    /// Creates the mirror and the channel, starts an [`EventLoop`] with `backend` on a thread
    /// of its own, and returns the controller wired to it. The loop ends when the controller
    /// is dropped.
    ///
    /// # Errors
    /// The I/O error if the thread could not be spawned.
    pub fn start(
        instance_id: &str,
        backend: Box<dyn VmBackend>,
        options: ControllerOptions,
    ) -> std::io::Result<(Self, EventLoopThread)> {
        let (publisher, reader) = snapshot_mirror(ControllerSnapshot::new(instance_id));
        let (sender, receiver) = action_channel();
        let event_loop = EventLoop::new(publisher, backend);
        let handle = std::thread::Builder::new()
            .name("squib-event-loop".into())
            .spawn(move || event_loop.run(receiver))?;
        Ok((Self::new(sender, reader, options), EventLoopThread(handle)))
    }

    /// The latest published state. Never waits for the event loop.
    pub fn snapshot(&self) -> Arc<ControllerSnapshot> {
        self.reader.load()
    }

    /// The options the controller checks against.
    pub fn options(&self) -> &ControllerOptions {
        &self.options
    }

    fn phase(&self) -> LifecyclePhase {
        if self.booting.load(Ordering::SeqCst) {
            LifecyclePhase::Booting
        } else {
            self.reader.load().phase
        }
    }

    /// Checks `action` and carries it out through the event loop.
    ///
    /// # Errors
    /// A [`ControllerError`]: refused by phase, architecture or limits (nothing was sent),
    /// timed out, event loop gone, or refused by the event loop.
    #[tracing::instrument(skip_all, fields(action = action.name()))]
    pub async fn dispatch(&self, action: ApiAction) -> Result<ActionOutcome, ControllerError> {
        let mut counts = self.admission.lock().await;
        let name = action.name();
        self.check_admissible(&action)?;
        let snapshot = self.reader.load();
        counts.absorb(&snapshot.vm_config);
        self.check_limits(&action, &snapshot.vm_config, snapshot.phase, &mut counts)?;
        let device = device_of(&action);
        if action == ApiAction::InstanceStart {
            self.booting.store(true, Ordering::SeqCst);
            drop(counts);
            let result = self.send(action).await;
            self.booting.store(false, Ordering::SeqCst);
            return result;
        }
        let outcome = self.send(action).await?;
        if let Some((kind, id)) = device {
            counts.record(kind, id);
            debug!(action = name, %kind, count = counts.count(kind), "device accepted");
        }
        Ok(outcome)
    }

    fn check_admissible(&self, action: &ApiAction) -> Result<(), ControllerError> {
        let name = action.name();
        match (self.phase(), action.admissibility()) {
            (LifecyclePhase::Booting, _) => return Err(ControllerError::Booting { action: name }),
            (LifecyclePhase::ShutDown, _) => {
                return Err(ControllerError::ShutDown { action: name });
            }
            (LifecyclePhase::NotStarted, Admissibility::PostBoot) => {
                return Err(ControllerError::NotAllowedBeforeBoot { action: name });
            }
            (LifecyclePhase::Running | LifecyclePhase::Paused, Admissibility::PreBoot) => {
                return Err(ControllerError::NotAllowedAfterBoot { action: name });
            }
            _ => {}
        }
        // Ctrl+Alt+Del reaches the guest through the i8042 keyboard controller, which only
        // exists on x86_64 machines.
        if *action == ApiAction::SendCtrlAltDel && self.options.arch != Arch::X86_64 {
            return Err(ControllerError::UnsupportedOnArch {
                action: name,
                arch: self.options.arch.name(),
            });
        }
        Ok(())
    }

    fn check_memory(
        &self,
        machine: &MachineConfig,
        config: &VmConfig,
    ) -> Result<(), ControllerError> {
        let host_mib = self.options.host_memory.total_mib()?;
        if machine.mem_size_mib() > host_mib {
            return Err(ControllerError::HostMemoryExceeded {
                mem_size_mib: machine.mem_size_mib(),
                host_mib,
            });
        }
        if let Some(balloon) = &config.balloon {
            check_balloon(u64::from(balloon.amount_mib()), machine.mem_size_mib())?;
        }
        Ok(())
    }

    fn check_limits(
        &self,
        action: &ApiAction,
        config: &VmConfig,
        phase: LifecyclePhase,
        counts: &mut DeviceCounts,
    ) -> Result<(), ControllerError> {
        // The balloon limit needs the guest's memory size: it is checked once both are known,
        // by whichever of the two requests comes second, and again at boot with the default
        // size if no machine configuration was ever set.
        let memory_known = config.machine_config_set || phase.is_started();
        let mem_size_mib = config.machine_config.mem_size_mib();
        match action {
            ApiAction::PutMachineConfig(machine) => self.check_memory(machine, config)?,
            ApiAction::PatchMachineConfig(update) => {
                let merged = config.machine_config.apply(update)?;
                self.check_memory(&merged, config)?;
            }
            ApiAction::PutBalloon(balloon) if memory_known => {
                check_balloon(u64::from(balloon.amount_mib()), mem_size_mib)?;
            }
            ApiAction::PatchBalloon(update) if memory_known => {
                check_balloon(u64::from(update.amount_mib), mem_size_mib)?;
            }
            ApiAction::InstanceStart => {
                if let Some(balloon) = &config.balloon {
                    check_balloon(u64::from(balloon.amount_mib()), mem_size_mib)?;
                }
            }
            _ => {}
        }
        if let Some((kind, id)) = device_of(action) {
            counts.check(kind, &id)?;
        }
        Ok(())
    }

    async fn send(&self, action: ApiAction) -> Result<ActionOutcome, ControllerError> {
        let name = action.name();
        let timeout = self.options.timeouts.for_class(action.class());
        let (reply_tx, reply_rx) = oneshot::channel();
        let exchange = async {
            self.sender
                .send((action, reply_tx))
                .await
                .map_err(|_| ControllerError::EventLoopGone { action: name })?;
            reply_rx
                .await
                .map_err(|_| ControllerError::EventLoopGone { action: name })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(reply) => Ok(reply??),
            Err(_) => {
                error!(
                    action = name,
                    timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    "action still pending in the VMM event loop after its timeout"
                );
                Err(ControllerError::Timeout {
                    action: name,
                    after: timeout,
                })
            }
        }
    }
}

fn check_balloon(amount_mib: u64, mem_size_mib: u64) -> Result<(), ControllerError> {
    let max_mib = mem_size_mib.saturating_sub(BALLOON_RESERVED_MIB);
    if amount_mib > max_mib {
        return Err(ControllerError::BalloonTooLarge {
            amount_mib,
            mem_size_mib,
            max_mib,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use squib_core::action::{ActionReceiver, BackendError, VmState};
    use squib_core::config::{
        BalloonConfig, BalloonUpdate, BootSource, CacheType, DriveConfig, HugePages, IoEngine,
        MachineConfigUpdate, NetworkInterfaceConfig, PmemConfig,
    };
    use squib_core::event_loop::{NoHypervisorBackend, RunningVm};
    use squib_core::mirror::SnapshotPublisher;

    use super::*;
    use crate::host::FixedHostMemory;

    fn options(host_mib: u64) -> ControllerOptions {
        ControllerOptions {
            timeouts: TimeoutTable::uniform(Duration::from_secs(5)),
            host_memory: Arc::new(FixedHostMemory(host_mib)),
            arch: Arch::X86_64,
        }
    }

    fn controller_with(opts: ControllerOptions) -> (RuntimeApiController, EventLoopThread) {
        RuntimeApiController::start("vm0", Box::new(NoHypervisorBackend), opts).unwrap()
    }

    fn controller() -> RuntimeApiController {
        controller_with(options(4096)).0
    }

    fn id(s: &str) -> DeviceId {
        DeviceId::new("drive_id", s.into()).unwrap()
    }

    fn machine(vcpus: u64, mem: u64) -> ApiAction {
        ApiAction::PutMachineConfig(
            MachineConfig::new(vcpus, mem, false, false, HugePages::None, None).unwrap(),
        )
    }

    fn drive(name: &str, root: bool) -> ApiAction {
        ApiAction::PutDrive(
            DriveConfig::new(
                id(name),
                format!("/{name}").into(),
                root,
                false,
                None,
                CacheType::Unsafe,
                IoEngine::Sync,
                None,
            )
            .unwrap(),
        )
    }

    fn balloon(amount: u64) -> ApiAction {
        ApiAction::PutBalloon(BalloonConfig::new(amount, false, 0, false, false).unwrap())
    }

    fn boot_source() -> ApiAction {
        ApiAction::PutBootSource(BootSource::new("/k".into(), None, None).unwrap())
    }

    /// A controller whose event loop is the test: actions arrive on the returned receiver.
    fn manual_controller(
        opts: ControllerOptions,
    ) -> (RuntimeApiController, ActionReceiver, SnapshotPublisher) {
        let (publisher, reader) = snapshot_mirror(ControllerSnapshot::new("vm0"));
        let (sender, receiver) = action_channel();
        (
            RuntimeApiController::new(sender, reader, opts),
            receiver,
            publisher,
        )
    }

    fn set_phase(publisher: &SnapshotPublisher, phase: LifecyclePhase) {
        let mut next = (*publisher.current()).clone();
        next.phase = phase;
        publisher.publish(next);
    }

    #[tokio::test]
    async fn test_dispatch_applies_config_visible_in_snapshot() {
        let c = controller();
        assert_eq!(c.snapshot().state().as_str(), "Not started");
        c.dispatch(machine(2, 256)).await.unwrap();
        let snap = c.snapshot();
        assert_eq!(snap.vm_config.machine_config.vcpu_count(), 2);
        assert_eq!(snap.vm_config.machine_config.mem_size_mib(), 256);
    }

    #[tokio::test]
    async fn test_dispatch_times_out_when_vmm_never_replies() {
        let mut opts = options(4096);
        opts.timeouts = TimeoutTable::uniform(Duration::from_millis(50));
        let (c, mut receiver, _publisher) = manual_controller(opts);
        let held = Arc::new(StdMutex::new(Vec::new()));
        let keep = Arc::clone(&held);
        // Receive and keep the reply sender alive without ever answering.
        let sink = tokio::spawn(async move {
            while let Some(request) = receiver.recv().await {
                keep.lock().unwrap().push(request);
            }
        });
        let started = std::time::Instant::now();
        let err = c.dispatch(machine(1, 128)).await.unwrap_err();
        assert!(matches!(
            err,
            ControllerError::Timeout {
                action: "PutMachineConfig",
                ..
            }
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(held.lock().unwrap().len(), 1);
        sink.abort();
    }

    #[tokio::test]
    async fn test_timeout_table_picks_the_class_timeout() {
        let table = TimeoutTable {
            instance_start: Duration::from_millis(20),
            ..TimeoutTable::uniform(Duration::from_secs(60))
        };
        let mut opts = options(4096);
        opts.timeouts = table;
        let (c, mut receiver, _publisher) = manual_controller(opts);
        let sink = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Some(request) = receiver.recv().await {
                kept.push(request);
            }
        });
        let err = c.dispatch(ApiAction::InstanceStart).await.unwrap_err();
        assert!(
            matches!(err, ControllerError::Timeout { after, .. } if after == Duration::from_millis(20))
        );
        assert_eq!(
            TimeoutTable::default().for_class(ActionClass::Snapshot),
            Duration::from_secs(300)
        );
        assert_eq!(
            TimeoutTable::default().for_class(ActionClass::InstanceStart),
            Duration::from_secs(30)
        );
        assert_eq!(
            TimeoutTable::default().for_class(ActionClass::BalloonResize),
            Duration::from_secs(30)
        );
        assert_eq!(
            TimeoutTable::default().for_class(ActionClass::PreBootConfig),
            Duration::from_secs(5)
        );
        sink.abort();
    }

    #[tokio::test]
    async fn test_dispatch_reports_event_loop_gone() {
        let (c, receiver, _publisher) = manual_controller(options(4096));
        drop(receiver);
        let err = c.dispatch(machine(1, 128)).await.unwrap_err();
        assert!(matches!(err, ControllerError::EventLoopGone { .. }));
    }

    #[tokio::test]
    async fn test_admissibility_per_phase() {
        let (c, receiver, publisher) = manual_controller(options(4096));
        drop(receiver);
        // Not started: post-boot actions refused before the channel.
        for action in [
            ApiAction::FlushMetrics,
            ApiAction::SetVmState(VmState::Paused),
        ] {
            let err = c.dispatch(action).await.unwrap_err();
            assert!(
                matches!(err, ControllerError::NotAllowedBeforeBoot { .. }),
                "{err}"
            );
        }
        // Running: pre-boot actions refused.
        set_phase(&publisher, LifecyclePhase::Running);
        let err = c.dispatch(machine(1, 128)).await.unwrap_err();
        assert!(matches!(
            err,
            ControllerError::NotAllowedAfterBoot {
                action: "PutMachineConfig"
            }
        ));
        let err = c.dispatch(ApiAction::InstanceStart).await.unwrap_err();
        assert!(matches!(err, ControllerError::NotAllowedAfterBoot { .. }));
        // Paused: same.
        set_phase(&publisher, LifecyclePhase::Paused);
        assert!(matches!(
            c.dispatch(drive("a", false)).await.unwrap_err(),
            ControllerError::NotAllowedAfterBoot { .. }
        ));
        // Any-phase and post-boot actions pass admission (and reach the dropped loop).
        let err = c
            .dispatch(ApiAction::SetVmState(VmState::Resumed))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ControllerError::EventLoopGone { .. }),
            "{err}"
        );
        // Booting and shut down: everything refused.
        set_phase(&publisher, LifecyclePhase::Booting);
        assert!(matches!(
            c.dispatch(ApiAction::PutMmds(serde_json::json!({})))
                .await
                .unwrap_err(),
            ControllerError::Booting { .. }
        ));
        set_phase(&publisher, LifecyclePhase::ShutDown);
        assert!(matches!(
            c.dispatch(ApiAction::SetVmState(VmState::Resumed))
                .await
                .unwrap_err(),
            ControllerError::ShutDown { .. }
        ));
    }

    #[tokio::test]
    async fn test_requests_during_instance_start_are_refused_as_booting() {
        let (c, mut receiver, _publisher) = manual_controller(options(4096));
        let c = Arc::new(c);
        let starter = {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.dispatch(ApiAction::InstanceStart).await })
        };
        let (action, reply) = receiver.recv().await.unwrap();
        assert_eq!(action, ApiAction::InstanceStart);
        let err = c.dispatch(drive("a", false)).await.unwrap_err();
        assert!(
            matches!(err, ControllerError::Booting { action: "PutDrive" }),
            "{err}"
        );
        reply.send(Ok(ActionOutcome::Done)).unwrap();
        assert!(starter.await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn test_send_ctrl_alt_del_refused_on_aarch64() {
        let mut opts = options(4096);
        opts.arch = Arch::Aarch64;
        let (c, receiver, publisher) = manual_controller(opts);
        drop(receiver);
        set_phase(&publisher, LifecyclePhase::Running);
        let err = c.dispatch(ApiAction::SendCtrlAltDel).await.unwrap_err();
        assert!(matches!(
            err,
            ControllerError::UnsupportedOnArch {
                arch: "aarch64",
                ..
            }
        ));
        assert!(
            err.to_string()
                .contains("SendCtrlAltDel is not available on aarch64")
        );
    }

    #[tokio::test]
    async fn test_memory_limited_by_host() {
        let c = controller_with(options(1024)).0;
        let err = c.dispatch(machine(1, 2048)).await.unwrap_err();
        assert!(matches!(
            err,
            ControllerError::HostMemoryExceeded {
                mem_size_mib: 2048,
                host_mib: 1024
            }
        ));
        c.dispatch(machine(1, 1024)).await.unwrap();
        let patch = MachineConfigUpdate {
            mem_size_mib: Some(4096),
            ..Default::default()
        };
        assert!(
            c.dispatch(ApiAction::PatchMachineConfig(patch))
                .await
                .is_err()
        );
        assert_eq!(c.snapshot().vm_config.machine_config.mem_size_mib(), 1024);
    }

    #[tokio::test]
    async fn test_balloon_checked_against_memory_when_set_first() {
        let c = controller();
        c.dispatch(machine(1, 256)).await.unwrap();
        let err = c.dispatch(balloon(225)).await.unwrap_err();
        assert!(
            matches!(err, ControllerError::BalloonTooLarge { max_mib: 224, .. }),
            "{err}"
        );
        c.dispatch(balloon(224)).await.unwrap();
        let err = c
            .dispatch(ApiAction::PatchBalloon(BalloonUpdate { amount_mib: 300 }))
            .await;
        assert!(matches!(
            err.unwrap_err(),
            ControllerError::BalloonTooLarge { .. }
        ));
    }

    #[tokio::test]
    async fn test_balloon_check_deferred_until_machine_config() {
        let c = controller();
        // Larger than the default 128 MiB would allow, but memory is not known yet.
        c.dispatch(balloon(500)).await.unwrap();
        let err = c.dispatch(machine(1, 256)).await.unwrap_err();
        assert!(
            matches!(
                err,
                ControllerError::BalloonTooLarge {
                    amount_mib: 500,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!c.snapshot().vm_config.machine_config_set);
        c.dispatch(machine(1, 1024)).await.unwrap();
        assert_eq!(c.snapshot().vm_config.machine_config.mem_size_mib(), 1024);
    }

    #[tokio::test]
    async fn test_balloon_checked_at_boot_with_default_memory() {
        let c = controller();
        c.dispatch(boot_source()).await.unwrap();
        c.dispatch(balloon(100)).await.unwrap();
        let err = c.dispatch(ApiAction::InstanceStart).await.unwrap_err();
        assert!(matches!(
            err,
            ControllerError::BalloonTooLarge {
                mem_size_mib: 128,
                ..
            }
        ));
    }

    #[tokio::test]
    async fn test_drive_cap_counts_replacements_once() {
        let c = controller();
        for i in 0..MAX_DRIVES {
            c.dispatch(drive(&format!("d{i}"), false)).await.unwrap();
        }
        // Replacing an existing id does not count as a new drive.
        c.dispatch(drive("d0", false)).await.unwrap();
        c.dispatch(drive("d3", true)).await.unwrap();
        let err = c.dispatch(drive("d8", false)).await.unwrap_err();
        assert!(matches!(
            err,
            ControllerError::TooManyDevices {
                kind: DeviceKind::Drive,
                max: 8,
                ..
            }
        ));
        assert!(err.to_string().contains("d8"));
        assert_eq!(c.snapshot().vm_config.drives.len(), MAX_DRIVES);
    }

    #[tokio::test]
    async fn test_failed_action_does_not_count_against_cap() {
        let c = controller();
        c.dispatch(drive("root", true)).await.unwrap();
        // Each of these fails in the event loop (second root device) and must not count.
        for i in 0..MAX_DRIVES + 2 {
            let err = c.dispatch(drive(&format!("r{i}"), true)).await.unwrap_err();
            assert!(matches!(
                err,
                ControllerError::Vmm(VmmActionError::RootDeviceConflict { .. })
            ));
        }
        for i in 1..MAX_DRIVES {
            c.dispatch(drive(&format!("d{i}"), false)).await.unwrap();
        }
        assert_eq!(c.snapshot().vm_config.drives.len(), MAX_DRIVES);
    }

    #[tokio::test]
    async fn test_cap_counts_devices_applied_after_a_timeout() {
        let (c, receiver, publisher) = manual_controller(options(4096));
        drop(receiver);
        // The event loop published eight drives whose dispatches the controller never saw
        // succeed (they timed out on its side).
        let mut next = (*publisher.current()).clone();
        for i in 0..MAX_DRIVES {
            if let ApiAction::PutDrive(d) = drive(&format!("late{i}"), false) {
                next.vm_config.upsert_drive(d);
            }
        }
        publisher.publish(next);
        let err = c.dispatch(drive("one-more", false)).await.unwrap_err();
        assert!(
            matches!(err, ControllerError::TooManyDevices { .. }),
            "{err}"
        );
        // Replacing one of them is still fine (and reaches the dropped loop).
        let err = c.dispatch(drive("late0", false)).await.unwrap_err();
        assert!(
            matches!(err, ControllerError::EventLoopGone { .. }),
            "{err}"
        );
    }

    #[tokio::test]
    async fn test_network_and_pmem_caps() {
        let c = controller();
        for i in 0..MAX_NETWORK_INTERFACES {
            let iface = NetworkInterfaceConfig::new(
                DeviceId::new("iface_id", format!("eth{i}")).unwrap(),
                format!("tap{i}"),
                None,
                None,
                None,
                None,
            )
            .unwrap();
            c.dispatch(ApiAction::PutNetworkInterface(iface))
                .await
                .unwrap();
        }
        let extra =
            NetworkInterfaceConfig::new(id("eth9"), "tap9".into(), None, None, None, None).unwrap();
        assert!(matches!(
            c.dispatch(ApiAction::PutNetworkInterface(extra))
                .await
                .unwrap_err(),
            ControllerError::TooManyDevices {
                kind: DeviceKind::NetworkInterface,
                ..
            }
        ));
        for i in 0..=MAX_PMEM_DEVICES {
            let pmem = PmemConfig::new(id(&format!("p{i}")), "/p".into(), false, false).unwrap();
            let result = c.dispatch(ApiAction::PutPmem(pmem)).await;
            assert_eq!(result.is_ok(), i < MAX_PMEM_DEVICES, "pmem {i}");
        }
    }

    #[tokio::test]
    async fn test_instance_start_without_backend_reports_no_hypervisor() {
        let c = controller();
        c.dispatch(boot_source()).await.unwrap();
        let err = c.dispatch(ApiAction::InstanceStart).await.unwrap_err();
        assert!(matches!(
            err,
            ControllerError::Vmm(VmmActionError::Backend(BackendError::NoHypervisor { .. }))
        ));
        assert_eq!(c.snapshot().phase, LifecyclePhase::NotStarted);
        // The controller is not stuck in Booting.
        c.dispatch(machine(1, 64)).await.unwrap();
    }

    struct OkBackend;
    struct OkVm;
    impl VmBackend for OkBackend {
        fn name(&self) -> &'static str {
            "ok"
        }
        fn start(&mut self, _: &VmConfig) -> Result<Box<dyn RunningVm>, BackendError> {
            Ok(Box::new(OkVm))
        }
    }
    impl RunningVm for OkVm {
        fn backend_name(&self) -> &'static str {
            "ok"
        }
        fn pause(&mut self) -> Result<(), BackendError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn test_full_lifecycle_with_a_backend() {
        let (c, _thread) =
            RuntimeApiController::start("vm1", Box::new(OkBackend), options(4096)).unwrap();
        c.dispatch(boot_source()).await.unwrap();
        c.dispatch(ApiAction::InstanceStart).await.unwrap();
        assert_eq!(c.snapshot().state().as_str(), "Running");
        c.dispatch(ApiAction::SetVmState(VmState::Paused))
            .await
            .unwrap();
        assert_eq!(c.snapshot().state().as_str(), "Paused");
        assert!(matches!(
            c.dispatch(boot_source()).await.unwrap_err(),
            ControllerError::NotAllowedAfterBoot { .. }
        ));
    }
}
