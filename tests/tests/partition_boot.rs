//! Boots real partitions with the embedded inference kernel on /dev/kvm.
//!
//! Without /dev/kvm every test prints why it is skipped, unless CI is set (to
//! anything but "false" or "0"): then a missing /dev/kvm is a failure.
//! The hugepage test must run as root (it sets /proc/sys/vm/nr_hugepages and
//! restores it).

mod common;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use aivmm::partition::{
    self, FaultKind, GuestRequests, PartitionConfig, PartitionError, PartitionOutcome,
};
use aivmm::vstate::memory::{MemoryError, RamBacking};
use aivmm_guest_abi::{debug, fatal, layout, report, selftest};

const TIMEOUT: Duration = Duration::from_secs(60);

fn run(config: PartitionConfig) -> PartitionOutcome {
    partition::run(config, TIMEOUT)
        .unwrap_or_else(|error| panic!("the partition did not start: {error}"))
}

fn config(vcpus: u32, requests: GuestRequests) -> PartitionConfig {
    PartitionConfig {
        vcpus,
        memory_bytes: 128 << 20,
        guest_requests: requests,
        ..PartitionConfig::default()
    }
}

fn expect_exit_0(outcome: &PartitionOutcome) {
    match &outcome.result {
        Ok(0) => {}
        other => panic!(
            "expected exit status 0, got {other:?}\nconsole:\n{}",
            outcome.console
        ),
    }
}

fn expect_fault(outcome: &PartitionOutcome) -> &partition::GuestFault {
    match &outcome.result {
        Err(PartitionError::GuestFault(fault)) => fault,
        other => panic!(
            "expected a guest fault, got {other:?}\nconsole:\n{}",
            outcome.console
        ),
    }
}

fn boots_and_exits(vcpus: u32) {
    let outcome = run(config(vcpus, GuestRequests::default()));
    expect_exit_0(&outcome);
    let banner = format!("aivmm inference kernel: {vcpus} vCPU(s)");
    assert!(
        outcome.console.contains(&banner),
        "console lacks {banner:?}:\n{}",
        outcome.console
    );
    let boot = outcome
        .timings
        .boot_complete
        .expect("the guest reported boot complete");
    assert!(boot >= outcome.timings.setup && boot <= outcome.timings.total);
    assert_eq!(outcome.vcpus.len(), vcpus as usize);
    assert!(outcome.vcpus[0].mmio_exits > 0);
    // The banner is one line: exactly one flush, however long it is.
    assert_eq!(outcome.console_flushes, 1, "console:\n{}", outcome.console);
    eprintln!(
        "{vcpus} vCPU(s): setup {:?}, boot complete {:?} after VM creation, total {:?}, MMIO exits {:?}",
        outcome.timings.setup,
        boot,
        outcome.timings.total,
        outcome.vcpus.iter().map(|v| v.mmio_exits).collect::<Vec<_>>()
    );
}

#[test]
fn boots_with_one_vcpu_prints_and_exits() {
    if common::kvm_available("boots_with_one_vcpu_prints_and_exits") {
        boots_and_exits(1);
    }
}

#[test]
fn boots_with_two_vcpus_prints_and_exits() {
    if common::kvm_available("boots_with_two_vcpus_prints_and_exits") {
        boots_and_exits(2);
    }
}

/// The host CPUs this process may run on (Cpus_allowed_list of /proc/self/status).
fn allowed_host_cpus() -> Vec<usize> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|line| line.strip_prefix("Cpus_allowed_list:"))
        .expect("/proc/self/status has Cpus_allowed_list")
        .trim();
    let cpus: Vec<usize> = list
        .split(',')
        .flat_map(|range| {
            let (first, last) = range.split_once('-').unwrap_or((range, range));
            first.parse().unwrap()..=last.parse().unwrap()
        })
        .collect();
    assert!(!cpus.is_empty());
    cpus
}

