//! Opening a store: formatting a device, and opening an existing store in named steps (read
//! and check the superblock, pick the newest root, load the manifest, rebuild the
//! allocation and the persisted sequences). Opening never writes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use half::f16;
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{AtomicCounters, KvStore, LayerState, SeqState, StoreConfig, StoreOptions};
use crate::alloc::{Extent, ExtentAllocator};
use crate::device::{self, BlockDevice, ReadReq, WriteReq};
use crate::error::KvError;
use crate::format::{self, Root, SeqSnap, SuperError, Superblock};
use crate::layout::{Geometry, PageShape};
use crate::sys::AlignedBuf;

fn hist() -> Mutex<Histogram<u64>> {
    Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"))
}

/// A fresh store id (never 0): one draw of a generator seeded from the clock and the process
/// id, so stores formatted at different times or by different processes differ.
fn new_store_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = ChaCha8Rng::seed_from_u64(t ^ ((std::process::id() as u64) << 32));
    rng.random::<u64>().max(1)
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

impl KvStore {
    /// Format `path` (created if missing; an existing file or block device is overwritten)
    /// as an empty store.
    pub fn create(path: &Path, cfg: &StoreConfig) -> Result<KvStore, KvError> {
        cfg.shape.validate()?;
        let loc = path_str(path);
        if path.is_dir() {
            return Err(KvError::Open {
                path: loc,
                source: std::io::Error::other("is a directory"),
            });
        }
        // Refuse before creating anything when the size cannot hold one page group.
        Geometry::new(cfg.shape, 4096, cfg.capacity)?;
        let mut dopts = cfg.options.device;
        dopts.create = true;
        let dev = device::open_path(path, Some(cfg.capacity), &dopts).map_err(|source| {
            KvError::Open {
                path: loc.clone(),
                source,
            }
        })?;
        let mut s = KvStore::format_device(dev, cfg.shape, cfg.options)?;
        s.location = loc;
        Ok(s)
    }

    /// Open an existing store, restoring its persisted sequences.
    pub fn open(path: &Path, opts: &StoreOptions) -> Result<KvStore, KvError> {
        let loc = path_str(path);
        if path.is_dir() {
            return Err(KvError::Open {
                path: loc,
                source: std::io::Error::other("is a directory"),
            });
        }
        let mut dopts = opts.device;
        dopts.create = false;
        let dev = device::open_path(path, None, &dopts).map_err(|source| KvError::Open {
            path: loc.clone(),
            source,
        })?;
        KvStore::open_device_at(dev, *opts, loc)
    }

