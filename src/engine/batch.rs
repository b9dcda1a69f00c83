//! Batches of subjects. Erasure requests whose targets are ready at the same time are
//! worked together, per target and action: one scan, one archive rewrite, one store-side
//! deletion serves every member, and each member still gets its own counts, cursor and
//! result. A member that arrives while a batch of its target runs joins the next one.
//!
//! The batcher keeps each member's running counts and hands every member, after every step
//! that leaves work, a cursor of its own to checkpoint in its status ([`MemberCursor`]: the
//! batch's shared position and the member's counts) before the next step may act: a step
//! that names a run (a ledger, a journal, a task marker) is in every member's status before
//! the step that deletes under it. After a restart the members come back with their cursors
//! and those at the same position resume together; the shared position is valid for any
//! subset of the members it started with.
//!
//! A member alone (no batch-mate when its batch forms, and no batch cursor) runs as one
//! subject: the single-subject step, unchanged.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::future::join_all;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::{Claim, Engine};
use crate::api::retentionpolicy::Target;
use crate::backends::{
    self, Backend, BatchJob, BatchMember, BatchStep, Failure, HoldGate, Next, Notice,
    SubjectAction, SubjectJob, SubjectStep,
};

/// How batches form: at most `max_members` subjects, after waiting `wait` for more to join
/// (zero: at once).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchSettings {
    pub max_members: usize,
    pub wait: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_members: 1000,
            wait: Duration::ZERO,
        }
    }
}

impl BatchSettings {
    /// Whether subjects are batched at all (a batch size of 1: one at a time).
    pub fn enabled(&self) -> bool {
        self.max_members > 1
    }
}

/// Where a member of a batch resumes, as its target's status holds it:
/// `batch:{"at":<the batch's shared cursor>,"count":…}`. The counts are the member's own so
/// far; the shared cursor names no member.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCursor {
    /// The batch's cursor (the store's, as the adapter encodes it); None: from the start.
    pub at: Option<String>,
    #[serde(default)]
    pub count: u64,
    #[serde(default)]
    pub blocked: u64,
    #[serde(default)]
    pub malformed: u64,
}

const MEMBER_CURSOR_PREFIX: &str = "batch:";

impl MemberCursor {
    pub fn encode(&self) -> String {
        // Plain data: serialising cannot fail; if it did, the member would start over.
        let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        format!("{MEMBER_CURSOR_PREFIX}{json}")
    }

    /// Whether a target's cursor is a batch member's.
    pub fn is_one(cursor: &str) -> bool {
        cursor.starts_with(MEMBER_CURSOR_PREFIX)
    }

    /// A member's cursor read back; None: not one, or unreadable (the member starts over).
    pub fn decode(cursor: &str) -> Option<Self> {
        serde_json::from_str(cursor.strip_prefix(MEMBER_CURSOR_PREFIX)?).ok()
    }
}

/// Whether a LegalHold now bears on one member (asked before every commit of an erasure).
#[async_trait]
pub trait MemberGate: Send + Sync {
    /// True: the member must not be erased any more. An error: nothing may be committed.
    async fn held(&self) -> Result<bool, backends::Error>;
}

/// Writes a member's cursor into its status; the batch goes on for it only once it is there.
#[async_trait]
pub trait MemberCheckpoint: Send + Sync {
    async fn save(&self, cursor: &str) -> Result<(), Failure>;
}

/// One subject asking to be worked in a batch.
pub struct Joining {
    pub member: BatchMember,
    /// Its cursor: None to start; a [`MemberCursor`] to resume a batch.
    pub resume: Option<MemberCursor>,
    pub claim: Claim,
    pub gate: Arc<dyn MemberGate>,
    pub checkpoint: Arc<dyn MemberCheckpoint>,
}

/// Where a batch works: the same for every member of one [`BatchKey`].
pub struct Work {
    pub engine: Arc<Engine>,
    pub backend: Arc<dyn Backend>,
    /// The DataStore (namespace/name).
    pub store_key: String,
    pub target: Target,
    pub action: SubjectAction,
    /// The operator's shutdown.
    pub cancel: CancellationToken,
    /// How a store's error is told to members (it may echo an identifier of any of them).
    pub redact: fn(&backends::Error) -> Failure,
}

/// The members that may batch together: the same store, target and action, resuming from
/// the same shared position (None: starting).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub store_key: String,
    /// `namespace/policy/target`.
    pub target: String,
    pub action: SubjectAction,
    pub at: Option<String>,
}

/// What a member's batch came to.
#[derive(Debug)]
pub enum Outcome {
    /// It ran alone: one single-subject step, as without batches.
    Alone(Result<SubjectStep, backends::Error>),
    /// It ran in a batch (possibly of one, resuming): its totals and how the batch ended for
    /// it.
    Batch(MemberEnd),
}

