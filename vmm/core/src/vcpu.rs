//! vCPU threads: one thread per vCPU creates, configures and runs it (the hypervisor seam
//! requires a vCPU to stay on its thread), dispatching MMIO and port I/O exits to the buses.
//!
//! [`VcpuControl`] is shared by the threads and the microVM: it says whether they run, park
//! (pause) or end, counts parked threads so that a pause returns only once every vCPU is out
//! of guest mode, and holds the kick handles that force a vCPU out of `run`. The first guest
//! reset, power-off, crash or fatal error stops all vCPUs and is reported once through a
//! [`StopNotifier`].

use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use squib_devices::Bus;
use squib_devices::serial::{ConsoleStop, ConsoleWatch};
use squib_hypervisor::{HypervisorError, Vcpu, VcpuKicker, Vm, VmExit};
use tracing::{debug, error, info, trace, warn};

/// Why a microVM stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStopReason {
    /// The guest rebooted (i8042 reset, reset request, or the triple fault of Linux's
    /// `reboot=t` after it announced the restart on its console).
    GuestReset,
    /// A vCPU triple-faulted without the guest announcing a reboot or a panic: the guest
    /// crashed (x86_64 only). The registers at the fault are logged at error level.
    GuestTripleFault,
    /// The guest powered off (power-off request, or the kernel's power-off console line).
    GuestShutdown,
    /// The guest kernel panicked (its panic banner appeared on the console).
    GuestPanic,
    /// A vCPU failed or hit an exit squib cannot handle; the text says which and why.
    Failed(String),
}

impl VmStopReason {
    /// The process exit status a VMM should end with: 0 for a clean guest reboot or power-off,
    /// 1 for a guest panic, 2 for a VMM-side failure, 3 for a guest triple fault.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::GuestReset | Self::GuestShutdown => 0,
            Self::GuestPanic => 1,
            Self::Failed(_) => 2,
            Self::GuestTripleFault => 3,
        }
    }
}

/// Called once with the reason a microVM stopped.
pub type StopCallback = Box<dyn FnOnce(VmStopReason) + Send>;

/// Delivers the first [`VmStopReason`] to whoever owns the microVM.
pub struct StopNotifier {
    callback: Mutex<Option<StopCallback>>,
}

impl std::fmt::Debug for StopNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StopNotifier").finish_non_exhaustive()
    }
}

impl StopNotifier {
    /// Calls `callback` (from a vCPU thread) on the first stop.
    pub fn new(callback: StopCallback) -> Self {
        Self {
            callback: Mutex::new(Some(callback)),
        }
    }

    /// Reports `reason` unless a stop was already reported.
    pub fn notify(&self, reason: VmStopReason) {
        if let Some(callback) = self.callback.lock().take() {
            callback(reason);
        }
    }
}

/// A failure around the vCPU threads.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The thread could not be spawned.
    #[error("cannot spawn the thread of vcpu {index}")]
    Spawn {
        /// vCPU index.
        index: u8,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The hypervisor refused to create or configure the vCPU.
    #[error("cannot set up vcpu {index}")]
    Setup {
        /// vCPU index.
        index: u8,
        /// The backend's error.
        #[source]
        source: HypervisorError,
    },
    /// The thread ended before reporting whether its vCPU was ready.
    #[error("the thread of vcpu {index} ended during setup")]
    SetupAborted {
        /// vCPU index.
        index: u8,
    },
    /// Not every vCPU parked within the time allowed.
    #[error("{parked} of {total} vcpus parked within {timeout:?}")]
    PauseTimeout {
        /// How many parked.
        parked: usize,
        /// How many run.
        total: usize,
        /// The wait.
        timeout: Duration,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RunState {
    Running,
    Paused,
    Stopping,
}

#[derive(Debug)]
struct ControlState {
    run: RunState,
    /// Threads waiting while paused.
    parked: usize,
    /// Threads whose loop has ended.
    exited: usize,
}

/// Run/pause/stop state shared by the vCPU threads and their owner.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    kickers: Mutex<Vec<Arc<dyn VcpuKicker>>>,
}

impl std::fmt::Debug for VcpuControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuControl")
            .field("state", &*self.state.lock())
            .finish_non_exhaustive()
    }
}

