//! Rate limits, as the command line gives them (`bw=10M,iops=1000`: a rate per second and
//! a one-time burst) and as Firecracker's API and config file do (`rate_limiter` objects),
//! both mapped on vmkit-virtio's `RateLimiterConfig`.

use vmkit_api::model;
use vmkit_virtio::{BucketUpdate, RateLimiterConfig, RateLimiterUpdate, TokenBucketConfig};

use crate::config::parse_size;

/// Which part of a limiter a command-line key sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKey {
    /// Bytes per second (`10M`: K, M, G, T are powers of 1024).
    Bandwidth,
    /// A one-time burst of bytes.
    BandwidthBurst,
    /// Operations per second.
    Ops,
    /// A one-time burst of operations.
    OpsBurst,
}

/// A `--disk` key that sets its rate limiter: `bw`, `bw_burst`, `iops`, `iops_burst`.
pub fn disk_rate_key(k: &str) -> Option<RateKey> {
    match k {
        "bw" => Some(RateKey::Bandwidth),
        "bw_burst" => Some(RateKey::BandwidthBurst),
        "iops" => Some(RateKey::Ops),
        "iops_burst" => Some(RateKey::OpsBurst),
        _ => None,
    }
}

/// A `--net` key that sets a rate limiter: `rx_` or `tx_` (`true` for receive) followed
/// by `bw`, `bw_burst`, `ops` (frames per second) or `ops_burst`.
pub fn net_rate_key(k: &str) -> Option<(bool, RateKey)> {
    let (rx, rest) = match k.split_at_checked(3)? {
        ("rx_", rest) => (true, rest),
        ("tx_", rest) => (false, rest),
        _ => return None,
    };
    let key = match rest {
        "bw" => RateKey::Bandwidth,
        "bw_burst" => RateKey::BandwidthBurst,
        "ops" => RateKey::Ops,
        "ops_burst" => RateKey::OpsBurst,
        _ => return None,
    };
    Some((rx, key))
}

/// `--rng-bw RATE`: entropy bytes per second.
pub fn parse_rng_bw(v: &str) -> Result<RateLimiterConfig, String> {
    let mut limiter = RateLimiterConfig::default();
    set_rate(&mut limiter, "--rng-bw", RateKey::Bandwidth, v)?;
    Ok(limiter)
}

/// Sets `key` to `v` on `limiter`. `name` is the key as the user wrote it, for errors.
pub fn set_rate(
    limiter: &mut RateLimiterConfig,
    name: &str,
    key: RateKey,
    v: &str,
) -> Result<(), String> {
    let positive = |n: u64| {
        if n == 0 {
            Err(format!("{name}={v}: must be above 0"))
        } else {
            Ok(n)
        }
    };
    let bytes = || parse_size(v).map_err(|e| format!("{name}={v}: {e}"));
    let count = || {
        v.parse::<u64>()
            .map_err(|_| format!("{name}={v}: not a number"))
    };
    let (bucket, rate, burst) = match key {
        RateKey::Bandwidth => (&mut limiter.bandwidth, Some(positive(bytes()?)?), None),
        RateKey::BandwidthBurst => (&mut limiter.bandwidth, None, Some(bytes()?)),
        RateKey::Ops => (&mut limiter.ops, Some(positive(count()?)?), None),
        RateKey::OpsBurst => (&mut limiter.ops, None, Some(count()?)),
    };
    let old = bucket.unwrap_or_default();
    *bucket = Some(match (rate, burst) {
        (Some(rate), _) => TokenBucketConfig::per_second(rate, old.one_time_burst),
        (None, burst) => TokenBucketConfig {
            one_time_burst: burst.unwrap_or(0),
            ..old
        },
    });
    Ok(())
}

/// Checks that every burst came with its rate: `prefix` names the keys in the error
/// (`""` for `--disk`'s `bw_burst=`, `"rx_"` for `--net`'s).
pub fn check_rates(limiter: &RateLimiterConfig, prefix: &str, ops: &str) -> Result<(), String> {
    let lone = |b: Option<TokenBucketConfig>| b.is_some_and(|b| b.size == 0);
    if lone(limiter.bandwidth) {
        return Err(format!("{prefix}bw_burst= needs {prefix}bw="));
    }
    if lone(limiter.ops) {
        return Err(format!("{prefix}{ops}_burst= needs {prefix}{ops}="));
    }
    Ok(())
}

fn bucket(b: model::TokenBucket) -> TokenBucketConfig {
    TokenBucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time_ms: b.refill_time,
    }
}

/// Firecracker's `rate_limiter` object (absent: no limit).
pub fn from_api(limiter: Option<&model::RateLimiter>) -> RateLimiterConfig {
    let Some(l) = limiter else {
        return RateLimiterConfig::default();
    };
    RateLimiterConfig {
        bandwidth: l.bandwidth.map(bucket),
        ops: l.ops.map(bucket),
    }
}

