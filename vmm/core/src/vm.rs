//! A running microVM and the [`VmBackend`] that builds one on the host's hypervisor.
//!
//! [`HypervisorBackend`] is the event loop's seam to real VMs: `start` calls [`builder::build`]
//! with the host's hypervisor (x86_64: KVM, probed once and kept; aarch64: the builder opens KVM
//! on Linux or Hypervisor.framework on macOS for each VM, whose GIC is sized by its vCPU count);
//! the [`MicroVm`] it returns pauses and resumes
//! its vCPUs for the loop. When the guest ends the VM on its own (reboot, power-off, panic) or a
//! vCPU fails, the [`VmStopReason`] arrives on the receiver [`HypervisorBackend::new`] returned;
//! its owner ends the process with [`VmStopReason::exit_code`].

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

#[cfg(target_arch = "x86_64")]
use squib_hypervisor::Hypervisor;
use squib_hypervisor::Vm;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tracing::{info, warn};
use vm_memory::GuestMemoryMmap;

use crate::action::BackendError;
use crate::builder::{self, ConsoleTarget};
use crate::config::VmConfig;
use crate::event_loop::{RunningVm, VmBackend};
use crate::vcpu::{VcpuControl, VmStopReason};

/// How long a pause may take before it is reported as failed.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A booted microVM. Dropping it stops and joins every vCPU thread, then releases the VM and
/// its memory in that order.
pub struct MicroVm {
    control: Arc<VcpuControl>,
    threads: Vec<JoinHandle<()>>,
    vcpu_count: usize,
    /// Writes out the console's buffered output (a trailing partial line).
    flush_console: Box<dyn Fn() + Send + Sync>,
    // Declared after the threads: fields drop in order, so the VM and the memory mapped into
    // it outlive every vCPU.
    _vm: Arc<dyn Vm>,
    _memory: GuestMemoryMmap,
}

impl std::fmt::Debug for MicroVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MicroVm")
            .field("vcpu_count", &self.vcpu_count)
            .field("control", &self.control)
            .finish_non_exhaustive()
    }
}

impl MicroVm {
    pub(crate) fn new(
        vm: Arc<dyn Vm>,
        memory: GuestMemoryMmap,
        control: Arc<VcpuControl>,
        flush_console: Box<dyn Fn() + Send + Sync>,
        vcpu_count: usize,
    ) -> Self {
        Self {
            control,
            threads: Vec::with_capacity(vcpu_count),
            vcpu_count,
            flush_console,
            _vm: vm,
            _memory: memory,
        }
    }

    pub(crate) fn add_vcpu_thread(&mut self, handle: JoinHandle<()>) {
        self.threads.push(handle);
    }

    /// Parks every vCPU outside guest mode.
    ///
    /// # Errors
    ///
    /// [`crate::vcpu::VcpuError::PauseTimeout`] when a vCPU did not park in time.
    pub fn pause(&self) -> Result<(), crate::vcpu::VcpuError> {
        self.control.pause(self.vcpu_count, PAUSE_TIMEOUT)
    }

    /// Lets the vCPUs run again.
    pub fn resume(&self) {
        self.control.resume();
    }

    /// Stops the vCPUs and waits for their threads.
    pub fn stop(&mut self) {
        self.control.stop();
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                warn!("a vcpu thread panicked");
            }
        }
        (self.flush_console)();
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RunningVm for MicroVm {
    fn backend_name(&self) -> &'static str {
        BACKEND_NAME
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        MicroVm::pause(self).map_err(|e| BackendError::Failed {
            operation: "pause the microVM",
            detail: e.to_string(),
        })
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        MicroVm::resume(self);
        Ok(())
    }
}

/// The name of the host's hypervisor backend, for logs and `RunningVm::backend_name`.
const BACKEND_NAME: &str = if cfg!(target_os = "macos") {
    "hvf"
} else {
    "kvm"
};

/// Builds microVMs on the host's hypervisor (probed at each start, so that a host without
/// one still serves the API and answers `InstanceStart` with the reason).
pub struct HypervisorBackend {
    console: ConsoleTarget,
    stops: UnboundedSender<VmStopReason>,
    /// x86_64 keeps the hypervisor it opened; an aarch64 VM's interrupt controller is shaped
    /// by its vCPU count, so the aarch64 builder opens the hypervisor for each VM.
    #[cfg(target_arch = "x86_64")]
    hypervisor: Option<Arc<dyn Hypervisor>>,
}

impl std::fmt::Debug for HypervisorBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HypervisorBackend")
            .field("console", &self.console)
            .finish_non_exhaustive()
    }
}

impl HypervisorBackend {
    /// A backend whose guest console goes to `console` unless the configuration names a file
    /// (`PUT /serial`). The receiver yields why a started microVM stopped on its own.
    pub fn new(console: ConsoleTarget) -> (Self, UnboundedReceiver<VmStopReason>) {
        let (stops, rx) = unbounded_channel();
        (
            Self {
                console,
                stops,
                #[cfg(target_arch = "x86_64")]
                hypervisor: None,
            },
            rx,
        )
    }
}

impl VmBackend for HypervisorBackend {
    fn name(&self) -> &'static str {
        BACKEND_NAME
    }

    fn start(&mut self, config: &VmConfig) -> Result<Box<dyn RunningVm>, BackendError> {
        let stops = self.stops.clone();
        let on_stop = Box::new(move |reason: VmStopReason| {
            info!(?reason, "microVM stopped");
            let _ = stops.send(reason);
        });
        #[cfg(target_arch = "x86_64")]
        let built = {
            let hypervisor = match &self.hypervisor {
                Some(h) => h.clone(),
                None => {
                    let h = squib_hypervisor::probe().map_err(|e| BackendError::Failed {
                        operation: "open the hypervisor",
                        detail: e.to_string(),
                    })?;
                    self.hypervisor = Some(h.clone());
                    h
                }
            };
            builder::build(hypervisor.as_ref(), config, &self.console, on_stop)
        };
        #[cfg(target_arch = "aarch64")]
        let built = builder::build(config, &self.console, on_stop);
        let vm = built.map_err(|e| {
            let mut detail = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                detail.push_str(": ");
                detail.push_str(&s.to_string());
                source = s.source();
            }
            BackendError::Failed {
                operation: "start the microVM",
                detail,
            }
        })?;
        Ok(Box::new(vm))
    }
}