impl VcpuControl {
    /// New control; vCPUs start parked until [`VcpuControl::resume`].
    pub fn new_paused() -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(ControlState {
                run: RunState::Paused,
                parked: 0,
                exited: 0,
            }),
            changed: Condvar::new(),
            kickers: Mutex::new(Vec::new()),
        })
    }

    fn add_kicker(&self, kicker: Arc<dyn VcpuKicker>) {
        self.kickers.lock().push(kicker);
    }

    fn kick_all(&self) {
        for kicker in self.kickers.lock().iter() {
            kicker.kick();
        }
    }

    /// Parks while paused; returns `false` when the thread should end.
    fn wait_runnable(&self) -> bool {
        let mut state = self.state.lock();
        loop {
            match state.run {
                RunState::Running => return true,
                RunState::Stopping => return false,
                RunState::Paused => {
                    state.parked += 1;
                    self.changed.notify_all();
                    self.changed.wait(&mut state);
                    state.parked -= 1;
                }
            }
        }
    }

    fn mark_exited(&self) {
        self.state.lock().exited += 1;
        self.changed.notify_all();
    }

    /// Stops every vCPU at its next exit; parked ones wake and end.
    pub fn stop(&self) {
        self.state.lock().run = RunState::Stopping;
        self.changed.notify_all();
        self.kick_all();
    }

    /// Whether a stop was requested.
    pub fn is_stopping(&self) -> bool {
        self.state.lock().run == RunState::Stopping
    }

    /// Takes every vCPU out of guest mode and waits until all `total` have parked (or ended).
    ///
    /// # Errors
    ///
    /// [`VcpuError::PauseTimeout`] when some vCPU did not park within `timeout`; the vCPUs
    /// that did stay parked.
    pub fn pause(&self, total: usize, timeout: Duration) -> Result<(), VcpuError> {
        {
            let mut state = self.state.lock();
            if state.run == RunState::Stopping {
                return Ok(());
            }
            state.run = RunState::Paused;
        }
        self.kick_all();
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock();
        while state.parked + state.exited < total {
            if self.changed.wait_until(&mut state, deadline).timed_out() {
                return Err(VcpuError::PauseTimeout {
                    parked: state.parked,
                    total,
                    timeout,
                });
            }
        }
        Ok(())
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        let mut state = self.state.lock();
        if state.run == RunState::Paused {
            state.run = RunState::Running;
            self.changed.notify_all();
        }
    }
}

/// What a vCPU thread needs besides its vCPU.
#[derive(Clone)]
pub struct VcpuContext {
    /// Devices reached through MMIO.
    pub mmio_bus: Arc<Bus>,
    /// Devices reached through port I/O (x86_64).
    pub io_bus: Arc<Bus>,
    /// Shared run state.
    pub control: Arc<VcpuControl>,
    /// Where the first stop is reported.
    pub stop: Arc<StopNotifier>,
    /// Tells a guest panic from a plain reboot, and reports console power-off and panic lines.
    pub console: ConsoleWatch,
}

impl std::fmt::Debug for VcpuContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuContext").finish_non_exhaustive()
    }
}

/// Configures a freshly created vCPU on its own thread.
pub type VcpuConfigure = Box<dyn FnOnce(&mut dyn Vcpu) -> Result<(), HypervisorError> + Send>;

/// Spawns the thread of vCPU `index` of `count`, which creates and configures the vCPU, then
/// parks until the control says run. Returns once the vCPU exists and is configured.
///
/// # Errors
///
/// [`VcpuError`] when the thread or the vCPU cannot be set up; the thread has ended then.
pub fn spawn(
    vm: Arc<dyn Vm>,
    index: u8,
    count: u8,
    configure: VcpuConfigure,
    ctx: VcpuContext,
) -> Result<JoinHandle<()>, VcpuError> {
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), HypervisorError>>();
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let created = vm
                .create_vcpu(u32::from(index), u32::from(count))
                .and_then(|mut vcpu| configure(vcpu.as_mut()).map(|()| vcpu));
            let mut vcpu = match created {
                Ok(vcpu) => vcpu,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            ctx.control.add_kicker(vcpu.kicker());
            if ready_tx.send(Ok(())).is_err() {
                return;
            }
            let span = tracing::info_span!("vcpu", vcpu = index);
            let _guard = span.enter();
            run_loop(vcpu.as_mut(), &ctx);
            ctx.control.mark_exited();
            // The vCPU is dropped here, on its own thread.
        })
        .map_err(|source| VcpuError::Spawn { index, source })?;
    match ready_rx.recv() {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(source)) => {
            let _ = handle.join();
            Err(VcpuError::Setup { index, source })
        }
        Err(_) => {
            let _ = handle.join();
            Err(VcpuError::SetupAborted { index })
        }
    }
}

