//! One module per store behind one trait. [`Backend`] is the only thing the engine knows.
//!
//! Every operation is a bounded *step* that returns where to resume: a Redis SCAN position,
//! an S3 listing position, or the id of a deletion the store runs on its own (a Loki delete
//! request, an Elasticsearch task) together with how long to wait before polling it. A driver
//! writes its steps with its own typed cursor ([`driver::StoreBackend`]); the one adapter in
//! [`driver`] encodes it in status (`v1:<kind>:<json>`) and reads it back, so [`Backend`]'s
//! cursors are strings. The engine checkpoints the cursor in status after every step, so a
//! restarted (or upgraded) operator resumes instead of starting over, and long-running
//! deletions are submitted once and then polled.

pub mod chunks;
pub mod driver;
pub mod elasticsearch;
pub mod http;
pub mod identifier;
pub mod loki;
pub mod redis;
pub mod registry;
pub mod s3;
pub mod template;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use crate::api::retentionpolicy::{SubjectLocator, Target};
use crate::api::StoreKind;
use crate::limits::RateLimiter;

pub use crate::api::common::ErrorCategory as Category;

/// A store's failure. Each variant has one [`Category`], which alone decides what the
/// operator does next, and one stable [`Error::reason`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Transient: the store may answer again (connection refused, timed out, 429 or 5xx).
    #[error("cannot reach the store: {0}")]
    Unreachable(String),
    /// Refused: the credentials must be fixed where the operator cannot see (a Secret is not
    /// watched), so it is retried with back-off.
    #[error("the store refused the credentials: {0}")]
    AuthenticationFailed(String),
    /// InvalidSpec: the selector or locator cannot run as written.
    #[error("{0}")]
    InvalidSpec(String),
    /// Refused: the bucket the DataStore names does not exist (yet).
    #[error("the bucket does not exist: {0}")]
    BucketNotFound(String),
    /// Refused: the store answered and would not do it (a command it rejects, a 4xx answer,
    /// deletion disabled for a Loki tenant). Overload and restarts (429, 5xx, timeouts) are
    /// `Unreachable` instead.
    #[error("the store failed a command: {0}")]
    Store(String),
    /// A Redis Cluster node redirected a command (`MOVED`, `ASK`, `TRYAGAIN`,
    /// `CLUSTERDOWN`): a failover or reshard moved the key's slot. Transient: the next step
    /// reads the topology again.
    #[error("the store redirected a command: {0}")]
    ClusterRedirect(String),
    /// This instance no longer leads: it stopped before acting on the store. Transient: the
    /// instance that leads now carries on.
    #[error("leadership lost: stopped before acting on the store")]
    LeadershipLost,
    /// A free-text locator cannot tell this subject's value from other text (too short, only
    /// digits, not an e-mail address): nothing was run. Never carries the value. InvalidSpec:
    /// the locator must change.
    #[error("{0}")]
    IdentifierNotDistinctive(String),
    /// Archive lines that are not JSON still hold the subject's identifier: copies remain.
    /// Says where (object keys, line counts), never the identifier. NeedsAttention: a person
    /// decides what becomes of such lines.
    #[error("{0}")]
    UnparsedCopiesRemain(String),
    /// Loki in `deletion_mode: filter-only` hides deleted lines from queries but keeps them
    /// in storage: a deletion would be reported done (and verified) while the data remains.
    /// InvalidSpec: the store's set-up must change before anything runs.
    #[error("{0}")]
    DeletionModeFilterOnly(String),
    /// The store no longer knows a deletion it was asked to run (a Loki delete request no
    /// longer listed), and submitting it again did not hold either. NeedsAttention: someone
    /// or something removes the store's deletions.
    #[error("{0}")]
    DeleteRequestLost(String),
    /// A deletion the store ran by itself ended without doing all of it (failures, an error):
    /// submitted again a bounded number of times, then this. Names counts and indices only.
    /// Refused: the store would not do it.
    #[error("{0}")]
    StoreTaskFailed(String),
    /// A deletion the store ran by itself was cancelled by someone else. NeedsAttention:
    /// submitting it again would fight whoever cancelled it.
    #[error("{0}")]
    StoreTaskCancelled(String),
    /// The store no longer knows a deletion it was running (a node restarted): what it did
    /// before is not known. NeedsAttention.
    #[error("{0}")]
    StoreTaskLost(String),
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
            Error::ClusterRedirect(_) => "ClusterRedirect",
            Error::LeadershipLost => "LeadershipLost",
            Error::IdentifierNotDistinctive(_) => "IdentifierNotDistinctive",
            Error::UnparsedCopiesRemain(_) => "UnparsedCopiesRemain",
            Error::DeletionModeFilterOnly(_) => "DeletionModeFilterOnly",
            Error::DeleteRequestLost(_) => "DeleteRequestLost",
            Error::StoreTaskFailed(_) => "StoreTaskFailed",
            Error::StoreTaskCancelled(_) => "StoreTaskCancelled",
            Error::StoreTaskLost(_) => "StoreTaskLost",
        }
    }

    /// What kind of failure this is (see each variant): the planners decide from it alone
    /// whether to retry, fail or wait.
    pub fn category(&self) -> Category {
        match self {
            Error::Unreachable(_) | Error::ClusterRedirect(_) | Error::LeadershipLost => {
                Category::Transient
            }
            Error::InvalidSpec(_)
            | Error::IdentifierNotDistinctive(_)
            | Error::DeletionModeFilterOnly(_) => Category::InvalidSpec,
            Error::AuthenticationFailed(_)
            | Error::BucketNotFound(_)
            | Error::Store(_)
            | Error::StoreTaskFailed(_) => Category::Refused,
            Error::UnparsedCopiesRemain(_)
            | Error::DeleteRequestLost(_)
            | Error::StoreTaskCancelled(_)
            | Error::StoreTaskLost(_) => Category::NeedsAttention,
        }
    }

    /// The error as a value the pure planning code can hold: category, reason, message.
    pub fn failure(&self) -> Failure {
        Failure::new(self.category(), self.reason(), self.to_string())
    }
}

