//! A Linux guest's vCPU threads: KVM_RUN and the exits a CPL0 kernel makes
//! (port I/O to the legacy devices, MMIO to PCI config space, BARs and the
//! virtio disks,
//! reset, shutdown), until
//! the guest ends or the VM is stopped.
//!
//! Stopping or sampling a vCPU from another thread: set `immediate_exit` in
//! its kvm_run (under the slot's lock, which the vCPU thread also takes
//! before its kvm_run goes away), then send it [`kick_signal`], whose no-op
//! handler makes a KVM_RUN in progress return EINTR.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use aivmm_devices::bus::{MmioAction, MmioBus};
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};

use super::passthrough::Passthrough;
use super::pio::{PioAction, PortBus};
use super::serial::Capture;

/// The signal that interrupts a Linux guest's KVM_RUN (the inference
/// partitions use SIGRTMIN; this one has its own, no-op handler).
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN() + 1
}

extern "C" fn ignore_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    *INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), ignore_kick))
}

/// How the guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinuxEnd {
    /// Still running when the VMM stopped it (a timeout, or the caller had
    /// seen what it waited for).
    Stopped,
    /// The guest pulsed the i8042 reset line or asked KVM for a reset.
    Reset,
    /// The guest powered off (KVM system event).
    PowerOff,
    /// A triple fault (KVM_EXIT_SHUTDOWN).
    TripleFault {
        vcpu: u32,
    },
    /// HLT reached userspace (only without an in-kernel local APIC).
    Halted {
        vcpu: u32,
    },
    /// KVM could not run the guest's instruction (emulation failure).
    InternalError {
        vcpu: u32,
        suberror: u32,
        data: Vec<u64>,
    },
    FailEntry {
        vcpu: u32,
        reason: u64,
    },
    UnexpectedExit {
        vcpu: u32,
        exit: String,
    },
    KvmRun {
        vcpu: u32,
        error: String,
    },
    Serial {
        vcpu: u32,
        error: String,
    },
    /// The guest misused an emulated device (a guest bug).
    Device {
        vcpu: u32,
        addr: u64,
        error: String,
    },
    /// Acting on the guest's programming of a passed-through device failed.
    Passthrough {
        vcpu: u32,
        error: String,
    },
    /// A disk could not serve its queue (the driver broke the virtqueue).
    Disk {
        error: String,
    },
    /// The vCPU thread could not be pinned to its host CPU.
    Pin {
        vcpu: u32,
        cpu: usize,
        error: String,
    },
    /// A thread of the VM could not install its seccomp filter.
    Seccomp {
        thread: String,
        error: String,
    },
}

impl LinuxEnd {
    /// Installs `kind`'s seccomp filter on the calling thread of the VM, or
    /// says how the VM ends because it could not.
    pub fn enter_seccomp(kind: crate::isolation::ThreadKind) -> Result<(), LinuxEnd> {
        crate::isolation::seccomp::apply(kind).map_err(|error| LinuxEnd::Seccomp {
            thread: kind.name().into(),
            error: error.to_string(),
        })
    }
}

impl std::fmt::Display for LinuxEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinuxEnd::Stopped => write!(f, "stopped by the VMM while running"),
            LinuxEnd::Reset => write!(f, "the guest reset itself (reboot)"),
            LinuxEnd::PowerOff => write!(f, "the guest powered off"),
            LinuxEnd::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu}: triple fault (KVM_EXIT_SHUTDOWN)")
            }
            LinuxEnd::Halted { vcpu } => write!(f, "vCPU {vcpu}: halted"),
            LinuxEnd::InternalError {
                vcpu,
                suberror,
                data,
            } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM internal error, suberror {suberror} (1 = instruction emulation failed), data {data:x?}"
                )?;
                if let Some(bytes) = emulation_failure_bytes(*suberror, data) {
                    write!(f, "; the instruction's bytes: {bytes:02x?}")?;
                }
                Ok(())
            }
            LinuxEnd::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM could not enter the guest (hardware reason {reason:#x})"
                )
            }
            LinuxEnd::UnexpectedExit { vcpu, exit } => {
                write!(f, "vCPU {vcpu}: unexpected exit {exit}")
            }
            LinuxEnd::KvmRun { vcpu, error } => write!(f, "vCPU {vcpu}: KVM_RUN failed: {error}"),
            LinuxEnd::Serial { vcpu, error } => write!(f, "vCPU {vcpu}: serial console: {error}"),
            LinuxEnd::Passthrough { vcpu, error } => {
                write!(f, "vCPU {vcpu}: passed-through device: {error}")
            }
            LinuxEnd::Device { vcpu, addr, error } => {
                write!(f, "vCPU {vcpu}: MMIO access at {addr:#x}: {error}")
            }
            LinuxEnd::Disk { error } => write!(f, "virtio-blk: {error}"),
            LinuxEnd::Pin { vcpu, cpu, error } => {
                write!(
                    f,
                    "vCPU {vcpu}: cannot pin its thread to host CPU {cpu}: {error}"
                )
            }
            LinuxEnd::Seccomp { thread, error } => {
                write!(f, "{thread} thread: {error}")
            }
        }
    }
}

