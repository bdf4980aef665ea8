//! On-disk encodings: superblock, root slots, manifest. All integers little-endian; every
//! structure carries a magic, a version and a CRC-32C. See docs/STORAGE.md.

use half::f16;

use crate::alloc::Extent;
use crate::layout::PageShape;
use crate::sys::f16_as_bytes;

/// Version 2 added the prefix cache: a journal extent in the root and an index section in
/// the manifest.
pub const VERSION: u32 = 2;
pub const SUPER_MAGIC: &[u8; 8] = b"IIKVSTOR";
pub const ROOT_MAGIC: &[u8; 8] = b"IIKVROOT";
pub const MANIFEST_MAGIC: &[u8; 8] = b"IIKVMANI";
pub const DTYPE_F16: u32 = 1;

/// Bytes of the superblock covered by its CRC (the CRC follows).
pub(crate) const SUPER_LEN: usize = 88;
pub(crate) const ROOT_LEN: usize = 76;

pub fn crc(bytes: &[u8]) -> u32 {
    crc32c::crc32c(bytes)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub store_len: u64,
    pub page_align: u32,
    pub shape: PageShape,
    pub head_page: u64,
    pub unit_bytes: u64,
    pub data_offset: u64,
    pub units: u64,
    pub store_id: u64,
}

/// Why a superblock could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum SuperError {
    BadMagic,
    Version(u32),
    Corrupt(String),
}

struct W(Vec<u8>);

