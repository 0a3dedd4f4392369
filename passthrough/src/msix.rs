//! MSI-X emulated in the VMM: the capability's fields, and the vector table
//! and pending-bit array the guest reaches through a BAR. The device's real
//! table is programmed by VFIO (one eventfd per vector), never by the guest.

use crate::irq_routing::MsiMessage;

const CONTROL_ENABLE: u16 = 1 << 15;
const CONTROL_FUNCTION_MASK: u16 = 1 << 14;
/// Bytes per table entry: address low, address high, data, vector control.
pub const ENTRY_SIZE: u64 = 16;
const VECTOR_MASKED: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixLayout {
    pub offset: u16,
    /// Vectors in the table (1..=2048).
    pub table_size: u16,
    pub table_bar: u8,
    pub table_offset: u32,
    pub pba_bar: u8,
    pub pba_offset: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MsixError {
    #[error("MSI-X {what} BIR is {bir}, which names no BAR (0-5)")]
    BadBir { what: &'static str, bir: u8 },
    #[error("MSI-X {what}: unsupported {len}-byte access at offset {offset:#x} (the table takes aligned 4- or 8-byte accesses)")]
    BadAccess {
        what: &'static str,
        offset: u64,
        len: usize,
    },
}

fn u32_at(config: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]])
}

impl MsixLayout {
    pub fn parse(config: &[u8], offset: u16) -> Result<MsixLayout, MsixError> {
        let at = usize::from(offset);
        let control = u16::from_le_bytes([config[at + 2], config[at + 3]]);
        let table = u32_at(config, at + 4);
        let pba = u32_at(config, at + 8);
        let bir = |what, value: u32| {
            let bir = (value & 0x7) as u8;
            if bir > 5 {
                Err(MsixError::BadBir { what, bir })
            } else {
                Ok(bir)
            }
        };
        Ok(MsixLayout {
            offset,
            table_size: (control & 0x7ff) + 1,
            table_bar: bir("table", table)?,
            table_offset: table & !0x7,
            pba_bar: bir("PBA", pba)?,
            pba_offset: pba & !0x7,
        })
    }

    /// Bytes of the vector table.
    pub fn table_len(&self) -> u64 {
        u64::from(self.table_size) * ENTRY_SIZE
    }

    /// Bytes of the pending-bit array (whole qwords).
    pub fn pba_len(&self) -> u64 {
        u64::from(self.table_size).div_ceil(64) * 8
    }

    /// The (offset, length) ranges of BAR `bar` that the table and the PBA
    /// occupy: the VMM traps them, whatever VFIO says is mmappable.
    pub fn ranges_in(&self, bar: u8) -> Vec<(u64, u64)> {
        let mut ranges = Vec::new();
        if self.table_bar == bar {
            ranges.push((u64::from(self.table_offset), self.table_len()));
        }
        if self.pba_bar == bar {
            ranges.push((u64::from(self.pba_offset), self.pba_len()));
        }
        ranges
    }

    /// Guest-writable bits of the capability: MSI-X enable and function mask.
    pub fn writable(&self) -> Vec<(u16, u32)> {
        vec![(
            self.offset,
            u32::from(CONTROL_ENABLE | CONTROL_FUNCTION_MASK) << 16,
        )]
    }

