//! The guest's memory plan and the system structures the VMM writes before
//! the first KVM_RUN: GDT, TSS, empty IDT, identity page tables, boot info.
//! The guest never changes any of them (it runs at CPL3 and cannot).

use std::mem::offset_of;

use aivmm_guest_abi::layout::*;
use aivmm_guest_abi::{BootInfo, MAX_VCPUS};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError, GuestMemoryMmap};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("a partition has 1 to {max} vCPUs, not {vcpus}")]
    VcpuCount { vcpus: u32, max: u32 },
    #[error("the kernel image ends at {kernel_end:#x}, past the {ram_size}-byte guest RAM")]
    KernelTooLarge { kernel_end: u64, ram_size: u64 },
    #[error(
        "guest memory of {ram_size} bytes leaves {heap} bytes of heap after the kernel and {vcpus} stacks of \
         {stack_size} bytes; at least {min_heap} are needed (give the partition more memory)"
    )]
    RamTooSmall {
        ram_size: u64,
        heap: u64,
        vcpus: u32,
        stack_size: u64,
        min_heap: u64,
    },
    #[error("the page tables for this memory map do not fit in {limit} bytes")]
    PageTablesFull { limit: u64 },
    #[error("cannot write {what} into guest memory: {source}")]
    GuestMemory {
        what: &'static str,
        source: GuestMemoryError,
    },
}

/// The smallest heap a partition may start with.
pub const MIN_HEAP: u64 = 2 << 20;

/// Segment selectors, as in Linux (the layout PVM also expects).
pub mod selectors {
    pub const KERNEL_CS: u16 = 0x10;
    pub const KERNEL_DS: u16 = 0x18;
    pub const USER_DS: u16 = 0x2b;
    pub const USER_CS: u16 = 0x33;
    pub const TSS: u16 = 0x40;
}

/// Bytes of the TSS (no I/O permission bitmap).
pub const TSS_LIMIT: u32 = 0x67;
/// Number of GDT slots written (the TSS descriptor takes slots 8 and 9).
pub const GDT_ENTRIES: usize = 10;

/// Where everything goes in guest RAM for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryPlan {
    pub ram_size: u64,
    pub vcpus: u32,
    pub kernel_end: u64,
    pub heap_start: u64,
    pub heap_end: u64,
    pub stack_size: u64,
    pub stacks_start: u64,
}

impl MemoryPlan {
    /// Kernel image at [`KERNEL_LOAD_ADDR`], then the heap, then one stack per
    /// vCPU at the top of RAM, each with an unmapped guard page below it.
    pub fn new(
        ram_size: u64,
        kernel_end: u64,
        vcpus: u32,
        stack_size: u64,
    ) -> Result<Self, LayoutError> {
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(LayoutError::VcpuCount {
                vcpus,
                max: MAX_VCPUS,
            });
        }
        if kernel_end > ram_size {
            return Err(LayoutError::KernelTooLarge {
                kernel_end,
                ram_size,
            });
        }
        let stack_size = stack_size.max(PAGE_SIZE).next_multiple_of(PAGE_SIZE);
        let stacks_bytes = vcpus as u64 * (stack_size + PAGE_SIZE);
        let heap_start = kernel_end.next_multiple_of(PAGE_SIZE);
        let stacks_start = ram_size.saturating_sub(stacks_bytes);
        let heap = stacks_start.saturating_sub(heap_start);
        if heap < MIN_HEAP {
            return Err(LayoutError::RamTooSmall {
                ram_size,
                heap,
                vcpus,
                stack_size,
                min_heap: MIN_HEAP,
            });
        }
        Ok(MemoryPlan {
            ram_size,
            vcpus,
            kernel_end,
            heap_start,
            heap_end: stacks_start,
            stack_size,
            stacks_start,
        })
    }

    /// One past the highest byte of vCPU `index`'s stack.
    pub fn stack_top(&self, index: u32) -> u64 {
        self.ram_size - index as u64 * (self.stack_size + PAGE_SIZE)
    }

    /// The initial RSP of vCPU `index`: as if its entry point had been called
    /// (RSP + 8 is 16-byte aligned, as the System V ABI requires on entry).
    pub fn initial_rsp(&self, index: u32) -> u64 {
        self.stack_top(index) - 8
    }
}

