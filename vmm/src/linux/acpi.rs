//! ACPI tables for a Linux guest, built with rust-vmm's `acpi_tables`:
//! RSDP -> XSDT -> FADT (-> DSDT), MADT, MCFG.
//!
//! - FADT: hardware-reduced ACPI (as Firecracker and Cloud Hypervisor do):
//!   no PM1 blocks, SCI or PM timer to emulate. Linux then uses KVM's local
//!   APIC timer and kvm-clock; no legacy 8259 and no VGA.
//! - MADT: one local APIC per vCPU (APIC ID = vCPU index), KVM's IOAPIC on
//!   GSIs 0-23, the PC convention that ISA IRQ 0 (the PIT) arrives on GSI 2
//!   (the VM's GSI routing and the MP table say the same), NMI on LINT1.
//! - MCFG: the ECAM window of [`super::pci`].
//! - DSDT: `\_SB.PCI0`, a PCI Express host bridge (PNP0A08, PNP0A03
//!   compatible) whose _CRS gives the bus range, the I/O ports and the
//!   32- and 64-bit MMIO windows BARs may be placed in; and one virtio-mmio
//!   device (`LNRO0005`, as Firecracker describes them) per disk, which is
//!   how a kernel with a modular virtio_mmio (Debian's) finds the disks.
//!
//! The tables sit in the BIOS area from [`ACPI_START`], which e820 reserves;
//! the RSDP is first, 16-byte aligned, so Linux also finds it by scanning
//! 0xE0000-0xFFFFF, and its address also goes in the zero page and in PVH's
//! start info.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, Device, EISAName, Name, Path, ResourceTemplate,
    Scope,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::disk::{self, DISK_MMIO_SIZE};
use super::mptable::{IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS, MPTABLE_ADDR};
use super::pci::{BUS_RANGE, ECAM_BASE, IO_WINDOW, MMIO32_WINDOW, MMIO64_WINDOW};

/// Where the tables go: the RSDP first. Up to the MP table at 0xF0000.
pub const ACPI_START: u64 = 0xe_0000;
/// The GSI the PIT's ISA IRQ 0 is delivered on.
pub const PIT_GSI: u32 = 2;
/// GSIs the IOAPIC serves (KVM's IOAPIC has 24 pins).
pub const IOAPIC_PINS: u32 = 24;

const OEM_ID: [u8; 6] = *b"AIVMM ";
const OEM_REVISION: u32 = 1;

/// FADT IA-PC boot architecture flag: no VGA (do not probe it).
const IAPC_BOOT_VGA_NOT_PRESENT: u16 = 1 << 2;

/// MADT: the 8259s exist (KVM's in-kernel PIC), so Linux masks them.
const MADT_PCAT_COMPAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    #[error("ACPI tables for {vcpus} vCPUs: a Linux guest has 1 to {MAX_VCPUS}")]
    VcpuCount { vcpus: u32 },
    #[error("the ACPI tables ({len} bytes) do not fit between {ACPI_START:#x} and the MP table at {MPTABLE_ADDR:#x}")]
    TooLarge { len: usize },
    #[error("cannot write the ACPI tables into guest memory: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// The tables, laid out for guest-physical [`ACPI_START`].
#[derive(Debug, Clone)]
pub struct AcpiTables {
    /// Everything from ACPI_START, RSDP first.
    pub bytes: Vec<u8>,
    pub rsdp: u64,
    /// (signature, guest address, length) of each table.
    pub tables: Vec<([u8; 4], u64, usize)>,
}

impl AcpiTables {
    /// The bytes of the table with `signature`.
    pub fn table(&self, signature: &[u8; 4]) -> Option<&[u8]> {
        let &(_, addr, len) = self.tables.iter().find(|t| &t.0 == signature)?;
        let at = (addr - ACPI_START) as usize;
        self.bytes.get(at..at + len)
    }
}

