//! virtio-blk (device ID 2, virtio 1.2 section 5.2) backed by a host file:
//! read, write, flush and get-ID requests on one request queue.
//!
//! Every request comes from the guest, so a chain the device cannot make
//! sense of (too short, a header that is not readable, a buffer outside
//! guest RAM, a sector range past the end) is answered with an error status
//! when the chain has a status byte to write, and always returned to the
//! used ring: the driver never waits for a request the device dropped.

use std::fs::{File, OpenOptions, TryLockError};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::VirtioDevice;
use crate::bus::DeviceError;
use crate::GuestMemory;

const NAME: &str = "virtio-blk";

/// virtio device ID of a block device.
pub const DEVICE_ID: u32 = 2;
/// The only queue: requests.
pub const REQUEST_QUEUE: u16 = 0;
/// Largest request queue offered.
pub const QUEUE_MAX_SIZE: u16 = 256;
/// Bytes per sector, the unit of `sector` and `capacity` whatever BLK_SIZE says.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID string.
pub const ID_BYTES: usize = 20;
/// Largest single data segment offered (SIZE_MAX).
pub const SEGMENT_MAX: u32 = 1 << 20;

/// Feature bits (virtio 1.2, 5.2.3).
pub const F_SIZE_MAX: u32 = 1;
pub const F_SEG_MAX: u32 = 2;
pub const F_RO: u32 = 5;
pub const F_BLK_SIZE: u32 = 6;
pub const F_FLUSH: u32 = 9;

/// Request types (5.2.6).
pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;

/// Status byte values.
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// The request header: type, reserved, sector.
const HEADER_BYTES: u32 = 16;
/// Guest data moves through a buffer of this size, whatever length a
/// descriptor claims.
const CHUNK: usize = 64 << 10;

/// Why a disk image cannot be attached.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("disk image {path}: {source} (check the path and its permissions{hint})")]
    Open {
        path: PathBuf,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("disk image {path} is in use by another VM ({mode} lock held); stop that VM, or attach the image read-only (,ro) in every VM")]
    Locked { path: PathBuf, mode: &'static str },
    #[error("cannot lock disk image {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path} is not a regular file or block device")]
    NotAFile { path: PathBuf },
    #[error("disk image {path} is {bytes} bytes, less than one {SECTOR_SIZE}-byte sector")]
    Empty { path: PathBuf, bytes: u64 },
}

/// Counters of the requests served.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    pub requests: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub flushes: u64,
    /// Requests answered IOERR or UNSUPP, or returned without a status.
    pub errors: u64,
}

/// A file-backed virtio block device.
pub struct Block {
    file: File,
    capacity: u64,
    read_only: bool,
    id: [u8; ID_BYTES],
    queue_max_sizes: [u16; 1],
    stats: BlockStats,
}

