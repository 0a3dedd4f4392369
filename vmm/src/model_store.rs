//! Where models come from when the user names none: the default model is
//! fetched and sha256-checked on first use by `images/fetch-model.sh`, which is
//! embedded in the binary so that an installed `aivmm` needs no checkout.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The model `aivmm` runs when given no `--model`.
pub const DEFAULT_MODEL: &str = "gemma3-270m-q4_k_m";

const FETCH_SCRIPT: &str = include_str!("../../images/fetch-model.sh");

#[derive(Debug, thiserror::Error)]
pub enum ModelStoreError {
    #[error("cannot run bash to fetch model {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("fetching model {name} failed (see the messages above); pass --model FILE.gguf to use a local file")]
    Failed { name: String },
    #[error("the model fetcher printed no usable path for {name}")]
    NoPath { name: String },
}

/// Path of a named model, fetching and verifying it first if needed. Progress
/// goes to this process's stderr.
pub fn fetch(name: &str) -> Result<PathBuf, ModelStoreError> {
    let out = Command::new("bash")
        .arg("-c")
        .arg(FETCH_SCRIPT)
        .arg("fetch-model.sh")
        .arg(name)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|source| ModelStoreError::Spawn {
            name: name.into(),
            source,
        })?;
    if !out.status.success() {
        return Err(ModelStoreError::Failed { name: name.into() });
    }
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or("")
        .trim()
        .to_string();
    let path = PathBuf::from(path);
    if path.as_os_str().is_empty() || !path.is_file() {
        return Err(ModelStoreError::NoPath { name: name.into() });
    }
    Ok(path)
}