    /// Open `path` if it holds a store of `cfg.shape`; create it if it is missing or empty,
    /// and re-create it (with a logged reason) if a crash during its format left it without
    /// a valid superblock: a blank first page, or this format's magic with a superblock
    /// that fails its checksum or disagrees with the file. Anything else (another shape,
    /// foreign data, a newer format) is an error and the file is left alone.
    pub fn open_or_create(path: &Path, cfg: &StoreConfig) -> Result<KvStore, KvError> {
        let loc = path_str(path);
        let fresh = match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => {
                return Err(KvError::Open {
                    path: loc,
                    source: e,
                })
            }
            Ok(m) if m.is_dir() => {
                return Err(KvError::Open {
                    path: loc,
                    source: std::io::Error::other("is a directory"),
                })
            }
            Ok(m) => m.is_file() && m.len() == 0,
        };
        if fresh {
            return KvStore::create(path, cfg);
        }
        let s = match KvStore::open(path, &cfg.options) {
            Ok(s) => s,
            Err(e) => match unfinished_format(path, &e) {
                Some(why) => {
                    tracing::warn!(
                        path = %loc,
                        error = %e,
                        "the KV store was never fully formatted ({why}); formatting it again \
                         (its persisted prefixes, if any, are lost)"
                    );
                    return KvStore::create(path, cfg);
                }
                None => return Err(e),
            },
        };
        if s.geo.shape != cfg.shape {
            return Err(KvError::ShapeMismatch {
                stored: s.geo.shape,
                requested: cfg.shape,
            });
        }
        Ok(s)
    }

    /// Format a device as an empty store.
    pub fn format_device(
        dev: Box<dyn BlockDevice>,
        shape: PageShape,
        opts: StoreOptions,
    ) -> Result<KvStore, KvError> {
        let page_align = (dev.block_size() as u64).max(4096);
        let geo = Geometry::new(shape, page_align, dev.len())?;
        let store_id = new_store_id();
        let sb = Superblock {
            store_len: geo.store_len,
            page_align: geo.page_align as u32,
            shape,
            head_page: geo.head_page as u64,
            unit_bytes: geo.unit_bytes as u64,
            data_offset: geo.data_offset,
            units: geo.units,
            store_id,
        };
        let pa = geo.page_align as usize;
        let mut hdr = AlignedBuf::new(3 * pa, pa);
        sb.encode(&mut hdr.as_mut_slice()[..pa]);
        let root = Root {
            store_id,
            generation: 0,
            manifest: Extent { start: 0, len: 0 },
            manifest_len: 0,
            manifest_crc: 0,
            journal: Extent { start: 0, len: 0 },
        };
        root.encode(&mut hdr.as_mut_slice()[pa..2 * pa]);
        // Slot 1 stays zero (empty). Write slots first, then the superblock, so a crash
        // mid-format leaves no valid superblock.
        let io = |e| KvError::io("formatting the store", e);
        dev.write_at(&[WriteReq {
            offset: pa as u64,
            buf: &hdr.as_slice()[pa..],
        }])
        .map_err(io)?;
        dev.sync().map_err(io)?;
        dev.write_at(&[WriteReq {
            offset: 0,
            buf: &hdr.as_slice()[..pa],
        }])
        .map_err(io)?;
        dev.sync().map_err(io)?;
        Ok(KvStore::assemble(
            dev,
            geo,
            store_id,
            0,
            None,
            opts,
            "<device>".into(),
        ))
    }

    /// Open a store on a device, restoring its persisted sequences.
    pub fn open_device(dev: Box<dyn BlockDevice>, opts: StoreOptions) -> Result<KvStore, KvError> {
        KvStore::open_device_at(dev, opts, "<device>".into())
    }

    /// Open the store on `dev` (named `loc` in errors), restoring its persisted sequences.
    fn open_device_at(
        dev: Box<dyn BlockDevice>,
        opts: StoreOptions,
        loc: String,
    ) -> Result<KvStore, KvError> {
        let (sb, geo, hdr) = read_header(&*dev, &loc)?;
        let root = newest_root(&hdr, &geo, &sb, &loc)?;
        let mut alloc = ExtentAllocator::new(geo.units);
        let (manifest, snaps, index) = load_manifest(&*dev, &geo, &sb, &root, &mut alloc, &loc)?;
        let mut store = KvStore::assemble(
            dev,
            geo,
            sb.store_id,
            root.generation,
            manifest,
            opts,
            loc.clone(),
        );
        store.restore_snapshots(snaps, alloc, root.generation, loc)?;
        store.recover_index(&index, root.journal)?;
        Ok(store)
    }

    /// Take up the persisted sequences: reserve every extent they hold in `alloc` (which
    /// already holds the manifest's), rebuild their state, and make `alloc` the store's.
    fn restore_snapshots(
        &mut self,
        snaps: Vec<SeqSnap>,
        mut alloc: ExtentAllocator,
        generation: u64,
        loc: String,
    ) -> Result<(), KvError> {
        for snap in snaps {
            for (li, l) in snap.layers.iter().enumerate() {
                for &e in &l.extents {
                    if !alloc.reserve(e) {
                        return Err(KvError::ManifestCorrupt {
                            path: loc,
                            generation,
                            reason: format!(
                                "sequence {} layer {li}: extent {e:?} overlaps another",
                                snap.seq
                            ),
                        });
                    }
                }
            }
            if self.seqs.contains_key(&snap.seq) {
                return Err(KvError::ManifestCorrupt {
                    path: loc,
                    generation,
                    reason: format!("sequence {} listed twice", snap.seq),
                });
            }
            let st = self.state_from_snapshot(&snap);
            self.seqs.insert(snap.seq, st);
        }
        self.alloc = alloc;
        Ok(())
    }

    fn assemble(
        dev: Box<dyn BlockDevice>,
        geo: Geometry,
        store_id: u64,
        generation: u64,
        manifest: Option<Extent>,
        opts: StoreOptions,
        location: String,
    ) -> KvStore {
        KvStore {
            dev: dev.into(),
            alloc: ExtentAllocator::new(geo.units),
            geo,
            store_id,
            seqs: HashMap::new(),
            generation,
            manifest,
            opts,
            counters: AtomicCounters::default(),
            read_lat: hist(),
            write_lat: hist(),
            location,
            refs: HashMap::new(),
            index: Default::default(),
            model: None,
            journal: None,
            journal_pos: 0,
            journal_seq: 0,
            prefix: Default::default(),
        }
    }

    fn state_from_snapshot(&self, snap: &SeqSnap) -> SeqState {
        let g = &self.geo;
        let (h, t, d) = (g.heads(), g.block_tokens(), g.head_dim());
        let layers = snap
            .layers
            .iter()
            .map(|l| {
                let mut tail_k = vec![f16::ZERO; h * t * d];
                let mut tail_v = vec![f16::ZERO; h * t * d];
                let n = l.tail_tokens as usize * d;
                for head in 0..h {
                    tail_k[head * t * d..head * t * d + n]
                        .copy_from_slice(&l.tail_k[head * n..(head + 1) * n]);
                    tail_v[head * t * d..head * t * d + n]
                        .copy_from_slice(&l.tail_v[head * n..(head + 1) * n]);
                }
                LayerState {
                    extents: l.extents.clone(),
                    full_blocks: l.full_blocks,
                    crcs: l.crcs.clone(),
                    tail_k,
                    tail_v,
                    tail_tokens: l.tail_tokens,
                }
            })
            .collect();
        SeqState {
            layers,
            snapshot: Some(snap.clone()),
        }
    }
}