/// A failure as the planners see it: what kind it is, its stable reason, and a message that
/// is safe for status (the caller redacts where a store may echo an identifier).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub category: Category,
    pub reason: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(category: Category, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            category,
            reason,
            message: message.into(),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
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

/// What the deletion a cursor stands for waits on, for status messages, where the store's
/// cursor can tell (never an identifier).
pub fn describe_wait(cursor: &str) -> Option<String> {
    registry::describe_wait(cursor)
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
    /// Subjects a LegalHold keeps: the sweep leaves their data where it is, found through the
    /// target's subject locator. The controller only lets a target sweep with holds when
    /// [`hold_exclusion`] says the locator can express every held subject.
    pub held: HeldSubjects,
}

/// The identifiers of the subjects held by LegalHolds (each a map type → value). In memory
/// only: never logged, never in status; `Debug` shows how many there are.
#[derive(Clone, Default, PartialEq)]
pub struct HeldSubjects(pub Vec<BTreeMap<String, String>>);

impl std::fmt::Debug for HeldSubjects {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HeldSubjects(<{} subjects>)", self.0.len())
    }
}

impl HeldSubjects {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Every held subject's forms of `template`, filled by `fill`: the same function the
    /// store's erasure matches with (canonical values, any case for addresses), so that a
    /// sweep leaves out exactly what an erasure of that subject would take. An error when a
    /// subject lacks an identifier the template needs: the caller must then not sweep (the
    /// controller has already held such a target; this is the backstop).
    pub fn expand_all<T>(
        &self,
        what: &str,
        template: &str,
        fill: impl Fn(&str, &BTreeMap<String, String>) -> Result<Vec<T>, template::Error>,
    ) -> Result<Vec<T>, Error> {
        let mut all = Vec::new();
        for ids in &self.0 {
            all.extend(fill(template, ids).map_err(|e| {
                Error::InvalidSpec(format!(
                    "{what}: a subject held by a LegalHold cannot be excluded ({e}); the target must be held"
                ))
            })?);
        }
        Ok(all)
    }
}

/// The target's subject locator for the store kind `kind` (`pick` chooses its section), or
/// `InvalidSpec` saying the target has none.
pub(crate) fn subject_locator<'a, T>(
    target: &'a Target,
    kind: StoreKind,
    pick: impl FnOnce(&'a SubjectLocator) -> Option<&'a T>,
) -> Result<&'a T, Error> {
    target.subject.as_ref().and_then(pick).ok_or_else(|| {
        Error::InvalidSpec(format!(
            "target {} has no {} subject locator",
            target.name,
            kind.as_str()
        ))
    })
}

