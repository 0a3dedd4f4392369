//! The ACPI tables built for Linux guests, judged by ACPICA's own
//! disassembler (`iasl -d`, from tests/setup-acpica.sh, which tests/run.sh
//! runs): each table must disassemble without checksum or length complaints
//! and say what the VMM means (a local APIC per vCPU, the ECAM base, the
//! PCI Express host bridge and its windows); ACPICA's interpreter
//! (`acpiexec`, same package) must load the DSDT and evaluate the host
//! bridge's _HID, _CRS and _BBN.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use aivmm::linux::acpi::{self, AcpiTables};
use aivmm::linux::pci::{ECAM_BASE, MMIO32_WINDOW, MMIO64_WINDOW};

/// The iasl to use: AIVMM_IASL, else the one on the PATH. Missing: a skip
/// with the reason, or a failure under CI.
fn iasl(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("AIVMM_IASL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("iasl"));
    if Command::new(&path).arg("-v").output().is_ok() {
        return Some(path);
    }
    if common::in_ci() {
        panic!("{test}: iasl is missing and CI is set: run tests/setup-acpica.sh");
    }
    eprintln!("{test}: SKIPPED: iasl is missing (tests/setup-acpica.sh installs it)");
    None
}

/// Disassembles each table; returns (signature, disassembly).
fn disassemble(iasl: &Path, tables: &AcpiTables, dir: &Path) -> Vec<(String, String)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut out = Vec::new();
    for (signature, _, _) in &tables.tables {
        let name = String::from_utf8_lossy(signature).to_lowercase();
        let dat = dir.join(format!("{name}.dat"));
        std::fs::write(&dat, tables.table(signature).unwrap()).unwrap();
        let run = Command::new(iasl)
            .current_dir(dir)
            .arg("-d")
            .arg(&dat)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(run.status.success(), "iasl -d {name}.dat failed:\n{log}");
        let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl")))
            .unwrap_or_else(|e| panic!("no {name}.dsl ({e}); iasl said:\n{log}"));
        for complaint in ["Incorrect checksum", "Invalid", "Error", "**** Unknown"] {
            assert!(
                !dsl.contains(complaint) && !log.contains(complaint),
                "{name}: iasl reports {complaint:?}:\n{log}\n{dsl}"
            );
        }
        out.push((String::from_utf8_lossy(signature).to_string(), dsl));
    }
    out
}

fn dsl<'a>(tables: &'a [(String, String)], signature: &str) -> &'a str {
    &tables
        .iter()
        .find(|(s, _)| s == signature)
        .unwrap_or_else(|| panic!("no {signature}"))
        .1
}

#[test]
fn iasl_reads_what_the_tables_say() {
    let test = "iasl_reads_what_the_tables_say";
    let Some(iasl) = iasl(test) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("aivmm-acpi-{}", std::process::id()));
    let vcpus = 3;
    let tables = disassemble(&iasl, &acpi::build(vcpus, 2).unwrap(), &dir);

    let madt = dsl(&tables, "APIC");
    assert_eq!(
        madt.matches("[Processor Local APIC]").count(),
        vcpus as usize,
        "{madt}"
    );
    assert_eq!(madt.matches("[I/O APIC]").count(), 1, "{madt}");
    assert!(madt.contains("Address : FEC00000"), "{madt}");
    assert!(madt.contains("[Interrupt Source Override]"), "{madt}");
    assert!(
        madt.contains("Interrupt : 00000002"),
        "IRQ0 -> GSI 2: {madt}"
    );
    assert!(madt.contains("[Local APIC NMI]"), "{madt}");

    let mcfg = dsl(&tables, "MCFG");
    assert!(
        mcfg.contains(&format!("Base Address : {ECAM_BASE:016X}")),
        "{mcfg}"
    );
    assert!(mcfg.contains("End Bus Number : 00"), "{mcfg}");

    let fadt = dsl(&tables, "FACP");
    assert!(
        fadt.contains("Hardware Reduced (V5) : 1"),
        "hardware-reduced: {fadt}"
    );

    let dsdt = dsl(&tables, "DSDT");
    for expected in [
        "Device (PCI0)",
        "Name (_HID, EisaId (\"PNP0A08\")",
        "Name (_CID, EisaId (\"PNP0A03\")",
        "WordBusNumber",
    ] {
        assert!(dsdt.contains(expected), "{expected:?} in:\n{dsdt}");
    }
    // The two disks: virtio-mmio devices with their window and IRQ.
    assert_eq!(
        dsdt.matches("Name (_HID, \"LNRO0005\")").count(),
        2,
        "{dsdt}"
    );
    for index in 0..2 {
        let (addr, irq) = aivmm::linux::disk::placement(index).unwrap();
        assert!(
            dsdt.contains(&format!("0x{addr:08X}")),
            "{addr:#x} in:\n{dsdt}"
        );
        assert!(
            dsdt.contains(&format!("0x{irq:08X},")),
            "IRQ {irq} in:\n{dsdt}"
        );
    }
    // The BAR windows, by their first and last addresses.
    for (start, end) in [MMIO32_WINDOW, MMIO64_WINDOW] {
        for bound in [start, end - 1] {
            let hex = if bound > u64::from(u32::MAX) {
                format!("0x{bound:016X}")
            } else {
                format!("0x{bound:08X}")
            };
            assert!(dsdt.contains(&hex), "{hex} in:\n{dsdt}");
        }
    }

    // ACPICA's interpreter (the one Linux runs) loads the DSDT with the
    // other tables and evaluates the host bridge's objects.
    let acpiexec = iasl.with_file_name("acpiexec");
    let acpiexec = if acpiexec.exists() {
        acpiexec
    } else {
        PathBuf::from("acpiexec")
    };
    let mut command = Command::new(&acpiexec);
    command
        .current_dir(&dir)
        .arg("-b")
        .arg("evaluate \\_SB.PCI0._HID; evaluate \\_SB.PCI0._CRS; evaluate \\_SB.PCI0._BBN");
    for name in ["dsdt", "facp", "apic", "mcfg"] {
        command.arg(format!("{name}.dat"));
    }
    let run = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (acpica-tools): {e}", acpiexec.display()));
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{out}");
    for expected in [
        "1 ACPI AML tables successfully acquired and loaded",
        // EisaId("PNP0A08") as ACPICA encodes it.
        "[Integer] = 00000000080AD041",
        "Evaluation of \\_SB.PCI0._CRS returned object",
        "No outstanding allocations",
    ] {
        assert!(out.contains(expected), "{expected:?} in:\n{out}");
    }
    assert!(!out.contains("Error") && !out.contains("AE_"), "{out}");

    if std::env::var_os("AIVMM_KEEP_ACPI").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("tables and disassembly kept in {}", dir.display());
    }
}
