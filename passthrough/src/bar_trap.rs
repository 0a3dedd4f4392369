//! The trapped part of a passed-through BAR. The VMM puts the whole BAR on
//! its MMIO bus at the guest address and the mmappable pieces in KVM
//! memslots over it, so only the rest exits to here: accesses to the MSI-X
//! table and PBA reach the emulated [`MsixTable`], anything else the
//! device's region through VFIO.

use std::sync::{Arc, Mutex};

use aivmm_devices::bus::{DeviceError, MmioAction, MmioDevice};

use crate::msix::{MsixError, MsixLayout, MsixTable};

/// Access to a device BAR's registers (VFIO's region; a fake in tests).
pub trait DeviceRegion: Send {
    fn read(&self, bar: u8, offset: u64, data: &mut [u8]);
    fn write(&mut self, bar: u8, offset: u64, data: &[u8]);
}

pub struct TrappedBar<R: DeviceRegion> {
    bar: u8,
    size: u64,
    msix: Option<MsixLayout>,
    table: Arc<Mutex<MsixTable>>,
    region: Mutex<R>,
    /// Vectors whose table entry the guest wrote since the VMM last looked.
    written: Mutex<Vec<u16>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

enum Target {
    Table(u64),
    Pba(u64),
    Device,
}

impl<R: DeviceRegion> TrappedBar<R> {
    /// BAR `bar` of `size` bytes; `msix` and `table` when the device's MSI-X
    /// table or PBA live in it (the table is shared with the other BAR
    /// holding the PBA, if that is another one).
    pub fn new(
        bar: u8,
        size: u64,
        msix: Option<MsixLayout>,
        table: Arc<Mutex<MsixTable>>,
        region: R,
    ) -> Self {
        TrappedBar {
            bar,
            size,
            msix,
            table,
            region: Mutex::new(region),
            written: Mutex::new(Vec::new()),
        }
    }

    /// The BAR register index this is.
    pub fn bar(&self) -> u8 {
        self.bar
    }

    /// The vectors written since the last call: recompute their routes
    /// (`DeviceVectors::update(v, table.route(v))`).
    pub fn take_written_vectors(&self) -> Vec<u16> {
        std::mem::take(&mut *lock(&self.written))
    }

    fn target(&self, offset: u64) -> Target {
        if let Some(m) = &self.msix {
            let table = u64::from(m.table_offset);
            if m.table_bar == self.bar && (table..table + m.table_len()).contains(&offset) {
                return Target::Table(offset - table);
            }
            let pba = u64::from(m.pba_offset);
            if m.pba_bar == self.bar && (pba..pba + m.pba_len()).contains(&offset) {
                return Target::Pba(offset - pba);
            }
        }
        Target::Device
    }

    fn check(&self, access: &'static str, offset: u64, len: usize) -> Result<(), DeviceError> {
        if offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.size)
        {
            Ok(())
        } else {
            Err(DeviceError::BadAccess {
                device: "pci-bar",
                access,
                offset,
                len,
            })
        }
    }
}

fn msix_error(error: MsixError, access: &'static str, offset: u64) -> DeviceError {
    match error {
        MsixError::BadAccess { len, .. } => DeviceError::BadAccess {
            device: "msix-table",
            access,
            offset,
            len,
        },
        MsixError::BadBir { .. } => DeviceError::BadValue {
            device: "msix-table",
            offset,
            value: 0,
            why: "MSI-X layout names no BAR",
        },
    }
}