/// [`subject_locator`] for a sweep that must leave held subjects out: without one it cannot,
/// and says so.
pub(crate) fn held_subject_locator<'a, T>(
    target: &'a Target,
    kind: StoreKind,
    pick: impl FnOnce(&'a SubjectLocator) -> Option<&'a T>,
) -> Result<&'a T, Error> {
    subject_locator(target, kind, pick).map_err(|_| {
        Error::InvalidSpec(format!(
            "target {}: a LegalHold holds subjects and the target has no {} subject locator",
            target.name,
            kind.as_str()
        ))
    })
}

/// The store kind a target's selector is written for (the one selector it sets).
pub fn selector_kind(target: &Target) -> Option<StoreKind> {
    registry::for_target(target).ok().map(|d| d.kind())
}

/// Whether a sweep of `target` can leave every held subject's data in place (pure). `Err`
/// says why not, without any identifier value: the target has no subject locator for its
/// store kind, or a held subject lacks an identifier type one of its templates needs. The
/// whole target is then held. The templates are the driver's
/// ([`driver::StoreDriver::hold_templates`]): Redis `keys` and the keys of `hashFields` and
/// `setMembers` (those keys are skipped whole), S3 `keyPrefixes` and the `records` prefix and
/// value, the Loki `lineFilter`, every Elasticsearch `term`.
pub fn hold_exclusion(target: &Target, held: &HeldSubjects) -> Result<(), String> {
    let none = || {
        format!(
            "target {} has no subject locator for its store, so a sweep cannot tell a held subject's data from the rest",
            target.name
        )
    };
    let locator = target.subject.as_ref().ok_or_else(none)?;
    let driver = registry::for_target(target).map_err(|_| none())?;
    let templates = driver.hold_templates(locator).ok_or_else(none)?;
    if templates.is_empty() {
        return Err(none());
    }
    for (what, t) in templates {
        for ids in &held.0 {
            match template::expand(t, ids, template::literal) {
                Ok(_) => {}
                Err(template::Error::MissingIdentifier(name)) => {
                    return Err(format!(
                        "target {}: a held subject has no {{{name}}}, which {what} needs, so a sweep cannot tell their data from the rest",
                        target.name
                    ))
                }
                Err(template::Error::Malformed) => {
                    return Err(format!("target {}: {what} is not a valid template", target.name))
                }
            }
        }
    }
    Ok(())
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

/// What is left of a job after a step. `C` is the cursor: a driver's own typed cursor
/// ([`driver::StoreBackend::Cursor`]), or its encoding in status (`String`, what the engine
/// and the controllers see through [`Backend`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next<C = String> {
    /// More to do: call again with this cursor.
    Continue(C),
    /// The store is working on a deletion of its own; poll again with this cursor later.
    Wait {
        cursor: C,
        poll_after: Duration,
    },
    Done,
}

impl<C> Next<C> {
    /// The same answer with its cursor turned into another form, or the error doing so.
    pub fn try_map<D, E>(self, f: impl FnOnce(C) -> Result<D, E>) -> Result<Next<D>, E> {
        Ok(match self {
            Next::Continue(c) => Next::Continue(f(c)?),
            Next::Wait { cursor, poll_after } => Next::Wait {
                cursor: f(cursor)?,
                poll_after,
            },
            Next::Done => Next::Done,
        })
    }

    /// The same answer with its cursor turned into another form.
    pub fn map<D>(self, f: impl FnOnce(C) -> D) -> Next<D> {
        match self {
            Next::Continue(c) => Next::Continue(f(c)),
            Next::Wait { cursor, poll_after } => Next::Wait {
                cursor: f(cursor),
                poll_after,
            },
            Next::Done => Next::Done,
        }
    }
}

/// Something about a step besides its counts and failure, told by the one adapter
/// ([`driver::StoreBackend`]) for every driver: a checkpoint it could not read (the job
/// started over), a step that ran far beyond its time budget. The controllers publish each
/// as a Warning Event with `reason`. Never an identifier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    pub reason: &'static str,
    pub message: String,
}

