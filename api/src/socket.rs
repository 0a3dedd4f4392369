//! The daemon's Unix socket: one daemon per path (a lock file next to it,
//! held for the daemon's life), a stale socket left by a daemon that died
//! is replaced, a live one is never touched, and the socket is created
//! 0600 (the API is as powerful as root on this host).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("another aivmm daemon is serving {path} (pid in {lock}); stop it first or use another --api-sock")]
    InUse { path: PathBuf, lock: PathBuf },
    #[error("{path} exists and is not a socket; refusing to replace it: remove it or use another --api-sock")]
    NotASocket { path: PathBuf },
    #[error("cannot open the lock file {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot remove the stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind the API socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot make {path} private (mode 0600)")]
    Permissions {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A bound API socket; dropping it removes the socket file and releases the lock.
pub struct ApiSocket {
    pub listener: UnixListener,
    path: PathBuf,
    _lock: File,
}

impl ApiSocket {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        // The lock file stays: removing it while another daemon waits on it
        // would let two daemons in.
        let _ = std::fs::remove_file(&self.path);
    }
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// Binds `path`, replacing a stale socket and refusing a live one.
pub fn bind(path: &Path) -> Result<ApiSocket, SocketError> {
    let lock_path = lock_path(path);
    let lock = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|source| SocketError::Lock {
            path: lock_path.clone(),
            source,
        })?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
    if !locked {
        return Err(SocketError::InUse {
            path: path.into(),
            lock: lock_path,
        });
    }
    // We hold the lock, so a daemon that still answers there was started
    // without it (or the lock file was removed): leave it alone all the same.
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse {
                    path: path.into(),
                    lock: lock_path,
                });
            }
            std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                path: path.into(),
                source,
            })?;
        }
        Ok(_) => return Err(SocketError::NotASocket { path: path.into() }),
        Err(_) => {}
    }
    // SAFETY: umask only changes this process's file-creation mask; the
    // socket is created with no group/other bits, closing the window between
    // bind and chmod.
    let old_mask = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old_mask) };
    let listener = bound.map_err(|source| SocketError::Bind {
        path: path.into(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        SocketError::Permissions {
            path: path.into(),
            source,
        }
    })?;
    use std::io::Write;
    let mut lock = lock;
    let _ = lock.set_len(0);
    let _ = writeln!(lock, "{}", std::process::id());
    Ok(ApiSocket {
        listener,
        path: path.into(),
        _lock: lock,
    })
}
