//! Runs sweeps as bounded steps: a global cap on concurrent jobs, per-store rate limits and
//! concurrency, connections cached per store, cancellation on shutdown.

/// The rate limiter lives with the core types (the store drivers use it too); re-exported
/// here where it used to be.
pub use crate::limits;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub mod batch;
pub mod slots;
use slots::JobSlots;
pub use slots::{Claim, SlotPermit};

use crate::api::datastore::StoreLimits;
use crate::backends::{
    self, Backend, BatchJob, BatchStep, Limits, Step, StepBudget, SubjectJob, SubjectStep, SweepJob,
};
use crate::leader::Fence;
use crate::limits::RateLimiter;

/// Everything needed to talk to one store, resolved from its DataStore and Secrets by the
/// store kind's driver. Two equal connection specs share one backend (connections, rate
/// limiter).
pub use crate::backends::driver::ConnectionSpec;

struct CachedBackend {
    spec: ConnectionSpec,
    limits: Option<StoreLimits>,
    backend: Arc<dyn Backend>,
}

pub struct Engine {
    job_slots: JobSlots,
    backends: Mutex<HashMap<String, CachedBackend>>,
    /// How long one step may run before its progress is checkpointed.
    pub checkpoint_interval: Duration,
    /// Whether this instance still leads: handed to every step, which checks it before each
    /// destructive batch.
    fence: Fence,
}

impl Engine {
    pub fn new(max_concurrent_jobs: usize, checkpoint_interval: Duration, fence: Fence) -> Self {
        Self {
            job_slots: JobSlots::new(max_concurrent_jobs),
            backends: Mutex::new(HashMap::new()),
            checkpoint_interval,
            fence,
        }
    }

    /// The backend for a store, reused while its connection spec and limits are unchanged.
    /// `store_key` identifies the DataStore (namespace/name).
    pub fn backend(
        &self,
        store_key: &str,
        spec: ConnectionSpec,
        limits: Option<StoreLimits>,
    ) -> Arc<dyn Backend> {
        let mut cache = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(cached) = cache.get(store_key) {
            if cached.spec == spec && cached.limits == limits {
                return cached.backend.clone();
            }
        }
        let backend = build_backend(&spec, limits.as_ref());
        cache.insert(
            store_key.to_string(),
            CachedBackend {
                spec,
                limits,
                backend: backend.clone(),
            },
        );
        backend
    }

