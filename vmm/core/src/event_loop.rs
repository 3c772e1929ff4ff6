//! The VMM event loop: the single writer of VM state.
//!
//! [`EventLoop`] owns the VM configuration under construction. It takes [`ApiAction`]s from the
//! controller's channel one at a time, applies configuration itself, hands everything that
//! needs a running microVM to a [`VmBackend`] / [`RunningVm`], publishes a new
//! [`ControllerSnapshot`] after every change, and only then answers the action, so a client
//! that saw its request succeed reads the new state on its next `GET`.
//!
//! # Lifecycle
//!
//! `NotStarted --InstanceStart--> Booting --start ok--> Running <--pause/resume--> Paused`;
//! a failed start goes back to `NotStarted` with the configuration kept, and
//! [`EventLoop::vm_exited`] moves any started phase to `ShutDown`. `Booting` is published
//! before [`VmBackend::start`] is called, so the controller refuses everything while a boot is
//! under way.
//!
//! # Adding a hypervisor backend
//!
//! Implement [`VmBackend::start`] (build memory, vCPUs and devices from the [`VmConfig`], start
//! the vCPU threads, return a handle) and the [`RunningVm`] methods the backend supports; pass
//! it to [`EventLoop::new`] instead of [`NoHypervisorBackend`]. The loop does the phase
//! bookkeeping; the backend never publishes snapshots itself. When the guest ends the VM, the
//! backend's owner calls [`EventLoop::vm_exited`] on the loop's thread.

use tracing::{debug, error, info};

use crate::action::{
    ActionOutcome, ActionReceiver, Admissibility, ApiAction, BackendError, VmState, VmmActionError,
};
use crate::config::{BalloonStats, DriveUpdate, NetworkInterfaceUpdate, VmConfig};
use crate::mirror::{ControllerSnapshot, LifecyclePhase, SnapshotPublisher};

/// Builds and boots microVMs. One implementation per hypervisor.
pub trait VmBackend: Send {
    /// Short name for messages (`kvm`, `hvf`, `none`).
    fn name(&self) -> &'static str;

    /// Builds a microVM from `config` and starts its vCPUs.
    ///
    /// Called on the event loop's thread, with the phase already published as `Booting`.
    /// Returns once the guest runs; the loop then publishes `Running`.
    ///
    /// # Errors
    /// A [`BackendError`] if anything failed; the backend must have released everything it
    /// created (memory, threads, sockets) before returning it.
    fn start(&mut self, config: &VmConfig) -> Result<Box<dyn RunningVm>, BackendError>;
}

/// A started microVM. Each method is called on the event loop's thread; the default bodies
/// report the operation as unsupported by the backend.
pub trait RunningVm: Send {
    /// The backend's short name, for the default "unsupported" errors.
    fn backend_name(&self) -> &'static str;

    /// Stops all vCPUs.
    ///
    /// # Errors
    /// A [`BackendError`] if the vCPUs could not be stopped.
    fn pause(&mut self) -> Result<(), BackendError> {
        Err(unsupported("pause", self.backend_name()))
    }

    /// Runs the vCPUs again.
    ///
    /// # Errors
    /// A [`BackendError`] if the vCPUs could not be resumed.
    fn resume(&mut self) -> Result<(), BackendError> {
        Err(unsupported("resume", self.backend_name()))
    }

    /// Injects Ctrl+Alt+Del through the i8042 controller (x86_64).
    ///
    /// # Errors
    /// A [`BackendError`] if the key press could not be injected.
    fn send_ctrl_alt_del(&mut self) -> Result<(), BackendError> {
        Err(unsupported("SendCtrlAltDel", self.backend_name()))
    }

    /// Writes the metrics now.
    ///
    /// # Errors
    /// A [`BackendError`] if they could not be written.
    fn flush_metrics(&mut self) -> Result<(), BackendError> {
        Err(unsupported("FlushMetrics", self.backend_name()))
    }

