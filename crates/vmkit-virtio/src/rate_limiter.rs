//! Token-bucket rate limiters for devices, as Firecracker's `rate_limiter` objects: a
//! bandwidth bucket (bytes) and an operations bucket (requests), each with a capacity
//! (`size`), the time to refill it from empty (`refill_time`, ms) and a one-time burst that
//! does not refill; and a timerfd that fires when a throttled device may go on.
//!
//! A device asks [`RateLimiter::consume`] before it serves a request. When a bucket lacks
//! the tokens, the call returns `false`, arms the timer for the moment the tokens will be
//! there, and the device stops taking requests from its queues (leaving them in the
//! available ring: [`ActiveQueue::undo_pop`](crate::ActiveQueue::undo_pop) gives back a
//! chain already taken; [`ActiveQueue::set_throttled`](crate::ActiveQueue::set_throttled)
//! keeps the event handler from polling the ring meanwhile). The device hands the timer's
//! fd to the event loop ([`timer_fd`](RateLimiter::timer_fd) through
//! [`VirtioDevice::readable_fds`](crate::VirtioDevice::readable_fds)); when it fires, the
//! device calls [`timer_expired`](RateLimiter::timer_expired) and serves its queues again.
//! Nothing spins while a device is throttled.
//!
//! The semantics are Firecracker's where they are stated:
//!
//! - a bucket starts full, plus its one-time burst, which is spent first and never comes
//!   back; tokens then refill continuously at `size / refill_time`, up to `size`;
//! - a bucket with `size` 0 or `refill_time` 0 does not limit (Firecracker's rule);
//! - a request larger than the bucket passes as soon as the bucket is not in debt (it
//!   could never fit), emptying it and leaving the excess as a debt that the refill pays
//!   before anything else passes. Firecracker blocks for that excess too, but then forgets
//!   it (the bucket is full again after the wait, so a stream of oversize requests gets
//!   more than the rate); here the long-run rate is exactly `size / refill_time` whatever
//!   the request sizes;
//! - a request that needs both buckets passes only if both have the tokens, and takes
//!   from both at once (Firecracker takes the op and gives it back when the bytes fail).
//!
//! The timer fires when the tokens the refused request needs will be there (at least
//! [`MIN_WAIT`] later, so a tight limit costs at most one wake-up per `MIN_WAIT`), not on
//! Firecracker's fixed 100 ms.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// The shortest wait the timer is armed for (or the bucket's whole refill time, if
/// shorter): a limit of many small operations is served in batches rather than one
/// wake-up per operation.
pub const MIN_WAIT: Duration = Duration::from_millis(5);

/// Nanoseconds in a millisecond.
const NS_PER_MS: u128 = 1_000_000;

/// One token bucket, as Firecracker's `TokenBucket` JSON object (`size`, `one_time_burst`,
/// `refill_time` in milliseconds).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucketConfig {
    /// Capacity: how many tokens (bytes or operations) the bucket holds when full.
    pub size: u64,
    /// Extra tokens available once, at the start, spent before the bucket's own and never
    /// refilled.
    pub one_time_burst: u64,
    /// Milliseconds to refill the bucket from empty to full.
    pub refill_time_ms: u64,
}

impl TokenBucketConfig {
    /// A bucket for `rate` tokens per second with a one-time burst of `burst`: what an
    /// operator means by "10 MiB/s". The bucket holds the shortest whole number of
    /// milliseconds from 100 up in which the rate makes a whole number of tokens (100 ms
    /// for 10 MiB/s or 1000 operations, 125 ms for 1 MiB/s, at most 1000 ms), so the rate is
    /// exact and an idle second does not become a second's worth of burst.
    pub fn per_second(rate: u64, burst: u64) -> Self {
        let rate128 = u128::from(rate);
        let refill_time_ms = (100..=1000u64)
            .find(|ms| (rate128 * u128::from(*ms)).is_multiple_of(1000))
            .unwrap_or(1000);
        // At most `rate`: fits.
        let size = u64::try_from(rate128 * u128::from(refill_time_ms) / 1000).unwrap_or(rate);
        Self {
            size,
            one_time_burst: burst,
            refill_time_ms,
        }
    }

