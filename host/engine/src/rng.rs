//! A small seedable generator (SplitMix64) for sampling and parameter
//! initialisation, so runs are reproducible from their seed.

/// SplitMix64.
pub struct SplitMix64(u64);

/// SplitMix64's state increment.
const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function of a state.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64 random bits as a uniform draw on `[0, 1)` (53 bits).
fn unit(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN);
        mix(self.0)
    }

    /// Uniform on `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        unit(self.next_u64())
    }

    /// What the `n`-th call (from 0) of [`uniform`](Self::uniform) on a
    /// generator seeded with `seed` returns, without the calls before it
    /// (SplitMix64's state only counts): draws can be made in parallel.
    pub fn nth_uniform(seed: u64, n: u64) -> f64 {
        unit(mix(seed.wrapping_add(GOLDEN.wrapping_mul(n.wrapping_add(1)))))
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(f64::MIN_POSITIVE), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn the_nth_draw_is_the_sequences_nth() {
        let mut rng = SplitMix64::new(0xDEAD_BEEF);
        for n in 0..1000 {
            assert_eq!(rng.uniform(), SplitMix64::nth_uniform(0xDEAD_BEEF, n), "draw {n}");
        }
    }
}
