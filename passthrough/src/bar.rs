//! Base address registers: decoding a device's BARs, their sizes, the
//! emulated registers the guest sizes and relocates, and the guest addresses
//! the VMM gives them.

/// Offset of BAR0 in a type-0 header.
pub const BAR0: u16 = 0x10;
/// A type-0 header has six BAR registers.
pub const BAR_COUNT: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Memory32,
    /// Takes two registers: this one (low) and the next (high).
    Memory64,
}

/// One implemented BAR of a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    /// Register index 0..=5 (the low register of a 64-bit BAR).
    pub index: u8,
    pub kind: BarKind,
    pub prefetchable: bool,
    /// The address the host assigned (what the register holds on the host).
    pub host_address: u64,
    /// A power of two.
    pub size: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BarError {
    #[error("BAR{index} has the reserved memory type 3 (register value {value:#010x}): the config space is corrupt or not a type-0 header")]
    ReservedType { index: u8, value: u32 },
    #[error("BAR5 claims to be a 64-bit BAR but there is no BAR6 for its high half (register value {value:#010x})")]
    Truncated64 { value: u32 },
    #[error("BAR{index} has size {size:#x}, which is not a power of two (the device or its sysfs `resource` file reports a bad size)")]
    BadSize { index: u8, size: u64 },
    #[error("line {line} of a sysfs `resource` file is {text:?}: expected three hex numbers (start end flags)")]
    BadResourceLine { line: usize, text: String },
    #[error("no room for BAR{index} ({size:#x} bytes) in the guest's {window} MMIO window")]
    NoRoom {
        index: u8,
        size: u64,
        window: &'static str,
    },
}

/// Decodes the BAR registers of a type-0 header. `sizes[i]` is BAR i's size
/// as the host reports it (VFIO region info, or sysfs `resource`); a BAR of
/// size 0 is not implemented.
pub fn decode_bars(config: &[u8], sizes: &[u64; BAR_COUNT]) -> Result<Vec<Bar>, BarError> {
    let register = |i: usize| {
        let at = BAR0 as usize + 4 * i;
        u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]])
    };
    let mut bars = Vec::new();
    let mut i = 0;
    while i < BAR_COUNT {
        let value = register(i);
        let index = i as u8;
        let (kind, host_address, prefetchable) = if value & 1 == 1 {
            (BarKind::Io, u64::from(value & !0x3), false)
        } else {
            let prefetchable = value & 0x8 != 0;
            match (value >> 1) & 0x3 {
                // Type 1 ("below 1 MiB") is legacy; it decodes as 32-bit.
                0 | 1 => (BarKind::Memory32, u64::from(value & !0xf), prefetchable),
                2 => {
                    if i + 1 >= BAR_COUNT {
                        return Err(BarError::Truncated64 { value });
                    }
                    let high = u64::from(register(i + 1));
                    (
                        BarKind::Memory64,
                        (high << 32) | u64::from(value & !0xf),
                        prefetchable,
                    )
                }
                _ => return Err(BarError::ReservedType { index, value }),
            }
        };
        let size = sizes[i];
        if size != 0 {
            if !size.is_power_of_two() {
                return Err(BarError::BadSize { index, size });
            }
            bars.push(Bar {
                index,
                kind,
                prefetchable,
                host_address,
                size,
            });
        }
        i += if kind == BarKind::Memory64 { 2 } else { 1 };
    }
    Ok(bars)
}

/// BAR sizes from a sysfs `resource` file (one "start end flags" line per
/// resource; the first six are the BARs).
pub fn sizes_from_sysfs_resource(text: &str) -> Result<[u64; BAR_COUNT], BarError> {
    let mut sizes = [0u64; BAR_COUNT];
    for (line_index, line) in text.lines().take(BAR_COUNT).enumerate() {
        let bad = || BarError::BadResourceLine {
            line: line_index + 1,
            text: line.to_string(),
        };
        let fields: Vec<u64> = line
            .split_whitespace()
            .map(|f| u64::from_str_radix(f.trim_start_matches("0x"), 16).map_err(|_| bad()))
            .collect::<Result<_, _>>()?;
        let [start, end, _flags] = fields[..] else {
            return Err(bad());
        };
        if end != 0 || start != 0 {
            sizes[line_index] = end
                .checked_sub(start)
                .and_then(|d| d.checked_add(1))
                .ok_or_else(bad)?;
        }
    }
    Ok(sizes)
}