    /// (enabled, function masked) from the emulated config bytes.
    pub fn control(&self, config: &[u8]) -> (bool, bool) {
        let at = usize::from(self.offset) + 2;
        let control = u16::from_le_bytes([config[at], config[at + 1]]);
        (
            control & CONTROL_ENABLE != 0,
            control & CONTROL_FUNCTION_MASK != 0,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsixEntry {
    pub address: u64,
    pub data: u32,
    pub vector_control: u32,
}

impl MsixEntry {
    pub fn masked(&self) -> bool {
        self.vector_control & VECTOR_MASKED != 0
    }
}

/// The emulated table and PBA of one device.
#[derive(Debug, Clone)]
pub struct MsixTable {
    entries: Vec<MsixEntry>,
    pending: Vec<u64>,
    enabled: bool,
    function_mask: bool,
}

impl MsixTable {
    /// A table as after reset: every vector masked, nothing pending.
    pub fn new(table_size: u16) -> MsixTable {
        MsixTable {
            entries: vec![
                MsixEntry {
                    address: 0,
                    data: 0,
                    vector_control: VECTOR_MASKED,
                };
                usize::from(table_size)
            ],
            pending: vec![0; usize::from(table_size).div_ceil(64)],
            enabled: false,
            function_mask: false,
        }
    }

    pub fn entry(&self, vector: u16) -> Option<MsixEntry> {
        self.entries.get(usize::from(vector)).copied()
    }

    /// Takes the capability's control bits after a config write; returns
    /// whether every vector's route must be recomputed.
    pub fn set_control(&mut self, enabled: bool, function_mask: bool) -> bool {
        let changed = (enabled, function_mask) != (self.enabled, self.function_mask);
        self.enabled = enabled;
        self.function_mask = function_mask;
        changed
    }

    /// Where vector `vector` must be delivered, or None while it cannot fire
    /// (MSI-X off, function masked, or vector masked: the VMM then records
    /// its interrupts in the PBA instead).
    pub fn route(&self, vector: u16) -> Option<MsiMessage> {
        let entry = self.entry(vector)?;
        (self.enabled && !self.function_mask && !entry.masked()).then_some(MsiMessage {
            address: entry.address,
            data: entry.data,
        })
    }

    /// Every vector's route, indexed by vector.
    pub fn routes(&self) -> Vec<Option<MsiMessage>> {
        (0..self.entries.len() as u16)
            .map(|v| self.route(v))
            .collect()
    }

    fn check(what: &'static str, offset: u64, len: usize, limit: u64) -> Result<(), MsixError> {
        let ok = matches!(len, 4 | 8)
            && offset.is_multiple_of(len as u64)
            && offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= limit);
        if ok {
            Ok(())
        } else {
            Err(MsixError::BadAccess { what, offset, len })
        }
    }

    /// A guest load from the table at `offset`.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) -> Result<(), MsixError> {
        Self::check(
            "table",
            offset,
            data.len(),
            self.entries.len() as u64 * ENTRY_SIZE,
        )?;
        for (i, chunk) in data.chunks_mut(4).enumerate() {
            let at = offset + 4 * i as u64;
            let entry = &self.entries[(at / ENTRY_SIZE) as usize];
            let value = match at % ENTRY_SIZE {
                0 => entry.address as u32,
                4 => (entry.address >> 32) as u32,
                8 => entry.data,
                _ => entry.vector_control,
            };
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        Ok(())
    }

    /// A guest store to the table at `offset`; returns the vector written.
    pub fn write_table(&mut self, offset: u64, data: &[u8]) -> Result<u16, MsixError> {
        Self::check(
            "table",
            offset,
            data.len(),
            self.entries.len() as u64 * ENTRY_SIZE,
        )?;
        for (i, chunk) in data.chunks(4).enumerate() {
            let at = offset + 4 * i as u64;
            let value = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let entry = &mut self.entries[(at / ENTRY_SIZE) as usize];
            match at % ENTRY_SIZE {
                0 => entry.address = (entry.address & !0xffff_ffff) | u64::from(value & !0x3),
                4 => entry.address = (entry.address & 0xffff_ffff) | u64::from(value) << 32,
                8 => entry.data = value,
                // Only the mask bit of vector control is defined.
                _ => entry.vector_control = value & VECTOR_MASKED,
            }
        }
        Ok((offset / ENTRY_SIZE) as u16)
    }

    /// A guest load from the PBA at `offset` (writes to the PBA are ignored).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) -> Result<(), MsixError> {
        Self::check("PBA", offset, data.len(), self.pending.len() as u64 * 8)?;
        let qword = self.pending[(offset / 8) as usize];
        let bytes = qword.to_le_bytes();
        let start = (offset % 8) as usize;
        data.copy_from_slice(&bytes[start..start + data.len()]);
        Ok(())
    }

    /// Records an interrupt that arrived while the vector could not fire.
    pub fn set_pending(&mut self, vector: u16, pending: bool) {
        let (word, bit) = (usize::from(vector) / 64, vector % 64);
        if let Some(word) = self.pending.get_mut(word) {
            if pending {
                *word |= 1 << bit;
            } else {
                *word &= !(1 << bit);
            }
        }
    }

    pub fn is_pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector) / 64)
            .is_some_and(|w| w & (1 << (vector % 64)) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_programming_and_routes() {
        let mut table = MsixTable::new(5);
        assert!(table.routes().iter().all(Option::is_none));
        // Vector 3: address in two dword writes, data, then unmask.
        table
            .write_table(3 * 16, &0xfee0_2000u32.to_le_bytes())
            .unwrap();
        table.write_table(3 * 16 + 4, &0u32.to_le_bytes()).unwrap();
        table
            .write_table(3 * 16 + 8, &0x4055u32.to_le_bytes())
            .unwrap();
        assert_eq!(
            table.write_table(3 * 16 + 12, &0u32.to_le_bytes()).unwrap(),
            3
        );
        assert_eq!(table.route(3), None, "MSI-X is not enabled yet");
        assert!(table.set_control(true, false));
        assert!(!table.set_control(true, false));
        let message = MsiMessage {
            address: 0xfee0_2000,
            data: 0x4055,
        };
        assert_eq!(table.route(3), Some(message));
        assert_eq!(table.routes().iter().filter(|r| r.is_some()).count(), 1);
        table.set_control(true, true);
        assert_eq!(table.route(3), None, "function mask");
        table.set_control(true, false);
        // A qword write of address low+high, and a qword read back.
        table
            .write_table(0, &0x0000_0001_fee0_1000u64.to_le_bytes())
            .unwrap();
        let mut qword = [0u8; 8];
        table.read_table(0, &mut qword).unwrap();
        assert_eq!(u64::from_le_bytes(qword), 0x0000_0001_fee0_1000);
        let mut control = [0u8; 4];
        table.read_table(12, &mut control).unwrap();
        assert_eq!(u32::from_le_bytes(control), 1, "vector 0 stays masked");
    }

    #[test]
    fn bad_accesses_are_refused() {
        let mut table = MsixTable::new(2);
        assert_eq!(
            table.write_table(2, &[0u8; 4]),
            Err(MsixError::BadAccess {
                what: "table",
                offset: 2,
                len: 4
            })
        );
        assert!(
            table.write_table(32, &[0u8; 4]).is_err(),
            "past the last entry"
        );
        assert!(table.read_table(0, &mut [0u8; 2]).is_err());
        assert!(table.read_pba(8, &mut [0u8; 8]).is_err());
    }

    #[test]
    fn pending_bits() {
        let mut table = MsixTable::new(70);
        table.set_pending(65, true);
        table.set_pending(1, true);
        let mut qword = [0u8; 8];
        table.read_pba(8, &mut qword).unwrap();
        assert_eq!(u64::from_le_bytes(qword), 1 << 1);
        table.read_pba(0, &mut qword).unwrap();
        assert_eq!(u64::from_le_bytes(qword), 1 << 1);
        assert!(table.is_pending(65));
        table.set_pending(65, false);
        assert!(!table.is_pending(65));
        table.set_pending(500, true); // out of range: ignored
    }

    #[test]
    fn layout_from_capability() {
        let mut config = vec![0u8; 256];
        config[0x98..0xa4].copy_from_slice(&[
            0x11, 0x00, 0x04, 0x80, 0x00, 0x80, 0x00, 0x00, 0x00, 0x80, 0x04, 0x00,
        ]);
        let layout = MsixLayout::parse(&config, 0x98).unwrap();
        assert_eq!(
            layout,
            MsixLayout {
                offset: 0x98,
                table_size: 5,
                table_bar: 0,
                table_offset: 0x8000,
                pba_bar: 0,
                pba_offset: 0x48000
            }
        );
        assert_eq!((layout.table_len(), layout.pba_len()), (80, 8));
        assert_eq!(layout.ranges_in(0), vec![(0x8000, 80), (0x48000, 8)]);
        assert_eq!(layout.ranges_in(2), vec![]);
        assert_eq!(layout.control(&config), (true, false));
        config[0xa0] = 0x06;
        assert_eq!(
            MsixLayout::parse(&config, 0x98),
            Err(MsixError::BadBir {
                what: "PBA",
                bir: 6
            })
        );
    }
}