fn run_loop(vcpu: &mut dyn Vcpu, ctx: &VcpuContext) {
    while ctx.control.wait_runnable() {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) => {
                error!(error = %e, "vcpu failed");
                finish(ctx, VmStopReason::Failed(e.to_string()));
                return;
            }
        };
        match exit {
            VmExit::MmioRead { addr, data } => {
                if !ctx.mmio_bus.read(addr, data) {
                    trace!(
                        gpa = addr,
                        len = data.len(),
                        "mmio read of unclaimed address"
                    );
                }
            }
            VmExit::MmioWrite { addr, data } => {
                if !ctx.mmio_bus.write(addr, data) {
                    trace!(
                        gpa = addr,
                        len = data.len(),
                        "mmio write to unclaimed address"
                    );
                }
            }
            VmExit::IoIn { port, data } => {
                if !ctx.io_bus.read(u64::from(port), data) {
                    // Unclaimed ports read as all ones, like an ISA bus with nothing on it.
                    data.fill(0xff);
                }
            }
            VmExit::IoOut { port, data } => {
                ctx.io_bus.write(u64::from(port), data);
                // Console output is port I/O on x86_64: the line that completes a panic or
                // power-off banner ends the VM here.
                if let Some(stop) = ctx.console.stop_request() {
                    let reason = match stop {
                        ConsoleStop::Panic => VmStopReason::GuestPanic,
                        ConsoleStop::PowerOff => VmStopReason::GuestShutdown,
                    };
                    info!(?reason, "guest console reported the end of the guest");
                    finish(ctx, reason);
                    return;
                }
            }
            VmExit::Interrupted => {}
            VmExit::Reset => {
                let reason = if ctx.console.panicked() {
                    VmStopReason::GuestPanic
                } else {
                    VmStopReason::GuestReset
                };
                info!(?reason, "guest reset");
                finish(ctx, reason);
                return;
            }
            VmExit::TripleFault => {
                let reason = triple_fault_reason(&ctx.console);
                report_triple_fault(vcpu, &reason);
                finish(ctx, reason);
                return;
            }
            VmExit::Shutdown => {
                info!("guest powered off");
                finish(ctx, VmStopReason::GuestShutdown);
                return;
            }
            VmExit::Unhandled { reason, detail } => {
                error!(reason, %detail, "unhandled vcpu exit");
                finish(
                    ctx,
                    VmStopReason::Failed(format!("unhandled exit {reason:#x}: {detail}")),
                );
                return;
            }
        }
    }
    debug!("vcpu stopped");
}

/// What a triple fault means, going by what the guest printed before it: the end of a panic,
/// the reset of a `reboot=t` reboot, or else a crash.
fn triple_fault_reason(console: &ConsoleWatch) -> VmStopReason {
    if console.panicked() {
        VmStopReason::GuestPanic
    } else if console.restart_announced() {
        VmStopReason::GuestReset
    } else {
        VmStopReason::GuestTripleFault
    }
}

/// A register value printed in hex in log fields.
#[cfg(target_arch = "x86_64")]
struct Hex(u64);

