//! Linux guests: a real Linux kernel (vmlinux ELF or bzImage, optional
//! initrd) booted with the x86 boot protocol on KVM's in-kernel irqchip and
//! PIT, with ACPI tables (and an MP table for kernels without ACPI) for its
//! vCPUs, PCI bus and virtio-mmio disks, and a 16550 serial console.
//!
//! Unlike the inference partitions, a Linux kernel runs at CPL0, so on PVM
//! hosts (see shared/design/kvm-on-these-machines.md) KVM emulates each of
//! its instructions: it boots, but slowly.

pub mod acpi;
pub mod boot_cpu;
pub mod boot_params;
pub mod cli;
pub mod cmos;
pub mod disk;
pub mod e820;
pub mod loader;
pub mod mptable;
pub mod passthrough;
pub mod pci;
pub mod pio;
pub mod pvh;
pub mod serial;
pub mod serial_input;
pub mod vcpu;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use vm_memory::GuestMemoryMmap;

use crate::isolation::ThreadKind;
use crate::vstate::layout::{write_descriptor_tables, LayoutError};
use crate::vstate::memory::RamBacking;
use crate::vstate::vm::{Vm, VmError};
use acpi::AcpiError;
use aivmm_devices::virtio::block::BlockStats;
use aivmm_passthrough::bdf::Bdf;
use aivmm_passthrough::irq_routing::{GsiRoutingTable, RoutingError};
use aivmm_passthrough::preflight::{PreflightError, ProcessLimits};
use boot_cpu::{BootCpuError, Entry};
use boot_params::{BootParamsError, BootParamsInput, CMDLINE_ADDR, ZERO_PAGE_ADDR};
use disk::{DiskError, DiskSpec, Disks};
use e820::{E820Error, GuestRamError};
use loader::{LoadedKernel, LoaderError};
use mptable::MpTableError;
use passthrough::{Passthrough, PassthroughError};
use pci::{BarTraps, GuestPci, PciError};
use pio::PortBus;
use pvh::PvhError;
use serial::{Capture, IrqLine, SerialConsole, SerialError};
use serial_input::{SerialInput, SerialInputError, SerialInputThread};
use vcpu::Shared;
pub use vcpu::{ExitCounts, LinuxEnd, Sample, VcpuState};

/// The command line when none is given: the serial console from the first
/// line on, reboot (ending the VM) on panic, no PCI to probe.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1 pci=off";
/// The command line when none is given, for a guest with or without
/// passed-through devices: with devices, [`DEFAULT_CMDLINE`] without
/// `pci=off` (the guest must probe PCI to find them).
pub fn default_cmdline(with_devices: bool) -> String {
    if !with_devices {
        return DEFAULT_CMDLINE.to_string();
    }
    DEFAULT_CMDLINE
        .split_whitespace()
        .filter(|word| *word != "pci=off")
        .collect::<Vec<_>>()
        .join(" ")
}

/// Appended to the command line where KVM emulates CPL0 code (PVM hosts).
/// PVM adds the host's user-mode ISA to the guest's CPUID whatever the VMM
/// sets (XSAVE, AVX, POPCNT, RDRAND, FSGSBASE, SMAP, ... were there after
/// KVM_SET_CPUID2 without them), and KVM's instruction emulator cannot run
/// XSAVE/XRSTOR: without `noxsave`, Debian's 6.1 kernel stopped with an
/// emulation failure on `xrstor` in fpu__init_system_xstate. Only what was
/// seen to fail is here.
pub const EMULATED_CPL0_CMDLINE: &str = "noxsave";

/// `cmdline` with [`EMULATED_CPL0_CMDLINE`] appended (once).
pub fn with_emulation_workarounds(cmdline: &str) -> String {
    if cmdline.contains(EMULATED_CPL0_CMDLINE) {
        return cmdline.to_string();
    }
    format!("{} {EMULATED_CPL0_CMDLINE}", cmdline.trim_end())
}

/// Where the KVM TSS for real-mode emulation goes on VMX (above RAM, in the hole).
const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Which entry point to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// PVH when the kernel has the note, else the 64-bit boot protocol.
    #[default]
    Auto,
    /// The 64-bit boot protocol (long mode, zero page in RSI).
    Linux64,
    /// PVH (32-bit protected mode, start info in RBX); needs the ELF note.
    Pvh,
}