fn selftest_on(vcpus: u32) {
    // Not a multiple of any vector width, so the tails are exercised too.
    let elements = (1 << 20) + 13;
    let allowed = allowed_host_cpus();
    let outcome = run(PartitionConfig {
        // One vCPU thread per host CPU (wrapping around when there are fewer).
        host_cpus: Some(
            (0..vcpus as usize)
                .map(|vcpu| allowed[vcpu % allowed.len()])
                .collect(),
        ),
        ..config(
            vcpus,
            GuestRequests {
                selftest_elements: elements,
                ..GuestRequests::default()
            },
        )
    });
    expect_exit_0(&outcome);
    assert_eq!(
        outcome.report(report::SELFTEST_CHECKSUM),
        Some(selftest::reference(elements as u32))
    );
    let expected_simd = if std::arch::is_x86_feature_detected!("avx512f") {
        selftest::SIMD_AVX512
    } else {
        selftest::SIMD_AVX2
    };
    assert_eq!(
        outcome.report(report::SELFTEST_SIMD),
        Some(expected_simd),
        "console:\n{}",
        outcome.console
    );
    assert!(
        outcome.console.contains("selftest:"),
        "console:\n{}",
        outcome.console
    );
}

#[test]
fn selftest_checksum_with_simd_and_heap_on_one_vcpu() {
    if common::kvm_available("selftest_checksum_with_simd_and_heap_on_one_vcpu") {
        selftest_on(1);
    }
}

#[test]
fn selftest_checksum_split_across_two_vcpus() {
    if common::kvm_available("selftest_checksum_split_across_two_vcpus") {
        selftest_on(2);
    }
}

