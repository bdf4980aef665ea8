//! The result of a page read: the block groups as they came off the device, plus a copy of
//! the RAM tail, handed out as f16 K and V slices per kv head without further copies.

use half::f16;
use instinfer_kernels::attention::KvSegment;

use crate::layout::Geometry;
use crate::sys::{bytes_as_f16, AlignedBuf};

/// Pages of one (sequence, layer), reusable across reads (the buffer only grows).
#[derive(Debug)]
pub struct LayerRead {
    pub(crate) buf: AlignedBuf,
    pub(crate) blocks: Vec<u32>,
    pub(crate) geo: Option<Geometry>,
    pub(crate) tail_k: Vec<f16>,
    pub(crate) tail_v: Vec<f16>,
    pub(crate) tail_tokens: usize,
    pub(crate) tail_first_pos: usize,
}

impl Default for LayerRead {
    fn default() -> Self {
        LayerRead::new()
    }
}

impl LayerRead {
    /// An empty read, to be filled by [`crate::KvStore::read_blocks`] or
    /// [`crate::KvStore::read_layer`].
    pub fn new() -> LayerRead {
        LayerRead {
            buf: AlignedBuf::new(0, 4096),
            blocks: Vec::new(),
            geo: None,
            tail_k: Vec::new(),
            tail_v: Vec::new(),
            tail_tokens: 0,
            tail_first_pos: 0,
        }
    }

    /// Forget the previous contents and make room for `n` block groups.
    pub(crate) fn reset(&mut self, geo: &Geometry, n: usize) {
        self.blocks.clear();
        self.tail_tokens = 0;
        self.geo = Some(*geo);
        let need = n * geo.unit_bytes;
        let align = geo.page_align as usize;
        if need > self.buf.capacity() || self.buf.align() < align {
            self.buf = AlignedBuf::new(need.max(self.buf.capacity() * 2).max(align), align);
        }
        self.buf.set_len(need);
    }

    pub(crate) fn clear(&mut self) {
        self.blocks.clear();
        self.tail_tokens = 0;
        self.buf.set_len(0);
    }

    /// Block indices held, ascending. Block `b` covers positions `b*block_tokens ..`.
    pub fn blocks(&self) -> &[u32] {
        &self.blocks
    }

    /// Number of blocks held (not counting the tail).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether it holds neither blocks nor tail tokens.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty() && self.tail_tokens == 0
    }

    fn g(&self) -> &Geometry {
        self.geo.as_ref().expect("LayerRead used before a read")
    }

    fn page(&self, i: usize, head: usize) -> &[u8] {
        let g = self.g();
        let at = i * g.unit_bytes + head * g.head_page;
        &self.buf.as_slice()[at..at + 2 * g.k_bytes]
    }

    /// K rows (`block_tokens × head_dim`) of the `i`-th block held, for `head`.
    pub fn keys(&self, i: usize, head: usize) -> &[f16] {
        let kb = self.g().k_bytes;
        bytes_as_f16(&self.page(i, head)[..kb]).expect("page buffers are aligned")
    }

    /// V rows of the `i`-th block held, for `head`.
    pub fn values(&self, i: usize, head: usize) -> &[f16] {
        let kb = self.g().k_bytes;
        bytes_as_f16(&self.page(i, head)[kb..]).expect("page buffers are aligned")
    }

    /// Absolute position of the first token of the `i`-th block held.
    pub fn first_pos(&self, i: usize) -> usize {
        self.blocks[i] as usize * self.g().block_tokens()
    }

    /// Tokens in the RAM tail (positions after the last full block).
    pub fn tail_tokens(&self) -> usize {
        self.tail_tokens
    }

    /// Absolute position of the first tail token.
    pub fn tail_first_pos(&self) -> usize {
        self.tail_first_pos
    }

    /// Tail K rows of `head` (`tail_tokens × head_dim`).
    pub fn tail_keys(&self, head: usize) -> &[f16] {
        let n = self.tail_tokens * self.g().head_dim();
        &self.tail_k[head * n..(head + 1) * n]
    }

    /// Tail V rows of `head` (`tail_tokens × head_dim`).
    pub fn tail_values(&self, head: usize) -> &[f16] {
        let n = self.tail_tokens * self.g().head_dim();
        &self.tail_v[head * n..(head + 1) * n]
    }

    /// Attention segments for `head`: one per block held, then the tail if non-empty.
    pub fn segments(&self, head: usize) -> Vec<KvSegment<'_>> {
        let mut v: Vec<KvSegment<'_>> = (0..self.blocks.len())
            .map(|i| KvSegment {
                keys: self.keys(i, head),
                values: self.values(i, head),
                first_pos: self.first_pos(i),
            })
            .collect();
        if self.tail_tokens > 0 {
            v.push(KvSegment {
                keys: self.tail_keys(head),
                values: self.tail_values(head),
                first_pos: self.tail_first_pos,
            });
        }
        v
    }
}
