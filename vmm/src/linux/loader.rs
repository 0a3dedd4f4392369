//! Loading a Linux kernel (a vmlinux ELF or a bzImage) and an initrd into
//! guest memory with linux-loader, after checking that they fit.

use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::boot_params::{HDRS_MAGIC, LOADED_HIGH, MIN_BZIMAGE_VERSION, XLF_KERNEL_64};
use super::e820::HIMEM_START;
use crate::guest_image::KernelImage;

/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
pub const BZIMAGE_ENTRY_64: u64 = 0x200;
/// Highest initrd address a kernel takes when it does not say (boot.rst).
pub const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open kernel {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a Linux kernel image: {why} (give a vmlinux ELF or a bzImage such as /boot/vmlinuz-*)")]
    NotAKernel { path: PathBuf, why: String },
    #[error(
        "{path} is a bzImage with boot protocol {version:#06x}; aivmm needs {min:#06x} or later with a 64-bit entry point (xloadflags bit 0)"
    )]
    Unsupported {
        path: PathBuf,
        version: u16,
        min: u16,
    },
    #[error(
        "kernel {path} needs guest memory up to {needed:#x} ({needed_mib} MiB) but RAM below 4 GiB ends at {ram_end:#x}: give the guest more --memory"
    )]
    TooLarge {
        path: PathBuf,
        needed: u64,
        needed_mib: u64,
        ram_end: u64,
    },
    #[error("cannot load kernel {path}: {reason}")]
    Load { path: PathBuf, reason: String },
    #[error("cannot open initrd {path}: {source}")]
    InitrdOpen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("initrd {path} is empty")]
    InitrdEmpty { path: PathBuf },
    #[error(
        "initrd {path} ({size} bytes) does not fit between the kernel (ending at {kernel_end:#x}) and {limit:#x}: give the guest more --memory"
    )]
    InitrdTooLarge {
        path: PathBuf,
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    #[error("cannot read initrd {path} into guest memory: {reason}")]
    InitrdLoad { path: PathBuf, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// A kernel in guest memory.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    /// The 64-bit boot protocol's entry point.
    pub entry_64: u64,
    /// The PVH entry point, when the ELF has the note.
    pub pvh_entry: Option<u64>,
    /// The bzImage's setup header (with code32_start set to where it loaded).
    pub setup_header: Option<setup_header>,
    pub load_start: u64,
    /// One past the last byte the kernel occupies, or will (a bzImage
    /// decompresses into init_size bytes at its preferred address).
    pub load_end: u64,
}

fn u16_at(bytes: &[u8], offset: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        bytes.get(offset..offset + 2)?.try_into().ok()?,
    ))
}
fn u32_at(bytes: &[u8], offset: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        bytes.get(offset..offset + 4)?.try_into().ok()?,
    ))
}

/// What kind of image `bytes` is, from its magic numbers.
pub fn detect(path: &Path, bytes: &[u8]) -> Result<KernelFormat, LoaderError> {
    if bytes.starts_with(b"\x7fELF") {
        return Ok(KernelFormat::Elf);
    }
    if u32_at(bytes, 0x202) == Some(HDRS_MAGIC) {
        return Ok(KernelFormat::BzImage);
    }
    Err(LoaderError::NotAKernel {
        path: path.into(),
        why: "neither an ELF file nor a bzImage (no \"HdrS\" at offset 0x202)".into(),
    })
}

