//! The Linux guest boot path, with a real Debian kernel fetched (and cached)
//! by images/fetch-kernel.sh: what the loader builds in guest memory from
//! the real vmlinux and bzImage, the errors for bad input, and a boot under
//! this machine's KVM that reports how far the kernel gets (with the
//! busybox initramfs of images/make-initrd.sh and a virtio-blk disk).
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

use aivmm::isolation::{seccomp, ThreadKind};
use aivmm::linux::boot_cpu::Entry;
use aivmm::linux::boot_params::{
    BOOT_FLAG, CMDLINE_ADDR, HDRS_MAGIC, LOADER_UNDEFINED, ZERO_PAGE_ADDR,
};
use aivmm::linux::disk::DiskSpec;
use aivmm::linux::e820::create_guest_ram;
use aivmm::linux::loader::{KernelFormat, LoaderError};
use aivmm::linux::{
    e820, prepare_memory, BootProtocol, LinuxConfig, LinuxEnd, LinuxError, LinuxVm, Sample,
};
use aivmm::vstate::memory::RamBacking;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use common::debian_kernel as kernel;
use common::{fetched, run_image_script, seconds_from_env};

/// The marker the test initramfs's /init prints.
const INITRD_MARKER: &str = "AIVMM-TEST-INITRD";

/// The busybox initramfs (images/make-initrd.sh) with the test's marker
/// and the Debian kernel's virtio modules.
fn initrd(test: &str) -> Option<&'static PathBuf> {
    static INITRD: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let kernel = kernel(test)?;
    let result = INITRD.get_or_init(|| {
        let modules = kernel.modules.to_string_lossy().into_owned();
        // Rebuilt by each run (cheap), replaced atomically by the script.
        let out = dirs_cache().join("initrd/initrd-test.cpio");
        let out_arg = out.to_string_lossy().into_owned();
        let stdout = run_image_script(
            "make-initrd.sh",
            &[
                "--out",
                &out_arg,
                "--marker",
                INITRD_MARKER,
                "--modules",
                &modules,
            ],
        )?;
        if stdout.trim() != out_arg {
            return Err(format!(
                "images/make-initrd.sh printed {stdout:?}, not {out_arg}"
            ));
        }
        Ok(out)
    });
    fetched(test, result)
}

/// One member of a newc ("070701") cpio archive.
#[derive(Debug)]
struct CpioEntry {
    name: String,
    mode: u32,
    rdev: (u32, u32),
    data: Vec<u8>,
}

