//! The guest's view of a passed-through device's PCI config space.
//!
//! The VMM owns the BARs (the guest sizes and places them at guest
//! addresses), the option ROM (hidden), the interrupt line and pin (INTx is
//! not offered: MSI or MSI-X only), every capability pointer, the MSI
//! capability and the MSI-X capability's control word; SR-IOV and Resizable
//! BAR are read-only. The rest is read
//! from the device, and guest writes to it are passed through, except in the
//! header where only the command bits listed in [`COMMAND_PASSTHROUGH`], the
//! status register's write-1-to-clear bits, the cache line size and the
//! latency timer reach the device.
//!
//! Each dword of config space carries three bit masks: `emulated` (read from
//! the VMM's shadow copy), `writable` (guest writes change the shadow) and
//! `forwarded` (guest writes go to the device).

use crate::bar::{self, Bar, BarError, BarKind, GuestBar, BAR0, BAR_COUNT};
use crate::capability::{self, Capability, CapabilityError, CAP_ID_MSI, CAP_ID_MSIX};
use crate::msi::{MsiLayout, MsiState};
use crate::msix::{MsixError, MsixLayout};

const COMMAND: u16 = 0x04;
const HEADER_TYPE: u16 = 0x0e;
const ROM_BAR: u16 = 0x30;
const CAP_POINTER: u16 = 0x34;
const INTERRUPT_LINE: u16 = 0x3c;
const COMMAND_IO: u32 = 1 << 0;
const COMMAND_MEMORY: u32 = 1 << 1;
const COMMAND_BUS_MASTER: u32 = 1 << 2;
/// I/O and memory decode, bus master, parity and SERR# response, INTx
/// disable. Special cycles, memory-write-invalidate, VGA snoop and fast
/// back-to-back stay as the host set them.
pub const COMMAND_PASSTHROUGH: u32 = 0x0547;
/// Extended capabilities the guest may read but not change: SR-IOV (it
/// would create functions the VMM does not own) and Resizable BAR (it would
/// change a BAR's size behind the VMM's back).
const EXTENDED_READ_ONLY: [u16; 2] = [0x0010, 0x0015];
/// Status bits that clear when written with 1 (upper half of dword 0x04).
const STATUS_RW1C: u32 = 0xf900 << 16;

