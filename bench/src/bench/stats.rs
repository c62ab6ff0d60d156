//! Small statistics: percentiles of latency samples, and the median of
//! several runs with its spread.

use serde::Serialize;

/// The `p`-th percentile (0..=100) of `sorted`, by the nearest-rank method
/// (an actual sample, never an interpolation); `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Sorts samples for [`percentile`]; NaNs (which none of our measures
/// produce) sort last instead of panicking.
pub fn sorted(mut samples: Vec<f64>) -> Vec<f64> {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples
}

/// One figure: several runs of one measure, summarised.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// Interquartile range bounds (25th and 75th percentile).
    pub q1: f64,
    pub q3: f64,
    pub runs: Vec<f64>,
}

impl Summary {
    /// `None` for no runs. The median of an even count is the mean of the
    /// middle two.
    pub fn of(runs: &[f64]) -> Option<Summary> {
        let s = sorted(runs.to_vec());
        let n = s.len();
        if n == 0 {
            return None;
        }
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: s[0],
            max: s[n - 1],
            q1: percentile(&s, 25.0)?,
            q3: percentile(&s, 75.0)?,
            runs: runs.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let s: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&s, 50.0), Some(50.0));
        assert_eq!(percentile(&s, 99.0), Some(99.0));
        assert_eq!(percentile(&s, 100.0), Some(100.0));
        assert_eq!(percentile(&s, 0.0), Some(1.0));
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_of_odd_and_even_counts() {
        let odd = Summary::of(&[3.0, 1.0, 2.0]).expect("runs");
        assert_eq!((odd.median, odd.min, odd.max), (2.0, 1.0, 3.0));
        assert_eq!(odd.runs, [3.0, 1.0, 2.0], "runs keep their order");
        let even = Summary::of(&[4.0, 1.0, 3.0, 2.0]).expect("runs");
        assert_eq!(even.median, 2.5);
        assert_eq!((even.q1, even.q3), (1.0, 3.0));
        assert_eq!(Summary::of(&[]), None);
    }
}
