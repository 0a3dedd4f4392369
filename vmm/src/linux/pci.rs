//! The PCI side of a Linux guest: where the ECAM window and the BAR windows
//! sit in the guest-physical map, the MMIO bus that routes exits to them,
//! and [`BarTraps`], the trapped parts of passed-through BARs, which move
//! when the guest reprograms a BAR.
//!
//! The 32-bit hole from [`MMIO_HOLE_START`] holds, in order: the window for
//! 32-bit BARs, the ECAM window (bus 0 only), then the IOAPIC and local APICs
//! (KVM's, in-kernel). 64-bit prefetchable BARs (a GPU's VRAM aperture) go
//! in a window above the largest guest RAM.

use std::sync::{Arc, RwLock};

use aivmm_devices::bus::{BusError, DeviceError, MmioAction, MmioBus, MmioDevice};
use aivmm_devices::pci::conf1::Conf1;
use aivmm_devices::pci::{PciBus, ECAM_BUS_SIZE};
use aivmm_passthrough::config_space::BarWindows;

use super::e820::{HIGH_RAM_START, MMIO_HOLE_START};

/// The ECAM window: config space of bus 0 (the only bus), 1 MiB.
pub const ECAM_BASE: u64 = 0xe000_0000;
pub const ECAM_SIZE: u64 = ECAM_BUS_SIZE;
/// Buses behind the host bridge (ACPI's MCFG and _CRS say the same).
pub const BUS_RANGE: (u8, u8) = (0, 0);
/// [start, end) of guest addresses for 32-bit BARs: the first 256 MiB of
/// the hole; the virtio-mmio disks follow, then ECAM.
pub const MMIO32_WINDOW: (u64, u64) = (MMIO_HOLE_START, super::disk::DISK_MMIO_BASE);
/// [start, end) for 64-bit prefetchable BARs: from 64 GiB (above the largest
/// guest's RAM, which ends below 61 GiB) to 512 GiB, which a guest with 39
/// physical address bits (every x86-64 server CPU has more) can reach.
pub const MMIO64_WINDOW: (u64, u64) = (64 << 30, 512 << 30);
/// [start, end) of I/O ports for I/O BARs (above the legacy ISA ports).
pub const IO_WINDOW: (u64, u64) = (0x1000, 0x1_0000);

const _: () = assert!(
    MMIO64_WINDOW.0 >= aivmm_guest_abi::layout::RAM_MAX + (HIGH_RAM_START - MMIO_HOLE_START),
    "the 64-bit BAR window must lie above the largest guest's RAM"
);

const _: () = assert!(
    ECAM_BASE + ECAM_SIZE <= super::mptable::IOAPIC_ADDR as u64,
    "ECAM must end below the IOAPIC and local APICs"
);

/// The BAR windows in the form the config-space virtualization takes.
pub fn bar_windows() -> BarWindows {
    BarWindows {
        mmio32: MMIO32_WINDOW,
        mmio64: MMIO64_WINDOW,
        io: IO_WINDOW,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("BAR window {base:#x}+{len:#x} of {name} lies outside the PCI BAR windows")]
    OutsideWindows {
        name: &'static str,
        base: u64,
        len: u64,
    },
}

struct Trap {
    base: u64,
    len: u64,
    device: Arc<dyn MmioDevice>,
}

/// The trapped BAR ranges of passed-through devices, at their current guest
/// addresses. It sits on the MMIO bus over both BAR windows; KVM memslots
/// over the mmapped parts of a BAR take those accesses, so only the rest
/// exits to here. The guest moves BARs (after sizing them, or when Linux
/// reassigns resources), so traps come and go while vCPUs run.
#[derive(Default)]
pub struct BarTraps {
    traps: RwLock<Vec<Trap>>,
}

impl BarTraps {
    /// Starts trapping [base, base + len) to `device` (offsets from `base`).
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn MmioDevice>) -> Result<(), PciError> {
        let name = device.name();
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadWindow { name, base })?;
        let inside = |(start, stop): (u64, u64)| base >= start && end <= stop;
        if !inside(MMIO32_WINDOW) && !inside(MMIO64_WINDOW) {
            return Err(PciError::OutsideWindows { name, base, len });
        }
        let mut traps = self.traps.write().unwrap_or_else(|p| p.into_inner());
        if let Some(other) = traps.iter().find(|t| base < t.base + t.len && t.base < end) {
            return Err(BusError::Overlap {
                name,
                base,
                len,
                other: other.device.name(),
            }
            .into());
        }
        traps.push(Trap { base, len, device });
        Ok(())
    }

    /// Stops trapping the range that starts at `base`; whether there was one.
    pub fn remove(&self, base: u64) -> bool {
        let mut traps = self.traps.write().unwrap_or_else(|p| p.into_inner());
        let before = traps.len();
        traps.retain(|t| t.base != base);
        traps.len() != before
    }

    fn find(&self, addr: u64) -> Option<(Arc<dyn MmioDevice>, u64)> {
        let traps = self.traps.read().unwrap_or_else(|p| p.into_inner());
        traps
            .iter()
            .find(|t| addr >= t.base && addr - t.base < t.len)
            .map(|t| (t.device.clone(), addr - t.base))
    }
}

/// What [`BarTraps`] is on the MMIO bus: one window per BAR window, each
/// turning its offset back into a guest address.
struct BarWindow {
    base: u64,
    traps: Arc<BarTraps>,
}

