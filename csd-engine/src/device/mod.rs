//! The narrow storage interface the KV store runs on, and its implementations.
//!
//! A [`BlockDevice`] moves byte ranges at explicit offsets, in batches. Every implementation
//! either fills/writes every byte of every request or returns an error; a batch that fails may
//! have completed some of its requests. Callers that want direct I/O keep offsets and lengths
//! multiples of [`BlockDevice::block_size`]; the direct implementations refuse anything else
//! rather than silently going through the page cache.

mod fault;
mod mem;
mod pread;
mod uring;

pub use fault::{Fault, FaultConfig, FaultCounts, FaultyDevice};
pub use mem::MemDevice;
pub use pread::PreadDevice;
pub use uring::{UringDevice, UringOptions};

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use hdrhistogram::Histogram;

/// One read of `buf.len()` bytes at `offset`.
#[derive(Debug)]
pub struct ReadReq<'a> {
    /// Byte offset on the device.
    pub offset: u64,
    /// Where the bytes go; its length is the request's length.
    pub buf: &'a mut [u8],
}

/// One write of `buf` at `offset`.
#[derive(Debug, Clone, Copy)]
pub struct WriteReq<'a> {
    /// Byte offset on the device.
    pub offset: u64,
    /// The bytes to write.
    pub buf: &'a [u8],
}

/// Which engine a device really uses, reported truthfully.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEngine {
    /// io_uring ([`UringDevice`]).
    IoUring,
    /// pread/pwrite ([`PreadDevice`]).
    Psync,
    /// RAM ([`MemDevice`]), for tests.
    Memory,
}

/// The I/O mode in effect: engine, and whether the page cache is bypassed (O_DIRECT).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IoMode {
    /// The engine.
    pub engine: IoEngine,
    /// Whether the page cache is bypassed (O_DIRECT).
    pub direct: bool,
}

impl std::fmt::Display for IoMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = match self.engine {
            IoEngine::IoUring => "io_uring",
            IoEngine::Psync => "psync",
            IoEngine::Memory => "memory",
        };
        let d = match (self.engine, self.direct) {
            (IoEngine::Memory, _) => "",
            (_, true) => "+O_DIRECT",
            (_, false) => "+buffered",
        };
        write!(f, "{e}{d}")
    }
}

/// Errors from a block device.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The operating system failed a request.
    #[error("I/O error at offset {offset}: {source}")]
    Io {
        /// Byte offset of the failed request.
        offset: u64,
        /// What the operating system said.
        #[source]
        source: io::Error,
    },
    /// Offset or length is not a multiple of the device's block size.
    #[error(
        "misaligned request at offset {offset}, {len} bytes (device needs multiples of {align})"
    )]
    Misaligned {
        /// Byte offset of the request.
        offset: u64,
        /// Bytes of the request.
        len: usize,
        /// The block size needed.
        align: usize,
    },
    /// The request runs past the end of the device.
    #[error("request at offset {offset}, {len} bytes, runs past the device end ({size} bytes)")]
    OutOfRange {
        /// Byte offset of the request.
        offset: u64,
        /// Bytes of the request.
        len: usize,
        /// Bytes of the device.
        size: u64,
    },
    /// The kernel transferred nothing of a request that was not done.
    #[error("short transfer at offset {offset}: wanted {wanted} bytes, got {got}")]
    Short {
        /// Byte offset of the request.
        offset: u64,
        /// Bytes asked for.
        wanted: usize,
        /// Bytes transferred.
        got: usize,
    },
    /// The io_uring instance failed (submission or wait).
    #[error("io_uring failure: {0}")]
    Ring(#[source] io::Error),
}

impl DevError {
    /// The errno behind this error, if any (e.g. `ENOSPC`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            DevError::Io { source, .. } | DevError::Ring(source) => source.raw_os_error(),
            _ => None,
        }
    }

    /// Whether the device is out of space (`ENOSPC`).
    pub fn is_no_space(&self) -> bool {
        self.raw_os_error() == Some(libc::ENOSPC)
    }
}

