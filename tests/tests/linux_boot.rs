//! The Linux guest boot path, with a real Debian kernel fetched (and cached)
//! by images/fetch-kernel.sh: what the loader builds in guest memory from
//! the real vmlinux and bzImage, the errors for bad input, and a boot under
//! this machine's KVM that reports how far the kernel gets.
//!
//! Fetching the kernel needs apt and the network: outside CI a failure to
//! fetch is a printed skip, under CI (CI set) it is a test failure.
//! AIVMM_LINUX_BOOT_TIMEOUT (seconds, default 180) bounds the KVM boot of
//! the vmlinux (it printed "Linux version" after 63 s on a loaded 2-core
//! PVM host);
//! AIVMM_LINUX_BOOT_PROTOCOL (auto, linux64, pvh) picks its entry point;
//! AIVMM_LINUX_SYSTEM_MAP names a System.map (`nm` of the -dbg package's
//! vmlinux: Debian's own System.map is a stub) to name the functions the
//! RIP samples are in.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use aivmm::linux::boot_cpu::Entry;
use aivmm::linux::boot_params::{
    BOOT_FLAG, CMDLINE_ADDR, HDRS_MAGIC, LOADER_UNDEFINED, ZERO_PAGE_ADDR,
};
use aivmm::linux::e820::create_guest_ram;
use aivmm::linux::loader::{KernelFormat, LoaderError};
use aivmm::linux::{
    e820, prepare_memory, BootProtocol, LinuxConfig, LinuxEnd, LinuxError, LinuxVm, Sample,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

struct Kernel {
    bzimage: PathBuf,
    vmlinux: PathBuf,
}

/// The Debian kernel, or None (with a printed reason) when it cannot be
/// fetched outside CI.
fn kernel(test: &str) -> Option<&'static Kernel> {
    static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();
    let result = KERNEL.get_or_init(|| {
        let out = Command::new(common::repo_root().join("images/fetch-kernel.sh"))
            .output()
            .map_err(|error| format!("cannot run images/fetch-kernel.sh: {error}"))?;
        if !out.status.success() {
            return Err(format!(
                "images/fetch-kernel.sh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        let (Some(bzimage), Some(vmlinux)) = (lines.next(), lines.next()) else {
            return Err(format!("images/fetch-kernel.sh printed {stdout:?}"));
        };
        Ok(Kernel {
            bzimage: PathBuf::from(bzimage),
            vmlinux: PathBuf::from(vmlinux),
        })
    });
    match result {
        Ok(kernel) => Some(kernel),
        Err(reason) if common::in_ci() => panic!("{test}: {reason}"),
        Err(reason) => {
            eprintln!("{test}: SKIPPED: {reason} (set CI=true to make this a failure)");
            None
        }
    }
}

fn config(kernel: &Path, memory_bytes: u64) -> LinuxConfig {
    LinuxConfig {
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline: "earlyprintk=serial,ttyS0,115200 console=ttyS0 reboot=k panic=1 pci=off".into(),
        vcpus: 1,
        memory_bytes,
        host_cpus: None,
        protocol: BootProtocol::Auto,
        console: None,
        console_capture_limit: 1 << 20,
        disks: Vec::new(),
        input: None,
    }
}

fn read(memory: &GuestMemoryMmap, addr: u64, buf: &mut [u8]) {
    memory.read_slice(buf, GuestAddress(addr)).unwrap();
}
fn read_u8(memory: &GuestMemoryMmap, addr: u64) -> u8 {
    let mut b = [0u8; 1];
    read(memory, addr, &mut b);
    b[0]
}
fn read_u16(memory: &GuestMemoryMmap, addr: u64) -> u16 {
    let mut b = [0u8; 2];
    read(memory, addr, &mut b);
    u16::from_le_bytes(b)
}
fn read_u32(memory: &GuestMemoryMmap, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    read(memory, addr, &mut b);
    u32::from_le_bytes(b)
}
fn read_u64(memory: &GuestMemoryMmap, addr: u64) -> u64 {
    let mut b = [0u8; 8];
    read(memory, addr, &mut b);
    u64::from_le_bytes(b)
}

fn file_u16(bytes: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
}
fn file_u32(bytes: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
}

#[test]
fn debian_bzimage_is_loaded_with_its_own_setup_header() {
    let Some(kernel) = kernel("debian_bzimage_is_loaded_with_its_own_setup_header") else {
        return;
    };
    let file = std::fs::read(&kernel.bzimage).unwrap();
    let memory_bytes = 256 << 20;
    let memory = create_guest_ram(memory_bytes).unwrap();
    let initrd_path = std::env::temp_dir().join(format!("aivmm-initrd-{}", std::process::id()));
    let initrd_bytes: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(&initrd_path, &initrd_bytes).unwrap();
    let mut config = config(&kernel.bzimage, memory_bytes);
    config.initrd = Some(initrd_path.clone());
    let layout = prepare_memory(&memory, &config).unwrap();
    std::fs::remove_file(&initrd_path).unwrap();

    // What the real bzImage says about itself (boot.rst offsets).
    let version = file_u16(&file, 0x206);
    let loadflags = file[0x211];
    let xloadflags = file_u16(&file, 0x236);
    eprintln!(
        "{}: boot protocol {version:#x}, loadflags {loadflags:#x}, xloadflags {xloadflags:#x}, setup_sects {}, init_size {:#x}",
        kernel.bzimage.display(),
        file[0x1f1],
        file_u32(&file, 0x260)
    );
    assert!(version >= 0x020c, "boot protocol {version:#x}");
    assert_eq!(loadflags & 1, 1, "LOADED_HIGH");
    assert_eq!(xloadflags & 1, 1, "XLF_KERNEL_64");
    assert_eq!(file_u16(&file, 0x1fe), BOOT_FLAG);

    assert_eq!(layout.kernel.format, KernelFormat::BzImage);
    assert_eq!(layout.kernel.load_start, 0x10_0000);
    assert_eq!(
        layout.entry,
        Entry::Linux64 {
            rip: 0x10_0200,
            zero_page: ZERO_PAGE_ADDR
        }
    );
    let pref = u64::from_le_bytes(file[0x258..0x260].try_into().unwrap());
    assert!(
        layout.kernel.load_end >= pref + file_u32(&file, 0x260) as u64,
        "room to decompress"
    );

    // The zero page in guest memory: the image's header plus the loader's fields.
    let zp = ZERO_PAGE_ADDR;
    assert_eq!(read_u8(&memory, zp + 0x1f1), file[0x1f1], "setup_sects");
    assert_eq!(read_u16(&memory, zp + 0x1fe), BOOT_FLAG);
    assert_eq!(read_u32(&memory, zp + 0x202), HDRS_MAGIC);
    assert_eq!(read_u16(&memory, zp + 0x206), version);
    assert_eq!(read_u8(&memory, zp + 0x210), LOADER_UNDEFINED);
    assert_eq!(read_u8(&memory, zp + 0x211), loadflags);
    assert_eq!(read_u32(&memory, zp + 0x214), 0x10_0000, "code32_start");
    assert_eq!(read_u32(&memory, zp + 0x228), CMDLINE_ADDR as u32);
    assert_eq!(read_u16(&memory, zp + 0x236), xloadflags);
    assert_eq!(
        read_u32(&memory, zp + 0x22c),
        file_u32(&file, 0x22c),
        "initrd_addr_max"
    );
    let (initrd_addr, initrd_size) = layout.initrd.unwrap();
    assert_eq!(read_u32(&memory, zp + 0x218) as u64, initrd_addr);
    assert_eq!(read_u32(&memory, zp + 0x21c) as u64, initrd_size);
    assert_eq!(initrd_size, initrd_bytes.len() as u64);
    assert_eq!(initrd_addr % 4096, 0);
    assert!(initrd_addr >= layout.kernel.load_end);
    assert!(initrd_addr + initrd_size <= memory_bytes);
    let mut loaded = vec![0u8; initrd_bytes.len()];
    read(&memory, initrd_addr, &mut loaded);
    assert!(loaded == initrd_bytes, "initrd bytes in guest memory");

    let map = e820::memory_map(memory_bytes).unwrap();
    assert_eq!(read_u8(&memory, zp + 0x1e8) as usize, map.len());
    let last = map.last().unwrap();
    let slot = zp + 0x2d0 + 20 * (map.len() as u64 - 1);
    assert_eq!(
        (read_u64(&memory, slot), read_u64(&memory, slot + 8)),
        (last.addr, last.size)
    );
    // The protected-mode code follows the setup sectors in the file.
    let setup = (file[0x1f1] as usize + 1) * 512;
    let mut code = vec![0u8; 4096];
    read(&memory, 0x10_0000, &mut code);
    assert!(
        code == file[setup..setup + 4096],
        "bzImage payload at 1 MiB"
    );
    let mut line = vec![0u8; config.cmdline.len() + 1];
    read(&memory, CMDLINE_ADDR, &mut line);
    assert_eq!(&line[..config.cmdline.len()], config.cmdline.as_bytes());
    assert_eq!(line[config.cmdline.len()], 0);
}

#[test]
fn debian_vmlinux_loads_at_its_physical_addresses_with_both_entries() {
    let Some(kernel) = kernel("debian_vmlinux_loads_at_its_physical_addresses_with_both_entries")
    else {
        return;
    };
    let file = std::fs::read(&kernel.vmlinux).unwrap();
    let memory_bytes = 256 << 20;
    let entry = u64::from_le_bytes(file[24..32].try_into().unwrap());
    for protocol in [BootProtocol::Auto, BootProtocol::Linux64, BootProtocol::Pvh] {
        let memory = create_guest_ram(memory_bytes).unwrap();
        let mut config = config(&kernel.vmlinux, memory_bytes);
        config.protocol = protocol;
        let layout = prepare_memory(&memory, &config).unwrap();
        assert_eq!(layout.kernel.format, KernelFormat::Elf);
        assert_eq!(layout.kernel.entry_64, entry);
        assert_eq!(
            layout.kernel.load_start, 0x100_0000,
            "CONFIG_PHYSICAL_START"
        );
        let pvh = layout
            .kernel
            .pvh_entry
            .expect("Debian kernels have CONFIG_PVH");
        assert!((layout.kernel.load_start..layout.kernel.load_end).contains(&pvh));
        match (protocol, layout.entry) {
            (BootProtocol::Linux64, Entry::Linux64 { rip, zero_page }) => {
                assert_eq!((rip, zero_page), (entry, ZERO_PAGE_ADDR));
            }
            (BootProtocol::Auto | BootProtocol::Pvh, Entry::Pvh { rip, start_info }) => {
                assert_eq!(rip, pvh);
                assert_eq!(
                    read_u32(&memory, start_info),
                    0x336e_c578,
                    "hvm_start_info magic"
                );
                assert_eq!(read_u64(&memory, start_info + 24), CMDLINE_ADDR);
            }
            other => panic!("unexpected entry {other:?}"),
        }
        // The first PT_LOAD segment's bytes at its physical address.
        let phoff = u64::from_le_bytes(file[32..40].try_into().unwrap()) as usize;
        let offset = u64::from_le_bytes(file[phoff + 8..phoff + 16].try_into().unwrap()) as usize;
        let paddr = u64::from_le_bytes(file[phoff + 24..phoff + 32].try_into().unwrap());
        let mut code = vec![0u8; 4096];
        read(&memory, paddr, &mut code);
        assert!(
            code == file[offset..offset + 4096],
            "segment 0 at {paddr:#x}"
        );
        // The zero page has no setup header of the image, only the magic.
        assert_eq!(read_u16(&memory, ZERO_PAGE_ADDR + 0x1fe), BOOT_FLAG);
        assert_eq!(read_u32(&memory, ZERO_PAGE_ADDR + 0x202), HDRS_MAGIC);
        assert_eq!(
            read_u16(&memory, ZERO_PAGE_ADDR + 0x206),
            0,
            "no protocol version claimed"
        );
        // The MP table's floating pointer, where Linux scans for it.
        assert_eq!(read_u32(&memory, 0xf_0000), u32::from_le_bytes(*b"_MP_"));
    }
}

#[test]
fn bad_kernels_and_initrds_are_refused_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("aivmm-linux-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("not-a-kernel");
    std::fs::write(&text, "just some text, no kernel here\n".repeat(40)).unwrap();
    let memory = create_guest_ram(64 << 20).unwrap();
    let error = prepare_memory(&memory, &config(&text, 64 << 20)).unwrap_err();
    assert!(
        matches!(error, LinuxError::Loader(LoaderError::NotAKernel { .. })),
        "{error}"
    );
    assert!(
        error.to_string().contains("not a Linux kernel image"),
        "{error}"
    );
    let missing = dir.join("missing");
    let error = prepare_memory(&memory, &config(&missing, 64 << 20)).unwrap_err();
    assert!(
        matches!(error, LinuxError::Loader(LoaderError::Open { .. })),
        "{error}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    let Some(kernel) = kernel("bad_kernels_and_initrds_are_refused_with_the_reason") else {
        return;
    };
    // The Debian kernel does not fit in 32 MiB.
    for image in [&kernel.vmlinux, &kernel.bzimage] {
        let memory = create_guest_ram(32 << 20).unwrap();
        let error = prepare_memory(&memory, &config(image, 32 << 20)).unwrap_err();
        assert!(
            matches!(error, LinuxError::Loader(LoaderError::TooLarge { .. })),
            "{error}"
        );
        assert!(
            error.to_string().contains("give the guest more --memory"),
            "{error}"
        );
    }
    let memory = create_guest_ram(256 << 20).unwrap();
    let mut with_initrd = config(&kernel.vmlinux, 256 << 20);
    with_initrd.initrd = Some("/nonexistent/initrd.img".into());
    let error = prepare_memory(&memory, &with_initrd).unwrap_err();
    assert!(
        matches!(error, LinuxError::Loader(LoaderError::InitrdOpen { .. })),
        "{error}"
    );
    assert!(
        error.to_string().contains("/nonexistent/initrd.img"),
        "{error}"
    );
    // PVH cannot be forced on a bzImage.
    let mut pvh = config(&kernel.bzimage, 256 << 20);
    pvh.protocol = BootProtocol::Pvh;
    assert!(matches!(
        prepare_memory(&memory, &pvh),
        Err(LinuxError::NoPvhEntry)
    ));
}

/// System.map as (address, name), sorted.
fn system_map(path: &Path) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut symbols: Vec<(u64, String)> = text
        .lines()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
            let kind = parts.next()?;
            let name = parts.next()?;
            matches!(kind, "T" | "t").then(|| (addr, name.to_string()))
        })
        .collect();
    symbols.sort();
    symbols
}