impl W {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// A bounds-checked little-endian reader.
pub struct R<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> R<'a> {
    pub fn new(b: &'a [u8]) -> R<'a> {
        R { b, at: 0 }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| {
                format!(
                    "truncated: need {n} bytes at offset {}, have {}",
                    self.at,
                    self.b.len()
                )
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub fn pos(&self) -> usize {
        self.at
    }
}

impl Superblock {
    pub fn encode(&self, out: &mut [u8]) {
        let mut w = W(Vec::with_capacity(SUPER_LEN + 4));
        w.bytes(SUPER_MAGIC);
        w.u32(VERSION);
        w.u32(SUPER_LEN as u32);
        w.u64(self.store_len);
        w.u32(self.page_align);
        w.u32(self.shape.layers);
        w.u32(self.shape.kv_heads);
        w.u32(self.shape.head_dim);
        w.u32(self.shape.block_tokens);
        w.u32(DTYPE_F16);
        w.u64(self.head_page);
        w.u64(self.unit_bytes);
        w.u64(self.data_offset);
        w.u64(self.units);
        w.u64(self.store_id);
        debug_assert_eq!(w.0.len(), SUPER_LEN);
        let c = crc(&w.0);
        w.u32(c);
        out.fill(0);
        out[..w.0.len()].copy_from_slice(&w.0);
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, SuperError> {
        let mut r = R::new(b);
        let c = |e: String| SuperError::Corrupt(e);
        if r.take(8).map_err(c)? != SUPER_MAGIC {
            return Err(SuperError::BadMagic);
        }
        let version = r.u32().map_err(c)?;
        if version != VERSION {
            return Err(SuperError::Version(version));
        }
        let len = r.u32().map_err(c)? as usize;
        if len != SUPER_LEN || b.len() < SUPER_LEN + 4 {
            return Err(SuperError::Corrupt(format!("header length {len}")));
        }
        let stored = u32::from_le_bytes(b[SUPER_LEN..SUPER_LEN + 4].try_into().expect("4 bytes"));
        let actual = crc(&b[..SUPER_LEN]);
        if stored != actual {
            return Err(SuperError::Corrupt(format!(
                "superblock checksum {actual:#010x} does not match stored {stored:#010x}"
            )));
        }
        let store_len = r.u64().map_err(c)?;
        let page_align = r.u32().map_err(c)?;
        let shape = PageShape {
            layers: r.u32().map_err(c)?,
            kv_heads: r.u32().map_err(c)?,
            head_dim: r.u32().map_err(c)?,
            block_tokens: r.u32().map_err(c)?,
        };
        let dtype = r.u32().map_err(c)?;
        if dtype != DTYPE_F16 {
            return Err(SuperError::Corrupt(format!("unknown element type {dtype}")));
        }
        Ok(Superblock {
            store_len,
            page_align,
            shape,
            head_page: r.u64().map_err(c)?,
            unit_bytes: r.u64().map_err(c)?,
            data_offset: r.u64().map_err(c)?,
            units: r.u64().map_err(c)?,
            store_id: r.u64().map_err(c)?,
        })
    }
}

/// One root slot: points at the manifest of one generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Root {
    pub store_id: u64,
    pub generation: u64,
    pub manifest: Extent,
    pub manifest_len: u64,
    pub manifest_crc: u32,
    /// The prefix index's journal (changes since the manifest's checkpoint); empty if none.
    pub journal: Extent,
}

impl Root {
    pub fn encode(&self, out: &mut [u8]) {
        let mut w = W(Vec::with_capacity(ROOT_LEN + 4));
        w.bytes(ROOT_MAGIC);
        w.u32(VERSION);
        w.u32(0);
        w.u64(self.store_id);
        w.u64(self.generation);
        w.u64(self.manifest.start);
        w.u64(self.manifest.len);
        w.u64(self.manifest_len);
        w.u32(self.manifest_crc);
        w.u64(self.journal.start);
        w.u64(self.journal.len);
        debug_assert_eq!(w.0.len(), ROOT_LEN);
        let c = crc(&w.0);
        w.u32(c);
        out.fill(0);
        out[..w.0.len()].copy_from_slice(&w.0);
    }

    /// `Ok(None)`: an empty or torn slot (ignored). `Err(v)`: written by another version.
    pub fn decode(b: &[u8]) -> Result<Option<Root>, u32> {
        if b.len() < ROOT_LEN + 4 || &b[..8] != ROOT_MAGIC {
            return Ok(None);
        }
        let stored = u32::from_le_bytes(b[ROOT_LEN..ROOT_LEN + 4].try_into().expect("4 bytes"));
        if crc(&b[..ROOT_LEN]) != stored {
            return Ok(None);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VERSION {
            return Err(version);
        }
        Ok(Some(Root {
            store_id: u64_at(16),
            generation: u64_at(24),
            manifest: Extent {
                start: u64_at(32),
                len: u64_at(40),
            },
            manifest_len: u64_at(48),
            manifest_crc: u32_at(56),
            journal: Extent {
                start: u64_at(60),
                len: u64_at(68),
            },
        }))
    }
}

/// The persisted state of one layer of one sequence.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerSnap {
    pub extents: Vec<Extent>,
    pub full_blocks: u32,
    /// One CRC-32C per page: `full_blocks × kv_heads`, block-major.
    pub crcs: Vec<u32>,
    pub tail_tokens: u32,
    /// Tail K rows, head-major: `kv_heads × tail_tokens × head_dim`.
    pub tail_k: Vec<f16>,
    pub tail_v: Vec<f16>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SeqSnap {
    pub seq: u64,
    pub layers: Vec<LayerSnap>,
}

/// A manifest: the persisted sequences, then the prefix index checkpoint (`index`, opaque
/// here: see `store::journal`) as a u32 length and its bytes.
pub fn encode_manifest(
    store_id: u64,
    generation: u64,
    seqs: &[(u64, &SeqSnap)],
    index: &[u8],
) -> Vec<u8> {
    let mut w = W(Vec::new());
    w.bytes(MANIFEST_MAGIC);
    w.u32(VERSION);
    w.u32(0);
    w.u64(store_id);
    w.u64(generation);
    w.u32(seqs.len() as u32);
    for (id, s) in seqs {
        w.u64(*id);
        w.u32(s.layers.len() as u32);
        for l in &s.layers {
            w.u32(l.full_blocks);
            w.u32(l.tail_tokens);
            w.u32(l.extents.len() as u32);
            w.u32(l.crcs.len() as u32);
            for e in &l.extents {
                w.u64(e.start);
                w.u64(e.len);
            }
            for &c in &l.crcs {
                w.u32(c);
            }
            w.bytes(f16_as_bytes(&l.tail_k));
            w.bytes(f16_as_bytes(&l.tail_v));
        }
    }
    w.u32(index.len() as u32);
    w.bytes(index);
    let c = crc(&w.0);
    w.u32(c);
    w.0
}

/// A decoded manifest: its generation, the persisted sequences and the index checkpoint's
/// bytes.
pub type Manifest<'a> = (u64, Vec<SeqSnap>, &'a [u8]);

/// Decode a manifest, checking it against the store's shape and size.
pub fn decode_manifest<'a>(
    b: &'a [u8],
    store_id: u64,
    shape: &PageShape,
    units: u64,
) -> Result<Manifest<'a>, String> {
    if b.len() < 4 {
        return Err("manifest shorter than its checksum".into());
    }
    let (body, tail) = b.split_at(b.len() - 4);
    let stored = u32::from_le_bytes(tail.try_into().expect("4 bytes"));
    if crc(body) != stored {
        return Err(format!(
            "manifest checksum {:#010x} does not match stored {stored:#010x}",
            crc(body)
        ));
    }
    let mut r = R::new(body);
    if r.take(8)? != MANIFEST_MAGIC {
        return Err("bad manifest magic".into());
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(format!(
            "manifest version {version}, this build reads {VERSION}"
        ));
    }
    r.u32()?;
    if r.u64()? != store_id {
        return Err("manifest belongs to another store".into());
    }
    let generation = r.u64()?;
    let n = r.u32()?;
    let heads = shape.kv_heads as usize;
    let row = shape.head_dim as usize;
    let mut seqs = Vec::new();
    for _ in 0..n {
        let seq = r.u64()?;
        let nl = r.u32()?;
        if nl != shape.layers {
            return Err(format!(
                "sequence {seq} has {nl} layers, store shape has {}",
                shape.layers
            ));
        }
        let mut layers = Vec::with_capacity(nl as usize);
        for li in 0..nl {
            let full_blocks = r.u32()?;
            let tail_tokens = r.u32()?;
            let ne = r.u32()? as usize;
            let nc = r.u32()? as usize;
            if tail_tokens >= shape.block_tokens {
                return Err(format!(
                    "sequence {seq} layer {li}: tail of {tail_tokens} tokens"
                ));
            }
            if nc != full_blocks as usize * heads {
                return Err(format!(
                    "sequence {seq} layer {li}: {nc} checksums for {full_blocks} blocks"
                ));
            }
            if ne > body.len() / 16 {
                return Err(format!("sequence {seq} layer {li}: {ne} extents"));
            }
            let mut extents = Vec::with_capacity(ne);
            let mut cap = 0u64;
            for _ in 0..ne {
                let e = Extent {
                    start: r.u64()?,
                    len: r.u64()?,
                };
                if e.len == 0 || e.start.checked_add(e.len).is_none_or(|end| end > units) {
                    return Err(format!(
                        "sequence {seq} layer {li}: extent {e:?} outside the store"
                    ));
                }
                cap += e.len;
                extents.push(e);
            }
            if cap < full_blocks as u64 {
                return Err(format!(
                    "sequence {seq} layer {li}: {full_blocks} blocks in {cap} units"
                ));
            }
            let crc_bytes = r.take(nc * 4)?;
            let crcs = crc_bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().expect("4")))
                .collect();
            let tn = heads * tail_tokens as usize * row;
            let read_f16 = |r: &mut R| -> Result<Vec<f16>, String> {
                let raw = r.take(tn * 2)?;
                Ok(raw
                    .chunks_exact(2)
                    .map(|c| f16::from_le_bytes([c[0], c[1]]))
                    .collect())
            };
            let tail_k = read_f16(&mut r)?;
            let tail_v = read_f16(&mut r)?;
            layers.push(LayerSnap {
                extents,
                full_blocks,
                crcs,
                tail_tokens,
                tail_k,
                tail_v,
            });
        }
        seqs.push(SeqSnap { seq, layers });
    }
    let ni = r.u32()? as usize;
    let index = r.take(ni)?;
    if r.pos() != body.len() {
        return Err(format!("{} trailing bytes", body.len() - r.pos()));
    }
    Ok((generation, seqs, index))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> PageShape {
        PageShape {
            layers: 1,
            kv_heads: 2,
            head_dim: 2,
            block_tokens: 4,
        }
    }

    #[test]
    fn superblock_round_trip_and_version() {
        let sb = Superblock {
            store_len: 1 << 20,
            page_align: 4096,
            shape: shape(),
            head_page: 4096,
            unit_bytes: 8192,
            data_offset: 65536,
            units: 120,
            store_id: 42,
        };
        let mut b = vec![0u8; 4096];
        sb.encode(&mut b);
        assert_eq!(Superblock::decode(&b).unwrap(), sb);
        let mut v = b.clone();
        v[8] = 9;
        assert_eq!(Superblock::decode(&v), Err(SuperError::Version(9)));
        let mut m = b.clone();
        m[0] = b'X';
        assert_eq!(Superblock::decode(&m), Err(SuperError::BadMagic));
        let mut c = b.clone();
        c[20] ^= 1;
        assert!(matches!(
            Superblock::decode(&c),
            Err(SuperError::Corrupt(_))
        ));
    }

    #[test]
    fn root_round_trip_and_torn() {
        let r = Root {
            store_id: 7,
            generation: 3,
            manifest: Extent { start: 5, len: 2 },
            manifest_len: 100,
            manifest_crc: 0xdead_beef,
            journal: Extent { start: 9, len: 3 },
        };
        let mut b = vec![0u8; 4096];
        r.encode(&mut b);
        assert_eq!(Root::decode(&b), Ok(Some(r)));
        b[30] ^= 0x10;
        assert_eq!(Root::decode(&b), Ok(None));
        assert_eq!(Root::decode(&[0u8; 4096]), Ok(None));
    }

    #[test]
    fn manifest_round_trip_and_corruption() {
        let s = SeqSnap {
            seq: 9,
            layers: vec![LayerSnap {
                extents: vec![Extent { start: 1, len: 4 }],
                full_blocks: 2,
                crcs: vec![1, 2, 3, 4],
                tail_tokens: 1,
                tail_k: vec![f16::from_f32(1.0); 4],
                tail_v: vec![f16::from_f32(2.0); 4],
            }],
        };
        let m = encode_manifest(11, 4, &[(9, &s)], b"index bytes");
        let (g, seqs, index) = decode_manifest(&m, 11, &shape(), 10).unwrap();
        assert_eq!(g, 4);
        assert_eq!(seqs, vec![s]);
        assert_eq!(index, b"index bytes");
        for i in [0, 13, m.len() / 2, m.len() - 1] {
            let mut c = m.clone();
            c[i] ^= 0x40;
            assert!(
                decode_manifest(&c, 11, &shape(), 10).is_err(),
                "flip at {i} accepted"
            );
        }
        assert!(
            decode_manifest(&m, 12, &shape(), 10).is_err(),
            "foreign store id accepted"
        );
        assert!(
            decode_manifest(&m, 11, &shape(), 3).is_err(),
            "extent past end accepted"
        );
    }
}
