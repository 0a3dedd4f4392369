//! PCI configuration mechanism #1: the legacy port-I/O path to the same
//! [`PciBus`] that ECAM reaches. The guest writes a function and register to
//! CONFIG_ADDRESS (0xCF8, a dword) and then reads or writes 1, 2 or 4 bytes
//! at CONFIG_DATA (0xCFC-0xCFF). Linux uses it to probe for PCI before (or
//! without) ACPI's MCFG, and for registers below 256 even with ECAM.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::bus::{DeviceError, MmioDevice};
use crate::pci::PciBus;

/// The CONFIG_ADDRESS register.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// The first of the four CONFIG_DATA ports.
pub const CONFIG_DATA: u16 = 0xcfc;
/// CONFIG_ADDRESS bit 31: accesses at CONFIG_DATA reach config space.
pub const ENABLE: u32 = 1 << 31;

/// The ECAM offset that CONFIG_ADDRESS `address` and a data access at
/// CONFIG_DATA + `data_offset` name, or None while the enable bit is clear.
///
/// CONFIG_ADDRESS: enable (31), extended register bits 11:8 (27:24, AMD's
/// extension), bus (23:16), device (15:11), function (10:8), dword-aligned
/// register (7:2). The data port's offset picks the byte within the dword.
pub fn ecam_offset(address: u32, data_offset: u16) -> Option<u64> {
    if address & ENABLE == 0 {
        return None;
    }
    let address = u64::from(address);
    let bus = (address >> 16) & 0xff;
    let device = (address >> 11) & 0x1f;
    let function = (address >> 8) & 0x7;
    let register = (address & 0xfc) | ((address >> 16) & 0xf00);
    Some(bus << 20 | device << 15 | function << 12 | (register + u64::from(data_offset & 3)))
}

/// The conf1 ports in front of a [`PciBus`].
pub struct Conf1 {
    bus: Arc<PciBus>,
    address: AtomicU32,
}

impl Conf1 {
    pub fn new(bus: Arc<PciBus>) -> Conf1 {
        Conf1 {
            bus,
            address: AtomicU32::new(0),
        }
    }

    /// Whether `port` is one of CONFIG_ADDRESS's or CONFIG_DATA's.
    pub fn handles(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_DATA + 4).contains(&port)
    }

    /// An IN from `port`. A data read with the enable bit clear, or from a
    /// function that does not exist, reads all ones (as on real chipsets).
    pub fn read(&self, port: u16, data: &mut [u8]) -> Result<(), DeviceError> {
        let address = self.address.load(Ordering::Acquire);
        if port < CONFIG_DATA {
            let bytes = address.to_le_bytes();
            let at = usize::from(port - CONFIG_ADDRESS);
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = bytes.get(at + i).copied().unwrap_or(0xff);
            }
            return Ok(());
        }
        match ecam_offset(address, port - CONFIG_DATA) {
            Some(offset) => self.bus.read(0, offset, data),
            None => {
                data.fill(0xff);
                Ok(())
            }
        }
    }

    /// An OUT to `port`. Only a dword write sets CONFIG_ADDRESS: Linux's
    /// type-1 probe writes a byte to 0xCFB first and expects it to be ignored.
    pub fn write(&self, port: u16, data: &[u8]) -> Result<(), DeviceError> {
        if port < CONFIG_DATA {
            if let (CONFIG_ADDRESS, Ok(dword)) = (port, <[u8; 4]>::try_from(data)) {
                self.address
                    .store(u32::from_le_bytes(dword), Ordering::Release);
            }
            return Ok(());
        }
        let address = self.address.load(Ordering::Acquire);
        match ecam_offset(address, port - CONFIG_DATA) {
            Some(offset) => self.bus.write(0, offset, data).map(|_| ()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::host_bridge;

    fn address(bus: u32, device: u32, function: u32, register: u32) -> u32 {
        ENABLE | bus << 16 | device << 11 | function << 8 | register
    }

    #[test]
    fn address_decode() {
        assert_eq!(ecam_offset(address(0, 0, 0, 0), 0), Some(0));
        // Bus, device, function and register land in their ECAM fields.
        assert_eq!(
            ecam_offset(address(3, 31, 7, 0xfc), 0),
            Some(3 << 20 | 31 << 15 | 7 << 12 | 0xfc)
        );
        // The data port offset selects the byte; the register's low bits do not.
        assert_eq!(
            ecam_offset(address(0, 1, 2, 0x3d), 2),
            Some(1 << 15 | 2 << 12 | 0x3e)
        );
        // AMD's extended register bits 27:24 are register bits 11:8.
        assert_eq!(
            ecam_offset(address(0, 2, 0, 0x04) | 0x1 << 24, 0),
            Some(2 << 15 | 0x104)
        );
        // Enable bit clear: no config cycle.
        assert_eq!(ecam_offset(address(0, 1, 0, 0) & !ENABLE, 0), None);
    }

    #[test]
    fn linux_type1_probe_and_host_bridge_reads() {
        let conf1 = Conf1::new(Arc::new(PciBus::new()));
        // pci_check_type1: a byte to 0xCFB is ignored, then the enable bit
        // written to CONFIG_ADDRESS must read back.
        conf1.write(0xcfb, &[0x01]).unwrap();
        let mut dword = [0u8; 4];
        conf1.read(CONFIG_ADDRESS, &mut dword).unwrap();
        assert_eq!(dword, [0; 4]);
        conf1.write(CONFIG_ADDRESS, &ENABLE.to_le_bytes()).unwrap();
        conf1.read(CONFIG_ADDRESS, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), ENABLE);

        // Vendor/device of 00:00.0, as a dword and as words at 0xCFC/0xCFE.
        conf1.read(CONFIG_DATA, &mut dword).unwrap();
        assert_eq!(
            u32::from_le_bytes(dword),
            u32::from(host_bridge::DEVICE_ID) << 16 | u32::from(host_bridge::VENDOR_ID)
        );
        let mut word = [0u8; 2];
        conf1.read(CONFIG_DATA + 2, &mut word).unwrap();
        assert_eq!(u16::from_le_bytes(word), host_bridge::DEVICE_ID);
        // Class code bytes through byte reads of 0xCFD-0xCFF at register 8.
        conf1
            .write(CONFIG_ADDRESS, &address(0, 0, 0, 0x08).to_le_bytes())
            .unwrap();
        let mut class = [0u8; 3];
        for (i, byte) in class.iter_mut().enumerate() {
            conf1
                .read(CONFIG_DATA + 1 + i as u16, std::slice::from_mut(byte))
                .unwrap();
        }
        assert_eq!(
            class,
            [0x00, 0x00, 0x06],
            "host bridge: class 06, subclass 00"
        );

        // An empty slot and another bus read all ones; so does a disabled address.
        for empty in [address(0, 5, 0, 0), address(1, 0, 0, 0), 0] {
            conf1.write(CONFIG_ADDRESS, &empty.to_le_bytes()).unwrap();
            conf1.read(CONFIG_DATA, &mut dword).unwrap();
            assert_eq!(dword, [0xff; 4], "{empty:#x}");
            conf1.write(CONFIG_DATA, &[0; 4]).unwrap();
        }
        // A word across the dword boundary is a guest bug.
        conf1
            .write(CONFIG_ADDRESS, &address(0, 0, 0, 0).to_le_bytes())
            .unwrap();
        assert!(conf1.read(CONFIG_DATA + 3, &mut word).is_err());
        assert!(Conf1::handles(0xcf8) && Conf1::handles(0xcff));
        assert!(!Conf1::handles(0xcf7) && !Conf1::handles(0xd00));
    }
}
