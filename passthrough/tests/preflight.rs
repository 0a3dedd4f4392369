//! Preflight on sysfs fixture trees built per test, and on this host.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

use aivmm_passthrough::bdf::Bdf;
use aivmm_passthrough::preflight::{preflight, PreflightError, PreflightRequest, ProcessLimits};

const GIB: u64 = 1 << 30;

/// A host tree: ROOT/sys/... and ROOT/dev/vfio, shaped as the kernel lays them out.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        let host = Host {
            dir: tempfile::tempdir().unwrap(),
        };
        fs::create_dir_all(host.sys().join("bus/pci/drivers/vfio-pci")).unwrap();
        fs::create_dir_all(host.sys().join("kernel/iommu_groups")).unwrap();
        fs::create_dir_all(host.root().join("dev/vfio")).unwrap();
        host.hugepages(2048, 0);
        host.hugepages(1_048_576, 0);
        host
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn sys(&self) -> PathBuf {
        self.root().join("sys")
    }

    fn hugepages(&self, kib: u64, free: u64) {
        let pool = self
            .sys()
            .join(format!("kernel/mm/hugepages/hugepages-{kib}kB"));
        fs::create_dir_all(&pool).unwrap();
        fs::write(pool.join("free_hugepages"), format!("{free}\n")).unwrap();
    }

    /// A device, optionally in an IOMMU group and bound to a driver.
    fn device(&self, bdf: &str, node: i32, group: Option<u32>, driver: Option<&str>) {
        let dir = self.sys().join("devices/pci0000:00").join(bdf);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("numa_node"), format!("{node}\n")).unwrap();
        symlink(&dir, self.sys().join("bus/pci/devices").join(bdf)).unwrap_or_else(|_| {
            fs::create_dir_all(self.sys().join("bus/pci/devices")).unwrap();
            symlink(&dir, self.sys().join("bus/pci/devices").join(bdf)).unwrap();
        });
        if let Some(group) = group {
            let group_dir = self
                .sys()
                .join("kernel/iommu_groups")
                .join(group.to_string());
            fs::create_dir_all(group_dir.join("devices")).unwrap();
            symlink(&group_dir, dir.join("iommu_group")).unwrap();
            symlink(&dir, group_dir.join("devices").join(bdf)).unwrap();
        }
        if let Some(driver) = driver {
            let driver_dir = self.sys().join("bus/pci/drivers").join(driver);
            fs::create_dir_all(&driver_dir).unwrap();
            symlink(&driver_dir, dir.join("driver")).unwrap();
        }
    }

    fn vfio_group(&self, group: u32) {
        fs::write(self.root().join("dev/vfio").join(group.to_string()), "").unwrap();
    }
}

fn request(bdf: &str, node: Option<u32>) -> PreflightRequest {
    PreflightRequest {
        bdf: bdf.parse().unwrap(),
        guest_ram_bytes: 16 * GIB,
        partition_node: node,
    }
}

const UNLIMITED: ProcessLimits = ProcessLimits {
    memlock_bytes: None,
    cap_ipc_lock: false,
};

/// A GPU on node 1 in group 70 with its audio function, both on vfio-pci.
fn ready_host() -> Host {
    let host = Host::new();
    host.device("0000:ca:00.0", 1, Some(70), Some("vfio-pci"));
    host.device("0000:ca:00.1", 1, Some(70), Some("vfio-pci"));
    host.device("0000:17:00.0", 0, Some(21), Some("ice"));
    host.vfio_group(70);
    host
}

#[test]
fn a_ready_device_passes_with_advice() {
    let host = ready_host();
    let report = preflight(host.root(), &request("0000:ca:00.0", Some(1)), UNLIMITED).unwrap();
    assert_eq!(report.iommu_group, 70);
    assert_eq!(report.group_devices, vec!["0000:ca:00.0", "0000:ca:00.1"]);
    assert_eq!(report.device_node, Some(1));
    assert_eq!(report.vfio_group_path, host.root().join("dev/vfio/70"));
    assert_eq!(report.advice.len(), 1, "{:?}", report.advice);
    assert!(
        report.advice[0].contains("echo 8192 > /proc/sys/vm/nr_hugepages"),
        "{}",
        report.advice[0]
    );
    // 16 GiB of free 1 GiB pages: no hugepage advice.
    host.hugepages(1_048_576, 16);
    let report = preflight(host.root(), &request("0000:ca:00.0", Some(1)), UNLIMITED).unwrap();
    assert!(report.advice.is_empty(), "{:?}", report.advice);
}