/// The guest's view of one BAR: the register it reads and writes.
///
/// The register holds only the address bits above the size; the low bits
/// read as the BAR's type. Writing all ones therefore reads back the size
/// mask, which is the PCI sizing protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestBar {
    pub bar: Bar,
    /// The guest-physical address (or I/O port) the guest programmed.
    pub address: u64,
}

impl GuestBar {
    fn type_bits(&self) -> u32 {
        match self.bar.kind {
            BarKind::Io => 0x1,
            BarKind::Memory32 => u32::from(self.bar.prefetchable) << 3,
            BarKind::Memory64 => 0x4 | u32::from(self.bar.prefetchable) << 3,
        }
    }

    fn address_mask(&self) -> u64 {
        let mask = !(self.bar.size - 1);
        match self.bar.kind {
            BarKind::Io => mask & 0xffff_fffc,
            BarKind::Memory32 => mask & 0xffff_fff0,
            BarKind::Memory64 => mask & !0xf,
        }
    }

    /// The register at `index` (this BAR's, or the high half of a 64-bit one).
    pub fn read_register(&self, index: u8) -> u32 {
        let value = (self.address & self.address_mask()) | u64::from(self.type_bits());
        if index == self.bar.index {
            value as u32
        } else {
            (value >> 32) as u32
        }
    }

    /// A guest write of the whole register at `index`.
    pub fn write_register(&mut self, index: u8, value: u32) {
        let value = u64::from(value);
        let merged = if index == self.bar.index {
            (self.address & !0xffff_ffff) | value
        } else {
            (self.address & 0xffff_ffff) | (value << 32)
        };
        self.address = merged & self.address_mask();
    }

    /// True while the register holds the sizing pattern (all address bits
    /// set) rather than an address.
    pub fn is_sizing(&self) -> bool {
        self.address == self.address_mask()
    }
}

