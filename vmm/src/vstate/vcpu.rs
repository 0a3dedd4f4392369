//! vCPU state at the first KVM_RUN: 64-bit long mode at CPL3, already paged,
//! with the vector state the host supports enabled. See the design note
//! (shared/design/kvm-on-these-machines.md): at CPL0 every instruction would be
//! emulated on PVM hosts, at CPL3 the guest runs natively everywhere.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_xcrs, CpuId};
use kvm_ioctls::VcpuFd;

use super::layout::{selectors, GDT_ENTRIES, TSS_LIMIT};
use aivmm_guest_abi::layout::{GDT_ADDR, IDT_ADDR, TSS_ADDR};

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        index: u32,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: cannot {what}: {source}")]
    Setup {
        index: u32,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index}: KVM refused XCR0 {xcr0:#x} (the vector state to enable): {source}")]
    Xcr0 {
        index: u32,
        xcr0: u64,
        source: kvm_ioctls::Error,
    },
    #[error("this host's KVM does not offer {feature} to guests, which the inference kernel is built for")]
    MissingFeature { feature: &'static str },
}

pub(crate) mod cr0 {
    pub const PE: u64 = 1 << 0;
    pub const MP: u64 = 1 << 1;
    pub const ET: u64 = 1 << 4;
    pub const NE: u64 = 1 << 5;
    pub const WP: u64 = 1 << 16;
    pub const PG: u64 = 1 << 31;
}

pub(crate) mod cr4 {
    pub const PAE: u64 = 1 << 5;
    pub const OSFXSR: u64 = 1 << 9;
    pub const OSXMMEXCPT: u64 = 1 << 10;
    pub const OSXSAVE: u64 = 1 << 18;
}

pub(crate) mod efer {
    pub const LME: u64 = 1 << 8;
    pub const LMA: u64 = 1 << 10;
}

/// XCR0 components: x87, SSE, AVX, and the three AVX-512 ones.
mod xcr0 {
    pub const X87: u64 = 1 << 0;
    pub const SSE: u64 = 1 << 1;
    pub const AVX: u64 = 1 << 2;
    pub const AVX512: u64 = (1 << 5) | (1 << 6) | (1 << 7);
}

/// What every vCPU of a partition shares: its CPUID and XCR0.
pub struct CpuTemplate {
    cpuid: CpuId,
    pub xcr0: u64,
    /// The guest may use 1 GiB pages.
    pub huge_pages: bool,
    /// The guest CPU has AVX-512F (and XCR0 enables its state).
    pub avx512: bool,
}

fn find(cpuid: &CpuId, function: u32, index: u32) -> Option<&kvm_bindings::kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
}

/// User-mode instruction-set extensions: (leaf, subleaf, register, bits,
/// XCR0 state they need). The CPU executes these natively whatever KVM does,
/// so a guest may use them whenever the host CPU has them and XCR0 enables
/// their register state; only the feature bits have to say so.
const USER_ISA: &[(u32, u32, Register, u32, u64)] = &[
    // SSE3, PCLMULQDQ, SSSE3, CX16, SSE4.1, SSE4.2, MOVBE, POPCNT, AES, RDRAND
    (
        1,
        0,
        Register::Ecx,
        1 << 0
            | 1 << 1
            | 1 << 9
            | 1 << 13
            | 1 << 19
            | 1 << 20
            | 1 << 22
            | 1 << 23
            | 1 << 25
            | 1 << 30,
        0,
    ),
    // XSAVE, AVX, FMA, F16C
    (
        1,
        0,
        Register::Ecx,
        1 << 26 | 1 << 28 | 1 << 12 | 1 << 29,
        xcr0::AVX,
    ),
    // BMI1, BMI2, ADX
    (7, 0, Register::Ebx, 1 << 3 | 1 << 8 | 1 << 19, 0),
    // AVX2
    (7, 0, Register::Ebx, 1 << 5, xcr0::AVX),
    // AVX512F, DQ, IFMA, CD, BW, VL
    (
        7,
        0,
        Register::Ebx,
        1 << 16 | 1 << 17 | 1 << 21 | 1 << 28 | 1 << 30 | 1 << 31,
        xcr0::AVX512,
    ),
    // AVX512_VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ
    (
        7,
        0,
        Register::Ecx,
        1 << 1 | 1 << 6 | 1 << 11 | 1 << 12 | 1 << 14,
        xcr0::AVX512,
    ),
    // GFNI, VAES, VPCLMULQDQ
    (7, 0, Register::Ecx, 1 << 8 | 1 << 9 | 1 << 10, xcr0::AVX),
    // AVX512_FP16
    (7, 0, Register::Edx, 1 << 23, xcr0::AVX512),
    // AVX-VNNI
    (7, 1, Register::Eax, 1 << 4, xcr0::AVX),
    // AVX512_BF16
    (7, 1, Register::Eax, 1 << 5, xcr0::AVX512),
    // LZCNT
    (0x8000_0001, 0, Register::Ecx, 1 << 5, 0),
];

