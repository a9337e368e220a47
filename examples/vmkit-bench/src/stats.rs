//! Medians, ranges and ratios of a handful of samples.

/// Smallest, median and largest of some samples.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    /// The smallest sample.
    pub min: f64,
    /// The median (the mean of the middle two for an even count).
    pub median: f64,
    /// The largest sample.
    pub max: f64,
}

impl Summary {
    /// The summary of `samples`; `None` when there are none.
    pub fn of(mut samples: Vec<f64>) -> Option<Self> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_by(|a, b| a.total_cmp(b));
        let n = samples.len();
        let median = if n % 2 == 1 {
            samples[n / 2]
        } else {
            (samples[n / 2 - 1] + samples[n / 2]) / 2.0
        };
        Some(Self {
            min: samples[0],
            median,
            max: samples[n - 1],
        })
    }
}

/// The median of `samples` (NaN when there are none).
pub fn median(samples: Vec<f64>) -> f64 {
    Summary::of(samples).map_or(f64::NAN, |s| s.median)
}

/// The `p`th percentile of `samples` by nearest rank: the smallest sample with at least `p`
/// percent of them at or below it (NaN when there are none).
pub fn percentile(mut samples: Vec<f64>, p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    let rank = (p / 100.0 * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1]
}

/// `v` with `digits` decimals, or `–` when it is missing (NaN) or infinite.
pub fn fixed(v: f64, digits: usize) -> String {
    if v.is_finite() {
        format!("{v:.digits$}")
    } else {
        "–".into()
    }
}

/// `a / b` with `digits` decimals, or `–` when either is missing (NaN) or `b` is zero.
pub fn ratio(a: f64, b: f64, digits: usize) -> String {
    fixed(a / b, digits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summaries() {
        assert_eq!(Summary::of(vec![]), None);
        let s = Summary::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
        assert_eq!(ratio(1.0, 4.0, 2), "0.25");
        assert_eq!(ratio(1.0, 0.0, 2), "–");
        assert_eq!(ratio(f64::NAN, 1.0, 3), "–");
        assert_eq!(fixed(0.125, 2), "0.12");
        assert_eq!(fixed(f64::NAN, 2), "–");
    }

    #[test]
    fn percentiles() {
        let hundred: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(hundred.clone(), 99.0), 99.0);
        assert_eq!(percentile(hundred.clone(), 50.0), 50.0);
        assert_eq!(percentile(hundred.clone(), 100.0), 100.0);
        assert_eq!(percentile(hundred, 0.0), 1.0);
        let thousand: Vec<f64> = (1..=1000).map(f64::from).collect();
        assert_eq!(percentile(thousand, 99.0), 990.0);
        assert_eq!(percentile(vec![7.0], 99.0), 7.0);
        assert!(percentile(vec![], 99.0).is_nan());
    }
}