fn bytes_of(table: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    table.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT: the PCI host bridge and its resources, and `disks` virtio-mmio
/// disks.
fn dsdt(disks: usize) -> Vec<u8> {
    let (io_start, io_end) = IO_WINDOW;
    let bus = AddressSpace::new_bus_number(u16::from(BUS_RANGE.0), u16::from(BUS_RANGE.1));
    // The conf1 ports belong to the bridge itself.
    let conf1 = aml::IO::new(0xcf8, 0xcf8, 1, 8);
    let io = AddressSpace::new_io(io_start as u16, (io_end - 1) as u16, None);
    let mmio32 = AddressSpace::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        MMIO32_WINDOW.0 as u32,
        (MMIO32_WINDOW.1 - 1) as u32,
        None,
    );
    let mmio64 = AddressSpace::new_memory(
        AddressSpaceCacheable::Cacheable,
        true,
        MMIO64_WINDOW.0,
        MMIO64_WINDOW.1 - 1,
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &conf1, &io, &mmio32, &mmio64]);
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let (hid, cid, adr, seg, uid, bbn) = (
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
        Name::new("_ADR".into(), &aml::ZERO),
        Name::new("_SEG".into(), &aml::ZERO),
        Name::new("_UID".into(), &aml::ZERO),
        Name::new("_BBN".into(), &aml::ZERO),
    );
    let crs = Name::new("_CRS".into(), &crs);
    let pci0 = Device::new(
        "PCI0".into(),
        vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs],
    );
    // virtio-mmio disks: a 4 KiB register window and an edge-triggered ISA
    // IRQ each (the irqfd KVM injects is an edge).
    const DISK_HID: &str = "LNRO0005";
    let disk_objects: Vec<(String, [Name; 3])> = (0..disks)
        .map_while(disk::placement)
        .enumerate()
        .map(|(index, (addr, irq))| {
            let window = aml::Memory32Fixed::new(true, addr as u32, DISK_MMIO_SIZE as u32);
            let interrupt = aml::Interrupt::new(true, true, false, false, irq);
            let crs = ResourceTemplate::new(vec![&window, &interrupt]);
            (
                format!("VR{index:02}"),
                [
                    Name::new("_HID".into(), &DISK_HID),
                    Name::new("_UID".into(), &(index as u32)),
                    Name::new("_CRS".into(), &crs),
                ],
            )
        })
        .collect();
    let disk_devices: Vec<Device> = disk_objects
        .iter()
        .map(|(name, objects)| {
            Device::new(
                name.as_str().into(),
                objects.iter().map(|object| object as &dyn Aml).collect(),
            )
        })
        .collect();
    let mut children: Vec<&dyn Aml> = vec![&pci0];
    children.extend(disk_devices.iter().map(|device| device as &dyn Aml));
    let sb = Scope::new(Path::new("\\_SB_"), children);
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, *b"AIVMDSDT", OEM_REVISION);
    sb.to_aml_bytes(&mut dsdt);
    dsdt.as_slice().to_vec()
}

/// The MADT for `vcpus` vCPUs.
fn madt(vcpus: u32) -> Vec<u8> {
    let mut madt = Sdt::new(*b"APIC", 36, 5, OEM_ID, *b"AIVMMADT", OEM_REVISION);
    let mut body = Vec::new();
    body.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for index in 0..vcpus {
        // Processor local APIC: type 0, length 8, UID, APIC ID, enabled.
        body.extend_from_slice(&[0, 8, index as u8, index as u8]);
        body.extend_from_slice(&1u32.to_le_bytes());
    }
    // I/O APIC: type 1, length 12, ID (after the CPUs' as in the MP table),
    // address, first GSI.
    body.extend_from_slice(&[1, 12, vcpus as u8, 0]);
    body.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes());
    // Interrupt source override: type 2, length 10, ISA bus, IRQ 0 -> GSI 2,
    // flags 0 (the bus's polarity and trigger: active high, edge).
    body.extend_from_slice(&[2, 10, 0, 0]);
    body.extend_from_slice(&PIT_GSI.to_le_bytes());
    body.extend_from_slice(&0u16.to_le_bytes());
    // Local APIC NMI: type 4, length 6, all processors, flags 0, LINT1.
    body.extend_from_slice(&[4, 6, 0xff, 0, 0, 1]);
    madt.append_slice(&body);
    madt.as_slice().to_vec()
}

fn fadt(dsdt: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"AIVMFACP", OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_VGA_NOT_PRESENT.into();
    // "AIVMM" as the hypervisor vendor identity (FADT 6.3+).
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"AIVMM\0\0\0").into();
    bytes_of(&fadt.finalize())
}

fn mcfg() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"AIVMMCFG", OEM_REVISION);
    mcfg.add_ecam(ECAM_BASE, 0, BUS_RANGE.0, BUS_RANGE.1);
    bytes_of(&mcfg)
}