/// A member's totals over the steps of its batch, and how the batch ended for it.
#[derive(Debug)]
pub struct MemberEnd {
    pub count: u64,
    pub blocked: u64,
    pub malformed: u64,
    /// Whether any of its locators ran (false: it lacks every identifier one needs).
    pub ran: bool,
    pub skipped: Vec<String>,
    pub end: End,
    /// What the adapter told of the steps (a restarted checkpoint, an overrun).
    pub notices: Vec<Notice>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum End {
    /// Its records are found, erased or verified to the end.
    Done,
    /// Stopped before the end (shutdown): resume from this member cursor.
    Stopped(String),
    /// A LegalHold bears on it now: left out of the batch's commits from the moment the
    /// gate said so. The cursor restarts its work (its counts kept) once the hold is gone.
    Held(String),
    /// The step failed for it; `cursor`: resume from there (the store took work on).
    Failed {
        failure: Failure,
        cursor: Option<String>,
    },
}

struct Waiter {
    joining: Joining,
    work: Arc<Work>,
    reply: oneshot::Sender<Outcome>,
}

/// The batches of the operator: members waiting per key, and whether a batch of that key
/// runs (then newcomers wait for the next).
pub struct Batcher {
    settings: BatchSettings,
    metrics: Arc<crate::metrics::Metrics>,
    queues: Mutex<HashMap<BatchKey, Queue>>,
    /// When the last batch of each key ended, for the keys with one in the last
    /// [`QUIET_AFTER`], and its member if it had one only.
    last_ended: Mutex<HashMap<BatchKey, (std::time::Instant, Option<String>)>>,
}

/// How long after its last batch a key counts as idle again: only then does a lone newcomer
/// start alone (or sooner, when that batch was the newcomer's own, as when it retries).
/// Requests that trickle in (a burst whose members finish their previous action at
/// different times) would otherwise each go alone, and each pay a pass of its own.
const QUIET_AFTER: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Queue {
    running: bool,
    waiting: Vec<Waiter>,
}

impl Batcher {
    pub fn new(settings: BatchSettings, metrics: Arc<crate::metrics::Metrics>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            metrics,
            queues: Mutex::new(HashMap::new()),
            last_ended: Mutex::new(HashMap::new()),
        })
    }

    pub fn settings(&self) -> BatchSettings {
        self.settings
    }

    /// Works `joining` in the next batch of `key` (queued now) and waits for its outcome.
    /// Every member of the batch is checkpointed (through its [`MemberCheckpoint`]) after
    /// every step that leaves work. Not an `async fn`: the future a member waits on holds
    /// the answer's receiver only, for a thousand members wait at once.
    pub fn join(
        self: &Arc<Self>,
        key: BatchKey,
        joining: Joining,
        work: Work,
    ) -> impl std::future::Future<Output = Outcome> + Send + 'static {
        let (reply, outcome) = oneshot::channel();
        let start = {
            let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
            let queue = queues.entry(key.clone()).or_default();
            // The same for every member of the key (its spec and backend are part of it):
            // the waiting members share one, as the batch uses its first member's.
            let work = queue
                .waiting
                .first()
                .map_or_else(|| Arc::new(work), |w| w.work.clone());
            queue.waiting.push(Waiter {
                joining,
                work,
                reply,
            });
            !std::mem::replace(&mut queue.running, true)
        };
        if start {
            // Its own task: the batch goes on for the others if this caller goes away.
            tokio::spawn(self.clone().drive(key));
        }
        async move {
            outcome.await.unwrap_or_else(|_| {
                Outcome::Batch(MemberEnd::ended(End::Failed {
                    failure: Failure::new(
                        backends::Category::Transient,
                        "BatchInterrupted",
                        "the batch this target was part of ended without an answer (the operator is stopping, or the batch broke off)",
                    ),
                    cursor: None,
                }))
            })
        }
    }

    /// Whether a batch of `key` with other members than `lone` ended in the last
    /// [`QUIET_AFTER`].
    fn others_ran_lately(&self, key: &BatchKey, lone: &str) -> bool {
        let last = self.last_ended.lock().unwrap_or_else(|p| p.into_inner());
        last.get(key)
            .is_some_and(|(t, only)| t.elapsed() < QUIET_AFTER && only.as_deref() != Some(lone))
    }

    fn batch_ended(&self, key: &BatchKey, only: Option<String>) {
        let mut last = self.last_ended.lock().unwrap_or_else(|p| p.into_inner());
        last.retain(|_, (t, _)| t.elapsed() < QUIET_AFTER);
        last.insert(key.clone(), (std::time::Instant::now(), only));
    }

    /// Runs the batches of `key` one after another while members wait.
    async fn drive(self: Arc<Self>, key: BatchKey) {
        // Only the first batch of a key that was idle may be a lone member going alone;
        // with batching off (one member a batch) every member goes alone.
        let mut first = true;
        loop {
            if !self.settings.wait.is_zero() {
                tokio::time::sleep(self.settings.wait).await;
            }
            let members = {
                let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
                let Some(queue) = queues.get_mut(&key) else {
                    return;
                };
                if queue.waiting.is_empty() {
                    queues.remove(&key);
                    return;
                }
                take_batch(&mut queue.waiting, self.settings.max_members)
            };
            let action = match key.action {
                SubjectAction::Find => "find",
                SubjectAction::Erase => "erase",
                SubjectAction::Verify => "verify",
            };
            self.metrics.batch_started(action, members.len());
            let size = members.len();
            let started = std::time::Instant::now();
            // Its own task: a batch that panics drops its members' replies (each then fails
            // and retries) instead of taking this loop down, which would leave the key
            // marked running and every later member of it waiting forever.
            let batch_key = key.clone();
            let only = match members.as_slice() {
                [one] => Some(one.joining.member.id.clone()),
                _ => None,
            };
            let alone = self.settings.max_members <= 1
                || (first
                    && only
                        .as_deref()
                        .is_some_and(|id| !self.others_ran_lately(&key, id)));
            first = false;
            let ran =
                tokio::spawn(async move { run_batch(&batch_key, members, alone).await }).await;
            self.batch_ended(&key, only);
            // Names no member: the target (namespace/policy/target name) and sizes only.
            tracing::info!(
                target = %key.target,
                action,
                members = size,
                steps = ran.as_ref().map_or(0, |r| r.steps),
                checkpoint_ms = ran.as_ref().map_or(0, |r| r.checkpoints.as_millis()),
                elapsed_ms = started.elapsed().as_millis(),
                "batch ended"
            );
        }
    }
}