#[derive(Clone, Copy)]
enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

fn register(entry: &mut kvm_bindings::kvm_cpuid_entry2, register: Register) -> &mut u32 {
    match register {
        Register::Eax => &mut entry.eax,
        Register::Ebx => &mut entry.ebx,
        Register::Ecx => &mut entry.ecx,
        Register::Edx => &mut entry.edx,
    }
}

/// Adds the user-mode ISA extensions the host CPU has (see [`USER_ISA`]).
/// Needed where KVM_GET_SUPPORTED_CPUID under-reports them: on PVM hosts it
/// hides even SSE3 and XSAVE, although XCR0 and the hardware support AVX-512.
fn add_host_user_isa(cpuid: &mut CpuId, supported_xcr0: u64) {
    let max_leaf = std::arch::x86_64::__cpuid(0).eax;
    let max_extended = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    for entry in cpuid.as_mut_slice() {
        let available = if entry.function >= 0x8000_0000 {
            max_extended
        } else {
            max_leaf
        };
        if entry.function > available {
            continue;
        }
        let raw = std::arch::x86_64::__cpuid_count(entry.function, entry.index);
        let mut host = kvm_bindings::kvm_cpuid_entry2 {
            eax: raw.eax,
            ebx: raw.ebx,
            ecx: raw.ecx,
            edx: raw.edx,
            ..Default::default()
        };
        for &(function, index, reg, bits, state) in USER_ISA {
            if entry.function == function && entry.index == index && supported_xcr0 & state == state
            {
                let host_bits = *register(&mut host, reg) & bits;
                *register(entry, reg) |= host_bits;
            }
        }
    }
}

impl CpuTemplate {
    /// Derives the guest CPU from what KVM supports on this host, plus the
    /// user-mode ISA extensions of the host CPU, with the vector state enabled
    /// in XCR0 that the guest's CPUID announces.
    pub fn from_supported(mut cpuid: CpuId) -> Result<Self, VcpuError> {
        let xsave = find(&cpuid, 0xd, 0).copied().unwrap_or_default();
        let supported = xsave.eax as u64 | (xsave.edx as u64) << 32;
        add_host_user_isa(&mut cpuid, supported);
        let leaf7 = find(&cpuid, 7, 0).copied().unwrap_or_default();
        let leaf1 = find(&cpuid, 1, 0).copied().unwrap_or_default();
        if leaf1.ecx & (1 << 26) == 0 || leaf1.ecx & (1 << 28) == 0 {
            return Err(VcpuError::MissingFeature {
                feature: "XSAVE and AVX",
            });
        }
        if leaf7.ebx & (1 << 5) == 0 {
            return Err(VcpuError::MissingFeature { feature: "AVX2" });
        }
        let mut xcr0 = supported & (xcr0::X87 | xcr0::SSE | xcr0::AVX);
        if xcr0 != xcr0::X87 | xcr0::SSE | xcr0::AVX {
            return Err(VcpuError::MissingFeature {
                feature: "x87/SSE/AVX state in XCR0",
            });
        }
        let avx512 = leaf7.ebx & (1 << 16) != 0 && supported & xcr0::AVX512 == xcr0::AVX512;
        if avx512 {
            xcr0 |= xcr0::AVX512;
        }
        let huge_pages = find(&cpuid, 0x8000_0001, 0).is_some_and(|e| e.edx & (1 << 26) != 0);
        Ok(CpuTemplate {
            cpuid,
            xcr0,
            huge_pages,
            avx512,
        })
    }

