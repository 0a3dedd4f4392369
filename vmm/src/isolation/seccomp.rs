//! Per-thread seccomp filters (seccompiler): the vCPU threads, a partition's
//! event thread and the daemon's API threads may make only the system calls
//! their work needs (the lists were found by running the partition and
//! daemon tests with the filters trapping, and under `strace -f`).
//!
//! A forbidden call is trapped (SIGSYS), logged on stderr with the thread's
//! name and the call's number, and fails with EPERM. Not killing: the daemon
//! hosts several tenants in one process, so killing the process would take
//! every partition down, and killing the thread would leave its partition
//! hung with its locks held. With EPERM the call's caller sees an error and
//! the partition ends with it, the other partitions go on, and the log says
//! what was refused. The filter itself is the security boundary either way:
//! nothing forbidden runs.
//!
//! Filters stack and are inherited by threads spawned later, so a thread
//! gets its filter as the last step of its own set-up, and filtered threads
//! never spawn threads that need more than they have (API threads may
//! spawn the runtime's blocking threads, which get the same filter).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter of the {kind} threads: {message}")]
    Build { kind: &'static str, message: String },
    #[error(
        "cannot install the seccomp filter of a {kind} thread: {message} \
         (the kernel needs CONFIG_SECCOMP_FILTER; or run with --no-seccomp)"
    )]
    Apply { kind: &'static str, message: String },
    #[error("cannot install the SIGSYS handler that reports refused system calls: {0}")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// Which filter a thread gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// Runs KVM_RUN and the devices' MMIO handlers.
    Vcpu,
    /// A partition's event thread: drains the inference device's event queue.
    Events,
    /// The daemon's HTTP API threads (tokio workers and blocking threads).
    Api,
    /// A Linux guest's vCPU: KVM_RUN, the port and MMIO devices (serial,
    /// PCI config space, virtio-mmio registers), passed-through devices'
    /// trapped BARs and their BAR moves and MSI/MSI-X changes.
    LinuxVcpu,
    /// A Linux guest's disk thread: virtio-blk requests on the image files.
    LinuxDisks,
    /// A Linux guest's serial input thread: host input into the UART.
    SerialInput,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 6] = [
        ThreadKind::Vcpu,
        ThreadKind::Events,
        ThreadKind::Api,
        ThreadKind::LinuxVcpu,
        ThreadKind::LinuxDisks,
        ThreadKind::SerialInput,
    ];
}

impl ThreadKind {
    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Events => "partition event",
            ThreadKind::Api => "API",
            ThreadKind::LinuxVcpu => "Linux vCPU",
            ThreadKind::LinuxDisks => "Linux disk",
            ThreadKind::SerialInput => "serial input",
        }
    }
}

// KVM ioctls a vCPU thread makes once running (kvm-ioctls' request numbers).
const KVM_RUN: u64 = 0xae80;
const KVM_GET_REGS: u64 = 0x8090_ae81;
const KVM_GET_SREGS: u64 = 0x8138_ae83;
// A Linux vCPU thread applying a passed-through device's guest changes:
// a BAR move (memslots), MSI/MSI-X routes (GSI routing, irqfds) and
// VFIO's interrupt set-up.
const KVM_SET_USER_MEMORY_REGION: u64 = 0x4020_ae46;
const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
const KVM_IRQFD: u64 = 0x4020_ae76;
const VFIO_DEVICE_SET_IRQS: u64 = 0x3b6e;

// Conditions compare 32 bits: the kernel takes ioctl requests, mmap
// protections and prctl options as ints.

/// Calls every filtered thread needs: memory for the allocator (never
/// executable), futexes, signals (the vCPU kick, the SIGSYS report), time,
/// and the thread's own end (std unmaps its signal stack, glibc frees its
/// stack, then exit).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    // Reporting a refused call (the SIGSYS handler writes to stderr), the
    // console's forwarding and panic messages.
    libc::SYS_write,
    libc::SYS_close,
];

const VCPU: &[i64] = &[];

/// Besides its ioctls: ending the VM kicks the other vCPUs (pthread_kill:
/// getpid and tgkill), a passed-through device's trapped BAR is a pread or
/// pwrite on its VFIO device, and the disks' configuration is read here.
const LINUX_VCPU: &[i64] = &[
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
];

/// The event loop (epoll), the notification eventfds (read), the image
/// files (positioned reads and writes, fdatasync for a flush) and the
/// interrupt eventfd (write, in COMMON).
const LINUX_DISKS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// Waiting for input or the stop event (epoll), reading the input.
const SERIAL_INPUT: &[i64] = &[libc::SYS_epoll_wait, libc::SYS_epoll_pwait, libc::SYS_read];

const EVENTS: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
];

const API: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_accept4,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getpeername,
    libc::SYS_getsockname,
    libc::SYS_fcntl,
    // The runtime's blocking threads.
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_mprotect,
];

