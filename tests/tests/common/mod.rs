//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod host;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn fixtures() -> PathBuf {
    repo_root().join("tests/fixtures")
}

/// The real Gemma 3 270M model, fetched (and cached) the way the README does.
pub fn default_model() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("AIVMM_DEFAULT_MODEL") {
            return PathBuf::from(p);
        }
        let out = Command::new(repo_root().join("images/fetch-model.sh"))
            .output()
            .expect("cannot run images/fetch-model.sh");
        assert!(
            out.status.success(),
            "images/fetch-model.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    })
    .clone()
}

/// A tiny deterministic generator for tests (no dependency needed).
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        TestRng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|value| !matches!(value.as_str(), "" | "false" | "0"))
}

/// Whether KVM tests can run here: without /dev/kvm they skip with a printed
/// reason, except under CI (CI set), where that is a failure.
pub fn kvm_available(test: &str) -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    if in_ci() {
        panic!("{test}: /dev/kvm is missing, and CI is set: partition tests must run in CI");
    }
    eprintln!("{test}: SKIPPED: /dev/kvm is missing (set CI=true to make this a failure)");
    false
}

/// Runs `f` with a one-thread greedy host engine on `model_path`: the
/// reference the partition tests compare the guest's tokens with.
pub fn with_greedy_host_engine<R>(
    model_path: &Path,
    n_ctx: usize,
    max_tokens: usize,
    ignore_eos: bool,
    f: impl FnOnce(&mut aivmm::host_engine::HostEngine) -> R,
) -> R {
    let mapped = aivmm::host_engine::MappedModel::open(model_path).unwrap();
    let gguf = mapped.parse().unwrap();
    let model = mapped.load(&gguf).unwrap();
    let mut engine = aivmm::host_engine::HostEngine::new(
        model,
        aivmm::host_engine::HostOptions {
            threads: 1,
            n_ctx,
            max_batch: 32,
            max_tokens,
            sampling: aivmm_engine::sampling::SamplerConfig::greedy(),
            ignore_eos,
            kernels: None,
        },
    )
    .unwrap();
    f(&mut engine)
}

/// Runs `images/<script> <args>`; its stdout, or why it failed.
pub fn run_image_script(script: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(repo_root().join("images").join(script))
        .args(args)
        .output()
        .map_err(|error| format!("cannot run images/{script}: {error}"))?;
    if !out.status.success() {
        return Err(format!(
            "images/{script} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What a fetching script made, or None (with a printed reason) when it
/// failed outside CI; under CI its failure fails the test.
pub fn fetched<T>(test: &str, result: &'static Result<T, String>) -> Option<&'static T> {
    match result {
        Ok(value) => Some(value),
        Err(reason) if in_ci() => panic!("{test}: {reason}"),
        Err(reason) => {
            eprintln!("{test}: SKIPPED: {reason} (set CI=true to make this a failure)");
            None
        }
    }
}

/// The Debian kernel of images/fetch-kernel.sh (fetched with apt, cached).
pub struct Kernel {
    pub bzimage: PathBuf,
    pub vmlinux: PathBuf,
    /// The package's virtio modules (for the initramfs).
    pub modules: PathBuf,
}

/// The Debian kernel, or None (with a printed reason) when it cannot be
/// fetched outside CI.
pub fn debian_kernel(test: &str) -> Option<&'static Kernel> {
    static KERNEL: OnceLock<Result<Kernel, String>> = OnceLock::new();
    let result = KERNEL.get_or_init(|| {
        let stdout = run_image_script("fetch-kernel.sh", &[])?;
        let mut lines = stdout.lines();
        let (Some(bzimage), Some(vmlinux), Some(modules)) =
            (lines.next(), lines.next(), lines.next())
        else {
            return Err(format!("images/fetch-kernel.sh printed {stdout:?}"));
        };
        Ok(Kernel {
            bzimage: PathBuf::from(bzimage),
            vmlinux: PathBuf::from(vmlinux),
            modules: PathBuf::from(modules),
        })
    });
    fetched(test, result)
}

/// A duration in seconds from the environment variable `name`, or `default`.
pub fn seconds_from_env(name: &str, default: u64) -> std::time::Duration {
    std::time::Duration::from_secs(
        std::env::var(name)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default),
    )
}
