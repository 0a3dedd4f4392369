//! The life of one vCPU thread: KVM_RUN, dispatch the exit, repeat, until the
//! guest ends the partition, fails, or the partition is stopped.
//!
//! Stopping a vCPU that is running guest code: the controller sets the stop
//! flag and sends the kick signal to the thread; the handler sets
//! `immediate_exit` in that vCPU's kvm_run, so KVM_RUN returns EINTR at once
//! whether the signal lands inside KVM_RUN or just before it (the flag is
//! checked before every KVM_RUN, and set before the signal is sent).

use std::cell::Cell;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use aivmm_devices::bus::{MmioAction, MmioBus};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::{FaultKind, GuestFault, PartitionEnd, PartitionError, Shared, VcpuRegisters};
use crate::guest_image::KernelImage;
use crate::isolation::{ThreadIsolation, ThreadKind};

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub(super) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// `immediate_exit` of the kvm_run of the vCPU this thread runs (null when none).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(Cell::get);
    if !flag.is_null() {
        // SAFETY: the pointer is set by this thread's VcpuThread::run to a field
        // of its vCPU's kvm_run mapping and cleared before that vCPU is dropped;
        // a volatile byte store is async-signal-safe.
        unsafe { flag.write_volatile(1) };
    }
}

/// Installs the kick handler (once per process).
pub(super) fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    *INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick))
}

/// What a vCPU thread leaves behind.
pub(super) struct VcpuSummary {
    /// Where the vCPU was when it stopped.
    pub registers: Option<VcpuRegisters>,
}

pub(super) struct VcpuThread {
    pub index: u32,
    pub vcpu: VcpuFd,
    pub bus: Arc<MmioBus>,
    pub shared: Arc<Shared>,
    pub image: Arc<KernelImage<'static>>,
    pub model_window: Option<Range<u64>>,
    pub host_cpu: Option<usize>,
    pub isolation: ThreadIsolation,
}

/// An exit, handled as far as possible while its kvm_run borrow lasts.
enum Step {
    Continue,
    Interrupted,
    End(PartitionEnd),
    Fault(FaultKind),
    InternalError,
}

impl VcpuThread {
    pub fn run(mut self) -> VcpuSummary {
        let pin = self.host_cpu.map(|cpu| [cpu]);
        if let Err(source) = self
            .isolation
            .enter(ThreadKind::Vcpu, pin.as_ref().map(|cpu| &cpu[..]))
        {
            self.shared.finish(Err(PartitionError::VcpuIsolation {
                vcpu: self.index,
                source,
            }));
            return VcpuSummary { registers: None };
        }
        IMMEDIATE_EXIT.with(|flag| flag.set(&raw mut self.vcpu.get_kvm_run().immediate_exit));
        let end = self.run_until_end();
        IMMEDIATE_EXIT.with(|flag| flag.set(std::ptr::null_mut()));
        if let Some(end) = end {
            self.shared.finish(end);
        }
        VcpuSummary {
            registers: self.registers(),
        }
    }

    /// Runs the vCPU; Some(end) if this vCPU ended the partition, None if it
    /// was stopped from outside.
    fn run_until_end(&mut self) -> Option<PartitionEnd> {
        let index = self.index;
        loop {
            if self.shared.stop.load(Ordering::Acquire) {
                return None;
            }
            let step = match self.vcpu.run() {
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    self.shared.counters[index as usize]
                        .mmio_exits
                        .fetch_add(1, Ordering::Relaxed);
                    mmio_write(&self.bus, self.model_window.as_ref(), index, addr, data)
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    self.shared.counters[index as usize]
                        .mmio_exits
                        .fetch_add(1, Ordering::Relaxed);
                    mmio_read(&self.bus, index, addr, data)
                }
                Ok(VcpuExit::Shutdown) => Step::Fault(FaultKind::TripleFault),
                Ok(VcpuExit::InternalError) => Step::InternalError,
                Ok(VcpuExit::FailEntry(reason, cpu)) => {
                    Step::Fault(FaultKind::FailEntry { reason, cpu })
                }
                Ok(VcpuExit::IoOut(port, _)) => {
                    Step::Fault(FaultKind::PortIo { port, write: true })
                }
                Ok(VcpuExit::IoIn(port, _)) => {
                    Step::Fault(FaultKind::PortIo { port, write: false })
                }
                Ok(VcpuExit::Intr) => Step::Interrupted,
                Ok(other) => Step::Fault(FaultKind::UnexpectedExit(format!("{other:?}"))),
                Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                    Step::Interrupted
                }
                Err(source) => Step::End(Err(PartitionError::KvmRun {
                    vcpu: index,
                    source,
                })),
            };
            match step {
                Step::Continue => {}
                Step::Interrupted => self.vcpu.set_kvm_immediate_exit(0),
                Step::End(end) => return Some(end),
                Step::Fault(kind) => return Some(Err(self.fault(kind))),
                Step::InternalError => {
                    // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so the
                    // `internal` member of the union is the one KVM filled in.
                    let internal = unsafe { self.vcpu.get_kvm_run().__bindgen_anon_1.internal };
                    let data = internal.data[..(internal.ndata as usize).min(internal.data.len())]
                        .to_vec();
                    return Some(Err(self.fault(FaultKind::InternalError {
                        suberror: internal.suberror,
                        data,
                    })));
                }
            }
        }
    }

    fn registers(&self) -> Option<VcpuRegisters> {
        let regs = self.vcpu.get_regs().ok()?;
        let sregs = self.vcpu.get_sregs().ok()?;
        Some(VcpuRegisters {
            rip: regs.rip,
            rsp: regs.rsp,
            cr2: sregs.cr2,
            rflags: regs.rflags,
        })
    }

    fn fault(&self, kind: FaultKind) -> PartitionError {
        let registers = self.registers();
        let function = registers.and_then(|r| self.image.symbolize(r.rip));
        PartitionError::GuestFault(GuestFault {
            vcpu: self.index,
            kind,
            registers,
            function,
        })
    }
}

fn mmio_write(
    bus: &MmioBus,
    model_window: Option<&Range<u64>>,
    vcpu: u32,
    addr: u64,
    data: &[u8],
) -> Step {
    if model_window.is_some_and(|window| window.contains(&addr)) {
        return Step::Fault(FaultKind::ModelWindowWrite { addr });
    }
    let Some((device, offset)) = bus.find(addr) else {
        return Step::Fault(FaultKind::UnmappedMmio { addr, write: true });
    };
    match device.write(vcpu, offset, data) {
        Ok(MmioAction::Continue) => Step::Continue,
        Ok(MmioAction::Exit { status }) => Step::End(Ok(status)),
        Ok(MmioAction::Fatal { code, message }) => Step::End(Err(PartitionError::GuestFatal {
            vcpu,
            code,
            message,
        })),
        Err(source) => Step::End(Err(PartitionError::Device { vcpu, source })),
    }
}

fn mmio_read(bus: &MmioBus, vcpu: u32, addr: u64, data: &mut [u8]) -> Step {
    let Some((device, offset)) = bus.find(addr) else {
        return Step::Fault(FaultKind::UnmappedMmio { addr, write: false });
    };
    match device.read(vcpu, offset, data) {
        Ok(()) => Step::Continue,
        Err(source) => Step::End(Err(PartitionError::Device { vcpu, source })),
    }
}