#[test]
fn missing_device() {
    let host = ready_host();
    let error = preflight(host.root(), &request("0000:cb:00.0", None), UNLIMITED).unwrap_err();
    assert!(matches!(error, PreflightError::DeviceNotFound { .. }));
    assert!(error.to_string().contains("lspci -D"), "{error}");
}

#[test]
fn iommu_off() {
    let host = Host::new();
    host.device("0000:ca:00.0", 1, None, Some("nvidia"));
    let error = preflight(host.root(), &request("0000:ca:00.0", None), UNLIMITED).unwrap_err();
    assert!(
        matches!(error, PreflightError::IommuDisabled { .. }),
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.contains("intel_iommu=on iommu=pt") && text.contains("amd_iommu=on"),
        "{text}"
    );
}

#[test]
fn device_without_a_group() {
    let host = ready_host();
    host.device("0000:ca:00.2", 1, None, None);
    let error = preflight(host.root(), &request("0000:ca:00.2", None), UNLIMITED).unwrap_err();
    assert!(
        matches!(error, PreflightError::NoIommuGroup { .. }),
        "{error}"
    );
}

#[test]
fn group_members_not_on_vfio_pci_are_named_with_commands() {
    let host = Host::new();
    host.device("0000:ca:00.0", 1, Some(70), Some("nvidia"));
    host.device("0000:ca:00.1", 1, Some(70), Some("snd_hda_intel"));
    host.device("0000:c9:00.0", 1, Some(70), Some("pcieport")); // the bridge: allowed
    host.vfio_group(70);
    let error = preflight(host.root(), &request("0000:ca:00.0", None), UNLIMITED).unwrap_err();
    let PreflightError::GroupNotBoundToVfio {
        group,
        unbound,
        commands,
        ..
    } = &error
    else {
        panic!("{error}");
    };
    assert_eq!(*group, 70);
    assert_eq!(
        unbound,
        "0000:ca:00.0 (nvidia), 0000:ca:00.1 (snd_hda_intel)"
    );
    assert_eq!(
        commands.lines().map(str::trim).collect::<Vec<_>>(),
        vec![
            "echo 0000:ca:00.0 > /sys/bus/pci/devices/0000:ca:00.0/driver/unbind",
            "echo vfio-pci > /sys/bus/pci/devices/0000:ca:00.0/driver_override",
            "echo 0000:ca:00.0 > /sys/bus/pci/drivers_probe",
            "echo 0000:ca:00.1 > /sys/bus/pci/devices/0000:ca:00.1/driver/unbind",
            "echo vfio-pci > /sys/bus/pci/devices/0000:ca:00.1/driver_override",
            "echo 0000:ca:00.1 > /sys/bus/pci/drivers_probe",
        ]
    );
    assert!(error.to_string().contains(commands.as_str()));
}

#[test]
fn an_unbound_device_needs_vfio_pci_loaded_first() {
    let host = Host::new();
    fs::remove_dir(host.sys().join("bus/pci/drivers/vfio-pci")).unwrap();
    host.device("0000:17:00.0", 0, Some(21), None);
    let error = preflight(host.root(), &request("0000:17:00.0", None), UNLIMITED).unwrap_err();
    let PreflightError::GroupNotBoundToVfio {
        unbound, commands, ..
    } = &error
    else {
        panic!("{error}");
    };
    assert_eq!(unbound, "0000:17:00.0 (no driver)");
    assert_eq!(commands.lines().next().unwrap().trim(), "modprobe vfio-pci");
    assert!(
        !commands.contains("unbind"),
        "nothing to unbind: {commands}"
    );
}

#[test]
fn missing_vfio_group_node() {
    let host = ready_host();
    fs::remove_file(host.root().join("dev/vfio/70")).unwrap();
    let error = preflight(host.root(), &request("0000:ca:00.0", None), UNLIMITED).unwrap_err();
    assert!(
        matches!(error, PreflightError::VfioGroupMissing { group: 70, .. }),
        "{error}"
    );
}

