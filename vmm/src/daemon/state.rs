//! The daemon's partitions on disk, so that they survive a restart: what each
//! was created with, where it was placed, which model it served and whether
//! it was meant to run. Written after every change (a new file renamed over
//! the old, so a crash leaves the old or the new, never half of one) and read
//! when the daemon starts.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use aivmm_api::types::PartitionSpec;
use serde::{Deserialize, Serialize};

use crate::host::Placement;

/// Bumped when the format changes in a way older daemons cannot read.
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub version: u32,
    pub partitions: Vec<SavedPartition>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedPartition {
    pub spec: PartitionSpec,
    /// The model it served when saved (a swap changes it from the spec's);
    /// empty for a Linux partition, which the spec describes whole.
    #[serde(default)]
    pub model_name: String,
    #[serde(default)]
    pub model_path: String,
    #[serde(default)]
    pub context_length: u32,
    pub placement: Placement,
    /// Started (and not stopped since) through the API: booted again on restore.
    pub running: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the state file {path} is not valid: {source}; fix it, or move it away to start with no partitions")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the state file {path} has format version {found}; this daemon reads version {VERSION}"
    )]
    Version { path: PathBuf, found: u32 },
    #[error("cannot write the state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The saved state, or None if there is no state file yet.
pub fn load(path: &Path) -> Result<Option<SavedState>, StateError> {
    let text = match fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StateError::Read {
                path: path.into(),
                source,
            })
        }
    };
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let parse_error = |source| StateError::Parse {
        path: path.into(),
        source,
    };
    let Versioned { version } = serde_json::from_str(&text).map_err(parse_error)?;
    if version != VERSION {
        return Err(StateError::Version {
            path: path.into(),
            found: version,
        });
    }
    serde_json::from_str(&text).map(Some).map_err(parse_error)
}

/// Writes the state atomically: to `<path>.tmp` (mode 0600), synced, then
/// renamed over `path`.
pub fn save(path: &Path, state: &SavedState) -> Result<(), StateError> {
    let write_error = |source| StateError::Write {
        path: path.into(),
        source,
    };
    let mut text = serde_json::to_vec_pretty(state).map_err(|error| write_error(error.into()))?;
    text.push(b'\n');
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(write_error)?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(write_error)?;
    drop(file);
    fs::rename(&temporary, path).map_err(write_error)?;
    // The rename itself is durable once the directory is synced.
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        if let Ok(dir) = fs::File::open(dir) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Where the console logs of Linux partitions go: a directory beside the
/// state file (`/run/aivmm.state.json` -> `/run/aivmm.console/`).
pub fn console_dir(state_file: &Path) -> PathBuf {
    let name = state_file
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".state.json").unwrap_or(&name);
    state_file.with_file_name(format!("{stem}.console"))
}

/// Where the state goes by default: beside the API socket
/// (`/run/aivmm.sock` -> `/run/aivmm.state.json`).
pub fn default_path(api_sock: &Path) -> PathBuf {
    api_sock.with_extension("state.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("aivmm-state-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn saved_state_reads_back_and_bad_files_are_named() {
        let dir = scratch("roundtrip");
        let path = dir.join("aivmm.state.json");
        assert_eq!(load(&path).unwrap(), None);
        let state = SavedState {
            version: VERSION,
            partitions: vec![SavedPartition {
                spec: serde_json::from_str(r#"{"id": "a", "model": "tiny", "hugepages": true}"#)
                    .unwrap(),
                model_name: "tiny".into(),
                model_path: "/models/tiny.gguf".into(),
                context_length: 256,
                placement: Placement {
                    host_cpus: vec![1],
                    reserved_cpus: vec![1],
                    node: 0,
                    cpu_nodes: vec![0],
                    memory_bytes: 64 << 20,
                    hugepages: None,
                },
                running: true,
            }],
        };
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state.clone()));
        assert!(!dir.join("aivmm.state.json.tmp").exists());
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );

        fs::write(&path, "{\"version\": 1, \"partitions\": [").unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(
            error.contains(&path.display().to_string()) && error.contains("not valid"),
            "{error}"
        );
        fs::write(&path, "{\"version\": 7, \"partitions\": []}").unwrap();
        let error = load(&path).unwrap_err().to_string();
        assert!(error.contains("format version 7"), "{error}");
        assert_eq!(
            default_path(Path::new("/run/aivmm.sock")),
            Path::new("/run/aivmm.state.json")
        );
        assert_eq!(
            console_dir(Path::new("/run/aivmm.state.json")),
            Path::new("/run/aivmm.console")
        );
        assert_eq!(
            console_dir(Path::new("/tmp/s.json")),
            Path::new("/tmp/s.json.console")
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
