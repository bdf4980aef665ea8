//! End to end over tensor types: tiny generated Llama models whose matrices are Q4_K, Q5_K,
//! Q6_K, Q4_0, Q5_0, Q5_1, Q8_0 or F16 run through the whole forward pass and are compared
//! with the same model holding F32 weights.
//!
//! The models are made by `tests/fixtures/make_tiny_models.py` (seeded, reproducible). Each
//! comes with a JSON sidecar of checksums of gguf-py's dequantization of every tensor. The
//! F32 companion model is built here: every tensor is dequantized by the runtime, checked
//! against those checksums (so the reference weights are exactly the ggml reference decoding,
//! not just the runtime's), and written as F32 into a temporary GGUF. Both models therefore
//! compute the same function; they differ only in that the quantized model multiplies
//! activations quantized to the matrix type's partner (Q8_0, Q8_1, Q8_K; F16 for F16), while
//! F32 weights meet F32 activations.

use instinfer_kernels::quant::{dequantize_row, quantize_row, vec_dot};
use instinfer_kernels::GgmlType;
use instinfer_runtime::kv::KvCache;
use instinfer_runtime::model::gguf::Value;
use instinfer_runtime::model::{Logits, Model, Workspace};
use std::io::Write;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny")).join(name)
}

/// 24 token ids spread over the 320-token vocabulary.
fn ids() -> Vec<u32> {
    (0..24u32).map(|i| (i * 37 + 11) % 320).collect()
}

/// The pseudo-random projection vector of the generator's checksums.
fn proj_weight(i: usize) -> f64 {
    ((i as u64).wrapping_mul(2654435761) & 0xFFFF_FFFF) as f64 / 4294967296.0 - 0.5
}

// ---------------------------------------------------------------------------------------
// A GGUF writer for the F32 companion: the quantized model's metadata, F32 tensors.

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(b: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => b.push(*x),
        Value::I8(x) => b.push(*x as u8),
        Value::U16(x) => b.extend(x.to_le_bytes()),
        Value::I16(x) => b.extend(x.to_le_bytes()),
        Value::U32(x) => b.extend(x.to_le_bytes()),
        Value::I32(x) => b.extend(x.to_le_bytes()),
        Value::F32(x) => b.extend(x.to_le_bytes()),
        Value::Bool(x) => b.push(*x as u8),
        Value::String(s) => put_str(b, s),
        Value::Array(a) => {
            b.extend(a.first().map_or(8, value_type).to_le_bytes());
            b.extend((a.len() as u64).to_le_bytes());
            for x in a {
                put_value(b, x);
            }
        }
        Value::U64(x) => b.extend(x.to_le_bytes()),
        Value::I64(x) => b.extend(x.to_le_bytes()),
        Value::F64(x) => b.extend(x.to_le_bytes()),
    }
}

fn write_f32_gguf(
    metadata: &[(&String, &Value)],
    tensors: &[(String, Vec<u64>, Vec<f32>)],
) -> tempfile::NamedTempFile {
    const ALIGN: usize = 32;
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut b, k);
        b.extend(value_type(v).to_le_bytes());
        put_value(&mut b, v);
    }
    let mut offset = 0usize;
    for (name, dims, data) in tensors {
        put_str(&mut b, name);
        b.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(GgmlType::F32.id().to_le_bytes());
        b.extend((offset as u64).to_le_bytes());
        offset += (data.len() * 4).div_ceil(ALIGN) * ALIGN;
    }
    for (_, _, data) in tensors {
        b.resize(b.len().div_ceil(ALIGN) * ALIGN, 0);
        for x in data {
            b.extend(x.to_le_bytes());
        }
    }
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(&b).unwrap();
    f.flush().unwrap();
    f
}