    /// Asks the guest's balloon driver to reach `amount_mib`.
    ///
    /// # Errors
    /// A [`BackendError`] if the device could not be told.
    fn resize_balloon(&mut self, amount_mib: u32) -> Result<(), BackendError> {
        let _ = amount_mib;
        Err(unsupported("balloon resize", self.backend_name()))
    }

    /// Changes how often the balloon reports statistics.
    ///
    /// # Errors
    /// A [`BackendError`] if the device could not be told.
    fn set_balloon_stats_interval(&mut self, interval_s: u16) -> Result<(), BackendError> {
        let _ = interval_s;
        Err(unsupported(
            "balloon statistics update",
            self.backend_name(),
        ))
    }

    /// Latest balloon statistics, if the device has reported any.
    fn balloon_stats(&self) -> Option<BalloonStats> {
        None
    }

    /// Swaps a drive's backing file or rate limiter.
    ///
    /// # Errors
    /// A [`BackendError`] if the drive could not be changed.
    fn update_drive(&mut self, update: &DriveUpdate) -> Result<(), BackendError> {
        let _ = update;
        Err(unsupported("drive update", self.backend_name()))
    }

    /// Changes an interface's rate limiters.
    ///
    /// # Errors
    /// A [`BackendError`] if the interface could not be changed.
    fn update_network_interface(
        &mut self,
        update: &NetworkInterfaceUpdate,
    ) -> Result<(), BackendError> {
        let _ = update;
        Err(unsupported("network interface update", self.backend_name()))
    }
}

fn unsupported(operation: &'static str, backend: &'static str) -> BackendError {
    BackendError::Unsupported { operation, backend }
}

/// The backend of a build without any hypervisor: every start fails with
/// [`BackendError::NoHypervisor`].
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHypervisorBackend;

impl VmBackend for NoHypervisorBackend {
    fn name(&self) -> &'static str {
        "none"
    }

    fn start(&mut self, _config: &VmConfig) -> Result<Box<dyn RunningVm>, BackendError> {
        Err(BackendError::NoHypervisor {
            operation: "start the microVM",
        })
    }
}

/// The single writer of VM state. See the module documentation for the lifecycle.
pub struct EventLoop {
    state: ControllerSnapshot,
    publisher: SnapshotPublisher,
    backend: Box<dyn VmBackend>,
    vm: Option<Box<dyn RunningVm>>,
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop")
            .field("phase", &self.state.phase)
            .field("backend", &self.backend.name())
            .field("vm_running", &self.vm.is_some())
            .finish_non_exhaustive()
    }
}

impl EventLoop {
    /// Creates the loop, starting from the snapshot `publisher` currently holds.
    pub fn new(publisher: SnapshotPublisher, backend: Box<dyn VmBackend>) -> Self {
        let state = (*publisher.current()).clone();
        Self {
            state,
            publisher,
            backend,
            vm: None,
        }
    }

    /// The current lifecycle phase.
    pub fn phase(&self) -> LifecyclePhase {
        self.state.phase
    }

    /// Serves actions until every sender is dropped. Blocks the calling thread: run it on a
    /// thread of its own, never inside an async task.
    pub fn run(mut self, mut actions: ActionReceiver) {
        while let Some((action, reply)) = actions.blocking_recv() {
            let name = action.name();
            let result = self.handle(action);
            if let Err(error) = &result {
                debug!(action = name, %error, "action refused");
            }
            if reply.send(result).is_err() {
                // The controller gave up waiting (timeout); the change, if any, still stands
                // and is visible in the snapshot.
                error!(
                    action = name,
                    "action finished after its caller stopped waiting"
                );
            }
        }
        debug!("action channel closed, event loop ends");
    }

    /// Marks the microVM as ended and publishes it. Call from the loop's owner when the
    /// guest shuts down or the backend reports a fatal error.
    pub fn vm_exited(&mut self) {
        self.vm = None;
        self.state.phase = LifecyclePhase::ShutDown;
        info!(vm_id = %self.state.id, "microVM shut down");
        self.publish();
    }

