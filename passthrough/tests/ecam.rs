//! A guest's view through the ECAM window: the host bridge and passed-through
//! functions (backed by config dumps) on bus 0.

use std::path::PathBuf;
use std::sync::Arc;

use aivmm_devices::bus::MmioDevice;
use aivmm_devices::pci::{PciBus, Slot};
use aivmm_passthrough::bar::{self, BarKind};
use aivmm_passthrough::config_space::{BarWindows, ConfigChange, ConfigDump, VirtualConfigSpace};
use aivmm_passthrough::pci_function::PassthroughFunction;

const WINDOWS: BarWindows = BarWindows {
    mmio32: (0xc000_0000, 0xfec0_0000),
    mmio64: (0x100_0000_0000, 0x200_0000_0000),
    io: (0xc000, 0x1_0000),
};

fn function(name: &str) -> Arc<PassthroughFunction<ConfigDump>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pci");
    let config = std::fs::read(dir.join(format!("{name}.config"))).unwrap();
    let sizes = bar::sizes_from_sysfs_resource(
        &std::fs::read_to_string(dir.join(format!("{name}.resource"))).unwrap(),
    )
    .unwrap();
    let len = config.len();
    Arc::new(PassthroughFunction::new(
        VirtualConfigSpace::new(ConfigDump::new(config), len, &sizes, &WINDOWS).unwrap(),
    ))
}

fn ecam(device: u64, register: u64) -> u64 {
    device << 15 | register
}

fn read32(bus: &PciBus, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    bus.read(0, offset, &mut data).unwrap();
    u32::from_le_bytes(data)
}

fn write32(bus: &PciBus, offset: u64, value: u32) {
    bus.write(0, offset, &value.to_le_bytes()).unwrap();
}

#[test]
fn guest_enumerates_sizes_and_enables_a_gpu_through_ecam() {
    let mut bus = PciBus::new();
    let gpu = function("gpu-like");
    let nic = function("virtio-net-1af4-1041");
    assert_eq!(
        bus.add(gpu.clone()).unwrap(),
        Slot {
            device: 1,
            function: 0
        }
    );
    assert_eq!(
        bus.add(nic.clone()).unwrap(),
        Slot {
            device: 2,
            function: 0
        }
    );

    let ids: Vec<u32> = (0..4).map(|d| read32(&bus, ecam(d, 0))).collect();
    assert_eq!(
        ids,
        vec![0x0008_1b36, 0x2331_10de, 0x1041_1af4, 0xffff_ffff]
    );
    // Class codes as Linux reads them (dword at 0x08, class in the top 24 bits).
    assert_eq!(read32(&bus, ecam(1, 0x08)) >> 8, 0x03_0200);
    assert_eq!(read32(&bus, ecam(0, 0x08)) >> 8, 0x06_0000);

    // Linux's BAR sizing of the GPU's 64 GiB prefetchable BAR1.
    write32(&bus, ecam(1, 0x14), 0xffff_ffff);
    write32(&bus, ecam(1, 0x18), 0xffff_ffff);
    let (low, high) = (read32(&bus, ecam(1, 0x14)), read32(&bus, ecam(1, 0x18)));
    let size = !((u64::from(high) << 32) | u64::from(low & !0xf)) + 1;
    assert_eq!(size, 64 << 30);
    assert_eq!(low & 0xf, 0xc, "64-bit prefetchable");
    write32(&bus, ecam(1, 0x14), 0);
    write32(&bus, ecam(1, 0x18), 0x180);
    assert!(gpu.take_changes().is_empty(), "memory decode is still off");

    // Memory decode on: BAR0 and both 64-bit BARs map, at the addresses the
    // guest left in them.
    bus.write(0, ecam(1, 0x04), &0x0006u16.to_le_bytes())
        .unwrap();
    let moved: Vec<(u8, Option<u64>)> = gpu
        .take_changes()
        .iter()
        .map(|c| match c {
            ConfigChange::BarMoved { index, to, .. } => (*index, *to),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        moved,
        vec![
            (0, Some(0xc000_0000)),
            (1, Some(0x180_0000_0000)),
            (3, Some(0x110_0000_0000))
        ]
    );

    // The extended capability list is reachable through ECAM (AER at 0x100).
    assert_eq!(read32(&bus, ecam(1, 0x100)) & 0xffff, 0x0001);
    // The virtio NIC is conventional PCI: its extended space reads 0.
    assert_eq!(read32(&bus, ecam(2, 0x100)), 0);

    // MSI-X enable on the NIC, reported to the VMM.
    bus.write(0, ecam(2, 0x9a), &0x8002u16.to_le_bytes())
        .unwrap();
    assert_eq!(
        nic.take_changes(),
        vec![ConfigChange::MsixControl {
            enabled: true,
            function_mask: false
        }]
    );
    assert_eq!(nic.with_space(|s| s.bars()[0].bar.kind), BarKind::Memory64);

    // A misaligned access is a guest bug, reported, not a panic.
    assert!(bus.read(0, ecam(1, 0x02), &mut [0u8; 4]).is_err());
}