/// What became of a deletion the store runs by itself when it was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cancel {
    /// Stopped: what it had not deleted yet stays; `deleted` is what it had deleted before
    /// it stopped (and had not reported yet), so the counts stay exact.
    Cancelled { deleted: u64 },
    /// The cursor names no deletion the store runs by itself (or the store runs none).
    Nothing,
    /// Past the point where the store can stop it: a Loki request past its cancel period or
    /// already processed, an Elasticsearch task already finished. What it covered is (or
    /// will be) deleted.
    TooLate,
}

/// The counts of one step; the engine adds them up.
#[derive(Debug)]
pub struct Step<C = String> {
    pub scanned: u64,
    /// Deleted (or, in a dry run, would be deleted); in Redis mode `expire`, keys given a TTL.
    pub deleted: u64,
    /// Items the store refused to delete.
    pub blocked: u64,
    /// A few of the refused items by name, each with the store's reason (an object key and
    /// "object protected by Object Lock"), for the target's message.
    pub blocked_items: Vec<String>,
    /// Items kept because a LegalHold holds a subject whose data they are (Redis keys and S3
    /// objects of a held subject; archives holding a held subject's records; Elasticsearch
    /// expired documents of a held subject). Never named: their names may carry identifiers.
    pub held: u64,
    /// Items the sweep could not judge (no timestamp, an unparseable one): neither deleted nor
    /// known to be young enough.
    pub unjudged: u64,
    /// The oldest item the sweep saw and left in place, where the store can tell.
    pub oldest_remaining: Option<DateTime<Utc>>,
    pub next: Next<C>,
    /// A failure after some progress: the counts and `next` above are still true and are
    /// checkpointed, so work already done is neither lost nor redone.
    pub failure: Option<Error>,
    /// A setback the step recovers from by itself (a store task that ended badly and is
    /// submitted again): the sweep goes on, and status says why it is retrying.
    pub retrying: Option<Error>,
    /// What the adapter tells about the step (filled by it; drivers leave it empty).
    pub notices: Vec<Notice>,
}

impl<C> Step<C> {
    /// The same step with its cursor turned into another form, or the error doing so.
    pub fn try_map_cursor<D, E>(self, f: impl FnOnce(C) -> Result<D, E>) -> Result<Step<D>, E> {
        Ok(Step {
            scanned: self.scanned,
            deleted: self.deleted,
            blocked: self.blocked,
            blocked_items: self.blocked_items,
            held: self.held,
            unjudged: self.unjudged,
            oldest_remaining: self.oldest_remaining,
            next: self.next.try_map(f)?,
            failure: self.failure,
            retrying: self.retrying,
            notices: self.notices,
        })
    }

    /// The same step with its cursor turned into another form.
    pub fn map_cursor<D>(self, f: impl FnOnce(C) -> D) -> Step<D> {
        match self.try_map_cursor(|c| Ok::<D, std::convert::Infallible>(f(c))) {
            Ok(step) => step,
            Err(never) => match never {},
        }
    }
}

impl<C> Default for Step<C> {
    /// Nothing done, nothing left.
    fn default() -> Self {
        Self {
            scanned: 0,
            deleted: 0,
            blocked: 0,
            blocked_items: Vec::new(),
            held: 0,
            unjudged: 0,
            oldest_remaining: None,
            next: Next::Done,
            failure: None,
            retrying: None,
            notices: Vec::new(),
        }
    }
}

/// What an erasure does in one target: find and count (also what a dry run does), erase, or
/// verify that nothing remains.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
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
    pub identifiers: BTreeMap<String, String>,
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
pub struct SubjectStep<C = String> {
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
    pub next: Next<C>,
    pub failure: Option<Error>,
    /// What the adapter tells about the step (filled by it; drivers leave it empty).
    pub notices: Vec<Notice>,
}

impl<C> SubjectStep<C> {
    /// The same step with its cursor turned into another form, or the error doing so.
    pub fn try_map_cursor<D, E>(
        self,
        f: impl FnOnce(C) -> Result<D, E>,
    ) -> Result<SubjectStep<D>, E> {
        Ok(SubjectStep {
            count: self.count,
            blocked: self.blocked,
            malformed: self.malformed,
            ran: self.ran,
            skipped: self.skipped,
            next: self.next.try_map(f)?,
            failure: self.failure,
            notices: self.notices,
        })
    }