    /// Pulls the running VM's latest balloon statistics into the snapshot and publishes it if
    /// they changed. The loop's owner calls this periodically (at the balloon's polling
    /// interval); reads of `/balloon/statistics` never reach the event loop.
    pub fn refresh_balloon_stats(&mut self) {
        let stats = self.vm.as_ref().and_then(|vm| vm.balloon_stats());
        if stats.is_some() && stats != self.state.balloon_stats {
            self.state.balloon_stats = stats;
            self.publish();
        }
    }

    fn publish(&self) {
        self.publisher.publish(self.state.clone());
    }

    fn running_vm(&mut self, action: &'static str) -> Result<&mut dyn RunningVm, VmmActionError> {
        match self.vm.as_deref_mut() {
            Some(vm) => Ok(vm),
            None => Err(VmmActionError::NotRunning { action }),
        }
    }

    /// Carries out one action and publishes the resulting state. A refused action changes
    /// nothing.
    ///
    /// # Errors
    /// A [`VmmActionError`] saying why the action was refused or failed.
    pub fn handle(&mut self, action: ApiAction) -> Result<ActionOutcome, VmmActionError> {
        let name = action.name();
        if action.admissibility() == Admissibility::PreBoot && self.state.phase.is_started() {
            return Err(VmmActionError::AlreadyStarted { action: name });
        }
        let mut next = self.state.vm_config.clone();
        match action {
            ApiAction::PutMachineConfig(machine) => {
                next.machine_config = machine;
                next.machine_config_set = true;
            }
            ApiAction::PatchMachineConfig(update) => {
                next.machine_config = next.machine_config.apply(&update)?;
                next.machine_config_set = true;
            }
            ApiAction::PutBootSource(boot) => next.boot_source = Some(boot),
            ApiAction::PutDrive(drive) => {
                let root = next
                    .drives
                    .iter()
                    .find(|d| d.is_root_device() && d.drive_id() != drive.drive_id());
                if let Some(other) = root.filter(|_| drive.is_root_device()) {
                    return Err(VmmActionError::RootDeviceConflict {
                        device_id: drive.drive_id().clone(),
                        other: other.drive_id().clone(),
                    });
                }
                next.upsert_drive(drive);
            }
            ApiAction::PutNetworkInterface(iface) => next.upsert_network_interface(iface),
            ApiAction::PutPmem(pmem) => {
                let root = next
                    .pmem
                    .iter()
                    .find(|p| p.root_device() && p.id() != pmem.id());
                if let Some(other) = root.filter(|_| pmem.root_device()) {
                    return Err(VmmActionError::RootDeviceConflict {
                        device_id: pmem.id().clone(),
                        other: other.id().clone(),
                    });
                }
                next.upsert_pmem(pmem);
            }
            ApiAction::PutVsock(vsock) => next.vsock = Some(vsock),
            ApiAction::PutEntropy(entropy) => next.entropy = Some(entropy),
            ApiAction::PutBalloon(balloon) => next.balloon = Some(balloon),
            // Known limitation: the logger configuration is recorded (and shown by
            // GET /vm/config) but not applied; squib-vmm keeps logging to stderr at the level
            // given on its command line. Applying it needs a reloadable tracing layer in the
            // binary.
            ApiAction::PutLogger(logger) => next.logger = Some(logger),
            ApiAction::PutMetrics(metrics) => next.metrics = Some(metrics),
            ApiAction::PutSerial(serial) => next.serial = serial,
            ApiAction::PutMmdsConfig(mmds) => {
                for id in mmds.network_interfaces() {
                    if !next.network_interfaces.iter().any(|i| i.iface_id() == id) {
                        return Err(VmmActionError::MmdsInterfaceNotFound(id.clone()));
                    }
                }
                next.mmds_config = Some(mmds);
            }
            ApiAction::PutMmds(data) => {
                if !data.is_object() {
                    return Err(VmmActionError::MmdsNotAnObject);
                }
                next.mmds_data = Some(data);
            }
            ApiAction::PatchMmds(patch) => {
                if !patch.is_object() {
                    return Err(VmmActionError::MmdsNotAnObject);
                }
                let mut data = next
                    .mmds_data
                    .take()
                    .unwrap_or_else(|| serde_json::Value::Object(serde_json::Map::new()));
                merge_patch(&mut data, patch);
                next.mmds_data = Some(data);
            }
            ApiAction::PatchBalloon(update) => {
                let balloon = next.balloon.ok_or(VmmActionError::BalloonNotConfigured)?;
                if self.state.phase.is_started() {
                    self.running_vm(name)?.resize_balloon(update.amount_mib)?;
                }
                next.balloon = Some(balloon.with_amount_mib(update.amount_mib));
            }
            ApiAction::PatchBalloonStatistics(update) => {
                let balloon = next.balloon.ok_or(VmmActionError::BalloonNotConfigured)?;
                let to = update.stats_polling_interval_s;
                if self.state.phase.is_started() {
                    let from = balloon.stats_polling_interval_s();
                    if (from == 0) != (to == 0) {
                        return Err(VmmActionError::BalloonStatsToggle { from, to });
                    }
                    self.running_vm(name)?.set_balloon_stats_interval(to)?;
                }
                next.balloon = Some(balloon.with_stats_polling_interval_s(to));
            }
            ApiAction::PatchDrive(update) => {
                let current = next
                    .drives
                    .iter()
                    .find(|d| *d.drive_id() == update.drive_id)
                    .ok_or_else(|| VmmActionError::DriveNotFound(update.drive_id.clone()))?;
                let updated = current.with_update(&update);
                self.running_vm(name)?.update_drive(&update)?;
                next.upsert_drive(updated);
            }
            ApiAction::PatchNetworkInterface(update) => {
                let current = next
                    .network_interfaces
                    .iter()
                    .find(|i| *i.iface_id() == update.iface_id)
                    .ok_or_else(|| {
                        VmmActionError::NetworkInterfaceNotFound(update.iface_id.clone())
                    })?;
                let updated = current.with_update(&update);
                self.running_vm(name)?.update_network_interface(&update)?;
                next.upsert_network_interface(updated);
            }
            ApiAction::InstanceStart => return self.start(),
            ApiAction::FlushMetrics => {
                self.running_vm(name)?.flush_metrics()?;
                return Ok(ActionOutcome::Done);
            }
            ApiAction::SendCtrlAltDel => {
                self.running_vm(name)?.send_ctrl_alt_del()?;
                return Ok(ActionOutcome::Done);
            }
            ApiAction::SetVmState(state) => {
                let vm = self.running_vm(name)?;
                let phase = match state {
                    VmState::Paused => {
                        vm.pause()?;
                        LifecyclePhase::Paused
                    }
                    VmState::Resumed => {
                        vm.resume()?;
                        LifecyclePhase::Running
                    }
                };
                self.state.phase = phase;
                info!(vm_id = %self.state.id, ?phase, "microVM state changed");
                self.publish();
                return Ok(ActionOutcome::Done);
            }
            // Known limitation: snapshots are not implemented; both directions are refused
            // with a typed error. Implementing them needs state save/restore in the backend.
            ApiAction::CreateSnapshot(_) => {
                return Err(VmmActionError::SnapshotNotSupported {
                    operation: "create",
                });
            }
            ApiAction::LoadSnapshot(_) => {
                return Err(VmmActionError::SnapshotNotSupported { operation: "load" });
            }
        }
        self.state.vm_config = next;
        if let Some(stats) = self.vm.as_ref().and_then(|vm| vm.balloon_stats()) {
            self.state.balloon_stats = Some(stats);
        }
        self.publish();
        Ok(ActionOutcome::Done)
    }