/// The bytes of the instruction KVM failed to emulate, when it says them:
/// suberror KVM_INTERNAL_ERROR_EMULATION with flag
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES in data[0], then the
/// length byte and up to 15 bytes packed little-endian in data[1..3].
pub fn emulation_failure_bytes(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    if suberror != kvm_bindings::KVM_INTERNAL_ERROR_EMULATION || data.first()? & 1 == 0 {
        return None;
    }
    let packed: Vec<u8> = data
        .get(1..3)?
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let len = (packed[0] as usize).min(15);
    Some(packed[1..1 + len].to_vec())
}

/// Exits of one vCPU, by kind.
#[derive(Debug, Default)]
pub struct ExitCounters {
    pub io_in: AtomicU64,
    pub io_out: AtomicU64,
    pub mmio: AtomicU64,
    /// Returns from KVM_RUN for a kick (stop or RIP sample).
    pub interrupted: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExitCounts {
    pub io_in: u64,
    pub io_out: u64,
    pub mmio: u64,
    pub interrupted: u64,
}

impl ExitCounters {
    pub fn snapshot(&self) -> ExitCounts {
        ExitCounts {
            io_in: self.io_in.load(Ordering::Relaxed),
            io_out: self.io_out.load(Ordering::Relaxed),
            mmio: self.mmio.load(Ordering::Relaxed),
            interrupted: self.interrupted.load(Ordering::Relaxed),
        }
    }
}

/// Where a vCPU was.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuState {
    pub rip: u64,
    pub rsp: u64,
    pub rflags: u64,
    pub cs: u16,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

impl VcpuState {
    pub fn read(vcpu: &VcpuFd) -> Option<Self> {
        let regs = vcpu.get_regs().ok()?;
        let sregs = vcpu.get_sregs().ok()?;
        Some(VcpuState {
            rip: regs.rip,
            rsp: regs.rsp,
            rflags: regs.rflags,
            cs: sregs.cs.selector,
            cr0: sregs.cr0,
            cr2: sregs.cr2,
            cr3: sregs.cr3,
            cr4: sregs.cr4,
            efer: sregs.efer,
        })
    }
}

/// A RIP sample: when, and where the vCPU was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub at: Duration,
    pub state: VcpuState,
}

/// How another thread reaches a running vCPU.
#[derive(Default)]
struct KickSlot {
    /// `immediate_exit` in the vCPU's kvm_run, and the thread running it.
    target: Option<(usize, libc::pthread_t)>,
}

/// Per-vCPU state shared with the controller.
#[derive(Default)]
pub struct VcpuShared {
    pub counters: ExitCounters,
    kick: Mutex<KickSlot>,
    sample_requested: AtomicBool,
    pub samples: Mutex<Vec<Sample>>,
}

/// What the vCPU threads of one VM share.
pub struct Shared {
    pub started: Instant,
    pub pio: PortBus,
    /// PCI config space (ECAM), the trapped parts of BARs and the virtio
    /// disks (set once, before the vCPUs run).
    pub mmio: OnceLock<MmioBus>,
    /// Host devices passed through, if any.
    pub passthrough: Option<Passthrough>,
    pub console: Arc<Mutex<Capture>>,
    pub vcpus: Vec<VcpuShared>,
    stop: AtomicBool,
    end: Mutex<Option<LinuxEnd>>,
    ended: Condvar,
}

/// Samples kept per vCPU (the first ones and then every later one would be
/// unbounded over a long run).
const MAX_SAMPLES: usize = 4096;