    /// The same step with its cursor turned into another form.
    pub fn map_cursor<D>(self, f: impl FnOnce(C) -> D) -> SubjectStep<D> {
        match self.try_map_cursor(|c| Ok::<D, std::convert::Infallible>(f(c))) {
            Ok(step) => step,
            Err(never) => match never {},
        }
    }
}

impl<C> Default for SubjectStep<C> {
    /// Nothing found, nothing left; no locator ran.
    fn default() -> Self {
        Self {
            count: 0,
            blocked: 0,
            malformed: 0,
            ran: false,
            skipped: Vec::new(),
            next: Next::Done,
            failure: None,
            notices: Vec::new(),
        }
    }
}

/// Many data subjects in one target, worked in one pass (a batch): one scan, one rewrite,
/// one store-side deletion serve all of them, and every match is attributed to the subject
/// it belongs to. Built by the engine's batcher from the requests ready at the same time.
#[derive(Clone)]
pub struct BatchJob {
    pub target: Target,
    pub action: SubjectAction,
    /// The subjects, in a fixed order: results are given by index.
    pub members: Vec<BatchMember>,
    /// Asked right before every destructive commit (each archive rewrite written, each
    /// DeleteObjects or UNLINK batch, each store-side submission): which members may no
    /// longer be erased (a LegalHold arrived). Their records are left out of that commit
    /// and every later one of the step.
    pub gate: Arc<dyn HoldGate>,
}

impl std::fmt::Debug for BatchJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchJob")
            .field("target", &self.target.name)
            .field("action", &self.action)
            .field("members", &self.members.len())
            .finish()
    }
}

/// One subject of a batch.
#[derive(Clone)]
pub struct BatchMember {
    /// A stable name of the member that holds no identifier (its keyed subject digest): for
    /// what a driver must record in the store to count a lost step per member (a ledger,
    /// a journal). The same member keeps it across the steps and batches it is part of.
    pub id: String,
    /// The subject's identifiers (type → value): used to build store queries, never logged
    /// or returned.
    pub identifiers: BTreeMap<String, String>,
}