/// Gives each BAR a naturally aligned guest address: 64-bit prefetchable
/// BARs (a GPU's VRAM aperture) in the window above 4 GiB, the rest in the
/// 32-bit window, I/O BARs in the I/O port window. Largest first, so
/// alignment wastes nothing.
pub fn assign_guest_addresses(
    bars: &[Bar],
    mmio32: (u64, u64),
    mmio64: (u64, u64),
    io: (u64, u64),
) -> Result<Vec<GuestBar>, BarError> {
    let mut order: Vec<&Bar> = bars.iter().collect();
    order.sort_by(|a, b| b.size.cmp(&a.size).then(a.index.cmp(&b.index)));
    let mut next = [mmio32.0, mmio64.0, io.0];
    let ends = [mmio32.1, mmio64.1, io.1];
    let names = ["32-bit", "64-bit", "I/O"];
    let mut assigned = Vec::new();
    for bar in order {
        let window = match bar.kind {
            BarKind::Io => 2,
            BarKind::Memory64 if bar.prefetchable => 1,
            _ => 0,
        };
        let start = next[window]
            .checked_next_multiple_of(bar.size)
            .filter(|start| {
                start
                    .checked_add(bar.size)
                    .is_some_and(|end| end <= ends[window])
            })
            .ok_or(BarError::NoRoom {
                index: bar.index,
                size: bar.size,
                window: names[window],
            })?;
        next[window] = start + bar.size;
        assigned.push(GuestBar {
            bar: *bar,
            address: start,
        });
    }
    assigned.sort_by_key(|g| g.bar.index);
    Ok(assigned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(index: u8, kind: BarKind, prefetchable: bool, size: u64) -> Bar {
        Bar {
            index,
            kind,
            prefetchable,
            host_address: 0,
            size,
        }
    }

    #[test]
    fn sizing_protocol_of_each_kind() {
        let mut mem32 = GuestBar {
            bar: bar(0, BarKind::Memory32, false, 16 << 20),
            address: 0xe000_0000,
        };
        assert_eq!(mem32.read_register(0), 0xe000_0000);
        mem32.write_register(0, 0xffff_ffff);
        assert!(mem32.is_sizing());
        assert_eq!(mem32.read_register(0), 0xff00_0000);
        mem32.write_register(0, 0xd123_4567);
        assert_eq!(mem32.address, 0xd100_0000);
        assert!(!mem32.is_sizing());

        let mut mem64 = GuestBar {
            bar: bar(1, BarKind::Memory64, true, 64 << 30),
            address: 0x40_0000_0000,
        };
        assert_eq!(mem64.read_register(1), 0x0000_000c);
        assert_eq!(mem64.read_register(2), 0x40);
        mem64.write_register(1, 0xffff_ffff);
        mem64.write_register(2, 0xffff_ffff);
        assert!(mem64.is_sizing());
        // 64 GiB: the low register has no address bits, the high one 0xfffffff0.
        assert_eq!(mem64.read_register(1), 0x0000_000c);
        assert_eq!(mem64.read_register(2), 0xffff_fff0);
        mem64.write_register(1, 0);
        mem64.write_register(2, 0x80);
        assert_eq!(mem64.address, 0x80_0000_0000);

        let mut io = GuestBar {
            bar: bar(5, BarKind::Io, false, 128),
            address: 0xc000,
        };
        assert_eq!(io.read_register(5), 0xc001);
        io.write_register(5, 0xffff_ffff);
        assert_eq!(io.read_register(5), 0xffff_ff81);
    }

    #[test]
    fn decodes_registers_with_sizes() {
        let mut config = [0u8; 64];
        let mut put = |at: usize, v: u32| config[at..at + 4].copy_from_slice(&v.to_le_bytes());
        put(0x10, 0xfb00_0000); // 32-bit
        put(0x14, 0x0000_000c); // 64-bit prefetchable
        put(0x18, 0x0000_0060);
        put(0x1c, 0x0000_0000); // unimplemented
        put(0x20, 0x0000_0000);
        put(0x24, 0x0000_e001); // I/O
        let bars = decode_bars(&config, &[16 << 20, 32 << 30, 0, 0, 0, 128]).unwrap();
        assert_eq!(
            bars,
            vec![
                Bar {
                    index: 0,
                    kind: BarKind::Memory32,
                    prefetchable: false,
                    host_address: 0xfb00_0000,
                    size: 16 << 20
                },
                Bar {
                    index: 1,
                    kind: BarKind::Memory64,
                    prefetchable: true,
                    host_address: 0x60_0000_0000,
                    size: 32 << 30
                },
                Bar {
                    index: 5,
                    kind: BarKind::Io,
                    prefetchable: false,
                    host_address: 0xe000,
                    size: 128
                },
            ]
        );
        let mut bad = config;
        bad[0x24] = 0x04;
        assert_eq!(
            decode_bars(&bad, &[16 << 20, 32 << 30, 0, 0, 0, 128]),
            Err(BarError::Truncated64 { value: 0xe004 })
        );
        bad[0x10] = 0x06;
        assert!(matches!(
            decode_bars(&bad, &[0; 6]),
            Err(BarError::ReservedType { index: 0, .. })
        ));
        assert_eq!(
            decode_bars(&config, &[3, 0, 0, 0, 0, 0]),
            Err(BarError::BadSize { index: 0, size: 3 })
        );
    }

    #[test]
    fn sysfs_resource_sizes() {
        let text = "0x0000004000000000 0x000000400007ffff 0x0000000000140204\n\
                    0x0000000000000000 0x0000000000000000 0x0000000000000000\n";
        assert_eq!(
            sizes_from_sysfs_resource(text).unwrap(),
            [0x80000, 0, 0, 0, 0, 0]
        );
        assert!(matches!(
            sizes_from_sysfs_resource("0x10 0x1f\n"),
            Err(BarError::BadResourceLine { line: 1, .. })
        ));
        assert!(sizes_from_sysfs_resource("0x20 0x10 0x0\n").is_err());
    }

    #[test]
    fn guest_addresses_are_aligned_and_in_their_windows() {
        let bars = [
            bar(0, BarKind::Memory32, false, 16 << 20),
            bar(1, BarKind::Memory64, true, 64 << 30),
            bar(3, BarKind::Memory64, true, 32 << 20),
            bar(5, BarKind::Io, false, 128),
        ];
        let assigned = assign_guest_addresses(
            &bars,
            (0xc000_0000, 0xfec0_0000),
            (0x1_0000_0000, 0x100_0000_0000),
            (0xc000, 0x1_0000),
        )
        .unwrap();
        let addresses: Vec<(u8, u64)> = assigned.iter().map(|g| (g.bar.index, g.address)).collect();
        assert_eq!(
            addresses,
            vec![
                (0, 0xc000_0000),
                (1, 0x10_0000_0000),
                (3, 0x20_0000_0000),
                (5, 0xc000)
            ]
        );
        let err = assign_guest_addresses(
            &bars,
            (0xc000_0000, 0xc100_0000),
            (0x1_0000_0000, 0x2_0000_0000),
            (0xc000, 0x1_0000),
        )
        .unwrap_err();
        assert_eq!(
            err,
            BarError::NoRoom {
                index: 1,
                size: 64 << 30,
                window: "64-bit"
            }
        );
    }
}