/// The next batch from the waiting members: nearest deadline first, then first come.
fn take_batch(waiting: &mut Vec<Waiter>, max: usize) -> Vec<Waiter> {
    waiting.sort_by_key(|w| {
        (
            w.joining.claim.deadline.is_none(),
            w.joining.claim.deadline.map(|d| d.0),
        )
    });
    let n = waiting.len().min(max.max(1));
    waiting.drain(..n).collect()
}

impl MemberEnd {
    fn ended(end: End) -> Self {
        Self {
            count: 0,
            blocked: 0,
            malformed: 0,
            ran: false,
            skipped: Vec::new(),
            end,
            notices: Vec::new(),
        }
    }
}

/// A member while its batch runs.
struct Live {
    waiter: Waiter,
    totals: MemberCursor,
    ran: bool,
    skipped: Vec<String>,
}

impl Live {
    fn cursor(&self, at: Option<String>) -> String {
        MemberCursor {
            at,
            ..self.totals.clone()
        }
        .encode()
    }

    fn finish(self, end: End, notices: &[Notice]) {
        let outcome = Outcome::Batch(MemberEnd {
            count: self.totals.count,
            blocked: self.totals.blocked,
            malformed: self.totals.malformed,
            ran: self.ran,
            skipped: self.skipped,
            end,
            notices: notices.to_vec(),
        });
        // A member that went away (its reconcile ended) finds its cursor in status.
        let _ = self.waiter.reply.send(outcome);
    }
}

/// The members' gates as the batch's: the indices of those held now.
struct Gates(Vec<Arc<dyn MemberGate>>);

#[async_trait]
impl HoldGate for Gates {
    async fn held(&self) -> Result<BTreeSet<usize>, backends::Error> {
        let answers = join_all(self.0.iter().map(|g| g.held())).await;
        let mut held = BTreeSet::new();
        for (i, answer) in answers.into_iter().enumerate() {
            if answer? {
                held.insert(i);
            }
        }
        Ok(held)
    }
}

/// What a batch took: its store steps, and the time its members' checkpoints took.
#[derive(Default)]
struct BatchRun {
    steps: usize,
    checkpoints: Duration,
}