/// Dequantize every tensor of `q` with the runtime, check each against gguf-py's checksums
/// from the sidecar, and write the F32 companion model.
fn f32_companion(name: &str, q: &Model) -> tempfile::NamedTempFile {
    let sidecar: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap())
            .unwrap();
    let g = q.gguf();
    let mut tensors = Vec::new();
    for t in &g.tensors {
        let expect = &sidecar["tensors"][&t.name];
        assert_eq!(
            expect["type"].as_str(),
            Some(t.ty.to_string().as_str()),
            "{name}: {} has the generator's type",
            t.name
        );
        let (rows, cols) = (t.rows(), t.cols());
        let bytes = g.tensor_data(t);
        let rb = bytes.len() / rows;
        let mut data = vec![0f32; rows * cols];
        for (r, out) in data.chunks_exact_mut(cols).enumerate() {
            dequantize_row(t.ty, &bytes[r * rb..(r + 1) * rb], out).unwrap();
        }
        let (mut sum, mut sum_sq, mut proj, mut abs_sum) = (0f64, 0f64, 0f64, 0f64);
        for (i, &x) in data.iter().enumerate() {
            let x = x as f64;
            sum += x;
            sum_sq += x * x;
            proj += x * proj_weight(i);
            abs_sum += x.abs();
        }
        // Only the summation order differs from numpy's: any wrong value (a misplaced
        // scale bit, a wrong quant code) moves these far beyond 1e-9 of the absolute sum.
        let scale = abs_sum.max(1e-30);
        for (key, got) in [
            ("sum", sum),
            ("sum_sq", sum_sq),
            ("proj", proj),
            ("abs_sum", abs_sum),
        ] {
            let want = expect[key].as_f64().unwrap();
            assert!(
                (got - want).abs() <= 1e-9 * scale.max(want.abs()),
                "{name}: {} ({}): runtime dequantization differs from gguf-py: \
                 {key} {got} vs {want}",
                t.name,
                t.ty
            );
        }
        if t.dims.len() == 2 {
            kernel_is_exact(name, t.ty, bytes, rb, &data, rows, cols);
        }
        tensors.push((t.name.clone(), t.dims.clone(), data));
    }
    let mut meta: Vec<_> = g.metadata.iter().collect();
    meta.sort_by(|a, b| a.0.cmp(b.0));
    write_f32_gguf(&meta, &tensors)
}

/// The dot-product kernel on every row of a matrix equals, up to f32 rounding, the exact dot
/// product of the dequantized weights with the dequantized quantized activations. This
/// isolates the kernels: everything the forward comparison below sees beyond this is the
/// activation quantization itself.
fn kernel_is_exact(
    name: &str,
    ty: GgmlType,
    w: &[u8],
    rb: usize,
    wf: &[f32],
    rows: usize,
    cols: usize,
) {
    let vt = ty.vec_dot_type();
    let x: Vec<f32> = (0..cols)
        .map(|i| (proj_weight(i * 7 + 3) * 4.0) as f32)
        .collect();
    let mut a = vec![0u8; vt.row_bytes(cols).unwrap()];
    quantize_row(vt, &x, &mut a).unwrap();
    let mut xq = vec![0f32; cols];
    dequantize_row(vt, &a, &mut xq).unwrap();
    let mut worst = 0f64;
    for r in 0..rows {
        let got = vec_dot(ty, cols, &w[r * rb..(r + 1) * rb], &a).unwrap() as f64;
        let row = &wf[r * cols..(r + 1) * cols];
        let exact: f64 = row
            .iter()
            .zip(&xq)
            .map(|(&p, &q)| p as f64 * q as f64)
            .sum();
        let mag: f64 = row
            .iter()
            .zip(&xq)
            .map(|(&p, &q)| (p as f64 * q as f64).abs())
            .sum();
        worst = worst.max((got - exact).abs() / mag.max(1e-30));
    }
    // f32 accumulation over <= 256 products: ~1e-6 of the magnitude sum. Q8_1 (the partner
    // of Q4_1/Q5_1) carries each block's scaled sum s = d*sum(q) as f16, as in ggml, and the
    // kernel uses it for the weights' min term: that rounding (2^-11 of s) is allowed too.
    let tol = if vt == GgmlType::Q8_1 { 1e-3 } else { 2e-5 };
    assert!(
        worst <= tol,
        "{name}: {ty} kernel is off the exact dot product by {worst:.2e} of |w|.|x|"
    );
}

// ---------------------------------------------------------------------------------------
// Comparison.

/// Relative L2 error of `got` against `want`.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// Worst per-position relative L2 error, the number of positions whose top-1 differs, and
/// the largest gap, in the reference's logits, between its top-1 and the token the tested
/// model picked, in units of the reference logits' standard deviation (0: same token).
fn compare(got: &[f32], want: &[f32], vocab: usize) -> (f64, usize, f64) {
    assert_eq!(got.len(), want.len());
    let mut worst = 0f64;
    let mut top1_diff = 0;
    let mut worst_gap = 0f64;
    for (g, w) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)) {
        assert!(g.iter().all(|x| x.is_finite()), "non-finite logits");
        worst = worst.max(rel_l2(g, w));
        let (ag, aw) = (argmax(g), argmax(w));
        if ag != aw {
            top1_diff += 1;
            let mean = w.iter().map(|&x| x as f64).sum::<f64>() / vocab as f64;
            let sd =
                (w.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / vocab as f64).sqrt();
            worst_gap = worst_gap.max((w[aw] - w[ag]) as f64 / sd);
        }
    }
    (worst, top1_diff, worst_gap)
}

