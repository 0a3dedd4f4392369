//! The zero page of the x86 Linux boot protocol (Documentation/arch/x86/
//! boot.rst and zero-page.rst): `struct boot_params` with the setup header,
//! the e820 map, the command line pointer and the initrd.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use super::e820::E820Entry;

/// Where the zero page goes (below the page tables, above the GDT).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// The longest command line (with its NUL) when the image does not say:
/// x86's COMMAND_LINE_SIZE.
pub const CMDLINE_MAX_DEFAULT: u32 = 2048;

/// setup_header.boot_flag: the boot-sector signature.
pub const BOOT_FLAG: u16 = 0xaa55;
/// setup_header.header: "HdrS".
pub const HDRS_MAGIC: u32 = 0x5372_6448;
/// setup_header.type_of_loader: "undefined" (no assigned loader ID).
pub const LOADER_UNDEFINED: u8 = 0xff;
/// loadflags bit 0: the protected-mode kernel is loaded at 0x100000.
pub const LOADED_HIGH: u8 = 1 << 0;
/// xloadflags bit 0: the kernel has the 64-bit entry point at +0x200.
pub const XLF_KERNEL_64: u16 = 1 << 0;
/// The boot protocol version that has xloadflags (and so the 64-bit entry).
pub const MIN_BZIMAGE_VERSION: u16 = 0x020c;

#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    #[error("the e820 map has {entries} entries; the zero page holds {max}")]
    TooManyE820 { entries: usize, max: usize },
    #[error("the command line is {len} bytes with its NUL; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: u32 },
    #[error("the initrd ({size} bytes at {addr:#x}) must lie below 4 GiB for the zero page's 32-bit fields")]
    InitrdAboveFourGib { addr: u64, size: u64 },
    #[error("cannot write the {what} into guest memory: {source}")]
    GuestMemory {
        what: &'static str,
        source: GuestMemoryError,
    },
}

/// `boot_params` as guest memory bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
pub struct ZeroPage(pub boot_params);

// SAFETY: boot_params is a bindgen-generated repr(C, packed) struct of
// integers and arrays of integers: every bit pattern is valid and it has no
// padding or pointers.
unsafe impl ByteValued for ZeroPage {}

/// What the zero page says.
pub struct BootParamsInput<'a> {
    /// The setup header read from a bzImage; None for a vmlinux ELF.
    pub header: Option<setup_header>,
    /// Length of the command line without its NUL.
    pub cmdline_len: usize,
    /// Guest address and size of the initrd.
    pub initrd: Option<(u64, u64)>,
    pub e820: &'a [E820Entry],
    /// Guest address of the ACPI RSDP (0: none; the kernel then scans the BIOS area).
    pub acpi_rsdp: u64,
}

/// The longest command line (with its NUL) `header` accepts.
pub fn cmdline_max(header: Option<&setup_header>) -> u32 {
    match header {
        Some(header) if header.version >= 0x0206 && header.cmdline_size > 0 => {
            header.cmdline_size.saturating_add(1)
        }
        _ => CMDLINE_MAX_DEFAULT,
    }
}