/// Runs one batch to its end. `may_go_alone`: a lone member without a position of its own
/// takes the one-subject path.
async fn run_batch(key: &BatchKey, members: Vec<Waiter>, may_go_alone: bool) -> BatchRun {
    let mut ran = BatchRun::default();
    let Some(work) = members.first().map(|w| w.work.clone()) else {
        return ran;
    };
    // A lone member that carries counts (it restarts after a hold) runs as a batch of one,
    // which keeps them; the one-subject step would start them from zero.
    let fresh = members.first().is_some_and(|m| {
        m.joining
            .resume
            .as_ref()
            .is_none_or(|r| *r == MemberCursor::default())
    });
    if may_go_alone && members.len() == 1 && key.at.is_none() && fresh {
        if let Some(alone) = members.into_iter().next() {
            run_alone(alone, &work).await;
            ran.steps = 1;
        }
        return ran;
    }
    let mut live: Vec<Live> = members
        .into_iter()
        .map(|waiter| Live {
            totals: waiter.joining.resume.clone().unwrap_or_default(),
            waiter,
            ran: false,
            skipped: Vec::new(),
        })
        .collect();
    let mut at = key.at.clone();
    let mut step_time = work.engine.checkpoint_interval;
    while !live.is_empty() {
        let job = BatchJob {
            target: work.target.clone(),
            action: work.action,
            members: live
                .iter()
                .map(|l| l.waiter.joining.member.clone())
                .collect(),
            gate: Arc::new(Gates(
                live.iter().map(|l| l.waiter.joining.gate.clone()).collect(),
            )),
        };
        let claim = earliest(&live);
        ran.steps += 1;
        let result = work
            .engine
            .batch_step(
                claim,
                &work.store_key,
                work.backend.as_ref(),
                &job,
                at.as_deref(),
                step_time,
                &work.cancel,
            )
            .await;
        let step = match result {
            Ok(step) => step,
            Err(e) => {
                let failure = (work.redact)(&e);
                for l in live {
                    let cursor = at.clone().map(|a| l.cursor(Some(a)));
                    l.finish(
                        End::Failed {
                            failure: failure.clone(),
                            cursor,
                        },
                        &[],
                    );
                }
                return ran;
            }
        };
        let BatchStep {
            members: steps,
            held,
            malformed,
            next,
            failure,
            notices,
        } = step;
        let mut kept = Vec::with_capacity(live.len());
        for (i, (mut l, s)) in live.into_iter().zip(steps).enumerate() {
            l.totals.count = l.totals.count.saturating_add(s.count);
            l.totals.blocked = l.totals.blocked.saturating_add(s.blocked);
            l.totals.malformed = l.totals.malformed.saturating_add(malformed);
            l.ran |= s.ran;
            l.skipped = s.skipped;
            if let Some(failure) = s.failure {
                l.finish(
                    End::Failed {
                        failure,
                        cursor: None,
                    },
                    &notices,
                );
            } else if held.contains(&i) {
                // What it erased stays erased and counted; records found or left to verify
                // are found again when it starts over, so those counts start from zero.
                let restart = match work.action {
                    SubjectAction::Erase => l.cursor(None),
                    SubjectAction::Find | SubjectAction::Verify => MemberCursor::default().encode(),
                };
                l.finish(End::Held(restart), &notices);
            } else {
                kept.push(l);
            }
        }
        live = kept;
        let (cursor, poll_after) = match next {
            Next::Done => {
                let end = match failure {
                    Some(e) => End::Failed {
                        failure: (work.redact)(&e),
                        cursor: None,
                    },
                    None => End::Done,
                };
                for l in live {
                    l.finish(end.clone(), &notices);
                }
                return ran;
            }
            Next::Continue(c) => (c, Duration::ZERO),
            Next::Wait { cursor, poll_after } => (cursor, poll_after),
        };
        // Erasing, every member's status holds the new position before the batch acts under
        // it. Finding and verifying only read: a position lost in a restart is read again,
        // so their members are not written between steps (a thousand writes a step).
        let saved = if work.action == SubjectAction::Erase {
            let checkpointing = std::time::Instant::now();
            // A bounded number in flight: a thousand writes at once only queue in the API
            // server (and past its in-flight limit are refused).
            let writes: Vec<_> = live
                .iter()
                .map(|l| {
                    let cursor = l.cursor(Some(cursor.clone()));
                    let checkpoint = l.waiter.joining.checkpoint.clone();
                    async move { checkpoint.save(&cursor).await }
                })
                .collect();
            let saved: Vec<_> = futures::stream::iter(writes)
                .buffered(CHECKPOINTS_IN_FLIGHT)
                .collect()
                .await;
            let took = checkpointing.elapsed();
            ran.checkpoints += took;
            step_time = erase_step_time(work.engine.checkpoint_interval, took);
            saved
        } else {
            live.iter().map(|_| Ok(())).collect()
        };
        let mut kept = Vec::with_capacity(live.len());
        for (l, saved) in live.into_iter().zip(saved) {
            let here = l.cursor(Some(cursor.clone()));
            match (saved, &failure) {
                (Err(failure), _) => l.finish(
                    End::Failed {
                        failure,
                        cursor: Some(here),
                    },
                    &notices,
                ),
                (Ok(()), Some(e)) => l.finish(
                    End::Failed {
                        failure: (work.redact)(e),
                        cursor: Some(here),
                    },
                    &notices,
                ),
                (Ok(()), None) if work.cancel.is_cancelled() => {
                    l.finish(End::Stopped(here), &notices)
                }
                (Ok(()), None) => kept.push(l),
            }
        }
        live = kept;
        at = Some(cursor);
        if !poll_after.is_zero() && !live.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(poll_after) => {}
                _ = work.cancel.cancelled() => {}
            }
        }
    }
    ran
}

/// How many members' checkpoints are written at once.
const CHECKPOINTS_IN_FLIGHT: usize = 32;

/// The longest a batch's erase step may take.
const MAX_BATCH_STEP: Duration = Duration::from_secs(60);

/// How long a batch's next erase step may take: ten times what its members' checkpoints
/// took, so that writing them stays under a tenth of the batch's time however many members
/// it has, and never less than the operator's checkpoint interval.
fn erase_step_time(interval: Duration, checkpoints_took: Duration) -> Duration {
    checkpoints_took
        .saturating_mul(10)
        .clamp(interval, MAX_BATCH_STEP.max(interval))
}

/// The claim a batch's steps wait for a job slot with: its most urgent member's.
fn earliest(live: &[Live]) -> Claim {
    let most_urgent = live
        .iter()
        .map(|l| &l.waiter.joining.claim)
        .min_by_key(|c| (c.deadline.is_none(), c.deadline.map(|d| d.0)));
    most_urgent.cloned().unwrap_or(Claim {
        owner: "batch".into(),
        deadline: None,
    })
}