fn build_error(kind: ThreadKind) -> impl Fn(seccompiler::BackendError) -> SeccompError {
    move |error| SeccompError::Build {
        kind: kind.name(),
        message: error.to_string(),
    }
}

fn condition(
    kind: ThreadKind,
    arg: u8,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).map_err(build_error(kind))
}

/// The filter of `kind`, compiled.
pub fn filter(kind: ThreadKind) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let extra = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::Events => EVENTS,
        ThreadKind::Api => API,
        ThreadKind::LinuxVcpu => LINUX_VCPU,
        ThreadKind::LinuxDisks => LINUX_DISKS,
        ThreadKind::SerialInput => SERIAL_INPUT,
    };
    for &call in COMMON.iter().chain(extra) {
        rules.insert(call, Vec::new());
    }
    let rule = |conditions| SeccompRule::new(conditions).map_err(build_error(kind));
    // Memory, never executable: mmap and mprotect without PROT_EXEC.
    let no_exec = || {
        rule(vec![condition(
            kind,
            2,
            SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
            0,
        )?])
    };
    rules.insert(libc::SYS_mmap, vec![no_exec()?]);
    if kind != ThreadKind::Api {
        rules.insert(libc::SYS_mprotect, vec![no_exec()?]);
    }
    match kind {
        ThreadKind::Vcpu => {
            let ioctl = [KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS]
                .into_iter()
                .map(|request| rule(vec![condition(kind, 1, SeccompCmpOp::Eq, request)?]))
                .collect::<Result<Vec<_>, _>>()?;
            rules.insert(libc::SYS_ioctl, ioctl);
        }
        ThreadKind::Api => {
            // Naming a new blocking thread, and [`apply`]'s check whether
            // the thread inherited its filter.
            let prctl = [libc::PR_SET_NAME, libc::PR_GET_SECCOMP]
                .into_iter()
                .map(|option| rule(vec![condition(kind, 0, SeccompCmpOp::Eq, option as u64)?]))
                .collect::<Result<Vec<_>, _>>()?;
            rules.insert(libc::SYS_prctl, prctl);
        }
        ThreadKind::LinuxVcpu => {
            let ioctl = [
                KVM_RUN,
                KVM_GET_REGS,
                KVM_GET_SREGS,
                KVM_SET_USER_MEMORY_REGION,
                KVM_SET_GSI_ROUTING,
                KVM_IRQFD,
                VFIO_DEVICE_SET_IRQS,
            ]
            .into_iter()
            .map(|request| rule(vec![condition(kind, 1, SeccompCmpOp::Eq, request)?]))
            .collect::<Result<Vec<_>, _>>()?;
            rules.insert(libc::SYS_ioctl, ioctl);
        }
        ThreadKind::Events | ThreadKind::LinuxDisks | ThreadKind::SerialInput => {}
    }
    if kind != ThreadKind::Api {
        // std checks that a file descriptor is open before closing it.
        rules.insert(
            libc::SYS_fcntl,
            vec![rule(vec![condition(
                kind,
                1,
                SeccompCmpOp::Eq,
                libc::F_GETFD as u64,
            )?])?],
        );
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(build_error(kind))?;
    filter.try_into().map_err(build_error(kind))
}

/// The compiled filters, built once per process.
fn compiled(kind: ThreadKind) -> Result<&'static BpfProgram, SeccompError> {
    static FILTERS: OnceLock<BTreeMap<ThreadKind, Result<BpfProgram, String>>> = OnceLock::new();
    let filters = FILTERS.get_or_init(|| {
        ThreadKind::ALL
            .into_iter()
            .map(|kind| (kind, filter(kind).map_err(|error| error.to_string())))
            .collect()
    });
    match &filters[&kind] {
        Ok(program) => Ok(program),
        Err(message) => Err(SeccompError::Build {
            kind: kind.name(),
            message: message.clone(),
        }),
    }
}