/// Read the superblock and the two root slots: `3 × page_align` bytes at offset 0.
fn read_header_bytes(dev: &dyn BlockDevice, pa: usize) -> Result<AlignedBuf, KvError> {
    let mut hdr = AlignedBuf::new(3 * pa, pa);
    dev.read_at(&mut [ReadReq {
        offset: 0,
        buf: hdr.as_mut_slice(),
    }])
    .map_err(|e| KvError::io("reading the store header", e))?;
    Ok(hdr)
}

/// Read the header, decode the superblock and check its geometry against the shape and the
/// device; the header bytes come back read at the store's own page alignment.
fn read_header(
    dev: &dyn BlockDevice,
    loc: &str,
) -> Result<(Superblock, Geometry, AlignedBuf), KvError> {
    let pa0 = (dev.block_size() as u64).max(4096) as usize;
    if dev.len() < pa0 as u64 * 3 {
        return Err(KvError::NotAStore { path: loc.into() });
    }
    let mut hdr = read_header_bytes(dev, pa0)?;
    let sb = decode_superblock(&hdr.as_slice()[..pa0], loc)?;
    let geo = check_geometry(&sb, dev, loc)?;
    let pa = geo.page_align as usize;
    if pa != pa0 {
        hdr = read_header_bytes(dev, pa)?;
    }
    Ok((sb, geo, hdr))
}

/// Decode the superblock; a foreign file, another version and a corrupt header are errors.
fn decode_superblock(bytes: &[u8], loc: &str) -> Result<Superblock, KvError> {
    match Superblock::decode(bytes) {
        Ok(sb) => Ok(sb),
        Err(SuperError::BadMagic) => Err(KvError::NotAStore { path: loc.into() }),
        Err(SuperError::Version(v)) => Err(KvError::UnsupportedVersion {
            path: loc.into(),
            found: v,
            supported: format::VERSION,
        }),
        Err(SuperError::Corrupt(reason)) => Err(KvError::CorruptHeader {
            path: loc.into(),
            reason,
        }),
    }
}

/// The geometry the superblock's shape implies, checked against the fields it records and
/// against the device (size and block size).
fn check_geometry(sb: &Superblock, dev: &dyn BlockDevice, loc: &str) -> Result<Geometry, KvError> {
    let corrupt = |reason: String| KvError::CorruptHeader {
        path: loc.into(),
        reason,
    };
    if sb.store_len > dev.len() {
        return Err(corrupt(format!(
            "store is {} bytes but the device has {}",
            sb.store_len,
            dev.len()
        )));
    }
    let geo = Geometry::new(sb.shape, sb.page_align as u64, sb.store_len)?;
    if geo.page_align != sb.page_align as u64
        || geo.unit_bytes as u64 != sb.unit_bytes
        || geo.head_page as u64 != sb.head_page
        || geo.data_offset != sb.data_offset
        || geo.units != sb.units
    {
        return Err(corrupt("geometry fields disagree with the shape".into()));
    }
    if (geo.page_align as usize) % dev.block_size() != 0 {
        return Err(corrupt(format!(
            "page alignment {} is not a multiple of the device block size {}",
            geo.page_align,
            dev.block_size()
        )));
    }
    Ok(geo)
}

