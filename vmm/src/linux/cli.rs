//! `aivmm run --kernel`: boot a Linux guest and stream its serial console.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use aivmm_passthrough::bdf::Bdf;
use clap::{Args, ValueEnum};

use super::disk::DiskSpec;
use super::serial_input::{SerialInput, ESCAPE, QUIT};
use super::{BootProtocol, LinuxConfig, LinuxEnd, LinuxError, LinuxOutcome, LinuxVm};
use crate::vstate::memory::RamBacking;

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
    /// Write the guest's serial console to this file instead of stdout
    /// (without it, stdin is the console's input: from a terminal, in raw
    /// mode, with Ctrl-A x to stop the VM).
    #[arg(long, requires = "kernel")]
    pub console_log: Option<PathBuf>,
    /// Entry point of --kernel.
    #[arg(long, value_enum, requires = "kernel", default_value = "auto")]
    pub boot_protocol: ProtocolArg,
    /// Attach a disk image as a virtio-blk device on virtio-mmio
    /// (repeatable; /dev/vda, /dev/vdb, ... in a guest kernel built with
    /// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES). PATH,ro attaches it read-only.
    /// Images are locked: a writable one cannot be used by two VMs at once.
    #[arg(long = "disk", value_name = "PATH[,ro]", requires = "kernel")]
    pub disks: Vec<DiskSpec>,
    /// Stop the Linux guest after this many seconds (default: run until it
    /// powers off or reboots).
    #[arg(long, requires = "kernel")]
    pub timeout: Option<u64>,
    /// Pass this host PCI device (DDDD:BB:DD.F, bound to vfio-pci) through
    /// to the guest; repeatable. The host needs an IOMMU: each device is
    /// checked first, and what the host lacks is said before anything boots.
    #[arg(long = "device", value_name = "BDF", requires = "kernel")]
    pub devices: Vec<Bdf>,
}

/// The command line for `args`: with --device and no --cmdline, the default
/// without `pci=off` (the guest must probe PCI to find the devices).
pub fn cmdline_for(args: &LinuxArgs) -> String {
    if args.cmdline == super::DEFAULT_CMDLINE {
        super::default_cmdline(!args.devices.is_empty())
    } else {
        args.cmdline.clone()
    }
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

/// Stdin in raw mode while it lives (keys go to the guest as typed);
/// canonical mode again when dropped, on every way out of [`run`].
struct RawTerminal;

impl RawTerminal {
    fn enter() -> Option<Self> {
        use vmm_sys_util::terminal::Terminal;
        std::io::stdin()
            .lock()
            .set_raw_mode()
            .ok()
            .map(|()| RawTerminal)
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        use vmm_sys_util::terminal::Terminal;
        let _ = std::io::stdin().lock().set_canon_mode();
    }
}

/// Stdin as the serial console's input (a terminal in raw mode, or a pipe
/// or file as it is); none if stdin is closed.
fn stdin_input() -> (Option<SerialInput>, Option<RawTerminal>) {
    use std::io::IsTerminal;
    use std::os::fd::AsFd;
    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return (None, None);
    };
    let raw = std::io::stdin()
        .is_terminal()
        .then(RawTerminal::enter)
        .flatten();
    let input = SerialInput {
        source: std::fs::File::from(fd),
        interactive: raw.is_some(),
    };
    (Some(input), raw)
}

/// What `aivmm run` resolved from its shared options (--vcpus, --cpus,
/// --memory, --hugepages, --numa-node, --no-seccomp).
#[derive(Debug, Clone)]
pub struct Resources {
    pub vcpus: u32,
    pub host_cpus: Option<Vec<usize>>,
    pub memory_bytes: u64,
    pub backing: RamBacking,
    pub numa_node: Option<u32>,
    pub seccomp: bool,
}

impl Resources {
    /// `vcpus` unpinned vCPUs and `memory_bytes` of anonymous memory, filtered.
    pub fn new(vcpus: u32, memory_bytes: u64) -> Self {
        Resources {
            vcpus,
            host_cpus: None,
            memory_bytes,
            backing: RamBacking::Anonymous,
            numa_node: None,
            seccomp: true,
        }
    }
}

