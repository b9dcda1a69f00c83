//! One module per store behind one trait. The trait is the only thing the engine knows.
//!
//! Every operation is a bounded *step* that returns where to resume: a Redis SCAN cursor, an
//! S3 continuation token, or the id of a deletion the store runs on its own (a Loki delete
//! request, an Elasticsearch task) together with how long to wait before polling it. The
//! engine checkpoints the cursor in status after every step, so a restarted operator resumes
//! instead of starting over, and long-running deletions are submitted once and then polled.

pub mod elasticsearch;
pub mod http;
pub mod loki;
pub mod redis;
pub mod s3;
pub mod template;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;
use crate::engine::limits::RateLimiter;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach the store: {0}")]
    Unreachable(String),
    #[error("the store refused the credentials: {0}")]
    AuthenticationFailed(String),
    #[error("{0}")]
    InvalidSpec(String),
    #[error("the bucket does not exist: {0}")]
    BucketNotFound(String),
    #[error("the store failed a command: {0}")]
    Store(String),
    /// This instance no longer leads: it stopped before acting on the store.
    #[error("leadership lost: stopped before acting on the store")]
    LeadershipLost,
}

impl Error {
    /// A stable PascalCase reason for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Unreachable(_) => "Unreachable",
            Error::AuthenticationFailed(_) => "AuthenticationFailed",
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::BucketNotFound(_) => "BucketNotFound",
            Error::Store(_) => "StoreError",
            Error::LeadershipLost => "LeadershipLost",
        }
    }

    /// Whether trying again later may succeed without anyone changing the spec.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::InvalidSpec(_))
    }
}

/// How hard the operator may push one store: shared by every job on that store.
#[derive(Clone, Debug)]
pub struct Limits {
    pub rate: Option<Arc<RateLimiter>>,
    /// Batches in flight at once.
    pub concurrency: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            rate: None,
            concurrency: 4,
        }
    }
}

impl Limits {
    pub async fn acquire(&self, requests: u32) {
        if let Some(rate) = &self.rate {
            rate.acquire(requests).await;
        }
    }
}

/// One retention sweep of one target, fixed when the sweep starts.
#[derive(Clone, Debug)]
pub struct SweepJob {
    pub target: Target,
    pub retention: crate::api::Duration,
    pub dry_run: bool,
    /// Items older than this are expired. Fixed for the whole sweep so that resumed steps
    /// and a dry run judge items by the same instant.
    pub cutoff: DateTime<Utc>,
}

/// When a step must hand back control so its progress can be checkpointed.
#[derive(Clone, Debug)]
pub struct StepBudget {
    pub max_time: Duration,
    pub cancel: CancellationToken,
    /// Whether this instance still leads (always, without leader election).
    pub fence: crate::leader::Fence,
}

impl StepBudget {
    /// Checked right before every destructive batch (after any rate-limit wait): a process
    /// frozen mid-step that thaws after another instance took over must not act.
    pub fn may_act(&self) -> Result<(), Error> {
        if self.fence.is_valid() {
            Ok(())
        } else {
            Err(Error::LeadershipLost)
        }
    }
}

/// What is left of a job after a step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// More to do: call again with this cursor.
    Continue(String),
    /// The store is working on a deletion of its own; poll again with this cursor later.
    Wait {
        cursor: String,
        poll_after: Duration,
    },
    Done,
}

/// The counts of one step; the engine adds them up.
#[derive(Debug)]
pub struct Step {
    pub scanned: u64,
    /// Deleted (or, in a dry run, would be deleted); in Redis mode `expire`, keys given a TTL.
    pub deleted: u64,
    /// Items the store refused to delete.
    pub blocked: u64,
    /// A few of the refused items by name, each with the store's reason (an object key and
    /// "object protected by Object Lock"), for the target's message.
    pub blocked_items: Vec<String>,
    pub next: Next,
    /// A failure after some progress: the counts and `next` above are still true and are
    /// checkpointed, so work already done is neither lost nor redone.
    pub failure: Option<Error>,
}

/// What an erasure does in one target: find and count (also what a dry run does), erase, or
/// verify that nothing remains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubjectAction {
    Find,
    Erase,
    Verify,
}

/// One data subject in one target. `identifiers` are the subject's (type → value); they are
/// used to build store queries and never logged or returned.
#[derive(Clone)]
pub struct SubjectJob {
    pub target: Target,
    pub identifiers: std::collections::BTreeMap<String, String>,
    pub action: SubjectAction,
}

impl std::fmt::Debug for SubjectJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubjectJob")
            .field("target", &self.target.name)
            .field(
                "identifier_types",
                &self.identifiers.keys().collect::<Vec<_>>(),
            )
            .field("action", &self.action)
            .finish()
    }
}

/// The result of one subject step.
#[derive(Debug)]
pub struct SubjectStep {
    /// Records found (Find), erased (Erase) or still present (Verify).
    pub count: u64,
    /// Records the store refused to erase (Object Lock retention or legal hold).
    pub blocked: u64,
    /// Lines of archives that are not JSON: left as they were, counted.
    pub malformed: u64,
    /// Whether any locator ran (false: every locator was skipped).
    pub ran: bool,
    /// Locators not run because the subject lacks an identifier they need, described
    /// without any identifier value (e.g. `keys[1] needs {email}`).
    pub skipped: Vec<String>,
    pub next: Next,
    pub failure: Option<Error>,
}

#[async_trait]
pub trait Backend: Send + Sync {
    fn kind(&self) -> StoreKind;

    /// Connects and authenticates; returns a short description such as `redis 7.0.15`.
    async fn probe(&self) -> Result<String, Error>;

    /// Runs one bounded step of a retention sweep, resuming from `cursor` (None: start).
    async fn sweep_step(
        &self,
        job: &SweepJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<Step, Error>;

    /// Cancels the deletion the store runs by itself that `cursor` waits on, if it can still
    /// be cancelled: a LegalHold arrived, and holds win. Returns whether one was cancelled;
    /// the caller then drops the cursor. Stores whose steps finish before returning have
    /// nothing to cancel.
    async fn cancel(&self, cursor: &str) -> Result<bool, Error> {
        let _ = cursor;
        Ok(false)
    }

    /// Runs one bounded step of finding, erasing or verifying one subject's records.
    async fn subject_step(
        &self,
        job: &SubjectJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<SubjectStep, Error>;
}

/// The selector of a target for its store kind, checked before anything runs: the target
/// must select data in the store kind it names (invariant 1: never outside the selector).
pub fn validate_target(kind: StoreKind, target: &Target) -> Result<(), Error> {
    match kind {
        StoreKind::Redis => redis::validate_target(target),
        StoreKind::S3 => s3::validate_target(target),
        StoreKind::Loki => loki::validate_target(target),
        StoreKind::Elasticsearch => elasticsearch::validate_target(target),
    }
}