/// "function+0xoffset" for a guest RIP, physical (before the kernel runs on
/// its high mapping) or virtual.
fn symbolize(symbols: &[(u64, String)], rip: u64) -> String {
    const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
    let virt = if rip < START_KERNEL_MAP {
        rip.wrapping_add(START_KERNEL_MAP)
    } else {
        rip
    };
    match symbols
        .partition_point(|(addr, _)| *addr <= virt)
        .checked_sub(1)
    {
        // Far past the last symbol below it: not kernel text (the decompressor, say).
        Some(i) if virt - symbols[i].0 < 0x1_0000 => {
            format!("{}+{:#x}", symbols[i].1, virt - symbols[i].0)
        }
        _ => "?".into(),
    }
}

fn seconds_from_env(name: &str, default: u64) -> Duration {
    Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}

/// Boots `image` on one vCPU until `needle` appears on the serial console
/// or the bound passes, prints how far it got (exits, RIP samples named by
/// AIVMM_LINUX_SYSTEM_MAP's symbols, the console), and checks what holds at
/// any emulated speed: the kernel ran from its entry point without faulting.
/// Returns whether `needle` was seen, and the console.
fn boot_and_report(
    test: &str,
    image: &Path,
    protocol: BootProtocol,
    needle: &str,
    timeout: Duration,
) -> (bool, String) {
    let mut config = config(image, 256 << 20);
    config.protocol = protocol;
    let vm = LinuxVm::start(config).unwrap_or_else(|error| panic!("{test}: {error}"));
    let entry = vm.layout.entry;
    let seen = vm.wait_until(timeout, Some(Duration::from_secs(1)), &mut |console| {
        String::from_utf8_lossy(console).contains(needle)
    });
    let outcome = vm.stop();

    let symbols = std::env::var_os("AIVMM_LINUX_SYSTEM_MAP")
        .map(|path| system_map(Path::new(&path)))
        .unwrap_or_default();
    let console = String::from_utf8_lossy(&outcome.console).into_owned();
    eprintln!("--- {test}: {} ({entry:x?}) ---", image.display());
    eprintln!(
        "{needle:?} on the serial console: {} after {:.1} s (bound {} s); end: {}",
        if seen { "SEEN" } else { "NOT SEEN" },
        outcome.elapsed.as_secs_f64(),
        timeout.as_secs(),
        outcome.end
    );
    eprintln!(
        "exits of vCPU 0: {:?}; {} console bytes; {} unanswered port accesses",
        outcome.exits[0], outcome.console_total, outcome.unhandled_ports
    );
    let samples: &[Sample] = &outcome.samples[0];
    let mut last = None;
    for sample in samples {
        let name = symbolize(&symbols, sample.state.rip);
        // One line per function entered (per sample without symbols).
        let function = name.split('+').next().unwrap_or("?").to_string();
        if symbols.is_empty() || last.as_ref() != Some(&function) {
            eprintln!(
                "  {:6.1} s  RIP {:#018x} {name} (CR0 {:#x} CR4 {:#x} EFER {:#x})",
                sample.at.as_secs_f64(),
                sample.state.rip,
                sample.state.cr0,
                sample.state.cr4,
                sample.state.efer
            );
            last = Some(function);
        }
    }
    if let Some(state) = outcome.states[0] {
        eprintln!(
            "  final  RIP {:#018x} {} RSP {:#x} CR0 {:#x} CR3 {:#x} CR4 {:#x} EFER {:#x}",
            state.rip,
            symbolize(&symbols, state.rip),
            state.rsp,
            state.cr0,
            state.cr3,
            state.cr4,
            state.efer
        );
    }
    eprintln!(
        "serial console ({} bytes):\n{console}\n--- end of console ---",
        outcome.console.len()
    );

    assert!(
        matches!(outcome.end, LinuxEnd::Stopped | LinuxEnd::Reset),
        "the guest failed: {}",
        outcome.end
    );
    let state = outcome.states[0].expect("vCPU 0's registers at the end");
    assert_ne!(state.rip, entry.rip(), "the vCPU left the entry point");
    assert!(
        samples.iter().any(|s| s.state.rip != entry.rip()) || seen,
        "RIP samples show the kernel running"
    );
    (seen, console)
}

