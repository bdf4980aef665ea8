//! Token sampling: greedy, temperature, top-k, top-p (nucleus), seeded.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Errors about sampling parameters.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplingError {
    /// The temperature is negative or not finite; holds the value given.
    #[error("temperature must be a finite number >= 0, got {0}")]
    Temperature(f32),
    /// `top_p` is not in (0, 1]; holds the value given.
    #[error("top_p must be in (0, 1], got {0}")]
    TopP(f32),
}

/// How the next token is chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches `top_p`; 1 disables.
    pub top_p: f32,
    /// Seed of the random stream (sampling is reproducible for a given seed).
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    /// Check that the temperature is finite and at least 0 and that `top_p` is in (0, 1].
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::TopP(self.top_p));
        }
        Ok(())
    }

    /// Whether sampling reduces to argmax (temperature 0 or `top_k` 1), which uses no randomness.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == 1
    }
}

/// A sampler with its own random stream.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    /// A sampler for `params`, after checking them; its random stream is seeded with
    /// `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self, SamplingError> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self {
            params,
            rng,
            candidates: Vec::new(),
        })
    }

    /// Choose the next token from `logits` (one per vocabulary entry).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return instinfer_kernels::ops::argmax(logits).unwrap_or(0) as u32;
        }
        let p = &self.params;
        let c = &mut self.candidates;
        c.clear();
        c.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_finite())
                .map(|(i, &l)| (i as u32, l)),
        );
        if c.is_empty() {
            return 0;
        }
        let by_logit_desc =
            |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < c.len() {
            c.select_nth_unstable_by(p.top_k - 1, by_logit_desc);
            c.truncate(p.top_k);
        }
        c.sort_unstable_by(by_logit_desc);
        // Softmax at the temperature (stable: subtract the max).
        let max = c[0].1;
        let mut total = 0.0f64;
        for x in c.iter_mut() {
            x.1 = ((x.1 - max) / p.temperature).exp();
            total += x.1 as f64;
        }
        if p.top_p < 1.0 {
            let mut acc = 0.0f64;
            let mut keep = c.len();
            for (i, x) in c.iter().enumerate() {
                acc += x.1 as f64 / total;
                if acc >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep);
            total = c.iter().map(|x| x.1 as f64).sum();
        }
        let mut r = self.rng.random::<f64>() * total;
        for &(id, w) in c.iter() {
            r -= w as f64;
            if r <= 0.0 {
                return id;
            }
        }
        c.last().map(|x| x.0).unwrap_or(0)
    }
}

/// A chosen token's log-probability and the most likely tokens at its step.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    /// The chosen token's log-probability.
    pub logprob: f32,
    /// `(id, log-probability)` of the most likely tokens, most likely first (ties: lower id
    /// first).
    pub top: Vec<(u32, f32)>,
}

