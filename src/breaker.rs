//! Circuit breakers in front of each dependency (Postgres, Redis, the dead-letter producer).
//!
//! A breaker is closed while calls succeed. It opens after `consecutive_failures` transient
//! failures in a row, or when the failure rate over the last `window` exceeds `failure_rate`
//! (with at least `min_calls` calls in the window). While open it rejects calls without touching
//! the dependency, for `open_for` with ±20% jitter so replicas do not come back in lockstep. Then
//! it lets exactly one probe through (half-open), bounded by `probe_timeout` so it can never hang
//! half-open: success closes it, failure or timeout opens it again.
//!
//! Only failures that say something about the dependency count (the caller decides: transient
//! ones); a record the database refuses is the record's fault, not the database's.
//!
//! State changes are logged and exported: `auditflow_breaker_state{dependency}` (0 closed,
//! 1 half-open, 2 open), `auditflow_breaker_transitions_total{dependency,to}` and
//! `auditflow_breaker_rejected_total{dependency}`.

use parking_lot::Mutex;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;
use tokio::sync::watch;
use tokio::time::Instant;

/// Thresholds of one breaker.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub struct BreakerConfig {
    /// Transient failures in a row that open the breaker.
    pub consecutive_failures: u32,
    /// Failure rate over the window (0..=1) that opens the breaker.
    pub failure_rate: f64,
    /// Calls needed in the window before the rate counts.
    pub min_calls: u32,
    /// The sliding window for the failure rate.
    pub window: Duration,
    /// How long the breaker stays open before a probe (jittered ±20%).
    pub open_for: Duration,
    /// The longest a half-open probe may take before it counts as failed.
    pub probe_timeout: Duration,
}

impl BreakerConfig {
    /// Defaults for the ingest path: open quickly, probe every few seconds.
    pub const INGEST: BreakerConfig = BreakerConfig {
        consecutive_failures: 5,
        failure_rate: 0.5,
        min_calls: 20,
        window: Duration::from_secs(30),
        open_for: Duration::from_secs(5),
        probe_timeout: Duration::from_secs(10),
    };

    /// Defaults for interactive commands (`partitions` commands, `replay` retries): an operator is waiting, so give
    /// up sooner and probe sooner.
    pub const INTERACTIVE: BreakerConfig = BreakerConfig {
        consecutive_failures: 3,
        failure_rate: 0.5,
        min_calls: 10,
        window: Duration::from_secs(10),
        open_for: Duration::from_secs(2),
        probe_timeout: Duration::from_secs(5),
    };
}

/// Breaker states, ordered from the healthiest to the worst.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum State {
    /// Calls go through.
    Closed,
    /// One probe call is in flight; others are rejected.
    HalfOpen,
    /// Calls are rejected until the open interval is over.
    Open,
}

impl State {
    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

/// Why a guarded call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum BreakerError<E> {
    /// The breaker is open (or a probe is in flight): the dependency was not called.
    #[error("{dependency} circuit breaker is open")]
    Open {
        /// Which dependency.
        dependency: Cow<'static, str>,
    },
    /// The half-open probe took longer than its timeout.
    #[error("{dependency} probe timed out")]
    ProbeTimeout {
        /// Which dependency.
        dependency: Cow<'static, str>,
    },
    /// The call itself failed.
    #[error(transparent)]
    Inner(E),
}

#[derive(Debug)]
struct Inner {
    state: State,
    consecutive_failures: u32,
    /// (when, failed) of recent calls, oldest first.
    recent: VecDeque<(Instant, bool)>,
    open_until: Instant,
}

/// A permit to call the dependency; `probe` permits come with a timeout.
///
/// Hand it back with [`Breaker::record`]. A probe permit dropped without an outcome (its call was
/// cancelled: shutdown, a `select!` that took another branch) puts the breaker back to open with
/// the probe due at once, so a cancelled probe can never leave it half-open for ever.
#[derive(Debug)]
#[must_use = "a permit must be handed back with Breaker::record"]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.recorded {
            self.breaker.release_cancelled_probe();
        }
    }
}

/// One dependency's circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    dependency: Cow<'static, str>,
    /// Replaced whole by [`Breaker::reconfigure`] (live reload).
    config: Mutex<BreakerConfig>,
    inner: Mutex<Inner>,
    state_tx: watch::Sender<State>,
    num_transitions: AtomicU64,
    num_opened: AtomicU64,
    num_rejected: AtomicU64,
}

