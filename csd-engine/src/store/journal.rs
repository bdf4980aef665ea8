//! The prefix index on flash: a checkpoint (every entry, inside the manifest the root points
//! at) and, after it, a journal of the changes made since, in its own extent. Journal
//! batches start on a fresh page each, so appending never rewrites a page that holds an
//! acknowledged batch; each carries the store id, the generation of the root it follows, a
//! sequence number and a CRC-32C, so replay stops at the first batch that is torn, stale or
//! out of order. Records are bincode inside that envelope (little-endian, fixed-width ints).

use serde::{Deserialize, Serialize};

use crate::format;
use crate::prefix::BlockKey;

/// Magic of a journal batch.
pub const JOURNAL_MAGIC: &[u8; 8] = b"IIKVJRNL";
/// Version of the batch envelope and of the records inside.
pub const JOURNAL_VERSION: u32 = 1;
/// Header bytes before the payload: magic, version, payload length, store id, generation,
/// sequence number.
const HEADER: usize = 8 + 4 + 4 + 8 + 8 + 8;

/// One change to the prefix index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// The digest of the model whose KV the cache holds; entries of another are dropped.
    Bind {
        /// The model file's digest.
        model: [u8; 32],
    },
    /// A page joined the cache.
    Insert {
        /// Its key.
        key: BlockKey,
        /// Its parent's key.
        parent: Option<BlockKey>,
        /// The block group of every layer.
        units: Vec<u64>,
        /// The page checksums, layer-major then kv head.
        crcs: Vec<u32>,
    },
    /// A page left the cache (evicted, or failed its checksum).
    Remove {
        /// Its key.
        key: BlockKey,
    },
    /// Every page left the cache.
    Clear,
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
}

/// Encode records (a checkpoint's index section, or one batch's payload).
pub fn encode_ops(ops: &[Op]) -> Vec<u8> {
    bincode::serde::encode_to_vec(ops, config()).expect("encoding into a Vec cannot fail")
}

/// Decode records written by [`encode_ops`].
pub fn decode_ops(bytes: &[u8]) -> Result<Vec<Op>, String> {
    // Bound what a corrupt length prefix can make the decoder allocate.
    let cfg = bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ 1 << 30 }>();
    let (ops, used): (Vec<Op>, usize) =
        bincode::serde::decode_from_slice(bytes, cfg).map_err(|e| e.to_string())?;
    if used != bytes.len() {
        return Err(format!("{} trailing bytes", bytes.len() - used));
    }
    Ok(ops)
}

/// One batch, padded to a multiple of `page_align`.
pub fn encode_batch(
    store_id: u64,
    generation: u64,
    seqno: u64,
    ops: &[Op],
    page_align: usize,
) -> Vec<u8> {
    let payload = encode_ops(ops);
    let mut b = Vec::with_capacity(HEADER + payload.len() + 4);
    b.extend_from_slice(JOURNAL_MAGIC);
    b.extend_from_slice(&JOURNAL_VERSION.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&store_id.to_le_bytes());
    b.extend_from_slice(&generation.to_le_bytes());
    b.extend_from_slice(&seqno.to_le_bytes());
    b.extend_from_slice(&payload);
    let c = format::crc(&b);
    b.extend_from_slice(&c.to_le_bytes());
    b.resize(b.len().div_ceil(page_align) * page_align, 0);
    b
}

/// Recompute the checksum of every batch in `bytes` whose header fits, in place, walking
/// batches as replay does (for the fuzz targets, which mutate journals).
#[cfg(feature = "fuzzing")]
pub fn seal_batches(bytes: &mut [u8], page_align: usize) {
    let mut at = 0usize;
    while bytes.len().saturating_sub(at) >= HEADER + 4 && &bytes[at..at + 8] == JOURNAL_MAGIC {
        let b = &mut bytes[at..];
        let len = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")) as usize;
        let Some(end) = (HEADER + len).checked_add(4).filter(|&e| e <= b.len()) else {
            return;
        };
        let c = format::crc(&b[..end - 4]);
        b[end - 4..end].copy_from_slice(&c.to_le_bytes());
        at += end.div_ceil(page_align) * page_align;
    }
}

/// Why replay stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum Stop {
    /// The rest of the extent was never written in this generation (the normal end).
    End,
    /// A batch was torn or corrupt: what follows it is ignored.
    Torn(String),
}