impl<R: DeviceRegion> MmioDevice for TrappedBar<R> {
    fn name(&self) -> &'static str {
        "pci-bar"
    }

    fn read(&self, _vcpu: u32, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        self.check("read", offset, data.len())?;
        match self.target(offset) {
            Target::Table(at) => lock(&self.table)
                .read_table(at, data)
                .map_err(|e| msix_error(e, "read", offset)),
            Target::Pba(at) => lock(&self.table)
                .read_pba(at, data)
                .map_err(|e| msix_error(e, "read", offset)),
            Target::Device => {
                lock(&self.region).read(self.bar, offset, data);
                Ok(())
            }
        }
    }

    fn write(&self, _vcpu: u32, offset: u64, data: &[u8]) -> Result<MmioAction, DeviceError> {
        self.check("write", offset, data.len())?;
        match self.target(offset) {
            Target::Table(at) => {
                let vector = lock(&self.table)
                    .write_table(at, data)
                    .map_err(|e| msix_error(e, "write", offset))?;
                let mut written = lock(&self.written);
                if !written.contains(&vector) {
                    written.push(vector);
                }
            }
            // The PBA is read-only.
            Target::Pba(_) => {}
            Target::Device => lock(&self.region).write(self.bar, offset, data),
        }
        Ok(MmioAction::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq_routing::{GsiRoutingTable, IrqfdChange, MsiMessage};

    /// A BAR's registers as a byte array.
    struct Registers {
        bytes: Vec<u8>,
    }

    impl DeviceRegion for Registers {
        fn read(&self, _bar: u8, offset: u64, data: &mut [u8]) {
            let at = offset as usize;
            data.copy_from_slice(&self.bytes[at..at + data.len()]);
        }
        fn write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
            let at = offset as usize;
            self.bytes[at..at + data.len()].copy_from_slice(data);
        }
    }

    fn layout() -> MsixLayout {
        // Like this machine's virtio devices: 3 vectors, table at 0x8000
        // and PBA at 0x48000 of a 512 KiB BAR0.
        MsixLayout {
            offset: 0x98,
            table_size: 3,
            table_bar: 0,
            table_offset: 0x8000,
            pba_bar: 0,
            pba_offset: 0x4_8000,
        }
    }

    #[test]
    fn table_and_pba_are_emulated_the_rest_reaches_the_device() {
        let table = Arc::new(Mutex::new(MsixTable::new(3)));
        let bar = TrappedBar::new(
            0,
            0x8_0000,
            Some(layout()),
            table.clone(),
            Registers {
                bytes: vec![0; 0x8_0000],
            },
        );
        // A device register outside the table.
        bar.write(0, 0x10, &0xabcdu32.to_le_bytes()).unwrap();
        let mut dword = [0u8; 4];
        bar.read(0, 0x10, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), 0xabcd);
        assert_eq!(
            &lock(&bar.region).bytes[0x10..0x14],
            &0xabcdu32.to_le_bytes()
        );

        // The guest programs vector 2 and unmasks it.
        bar.write(0, 0x8000 + 32, &0xfee0_0000u32.to_le_bytes())
            .unwrap();
        bar.write(0, 0x8000 + 40, &0x4023u32.to_le_bytes()).unwrap();
        bar.write(0, 0x8000 + 44, &0u32.to_le_bytes()).unwrap();
        assert_eq!(bar.take_written_vectors(), vec![2]);
        assert!(bar.take_written_vectors().is_empty());
        // Nothing of it reached the device's real table.
        assert!(lock(&bar.region).bytes[0x8000..0x8030]
            .iter()
            .all(|&b| b == 0));
        bar.read(0, 0x8000 + 40, &mut dword).unwrap();
        assert_eq!(u32::from_le_bytes(dword), 0x4023);

        // Routed once MSI-X is on.
        let mut routing = GsiRoutingTable::with_irqchip(64);
        let mut vectors = routing.allocate(3).unwrap();
        lock(&table).set_control(true, false);
        let route = lock(&table).route(2);
        assert_eq!(
            vectors.update(2, route).unwrap(),
            Some(IrqfdChange::Attach {
                vector: 2,
                gsi: 26,
                message: MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x4023
                }
            })
        );

        // The PBA reads the VMM's pending bits and ignores writes.
        lock(&table).set_pending(1, true);
        bar.write(0, 0x4_8000, &0u64.to_le_bytes()).unwrap();
        let mut qword = [0u8; 8];
        bar.read(0, 0x4_8000, &mut qword).unwrap();
        assert_eq!(u64::from_le_bytes(qword), 0b10);

        // Past the BAR, or a 2-byte table access: guest bugs, reported.
        assert!(bar.read(0, 0x8_0000, &mut dword).is_err());
        assert!(bar.write(0, 0x8000, &[0u8; 2]).is_err());
    }
}
