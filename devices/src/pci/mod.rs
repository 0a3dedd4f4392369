//! A PCI bus reached through ECAM (PCI Express enhanced configuration
//! access): each function's 4 KiB config space sits in one MMIO window at
//! `bus << 20 | device << 15 | function << 12`. The guest finds the window
//! in ACPI's MCFG table (or the kernel's `pci=` options) and enumerates the
//! bus by reading vendor IDs; an empty slot reads all ones.
//!
//! The bus carries the [`host_bridge::HostBridge`] at 00:00.0 and the
//! functions added to it (passed-through devices; virtio-pci would fit too).
//! [`conf1::Conf1`] is the legacy port-I/O path (0xCF8/0xCFC) to the same bus.

pub mod conf1;
pub mod host_bridge;

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::bus::{DeviceError, MmioAction, MmioDevice};

/// ECAM bytes per bus (32 devices x 8 functions x 4 KiB).
pub const ECAM_BUS_SIZE: u64 = 1 << 20;
/// Config space bytes per function in ECAM.
pub const CONFIG_SPACE_SIZE: u64 = 4096;

/// One PCI function's config space as the guest sees it.
pub trait PciFunction: Send + Sync {
    /// Short name for error messages.
    fn name(&self) -> &'static str;
    /// A config read of 1, 2 or 4 bytes at a naturally aligned `offset` < 4096.
    fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<(), DeviceError>;
    /// A config write of 1, 2 or 4 bytes at a naturally aligned `offset` < 4096.
    fn write_config(&self, offset: u16, data: &[u8]) -> Result<(), DeviceError>;
}

/// Device and function number on bus 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot {
    pub device: u8,
    pub function: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciBusError {
    #[error("PCI slot 00:{device:02x}.{function} is taken by {other}")]
    SlotTaken {
        device: u8,
        function: u8,
        other: &'static str,
    },
    #[error("PCI slot 00:{device:02x}.{function} does not exist (devices 0-31, functions 0-7)")]
    BadSlot { device: u8, function: u8 },
    #[error("the PCI bus is full: all 31 device numbers after the host bridge are taken")]
    Full,
}

/// Bus 0 behind an ECAM window.
pub struct PciBus {
    functions: BTreeMap<Slot, Arc<dyn PciFunction>>,
}

impl Default for PciBus {
    fn default() -> Self {
        PciBus::new()
    }
}

impl PciBus {
    /// A bus with the host bridge at 00:00.0.
    pub fn new() -> PciBus {
        let mut functions: BTreeMap<Slot, Arc<dyn PciFunction>> = BTreeMap::new();
        functions.insert(
            Slot {
                device: 0,
                function: 0,
            },
            Arc::new(host_bridge::HostBridge::new()),
        );
        PciBus { functions }
    }

    /// Puts `function` at `slot`.
    pub fn insert(
        &mut self,
        slot: Slot,
        function: Arc<dyn PciFunction>,
    ) -> Result<(), PciBusError> {
        if slot.device > 31 || slot.function > 7 {
            return Err(PciBusError::BadSlot {
                device: slot.device,
                function: slot.function,
            });
        }
        if let Some(other) = self.functions.get(&slot) {
            return Err(PciBusError::SlotTaken {
                device: slot.device,
                function: slot.function,
                other: other.name(),
            });
        }
        self.functions.insert(slot, function);
        Ok(())
    }

    /// Puts `function` at function 0 of the first free device number.
    pub fn add(&mut self, function: Arc<dyn PciFunction>) -> Result<Slot, PciBusError> {
        let slot = (1..32)
            .map(|device| Slot {
                device,
                function: 0,
            })
            .find(|slot| !self.functions.keys().any(|s| s.device == slot.device))
            .ok_or(PciBusError::Full)?;
        self.insert(slot, function)?;
        Ok(slot)
    }

    pub fn function(&self, slot: Slot) -> Option<&Arc<dyn PciFunction>> {
        self.functions.get(&slot)
    }

    /// Splits an ECAM offset into (bus, slot, register).
    pub fn decode(offset: u64) -> (u64, Slot, u16) {
        (
            offset >> 20,
            Slot {
                device: ((offset >> 15) & 0x1f) as u8,
                function: ((offset >> 12) & 0x7) as u8,
            },
            (offset & 0xfff) as u16,
        )
    }

    fn check(access: &'static str, offset: u64, len: usize) -> Result<(), DeviceError> {
        if matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len as u64) {
            Ok(())
        } else {
            Err(DeviceError::BadAccess {
                device: "pci-ecam",
                access,
                offset,
                len,
            })
        }
    }
}

