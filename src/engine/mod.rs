//! Runs sweeps as bounded steps: a global cap on concurrent jobs, per-store rate limits and
//! concurrency, connections cached per store, cancellation on shutdown.

/// The rate limiter lives with the core types (the store drivers use it too); re-exported
/// here where it used to be.
pub use crate::limits;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::api::datastore::StoreLimits;
use crate::backends::elasticsearch::{ElasticsearchBackend, ElasticsearchConfig};
use crate::backends::loki::{LokiBackend, LokiConfig};
use crate::backends::redis::{RedisBackend, RedisConfig};
use crate::backends::s3::{S3Backend, S3Config};
use crate::backends::{self, Backend, Limits, Step, StepBudget, SubjectJob, SubjectStep, SweepJob};
use crate::leader::Fence;
use crate::limits::RateLimiter;

/// Everything needed to talk to one store, resolved from its DataStore and Secrets. Two equal
/// connection specs share one backend (connections, rate limiter).
#[derive(Clone, Debug, PartialEq)]
pub enum ConnectionSpec {
    Redis(RedisConfig),
    S3(S3Config),
    Loki(LokiConfig),
    Elasticsearch(ElasticsearchConfig),
}

struct CachedBackend {
    spec: ConnectionSpec,
    limits: Option<StoreLimits>,
    backend: Arc<dyn Backend>,
}

pub struct Engine {
    job_slots: Arc<Semaphore>,
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
            job_slots: Arc::new(Semaphore::new(max_concurrent_jobs.max(1))),
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

    /// Drops a cached backend, e.g. after its connection failed, so the next use reconnects.
    pub fn forget(&self, store_key: &str) {
        self.backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(store_key);
    }

    /// Waits for a free job slot; the permit is held for the duration of one step.
    pub async fn job_slot(&self) -> OwnedSemaphorePermit {
        // The semaphore is never closed, so acquiring cannot fail.
        self.job_slots
            .clone()
            .acquire_owned()
            .await
            .expect("job semaphore is never closed")
    }

    /// Runs one bounded step of a sweep job on the store `store_key`.
    pub async fn sweep_step(
        &self,
        store_key: &str,
        backend: &dyn Backend,
        job: &SweepJob,
        cursor: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Step, backends::Error> {
        let _slot = self.job_slot().await;
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
    pub async fn subject_step(
        &self,
        store_key: &str,
        backend: &dyn Backend,
        job: &SubjectJob,
        cursor: Option<&str>,
    ) -> Result<SubjectStep, backends::Error> {
        let _slot = self.job_slot().await;
        let budget = StepBudget {
            max_time: self.checkpoint_interval,
            // Steps of an erasure stop when leadership is lost.
            cancel: self.fence.lost(),
            fence: self.fence.clone(),
        };
        budget.may_act()?;
        let result = backend.subject_step(job, cursor, &budget).await;
        let failure = match &result {
            Ok(step) => step.failure.as_ref(),
            Err(e) => Some(e),
        };
        self.forget_if_broken(store_key, failure);
        result
    }

    /// A store that could not be reached gets a fresh connection next time.
    fn forget_if_broken(&self, store_key: &str, failure: Option<&backends::Error>) {
        if matches!(failure, Some(backends::Error::Unreachable(_))) {
            self.forget(store_key);
        }
    }
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
    match spec {
        ConnectionSpec::Redis(config) => Arc::new(RedisBackend::new(config.clone(), limits)),
        ConnectionSpec::S3(config) => Arc::new(S3Backend::new(config.clone(), limits)),
        ConnectionSpec::Loki(config) => Arc::new(LokiBackend::new(config.clone(), limits)),
        ConnectionSpec::Elasticsearch(config) => {
            Arc::new(ElasticsearchBackend::new(config.clone(), limits))
        }
    }
}
