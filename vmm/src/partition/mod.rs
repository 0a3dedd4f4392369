//! A partition: one KVM VM running the inference kernel on its own vCPU
//! threads. [`start`] builds the whole machine state and starts the vCPUs;
//! [`RunningPartition::wait`] returns when the guest exits, fails or (with a
//! timeout) takes too long, always after every vCPU thread has been stopped
//! and joined.

mod inference;
mod vcpu_thread;

pub use inference::{InferenceLink, InferenceLinkError, InferenceSetup};

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use aivmm_devices::bus::{BusError, DeviceError, MmioBus};
use aivmm_devices::platform::{GuestReport, PlatformDevice, VcpuWakers};
use aivmm_devices::virtio::console::{Console, ConsoleOutput};
use aivmm_devices::virtio::mmio::VirtioMmioTransport;
use aivmm_guest_abi::layout::*;
use aivmm_guest_abi::{fatal, BootInfo, ABI_VERSION, BOOT_INFO_MAGIC, MAX_VCPUS};
use vmm_sys_util::signal::Killable;

use crate::guest_image::{ImageError, KernelImage, INFERENCE_KERNEL};
use crate::isolation::{
    self, CgroupError, CgroupSpec, IsolationConfig, IsolationError, PartitionCgroup, SeccompError,
    ThreadIsolation,
};
use crate::vstate::layout::{self, LayoutError, MemoryPlan};
use crate::vstate::memory::{self, MemoryError, ModelWindow, RamBacking};
use crate::vstate::vcpu::{self, CpuTemplate, EntryState, VcpuError};
use crate::vstate::vm::{Vm, VmError};
use vcpu_thread::{VcpuSummary, VcpuThread};

/// What to run and on what.
pub struct PartitionConfig {
    /// Number of vCPUs (1 to [`MAX_VCPUS`]); vCPU 0 boots, the others are workers.
    pub vcpus: u32,
    /// Guest RAM in bytes (a multiple of 2 MiB).
    pub memory_bytes: u64,
    /// How guest RAM is backed on the host.
    pub backing: RamBacking,
    /// Host CPU for each vCPU thread (one entry per vCPU, each CPU once), or
    /// None to let the host scheduler place them. The partition's other
    /// threads (the inference event thread) run on the same CPUs.
    pub host_cpus: Option<Vec<usize>>,
    /// NUMA node guest RAM is bound to (MPOL_BIND), and the cgroup's cpuset.mems.
    pub numa_node: Option<u32>,
    /// The partition's cgroup and seccomp filters.
    pub isolation: IsolationConfig,
    /// Stack bytes per vCPU.
    pub stack_bytes: u64,
    /// Model file to map read-only into the model window.
    pub model: Option<PathBuf>,
    /// Where the guest's console text is copied as it arrives (it is also kept
    /// in [`PartitionOutcome::console`], up to `console_capture_limit` bytes).
    pub console_forward: Option<Box<dyn Write + Send>>,
    pub console_capture_limit: usize,
    /// Self-tests, benchmarks and deliberate failures for the guest to run.
    pub guest_requests: GuestRequests,
    /// Give the partition an inference device: the guest loads the model and
    /// serves requests ([`RunningPartition::inference`]) until told to exit.
    pub inference: Option<InferenceSetup>,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        PartitionConfig {
            vcpus: 1,
            memory_bytes: 256 << 20,
            backing: RamBacking::Anonymous,
            host_cpus: None,
            numa_node: None,
            // `aivmm run` and the daemon turn the filters on (and a cgroup).
            isolation: IsolationConfig::default(),
            stack_bytes: 1 << 20,
            model: None,
            console_forward: None,
            console_capture_limit: 1 << 20,
            guest_requests: GuestRequests::default(),
            inference: None,
        }
    }
}

/// Boot-info requests for tests and benchmarks (all zero in production); see
/// `aivmm_guest_abi::BootInfo` for what each does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GuestRequests {
    pub debug_flags: u64,
    pub debug_vcpu: u32,
    pub selftest_elements: u64,
    pub bench_mmio_exits: u64,
    pub bench_touch_bytes: u64,
}