/// Access to the device's real config space (VFIO's config region on a real
/// host; a dump in tests).
pub trait DeviceConfig: Send {
    fn read(&self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}

/// A config-space dump standing in for a device: reads return its bytes,
/// writes change them and are recorded.
#[derive(Debug, Clone)]
pub struct ConfigDump {
    pub bytes: Vec<u8>,
    pub writes: Vec<(u16, Vec<u8>)>,
}

impl ConfigDump {
    pub fn new(bytes: Vec<u8>) -> ConfigDump {
        ConfigDump {
            bytes,
            writes: Vec::new(),
        }
    }
}

impl DeviceConfig for ConfigDump {
    fn read(&self, offset: u16, data: &mut [u8]) {
        let at = usize::from(offset);
        data.copy_from_slice(&self.bytes[at..at + data.len()]);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let at = usize::from(offset);
        self.bytes[at..at + data.len()].copy_from_slice(data);
        self.writes.push((offset, data.to_vec()));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("a config space is 256 bytes (PCI) or 4096 bytes (PCI Express), not {len}; a dump of 64 bytes was read without root (sysfs hides the rest)")]
    BadLength { len: usize },
    #[error("header type {header_type:#x} is not a type-0 (endpoint) header: bridges cannot be passed through")]
    NotAnEndpoint { header_type: u8 },
    #[error("BAR: {0}")]
    Bar(#[from] BarError),
    #[error("capability list: {0}")]
    Capability(#[from] CapabilityError),
    #[error("MSI-X capability: {0}")]
    Msix(#[from] MsixError),
    #[error("the MSI-X {what} ({len} bytes at {offset:#x}) lies outside BAR{bar} or names a BAR the device does not implement")]
    MsixOutsideBar {
        what: &'static str,
        bar: u8,
        offset: u32,
        len: u64,
    },
    #[error("unsupported {len}-byte config access at offset {offset:#x}: accesses are 1, 2 or 4 bytes, naturally aligned")]
    BadAccess { offset: u16, len: usize },
}

/// Where the VMM places BARs in the guest's physical address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BarWindows {
    /// [start, end) below 4 GiB for 32-bit and non-prefetchable BARs.
    pub mmio32: (u64, u64),
    /// [start, end) above 4 GiB for 64-bit prefetchable BARs.
    pub mmio64: (u64, u64),
    /// [start, end) of I/O ports.
    pub io: (u64, u64),
}

/// What a guest config write changed that the VMM must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigChange {
    /// A BAR started, stopped or moved decoding at a guest address (None:
    /// not decoded, because decode is off in the command register or the
    /// guest is sizing the BAR). Map or unmap its memslots / traps.
    BarMoved {
        index: u8,
        kind: BarKind,
        size: u64,
        from: Option<u64>,
        to: Option<u64>,
    },
    /// The guest wrote the MSI capability: recompute its vectors' routes.
    Msi(MsiState),
    /// The guest changed MSI-X enable or function mask.
    MsixControl { enabled: bool, function_mask: bool },
}

pub struct VirtualConfigSpace<D: DeviceConfig> {
    device: D,
    len: usize,
    shadow: Vec<u8>,
    emulated: Vec<u32>,
    writable: Vec<u32>,
    forwarded: Vec<u32>,
    bars: Vec<GuestBar>,
    capabilities: Vec<Capability>,
    msi: Option<MsiLayout>,
    msix: Option<MsixLayout>,
}

fn dword(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

impl<D: DeviceConfig> VirtualConfigSpace<D> {
    /// Reads the device's `len`-byte config space, decodes its BARs with the
    /// host-reported `bar_sizes`, and places them in `windows`.
    pub fn new(
        device: D,
        len: usize,
        bar_sizes: &[u64; BAR_COUNT],
        windows: &BarWindows,
    ) -> Result<Self, ConfigError> {
        if len != 256 && len != 4096 {
            return Err(ConfigError::BadLength { len });
        }
        let mut raw = vec![0u8; len];
        for at in (0..len).step_by(4) {
            device.read(at as u16, &mut raw[at..at + 4]);
        }
        let header_type = raw[usize::from(HEADER_TYPE)] & 0x7f;
        if header_type != 0 {
            return Err(ConfigError::NotAnEndpoint { header_type });
        }
        let host_bars = bar::decode_bars(&raw, bar_sizes)?;
        let bars =
            bar::assign_guest_addresses(&host_bars, windows.mmio32, windows.mmio64, windows.io)?;
        let capabilities = capability::walk(&raw)?;
        let msi =
            capability::find(&capabilities, CAP_ID_MSI).map(|c| MsiLayout::parse(&raw, c.offset));
        let msix = capability::find(&capabilities, CAP_ID_MSIX)
            .map(|c| MsixLayout::parse(&raw, c.offset))
            .transpose()?;
        if let Some(layout) = &msix {
            check_msix_in_bar(
                &host_bars,
                "table",
                layout.table_bar,
                layout.table_offset,
                layout.table_len(),
            )?;
            check_msix_in_bar(
                &host_bars,
                "PBA",
                layout.pba_bar,
                layout.pba_offset,
                layout.pba_len(),
            )?;
        }

        let dwords = len / 4;
        let mut space = VirtualConfigSpace {
            device,
            len,
            shadow: raw,
            emulated: vec![0; dwords],
            writable: vec![0; dwords],
            forwarded: vec![0; dwords],
            bars,
            capabilities,
            msi,
            msix,
        };
        space.build_masks();
        Ok(space)
    }

    fn build_masks(&mut self) {
        let d = |offset: u16| usize::from(offset) / 4;
        // Header: command and status.
        self.emulated[d(COMMAND)] = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        self.writable[d(COMMAND)] = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER;
        self.forwarded[d(COMMAND)] = COMMAND_PASSTHROUGH | STATUS_RW1C;
        // The guest starts with decode and bus mastering off.
        let command = dword(&self.shadow, usize::from(COMMAND))
            & !(COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER);
        self.set_shadow(COMMAND, command);
        // Cache line size and latency timer.
        self.forwarded[d(0x0c)] = 0x0000_ffff;
        // BARs and ROM are answered by code; capability pointer read-only.
        for i in d(BAR0)..=d(ROM_BAR) {
            self.emulated[i] = u32::MAX;
        }
        self.set_shadow(ROM_BAR, 0);
        self.emulated[d(CAP_POINTER)] = 0xff;
        // Interrupt line is scratch for the guest; pin reads 0 (no INTx).
        self.emulated[d(INTERRUPT_LINE)] = 0xffff;
        self.writable[d(INTERRUPT_LINE)] = 0xff;
        let line = dword(&self.shadow, usize::from(INTERRUPT_LINE)) & !0xffff;
        self.set_shadow(INTERRUPT_LINE, line);
        // Past the header everything passes through unless emulated below.
        for i in d(0x40)..self.len / 4 {
            self.forwarded[i] = u32::MAX;
        }
        let capabilities = self.capabilities.clone();
        for cap in &capabilities {
            let header = if cap.extended { u32::MAX } else { 0xffff };
            self.emulate(cap.offset, 4, header, 0);
            if cap.extended && EXTENDED_READ_ONLY.contains(&cap.id) {
                // Its length is not in its header: up to the next capability.
                let end = capabilities
                    .iter()
                    .filter(|c| c.extended && c.offset > cap.offset)
                    .map(|c| c.offset)
                    .min()
                    .unwrap_or(self.len as u16);
                for at in (cap.offset..end).step_by(4) {
                    self.forwarded[usize::from(at) / 4] = 0;
                }
            }
        }
        if let Some(msi) = self.msi {
            let control = dword(&self.shadow, usize::from(msi.offset)) & !(0x71 << 16);
            self.set_shadow(msi.offset, control);
            self.emulate(msi.offset, msi.span(), u32::MAX, 0);
            for (offset, mask) in msi.writable() {
                self.writable[d(offset)] = mask;
            }
        }
        if let Some(msix) = self.msix {
            let control = dword(&self.shadow, usize::from(msix.offset)) & !(0xc000 << 16);
            self.set_shadow(msix.offset, control);
            self.emulate(msix.offset, 12, u32::MAX, 0);
            for (offset, mask) in msix.writable() {
                self.writable[d(offset)] = mask;
            }
        }
    }

    /// Marks `mask` of each dword in [offset, offset+len) emulated (read from
    /// the shadow, not forwarded) with `writable` guest-writable bits.
    fn emulate(&mut self, offset: u16, len: u16, mask: u32, writable: u32) {
        for at in (offset..offset + len).step_by(4) {
            let i = usize::from(at) / 4;
            self.emulated[i] |= mask;
            self.forwarded[i] &= !mask;
            self.writable[i] = (self.writable[i] & !mask) | (writable & mask);
        }
    }

    fn set_shadow(&mut self, offset: u16, value: u32) {
        let at = usize::from(offset);
        self.shadow[at..at + 4].copy_from_slice(&value.to_le_bytes());
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn device(&self) -> &D {
        &self.device
    }

    /// The BARs with the guest addresses they are programmed with.
    pub fn bars(&self) -> &[GuestBar] {
        &self.bars
    }

    pub fn capabilities(&self) -> &[Capability] {
        &self.capabilities
    }

    pub fn msi(&self) -> Option<MsiLayout> {
        self.msi
    }

    pub fn msix(&self) -> Option<MsixLayout> {
        self.msix
    }

    /// The guest's command register (decode and bus-master bits as the
    /// guest set them).
    pub fn command(&self) -> u16 {
        self.read_dword(usize::from(COMMAND) / 4) as u16
    }

    fn bar_for_register(&self, register: u8) -> Option<usize> {
        self.bars.iter().position(|g| {
            g.bar.index == register
                || (g.bar.kind == BarKind::Memory64 && g.bar.index + 1 == register)
        })
    }

    fn read_dword(&self, i: usize) -> u32 {
        let offset = (i * 4) as u16;
        if (BAR0..BAR0 + 4 * BAR_COUNT as u16).contains(&offset) {
            let register = ((offset - BAR0) / 4) as u8;
            return self
                .bar_for_register(register)
                .map_or(0, |b| self.bars[b].read_register(register));
        }
        let emulated = self.emulated[i];
        let device = if emulated == u32::MAX {
            0
        } else {
            let mut bytes = [0u8; 4];
            self.device.read(offset, &mut bytes);
            u32::from_le_bytes(bytes)
        };
        (device & !emulated) | (dword(&self.shadow, i * 4) & emulated)
    }

    fn check_access(offset: u16, len: usize) -> Result<(), ConfigError> {
        if matches!(len, 1 | 2 | 4) && usize::from(offset) % len == 0 {
            Ok(())
        } else {
            Err(ConfigError::BadAccess { offset, len })
        }
    }

    /// A guest config read. Past the end of a 256-byte space reads 0 (a
    /// conventional PCI device behind ECAM).
    pub fn read(&self, offset: u16, data: &mut [u8]) -> Result<(), ConfigError> {
        Self::check_access(offset, data.len())?;
        if usize::from(offset) >= self.len {
            data.fill(0);
            return Ok(());
        }
        let value = self.read_dword(usize::from(offset) / 4) >> ((offset % 4) * 8);
        data.copy_from_slice(&value.to_le_bytes()[..data.len()]);
        Ok(())
    }

    /// Where each BAR decodes now, if it does.
    fn decoding(&self) -> Vec<Option<u64>> {
        let command = self.command() as u32;
        self.bars
            .iter()
            .map(|g| {
                let enabled = match g.bar.kind {
                    BarKind::Io => command & COMMAND_IO != 0,
                    _ => command & COMMAND_MEMORY != 0,
                };
                (enabled && !g.is_sizing()).then_some(g.address)
            })
            .collect()
    }

    /// A guest config write; returns what the VMM must act on.
    pub fn write(&mut self, offset: u16, data: &[u8]) -> Result<Vec<ConfigChange>, ConfigError> {
        Self::check_access(offset, data.len())?;
        if usize::from(offset) >= self.len {
            return Ok(Vec::new());
        }
        let i = usize::from(offset) / 4;
        let shift = u32::from(offset % 4) * 8;
        let mut bytes = [0u8; 4];
        bytes[..data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(bytes) << shift;
        let byte_mask = (u32::MAX >> (32 - 8 * data.len() as u32)) << shift;
        let decoding_before = self.decoding();
        let msi_before = self.msi.map(|m| m.state(&self.shadow));
        let msix_before = self.msix.map(|m| m.control(&self.shadow));

        let dword_offset = (i * 4) as u16;
        if (BAR0..BAR0 + 4 * BAR_COUNT as u16).contains(&dword_offset) {
            let register = ((dword_offset - BAR0) / 4) as u8;
            if let Some(b) = self.bar_for_register(register) {
                let current = self.bars[b].read_register(register);
                self.bars[b].write_register(register, (current & !byte_mask) | (value & byte_mask));
            }
        } else if dword_offset != ROM_BAR {
            let writable = self.writable[i] & byte_mask;
            let current = dword(&self.shadow, i * 4);
            self.set_shadow(dword_offset, (current & !writable) | (value & writable));
            let forwarded = self.forwarded[i] & byte_mask;
            if forwarded != 0 {
                let mut device_bytes = [0u8; 4];
                self.device.read(dword_offset, &mut device_bytes);
                let device = u32::from_le_bytes(device_bytes);
                // Bits the guest may not change keep the device's value;
                // write-1-to-clear bits the guest did not set are written 0.
                let keep = device & !self.forwarded[i] & !rw1c_bits(i);
                let merged = ((value & forwarded) | keep) >> shift;
                self.device
                    .write(offset, &merged.to_le_bytes()[..data.len()]);
            }
        }

        let mut changes = Vec::new();
        for (b, (before, after)) in decoding_before.iter().zip(self.decoding()).enumerate() {
            if *before != after {
                let bar: Bar = self.bars[b].bar;
                changes.push(ConfigChange::BarMoved {
                    index: bar.index,
                    kind: bar.kind,
                    size: bar.size,
                    from: *before,
                    to: after,
                });
            }
        }
        if let Some(layout) = self.msi {
            let after = layout.state(&self.shadow);
            if msi_before != Some(after) {
                changes.push(ConfigChange::Msi(after));
            }
        }
        if let Some(layout) = self.msix {
            let (enabled, function_mask) = layout.control(&self.shadow);
            if msix_before != Some((enabled, function_mask)) {
                changes.push(ConfigChange::MsixControl {
                    enabled,
                    function_mask,
                });
            }
        }
        Ok(changes)
    }
}

/// The write-1-to-clear bits of dword `i` (only the status register has them).
fn rw1c_bits(i: usize) -> u32 {
    if i == usize::from(COMMAND) / 4 {
        STATUS_RW1C
    } else {
        0
    }
}

fn check_msix_in_bar(
    bars: &[Bar],
    what: &'static str,
    bar: u8,
    offset: u32,
    len: u64,
) -> Result<(), ConfigError> {
    let fits = bars
        .iter()
        .find(|b| b.index == bar && b.kind != BarKind::Io)
        .is_some_and(|b| u64::from(offset) + len <= b.size);
    if fits {
        Ok(())
    } else {
        Err(ConfigError::MsixOutsideBar {
            what,
            bar,
            offset,
            len,
        })
    }
}