/// Replay the batches of `generation` from the start of `bytes` (the journal extent), in
/// order. Returns the records, the bytes used (where the next batch goes), the next sequence
/// number, and why replay stopped.
pub fn replay(
    bytes: &[u8],
    store_id: u64,
    generation: u64,
    page_align: usize,
) -> (Vec<Op>, usize, u64, Stop) {
    let mut ops = Vec::new();
    let mut at = 0usize;
    let mut seqno = 0u64;
    loop {
        // A batch's padding can run past an extent that is not a whole number of pages.
        let b = bytes.get(at..).unwrap_or_default();
        if b.len() < HEADER + 4 || &b[..8] != JOURNAL_MAGIC {
            return (ops, at, seqno, Stop::End);
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let (version, len) = (u32_at(8), u32_at(12) as usize);
        let (sid, gen, n) = (u64_at(16), u64_at(24), u64_at(32));
        if sid != store_id || gen != generation {
            // A batch of an earlier use of these units: never written in this generation.
            return (ops, at, seqno, Stop::End);
        }
        if version != JOURNAL_VERSION {
            return (
                ops,
                at,
                seqno,
                Stop::Torn(format!("batch version {version}")),
            );
        }
        if HEADER + len + 4 > b.len() {
            return (
                ops,
                at,
                seqno,
                Stop::Torn(format!("batch of {len} bytes runs past the journal")),
            );
        }
        let stored = u32_at(HEADER + len);
        if format::crc(&b[..HEADER + len]) != stored {
            return (
                ops,
                at,
                seqno,
                Stop::Torn(format!("batch {n} fails its checksum")),
            );
        }
        if n != seqno {
            return (
                ops,
                at,
                seqno,
                Stop::Torn(format!("batch {n} where {seqno} was expected")),
            );
        }
        match decode_ops(&b[HEADER..HEADER + len]) {
            Ok(o) => ops.extend(o),
            Err(e) => return (ops, at, seqno, Stop::Torn(format!("batch {n}: {e}"))),
        }
        seqno += 1;
        at += (HEADER + len + 4).div_ceil(page_align) * page_align;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(n: u8) -> Vec<Op> {
        vec![
            Op::Insert {
                key: BlockKey([n; 16]),
                parent: (n > 0).then_some(BlockKey([n - 1; 16])),
                units: vec![n as u64, 100 + n as u64],
                crcs: vec![1, 2, 3, 4],
            },
            Op::Remove {
                key: BlockKey([n; 16]),
            },
        ]
    }

    #[test]
    fn batches_replay_in_order_and_stop_at_a_torn_one() {
        let pa = 4096;
        let mut j = vec![0u8; 8 * pa];
        let mut at = 0;
        for i in 0..3u8 {
            let b = encode_batch(7, 3, i as u64, &ops(i), pa);
            j[at..at + b.len()].copy_from_slice(&b);
            at += b.len();
        }
        let (got, used, next, stop) = replay(&j, 7, 3, pa);
        assert_eq!(got.len(), 6);
        assert_eq!(got[2], ops(1)[0]);
        assert_eq!((used, next, stop), (at, 3, Stop::End));
        // Another generation's batches are not this one's.
        assert_eq!(replay(&j, 7, 4, pa).0.len(), 0);
        assert_eq!(replay(&j, 8, 3, pa).0.len(), 0);
        // Tear the second batch: only the first survives, and replay says why.
        j[pa + 60] ^= 0x40;
        let (got, used, next, stop) = replay(&j, 7, 3, pa);
        assert_eq!(got, ops(0));
        assert_eq!((used, next), (pa, 1));
        assert!(
            matches!(stop, Stop::Torn(ref m) if m.contains("checksum")),
            "{stop:?}"
        );
    }

    #[test]
    fn a_batch_padded_past_the_extent_ends_replay() {
        // Found by the store fuzz target: a batch whose page padding ends beyond an extent
        // that is not a whole number of pages.
        let pa = 4096;
        let b = encode_batch(7, 3, 0, &ops(0), pa);
        let used = HEADER + encode_ops(&ops(0)).len() + 4;
        let (got, _, next, stop) = replay(&b[..used + 10], 7, 3, pa);
        assert_eq!((got, next, stop), (ops(0), 1, Stop::End));
    }

    #[test]
    fn decoding_garbage_is_an_error_not_a_panic() {
        let good = encode_ops(&ops(1));
        for cut in 0..good.len() {
            let _ = decode_ops(&good[..cut]);
        }
        assert!(decode_ops(&[0xff; 64]).is_err());
    }
}