/// Registers of a vCPU at the moment something went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuRegisters {
    pub rip: u64,
    pub rsp: u64,
    pub cr2: u64,
    pub rflags: u64,
}

/// Why a vCPU could not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// KVM_EXIT_SHUTDOWN: an exception the guest cannot handle (it has no IDT).
    TripleFault,
    /// KVM_EXIT_INTERNAL_ERROR, e.g. an instruction KVM could not emulate.
    InternalError { suberror: u32, data: Vec<u64> },
    /// KVM_EXIT_FAIL_ENTRY: the hardware refused the vCPU state.
    FailEntry { reason: u64, cpu: u32 },
    /// A store into the read-only model window.
    ModelWindowWrite { addr: u64 },
    /// An access to a guest-physical address where nothing is.
    UnmappedMmio { addr: u64, write: bool },
    /// Port I/O (never legal for a CPL3 guest).
    PortIo { port: u16, write: bool },
    /// Any other exit the VMM does not expect.
    UnexpectedExit(String),
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultKind::TripleFault => write!(f, "triple fault (KVM_EXIT_SHUTDOWN): an unhandled exception"),
            FaultKind::InternalError { suberror, data } => {
                write!(f, "KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}, data {data:x?})")
            }
            FaultKind::FailEntry { reason, cpu } => {
                write!(f, "VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, host CPU {cpu})")
            }
            FaultKind::ModelWindowWrite { addr } => write!(
                f,
                "write to the read-only model window at guest-physical {addr:#x} (model offset {:#x})",
                addr - MODEL_WINDOW_ADDR
            ),
            FaultKind::UnmappedMmio { addr, write } => {
                write!(f, "{} of guest-physical {addr:#x}, where there is no memory or device", rw(*write))
            }
            FaultKind::PortIo { port, write } => write!(f, "port I/O {} of port {port:#x}", rw(*write)),
            FaultKind::UnexpectedExit(exit) => write!(f, "unexpected VM exit {exit}"),
        }
    }
}

fn rw(write: bool) -> &'static str {
    if write {
        "write"
    } else {
        "read"
    }
}

/// A guest failure the VMM detected (as opposed to one the guest reported).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestFault {
    pub vcpu: u32,
    pub kind: FaultKind,
    /// None if KVM could not even return the registers.
    pub registers: Option<VcpuRegisters>,
    /// The kernel function RIP is in, when the image has a symbol for it.
    pub function: Option<String>,
}

impl std::fmt::Display for GuestFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "guest fault on vCPU {}: {}", self.vcpu, self.kind)?;
        match &self.registers {
            Some(r) => {
                write!(f, "; RIP {:#x}", r.rip)?;
                if let Some(function) = &self.function {
                    write!(f, " ({function})")?;
                }
                write!(
                    f,
                    ", RSP {:#x}, CR2 {:#x}, RFLAGS {:#x}",
                    r.rsp, r.cr2, r.rflags
                )
            }
            None => write!(f, "; registers unavailable"),
        }
    }
}

/// Where a vCPU was when the partition was stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuPosition {
    pub vcpu: u32,
    pub registers: Option<VcpuRegisters>,
    pub function: Option<String>,
}