fn protocol_from_env() -> BootProtocol {
    match std::env::var("AIVMM_LINUX_BOOT_PROTOCOL").as_deref() {
        Ok("linux64") => BootProtocol::Linux64,
        Ok("pvh") => BootProtocol::Pvh,
        _ => BootProtocol::Auto,
    }
}

#[test]
fn debian_vmlinux_boots_under_kvm_towards_its_first_console_line() {
    let test = "debian_vmlinux_boots_under_kvm_towards_its_first_console_line";
    if !common::kvm_available(test) {
        return;
    }
    let Some(kernel) = kernel(test) else {
        return;
    };
    let timeout = seconds_from_env("AIVMM_LINUX_BOOT_TIMEOUT", 180);
    let (seen, console) = boot_and_report(
        test,
        &kernel.vmlinux,
        protocol_from_env(),
        "Linux version",
        timeout,
    );
    if seen {
        assert!(console.contains("Linux version 6."), "{console}");
    }
}

/// The bzImage's own decompressor runs first: it relocates itself to the
/// end of its buffer (pref_address + init_size) and programs the serial port
/// for earlyprintk, then unpacks 65 MB of xz, which at the emulated speed of
/// CPL0 code on PVM hosts takes far longer than any test bound. Debian builds
/// without CONFIG_X86_VERBOSE_BOOTUP, so the decompressor prints nothing; the
/// kernel's "Linux version" comes after decompression. The bound is
/// AIVMM_LINUX_BZIMAGE_TIMEOUT (seconds, default 20).
#[test]
fn debian_bzimage_boots_under_kvm_into_its_decompressor() {
    let test = "debian_bzimage_boots_under_kvm_into_its_decompressor";
    if !common::kvm_available(test) {
        return;
    }
    let Some(kernel) = kernel(test) else {
        return;
    };
    let timeout = seconds_from_env("AIVMM_LINUX_BZIMAGE_TIMEOUT", 20);
    boot_and_report(
        test,
        &kernel.bzimage,
        BootProtocol::Linux64,
        "Linux version",
        timeout,
    );
}