thread_local! {
    /// The filtered thread's kind, for the SIGSYS report (const: no lazy
    /// initialization inside the signal handler).
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Refusals per thread kind (in [`ThreadKind::ALL`]'s order, then a thread
/// of unknown kind).
static REFUSED: [AtomicU64; ThreadKind::ALL.len() + 1] =
    [const { AtomicU64::new(0) }; ThreadKind::ALL.len() + 1];
static LAST_REFUSED: AtomicI64 = AtomicI64::new(-1);

fn kind_index(kind: Option<ThreadKind>) -> usize {
    match kind {
        Some(ThreadKind::Vcpu) => 0,
        Some(ThreadKind::Events) => 1,
        Some(ThreadKind::Api) => 2,
        Some(ThreadKind::LinuxVcpu) => 3,
        Some(ThreadKind::LinuxDisks) => 4,
        Some(ThreadKind::SerialInput) => 5,
        None => ThreadKind::ALL.len(),
    }
}

/// System calls refused so far in `kind`'s threads, and the number of the
/// last call refused in any thread.
pub fn refused(kind: ThreadKind) -> (u64, Option<i64>) {
    let last = LAST_REFUSED.load(Ordering::Relaxed);
    (
        REFUSED[kind_index(Some(kind))].load(Ordering::Relaxed),
        (last >= 0).then_some(last),
    )
}

/// Appends `value` in decimal to `buf` at `len` (no allocation: signal handler).
fn push_number(buf: &mut [u8], len: &mut usize, value: i64) {
    let mut digits = [0u8; 20];
    let mut n = value.unsigned_abs();
    let mut count = 0;
    loop {
        digits[count] = b'0' + (n % 10) as u8;
        count += 1;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if value < 0 && *len < buf.len() {
        buf[*len] = b'-';
        *len += 1;
    }
    for &digit in digits[..count].iter().rev() {
        if *len < buf.len() {
            buf[*len] = digit;
            *len += 1;
        }
    }
}

fn push_str(buf: &mut [u8], len: &mut usize, text: &str) {
    for &byte in text.as_bytes() {
        if *len < buf.len() {
            buf[*len] = byte;
            *len += 1;
        }
    }
}

extern "C" fn handle_sigsys(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS (SA_SIGINFO); for
    // SIGSYS the union holds {void *call_addr; int syscall; unsigned arch}
    // after the three ints and their padding, so the number is at byte 24.
    let call = unsafe { info.cast::<u8>().add(24).cast::<libc::c_int>().read() } as i64;
    let kind = KIND.with(Cell::get);
    REFUSED[kind_index(kind)].fetch_add(1, Ordering::Relaxed);
    LAST_REFUSED.store(call, Ordering::Relaxed);
    // SAFETY: `context` is the ucontext of the interrupted thread; setting
    // RAX makes the trapped system call return -EPERM when the handler returns.
    unsafe {
        let context = &mut *context.cast::<libc::ucontext_t>();
        context.uc_mcontext.gregs[libc::REG_RAX as usize] = -(libc::EPERM as i64);
    }
    let mut buf = [0u8; 160];
    let mut len = 0;
    push_str(&mut buf, &mut len, "aivmm: seccomp: ");
    push_str(
        &mut buf,
        &mut len,
        kind.map_or("filtered", ThreadKind::name),
    );
    push_str(
        &mut buf,
        &mut len,
        " thread made the forbidden system call ",
    );
    push_number(&mut buf, &mut len, call);
    push_str(&mut buf, &mut len, " (x86_64 number); refused with EPERM\n");
    // SAFETY: write(2) is async-signal-safe and allowed by every filter;
    // `buf[..len]` is initialized.
    unsafe { libc::write(2, buf.as_ptr().cast(), len) };
}

fn install_handler() -> Result<(), SeccompError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    (*INSTALLED
        .get_or_init(|| vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)))
    .map_err(SeccompError::Handler)
}

/// Checks that the filters build (to refuse a start before any thread runs).
pub fn prepare() -> Result<(), SeccompError> {
    install_handler()?;
    for kind in ThreadKind::ALL {
        compiled(kind)?;
    }
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (for the rest of its life).
pub fn apply(kind: ThreadKind) -> Result<(), SeccompError> {
    install_handler()?;
    let program = compiled(kind)?;
    KIND.with(|cell| cell.set(Some(kind)));
    // A thread spawned by an API thread (the runtime's blocking threads)
    // already has the API filter: only API threads may spawn threads.
    // SAFETY: PR_GET_SECCOMP takes no arguments and only reads the mode.
    if kind == ThreadKind::Api && unsafe { libc::prctl(libc::PR_GET_SECCOMP) } == 2 {
        return Ok(());
    }
    seccompiler::apply_filter(program).map_err(|error| SeccompError::Apply {
        kind: kind.name(),
        message: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_build() {
        for kind in ThreadKind::ALL {
            assert!(!filter(kind).unwrap().is_empty());
        }
    }

    /// A thread under the vCPU filter: socket(2), openat(2) and an ioctl other
    /// than the vCPU's are refused with EPERM and counted; what it may do
    /// still works.
    #[test]
    fn vcpu_filter_refuses_forbidden_calls() {
        let result = std::thread::spawn(|| {
            apply(ThreadKind::Vcpu).unwrap();
            let before = refused(ThreadKind::Vcpu).0;
            // SAFETY: plain system calls with valid (or null) arguments.
            let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            let socket_errno = std::io::Error::last_os_error().raw_os_error();
            let open = std::fs::File::open("/etc/hostname");
            let ioctl = unsafe { libc::ioctl(0, libc::FIONREAD, std::ptr::null_mut::<u8>()) };
            let ioctl_errno = std::io::Error::last_os_error().raw_os_error();
            // Allowed: allocation, time, futexes.
            let v = vec![7u8; 1 << 20];
            let now = std::time::Instant::now();
            (
                socket,
                socket_errno,
                open.map(|_| ()).map_err(|e| e.raw_os_error()),
                ioctl,
                ioctl_errno,
                refused(ThreadKind::Vcpu).0 - before,
                v.iter().map(|&b| b as u64).sum::<u64>(),
                now.elapsed() < std::time::Duration::from_secs(60),
            )
        })
        .join()
        .unwrap();
        assert_eq!((result.0, result.1), (-1, Some(libc::EPERM)), "socket");
        assert_eq!(result.2, Err(Some(libc::EPERM)), "open");
        assert_eq!((result.3, result.4), (-1, Some(libc::EPERM)), "ioctl");
        assert!(result.5 >= 3, "refusals counted: {}", result.5);
        assert_eq!(result.6, 7 << 20);
        assert!(result.7);
        // This thread has no filter.
        assert!(std::fs::File::open("/proc/self/status").is_ok());
    }

    /// The Linux guest's threads: each may read an open file at an offset
    /// (a trapped BAR, a disk image, the console input) but not open one,
    /// make a socket or an ioctl outside its list.
    #[test]
    fn linux_filters_refuse_what_their_threads_never_do() {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        for kind in [
            ThreadKind::LinuxVcpu,
            ThreadKind::LinuxDisks,
            ThreadKind::SerialInput,
        ] {
            let file = file.try_clone().unwrap();
            let (allowed, socket, open, ioctl, counted) = std::thread::spawn(move || {
                apply(kind).unwrap();
                let before = refused(kind).0;
                let mut head = [0u8; 4];
                let allowed = match kind {
                    ThreadKind::SerialInput => {
                        std::io::Read::read(&mut &file, &mut head).map(|_| head)
                    }
                    _ => file.read_at(&mut head, 0).map(|_| head),
                };
                // SAFETY: plain system calls with valid (or null) arguments.
                let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
                let open = std::fs::File::open("/etc/hostname").map(|_| ());
                let ioctl = unsafe { libc::ioctl(0, libc::FIONREAD, std::ptr::null_mut::<u8>()) };
                let ioctl_errno = std::io::Error::last_os_error().raw_os_error();
                (
                    allowed.map_err(|e| e.to_string()),
                    socket,
                    open.map_err(|e| e.raw_os_error()),
                    (ioctl, ioctl_errno),
                    refused(kind).0 - before,
                )
            })
            .join()
            .unwrap();
            assert_eq!(allowed, Ok(*b"\x7fELF"), "{kind:?}: reading an open file");
            assert_eq!(socket, -1, "{kind:?}: socket");
            assert_eq!(open, Err(Some(libc::EPERM)), "{kind:?}: open");
            assert_eq!(ioctl, (-1, Some(libc::EPERM)), "{kind:?}: ioctl");
            assert!(counted >= 3, "{kind:?}: refusals counted: {counted}");
        }
    }

    #[test]
    fn numbers_format_without_allocating() {
        let mut buf = [0u8; 32];
        let mut len = 0;
        push_number(&mut buf, &mut len, 41);
        push_str(&mut buf, &mut len, " ");
        push_number(&mut buf, &mut len, -7);
        push_str(&mut buf, &mut len, " ");
        push_number(&mut buf, &mut len, 0);
        assert_eq!(&buf[..len], b"41 -7 0");
    }

    /// A tokio runtime whose threads carry the API filter serves a Unix
    /// socket connection (accept, read, write, close) with nothing refused.
    #[test]
    fn api_filter_lets_the_runtime_serve_a_socket() {
        use std::io::{Read, Write};
        let path =
            std::env::temp_dir().join(format!("aivmm-seccomp-api-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .on_thread_start(|| apply(ThreadKind::Api).unwrap())
            .enable_all()
            .build()
            .unwrap();
        let before = refused(ThreadKind::Api).0;
        let server = runtime.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let listener = tokio::net::UnixListener::from_std(listener).unwrap();
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).await.unwrap();
            // Work on a blocking thread too (spawned by a filtered thread).
            let upper = tokio::task::spawn_blocking(move || buf.to_ascii_uppercase())
                .await
                .unwrap();
            stream.write_all(&upper).await.unwrap();
        });
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        client.write_all(b"hello").unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).unwrap();
        runtime.block_on(server).unwrap();
        assert_eq!(&reply, b"HELLO");
        runtime.shutdown_timeout(std::time::Duration::from_secs(5));
        assert_eq!(refused(ThreadKind::Api).0, before, "nothing refused");
        let _ = std::fs::remove_file(&path);
    }
}