impl Breaker {
    /// Creates a closed breaker for `dependency` (`postgres`, `redis`, `dlq`, ...).
    pub fn new(dependency: impl Into<Cow<'static, str>>, config: BreakerConfig) -> Self {
        let dependency = dependency.into();
        metrics::gauge!("auditflow_breaker_state", "dependency" => dependency.clone())
            .set(State::Closed.gauge());
        Breaker {
            dependency,
            config: Mutex::new(config),
            inner: Mutex::new(Inner {
                state: State::Closed,
                consecutive_failures: 0,
                recent: VecDeque::new(),
                open_until: Instant::now(),
            }),
            state_tx: watch::Sender::new(State::Closed),
            num_transitions: AtomicU64::new(0),
            num_opened: AtomicU64::new(0),
            num_rejected: AtomicU64::new(0),
        }
    }

    /// The dependency's name.
    pub fn dependency(&self) -> &str {
        &self.dependency
    }

    /// The thresholds in force.
    pub fn config(&self) -> BreakerConfig {
        *self.config.lock()
    }

    /// Replaces the thresholds; the state and its history are kept.
    pub fn reconfigure(&self, config: BreakerConfig) {
        *self.config.lock() = config;
    }

    /// The current state.
    pub fn state(&self) -> State {
        *self.state_tx.borrow()
    }