/// Log-probabilities under the model's distribution, `softmax(logits)`, before temperature,
/// top-k and top-p (as OpenAI's API and vLLM report them): `chosen`'s, and the `top` most
/// likely tokens'. Non-finite logits count as impossible.
pub fn logprobs(logits: &[f32], chosen: u32, top: usize) -> TokenLogprobs {
    let max = logits
        .iter()
        .copied()
        .filter(|l| l.is_finite())
        .fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits
        .iter()
        .filter(|l| l.is_finite())
        .map(|&l| ((l - max) as f64).exp())
        .sum();
    let lse = max as f64 + sum.ln();
    let lp = |l: f32| {
        if l.is_finite() {
            (l as f64 - lse) as f32
        } else {
            f32::NEG_INFINITY
        }
    };
    // Keep the best `top` in a small sorted list: one pass, no copy of the vocabulary.
    let better = |a: (u32, f32), b: (u32, f32)| a.1 > b.1 || (a.1 == b.1 && a.0 < b.0);
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if !l.is_finite() {
                continue;
            }
            let c = (i as u32, l);
            if best.len() == top && !better(c, best[top - 1]) {
                continue;
            }
            let at = best
                .iter()
                .position(|&b| better(c, b))
                .unwrap_or(best.len());
            best.insert(at, c);
            best.truncate(top);
        }
    }
    TokenLogprobs {
        logprob: logits
            .get(chosen as usize)
            .map_or(f32::NEG_INFINITY, |&l| lp(l)),
        top: best.into_iter().map(|(id, l)| (id, lp(l))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plain reference: a full log-softmax, then a full sort.
    fn logprobs_reference(logits: &[f32], chosen: u32, top: usize) -> TokenLogprobs {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max
            + logits
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        let mut all: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (l as f64 - lse) as f32))
            .collect();
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        all.truncate(top);
        TokenLogprobs {
            logprob: (logits[chosen as usize] as f64 - lse) as f32,
            top: all,
        }
    }

    #[test]
    fn logprobs_match_a_full_log_softmax() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for trial in 0..50 {
            let n = 1 + trial * 37;
            let mut logits: Vec<f32> = (0..n).map(|_| rng.random_range(-20.0..20.0)).collect();
            // Ties, to check the order among equals.
            if n > 3 {
                logits[1] = logits[0];
            }
            let chosen = rng.random_range(0..n) as u32;
            for top in [0, 1, 5, 20] {
                let got = logprobs(&logits, chosen, top);
                let want = logprobs_reference(&logits, chosen, top);
                assert!((got.logprob - want.logprob).abs() < 1e-5, "n {n}");
                assert_eq!(got.top.len(), top.min(n));
                for (g, w) in got.top.iter().zip(&want.top) {
                    assert_eq!(g.0, w.0, "n {n} top {top}");
                    assert!((g.1 - w.1).abs() < 1e-5);
                }
            }
        }
        // Probabilities sum to one.
        let logits = [1.0f32, 2.0, 3.0];
        let t = logprobs(&logits, 0, 3);
        let total: f32 = t.top.iter().map(|x| x.1.exp()).sum();
        assert!((total - 1.0).abs() < 1e-6);
    }

    #[test]
    fn logprobs_skip_non_finite_logits() {
        let logits = [f32::NEG_INFINITY, 0.0, 0.0, f32::NAN];
        let t = logprobs(&logits, 0, 4);
        assert_eq!(t.logprob, f32::NEG_INFINITY);
        assert_eq!(t.top.len(), 2);
        assert!((t.top[0].1 - 0.5f32.ln()).abs() < 1e-6);
        assert_eq!(logprobs(&logits, 99, 0).logprob, f32::NEG_INFINITY);
    }

    #[test]
    fn greedy_picks_the_argmax() {
        let mut s = Sampler::new(SamplingParams::default()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        })
        .unwrap();
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5]), 1);
        }
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [5.0, 4.9, 0.0, -1.0, 4.8];
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 2,
            top_p: 1.0,
            seed: 7,
        })
        .unwrap();
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits), 0 | 1));
        }
        // top_p small: only the most likely token survives.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.05,
            seed: 7,
        })
        .unwrap();
        for _ in 0..200 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn the_same_seed_gives_the_same_tokens() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            seed: 42,
        };
        let run = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone()).unwrap();
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(&params), run(&params));
        assert_ne!(
            run(&params),
            run(&SamplingParams {
                seed: 43,
                ..params.clone()
            })
        );
    }

    #[test]
    fn invalid_values_are_rejected_with_their_name() {
        let e = Sampler::new(SamplingParams {
            temperature: -1.0,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("temperature"), "{e}");
        let e = Sampler::new(SamplingParams {
            temperature: f32::NAN,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("temperature"), "{e}");
        for bad in [0.0, -0.5, 1.5, f32::NAN] {
            let e = Sampler::new(SamplingParams {
                top_p: bad,
                ..Default::default()
            })
            .err()
            .unwrap();
            assert!(e.to_string().contains("top_p"), "{e}");
        }
    }
}