/// Writes the GDT (Linux layout), the 64-bit TSS and the empty IDT's page.
pub fn write_descriptor_tables(memory: &GuestMemoryMmap) -> Result<(), LayoutError> {
    let tss_low = tss_descriptor_low(TSS_ADDR, TSS_LIMIT);
    let tss_high = TSS_ADDR >> 32;
    let gdt: [u64; GDT_ENTRIES] = [
        0,                     // 0x00 null
        0x00cf_9b00_0000_ffff, // 0x08 kernel code, 32-bit
        0x00af_9b00_0000_ffff, // 0x10 kernel code, 64-bit
        0x00cf_9300_0000_ffff, // 0x18 kernel data
        0x00cf_fb00_0000_ffff, // 0x23 user code, 32-bit
        0x00cf_f300_0000_ffff, // 0x2b user data
        0x00af_fb00_0000_ffff, // 0x33 user code, 64-bit
        0,                     // 0x38 unused
        tss_low,               // 0x40 TSS (16-byte system descriptor)
        tss_high,
    ];
    let write = |what, addr: u64, bytes: &[u8]| {
        memory
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| LayoutError::GuestMemory { what, source })
    };
    let gdt_bytes: Vec<u8> = gdt.iter().flat_map(|entry| entry.to_le_bytes()).collect();
    write("the GDT", GDT_ADDR, &gdt_bytes)?;
    // A 64-bit TSS: stack pointers unused (no interrupts are ever delivered),
    // I/O map base past the limit, so no port I/O is permitted at CPL3.
    let mut tss = [0u8; 104];
    tss[102..104].copy_from_slice(&104u16.to_le_bytes());
    write("the TSS", TSS_ADDR, &tss)?;
    write("the IDT", IDT_ADDR, &[0u8; PAGE_SIZE as usize])?;
    Ok(())
}

/// Low half of a 64-bit available-TSS descriptor (type 9, present, DPL 0).
fn tss_descriptor_low(base: u64, limit: u32) -> u64 {
    let limit = limit as u64;
    (limit & 0xffff)
        | (base & 0xff_ffff) << 16
        | 0x89 << 40 // present, type 9 (available 64-bit TSS)
        | ((limit >> 16) & 0xf) << 48
        | ((base >> 24) & 0xff) << 56
}

/// Page-table entry bits.
mod pte {
    pub const PRESENT: u64 = 1 << 0;
    pub const WRITABLE: u64 = 1 << 1;
    pub const USER: u64 = 1 << 2;
    pub const WRITE_THROUGH: u64 = 1 << 3;
    pub const CACHE_DISABLE: u64 = 1 << 4;
    pub const LARGE: u64 = 1 << 7;
    pub const ADDRESS: u64 = 0x000f_ffff_ffff_f000;
}

/// A guest range and how the guest may use it.
#[derive(Debug, Clone, Copy)]
struct Mapping {
    start: u64,
    end: u64,
    flags: u64,
}

