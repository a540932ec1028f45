//! What a subscriber saw: which sequence numbers of which publisher arrived
//! (hence lost and duplicated messages) and publish→deliver latency.
//!
//! Every benchmark payload starts with a 20-byte header, big-endian:
//! publisher index (u32), sequence number (u64), send time (u64, ns since the
//! run's origin `Instant`: publishers and subscribers share the process, so
//! they share the clock). The rest is padding.

use hdrhistogram::Histogram;

/// Bytes of the payload header; the smallest payload the bench sends.
pub const HEADER: usize = 4 + 8 + 8;

/// Highest latency the histogram tells apart (larger ones count as this).
const MAX_LATENCY_US: u64 = 3_600_000_000;

pub fn write_header(payload: &mut [u8], publisher: u32, seq: u64, sent_ns: u64) {
    payload[0..4].copy_from_slice(&publisher.to_be_bytes());
    payload[4..12].copy_from_slice(&seq.to_be_bytes());
    payload[12..20].copy_from_slice(&sent_ns.to_be_bytes());
}

pub fn read_header(payload: &[u8]) -> Option<(u32, u64, u64)> {
    let h: &[u8; HEADER] = payload.get(..HEADER)?.try_into().ok()?;
    let publisher = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
    let seq = u64::from_be_bytes([h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11]]);
    let sent = u64::from_be_bytes([h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19]]);
    Some((publisher, seq, sent))
}

/// A latency histogram in microseconds (3 significant digits).
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// One subscriber's record: a growable bitmap of received sequence numbers
/// per publisher, counters, and a latency histogram.
pub struct Tally {
    seen: Vec<Vec<u64>>,
    /// Distinct messages received.
    pub received: u64,
    /// Receipts of a (publisher, sequence) already received.
    pub duplicated: u64,
    /// Payloads without a valid header or with an unknown publisher.
    pub malformed: u64,
    pub latency_us: Histogram<u64>,
}

/// What `Tally::record` made of a payload.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum Receipt {
    New,
    Duplicate,
    Malformed,
}

impl Tally {
    pub fn new(publishers: usize) -> Self {
        Tally {
            seen: vec![Vec::new(); publishers],
            received: 0,
            duplicated: 0,
            malformed: 0,
            latency_us: latency_histogram(),
        }
    }

    /// Records one payload received at `now_ns`; its latency counts only if
    /// it was sent at or after `measure_from_ns` (the end of the warm-up).
    pub fn record(&mut self, payload: &[u8], now_ns: u64, measure_from_ns: u64) -> Receipt {
        let Some((publisher, seq, sent_ns)) = read_header(payload) else {
            self.malformed += 1;
            return Receipt::Malformed;
        };
        let Some(bits) = self.seen.get_mut(publisher as usize) else {
            self.malformed += 1;
            return Receipt::Malformed;
        };
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if bits.len() <= word {
            // Grow ahead so a steady stream does not resize per word.
            bits.resize((word + 1).max(bits.len() * 2), 0);
        }
        if bits[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return Receipt::Duplicate;
        }
        bits[word] |= 1 << bit;
        self.received += 1;
        if sent_ns >= measure_from_ns {
            self.latency_us
                .saturating_record((now_ns.saturating_sub(sent_ns) / 1000).max(1));
        }
        Receipt::New
    }

    /// How many of sequences `0..sent[p]` of each publisher `p` never arrived.
    pub fn lost(&self, sent: &[u64]) -> u64 {
        sent.iter()
            .zip(&self.seen)
            .map(|(&n, bits)| {
                let full_words = (n / 64) as usize;
                let mut got: u64 = bits
                    .iter()
                    .take(full_words)
                    .map(|w| u64::from(w.count_ones()))
                    .sum();
                let rest = n % 64;
                if rest > 0 {
                    if let Some(w) = bits.get(full_words) {
                        got += u64::from((w & ((1u64 << rest) - 1)).count_ones());
                    }
                }
                n - got
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(publisher: u32, seq: u64, sent_ns: u64) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        write_header(&mut v, publisher, seq, sent_ns);
        v
    }

    #[test]
    fn header_round_trip() {
        let p = payload(7, u64::MAX - 1, 123_456_789);
        assert_eq!(read_header(&p), Some((7, u64::MAX - 1, 123_456_789)));
        assert_eq!(
            read_header(&p[..HEADER]),
            Some((7, u64::MAX - 1, 123_456_789))
        );
        assert_eq!(read_header(&p[..HEADER - 1]), None);
    }

    #[test]
    fn sequences_0_1_1_3_are_one_duplicate_and_one_lost() {
        let mut t = Tally::new(1);
        let receipts: Vec<_> = [0, 1, 1, 3]
            .iter()
            .map(|&s| t.record(&payload(0, s, 0), 5_000, 0))
            .collect();
        assert_eq!(
            receipts,
            [Receipt::New, Receipt::New, Receipt::Duplicate, Receipt::New]
        );
        assert_eq!((t.received, t.duplicated), (3, 1));
        assert_eq!(t.lost(&[4]), 1, "sequence 2");
    }

    #[test]
    fn lost_across_publishers_and_words() {
        let mut t = Tally::new(3);
        for s in (0..200).filter(|s| s % 10 != 0) {
            t.record(&payload(0, s, 0), 0, 0);
        }
        t.record(&payload(1, 0, 0), 0, 0);
        // Publisher 0 sent 200 (20 missing), 1 sent 2 (1 missing), 2 sent 5 (all missing).
        assert_eq!(t.lost(&[200, 2, 5]), 20 + 1 + 5);
        // Only what was sent counts: a bitmap longer than `sent` changes nothing.
        assert_eq!(t.lost(&[64, 1, 0]), 7);
        assert_eq!(t.lost(&[0, 0, 0]), 0);
    }

    #[test]
    fn malformed_payloads_are_counted_apart() {
        let mut t = Tally::new(2);
        assert_eq!(t.record(b"short", 0, 0), Receipt::Malformed);
        assert_eq!(t.record(&payload(9, 0, 0), 0, 0), Receipt::Malformed);
        assert_eq!((t.received, t.duplicated, t.malformed), (0, 0, 2));
    }

    #[test]
    fn latency_in_microseconds_after_warmup_only() {
        let mut t = Tally::new(1);
        t.record(&payload(0, 0, 1_000), 900_000, 10_000); // warm-up: not measured
        t.record(&payload(0, 1, 20_000), 70_000, 10_000); // 50 µs
        t.record(&payload(0, 2, 20_000), 20_100, 10_000); // 0.1 µs -> 1
        assert_eq!(t.received, 3);
        assert_eq!(t.latency_us.len(), 2);
        assert_eq!(t.latency_us.max(), 50);
        assert_eq!(t.latency_us.min(), 1);
    }
}