/// Boots `kernel` with the resources already resolved by `aivmm run`.
pub fn run(
    args: &LinuxArgs,
    kernel: PathBuf,
    resources: Resources,
) -> Result<LinuxOutcome, LinuxCliError> {
    let Resources {
        vcpus,
        host_cpus,
        memory_bytes,
        backing,
        numa_node,
        seccomp,
    } = resources;
    let (input, raw_terminal) = match &args.console_log {
        Some(_) => (None, None),
        None => stdin_input(),
    };
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
    let cmdline = cmdline_for(args);
    let config = LinuxConfig {
        kernel,
        initrd: args.initrd.clone(),
        cmdline: cmdline.clone(),
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
        devices: args.devices.clone(),
        disks: args.disks.clone(),
        input,
        backing,
        numa_node,
        seccomp,
    };
    let vm = LinuxVm::start(config)?;
    for line in &vm.devices {
        eprintln!("[device {line}]");
    }
    if raw_terminal.is_some() {
        eprintln!(
            "[serial console input from this terminal; Ctrl-{} {} stops the VM]",
            (b'@' + ESCAPE) as char,
            QUIT as char
        );
    }
    if vm.cmdline != cmdline {
        eprintln!(
            "[the kernel's command line, with the disks and any workarounds for a host that emulates guest kernel code (PVM): {:?}]",
            vm.cmdline
        );
    }
    eprintln!(
        "[linux guest: {vcpus} vCPU(s), {} MiB, {:x?} entry at {:#x}, kernel {:#x}-{:#x}{} | set-up {:.1} ms]",
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
    drop(raw_terminal);
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
    for (index, disk) in outcome.disks.iter().enumerate() {
        let _ = writeln!(
            w,
            "[disk {index}: {} requests, {} bytes read, {} bytes written, {} flushes, {} errors]",
            disk.requests, disk.bytes_read, disk.bytes_written, disk.flushes, disk.errors
        );
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::RunArgs;
    use clap::Parser;

    #[test]
    fn kernel_options_parse_and_conflict_with_models() {
        let args = RunArgs::try_parse_from([
            "run",
            "--kernel",
            "vmlinux",
            "--initrd",
            "initrd.img",
            "--cmdline",
            "console=ttyS0",
            "--console-log",
            "boot.log",
            "--boot-protocol",
            "linux64",
            "--vcpus",
            "2",
        ])
        .unwrap();
        assert_eq!(
            args.linux.kernel.as_deref(),
            Some(std::path::Path::new("vmlinux"))
        );
        assert_eq!(args.linux.cmdline, "console=ttyS0");
        assert!(matches!(args.linux.boot_protocol, ProtocolArg::Linux64));
        let defaults = RunArgs::try_parse_from(["run", "--kernel", "vmlinux"]).unwrap();
        assert_eq!(defaults.linux.cmdline, crate::linux::DEFAULT_CMDLINE);
        assert!(defaults.linux.devices.is_empty());
        assert_eq!(cmdline_for(&defaults.linux), crate::linux::DEFAULT_CMDLINE);

        let with_devices = RunArgs::try_parse_from([
            "run",
            "--kernel",
            "vmlinux",
            "--device",
            "0000:3b:00.0",
            "--device",
            "0000:5e:00.1",
        ])
        .unwrap();
        assert_eq!(
            with_devices
                .linux
                .devices
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            vec!["0000:3b:00.0", "0000:5e:00.1"]
        );
        let line = cmdline_for(&with_devices.linux);
        assert!(
            !line.contains("pci=off") && line.starts_with("console=ttyS0"),
            "{line}"
        );
        assert!(RunArgs::try_parse_from(["run", "--kernel", "k", "--device", "3b:00"]).is_err());
        assert!(RunArgs::try_parse_from(["run", "--device", "0000:3b:00.0"]).is_err());
        assert!(RunArgs::try_parse_from(["run", "--kernel", "k", "--prompt", "hi"]).is_err());
        assert!(RunArgs::try_parse_from(["run", "--kernel", "k", "--model", "m.gguf"]).is_err());
        assert!(RunArgs::try_parse_from(["run", "--initrd", "initrd.img"]).is_err());
        assert!(RunArgs::try_parse_from(["run", "--cmdline", "quiet"]).is_err());
        let disks = RunArgs::try_parse_from([
            "run",
            "--kernel",
            "k",
            "--disk",
            "root.img",
            "--disk",
            "data.img,ro",
        ])
        .unwrap()
        .linux
        .disks;
        assert_eq!(disks.len(), 2);
        assert!(!disks[0].read_only && disks[1].read_only);
        assert!(RunArgs::try_parse_from(["run", "--kernel", "k", "--disk", "a,bad"]).is_err());
        assert!(RunArgs::try_parse_from(["run", "--disk", "root.img"]).is_err());
        // The partitions' isolation options apply to Linux guests too.
        let isolated = RunArgs::try_parse_from([
            "run",
            "--kernel",
            "k",
            "--hugepages",
            "--numa-node",
            "0",
            "--no-seccomp",
        ])
        .unwrap();
        assert!(isolated.hugepages && isolated.no_seccomp);
        assert_eq!(isolated.numa_node, Some(0));
    }

    #[test]
    fn missing_and_busy_disks_fail_before_anything_runs() {
        let dir = std::env::temp_dir();
        let kernel = dir.join(format!("aivmm-disk-kernel-{}", std::process::id()));
        std::fs::write(&kernel, "not a kernel").unwrap();
        let image = dir.join(format!("aivmm-disk-busy-{}", std::process::id()));
        std::fs::write(&image, [0u8; 4096]).unwrap();
        let mut args = LinuxArgs {
            console_log: Some(dir.join(format!("aivmm-disk-console-{}", std::process::id()))),
            disks: vec![DiskSpec {
                path: dir.join("aivmm-no-such-disk.img"),
                read_only: false,
            }],
            ..Default::default()
        };
        let error = run(&args, kernel.clone(), Resources::new(1, 64 << 20))
            .unwrap_err()
            .to_string();
        assert!(error.contains("aivmm-no-such-disk.img"), "{error}");
        let held = aivmm_devices::virtio::block::Block::open(&image, false).unwrap();
        args.disks[0] = DiskSpec {
            path: image.clone(),
            read_only: true,
        };
        let error = run(&args, kernel.clone(), Resources::new(1, 64 << 20))
            .unwrap_err()
            .to_string();
        assert!(error.contains("in use by another VM"), "{error}");
        drop(held);
        let error = run(&args, kernel.clone(), Resources::new(1, 64 << 20))
            .unwrap_err()
            .to_string();
        assert!(error.contains("is not a Linux kernel image"), "{error}");
        for path in [kernel, image, args.console_log.unwrap()] {
            let _ = std::fs::remove_file(path);
        }
    }

    #[test]
    fn bad_kernels_fail_before_anything_runs() {
        let args = LinuxArgs {
            console_log: Some(
                std::env::temp_dir().join(format!("aivmm-console-{}", std::process::id())),
            ),
            ..Default::default()
        };
        let text = std::env::temp_dir().join(format!("aivmm-not-a-kernel-{}", std::process::id()));
        std::fs::write(&text, "#!/bin/sh\necho hello\n").unwrap();
        let error = run(&args, text.clone(), Resources::new(1, 64 << 20))
            .unwrap_err()
            .to_string();
        assert!(error.contains("is not a Linux kernel image"), "{error}");
        let error = run(&args, text.clone(), Resources::new(1, 8 << 20))
            .unwrap_err()
            .to_string();
        assert!(error.contains("too small for a Linux guest"), "{error}");
        let error = run(&args, text.clone(), Resources::new(0, 64 << 20))
            .unwrap_err()
            .to_string();
        assert!(error.contains("1 to 254 vCPUs"), "{error}");
        std::fs::remove_file(&text).unwrap();
        let _ = std::fs::remove_file(args.console_log.unwrap());
    }
}
