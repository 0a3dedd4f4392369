//! The inference kernel ELF, built by build.rs and embedded in this binary,
//! and what the VMM needs to know about an ELF image: where it loads, where it
//! starts, and which function an address is in (for fault reports).

use std::io::Cursor;
use std::sync::OnceLock;

use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// The inference kernel built from guest/kernel.
pub static INFERENCE_KERNEL: &[u8] = include_bytes!(env!("AIVMM_KERNEL_ELF"));

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the kernel image is not a 64-bit little-endian x86-64 ELF executable")]
    NotElf,
    #[error("the kernel image is truncated or its {0} table points outside the file")]
    Truncated(&'static str),
    #[error("the kernel image has no loadable segment")]
    NoSegments,
    #[error("kernel segment at {addr:#x}+{size:#x} is outside [{min:#x}, {max:#x})")]
    SegmentOutOfRange {
        addr: u64,
        size: u64,
        min: u64,
        max: u64,
    },
    #[error("cannot load the kernel image into guest memory: {0}")]
    Load(String),
}

const PT_LOAD: u32 = 1;
const SHT_SYMTAB: u32 = 2;
const STT_FUNC: u8 = 2;

/// A function symbol of the image.
#[derive(Debug, Clone)]
struct Symbol {
    start: u64,
    size: u64,
    name: String,
}

/// A parsed kernel image.
pub struct KernelImage<'a> {
    bytes: &'a [u8],
    /// The entry point (guest-virtual == guest-physical).
    pub entry: u64,
    /// Lowest address any segment occupies.
    pub load_start: u64,
    /// One past the highest address any segment occupies (bss included).
    pub load_end: u64,
    /// Offset and number of the section headers.
    section_headers: (usize, usize),
    /// Read on first use: only fault reports need them.
    symbols: OnceLock<Vec<Symbol>>,
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(offset..offset.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(bytes: &[u8], offset: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        bytes.get(offset..offset.checked_add(8)?)?.try_into().ok()?,
    ))
}

impl<'a> KernelImage<'a> {
    pub fn parse(bytes: &'a [u8]) -> Result<Self, ImageError> {
        let is_elf64_x86 =
            bytes.get(..6) == Some(b"\x7fELF\x02\x01") && u16_at(bytes, 18) == Some(62);
        if !is_elf64_x86 {
            return Err(ImageError::NotElf);
        }
        let header = |offset| u64_at(bytes, offset).ok_or(ImageError::Truncated("ELF header"));
        let entry = header(24)?;
        let phoff = header(32)? as usize;
        let shoff = header(40)? as usize;
        let phnum = u16_at(bytes, 56).ok_or(ImageError::Truncated("ELF header"))? as usize;
        let shnum = u16_at(bytes, 60).ok_or(ImageError::Truncated("ELF header"))? as usize;

        let (mut load_start, mut load_end) = (u64::MAX, 0u64);
        for i in 0..phnum {
            let ph = phoff
                .checked_add(i * 56)
                .ok_or(ImageError::Truncated("program header"))?;
            let field =
                |offset| u64_at(bytes, ph + offset).ok_or(ImageError::Truncated("program header"));
            if u32_at(bytes, ph).ok_or(ImageError::Truncated("program header"))? != PT_LOAD {
                continue;
            }
            let (paddr, memsz) = (field(24)?, field(40)?);
            load_start = load_start.min(paddr);
            load_end = load_end.max(
                paddr
                    .checked_add(memsz)
                    .ok_or(ImageError::Truncated("program header"))?,
            );
        }
        if load_end == 0 {
            return Err(ImageError::NoSegments);
        }
        Ok(KernelImage {
            bytes,
            entry,
            load_start,
            load_end,
            section_headers: (shoff, shnum),
            symbols: OnceLock::new(),
        })
    }