#[test]
fn vfio_group_node_that_cannot_be_opened() {
    let host = ready_host();
    // A directory in its place: opening it read-write fails (EISDIR) even as root.
    let node = host.root().join("dev/vfio/70");
    fs::remove_file(&node).unwrap();
    fs::create_dir(&node).unwrap();
    let error = preflight(host.root(), &request("0000:ca:00.0", None), UNLIMITED).unwrap_err();
    let PreflightError::VfioGroupNotAccessible { path, source } = &error else {
        panic!("{error}");
    };
    assert_eq!(path, &node);
    assert_eq!(source.raw_os_error(), Some(libc::EISDIR));
    assert!(error.to_string().contains("chown USER"), "{error}");
}

#[test]
fn numa_mismatch() {
    let host = ready_host();
    let error = preflight(host.root(), &request("0000:ca:00.0", Some(0)), UNLIMITED).unwrap_err();
    assert!(
        matches!(
            error,
            PreflightError::NumaMismatch {
                device_node: 1,
                partition_node: 0,
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("node 1"), "{error}");
}

#[test]
fn memlock_limit() {
    let host = ready_host();
    let low = ProcessLimits {
        memlock_bytes: Some(8 << 20),
        cap_ipc_lock: false,
    };
    let error = preflight(host.root(), &request("0000:ca:00.0", Some(1)), low).unwrap_err();
    assert!(
        matches!(
            error,
            PreflightError::MemlockTooLow {
                limit: 0x80_0000,
                needed: 0x4_0000_0000
            }
        ),
        "{error}"
    );
    let text = error.to_string();
    assert!(
        text.contains("ulimit -l unlimited") && text.contains("LimitMEMLOCK=infinity"),
        "{text}"
    );
    // CAP_IPC_LOCK exempts the process from the limit.
    let capable = ProcessLimits {
        cap_ipc_lock: true,
        ..low
    };
    preflight(host.root(), &request("0000:ca:00.0", Some(1)), capable).unwrap();
    let enough = ProcessLimits {
        memlock_bytes: Some(16 * GIB),
        cap_ipc_lock: false,
    };
    preflight(host.root(), &request("0000:ca:00.0", Some(1)), enough).unwrap();
}

/// This host: no IOMMU (see /work/shared/design/kvm-on-these-machines.md),
/// so each of its real PCI devices gets the precise "IOMMU disabled" error.
#[test]
fn this_host_has_no_iommu() {
    let groups = Path::new("/sys/kernel/iommu_groups");
    if fs::read_dir(groups).is_ok_and(|mut d| d.next().is_some()) {
        println!("skipped: this host has an IOMMU; the no-IOMMU error cannot be checked here");
        return;
    }
    let Some(first) = fs::read_dir("/sys/bus/pci/devices")
        .ok()
        .and_then(|mut d| d.next())
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
    else {
        println!("skipped: this host has no PCI devices");
        return;
    };
    let bdf: Bdf = first.parse().unwrap();
    let limits = ProcessLimits::current().unwrap();
    let request = PreflightRequest {
        bdf,
        guest_ram_bytes: GIB,
        partition_node: None,
    };
    let error = preflight(Path::new("/"), &request, limits).unwrap_err();
    let PreflightError::IommuDisabled {
        bdf: reported,
        groups: path,
    } = &error
    else {
        panic!("expected IommuDisabled, got: {error}");
    };
    assert_eq!(*reported, bdf);
    assert_eq!(path, &PathBuf::from("/sys/kernel/iommu_groups"));
    assert_eq!(
        error.to_string(),
        format!("the IOMMU is not enabled on this host (/sys/kernel/iommu_groups is missing or empty), so {bdf} cannot be passed through: enable VT-d (Intel) or AMD-Vi/IOMMU (AMD) in the firmware setup, boot Linux with `intel_iommu=on iommu=pt` (Intel) or `amd_iommu=on iommu=pt` (AMD) on the kernel command line, reboot, and check that /sys/kernel/iommu_groups lists groups")
    );
    println!("{error}");
}
