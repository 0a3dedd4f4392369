//! Builds the inference kernel (guest/kernel) for the guest and hands its path
//! to the crate as AIVMM_KERNEL_ELF, which `include_bytes!` embeds in `aivmm`.
//!
//! The kernel is built by a nested cargo with its own target directory and its
//! own flags (always optimized, x86-64-v3, static, no startfiles): nothing of
//! the host build's RUSTFLAGS, profile or wrappers leaks into it.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
const GUEST_RUSTFLAGS: &[&str] = &[
    "-Ctarget-cpu=x86-64-v3",
    "-Crelocation-model=static",
    "-Ccode-model=small",
    "-Cforce-frame-pointers=yes",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir
        .parent()
        .expect("vmm/ lives in the workspace root");
    let kernel_dir = workspace.join("guest/kernel");
    for watched in [
        "guest/kernel/src",
        "guest/kernel/Cargo.toml",
        "guest/kernel/kernel.ld",
        "guest/kernel/build.rs",
        "guest/abi",
        "guest/engine/src",
        "guest/engine/Cargo.toml",
    ] {
        println!(
            "cargo:rerun-if-changed={}",
            workspace.join(watched).display()
        );
    }

    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target_dir = guest_target_dir(&out_dir);
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());

    let mut command = Command::new(cargo);
    command
        .current_dir(&kernel_dir)
        .args([
            "build",
            "--release",
            "--target",
            GUEST_TARGET,
            "--manifest-path",
        ])
        .arg(kernel_dir.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir);
    // Everything cargo told this build script about the host build stays out
    // of the nested build, except where to find cargo's home and the jobserver.
    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let keep = matches!(key, "CARGO_HOME" | "CARGO_MAKEFLAGS" | "CARGO_NET_OFFLINE");
        let host_build_setting = key.starts_with("CARGO_")
            || key.starts_with("RUSTC")
            || key.starts_with("RUSTDOC")
            || matches!(
                key,
                "RUSTFLAGS"
                    | "TARGET"
                    | "HOST"
                    | "PROFILE"
                    | "OPT_LEVEL"
                    | "DEBUG"
                    | "OUT_DIR"
                    | "NUM_JOBS"
            );
        if host_build_setting && !keep {
            command.env_remove(key);
        }
    }
    command.env("CARGO_ENCODED_RUSTFLAGS", GUEST_RUSTFLAGS.join("\x1f"));

    let status = command
        .status()
        .unwrap_or_else(|error| panic!("cannot run cargo to build the inference kernel: {error}"));
    if !status.success() {
        panic!("building the inference kernel (guest/kernel) failed: {status}; see the cargo output above");
    }
    let elf = target_dir
        .join(GUEST_TARGET)
        .join("release")
        .join("aivmm-kernel");
    if !elf.is_file() {
        panic!(
            "the inference kernel build succeeded but {} is missing",
            elf.display()
        );
    }
    println!("cargo:rustc-env=AIVMM_KERNEL_ELF={}", elf.display());
}

/// `<target-dir>/<profile>/guest-kernel`, found from OUT_DIR
/// (`<target-dir>/<profile>/build/aivmm-<hash>/out`), so that the kernel is
/// rebuilt incrementally rather than from scratch when the build script's hash
/// changes.
fn guest_target_dir(out_dir: &Path) -> PathBuf {
    out_dir
        .ancestors()
        .find(|dir| dir.file_name().is_some_and(|name| name == "build"))
        .and_then(Path::parent)
        .map(|profile_dir| profile_dir.join("guest-kernel"))
        .unwrap_or_else(|| out_dir.join("guest-kernel"))
}