impl MmioDevice for PciBus {
    fn name(&self) -> &'static str {
        "pci-ecam"
    }

    fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        Self::check("read", offset, data.len())?;
        let (bus, slot, register) = Self::decode(offset);
        match self.functions.get(&slot).filter(|_| bus == 0) {
            Some(function) => function.read_config(register, data),
            None => {
                data.fill(0xff);
                Ok(())
            }
        }
    }

    fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) -> Result<MmioAction, DeviceError> {
        Self::check("write", offset, data.len())?;
        let (bus, slot, register) = Self::decode(offset);
        if let Some(function) = self.functions.get(&slot).filter(|_| bus == 0) {
            function.write_config(register, data)?;
        }
        Ok(MmioAction::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A function with a 4 KiB register file: records what it is given.
    struct Scratch {
        config: Mutex<Vec<u8>>,
    }

    impl Scratch {
        fn new(vendor: u16, device: u16) -> Arc<Scratch> {
            let mut config = vec![0u8; 4096];
            config[0..2].copy_from_slice(&vendor.to_le_bytes());
            config[2..4].copy_from_slice(&device.to_le_bytes());
            Arc::new(Scratch {
                config: Mutex::new(config),
            })
        }
    }

    impl PciFunction for Scratch {
        fn name(&self) -> &'static str {
            "scratch"
        }
        fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<(), DeviceError> {
            let config = self.config.lock().unwrap();
            let at = usize::from(offset);
            data.copy_from_slice(&config[at..at + data.len()]);
            Ok(())
        }
        fn write_config(&self, offset: u16, data: &[u8]) -> Result<(), DeviceError> {
            let mut config = self.config.lock().unwrap();
            let at = usize::from(offset);
            config[at..at + data.len()].copy_from_slice(data);
            Ok(())
        }
    }

    fn read32(bus: &PciBus, offset: u64) -> u32 {
        let mut data = [0u8; 4];
        bus.read(0, offset, &mut data).unwrap();
        u32::from_le_bytes(data)
    }

    fn ecam(device: u64, function: u64, register: u64) -> u64 {
        device << 15 | function << 12 | register
    }

    #[test]
    fn enumeration_finds_the_host_bridge_and_added_functions() {
        let mut bus = PciBus::new();
        let a = bus.add(Scratch::new(0x10de, 0x2331)).unwrap();
        bus.insert(
            Slot {
                device: 1,
                function: 1,
            },
            Scratch::new(0x10de, 0x22a3),
        )
        .unwrap();
        let b = bus.add(Scratch::new(0x8086, 0x1592)).unwrap();
        assert_eq!(
            (a, b),
            (
                Slot {
                    device: 1,
                    function: 0
                },
                Slot {
                    device: 2,
                    function: 0
                }
            )
        );
        // What Linux's scan of bus 0 sees: vendor/device of each function.
        let mut found = Vec::new();
        for device in 0..32 {
            for function in 0..8 {
                let id = read32(&bus, ecam(device, function, 0));
                if id != 0xffff_ffff {
                    found.push((device, function, id));
                }
            }
        }
        assert_eq!(
            found,
            vec![
                (0, 0, 0x0008_1b36),
                (1, 0, 0x2331_10de),
                (1, 1, 0x22a3_10de),
                (2, 0, 0x1592_8086)
            ]
        );
        // Bus 1 does not exist: all ones, writes dropped.
        assert_eq!(read32(&bus, ECAM_BUS_SIZE + ecam(1, 0, 0)), 0xffff_ffff);
        bus.write(0, ECAM_BUS_SIZE + ecam(1, 0, 0x10), &[1, 2, 3, 4])
            .unwrap();
    }

    #[test]
    fn accesses_reach_the_right_register() {
        let mut bus = PciBus::new();
        let scratch = Scratch::new(0x1af4, 0x1041);
        bus.insert(
            Slot {
                device: 3,
                function: 2,
            },
            scratch.clone(),
        )
        .unwrap();
        bus.write(0, ecam(3, 2, 0x104), &0xdead_beefu32.to_le_bytes())
            .unwrap();
        bus.write(0, ecam(3, 2, 0x3c), &[0x0b]).unwrap();
        bus.write(0, ecam(3, 2, 0x06), &0x1234u16.to_le_bytes())
            .unwrap();
        let config = scratch.config.lock().unwrap().clone();
        assert_eq!(&config[0x104..0x108], &0xdead_beefu32.to_le_bytes());
        assert_eq!(
            (config[0x3c], &config[0x06..0x08]),
            (0x0b, &[0x34, 0x12][..])
        );
        let mut byte = [0u8; 1];
        bus.read(0, ecam(3, 2, 0x107), &mut byte).unwrap();
        assert_eq!(byte, [0xde]);
        // Misaligned or 8-byte accesses are guest bugs, reported as such.
        assert!(bus.read(0, ecam(3, 2, 0x02), &mut [0u8; 4]).is_err());
        assert!(bus.write(0, ecam(3, 2, 0x08), &[0u8; 8]).is_err());
    }

    #[test]
    fn slots_are_checked() {
        let mut bus = PciBus::new();
        assert_eq!(
            bus.insert(
                Slot {
                    device: 0,
                    function: 0
                },
                Scratch::new(1, 1)
            )
            .unwrap_err(),
            PciBusError::SlotTaken {
                device: 0,
                function: 0,
                other: "pci-host-bridge"
            }
        );
        assert!(matches!(
            bus.insert(
                Slot {
                    device: 32,
                    function: 0
                },
                Scratch::new(1, 1)
            ),
            Err(PciBusError::BadSlot { .. })
        ));
        for _ in 1..32 {
            bus.add(Scratch::new(1, 1)).unwrap();
        }
        assert_eq!(bus.add(Scratch::new(1, 1)).unwrap_err(), PciBusError::Full);
    }
}