async fn run_alone(alone: Waiter, work: &Work) {
    let job = SubjectJob {
        target: work.target.clone(),
        identifiers: alone.joining.member.identifiers.clone(),
        action: work.action,
    };
    let result = work
        .engine
        .subject_step(
            alone.joining.claim.clone(),
            &work.store_key,
            work.backend.as_ref(),
            &job,
            None,
            &work.cancel,
        )
        .await;
    let _ = alone.reply.send(Outcome::Alone(result));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{StoreKind, Timestamp};
    use crate::backends::{MemberStep, Step, StepBudget, SweepJob};
    use crate::leader::Fence;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Notify;

    /// A store that batches: each step gives every member one record and goes on from
    /// `"1"` to the end; it asks the gate before its commit, and logs who was in each step.
    #[derive(Default)]
    struct Scripted {
        /// The member ids of each batch step, in order.
        steps: Mutex<Vec<Vec<String>>>,
        /// The cursors the steps were given.
        cursors: Mutex<Vec<Option<String>>>,
        /// One-subject steps run.
        alone: AtomicUsize,
        /// When set, a step waits for it before answering.
        hold_step: Option<Arc<Notify>>,
        /// Fail the step after the first.
        fail_second: bool,
        /// Panic in the next batch step (then no more).
        panic_once: std::sync::atomic::AtomicBool,
    }

    #[async_trait]
    impl Backend for Scripted {
        fn kind(&self) -> StoreKind {
            StoreKind::Redis
        }
        async fn probe(&self) -> Result<String, backends::Error> {
            Ok("scripted".into())
        }
        async fn sweep_step(
            &self,
            _: &SweepJob,
            _: Option<&str>,
            _: &StepBudget,
        ) -> Result<Step, backends::Error> {
            Ok(Step::default())
        }
        async fn subject_step(
            &self,
            _: &SubjectJob,
            _: Option<&str>,
            _: &StepBudget,
        ) -> Result<SubjectStep, backends::Error> {
            self.alone.fetch_add(1, Ordering::SeqCst);
            Ok(SubjectStep {
                count: 7,
                ran: true,
                ..SubjectStep::default()
            })
        }
        fn batches(&self) -> bool {
            true
        }
        async fn batch_step(
            &self,
            job: &BatchJob,
            cursor: Option<&str>,
            _: &StepBudget,
        ) -> Result<BatchStep, backends::Error> {
            if let Some(gate) = &self.hold_step {
                gate.notified().await;
            }
            if self.panic_once.swap(false, Ordering::SeqCst) {
                panic!("a driver bug");
            }
            let ids = job.members.iter().map(|m| m.id.clone()).collect();
            self.steps.lock().unwrap().push(ids);
            self.cursors.lock().unwrap().push(cursor.map(String::from));
            let held = job.gate.held().await?;
            let next = match cursor {
                None => Next::Continue("1".into()),
                Some(_) => Next::Done,
            };
            let mut step = BatchStep::empty(job.members.len(), next);
            for (i, m) in step.members.iter_mut().enumerate() {
                if !held.contains(&i) {
                    *m = MemberStep {
                        count: 1,
                        ran: true,
                        ..MemberStep::default()
                    };
                }
            }
            step.held = held;
            if self.fail_second && cursor.is_some() {
                step.failure = Some(backends::Error::Unreachable("down".into()));
                step.next = Next::Continue("1".into());
            }
            Ok(step)
        }
    }

    struct Gate(bool);

    #[async_trait]
    impl MemberGate for Gate {
        async fn held(&self) -> Result<bool, backends::Error> {
            Ok(self.0)
        }
    }

    /// Records the cursors saved, and which steps had run when each was saved.
    struct Saved {
        backend: Arc<Scripted>,
        saved: Mutex<Vec<(String, usize)>>,
    }

    #[async_trait]
    impl MemberCheckpoint for Saved {
        async fn save(&self, cursor: &str) -> Result<(), Failure> {
            let steps = self.backend.steps.lock().unwrap().len();
            self.saved.lock().unwrap().push((cursor.to_string(), steps));
            Ok(())
        }
    }

    fn key(at: Option<&str>) -> BatchKey {
        BatchKey {
            store_key: "ns/store".into(),
            target: "ns/p/t".into(),
            action: SubjectAction::Erase,
            at: at.map(String::from),
        }
    }

    fn work(backend: Arc<Scripted>) -> Work {
        work_for(backend, SubjectAction::Erase)
    }

    fn work_for(backend: Arc<Scripted>, action: SubjectAction) -> Work {
        Work {
            engine: Arc::new(Engine::new(4, Duration::from_secs(60), Fence::default())),
            backend,
            store_key: "ns/store".into(),
            target: serde_json::from_value(serde_json::json!(
                {"name": "t", "store": "s", "redis": {"keyPattern": "k:*", "mode": "idle"}}
            ))
            .expect("a valid target"),
            action,
            cancel: CancellationToken::new(),
            redact: |e| e.failure(),
        }
    }

    fn joining(
        id: &str,
        held: bool,
        checkpoint: Arc<Saved>,
        resume: Option<MemberCursor>,
    ) -> Joining {
        Joining {
            member: BatchMember {
                id: id.into(),
                identifiers: [("userId".to_string(), format!("u-{id}"))].into(),
            },
            resume,
            claim: Claim::erasure("ns", id, None),
            gate: Arc::new(Gate(held)),
            checkpoint,
        }
    }

    fn saved(backend: &Arc<Scripted>) -> Arc<Saved> {
        Arc::new(Saved {
            backend: backend.clone(),
            saved: Mutex::new(Vec::new()),
        })
    }

    fn end(outcome: Outcome) -> MemberEnd {
        match outcome {
            Outcome::Batch(end) => end,
            Outcome::Alone(_) => panic!("ran alone"),
        }
    }

    #[tokio::test]
    async fn a_member_alone_runs_as_one_subject() {
        let backend = Arc::new(Scripted::default());
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let cp = saved(&backend);
        let outcome = batcher
            .join(
                key(None),
                joining("a", false, cp.clone(), None),
                work(backend.clone()),
            )
            .await;
        assert!(matches!(outcome, Outcome::Alone(Ok(ref s)) if s.count == 7));
        assert_eq!(backend.alone.load(Ordering::SeqCst), 1);
        assert!(backend.steps.lock().unwrap().is_empty());
    }

    /// A lone member that arrives soon after a batch of its key ended (requests trickling
    /// in) runs as a batch of one, inside the batch's turn, so that those arriving meanwhile
    /// wait for it and go together instead of each going alone; one that retries after its
    /// own lone batch, or with batching off, goes alone.
    #[tokio::test]
    async fn a_lone_member_right_after_a_batch_runs_as_a_batch_of_one() {
        let backend = Arc::new(Scripted::default());
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let cp = saved(&backend);
        let first = batcher
            .join(
                key(None),
                joining("a", false, cp.clone(), None),
                work(backend.clone()),
            )
            .await;
        assert!(
            matches!(first, Outcome::Alone(_)),
            "the first of an idle key goes alone"
        );
        let second = batcher
            .join(
                key(None),
                joining("b", false, cp.clone(), None),
                work(backend.clone()),
            )
            .await;
        assert_eq!(end(second).end, End::Done);
        assert_eq!(backend.alone.load(Ordering::SeqCst), 1);
        assert!(
            !backend.steps.lock().unwrap().is_empty(),
            "no batch step ran"
        );
        // Its own retry right after is no trickle: it goes alone, as a single request.
        let retry = batcher
            .join(
                key(None),
                joining("b", false, cp.clone(), None),
                work(backend.clone()),
            )
            .await;
        assert!(
            matches!(retry, Outcome::Alone(_)),
            "a retry did not go alone"
        );

        let one_at_a_time = Batcher::new(
            BatchSettings {
                max_members: 1,
                ..BatchSettings::default()
            },
            Default::default(),
        );
        for id in ["c", "d"] {
            let outcome = one_at_a_time
                .join(
                    key(None),
                    joining(id, false, cp.clone(), None),
                    work(backend.clone()),
                )
                .await;
            assert!(
                matches!(outcome, Outcome::Alone(_)),
                "{id} did not go alone"
            );
        }
    }

    /// Members that arrive while a batch runs form the next one, together; each member is
    /// checkpointed after the step that left work and before the next step ran; each gets
    /// its own totals.
    #[tokio::test]
    async fn late_arrivals_join_the_next_batch_and_every_member_is_checkpointed_between_steps() {
        let release = Arc::new(Notify::new());
        let backend = Arc::new(Scripted {
            hold_step: Some(release.clone()),
            ..Scripted::default()
        });
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let first = saved(&backend);
        // A batch resuming at "0" with two members runs (and waits in its first step).
        let resume = || {
            Some(MemberCursor {
                at: Some("0".into()),
                count: 5,
                ..Default::default()
            })
        };
        let running = {
            let (b, w1, w2) = (
                batcher.clone(),
                work(backend.clone()),
                work(backend.clone()),
            );
            let (c1, c2) = (first.clone(), first.clone());
            tokio::spawn(async move {
                tokio::join!(
                    b.join(key(Some("0")), joining("r1", false, c1, resume()), w1),
                    b.join(key(Some("0")), joining("r2", false, c2, resume()), w2),
                )
            })
        };
        // Let the first batch start with both.
        while backend.steps.lock().unwrap().is_empty() {
            release.notify_one();
            tokio::task::yield_now().await;
        }
        let late_saves = saved(&backend);
        let late = {
            let b = batcher.clone();
            let (w1, w2, c1, c2) = (
                work(backend.clone()),
                work(backend.clone()),
                late_saves.clone(),
                late_saves.clone(),
            );
            tokio::spawn(async move {
                tokio::join!(
                    b.join(key(Some("0")), joining("l1", false, c1, resume()), w1),
                    b.join(key(Some("0")), joining("l2", false, c2, resume()), w2),
                )
            })
        };
        loop {
            release.notify_one();
            tokio::task::yield_now().await;
            if running.is_finished() && late.is_finished() {
                break;
            }
        }
        let (r1, r2) = running.await.unwrap();
        let (l1, l2) = late.await.unwrap();
        for e in [r1, r2, l1, l2].map(end) {
            assert_eq!(e.end, End::Done);
            assert_eq!(e.count, 5 + 1, "its counts so far and the step's");
        }
        let steps = backend.steps.lock().unwrap().clone();
        assert_eq!(
            steps,
            vec![
                vec!["r1".to_string(), "r2".into()],
                vec!["l1".into(), "l2".into()]
            ]
        );
        assert!(backend.alone.load(Ordering::SeqCst) == 0);
        assert!(
            first.saved.lock().unwrap().is_empty(),
            "a last step leaves nothing to checkpoint"
        );
    }

    /// A fresh batch of three: the held member leaves after the step whose gate held it,
    /// with a cursor that starts it over and its counts; the others are checkpointed with
    /// the batch's position before the next step runs, and finish.
    #[tokio::test]
    async fn a_held_member_leaves_and_the_others_are_checkpointed_before_the_next_step() {
        let backend = Arc::new(Scripted::default());
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let cps: Vec<Arc<Saved>> = (0..3).map(|_| saved(&backend)).collect();
        // Queue all three before the batch can start: the first join starts it.
        let joins = ["a", "b", "c"].iter().zip(&cps).map(|(id, cp)| {
            batcher.join(
                key(None),
                joining(id, *id == "b", cp.clone(), None),
                work(backend.clone()),
            )
        });
        let ends: Vec<MemberEnd> = join_all(joins).await.into_iter().map(end).collect();
        let steps = backend.steps.lock().unwrap().clone();
        assert_eq!(steps[0], vec!["a".to_string(), "b".into(), "c".into()]);
        assert_eq!(
            steps[1],
            vec!["a".to_string(), "c".into()],
            "the held member left"
        );
        assert_eq!(ends[0].end, End::Done);
        assert_eq!(ends[0].count, 2);
        let restart = MemberCursor {
            at: None,
            count: 0,
            ..Default::default()
        }
        .encode();
        assert_eq!(ends[1].end, End::Held(restart));
        assert_eq!(ends[2].count, 2);
        for i in [0, 2] {
            let saves = cps[i].saved.lock().unwrap().clone();
            assert_eq!(saves.len(), 1);
            let (cursor, steps_then) = &saves[0];
            assert_eq!(
                *steps_then, 1,
                "saved after the first step, before the second"
            );
            assert_eq!(
                MemberCursor::decode(cursor),
                Some(MemberCursor {
                    at: Some("1".into()),
                    count: 1,
                    ..Default::default()
                })
            );
        }
        assert!(cps[1].saved.lock().unwrap().is_empty());
    }

    /// Finding only reads: its members are not written between steps (a position lost in a
    /// restart is read again), and each still ends with its own totals.
    #[tokio::test]
    async fn a_find_batch_writes_no_checkpoint_between_its_steps() {
        let backend = Arc::new(Scripted::default());
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let cps: Vec<Arc<Saved>> = (0..2).map(|_| saved(&backend)).collect();
        let find = BatchKey {
            action: SubjectAction::Find,
            ..key(None)
        };
        let joins = ["a", "b"].iter().zip(&cps).map(|(id, cp)| {
            batcher.join(
                find.clone(),
                joining(id, false, cp.clone(), None),
                work_for(backend.clone(), SubjectAction::Find),
            )
        });
        let ends: Vec<MemberEnd> = join_all(joins).await.into_iter().map(end).collect();
        assert_eq!(backend.steps.lock().unwrap().len(), 2, "two steps ran");
        for (end, cp) in ends.iter().zip(&cps) {
            assert_eq!(end.end, End::Done);
            assert_eq!(end.count, 2);
            assert!(cp.saved.lock().unwrap().is_empty());
        }
    }

    /// An erase step lasts ten times what the checkpoints after the one before took, within
    /// the operator's interval and a minute.
    #[test]
    fn erase_steps_grow_with_what_their_checkpoints_cost() {
        let interval = Duration::from_secs(2);
        assert_eq!(erase_step_time(interval, Duration::ZERO), interval);
        assert_eq!(
            erase_step_time(interval, Duration::from_millis(3_500)),
            Duration::from_secs(35)
        );
        assert_eq!(
            erase_step_time(interval, Duration::from_secs(3_600)),
            MAX_BATCH_STEP
        );
        let long = Duration::from_secs(120);
        assert_eq!(erase_step_time(long, Duration::from_secs(1)), long);
    }

    #[tokio::test]
    async fn a_failed_step_fails_every_member_at_the_batch_position() {
        let backend = Arc::new(Scripted {
            fail_second: true,
            ..Scripted::default()
        });
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let cp = saved(&backend);
        let joins = ["a", "b"].map(|id| {
            batcher.join(
                key(None),
                joining(id, false, cp.clone(), None),
                work(backend.clone()),
            )
        });
        for e in join_all(joins).await.into_iter().map(end) {
            match e.end {
                End::Failed {
                    failure,
                    cursor: Some(cursor),
                } => {
                    assert_eq!(failure.reason, "Unreachable");
                    assert_eq!(
                        MemberCursor::decode(&cursor).and_then(|c| c.at),
                        Some("1".into())
                    );
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(e.count, 2, "both steps' records are counted");
        }
    }

    #[tokio::test]
    async fn a_batch_takes_at_most_its_size_most_urgent_first() {
        let backend = Arc::new(Scripted::default());
        let settings = BatchSettings {
            max_members: 2,
            wait: Duration::ZERO,
        };
        let batcher = Batcher::new(settings, Default::default());
        let cp = saved(&backend);
        let resume = Some(MemberCursor {
            at: Some("0".into()),
            ..Default::default()
        });
        let mut urgent = joining("urgent", false, cp.clone(), resume.clone());
        urgent.claim.deadline = Some(Timestamp::now());
        let joins = vec![
            batcher.join(
                key(Some("0")),
                joining("x", false, cp.clone(), resume.clone()),
                work(backend.clone()),
            ),
            batcher.join(
                key(Some("0")),
                joining("y", false, cp.clone(), resume.clone()),
                work(backend.clone()),
            ),
            batcher.join(key(Some("0")), urgent, work(backend.clone())),
        ];
        join_all(joins).await;
        let steps = backend.steps.lock().unwrap().clone();
        assert!(steps.iter().all(|s| s.len() <= 2), "{steps:?}");
        assert_eq!(steps.iter().map(Vec::len).sum::<usize>(), 3);
        assert_eq!(steps[0][0], "urgent", "the nearest deadline goes first");
    }

    /// A batch that breaks off (a driver panics) answers its members with a failure they
    /// retry, and the next batch of its key still runs.
    #[tokio::test]
    async fn a_batch_that_panics_fails_its_members_and_the_next_batch_of_its_key_runs() {
        let backend = Arc::new(Scripted::default());
        backend.panic_once.store(true, Ordering::SeqCst);
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let cp = saved(&backend);
        let first = ["a", "b"].map(|id| {
            batcher.join(
                key(None),
                joining(id, false, cp.clone(), None),
                work(backend.clone()),
            )
        });
        for e in join_all(first).await.into_iter().map(end) {
            assert!(
                matches!(e.end, End::Failed { ref failure, cursor: None } if failure.reason == "BatchInterrupted"),
                "{e:?}"
            );
        }
        let next = ["c", "d"].map(|id| {
            batcher.join(
                key(None),
                joining(id, false, cp.clone(), None),
                work(backend.clone()),
            )
        });
        let ends = tokio::time::timeout(Duration::from_secs(10), join_all(next))
            .await
            .expect("the key's next batch runs");
        for e in ends.into_iter().map(end) {
            assert_eq!(e.end, End::Done);
            assert_eq!(e.count, 2);
        }
    }

    /// A member that starts over alone after a hold, with what it erased before, keeps
    /// those counts.
    #[tokio::test]
    async fn a_lone_member_starting_over_after_a_hold_keeps_its_counts() {
        let backend = Arc::new(Scripted::default());
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let restart = MemberCursor {
            at: None,
            count: 5,
            ..Default::default()
        };
        let outcome = batcher
            .join(
                key(None),
                joining("a", false, saved(&backend), Some(restart)),
                work(backend.clone()),
            )
            .await;
        let e = end(outcome);
        assert_eq!(e.end, End::Done);
        assert_eq!(e.count, 5 + 2, "its counts before the hold and both steps'");
    }

    /// A member held while verifying starts over with no count: what it had found
    /// remaining is found again on the next pass, and must not be counted twice.
    #[tokio::test]
    async fn a_member_held_while_verifying_starts_over_from_zero() {
        let backend = Arc::new(Scripted::default());
        let batcher = Batcher::new(BatchSettings::default(), Default::default());
        let resume = Some(MemberCursor {
            at: Some("0".into()),
            count: 3,
            ..Default::default()
        });
        let verify = || BatchKey {
            action: SubjectAction::Verify,
            ..key(Some("0"))
        };
        let cp = saved(&backend);
        let joins = [("a", false), ("b", true)].map(|(id, held)| {
            batcher.join(
                verify(),
                joining(id, held, cp.clone(), resume.clone()),
                work_for(backend.clone(), SubjectAction::Verify),
            )
        });
        let ends: Vec<MemberEnd> = join_all(joins).await.into_iter().map(end).collect();
        assert_eq!(ends[0].end, End::Done);
        match &ends[1].end {
            End::Held(cursor) => assert_eq!(
                MemberCursor::decode(cursor),
                Some(MemberCursor::default()),
                "a verification starts over from no count"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn member_cursors_round_trip_and_other_cursors_are_not_ones() {
        let c = MemberCursor {
            at: Some("v1:redis:{}".into()),
            count: 3,
            blocked: 1,
            malformed: 2,
        };
        let text = c.encode();
        assert!(MemberCursor::is_one(&text));
        assert_eq!(MemberCursor::decode(&text), Some(c));
        assert!(!MemberCursor::is_one("v1:redis:{}"));
        assert_eq!(MemberCursor::decode("batch:{not json"), None);
    }
}