/// Builds the zero page. A bzImage's own setup header is kept (as boot.rst
/// asks: the loader copies it and fills in its fields); a vmlinux gets the
/// header magic a loader would have seen.
pub fn build(input: &BootParamsInput<'_>) -> Result<ZeroPage, BootParamsError> {
    let mut params = boot_params::default();
    match input.header {
        Some(header) => params.hdr = header,
        None => {
            params.hdr.boot_flag = BOOT_FLAG;
            params.hdr.header = HDRS_MAGIC;
        }
    }
    params.hdr.type_of_loader = LOADER_UNDEFINED;

    let max = cmdline_max(input.header.as_ref());
    let with_nul = input.cmdline_len + 1;
    if with_nul > max as usize {
        return Err(BootParamsError::CmdlineTooLong { len: with_nul, max });
    }
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.ext_cmd_line_ptr = (CMDLINE_ADDR >> 32) as u32;
    params.hdr.cmdline_size = input.cmdline_len as u32;

    if let Some((addr, size)) = input.initrd {
        if addr.checked_add(size).is_none_or(|end| end > 1 << 32) {
            return Err(BootParamsError::InitrdAboveFourGib { addr, size });
        }
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let max_entries = params.e820_table.len();
    if input.e820.len() > max_entries {
        return Err(BootParamsError::TooManyE820 {
            entries: input.e820.len(),
            max: max_entries,
        });
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(input.e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = input.e820.len() as u8;
    params.acpi_rsdp_addr = input.acpi_rsdp;
    Ok(ZeroPage(params))
}

/// Writes the zero page and the NUL-terminated command line.
pub fn write(
    memory: &GuestMemoryMmap,
    zero_page: &ZeroPage,
    cmdline: &str,
) -> Result<(), BootParamsError> {
    memory
        .write_obj(*zero_page, GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|source| BootParamsError::GuestMemory {
            what: "zero page",
            source,
        })?;
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    memory
        .write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|source| BootParamsError::GuestMemory {
            what: "command line",
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::e820;
    use crate::vstate::memory::RamBacking;
    use std::mem::{offset_of, size_of};

    /// Offsets from Documentation/arch/x86/zero-page.rst and boot.rst.
    #[test]
    fn layout_matches_the_boot_protocol() {
        assert_eq!(size_of::<boot_params>(), 4096);
        assert_eq!(offset_of!(boot_params, ext_ramdisk_image), 0x0c0);
        assert_eq!(offset_of!(boot_params, ext_ramdisk_size), 0x0c4);
        assert_eq!(offset_of!(boot_params, ext_cmd_line_ptr), 0x0c8);
        assert_eq!(offset_of!(boot_params, e820_entries), 0x1e8);
        assert_eq!(offset_of!(boot_params, hdr), 0x1f1);
        assert_eq!(offset_of!(boot_params, e820_table), 0x2d0);
        assert_eq!(size_of::<boot_e820_entry>(), 20);
        assert_eq!(offset_of!(boot_params, eddbuf), 0xd00);
        let hdr = |field: usize| 0x1f1 + field;
        assert_eq!(hdr(offset_of!(setup_header, setup_sects)), 0x1f1);
        assert_eq!(hdr(offset_of!(setup_header, boot_flag)), 0x1fe);
        assert_eq!(hdr(offset_of!(setup_header, header)), 0x202);
        assert_eq!(hdr(offset_of!(setup_header, version)), 0x206);
        assert_eq!(hdr(offset_of!(setup_header, type_of_loader)), 0x210);
        assert_eq!(hdr(offset_of!(setup_header, loadflags)), 0x211);
        assert_eq!(hdr(offset_of!(setup_header, code32_start)), 0x214);
        assert_eq!(hdr(offset_of!(setup_header, ramdisk_image)), 0x218);
        assert_eq!(hdr(offset_of!(setup_header, ramdisk_size)), 0x21c);
        assert_eq!(hdr(offset_of!(setup_header, cmd_line_ptr)), 0x228);
        assert_eq!(hdr(offset_of!(setup_header, initrd_addr_max)), 0x22c);
        assert_eq!(hdr(offset_of!(setup_header, kernel_alignment)), 0x230);
        assert_eq!(hdr(offset_of!(setup_header, relocatable_kernel)), 0x234);
        assert_eq!(hdr(offset_of!(setup_header, xloadflags)), 0x236);
        assert_eq!(hdr(offset_of!(setup_header, cmdline_size)), 0x238);
        assert_eq!(hdr(offset_of!(setup_header, payload_offset)), 0x248);
        assert_eq!(hdr(offset_of!(setup_header, pref_address)), 0x258);
        assert_eq!(hdr(offset_of!(setup_header, init_size)), 0x260);
    }

    fn read<T: ByteValued>(memory: &GuestMemoryMmap, offset: u64) -> T {
        memory
            .read_obj(GuestAddress(ZERO_PAGE_ADDR + offset))
            .unwrap()
    }

    /// The bytes in guest memory, read at the documented offsets.
    #[test]
    fn written_zero_page_has_the_fields_at_their_offsets() {
        let size = 128 << 20;
        let memory = e820::create_guest_ram(size, RamBacking::Anonymous, None).unwrap();
        let map = e820::memory_map(size).unwrap();
        let cmdline = "console=ttyS0 panic=1";
        let initrd = (0x600_0000, 0x12345);
        let page = build(&BootParamsInput {
            header: None,
            cmdline_len: cmdline.len(),
            initrd: Some(initrd),
            e820: &map,
            acpi_rsdp: 0xe_0000,
        })
        .unwrap();
        write(&memory, &page, cmdline).unwrap();
        assert_eq!(read::<u64>(&memory, 0x070), 0xe_0000, "acpi_rsdp_addr");

        assert_eq!(read::<u16>(&memory, 0x1fe), BOOT_FLAG);
        assert_eq!(read::<u32>(&memory, 0x202), HDRS_MAGIC);
        assert_eq!(read::<u8>(&memory, 0x210), LOADER_UNDEFINED);
        assert_eq!(read::<u32>(&memory, 0x228), CMDLINE_ADDR as u32);
        assert_eq!(read::<u32>(&memory, 0x0c8), 0, "ext_cmd_line_ptr");
        assert_eq!(read::<u32>(&memory, 0x218), initrd.0 as u32);
        assert_eq!(read::<u32>(&memory, 0x21c), initrd.1 as u32);
        assert_eq!(read::<u8>(&memory, 0x1e8) as usize, map.len());
        for (i, entry) in map.iter().enumerate() {
            let base = 0x2d0 + 20 * i as u64;
            assert_eq!(read::<u64>(&memory, base), entry.addr);
            assert_eq!(read::<u64>(&memory, base + 8), entry.size);
            assert_eq!(read::<u32>(&memory, base + 16), entry.kind);
        }
        let mut line = vec![0u8; cmdline.len() + 1];
        memory
            .read_slice(&mut line, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line[..cmdline.len()], cmdline.as_bytes());
        assert_eq!(line[cmdline.len()], 0);
    }

    #[test]
    fn a_bzimage_header_is_kept_and_limits_apply() {
        let header = setup_header {
            setup_sects: 27,
            boot_flag: BOOT_FLAG,
            header: HDRS_MAGIC,
            version: 0x020f,
            loadflags: LOADED_HIGH,
            cmdline_size: 15,
            xloadflags: XLF_KERNEL_64,
            ..Default::default()
        };
        let input = |cmdline_len, initrd| BootParamsInput {
            header: Some(header),
            cmdline_len,
            initrd,
            e820: &[],
            acpi_rsdp: 0,
        };
        let page = build(&input(15, None)).unwrap();
        let hdr = page.0.hdr;
        assert_eq!(
            ({ hdr.setup_sects }, { hdr.version }, { hdr.xloadflags }),
            (27, 0x020f, 1)
        );
        assert_eq!(hdr.type_of_loader, LOADER_UNDEFINED);
        assert!(matches!(
            build(&input(16, None)),
            Err(BootParamsError::CmdlineTooLong { len: 17, max: 16 })
        ));
        assert!(matches!(
            build(&input(1, Some((0xffff_f000, 0x2000)))),
            Err(BootParamsError::InitrdAboveFourGib { .. })
        ));
        let too_many = vec![
            E820Entry {
                addr: 0,
                size: 4096,
                kind: e820::E820_RAM
            };
            129
        ];
        assert!(matches!(
            build(&BootParamsInput {
                header: None,
                cmdline_len: 0,
                initrd: None,
                e820: &too_many,
                acpi_rsdp: 0,
            }),
            Err(BootParamsError::TooManyE820 {
                entries: 129,
                max: 128
            })
        ));
    }
}
