//! `aivmm run --kernel`: boot a Linux guest and stream its serial console.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{BootProtocol, LinuxConfig, LinuxEnd, LinuxError, LinuxOutcome, LinuxVm};

/// The guest memory of a Linux guest when --memory is not given.
pub const DEFAULT_MEMORY: &str = "512M";

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum ProtocolArg {
    /// PVH if the kernel has the note, else the 64-bit boot protocol.
    #[default]
    Auto,
    /// The 64-bit boot protocol (zero page).
    Linux64,
    /// PVH (vmlinux with the Xen PVH note only).
    Pvh,
}

/// The `aivmm run` options for a Linux guest (with --vcpus, --cpus and
/// --memory shared with inference partitions).
#[derive(Args, Debug, Clone, Default)]
pub struct LinuxArgs {
    /// Boot this Linux kernel (a vmlinux ELF or a bzImage) instead of a
    /// model; its serial console streams to stdout.
    #[arg(long, conflicts_with_all = ["model", "prompt", "chat", "json"])]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for --kernel.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, requires = "kernel", default_value = super::DEFAULT_CMDLINE)]
    pub cmdline: String,
    /// Write the guest's serial console to this file instead of stdout.
    #[arg(long, requires = "kernel")]
    pub console_log: Option<PathBuf>,
    /// Entry point of --kernel.
    #[arg(long, value_enum, requires = "kernel", default_value = "auto")]
    pub boot_protocol: ProtocolArg,
    /// Stop the Linux guest after this many seconds (default: run until it
    /// powers off or reboots).
    #[arg(long, requires = "kernel")]
    pub timeout: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum LinuxCliError {
    #[error("cannot create the console log {path}: {source}")]
    ConsoleLog {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Linux(#[from] LinuxError),
    #[error("the Linux guest failed: {0}")]
    Guest(LinuxEnd),
}

/// Boots `kernel` with the sizes already resolved by `aivmm run`.
pub fn run(
    args: &LinuxArgs,
    kernel: PathBuf,
    vcpus: u32,
    host_cpus: Option<Vec<usize>>,
    memory_bytes: u64,
) -> Result<LinuxOutcome, LinuxCliError> {
    let console: Box<dyn Write + Send> =
        match &args.console_log {
            Some(path) => Box::new(std::fs::File::create(path).map_err(|source| {
                LinuxCliError::ConsoleLog {
                    path: path.clone(),
                    source,
                }
            })?),
            None => Box::new(std::io::stdout()),
        };
    let config = LinuxConfig {
        kernel,
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        vcpus,
        memory_bytes,
        host_cpus,
        protocol: match args.boot_protocol {
            ProtocolArg::Auto => BootProtocol::Auto,
            ProtocolArg::Linux64 => BootProtocol::Linux64,
            ProtocolArg::Pvh => BootProtocol::Pvh,
        },
        console: Some(console),
        console_capture_limit: 0,
    };
    let vm = LinuxVm::start(config)?;
    eprintln!(
        "[linux guest: {vcpus} vCPU(s), {} MiB, {:?} entry at {:#x}, kernel {:#x}-{:#x}{} | set-up {:.1} ms]",
        memory_bytes >> 20,
        vm.layout.entry,
        vm.layout.entry.rip(),
        vm.layout.kernel.load_start,
        vm.layout.kernel.load_end,
        vm.layout
            .initrd
            .map(|(addr, size)| format!(", initrd {size} bytes at {addr:#x}"))
            .unwrap_or_default(),
        vm.setup.as_secs_f64() * 1e3,
    );
    // Without --timeout: until the guest ends (136 years is as good as never).
    let timeout = Duration::from_secs(args.timeout.unwrap_or(u64::from(u32::MAX)));
    let outcome = vm.run(timeout);
    print_summary(&mut std::io::stderr(), &outcome);
    match outcome.end {
        LinuxEnd::Stopped | LinuxEnd::Reset | LinuxEnd::PowerOff => Ok(outcome),
        ref end => Err(LinuxCliError::Guest(end.clone())),
    }
}

/// One line per vCPU: exits and where it was.
pub fn print_summary(w: &mut dyn Write, outcome: &LinuxOutcome) {
    let _ = writeln!(
        w,
        "\n[linux guest ended after {:.1} s: {} | {} console bytes | {} unanswered port accesses]",
        outcome.elapsed.as_secs_f64(),
        outcome.end,
        outcome.console_total,
        outcome.unhandled_ports
    );
    for (index, exits) in outcome.exits.iter().enumerate() {
        let state = outcome.states.get(index).copied().flatten();
        let _ = writeln!(
            w,
            "[vCPU {index}: {} port reads, {} port writes, {} MMIO exits{}]",
            exits.io_in,
            exits.io_out,
            exits.mmio,
            state
                .map(|s| format!(", RIP {:#x} CR0 {:#x} CR3 {:#x}", s.rip, s.cr0, s.cr3))
                .unwrap_or_default()
        );
    }
}