    fn start(&mut self) -> Result<ActionOutcome, VmmActionError> {
        if self.state.vm_config.boot_source.is_none() {
            return Err(VmmActionError::MissingBootSource);
        }
        self.state.phase = LifecyclePhase::Booting;
        self.publish();
        info!(vm_id = %self.state.id, backend = self.backend.name(), "starting microVM");
        match self.backend.start(&self.state.vm_config) {
            Ok(vm) => {
                self.vm = Some(vm);
                self.state.phase = LifecyclePhase::Running;
                info!(vm_id = %self.state.id, "microVM running");
                self.publish();
                Ok(ActionOutcome::Done)
            }
            Err(err) => {
                self.state.phase = LifecyclePhase::NotStarted;
                self.publish();
                Err(err.into())
            }
        }
    }
}

/// Applies an RFC 7396 JSON merge patch: objects merge key by key, `null` deletes a key, any
/// other value replaces the target.
fn merge_patch(target: &mut serde_json::Value, patch: serde_json::Value) {
    match patch {
        serde_json::Value::Object(entries) => {
            if !target.is_object() {
                *target = serde_json::Value::Object(serde_json::Map::new());
            }
            if let serde_json::Value::Object(map) = target {
                for (key, value) in entries {
                    if value.is_null() {
                        map.remove(&key);
                    } else {
                        merge_patch(map.entry(key).or_insert(serde_json::Value::Null), value);
                    }
                }
            }
        }
        other => *target = other,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use serde_json::json;

    use super::*;
    use crate::config::{
        BalloonConfig, BootSource, CacheType, DeviceId, DriveConfig, IoEngine, MachineConfig,
        MachineConfigUpdate,
    };
    use crate::mirror::{SnapshotReader, snapshot_mirror};

    fn new_loop(backend: Box<dyn VmBackend>) -> (EventLoop, SnapshotReader) {
        let (publisher, reader) = snapshot_mirror(ControllerSnapshot::new("vm0"));
        (EventLoop::new(publisher, backend), reader)
    }

    fn boot_source() -> ApiAction {
        ApiAction::PutBootSource(BootSource::new("/vmlinux".into(), None, None).unwrap())
    }

    fn drive(id: &str, root: bool) -> ApiAction {
        ApiAction::PutDrive(
            DriveConfig::new(
                DeviceId::new("drive_id", id.into()).unwrap(),
                format!("/{id}.img").into(),
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

    /// Records calls; `phases` sees what was published while `start` ran.
    struct FakeBackend {
        reader: Arc<Mutex<Option<SnapshotReader>>>,
        phases: Arc<Mutex<Vec<LifecyclePhase>>>,
        calls: Arc<Mutex<Vec<&'static str>>>,
    }

    struct FakeVm {
        calls: Arc<Mutex<Vec<&'static str>>>,
    }

    impl VmBackend for FakeBackend {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn start(&mut self, _config: &VmConfig) -> Result<Box<dyn RunningVm>, BackendError> {
            if let Some(reader) = self.reader.lock().unwrap().as_ref() {
                self.phases.lock().unwrap().push(reader.load().phase);
            }
            Ok(Box::new(FakeVm {
                calls: Arc::clone(&self.calls),
            }))
        }
    }

    impl RunningVm for FakeVm {
        fn backend_name(&self) -> &'static str {
            "fake"
        }
        fn pause(&mut self) -> Result<(), BackendError> {
            self.calls.lock().unwrap().push("pause");
            Ok(())
        }
        fn resume(&mut self) -> Result<(), BackendError> {
            self.calls.lock().unwrap().push("resume");
            Ok(())
        }
    }

    fn fake_loop() -> (EventLoop, SnapshotReader, FakeBackend) {
        let shared_reader = Arc::new(Mutex::new(None));
        let phases = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let backend = FakeBackend {
            reader: Arc::clone(&shared_reader),
            phases: Arc::clone(&phases),
            calls: Arc::clone(&calls),
        };
        let (event_loop, reader) = new_loop(Box::new(backend));
        *shared_reader.lock().unwrap() = Some(reader.clone());
        let probe = FakeBackend {
            reader: shared_reader,
            phases,
            calls,
        };
        (event_loop, reader, probe)
    }

    #[test]
    fn test_event_loop_publishes_pre_boot_config() {
        let (mut el, reader) = new_loop(Box::new(NoHypervisorBackend));
        let machine =
            MachineConfig::new(2, 256, false, false, crate::config::HugePages::None, None).unwrap();
        el.handle(ApiAction::PutMachineConfig(machine.clone()))
            .unwrap();
        el.handle(drive("root", true)).unwrap();
        let snap = reader.load();
        assert_eq!(snap.vm_config.machine_config, machine);
        assert!(snap.vm_config.machine_config_set);
        assert_eq!(snap.vm_config.drives.len(), 1);
    }

    #[test]
    fn test_event_loop_rejected_patch_leaves_config_untouched() {
        let (mut el, reader) = new_loop(Box::new(NoHypervisorBackend));
        let update = MachineConfigUpdate {
            vcpu_count: Some(0),
            ..Default::default()
        };
        assert!(el.handle(ApiAction::PatchMachineConfig(update)).is_err());
        assert_eq!(
            reader.load().vm_config.machine_config,
            MachineConfig::default()
        );
        assert!(!reader.load().vm_config.machine_config_set);
    }

    #[test]
    fn test_event_loop_refuses_second_root_drive() {
        let (mut el, reader) = new_loop(Box::new(NoHypervisorBackend));
        el.handle(drive("a", true)).unwrap();
        let err = el.handle(drive("b", true)).unwrap_err();
        assert!(matches!(err, VmmActionError::RootDeviceConflict { .. }));
        // Replacing the root drive itself is fine.
        el.handle(drive("a", true)).unwrap();
        assert_eq!(reader.load().vm_config.drives.len(), 1);
    }

    #[test]
    fn test_event_loop_start_without_hypervisor_fails_and_stays_not_started() {
        let (mut el, reader) = new_loop(Box::new(NoHypervisorBackend));
        assert_eq!(
            el.handle(ApiAction::InstanceStart).unwrap_err(),
            VmmActionError::MissingBootSource
        );
        el.handle(boot_source()).unwrap();
        let err = el.handle(ApiAction::InstanceStart).unwrap_err();
        assert_eq!(
            err,
            VmmActionError::Backend(BackendError::NoHypervisor {
                operation: "start the microVM"
            })
        );
        assert_eq!(reader.load().phase, LifecyclePhase::NotStarted);
        // Configuration can still be changed after the failed start.
        el.handle(drive("a", false)).unwrap();
    }

    #[test]
    fn test_event_loop_start_publishes_booting_then_running() {
        let (mut el, reader, probe) = fake_loop();
        el.handle(boot_source()).unwrap();
        el.handle(ApiAction::InstanceStart).unwrap();
        assert_eq!(*probe.phases.lock().unwrap(), [LifecyclePhase::Booting]);
        assert_eq!(reader.load().phase, LifecyclePhase::Running);
        let err = el.handle(drive("late", false)).unwrap_err();
        assert_eq!(err, VmmActionError::AlreadyStarted { action: "PutDrive" });
    }

    #[test]
    fn test_event_loop_pause_resume_and_unsupported_defaults() {
        let (mut el, reader, probe) = fake_loop();
        el.handle(boot_source()).unwrap();
        el.handle(ApiAction::InstanceStart).unwrap();
        el.handle(ApiAction::SetVmState(VmState::Paused)).unwrap();
        assert_eq!(reader.load().phase, LifecyclePhase::Paused);
        el.handle(ApiAction::SetVmState(VmState::Resumed)).unwrap();
        assert_eq!(reader.load().phase, LifecyclePhase::Running);
        assert_eq!(*probe.calls.lock().unwrap(), ["pause", "resume"]);
        let err = el.handle(ApiAction::FlushMetrics).unwrap_err();
        assert_eq!(
            err,
            VmmActionError::Backend(BackendError::Unsupported {
                operation: "FlushMetrics",
                backend: "fake"
            })
        );
        el.vm_exited();
        assert_eq!(reader.load().phase, LifecyclePhase::ShutDown);
    }

    #[test]
    fn test_event_loop_post_boot_action_without_vm_is_refused() {
        let (mut el, _reader) = new_loop(Box::new(NoHypervisorBackend));
        let err = el.handle(ApiAction::SendCtrlAltDel).unwrap_err();
        assert_eq!(
            err,
            VmmActionError::NotRunning {
                action: "SendCtrlAltDel"
            }
        );
    }

    #[test]
    fn test_event_loop_refuses_snapshots_as_not_supported() {
        let (mut el, _reader) = new_loop(Box::new(NoHypervisorBackend));
        let params = crate::snapshot::SnapshotLoadParams::new(
            "/s".into(),
            crate::snapshot::MemoryBackend::File("/m".into()),
            false,
            false,
            vec![],
            None,
        )
        .unwrap();
        let err = el.handle(ApiAction::LoadSnapshot(params)).unwrap_err();
        assert_eq!(
            err,
            VmmActionError::SnapshotNotSupported { operation: "load" }
        );
    }

    #[test]
    fn test_event_loop_balloon_patch_needs_balloon() {
        let (mut el, reader) = new_loop(Box::new(NoHypervisorBackend));
        let patch = ApiAction::PatchBalloon(crate::config::BalloonUpdate { amount_mib: 8 });
        assert_eq!(
            el.handle(patch.clone()).unwrap_err(),
            VmmActionError::BalloonNotConfigured
        );
        let balloon = BalloonConfig::new(16, false, 0, false, false).unwrap();
        el.handle(ApiAction::PutBalloon(balloon)).unwrap();
        el.handle(patch).unwrap();
        assert_eq!(reader.load().vm_config.balloon.unwrap().amount_mib(), 8);
    }

    #[test]
    fn test_event_loop_mmds_put_and_merge_patch() {
        let (mut el, reader) = new_loop(Box::new(NoHypervisorBackend));
        el.handle(ApiAction::PutMmds(json!({"a": {"b": 1, "c": 2}, "d": 3})))
            .unwrap();
        el.handle(ApiAction::PatchMmds(
            json!({"a": {"b": null, "e": 4}, "d": [1]}),
        ))
        .unwrap();
        assert_eq!(
            reader.load().vm_config.mmds_data,
            Some(json!({"a": {"c": 2, "e": 4}, "d": [1]}))
        );
        let err = el.handle(ApiAction::PutMmds(json!([1]))).unwrap_err();
        assert_eq!(err, VmmActionError::MmdsNotAnObject);
    }

    struct StatsBackend;
    struct StatsVm;
    impl VmBackend for StatsBackend {
        fn name(&self) -> &'static str {
            "stats"
        }
        fn start(&mut self, _config: &VmConfig) -> Result<Box<dyn RunningVm>, BackendError> {
            Ok(Box::new(StatsVm))
        }
    }
    impl RunningVm for StatsVm {
        fn backend_name(&self) -> &'static str {
            "stats"
        }
        fn balloon_stats(&self) -> Option<BalloonStats> {
            Some(BalloonStats {
                target_mib: 4,
                ..BalloonStats::default()
            })
        }
    }

    #[test]
    fn test_event_loop_refresh_publishes_balloon_stats_of_running_vm() {
        let (mut el, reader) = new_loop(Box::new(StatsBackend));
        el.refresh_balloon_stats();
        assert_eq!(reader.load().balloon_stats, None);
        el.handle(boot_source()).unwrap();
        el.handle(ApiAction::InstanceStart).unwrap();
        el.refresh_balloon_stats();
        assert_eq!(reader.load().balloon_stats.map(|s| s.target_mib), Some(4));
    }

    #[test]
    fn test_event_loop_run_answers_through_channel() {
        let (el, reader) = new_loop(Box::new(NoHypervisorBackend));
        let (tx, rx) = crate::action::action_channel();
        let handle = std::thread::spawn(move || el.run(rx));
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        tx.blocking_send((boot_source(), reply_tx)).unwrap();
        assert_eq!(reply_rx.blocking_recv().unwrap(), Ok(ActionOutcome::Done));
        assert!(reader.load().vm_config.boot_source.is_some());
        drop(tx);
        handle.join().unwrap();
    }
}
