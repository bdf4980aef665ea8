//! The block devices on a real file: io_uring and pread agree, big batches pipeline through
//! the ring, bad requests are refused.

mod common;

use common::disk_tempdir;
use csd_engine::device::{
    open_path, BlockDevice, DevError, EngineChoice, OpenDeviceOptions, ReadReq, UringOptions,
    WriteReq,
};
use csd_engine::{AlignedBuf, IoEngine};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `len` seeded pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    ChaCha8Rng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

#[test]
fn uring_and_pread_agree_on_large_batches() {
    let dir = disk_tempdir();
    let path = dir.path().join("dev");
    // Small ring (depth 4, 64 KiB buffers) so a batch needs many refills and chunk splits.
    let opts = OpenDeviceOptions {
        create: true,
        uring: UringOptions {
            depth: 4,
            buf_size: 64 << 10,
            rings: 1,
        },
        ..Default::default()
    };
    let dev = open_path(&path, Some(8 << 20), &opts).unwrap();
    assert_eq!(dev.mode().engine, IoEngine::IoUring);
    assert!(dev.mode().direct);
    assert_eq!(dev.len(), 8 << 20);
    let data = pattern(3 << 20, 7);
    // Unaligned caller memory is fine: the ring copies through its own aligned buffers.
    let reqs = [
        WriteReq {
            offset: 0,
            buf: &data[..1 << 20],
        },
        WriteReq {
            offset: 4 << 20,
            buf: &data[1 << 20..(3 << 20) - 4096],
        },
        WriteReq {
            offset: (7 << 20) + 4096,
            buf: &data[1..4097],
        },
    ];
    dev.write_at(&reqs).unwrap();
    dev.sync().unwrap();

    let popts = OpenDeviceOptions {
        engine: EngineChoice::Psync,
        ..Default::default()
    };
    let pdev = open_path(&path, None, &popts).unwrap();
    assert_eq!(pdev.mode().engine, IoEngine::Psync);
    for d in [&dev, &pdev] {
        let mut a = AlignedBuf::new(1 << 20, 4096);
        let mut b = vec![0u8; (2 << 20) - 4096 + 1];
        let mut c = AlignedBuf::new(4096, 4096);
        let mut reqs = [
            ReadReq {
                offset: 0,
                buf: a.as_mut_slice(),
            },
            ReadReq {
                offset: 4 << 20,
                buf: &mut b[1..],
            }, // unaligned destination
            ReadReq {
                offset: (7 << 20) + 4096,
                buf: c.as_mut_slice(),
            },
        ];
        d.read_at(&mut reqs).unwrap();
        assert_eq!(a.as_slice(), &data[..1 << 20]);
        assert_eq!(&b[1..], &data[1 << 20..(3 << 20) - 4096]);
        assert_eq!(c.as_slice(), &data[1..4097]);
    }
    let s = dev.stats();
    assert!(
        s.read_ios.load(std::sync::atomic::Ordering::Relaxed) >= 48,
        "chunks of 64 KiB expected"
    );
    assert!(s.bytes_written.load(std::sync::atomic::Ordering::Relaxed) >= 3 << 20);
}

#[test]
fn bad_requests_are_refused() {
    let dir = disk_tempdir();
    let path = dir.path().join("dev");
    let opts = OpenDeviceOptions {
        create: true,
        ..Default::default()
    };
    let dev = open_path(&path, Some(1 << 20), &opts).unwrap();
    let buf = vec![0u8; 8192];
    let e = dev
        .write_at(&[WriteReq {
            offset: 100,
            buf: &buf[..4096],
        }])
        .unwrap_err();
    assert!(matches!(e, DevError::Misaligned { .. }), "{e}");
    let e = dev
        .write_at(&[WriteReq {
            offset: 0,
            buf: &buf[..1000],
        }])
        .unwrap_err();
    assert!(matches!(e, DevError::Misaligned { .. }), "{e}");
    let e = dev
        .write_at(&[WriteReq {
            offset: (1 << 20) - 4096,
            buf: &buf,
        }])
        .unwrap_err();
    assert!(matches!(e, DevError::OutOfRange { .. }), "{e}");
    let mut rb = vec![0u8; 4096];
    let e = dev
        .read_at(&mut [ReadReq {
            offset: 1 << 20,
            buf: &mut rb,
        }])
        .unwrap_err();
    assert!(matches!(e, DevError::OutOfRange { .. }), "{e}");
    // A directory is not a device.
    let e = open_path(dir.path(), None, &OpenDeviceOptions::default())
        .err()
        .unwrap();
    assert_eq!(e.kind(), std::io::ErrorKind::IsADirectory);
}

/// A ring that fails (the kernel refusing a submission, injected at the ring) does not take
/// the device down: it fails over to pread/pwrite on the same file, once, logged and
/// counted, and every read and write stays exact.
#[test]
fn a_failed_ring_fails_over_to_pread() {
    use csd_engine::device::UringDevice;
    use std::os::unix::fs::OpenOptionsExt;
    use std::sync::atomic::Ordering;
    // A 4 MiB io_uring device over a new O_DIRECT file in `dir`.
    let device = |dir: &tempfile::TempDir| {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_DIRECT)
            .open(dir.path().join("dev"))
            .unwrap();
        file.set_len(4 << 20).unwrap();
        let opts = UringOptions {
            depth: 4,
            buf_size: 64 << 10,
            rings: 2,
        };
        UringDevice::new(std::sync::Arc::new(file), 4 << 20, 4096, true, &opts).unwrap()
    };
    let dir = disk_tempdir();
    let dev = device(&dir);
    let write = |dev: &UringDevice, offset: u64, data: &[u8]| {
        let mut buf = AlignedBuf::new(data.len(), 4096);
        buf.as_mut_slice().copy_from_slice(data);
        dev.write_at(&[WriteReq {
            offset,
            buf: buf.as_slice(),
        }])
    };
    let read = |dev: &UringDevice, offset: u64, len: usize| {
        let mut buf = AlignedBuf::new(len, 4096);
        dev.read_at(&mut [ReadReq {
            offset,
            buf: buf.as_mut_slice(),
        }])
        .map(|()| buf.as_slice().to_vec())
    };
    let a = pattern(256 << 10, 1);
    write(&dev, 0, &a).unwrap();
    assert!(!dev.failed_over());

    // The next submission fails: the read still returns the right bytes, through pread.
    dev.fail_next_submits();
    assert_eq!(read(&dev, 0, a.len()).unwrap(), a);
    assert!(dev.failed_over());
    assert_eq!(dev.stats().ring_failovers.load(Ordering::Relaxed), 1);
    // Writes and reads go on exactly, and the switch is counted once.
    let b = pattern(512 << 10, 2);
    write(&dev, 1 << 20, &b).unwrap();
    assert_eq!(read(&dev, 1 << 20, b.len()).unwrap(), b);
    assert_eq!(read(&dev, 0, a.len()).unwrap(), a);
    assert_eq!(dev.stats().ring_failovers.load(Ordering::Relaxed), 1);

    // A write that meets the failure lands too.
    let dir2 = disk_tempdir();
    let dev2 = device(&dir2);
    dev2.fail_next_submits();
    write(&dev2, 4096, &b).unwrap();
    assert!(dev2.failed_over());
    assert_eq!(read(&dev2, 4096, b.len()).unwrap(), b);
}