/// Loads the kernel at `path` into `memory`, whose RAM below 4 GiB ends at
/// `ram_end`.
pub fn load_kernel(
    memory: &GuestMemoryMmap,
    path: &Path,
    ram_end: u64,
) -> Result<LoadedKernel, LoaderError> {
    let file = File::open(path).map_err(|source| LoaderError::Open {
        path: path.into(),
        source,
    })?;
    // SAFETY: a read-only private mapping of a file this process opened; the
    // kernel file is not expected to change while it is loaded (the same
    // contract as any mmap reader; a truncation would be a SIGBUS).
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| LoaderError::Open {
        path: path.into(),
        source,
    })?;
    let too_large = |needed: u64| LoaderError::TooLarge {
        path: path.into(),
        needed,
        needed_mib: needed.div_ceil(1 << 20),
        ram_end,
    };
    let load_error = |reason: String| LoaderError::Load {
        path: path.into(),
        reason,
    };
    match detect(path, &bytes)? {
        KernelFormat::Elf => {
            let image = KernelImage::parse(&bytes).map_err(|error| LoaderError::NotAKernel {
                path: path.into(),
                why: error.to_string(),
            })?;
            if image.load_start < HIMEM_START {
                return Err(LoaderError::NotAKernel {
                    path: path.into(),
                    why: format!(
                        "it loads at {:#x}, below 1 MiB where no kernel goes",
                        image.load_start
                    ),
                });
            }
            if image.load_end > ram_end {
                return Err(too_large(image.load_end));
            }
            let result = Elf::load(
                memory,
                None,
                &mut Cursor::new(&bytes[..]),
                Some(GuestAddress(HIMEM_START)),
            )
            .map_err(|error| load_error(error.to_string()))?;
            let pvh_entry = match result.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => Some(addr.0),
                _ => None,
            };
            Ok(LoadedKernel {
                format: KernelFormat::Elf,
                entry_64: image.entry,
                pvh_entry,
                setup_header: None,
                load_start: image.load_start,
                load_end: image.load_end,
            })
        }
        KernelFormat::BzImage => {
            let version = u16_at(&bytes, 0x206).unwrap_or(0);
            let xloadflags = u16_at(&bytes, 0x236).unwrap_or(0);
            let loadflags = bytes.get(0x211).copied().unwrap_or(0);
            if version < MIN_BZIMAGE_VERSION
                || xloadflags & XLF_KERNEL_64 == 0
                || loadflags & LOADED_HIGH == 0
            {
                return Err(LoaderError::Unsupported {
                    path: path.into(),
                    version,
                    min: MIN_BZIMAGE_VERSION,
                });
            }
            let setup_sects = match bytes.get(0x1f1).copied().unwrap_or(0) {
                0 => 4,
                n => n as u64,
            };
            let payload = (bytes.len() as u64).saturating_sub((setup_sects + 1) * 512);
            // The decompressor runs where it is loaded and unpacks the kernel
            // into init_size bytes at pref_address (2.10+).
            let pref_address = bytes
                .get(0x258..0x260)
                .map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
            let init_size = u32_at(&bytes, 0x260).unwrap_or(0) as u64;
            let load_end = (HIMEM_START + payload).max(pref_address + init_size);
            if load_end > ram_end {
                return Err(too_large(load_end));
            }
            let result = BzImage::load(
                memory,
                Some(GuestAddress(HIMEM_START)),
                &mut Cursor::new(&bytes[..]),
                None,
            )
            .map_err(|error| load_error(error.to_string()))?;
            Ok(LoadedKernel {
                format: KernelFormat::BzImage,
                entry_64: result.kernel_load.0 + BZIMAGE_ENTRY_64,
                pvh_entry: None,
                setup_header: result.setup_header,
                load_start: result.kernel_load.0,
                load_end,
            })
        }
    }
}

/// Loads the initrd as high as the kernel allows, page aligned; returns its
/// guest address and size.
pub fn load_initrd(
    memory: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    ram_end: u64,
) -> Result<(u64, u64), LoaderError> {
    let mut file = File::open(path).map_err(|source| LoaderError::InitrdOpen {
        path: path.into(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| LoaderError::InitrdOpen {
            path: path.into(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(LoaderError::InitrdEmpty { path: path.into() });
    }
    let addr_max = kernel
        .setup_header
        .map_or(DEFAULT_INITRD_ADDR_MAX, |h| h.initrd_addr_max as u64);
    let limit = ram_end.min(addr_max + 1);
    let kernel_end = kernel.load_end.next_multiple_of(0x1000);
    let addr = limit
        .checked_sub(size)
        .map(|top| top & !0xfff)
        .filter(|&addr| addr >= kernel_end)
        .ok_or_else(|| LoaderError::InitrdTooLarge {
            path: path.into(),
            size,
            kernel_end,
            limit,
        })?;
    memory
        .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|error| LoaderError::InitrdLoad {
            path: path.into(),
            reason: error.to_string(),
        })?;
    Ok((addr, size))
}
