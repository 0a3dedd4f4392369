//! Linux partitions in the daemon: what one boots, checked before it is
//! placed (a kernel that is not a vmlinux or bzImage is refused naming the
//! file), and its boot on the placed cores with the serial console in a log
//! file under the daemon's state directory.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aivmm_api::types::{
    BootProtocol as ApiProtocol, ConsoleTail, LinuxDisk, LinuxExits, LinuxSpec,
};
use aivmm_api::{ApiError, ErrorCode};
use aivmm_devices::virtio::block::{Block, BlockError};
use aivmm_passthrough::bdf::Bdf;

use crate::isolation::{CgroupScope, CgroupSpec, PartitionCgroup, ThreadIsolation, ThreadKind};
use crate::linux::disk::DiskSpec;
use crate::linux::{default_cmdline, loader, BootProtocol, LinuxConfig, LinuxEnd, LinuxVm};
use crate::vstate::memory::RamBacking;

/// Guest memory of a Linux partition when `memory_mib` is not given.
pub const DEFAULT_MEMORY_MIB: u64 = 512;

/// Everything needed to boot (and reboot) a Linux partition.
#[derive(Debug, Clone)]
pub struct LinuxPlan {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub protocol: BootProtocol,
    /// Claimed by the manager, passed through to the guest.
    pub devices: Vec<Bdf>,
    /// virtio-blk disks (canonical paths), locked at each boot.
    pub disks: Vec<DiskSpec>,
    pub vcpus: u32,
    /// One per vCPU, from the placer (empty until placed).
    pub host_cpus: Vec<usize>,
    pub numa_node: Option<u32>,
    pub memory_bytes: u64,
    /// Guest RAM on 2 MiB hugepages (from the placed node's pool).
    pub hugepages: bool,
    /// Where the serial console goes (rewritten at every boot).
    pub console_log: PathBuf,
}

/// Checks what `linux` names and sizes the partition; the placer fills in
/// the host CPUs and node.
pub fn plan(
    linux: &LinuxSpec,
    devices: &[String],
    vcpus: u32,
    memory_mib: Option<u64>,
    hugepages: bool,
    console_log: PathBuf,
) -> Result<LinuxPlan, ApiError> {
    let kernel = PathBuf::from(&linux.kernel);
    check_kernel(&kernel)?;
    let initrd = linux.initrd.as_ref().map(PathBuf::from);
    if let Some(initrd) = &initrd {
        let file =
            open_regular_file(initrd).map_err(|why| ApiError::invalid("linux.initrd", why))?;
        if file.metadata().map_or(0, |meta| meta.len()) == 0 {
            return Err(ApiError::invalid(
                "linux.initrd",
                format!("{} is empty", initrd.display()),
            ));
        }
    }
    let disks = linux
        .disks
        .iter()
        .map(check_disk)
        .collect::<Result<Vec<_>, _>>()?;
    let devices = devices
        .iter()
        .map(|text| {
            text.parse::<Bdf>()
                .map_err(|error| ApiError::invalid("devices", error.to_string()))
        })
        .collect::<Result<Vec<Bdf>, ApiError>>()?;
    let memory_bytes = memory_mib
        .unwrap_or(DEFAULT_MEMORY_MIB)
        .checked_mul(1 << 20)
        .ok_or_else(|| ApiError::invalid("memory_mib", "is larger than any host's memory"))?;
    let min = crate::linux::e820::MIN_MEMORY;
    if memory_bytes < min {
        return Err(ApiError::invalid(
            "memory_mib",
            format!("a Linux guest needs at least {} MiB", min >> 20),
        ));
    }
    Ok(LinuxPlan {
        kernel,
        initrd,
        cmdline: linux
            .cmdline
            .clone()
            .unwrap_or_else(|| default_cmdline(!devices.is_empty())),
        protocol: match linux.boot_protocol {
            ApiProtocol::Auto => BootProtocol::Auto,
            ApiProtocol::Linux64 => BootProtocol::Linux64,
            ApiProtocol::Pvh => BootProtocol::Pvh,
        },
        devices,
        disks,
        vcpus,
        host_cpus: Vec::new(),
        numa_node: None,
        memory_bytes,
        hugepages,
        console_log,
    })
}