/// Two vCPUs: the boot vCPU runs the kernel while the other waits in KVM's
/// local APIC for the INIT/SIPI that smp_init would send (far beyond what
/// the emulated speed reaches in a test); stopping the VM interrupts both.
#[test]
fn a_second_vcpu_waits_for_the_kernel_and_stops_with_the_vm() {
    let test = "a_second_vcpu_waits_for_the_kernel_and_stops_with_the_vm";
    if !common::kvm_available(test) {
        return;
    }
    let Some(kernel) = kernel(test) else {
        return;
    };
    let mut config = config(&kernel.vmlinux, 256 << 20);
    config.vcpus = 2;
    let vm = LinuxVm::start(config).unwrap_or_else(|error| panic!("{test}: {error}"));
    let entry = vm.layout.entry.rip();
    vm.wait_until(
        Duration::from_secs(5),
        Some(Duration::from_secs(1)),
        &mut |_| false,
    );
    let outcome = vm.stop();
    eprintln!(
        "{test}: {}; exits {:?}; states {:x?}",
        outcome.end, outcome.exits, outcome.states
    );
    assert_eq!(outcome.end, LinuxEnd::Stopped);
    assert_eq!(outcome.states.len(), 2);
    let bsp = outcome.states[0].expect("vCPU 0's registers");
    assert_ne!(bsp.rip, entry, "the boot vCPU runs the kernel");
    let ap = outcome.states[1].expect("vCPU 1's registers");
    assert_eq!(
        ap.cr0 & 1,
        0,
        "vCPU 1 is still in its reset state (real mode)"
    );
    assert_eq!(outcome.exits[1].io_in + outcome.exits[1].io_out, 0);
}