fn temporary_model(name: &str, bytes: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("aivmm-test-{name}-{}.gguf", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn the_model_window_is_readable_and_a_write_is_a_reported_fault() {
    if !common::kvm_available("the_model_window_is_readable_and_a_write_is_a_reported_fault") {
        return;
    }
    let mut bytes = b"GGUF\x03\0\0\0".to_vec();
    bytes.resize(10_000, 0x5a);
    let model = temporary_model("window", &bytes);

    let mut readable = config(1, GuestRequests::default());
    readable.model = Some(model.clone());
    let outcome = run(readable);
    expect_exit_0(&outcome);
    assert_eq!(
        outcome.report(report::MODEL_FIRST_BYTES),
        Some(u64::from_le_bytes(bytes[..8].try_into().unwrap()))
    );
    assert!(
        outcome.console.contains("model window 10000 bytes"),
        "console:\n{}",
        outcome.console
    );

    let mut writing = config(
        1,
        GuestRequests {
            debug_flags: debug::WRITE_MODEL_WINDOW,
            ..GuestRequests::default()
        },
    );
    writing.model = Some(model.clone());
    let outcome = run(writing);
    std::fs::remove_file(&model).unwrap();
    let fault = expect_fault(&outcome);
    assert_eq!(fault.vcpu, 0);
    assert_eq!(
        fault.kind,
        FaultKind::ModelWindowWrite {
            addr: layout::MODEL_WINDOW_ADDR
        }
    );
    let message = PartitionError::GuestFault(fault.clone()).to_string();
    assert!(message.contains("read-only model window"), "{message}");
    eprintln!("reported: {message}");
}

#[test]
fn a_faulting_worker_vcpu_is_reported_with_its_rip() {
    if !common::kvm_available("a_faulting_worker_vcpu_is_reported_with_its_rip") {
        return;
    }
    let outcome = run(config(
        2,
        GuestRequests {
            debug_flags: debug::FAULT_NOW,
            debug_vcpu: 1,
            ..GuestRequests::default()
        },
    ));
    let fault = expect_fault(&outcome);
    let message = PartitionError::GuestFault(fault.clone()).to_string();
    eprintln!("reported: {message}");
    assert_eq!(fault.vcpu, 1, "{message}");
    assert_eq!(fault.kind, FaultKind::TripleFault, "{message}");
    let registers = fault.registers.expect("registers of the faulting vCPU");
    assert!(
        registers.rip >= layout::KERNEL_LOAD_ADDR
            && registers.rip < layout::KERNEL_LOAD_ADDR + (16 << 20)
    );
    assert_eq!(registers.cr2, debug::FAULT_ADDRESS, "{message}");
    let function = fault.function.as_deref().unwrap_or_default();
    assert!(function.contains("run_debug_requests"), "{message}");
    assert!(
        message.contains("vCPU 1") && message.contains("RIP 0x"),
        "{message}"
    );
}

#[test]
fn a_guest_panic_is_reported_as_a_fatal_error_with_its_message() {
    if !common::kvm_available("a_guest_panic_is_reported_as_a_fatal_error_with_its_message") {
        return;
    }
    let outcome = run(config(
        1,
        GuestRequests {
            debug_flags: debug::PANIC,
            ..GuestRequests::default()
        },
    ));
    match &outcome.result {
        Err(PartitionError::GuestFatal {
            vcpu: 0,
            code: fatal::PANIC,
            message,
        }) => {
            assert!(
                message.contains("deliberate panic requested by the boot info"),
                "{message}"
            );
            assert!(
                message.contains("main.rs"),
                "the panic location is part of the message: {message}"
            );
        }
        other => panic!("expected a guest panic report, got {other:?}"),
    }
    // What the guest printed before panicking was flushed.
    assert!(
        outcome.console.contains("aivmm inference kernel"),
        "console:\n{}",
        outcome.console
    );
}

#[test]
fn a_stuck_partition_is_stopped_at_the_timeout_with_every_vcpu_joined() {
    if !common::kvm_available("a_stuck_partition_is_stopped_at_the_timeout_with_every_vcpu_joined")
    {
        return;
    }
    // vCPU 0 spins in guest code; vCPU 1 is an idle worker (spinning, then parked).
    let running = partition::start(config(
        2,
        GuestRequests {
            debug_flags: debug::HANG,
            ..GuestRequests::default()
        },
    ))
    .expect("the partition starts");
    assert!(running.wait_boot_complete(TIMEOUT).is_some());
    let outcome = running.wait_timeout(Duration::from_millis(300));
    match &outcome.result {
        Err(PartitionError::Timeout { vcpus, .. }) => {
            assert_eq!(vcpus.len(), 2);
            let message = outcome.result.as_ref().unwrap_err().to_string();
            eprintln!("reported: {message}");
            assert!(
                vcpus[0]
                    .function
                    .as_deref()
                    .unwrap_or_default()
                    .contains("run_debug_requests"),
                "{message}"
            );
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert!(
        outcome.timings.total < Duration::from_secs(10),
        "stopping took {:?}",
        outcome.timings.total
    );
}

/// Hugepage tests change a machine-wide setting: one at a time.
static HUGEPAGES: Mutex<()> = Mutex::new(());
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

/// Sets nr_hugepages and puts the old value back when dropped.
struct HugepageReservation {
    old: u64,
}

impl HugepageReservation {
    fn set(pages: u64) -> std::io::Result<Self> {
        let old = std::fs::read_to_string(NR_HUGEPAGES)?
            .trim()
            .parse()
            .map_err(std::io::Error::other)?;
        std::fs::write(NR_HUGEPAGES, pages.to_string())?;
        Ok(HugepageReservation { old })
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        if let Err(error) = std::fs::write(NR_HUGEPAGES, self.old.to_string()) {
            eprintln!("could not restore {NR_HUGEPAGES} to {}: {error}", self.old);
        }
    }
}

fn free_hugepages() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn hugepage_backed_memory_boots_and_a_shortage_is_a_clear_error() {
    if !common::kvm_available("hugepage_backed_memory_boots_and_a_shortage_is_a_clear_error") {
        return;
    }
    let _one_at_a_time = HUGEPAGES
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    let memory_bytes: u64 = 64 << 20;
    let needed = memory_bytes >> 21;
    let current: u64 = std::fs::read_to_string(NR_HUGEPAGES)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let reservation = match HugepageReservation::set(current + needed) {
        Ok(reservation) => reservation,
        Err(error) if !common::in_ci() => {
            eprintln!("hugepage test: SKIPPED: cannot write {NR_HUGEPAGES} ({error}); run as root");
            return;
        }
        Err(error) => {
            panic!("hugepage test: cannot write {NR_HUGEPAGES} ({error}); CI must run it as root")
        }
    };
    assert!(
        free_hugepages() >= needed,
        "the kernel could not reserve {needed} hugepages (memory too fragmented?)"
    );

    let hugepages = |requests| PartitionConfig {
        memory_bytes,
        backing: RamBacking::Hugepages,
        guest_requests: requests,
        ..PartitionConfig::default()
    };
    let outcome = run(hugepages(GuestRequests {
        selftest_elements: 100_000,
        ..GuestRequests::default()
    }));
    expect_exit_0(&outcome);
    assert_eq!(
        outcome.report(report::SELFTEST_CHECKSUM),
        Some(selftest::reference(100_000))
    );

    // Back to the old reservation (typically 0): now there are too few.
    drop(reservation);
    if free_hugepages() < needed {
        match partition::start(hugepages(GuestRequests::default())) {
            Err(PartitionError::Memory(error @ MemoryError::HugepagesShort { .. })) => {
                let message = error.to_string();
                assert!(message.contains("/proc/sys/vm/nr_hugepages"), "{message}");
                eprintln!("reported: {message}");
            }
            Err(other) => panic!("expected a hugepage shortage error, got: {other}"),
            Ok(_) => panic!(
                "a hugepage partition started with only {} free hugepages",
                free_hugepages()
            ),
        }
    }
}

/// Start-up and exit costs on this machine (printed; the assertions only
/// check that the numbers are sane).
#[test]
fn measures_boot_time_exit_cost_and_first_touch() {
    if !common::kvm_available("measures_boot_time_exit_cost_and_first_touch") {
        return;
    }
    let touch_bytes = 64 << 20;
    let outcome = run(PartitionConfig {
        memory_bytes: 256 << 20,
        guest_requests: GuestRequests {
            bench_mmio_exits: 2000,
            bench_touch_bytes: touch_bytes,
            ..GuestRequests::default()
        },
        ..PartitionConfig::default()
    });
    expect_exit_0(&outcome);
    let ticks = |key| {
        outcome
            .report(key)
            .unwrap_or_else(|| panic!("no report {key}:\n{}", outcome.console))
    };
    let exit = outcome.ticks_to_duration(ticks(report::MMIO_EXIT_TSC));
    let ioeventfd = outcome.ticks_to_duration(ticks(report::IOEVENTFD_EXIT_TSC));
    let first = outcome.ticks_to_duration(ticks(report::FIRST_TOUCH_TSC_PER_PAGE));
    let second = outcome.ticks_to_duration(ticks(report::SECOND_TOUCH_TSC_PER_PAGE));
    let boot = outcome.timings.boot_complete.unwrap();
    let guest_boot = outcome.ticks_to_duration(ticks(report::BOOT_TSC));
    eprintln!(
        "MEASURED: VM creation -> boot complete {boot:?} (VMM setup {:?}, guest entry -> boot complete {guest_boot:?}); \
         MMIO exit round trip {exit:?} (ioeventfd write {ioeventfd:?}); first touch {first:?}/4 KiB page, second touch {second:?}/page \
         ({} MiB touched); MMIO exits: {}",
        outcome.timings.setup,
        touch_bytes >> 20,
        outcome.total_mmio_exits()
    );
    assert!(exit > Duration::ZERO && exit < Duration::from_millis(10));
    assert!(first >= second);
    // The PING writes reached the VMM; the PING_IOEVENTFD writes did not.
    assert!(outcome.total_mmio_exits() >= 2000 && outcome.total_mmio_exits() < 4000);
}