#[cfg(target_arch = "x86_64")]
impl std::fmt::Display for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Logs a triple fault: at error level with the vCPU's registers when it is a crash, at info
/// level when the guest meant it (it announced a restart or panicked first).
fn report_triple_fault(vcpu: &dyn Vcpu, reason: &VmStopReason) {
    if *reason != VmStopReason::GuestTripleFault {
        info!(?reason, "guest reset through a triple fault");
        return;
    }
    #[cfg(target_arch = "x86_64")]
    match vcpu.fault_registers_x86_64() {
        Ok(Some(r)) => error!(
            rip = %Hex(r.rip),
            rsp = %Hex(r.rsp),
            rflags = %Hex(r.rflags),
            cs = %Hex(u64::from(r.cs)),
            cr0 = %Hex(r.cr0),
            cr2 = %Hex(r.cr2),
            cr3 = %Hex(r.cr3),
            cr4 = %Hex(r.cr4),
            efer = %Hex(r.efer),
            idt_base = %Hex(r.idt.base),
            idt_limit = %Hex(u64::from(r.idt.limit)),
            "guest triple fault: the guest crashed"
        ),
        Ok(None) => error!(
            "guest triple fault: the guest crashed; the hypervisor reset the vcpu when it \
             reported the fault, so the registers at the fault are unknown"
        ),
        Err(e) => error!(
            error = %e,
            "guest triple fault: the guest crashed; its registers cannot be read"
        ),
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = vcpu;
        error!("guest triple fault: the guest crashed");
    }
}