/// Reads a newc archive as the kernel's initramfs unpacker does: a 110-byte
/// header of hex fields, the NUL-terminated name and the data, each padded
/// to 4 bytes, until TRAILER!!!.
fn read_newc(bytes: &[u8]) -> Result<Vec<CpioEntry>, String> {
    let mut entries = Vec::new();
    let mut at = 0usize;
    let align = |n: usize| n.div_ceil(4) * 4;
    loop {
        let header = bytes
            .get(at..at + 110)
            .ok_or(format!("truncated header at {at}"))?;
        if &header[..6] != b"070701" {
            return Err(format!("bad magic at {at}: {:?}", &header[..6]));
        }
        let field = |i: usize| {
            let text =
                std::str::from_utf8(&header[6 + 8 * i..14 + 8 * i]).map_err(|e| e.to_string())?;
            u32::from_str_radix(text, 16).map_err(|e| format!("field {i} {text:?}: {e}"))
        };
        let (mode, size, namesize) = (field(1)?, field(6)? as usize, field(11)? as usize);
        let name_bytes = bytes
            .get(at + 110..at + 110 + namesize)
            .ok_or(format!("truncated name at {at}"))?;
        let name =
            String::from_utf8_lossy(name_bytes.strip_suffix(b"\0").ok_or("name without NUL")?)
                .into_owned();
        let data_at = align(at + 110 + namesize);
        let data = bytes
            .get(data_at..data_at + size)
            .ok_or(format!("truncated data of {name}"))?
            .to_vec();
        at = align(data_at + size);
        if name == "TRAILER!!!" {
            return Ok(entries);
        }
        entries.push(CpioEntry {
            name,
            mode,
            rdev: (field(9)?, field(10)?),
            data,
        });
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
        devices: Vec::new(),
        disks: Vec::new(),
        input: None,
        backing: RamBacking::Anonymous,
        numa_node: None,
        seccomp: true,
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
    let memory = create_guest_ram(memory_bytes, RamBacking::Anonymous, None).unwrap();
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
        let memory = create_guest_ram(memory_bytes, RamBacking::Anonymous, None).unwrap();
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
    let memory = create_guest_ram(64 << 20, RamBacking::Anonymous, None).unwrap();
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
        let memory = create_guest_ram(32 << 20, RamBacking::Anonymous, None).unwrap();
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
    let memory = create_guest_ram(256 << 20, RamBacking::Anonymous, None).unwrap();
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

/// Boots `image` on one vCPU until a line with `needle` is on the serial
/// console or the bound passes, prints how far it got (exits, RIP samples named by
/// AIVMM_LINUX_SYSTEM_MAP's symbols, the console), and checks what holds at
/// any emulated speed: the kernel ran from its entry point without faulting.
/// Returns whether `needle` was seen, and the console.
fn boot_and_report(
    test: &str,
    image: &Path,
    protocol: BootProtocol,
    needle: &str,
    timeout: Duration,
    customize: impl FnOnce(&mut LinuxConfig),
) -> (bool, String) {
    let mut config = config(image, 256 << 20);
    config.protocol = protocol;
    customize(&mut config);
    let vm = LinuxVm::start(config).unwrap_or_else(|error| panic!("{test}: {error}"));
    let entry = vm.layout.entry;
    // The whole line: the kernel prints it a byte at a time.
    let seen = vm.wait_until(timeout, Some(Duration::from_secs(1)), &mut |console| {
        let console = String::from_utf8_lossy(console);
        console
            .find(needle)
            .is_some_and(|at| console[at..].contains('\n'))
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
    let Some(initrd) = initrd(test) else {
        return;
    };
    // With the busybox initramfs and a disk attached, as a user reaching
    // for a shell boots it.
    let disk = std::env::temp_dir().join(format!("aivmm-boot-disk-{}.img", std::process::id()));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let timeout = seconds_from_env("AIVMM_LINUX_BOOT_TIMEOUT", 180);
    // The vCPU and disk threads run under their seccomp filters (config()).
    let refused =
        || [ThreadKind::LinuxVcpu, ThreadKind::LinuxDisks].map(|kind| seccomp::refused(kind).0);
    let refused_before = refused();
    // The early console replays the boot log: "Linux version", then the
    // command line the kernel got.
    let (seen, console) = boot_and_report(
        test,
        &kernel.vmlinux,
        protocol_from_env(),
        "Command line:",
        timeout,
        |config| {
            config.initrd = Some(initrd.clone());
            config.disks = vec![DiskSpec {
                path: disk.clone(),
                read_only: false,
            }];
        },
    );
    let _ = std::fs::remove_file(&disk);
    assert_eq!(refused(), refused_before, "the filters refused nothing");
    if seen {
        assert!(console.contains("Linux version 6."), "{console}");
        // The disk is in the DSDT (LNRO0005), not on the command line.
        assert!(!console.contains("virtio_mmio.device="), "{console}");
    }
}

/// images/make-initrd.sh writes a newc archive the kernel can unpack: /init
/// (executable, printing the marker and starting a shell on the console),
/// the static busybox, the console's device node. The listing of busybox's
/// own cpio applet agrees.
#[test]
fn the_busybox_initrd_holds_init_busybox_and_the_console() {
    let test = "the_busybox_initrd_holds_init_busybox_and_the_console";
    let Some(path) = initrd(test) else {
        return;
    };
    let bytes = std::fs::read(path).unwrap();
    let entries = read_newc(&bytes).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let entry = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("{name} is not in the archive: {entries:?}"))
    };
    let init = entry("init");
    assert_eq!(init.mode, 0o100755, "/init is an executable file");
    let script = String::from_utf8_lossy(&init.data);
    assert!(script.starts_with("#!/bin/busybox sh\n"), "{script}");
    assert!(
        script.contains(&format!("echo \"{INITRD_MARKER}:")),
        "{script}"
    );
    assert!(script.contains("mount -t proc proc /proc"), "{script}");
    assert!(script.contains("cttyhack sh"), "{script}");
    let busybox = entry("bin/busybox");
    assert_eq!(busybox.mode & 0o170111, 0o100111, "an executable file");
    assert_eq!(&busybox.data[..4], b"\x7fELF");
    assert!(
        busybox.data.len() > 500_000,
        "the static busybox, not a stub"
    );
    let console = entry("dev/console");
    assert_eq!((console.mode & 0o170000, console.rdev), (0o020000, (5, 1)));
    // Debian's kernel has the virtio drivers as modules: all four are in,
    // and /init loads them in dependency order.
    let kernel = kernel(test).expect("the initrd was built from its modules");
    let mut module_names = Vec::new();
    for module in ["virtio", "virtio_ring", "virtio_mmio", "virtio_blk"] {
        if kernel.modules.join(format!("{module}.ko")).exists() {
            let ko = entry(&format!("lib/modules/{module}.ko"));
            assert_eq!(&ko.data[..4], b"\x7fELF", "{module}.ko");
            module_names.push(module);
        }
    }
    assert!(
        script.contains("for module in virtio virtio_ring virtio_mmio virtio_blk; do"),
        "{script}"
    );
    eprintln!("{test}: modules in the initramfs: {module_names:?}");

    let listing = Command::new(dirs_cache().join("initrd/busybox-static/bin/busybox"))
        .args(["cpio", "-t"])
        .stdin(std::fs::File::open(path).unwrap())
        .output()
        .unwrap();
    assert!(listing.status.success(), "{listing:?}");
    let names: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let ours: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ours);
}

#[test]
fn make_initrd_refuses_bad_arguments_with_the_reason() {
    for (args, reason) in [
        (&["--modules", "/nonexistent-aivmm"][..], "not a directory"),
        (&["--marker", "two words"][..], "the marker may hold only"),
        (&["--out"][..], "--out needs a file name"),
        (&["--bogus"][..], "unknown argument --bogus"),
    ] {
        let error = run_image_script("make-initrd.sh", args).unwrap_err();
        assert!(error.contains(reason), "{args:?}: {error}");
    }
}

/// Where the image scripts cache what they fetch.
fn dirs_cache() -> PathBuf {
    std::env::var_os("AIVMM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/aivmm")
        })
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
        |_| {},
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

