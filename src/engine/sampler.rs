//! Turning logits into the next token: repetition penalty, then greedy (temperature 0) or
//! top-k → top-p → min-p → temperature → a draw from a seeded generator.
//! The candidate buffer is allocated once per sampler; `sample` allocates nothing.

use crate::api::SamplingParams;

/// xoshiro256** seeded by splitmix64: small, fast, reproducible across platforms.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e3779b97f4a7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58476d1ce4e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d049bb133111eb);
            z ^ (z >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let result = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    /// (logit or probability, token id); capacity n_vocab.
    cand: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams, n_vocab: usize) -> Sampler {
        Sampler {
            rng: Rng::new(params.seed),
            params,
            cand: Vec::with_capacity(n_vocab),
        }
    }

    /// Re-arms the sampler for a new request without reallocating.
    pub fn reset(&mut self, params: SamplingParams) {
        self.rng = Rng::new(params.seed);
        self.params = params;
    }

    /// Picks the next token. `logits` is modified (penalties); `recent` are the latest tokens.
    pub fn sample(&mut self, logits: &mut [f32], recent: &[u32]) -> u32 {
        let p = &self.params;
        if p.repeat_penalty != 1.0 && p.repeat_last_n > 0 {
            let from = recent.len().saturating_sub(p.repeat_last_n);
            for &t in &recent[from..] {
                if let Some(l) = logits.get_mut(t as usize) {
                    // As llama.cpp: shrink positive logits, push negative ones further down.
                    if *l > 0.0 {
                        *l /= p.repeat_penalty;
                    } else {
                        *l *= p.repeat_penalty;
                    }
                }
            }
            // A token repeated in the window is penalised once per occurrence in llama.cpp's
            // older sampler; once per distinct token in the newer one. Distinct would need a set;
            // the difference is second-order and the window is short.
        }
        if p.temperature <= 0.0 {
            return argmax(logits);
        }
        let cand = &mut self.cand;
        cand.clear();
        cand.extend(logits.iter().enumerate().map(|(i, &l)| (l, i as u32)));
        let by_logit = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0);
        if p.top_k > 0 && p.top_k < cand.len() {
            cand.select_nth_unstable_by(p.top_k - 1, by_logit);
            cand.truncate(p.top_k);
        }
        cand.sort_unstable_by(by_logit);
        // Probabilities at temperature 1 decide what survives top-p and min-p.
        let max = cand[0].0;
        let mut sum = 0f32;
        for c in cand.iter_mut() {
            c.0 = (c.0 - max).exp();
            sum += c.0;
        }
        let mut keep = cand.len();
        if p.top_p < 1.0 {
            let mut cum = 0f32;
            for (i, c) in cand.iter().enumerate() {
                cum += c.0 / sum;
                if cum >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if p.min_p > 0.0 {
            // cand[0] has probability 1/sum relative weight 1.
            let floor = p.min_p;
            keep = cand[..keep]
                .iter()
                .take_while(|c| c.0 >= floor)
                .count()
                .max(1);
        }
        cand.truncate(keep);
        // Temperature: p^(1/T) renormalised equals softmax(logit / T).
        let inv_t = 1.0 / p.temperature;
        let mut total = 0f32;
        for c in cand.iter_mut() {
            c.0 = c.0.powf(inv_t);
            total += c.0;
        }
        let r = self.rng.next_f32() * total;
        let mut acc = 0f32;
        for c in cand.iter() {
            acc += c.0;
            if r < acc {
                return c.1;
            }
        }
        cand[cand.len() - 1].1
    }
}

/// Index of the largest logit (the first on ties, as llama.cpp's greedy sampler).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > bv {
            bv = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        (0..100).map(|i| ((i * 37) % 100) as f32 / 10.0).collect()
    }

    #[test]
    fn greedy_takes_the_largest() {
        let mut s = Sampler::new(SamplingParams::greedy(), 100);
        let mut l = logits();
        let want = argmax(&l);
        assert_eq!(l[want as usize], 9.9);
        assert_eq!(s.sample(&mut l, &[]), want);
    }

    #[test]
    fn same_seed_same_draws_other_seed_other_draws() {
        let p = SamplingParams {
            temperature: 1.5,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 7,
            ..Default::default()
        };
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..p.clone() }, 100);
            (0..50)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let p = SamplingParams {
            temperature: 5.0,
            top_k: 1,
            seed: 3,
            ..Default::default()
        };
        let mut s = Sampler::new(p, 100);
        let want = argmax(&logits());
        for _ in 0..20 {
            assert_eq!(s.sample(&mut logits(), &[]), want);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // Two strong tokens, the rest negligible: top_p 0.5 keeps only the strongest.
        let mut l = vec![-20.0f32; 50];
        l[3] = 5.0;
        l[9] = 4.0;
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.5,
            min_p: 0.0,
            seed: 1,
            ..Default::default()
        };
        let mut s = Sampler::new(p.clone(), 50);
        for _ in 0..20 {
            assert_eq!(s.sample(&mut l.clone(), &[]), 3);
        }
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 1.0,
                min_p: 0.2,
                ..p
            },
            50,
        );
        for _ in 0..50 {
            let t = s.sample(&mut l.clone(), &[]);
            assert!(t == 3 || t == 9, "min_p let {t} through");
        }
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let mut l = vec![0.0f32; 10];
        l[2] = 2.0;
        l[5] = 1.9;
        let p = SamplingParams {
            repeat_penalty: 1.3,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(p, 10);
        assert_eq!(s.sample(&mut l.clone(), &[]), 2);
        assert_eq!(s.sample(&mut l, &[2]), 5);
    }
}
