//! The Intel MultiProcessor Specification 1.4 table that tells a Linux guest
//! without ACPI about its vCPUs (one local APIC each), the IOAPIC that KVM's
//! in-kernel irqchip provides, and how the 16 ISA IRQs reach it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

/// The MP floating pointer and the configuration table behind it, in the
/// BIOS area Linux scans (0xf0000-0xfffff), reserved in the e820 map.
pub const MPTABLE_ADDR: u64 = 0xf_0000;
/// KVM's in-kernel IOAPIC and the local APICs.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The ISA IRQs routed to IOAPIC pins of the same number.
pub const ISA_IRQS: u8 = 16;
/// The IOAPIC pin the PIT (ISA IRQ 0) is wired to, as on PCs.
pub const PIT_IOAPIC_PIN: u8 = 2;
/// APIC IDs are 8 bits and the IOAPIC takes the one after the last vCPU.
pub const MAX_VCPUS: u32 = 254;

const FLOATING_LEN: usize = 16;
const HEADER_LEN: usize = 44;
const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

mod entry {
    pub const PROCESSOR: u8 = 0;
    pub const BUS: u8 = 1;
    pub const IOAPIC: u8 = 2;
    pub const IO_INTERRUPT: u8 = 3;
    pub const LOCAL_INTERRUPT: u8 = 4;
}

mod interrupt {
    pub const INT: u8 = 0;
    pub const NMI: u8 = 1;
    pub const EXTINT: u8 = 3;
}

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("the MP table describes 1 to {max} vCPUs, not {vcpus}")]
    VcpuCount { vcpus: u32, max: u32 },
    #[error("cannot write the MP table into guest memory: {0}")]
    GuestMemory(#[source] GuestMemoryError),
}

/// Two's complement of the byte sum, so that the structure sums to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The floating pointer and configuration table for `vcpus` vCPUs, as they
/// go at [`MPTABLE_ADDR`].
pub fn build(vcpus: u32) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount {
            vcpus,
            max: MAX_VCPUS,
        });
    }
    let ioapic_id = vcpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for apic_id in 0..vcpus as u8 {
        let flags = 1 | if apic_id == 0 { 2 } else { 0 }; // enabled, bootstrap
        entries.extend_from_slice(&[entry::PROCESSOR, apic_id, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // CPU signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[entry::BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[entry::IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Conforming polarity and trigger, bus 0 IRQ n -> IOAPIC pin n,
        // except the PIT's IRQ 0 on pin 2 (ACPI's override says the same,
        // and the VM's GSI routing delivers it there).
        let pin = if irq == 0 { PIT_IOAPIC_PIN } else { irq };
        entries.extend_from_slice(&[
            entry::IO_INTERRUPT,
            interrupt::INT,
            0,
            0,
            0,
            irq,
            ioapic_id,
            pin,
        ]);
        count += 1;
    }
    // The PIC's output on LINT0 of every local APIC, NMI on LINT1.
    entries.extend_from_slice(&[
        entry::LOCAL_INTERRUPT,
        interrupt::EXTINT,
        0,
        0,
        0,
        0,
        0xff,
        0,
    ]);
    entries.extend_from_slice(&[entry::LOCAL_INTERRUPT, interrupt::NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_addr = MPTABLE_ADDR as u32 + FLOATING_LEN as u32;
    let mut floating = [0u8; FLOATING_LEN];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&table_addr.to_le_bytes());
    floating[8] = 1; // length in 16-byte paragraphs
    floating[9] = SPEC_REV;
    // Byte 11 (feature 1) is 0: a configuration table is present.
    floating[10] = checksum(&floating);

    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    let base_len = (HEADER_LEN + entries.len()) as u16;
    header[4..6].copy_from_slice(&base_len.to_le_bytes());
    header[6] = SPEC_REV;
    header[8..16].copy_from_slice(b"AIVMM   ");
    header[16..28].copy_from_slice(b"LINUX-GUEST ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&LAPIC_ADDR.to_le_bytes());
    let sum = header
        .iter()
        .chain(&entries)
        .fold(0u8, |sum, b| sum.wrapping_add(*b));
    header[7] = sum.wrapping_neg();

    let mut table = floating.to_vec();
    table.extend_from_slice(&header);
    table.extend_from_slice(&entries);
    Ok(table)
}

/// Writes the MP table for `vcpus` vCPUs into guest memory.
pub fn write(memory: &GuestMemoryMmap, vcpus: u32) -> Result<(), MpTableError> {
    let table = build(vcpus)?;
    memory
        .write_slice(&table, GuestAddress(MPTABLE_ADDR))
        .map_err(MpTableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCESSOR_LEN: usize = 20;
    const ENTRY_LEN: usize = 8;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_and_counts() {
        for vcpus in [1, 2, 64, MAX_VCPUS] {
            let table = build(vcpus).unwrap();
            let (floating, config) = table.split_at(FLOATING_LEN);
            assert_eq!(&floating[0..4], b"_MP_");
            assert_eq!(sum(floating), 0, "floating pointer checksum");
            let pointer = u32::from_le_bytes(floating[4..8].try_into().unwrap());
            assert_eq!(pointer as u64, MPTABLE_ADDR + FLOATING_LEN as u64);
            assert_eq!(&config[0..4], b"PCMP");
            let base_len = u16::from_le_bytes(config[4..6].try_into().unwrap()) as usize;
            assert_eq!(base_len, config.len());
            assert_eq!(sum(config), 0, "configuration table checksum");
            let count = u16::from_le_bytes(config[34..36].try_into().unwrap()) as u32;
            assert_eq!(count, vcpus + 1 + 1 + ISA_IRQS as u32 + 2);
            // Walk the entries as Linux's MP parser does.
            let (mut offset, mut processors, mut bsp) = (HEADER_LEN, 0, 0);
            let mut pins = Vec::new();
            for _ in 0..count {
                let kind = config[offset];
                if kind == entry::PROCESSOR {
                    assert_eq!(config[offset + 1], processors as u8, "APIC IDs 0..n");
                    processors += 1;
                    bsp += (config[offset + 3] & 2 != 0) as u32;
                    offset += PROCESSOR_LEN;
                } else {
                    assert!(kind <= entry::LOCAL_INTERRUPT, "entry type {kind}");
                    if kind == entry::IO_INTERRUPT {
                        // Source IRQ -> destination pin.
                        pins.push((config[offset + 5], config[offset + 7]));
                    }
                    offset += ENTRY_LEN;
                }
            }
            assert_eq!(offset, config.len());
            assert_eq!((processors, bsp), (vcpus, 1));
            let expected: Vec<(u8, u8)> = (0..ISA_IRQS)
                .map(|irq| (irq, if irq == 0 { 2 } else { irq }))
                .collect();
            assert_eq!(pins, expected, "ISA IRQs, the PIT's on pin 2");
            assert!(MPTABLE_ADDR + table.len() as u64 <= 0x10_0000);
        }
        assert!(matches!(build(0), Err(MpTableError::VcpuCount { .. })));
        assert!(matches!(build(255), Err(MpTableError::VcpuCount { .. })));
    }
}
