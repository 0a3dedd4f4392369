//! Preflight of a host PCI device before it is handed to a partition: every
//! condition VFIO needs, checked on the host's sysfs and /dev, each failure
//! with a message that says what to change on the host.
//!
//! The checks read `ROOT/sys` and `ROOT/dev` (ROOT is "/" on a real host), so
//! tests run them on fixture trees.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::bdf::Bdf;

/// What the partition will need from the device's host.
#[derive(Debug, Clone)]
pub struct PreflightRequest {
    pub bdf: Bdf,
    /// All of it is pinned for DMA while the device is attached.
    pub guest_ram_bytes: u64,
    /// The NUMA node the partition's cores and memory are placed on.
    pub partition_node: Option<u32>,
}

/// The limits of the process that will open the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessLimits {
    /// Soft RLIMIT_MEMLOCK in bytes; None = unlimited.
    pub memlock_bytes: Option<u64>,
    /// With CAP_IPC_LOCK, VFIO does not count pinned pages against the limit.
    pub cap_ipc_lock: bool,
}

/// Drivers under which another device of the group does not stop VFIO from
/// using it: vfio-pci, and drivers that do no DMA (pci-stub, pcieport on
/// bridges). The device itself must be bound to vfio-pci.
const GROUP_DRIVERS_ALLOWED: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("PCI device {bdf} does not exist on this host ({path} is missing): check the address with `ls /sys/bus/pci/devices` or `lspci -D`")]
    DeviceNotFound { bdf: Bdf, path: PathBuf },
    #[error("the IOMMU is not enabled on this host ({groups} is missing or empty), so {bdf} cannot be passed through: enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware setup, boot Linux with `intel_iommu=on iommu=pt` (Intel) or `amd_iommu=on iommu=pt` (AMD) on the kernel command line, reboot, and check that /sys/kernel/iommu_groups lists groups")]
    IommuDisabled { bdf: Bdf, groups: PathBuf },
    #[error("PCI device {bdf} has no IOMMU group ({path} is missing) although the IOMMU is on: the device sits behind a bridge the IOMMU does not cover; check `dmesg | grep -i -e DMAR -e AMD-Vi` and the firmware's IOMMU/ACS settings, or use a device in another slot")]
    NoIommuGroup { bdf: Bdf, path: PathBuf },
    #[error("IOMMU group {group} of {bdf} has devices that are not bound to vfio-pci: {unbound}; VFIO hands out whole groups, so every device of the group must be bound to vfio-pci (other devices may also be unbound or on pci-stub/pcieport). As root, run:\n{commands}")]
    GroupNotBoundToVfio {
        bdf: Bdf,
        group: u32,
        /// "BDF (driver)" for each offending device.
        unbound: String,
        commands: String,
    },
    #[error("{path} does not exist although IOMMU group {group} is bound to vfio-pci: load the VFIO modules (`modprobe vfio-pci`, and `modprobe vfio_iommu_type1`) and check `dmesg | grep -i vfio`")]
    VfioGroupMissing { group: u32, path: PathBuf },
    #[error("cannot open {path} for reading and writing ({source}): if the device is busy, another process (a partition or another VMM) holds the group, so stop it or pick another device; otherwise run aivmm as root, or give its user the group (`chown USER {path}`, or a udev rule: SUBSYSTEM==\"vfio\", OWNER=\"USER\")")]
    VfioGroupNotAccessible { path: PathBuf, source: io::Error },
    #[error("PCI device {bdf} is on NUMA node {device_node} but the partition is placed on node {partition_node}: place the partition's cores and memory on node {device_node}, or pick a device on node {partition_node} (`aivmm topology` lists each device's node)")]
    NumaMismatch {
        bdf: Bdf,
        device_node: u32,
        partition_node: u32,
    },
    #[error("RLIMIT_MEMLOCK is {limit} bytes but all {needed} bytes of guest RAM are pinned for the device's DMA: raise it for the process that runs aivmm (`ulimit -l unlimited` in its shell, `LimitMEMLOCK=infinity` in its systemd unit, or `USER - memlock unlimited` in /etc/security/limits.conf), or run it with CAP_IPC_LOCK")]
    MemlockTooLow { limit: u64, needed: u64 },
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} holds {text:?}: {why}")]
    Parse {
        path: PathBuf,
        text: String,
        why: &'static str,
    },
}

/// What a successful preflight found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreflightReport {
    pub bdf: Bdf,
    pub iommu_group: u32,
    /// Every device of the group (the device itself included), sorted.
    pub group_devices: Vec<String>,
    pub device_node: Option<u32>,
    /// /dev/vfio/GROUP on the host (under ROOT).
    pub vfio_group_path: PathBuf,
    /// Recommendations that do not stop the device from working.
    pub advice: Vec<String>,
}

