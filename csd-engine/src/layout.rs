//! KV shape and on-disk geometry (see docs/STORAGE.md).
//!
//! A *page* holds `block_tokens` tokens of one (layer, kv head): the K rows then the V rows,
//! f16, padded to the page alignment. A *block group* (the allocation unit) holds the pages of
//! all kv heads of one token block of one layer, adjacent, so one read serves every head of a
//! selected block. The block groups of one (sequence, layer) fill extents in order, so a whole
//! layer is one sequential read per extent and neighbouring blocks coalesce.

use crate::error::KvError;

/// The store's page layout: the model's KV dimensions plus the page size in tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PageShape {
    /// Transformer layers.
    pub layers: u32,
    /// Key/value heads per layer.
    pub kv_heads: u32,
    /// Values per head.
    pub head_dim: u32,
    /// Tokens per page.
    pub block_tokens: u32,
}

impl PageShape {
    /// SmolLM2-135M: 30 layers, 3 kv heads, head_dim 64; 32 tokens per page (4 KiB of K and 4
    /// KiB of V per head, 24 KiB per block group).
    pub const fn smollm2_135m() -> PageShape {
        PageShape {
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
            block_tokens: 32,
        }
    }

    /// A shape with the block size chosen so one head's K rows fill `page_bytes` (at least 1).
    pub fn with_page_bytes(
        layers: u32,
        kv_heads: u32,
        head_dim: u32,
        page_bytes: u32,
    ) -> PageShape {
        let block_tokens = (page_bytes / (head_dim.max(1) * 2)).max(1);
        PageShape {
            layers,
            kv_heads,
            head_dim,
            block_tokens,
        }
    }

    /// Check every dimension is at least 1 and within the supported range, and a block
    /// group is at most 256 MiB.
    pub fn validate(&self) -> Result<(), KvError> {
        let bad = |m: &str| Err(KvError::InvalidShape(format!("{m} (shape {self:?})")));
        if self.layers == 0 || self.kv_heads == 0 || self.head_dim == 0 || self.block_tokens == 0 {
            return bad("every dimension must be at least 1");
        }
        if self.layers > 4096
            || self.kv_heads > 1024
            || self.head_dim > 16384
            || self.block_tokens > 65536
        {
            return bad("dimension out of supported range");
        }
        let k_bytes = self.block_tokens as u64 * self.head_dim as u64 * 2;
        if k_bytes * 2 * self.kv_heads as u64 > 256 << 20 {
            return bad("block group larger than 256 MiB");
        }
        Ok(())
    }

    /// f16 values per token per layer for K (same for V): kv_heads × head_dim.
    pub fn token_elems(&self) -> usize {
        self.kv_heads as usize * self.head_dim as usize
    }

    /// Bytes of K and V per token over all layers (the "KV per token" figure).
    pub fn bytes_per_token(&self) -> u64 {
        2 * 2 * self.layers as u64 * self.token_elems() as u64
    }
}

/// Where things are on the device, derived from the shape and the page alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// The page layout.
    pub shape: PageShape,
    /// Page alignment: max(4096, device logical block size).
    pub page_align: u64,
    /// Bytes of one head's K rows in a page (= V rows).
    pub k_bytes: usize,
    /// Bytes of one head's page (K + V, padded to `page_align`).
    pub head_page: usize,
    /// Bytes of one block group (all heads of one block): the allocation unit.
    pub unit_bytes: usize,
    /// Byte offset of unit 0.
    pub data_offset: u64,
    /// Number of allocation units.
    pub units: u64,
    /// Bytes of the device in use.
    pub store_len: u64,
}

/// Superblock, two root slots, then data from this alignment on.
pub(crate) const DATA_ALIGN: u64 = 64 * 1024;

impl Geometry {
    /// The geometry of a store of `store_len` bytes with pages aligned to `page_align` (at
    /// least 4096, rounded up to a power of two); `TooSmall` unless one block group fits.
    pub fn new(shape: PageShape, page_align: u64, store_len: u64) -> Result<Geometry, KvError> {
        shape.validate()?;
        let page_align = page_align.max(4096).next_power_of_two();
        let k_bytes = shape.block_tokens as usize * shape.head_dim as usize * 2;
        let head_page = (2 * k_bytes).next_multiple_of(page_align as usize);
        let unit_bytes = head_page * shape.kv_heads as usize;
        let data_offset = (3 * page_align).next_multiple_of(DATA_ALIGN.max(page_align));
        let needed = data_offset + unit_bytes as u64;
        if store_len < needed {
            return Err(KvError::TooSmall {
                size: store_len,
                needed,
            });
        }
        let units = (store_len - data_offset) / unit_bytes as u64;
        Ok(Geometry {
            shape,
            page_align,
            k_bytes,
            head_page,
            unit_bytes,
            data_offset,
            units,
            store_len,
        })
    }

    /// Byte offset of allocation unit `u`.
    pub fn unit_offset(&self, u: u64) -> u64 {
        self.data_offset + u * self.unit_bytes as u64
    }

    /// Byte offset of root slot `i` (0 or 1).
    pub fn root_offset(&self, i: u64) -> u64 {
        self.page_align * (1 + i)
    }

    /// Tokens per block.
    pub fn block_tokens(&self) -> usize {
        self.shape.block_tokens as usize
    }

    /// Kv heads per block group.
    pub fn heads(&self) -> usize {
        self.shape.kv_heads as usize
    }

    /// Values per head.
    pub fn head_dim(&self) -> usize {
        self.shape.head_dim as usize
    }

    /// Capacity of the data area in bytes.
    pub fn data_bytes(&self) -> u64 {
        self.units * self.unit_bytes as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_geometry() {
        let g = Geometry::new(PageShape::smollm2_135m(), 512, 1 << 30).unwrap();
        assert_eq!(g.k_bytes, 4096);
        assert_eq!(g.head_page, 8192);
        assert_eq!(g.unit_bytes, 24576);
        assert_eq!(g.page_align, 4096);
        assert_eq!(g.data_offset, 65536);
        assert_eq!(PageShape::smollm2_135m().bytes_per_token(), 23040);
    }

    #[test]
    fn too_small_is_an_error() {
        let e = Geometry::new(PageShape::smollm2_135m(), 4096, 65536 + 24575).unwrap_err();
        assert!(matches!(e, KvError::TooSmall { .. }), "{e}");
        assert!(Geometry::new(
            PageShape {
                layers: 0,
                ..PageShape::smollm2_135m()
            },
            4096,
            1 << 30
        )
        .is_err());
    }
}
