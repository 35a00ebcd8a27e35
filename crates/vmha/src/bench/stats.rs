//! Sample statistics and the seeded random phases of the benchmark.

/// Median, 90th percentile and maximum of a set of samples (nearest rank).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// The median (the upper one for an even count).
    pub median: f64,
    /// The 90th percentile, nearest rank.
    pub p90: f64,
    /// The largest sample.
    pub max: f64,
}

/// The summary of `samples`; `None` when there are none.
pub fn summary(samples: &[f64]) -> Option<Summary> {
    let mut s: Vec<f64> = samples.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    Some(Summary {
        n: s.len(),
        median: s[s.len() / 2],
        p90: rank(&s, 0.9),
        max: s[s.len() - 1],
    })
}

/// A Markdown table row: `cells` (already `|`-separated), then the median, p90 and maximum
/// of `values` (milliseconds) as [`ms`] writes them and their count; `None` without values.
pub fn ms_row(cells: &str, values: &[f64]) -> Option<String> {
    let s = summary(values)?;
    Some(format!(
        "| {cells} | {} | {} | {} | {} |",
        ms(s.median),
        ms(s.p90),
        ms(s.max),
        s.n
    ))
}

/// A duration in ms, written for people: `850 ms`, `3.2 s`.
pub fn ms(v: f64) -> String {
    if v < 1000.0 {
        format!("{v:.0} ms")
    } else {
        format!("{:.2} s", v / 1000.0)
    }
}

/// The nearest-rank `q` quantile of sorted, non-empty `s`.
fn rank(s: &[f64], q: f64) -> f64 {
    let r = (q * s.len() as f64).ceil() as usize;
    s[r.clamp(1, s.len()) - 1]
}

/// A small seeded generator (splitmix64): the same seed gives the same injection phases.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next number, uniform in [0, 1).
    pub fn fraction(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn summary_takes_nearest_ranks() {
        let s: Vec<f64> = (1..=20).map(f64::from).collect();
        let sum = summary(&s).unwrap();
        assert_eq!(
            (sum.n, sum.median, sum.p90, sum.max),
            (20, 11.0, 18.0, 20.0)
        );
        assert_eq!(summary(&[5.0]).unwrap().p90, 5.0);
        assert!(summary(&[]).is_none());
        assert!(summary(&[f64::NAN]).is_none());
    }

    #[test]
    fn rows_and_durations_read_well() {
        assert_eq!(ms(850.0), "850 ms");
        assert_eq!(ms(3210.0), "3.21 s");
        assert_eq!(
            ms_row("a | b", &[900.0, 1500.0]).unwrap(),
            "| a | b | 1.50 s | 1.50 s | 1.50 s | 2 |"
        );
        assert!(ms_row("a", &[]).is_none());
    }

    #[test]
    fn rng_is_seeded_and_in_range() {
        let (mut a, mut b, mut c) = (Rng::new(1), Rng::new(1), Rng::new(2));
        let xs: Vec<f64> = (0..100).map(|_| a.fraction()).collect();
        let ys: Vec<f64> = (0..100).map(|_| b.fraction()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs[0], c.fraction());
        assert!(xs.iter().all(|x| (0.0..1.0).contains(x)));
        // Spread over the cycle, not stuck in one phase.
        assert!(xs.iter().any(|x| *x < 0.2) && xs.iter().any(|x| *x > 0.8));
    }
}