/// Builds the tables for `vcpus` vCPUs and `disks` virtio-mmio disks.
pub fn build(vcpus: u32, disks: usize) -> Result<AcpiTables, AcpiError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(AcpiError::VcpuCount { vcpus });
    }
    let mut bytes = vec![0u8; Rsdp::len()];
    let mut tables = Vec::new();
    let mut place = |bytes: &mut Vec<u8>, table: Vec<u8>| -> u64 {
        bytes.resize(bytes.len().next_multiple_of(16), 0);
        let addr = ACPI_START + bytes.len() as u64;
        let signature = [table[0], table[1], table[2], table[3]];
        tables.push((signature, addr, table.len()));
        bytes.extend_from_slice(&table);
        addr
    };
    let dsdt_addr = place(&mut bytes, dsdt(disks));
    let fadt_addr = place(&mut bytes, fadt(dsdt_addr));
    let madt_addr = place(&mut bytes, madt(vcpus));
    let mcfg_addr = place(&mut bytes, mcfg());
    let mut xsdt = XSDT::new(OEM_ID, *b"AIVMXSDT", OEM_REVISION);
    for addr in [fadt_addr, madt_addr, mcfg_addr] {
        xsdt.add_entry(addr);
    }
    let xsdt_addr = place(&mut bytes, bytes_of(&xsdt));
    let rsdp = bytes_of(&Rsdp::new(OEM_ID, xsdt_addr));
    bytes[..rsdp.len()].copy_from_slice(&rsdp);
    if ACPI_START + bytes.len() as u64 > MPTABLE_ADDR {
        return Err(AcpiError::TooLarge { len: bytes.len() });
    }
    Ok(AcpiTables {
        bytes,
        rsdp: ACPI_START,
        tables,
    })
}

/// Writes the tables for `vcpus` vCPUs into guest memory; the RSDP's address.
pub fn write(memory: &GuestMemoryMmap, vcpus: u32, disks: usize) -> Result<u64, AcpiError> {
    let tables = build(vcpus, disks)?;
    memory.write_slice(&tables.bytes, GuestAddress(ACPI_START))?;
    Ok(tables.rsdp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    fn u32_at(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn checksums_lengths_and_links() {
        let acpi = build(4, 0).unwrap();
        let rsdp = &acpi.bytes[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "ACPI 2.0+ RSDP");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        assert_eq!(acpi.rsdp % 16, 0);
        let xsdt_addr = u64_at(rsdp, 24);
        for (signature, addr, len) in &acpi.tables {
            let table = acpi.table(signature).unwrap();
            assert_eq!(u32_at(table, 4) as usize, *len, "{signature:?} length");
            assert_eq!(sum(table), 0, "{signature:?} checksum");
            assert_eq!(addr % 16, 0);
        }
        let xsdt = acpi.table(b"XSDT").unwrap();
        assert_eq!(
            acpi.tables.iter().find(|t| &t.0 == b"XSDT").unwrap().1,
            xsdt_addr
        );
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|at| u64_at(xsdt, at))
            .collect();
        let addr_of = |s: &[u8; 4]| acpi.tables.iter().find(|t| &t.0 == s).unwrap().1;
        assert_eq!(
            entries,
            vec![addr_of(b"FACP"), addr_of(b"APIC"), addr_of(b"MCFG")]
        );
        let fadt = acpi.table(b"FACP").unwrap();
        assert_eq!(u64_at(fadt, 140), addr_of(b"DSDT"), "X_DSDT");
        assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "hardware-reduced");
        assert!(ACPI_START + acpi.bytes.len() as u64 <= MPTABLE_ADDR);
    }

    #[test]
    fn madt_and_mcfg_entries() {
        let acpi = build(3, 2).unwrap();
        let madt = acpi.table(b"APIC").unwrap();
        assert_eq!(u32_at(madt, 36), LAPIC_ADDR);
        let mut at = 44;
        let mut lapics = Vec::new();
        let mut others = Vec::new();
        while at < madt.len() {
            let (kind, len) = (madt[at], madt[at + 1] as usize);
            match kind {
                0 => lapics.push((madt[at + 2], madt[at + 3], u32_at(madt, at + 4))),
                _ => others.push(madt[at..at + len].to_vec()),
            }
            at += len;
        }
        assert_eq!(at, madt.len());
        assert_eq!(lapics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
        assert_eq!(others[0][..4], [1, 12, 3, 0]);
        assert_eq!(u32_at(&others[0], 4), IOAPIC_ADDR);
        assert_eq!(others[1], [2, 10, 0, 0, 2, 0, 0, 0, 0, 0], "IRQ0 -> GSI2");
        assert_eq!(others[2], [4, 6, 0xff, 0, 0, 1]);

        let mcfg = acpi.table(b"MCFG").unwrap();
        assert_eq!(mcfg.len(), 44 + 16);
        assert_eq!(u64_at(mcfg, 44), ECAM_BASE);
        assert_eq!(&mcfg[54..56], &[0, 0], "buses 0-0");
        assert!(matches!(build(0, 0), Err(AcpiError::VcpuCount { .. })));
        assert!(build(MAX_VCPUS, disk::DISK_IRQS.len()).is_ok());
    }
}
