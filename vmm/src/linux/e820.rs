//! The guest-physical memory map of a Linux guest: where RAM is (below the
//! 32-bit MMIO hole and, for large guests, above 4 GiB) and the BIOS e820 map
//! that tells the kernel so.

use vm_memory::GuestMemoryMmap;

use crate::vstate::memory::{self, MemoryError, RamBacking};

/// End of conventional memory usable as RAM (the rest of the first MiB is
/// legacy VGA and BIOS space; the MP table lives there).
pub const LOW_RAM_END: u64 = 0x9_fc00;
/// Start of the extended-memory RAM the kernel is loaded into.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole (IOAPIC, local APIC, PCI windows): RAM
/// beyond this moves above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// Where RAM continues above the hole.
pub const HIGH_RAM_START: u64 = 1 << 32;
/// The smallest guest a Linux kernel can boot in.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Memory sizes are whole 2 MiB blocks.
pub const MEMORY_ALIGN: u64 = 2 << 20;

/// e820 entry types (the BIOS INT 15h, AX=E820h ones Linux knows).
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum E820Error {
    #[error("guest memory of {size} bytes is too small for a Linux guest: give it at least {min} bytes (--memory 16M)")]
    TooSmall { size: u64, min: u64 },
    #[error("guest memory of {size} bytes is not a multiple of 2 MiB")]
    Unaligned { size: u64 },
    #[error("guest memory of {size} bytes is too large (at most {max})")]
    TooLarge { size: u64, max: u64 },
}

/// One entry of the e820 map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// The largest guest this layout supports (the partitions' RAM limit, less
/// the hole it skips).
const MAX_MEMORY: u64 = aivmm_guest_abi::layout::RAM_MAX - (HIGH_RAM_START - MMIO_HOLE_START);

fn check(memory_bytes: u64) -> Result<(), E820Error> {
    if memory_bytes < MIN_MEMORY {
        return Err(E820Error::TooSmall {
            size: memory_bytes,
            min: MIN_MEMORY,
        });
    }
    if !memory_bytes.is_multiple_of(MEMORY_ALIGN) {
        return Err(E820Error::Unaligned { size: memory_bytes });
    }
    if memory_bytes > MAX_MEMORY {
        return Err(E820Error::TooLarge {
            size: memory_bytes,
            max: MAX_MEMORY,
        });
    }
    Ok(())
}

/// The guest RAM ranges (start, size) for `memory_bytes` of memory: all of
/// it from 0 if it fits below the hole, else the rest from 4 GiB.
pub fn ram_ranges(memory_bytes: u64) -> Result<Vec<(u64, u64)>, E820Error> {
    check(memory_bytes)?;
    let low = memory_bytes.min(MMIO_HOLE_START);
    let mut ranges = vec![(0, low)];
    if memory_bytes > low {
        ranges.push((HIGH_RAM_START, memory_bytes - low));
    }
    Ok(ranges)
}

/// One past the highest guest-physical RAM address below 4 GiB.
pub fn low_ram_end(memory_bytes: u64) -> u64 {
    memory_bytes.min(MMIO_HOLE_START)
}

/// Guest RAM for `memory_bytes`, laid out as [`ram_ranges`] says, backed,
/// bound and prefaulted as the inference partitions' RAM is
/// ([`crate::vstate::memory`]).
pub fn create_guest_ram(
    memory_bytes: u64,
    backing: RamBacking,
    node: Option<u32>,
) -> Result<GuestMemoryMmap, GuestRamError> {
    let ranges = ram_ranges(memory_bytes)?;
    Ok(memory::create_guest_ram_ranges(&ranges, backing, node)?)
}