    /// The rate this bucket refills at, in tokens per second (rounded down; 0: unlimited).
    pub fn rate_per_second(&self) -> u64 {
        if self.is_unlimited() {
            return 0;
        }
        let rate = u128::from(self.size) * 1000 / u128::from(self.refill_time_ms);
        u64::try_from(rate).unwrap_or(u64::MAX)
    }

    /// Whether the bucket limits nothing (`size` or `refill_time` 0, as in Firecracker).
    pub fn is_unlimited(&self) -> bool {
        self.size == 0 || self.refill_time_ms == 0
    }
}

/// A rate limiter's configuration: Firecracker's `rate_limiter` object. A bucket that is
/// `None` (or unlimited) does not limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterConfig {
    /// Bytes.
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations (requests, frames).
    pub ops: Option<TokenBucketConfig>,
}

impl RateLimiterConfig {
    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none_or(|b| b.is_unlimited()) && self.ops.is_none_or(|b| b.is_unlimited())
    }
}

/// What an update does to one bucket: Firecracker's `BucketUpdate` (a `PATCH` that leaves a
/// bucket out keeps it, with its tokens).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BucketUpdate {
    /// The bucket stays as it is: its configuration, its tokens, its burst left.
    #[default]
    Keep,
    /// The bucket is replaced by a new, full one (`None`, or an unlimited one: no limit).
    Replace(Option<TokenBucketConfig>),
}

/// An update of a [`RateLimiter`]'s buckets, each [kept or replaced](BucketUpdate) on its
/// own. The default keeps both; a [`RateLimiterConfig`] converts into one replacing both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterUpdate {
    /// The bandwidth bucket.
    pub bandwidth: BucketUpdate,
    /// The operations bucket.
    pub ops: BucketUpdate,
}

impl RateLimiterUpdate {
    /// Whether it keeps both buckets (changes nothing).
    pub fn is_keep(&self) -> bool {
        self.bandwidth == BucketUpdate::Keep && self.ops == BucketUpdate::Keep
    }
}

impl From<RateLimiterConfig> for RateLimiterUpdate {
    fn from(config: RateLimiterConfig) -> Self {
        Self {
            bandwidth: BucketUpdate::Replace(config.bandwidth),
            ops: BucketUpdate::Replace(config.ops),
        }
    }
}

/// A monotonic clock, injectable so the refill arithmetic is tested without sleeping.
pub trait Clock: Send + fmt::Debug {
    /// Time since an arbitrary fixed origin; never goes back.
    fn now(&self) -> Duration;
}

/// The host's monotonic clock (`Instant`, the clock the timerfd runs on).
#[derive(Debug)]
pub struct MonotonicClock(Instant);

impl Default for MonotonicClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// A token bucket's state. Its level may go below zero (a debt) after an oversize request
/// ([`RateLimiter::consume`]) or a charge after the fact ([`RateLimiter::charge`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    refill_ns: u128,
    one_time_burst: u64,
    /// Tokens in the bucket: at most `size`, negative while in debt.
    level: i128,
    /// When the tokens were last counted.
    last: Duration,
}

impl TokenBucket {
    /// A full bucket as `config` says, at time `now`; `None` for an unlimited one.
    pub fn new(config: TokenBucketConfig, now: Duration) -> Option<Self> {
        if config.is_unlimited() {
            return None;
        }
        Some(Self {
            size: config.size,
            refill_ns: u128::from(config.refill_time_ms) * NS_PER_MS,
            one_time_burst: config.one_time_burst,
            level: i128::from(config.size),
            last: now,
        })
    }

