//! Routing of MMIO exits to devices by guest-physical address.

use std::sync::Arc;

/// What the vCPU loop must do after a device handled a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MmioAction {
    /// Resume the vCPU.
    Continue,
    /// The guest asked to end the partition with this status.
    Exit { status: u64 },
    /// The guest reported an unrecoverable error.
    Fatal { code: u64, message: String },
}

/// A device misused by the guest (a guest bug, reported as such).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{device}: unsupported {len}-byte {access} of register offset {offset:#x}")]
    BadAccess {
        device: &'static str,
        access: &'static str,
        offset: u64,
        len: usize,
    },
    #[error("{device}: register offset {offset:#x} does not accept the value {value:#x}: {why}")]
    BadValue {
        device: &'static str,
        offset: u64,
        value: u64,
        why: &'static str,
    },
    #[error("{device}: the guest passed guest-physical address {addr:#x}, which is not readable guest RAM: {source}")]
    GuestMemory {
        device: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("{device}: virtqueue {queue}: {why}")]
    Queue {
        device: &'static str,
        queue: u16,
        why: String,
    },
}

/// A device with a register window on the MMIO bus. Handlers run on the vCPU
/// thread that exited, so they must be quick (PARK is the deliberate exception).
pub trait MmioDevice: Send + Sync {
    /// Short name for error messages.
    fn name(&self) -> &'static str;
    /// A guest load from `offset` in the device's window; fill `data`.
    fn read(&self, vcpu: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError>;
    /// A guest store of `data` to `offset` in the device's window.
    fn write(&self, vcpu: u32, offset: u64, data: &[u8]) -> Result<MmioAction, DeviceError>;
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("MMIO window {base:#x}+{len:#x} of {name} overlaps {other}")]
    Overlap {
        name: &'static str,
        base: u64,
        len: u64,
        other: &'static str,
    },
    #[error("MMIO window of {name} at {base:#x} has length 0 or wraps around")]
    BadWindow { name: &'static str, base: u64 },
}

struct Window {
    base: u64,
    len: u64,
    device: Arc<dyn MmioDevice>,
}

/// The devices of one partition, looked up by address.
#[derive(Default)]
pub struct MmioBus {
    windows: Vec<Window>,
}

impl MmioBus {
    pub fn new() -> Self {
        MmioBus::default()
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<dyn MmioDevice>,
    ) -> Result<(), BusError> {
        let name = device.name();
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadWindow { name, base })?;
        if let Some(other) = self
            .windows
            .iter()
            .find(|w| base < w.base + w.len && w.base < end)
        {
            return Err(BusError::Overlap {
                name,
                base,
                len,
                other: other.device.name(),
            });
        }
        self.windows.push(Window { base, len, device });
        Ok(())
    }

    /// The device whose window holds `addr`, and the offset into that window.
    pub fn find(&self, addr: u64) -> Option<(&dyn MmioDevice, u64)> {
        self.windows
            .iter()
            .find(|w| addr >= w.base && addr - w.base < w.len)
            .map(|w| (w.device.as_ref(), addr - w.base))
    }
}

/// Little-endian value of a register write of 1 to 8 bytes.
pub(crate) fn value_of(data: &[u8]) -> u64 {
    let mut bytes = [0u8; 8];
    let len = data.len().min(8);
    bytes[..len].copy_from_slice(&data[..len]);
    u64::from_le_bytes(bytes)
}

/// Fills a register read of 1 to 8 bytes with the low bytes of `value`.
pub(crate) fn fill(data: &mut [u8], value: u64) {
    let bytes = value.to_le_bytes();
    let len = data.len().min(8);
    data[..len].copy_from_slice(&bytes[..len]);
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);
    impl MmioDevice for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn read(&self, _: u32, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn write(&self, _: u32, _: u64, _: &[u8]) -> Result<MmioAction, DeviceError> {
            Ok(MmioAction::Continue)
        }
    }

    #[test]
    fn finds_devices_and_rejects_overlaps() {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x1000, Arc::new(Named("a"))).unwrap();
        bus.insert(0x2000, 0x1000, Arc::new(Named("b"))).unwrap();
        assert!(matches!(
            bus.insert(0x1800, 0x1000, Arc::new(Named("c"))),
            Err(BusError::Overlap { other: "a", .. })
        ));
        assert!(matches!(
            bus.insert(0x5000, 0, Arc::new(Named("d"))),
            Err(BusError::BadWindow { .. })
        ));
        let (device, offset) = bus.find(0x2010).unwrap();
        assert_eq!((device.name(), offset), ("b", 0x10));
        assert!(bus.find(0x3000).is_none());
        assert!(bus.find(0xfff).is_none());
    }

    #[test]
    fn register_values_are_little_endian() {
        assert_eq!(value_of(&[0x78, 0x56, 0x34, 0x12]), 0x1234_5678);
        let mut data = [0u8; 4];
        fill(&mut data, 0x1122_3344_5566_7788);
        assert_eq!(data, [0x88, 0x77, 0x66, 0x55]);
    }
}