impl Block {
    /// Opens `path` (read-write unless `read_only`) and locks it: exclusively
    /// for a writable disk, shared for a read-only one, so two VMs can share
    /// a read-only image but never write the same one. The lock lasts as
    /// long as the device. Its size is rounded down to whole sectors.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                hint: if !read_only && source.kind() == std::io::ErrorKind::PermissionDenied {
                    ", or attach it read-only with ,ro"
                } else {
                    ""
                },
                source,
            })?;
        let locked = if read_only {
            file.try_lock_shared()
        } else {
            file.try_lock()
        };
        match locked {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(BlockError::Locked {
                    path: path.to_path_buf(),
                    mode: if read_only {
                        "an exclusive"
                    } else {
                        "a shared or exclusive"
                    },
                })
            }
            Err(TryLockError::Error(source)) => {
                return Err(BlockError::Lock {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let metadata = file.metadata().map_err(|source| BlockError::Open {
            path: path.to_path_buf(),
            hint: "",
            source,
        })?;
        if metadata.is_dir() {
            return Err(BlockError::NotAFile {
                path: path.to_path_buf(),
            });
        }
        // A block device's metadata says 0 bytes; its end is where a seek lands.
        let bytes = {
            use std::io::Seek;
            let mut file = &file;
            file.seek(std::io::SeekFrom::End(0))
                .map_err(|source| BlockError::Open {
                    path: path.to_path_buf(),
                    hint: "",
                    source,
                })?
        };
        if bytes < SECTOR_SIZE {
            return Err(BlockError::Empty {
                path: path.to_path_buf(),
                bytes,
            });
        }
        let mut id = [0u8; ID_BYTES];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let take = name.len().min(ID_BYTES);
        id[..take].copy_from_slice(&name.as_bytes()[..take]);
        Ok(Block {
            file,
            capacity: bytes / SECTOR_SIZE,
            read_only,
            id,
            queue_max_sizes: [QUEUE_MAX_SIZE],
            stats: BlockStats::default(),
        })
    }

    /// Size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    /// The configuration space (5.2.4) up to `blk_size`.
    fn config(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        config[8..12].copy_from_slice(&SEGMENT_MAX.to_le_bytes());
        // Two descriptors of every chain are the header and the status.
        config[12..16].copy_from_slice(&(u32::from(QUEUE_MAX_SIZE) - 2).to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }

    /// Serves every available request.
    fn serve(&mut self, queue: &mut Queue, memory: &GuestMemory) -> Result<(), DeviceError> {
        while let Some(chain) = queue.pop_descriptor_chain(memory) {
            let head = chain.head_index();
            // The iterator ends at a descriptor index outside the table, a
            // loop, or a broken indirect table: what is left is judged below.
            let descriptors: Vec<Descriptor> = chain.collect();
            let used = self.request(&descriptors, memory);
            queue
                .add_used(memory, head, used)
                .map_err(|error| DeviceError::Queue {
                    device: NAME,
                    queue: REQUEST_QUEUE,
                    why: format!("cannot return descriptor {head}: {error}"),
                })?;
        }
        Ok(())
    }

    /// Executes one request; returns the bytes written into the chain's
    /// device-writable buffers (the used length).
    fn request(&mut self, descriptors: &[Descriptor], memory: &GuestMemory) -> u32 {
        self.stats.requests += 1;
        let status = match descriptors.last() {
            Some(last) if descriptors.len() >= 2 && last.is_write_only() && last.len() >= 1 => {
                last.addr()
            }
            _ => {
                // Nowhere to put a status: return the chain untouched.
                self.stats.errors += 1;
                return 0;
            }
        };
        let data = &descriptors[1..descriptors.len() - 1];
        let (code, written) = match self.execute(&descriptors[0], data, memory) {
            Ok(written) => (S_OK, written),
            Err(code) => (code, 0),
        };
        if code != S_OK {
            self.stats.errors += 1;
        }
        match memory.write_obj(code, status) {
            Ok(()) => written.saturating_add(1),
            Err(_) => {
                self.stats.errors += 1;
                written
            }
        }
    }

    /// The request's outcome: the bytes written to the guest, or an error status.
    fn execute(
        &mut self,
        header: &Descriptor,
        data: &[Descriptor],
        memory: &GuestMemory,
    ) -> Result<u32, u8> {
        if header.is_write_only() || header.len() < HEADER_BYTES {
            return Err(S_IOERR);
        }
        let kind: u32 = memory.read_obj(header.addr()).map_err(|_| S_IOERR)?;
        let sector: u64 = memory
            .read_obj(header.addr().checked_add(8).ok_or(S_IOERR)?)
            .map_err(|_| S_IOERR)?;
        match kind {
            T_IN => {
                if data.iter().any(|d| !d.is_write_only()) {
                    return Err(S_IOERR);
                }
                let offset = self.range(sector, data)?;
                self.read(offset, data, memory)
            }
            T_OUT => {
                if self.read_only || data.iter().any(|d| d.is_write_only()) {
                    return Err(S_IOERR);
                }
                let offset = self.range(sector, data)?;
                self.write(offset, data, memory).map(|()| 0)
            }
            T_FLUSH => {
                self.stats.flushes += 1;
                if !self.read_only {
                    self.file.sync_data().map_err(|_| S_IOERR)?;
                }
                Ok(0)
            }
            T_GET_ID => {
                let Some(buffer) = data.first().filter(|d| d.is_write_only()) else {
                    return Err(S_IOERR);
                };
                let len = (buffer.len() as usize).min(ID_BYTES);
                memory
                    .write_slice(&self.id[..len], buffer.addr())
                    .map_err(|_| S_IOERR)?;
                Ok(len as u32)
            }
            _ => Err(S_UNSUPP),
        }
    }

    /// The byte offset of `sector` if the data buffers are whole sectors
    /// and the range ends within the disk.
    fn range(&self, sector: u64, data: &[Descriptor]) -> Result<u64, u8> {
        let bytes: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(S_IOERR);
        }
        let end = sector.checked_add(bytes / SECTOR_SIZE).ok_or(S_IOERR)?;
        if end > self.capacity {
            return Err(S_IOERR);
        }
        Ok(sector * SECTOR_SIZE)
    }

    fn read(
        &mut self,
        mut offset: u64,
        data: &[Descriptor],
        memory: &GuestMemory,
    ) -> Result<u32, u8> {
        let mut chunk = vec![0u8; CHUNK];
        let mut written: u32 = 0;
        for descriptor in data {
            for (addr, len) in pieces(descriptor) {
                let buffer = &mut chunk[..len];
                self.file
                    .read_exact_at(buffer, offset)
                    .map_err(|_| S_IOERR)?;
                memory.write_slice(buffer, addr).map_err(|_| S_IOERR)?;
                offset += len as u64;
                written = written.saturating_add(len as u32);
                self.stats.bytes_read += len as u64;
            }
        }
        Ok(written)
    }

    fn write(
        &mut self,
        mut offset: u64,
        data: &[Descriptor],
        memory: &GuestMemory,
    ) -> Result<(), u8> {
        let mut chunk = vec![0u8; CHUNK];
        for descriptor in data {
            for (addr, len) in pieces(descriptor) {
                let buffer = &mut chunk[..len];
                memory.read_slice(buffer, addr).map_err(|_| S_IOERR)?;
                self.file
                    .write_all_at(buffer, offset)
                    .map_err(|_| S_IOERR)?;
                offset += len as u64;
                self.stats.bytes_written += len as u64;
            }
        }
        Ok(())
    }
}

/// A descriptor's buffer as pieces of at most [`CHUNK`] bytes.
fn pieces(descriptor: &Descriptor) -> impl Iterator<Item = (GuestAddress, usize)> {
    let (start, len) = (descriptor.addr(), u64::from(descriptor.len()));
    (0..len.div_ceil(CHUNK as u64)).map(move |i| {
        let at = i * CHUNK as u64;
        (
            GuestAddress(start.0.wrapping_add(at)),
            (len - at).min(CHUNK as u64) as usize,
        )
    })
}

impl VirtioDevice for Block {
    fn name(&self) -> &'static str {
        NAME
    }

    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn features(&self) -> u64 {
        let mut features = 1u64 << F_SIZE_MAX | 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH;
        if self.read_only {
            features |= 1 << F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn process_queue(
        &mut self,
        index: u16,
        queue: &mut Queue,
        memory: &GuestMemory,
    ) -> Result<(), DeviceError> {
        match index {
            REQUEST_QUEUE => self.serve(queue, memory),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::mmio::{VirtioMmioTransport, INTERRUPT_USED_BUFFER};
    use crate::virtio::test_driver::{read32, write32, TestQueue, NEXT, WRITE};
    use aivmm_guest_abi::virtio_mmio as reg;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    const SECTORS: u64 = 16;
    const HEADER: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;
    const RAM: usize = 0x100000;

    /// A disk image in the temp directory, removed on drop.
    struct Image(PathBuf);

    impl Image {
        /// Sector n is filled with the byte n.
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("aivmm-blk-{}-{name}", std::process::id()));
            let bytes: Vec<u8> = (0..SECTORS * SECTOR_SIZE)
                .map(|i| (i / SECTOR_SIZE) as u8)
                .collect();
            std::fs::write(&path, bytes).unwrap();
            Image(path)
        }

        fn bytes(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    struct Rig {
        transport: VirtioMmioTransport<Block>,
        queue: TestQueue,
        interrupts: Arc<AtomicU64>,
    }

    impl Rig {
        fn new(image: &Image, read_only: bool) -> Self {
            let memory = GuestMemory::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
            let interrupts = Arc::new(AtomicU64::new(0));
            let counter = interrupts.clone();
            let transport =
                VirtioMmioTransport::new(Block::open(&image.0, read_only).unwrap(), memory.clone())
                    .unwrap()
                    .with_interrupt(Box::new(move || {
                        counter.fetch_add(1, Ordering::Relaxed);
                        Ok(())
                    }));
            let queue = TestQueue::new(memory, 16);
            queue.activate(&transport, u32::from(REQUEST_QUEUE));
            Rig {
                transport,
                queue,
                interrupts,
            }
        }

        fn header(&self, kind: u32, sector: u64) {
            let memory = &self.queue.memory;
            memory.write_obj(kind, GuestAddress(HEADER)).unwrap();
            memory.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
            memory.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
            memory.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }

        /// Submits the chain and notifies; returns (status byte, used length).
        fn submit(&mut self, buffers: &[(u64, u32, bool)]) -> (u8, u32) {
            let head = self.queue.add_chain(buffers);
            self.notify_and_take(head)
        }

        fn notify_and_take(&mut self, head: u16) -> (u8, u32) {
            let before = self.queue.used_idx();
            write32(&self.transport, reg::QUEUE_NOTIFY, u32::from(REQUEST_QUEUE));
            assert_eq!(
                self.queue.used_idx(),
                before.wrapping_add(1),
                "the chain is returned"
            );
            let (id, len) = self.queue.used_elem(before);
            assert_eq!(id, u32::from(head));
            let status = self.queue.memory.read_obj(GuestAddress(STATUS)).unwrap();
            (status, len)
        }

        fn data(&self, len: usize) -> Vec<u8> {
            let mut bytes = vec![0u8; len];
            self.queue
                .memory
                .read_slice(&mut bytes, GuestAddress(DATA))
                .unwrap();
            bytes
        }
    }

    fn request(data: &[(u64, u32, bool)]) -> Vec<(u64, u32, bool)> {
        let mut chain = vec![(HEADER, 16, false)];
        chain.extend_from_slice(data);
        chain.push((STATUS, 1, true));
        chain
    }

    #[test]
    fn reads_sectors_into_guest_buffers_and_interrupts() {
        let image = Image::new("read");
        let mut rig = Rig::new(&image, false);
        rig.header(T_IN, 3);
        // Two buffers: sector 3, then sectors 4-5.
        let (status, len) = rig.submit(&request(&[(DATA, 512, true), (DATA + 512, 1024, true)]));
        assert_eq!((status, len), (S_OK, 1536 + 1));
        let data = rig.data(1536);
        assert!(data[..512].iter().all(|&b| b == 3));
        assert!(data[512..1024].iter().all(|&b| b == 4));
        assert!(data[1024..].iter().all(|&b| b == 5));
        assert_eq!(rig.interrupts.load(Ordering::Relaxed), 1);
        assert_eq!(
            read32(&rig.transport, reg::INTERRUPT_STATUS),
            INTERRUPT_USED_BUFFER
        );
        write32(&rig.transport, reg::INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
        assert_eq!(read32(&rig.transport, reg::INTERRUPT_STATUS), 0);
        let stats = rig.transport.with_device(|block| block.stats());
        assert_eq!(
            (stats.requests, stats.bytes_read, stats.errors),
            (1, 1536, 0)
        );
    }

    #[test]
    fn writes_reach_the_file_and_flush_succeeds() {
        let image = Image::new("write");
        let mut rig = Rig::new(&image, false);
        rig.queue
            .memory
            .write_slice(&[0xab; 1024], GuestAddress(DATA))
            .unwrap();
        rig.header(T_OUT, SECTORS - 2);
        assert_eq!(
            rig.submit(&request(&[(DATA, 1024, false)])),
            (S_OK, 1),
            "a write returns only the status byte"
        );
        rig.header(T_FLUSH, 0);
        assert_eq!(rig.submit(&request(&[])), (S_OK, 1));
        let bytes = image.bytes();
        let last_two = (SECTORS as usize - 2) * 512;
        assert!(bytes[last_two..].iter().all(|&b| b == 0xab));
        assert!(bytes[last_two - 512..last_two].iter().all(|&b| b == 13));
        let stats = rig.transport.with_device(|block| block.stats());
        assert_eq!((stats.bytes_written, stats.flushes), (1024, 1));
        assert_eq!(rig.interrupts.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_read_only_disk_says_so_and_refuses_writes() {
        let image = Image::new("ro");
        let mut rig = Rig::new(&image, true);
        write32(&rig.transport, reg::DEVICE_FEATURES_SEL, 0);
        let features = read32(&rig.transport, reg::DEVICE_FEATURES);
        assert_ne!(features & 1 << F_RO, 0);
        assert_ne!(features & 1 << F_FLUSH, 0);
        rig.header(T_OUT, 0);
        assert_eq!(rig.submit(&request(&[(DATA, 512, false)])), (S_IOERR, 1));
        assert!(image.bytes()[..512].iter().all(|&b| b == 0), "unchanged");
        rig.header(T_IN, 1);
        assert_eq!(rig.submit(&request(&[(DATA, 512, true)])), (S_OK, 513));
        assert_eq!(rig.transport.with_device(|block| block.stats().errors), 1);
    }

    #[test]
    fn out_of_range_and_partial_sectors_are_io_errors() {
        let image = Image::new("range");
        let mut rig = Rig::new(&image, false);
        for (sector, len) in [
            (SECTORS - 1, 1024), // runs past the end
            (SECTORS, 512),      // starts at the end
            (u64::MAX, 512),     // sector + count overflows
            (0, 100),            // not a whole sector
        ] {
            rig.header(T_IN, sector);
            assert_eq!(
                rig.submit(&request(&[(DATA, len, true)])),
                (S_IOERR, 1),
                "read of {len} bytes at sector {sector}"
            );
            rig.header(T_OUT, sector);
            assert_eq!(rig.submit(&request(&[(DATA, len, false)])), (S_IOERR, 1));
        }
        assert_eq!(image.bytes(), Image::new("range-fresh").bytes());
        rig.header(T_IN, SECTORS - 1);
        assert_eq!(rig.submit(&request(&[(DATA, 512, true)])), (S_OK, 513));
    }

    #[test]
    fn get_id_names_the_image_and_unknown_requests_are_unsupported() {
        let image = Image::new("id");
        let mut rig = Rig::new(&image, false);
        rig.header(T_GET_ID, 0);
        let (status, len) = rig.submit(&request(&[(DATA, 20, true)]));
        assert_eq!((status, len), (S_OK, 21));
        let name = image.0.file_name().unwrap().to_string_lossy().into_owned();
        let expected = &name.as_bytes()[..name.len().min(ID_BYTES)];
        assert_eq!(&rig.data(expected.len()), expected);
        for kind in [11, 13, 0xdead] {
            rig.header(kind, 0);
            assert_eq!(rig.submit(&request(&[(DATA, 512, false)])), (S_UNSUPP, 1));
        }
    }

    #[test]
    fn the_config_space_gives_capacity_and_sizes() {
        let image = Image::new("config");
        let rig = Rig::new(&image, false);
        let low = read32(&rig.transport, reg::CONFIG);
        let high = read32(&rig.transport, reg::CONFIG + 4);
        assert_eq!(u64::from(low) | u64::from(high) << 32, SECTORS);
        assert_eq!(read32(&rig.transport, reg::CONFIG + 12), 254, "seg_max");
        assert_eq!(read32(&rig.transport, reg::CONFIG + 20), 512, "blk_size");
        let mut byte = [0xffu8];
        use crate::bus::MmioDevice;
        rig.transport
            .read(0, reg::CONFIG + 0x200, &mut byte)
            .unwrap();
        assert_eq!(byte, [0], "past the config reads as zero");
        assert_eq!(read32(&rig.transport, reg::DEVICE_ID), DEVICE_ID);
    }

    #[test]
    fn malformed_chains_are_returned_without_panicking() {
        let image = Image::new("malformed");
        let pristine = image.bytes();
        let mut rig = Rig::new(&image, false);
        let outside = RAM as u64 + 0x1000;

        // Only a header: nowhere to write a status.
        rig.header(T_IN, 0);
        assert_eq!(rig.submit(&[(HEADER, 16, false)]).1, 0);
        // The last descriptor is not device-writable.
        assert_eq!(rig.submit(&[(HEADER, 16, false), (STATUS, 1, false)]).1, 0);
        // A device-writable or short header.
        assert_eq!(
            rig.submit(
                &request(&[])
                    .iter()
                    .map(|&(a, l, _)| (a, l, true))
                    .collect::<Vec<_>>()
            ),
            (S_IOERR, 1)
        );
        assert_eq!(
            rig.submit(&[(HEADER, 8, false), (STATUS, 1, true)]),
            (S_IOERR, 1)
        );
        // A header outside guest RAM.
        assert_eq!(
            rig.submit(&[(outside, 16, false), (STATUS, 1, true)]),
            (S_IOERR, 1)
        );
        // A read into a driver-readable buffer, a write from a device-writable one.
        rig.header(T_IN, 0);
        assert_eq!(rig.submit(&request(&[(DATA, 512, false)])), (S_IOERR, 1));
        rig.header(T_OUT, 0);
        assert_eq!(rig.submit(&request(&[(DATA, 512, true)])), (S_IOERR, 1));
        // Data outside guest RAM, or wrapping around the address space.
        rig.header(T_IN, 0);
        assert_eq!(rig.submit(&request(&[(outside, 512, true)])).0, S_IOERR);
        rig.header(T_OUT, 0);
        assert_eq!(
            rig.submit(&request(&[(u64::MAX - 100, 512, false)])).0,
            S_IOERR
        );
        // A huge claimed length is an out-of-range request, not an allocation.
        rig.header(T_IN, 0);
        assert_eq!(
            rig.submit(&request(&[(DATA, u32::MAX - 511, true)])).0,
            S_IOERR
        );
        // GET_ID without a writable buffer.
        rig.header(T_GET_ID, 0);
        assert_eq!(rig.submit(&request(&[(DATA, 20, false)])), (S_IOERR, 1));
        // A status byte outside guest RAM: returned, nothing written.
        rig.header(T_FLUSH, 0);
        assert_eq!(rig.submit(&[(HEADER, 16, false), (outside, 1, true)]).1, 0);

        // A next index outside the descriptor table: the chain ends at the head.
        rig.queue.put_descriptor(14, HEADER, 16, NEXT, 1000);
        rig.queue.publish(14);
        assert_eq!(rig.notify_and_take(14).1, 0);
        // A loop (12 -> 13 -> 12): the chain ends after a queue's worth.
        rig.header(T_IN, 0);
        rig.queue.put_descriptor(12, HEADER, 16, NEXT, 13);
        rig.queue.put_descriptor(13, STATUS, 1, NEXT | WRITE, 12);
        rig.queue.publish(12);
        let (_, len) = rig.notify_and_take(12);
        assert!(len <= 1);

        assert_eq!(
            image.bytes(),
            pristine,
            "no malformed request wrote the disk"
        );
        // The device still serves a good request.
        rig.header(T_IN, 7);
        assert_eq!(rig.submit(&request(&[(DATA, 512, true)])), (S_OK, 513));
        assert!(rig.data(512).iter().all(|&b| b == 7));
    }

    #[test]
    fn images_are_locked_and_bad_files_are_refused() {
        let image = Image::new("lock");
        let writer = Block::open(&image.0, false).unwrap();
        let error = Block::open(&image.0, false).err().unwrap();
        assert!(matches!(error, BlockError::Locked { .. }), "{error}");
        assert!(
            error.to_string().contains("in use by another VM"),
            "{error}"
        );
        assert!(matches!(
            Block::open(&image.0, true),
            Err(BlockError::Locked { .. })
        ));
        drop(writer);
        let reader = Block::open(&image.0, true).unwrap();
        let second_reader = Block::open(&image.0, true).unwrap();
        assert!(reader.read_only() && second_reader.read_only());
        assert!(matches!(
            Block::open(&image.0, false),
            Err(BlockError::Locked { .. })
        ));
        assert_eq!(reader.capacity(), SECTORS);

        let missing = image.0.with_extension("missing");
        let error = Block::open(&missing, false).err().unwrap().to_string();
        assert!(error.contains(&missing.display().to_string()), "{error}");
        assert!(error.contains("No such file"), "{error}");
        let tiny = Image::new("tiny");
        std::fs::write(&tiny.0, [0u8; 100]).unwrap();
        let error = Block::open(&tiny.0, false).err().unwrap();
        assert!(
            matches!(error, BlockError::Empty { bytes: 100, .. }),
            "{error}"
        );
        let error = Block::open(&std::env::temp_dir(), true).err().unwrap();
        assert!(matches!(error, BlockError::NotAFile { .. }), "{error}");
    }
}