/// The storage interface: batched positional reads and writes, a durability barrier, a size.
pub trait BlockDevice: Send + Sync {
    /// Usable size in bytes.
    fn len(&self) -> u64;
    /// Offset/length granularity for requests (the logical block size for direct I/O).
    fn block_size(&self) -> usize;
    /// The engine and mode actually in use.
    fn mode(&self) -> IoMode;
    /// Fill every request's buffer from the device.
    fn read_at(&self, reqs: &mut [ReadReq<'_>]) -> Result<(), DevError>;
    /// Write every request's buffer to the device.
    fn write_at(&self, reqs: &[WriteReq<'_>]) -> Result<(), DevError>;
    /// Make completed writes durable.
    fn sync(&self) -> Result<(), DevError>;
    /// I/O counters and latency histograms of this device.
    fn stats(&self) -> &DevStats;

    /// Whether the device has no usable bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for Box<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn block_size(&self) -> usize {
        (**self).block_size()
    }
    fn mode(&self) -> IoMode {
        (**self).mode()
    }
    fn read_at(&self, reqs: &mut [ReadReq<'_>]) -> Result<(), DevError> {
        (**self).read_at(reqs)
    }
    fn write_at(&self, reqs: &[WriteReq<'_>]) -> Result<(), DevError> {
        (**self).write_at(reqs)
    }
    fn sync(&self) -> Result<(), DevError> {
        (**self).sync()
    }
    fn stats(&self) -> &DevStats {
        (**self).stats()
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for Arc<T> {
    fn len(&self) -> u64 {
        (**self).len()
    }
    fn block_size(&self) -> usize {
        (**self).block_size()
    }
    fn mode(&self) -> IoMode {
        (**self).mode()
    }
    fn read_at(&self, reqs: &mut [ReadReq<'_>]) -> Result<(), DevError> {
        (**self).read_at(reqs)
    }
    fn write_at(&self, reqs: &[WriteReq<'_>]) -> Result<(), DevError> {
        (**self).write_at(reqs)
    }
    fn sync(&self) -> Result<(), DevError> {
        (**self).sync()
    }
    fn stats(&self) -> &DevStats {
        (**self).stats()
    }
}

/// Check a request against the device geometry.
pub(crate) fn check_req(offset: u64, len: usize, align: usize, size: u64) -> Result<(), DevError> {
    if offset % align as u64 != 0 || len % align != 0 {
        return Err(DevError::Misaligned { offset, len, align });
    }
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(DevError::OutOfRange { offset, len, size });
    }
    Ok(())
}

/// Counters and latency histograms of one device (latencies per device operation, in
/// microseconds).
#[derive(Debug)]
pub struct DevStats {
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Device read operations.
    pub read_ios: AtomicU64,
    /// Device write operations.
    pub write_ios: AtomicU64,
    /// Durability barriers ([`BlockDevice::sync`]).
    pub syncs: AtomicU64,
    /// Times the device left a failed io_uring for plain pread/pwrite.
    pub ring_failovers: AtomicU64,
    read_lat: Mutex<Histogram<u64>>,
    write_lat: Mutex<Histogram<u64>>,
}

impl Default for DevStats {
    fn default() -> Self {
        let h = || Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"));
        DevStats {
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            read_ios: AtomicU64::new(0),
            write_ios: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            ring_failovers: AtomicU64::new(0),
            read_lat: h(),
            write_lat: h(),
        }
    }
}

impl DevStats {
    pub(crate) fn record_read(&self, bytes: usize, lat: Duration) {
        self.bytes_read.fetch_add(bytes as u64, Ordering::Relaxed);
        self.read_ios.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.read_lat.lock() {
            h.saturating_record((lat.as_micros() as u64).max(1));
        }
    }

    pub(crate) fn record_write(&self, bytes: usize, lat: Duration) {
        self.bytes_written
            .fetch_add(bytes as u64, Ordering::Relaxed);
        self.write_ios.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.write_lat.lock() {
            h.saturating_record((lat.as_micros() as u64).max(1));
        }
    }

    /// Per-operation read completion latency (µs).
    pub fn read_latency(&self) -> Histogram<u64> {
        self.read_lat
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Per-operation write completion latency (µs).
    pub fn write_latency(&self) -> Histogram<u64> {
        self.write_lat
            .lock()
            .map(|h| h.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

/// Which engine to open a path with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum EngineChoice {
    /// io_uring with O_DIRECT; fall back (logged once) to pread/pwrite and/or buffered I/O
    /// where the kernel or filesystem refuses.
    #[default]
    Auto,
    /// io_uring only (direct unless `direct` is false); error if unavailable.
    IoUring,
    /// pread/pwrite.
    Psync,
}

/// How to open a file-backed device.
#[derive(Clone, Copy, Debug)]
pub struct OpenDeviceOptions {
    /// Which engine to use.
    pub engine: EngineChoice,
    /// Request O_DIRECT. With `Auto`, a filesystem that refuses it falls back to buffered I/O
    /// (logged once, and reported by [`BlockDevice::mode`]).
    pub direct: bool,
    /// Ring geometry, when io_uring is used.
    pub uring: UringOptions,
    /// Create the file if missing.
    pub create: bool,
    /// Inject faults into the device's requests (chaos testing): the device is wrapped in a
    /// [`FaultyDevice`] with this configuration.
    pub faults: Option<FaultConfig>,
}

impl Default for OpenDeviceOptions {
    fn default() -> Self {
        OpenDeviceOptions {
            engine: EngineChoice::Auto,
            direct: true,
            uring: UringOptions::default(),
            create: false,
            faults: None,
        }
    }
}

static WARN_NO_DIRECT: Once = Once::new();
static WARN_NO_URING: Once = Once::new();

fn open_file(path: &Path, direct: bool, create: bool) -> io::Result<File> {
    let mut o = OpenOptions::new();
    o.read(true).write(true).create(create);
    if direct {
        o.custom_flags(libc::O_DIRECT);
    }
    o.open(path)
}

/// Bytes an unprivileged user may still allocate on the filesystem that holds `dir` (for
/// sizing a store before creating it).
pub fn available_bytes(dir: &std::path::Path) -> std::io::Result<u64> {
    crate::sys::available_bytes(dir)
}

/// Open `path` (a regular file or a block device) as a [`BlockDevice`] of the given size in
/// bytes (`None`: the current file length or device capacity; regular files are preallocated
/// to `size`).
pub fn open_path(
    path: &Path,
    size: Option<u64>,
    opts: &OpenDeviceOptions,
) -> io::Result<Box<dyn BlockDevice>> {
    if path.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::IsADirectory,
            "is a directory",
        ));
    }
    let mut direct = opts.direct;
    let file = match open_file(path, direct, opts.create) {
        Ok(f) => f,
        Err(e)
            if direct
                && e.raw_os_error() == Some(libc::EINVAL)
                && opts.engine == EngineChoice::Auto =>
        {
            WARN_NO_DIRECT.call_once(|| {
                tracing::warn!(
                    path = %path.display(),
                    "filesystem refused O_DIRECT; KV store falls back to buffered I/O (page cache)"
                )
            });
            direct = false;
            open_file(path, false, opts.create)?
        }
        Err(e) => return Err(e),
    };
    let file = if direct && crate::sys::on_memory_fs(&file) {
        // tmpfs accepts O_DIRECT on new kernels, but the data still lives in the page cache:
        // report it as buffered, and refuse when direct I/O was demanded explicitly.
        if opts.engine != EngineChoice::Auto {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "store is on a memory filesystem (tmpfs); direct I/O is not possible there",
            ));
        }
        WARN_NO_DIRECT.call_once(|| {
            tracing::warn!(
                path = %path.display(),
                "store is on a memory filesystem (tmpfs); using buffered pread/pwrite"
            )
        });
        direct = false;
        drop(file);
        open_file(path, false, false)?
    } else {
        file
    };
    let probe = sys_probe(&file)?;
    let len = match size {
        Some(s) if !probe.is_block_device => {
            crate::sys::preallocate(&file, s)?;
            s
        }
        Some(s) => s.min(probe.size),
        None => probe.size,
    };
    let align = probe.logical_block.max(probe.mem_align) as usize;
    let file = Arc::new(file);
    let want_uring = match opts.engine {
        EngineChoice::Psync => false,
        EngineChoice::IoUring => true,
        // Buffered I/O through io_uring may block in the submitting task; the psync engine is
        // the honest choice there.
        EngineChoice::Auto => direct,
    };
    let dev = open_engine(file, len, align, direct, want_uring, opts)?;
    Ok(match opts.faults {
        Some(f) => {
            tracing::warn!(
                path = %path.display(),
                read_error = f.read_error,
                bit_flip = f.bit_flip,
                seed = f.seed,
                "fault injection is ON for this KV store (testing only)"
            );
            Box::new(FaultyDevice::new(dev, f))
        }
        None => dev,
    })
}

/// The io_uring device where it is wanted and works, else the pread one.
fn open_engine(
    file: Arc<File>,
    len: u64,
    align: usize,
    direct: bool,
    want_uring: bool,
    opts: &OpenDeviceOptions,
) -> io::Result<Box<dyn BlockDevice>> {
    if want_uring {
        match UringDevice::new(file.clone(), len, align, direct, &opts.uring) {
            Ok(d) => return Ok(Box::new(d)),
            Err(e) if opts.engine == EngineChoice::Auto => {
                WARN_NO_URING.call_once(|| {
                    tracing::warn!(error = %e, "io_uring unavailable; KV store falls back to pread/pwrite")
                });
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Box::new(PreadDevice::new(file, len, align, direct)))
}

fn sys_probe(file: &File) -> io::Result<crate::sys::FileProbe> {
    crate::sys::probe_file(file)
}