impl std::fmt::Display for VcpuPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.registers, &self.function) {
            (Some(r), Some(function)) => {
                write!(f, "vCPU {} at RIP {:#x} ({function})", self.vcpu, r.rip)
            }
            (Some(r), None) => write!(f, "vCPU {} at RIP {:#x}", self.vcpu, r.rip),
            (None, _) => write!(f, "vCPU {} (registers unavailable)", self.vcpu),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    #[error("a partition has 1 to {max} vCPUs, not {vcpus}", max = MAX_VCPUS)]
    VcpuCount { vcpus: u32 },
    #[error("debug requests name vCPU {vcpu}, but the partition has {vcpus} vCPUs")]
    DebugVcpu { vcpu: u32, vcpus: u32 },
    #[error("{given} host CPUs were given for {vcpus} vCPUs; give exactly one per vCPU")]
    HostCpuCount { given: usize, vcpus: u32 },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("inference kernel image: {0}")]
    Image(#[from] ImageError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot set up the console device: {0}")]
    ConsoleDevice(#[source] DeviceError),
    #[error("cannot read the TSC frequency from KVM: {0}")]
    TscFrequency(#[source] kvm_ioctls::Error),
    #[error("cannot install the signal handler that stops vCPUs: {0}")]
    KickSignal(#[source] vmm_sys_util::errno::Error),
    #[error("cannot start the thread of vCPU {vcpu}: {source}")]
    SpawnThread { vcpu: u32, source: std::io::Error },
    #[error("host CPU {cpu} is given twice: each vCPU needs a CPU of its own")]
    HostCpuTwice { cpu: usize },
    #[error("vCPU {vcpu}: {source}")]
    VcpuIsolation { vcpu: u32, source: IsolationError },
    #[error("partition cgroup: {0}")]
    Cgroup(#[from] CgroupError),
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    #[error("{0}")]
    GuestFault(GuestFault),
    #[error("the guest reported a fatal error on vCPU {vcpu} ({}, code {code}): {message}", fatal_code_name(*.code))]
    GuestFatal {
        vcpu: u32,
        code: u64,
        message: String,
    },
    #[error("vCPU {vcpu}: the guest misused a device: {source}")]
    Device { vcpu: u32, source: DeviceError },
    #[error("KVM_RUN failed on vCPU {vcpu}: {source}")]
    KvmRun {
        vcpu: u32,
        source: kvm_ioctls::Error,
    },
    #[error("the partition did not finish within {timeout:?}; stopped {}", positions(.vcpus))]
    Timeout {
        timeout: Duration,
        vcpus: Vec<VcpuPosition>,
    },
    #[error("the thread of vCPU {vcpu} panicked (a VMM bug)")]
    ThreadPanicked { vcpu: u32 },
    #[error("inference device: {0}")]
    InferenceLink(#[from] InferenceLinkError),
}

fn positions(vcpus: &[VcpuPosition]) -> String {
    vcpus
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A readable name for a `aivmm_guest_abi::fatal` code.
pub fn fatal_code_name(code: u64) -> &'static str {
    match code {
        fatal::PANIC => "panic",
        fatal::BAD_BOOT_INFO => "bad boot info",
        fatal::OUT_OF_MEMORY => "out of memory",
        fatal::DEVICE => "device error",
        fatal::MODEL => "the model cannot run",
        _ => "unknown code",
    }
}

/// How the partition ended: `Ok(status)` when the guest wrote EXIT.
pub type PartitionEnd = Result<u64, PartitionError>;

/// Start-up timings, all measured from the start of [`start`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionTimings {
    /// VM, memory, image, page tables, vCPUs and devices ready (the vCPU
    /// threads start right after).
    pub setup: Duration,
    /// The guest wrote BOOT_COMPLETE.
    pub boot_complete: Option<Duration>,
    /// The partition ended.
    pub total: Duration,
}

/// Per-vCPU counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VcpuStats {
    /// VM exits to the VMM for MMIO (device registers, including PARK).
    pub mmio_exits: u64,
    pub parks: u64,
    pub parked: Duration,
}

/// Everything a finished partition leaves behind.
#[derive(Debug)]
pub struct PartitionOutcome {
    pub result: PartitionEnd,
    pub timings: PartitionTimings,
    pub vcpus: Vec<VcpuStats>,
    pub reports: Vec<GuestReport>,
    /// The guest's console text (up to the capture limit).
    pub console: String,
    /// Console flushes (each one VM exit).
    pub console_flushes: u64,
    /// The guest's TSC frequency, to convert reported ticks.
    pub tsc_khz: u64,
    /// Notifications of the inference device's event queue (0 without one).
    pub inference_notifications: u64,
}

impl PartitionOutcome {
    /// The last value the guest reported under `key` (any vCPU).
    pub fn report(&self, key: u64) -> Option<u64> {
        self.reports
            .iter()
            .rev()
            .find(|r| r.key == key)
            .map(|r| r.value)
    }

    /// Converts guest TSC ticks to time.
    pub fn ticks_to_duration(&self, ticks: u64) -> Duration {
        Duration::from_nanos((ticks as u128 * 1_000_000 / self.tsc_khz.max(1) as u128) as u64)
    }

    pub fn total_mmio_exits(&self) -> u64 {
        self.vcpus.iter().map(|v| v.mmio_exits).sum()
    }
}

#[derive(Default)]
struct VcpuCounters {
    mmio_exits: AtomicU64,
}

/// State shared by the vCPU threads and the controller.
struct Shared {
    stop: AtomicBool,
    end: Mutex<Option<PartitionEnd>>,
    ended: Condvar,
    counters: Vec<VcpuCounters>,
    wakers: Arc<VcpuWakers>,
}

impl Shared {
    /// Records how the partition ended (the first report wins) and makes
    /// every vCPU stop.
    fn finish(&self, end: PartitionEnd) {
        let mut slot = self.end.lock().unwrap_or_else(|poison| poison.into_inner());
        if slot.is_none() {
            *slot = Some(end);
        }
        self.stop.store(true, Ordering::Release);
        self.wakers.stop();
        self.ended.notify_all();
    }
}

/// A started partition. Dropping it stops the vCPUs and joins their threads.
pub struct RunningPartition {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<VcpuSummary>>,
    image: Arc<KernelImage<'static>>,
    platform: Arc<PlatformDevice>,
    console: Arc<VirtioMmioTransport<Console>>,
    console_output: Arc<ConsoleOutput>,
    created: Instant,
    setup: Duration,
    tsc_khz: u64,
    inference: Option<InferenceLink>,
    // Dropped after the threads are joined (see Drop): the VM first, then the
    // memory its memslots point to.
    vm: Option<Vm>,
    _model: Option<ModelWindow>,
    _ping_ioeventfd: vmm_sys_util::eventfd::EventFd,
    /// Removed once every thread in it has ended (see Drop).
    cgroup: Option<Arc<PartitionCgroup>>,
}

/// Builds the partition and starts its vCPUs.
pub fn start(config: PartitionConfig) -> Result<RunningPartition, PartitionError> {
    let created = Instant::now();
    let vcpus = config.vcpus;
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(PartitionError::VcpuCount { vcpus });
    }
    if let Some(cpus) = &config.host_cpus {
        if cpus.len() != vcpus as usize {
            return Err(PartitionError::HostCpuCount {
                given: cpus.len(),
                vcpus,
            });
        }
        if let Some((_, &cpu)) = cpus
            .iter()
            .enumerate()
            .find(|(i, cpu)| cpus[..*i].contains(cpu))
        {
            return Err(PartitionError::HostCpuTwice { cpu });
        }
    }
    let requests = config.guest_requests;
    if requests.debug_flags != 0 && requests.debug_vcpu >= vcpus {
        return Err(PartitionError::DebugVcpu {
            vcpu: requests.debug_vcpu,
            vcpus,
        });
    }
    if config.isolation.seccomp {
        isolation::seccomp::prepare()?;
    }
    // Before guest RAM: in Process scope, its pages are charged to the cgroup.
    let cgroup = match &config.isolation.cgroup {
        Some(request) => Some(Arc::new(PartitionCgroup::create(&CgroupSpec {
            name: request.name.clone(),
            scope: request.scope,
            cpus: match &config.host_cpus {
                Some(cpus) => cpus.clone(),
                None => crate::run::allowed_cpus().map_err(|source| CgroupError::Read {
                    path: "sched_getaffinity".into(),
                    source,
                })?,
            },
            mems: match config.numa_node {
                Some(node) => vec![node],
                None => memory::online_nodes(),
            },
            memory_limit: request.memory_limit,
        })?)),
        None => None,
    };
    let thread_isolation = ThreadIsolation {
        cgroup: cgroup.clone(),
        seccomp: config.isolation.seccomp,
    };
    let image = Arc::new(KernelImage::parse(INFERENCE_KERNEL)?);
    let mut vm = Vm::new()?;
    let template = CpuTemplate::from_supported(vm.supported_cpuid()?)?;

    let ram = memory::create_guest_ram(config.memory_bytes, config.backing, config.numa_node)?;
    let plan = MemoryPlan::new(
        config.memory_bytes,
        image.load_end,
        vcpus,
        config.stack_bytes,
    )?;
    image.load(&ram, KERNEL_LOAD_ADDR, plan.heap_start)?;
    let model = config.model.as_deref().map(ModelWindow::open).transpose()?;
    vm.register_ram(&ram)?;
    if let Some(model) = &model {
        vm.register_read_only(
            "the model window",
            MODEL_WINDOW_ADDR,
            model.mapped_len(),
            model.host_addr(),
        )?;
    }
    layout::write_descriptor_tables(&ram)?;
    let pml4 = layout::write_page_tables(
        &ram,
        &plan,
        model.as_ref().map_or(0, ModelWindow::mapped_len),
        template.huge_pages,
    )?;

    let vcpu_fds = (0..vcpus)
        .map(|index| {
            vm.fd()
                .create_vcpu(index as u64)
                .map_err(|source| VcpuError::Create { index, source })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tsc_khz = vcpu_fds[0]
        .get_tsc_khz()
        .map_err(PartitionError::TscFrequency)? as u64;
    let boot_info = BootInfo {
        magic: BOOT_INFO_MAGIC,
        abi_version: ABI_VERSION,
        vcpu_count: vcpus,
        ram_size: plan.ram_size,
        heap_start: plan.heap_start,
        heap_end: plan.heap_end,
        stack_size: plan.stack_size,
        stacks_start: plan.stacks_start,
        tsc_khz,
        platform_mmio: PLATFORM_MMIO_ADDR,
        console_mmio: CONSOLE_MMIO_ADDR,
        model_addr: if model.is_some() {
            MODEL_WINDOW_ADDR
        } else {
            0
        },
        model_size: model.as_ref().map_or(0, ModelWindow::file_len),
        debug_flags: requests.debug_flags,
        debug_vcpu: requests.debug_vcpu,
        reserved0: 0,
        selftest_elements: requests.selftest_elements,
        bench_mmio_exits: requests.bench_mmio_exits,
        bench_touch_bytes: requests.bench_touch_bytes,
        inference_mmio: if config.inference.is_some() {
            INFERENCE_MMIO_ADDR
        } else {
            0
        },
        n_ctx: config.inference.map_or(0, |setup| setup.n_ctx),
        max_batch: config.inference.map_or(0, |setup| setup.max_batch),
        warmup_heap_bytes: config.inference.map_or(0, |setup| setup.warmup_heap_bytes),
    };
    layout::write_boot_info(&ram, &boot_info)?;
    for (index, fd) in (0..vcpus).zip(&vcpu_fds) {
        let entry = EntryState {
            index,
            vcpus,
            entry: image.entry,
            rsp: plan.initial_rsp(index),
            boot_info: BOOT_INFO_ADDR,
            pml4,
        };
        vcpu::configure(fd, &template, &entry)?;
    }

    let wakers = Arc::new(VcpuWakers::new(vcpus));
    let platform = Arc::new(PlatformDevice::new(ram.clone(), wakers.clone()));
    let console_output = Arc::new(ConsoleOutput::new(
        config.console_capture_limit,
        config.console_forward,
    ));
    let console = Arc::new(
        VirtioMmioTransport::new(Console::new(console_output.clone()), ram.clone())
            .map_err(PartitionError::ConsoleDevice)?,
    );
    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        end: Mutex::new(None),
        ended: Condvar::new(),
        counters: (0..vcpus).map(|_| VcpuCounters::default()).collect(),
        wakers,
    });
    let mut bus = MmioBus::new();
    bus.insert(PLATFORM_MMIO_ADDR, DEVICE_MMIO_SIZE, platform.clone())?;
    bus.insert(CONSOLE_MMIO_ADDR, DEVICE_MMIO_SIZE, console.clone())?;
    let inference = match config.inference {
        Some(_) => {
            let link = InferenceLink::attach(
                &vm,
                ram.clone(),
                shared.clone(),
                thread_isolation.clone(),
                config.host_cpus.clone(),
            )?;
            bus.insert(INFERENCE_MMIO_ADDR, DEVICE_MMIO_SIZE, link.device())?;
            Some(link)
        }
        None => None,
    };
    let bus = Arc::new(bus);
    let ping_ioeventfd =
        vm.register_ioeventfd(PLATFORM_MMIO_ADDR + aivmm_guest_abi::platform::PING_IOEVENTFD)?;
    vcpu_thread::install_kick_handler().map_err(PartitionError::KickSignal)?;
    let model_window = model
        .as_ref()
        .map(|m| MODEL_WINDOW_ADDR..MODEL_WINDOW_ADDR + m.mapped_len());
    let setup = created.elapsed();
    let mut partition = RunningPartition {
        shared: shared.clone(),
        threads: Vec::with_capacity(vcpus as usize),
        image: image.clone(),
        platform,
        console,
        console_output,
        created,
        setup,
        tsc_khz,
        inference,
        vm: Some(vm),
        _model: model,
        _ping_ioeventfd: ping_ioeventfd,
        cgroup,
    };
    for (index, fd) in (0..vcpus).zip(vcpu_fds) {
        let thread = VcpuThread {
            index,
            vcpu: fd,
            bus: bus.clone(),
            shared: shared.clone(),
            image: image.clone(),
            model_window: model_window.clone(),
            host_cpu: config.host_cpus.as_ref().map(|cpus| cpus[index as usize]),
            isolation: thread_isolation.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || {
                let shared = thread.shared.clone();
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| thread.run()))
                    .unwrap_or_else(|_| {
                        shared.finish(Err(PartitionError::ThreadPanicked { vcpu: index }));
                        VcpuSummary { registers: None }
                    })
            })
            .map_err(|source| PartitionError::SpawnThread {
                vcpu: index,
                source,
            })?;
        partition.threads.push(handle);
    }
    Ok(partition)
}