/// `aivmm run --kernel K --device BDF` with a real device of this machine:
/// the device preflight refuses it before anything boots, naming the device
/// and what the host must change (these machines have no IOMMU).
#[test]
fn device_passthrough_is_refused_before_boot_without_an_iommu() {
    let test = "device_passthrough_is_refused_before_boot_without_an_iommu";
    if !common::kvm_available(test) {
        return;
    }
    let Some(kernel) = kernel(test) else {
        return;
    };
    let mut devices: Vec<String> = std::fs::read_dir("/sys/bus/pci/devices")
        .map(|dir| {
            dir.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    devices.sort();
    let Some(bdf) = devices.first() else {
        eprintln!("{test}: SKIPPED: this machine has no PCI devices");
        return;
    };
    let iommu_on = std::fs::read_dir("/sys/kernel/iommu_groups")
        .map(|mut groups| groups.next().is_some())
        .unwrap_or(false);
    let log = std::env::temp_dir().join(format!("aivmm-device-console-{}", std::process::id()));
    let args = <aivmm::run::RunArgs as clap::Parser>::try_parse_from([
        "run",
        "--kernel",
        kernel.vmlinux.to_str().unwrap(),
        "--memory",
        "64M",
        "--device",
        bdf,
        "--console-log",
        log.to_str().unwrap(),
        "--timeout",
        "5",
    ])
    .unwrap();
    let started = std::time::Instant::now();
    let error = aivmm::run::cmd_run(args)
        .expect_err("a device on a host without VFIO must be refused")
        .to_string();
    eprintln!(
        "{test}: --device {bdf} refused in {:?}: {error}",
        started.elapsed()
    );
    assert!(error.starts_with(&format!("--device {bdf}: ")), "{error}");
    if iommu_on {
        // A host with an IOMMU: the device is not bound to vfio-pci here.
        assert!(error.contains("vfio"), "{error}");
    } else {
        assert!(error.contains("the IOMMU is not enabled"), "{error}");
        assert!(error.contains("intel_iommu=on"), "{error}");
    }
    // Nothing booted: the console log is empty.
    let console = std::fs::read(&log).unwrap_or_default();
    assert!(console.is_empty(), "{}", String::from_utf8_lossy(&console));
    let _ = std::fs::remove_file(&log);
}

/// A Linux guest gets the partitions' isolation: with hugepages and node 0
/// its RAM is on 2 MiB pages, bound to node 0 and populated in full before
/// the first KVM_RUN (checked in /proc/self/smaps and numa_maps), and its
/// vCPU threads run under their seccomp filter (Seccomp: 2 in
/// /proc/self/task/*/status) with nothing the kernel's first seconds make
/// them do refused.
#[test]
fn linux_guest_ram_is_on_prefaulted_hugepages_bound_to_its_node() {
    let test = "linux_guest_ram_is_on_prefaulted_hugepages_bound_to_its_node";
    if !common::kvm_available(test) {
        return;
    }
    let Some(kernel) = kernel(test) else {
        return;
    };
    // Enough for the kernel's image (74 MiB) and its initial page tables.
    let memory_bytes: u64 = 128 << 20;
    common::host::ensure_free_hugepages(
        memory_bytes / (2 << 20),
        &format!("a Linux guest of {} MiB", memory_bytes >> 20),
    );
    let mut config = config(&kernel.vmlinux, memory_bytes);
    config.backing = RamBacking::Hugepages;
    config.numa_node = Some(0);
    config.vcpus = 2;
    let refused_before = seccomp::refused(ThreadKind::LinuxVcpu).0;
    let vm = LinuxVm::start(config).unwrap_or_else(|error| panic!("{test}: {error}"));
    // The kernel runs a while (slowly where KVM emulates it: it may not
    // reach its first port access in this time).
    vm.wait_until(Duration::from_secs(3), None, &mut |_| false);
    let vcpu_threads: Vec<(String, String)> = common::host::tasks()
        .into_iter()
        .filter(|task| task.name.starts_with("linux-vcpu"))
        .map(|task| (task.name, task.seccomp_mode))
        .collect();
    let ram = vm.ram_mappings();
    let smaps = common::host::hugepage_mappings(memory_bytes);
    let numa_maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
    let outcome = vm.stop();
    assert_eq!(outcome.end, LinuxEnd::Stopped);
    // KVM_RUN ran (the stop interrupted it) and the registers were read
    // at the end, all under the filter.
    assert!(
        outcome.states.iter().all(Option::is_some),
        "{:?}",
        outcome.states
    );
    // Other tests of this binary may run guests at the same time.
    assert!(vcpu_threads.len() >= 2, "{vcpu_threads:?}");
    assert!(
        vcpu_threads.iter().all(|(_, mode)| mode == "2"),
        "every vCPU thread is filtered: {vcpu_threads:?}"
    );
    assert_eq!(
        seccomp::refused(ThreadKind::LinuxVcpu).0,
        refused_before,
        "nothing refused"
    );
    assert_eq!(ram.len(), 1, "{ram:x?}: below the 32-bit hole only");
    let (guest, host, size) = ram[0];
    assert_eq!((guest, size), (0, memory_bytes));
    let hugetlb_kb = smaps
        .iter()
        .find(|(start, _)| *start == host)
        .unwrap_or_else(|| panic!("guest RAM at {host:#x} is not on 2 MiB pages: {smaps:x?}"))
        .1;
    assert_eq!(hugetlb_kb, memory_bytes >> 10, "prefaulted in full");
    let line = numa_maps
        .lines()
        .find(|line| line.starts_with(&format!("{host:x} ")))
        .unwrap_or_else(|| panic!("{host:x} not in numa_maps"));
    assert!(line.contains("bind:0") && line.contains("huge"), "{line}");
    assert!(
        line.contains(&format!("N0={}", memory_bytes / (2 << 20))),
        "every page on node 0: {line}"
    );
}
