//! The host bridge at 00:00.0: a read-only PCI Express root complex
//! function that tells the guest the bus is there. It has no BARs, no
//! capabilities and no interrupts; guest writes are ignored.

use crate::bus::DeviceError;
use crate::pci::PciFunction;

/// Red Hat's ID for a generic PCIe host bridge (QEMU's "gpex"): Linux needs
/// no driver for it.
pub const VENDOR_ID: u16 = 0x1b36;
pub const DEVICE_ID: u16 = 0x0008;
/// Base class 06 (bridge), subclass 00 (host bridge).
pub const CLASS: u32 = 0x06_0000;

pub struct HostBridge {
    config: [u8; 64],
}

impl Default for HostBridge {
    fn default() -> Self {
        HostBridge::new()
    }
}

impl HostBridge {
    pub fn new() -> HostBridge {
        let mut config = [0u8; 64];
        config[0x00..0x02].copy_from_slice(&VENDOR_ID.to_le_bytes());
        config[0x02..0x04].copy_from_slice(&DEVICE_ID.to_le_bytes());
        // Revision 0, then class code in bytes 0x09..0x0c.
        config[0x09..0x0c].copy_from_slice(&CLASS.to_le_bytes()[..3]);
        config[0x0e] = 0x00; // type-0 header, single function
        config[0x2c..0x2e].copy_from_slice(&VENDOR_ID.to_le_bytes()); // subsystem vendor
        config[0x2e..0x30].copy_from_slice(&0x1100u16.to_le_bytes()); // subsystem
        HostBridge { config }
    }
}

impl PciFunction for HostBridge {
    fn name(&self) -> &'static str {
        "pci-host-bridge"
    }

    fn read_config(&self, offset: u16, data: &mut [u8]) -> Result<(), DeviceError> {
        let at = usize::from(offset);
        match self.config.get(at..at + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
        Ok(())
    }

    fn write_config(&self, _offset: u16, _data: &[u8]) -> Result<(), DeviceError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_as_a_host_bridge_and_ignores_writes() {
        let bridge = HostBridge::new();
        let mut dword = [0u8; 4];
        bridge.read_config(0x08, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword) >> 8, CLASS);
        bridge.write_config(0x00, &[0xff; 4]).unwrap();
        bridge.write_config(0x04, &[0x07, 0x00]).unwrap();
        bridge.read_config(0x00, &mut dword).unwrap();
        assert_eq!(dword, [0x36, 0x1b, 0x08, 0x00]);
        let mut command = [0u8; 2];
        bridge.read_config(0x04, &mut command).unwrap();
        assert_eq!(command, [0, 0]);
        // No capability list; the extended space reads 0 (no capabilities).
        bridge.read_config(0x34, &mut dword).unwrap();
        assert_eq!(dword, [0; 4]);
        bridge.read_config(0x100, &mut dword).unwrap();
        assert_eq!(dword, [0; 4]);
    }
}
