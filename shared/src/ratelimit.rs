//! Bandwidth limits: a token bucket over bytes, and the byte-rate setting that configures it.
//!
//! Hand-written rather than `governor`: the whole need is one bucket per direction and an
//! async wait, which is a few lines of arithmetic (kept pure in [`Bucket::reserve`] so it is
//! tested without a clock) against several crates of compile time.
//!
//! The bucket lends: a caller takes its bytes at once and, if that drives the balance below
//! zero, sleeps until the debt is repaid. Callers therefore queue in arrival order and the
//! long-run rate is exact whatever the request sizes. Requests larger than the burst are
//! taken in burst-sized chunks so a 64 MiB piece does not starve everything else.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::bitfield::Bitfield;
use crate::digest::Digest;
use crate::peer::PieceSource;

/// Smallest burst: one minimum piece, so a slow limit still moves whole QUIC chunks.
const MIN_BURST: u64 = 64 << 10;
/// Largest burst.
const MAX_BURST: u64 = 16 << 20;

/// A byte rate per second; 0 means unlimited. Parsed from `12345`, `100MiB`, `1.5GB`,
/// `800Mbit`, each optionally followed by `/s`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ByteRate(pub u64);

/// A byte rate that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid byte rate {0:?}: expected a number of bytes per second, optionally with a unit (B, KB, KiB, MB, MiB, GB, GiB, Kbit, Mbit, Gbit) and /s")]
pub struct ByteRateError(String);

impl ByteRate {
    /// Bytes per second, or `None` when unlimited.
    pub fn limit(self) -> Option<u64> {
        (self.0 > 0).then_some(self.0)
    }
}

impl FromStr for ByteRate {
    type Err = ByteRateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ByteRateError(s.chars().take(64).collect());
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let factor: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "kb" | "k" => 1e3,
            "mb" | "m" => 1e6,
            "gb" | "g" => 1e9,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "bit" => 1.0 / 8.0,
            "kbit" => 1e3 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gbit" => 1e9 / 8.0,
            _ => return Err(err()),
        };
        if number.is_empty() {
            return Err(err());
        }
        if unit.is_empty() {
            return number.parse::<u64>().map(ByteRate).map_err(|_| err());
        }
        let value: f64 = number.parse().map_err(|_| err())?;
        let bytes = (value * factor).round();
        // Below one byte per second would round to 0, which means "no limit".
        if bytes < 1.0 && value > 0.0 {
            return Err(err());
        }
        // Rejects infinities and values past u64 (the float compare is exact at 2^64).
        if !bytes.is_finite() || bytes >= 18_446_744_073_709_551_616.0 {
            return Err(err());
        }
        Ok(ByteRate(bytes as u64))
    }
}

impl fmt::Display for ByteRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Written as a string: TOML integers stop at i64.
impl serde::Serialize for ByteRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from an integer (bytes per second) or a string with units.
impl<'de> serde::Deserialize<'de> for ByteRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        crate::config::int_or_text(d)
    }
}

