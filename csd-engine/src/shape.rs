//! The shape of a model's KV: what every layer above the engine means by "KV shape".

use crate::error::KvError;
use crate::layout::PageShape;
use instinfer_kernels::multi_head::Heads;

/// Layers and heads of a model's attention, as the KV cache sees them: `q_heads` query heads
/// share `kv_heads` key/value heads of `head_dim` values each, in every one of `layers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvShape {
    /// Transformer layers.
    pub layers: usize,
    /// Query heads (a multiple of `kv_heads`).
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
}

impl KvShape {
    /// The head layout of one layer's attention.
    pub fn heads(&self) -> Heads {
        Heads {
            q_heads: self.q_heads,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
        }
    }

    /// Values of one token's K (or V) in one layer: `kv_heads × head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Values of one token's queries in one layer: `q_heads × head_dim`.
    pub fn q_dim(&self) -> usize {
        self.q_heads * self.head_dim
    }

    /// Bytes of K and V one token takes over all layers, stored as f16.
    pub fn bytes_per_token(&self) -> u64 {
        (2 * self.layers * self.kv_dim() * 2) as u64
    }

    /// The on-flash page shape for this KV with pages of `page_bytes` of one head's keys.
    pub fn page_shape(&self, page_bytes: u32) -> PageShape {
        PageShape::with_page_bytes(
            self.layers as u32,
            self.kv_heads as u32,
            self.head_dim as u32,
            page_bytes,
        )
    }

    /// Whether `pages` holds KV of this shape (the page size aside).
    pub fn matches(&self, pages: &PageShape) -> bool {
        (
            pages.layers as usize,
            pages.kv_heads as usize,
            pages.head_dim as usize,
        ) == (self.layers, self.kv_heads, self.head_dim)
    }

    /// Check the head counts: at least one of each, query heads a multiple of kv heads.
    pub fn validate(&self) -> Result<(), KvError> {
        if self.layers == 0 || self.kv_heads == 0 || self.head_dim == 0 {
            return Err(KvError::InvalidShape(format!(
                "every dimension must be at least 1 (shape {self:?})"
            )));
        }
        if self.q_heads == 0 || self.q_heads % self.kv_heads != 0 {
            return Err(KvError::InvalidShape(format!(
                "{} query heads is not a multiple of {} kv heads",
                self.q_heads, self.kv_heads
            )));
        }
        Ok(())
    }

    /// Check an append of `k`/`v` to `layer` of a sequence holding `held` of at most
    /// `capacity` tokens; returns the number of tokens appended.
    pub fn check_append(
        &self,
        layer: usize,
        k: &[f32],
        v: &[f32],
        held: usize,
        capacity: usize,
    ) -> Result<usize, KvError> {
        let kv_dim = self.kv_dim();
        if layer >= self.layers || k.len() != v.len() || k.len() % kv_dim != 0 {
            return Err(KvError::BadInput(format!(
                "append to layer {layer} with {} K and {} V values",
                k.len(),
                v.len()
            )));
        }
        let n = k.len() / kv_dim;
        if held + n > capacity {
            return Err(KvError::SequenceFull {
                needed: held + n,
                capacity,
            });
        }
        Ok(n)
    }

    /// Check an attend on `layer` with queries `q` into `out`.
    pub fn check_attend(&self, layer: usize, q: &[f32], out: &[f32]) -> Result<(), KvError> {
        if layer >= self.layers || q.len() % self.q_dim() != 0 || out.len() != q.len() {
            return Err(KvError::BadInput(format!(
                "attend on layer {layer} with {} query values into {} outputs",
                q.len(),
                out.len()
            )));
        }
        Ok(())
    }
}