/// Starts a partition and waits for it to end (at most `timeout`).
pub fn run(config: PartitionConfig, timeout: Duration) -> Result<PartitionOutcome, PartitionError> {
    Ok(start(config)?.wait_timeout(timeout))
}

impl RunningPartition {
    /// Time from the start of [`start`] to the guest's BOOT_COMPLETE, waiting
    /// up to `timeout` for it.
    pub fn wait_boot_complete(&self, timeout: Duration) -> Option<Duration> {
        self.platform
            .wait_boot_complete(timeout)
            .map(|at| at - self.created)
    }

    /// Makes a wake pending for `vcpu` (releases it if parked).
    pub fn wake_vcpu(&self, vcpu: u32) -> bool {
        self.shared.wakers.wake(vcpu)
    }

    /// The host end of the inference device (None without one).
    pub fn inference(&self) -> Option<&InferenceLink> {
        self.inference.as_ref()
    }

    /// Whether the partition has ended (the guest exited or failed, or it was
    /// stopped); [`RunningPartition::wait`] then returns at once.
    pub fn has_ended(&self) -> bool {
        self.shared.stop.load(Ordering::Acquire)
    }

    /// The guest's TSC frequency, to convert the TSC timestamps of events.
    pub fn tsc_khz(&self) -> u64 {
        self.tsc_khz
    }

