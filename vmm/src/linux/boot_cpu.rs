//! The boot vCPU's state at the kernel's entry point, for the two protocols a
//! vmlinux or bzImage offers: the 64-bit boot protocol (long mode, identity-
//! mapped, RSI = zero page) and PVH (32-bit protected mode without paging,
//! RBX = hvm_start_info). Both run at CPL0, as a kernel must.

use kvm_bindings::{kvm_regs, kvm_segment, CpuId};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

use crate::vstate::layout::{selectors, GDT_ENTRIES, TSS_LIMIT};
use crate::vstate::vcpu::{cr0, cr4, efer, set_vcpu_identity};
use aivmm_guest_abi::layout::{GDT_ADDR, IDT_ADDR, TSS_ADDR};

/// The identity map: a PML4, a PDPT and four page directories of 2 MiB
/// pages covering the first 4 GiB.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const IDENTITY_MAPPED: u64 = 4 << 30;
/// A stack for the first instructions (both entry paths set their own soon).
pub const BOOT_STACK: u64 = 0x8ff0;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const LARGE: u64 = 1 << 7;

#[derive(Debug, thiserror::Error)]
pub enum BootCpuError {
    #[error("cannot write the boot page tables into guest memory: {0}")]
    GuestMemory(#[source] GuestMemoryError),
    #[error("vCPU {index}: cannot {what}: {source}")]
    Setup {
        index: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Where and how the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit boot protocol: RIP = entry, RSI = zero page.
    Linux64 { rip: u64, zero_page: u64 },
    /// PVH: RIP = the note's 32-bit entry, RBX = hvm_start_info.
    Pvh { rip: u64, start_info: u64 },
}

impl Entry {
    pub fn rip(&self) -> u64 {
        match *self {
            Entry::Linux64 { rip, .. } | Entry::Pvh { rip, .. } => rip,
        }
    }
}

/// Writes the 4 GiB identity map; returns CR3.
pub fn write_page_tables(memory: &GuestMemoryMmap) -> Result<u64, BootCpuError> {
    let directories = IDENTITY_MAPPED >> 30;
    let write = |addr: u64, entries: &[u64]| {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        memory
            .write_slice(&bytes, GuestAddress(addr))
            .map_err(BootCpuError::GuestMemory)
    };
    write(PML4_ADDR, &[PDPT_ADDR | PRESENT | WRITABLE])?;
    let pdpt: Vec<u64> = (0..directories)
        .map(|i| (PD_ADDR + i * 0x1000) | PRESENT | WRITABLE)
        .collect();
    write(PDPT_ADDR, &pdpt)?;
    let pds: Vec<u64> = (0..directories * 512)
        .map(|i| (i << 21) | PRESENT | WRITABLE | LARGE)
        .collect();
    write(PD_ADDR, &pds)?;
    Ok(PML4_ADDR)
}

fn segment(selector: u16, code: bool, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 }, // execute/read or read/write, accessed
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        ..Default::default()
    }
}

/// CPUID.1:ECX bit 13: CMPXCHG16B.
pub const CPUID_1_ECX_CX16: u32 = 1 << 13;
/// Present when the host's KVM is PVM (the kvm_pvm module).
const PVM_MODULE: &str = "/sys/module/kvm_pvm";

/// Whether this host's KVM runs guest CPL0 code through its instruction
/// emulator (PVM; see shared/design/kvm-on-these-machines.md).
pub fn host_emulates_cpl0() -> bool {
    std::path::Path::new(PVM_MODULE).exists()
}

/// The CPUID a Linux guest's vCPU `index` sees: what KVM supports, with its
/// APIC ID. Unlike the inference partitions, no host ISA is added: a CPL0
/// guest's instructions may go through KVM's emulator. Where they do
/// (`emulated_cpl0`), CMPXCHG16B is hidden too: PVM's KVM_GET_SUPPORTED_CPUID
/// offers it, but the emulator cannot execute it (measured: Debian's 6.1
/// kernel stopped with an emulation failure on `lock cmpxchg16b` in SLUB's
/// get_partial_node, ~180 s into the boot); without CX16 the kernel takes its
/// fallbacks.
pub fn guest_cpuid(supported: &CpuId, index: u32, vcpus: u32, emulated_cpl0: bool) -> CpuId {
    let mut cpuid = supported.clone();
    set_vcpu_identity(&mut cpuid, index, vcpus);
    if emulated_cpl0 {
        for entry in cpuid.as_mut_slice() {
            if entry.function == 1 {
                entry.ecx &= !CPUID_1_ECX_CX16;
            }
        }
    }
    cpuid
}