/// Why a Linux guest's RAM could not be made: its size, or the host.
#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    #[error(transparent)]
    Size(#[from] E820Error),
    #[error(transparent)]
    Host(#[from] MemoryError),
}

/// The e820 map: conventional memory, a reserved strip below 640 KiB, the
/// BIOS area with the ACPI and MP tables, extended memory up to the hole, the PCI ECAM window
/// (reserved) in the hole, and RAM above 4 GiB.
pub fn memory_map(memory_bytes: u64) -> Result<Vec<E820Entry>, E820Error> {
    let ranges = ram_ranges(memory_bytes)?;
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: LOW_RAM_END,
            kind: E820_RAM,
        },
        E820Entry {
            addr: LOW_RAM_END,
            size: 0xa_0000 - LOW_RAM_END,
            kind: E820_RESERVED,
        },
        // The ACPI tables, then the MP table, up to 1 MiB.
        E820Entry {
            addr: crate::linux::acpi::ACPI_START,
            size: HIMEM_START - crate::linux::acpi::ACPI_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, size) in ranges {
        let end = start + size;
        let start = start.max(HIMEM_START);
        map.push(E820Entry {
            addr: start,
            size: end - start,
            kind: E820_RAM,
        });
    }
    // Linux uses the ECAM window only if firmware reserved it.
    map.push(E820Entry {
        addr: crate::linux::pci::ECAM_BASE,
        size: crate::linux::pci::ECAM_SIZE,
        kind: E820_RESERVED,
    });
    map.sort_by_key(|entry| entry.addr);
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn small_guest_is_one_low_range() {
        let size = 256 << 20;
        assert_eq!(ram_ranges(size).unwrap(), vec![(0, size)]);
        let map = memory_map(size).unwrap();
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x400,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0xe0000,
                    size: 0x20000,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: size - 0x100000,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0xe000_0000,
                    size: 1 << 20,
                    kind: E820_RESERVED
                },
            ]
        );
        let total: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            total,
            size - (0x100000 - 0x9fc00),
            "all RAM but the legacy hole"
        );
    }

    #[test]
    fn large_guest_skips_the_32_bit_hole() {
        let size = 4u64 << 30;
        assert_eq!(
            ram_ranges(size).unwrap(),
            vec![(0, 3 << 30), (4 << 30, 1 << 30)]
        );
        let map = memory_map(size).unwrap();
        let last = map.last().unwrap();
        assert_eq!(
            (last.addr, last.size, last.kind),
            (4 << 30, 1 << 30, E820_RAM)
        );
        let ecam = map[map.len() - 2];
        assert_eq!(
            (ecam.addr, ecam.size, ecam.kind),
            (0xe000_0000, 1 << 20, E820_RESERVED)
        );
        let extended = map[3];
        assert_eq!(
            (extended.addr, extended.addr + extended.size),
            (0x100000, 3 << 30)
        );
        for entry in &map {
            let end = entry.addr + entry.size;
            assert!(
                end <= MMIO_HOLE_START || entry.addr >= HIGH_RAM_START || entry.kind != E820_RAM,
                "{entry:?}: RAM in the MMIO hole"
            );
        }
        // Exactly at the hole: no high range.
        assert_eq!(ram_ranges(3 << 30).unwrap(), vec![(0, 3 << 30)]);
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            ram_ranges(8 << 20),
            Err(E820Error::TooSmall { .. })
        ));
        assert!(matches!(
            ram_ranges((64 << 20) + 4096),
            Err(E820Error::Unaligned { .. })
        ));
        assert!(matches!(
            ram_ranges(1 << 40),
            Err(E820Error::TooLarge { .. })
        ));
    }

    #[test]
    fn guest_ram_follows_the_ranges() {
        let ram = create_guest_ram(32 << 20, RamBacking::Anonymous, None).unwrap();
        assert_eq!(ram.num_regions(), 1);
        assert_eq!(ram.last_addr(), vm_memory::GuestAddress((32 << 20) - 1));
        assert!(matches!(
            create_guest_ram(8 << 20, RamBacking::Anonymous, None),
            Err(GuestRamError::Size(E820Error::TooSmall { .. }))
        ));
    }
}