impl MmioDevice for BarWindow {
    fn name(&self) -> &'static str {
        "pci-bar-window"
    }

    /// Where no BAR decodes, reads float high, as on a PCI bus.
    fn read(&self, vcpu: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        match self.traps.find(self.base + offset) {
            Some((device, at)) => device.read(vcpu, at, data),
            None => {
                data.fill(0xff);
                Ok(())
            }
        }
    }

    fn write(&self, vcpu: u32, offset: u64, data: &[u8]) -> Result<MmioAction, DeviceError> {
        match self.traps.find(self.base + offset) {
            Some((device, at)) => device.write(vcpu, at, data),
            None => Ok(MmioAction::Continue),
        }
    }
}

/// The PCI bus of a Linux guest, reachable by ECAM (on the returned MMIO
/// bus) and by conf1 (the returned ports), and the BAR traps of its devices.
pub struct GuestPci {
    pub bus: Arc<PciBus>,
    pub traps: Arc<BarTraps>,
}

impl GuestPci {
    /// A bus without passed-through devices.
    pub fn new(bus: PciBus) -> GuestPci {
        GuestPci {
            bus: Arc::new(bus),
            traps: Arc::new(BarTraps::default()),
        }
    }

    /// The MMIO bus of the guest: ECAM and the two BAR windows.
    pub fn mmio_bus(&self) -> Result<MmioBus, PciError> {
        let mut mmio = MmioBus::new();
        mmio.insert(ECAM_BASE, ECAM_SIZE, self.bus.clone())?;
        for (start, end) in [MMIO32_WINDOW, MMIO64_WINDOW] {
            let window = BarWindow {
                base: start,
                traps: self.traps.clone(),
            };
            mmio.insert(start, end - start, Arc::new(window))?;
        }
        Ok(mmio)
    }

    /// The conf1 ports for the guest's port bus.
    pub fn conf1(&self) -> Conf1 {
        Conf1::new(self.bus.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aivmm_devices::pci::host_bridge;
    use std::sync::Mutex;

    fn read32(bus: &MmioBus, addr: u64) -> u32 {
        let (device, offset) = bus.find(addr).expect("an MMIO device");
        let mut data = [0u8; 4];
        device.read(0, offset, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    #[test]
    fn ecam_window_reads_the_host_bridge() {
        let pci = GuestPci::new(PciBus::new());
        let mmio = pci.mmio_bus().unwrap();
        assert_eq!(
            read32(&mmio, ECAM_BASE),
            u32::from(host_bridge::DEVICE_ID) << 16 | u32::from(host_bridge::VENDOR_ID)
        );
        // Class code (register 8, bits 31:8) and header type.
        assert_eq!(read32(&mmio, ECAM_BASE + 8) >> 8, host_bridge::CLASS);
        assert_eq!(read32(&mmio, ECAM_BASE + 0xc) >> 16 & 0x7f, 0);
        // 00:01.0 is empty; the window ends after bus 0.
        assert_eq!(read32(&mmio, ECAM_BASE + (1 << 15)), 0xffff_ffff);
        assert!(mmio.find(ECAM_BASE + ECAM_SIZE).is_none());
    }

    /// A BAR's registers: records each access.
    struct Registers {
        log: Mutex<Vec<(u64, usize, bool)>>,
    }

    impl MmioDevice for Registers {
        fn name(&self) -> &'static str {
            "registers"
        }
        fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
            self.log.lock().unwrap().push((offset, data.len(), false));
            data.fill(0x5a);
            Ok(())
        }
        fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) -> Result<MmioAction, DeviceError> {
            self.log.lock().unwrap().push((offset, data.len(), true));
            Ok(MmioAction::Continue)
        }
    }

    #[test]
    fn trapped_bar_ranges_follow_the_bar() {
        let pci = GuestPci::new(PciBus::new());
        let mmio = pci.mmio_bus().unwrap();
        let bar = Arc::new(Registers {
            log: Mutex::new(Vec::new()),
        });
        let at = MMIO32_WINDOW.0 + 0x10_0000;
        pci.traps.insert(at, 0x4000, bar.clone()).unwrap();
        assert_eq!(read32(&mmio, at + 0x3ffc), 0x5a5a_5a5a);
        // Outside the trapped range: floats high, reaches nothing.
        assert_eq!(read32(&mmio, at + 0x4000), 0xffff_ffff);
        // In the 64-bit window too.
        let high = MMIO64_WINDOW.0 + (16 << 30);
        pci.traps.insert(high, 0x1000, bar.clone()).unwrap();
        let (device, offset) = mmio.find(high + 0x10).unwrap();
        device.write(1, offset, &[1, 2]).unwrap();
        // The guest moves the first BAR: the old range no longer reaches it.
        assert!(pci.traps.remove(at));
        assert!(!pci.traps.remove(at));
        let moved = at + 0x20_0000;
        pci.traps.insert(moved, 0x4000, bar.clone()).unwrap();
        assert_eq!(read32(&mmio, at), 0xffff_ffff);
        assert_eq!(read32(&mmio, moved + 8), 0x5a5a_5a5a);
        assert_eq!(
            *bar.log.lock().unwrap(),
            vec![(0x3ffc, 4, false), (0x10, 2, true), (8, 4, false)]
        );
        // Overlaps and ranges outside the BAR windows are refused.
        assert!(matches!(
            pci.traps.insert(moved + 0x1000, 0x1000, bar.clone()),
            Err(PciError::Bus(BusError::Overlap { .. }))
        ));
        assert!(matches!(
            pci.traps.insert(ECAM_BASE, 0x1000, bar.clone()),
            Err(PciError::OutsideWindows { .. })
        ));
        assert!(pci.traps.insert(at, 0, bar).is_err());
    }
}
