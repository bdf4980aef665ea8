//! One item's attention over what it attends: its cache hits, the pages read for it and its
//! staged rows, in position order, with the estimate of its skipped pages merged in.

use instinfer_kernels::attention::KvSegment;
use instinfer_kernels::multi_head::{attend_partial, merge_into, Heads};

use super::attend::{AttendReq, Plan};
use super::sequence::LayerState;
use crate::read::LayerRead;

/// Exact attention of one item over its cache hits, its pages `read` (if any) and its staged
/// rows, in position order: writes `it.out` and `lse`.
pub(super) fn resident_attention(
    hd: Heads,
    t: usize,
    ls: &LayerState,
    it: &mut AttendReq<'_>,
    plan: &Plan,
    read: Option<&LayerRead>,
    lse: &mut [f32],
) {
    let kd = t * hd.head_dim;
    let segs: Vec<Vec<KvSegment<'_>>> = (0..hd.kv_heads)
        .map(|head| {
            let mut v: Vec<KvSegment<'_>> = read.map_or_else(Vec::new, |b| block_segments(b, head));
            v.extend(plan.hits.iter().map(|(b, data)| KvSegment {
                keys: &data[head * 2 * kd..head * 2 * kd + kd],
                values: &data[head * 2 * kd + kd..(head + 1) * 2 * kd],
                first_pos: *b as usize * t,
            }));
            v.sort_by_key(|s| s.first_pos);
            v.extend(ls.stage_segment(head));
            v
        })
        .collect();
    attend_partial(hd, it.q, it.first_pos, &segs, it.out, lse);
}

/// One item's whole exact attention: [`resident_attention`] over everything it attends, with
/// the estimate of its skipped pages merged in.
pub(super) fn item_attention(
    hd: Heads,
    t: usize,
    ls: &LayerState,
    it: &mut AttendReq<'_>,
    plan: &Plan,
    read: Option<&LayerRead>,
    estimate: Option<(Vec<f32>, Vec<f32>)>,
) {
    let mut lse = vec![0.0f32; plan.n * hd.q_heads];
    resident_attention(hd, t, ls, it, plan, read, &mut lse);
    if let Some((o2, lse2)) = estimate {
        merge_into(hd, it.out, &mut lse, &o2, &lse2);
    }
}

/// Attention segments of the blocks of a read, for `head` (the tail left out).
pub(super) fn block_segments(buf: &LayerRead, head: usize) -> Vec<KvSegment<'_>> {
    (0..buf.len())
        .map(|i| KvSegment {
            keys: buf.keys(i, head),
            values: buf.values(i, head),
            first_pos: buf.first_pos(i),
        })
        .collect()
}
