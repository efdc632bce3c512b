//! Latency histograms of the requests the engine answered, for `/metrics`: time to first token
//! (one observation per request that generated a token) and time per generated token after
//! the first (each such token counted at its request's mean decode time).

/// Upper bounds of the buckets, milliseconds (Prometheus `le`); `+Inf` follows.
pub const TTFT_BOUNDS_MS: [f64; 10] = [
    25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
];
pub const TOKEN_BOUNDS_MS: [f64; 10] = [
    2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0,
];

/// Counts per bucket (not cumulative; the last is above every bound), their sum and count.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub bounds: &'static [f64],
    pub counts: Vec<u64>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    /// Counts `n` observations of `v`.
    pub fn observe(&mut self, v: f64, n: u64) {
        if !v.is_finite() || n == 0 {
            return;
        }
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += n;
        self.sum += v * n as f64;
        self.count += n;
    }

    /// Observations at or below each bound, then the total (`+Inf`).
    pub fn cumulative(&self) -> Vec<u64> {
        self.counts
            .iter()
            .scan(0, |acc, &c| {
                *acc += c;
                Some(*acc)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Latency {
    pub ttft_ms: Histogram,
    pub token_ms: Histogram,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            ttft_ms: Histogram::new(&TTFT_BOUNDS_MS),
            token_ms: Histogram::new(&TOKEN_BOUNDS_MS),
        }
    }
}

impl Latency {
    /// Counts a completion of `tokens` generated tokens.
    pub fn record(&mut self, tokens: usize, ttft_ms: f64, decode_tps: f64) {
        if tokens == 0 {
            return;
        }
        self.ttft_ms.observe(ttft_ms, 1);
        if tokens > 1 && decode_tps > 0.0 {
            self.token_ms
                .observe(1000.0 / decode_tps, tokens as u64 - 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_buckets() {
        let mut l = Latency::default();
        l.record(0, 5.0, 10.0);
        assert_eq!(l.ttft_ms.count, 0);
        l.record(11, 30.0, 100.0);
        l.record(1, 1e9, 0.0);
        assert_eq!(
            l.ttft_ms.cumulative(),
            vec![0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]
        );
        assert_eq!(l.token_ms.count, 10);
        assert_eq!(
            l.token_ms.cumulative()[2],
            10,
            "10 ms per token is in le=10"
        );
        assert_eq!(l.token_ms.cumulative()[1], 0);
        assert!((l.token_ms.sum - 100.0).abs() < 1e-9);
    }
}
