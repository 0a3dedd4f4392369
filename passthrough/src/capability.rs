//! Walking a config space's capability lists: the standard list (from the
//! pointer at 0x34, in the first 256 bytes) and the PCI Express extended list
//! (from 0x100, in the 4 KiB extended config space).

/// Standard capability IDs the VMM handles itself.
pub const CAP_ID_MSI: u8 = 0x05;
pub const CAP_ID_PCIE: u8 = 0x10;
pub const CAP_ID_MSIX: u8 = 0x11;

const STATUS: usize = 0x06;
const STATUS_CAP_LIST: u16 = 1 << 4;
const CAP_POINTER: usize = 0x34;
const EXTENDED_START: usize = 0x100;
/// 256-byte space, each capability at least 4 bytes past the 64-byte header.
const MAX_STANDARD: usize = (256 - 0x40) / 4;
const MAX_EXTENDED: usize = (4096 - 0x100) / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub id: u16,
    /// Offset of the capability header in config space.
    pub offset: u16,
    /// True for a PCI Express extended capability.
    pub extended: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CapabilityError {
    #[error("{list} capability list points to offset {offset:#x}, outside the {len}-byte config space or into the header")]
    OutOfRange {
        list: &'static str,
        offset: usize,
        len: usize,
    },
    #[error("{list} capability list loops (offset {offset:#x} seen twice)")]
    Loop { list: &'static str, offset: usize },
}

/// Every capability of `config` (256 or 4096 bytes), standard ones first, in
/// list order.
pub fn walk(config: &[u8]) -> Result<Vec<Capability>, CapabilityError> {
    let mut caps = Vec::new();
    let status = u16::from_le_bytes([config[STATUS], config[STATUS + 1]]);
    if status & STATUS_CAP_LIST != 0 {
        let mut offset = usize::from(config[CAP_POINTER] & !0x3);
        let mut seen = Vec::new();
        while offset != 0 {
            if !(0x40..=0xfc).contains(&offset) {
                return Err(CapabilityError::OutOfRange {
                    list: "standard",
                    offset,
                    len: 256,
                });
            }
            if seen.contains(&offset) || seen.len() >= MAX_STANDARD {
                return Err(CapabilityError::Loop {
                    list: "standard",
                    offset,
                });
            }
            seen.push(offset);
            caps.push(Capability {
                id: u16::from(config[offset]),
                offset: offset as u16,
                extended: false,
            });
            offset = usize::from(config[offset + 1] & !0x3);
        }
    }
    if config.len() > EXTENDED_START {
        let mut offset = EXTENDED_START;
        let mut seen = Vec::new();
        loop {
            if offset < EXTENDED_START || offset + 4 > config.len() {
                return Err(CapabilityError::OutOfRange {
                    list: "extended",
                    offset,
                    len: config.len(),
                });
            }
            let header = u32::from_le_bytes([
                config[offset],
                config[offset + 1],
                config[offset + 2],
                config[offset + 3],
            ]);
            // A conventional device (or a hidden list) reads 0 or all ones here.
            if header == 0 || header == 0xffff_ffff {
                break;
            }
            if seen.contains(&offset) || seen.len() >= MAX_EXTENDED {
                return Err(CapabilityError::Loop {
                    list: "extended",
                    offset,
                });
            }
            seen.push(offset);
            caps.push(Capability {
                id: (header & 0xffff) as u16,
                offset: offset as u16,
                extended: true,
            });
            let next = (header >> 20) as usize & !0x3;
            if next == 0 {
                break;
            }
            offset = next;
        }
    }
    Ok(caps)
}

/// The first standard capability with `id`.
pub fn find(caps: &[Capability], id: u8) -> Option<Capability> {
    caps.iter()
        .copied()
        .find(|c| !c.extended && c.id == u16::from(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_with_caps() -> Vec<u8> {
        let mut config = vec![0u8; 4096];
        config[STATUS] = STATUS_CAP_LIST as u8;
        config[CAP_POINTER] = 0x40;
        config[0x40..0x42].copy_from_slice(&[0x01, 0x50]); // PM -> 0x50
        config[0x50..0x52].copy_from_slice(&[CAP_ID_MSIX, 0x00]);
        // AER v1 at 0x100 -> ACS (0x0d) v1 at 0x148 -> end.
        config[0x100..0x104].copy_from_slice(&(0x0001_u32 | 1 << 16 | 0x148 << 20).to_le_bytes());
        config[0x148..0x14c].copy_from_slice(&(0x000d_u32 | 1 << 16).to_le_bytes());
        config
    }

    #[test]
    fn walks_both_lists() {
        let caps = walk(&header_with_caps()).unwrap();
        let summary: Vec<(u16, u16, bool)> =
            caps.iter().map(|c| (c.id, c.offset, c.extended)).collect();
        assert_eq!(
            summary,
            vec![
                (0x01, 0x40, false),
                (0x11, 0x50, false),
                (0x01, 0x100, true),
                (0x0d, 0x148, true)
            ]
        );
        assert_eq!(find(&caps, CAP_ID_MSIX).unwrap().offset, 0x50);
        assert_eq!(find(&caps, CAP_ID_MSI), None);
        // A 256-byte dump has no extended list.
        assert_eq!(walk(&header_with_caps()[..256]).unwrap().len(), 2);
    }

    #[test]
    fn rejects_loops_and_wild_pointers() {
        let mut looped = header_with_caps();
        looped[0x51] = 0x40;
        assert_eq!(
            walk(&looped),
            Err(CapabilityError::Loop {
                list: "standard",
                offset: 0x40
            })
        );
        let mut wild = header_with_caps();
        wild[CAP_POINTER] = 0x20;
        assert!(matches!(
            walk(&wild),
            Err(CapabilityError::OutOfRange { offset: 0x20, .. })
        ));
        let mut ext_loop = header_with_caps();
        ext_loop[0x148..0x14c].copy_from_slice(&(0x000d_u32 | 1 << 16 | 0x100 << 20).to_le_bytes());
        assert_eq!(
            walk(&ext_loop),
            Err(CapabilityError::Loop {
                list: "extended",
                offset: 0x100
            })
        );
        let mut ext_low = header_with_caps();
        ext_low[0x148..0x14c].copy_from_slice(&(0x000d_u32 | 1 << 16 | 0x40 << 20).to_le_bytes());
        assert!(matches!(
            walk(&ext_low),
            Err(CapabilityError::OutOfRange {
                list: "extended",
                offset: 0x40,
                ..
            })
        ));
    }
}
