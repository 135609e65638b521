//! What the sink measures about itself for `auditflow run --until-idle` and the benchmark: the run
//! summary, end-to-end latency and where the time went. The status board's totals (consumed,
//! stored, duplicates, dead-lettered) are the board's, not repeated here.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::store::WriteOutcome;

/// What the run summary needs beyond the status board's totals (consumed, stored, duplicates,
/// dead-lettered), which the sink counts only there.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Events skipped as duplicates whose content differed from the stored event.
    pub conflicts: AtomicU64,
    /// Batches completed.
    pub batches: AtomicU64,
    /// Partition revocations seen (rebalances that took partitions away).
    pub revokes: AtomicU64,
    /// Times the consumer paused its partitions (database unavailable or store behind).
    pub pauses: AtomicU64,
    /// When the first message arrived and when the last batch completed.
    active: Mutex<Option<(Instant, Instant)>>,
    /// End-to-end latency (Kafka timestamp to commit) of every stored event, milliseconds.
    latency_ms: Mutex<Option<hdrhistogram::Histogram<u64>>>,
    /// Time spent decoding and validating, nanoseconds, estimated from one event in eight (the
    /// first and every eighth after it, each counting for eight).
    pub decode_ns: AtomicU64,
    /// Time spent encoding rows for COPY (batch building), nanoseconds, estimated the same way.
    pub encode_ns: AtomicU64,
    /// Events offered for timing so far.
    timing_turn: AtomicU64,
    /// Time spent making batches durable (database writes, dead letters, offsets), nanoseconds.
    pub store_ns: AtomicU64,
}

impl SinkStats {
    /// Now, if this event's decode and encode are to be timed (the first event and one in
    /// [`TIMING_SAMPLE`] after it); `None` otherwise. Timing every event cost three clock
    /// readings per event, a measurable share of the consumer's CPU.
    pub(crate) fn sample_timing(&self) -> Option<std::time::Instant> {
        let turn = self.timing_turn.fetch_add(1, Ordering::Relaxed);
        turn.is_multiple_of(TIMING_SAMPLE)
            .then(std::time::Instant::now)
    }

    pub(crate) fn message_arrived(&self) {
        let mut active = self.active.lock();
        if active.is_none() {
            let now = Instant::now();
            *active = Some((now, now));
        }
    }

    pub(crate) fn batch_completed(&self) {
        if let Some((_, last)) = self.active.lock().as_mut() {
            *last = Instant::now();
        }
    }

    pub(crate) fn record_latencies(&self, kafka_timestamps_ms: &[i64], now_ms: i64) {
        let mut histogram = self.latency_ms.lock();
        let histogram = histogram.get_or_insert_with(|| {
            // One hour at three significant digits: a few tens of KiB, whatever the traffic.
            hdrhistogram::Histogram::new_with_bounds(1, 3_600_000, 3).unwrap_or_else(|_| {
                hdrhistogram::Histogram::new(3).expect("3 significant digits is valid")
            })
        });
        for ts in kafka_timestamps_ms {
            histogram.saturating_record(u64::try_from(now_ms - ts).unwrap_or(0).max(1));
        }
    }

    /// The end-to-end latency at quantile `q` (0..=1) in milliseconds, if any event was stored.
    pub fn latency_ms(&self, q: f64) -> Option<u64> {
        self.latency_ms
            .lock()
            .as_ref()
            .filter(|h| !h.is_empty())
            .map(|h| h.value_at_quantile(q))
    }

    /// Seconds from the first message received to the last batch completed.
    pub fn active_s(&self) -> f64 {
        self.active
            .lock()
            .map_or(0.0, |(first, last)| (last - first).as_secs_f64())
    }
}

/// The line `auditflow run --until-idle` prints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunSummary {
    /// Messages received from Kafka.
    pub consumed: u64,
    /// Rows inserted into Postgres.
    pub stored: u64,
    /// Events skipped as already stored.
    pub duplicates: u64,
    /// Records sent to the dead-letter topic.
    pub dead_lettered: u64,
    /// Of the duplicates, ids repeated with different content.
    pub conflicts: u64,
    /// Wall time of the run.
    pub elapsed_s: f64,
    /// From the first message received to the last batch completed: the time spent working.
    pub active_s: f64,
    /// Median end-to-end latency, Kafka timestamp to commit, milliseconds.
    pub latency_p50_ms: Option<u64>,
    /// 99th percentile of the same.
    pub latency_p99_ms: Option<u64>,
    /// Peak resident set size of this process, MiB (Linux; `None` elsewhere).
    pub peak_rss_mb: Option<f64>,
    /// Where the time went: decoding and validating (timed on one event in eight and scaled up).
    pub decode_s: f64,
    /// Encoding rows for COPY (timed the same way).
    pub encode_s: f64,
    /// Making batches durable (COPY, commit, dead letters, offsets), on the store task.
    pub store_s: f64,
    /// CPU time of this process over its whole run, user and system, seconds (Linux; `None`
    /// elsewhere).
    #[serde(default)]
    pub cpu_s: Option<f64>,
}