impl Shared {
    pub fn new(pio: PortBus, console: Arc<Mutex<Capture>>, vcpus: u32) -> Self {
        Shared {
            started: Instant::now(),
            pio,
            mmio: OnceLock::new(),
            passthrough: None,
            console,
            vcpus: (0..vcpus).map(|_| VcpuShared::default()).collect(),
            stop: AtomicBool::new(false),
            end: Mutex::new(None),
            ended: Condvar::new(),
        }
    }

    pub fn with_passthrough(mut self, passthrough: Passthrough) -> Self {
        self.passthrough = Some(passthrough);
        self
    }

    /// After a guest write: what it changed in passed-through devices
    /// (BAR moves, interrupt routes) takes effect before the vCPU resumes.
    fn after_write(&self, vcpu: u32) -> Option<LinuxEnd> {
        let error = self.passthrough.as_ref()?.after_write().err()?;
        Some(LinuxEnd::Passthrough {
            vcpu,
            error: error.to_string(),
        })
    }

    /// Records how the guest ended (the first reason wins) and stops every vCPU.
    pub fn finish(&self, end: LinuxEnd) {
        if let Ok(mut slot) = self.end.lock() {
            slot.get_or_insert(end);
        }
        self.ended.notify_all();
        self.stop_all();
    }

    pub fn end(&self) -> Option<LinuxEnd> {
        self.end.lock().ok().and_then(|end| end.clone())
    }

    /// Waits until the guest ends or `timeout` passes; the end, if any.
    pub fn wait_end(&self, timeout: Duration) -> Option<LinuxEnd> {
        let Ok(guard) = self.end.lock() else {
            return None;
        };
        let (guard, _) = self
            .ended
            .wait_timeout_while(guard, timeout, |end| end.is_none())
            .ok()?;
        guard.clone()
    }

    pub fn stop_all(&self) {
        self.stop.store(true, Ordering::Release);
        for index in 0..self.vcpus.len() {
            self.kick(index);
        }
    }

    /// Asks vCPU `index` to record where it is, once.
    pub fn request_sample(&self, index: usize) {
        if let Some(vcpu) = self.vcpus.get(index) {
            vcpu.sample_requested.store(true, Ordering::Release);
            self.kick(index);
        }
    }

    fn kick(&self, index: usize) {
        let Some(vcpu) = self.vcpus.get(index) else {
            return;
        };
        let Ok(slot) = vcpu.kick.lock() else {
            return;
        };
        if let Some((flag, thread)) = slot.target {
            // SAFETY: `flag` points into the vCPU's kvm_run mapping, which
            // stays mapped while the slot holds it: the vCPU thread clears the
            // slot (under this lock) before it drops its VcpuFd. A byte store
            // is what KVM expects of immediate_exit. pthread_kill targets a
            // thread that is alive for the same reason, and the signal's
            // handler (installed before any vCPU thread starts) does nothing.
            unsafe {
                (flag as *mut u8).write_volatile(1);
                libc::pthread_kill(thread, kick_signal());
            }
        }
    }
}

/// Runs vCPU `index` until the guest ends or the VM is stopped; returns
/// where it was at the end.
pub fn run_vcpu(mut vcpu: VcpuFd, index: u32, shared: &Shared) -> Option<VcpuState> {
    let me = &shared.vcpus[index as usize];
    if let Ok(mut slot) = me.kick.lock() {
        let flag = &raw mut vcpu.get_kvm_run().immediate_exit;
        // SAFETY: pthread_self has no preconditions.
        slot.target = Some((flag as usize, unsafe { libc::pthread_self() }));
    }
    let end = run_loop(&mut vcpu, index, shared, me);
    let state = VcpuState::read(&vcpu);
    if let Ok(mut slot) = me.kick.lock() {
        slot.target = None;
    }
    if let Some(end) = end {
        shared.finish(end);
    }
    state
}