/// The bucket's arithmetic, free of any clock.
#[derive(Debug, Clone)]
struct Bucket {
    rate: f64,
    burst: f64,
    /// May go negative: the debt of callers already admitted.
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// Takes `n` bytes at `now`; returns how long the caller must wait before using them.
    fn reserve(&mut self, n: u64, now: Instant) -> Duration {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// A token bucket over bytes, shared by every transfer in one direction.
#[derive(Debug)]
pub struct RateLimiter {
    burst: u64,
    bucket: Mutex<Bucket>,
}

impl RateLimiter {
    /// A limiter of `bytes_per_sec` (> 0) with a burst of a quarter second, within
    /// 64 KiB..16 MiB. It starts full.
    pub fn new(bytes_per_sec: u64) -> Self {
        let rate = bytes_per_sec.max(1);
        let burst = (rate / 4).clamp(MIN_BURST, MAX_BURST);
        let bucket =
            Bucket { rate: rate as f64, burst: burst as f64, tokens: burst as f64, last: Instant::now() };
        Self { burst, bucket: Mutex::new(bucket) }
    }

    /// A shared limiter for `rate`, or `None` when unlimited.
    pub fn for_rate(rate: ByteRate) -> Option<Arc<Self>> {
        rate.limit().map(|r| Arc::new(Self::new(r)))
    }

    /// Waits until `n` bytes may pass.
    pub async fn acquire(&self, mut n: u64) {
        while n > 0 {
            let chunk = n.min(self.burst);
            n -= chunk;
            let wait = self.bucket.lock().unwrap_or_else(|p| p.into_inner()).reserve(chunk, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Wraps a [`PieceSource`] so that every piece it serves first passes the egress limiter.
/// The peer server holds an upload slot while it waits, which is the back-pressure wanted.
#[derive(Debug)]
pub struct EgressLimited<S> {
    inner: S,
    limiter: Option<Arc<RateLimiter>>,
}

impl<S> EgressLimited<S> {
    /// `limiter` `None` serves at full speed.
    pub fn new(inner: S, limiter: Option<Arc<RateLimiter>>) -> Self {
        Self { inner, limiter }
    }
}

/// Forwards every method of the trait (a default left in place would silently answer for
/// the inner source: `subscribe` once did, and agents refused every Subscribe).
impl<S: PieceSource> PieceSource for EgressLimited<S> {
    async fn bitfield(&self, digest: Digest) -> Option<Bitfield> {
        self.inner.bitfield(digest).await
    }

    async fn subscribe(&self, digest: Digest, from: SocketAddr) -> Option<watch::Receiver<Bitfield>> {
        self.inner.subscribe(digest, from).await
    }

    async fn piece_size(&self, digest: Digest, index: u32) -> Option<u32> {
        self.inner.piece_size(digest, index).await
    }

    async fn piece(&self, digest: Digest, index: u32) -> Option<Bytes> {
        let data = self.inner.piece(digest, index).await?;
        if let Some(limiter) = &self.limiter {
            limiter.acquire(data.len() as u64).await;
        }
        Some(data)
    }

    async fn relay(&self, digest: Digest, index: u32) -> Option<Arc<crate::peer::Relay>> {
        let relay = self.inner.relay(digest, index).await?;
        if let Some(limiter) = &self.limiter {
            limiter.acquire(u64::from(relay.size())).await;
        }
        Some(relay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A download in progress that others may follow.
    struct Following(watch::Sender<Bitfield>);

    impl PieceSource for Following {
        async fn bitfield(&self, _digest: Digest) -> Option<Bitfield> {
            Some(self.0.borrow().clone())
        }
        async fn piece(&self, _digest: Digest, _index: u32) -> Option<Bytes> {
            None
        }
        async fn subscribe(&self, _digest: Digest, _from: SocketAddr) -> Option<watch::Receiver<Bitfield>> {
            Some(self.0.subscribe())
        }
    }

    #[tokio::test]
    async fn the_egress_wrapper_forwards_subscriptions() {
        let have = watch::Sender::new(Bitfield::new(4));
        let limited = EgressLimited::new(Following(have.clone()), RateLimiter::for_rate(ByteRate(1 << 20)));
        let from = SocketAddr::from(([127, 0, 0, 1], 1));
        let follow = limited.subscribe(Digest::of(b"blob"), from).await.expect("the inner source's stream");
        have.send_modify(|b| b.set(2));
        assert!(follow.borrow().get(2), "Have news reach the follower");
    }

    #[test]
    fn byte_rates_parse_with_units() {
        let cases = [
            ("0", 0),
            ("12345", 12345),
            ("100MiB", 100 << 20),
            ("100 MiB/s", 100 << 20),
            ("1.5GB", 1_500_000_000),
            ("800Mbit", 100_000_000),
            ("800mbit/s", 100_000_000),
            ("64k", 64_000),
            ("4KiB", 4096),
            ("8bit", 1),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<ByteRate>(), Ok(ByteRate(want)), "{text}");
        }
        for bad in [
            "",
            "MiB",
            "-5",
            "1e3",
            "10 parsecs",
            "1.2.3MB",
            "99999999999999999999",
            "1e30GiB",
            "nan",
            "1bit",
            "0.4b",
        ] {
            assert!(bad.parse::<ByteRate>().is_err(), "{bad:?} accepted");
        }
        assert_eq!(ByteRate(0).limit(), None);
        assert_eq!(ByteRate(7).limit(), Some(7));
    }

    #[test]
    fn byte_rates_round_trip_through_toml() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct C {
            limit: ByteRate,
        }
        let c: C = toml::from_str("limit = 1048576").expect("int");
        assert_eq!(c.limit, ByteRate(1 << 20));
        let c: C = toml::from_str("limit = \"2MiB\"").expect("text");
        assert_eq!(c.limit, ByteRate(2 << 20));
        let text = toml::to_string(&c).expect("ser");
        assert_eq!(toml::from_str::<C>(&text).expect("back"), c);
        let err = toml::from_str::<C>("limit = \"fast\"").expect_err("bad");
        assert!(err.to_string().contains("invalid byte rate"), "{err}");
    }

    #[test]
    fn the_bucket_lends_then_charges_time() {
        let t0 = Instant::now();
        let mut b = Bucket { rate: 1000.0, burst: 500.0, tokens: 500.0, last: t0 };
        // The burst passes at once.
        assert_eq!(b.reserve(500, t0), Duration::ZERO);
        // Then each byte costs a millisecond, and debts add up in arrival order.
        assert_eq!(b.reserve(250, t0), Duration::from_millis(250));
        assert_eq!(b.reserve(250, t0), Duration::from_millis(500));
        // Time repays the debt: a second later 1000 tokens came in, 500 were owed.
        assert_eq!(b.reserve(100, t0 + Duration::from_secs(1)), Duration::ZERO);
        // An idle bucket refills only up to its burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.reserve(500, later), Duration::ZERO);
        let wait = b.reserve(1, later);
        assert!((wait.as_secs_f64() - 0.001).abs() < 1e-9, "{wait:?}");
        // A clock that goes backwards charges nothing extra.
        assert!(b.reserve(0, t0) <= Duration::from_millis(2));
    }

    #[tokio::test]
    async fn acquire_holds_the_rate() {
        // 256 KiB/s with a 64 KiB burst: 320 KiB need at least a second.
        let limiter = RateLimiter::new(256 << 10);
        let start = std::time::Instant::now();
        limiter.acquire(320 << 10).await;
        assert!(start.elapsed() >= Duration::from_millis(950), "{:?}", start.elapsed());
    }
}