    /// The CPUID of vCPU `index`: the template with its APIC ID filled in.
    fn cpuid_for(&self, index: u32, vcpus: u32) -> CpuId {
        let mut cpuid = self.cpuid.clone();
        set_vcpu_identity(&mut cpuid, index, vcpus);
        cpuid
    }
}

/// Fills in vCPU `index`'s APIC ID (of `vcpus`) and the hypervisor bit.
pub fn set_vcpu_identity(cpuid: &mut CpuId, index: u32, vcpus: u32) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x0000_ffff) | (index << 24) | (vcpus.min(255) << 16);
                entry.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => entry.edx = index,
            0x8000_001e => entry.eax = index,
            _ => {}
        }
    }
}

/// Where vCPU `index` starts.
#[derive(Debug, Clone, Copy)]
pub struct EntryState {
    pub index: u32,
    pub vcpus: u32,
    pub entry: u64,
    pub rsp: u64,
    pub boot_info: u64,
    pub pml4: u64,
}

fn user_segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 }, // execute/read or read/write, accessed
        present: 1,
        dpl: 3,
        db: if code { 0 } else { 1 },
        s: 1,
        l: if code { 1 } else { 0 },
        g: 1,
        ..Default::default()
    }
}

/// Puts `vcpu` in the CPL3 long-mode entry state.
pub fn configure(
    vcpu: &VcpuFd,
    template: &CpuTemplate,
    state: &EntryState,
) -> Result<(), VcpuError> {
    let index = state.index;
    let setup = |what| {
        move |source| VcpuError::Setup {
            index,
            what,
            source,
        }
    };

    vcpu.set_cpuid2(&template.cpuid_for(index, state.vcpus))
        .map_err(setup("set CPUID"))?;

    let mut sregs = vcpu.get_sregs().map_err(setup("read special registers"))?;
    sregs.cs = user_segment(selectors::USER_CS, true);
    let data = user_segment(selectors::USER_DS, false);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: TSS_LIMIT,
        selector: selectors::TSS,
        type_: 0xb, // busy 64-bit TSS, as after LTR
        present: 1,
        s: 0,
        ..Default::default()
    };
    sregs.ldt = kvm_segment {
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT_ENTRIES * 8 - 1) as u16;
    // An empty IDT: any exception becomes a triple fault (KVM_EXIT_SHUTDOWN).
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cr0 = cr0::PE | cr0::MP | cr0::ET | cr0::NE | cr0::WP | cr0::PG;
    sregs.cr3 = state.pml4;
    sregs.cr4 = cr4::PAE | cr4::OSFXSR | cr4::OSXMMEXCPT | cr4::OSXSAVE;
    sregs.efer = efer::LME | efer::LMA;
    vcpu.set_sregs(&sregs)
        .map_err(setup("set special registers (long mode at CPL3)"))?;

    let mut xcrs = kvm_xcrs {
        nr_xcrs: 1,
        ..Default::default()
    };
    xcrs.xcrs[0].xcr = 0;
    xcrs.xcrs[0].value = template.xcr0;
    vcpu.set_xcrs(&xcrs).map_err(|source| VcpuError::Xcr0 {
        index,
        xcr0: template.xcr0,
        source,
    })?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(setup("set the FPU state"))?;

    let regs = kvm_regs {
        rip: state.entry,
        rsp: state.rsp,
        rdi: state.boot_info,
        rsi: index as u64,
        rflags: 0x2, // reserved bit 1; IF, DF and IOPL clear
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(setup("set general registers"))?;
    Ok(())
}