    /// Follows state changes.
    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state_tx.subscribe()
    }

    /// State changes so far.
    pub fn num_transitions(&self) -> u64 {
        self.num_transitions.load(Ordering::Relaxed)
    }

    /// Times the breaker opened.
    pub fn num_opened(&self) -> u64 {
        self.num_opened.load(Ordering::Relaxed)
    }

    /// Calls rejected without reaching the dependency.
    pub fn num_rejected(&self) -> u64 {
        self.num_rejected.load(Ordering::Relaxed)
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    fn transition(&self, inner: &mut Inner, to: State) {
        if inner.state == to {
            return;
        }
        let from = inner.state;
        inner.state = to;
        if to == State::Open {
            let jitter = rand::rng().random_range(0.8..1.2);
            inner.open_until = Instant::now() + self.config().open_for.mul_f64(jitter);
            self.num_opened.fetch_add(1, Ordering::Relaxed);
        }
        if to == State::Closed {
            inner.consecutive_failures = 0;
            inner.recent.clear();
        }
        self.num_transitions.fetch_add(1, Ordering::Relaxed);
        self.state_tx.send_replace(to);
        metrics::gauge!("auditflow_breaker_state", "dependency" => self.dependency.clone())
            .set(to.gauge());
        metrics::counter!("auditflow_breaker_transitions_total", "dependency" => self.dependency.clone(), "to" => to.as_str())
            .increment(1);
        match to {
            State::Open => tracing::warn!(
                dependency = &*self.dependency,
                from = from.as_str(),
                "circuit breaker opened"
            ),
            State::HalfOpen => tracing::info!(
                dependency = &*self.dependency,
                "circuit breaker half-open; probing"
            ),
            State::Closed => tracing::info!(
                dependency = &*self.dependency,
                from = from.as_str(),
                "circuit breaker closed"
            ),
        }
    }

    /// Asks to call the dependency. `None` means rejected: do not call it.
    pub fn try_acquire(&self) -> Option<Permit<'_>> {
        let mut inner = self.lock();
        let permit = |probe| Permit {
            breaker: self,
            probe,
            recorded: false,
        };
        match inner.state {
            State::Closed => Some(permit(false)),
            State::Open if Instant::now() >= inner.open_until => {
                self.transition(&mut inner, State::HalfOpen);
                Some(permit(true))
            }
            State::Open | State::HalfOpen => {
                drop(inner);
                self.num_rejected.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("auditflow_breaker_rejected_total", "dependency" => self.dependency.clone()).increment(1);
                None
            }
        }
    }

    /// How long until a call could be let through again (zero when closed).
    pub fn retry_after(&self) -> Duration {
        let inner = self.lock();
        match inner.state {
            State::Open => inner.open_until.saturating_duration_since(Instant::now()),
            State::HalfOpen => self.config().probe_timeout.min(Duration::from_millis(200)),
            State::Closed => Duration::ZERO,
        }
    }

    /// Records the outcome of a permitted call; `failed` only for failures that are the
    /// dependency's (transient).
    pub fn record(&self, mut permit: Permit<'_>, failed: bool) {
        permit.recorded = true;
        let mut inner = self.lock();
        let now = Instant::now();
        if permit.probe || inner.state == State::HalfOpen {
            let to = if failed { State::Open } else { State::Closed };
            self.transition(&mut inner, to);
            return;
        }
        if inner.state != State::Closed {
            return;
        }
        let config = self.config();
        inner.recent.push_back((now, failed));
        while inner
            .recent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > config.window)
        {
            inner.recent.pop_front();
        }
        if !failed {
            inner.consecutive_failures = 0;
            return;
        }
        inner.consecutive_failures += 1;
        let calls = inner.recent.len() as u32;
        let failures = inner.recent.iter().filter(|(_, failed)| *failed).count() as f64;
        let rate_exceeded =
            calls >= config.min_calls && failures / f64::from(calls) > config.failure_rate;
        if inner.consecutive_failures >= config.consecutive_failures || rate_exceeded {
            self.transition(&mut inner, State::Open);
        }
    }

    /// A probe was cancelled before it had an outcome: it says nothing about the dependency, so
    /// the breaker goes back to open with the next probe due at once.
    fn release_cancelled_probe(&self) {
        let mut inner = self.lock();
        if inner.state == State::HalfOpen {
            inner.state = State::Open;
            inner.open_until = Instant::now();
            self.state_tx.send_replace(State::Open);
            metrics::gauge!("auditflow_breaker_state", "dependency" => self.dependency.clone())
                .set(State::Open.gauge());
            tracing::info!(
                dependency = &*self.dependency,
                "circuit breaker probe cancelled; probing again on the next call"
            );
        }
    }

    /// Runs `call` through the breaker. `is_failure` says which errors count against the
    /// dependency. A half-open probe is bounded by the probe timeout.
    pub async fn call<T, E, F>(
        &self,
        call: F,
        is_failure: impl Fn(&E) -> bool,
    ) -> Result<T, BreakerError<E>>
    where
        F: Future<Output = Result<T, E>>,
    {
        let Some(permit) = self.try_acquire() else {
            return Err(BreakerError::Open {
                dependency: self.dependency.clone(),
            });
        };
        let result = if permit.probe {
            match tokio::time::timeout(self.config().probe_timeout, call).await {
                Ok(result) => result,
                Err(_) => {
                    self.record(permit, true);
                    return Err(BreakerError::ProbeTimeout {
                        dependency: self.dependency.clone(),
                    });
                }
            }
        } else {
            call.await
        };
        match &result {
            Ok(_) => self.record(permit, false),
            Err(err) => self.record(permit, is_failure(err)),
        }
        result.map_err(BreakerError::Inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            failure_rate: 0.5,
            min_calls: 10,
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(1),
        }
    }

    async fn fail(breaker: &Breaker) -> Result<(), BreakerError<&'static str>> {
        breaker.call(async { Err::<(), _>("down") }, |_| true).await
    }

    async fn succeed(breaker: &Breaker) -> Result<(), BreakerError<&'static str>> {
        breaker.call(async { Ok::<(), &str>(()) }, |_| true).await
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_rejects_without_calling() {
        let breaker = Breaker::new("test", config());
        for _ in 0..2 {
            assert!(matches!(fail(&breaker).await, Err(BreakerError::Inner(_))));
        }
        assert_eq!(breaker.state(), State::Closed);
        assert!(matches!(fail(&breaker).await, Err(BreakerError::Inner(_))));
        assert_eq!(breaker.state(), State::Open);
        let called = std::sync::atomic::AtomicBool::new(false);
        let result = breaker
            .call(
                async {
                    called.store(true, Ordering::SeqCst);
                    Ok::<(), &str>(())
                },
                |_| true,
            )
            .await;
        assert!(matches!(result, Err(BreakerError::Open { .. })));
        assert!(
            !called.load(Ordering::SeqCst),
            "an open breaker does not call the dependency"
        );
        assert_eq!(breaker.num_rejected(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_consecutive_count() {
        let mut config = config();
        config.failure_rate = 0.9;
        let breaker = Breaker::new("test", config);
        for _ in 0..5 {
            let _ = fail(&breaker).await;
            let _ = fail(&breaker).await;
            succeed(&breaker).await.unwrap();
        }
        assert_eq!(breaker.state(), State::Closed, "never three in a row");
    }

    #[tokio::test(start_paused = true)]
    async fn opens_on_the_failure_rate_over_the_window() {
        let mut config = config();
        config.consecutive_failures = 100;
        let breaker = Breaker::new("test", config);
        // 6 failures and 4 successes: never more than 2 in a row, but 60% > 50% over 10 calls.
        for i in 0..10 {
            if i % 2 == 0 || i == 9 {
                let _ = fail(&breaker).await;
            } else {
                succeed(&breaker).await.unwrap();
            }
        }
        assert_eq!(breaker.state(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_outside_the_window_do_not_count() {
        let mut config = config();
        config.consecutive_failures = 100;
        let breaker = Breaker::new("test", config);
        for _ in 0..9 {
            let _ = fail(&breaker).await;
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        for _ in 0..9 {
            succeed(&breaker).await.unwrap();
        }
        let _ = fail(&breaker).await;
        assert_eq!(breaker.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_one_probe_through_and_closes_on_success() {
        let breaker = Breaker::new("test", config());
        for _ in 0..3 {
            let _ = fail(&breaker).await;
        }
        assert!(
            breaker.retry_after() >= Duration::from_secs(4),
            "open for 5 s ±20%"
        );
        tokio::time::advance(Duration::from_secs(7)).await;
        let probe = breaker
            .try_acquire()
            .expect("probe allowed after the open interval");
        assert_eq!(breaker.state(), State::HalfOpen);
        assert!(breaker.try_acquire().is_none(), "only one probe at a time");
        breaker.record(probe, false);
        assert_eq!(breaker.state(), State::Closed);
        assert!(
            breaker.num_transitions() >= 3,
            "closed->open->half-open->closed"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_or_hung_probe_opens_again() {
        let breaker = Breaker::new("test", config());
        for _ in 0..3 {
            let _ = fail(&breaker).await;
        }
        tokio::time::advance(Duration::from_secs(7)).await;
        let result = breaker
            .call(std::future::pending::<Result<(), &str>>(), |_| true)
            .await;
        assert!(matches!(result, Err(BreakerError::ProbeTimeout { .. })));
        assert_eq!(
            breaker.state(),
            State::Open,
            "a hung probe cannot leave it half-open"
        );
        tokio::time::advance(Duration::from_secs(7)).await;
        let _ = fail(&breaker).await;
        assert_eq!(breaker.state(), State::Open);
        assert_eq!(breaker.num_opened(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn errors_that_are_not_the_dependencys_fault_do_not_count() {
        let breaker = Breaker::new("test", config());
        for _ in 0..10 {
            let _ = breaker
                .call(async { Err::<(), _>("bad record") }, |_| false)
                .await;
        }
        assert_eq!(breaker.state(), State::Closed);
    }

    #[tokio::test]
    async fn subscribers_see_state_changes() {
        let breaker = Breaker::new("test", config());
        let mut rx = breaker.subscribe();
        for _ in 0..3 {
            let _ = fail(&breaker).await;
        }
        rx.changed().await.unwrap();
        assert_eq!(*rx.borrow(), State::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_probe_does_not_leave_the_breaker_half_open() {
        let breaker = Breaker::new("test", config());
        for _ in 0..3 {
            let _ = fail(&breaker).await;
        }
        tokio::time::advance(Duration::from_secs(7)).await;
        // The probe's caller gives up first (shutdown, another select! branch).
        let cancelled = tokio::time::timeout(
            Duration::from_millis(10),
            breaker.call(std::future::pending::<Result<(), &str>>(), |_| true),
        )
        .await;
        assert!(cancelled.is_err(), "the call was cancelled");
        assert_eq!(breaker.state(), State::Open, "not stuck half-open");
        assert_eq!(breaker.num_opened(), 1, "a cancellation is not a failure");
        let probe = breaker
            .try_acquire()
            .expect("the next caller probes at once");
        assert_eq!(breaker.state(), State::HalfOpen);
        breaker.record(probe, false);
        assert_eq!(breaker.state(), State::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_closed_permit_changes_nothing() {
        let breaker = Breaker::new("test", config());
        drop(breaker.try_acquire().expect("closed"));
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(breaker.num_transitions(), 0);
    }
}
