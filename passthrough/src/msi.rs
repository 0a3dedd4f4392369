//! The MSI capability: its layout, and the interrupt messages the guest
//! programmed into the VMM's emulated copy of it.

use crate::irq_routing::MsiMessage;

const CONTROL_ENABLE: u16 = 1 << 0;
const CONTROL_64BIT: u16 = 1 << 7;
const CONTROL_PER_VECTOR_MASK: u16 = 1 << 8;

/// Where an MSI capability keeps its fields (they move with its flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiLayout {
    pub offset: u16,
    pub is_64bit: bool,
    pub per_vector_mask: bool,
    /// Multiple Message Capable: 1, 2, 4, ... 32.
    pub max_vectors: u8,
}

/// What the guest has programmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiState {
    pub enabled: bool,
    /// Multiple Message Enable: the vectors the guest allotted.
    pub vectors: u8,
    pub address: u64,
    pub data: u16,
    /// Bit n masks vector n (0 without per-vector masking).
    pub mask: u32,
}

fn u16_at(config: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([config[at], config[at + 1]])
}

fn u32_at(config: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([config[at], config[at + 1], config[at + 2], config[at + 3]])
}

impl MsiLayout {
    pub fn parse(config: &[u8], offset: u16) -> MsiLayout {
        let control = u16_at(config, usize::from(offset) + 2);
        MsiLayout {
            offset,
            is_64bit: control & CONTROL_64BIT != 0,
            per_vector_mask: control & CONTROL_PER_VECTOR_MASK != 0,
            max_vectors: 1 << ((control >> 1) & 0x7).min(5),
        }
    }

    fn data_offset(&self) -> u16 {
        self.offset + if self.is_64bit { 0x0c } else { 0x08 }
    }

    fn mask_offset(&self) -> Option<u16> {
        self.per_vector_mask.then_some(self.data_offset() + 4)
    }

    /// Bytes the capability spans.
    pub fn span(&self) -> u16 {
        match self.mask_offset() {
            Some(mask) => mask + 8 - self.offset, // mask bits + pending bits
            None => self.data_offset() + 4 - self.offset,
        }
    }

    /// Guest-writable bits, as (offset of a dword, mask) pairs: enable and
    /// multiple message enable, address, data, mask bits. Everything else
    /// of the capability reads as the device reports it and ignores writes.
    pub fn writable(&self) -> Vec<(u16, u32)> {
        let mut writable = vec![
            (self.offset, u32::from(CONTROL_ENABLE | 0x70) << 16),
            (self.offset + 4, 0xffff_fffc),
        ];
        if self.is_64bit {
            writable.push((self.offset + 8, 0xffff_ffff));
        }
        writable.push((self.data_offset(), 0x0000_ffff));
        if let Some(mask) = self.mask_offset() {
            let bits = if self.max_vectors >= 32 {
                u32::MAX
            } else {
                (1u32 << self.max_vectors) - 1
            };
            writable.push((mask, bits));
        }
        writable
    }

    /// Decodes the state from the emulated config bytes.
    pub fn state(&self, config: &[u8]) -> MsiState {
        let at = usize::from(self.offset);
        let control = u16_at(config, at + 2);
        let high = if self.is_64bit {
            u64::from(u32_at(config, at + 8)) << 32
        } else {
            0
        };
        MsiState {
            enabled: control & CONTROL_ENABLE != 0,
            vectors: (1u8 << ((control >> 4) & 0x7).min(5)).min(self.max_vectors),
            address: high | u64::from(u32_at(config, at + 4) & !0x3),
            data: u16_at(config, usize::from(self.data_offset())),
            mask: self
                .mask_offset()
                .map_or(0, |m| u32_at(config, usize::from(m))),
        }
    }
}

impl MsiState {
    /// The message of each allotted vector: vector n carries the data with
    /// its low bits replaced by n (multiple message MSI); None when masked or
    /// MSI is disabled.
    pub fn messages(&self) -> Vec<Option<MsiMessage>> {
        (0..self.vectors)
            .map(|n| {
                let masked = self.mask & (1 << n) != 0;
                (self.enabled && !masked).then(|| MsiMessage {
                    address: self.address,
                    data: u32::from(self.data & !(u16::from(self.vectors) - 1) | u16::from(n)),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_follow_the_control_flags() {
        let mut config = vec![0u8; 256];
        config[0x50] = 0x05;
        // 64-bit, per-vector masking, 8 vectors capable.
        config[0x52..0x54]
            .copy_from_slice(&(CONTROL_64BIT | CONTROL_PER_VECTOR_MASK | 3 << 1).to_le_bytes());
        let layout = MsiLayout::parse(&config, 0x50);
        assert_eq!(
            (layout.is_64bit, layout.per_vector_mask, layout.max_vectors),
            (true, true, 8)
        );
        assert_eq!(layout.span(), 0x18);
        assert_eq!(
            layout.writable(),
            vec![
                (0x50, 0x0071_0000),
                (0x54, 0xffff_fffc),
                (0x58, 0xffff_ffff),
                (0x5c, 0xffff),
                (0x60, 0xff)
            ]
        );
        config[0x52..0x54].copy_from_slice(&0u16.to_le_bytes());
        let small = MsiLayout::parse(&config, 0x50);
        assert_eq!((small.span(), small.max_vectors), (0x0c, 1));
    }

    #[test]
    fn multiple_message_vectors_share_address_and_vary_data() {
        let state = MsiState {
            enabled: true,
            vectors: 4,
            address: 0xfee0_1000,
            data: 0x4041,
            mask: 0b0100,
        };
        let data: Vec<Option<u32>> = state.messages().iter().map(|m| m.map(|m| m.data)).collect();
        assert_eq!(data, vec![Some(0x4040), Some(0x4041), None, Some(0x4043)]);
        assert!(state.messages()[0].unwrap().address == 0xfee0_1000);
        let disabled = MsiState {
            enabled: false,
            ..state
        };
        assert!(disabled.messages().iter().all(Option::is_none));
    }
}