    /// How long [`start`] took to build the machine before the vCPUs started.
    pub fn setup_time(&self) -> Duration {
        self.setup
    }

    /// When [`start`] began, the origin of the partition's timings.
    pub fn created_at(&self) -> Instant {
        self.created
    }

    /// MMIO exits of `vcpu` so far.
    pub fn mmio_exits(&self, vcpu: u32) -> u64 {
        self.shared
            .counters
            .get(vcpu as usize)
            .map_or(0, |c| c.mmio_exits.load(Ordering::Relaxed))
    }

    /// Waits until the guest exits or fails.
    pub fn wait(self) -> PartitionOutcome {
        self.wait_until(None)
    }

    /// Waits until the guest exits or fails, or `timeout` passes (then the
    /// result is [`PartitionError::Timeout`] naming where each vCPU was).
    pub fn wait_timeout(self, timeout: Duration) -> PartitionOutcome {
        self.wait_until(Some(timeout))
    }

    fn wait_until(mut self, timeout: Option<Duration>) -> PartitionOutcome {
        let started_waiting = Instant::now();
        let end = {
            let mut slot = self
                .shared
                .end
                .lock()
                .unwrap_or_else(|poison| poison.into_inner());
            loop {
                if let Some(end) = slot.take() {
                    break Some(end);
                }
                match timeout {
                    None => {
                        slot = self
                            .shared
                            .ended
                            .wait(slot)
                            .unwrap_or_else(|poison| poison.into_inner())
                    }
                    Some(timeout) => {
                        let Some(left) = timeout.checked_sub(started_waiting.elapsed()) else {
                            break None;
                        };
                        slot = self
                            .shared
                            .ended
                            .wait_timeout(slot, left)
                            .unwrap_or_else(|poison| poison.into_inner())
                            .0;
                    }
                }
            }
        };
        let summaries = self.stop_and_join();
        if let Some(link) = self.inference.as_mut() {
            link.stop();
        }
        let total = self.created.elapsed();
        // A vCPU thread that ended the partition while we were stopping it
        // after a timeout may have left a result behind.
        let late_end = self
            .shared
            .end
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
            .take();
        let result = match end.or(late_end) {
            Some(end) => end,
            None => Err(PartitionError::Timeout {
                timeout: timeout.unwrap_or_default(),
                vcpus: summaries
                    .iter()
                    .enumerate()
                    .map(|(vcpu, summary)| {
                        let registers = summary.registers;
                        VcpuPosition {
                            vcpu: vcpu as u32,
                            registers,
                            function: registers.and_then(|r| self.image.symbolize(r.rip)),
                        }
                    })
                    .collect(),
            }),
        };
        let wakers = &self.shared.wakers;
        PartitionOutcome {
            result,
            timings: PartitionTimings {
                setup: self.setup,
                boot_complete: self.platform.boot_complete_at().map(|at| at - self.created),
                total,
            },
            vcpus: (0..self.shared.counters.len() as u32)
                .map(|vcpu| {
                    let parks = wakers.stats(vcpu);
                    VcpuStats {
                        mmio_exits: self.mmio_exits(vcpu),
                        parks: parks.parks,
                        parked: parks.parked,
                    }
                })
                .collect(),
            reports: self.platform.reports(),
            console: self.console_output.text(),
            console_flushes: self.console.notifications(),
            tsc_khz: self.tsc_khz,
            inference_notifications: self
                .inference
                .as_ref()
                .map_or(0, InferenceLink::notifications),
        }
    }

    /// Stops every vCPU (kicking it out of KVM_RUN, releasing it from a park)
    /// and joins its thread.
    fn stop_and_join(&mut self) -> Vec<VcpuSummary> {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wakers.stop();
        for thread in &self.threads {
            // A thread that already ended cannot be signalled; that is fine.
            let _ = thread.kill(vcpu_thread::kick_signal());
        }
        // The thread bodies catch panics, so a join error cannot happen.
        self.threads
            .drain(..)
            .map(|thread| thread.join().unwrap_or(VcpuSummary { registers: None }))
            .collect()
    }
}

impl Drop for RunningPartition {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.stop_and_join();
        }
        self.inference.take();
        self.vm.take();
        self.cgroup.take();
    }
}