/// The identity map of everything the guest may touch, nothing else: the
/// first page (null), the page tables themselves and the stack guard pages
/// stay unmapped, so touching them is a page fault (a reported triple fault).
/// Returns the guest-physical address of the PML4 (for CR3).
pub fn write_page_tables(
    memory: &GuestMemoryMmap,
    plan: &MemoryPlan,
    model_window_len: u64,
    huge_pages: bool,
) -> Result<u64, LayoutError> {
    use pte::*;
    let user_rw = PRESENT | WRITABLE | USER;
    let mut mappings = vec![
        Mapping {
            start: GDT_ADDR,
            end: IDT_ADDR + PAGE_SIZE,
            flags: PRESENT | WRITABLE,
        },
        Mapping {
            start: BOOT_INFO_ADDR,
            end: BOOT_INFO_ADDR + PAGE_SIZE,
            flags: PRESENT | USER,
        },
        Mapping {
            start: KERNEL_LOAD_ADDR,
            end: plan.heap_end,
            flags: user_rw,
        },
        Mapping {
            start: MMIO_BASE,
            end: MMIO_BASE + MMIO_SIZE,
            flags: user_rw | WRITE_THROUGH | CACHE_DISABLE,
        },
    ];
    for vcpu in 0..plan.vcpus {
        let top = plan.stack_top(vcpu);
        mappings.push(Mapping {
            start: top - plan.stack_size,
            end: top,
            flags: user_rw,
        });
    }
    if model_window_len > 0 {
        // Writable in the page tables on purpose: a store reaches KVM, which
        // finds the memslot read-only and exits with an MMIO write the VMM
        // reports as a guest fault naming the address.
        mappings.push(Mapping {
            start: MODEL_WINDOW_ADDR,
            end: MODEL_WINDOW_ADDR + model_window_len,
            flags: user_rw,
        });
    }

    // Built in host memory, then written to the guest in one copy.
    let mut tables = PageTables { tables: Vec::new() };
    let pml4 = tables.allocate()?;
    for mapping in mappings {
        let mut addr = mapping.start;
        while addr < mapping.end {
            let size = [HUGE_PAGE_SIZE, LARGE_PAGE_SIZE, PAGE_SIZE]
                .into_iter()
                .filter(|&size| size != HUGE_PAGE_SIZE || huge_pages)
                .find(|&size| addr % size == 0 && addr + size <= mapping.end)
                .unwrap_or(PAGE_SIZE);
            tables.map(pml4, addr, size, mapping.flags)?;
            addr += size;
        }
    }
    let bytes: Vec<u8> = tables
        .tables
        .iter()
        .flatten()
        .flat_map(|entry| entry.to_le_bytes())
        .collect();
    memory
        .write_slice(&bytes, GuestAddress(PAGE_TABLES_ADDR))
        .map_err(|source| LayoutError::GuestMemory {
            what: "the page tables",
            source,
        })?;
    Ok(pml4)
}

/// Page tables under construction: table i will live at
/// `PAGE_TABLES_ADDR + i * PAGE_SIZE` in the guest.
struct PageTables {
    tables: Vec<[u64; 512]>,
}

impl PageTables {
    /// A new empty table; returns its guest-physical address.
    fn allocate(&mut self) -> Result<u64, LayoutError> {
        let addr = PAGE_TABLES_ADDR + self.tables.len() as u64 * PAGE_SIZE;
        if addr + PAGE_SIZE > PAGE_TABLES_END {
            return Err(LayoutError::PageTablesFull {
                limit: PAGE_TABLES_END - PAGE_TABLES_ADDR,
            });
        }
        self.tables.push([0; 512]);
        Ok(addr)
    }

    fn entry(&mut self, table: u64, index: u64) -> &mut u64 {
        &mut self.tables[((table - PAGE_TABLES_ADDR) / PAGE_SIZE) as usize][index as usize]
    }

    /// Maps one page of `size` at `addr` (identity), creating tables on the way.
    fn map(&mut self, pml4: u64, addr: u64, size: u64, flags: u64) -> Result<(), LayoutError> {
        use pte::*;
        let leaf_level = match size {
            HUGE_PAGE_SIZE => 2,
            LARGE_PAGE_SIZE => 1,
            _ => 0,
        };
        let mut table = pml4;
        for level in (leaf_level + 1..=3).rev() {
            let index = (addr >> (12 + 9 * level)) & 0x1ff;
            let entry = *self.entry(table, index);
            table = if entry & PRESENT != 0 {
                entry & ADDRESS
            } else {
                let next = self.allocate()?;
                *self.entry(table, index) = next | PRESENT | WRITABLE | USER;
                next
            };
        }
        let index = (addr >> (12 + 9 * leaf_level)) & 0x1ff;
        let large = if leaf_level > 0 { LARGE } else { 0 };
        *self.entry(table, index) = addr | flags | large;
        Ok(())
    }
}

