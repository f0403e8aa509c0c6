//! Per-client rate limiting: a token bucket per client address. A caller that floods the
//! agent gets 429s; other callers, the probes and running remediations do not notice.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// One client's bucket: `tokens` left at `at`.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Refills at `rate` per second up to `burst`, then takes one token if there is one.
    fn take(&mut self, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn full(&self, now: Instant, rate: f64, burst: f64) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * rate >= burst
    }
}

pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

/// Buckets kept before idle (full) ones are dropped: memory stays bounded under a flood of
/// distinct addresses.
const MAX_CLIENTS: usize = 4096;

impl RateLimiter {
    /// `rate` requests per second per client, in bursts of up to twice that.
    pub fn new(rate: u32) -> Self {
        RateLimiter { rate: rate as f64, burst: (rate as f64 * 2.0).max(1.0), buckets: Mutex::new(HashMap::new()) }
    }

    pub fn allow(&self, client: IpAddr, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() >= MAX_CLIENTS && !buckets.contains_key(&client) {
            buckets.retain(|_, b| !b.full(now, self.rate, self.burst));
            if buckets.len() >= MAX_CLIENTS {
                // Every bucket busy: refuse newcomers rather than grow without bound.
                return false;
            }
        }
        buckets.entry(client).or_insert(Bucket { tokens: self.burst, at: now }).take(now, self.rate, self.burst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_client_gets_its_burst_then_its_rate() {
        let l = RateLimiter::new(5);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| l.allow(a, t0)).count(), 10, "burst of twice the rate");
        assert!(!l.allow(a, t0));
        assert!(l.allow(a, t0 + Duration::from_millis(200)), "one token back after 1/rate");
        assert!(!l.allow(a, t0 + Duration::from_millis(200)));
        assert_eq!((0..20).filter(|_| l.allow(a, t0 + Duration::from_secs(60))).count(), 10, "refills to the burst, no more");
    }

    #[test]
    fn clients_do_not_share_a_bucket() {
        let l = RateLimiter::new(1);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        while l.allow(a, t0) {}
        assert!(l.allow(b, t0), "another client is not limited by the first");
    }

    #[test]
    fn a_flood_of_addresses_stays_bounded() {
        let l = RateLimiter::new(1);
        let t0 = Instant::now();
        for i in 0..(MAX_CLIENTS as u32 + 100) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            // Drained buckets cannot be evicted: the newest are refused, memory stays bounded.
            while l.allow(ip, t0) {}
        }
        assert!(l.buckets.lock().unwrap().len() <= MAX_CLIENTS);
        // Once they refilled they are idle and make room again.
        assert!(l.allow("192.168.0.1".parse().unwrap(), t0 + Duration::from_secs(10)));
    }
}