/// The kernel file is readable and a vmlinux ELF or a bzImage (from its
/// magic numbers; the full load happens at boot).
fn check_kernel(kernel: &Path) -> Result<(), ApiError> {
    let invalid = |why: String| ApiError::invalid("linux.kernel", why);
    let file = open_regular_file(kernel).map_err(invalid)?;
    let mut head = Vec::with_capacity(4096);
    file.take(4096)
        .read_to_end(&mut head)
        .map_err(|error| invalid(format!("cannot read {}: {error}", kernel.display())))?;
    loader::detect(kernel, &head)
        .map(|_| ())
        .map_err(|error| invalid(error.to_string()))
}

/// A disk of the spec: a regular file or a block device (checked before the
/// open, which would wait on a FIFO), openable as asked and not locked by
/// another VM right now (the lock itself is taken at each boot). A disk
/// some process holds is a conflict (409), anything else a bad request.
fn check_disk(disk: &LinuxDisk) -> Result<DiskSpec, ApiError> {
    use std::os::unix::fs::FileTypeExt;
    let invalid = |why: String| ApiError::invalid("linux.disks", why);
    let path = Path::new(&disk.path);
    let meta = std::fs::metadata(path)
        .map_err(|error| invalid(format!("cannot read {}: {error}", path.display())))?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(invalid(format!(
            "{} is neither a disk image (a regular file) nor a block device",
            path.display()
        )));
    }
    let path = path
        .canonicalize()
        .map_err(|error| invalid(format!("cannot read {}: {error}", path.display())))?;
    match Block::open(&path, disk.read_only) {
        Ok(_probe) => {}
        Err(error @ BlockError::Locked { .. }) => {
            return Err(ApiError {
                code: ErrorCode::Conflict,
                message: format!("linux.disks: {error}"),
                param: Some("linux.disks".into()),
            })
        }
        Err(error) => return Err(invalid(error.to_string())),
    }
    Ok(DiskSpec {
        path,
        read_only: disk.read_only,
    })
}

/// Opens `path` if it is a regular file (checked before the open, which
/// would wait on a FIFO); the error says why not.
fn open_regular_file(path: &Path) -> Result<File, String> {
    let cannot = |error: std::io::Error| format!("cannot read {}: {error}", path.display());
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    File::open(path).map_err(cannot)
}

/// A booted Linux guest and the cgroup its vCPU threads run in.
pub struct LinuxRun {
    pub vm: LinuxVm,
    // Dropped after the VM has stopped (its threads have left it).
    cgroup: Option<Arc<PartitionCgroup>>,
}

impl LinuxRun {
    /// Exits of all vCPUs, summed.
    pub fn exits(&self, vcpus: u32) -> LinuxExits {
        let mut sum = LinuxExits::default();
        for index in 0..vcpus as usize {
            let exits = self.vm.exits(index);
            sum.io_in += exits.io_in;
            sum.io_out += exits.io_out;
            sum.mmio += exits.mmio;
        }
        sum
    }

    /// Stops the guest (if it still runs) and says how it ended.
    pub fn stop(self) -> LinuxEnd {
        let outcome = self.vm.stop();
        drop(self.cgroup);
        outcome.end
    }
}

/// Whether a guest that ended this way ended normally (stopped by the VMM,
/// powered off or rebooted) rather than failed.
pub fn ended_cleanly(end: &LinuxEnd) -> bool {
    matches!(
        end,
        LinuxEnd::Stopped | LinuxEnd::PowerOff | LinuxEnd::Reset
    )
}