/// Writes the boot info page, field by field at the offsets the guest uses.
pub fn write_boot_info(memory: &GuestMemoryMmap, info: &BootInfo) -> Result<(), LayoutError> {
    let base = BOOT_INFO_ADDR;
    let error = |source| LayoutError::GuestMemory {
        what: "the boot info",
        source,
    };
    let u64_fields = [
        (offset_of!(BootInfo, magic), info.magic),
        (offset_of!(BootInfo, ram_size), info.ram_size),
        (offset_of!(BootInfo, heap_start), info.heap_start),
        (offset_of!(BootInfo, heap_end), info.heap_end),
        (offset_of!(BootInfo, stack_size), info.stack_size),
        (offset_of!(BootInfo, stacks_start), info.stacks_start),
        (offset_of!(BootInfo, tsc_khz), info.tsc_khz),
        (offset_of!(BootInfo, platform_mmio), info.platform_mmio),
        (offset_of!(BootInfo, console_mmio), info.console_mmio),
        (offset_of!(BootInfo, model_addr), info.model_addr),
        (offset_of!(BootInfo, model_size), info.model_size),
        (offset_of!(BootInfo, debug_flags), info.debug_flags),
        (
            offset_of!(BootInfo, selftest_elements),
            info.selftest_elements,
        ),
        (
            offset_of!(BootInfo, bench_mmio_exits),
            info.bench_mmio_exits,
        ),
        (
            offset_of!(BootInfo, bench_touch_bytes),
            info.bench_touch_bytes,
        ),
        (offset_of!(BootInfo, inference_mmio), info.inference_mmio),
        (
            offset_of!(BootInfo, warmup_heap_bytes),
            info.warmup_heap_bytes,
        ),
    ];
    let u32_fields = [
        (offset_of!(BootInfo, abi_version), info.abi_version),
        (offset_of!(BootInfo, vcpu_count), info.vcpu_count),
        (offset_of!(BootInfo, debug_vcpu), info.debug_vcpu),
        (offset_of!(BootInfo, reserved0), info.reserved0),
        (offset_of!(BootInfo, n_ctx), info.n_ctx),
        (offset_of!(BootInfo, max_batch), info.max_batch),
    ];
    memory
        .write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(base))
        .map_err(error)?;
    for (offset, value) in u64_fields {
        memory
            .write_obj(value, GuestAddress(base + offset as u64))
            .map_err(error)?;
    }
    for (offset, value) in u32_fields {
        memory
            .write_obj(value, GuestAddress(base + offset as u64))
            .map_err(error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::{create_guest_ram, RamBacking};

    /// Walks the guest page tables like the MMU: the leaf entry for `addr`.
    fn translate(memory: &GuestMemoryMmap, pml4: u64, addr: u64) -> Option<u64> {
        let mut table = pml4;
        for level in (0..=3).rev() {
            let entry: u64 = memory
                .read_obj(GuestAddress(
                    table + ((addr >> (12 + 9 * level)) & 0x1ff) * 8,
                ))
                .unwrap();
            if entry & pte::PRESENT == 0 {
                return None;
            }
            if level == 0 || entry & pte::LARGE != 0 {
                let page = 1u64 << (12 + 9 * level);
                assert_eq!(
                    entry & pte::ADDRESS & !(page - 1),
                    addr & !(page - 1),
                    "identity map"
                );
                return Some(entry);
            }
            table = entry & pte::ADDRESS;
        }
        unreachable!()
    }

    #[test]
    fn plan_places_heap_between_kernel_and_stacks() {
        let plan = MemoryPlan::new(64 << 20, 0x123456, 2, 1 << 20).unwrap();
        assert_eq!(plan.heap_start, 0x124000);
        assert_eq!(plan.stack_top(0), 64 << 20);
        assert_eq!(plan.stack_top(1), (64 << 20) - (1 << 20) - PAGE_SIZE);
        assert_eq!(plan.heap_end, (64 << 20) - 2 * ((1 << 20) + PAGE_SIZE));
        assert_eq!(plan.initial_rsp(0) % 16, 8);
        assert!(matches!(
            MemoryPlan::new(4 << 20, 0x200000, 2, 1 << 20),
            Err(LayoutError::RamTooSmall { .. })
        ));
        assert!(matches!(
            MemoryPlan::new(64 << 20, 0x200000, 0, 1 << 20),
            Err(LayoutError::VcpuCount { .. })
        ));
    }

    #[test]
    fn page_tables_map_exactly_what_the_guest_may_touch() {
        for huge in [false, true] {
            let memory = create_guest_ram(64 << 20, RamBacking::Anonymous, None).unwrap();
            let plan = MemoryPlan::new(64 << 20, 0x180000, 2, 1 << 20).unwrap();
            let pml4 = write_page_tables(&memory, &plan, 3 << 30, huge).unwrap();
            let user_rw = pte::PRESENT | pte::WRITABLE | pte::USER;

            assert_eq!(translate(&memory, pml4, 0x8), None, "null page");
            assert_eq!(
                translate(&memory, pml4, PAGE_TABLES_ADDR),
                None,
                "page tables"
            );
            let gdt = translate(&memory, pml4, GDT_ADDR).unwrap();
            assert_eq!(gdt & pte::USER, 0, "system structures are supervisor-only");
            let boot_info = translate(&memory, pml4, BOOT_INFO_ADDR).unwrap();
            assert_eq!(
                boot_info & (pte::USER | pte::WRITABLE),
                pte::USER,
                "boot info is read-only"
            );
            assert_eq!(
                translate(&memory, pml4, KERNEL_LOAD_ADDR).unwrap() & user_rw,
                user_rw
            );
            assert_eq!(
                translate(&memory, pml4, plan.heap_end - 1).unwrap() & user_rw,
                user_rw
            );
            for vcpu in 0..2 {
                let top = plan.stack_top(vcpu);
                assert!(translate(&memory, pml4, top - 8).is_some());
                assert!(translate(&memory, pml4, top - plan.stack_size).is_some());
                assert_eq!(
                    translate(&memory, pml4, top - plan.stack_size - 1),
                    None,
                    "guard page of vCPU {vcpu}"
                );
            }
            assert!(translate(&memory, pml4, MMIO_BASE).unwrap() & pte::CACHE_DISABLE != 0);
            assert_eq!(translate(&memory, pml4, MMIO_BASE + MMIO_SIZE), None);
            let window_last = MODEL_WINDOW_ADDR + (3 << 30) - 1;
            assert!(translate(&memory, pml4, window_last).is_some());
            assert_eq!(translate(&memory, pml4, window_last + 1), None);
            let window = translate(&memory, pml4, MODEL_WINDOW_ADDR).unwrap();
            assert!(
                window & pte::LARGE != 0,
                "the model window uses large pages"
            );
            assert_eq!(
                translate(&memory, pml4, 64 << 20),
                None,
                "past the end of RAM"
            );
        }
    }

    #[test]
    fn tss_descriptor_encodes_base_and_limit() {
        let low = tss_descriptor_low(0x1234_5678, 0x67);
        assert_eq!(low & 0xffff, 0x67);
        assert_eq!((low >> 16) & 0xff_ffff, 0x34_5678);
        assert_eq!((low >> 56) & 0xff, 0x12);
        assert_eq!((low >> 40) & 0xff, 0x89);
    }
}