    /// The function symbols, sorted by address; None if the image has no
    /// (readable) symbol table, which only costs the names in fault reports.
    fn function_symbols(bytes: &[u8], shoff: usize, shnum: usize) -> Option<Vec<Symbol>> {
        let section = |i: usize| shoff.checked_add(i.checked_mul(64)?);
        let symtab = (0..shnum)
            .filter_map(section)
            .find(|&sh| u32_at(bytes, sh + 4) == Some(SHT_SYMTAB))?;
        let (sym_offset, sym_size) = (
            u64_at(bytes, symtab + 24)? as usize,
            u64_at(bytes, symtab + 32)? as usize,
        );
        let strtab = section(u32_at(bytes, symtab + 40)? as usize)?;
        let (str_offset, str_size) = (
            u64_at(bytes, strtab + 24)? as usize,
            u64_at(bytes, strtab + 32)? as usize,
        );
        let strings = bytes.get(str_offset..str_offset.checked_add(str_size)?)?;
        let mut symbols = Vec::new();
        for entry in bytes
            .get(sym_offset..sym_offset.checked_add(sym_size)?)?
            .chunks_exact(24)
        {
            if entry[4] & 0xf != STT_FUNC {
                continue;
            }
            let name_offset = u32_at(entry, 0)? as usize;
            let name_bytes = strings.get(name_offset..)?;
            let name_len = name_bytes.iter().position(|&b| b == 0)?;
            let name = String::from_utf8_lossy(&name_bytes[..name_len]);
            symbols.push(Symbol {
                start: u64_at(entry, 8)?,
                size: u64_at(entry, 16)?,
                name: format!("{:#}", rustc_demangle::demangle(&name)),
            });
        }
        symbols.sort_by_key(|s| s.start);
        Some(symbols)
    }

    /// "function+0xoffset" for an address inside a known function.
    pub fn symbolize(&self, addr: u64) -> Option<String> {
        let symbols = self.symbols.get_or_init(|| {
            let (shoff, shnum) = self.section_headers;
            Self::function_symbols(self.bytes, shoff, shnum).unwrap_or_default()
        });
        let index = symbols
            .partition_point(|s| s.start <= addr)
            .checked_sub(1)?;
        let symbol = &symbols[index];
        (addr < symbol.start + symbol.size.max(1))
            .then(|| format!("{}+{:#x}", symbol.name, addr - symbol.start))
    }

    /// Copies the loadable segments into guest memory, after checking that
    /// they lie within `[min, max)`.
    pub fn load(&self, memory: &GuestMemoryMmap, min: u64, max: u64) -> Result<(), ImageError> {
        if self.load_start < min || self.load_end > max {
            return Err(ImageError::SegmentOutOfRange {
                addr: self.load_start,
                size: self.load_end - self.load_start,
                min,
                max,
            });
        }
        Elf::load(
            memory,
            None,
            &mut Cursor::new(self.bytes),
            Some(GuestAddress(min)),
        )
        .map_err(|error| ImageError::Load(error.to_string()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aivmm_guest_abi::layout::KERNEL_LOAD_ADDR;

    #[test]
    fn the_embedded_kernel_loads_at_1_mib_and_has_symbols() {
        let image = KernelImage::parse(INFERENCE_KERNEL).unwrap();
        assert_eq!(image.load_start, KERNEL_LOAD_ADDR);
        assert!(image.load_end > image.load_start);
        assert_eq!(
            image.entry, KERNEL_LOAD_ADDR,
            "the linker script puts _start first"
        );
        let name = image.symbolize(image.entry).unwrap();
        assert!(name.starts_with("_start+"), "{name}");
    }

    #[test]
    fn garbage_is_not_an_elf() {
        assert!(matches!(
            KernelImage::parse(b"not an elf at all"),
            Err(ImageError::NotElf)
        ));
        let mut header = INFERENCE_KERNEL[..64].to_vec();
        header[32..40].copy_from_slice(&u64::MAX.to_le_bytes()); // program headers nowhere
        assert!(KernelImage::parse(&header).is_err());
    }
}
