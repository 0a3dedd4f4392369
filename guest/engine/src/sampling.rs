//! Choosing the next token from the logits.
//!
//! The chain follows llama.cpp's order: repetition penalty, top-k, top-p,
//! min-p, temperature, then a draw from a seeded generator, so that the same
//! seed reproduces the same run. A temperature of 0 means greedy.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

/// Sampling parameters; the defaults are llama.cpp's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplerConfig {
    /// 0 (or below) picks the most likely token.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set whose probability mass reaches p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of recently seen tokens (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0x5eed,
        }
    }
}

impl SamplerConfig {
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// A description of the first parameter that is out of range.
    pub fn validate(&self) -> Result<(), &'static str> {
        if !self.temperature.is_finite() {
            return Err("temperature must be a finite number");
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err("top_p must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err("min_p must be between 0 and 1");
        }
        if !(self.repeat_penalty.is_finite() && self.repeat_penalty > 0.0) {
            return Err("repeat_penalty must be a positive number");
        }
        Ok(())
    }
}

/// A small, fast, seedable generator (xoshiro256**, seeded through splitmix64).
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
}

pub struct Sampler {
    config: SamplerConfig,
    rng: Rng,
    recent: VecDeque<u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(config: SamplerConfig, n_vocab: usize) -> Self {
        Sampler {
            config,
            rng: Rng::new(config.seed),
            recent: VecDeque::with_capacity(config.repeat_last_n),
            candidates: Vec::with_capacity(n_vocab),
        }
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Records a token of the context (prompt or generated) for the repetition penalty.
    pub fn accept(&mut self, token: u32) {
        if self.config.repeat_last_n == 0 {
            return;
        }
        if self.recent.len() == self.config.repeat_last_n {
            self.recent.pop_front();
        }
        self.recent.push_back(token);
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let cfg = self.config;
        let penalized = |id: usize, l: f32| -> f32 {
            if cfg.repeat_penalty != 1.0 && self.recent.contains(&(id as u32)) {
                if l > 0.0 {
                    l / cfg.repeat_penalty
                } else {
                    l * cfg.repeat_penalty
                }
            } else {
                l
            }
        };
        if cfg.temperature <= 0.0 {
            // Greedy: the first of equal maxima, as llama.cpp does.
            let mut best = (0usize, f32::NEG_INFINITY);
            for (i, &l) in logits.iter().enumerate() {
                let l = penalized(i, l);
                if l > best.1 {
                    best = (i, l);
                }
            }
            return best.0 as u32;
        }

        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .map(|(i, &l)| (i as u32, penalized(i, l))),
        );
        let by_logit_desc = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1);
        if cfg.top_k > 0 && cfg.top_k < cands.len() {
            cands.select_nth_unstable_by(cfg.top_k - 1, by_logit_desc);
            cands.truncate(cfg.top_k);
        } else if cfg.min_p > 0.0 {
            // Without top-k, drop the hopeless tail before sorting 10^5 candidates.
            let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
            let floor = max + libm::logf(cfg.min_p);
            cands.retain(|c| c.1 >= floor);
        }
        cands.sort_unstable_by(by_logit_desc);

        // Probabilities at temperature 1 for top-p and min-p (llama.cpp applies temperature last).
        let max = cands[0].1;
        let mut probs: Vec<f32> = cands.iter().map(|c| libm::expf(c.1 - max)).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        let mut keep = cands.len();
        if cfg.top_p < 1.0 {
            let mut mass = 0.0;
            for (i, p) in probs.iter().enumerate() {
                mass += p;
                if mass >= cfg.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        if cfg.min_p > 0.0 {
            let floor = probs[0] * cfg.min_p;
            keep = keep.min(probs.iter().take_while(|&&p| p >= floor).count().max(1));
        }
        cands.truncate(keep.max(1));

        let weights: Vec<f32> = cands
            .iter()
            .map(|c| libm::expf((c.1 - max) / cfg.temperature))
            .collect();
        let total: f32 = weights.iter().sum();
        let mut r = self.rng.next_f32() * total;
        for (c, w) in cands.iter().zip(&weights) {
            if r < *w {
                return c.0;
            }
            r -= w;
        }
        cands[cands.len() - 1].0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn greedy_picks_first_max() {
        let mut s = Sampler::new(SamplerConfig::greedy(), 4);
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seed_reproduces_and_top_k_restricts() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 17) as f32 * 0.3).collect();
        let cfg = SamplerConfig {
            temperature: 1.5,
            top_k: 5,
            top_p: 1.0,
            min_p: 0.0,
            ..SamplerConfig::default()
        };
        let run = |seed| {
            let mut s = Sampler::new(SamplerConfig { seed, ..cfg }, 100);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        // The 5 largest logits are 16*0.3 at ids 16, 33, 50, 67, 84.
        assert!(run(7).iter().all(|id| id % 17 == 16));
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits = vec![10.0, 9.9, 0.0, -5.0];
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.9,
            min_p: 0.0,
            ..SamplerConfig::default()
        };
        let mut s = Sampler::new(cfg, 4);
        assert!((0..200).all(|_| s.sample(&logits) < 2));
        let cfg = SamplerConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.5,
            ..SamplerConfig::default()
        };
        let mut s = Sampler::new(cfg, 4);
        assert!((0..200).all(|_| s.sample(&logits) < 2));
    }

    #[test]
    fn repetition_penalty_demotes_recent_tokens() {
        let mut s = Sampler::new(
            SamplerConfig {
                repeat_penalty: 2.0,
                ..SamplerConfig::greedy()
            },
            3,
        );
        s.accept(0);
        assert_eq!(s.sample(&[2.0, 1.5, 0.0]), 1);
        let bad = SamplerConfig {
            top_p: 1.5,
            ..SamplerConfig::default()
        };
        assert!(bad.validate().is_err());
    }
}