    /// Tokens in the bucket (negative: a debt), one-time burst not counted.
    pub fn level(&self) -> i128 {
        self.level
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Adds the tokens refilled since the last count, up to `size`.
    fn refill(&mut self, now: Duration) {
        let size = i128::from(self.size);
        if self.level >= size {
            self.last = now;
            return;
        }
        // At most u64::MAX ns (584 years) times a u64 size: fits u128.
        let elapsed = now
            .saturating_sub(self.last)
            .as_nanos()
            .min(u128::from(u64::MAX));
        let tokens = elapsed * u128::from(self.size) / self.refill_ns;
        if tokens == 0 {
            return;
        }
        // The time those whole tokens took, rounded up, so a fraction is never counted
        // twice: the remainder carries over to the next count.
        let spent = (tokens * self.refill_ns).div_ceil(u128::from(self.size));
        let tokens = i128::try_from(tokens).unwrap_or(i128::MAX);
        self.level = self.level.saturating_add(tokens).min(size);
        self.last = if self.level == size {
            now
        } else {
            // `spent <= elapsed <= u64::MAX` ns.
            self.last + Duration::from_nanos(u64::try_from(spent).unwrap_or(u64::MAX))
        };
    }

    /// How many tokens of a `tokens` request come out of the bucket itself (after the
    /// one-time burst).
    fn beyond_burst(&self, tokens: u64) -> u64 {
        tokens.saturating_sub(self.one_time_burst)
    }

    /// How long until `tokens` can be taken (zero: now). The bucket must be refilled.
    fn wait_for(&self, tokens: u64) -> Duration {
        let need = self.beyond_burst(tokens);
        // An oversize request only waits for the debt to be paid.
        let target = if need > self.size {
            0
        } else {
            i128::from(need)
        };
        let missing = target.saturating_sub(self.level);
        if missing <= 0 {
            return Duration::ZERO;
        }
        // `missing` is positive and at most 2^65: the product may overflow for absurd
        // refill times, and then the wait is as long as a Duration of u64 ns can say.
        let ns = u128::try_from(missing)
            .ok()
            .and_then(|m| m.checked_mul(self.refill_ns))
            .map(|p| p.div_ceil(u128::from(self.size)))
            .and_then(|ns| u64::try_from(ns).ok())
            .unwrap_or(u64::MAX);
        Duration::from_nanos(ns)
    }

    /// Takes `tokens`: the one-time burst first, then the bucket (into debt if it must).
    fn take(&mut self, tokens: u64) {
        let from_burst = tokens.min(self.one_time_burst);
        self.one_time_burst -= from_burst;
        let rest = i128::from(tokens - from_burst);
        self.level = self.level.saturating_sub(rest).max(-i128::from(u64::MAX));
    }

    /// The shortest wait worth arming a timer for.
    fn min_wait(&self) -> Duration {
        let refill = Duration::from_nanos(u64::try_from(self.refill_ns).unwrap_or(u64::MAX));
        MIN_WAIT.min(refill)
    }
}

/// A device's rate limiter: an optional bandwidth and an optional operations bucket, the
/// clock they refill on, and the timerfd that ends a throttled period.
///
/// ```
/// use vmkit_virtio::rate_limiter::{RateLimiter, RateLimiterConfig, TokenBucketConfig};
///
/// // 1 MiB/s: a bucket of 128 KiB refilled every 125 ms; up to 8 requests in a burst.
/// let mut limiter = RateLimiter::new(RateLimiterConfig {
///     bandwidth: Some(TokenBucketConfig::per_second(1 << 20, 0)),
///     ops: Some(TokenBucketConfig { size: 8, one_time_burst: 0, refill_time_ms: 1000 }),
/// })?;
/// assert!(limiter.consume(96 << 10, 1)); // 96 KiB of 128 KiB
/// assert!(!limiter.consume(64 << 10, 1)); // not yet: the timer is armed for when it may
/// assert!(limiter.is_throttled());
/// // The device hands `limiter.timer_fd()?` to its event loop, and when it fires calls
/// // `limiter.timer_expired()` and serves its queues again.
/// # let _ = limiter.timer_fd()?;
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct RateLimiter {
    config: RateLimiterConfig,
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: Box<dyn Clock>,
    timer: TimerFd,
    /// The timer is armed: the device waits for it.
    throttled: bool,
    /// The wait the timer was last armed for.
    last_wait: Option<Duration>,
    /// Arming the timer failed once (and was logged): later failures are not logged.
    arm_failed: bool,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("throttled", &self.throttled)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter as `config` says, on the host's monotonic clock.
    ///
    /// # Errors
    ///
    /// The timerfd cannot be created.
    pub fn new(config: RateLimiterConfig) -> io::Result<Self> {
        Self::with_clock(config, Box::new(MonotonicClock::default()))
    }

    /// A limiter as `config` says, on `clock` (a test's).
    ///
    /// # Errors
    ///
    /// The timerfd cannot be created.
    pub fn with_clock(config: RateLimiterConfig, clock: Box<dyn Clock>) -> io::Result<Self> {
        let timer = TimerFd::new()?;
        // SAFETY: F_SETFL on an fd we own, with flags only: no memory is involved.
        let ret = unsafe { libc::fcntl(timer.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        let now = clock.now();
        Ok(Self {
            config,
            bandwidth: config.bandwidth.and_then(|b| TokenBucket::new(b, now)),
            ops: config.ops.and_then(|b| TokenBucket::new(b, now)),
            clock,
            timer,
            throttled: false,
            last_wait: None,
            arm_failed: false,
        })
    }

    /// Replaces or keeps each bucket as `update` says, as Firecracker's `PATCH` of a drive's
    /// or an interface's rate limiter does: a replaced bucket is a new, full one (with its
    /// one-time burst); a kept one keeps its tokens (and its debt). A [`RateLimiterConfig`]
    /// replaces both. Unless it keeps both, a throttled device is let go at the next timer
    /// expiry or call.
    pub fn update(&mut self, update: impl Into<RateLimiterUpdate>) {
        let update = update.into();
        if update.is_keep() {
            return;
        }
        let now = self.clock.now();
        if let BucketUpdate::Replace(b) = update.bandwidth {
            self.config.bandwidth = b;
            self.bandwidth = b.and_then(|b| TokenBucket::new(b, now));
        }
        if let BucketUpdate::Replace(b) = update.ops {
            self.config.ops = b;
            self.ops = b.and_then(|b| TokenBucket::new(b, now));
        }
        self.throttled = false;
        if let Err(e) = self.timer.clear() {
            log::warn!("rate limiter: disarming the timer: {e}");
        }
    }

    /// The configuration it was built or last updated with.
    pub fn config(&self) -> RateLimiterConfig {
        self.config
    }

    /// Whether the limiter limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// The bandwidth bucket, if limited.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket, if limited.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// Whether the device must wait for the timer: a request was refused since the last
    /// [`timer_expired`](Self::timer_expired).
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// How long the timer was last armed for.
    pub fn last_wait(&self) -> Option<Duration> {
        self.last_wait
    }

    /// Takes `bytes` from the bandwidth bucket and `ops` from the operations bucket, both or
    /// neither. `false` when a bucket lacks the tokens, or the limiter is throttled already:
    /// the device must stop serving requests until the timer fires, which this arms for
    /// when the tokens will be there. If the timer cannot be armed (logged once), the
    /// request passes, taking its tokens into debt: a device that waited would never be
    /// woken.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> bool {
        if self.throttled {
            return false;
        }
        if self.is_unlimited() {
            return true;
        }
        let now = self.clock.now();
        let mut wait = Duration::ZERO;
        let mut min_wait = Duration::ZERO;
        for (bucket, tokens) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.refill(now);
                let w = b.wait_for(tokens);
                if !w.is_zero() {
                    wait = wait.max(w);
                    min_wait = min_wait.max(b.min_wait());
                }
            }
        }
        // Without a timer the device would never resume (its requests go back to the ring
        // with no wake-up coming): when the timer cannot be armed, the request passes.
        if !wait.is_zero() && self.arm(wait.max(min_wait)) {
            return false;
        }
        self.take(bytes, ops);
        true
    }