/// All 24 positions in one chunk, then (fresh cache) a 16-token prefill followed by 8
/// single-token decode steps. Returns (chunk logits, decode-step logits).
fn run(m: &Model) -> (Vec<f32>, Vec<f32>) {
    let ids = ids();
    let mut ws = Workspace::default();
    let mut cache = m.new_ram_cache();
    m.forward(&mut cache, &ids, &mut ws, Logits::All).unwrap();
    let all = ws.logits.clone();
    assert_eq!(all.len(), ids.len() * m.config.vocab_size);

    let mut cache = m.new_ram_cache();
    m.forward(&mut cache, &ids[..16], &mut ws, Logits::Last)
        .unwrap();
    let mut steps = Vec::new();
    for &id in &ids[16..] {
        m.forward(&mut cache, &[id], &mut ws, Logits::Last).unwrap();
        assert_eq!(ws.logits.len(), m.config.vocab_size);
        steps.extend_from_slice(&ws.logits);
    }
    assert_eq!(cache.len(), ids.len());
    (all, steps)
}

/// Allowed worst relative L2 error of any position's logit vector against the F32 model.
///
/// The weights of both models are identical and `kernel_is_exact` shows the kernels compute
/// the exact product with the quantized activations, so this error is the activation
/// quantization alone: about 0.6% per matmul for 8-bit activations with a per-32 (Q8_0,
/// Q8_1) or per-256 (Q8_K) block scale, compounded over 2 layers of 7 matmuls plus the head
/// (and amplified by the random, untrained weights); 11-bit F16 activations give ~0.1%.
/// Measured worst over the 24 chunk positions and 8 decode steps (x86-64, AVX2):
///
/// | type | rel L2 | top-1 mismatches (of 32), worst gap |
/// |------|--------|-------------------------------------|
/// | Q4_K | 3.9e-2 | 2, 0.004 sd                         |
/// | Q5_K | 4.2e-2 | 3, 0.045 sd                         |
/// | Q6_K | 6.3e-2 | 1, 0.043 sd                         |
/// | Q4_0 | 3.1e-2 | 4, 0.033 sd                         |
/// | Q5_0 | 2.3e-2 | 0                                   |
/// | Q5_1 | 2.6e-2 | 0                                   |
/// | Q8_0 | 2.6e-2 | 0                                   |
/// | F16  | 1.4e-3 | 0                                   |
///
/// Each bound is about twice the measured error. A wrong kernel (a misread scale, a wrong
/// block offset) makes errors of order 1.
struct Tolerance {
    rel_l2: f64,
}

/// Top-1 may differ only at near-ties: the token the quantized model picks must be within
/// this many standard deviations of the reference logits below the reference top-1
/// (measured worst 0.045; a broken model picks tokens ~1-3 sd away) ...
const MAX_TOP1_GAP_SD: f64 = 0.15;
/// ... and at no more than a quarter of the 32 compared positions (measured worst 4).
const MAX_TOP1_DIFF: usize = 8;
/// Single-token decode against the chunked pass of the same model: the same rows are
/// quantized the same way, only summation order differs (measured <= 4e-7 for the quantized
/// models, <= 1.2e-4 for the F32 ones, whose activations are not rounded).
const MAX_DECODE_VS_CHUNK: f64 = 1e-3;

fn check(name: &str, ty: GgmlType, tol: Tolerance) {
    let q = Model::load(&fixture(&format!("{name}.gguf"))).unwrap();
    assert_eq!(q.weights.main_type(), ty);
    let companion = f32_companion(name, &q);
    let r = Model::load(companion.path()).unwrap();
    assert_eq!(r.weights.main_type(), GgmlType::F32);
    assert_eq!(q.config, r.config);
    let vocab = q.config.vocab_size;

    let (q_all, q_steps) = run(&q);
    let (r_all, r_steps) = run(&r);
    let (chunk_err, chunk_top1, chunk_gap) = compare(&q_all, &r_all, vocab);
    let (step_err, step_top1, step_gap) = compare(&q_steps, &r_steps, vocab);
    // The decode path against the chunk path of the same model: the same activations are
    // quantized the same way per row, so only summation-order noise separates them.
    let (self_err, self_top1, _) = compare(&q_steps, &q_all[16 * vocab..], vocab);
    let (r_self_err, _, _) = compare(&r_steps, &r_all[16 * vocab..], vocab);
    eprintln!(
        "{ty:>5}: chunk vs F32 rel_l2 {chunk_err:.2e} top1-diff {chunk_top1}/24 gap {chunk_gap:.3} | \
         decode vs F32 rel_l2 {step_err:.2e} top1-diff {step_top1}/8 gap {step_gap:.3} | \
         decode vs chunk rel_l2 {self_err:.2e} (F32 model {r_self_err:.2e})"
    );
    assert!(
        chunk_err <= tol.rel_l2 && step_err <= tol.rel_l2,
        "{ty}: logits differ from the F32 model by {chunk_err:.3e} (chunk) / \
         {step_err:.3e} (decode), allowed {:.1e}",
        tol.rel_l2
    );
    assert!(
        chunk_top1 + step_top1 <= MAX_TOP1_DIFF && chunk_gap.max(step_gap) <= MAX_TOP1_GAP_SD,
        "{ty}: top-1 differs from the F32 model at {chunk_top1}+{step_top1} positions, \
         the worst {:.3} sd below the reference top-1",
        chunk_gap.max(step_gap)
    );
    assert!(
        self_err <= MAX_DECODE_VS_CHUNK && self_top1 == 0 && r_self_err <= MAX_DECODE_VS_CHUNK,
        "{ty}: single-token decode differs from the chunked forward pass \
         ({self_err:.3e}; F32 model {r_self_err:.3e})"
    );
}