/// Boots `plan` for partition `id` (cgroup named `cgroup_name`, if any). The
/// boot runs on a thread of its own that joins the partition's cgroup first:
/// the vCPU threads it creates inherit the cgroup, then pin themselves to
/// their host CPU each and install their seccomp filter (unless `aivmm
/// serve --no-seccomp`), as the disk thread does.
pub fn boot(plan: &LinuxPlan, cgroup_name: Option<String>) -> Result<LinuxRun, String> {
    // The tenant's console is the tenant's: readable by the daemon's user only.
    let console = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&plan.console_log)
        .map_err(|error| {
            format!(
                "cannot create the console log {}: {error}",
                plan.console_log.display()
            )
        })?;
    let cgroup = match cgroup_name {
        Some(name) => Some(Arc::new(
            PartitionCgroup::create(&CgroupSpec {
                name,
                scope: CgroupScope::Threads,
                cpus: plan.host_cpus.clone(),
                mems: plan
                    .numa_node
                    .map_or_else(crate::vstate::memory::online_nodes, |node| vec![node]),
                memory_limit: None,
            })
            .map_err(|error| error.to_string())?,
        )),
        None => None,
    };
    let config = LinuxConfig {
        kernel: plan.kernel.clone(),
        initrd: plan.initrd.clone(),
        cmdline: plan.cmdline.clone(),
        vcpus: plan.vcpus,
        memory_bytes: plan.memory_bytes,
        host_cpus: Some(plan.host_cpus.clone()),
        protocol: plan.protocol,
        console: Some(Box::new(console)),
        console_capture_limit: 0,
        devices: plan.devices.clone(),
        disks: plan.disks.clone(),
        // The console goes to the log file; there is no input to give it.
        input: None,
        backing: RamBacking::with_hugepages(plan.hugepages),
        numa_node: plan.numa_node,
        // The vCPU, disk (and serial input) threads install their own.
        seccomp: super::worker::seccomp_enabled(),
    };
    // The boot thread opens the kernel, disks and devices: it gets the
    // cgroup and pinning, and the VM's own threads their filters.
    let isolation = ThreadIsolation {
        cgroup: cgroup.clone(),
        seccomp: false,
    };
    let host_cpus = plan.host_cpus.clone();
    let vm = std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("linux-boot".into())
            .spawn_scoped(scope, move || {
                isolation
                    .enter(ThreadKind::LinuxVcpu, Some(&host_cpus))
                    .map_err(|error| error.to_string())?;
                LinuxVm::start(config).map_err(|error| error.to_string())
            })
            .map_err(|error| format!("cannot start the boot thread: {error}"))?
            .join()
            .unwrap_or_else(|_| Err("the boot thread panicked".into()))
    })?;
    Ok(LinuxRun { vm, cgroup })
}