    /// Charges `bytes` and `ops` for something already done (a frame already received: its
    /// size is known only then), into debt if need be; a device then checks
    /// [`may_proceed`](Self::may_proceed) before the next one.
    pub fn charge(&mut self, bytes: u64, ops: u64) {
        let now = self.clock.now();
        for b in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            b.refill(now);
        }
        self.take(bytes, ops);
    }

    /// Whether no bucket is in debt (nor the limiter throttled): a device that charges
    /// after the fact asks it before each operation. `false` arms the timer for when the
    /// debt is paid.
    pub fn may_proceed(&mut self) -> bool {
        self.consume(0, 0)
    }

    fn take(&mut self, bytes: u64, ops: u64) {
        if let Some(b) = &mut self.bandwidth {
            b.take(bytes);
        }
        if let Some(b) = &mut self.ops {
            b.take(ops);
        }
    }

    /// Arms the timer for `wait` and throttles; `false` (not throttled) when the timer
    /// cannot be armed, logged the first time.
    fn arm(&mut self, wait: Duration) -> bool {
        self.last_wait = Some(wait);
        // A zero duration would disarm the timer: `wait` is never zero here.
        match self.timer.reset(wait, None) {
            Ok(()) => {
                self.throttled = true;
                true
            }
            Err(e) => {
                if !std::mem::replace(&mut self.arm_failed, true) {
                    log::warn!("rate limiter: arming the timer: {e}; not throttling");
                }
                false
            }
        }
    }

    /// The timer fired (or the device wants to retry): consumes its expiry and lifts the
    /// throttle, so the device serves its queues again (a request still short of tokens
    /// re-arms it). Returns whether the limiter was throttled.
    pub fn timer_expired(&mut self) -> bool {
        // Non-blocking: `WouldBlock` when it had not expired (a spurious call).
        let _ = self.timer.wait();
        std::mem::take(&mut self.throttled)
    }

    /// A duplicate of the timer's fd, for the event loop to watch for readability
    /// ([`VirtioDevice::readable_fds`](crate::VirtioDevice::readable_fds)).
    ///
    /// # Errors
    ///
    /// The fd cannot be duplicated.
    pub fn timer_fd(&self) -> io::Result<OwnedFd> {
        // vmm-sys-util's TimerFd has no `try_clone`.
        // SAFETY: the raw fd is the TimerFd's own, open for as long as `self` is borrowed
        // here; `try_clone_to_owned` duplicates it (F_DUPFD_CLOEXEC).
        let borrowed = unsafe { BorrowedFd::borrow_raw(self.timer.as_raw_fd()) };
        borrowed.try_clone_to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A clock the test moves.
    #[derive(Clone, Debug, Default)]
    struct TestClock(Arc<AtomicU64>);

    impl TestClock {
        fn advance(&self, d: Duration) {
            self.0.fetch_add(d.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for TestClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    fn bucket(size: u64, burst: u64, ms: u64) -> Option<TokenBucketConfig> {
        Some(TokenBucketConfig {
            size,
            one_time_burst: burst,
            refill_time_ms: ms,
        })
    }

    fn limiter(
        bandwidth: Option<TokenBucketConfig>,
        ops: Option<TokenBucketConfig>,
    ) -> (RateLimiter, TestClock) {
        let clock = TestClock::default();
        let config = RateLimiterConfig { bandwidth, ops };
        let l = RateLimiter::with_clock(config, Box::new(clock.clone())).unwrap();
        (l, clock)
    }

    /// Lets the limiter go on as if its timer had fired.
    fn expire(l: &mut RateLimiter) {
        l.timer_expired();
    }

    #[test]
    fn refill_is_continuous_and_capped() {
        // 1000 bytes per second.
        let (mut l, clock) = limiter(bucket(1000, 0, 1000), None);
        assert!(l.consume(1000, 0));
        assert!(!l.consume(1, 0));
        assert_eq!(
            l.last_wait(),
            Some(MIN_WAIT),
            "1 ms for a byte; at least MIN_WAIT"
        );
        expire(&mut l);
        clock.advance(Duration::from_millis(250));
        assert!(l.consume(250, 0));
        assert!(!l.consume(1, 0), "exactly 250 bytes refilled");
        assert_eq!(l.last_wait(), Some(MIN_WAIT));
        expire(&mut l);
        // Fractions carry over: 1.5 ms three times is 4.5 bytes: 4 whole ones.
        for _ in 0..3 {
            clock.advance(Duration::from_micros(1500));
            l.charge(0, 0);
        }
        assert_eq!(l.bandwidth().unwrap().level(), 4);
        // An idle hour refills the bucket, no more.
        clock.advance(Duration::from_secs(3600));
        assert!(l.consume(1000, 0));
        assert!(!l.consume(1, 0));
    }

    #[test]
    fn the_timer_waits_for_the_missing_tokens() {
        let (mut l, clock) = limiter(bucket(1000, 0, 1000), None);
        assert!(l.consume(900, 0));
        assert!(!l.consume(600, 0), "500 missing");
        assert_eq!(l.last_wait(), Some(Duration::from_millis(500)));
        assert!(l.is_throttled());
        // Throttled: even a request that would fit waits for the timer.
        assert!(!l.consume(1, 0));
        clock.advance(Duration::from_millis(500));
        assert!(l.timer_expired());
        assert!(!l.timer_expired(), "once");
        assert!(l.consume(600, 0));
    }

    #[test]
    fn one_time_burst_is_spent_first_and_never_refills() {
        let (mut l, clock) = limiter(bucket(100, 1000, 1000), None);
        // 1000 of burst and 100 of bucket.
        assert!(l.consume(600, 0));
        assert!(l.consume(450, 0), "400 of burst and 50 of bucket");
        assert_eq!(l.bandwidth().unwrap().one_time_burst(), 0);
        assert_eq!(l.bandwidth().unwrap().level(), 50);
        assert!(!l.consume(100, 0));
        expire(&mut l);
        clock.advance(Duration::from_secs(10));
        assert!(l.consume(100, 0));
        assert!(!l.consume(1, 0), "the burst did not come back");
    }

    #[test]
    fn oversize_requests_pass_and_leave_a_debt() {
        let (mut l, clock) = limiter(bucket(100, 0, 1000), None);
        assert!(l.consume(40, 0));
        // 350 could never fit in 100: it passes now, and 290 are owed.
        assert!(l.consume(350, 0));
        assert_eq!(l.bandwidth().unwrap().level(), -290);
        assert!(!l.consume(1, 0));
        assert_eq!(l.last_wait(), Some(Duration::from_millis(2910)));
        expire(&mut l);
        // Another oversize one waits for the debt alone.
        clock.advance(Duration::from_millis(2000));
        assert!(!l.consume(500, 0));
        assert_eq!(l.last_wait(), Some(Duration::from_millis(900)));
        expire(&mut l);
        clock.advance(Duration::from_millis(900));
        assert!(l.consume(500, 0));
        // The long-run rate stays the bucket's: 890 bytes took 8.9 s (of 100 bytes/s).
        assert_eq!(l.bandwidth().unwrap().level(), -500);
    }

    #[test]
    fn bytes_and_ops_are_taken_together_or_not_at_all() {
        // 100 bytes per second; 2 operations per second.
        let (mut l, clock) = limiter(bucket(1000, 0, 10_000), bucket(2, 0, 1000));
        assert!(l.consume(100, 1));
        assert!(l.consume(100, 1));
        // Bytes there, ops not: nothing is taken.
        assert!(!l.consume(100, 1));
        assert_eq!(l.last_wait(), Some(Duration::from_millis(500)));
        assert_eq!(l.bandwidth().unwrap().level(), 800);
        expire(&mut l);
        clock.advance(Duration::from_millis(500));
        // Ops there, bytes not (850 of 1000): nothing is taken.
        assert!(!l.consume(1000, 1));
        assert_eq!(l.last_wait(), Some(Duration::from_millis(1500)));
        assert_eq!(l.ops().unwrap().level(), 1);
        assert_eq!(l.bandwidth().unwrap().level(), 850);
        expire(&mut l);
        clock.advance(Duration::from_millis(1500));
        assert!(l.consume(1000, 1));
        assert_eq!(
            l.ops().unwrap().level(),
            1,
            "2 refilled, 1 taken (capped at 2)"
        );
    }

    #[test]
    fn charges_after_the_fact_hold_the_next_operation() {
        let (mut l, clock) = limiter(bucket(1000, 0, 1000), None);
        assert!(l.may_proceed());
        l.charge(1500, 1);
        assert!(!l.may_proceed());
        assert_eq!(l.last_wait(), Some(Duration::from_millis(500)));
        expire(&mut l);
        clock.advance(Duration::from_millis(500));
        assert!(l.may_proceed());
    }

    #[test]
    fn zero_size_or_refill_time_does_not_limit() {
        let (mut l, _) = limiter(bucket(0, 5, 1000), bucket(10, 0, 0));
        assert!(l.is_unlimited());
        for _ in 0..1000 {
            assert!(l.consume(u64::MAX, u64::MAX));
        }
        assert!(RateLimiterConfig {
            bandwidth: bucket(0, 0, 1),
            ops: None
        }
        .is_unlimited());
    }

    #[test]
    fn huge_values_do_not_overflow() {
        let (mut l, clock) = limiter(bucket(u64::MAX, u64::MAX, u64::MAX), bucket(u64::MAX, 0, 1));
        assert!(l.consume(u64::MAX, u64::MAX));
        assert!(l.consume(u64::MAX, 0));
        assert!(!l.consume(u64::MAX, 0));
        // u64::MAX tokens over u64::MAX ms: as long as a Duration of u64 ns says.
        assert_eq!(l.last_wait(), Some(Duration::from_nanos(u64::MAX)));
        expire(&mut l);
        clock.advance(Duration::from_secs(u64::MAX / 2_000_000_000));
        l.charge(u64::MAX, u64::MAX);
        l.charge(u64::MAX, u64::MAX);
        assert!(!l.may_proceed());
        // A 1-byte bucket refilled every 1 ms, after years of nothing: no overflow.
        let (mut l, clock) = limiter(bucket(1, 0, 1), None);
        clock.advance(Duration::from_secs(1 << 30));
        assert!(l.consume(1, 0));
        assert!(l.consume(u64::MAX, 0), "oversize: passes into debt");
        assert!(!l.consume(1, 0));
    }

    #[test]
    fn a_timer_that_cannot_be_armed_lets_requests_pass() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let (mut l, _) = limiter(bucket(10, 0, 1000), bucket(1, 0, 1000));
        // An eventfd in the timer's place: timerfd_settime fails on it (EINVAL).
        let not_a_timer = vmm_sys_util::eventfd::EventFd::new(0).unwrap();
        // SAFETY: the eventfd's fd is handed over (`into_raw_fd`): the TimerFd owns and
        // closes it, and nothing else does.
        l.timer = unsafe { TimerFd::from_raw_fd(not_a_timer.into_raw_fd()) };
        assert!(l.consume(10, 1));
        // The buckets are empty and no timer can be armed: the request passes (into debt)
        // rather than waiting for a wake-up that never comes.
        assert!(l.consume(10, 1));
        assert!(!l.is_throttled());
        assert_eq!(l.bandwidth().unwrap().level(), -10);
        assert!(l.may_proceed());
    }

    #[test]
    fn the_timer_fires_and_is_watchable() {
        let (mut l, _) = limiter(bucket(1, 0, 1), None);
        let fd = l.timer_fd().unwrap();
        assert!(l.consume(1, 0));
        assert!(!l.consume(1, 0));
        assert_eq!(
            l.last_wait(),
            Some(Duration::from_millis(1)),
            "the refill time"
        );
        // Wait for the real timer to fire (1 ms).
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the call.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 5000) }, 1);
        assert!(l.timer_expired());
        // Consumed: the fd is no longer readable.
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(&mut p, 1, 0) }, 0);
    }

    #[test]
    fn update_replaces_the_buckets_and_lets_go() {
        let (mut l, _) = limiter(bucket(10, 0, 1000), None);
        assert!(l.consume(10, 0));
        assert!(!l.consume(10, 0));
        l.update(RateLimiterConfig {
            bandwidth: bucket(100, 0, 1000),
            ops: None,
        });
        assert!(!l.is_throttled());
        assert!(l.consume(100, 0));
        l.update(RateLimiterConfig::default());
        assert!(l.is_unlimited());
    }

    #[test]
    fn update_keeps_the_buckets_it_does_not_replace() {
        let (mut l, _) = limiter(bucket(1000, 500, 1000), bucket(10, 0, 1000));
        assert!(l.consume(1200, 3));
        assert!(!l.consume(1000, 1));
        // A new ops bucket only: the bandwidth bucket keeps its level (300) and its spent
        // burst.
        l.update(RateLimiterUpdate {
            bandwidth: BucketUpdate::Keep,
            ops: BucketUpdate::Replace(bucket(20, 0, 1000)),
        });
        assert!(!l.is_throttled());
        assert_eq!(l.bandwidth().unwrap().level(), 300);
        assert_eq!(l.bandwidth().unwrap().one_time_burst(), 0);
        assert_eq!(l.ops().unwrap().level(), 20);
        assert_eq!(l.config().bandwidth, bucket(1000, 500, 1000));
        assert_eq!(l.config().ops, bucket(20, 0, 1000));
        // Replacing the bandwidth bucket keeps the ops bucket's level.
        assert!(l.consume(100, 5));
        l.update(RateLimiterUpdate {
            bandwidth: BucketUpdate::Replace(None),
            ops: BucketUpdate::Keep,
        });
        assert!(l.bandwidth().is_none());
        assert_eq!(l.ops().unwrap().level(), 15);
        // Keeping both changes nothing, not even a throttle.
        assert!(l.consume(0, 15));
        assert!(!l.consume(0, 1));
        l.update(RateLimiterUpdate::default());
        assert!(l.is_throttled());
    }

    #[test]
    fn per_second_maps_a_rate_on_a_100_ms_bucket() {
        let b = TokenBucketConfig::per_second(10 << 20, 5);
        assert_eq!(
            (b.size, b.one_time_burst, b.refill_time_ms),
            (1 << 20, 5, 100)
        );
        assert_eq!(b.rate_per_second(), 10 << 20);
        let b = TokenBucketConfig::per_second(1 << 20, 0);
        assert_eq!((b.size, b.refill_time_ms), (1 << 17, 125));
        assert_eq!(b.rate_per_second(), 1 << 20);
        let b = TokenBucketConfig::per_second(3, 0);
        assert_eq!((b.size, b.refill_time_ms), (3, 1000));
        assert_eq!(b.rate_per_second(), 3);
        let b = TokenBucketConfig::per_second(u64::MAX, 0);
        assert_eq!(b.rate_per_second(), u64::MAX);
        assert_eq!(TokenBucketConfig::per_second(0, 0).rate_per_second(), 0);
    }
}