/// Checks `request.bdf` on the host under `root`.
pub fn preflight(
    root: &Path,
    request: &PreflightRequest,
    limits: ProcessLimits,
) -> Result<PreflightReport, PreflightError> {
    let bdf = request.bdf;
    let sys = root.join("sys");
    let device_dir = sys.join("bus/pci/devices").join(bdf.to_string());
    if !device_dir.exists() {
        return Err(PreflightError::DeviceNotFound {
            bdf,
            path: device_dir,
        });
    }

    let groups = sys.join("kernel/iommu_groups");
    if dir_names(&groups)?.is_empty() {
        return Err(PreflightError::IommuDisabled { bdf, groups });
    }
    let group_link = device_dir.join("iommu_group");
    let group = match link_name(&group_link)? {
        None => {
            return Err(PreflightError::NoIommuGroup {
                bdf,
                path: group_link,
            })
        }
        Some(name) => name.parse::<u32>().map_err(|_| PreflightError::Parse {
            path: group_link.clone(),
            text: name,
            why: "the link does not end in an IOMMU group number",
        })?,
    };

    let group_devices = dir_names(&groups.join(group.to_string()).join("devices"))?;
    let mut offenders = Vec::new();
    for member in &group_devices {
        let driver = link_name(&sys.join("bus/pci/devices").join(member).join("driver"))?;
        if !driver_allows_vfio(*member == bdf.to_string(), driver.as_deref()) {
            offenders.push((member.clone(), driver));
        }
    }
    if !offenders.is_empty() {
        let vfio_pci_loaded = sys.join("bus/pci/drivers/vfio-pci").exists();
        return Err(PreflightError::GroupNotBoundToVfio {
            bdf,
            group,
            unbound: offenders
                .iter()
                .map(|(member, driver)| {
                    format!("{member} ({})", driver.as_deref().unwrap_or("no driver"))
                })
                .collect::<Vec<_>>()
                .join(", "),
            commands: bind_commands(&offenders, vfio_pci_loaded),
        });
    }

    let vfio_group_path = root.join("dev/vfio").join(group.to_string());
    if !vfio_group_path.exists() {
        return Err(PreflightError::VfioGroupMissing {
            group,
            path: vfio_group_path,
        });
    }
    check_read_write_access(&vfio_group_path)?;

    let device_node = read_numa_node(&device_dir.join("numa_node"))?;
    let mut advice = Vec::new();
    match (device_node, request.partition_node) {
        (Some(device_node), Some(partition_node)) if device_node != partition_node => {
            return Err(PreflightError::NumaMismatch {
                bdf,
                device_node,
                partition_node,
            })
        }
        (None, _) => advice.push(format!(
            "the kernel reports no NUMA node for {bdf} (numa_node is -1): on a multi-socket server check the firmware's NUMA/SRAT settings so the partition can be placed next to the device"
        )),
        _ => {}
    }

    if !limits.cap_ipc_lock {
        if let Some(limit) = limits.memlock_bytes {
            if limit < request.guest_ram_bytes {
                return Err(PreflightError::MemlockTooLow {
                    limit,
                    needed: request.guest_ram_bytes,
                });
            }
        }
    }

    let free_huge = free_hugepage_bytes(&sys.join("kernel/mm/hugepages"))?;
    if free_huge < request.guest_ram_bytes {
        advice.push(format!(
            "only {free_huge} bytes of free hugepages for {} bytes of pinned guest RAM: reserve hugepages (e.g. `echo {} > /proc/sys/vm/nr_hugepages` for 2 MiB pages, or `default_hugepagesz=1G hugepagesz=1G hugepages=N` on the kernel command line) so DMA mappings and the IOMMU's page tables use large pages",
            request.guest_ram_bytes,
            request.guest_ram_bytes.div_ceil(2 << 20),
        ));
    }

    Ok(PreflightReport {
        bdf,
        iommu_group: group,
        group_devices,
        device_node,
        vfio_group_path,
        advice,
    })
}

/// Whether a device of the group, bound to `driver`, lets VFIO take the
/// group: the passed-through device itself must be on vfio-pci, the others
/// on vfio-pci, pci-stub, pcieport, or no driver.
pub fn driver_allows_vfio(is_the_device: bool, driver: Option<&str>) -> bool {
    if is_the_device {
        driver == Some("vfio-pci")
    } else {
        driver.is_none_or(|d| GROUP_DRIVERS_ALLOWED.contains(&d))
    }
}