/// Firecracker's `PATCH` of a `rate_limiter`: a bucket it gives replaces the current one (a
/// `size` or `refill_time` of 0 removes the limit), a bucket it leaves out stays.
pub fn patched(current: RateLimiterConfig, patch: &model::RateLimiter) -> RateLimiterConfig {
    RateLimiterConfig {
        bandwidth: patch.bandwidth.map(bucket).or(current.bandwidth),
        ops: patch.ops.map(bucket).or(current.ops),
    }
}

/// The update a `PATCH`'s `rate_limiter` makes to a running device's limiter (`None`: no
/// object, nothing changes): a bucket it gives is replaced by a new, full one; one it leaves
/// out keeps its tokens, as in Firecracker.
pub fn update(patch: Option<&model::RateLimiter>) -> RateLimiterUpdate {
    let Some(p) = patch else {
        return RateLimiterUpdate::default();
    };
    let replace = |b: Option<model::TokenBucket>| match b {
        Some(b) => BucketUpdate::Replace(Some(bucket(b))),
        None => BucketUpdate::Keep,
    };
    RateLimiterUpdate {
        bandwidth: replace(p.bandwidth),
        ops: replace(p.ops),
    }
}

/// The API's form of `limiter` (`None` when it limits nothing), for a resource kept in
/// Firecracker's model.
pub fn to_api(limiter: RateLimiterConfig) -> Option<model::RateLimiter> {
    let bucket = |b: TokenBucketConfig| model::TokenBucket {
        size: b.size,
        one_time_burst: (b.one_time_burst > 0).then_some(b.one_time_burst),
        refill_time: b.refill_time_ms,
    };
    (!limiter.is_unlimited()).then(|| model::RateLimiter {
        bandwidth: limiter.bandwidth.map(bucket),
        ops: limiter.ops.map(bucket),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_per_second_and_bursts() {
        let mut l = RateLimiterConfig::default();
        set_rate(&mut l, "bw_burst", RateKey::BandwidthBurst, "1M").unwrap();
        set_rate(&mut l, "bw", RateKey::Bandwidth, "10M").unwrap();
        set_rate(&mut l, "iops", RateKey::Ops, "1000").unwrap();
        let bw = l.bandwidth.unwrap();
        assert_eq!(
            (bw.rate_per_second(), bw.one_time_burst),
            (10 << 20, 1 << 20)
        );
        assert_eq!(l.ops.unwrap().rate_per_second(), 1000);
        check_rates(&l, "", "iops").unwrap();
        for (key, v, says) in [
            (RateKey::Bandwidth, "0", "above 0"),
            (RateKey::Bandwidth, "fast", "not a size"),
            (RateKey::Ops, "1k", "not a number"),
            (RateKey::Ops, "0", "above 0"),
        ] {
            let e = set_rate(&mut l, "k", key, v).unwrap_err();
            assert!(e.contains(says), "{v}: {e}");
        }
        let mut l = RateLimiterConfig::default();
        set_rate(&mut l, "rx_ops_burst", RateKey::OpsBurst, "5").unwrap();
        let e = check_rates(&l, "rx_", "ops").unwrap_err();
        assert_eq!(e, "rx_ops_burst= needs rx_ops=");
    }

    #[test]
    fn api_objects_and_patches() {
        let api: model::RateLimiter = serde_json::from_str(
            r#"{"bandwidth": {"size": 1000, "one_time_burst": 10, "refill_time": 100}}"#,
        )
        .unwrap();
        let l = from_api(Some(&api));
        assert_eq!(l.bandwidth.unwrap().rate_per_second(), 10_000);
        assert_eq!(l.ops, None);
        assert_eq!(to_api(l), Some(api));
        assert!(from_api(None).is_unlimited());
        assert_eq!(to_api(RateLimiterConfig::default()), None);
        // A patch of the ops bucket keeps the bandwidth one; a zero size lifts a limit.
        let patch: model::RateLimiter =
            serde_json::from_str(r#"{"ops": {"size": 5, "refill_time": 1000}}"#).unwrap();
        let p = patched(l, &patch);
        assert_eq!(p.bandwidth, l.bandwidth);
        assert_eq!(p.ops.unwrap().size, 5);
        let lift: model::RateLimiter =
            serde_json::from_str(r#"{"bandwidth": {"size": 0, "refill_time": 0}}"#).unwrap();
        assert!(patched(l, &lift).is_unlimited());
        // On a running device, only the buckets given are replaced.
        let u = update(Some(&patch));
        assert_eq!(u.bandwidth, BucketUpdate::Keep);
        assert_eq!(
            u.ops,
            BucketUpdate::Replace(Some(bucket(patch.ops.unwrap())))
        );
        assert!(update(None).is_keep());
    }
}