/// The newest valid root slot of this store; a torn or foreign slot is ignored, a slot of
/// another version is an error.
fn newest_root(
    hdr: &AlignedBuf,
    geo: &Geometry,
    sb: &Superblock,
    loc: &str,
) -> Result<Root, KvError> {
    let pa = geo.page_align as usize;
    let mut best: Option<Root> = None;
    for i in 0..2 {
        match Root::decode(&hdr.as_slice()[(i + 1) * pa..(i + 2) * pa]) {
            Ok(Some(r)) if r.store_id == sb.store_id => {
                if best.is_none_or(|b| r.generation > b.generation) {
                    best = Some(r);
                }
            }
            Ok(_) => {}
            Err(v) => {
                return Err(KvError::UnsupportedVersion {
                    path: loc.into(),
                    found: v,
                    supported: format::VERSION,
                })
            }
        }
    }
    best.ok_or_else(|| KvError::ManifestCorrupt {
        path: loc.into(),
        generation: 0,
        reason: "no valid root slot".into(),
    })
}

/// What a manifest holds: its extent (none when nothing was persisted), the persisted
/// sequences and the prefix index's checkpoint.
type LoadedManifest = (Option<Extent>, Vec<SeqSnap>, Vec<u8>);

/// Read and verify the manifest `root` points at (if any) and reserve its extent in
/// `alloc`: its extent and the persisted sequences it lists.
fn load_manifest(
    dev: &dyn BlockDevice,
    geo: &Geometry,
    sb: &Superblock,
    root: &Root,
    alloc: &mut ExtentAllocator,
    loc: &str,
) -> Result<LoadedManifest, KvError> {
    if root.manifest_len == 0 {
        return Ok((None, Vec::new(), Vec::new()));
    }
    let mcorrupt = |reason: String| KvError::ManifestCorrupt {
        path: loc.into(),
        generation: root.generation,
        reason,
    };
    let m = root.manifest;
    if m.len == 0 || m.end() > geo.units || root.manifest_len > m.len * geo.unit_bytes as u64 {
        return Err(mcorrupt(format!(
            "manifest extent {m:?} of {} bytes is outside the store",
            root.manifest_len
        )));
    }
    let mut buf = AlignedBuf::new(m.len as usize * geo.unit_bytes, geo.page_align as usize);
    dev.read_at(&mut [ReadReq {
        offset: geo.unit_offset(m.start),
        buf: buf.as_mut_slice(),
    }])
    .map_err(|e| KvError::io("reading the manifest", e))?;
    let body = &buf.as_slice()[..root.manifest_len as usize];
    if format::crc(body) != root.manifest_crc {
        return Err(mcorrupt("manifest checksum does not match its root".into()));
    }
    let (g, snaps, index) =
        format::decode_manifest(body, sb.store_id, &sb.shape, geo.units).map_err(mcorrupt)?;
    if g != root.generation {
        return Err(mcorrupt(format!(
            "manifest is generation {g}, root says {}",
            root.generation
        )));
    }
    if !alloc.reserve(m) {
        return Err(mcorrupt("manifest extent overlaps".into()));
    }
    Ok((Some(m), snaps, index.to_vec()))
}

/// Why the store at `path`, which failed to open with `err`, is one whose format never
/// finished (a crash between sizing the file and writing its superblock, or during that
/// write), or `None` when it is something else and must be left alone.
fn unfinished_format(path: &Path, err: &KvError) -> Option<&'static str> {
    match err {
        // Our magic, but a torn or corrupt superblock: format writes it last, once.
        KvError::CorruptHeader { .. } => Some("its superblock is torn or corrupt"),
        // No magic: ours only if the superblock's page is still blank.
        KvError::NotAStore { .. } => first_page_blank(path).then_some("its superblock is blank"),
        _ => None,
    }
}

/// Whether the first 4 KiB of `path` (or all of it, if shorter) are zero bytes.
fn first_page_blank(path: &Path) -> bool {
    use std::io::Read;
    let mut page = Vec::with_capacity(4096);
    match std::fs::File::open(path).and_then(|f| f.take(4096).read_to_end(&mut page)) {
        Ok(_) => page.iter().all(|&b| b == 0),
        Err(_) => false,
    }
}