fn run_loop(vcpu: &mut VcpuFd, index: u32, shared: &Shared, me: &VcpuShared) -> Option<LinuxEnd> {
    let counters = &me.counters;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return None;
        }
        let end = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                counters.io_in.fetch_add(1, Ordering::Relaxed);
                shared.pio.read(port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                counters.io_out.fetch_add(1, Ordering::Relaxed);
                match shared.pio.write(port, data) {
                    Ok(PioAction::Continue) => shared.after_write(index),
                    Ok(PioAction::Reset) => Some(LinuxEnd::Reset),
                    Err(error) => Some(LinuxEnd::Serial {
                        vcpu: index,
                        error: error.to_string(),
                    }),
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                counters.mmio.fetch_add(1, Ordering::Relaxed);
                match shared.mmio.get().and_then(|bus| bus.find(addr)) {
                    Some((device, offset)) => device.read(index, offset, data).err(),
                    None => {
                        // Nothing there: reads float high, as on an empty bus.
                        data.fill(0xff);
                        None
                    }
                }
                .map(|error| LinuxEnd::Device {
                    vcpu: index,
                    addr,
                    error: error.to_string(),
                })
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                counters.mmio.fetch_add(1, Ordering::Relaxed);
                match shared.mmio.get().and_then(|bus| bus.find(addr)) {
                    Some((device, offset)) => match device.write(index, offset, data) {
                        Ok(MmioAction::Continue) => None,
                        Ok(other) => Some(format!("{}: unexpected {other:?}", device.name())),
                        Err(error) => Some(error.to_string()),
                    },
                    None => None,
                }
                .map(|error| LinuxEnd::Device {
                    vcpu: index,
                    addr,
                    error,
                })
                .or_else(|| shared.after_write(index))
            }
            Ok(VcpuExit::Hlt) => Some(LinuxEnd::Halted { vcpu: index }),
            Ok(VcpuExit::Shutdown) => Some(LinuxEnd::TripleFault { vcpu: index }),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_RESET => LinuxEnd::Reset,
                KVM_SYSTEM_EVENT_SHUTDOWN => LinuxEnd::PowerOff,
                other => LinuxEnd::UnexpectedExit {
                    vcpu: index,
                    exit: format!("system event {other}"),
                },
            }),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the union is the one KVM filled in.
                let internal = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal };
                let data =
                    internal.data[..(internal.ndata as usize).min(internal.data.len())].to_vec();
                Some(LinuxEnd::InternalError {
                    vcpu: index,
                    suberror: internal.suberror,
                    data,
                })
            }
            Ok(VcpuExit::FailEntry(reason, _)) => Some(LinuxEnd::FailEntry {
                vcpu: index,
                reason,
            }),
            Ok(VcpuExit::Intr) => {
                interrupted(vcpu, shared, me);
                None
            }
            Ok(other) => Some(LinuxEnd::UnexpectedExit {
                vcpu: index,
                exit: format!("{other:?}"),
            }),
            Err(error) if error.errno() == libc::EINTR || error.errno() == libc::EAGAIN => {
                interrupted(vcpu, shared, me);
                None
            }
            Err(error) => Some(LinuxEnd::KvmRun {
                vcpu: index,
                error: error.to_string(),
            }),
        };
        if end.is_some() {
            return end;
        }
    }
}

/// KVM_RUN returned for a kick: take a sample if one was asked for.
fn interrupted(vcpu: &mut VcpuFd, shared: &Shared, me: &VcpuShared) {
    me.counters.interrupted.fetch_add(1, Ordering::Relaxed);
    if let Ok(_slot) = me.kick.lock() {
        // Under the lock, so that a kick in flight is not lost between the
        // flag being cleared and the stop flag being read.
        vcpu.set_kvm_immediate_exit(0);
    }
    if me.sample_requested.swap(false, Ordering::AcqRel) {
        if let Some(state) = VcpuState::read(vcpu) {
            if let Ok(mut samples) = me.samples.lock() {
                if samples.len() < MAX_SAMPLES {
                    samples.push(Sample {
                        at: shared.started.elapsed(),
                        state,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_failures_name_the_instruction() {
        // What PVM reported for Debian 6.1's `lock cmpxchg16b 0x20(%rbp)`.
        let data = [1, 0x7420_4dc7_0f48_f00f, 0x894d_0824_448b_4c66, 0x1000];
        let bytes = emulation_failure_bytes(1, &data).unwrap();
        assert_eq!(&bytes[..6], &[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20]);
        assert_eq!(bytes.len(), 15);
        let end = LinuxEnd::InternalError {
            vcpu: 0,
            suberror: 1,
            data: data.to_vec(),
        };
        assert!(
            end.to_string().contains("[f0, 48, 0f, c7, 4d, 20,"),
            "{end}"
        );
        assert_eq!(
            emulation_failure_bytes(1, &[0, 1, 2]),
            None,
            "no bytes flag"
        );
        assert_eq!(emulation_failure_bytes(3, &data), None);
    }
}