#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] E820Error),
    #[error(transparent)]
    Ram(#[from] GuestRamError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error(transparent)]
    Pvh(#[from] PvhError),
    #[error(transparent)]
    MpTable(#[from] MpTableError),
    #[error(transparent)]
    BootCpu(#[from] BootCpuError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    Pci(#[from] PciError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("cannot route the legacy interrupts: {0}")]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Passthrough(#[from] PassthroughError),
    #[error("cannot check the limits for passed-through devices: {0}")]
    Limits(#[source] PreflightError),
    #[error("--device needs PCI in the guest, but the command line has pci=off: remove it from --cmdline")]
    PciOff,
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error(transparent)]
    SerialInput(#[from] SerialInputError),
    #[error("the command line contains a NUL byte")]
    CmdlineNul,
    #[error("--boot-protocol pvh: the kernel has no PVH entry note (a bzImage never has one; give the vmlinux)")]
    NoPvhEntry,
    #[error("a Linux guest has 1 to {max} vCPUs, not {vcpus}")]
    VcpuCount { vcpus: u32, max: u32 },
    #[error("cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("cannot create vCPU {index}: {source}")]
    CreateVcpu {
        index: u32,
        source: kvm_ioctls::Error,
    },
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error(transparent)]
    Seccomp(#[from] crate::isolation::SeccompError),
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Thread { index: u32, source: std::io::Error },
}

/// One Linux guest to boot.
pub struct LinuxConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_bytes: u64,
    /// One host CPU per vCPU to pin its thread to.
    pub host_cpus: Option<Vec<usize>>,
    pub protocol: BootProtocol,
    /// Where the serial output goes as it comes (stdout, a log file).
    pub console: Option<Box<dyn Write + Send>>,
    /// Bytes of serial output kept for [`LinuxVm::console`].
    pub console_capture_limit: usize,
    /// Host PCI devices to pass through (VFIO).
    pub devices: Vec<Bdf>,
    /// virtio-blk disks, announced on the command line.
    pub disks: Vec<DiskSpec>,
    /// What the serial console receives (stdin, say); none: no input.
    pub input: Option<SerialInput>,
    /// Guest RAM on 2 MiB hugepages or anonymous memory (prefaulted either way).
    pub backing: RamBacking,
    /// NUMA node guest RAM is bound to (MPOL_BIND).
    pub numa_node: Option<u32>,
    /// Seccomp filters on the vCPU, disk and serial-input threads.
    pub seccomp: bool,
}

/// What was put where before the first KVM_RUN.
#[derive(Debug, Clone, Copy)]
pub struct BootLayout {
    pub kernel: LoadedKernel,
    pub entry: Entry,
    pub initrd: Option<(u64, u64)>,
    pub memory_bytes: u64,
}

/// Loads the kernel and initrd and writes every boot structure into
/// `memory`; no KVM involved, so this is what unit tests inspect.
pub fn prepare_memory(
    memory: &GuestMemoryMmap,
    config: &LinuxConfig,
) -> Result<BootLayout, LinuxError> {
    if config.cmdline.contains('\0') {
        return Err(LinuxError::CmdlineNul);
    }
    let ram_end = e820::low_ram_end(config.memory_bytes);
    let map = e820::memory_map(config.memory_bytes)?;
    let rsdp = acpi::write(memory, config.vcpus, config.disks.len())?;
    let kernel = loader::load_kernel(memory, &config.kernel, ram_end)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|path| loader::load_initrd(memory, path, &kernel, ram_end))
        .transpose()?;
    let page = boot_params::build(&BootParamsInput {
        header: kernel.setup_header,
        cmdline_len: config.cmdline.len(),
        initrd,
        e820: &map,
        acpi_rsdp: rsdp,
    })?;
    boot_params::write(memory, &page, &config.cmdline)?;
    let entry = match (config.protocol, kernel.pvh_entry) {
        (BootProtocol::Auto | BootProtocol::Pvh, Some(rip)) => {
            pvh::write(memory, CMDLINE_ADDR, rsdp, initrd, &map)?;
            Entry::Pvh {
                rip,
                start_info: pvh::START_INFO_ADDR,
            }
        }
        (BootProtocol::Pvh, None) => return Err(LinuxError::NoPvhEntry),
        (BootProtocol::Auto | BootProtocol::Linux64, _) => Entry::Linux64 {
            rip: kernel.entry_64,
            zero_page: ZERO_PAGE_ADDR,
        },
    };
    mptable::write(memory, config.vcpus)?;
    write_descriptor_tables(memory)?;
    boot_cpu::write_page_tables(memory)?;
    Ok(BootLayout {
        kernel,
        entry,
        initrd,
        memory_bytes: config.memory_bytes,
    })
}

/// A running Linux guest.
pub struct LinuxVm {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Option<VcpuState>>>,
    pub layout: BootLayout,
    /// The command line the kernel got.
    pub cmdline: String,
    /// Set-up time before the first KVM_RUN.
    pub setup: Duration,
    /// What the host said about each passed-through device, and where its
    /// BARs are.
    pub devices: Vec<String>,
    disks: Disks,
    input: Option<SerialInputThread>,
    // Kept alive while the vCPUs run: the VM (memslots) and guest RAM.
    _vm: Arc<Vm>,
    memory: GuestMemoryMmap,
}

/// How a run went.
#[derive(Debug, Clone)]
pub struct LinuxOutcome {
    pub end: LinuxEnd,
    /// From the first KVM_RUN to the end.
    pub elapsed: Duration,
    /// Per vCPU: exit counts and where it was at the end.
    pub exits: Vec<ExitCounts>,
    pub states: Vec<Option<VcpuState>>,
    /// RIP samples of each vCPU, in time order.
    pub samples: Vec<Vec<Sample>>,
    /// The serial output kept (the first bytes), and how many bytes there were.
    pub console: Vec<u8>,
    pub console_total: u64,
    /// Port accesses no device answered.
    pub unhandled_ports: u64,
    /// Requests each disk served.
    pub disks: Vec<BlockStats>,
}

impl LinuxVm {
    /// Builds the VM and starts its vCPUs.
    pub fn start(mut config: LinuxConfig) -> Result<Self, LinuxError> {
        let started = Instant::now();
        let emulated_cpl0 = boot_cpu::host_emulates_cpl0();
        if emulated_cpl0 {
            config.cmdline = with_emulation_workarounds(&config.cmdline);
        }
        if config.vcpus == 0 || config.vcpus > mptable::MAX_VCPUS {
            return Err(LinuxError::VcpuCount {
                vcpus: config.vcpus,
                max: mptable::MAX_VCPUS,
            });
        }
        let mut devices = Vec::new();
        if !config.devices.is_empty() {
            if config
                .cmdline
                .split_whitespace()
                .any(|word| word == "pci=off")
            {
                return Err(LinuxError::PciOff);
            }
            let node = config
                .host_cpus
                .as_deref()
                .and_then(|cpus| passthrough::node_of_cpus(std::path::Path::new("/"), cpus));
            let limits = ProcessLimits::current().map_err(LinuxError::Limits)?;
            let reports = passthrough::preflight(
                std::path::Path::new("/"),
                &config.devices,
                config.memory_bytes,
                node,
                limits,
            )?;
            for report in reports {
                devices.push(format!(
                    "{}: IOMMU group {} ({}), NUMA node {}",
                    report.bdf,
                    report.iommu_group,
                    report.group_devices.join(" "),
                    report.device_node.map_or("-".into(), |n| n.to_string())
                ));
                devices.extend(report.advice.iter().map(|a| format!("{}: {a}", report.bdf)));
            }
        }
        let blocks = disk::open(&config.disks)?;
        config.cmdline = disk::with_disk_args(&config.cmdline, blocks.len());
        let memory = e820::create_guest_ram(config.memory_bytes, config.backing, config.numa_node)?;
        let layout = prepare_memory(&memory, &config)?;

        let mut vm = Vm::new()?;
        vm.register_ram(&memory)?;
        let kvm = |what| move |source| LinuxError::Kvm { what, source };
        // Only VMX needs it (real-mode emulation); harmless elsewhere.
        let _ = vm.fd().set_tss_address(KVM_TSS_ADDR);
        vm.fd().create_irq_chip().map_err(kvm(
            "create the in-kernel irqchip (PIC, IOAPIC, local APICs)",
        ))?;
        // The PC's legacy routes (the PIT on IOAPIC pin 2), which ACPI and
        // the MP table describe.
        let gsis = vm.fd().check_extension_int(kvm_ioctls::Cap::IrqRouting);
        let routing = GsiRoutingTable::with_irqchip(u32::try_from(gsis).unwrap_or(0));
        routing.install(vm.fd())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.fd()
            .create_pit2(pit)
            .map_err(kvm("create the in-kernel PIT"))?;

        let irq = IrqLine::new()?;
        vm.fd()
            .register_irqfd(irq.eventfd(), serial::COM1_IRQ)
            .map_err(kvm("route the serial port's eventfd to IRQ 4"))?;
        let capture = Arc::new(Mutex::new(Capture {
            limit: config.console_capture_limit,
            ..Default::default()
        }));
        let serial = SerialConsole::new(irq, config.console, capture.clone());
        let vm = Arc::new(vm);
        let mut bus = aivmm_devices::pci::PciBus::new();
        let traps = Arc::new(BarTraps::default());
        let passthrough = if config.devices.is_empty() {
            None
        } else {
            let attached = Passthrough::attach(
                vm.clone(),
                &memory,
                &mut bus,
                traps.clone(),
                routing,
                &config.devices,
            )?;
            devices.extend(attached.describe());
            Some(attached)
        };
        let pci = GuestPci {
            bus: Arc::new(bus),
            traps,
        };
        let mut shared = Shared::new(
            PortBus::new(serial).with_pci(pci.conf1()),
            capture,
            config.vcpus,
        );
        if let Some(passthrough) = passthrough {
            shared = shared.with_passthrough(passthrough);
        }
        let shared = Arc::new(shared);
        let mut mmio = pci.mmio_bus()?;
        let seccomp = config.seccomp;
        if seccomp {
            // The filters compile before any thread needs one.
            crate::isolation::seccomp::prepare()?;
        }
        let disks = Disks::attach(&vm, &memory, blocks, &mut mmio, shared.clone(), seccomp)?;
        // A fresh Shared: nothing has set its bus yet.
        let _ = shared.mmio.set(mmio);
        let input = config
            .input
            .take()
            .map(|input| SerialInputThread::start(input, shared.clone(), seccomp))
            .transpose()?;

        let supported = vm.supported_cpuid()?;
        let mut vcpus = Vec::new();
        for index in 0..config.vcpus {
            let vcpu = vm
                .fd()
                .create_vcpu(index as u64)
                .map_err(|source| LinuxError::CreateVcpu { index, source })?;
            let cpuid = boot_cpu::guest_cpuid(&supported, index, config.vcpus, emulated_cpl0);
            let entry = (index == 0).then_some(layout.entry);
            boot_cpu::configure(&vcpu, index, &cpuid, entry)?;
            vcpus.push(vcpu);
        }
        vcpu::install_kick_handler().map_err(LinuxError::Signal)?;
        let setup = started.elapsed();

        let mut threads = Vec::new();
        for (index, vcpu) in vcpus.into_iter().enumerate() {
            let index = index as u32;
            let shared_for_thread = shared.clone();
            let host_cpu = config
                .host_cpus
                .as_ref()
                .and_then(|cpus| cpus.get(index as usize).copied());
            let spawned = std::thread::Builder::new()
                .name(format!("linux-vcpu{index}"))
                .spawn(move || {
                    if let Some(cpu) = host_cpu {
                        if let Err(source) = crate::isolation::pin_current_thread(&[cpu]) {
                            shared_for_thread.finish(LinuxEnd::Pin {
                                vcpu: index,
                                cpu,
                                error: source.to_string(),
                            });
                            return None;
                        }
                    }
                    if seccomp {
                        if let Err(end) = LinuxEnd::enter_seccomp(ThreadKind::LinuxVcpu) {
                            shared_for_thread.finish(end);
                            return None;
                        }
                    }
                    vcpu::run_vcpu(vcpu, index, &shared_for_thread)
                });
            match spawned {
                Ok(handle) => threads.push(handle),
                Err(source) => {
                    shared.stop_all();
                    for handle in threads {
                        let _ = handle.join();
                    }
                    return Err(LinuxError::Thread { index, source });
                }
            }
        }
        Ok(LinuxVm {
            shared,
            threads,
            layout,
            cmdline: config.cmdline,
            setup,
            devices,
            disks,
            input,
            _vm: vm,
            memory,
        })
    }

    /// Each guest RAM range: (guest address, host address, size).
    pub fn ram_mappings(&self) -> Vec<(u64, u64, u64)> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.memory
            .iter()
            .map(|region| (region.start_addr().0, region.as_ptr() as u64, region.len()))
            .collect()
    }

    /// The serial output kept so far.
    pub fn console(&self) -> Vec<u8> {
        self.shared
            .console
            .lock()
            .map(|c| c.bytes.clone())
            .unwrap_or_default()
    }

    /// Exits of vCPU `index` so far.
    pub fn exits(&self, index: usize) -> ExitCounts {
        self.shared
            .vcpus
            .get(index)
            .map(|v| v.counters.snapshot())
            .unwrap_or_default()
    }

    /// How the guest ended, if it has.
    pub fn end(&self) -> Option<LinuxEnd> {
        self.shared.end()
    }

    /// Time since the vCPUs were created.
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Runs until `done(console so far)` holds, the guest ends, or `timeout`
    /// passes; every `sample_every` (if set) each vCPU records its RIP.
    /// Returns whether `done` held.
    pub fn wait_until(
        &self,
        timeout: Duration,
        sample_every: Option<Duration>,
        done: &mut dyn FnMut(&[u8]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let poll = Duration::from_millis(20);
        let mut next_sample = sample_every.map(|every| Instant::now() + every);
        loop {
            if done(&self.console()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            if let (Some(at), Some(every)) = (next_sample, sample_every) {
                if now >= at {
                    for index in 0..self.shared.vcpus.len() {
                        self.shared.request_sample(index);
                    }
                    next_sample = Some(at + every);
                }
            }
            if self.shared.wait_end(poll.min(deadline - now)).is_some() {
                return done(&self.console());
            }
        }
    }

    /// Stops the guest (if still running) and reports the run.
    pub fn stop(mut self) -> LinuxOutcome {
        self.shared.finish(LinuxEnd::Stopped);
        let states: Vec<Option<VcpuState>> = std::mem::take(&mut self.threads)
            .into_iter()
            .map(|handle| handle.join().ok().flatten())
            .collect();
        self.disks.stop();
        if let Some(input) = self.input.as_mut() {
            input.stop();
        }
        let elapsed = self.shared.started.elapsed();
        let end = self.shared.end().unwrap_or(LinuxEnd::Stopped);
        let (console, console_total) = self
            .shared
            .console
            .lock()
            .map(|c| (c.bytes.clone(), c.total))
            .unwrap_or_default();
        LinuxOutcome {
            end,
            elapsed,
            exits: self
                .shared
                .vcpus
                .iter()
                .map(|v| v.counters.snapshot())
                .collect(),
            states,
            samples: self
                .shared
                .vcpus
                .iter()
                .map(|v| v.samples.lock().map(|s| s.clone()).unwrap_or_default())
                .collect(),
            console,
            console_total,
            unhandled_ports: self
                .shared
                .pio
                .unhandled
                .load(std::sync::atomic::Ordering::Relaxed),
            disks: self.disks.stats(),
        }
    }

    /// Runs until the guest ends or `timeout` passes, then stops it.
    pub fn run(self, timeout: Duration) -> LinuxOutcome {
        self.shared.wait_end(timeout);
        self.stop()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulation_workarounds_are_appended_once() {
        let line = with_emulation_workarounds("console=ttyS0 ");
        assert_eq!(line, format!("console=ttyS0 {EMULATED_CPL0_CMDLINE}"));
        assert_eq!(with_emulation_workarounds(&line), line);
    }
}