/// Sets vCPU `index`'s CPUID; the boot processor also gets its entry state
/// (the others wait for the kernel's INIT/SIPI in the in-kernel local APIC).
pub fn configure(
    vcpu: &VcpuFd,
    index: u32,
    cpuid: &CpuId,
    entry: Option<Entry>,
) -> Result<(), BootCpuError> {
    let setup = |what| {
        move |source| BootCpuError::Setup {
            index,
            what,
            source,
        }
    };
    vcpu.set_cpuid2(cpuid).map_err(setup("set CPUID"))?;
    let Some(entry) = entry else {
        return Ok(());
    };
    let mut sregs = vcpu.get_sregs().map_err(setup("read special registers"))?;
    let data = segment(selectors::KERNEL_DS, false, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: selectors::TSS,
        type_: 0xb, // busy TSS, as after LTR
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    let mut regs = kvm_regs {
        rip: entry.rip(),
        rsp: BOOT_STACK,
        rflags: 0x2, // interrupts off
        ..Default::default()
    };
    match entry {
        Entry::Linux64 { zero_page, .. } => {
            sregs.cs = segment(selectors::KERNEL_CS, true, true);
            sregs.cr0 = cr0::PE | cr0::ET | cr0::NE | cr0::PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = cr4::PAE;
            sregs.efer = efer::LME | efer::LMA;
            regs.rsi = zero_page;
        }
        Entry::Pvh { start_info, .. } => {
            // The GDT's 0x08 is the flat 32-bit kernel code segment.
            sregs.cs = segment(selectors::KERNEL_CS - 8, true, false);
            sregs.cr0 = cr0::PE | cr0::ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = start_info;
        }
    }
    vcpu.set_sregs(&sregs)
        .map_err(setup("set special registers (kernel entry)"))?;
    vcpu.set_regs(&regs)
        .map_err(setup("set general registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::e820::create_guest_ram;
    use crate::vstate::memory::RamBacking;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cx16_is_hidden_only_where_cpl0_is_emulated() {
        let supported = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ecx: CPUID_1_ECX_CX16 | 1,
            ..Default::default()
        }])
        .unwrap();
        let leaf1 = |cpuid: &CpuId| cpuid.as_slice()[0];
        let native = guest_cpuid(&supported, 3, 4, false);
        assert_eq!(leaf1(&native).ecx & CPUID_1_ECX_CX16, CPUID_1_ECX_CX16);
        assert_eq!(leaf1(&native).ebx >> 24, 3, "APIC ID");
        let emulated = guest_cpuid(&supported, 3, 4, true);
        assert_eq!(leaf1(&emulated).ecx & CPUID_1_ECX_CX16, 0);
        assert_eq!(leaf1(&emulated).ecx & 1, 1, "other features stay");
    }

    #[test]
    fn identity_map_covers_4_gib_with_2_mib_pages() {
        let memory = create_guest_ram(64 << 20, RamBacking::Anonymous, None).unwrap();
        let cr3 = write_page_tables(&memory).unwrap();
        let read = |addr: u64| memory.read_obj::<u64>(GuestAddress(addr)).unwrap();
        for addr in [
            0u64,
            0x100_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xfee0_0000,
            IDENTITY_MAPPED - 1,
        ] {
            let pml4e = read(cr3 + ((addr >> 39) & 0x1ff) * 8);
            assert_eq!(pml4e & PRESENT, PRESENT, "{addr:#x}");
            let pdpte = read((pml4e & !0xfff) + ((addr >> 30) & 0x1ff) * 8);
            assert_eq!(
                pdpte & (PRESENT | WRITABLE),
                PRESENT | WRITABLE,
                "{addr:#x}"
            );
            let pde = read((pdpte & !0xfff) + ((addr >> 21) & 0x1ff) * 8);
            assert_eq!(pde & (PRESENT | LARGE), PRESENT | LARGE, "{addr:#x}");
            assert_eq!(pde & !0x1f_ffff, addr & !0x1f_ffff, "identity at {addr:#x}");
        }
        // Nothing above 4 GiB.
        assert_eq!(read(PDPT_ADDR + 4 * 8), 0);
        assert_eq!(read(PML4_ADDR + 8), 0);
        // The tables stay below the zero page's neighbours and the 64 KiB Linux reserves.
        const { assert!(PD_ADDR + 4 * 0x1000 <= 0x1_0000) };
    }
}