/// What one batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BatchReport {
    /// Database outcome (duplicates include those dropped inside the batch).
    pub outcome: WriteOutcome,
    /// Records dead-lettered.
    pub dead_lettered: u64,
}

/// One event in this many has its decode and encode timed, and counts for this many.
pub(crate) const TIMING_SAMPLE: u64 = 8;

/// For a timed event (`since` is `Some`, from [`SinkStats::sample_timing`]): adds the time since
/// `since`, times [`TIMING_SAMPLE`], to `counter`, and returns now, where the next measurement of
/// the same event can start.
pub(crate) fn add_sampled(
    counter: &AtomicU64,
    since: Option<std::time::Instant>,
) -> Option<std::time::Instant> {
    let since = since?;
    let now = std::time::Instant::now();
    counter.fetch_add(
        nanos_between(since, now).saturating_mul(TIMING_SAMPLE),
        Ordering::Relaxed,
    );
    Some(now)
}

fn nanos_between(since: std::time::Instant, now: std::time::Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(since).as_nanos()).unwrap_or(u64::MAX)
}

/// Adds the time since `since` to `counter`; returns now, where the next measurement can start.
pub(crate) fn add_elapsed(counter: &AtomicU64, since: std::time::Instant) -> std::time::Instant {
    let now = std::time::Instant::now();
    counter.fetch_add(nanos_between(since, now), Ordering::Relaxed);
    now
}

pub(crate) fn nanos_to_s(counter: &AtomicU64) -> f64 {
    counter.load(Ordering::Relaxed) as f64 / 1e9
}

/// CPU time of this process so far, user and system, seconds (Linux; `None` elsewhere).
pub fn process_cpu_s() -> Option<f64> {
    cpu_s_of_stat(&std::fs::read_to_string("/proc/self/stat").ok()?)
}

/// utime + stime of a `/proc/<pid>/stat` line. They count USER_HZ ticks, which Linux fixes at
/// 100 per second for user space on every architecture it reports them for.
fn cpu_s_of_stat(stat: &str) -> Option<f64> {
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let mut fields = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
    // After the name: state is field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// The process's peak resident set size (VmHWM), MiB.
pub(crate) fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_utime_plus_stime_after_the_name() {
        // A name with a space and a parenthesis; utime 250, stime 50 ticks.
        let stat = "4242 (auditflow (x) y) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9";
        assert_eq!(cpu_s_of_stat(stat), Some(3.0));
        assert_eq!(cpu_s_of_stat("4242 (cut"), None);
        let own = process_cpu_s().expect("Linux has /proc/self/stat");
        assert!(own >= 0.0);
    }

    #[test]
    fn one_event_in_the_sample_is_timed_and_counts_for_all_of_them() {
        let stats = SinkStats::default();
        let timed: Vec<bool> = (0..2 * TIMING_SAMPLE + 1)
            .map(|_| stats.sample_timing().is_some())
            .collect();
        let expected: Vec<bool> = (0..2 * TIMING_SAMPLE + 1)
            .map(|turn: u64| turn.is_multiple_of(TIMING_SAMPLE))
            .collect();
        assert_eq!(
            timed, expected,
            "the first event, then one in {TIMING_SAMPLE}"
        );

        let counter = AtomicU64::new(0);
        assert_eq!(add_sampled(&counter, None), None);
        assert_eq!(
            counter.load(Ordering::Relaxed),
            0,
            "an untimed event adds nothing"
        );
        let since = std::time::Instant::now();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let now = add_sampled(&counter, Some(since)).expect("a timed event goes on being timed");
        let measured = nanos_between(since, now);
        assert!(measured >= 2_000_000);
        assert_eq!(counter.load(Ordering::Relaxed), measured * TIMING_SAMPLE);
    }
}