/// The last `bytes` bytes (at most) of the console log at `path`.
pub fn console_tail(id: &str, path: &Path, bytes: u64) -> Result<ConsoleTail, ApiError> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            // Never booted: an empty log.
            return Ok(ConsoleTail {
                partition: id.into(),
                size_bytes: 0,
                offset: 0,
                text: String::new(),
            });
        }
        Err(error) => {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("cannot read the console log {}: {error}", path.display()),
            ))
        }
    };
    let read_error = |error: std::io::Error| {
        ApiError::new(
            ErrorCode::Internal,
            format!("cannot read the console log {}: {error}", path.display()),
        )
    };
    let size = file.metadata().map_err(read_error)?.len();
    let offset = size.saturating_sub(bytes);
    file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
    let mut text = Vec::new();
    file.take(bytes)
        .read_to_end(&mut text)
        .map_err(read_error)?;
    Ok(ConsoleTail {
        partition: id.into(),
        size_bytes: size,
        offset,
        text: String::from_utf8_lossy(&text).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::daemon::Scratch;

    fn spec(kernel: &Path) -> LinuxSpec {
        LinuxSpec {
            kernel: kernel.display().to_string(),
            initrd: None,
            cmdline: None,
            boot_protocol: ApiProtocol::Auto,
            disks: Vec::new(),
        }
    }

    #[test]
    fn kernels_that_cannot_boot_are_refused_naming_the_file() {
        let dir = Scratch::new("plan");
        let log = dir.path().join("console.log");
        let missing = dir.path().join("vmlinuz-missing");
        let error = plan(&spec(&missing), &[], 1, None, false, log.clone()).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("linux.kernel"));
        assert!(
            error.message.contains("vmlinuz-missing") && error.message.contains("cannot read"),
            "{error}"
        );

        let script = dir.path().join("not-a-kernel");
        std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
        let error = plan(&spec(&script), &[], 1, None, false, log.clone()).unwrap_err();
        assert!(
            error
                .message
                .contains("not-a-kernel is not a Linux kernel image"),
            "{error}"
        );

        // A minimal ELF header passes the check (the full load is at boot).
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        let mut linux = spec(&elf);
        linux.initrd = Some(dir.path().join("no-initrd").display().to_string());
        let error = plan(&linux, &[], 1, None, false, log.clone()).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("linux.initrd"));
        linux.initrd = None;
        let error = plan(&linux, &["17:00".into()], 1, None, false, log.clone()).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("devices"));
        let empty = dir.path().join("empty-initrd");
        std::fs::write(&empty, "").unwrap();
        linux.initrd = Some(empty.display().to_string());
        let error = plan(&linux, &[], 1, None, false, log.clone()).unwrap_err();
        assert!(error.message.contains("empty-initrd is empty"), "{error}");
        linux.initrd = None;
        let error = plan(&spec(dir.path()), &[], 1, None, false, log.clone()).unwrap_err();
        assert!(error.message.contains("is not a regular file"), "{error}");
        let error = plan(&linux, &[], 1, Some(8), false, log.clone()).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("memory_mib"));
        let error = plan(&linux, &[], 1, Some(u64::MAX >> 10), false, log.clone()).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("memory_mib"));
        let plan = plan(&linux, &["17:00.0".into()], 2, None, false, log).unwrap();
        assert_eq!(plan.memory_bytes, DEFAULT_MEMORY_MIB << 20);
        // With a device and no command line given, the guest probes PCI.
        assert_eq!(plan.cmdline, crate::linux::default_cmdline(true));
        assert!(!plan.cmdline.contains("pci=off"));
        assert_eq!(plan.devices[0].to_string(), "0000:17:00.0");
    }

    #[test]
    fn disks_are_checked_and_a_held_one_is_a_conflict() {
        let dir = Scratch::new("disks");
        let log = dir.path().join("console.log");
        let elf = dir.path().join("vmlinux");
        std::fs::write(&elf, b"\x7fELF\x02\x01\x01").unwrap();
        let image = dir.path().join("root.img");
        std::fs::write(&image, vec![0u8; 4096]).unwrap();
        let with = |path: &Path, read_only: bool| {
            let mut linux = spec(&elf);
            linux.disks = vec![LinuxDisk {
                path: path.display().to_string(),
                read_only,
            }];
            plan(&linux, &[], 1, None, false, log.clone())
        };
        let error = with(&dir.path().join("missing.img"), false).unwrap_err();
        assert_eq!(error.param.as_deref(), Some("linux.disks"));
        assert!(error.message.contains("missing.img"), "{error}");
        let error = with(dir.path(), false).unwrap_err();
        assert!(error.message.contains("neither a disk image"), "{error}");
        let empty = dir.path().join("empty.img");
        std::fs::write(&empty, b"").unwrap();
        assert_eq!(
            with(&empty, false).unwrap_err().code,
            ErrorCode::InvalidRequest
        );

        let planned = with(&image, false).unwrap();
        assert_eq!(planned.disks.len(), 1);
        assert_eq!(planned.disks[0].path, image.canonicalize().unwrap());
        // The plan's probe released its lock: the boot takes it.
        let held = Block::open(&image, false).unwrap();
        let error = with(&image, true).unwrap_err();
        assert_eq!(error.code, ErrorCode::Conflict, "{error}");
        assert!(error.message.contains("in use by another VM"), "{error}");
        drop(held);
        let reader = Block::open(&image, true).unwrap();
        assert!(with(&image, true).is_ok(), "read-only disks are shared");
        assert_eq!(with(&image, false).unwrap_err().code, ErrorCode::Conflict);
        drop(reader);
    }

    #[test]
    fn the_console_tail_is_bounded() {
        let dir = Scratch::new("tail");
        let log = dir.path().join("console.log");
        let empty = console_tail("a", &log, 100).unwrap();
        assert_eq!((empty.size_bytes, empty.text.as_str()), (0, ""));
        std::fs::write(&log, "Linux version 6.1\nhello\n").unwrap();
        let tail = console_tail("a", &log, 6).unwrap();
        assert_eq!((tail.size_bytes, tail.offset), (24, 18));
        assert_eq!(tail.text, "hello\n");
        let all = console_tail("a", &log, 1 << 20).unwrap();
        assert_eq!((all.offset, all.text.len()), (0, 24));
    }
}