    /// How many stores have a cached backend (for tests and diagnostics).
    pub fn cached_backends(&self) -> usize {
        self.backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Drops the cached backends of stores that no longer exist: `exists` says whether the
    /// DataStore `namespace/name` is still there. Returns how many were dropped.
    pub fn retain_stores(&self, exists: impl Fn(&str) -> bool) -> usize {
        let mut cache = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let before = cache.len();
        cache.retain(|key, _| exists(key));
        before - cache.len()
    }

    /// Drops a cached backend, e.g. after its connection failed, so the next use reconnects.
    pub fn forget(&self, store_key: &str) {
        self.backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(store_key);
    }

    /// Waits for a job slot (see [`slots`] for who goes first); the permit is held for the
    /// duration of one step.
    pub async fn job_slot(&self, claim: Claim) -> SlotPermit {
        self.job_slots.acquire(claim).await
    }

    /// Runs one bounded step of a sweep job on the store `store_key`.
    pub async fn sweep_step(
        &self,
        claim: Claim,
        store_key: &str,
        backend: &dyn Backend,
        job: &SweepJob,
        cursor: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Step, backends::Error> {
        let _slot = self.job_slot(claim).await;
        let budget = StepBudget {
            max_time: self.checkpoint_interval,
            cancel: cancel.clone(),
            fence: self.fence.clone(),
        };
        // Backends check again right before each destructive batch where they batch.
        budget.may_act()?;
        let result = backend.sweep_step(job, cursor, &budget).await;
        let failure = match &result {
            Ok(step) => step.failure.as_ref(),
            Err(e) => Some(e),
        };
        self.forget_if_broken(store_key, failure);
        result
    }

    /// Runs one step of finding, erasing or verifying a subject on the store `store_key`.
    /// The step stops at its next checkpoint when `cancel` (the operator's shutdown) is
    /// cancelled or leadership is lost, whichever comes first.
    pub async fn subject_step(
        &self,
        claim: Claim,
        store_key: &str,
        backend: &dyn Backend,
        job: &SubjectJob,
        cursor: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<SubjectStep, backends::Error> {
        let run = |budget: StepBudget| async move {
            let result = backend.subject_step(job, cursor, &budget).await;
            let unreachable = result.as_ref().map_or_else(is_unreachable, |s| {
                s.failure.as_ref().is_some_and(is_unreachable)
            });
            (result, unreachable)
        };
        self.fenced_step(claim, store_key, self.checkpoint_interval, cancel, run)
            .await
    }

    /// Runs one step of finding, erasing or verifying many subjects in one pass (a batch;
    /// see [`batch`]) on the store `store_key`, for at most `max_time` (the batcher sets it:
    /// its members' checkpoints after each step cost more the more members it has); stops as
    /// [`Engine::subject_step`] does.
    #[allow(clippy::too_many_arguments)]
    pub async fn batch_step(
        &self,
        claim: Claim,
        store_key: &str,
        backend: &dyn Backend,
        job: &BatchJob,
        cursor: Option<&str>,
        max_time: Duration,
        cancel: &CancellationToken,
    ) -> Result<BatchStep, backends::Error> {
        let run = |budget: StepBudget| async move {
            let result = backend.batch_step(job, cursor, &budget).await;
            let unreachable = result.as_ref().map_or_else(is_unreachable, |s| {
                s.failure.as_ref().is_some_and(is_unreachable)
            });
            (result, unreachable)
        };
        self.fenced_step(claim, store_key, max_time, cancel, run)
            .await
    }

    /// An erasure step: a job slot, a budget that ends at the next checkpoint once `cancel`
    /// fires or leadership is lost, and a fresh connection next time for a store that could
    /// not be reached (`run` says whether it could not).
    async fn fenced_step<T, Fut>(
        &self,
        claim: Claim,
        store_key: &str,
        max_time: Duration,
        cancel: &CancellationToken,
        run: impl FnOnce(StepBudget) -> Fut,
    ) -> Result<T, backends::Error>
    where
        Fut: std::future::Future<Output = (Result<T, backends::Error>, bool)>,
    {
        let _slot = self.job_slot(claim).await;
        let (cancel, _stop_watching) = cancelled_by_either(cancel, self.fence.lost());
        let budget = StepBudget {
            max_time,
            cancel,
            fence: self.fence.clone(),
        };
        budget.may_act()?;
        let (result, unreachable) = run(budget).await;
        if unreachable {
            self.forget(store_key);
        }
        result
    }

    /// A store that could not be reached gets a fresh connection next time.
    fn forget_if_broken(&self, store_key: &str, failure: Option<&backends::Error>) {
        if matches!(failure, Some(backends::Error::Unreachable(_))) {
            self.forget(store_key);
        }
    }
}

fn is_unreachable(e: &backends::Error) -> bool {
    matches!(e, backends::Error::Unreachable(_))
}

/// A token cancelled as soon as `first` or `second` is; watching stops when the guard is
/// dropped (the watcher task then ends without cancelling anything).
fn cancelled_by_either(
    first: &CancellationToken,
    second: CancellationToken,
) -> (CancellationToken, tokio_util::sync::DropGuard) {
    let either = first.child_token();
    let done = CancellationToken::new();
    let (watched, finished) = (either.clone(), done.clone());
    tokio::spawn(async move {
        tokio::select! {
            _ = second.cancelled() => watched.cancel(),
            _ = finished.cancelled() => {}
            _ = watched.cancelled() => {}
        }
    });
    (either, done.drop_guard())
}

fn build_backend(spec: &ConnectionSpec, limits: Option<&StoreLimits>) -> Arc<dyn Backend> {
    let limits = Limits {
        rate: limits
            .and_then(|l| l.requests_per_second)
            .map(|rps| Arc::new(RateLimiter::new(rps))),
        concurrency: limits
            .and_then(|l| l.concurrency)
            .map_or(Limits::default().concurrency, |c| c as usize),
    };
    spec.connect(limits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::StoreKind;
    use crate::backends::redis::driver::RedisDriver;
    use crate::backends::redis::RedisConfig;
    use crate::backends::{Next, SubjectAction};
    use async_trait::async_trait;

    /// A store whose subject steps run until their budget is cancelled.
    struct Endless;

    #[async_trait]
    impl Backend for Endless {
        fn kind(&self) -> StoreKind {
            StoreKind::Redis
        }

        async fn probe(&self) -> Result<String, backends::Error> {
            Ok("endless".into())
        }

        async fn sweep_step(
            &self,
            _job: &SweepJob,
            _cursor: Option<&str>,
            _budget: &StepBudget,
        ) -> Result<Step, backends::Error> {
            Ok(Step::default())
        }

        async fn subject_step(
            &self,
            _job: &SubjectJob,
            _cursor: Option<&str>,
            budget: &StepBudget,
        ) -> Result<SubjectStep, backends::Error> {
            budget.cancel.cancelled().await;
            Ok(SubjectStep {
                count: 0,
                blocked: 0,
                malformed: 0,
                ran: true,
                skipped: Vec::new(),
                next: Next::Continue("stopped".into()),
                failure: None,
                notices: Vec::new(),
            })
        }
    }

    fn job() -> SubjectJob {
        SubjectJob {
            target: serde_json::from_value(serde_json::json!(
                {"name": "t", "store": "s", "redis": {"keyPattern": "k:*", "mode": "idle"}}
            ))
            .expect("a valid target"),
            identifiers: std::collections::BTreeMap::new(),
            action: SubjectAction::Erase,
        }
    }

    fn engine(fence: Fence) -> Engine {
        // A checkpoint interval far beyond the test: only cancellation can end the step.
        Engine::new(1, Duration::from_secs(3600), fence)
    }

    async fn stops_within_a_second(
        engine: &Engine,
        shutdown: &CancellationToken,
    ) -> Result<SubjectStep, backends::Error> {
        tokio::time::timeout(
            Duration::from_secs(1),
            engine.subject_step(
                Claim::sweep("ns", "p"),
                "ns/s",
                &Endless,
                &job(),
                None,
                shutdown,
            ),
        )
        .await
        .expect("the step ends when cancelled")
    }

    #[tokio::test]
    async fn shutdown_ends_a_subject_step() {
        // Without leader election: nothing but the shutdown can cancel the step.
        let engine = engine(Fence::default());
        let shutdown = CancellationToken::new();
        let stopper = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            stopper.cancel();
        });
        let step = stops_within_a_second(&engine, &shutdown).await.unwrap();
        assert_eq!(step.next, Next::Continue("stopped".into()));
        // The job slot is free again.
        assert_eq!(engine.job_slots.available(), 1);
    }

    #[tokio::test]
    async fn lost_leadership_ends_a_subject_step_and_leaves_shutdown_alone() {
        let fence = Fence::new(Duration::from_secs(60));
        fence.renewed(tokio::time::Instant::now());
        let engine = engine(fence.clone());
        let shutdown = CancellationToken::new();
        let loser = fence.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            loser.lose();
        });
        stops_within_a_second(&engine, &shutdown).await.unwrap();
        assert!(!shutdown.is_cancelled());
    }

    #[tokio::test]
    async fn cached_backends_of_deleted_stores_are_dropped() {
        let engine = engine(Fence::default());
        let spec = |url: &str| {
            ConnectionSpec::new::<RedisDriver>(RedisConfig {
                url: url.into(),
                password: None,
                cluster: false,
            })
        };
        engine.backend("a/one", spec("redis://127.0.0.1:1"), None);
        engine.backend("a/two", spec("redis://127.0.0.1:2"), None);
        engine.backend("b/one", spec("redis://127.0.0.1:3"), None);
        assert_eq!(engine.cached_backends(), 3);
        assert_eq!(engine.retain_stores(|k| k != "a/two"), 1);
        assert_eq!(engine.cached_backends(), 2);
        assert_eq!(engine.retain_stores(|_| true), 0);
        assert_eq!(engine.retain_stores(|_| false), 2);
        assert_eq!(engine.cached_backends(), 0);
    }
}
