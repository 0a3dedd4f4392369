//! The PVH boot protocol's start info (xen/include/public/arch-x86/hvm/
//! start_info.h, version 1): magic, command line, initrd as module 0, and the
//! memory map, which replaces the zero page's e820 table on this path.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::e820::E820Entry;

/// hvm_start_info, then the module list, then the memory map.
pub const START_INFO_ADDR: u64 = 0x6000;
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
const START_INFO_LEN: u64 = 56;
const MODULE_LEN: u64 = 32;
const MEMMAP_ENTRY_LEN: u64 = 24;
const MODLIST_ADDR: u64 = START_INFO_ADDR + START_INFO_LEN;
const MEMMAP_ADDR: u64 = MODLIST_ADDR + MODULE_LEN;
/// The start info and its tables stay within their page.
pub const MAX_MEMMAP_ENTRIES: usize =
    ((0x1000 - (MEMMAP_ADDR - START_INFO_ADDR)) / MEMMAP_ENTRY_LEN) as usize;

#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    #[error("the memory map has {entries} entries; the PVH start info page holds {max}")]
    TooManyEntries { entries: usize, max: usize },
    #[error("cannot write the PVH start info into guest memory: {0}")]
    GuestMemory(#[source] GuestMemoryError),
}

/// The start info page's bytes, for a command line at `cmdline_addr`.
pub fn build(
    cmdline_addr: u64,
    rsdp: u64,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
) -> Result<Vec<u8>, PvhError> {
    if e820.len() > MAX_MEMMAP_ENTRIES {
        return Err(PvhError::TooManyEntries {
            entries: e820.len(),
            max: MAX_MEMMAP_ENTRIES,
        });
    }
    let mut page = Vec::with_capacity(0x1000);
    page.extend_from_slice(&START_INFO_MAGIC.to_le_bytes());
    page.extend_from_slice(&1u32.to_le_bytes()); // version 1: has the memory map
    page.extend_from_slice(&0u32.to_le_bytes()); // flags
    page.extend_from_slice(&u32::from(initrd.is_some()).to_le_bytes()); // nr_modules
    page.extend_from_slice(&MODLIST_ADDR.to_le_bytes());
    page.extend_from_slice(&cmdline_addr.to_le_bytes());
    page.extend_from_slice(&rsdp.to_le_bytes()); // rsdp_paddr (0: none)
    page.extend_from_slice(&MEMMAP_ADDR.to_le_bytes());
    page.extend_from_slice(&(e820.len() as u32).to_le_bytes());
    page.extend_from_slice(&0u32.to_le_bytes());
    let (initrd_addr, initrd_size) = initrd.unwrap_or((0, 0));
    page.extend_from_slice(&initrd_addr.to_le_bytes());
    page.extend_from_slice(&initrd_size.to_le_bytes());
    page.extend_from_slice(&[0; 16]); // module cmdline, reserved
    for entry in e820 {
        page.extend_from_slice(&entry.addr.to_le_bytes());
        page.extend_from_slice(&entry.size.to_le_bytes());
        // The e820 and hvm_memmap types share their numbering.
        page.extend_from_slice(&entry.kind.to_le_bytes());
        page.extend_from_slice(&0u32.to_le_bytes());
    }
    Ok(page)
}

pub fn write(
    memory: &GuestMemoryMmap,
    cmdline_addr: u64,
    rsdp: u64,
    initrd: Option<(u64, u64)>,
    e820: &[E820Entry],
) -> Result<(), PvhError> {
    let page = build(cmdline_addr, rsdp, initrd, e820)?;
    memory
        .write_slice(&page, GuestAddress(START_INFO_ADDR))
        .map_err(PvhError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_loader::loader::elf::start_info::{
        hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
    };
    use std::mem::{offset_of, size_of};

    #[test]
    fn layout_matches_start_info_h() {
        assert_eq!(size_of::<hvm_start_info>() as u64, START_INFO_LEN);
        assert_eq!(size_of::<hvm_modlist_entry>() as u64, MODULE_LEN);
        assert_eq!(size_of::<hvm_memmap_table_entry>() as u64, MEMMAP_ENTRY_LEN);
        let e820 = crate::linux::e820::memory_map(5 << 30).unwrap();
        let page = build(0x20000, 0xe_0000, Some((0x400_0000, 0x1000)), &e820).unwrap();
        let u32_at = |o: usize| u32::from_le_bytes(page[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(page[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(offset_of!(hvm_start_info, magic)), START_INFO_MAGIC);
        assert_eq!(u32_at(offset_of!(hvm_start_info, version)), 1);
        assert_eq!(u32_at(offset_of!(hvm_start_info, nr_modules)), 1);
        assert_eq!(u64_at(offset_of!(hvm_start_info, cmdline_paddr)), 0x20000);
        assert_eq!(u64_at(offset_of!(hvm_start_info, rsdp_paddr)), 0xe_0000);
        let modlist =
            (u64_at(offset_of!(hvm_start_info, modlist_paddr)) - START_INFO_ADDR) as usize;
        assert_eq!(
            u64_at(modlist + offset_of!(hvm_modlist_entry, paddr)),
            0x400_0000
        );
        assert_eq!(
            u64_at(modlist + offset_of!(hvm_modlist_entry, size)),
            0x1000
        );
        let memmap = (u64_at(offset_of!(hvm_start_info, memmap_paddr)) - START_INFO_ADDR) as usize;
        assert_eq!(
            u32_at(offset_of!(hvm_start_info, memmap_entries)) as usize,
            e820.len()
        );
        for (i, entry) in e820.iter().enumerate() {
            let base = memmap + i * MEMMAP_ENTRY_LEN as usize;
            assert_eq!(
                u64_at(base + offset_of!(hvm_memmap_table_entry, addr)),
                entry.addr
            );
            assert_eq!(
                u64_at(base + offset_of!(hvm_memmap_table_entry, size)),
                entry.size
            );
            assert_eq!(
                u32_at(base + offset_of!(hvm_memmap_table_entry, type_)),
                entry.kind
            );
        }
        assert_eq!(
            page.len() as u64,
            MEMMAP_ADDR - START_INFO_ADDR + e820.len() as u64 * MEMMAP_ENTRY_LEN
        );
        assert!(build(0, 0, None, &vec![e820[0]; MAX_MEMMAP_ENTRIES + 1]).is_err());
    }
}