#[test]
fn q4_k_matches_f32() {
    check("q4_k", GgmlType::Q4_K, Tolerance { rel_l2: 0.08 });
}

#[test]
fn q5_k_matches_f32() {
    check("q5_k", GgmlType::Q5_K, Tolerance { rel_l2: 0.08 });
}

#[test]
fn q6_k_matches_f32() {
    check("q6_k", GgmlType::Q6_K, Tolerance { rel_l2: 0.12 });
}

#[test]
fn q4_0_matches_f32() {
    check("q4_0", GgmlType::Q4_0, Tolerance { rel_l2: 0.06 });
}

#[test]
fn q5_0_matches_f32() {
    check("q5_0", GgmlType::Q5_0, Tolerance { rel_l2: 0.05 });
}

#[test]
fn q5_1_matches_f32() {
    check("q5_1", GgmlType::Q5_1, Tolerance { rel_l2: 0.05 });
}

#[test]
fn q8_0_matches_f32() {
    check("q8_0", GgmlType::Q8_0, Tolerance { rel_l2: 0.05 });
}

#[test]
fn f16_matches_f32() {
    check("f16", GgmlType::F16, Tolerance { rel_l2: 0.004 });
}

// ---------------------------------------------------------------------------------------
// Types without kernels: a clear load error, never a panic.

fn load_err(bytes: &[u8]) -> String {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    Model::load(f.path()).unwrap_err().to_string()
}

#[test]
fn a_q2_k_model_is_a_clear_error() {
    assert!(
        !GgmlType::Q2_K.can_matmul(),
        "Q2_K gained kernels: test it above"
    );
    let err = Model::load(&fixture("q2_k.gguf")).unwrap_err().to_string();
    assert!(
        err.contains("token_embd.weight") && err.contains("Q2_K") && err.contains("unsupported"),
        "{err}"
    );
}

#[test]
fn a_matrix_without_a_matmul_kernel_is_a_clear_error() {
    // Q8_K dequantizes (it is an activation format) but has no weight kernel.
    assert!(!GgmlType::Q8_K.can_matmul());
    let err = Model::load(&fixture("q4_0_with_q8_k.gguf"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blk.1.ffn_down.weight") && err.contains("Q8_K") && err.contains("kernel"),
        "{err}"
    );
}

#[test]
fn an_unknown_type_id_is_a_clear_error() {
    let mut bytes = std::fs::read(fixture("q4_0.gguf")).unwrap();
    // Directory entry: name (u64 length + bytes), u32 n_dims, n_dims × u64, u32 type.
    let name = b"token_embd.weight";
    let at = bytes
        .windows(name.len() + 8)
        .position(|w| w[..8] == (name.len() as u64).to_le_bytes() && &w[8..] == name)
        .expect("tensor directory entry");
    let n_dims_at = at + 8 + name.len();
    assert_eq!(bytes[n_dims_at..n_dims_at + 4], 2u32.to_le_bytes());
    let ty_at = n_dims_at + 4 + 16;
    assert_eq!(bytes[ty_at..ty_at + 4], GgmlType::Q4_0.id().to_le_bytes());
    for id in [4242u32, 16] {
        bytes[ty_at..ty_at + 4].copy_from_slice(&id.to_le_bytes());
        let err = load_err(&bytes);
        assert!(
            err.contains("token_embd.weight") && err.contains(&id.to_string()),
            "type id {id}: {err}"
        );
    }
}