fn finish(ctx: &VcpuContext, reason: VmStopReason) {
    ctx.control.stop();
    if let VmStopReason::Failed(detail) = &reason {
        warn!(%detail, "stopping the microVM");
    }
    ctx.stop.notify(reason);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A scripted vCPU: replays exits, then reports interrupts.
    struct FakeVcpu {
        script: VecDeque<FakeExit>,
        buf: [u8; 8],
        kicks: Arc<AtomicUsize>,
        #[cfg_attr(
            not(target_arch = "x86_64"),
            expect(dead_code, reason = "only x86_64 vcpus report fault registers")
        )]
        register_reads: Arc<AtomicUsize>,
        /// Whether the registers at a triple fault are still there (they are not under KVM on
        /// AMD).
        #[cfg_attr(
            not(target_arch = "x86_64"),
            expect(dead_code, reason = "only x86_64 vcpus report fault registers")
        )]
        registers_kept: bool,
    }

    #[cfg(target_arch = "x86_64")]
    const FAULT_REGISTERS: squib_hypervisor::x86_64::FaultRegisters =
        squib_hypervisor::x86_64::FaultRegisters {
            rip: 0x100_0004,
            rsp: 0x8ff0,
            rflags: 0x2,
            cs: 0x8,
            cr0: 0x8000_0011,
            cr2: 0,
            cr3: 0x9000,
            cr4: 0x20,
            efer: 0x500,
            idt: squib_hypervisor::x86_64::DescriptorTable {
                base: 0x520,
                limit: 7,
            },
        };

    #[derive(Clone)]
    enum FakeExit {
        IoOut(u16, u8),
        IoIn(u16),
        Interrupted,
        Reset,
        Shutdown,
        TripleFault,
    }

    struct FakeKicker(Arc<AtomicUsize>);
    impl VcpuKicker for FakeKicker {
        fn kick(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl Vcpu for FakeVcpu {
        fn run(&mut self) -> Result<VmExit<'_>, HypervisorError> {
            Ok(
                match self.script.pop_front().unwrap_or(FakeExit::Interrupted) {
                    FakeExit::IoOut(port, v) => {
                        self.buf[0] = v;
                        VmExit::IoOut {
                            port,
                            data: &self.buf[..1],
                        }
                    }
                    FakeExit::IoIn(port) => VmExit::IoIn {
                        port,
                        data: &mut self.buf[..1],
                    },
                    FakeExit::Interrupted => {
                        std::thread::sleep(Duration::from_millis(1));
                        VmExit::Interrupted
                    }
                    FakeExit::Reset => VmExit::Reset,
                    FakeExit::Shutdown => VmExit::Shutdown,
                    FakeExit::TripleFault => VmExit::TripleFault,
                },
            )
        }
        fn kicker(&self) -> Arc<dyn VcpuKicker> {
            Arc::new(FakeKicker(self.kicks.clone()))
        }
        #[cfg(target_arch = "x86_64")]
        fn configure_x86_64(
            &mut self,
            _setup: &squib_hypervisor::x86_64::VcpuSetup,
        ) -> Result<(), HypervisorError> {
            Ok(())
        }
        #[cfg(target_arch = "x86_64")]
        fn fault_registers_x86_64(
            &self,
        ) -> Result<Option<squib_hypervisor::x86_64::FaultRegisters>, HypervisorError> {
            self.register_reads.fetch_add(1, Ordering::SeqCst);
            Ok(self.registers_kept.then_some(FAULT_REGISTERS))
        }
        #[cfg(target_arch = "x86_64")]
        fn tsc_khz(&self) -> Result<Option<u32>, HypervisorError> {
            Ok(None)
        }
    }

    struct FakeVm {
        scripts: Mutex<Vec<VecDeque<FakeExit>>>,
        kicks: Arc<AtomicUsize>,
        register_reads: Arc<AtomicUsize>,
    }

    impl FakeVm {
        /// One script per vCPU, popped from the end as vCPUs are created.
        fn new(scripts: Vec<VecDeque<FakeExit>>, kicks: Arc<AtomicUsize>) -> Self {
            Self {
                scripts: Mutex::new(scripts),
                kicks,
                register_reads: Arc::new(AtomicUsize::new(0)),
            }
        }
    }

    impl Vm for FakeVm {
        unsafe fn map_memory(
            &self,
            _slot: u32,
            _gpa: u64,
            _host_addr: u64,
            _len: u64,
            _read_only: bool,
        ) -> Result<(), HypervisorError> {
            Ok(())
        }
        fn create_vcpu(&self, _index: u32, _count: u32) -> Result<Box<dyn Vcpu>, HypervisorError> {
            let script = self.scripts.lock().pop().unwrap_or_default();
            Ok(Box::new(FakeVcpu {
                script,
                buf: [0; 8],
                kicks: self.kicks.clone(),
                register_reads: self.register_reads.clone(),
                registers_kept: true,
            }))
        }
        fn interrupt_line(
            &self,
            gsi: u32,
        ) -> Result<Arc<dyn squib_devices::InterruptLine>, HypervisorError> {
            Err(HypervisorError::OutOfRange {
                field: "gsi",
                value: u64::from(gsi),
            })
        }
        #[cfg(target_arch = "x86_64")]
        fn supported_cpuid(
            &self,
        ) -> Result<Vec<squib_hypervisor::x86_64::CpuidEntry>, HypervisorError> {
            Ok(Vec::new())
        }
    }

    #[derive(Default)]
    struct Port {
        written: Vec<u8>,
    }
    impl squib_devices::BusDevice for Port {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.written.extend_from_slice(data);
        }
    }

    fn context(io_bus: Bus) -> (VcpuContext, mpsc::Receiver<VmStopReason>) {
        let (tx, rx) = mpsc::channel();
        let ctx = VcpuContext {
            mmio_bus: Arc::new(Bus::new()),
            io_bus: Arc::new(io_bus),
            control: VcpuControl::new_paused(),
            stop: Arc::new(StopNotifier::new(Box::new(move |r| {
                let _ = tx.send(r);
            }))),
            console: ConsoleWatch::new(),
        };
        (ctx, rx)
    }

    #[test]
    fn test_vcpu_loop_dispatches_io_and_reports_reset() {
        let port = Arc::new(Mutex::new(Port::default()));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, port.clone()).unwrap();
        let (ctx, rx) = context(bus);
        let vm: Arc<dyn Vm> = Arc::new(FakeVm::new(
            vec![VecDeque::from(vec![
                FakeExit::IoOut(0x3f8, b'h'),
                FakeExit::IoIn(0x3f9),
                FakeExit::IoIn(0x80),
                FakeExit::IoOut(0x3f8, b'i'),
                FakeExit::Reset,
            ])],
            Arc::new(AtomicUsize::new(0)),
        ));
        let handle = spawn(vm, 0, 1, Box::new(|_| Ok(())), ctx.clone()).unwrap();
        ctx.control.resume();
        assert_eq!(
            rx.recv_timeout(Duration::from_secs(5)).unwrap(),
            VmStopReason::GuestReset
        );
        handle.join().unwrap();
        assert_eq!(port.lock().written, b"hi");
        assert!(ctx.control.is_stopping());
    }

    /// Hypervisor.framework's exits, replayed by the scripted framework, go through the HVF
    /// backend and this vCPU loop: the boot vCPU writes to a device, reads a sign-extended byte
    /// from it and starts the second vCPU with PSCI CPU_ON; the second vCPU, whose thread the
    /// loop started parked, writes from the entry CPU_ON gave it; SYSTEM_OFF ends the VM.
    #[test]
    fn test_hvf_exits_run_through_the_vcpu_loop_and_reach_the_bus() {
        use squib_hypervisor::aarch64::{VcpuSetup, mpidr_of, psci};
        use squib_hypervisor::hvf::fake::{data_abort, hvc, new_seam_vm, run, wfi};
        use squib_hypervisor::hvf::ffi::{HV_REG_PC, HV_REG_X0};
        use std::sync::atomic::AtomicBool;

        const ENTRY: u64 = 0x8000_0000;
        const FDT: u64 = 0x8800_0000;
        const SECONDARY_ENTRY: u64 = 0x8000_1000;
        const UART: u64 = 0x0900_0000;

        #[derive(Default)]
        struct Uart {
            written: Vec<(u64, Vec<u8>)>,
        }
        impl squib_devices::BusDevice for Uart {
            fn read(&mut self, _offset: u64, data: &mut [u8]) {
                data.fill(0x90);
            }
            fn write(&mut self, offset: u64, data: &[u8]) {
                self.written.push((offset, data.to_vec()));
            }
        }

        let (fake, vm) = new_seam_vm(2);
        let secondary_wrote = Arc::new(AtomicBool::new(false));
        let test_done = Arc::new(AtomicBool::new(false));
        let wait_for = |flag: Arc<AtomicBool>| {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while !flag.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let flag = secondary_wrote.clone();
        fake.script(
            mpidr_of(0),
            vec![
                // STR W1, [UART]: 32 bits.
                run(|s| {
                    assert_eq!((s.pc(), s.reg(HV_REG_X0)), (ENTRY, FDT));
                    s.set_x(&[FDT, u64::from(b'A')]);
                    data_abort(UART, 2, false, 1, false, true)
                }),
                // LDRSB X2, [UART + 0x18].
                run(|_| data_abort(UART + 0x18, 0, true, 2, true, false)),
                // HVC: PSCI CPU_ON(vCPU 1, SECONDARY_ENTRY, context 0x55).
                run(|s| {
                    assert_eq!(s.reg(HV_REG_X0 + 2), 0xffff_ffff_ffff_ff90);
                    s.set_x(&[
                        u64::from(psci::CPU_ON_64),
                        mpidr_of(1),
                        SECONDARY_ENTRY,
                        0x55,
                    ]);
                    s.regs.insert(HV_REG_PC, s.pc() + 4);
                    hvc()
                }),
                // Once the second vCPU has written: SYSTEM_OFF.
                run(move |s| {
                    assert_eq!(s.reg(HV_REG_X0), 0, "CPU_ON succeeded");
                    wait_for(flag);
                    s.set_x(&[u64::from(psci::SYSTEM_OFF)]);
                    hvc()
                }),
            ],
        );
        let (flag, done) = (secondary_wrote.clone(), test_done.clone());
        fake.script(
            mpidr_of(1),
            vec![
                // STRB W3, [UART].
                run(move |s| {
                    assert_eq!((s.pc(), s.reg(HV_REG_X0)), (SECONDARY_ENTRY, 0x55));
                    s.regs.insert(HV_REG_X0 + 3, u64::from(b'B'));
                    flag.store(true, Ordering::SeqCst);
                    data_abort(UART, 0, false, 3, false, true)
                }),
                // Idle until the test has seen the VM stop (the loop kicks it out of WFI).
                run(move |_| {
                    wait_for(done);
                    wfi()
                }),
            ],
        );

        let uart = Arc::new(Mutex::new(Uart::default()));
        let mut mmio_bus = Bus::new();
        mmio_bus.insert(UART, 0x1000, uart.clone()).unwrap();
        let (tx, rx) = mpsc::channel();
        let ctx = VcpuContext {
            mmio_bus: Arc::new(mmio_bus),
            io_bus: Arc::new(Bus::new()),
            control: VcpuControl::new_paused(),
            stop: Arc::new(StopNotifier::new(Box::new(move |r| {
                let _ = tx.send(r);
            }))),
            console: ConsoleWatch::new(),
        };
        let setup = VcpuSetup {
            entry: ENTRY,
            fdt_addr: FDT,
        };
        let handles: Vec<_> = (0..2u8)
            .map(|index| {
                let configure: VcpuConfigure = Box::new(move |vcpu| {
                    if index == 0 {
                        vcpu.configure_aarch64(&setup)
                    } else {
                        Ok(())
                    }
                });
                spawn(vm.clone(), index, 2, configure, ctx.clone()).unwrap()
            })
            .collect();
        ctx.control.resume();
        let reason = rx.recv_timeout(Duration::from_secs(10));
        test_done.store(true, Ordering::SeqCst);
        assert_eq!(reason.unwrap(), VmStopReason::GuestShutdown);
        for handle in handles {
            handle.join().unwrap();
        }
        assert_eq!(
            uart.lock().written,
            vec![(0, vec![b'A', 0, 0, 0]), (0, vec![b'B'])]
        );
    }

    #[test]
    fn test_vcpu_reset_after_panic_banner_reports_panic() {
        let (ctx, rx) = context(Bus::new());
        let watch = ctx.console.clone();
        let mut sink = squib_devices::serial::ConsoleSink::new(Box::new(std::io::sink()), watch);
        // The banner without its line end: the reset decides.
        std::io::Write::write_all(&mut sink, b"Kernel panic - not syncing: test").unwrap();
        let vm: Arc<dyn Vm> = Arc::new(FakeVm::new(
            vec![VecDeque::from(vec![FakeExit::Reset])],
            Arc::new(AtomicUsize::new(0)),
        ));
        let handle = spawn(vm, 0, 1, Box::new(|_| Ok(())), ctx.clone()).unwrap();
        ctx.control.resume();
        let reason = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(reason, VmStopReason::GuestPanic);
        assert_eq!(reason.exit_code(), 1);
        handle.join().unwrap();
    }

    #[test]
    fn test_vcpu_pause_parks_every_vcpu_and_resume_continues() {
        let (ctx, rx) = context(Bus::new());
        let kicks = Arc::new(AtomicUsize::new(0));
        let vm: Arc<dyn Vm> = Arc::new(FakeVm::new(
            vec![VecDeque::new(), VecDeque::new()],
            kicks.clone(),
        ));
        let handles: Vec<_> = (0..2)
            .map(|i| spawn(vm.clone(), i, 2, Box::new(|_| Ok(())), ctx.clone()).unwrap())
            .collect();
        ctx.control.resume();
        std::thread::sleep(Duration::from_millis(20));
        ctx.control.pause(2, Duration::from_secs(5)).unwrap();
        assert_eq!(ctx.control.state.lock().parked, 2);
        assert!(kicks.load(Ordering::SeqCst) >= 2);
        ctx.control.resume();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(ctx.control.state.lock().parked, 0);
        ctx.control.stop();
        for h in handles {
            h.join().unwrap();
        }
        assert!(
            rx.try_recv().is_err(),
            "an owner-requested stop is not a guest stop"
        );
    }

    #[test]
    fn test_vcpu_setup_failure_is_reported() {
        let (ctx, _rx) = context(Bus::new());
        let vm: Arc<dyn Vm> = Arc::new(FakeVm::new(vec![], Arc::new(AtomicUsize::new(0))));
        let err = spawn(
            vm,
            3,
            4,
            Box::new(|_| {
                Err(HypervisorError::Call {
                    operation: "set regs",
                    code: 22,
                })
            }),
            ctx,
        )
        .unwrap_err();
        assert!(matches!(err, VcpuError::Setup { index: 3, .. }));
    }

    #[test]
    fn test_vcpu_shutdown_reports_guest_shutdown() {
        let (ctx, rx) = context(Bus::new());
        let vm: Arc<dyn Vm> = Arc::new(FakeVm::new(
            vec![VecDeque::from(vec![FakeExit::Shutdown])],
            Arc::new(AtomicUsize::new(0)),
        ));
        let handle = spawn(vm, 0, 1, Box::new(|_| Ok(())), ctx.clone()).unwrap();
        ctx.control.resume();
        let reason = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(reason, VmStopReason::GuestShutdown);
        handle.join().unwrap();
    }

    #[test]
    fn test_stop_reason_exit_codes() {
        assert_eq!(VmStopReason::GuestReset.exit_code(), 0);
        assert_eq!(VmStopReason::GuestShutdown.exit_code(), 0);
        assert_eq!(VmStopReason::GuestPanic.exit_code(), 1);
        assert_eq!(VmStopReason::Failed("x".into()).exit_code(), 2);
        assert_eq!(VmStopReason::GuestTripleFault.exit_code(), 3);
    }

    /// Runs one vCPU whose console first saw `console_output`, then triple-faults; returns the
    /// stop reason and how often the vCPU's registers were read.
    fn triple_fault_after(console_output: &[u8]) -> (VmStopReason, usize) {
        let (ctx, rx) = context(Bus::new());
        let mut sink =
            squib_devices::serial::ConsoleSink::new(Box::new(std::io::sink()), ctx.console.clone());
        std::io::Write::write_all(&mut sink, console_output).unwrap();
        let vm = Arc::new(FakeVm::new(
            vec![VecDeque::from(vec![FakeExit::TripleFault])],
            Arc::new(AtomicUsize::new(0)),
        ));
        let handle = spawn(vm.clone(), 0, 1, Box::new(|_| Ok(())), ctx.clone()).unwrap();
        ctx.control.resume();
        let reason = rx.recv_timeout(Duration::from_secs(5)).unwrap();
        handle.join().unwrap();
        assert!(ctx.control.is_stopping());
        (reason, vm.register_reads.load(Ordering::SeqCst))
    }

    #[test]
    fn test_vcpu_triple_fault_reports_crash_not_reset() {
        let (reason, reads) = triple_fault_after(b"[    0.5] Run /init as init process\n");
        assert_eq!(reason, VmStopReason::GuestTripleFault);
        assert_ne!(reason.exit_code(), 0);
        assert_ne!(reason.exit_code(), VmStopReason::GuestPanic.exit_code());
        #[cfg(target_arch = "x86_64")]
        assert_eq!(reads, 1, "a crash is reported with the registers");
        #[cfg(not(target_arch = "x86_64"))]
        let _ = reads;
    }

    #[test]
    fn test_vcpu_triple_fault_after_restart_banner_is_a_reset() {
        // Linux with `reboot=t` announces the restart, then triple-faults on purpose.
        let (reason, reads) = triple_fault_after(b"[    2.0] reboot: Restarting system\r\n");
        assert_eq!(reason, VmStopReason::GuestReset);
        assert_eq!(reason.exit_code(), 0);
        assert_eq!(reads, 0, "a requested reboot is no crash to report");
    }

    #[test]
    fn test_vcpu_triple_fault_after_panic_banner_reports_panic() {
        let (reason, _) = triple_fault_after(b"Kernel panic - not syncing: VFS\n");
        assert_eq!(reason, VmStopReason::GuestPanic);
    }

    /// What [`report_triple_fault`] logs for a crash on a vCPU that kept (or lost) its
    /// registers.
    #[cfg(target_arch = "x86_64")]
    fn triple_fault_log(registers_kept: bool) -> String {
        #[derive(Clone, Default)]
        struct Captured(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Captured {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::TRACE)
            .finish();
        let vcpu = FakeVcpu {
            script: VecDeque::new(),
            buf: [0; 8],
            kicks: Arc::new(AtomicUsize::new(0)),
            register_reads: Arc::new(AtomicUsize::new(0)),
            registers_kept,
        };
        tracing::subscriber::with_default(subscriber, || {
            report_triple_fault(&vcpu, &VmStopReason::GuestTripleFault);
        });
        String::from_utf8(captured.0.lock().clone()).unwrap()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn test_triple_fault_report_logs_registers_at_error_level() {
        let log = triple_fault_log(true);
        assert!(log.contains("ERROR"), "{log}");
        assert!(log.contains("triple fault"), "{log}");
        for field in [
            "rip=0x1000004",
            "rsp=0x8ff0",
            "cr0=0x80000011",
            "cr3=0x9000",
            "cr4=0x20",
            "efer=0x500",
        ] {
            assert!(log.contains(field), "{field} missing from {log}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn test_triple_fault_report_says_when_registers_were_lost() {
        let log = triple_fault_log(false);
        assert!(log.contains("ERROR"), "{log}");
        assert!(log.contains("registers at the fault are unknown"), "{log}");
        assert!(!log.contains("rip="), "no made-up registers: {log}");
    }
}