/// The shell commands that bind each offending device to vfio-pci.
fn bind_commands(offenders: &[(String, Option<String>)], vfio_pci_loaded: bool) -> String {
    let mut lines = Vec::new();
    if !vfio_pci_loaded {
        lines.push("modprobe vfio-pci".to_string());
    }
    for (member, driver) in offenders {
        let dir = format!("/sys/bus/pci/devices/{member}");
        if driver.is_some() {
            lines.push(format!("echo {member} > {dir}/driver/unbind"));
        }
        lines.push(format!("echo vfio-pci > {dir}/driver_override"));
        lines.push(format!("echo {member} > /sys/bus/pci/drivers_probe"));
    }
    lines
        .iter()
        .map(|line| format!("  {line}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl ProcessLimits {
    /// This process's soft RLIMIT_MEMLOCK and effective CAP_IPC_LOCK.
    pub fn current() -> Result<Self, PreflightError> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct that we own.
        if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
            return Err(PreflightError::Read {
                path: PathBuf::from("getrlimit(RLIMIT_MEMLOCK)"),
                source: io::Error::last_os_error(),
            });
        }
        let status_path = Path::new("/proc/self/status");
        let status = fs::read_to_string(status_path).map_err(|source| PreflightError::Read {
            path: status_path.to_path_buf(),
            source,
        })?;
        Ok(ProcessLimits {
            memlock_bytes: (limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur),
            cap_ipc_lock: effective_caps(&status).ok_or_else(|| PreflightError::Parse {
                path: status_path.to_path_buf(),
                text: status
                    .lines()
                    .find(|l| l.starts_with("CapEff"))
                    .unwrap_or("")
                    .into(),
                why: "expected a CapEff: line with a hex capability mask",
            })? & (1 << CAP_IPC_LOCK)
                != 0,
        })
    }
}

/// Bit number of CAP_IPC_LOCK in a capability mask (linux/capability.h).
const CAP_IPC_LOCK: u32 = 14;

/// The CapEff mask of a /proc/PID/status text.
fn effective_caps(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
    u64::from_str_radix(line.trim(), 16).ok()
}

/// Opens the group node read-write as the VMM will (and closes it again):
/// fails on permissions, and with EBUSY while another process holds the group.
fn check_read_write_access(path: &Path) -> Result<(), PreflightError> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map(drop)
        .map_err(|source| PreflightError::VfioGroupNotAccessible {
            path: path.to_path_buf(),
            source,
        })
}

fn read_numa_node(path: &Path) -> Result<Option<u32>, PreflightError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PreflightError::Read {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    match text.trim().parse::<i64>() {
        Ok(-1) => Ok(None),
        Ok(node) => u32::try_from(node)
            .map(Some)
            .map_err(|_| PreflightError::Parse {
                path: path.to_path_buf(),
                text,
                why: "expected a node number or -1",
            }),
        Err(_) => Err(PreflightError::Parse {
            path: path.to_path_buf(),
            text,
            why: "expected a node number or -1",
        }),
    }
}

/// Free bytes over every hugepage size (sys/kernel/mm/hugepages/hugepages-NkB).
fn free_hugepage_bytes(dir: &Path) -> Result<u64, PreflightError> {
    let mut bytes = 0u64;
    for pool in dir_names(dir)? {
        let Some(kib) = pool
            .strip_prefix("hugepages-")
            .and_then(|s| s.strip_suffix("kB"))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        let path = dir.join(&pool).join("free_hugepages");
        let text = fs::read_to_string(&path).map_err(|source| PreflightError::Read {
            path: path.clone(),
            source,
        })?;
        let free: u64 = text.trim().parse().map_err(|_| PreflightError::Parse {
            path,
            text: text.clone(),
            why: "expected a number of pages",
        })?;
        bytes = bytes.saturating_add(free.saturating_mul(kib * 1024));
    }
    Ok(bytes)
}

/// The last component of a symlink's target, or None if there is no link.
fn link_name(path: &Path) -> Result<Option<String>, PreflightError> {
    match fs::read_link(path) {
        Ok(target) => Ok(target
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PreflightError::Read {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Sorted entry names of a directory; empty if it does not exist.
fn dir_names(dir: &Path) -> Result<Vec<String>, PreflightError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PreflightError::Read {
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PreflightError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_ipc_lock_from_proc_status() {
        let root = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        assert_eq!(effective_caps(root), Some(0x1ff_ffff_ffff));
        assert!(effective_caps(root).unwrap() & (1 << CAP_IPC_LOCK) != 0);
        let user = "CapEff:\t0000000000000000\n";
        assert_eq!(effective_caps(user), Some(0));
        assert_eq!(effective_caps("CapEff:\tzz\n"), None);
        assert_eq!(effective_caps("Name: x\n"), None);
    }

    #[test]
    fn bind_commands_unbind_override_and_probe() {
        let commands = bind_commands(
            &[
                ("0000:17:00.0".into(), Some("ice".into())),
                ("0000:17:00.1".into(), None),
            ],
            false,
        );
        assert_eq!(
            commands,
            "  modprobe vfio-pci\n\
             \x20 echo 0000:17:00.0 > /sys/bus/pci/devices/0000:17:00.0/driver/unbind\n\
             \x20 echo vfio-pci > /sys/bus/pci/devices/0000:17:00.0/driver_override\n\
             \x20 echo 0000:17:00.0 > /sys/bus/pci/drivers_probe\n\
             \x20 echo vfio-pci > /sys/bus/pci/devices/0000:17:00.1/driver_override\n\
             \x20 echo 0000:17:00.1 > /sys/bus/pci/drivers_probe"
        );
    }
}
