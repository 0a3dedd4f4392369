//! Host input to the guest's serial console: a thread reads a file (stdin,
//! a pipe) and feeds COM1's receive FIFO as the guest empties it, so a
//! shell on ttyS0 is usable. It ends at the input's end of file or when the
//! VM stops.
//!
//! From a terminal (`interactive`), Ctrl-A x stops the VM (every other key,
//! Ctrl-C included, goes to the guest); Ctrl-A Ctrl-A sends one Ctrl-A.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::vcpu::{LinuxEnd, Shared};
use crate::isolation::ThreadKind;

/// Ctrl-A, the escape key from a terminal.
pub const ESCAPE: u8 = 0x01;
/// After the escape key: stop the VM.
pub const QUIT: u8 = b'x';

/// Where the serial console's input comes from.
pub struct SerialInput {
    pub source: File,
    /// A terminal in raw mode: the Ctrl-A escape applies.
    pub interactive: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialInputError {
    #[error("cannot watch the serial console's input: {0}")]
    Epoll(#[source] std::io::Error),
    #[error("cannot start the serial input thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// The Ctrl-A escape: what to send to the guest, and whether to quit.
#[derive(Debug, Default)]
pub struct Escape {
    pending: bool,
}

impl Escape {
    pub fn feed(&mut self, input: &[u8]) -> (Vec<u8>, bool) {
        let mut out = Vec::with_capacity(input.len());
        for &byte in input {
            if self.pending {
                self.pending = false;
                match byte {
                    QUIT => return (out, true),
                    ESCAPE => out.push(ESCAPE),
                    // Not a command: both keys go through.
                    other => out.extend_from_slice(&[ESCAPE, other]),
                }
            } else if byte == ESCAPE {
                self.pending = true;
            } else {
                out.push(byte);
            }
        }
        (out, false)
    }
}

/// The running input thread; stops it on drop.
pub struct SerialInputThread {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

const SOURCE: u64 = 0;
const STOP: u64 = 1;
/// How long to wait for the guest to read the FIFO before trying again.
const FIFO_RETRY_MS: i32 = 10;

impl SerialInputThread {
    /// Starts the thread (under its seccomp filter when `seccomp`).
    pub fn start(
        input: SerialInput,
        shared: Arc<Shared>,
        seccomp: bool,
    ) -> Result<Self, SerialInputError> {
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialInputError::Epoll)?;
        let epoll = Epoll::new().map_err(SerialInputError::Epoll)?;
        for (fd, data) in [(input.source.as_raw_fd(), SOURCE), (stop.as_raw_fd(), STOP)] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, data),
                )
                .map_err(SerialInputError::Epoll)?;
        }
        let thread = std::thread::Builder::new()
            .name("linux-serial-in".into())
            .spawn(move || {
                if seccomp {
                    if let Err(end) = LinuxEnd::enter_seccomp(ThreadKind::SerialInput) {
                        shared.finish(end);
                        return;
                    }
                }
                forward(input, &epoll, &shared)
            })
            .map_err(SerialInputError::Thread)?;
        Ok(SerialInputThread {
            stop,
            thread: Some(thread),
        })
    }

    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // A failed write means the counter is saturated, which wakes the thread too.
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for SerialInputThread {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits for `epoll`; whether the stop event fired (errors other than EINTR
/// count as a stop: the thread cannot wait any more).
fn stopped(epoll: &Epoll, timeout_ms: i32) -> bool {
    let mut events = [EpollEvent::default(); 2];
    match epoll.wait(timeout_ms, &mut events) {
        Ok(count) => events[..count].iter().any(|e| e.data() == STOP),
        Err(error) => error.kind() != std::io::ErrorKind::Interrupted,
    }
}

fn forward(mut input: SerialInput, epoll: &Epoll, shared: &Shared) {
    let mut escape = Escape::default();
    let mut buffer = [0u8; 256];
    loop {
        if stopped(epoll, -1) {
            return;
        }
        let count = match input.source.read(&mut buffer) {
            Ok(0) => return,
            Ok(count) => count,
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        let (bytes, quit) = if input.interactive {
            escape.feed(&buffer[..count])
        } else {
            (buffer[..count].to_vec(), false)
        };
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let taken = shared
                .pio
                .serial
                .lock()
                .map_or(0, |mut serial| serial.enqueue_input(rest));
            rest = &rest[taken..];
            if taken == 0 && stopped(epoll, FIFO_RETRY_MS) {
                return;
            }
        }
        if quit {
            shared.finish(LinuxEnd::Stopped);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::pio::PortBus;
    use crate::linux::serial::{Capture, IrqLine, SerialConsole, COM1_BASE};
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    #[test]
    fn ctrl_a_x_quits_and_ctrl_a_twice_sends_one() {
        let mut escape = Escape::default();
        assert_eq!(escape.feed(b"ls\r"), (b"ls\r".to_vec(), false));
        assert_eq!(escape.feed(&[ESCAPE]), (vec![], false));
        assert_eq!(escape.feed(&[ESCAPE, b'a']), (vec![ESCAPE, b'a'], false));
        assert_eq!(escape.feed(&[ESCAPE, b'q']), (vec![ESCAPE, b'q'], false));
        assert_eq!(escape.feed(&[b'e', ESCAPE, QUIT, b'z']), (vec![b'e'], true));
        assert_eq!(
            escape.feed(&[0x03]),
            (vec![0x03], false),
            "Ctrl-C goes to the guest"
        );
    }

    /// Bytes written to the input come out of the UART's receive register,
    /// more than a FIFO's worth, in order, as a guest reading it would see;
    /// the end of the input ends the thread.
    #[test]
    fn piped_input_reaches_the_guest_in_order() {
        let irq = IrqLine::new().unwrap();
        let event = irq.eventfd().try_clone().unwrap();
        let capture = Arc::new(Mutex::new(Capture::default()));
        let serial = SerialConsole::new(irq, None, capture.clone());
        let shared = Arc::new(Shared::new(PortBus::new(serial), capture, 1));
        // Receive interrupt enabled, as the guest's driver does.
        shared.pio.write(COM1_BASE + 1, &[0x01]).unwrap();

        let (mut host, source) = UnixStream::pair().unwrap();
        let source = File::from(std::os::fd::OwnedFd::from(source));
        let mut thread = SerialInputThread::start(
            SerialInput {
                source,
                interactive: false,
            },
            shared.clone(),
            // Under its filter: what it does is allowed.
            true,
        )
        .unwrap();
        let refused_before = crate::isolation::seccomp::refused(ThreadKind::SerialInput).0;
        let text: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
        host.write_all(&text).unwrap();
        drop(host);

        let mut received = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while received.len() < text.len() && Instant::now() < deadline {
            let mut lsr = [0u8];
            shared.pio.read(COM1_BASE + 5, &mut lsr);
            if lsr[0] & 0x01 != 0 {
                let mut byte = [0u8];
                shared.pio.read(COM1_BASE, &mut byte);
                received.push(byte[0]);
            } else {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        assert_eq!(received, text);
        assert!(event.read().unwrap() >= 1, "IRQ 4 was raised");
        thread.stop();
        assert_eq!(shared.end(), None, "the thread installed its filter");
        assert_eq!(
            crate::isolation::seccomp::refused(ThreadKind::SerialInput).0,
            refused_before,
            "nothing refused"
        );
    }

    #[test]
    fn the_escape_stops_the_vm() {
        let capture = Arc::new(Mutex::new(Capture::default()));
        let serial = SerialConsole::new(IrqLine::new().unwrap(), None, capture.clone());
        let shared = Arc::new(Shared::new(PortBus::new(serial), capture, 1));
        let (mut host, source) = UnixStream::pair().unwrap();
        let _thread = SerialInputThread::start(
            SerialInput {
                source: File::from(std::os::fd::OwnedFd::from(source)),
                interactive: true,
            },
            shared.clone(),
            false,
        )
        .unwrap();
        host.write_all(&[b'a', ESCAPE, QUIT]).unwrap();
        assert_eq!(
            shared.wait_end(Duration::from_secs(30)),
            Some(LinuxEnd::Stopped)
        );
        let mut byte = [0u8];
        shared.pio.read(COM1_BASE, &mut byte);
        assert_eq!(byte[0], b'a', "what came before the escape was delivered");
    }
}