impl std::fmt::Debug for BatchMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchMember")
            .field("id", &self.id)
            .field(
                "identifier_types",
                &self.identifiers.keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl BatchMember {
    /// A member from `(type, value)` pairs (for tests).
    #[cfg(test)]
    pub(crate) fn of(id: &str, identifiers: &[(&str, &str)]) -> Self {
        Self {
            id: id.into(),
            identifiers: identifiers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The member as a one-subject job (for locators a driver fills per subject).
    pub fn job(&self, batch: &BatchJob) -> SubjectJob {
        SubjectJob {
            target: batch.target.clone(),
            identifiers: self.identifiers.clone(),
            action: batch.action,
        }
    }
}

/// Which members of a batch are held now (see [`BatchJob::gate`]).
#[async_trait]
pub trait HoldGate: Send + Sync {
    /// The indices of the members that must not be erased any more. An error (the holds
    /// cannot be read) means nothing may be committed: the step stops without committing.
    async fn held(&self) -> Result<BTreeSet<usize>, Error>;
}

/// A gate that never holds anyone (Find and Verify, which delete nothing; tests).
pub struct NoHolds;

#[async_trait]
impl HoldGate for NoHolds {
    async fn held(&self) -> Result<BTreeSet<usize>, Error> {
        Ok(BTreeSet::new())
    }
}

/// What one batch step did for one member: counts of this step only (the batcher adds
/// them up), and which of its locators ran.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberStep {
    /// Records found (Find), erased (Erase) or still present (Verify) in this step.
    pub count: u64,
    /// Records the store refused to erase (Object Lock retention or legal hold).
    pub blocked: u64,
    /// Whether any of the member's locators ran (false: it lacks every identifier needed).
    pub ran: bool,
    /// Locators not run for this member (see [`SubjectStep::skipped`]).
    pub skipped: Vec<String>,
    /// Why this member alone cannot be worked (its identifier cannot be told apart from
    /// other text, say): it leaves the batch with this failure, and the others go on. The
    /// message must be fit for status as it is (built from the policy, never from a value).
    pub failure: Option<Failure>,
}

/// The result of one batch step.
#[derive(Debug)]
pub struct BatchStep<C = String> {
    /// One entry per member of the job, in its order.
    pub members: Vec<MemberStep>,
    /// Members the gate held at a commit point of this step: left out of every commit from
    /// then on; the batcher takes them out of the batch.
    pub held: BTreeSet<usize>,
    /// Lines of archives that are not JSON, left as they were (the batch's, not a member's).
    pub malformed: u64,
    pub next: Next<C>,
    pub failure: Option<Error>,
    /// What the adapter tells about the step (filled by it; drivers leave it empty).
    pub notices: Vec<Notice>,
}

impl<C> BatchStep<C> {
    /// An empty step for `members` members that goes on to `next`.
    pub fn empty(members: usize, next: Next<C>) -> Self {
        Self {
            members: vec![MemberStep::default(); members],
            held: BTreeSet::new(),
            malformed: 0,
            next,
            failure: None,
            notices: Vec::new(),
        }
    }

    /// The same step with its cursor turned into another form.
    pub fn map_cursor<D>(self, f: impl FnOnce(C) -> D) -> BatchStep<D> {
        BatchStep {
            members: self.members,
            held: self.held,
            malformed: self.malformed,
            next: self.next.map(f),
            failure: self.failure,
            notices: self.notices,
        }
    }
}

/// A subject's copies a store keeps under a lock of its own until it lapses: how many, the
/// earliest and latest retain-until dates, and how many are under a legal hold (no date).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LockedCopies {
    pub count: u64,
    pub earliest_until: Option<DateTime<Utc>>,
    pub latest_until: Option<DateTime<Utc>>,
    pub legal_holds: u64,
}

impl LockedCopies {
    /// Counts `copies` more copies in one locked version (retained until `until` and/or
    /// under a legal hold).
    pub fn add(&mut self, copies: u64, until: Option<DateTime<Utc>>, held: bool) {
        self.count = self.count.saturating_add(copies);
        if held {
            self.legal_holds = self.legal_holds.saturating_add(copies);
        }
        if let Some(u) = until {
            self.earliest_until = Some(self.earliest_until.map_or(u, |e| e.min(u)));
            self.latest_until = Some(self.latest_until.map_or(u, |l| l.max(u)));
        }
    }
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
    /// be cancelled: a LegalHold arrived (holds win), or the policy it was submitted for
    /// changed, was suspended or deleted. Unless this fails the caller drops the cursor.
    /// Stores whose steps finish before returning have nothing to cancel.
    async fn cancel(&self, cursor: &str) -> Result<Cancel, Error> {
        let _ = cursor;
        Ok(Cancel::Nothing)
    }

    /// The subject's copies the store keeps under a lock of its own (S3 Object Lock retention
    /// or legal hold), counted as a Verify step counts copies, with the span of their
    /// retain-until dates. Stores without such locks have none.
    async fn locked_copies(&self, job: &SubjectJob) -> Result<LockedCopies, Error> {
        let _ = job;
        Ok(LockedCopies::default())
    }

    /// Runs one bounded step of finding, erasing or verifying one subject's records.
    async fn subject_step(
        &self,
        job: &SubjectJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<SubjectStep, Error>;

    /// Whether the store works many subjects in one pass ([`Backend::batch_step`]).
    fn batches(&self) -> bool {
        false
    }

    /// Runs one bounded step of finding, erasing or verifying many subjects' records in one
    /// pass. Only called when [`Backend::batches`].
    async fn batch_step(
        &self,
        job: &BatchJob,
        cursor: Option<&str>,
        budget: &StepBudget,
    ) -> Result<BatchStep, Error> {
        let _ = (job, cursor, budget);
        Err(Error::InvalidSpec(format!(
            "a {} store does not work subjects in batches",
            self.kind().as_str()
        )))
    }
}

/// The selector of a target for its store kind, checked before anything runs: the target
/// must select data in the store kind it names (invariant 1: never outside the selector).
pub fn validate_target(kind: StoreKind, target: &Target) -> Result<(), Error> {
    registry::driver(kind)
        .ok_or_else(|| Error::InvalidSpec(format!("no driver for {} stores", kind.as_str())))?
        .validate(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(json: serde_json::Value) -> Target {
        serde_json::from_value(json).expect("a valid target")
    }

    fn held(pairs: &[(&str, &str)]) -> HeldSubjects {
        HeldSubjects(vec![pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()])
    }

    #[test]
    fn a_hold_is_expressible_only_through_a_locator_for_the_targets_store() {
        let s3 = target(
            serde_json::json!({"name": "a", "store": "s", "s3": {"prefix": "app/"},
            "subject": {"s3": {"keyPrefixes": ["app/users/{userId}/"],
                "records": {"prefix": "app/logs/", "field": "to", "equals": "{email}"}}}}),
        );
        assert!(hold_exclusion(&s3, &held(&[("userId", "1"), ("email", "a@b.example")])).is_ok());
        let why = hold_exclusion(&s3, &held(&[("userId", "1")])).unwrap_err();
        assert!(
            why.contains("no {email}, which subject.s3.records.equals needs"),
            "{why}"
        );
        // A locator for another store kind does not count.
        let wrong = target(
            serde_json::json!({"name": "b", "store": "s", "s3": {"prefix": "app/"},
            "subject": {"loki": {"lineFilter": "uid={userId} "}}}),
        );
        assert!(hold_exclusion(&wrong, &held(&[("userId", "1")]))
            .unwrap_err()
            .contains("no subject locator"));
        let es = target(serde_json::json!({"name": "c", "store": "s",
            "elasticsearch": {"index": "ev-*", "timestampField": "@timestamp"},
            "subject": {"elasticsearch": {"term": {"user.id": "{userId}", "tenant": "{tenant}"}}}}));
        assert!(hold_exclusion(&es, &held(&[("userId", "1")]))
            .unwrap_err()
            .contains("{tenant}"));
        let redis = target(serde_json::json!({"name": "d", "store": "s",
            "redis": {"keyPattern": "h:*", "mode": "idle"},
            "subject": {"redis": {"hashFields": [{"key": "profiles", "field": "{userId}"}]}}}));
        assert!(
            hold_exclusion(&redis, &held(&[("email", "a@b.example")])).is_ok(),
            "the hash key has no placeholder: it is kept whole whatever the field"
        );
    }

    #[test]
    fn every_error_has_the_category_its_variant_documents() {
        use Category::*;
        let m = || "m".to_string();
        let cases = [
            (Error::Unreachable(m()), Transient),
            (Error::Store(m()), Refused),
            (Error::LeadershipLost, Transient),
            (Error::ClusterRedirect(m()), Transient),
            (Error::InvalidSpec(m()), InvalidSpec),
            (Error::IdentifierNotDistinctive(m()), InvalidSpec),
            (Error::DeletionModeFilterOnly(m()), InvalidSpec),
            (Error::AuthenticationFailed(m()), Refused),
            (Error::BucketNotFound(m()), Refused),
            (Error::StoreTaskFailed(m()), Refused),
            (Error::UnparsedCopiesRemain(m()), NeedsAttention),
            (Error::DeleteRequestLost(m()), NeedsAttention),
            (Error::StoreTaskCancelled(m()), NeedsAttention),
            (Error::StoreTaskLost(m()), NeedsAttention),
        ];
        for (e, category) in cases {
            assert_eq!(e.category(), category, "{}", e.reason());
            let f = e.failure();
            assert_eq!(
                (f.category, f.reason, f.message.as_str()),
                (category, e.reason(), e.to_string().as_str())
            );
        }
    }

    #[test]
    fn held_identifiers_expand_escaped_and_never_show_in_debug() {
        let probe = "probe*9c1e";
        let h = held(&[("userId", probe)]);
        assert_eq!(
            h.expand_all("k", "session:{userId}:*", redis::subject::key_glob)
                .unwrap(),
            vec!["session:probe\\*9c1e:*".to_string()]
        );
        assert!(h
            .expand_all("k", "{email}", identifier::exact_forms)
            .is_err());
        // Held addresses are left out in the form an erasure matches: canonical, any case.
        let h = held(&[("email", " Bob@Example.org\n")]);
        assert_eq!(
            h.expand_all("k", "u:{email}:*", redis::subject::key_glob)
                .unwrap(),
            vec!["u:[bB][oO][bB]@[eE][xX][aA][mM][pP][lL][eE].[oO][rR][gG]:*".to_string()]
        );
        assert!(!format!("{h:?}").contains("9c1e"));
    }
}
