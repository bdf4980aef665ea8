//! Keys of the prefix cache: every full page (one block of tokens, all layers) of a token
//! sequence is named by a chained hash of the model's digest, the previous page's key and the
//! page's token ids, as vLLM names its blocks. Two sequences share a page's key exactly when
//! they share the model and every token up to the end of that page, so a key names KV that a
//! fresh prefill would write bit for bit.

use sha2::{Digest, Sha256};

/// The key of one full page of a token sequence (the first 16 bytes of a SHA-256).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct BlockKey(pub [u8; 16]);

impl std::fmt::Display for BlockKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The keys of every full page of `tokens` (`tokens.len() / block_tokens` of them), chained
/// from `model` (a digest of the model file, so KV of one model never serves another).
pub fn prefix_keys(model: &[u8; 32], tokens: &[u32], block_tokens: usize) -> Vec<BlockKey> {
    let mut keys = Vec::with_capacity(tokens.len() / block_tokens.max(1));
    let mut parent = [0u8; 16];
    for page in tokens.chunks_exact(block_tokens.max(1)) {
        let mut h = Sha256::new();
        h.update(model);
        h.update(parent);
        for &t in page {
            h.update(t.to_le_bytes());
        }
        let d = h.finalize();
        parent.copy_from_slice(&d[..16]);
        keys.push(BlockKey(parent));
    }
    keys
}

/// What the prefix cache holds and has done since the store was opened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Pages (token blocks, every layer) the cache holds.
    pub pages: u64,
    /// Bytes of flash those pages occupy.
    pub bytes: u64,
    /// Pages the cache holds that running sequences also read.
    pub shared_pages: u64,
    /// Pages inserted since open.
    pub inserted_pages: u64,
    /// Pages evicted (least recently used, unshared) to make room since open.
    pub evicted_pages: u64,
    /// Pages dropped by `clear` or because another model file bound the store.
    pub cleared_pages: u64,
    /// Entries found at open that could not be trusted (torn journal tail, orphans, bad
    /// records) or whose pages failed their checksum when first used, and were dropped.
    pub dropped_at_recovery: u64,
    /// Entries recovered at open.
    pub recovered_pages: u64,
    /// Journal records written / checkpoints committed since open.
    pub journal_records: u64,
    /// Checkpoints (full index snapshots) committed since open.
    pub checkpoints: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_chain_and_depend_on_model_and_tokens() {
        let m = [7u8; 32];
        let a: Vec<u32> = (0..100).collect();
        let ka = prefix_keys(&m, &a, 32);
        assert_eq!(ka.len(), 3);
        let mut b = a.clone();
        b[70] = 9999; // third page differs
        let kb = prefix_keys(&m, &b, 32);
        assert_eq!(ka[..2], kb[..2]);
        assert_ne!(ka[2], kb[2]);
        let mut c = a.clone();
        c[0] = 5; // first page differs: every later key differs
        let kc = prefix_keys(&m, &c, 32);
        assert!(ka.iter().zip(&kc).all(|(x, y)| x != y));
        let kd = prefix_keys(&[8u8; 32], &a, 32);
        assert!(ka.iter().zip(&kd).all(|(x, y)| x != y));
        // The same page content at another depth has another key.
        let rep: Vec<u32> = (0..64).map(|i| i % 32).collect();
        let kr = prefix_keys(&m, &rep, 32);
        assert_ne!(kr[0], kr[1]);
    }
}
