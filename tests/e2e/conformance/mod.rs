//! One conformance suite for every store driver: the `Backend` contract stated once, as
//! generic checks over a [`Fixture`] (a store instance that can make targets, seed data and
//! count what is left), instantiated for every driver against its real server by
//! [`conformance!`]. A new driver is done when `conformance!(kind, KindFixture);` passes.
//!
//! The clauses, one check each (every check also asserts the last one):
//! - [`locator_without_identifier_is_refused`]: a subject locator that names no identifier
//!   fails validation (`InvalidSpec`); the driver's ordinary target passes it.
//! - [`neighbours_are_never_touched`]: erasing user `Ab47` leaves `Ab4711` (suffix
//!   neighbour), `xAb47` (prefix neighbour), `ab47` and `AB47` (case variants of a
//!   case-sensitive identifier) and their e-mail neighbours (`x` + address, address + `x`)
//!   alone, and every other item of the store too.
//! - [`dry_run_counts_equal_real_counts`]: a dry run deletes nothing and counts what the real
//!   sweep then deletes.
//! - [`interrupted_sweep_counts_each_item_once`]: a sweep of a few hundred items with a zero
//!   time budget, resumed from each returned cursor by a fresh backend (as after a restart),
//!   deletes and counts every expired item exactly once and no young one.
//! - [`sweep_step_honours_budget`], [`sweep_step_honours_cancellation`],
//!   [`subject_step_honours_budget`], [`subject_step_honours_cancellation`]: a step with a
//!   zero budget or a cancelled token returns promptly without finishing the job, with a cursor
//!   from which the rest completes with exact counts.
//! - [`failed_step_keeps_its_cursor`]: a step that fails after the sweep started (leadership
//!   lost) returns a cursor, not `Done`, and deletes nothing; resuming from that cursor
//!   finishes the sweep with every item counted once.
//! - [`subject_step_checks_leadership`]: an erasing subject step of an instance that no longer
//!   leads fails with `LeadershipLost` and erases nothing (`StepBudget::may_act`, "checked
//!   right before every destructive batch"); resumed with a valid fence it erases all.
//! - [`verify_after_erase_finds_zero`]: verify before erase finds the subject's items, after
//!   erase 0, and a second erase erases 0.
//! - [`lost_sweep_step_is_counted`], [`lost_subject_step_is_counted`]: a step whose outcome is
//!   lost (the operator killed, or fenced out, after the store deleted and before the
//!   checkpoint: its counts and cursor thrown away, the job resumed from the previous cursor by
//!   a fresh backend) is counted by the steps that follow, once: the counts of the job equal
//!   what the store lost.
//! - The batch clauses (`batch.rs`): a batch of members counts each member's records
//!   exactly, leaves a member the hold gate names alone, and resumes exactly.
//! - No identifier in any message: every check passes each `Err`'s Display and Debug, every
//!   step's `failure`/`retrying`, `blocked_items`, `skipped`, cursors, the steps' and
//!   `SubjectJob`'s Debug through a [`Witness`] that fails the test if a probe value (the
//!   subject's or a neighbour's identifiers, in any case) shows up;
//!   [`no_identifier_in_any_message`] adds the paths that fail or skip (a lost fence, a
//!   missing identifier, identifiers full of query syntax, an invalid locator).
//!
//! Capabilities, as constants of the [`Fixture`]. Where a store legitimately cannot meet a
//! clause the check asserts a weaker documented property instead (never a silent skip):
//! - [`Fixture::EXACT_VERIFY_COUNT`] false (Loki: Verify looks for one line with `limit=1`):
//!   verify before erase must find at least 1, after erase exactly 0.
//! - [`Fixture::exact_dry_run`] false: the dry run's count must be at least what the real
//!   sweep deletes, never less. No driver needs it on the servers of this suite (the Loki
//!   double counts exactly; a real Loki deletes without counting).
//! - [`Fixture::defers_deletion`] (Loki, Elasticsearch: the store deletes by itself after a
//!   step submitted the deletion): a step without time or cancelled may return `Wait` (a
//!   deletion submitted, to be polled) instead of `Continue`; it must still return promptly
//!   and the counts stay exact.
//! - [`Fixture::many`]: S3 handles at least one ListObjectsV2 page (1000 keys) per step, so
//!   its budget checks use 1050 objects.
//!
//! Where a driver does not meet a clause yet, its `conformance!` line names the flag and
//! the macro instantiates that check `#[ignore]`d with the reason (a test checks the line and
//! the fixture's constant agree):
//! - `bounded_subject_steps: false` ([`Fixture::BOUNDED_SUBJECT_STEPS`]): its
//!   subject steps run to the end in one call.
//! - `fenced_subject_steps: false` (a bug): its erasing subject steps do not
//!   check the leadership fence before they act.
//! - `exact_lost_steps: false` ([`Fixture::EXACT_LOST_STEPS`], a bug): what a step whose
//!   outcome is lost deleted goes uncounted (no driver declares it now).
//!
//! Every test gets its own store instance (Redis server, moto, Loki double, memory store) or,
//! on the shared OpenSearch and Elasticsearch 7.17 nodes, its own indices.

pub mod batch;
pub mod elasticsearch;
pub mod loki;
pub mod memory;
pub mod redis;
pub mod s3;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use tombstone::api::retentionpolicy::Target;
use tombstone::backends::{
    Backend, Error, HeldSubjects, Next, Step, StepBudget, SubjectAction, SubjectJob, SubjectStep,
    SweepJob,
};
use tombstone::leader::Fence;

/// One data subject (or a neighbour of one): a case-sensitive user id and an e-mail address.
#[derive(Clone, Debug)]
pub struct Owner {
    pub user_id: String,
    pub email: String,
}

impl Owner {
    pub fn identifiers(&self) -> BTreeMap<String, String> {
        [("userId", &self.user_id), ("email", &self.email)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }
}

/// The subject of a test and its neighbours, unique per test.
pub struct Probe {
    pub subject: Owner,
    pub neighbours: Vec<Owner>,
}

impl Probe {
    pub fn new() -> Probe {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tag = format!(
            "{:x}{:x}{}",
            std::process::id(),
            nanos,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let email = format!("zq-conf-{tag}@example.org");
        let owner = |user_id: &str, email: String| Owner {
            user_id: user_id.to_string(),
            email,
        };
        Probe {
            subject: owner("Ab47", email.clone()),
            neighbours: vec![
                // Suffix neighbours together and prefix neighbours together, so that a
                // store matching all of a locator's fields at once (Elasticsearch terms)
                // is tested on each kind of neighbour too.
                owner("Ab4711", format!("{email}x")),
                owner("xAb47", format!("x{email}")),
                owner("ab47", format!("zq-conf-{tag}-ab@example.org")),
                owner("AB47", format!("zq-conf-{tag}-up@example.org")),
            ],
        }
    }

    /// Every identifier value of the test, lower-cased: none may appear in any message.
    fn values(&self) -> Vec<String> {
        std::iter::once(&self.subject)
            .chain(&self.neighbours)
            .flat_map(|o| [o.user_id.to_lowercase(), o.email.to_lowercase()])
            .collect()
    }
}

/// A store instance the suite can drive.
#[async_trait]
pub trait Fixture: Send + Sync + Sized + 'static {
    /// Starts a fresh instance (its own server, bucket, tenant, indices…).
    async fn start() -> Self;

    /// A new backend for this instance through the driver's public constructor: the suite
    /// makes one per step where it simulates a restart.
    fn backend(&self) -> Arc<dyn Backend>;

    /// The target of `dataset`: its retention selector and a subject locator that finds an
    /// owner's items by `{userId}` and (where the store's locator can) `{email}`.
    fn target(&self, dataset: &str) -> Target;

    /// `target(dataset)` with a subject locator that names no identifier.
    fn target_without_identifier(&self, dataset: &str) -> Target;

    /// The driver's pure validation of a target.
    fn validate(&self, target: &Target) -> Result<(), Error> {
        tombstone::backends::validate_target(self.backend().kind(), target)
    }

    /// Seeds `expired` items older than the returned cutoff and `young` items newer than it.
    async fn seed(&self, dataset: &str, expired: usize, young: usize) -> DateTime<Utc>;

    /// Seeds `n` items of `owner`; returns how many items a Find of that owner must count
    /// (the fixture may seed one item per identifier per `n`).
    async fn seed_owner(&self, dataset: &str, owner: &Owner, n: usize) -> u64;

    /// (expired, young) items of `dataset` still present (seeded by `seed`, judged by
    /// `cutoff`).
    async fn count(&self, dataset: &str, cutoff: DateTime<Utc>) -> (u64, u64);

    /// Items of `owner` still present.
    async fn count_owner(&self, dataset: &str, owner: &Owner) -> u64;

    /// Whether a dry run counts exactly what a real sweep deletes.
    fn exact_dry_run(&self) -> bool {
        true
    }

    /// Whether subject steps honour the time budget and the cancellation token. The
    /// instance's `conformance!` line must say `bounded_subject_steps: false` when this is
    /// false (a test checks they agree).
    const BOUNDED_SUBJECT_STEPS: bool = true;

    /// Whether an erasing subject step checks the leadership fence before it acts. False is
    /// a known bug of the driver (`fenced_subject_steps: false` in its `conformance!` line).
    const FENCED_SUBJECT_STEPS: bool = true;

    /// Whether a sweep step checks the leadership fence before it acts. False is a known bug
    /// (`fenced_sweep_steps: false`).
    const FENCED_SWEEP_STEPS: bool = true;

    /// Whether a sweep step with a cancelled token starts no new deletion. False is a known
    /// bug (`cancellable_sweep_steps: false`).
    const CANCELLABLE_SWEEP_STEPS: bool = true;

    /// Whether what a step whose outcome is lost deleted is counted by the steps that follow.
    /// False is a known bug (`exact_lost_steps: false`).
    const EXACT_LOST_STEPS: bool = true;

    /// Whether Verify counts every item still present; false: it only finds whether some
    /// remain (at least 1 while any does, 0 once none does).
    const EXACT_VERIFY_COUNT: bool = true;

    /// Whether the driver works many subjects in one pass (the `batch` clauses); one that
    /// does not must refuse batch steps.
    const BATCHES: bool = true;

    /// Whether the store runs deletions by itself after a step submitted them.
    fn defers_deletion(&self) -> bool {
        false
    }

    /// How long to wait before polling a deletion the store runs by itself.
    fn poll_interval(&self) -> Duration {
        Duration::from_millis(100)
    }

    /// The items of one tiny-budget check (a few hundred at most: the suite must stay fast).
    fn many(&self) -> usize {
        300
    }
}

/// Collects every message a driver returned; fails the test if one names a probe value.
pub struct Witness {
    values: Vec<String>,
    seen: Mutex<Vec<String>>,
}

impl Witness {
    pub fn new(probe: &Probe) -> Witness {
        Witness {
            values: probe.values(),
            seen: Mutex::new(Vec::new()),
        }
    }

    pub fn note(&self, message: impl Into<String>) {
        let message = message.into();
        let lower = message.to_lowercase();
        for v in &self.values {
            assert!(
                !lower.contains(v.as_str()),
                "an identifier value appears in a driver's message: {message}"
            );
        }
        self.seen.lock().expect("witness").push(message);
    }

    fn error(&self, e: &Error) {
        self.note(format!("{} [{}]", e, e.reason()));
        self.note(format!("{e:?}"));
    }

    fn next(&self, next: &Next) {
        match next {
            Next::Continue(c) | Next::Wait { cursor: c, .. } => self.note(c.clone()),
            Next::Done => {}
        }
    }

    fn step(&self, step: &Step) {
        for item in &step.blocked_items {
            self.note(item.clone());
        }
        for e in step.failure.iter().chain(&step.retrying) {
            self.error(e);
        }
        self.next(&step.next);
        self.note(format!("{step:?}"));
    }

    fn subject_step(&self, step: &SubjectStep) {
        for s in &step.skipped {
            self.note(s.clone());
        }
        if let Some(e) = &step.failure {
            self.error(e);
        }
        self.next(&step.next);
        self.note(format!("{step:?}"));
    }

    /// How many messages were checked (a check that saw none proves nothing).
    pub fn checked(&self) -> usize {
        self.seen.lock().expect("witness").len()
    }
}

pub fn budget(max_time: Duration) -> StepBudget {
    StepBudget {
        max_time,
        cancel: CancellationToken::new(),
        fence: leading(),
    }
}

/// A fence of an instance that leads.
pub fn leading() -> Fence {
    let fence = Fence::new(Duration::from_secs(10));
    fence.renewed(tokio::time::Instant::now());
    fence
}

/// A fence of an instance that no longer leads (its last renewal is past the deadline).
pub fn lost() -> Fence {
    let fence = Fence::new(Duration::from_secs(10));
    fence.renewed(tokio::time::Instant::now() - Duration::from_secs(11));
    fence
}

pub fn sweep_job(target: Target, cutoff: DateTime<Utc>, dry_run: bool) -> SweepJob {
    SweepJob {
        target,
        retention: "1s".parse().expect("a duration"),
        dry_run,
        cutoff,
        held: HeldSubjects::default(),
    }
}

pub fn subject_job(target: Target, owner: &Owner, action: SubjectAction) -> SubjectJob {
    SubjectJob {
        target,
        identifiers: owner.identifiers(),
        action,
    }
}

/// One sweep step, its messages witnessed.
pub async fn sweep_step<F: Fixture>(
    f: &F,
    w: &Witness,
    job: &SweepJob,
    cursor: Option<&str>,
    budget: &StepBudget,
) -> Result<Step, Error> {
    match f.backend().sweep_step(job, cursor, budget).await {
        Ok(step) => {
            w.step(&step);
            Ok(step)
        }
        Err(e) => {
            w.error(&e);
            Err(e)
        }
    }
}

/// One subject step, its messages witnessed.
pub async fn subject_step<F: Fixture>(
    f: &F,
    w: &Witness,
    job: &SubjectJob,
    cursor: Option<&str>,
    budget: &StepBudget,
) -> Result<SubjectStep, Error> {
    w.note(format!("{job:?}"));
    match f.backend().subject_step(job, cursor, budget).await {
        Ok(step) => {
            w.subject_step(&step);
            Ok(step)
        }
        Err(e) => {
            w.error(&e);
            Err(e)
        }
    }
}

/// What a sweep run to its end counted.
#[derive(Debug, Default)]
pub struct Sweep {
    pub deleted: u64,
    pub steps: usize,
    /// Steps that returned `Continue` (interrupted by the budget).
    pub continued: usize,
}

/// Runs a sweep from `cursor` to `Done`, each step by a fresh backend with `max_time`.
pub async fn sweep_to_end<F: Fixture>(
    f: &F,
    w: &Witness,
    job: &SweepJob,
    mut cursor: Option<String>,
    max_time: Duration,
) -> Sweep {
    let mut run = Sweep::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let step = sweep_step(f, w, job, cursor.as_deref(), &budget(max_time))
            .await
            .expect("a sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        run.steps += 1;
        run.deleted += step.deleted;
        match step.next {
            Next::Done => return run,
            Next::Continue(c) => {
                run.continued += 1;
                cursor = Some(c);
            }
            Next::Wait { cursor: c, .. } => {
                cursor = Some(c);
                tokio::time::sleep(f.poll_interval()).await;
            }
        }
    }
    panic!("the sweep did not finish within a minute ({run:?})");
}

/// Runs a subject action from `cursor` to `Done`; returns the sum of counts (Find, Erase)
/// or the last count (Verify), and the steps taken.
pub async fn subject_to_end<F: Fixture>(
    f: &F,
    w: &Witness,
    job: &SubjectJob,
    mut cursor: Option<String>,
    max_time: Duration,
) -> (u64, usize) {
    let (mut count, mut steps) = (0, 0);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let step = subject_step(f, w, job, cursor.as_deref(), &budget(max_time))
            .await
            .expect("a subject step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        assert!(step.ran, "the locator ran");
        steps += 1;
        count = match job.action {
            SubjectAction::Verify => step.count,
            _ => count + step.count,
        };
        match step.next {
            Next::Done => return (count, steps),
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor: c, .. } => {
                cursor = Some(c);
                tokio::time::sleep(f.poll_interval()).await;
            }
        }
    }
    panic!("the subject action did not finish within a minute");
}

pub(crate) const ENOUGH: Duration = Duration::from_secs(30);

/// A step given no time, or cancelled, must come back about this soon.
const PROMPTLY: Duration = Duration::from_secs(10);

pub async fn locator_without_identifier_is_refused<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    f.validate(&f.target("people"))
        .expect("the driver's ordinary target is valid");
    let err = f
        .validate(&f.target_without_identifier("people"))
        .expect_err("a locator naming no identifier is refused");
    w.error(&err);
    assert_eq!(err.reason(), "InvalidSpec", "{err}");
    assert_eq!(
        err.category(),
        tombstone::api::common::ErrorCategory::InvalidSpec,
        "{err}"
    );
}

pub async fn neighbours_are_never_touched<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let cutoff = f.seed("people", 4, 4).await;
    let seeded = f.seed_owner("people", &probe.subject, 3).await;
    let mut neighbours = Vec::new();
    for n in &probe.neighbours {
        neighbours.push(f.seed_owner("people", n, 3).await);
    }
    let target = f.target("people");
    let find = subject_job(target.clone(), &probe.subject, SubjectAction::Find);
    assert_eq!(subject_to_end(f, &w, &find, None, ENOUGH).await.0, seeded);
    let erase = subject_job(target.clone(), &probe.subject, SubjectAction::Erase);
    assert_eq!(
        subject_to_end(f, &w, &erase, None, ENOUGH).await.0,
        seeded,
        "erased equals found"
    );
    assert_eq!(f.count_owner("people", &probe.subject).await, 0);
    for (n, expected) in probe.neighbours.iter().zip(neighbours) {
        assert_eq!(
            f.count_owner("people", n).await,
            expected,
            "a neighbour's items were touched ({n:?} of {:?})",
            probe.subject
        );
        let find = subject_job(target.clone(), n, SubjectAction::Find);
        assert_eq!(subject_to_end(f, &w, &find, None, ENOUGH).await.0, expected);
    }
    assert_eq!(
        f.count("people", cutoff).await,
        (4, 4),
        "items of no subject were touched"
    );
}

pub async fn dry_run_counts_equal_real_counts<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let cutoff = f.seed("events", 25, 10).await;
    let dry = sweep_job(f.target("events"), cutoff, true);
    let counted = sweep_to_end(f, &w, &dry, None, ENOUGH).await.deleted;
    assert_eq!(
        f.count("events", cutoff).await,
        (25, 10),
        "a dry run deletes nothing"
    );
    let real = sweep_job(f.target("events"), cutoff, false);
    let deleted = sweep_to_end(f, &w, &real, None, ENOUGH).await.deleted;
    assert_eq!(
        deleted, 25,
        "the real sweep deletes and counts every expired item"
    );
    if f.exact_dry_run() {
        assert_eq!(
            counted, deleted,
            "the dry run counts what the sweep deletes"
        );
    } else {
        assert!(
            counted >= deleted,
            "a dry run may overcount, never undercount"
        );
    }
    assert_eq!(f.count("events", cutoff).await, (0, 10));
    assert!(w.checked() > 0);
}

pub async fn interrupted_sweep_counts_each_item_once<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let many = f.many();
    let cutoff = f.seed("events", many, many / 3).await;
    let job = sweep_job(f.target("events"), cutoff, false);
    let mut cursor = None;
    let (mut deleted, mut steps, mut interrupted) = (0, 0, 0);
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the sweep did not finish ({steps} steps)"
        );
        // No time at all: every step is interrupted at its first boundary. After a step that
        // made no progress, a little time, so the sweep moves on.
        let max_time = if steps % 2 == 0 {
            Duration::ZERO
        } else {
            Duration::from_millis(5)
        };
        let step = sweep_step(f, &w, &job, cursor.as_deref(), &budget(max_time))
            .await
            .expect("a sweep step");
        assert!(step.failure.is_none(), "{:?}", step.failure);
        steps += 1;
        deleted += step.deleted;
        match step.next {
            Next::Done => break,
            Next::Continue(c) => {
                interrupted += 1;
                cursor = Some(c);
            }
            Next::Wait { cursor: c, .. } => {
                interrupted += 1;
                cursor = Some(c);
                tokio::time::sleep(f.poll_interval()).await;
            }
        }
    }
    assert!(interrupted > 0, "the sweep was never interrupted");
    assert_eq!(
        deleted, many as u64,
        "each expired item counted exactly once"
    );
    assert_eq!(f.count("events", cutoff).await, (0, (many / 3) as u64));
}

/// The operator dies (or is fenced out) after the store deleted in a step and before that
/// step's checkpoint: the step's counts and cursor are lost, and a fresh backend resumes from
/// the previous cursor. The step lost is the first after which the store has lost items or,
/// in a store that deletes by itself ([`Fixture::defers_deletion`]), the first that left a
/// deletion running there (`Wait`): the step that submitted it, whose cursor alone named it.
pub async fn lost_sweep_step_is_counted<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let many = f.many();
    let cutoff = f.seed("events", many, 5).await;
    let job = sweep_job(f.target("events"), cutoff, false);
    let (deleted, lost) = run_losing_a_step(f, &w, &Losing::Sweep(&job, cutoff), many as u64).await;
    assert_eq!(f.count("events", cutoff).await, (0, 5));
    assert_eq!(
        deleted, many as u64,
        "what the lost step deleted ({lost} items when it was lost) is counted once by the steps after it"
    );
}

/// [`lost_sweep_step_is_counted`] for an erasure.
pub async fn lost_subject_step_is_counted<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let seeded = f.seed_owner("people", &probe.subject, f.many()).await;
    let neighbour = &probe.neighbours[0];
    let theirs = f.seed_owner("people", neighbour, 3).await;
    let job = subject_job(f.target("people"), &probe.subject, SubjectAction::Erase);
    let (erased, lost) =
        run_losing_a_step(f, &w, &Losing::Erase(&job, &probe.subject), seeded).await;
    assert_eq!(f.count_owner("people", &probe.subject).await, 0);
    assert_eq!(f.count_owner("people", neighbour).await, theirs);
    assert_eq!(
        erased, seeded,
        "what the lost step erased ({lost} records when it was lost) is counted once by the steps after it"
    );
}

/// A job of the lost-step checks: a sweep of `events` (with its cutoff) or an erasure of
/// an owner in `people`.
enum Losing<'a> {
    Sweep(&'a SweepJob, DateTime<Utc>),
    Erase(&'a SubjectJob, &'a Owner),
}

impl Losing<'_> {
    /// One step with a tiny budget: what it counted and where it goes next.
    async fn step<F: Fixture>(&self, f: &F, w: &Witness, cursor: Option<&str>) -> (u64, Next) {
        let budget = budget(Duration::from_millis(5));
        match self {
            Losing::Sweep(job, _) => {
                let step = sweep_step(f, w, job, cursor, &budget)
                    .await
                    .expect("a sweep step");
                assert!(step.failure.is_none(), "{:?}", step.failure);
                (step.deleted, step.next)
            }
            Losing::Erase(job, _) => {
                let step = subject_step(f, w, job, cursor, &budget)
                    .await
                    .expect("a subject step");
                assert!(step.failure.is_none(), "{:?}", step.failure);
                assert!(step.ran, "the locator ran");
                (step.count, step.next)
            }
        }
    }

    /// The job's items still in the store.
    async fn left<F: Fixture>(&self, f: &F) -> u64 {
        match self {
            Losing::Sweep(_, cutoff) => f.count("events", *cutoff).await.0,
            Losing::Erase(_, owner) => f.count_owner("people", owner).await,
        }
    }
}

/// Runs `job` (over `before` items) to its end, losing one step as
/// [`lost_sweep_step_is_counted`] says; returns what the other steps counted and how many
/// items the store had lost when the step was lost.
async fn run_losing_a_step<F: Fixture>(
    f: &F,
    w: &Witness,
    job: &Losing<'_>,
    before: u64,
) -> (u64, u64) {
    let (mut cursor, mut counted, mut lost, mut steps) = (None::<String>, 0u64, None, 0);
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "the job did not finish ({steps} steps)"
        );
        steps += 1;
        let (count, next) = job.step(f, w, cursor.as_deref()).await;
        if lost.is_none() {
            let left = job.left(f).await;
            let submitted = f.defers_deletion() && matches!(next, Next::Wait { .. });
            if left < before || submitted {
                // Killed before the checkpoint: nothing of this step is kept.
                lost = Some(before.saturating_sub(left));
                continue;
            }
        }
        counted += count;
        match next {
            Next::Done => break,
            Next::Continue(c) => cursor = Some(c),
            Next::Wait { cursor: c, .. } => {
                cursor = Some(c);
                tokio::time::sleep(f.poll_interval()).await;
            }
        }
    }
    (counted, lost.expect("no step deleted anything"))
}

pub async fn sweep_step_honours_budget<F: Fixture>(f: &F) {
    sweep_step_stops_early(f, Duration::ZERO, false).await;
}

pub async fn sweep_step_honours_cancellation<F: Fixture>(f: &F) {
    sweep_step_stops_early(f, ENOUGH, true).await;
}

/// A first step with `max_time` (and its token cancelled before it starts, if `cancelled`).
async fn sweep_step_stops_early<F: Fixture>(f: &F, max_time: Duration, cancelled: bool) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let many = f.many();
    let cutoff = f.seed("events", many, 5).await;
    let job = sweep_job(f.target("events"), cutoff, false);
    // Made after seeding, so that the fence is fresh.
    let first = budget(max_time);
    if cancelled {
        first.cancel.cancel();
    }
    let started = Instant::now();
    let step = sweep_step(f, &w, &job, None, &first)
        .await
        .expect("a sweep step");
    let took = started.elapsed();
    assert!(took < PROMPTLY, "the step took {took:?}");
    assert!(step.failure.is_none(), "{:?}", step.failure);
    let cursor = match &step.next {
        Next::Continue(c) => c.clone(),
        Next::Wait { cursor, .. } if f.defers_deletion() => cursor.clone(),
        other => panic!("a step without time or cancelled finished the sweep: {other:?}"),
    };
    assert!(
        step.deleted < many as u64,
        "the step did all the work ({} deleted)",
        step.deleted
    );
    let rest = sweep_to_end(f, &w, &job, Some(cursor), ENOUGH).await;
    assert_eq!(
        step.deleted + rest.deleted,
        many as u64,
        "counts stay exact"
    );
    assert_eq!(f.count("events", cutoff).await, (0, 5));
}

pub async fn subject_step_honours_budget<F: Fixture>(f: &F) {
    subject_step_stops_early(f, Duration::ZERO, false).await;
}

pub async fn subject_step_honours_cancellation<F: Fixture>(f: &F) {
    subject_step_stops_early(f, ENOUGH, true).await;
}

/// A first step with `max_time` (and its token cancelled before it starts, if `cancelled`).
async fn subject_step_stops_early<F: Fixture>(f: &F, max_time: Duration, cancelled: bool) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let seeded = f.seed_owner("people", &probe.subject, f.many()).await;
    let neighbour = &probe.neighbours[0];
    let theirs = f.seed_owner("people", neighbour, 3).await;
    let job = subject_job(f.target("people"), &probe.subject, SubjectAction::Erase);
    let first = budget(max_time);
    if cancelled {
        first.cancel.cancel();
    }
    let started = Instant::now();
    let step = subject_step(f, &w, &job, None, &first)
        .await
        .expect("a subject step");
    let took = started.elapsed();
    assert!(took < PROMPTLY, "the step took {took:?}");
    assert!(step.failure.is_none(), "{:?}", step.failure);
    let cursor = match &step.next {
        Next::Continue(c) => c.clone(),
        Next::Wait { cursor, .. } if f.defers_deletion() => cursor.clone(),
        other => panic!("a step without time or cancelled finished the erasure: {other:?}"),
    };
    assert!(step.count < seeded, "the step did all the work");
    let (rest, _) = subject_to_end(f, &w, &job, Some(cursor), ENOUGH).await;
    assert_eq!(step.count + rest, seeded, "counts stay exact");
    assert_eq!(f.count_owner("people", &probe.subject).await, 0);
    assert_eq!(f.count_owner("people", neighbour).await, theirs);
}

pub async fn failed_step_keeps_its_cursor<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let many = f.many();
    let cutoff = f.seed("events", many, 5).await;
    let job = sweep_job(f.target("events"), cutoff, false);
    // Start the sweep (a step with no time returns a cursor before the end).
    let first = sweep_step(f, &w, &job, None, &budget(Duration::ZERO))
        .await
        .expect("a sweep step");
    assert!(first.failure.is_none(), "{:?}", first.failure);
    let cursor = match first.next {
        Next::Continue(c) | Next::Wait { cursor: c, .. } => c,
        Next::Done => panic!("a step with no time finished the sweep"),
    };
    // This instance stops leading: the next step fails before acting.
    let failing = StepBudget {
        max_time: ENOUGH,
        cancel: CancellationToken::new(),
        fence: lost(),
    };
    let (failed_deleted, resume) = match sweep_step(f, &w, &job, Some(&cursor), &failing).await {
        Err(e) => {
            assert_eq!(e.reason(), "LeadershipLost", "{e}");
            // Nothing returned: the caller keeps the cursor it had.
            (0, cursor.clone())
        }
        Ok(step) => {
            let failure = step
                .failure
                .as_ref()
                .expect("a step without leadership fails");
            assert_eq!(failure.reason(), "LeadershipLost", "{failure}");
            match &step.next {
                Next::Continue(c) | Next::Wait { cursor: c, .. } => (step.deleted, c.clone()),
                Next::Done => panic!("a failed step dropped its cursor (returned Done)"),
            }
        }
    };
    assert_eq!(failed_deleted, 0, "a step without leadership deleted items");
    let rest = sweep_to_end(f, &w, &job, Some(resume), ENOUGH).await;
    assert_eq!(
        first.deleted + failed_deleted + rest.deleted,
        many as u64,
        "resumed from the failed step's cursor, each item is counted once"
    );
    assert_eq!(f.count("events", cutoff).await, (0, 5));
}

pub async fn verify_after_erase_finds_zero<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let seeded = f.seed_owner("people", &probe.subject, 4).await;
    let target = f.target("people");
    let verify = subject_job(target.clone(), &probe.subject, SubjectAction::Verify);
    let before = subject_to_end(f, &w, &verify, None, ENOUGH).await.0;
    if F::EXACT_VERIFY_COUNT {
        assert_eq!(before, seeded, "verify counts what is still there");
    } else {
        assert!(before > 0, "verify finds that items remain");
    }
    let erase = subject_job(target.clone(), &probe.subject, SubjectAction::Erase);
    assert_eq!(subject_to_end(f, &w, &erase, None, ENOUGH).await.0, seeded);
    assert_eq!(subject_to_end(f, &w, &verify, None, ENOUGH).await.0, 0);
    assert_eq!(
        subject_to_end(f, &w, &erase, None, ENOUGH).await.0,
        0,
        "erasing again erases nothing"
    );
    assert_eq!(f.count_owner("people", &probe.subject).await, 0);
}

pub async fn no_identifier_in_any_message<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    f.seed_owner("people", &probe.subject, 2).await;
    let target = f.target("people");
    // Only the e-mail: locators needing {userId} are skipped, and say so without values.
    let mut email_only = subject_job(target.clone(), &probe.subject, SubjectAction::Find);
    email_only.identifiers.remove("userId");
    if let Ok(step) = subject_step(f, &w, &email_only, None, &budget(ENOUGH)).await {
        assert!(
            !step.skipped.is_empty() || step.ran,
            "a locator neither ran nor was reported skipped"
        );
    }
    // Identifiers with characters that mean something to a store's query language.
    let mut odd = probe.subject.clone();
    odd.user_id = format!("{}\"*?[|\\", odd.user_id);
    let job = subject_job(target.clone(), &odd, SubjectAction::Find);
    if let Ok(step) = subject_step(f, &w, &job, None, &budget(ENOUGH)).await {
        assert!(step.failure.is_none(), "{:?}", step.failure);
    }
    // Everything else went through the witness too; the subject's items are still there.
    let find = subject_job(target.clone(), &probe.subject, SubjectAction::Find);
    assert!(subject_to_end(f, &w, &find, None, ENOUGH).await.0 > 0);
    if let Err(e) = f.validate(&f.target_without_identifier("people")) {
        w.error(&e);
    }
    // Last, as a driver that ignores the fence erases here: a failure (if any) is witnessed.
    let erase = subject_job(target, &probe.subject, SubjectAction::Erase);
    let failing = StepBudget {
        max_time: ENOUGH,
        cancel: CancellationToken::new(),
        fence: lost(),
    };
    let _ = subject_step(f, &w, &erase, None, &failing).await;
    assert!(w.checked() >= 5, "{} messages checked", w.checked());
}

pub async fn subject_step_checks_leadership<F: Fixture>(f: &F) {
    let probe = Probe::new();
    let w = Witness::new(&probe);
    let seeded = f.seed_owner("people", &probe.subject, 3).await;
    let erase = subject_job(f.target("people"), &probe.subject, SubjectAction::Erase);
    let failing = StepBudget {
        max_time: ENOUGH,
        cancel: CancellationToken::new(),
        fence: lost(),
    };
    let resume = match subject_step(f, &w, &erase, None, &failing).await {
        Err(e) => {
            assert_eq!(e.reason(), "LeadershipLost", "{e}");
            None
        }
        Ok(step) => {
            let failure = step.failure.as_ref().map(|e| e.reason());
            assert_eq!(
                failure,
                Some("LeadershipLost"),
                "an erasure without leadership fails"
            );
            assert_eq!(step.count, 0, "nothing is erased without leadership");
            match step.next {
                Next::Continue(c) | Next::Wait { cursor: c, .. } => Some(c),
                Next::Done => None,
            }
        }
    };
    assert_eq!(
        f.count_owner("people", &probe.subject).await,
        seeded,
        "a step without leadership erased items"
    );
    let (erased, _) = subject_to_end(f, &w, &erase, resume, ENOUGH).await;
    assert_eq!(erased, seeded);
    assert_eq!(f.count_owner("people", &probe.subject).await, 0);
}

/// Instantiates every check as a `#[tokio::test]` for one fixture, in a module `$name`.
/// Flags (`bounded_subject_steps`, `fenced_subject_steps`, `fenced_sweep_steps`,
/// `cancellable_sweep_steps`, `exact_lost_steps`, each `: false`, in that order) mark the checks of a capability
/// the driver lacks `#[ignore]`d with the reason; a test checks they match the fixture's
/// constants.
#[macro_export]
macro_rules! conformance {
    ($name:ident, $fixture:ident $(, $flag:ident: false)*) => {
        $crate::conformance!(@munch $name, $fixture, [] [] [] [] [], $($flag)*);
    };
    (@munch $name:ident, $f:ident, [] [$($b:meta)?] [$($c:meta)?] [$($d:meta)?] [$($e:meta)?],
        bounded_subject_steps $($rest:ident)*) => {
        $crate::conformance!(@munch $name, $f,
            [ignore = "subject steps are bounded once bounded-subject-steps lands"]
            [$($b)?] [$($c)?] [$($d)?] [$($e)?], $($rest)*);
    };
    (@munch $name:ident, $f:ident, [$($a:meta)?] [] [$($c:meta)?] [$($d:meta)?] [$($e:meta)?],
        fenced_subject_steps $($rest:ident)*) => {
        $crate::conformance!(@munch $name, $f, [$($a)?]
            [ignore = "known bug: the driver's subject step erases without checking the leadership fence"]
            [$($c)?] [$($d)?] [$($e)?], $($rest)*);
    };
    (@munch $name:ident, $f:ident, [$($a:meta)?] [$($b:meta)?] [] [$($d:meta)?] [$($e:meta)?],
        fenced_sweep_steps $($rest:ident)*) => {
        $crate::conformance!(@munch $name, $f, [$($a)?] [$($b)?]
            [ignore = "known bug: the driver's sweep submits its deletion without checking the leadership fence"]
            [$($d)?] [$($e)?], $($rest)*);
    };
    (@munch $name:ident, $f:ident, [$($a:meta)?] [$($b:meta)?] [$($c:meta)?] [] [$($e:meta)?],
        cancellable_sweep_steps $($rest:ident)*) => {
        $crate::conformance!(@munch $name, $f, [$($a)?] [$($b)?] [$($c)?]
            [ignore = "known bug: a cancelled sweep step still submits its deletion and waits for it"]
            [$($e)?], $($rest)*);
    };
    (@munch $name:ident, $f:ident, [$($a:meta)?] [$($b:meta)?] [$($c:meta)?] [$($d:meta)?] [],
        exact_lost_steps $($rest:ident)*) => {
        $crate::conformance!(@munch $name, $f, [$($a)?] [$($b)?] [$($c)?] [$($d)?]
            [ignore = "known bug: what a step whose outcome is lost deleted goes uncounted"],
            $($rest)*);
    };
    (@munch $name:ident, $fixture:ident, [$($unbounded:meta)?] [$($unfenced:meta)?]
        [$($sweep_unfenced:meta)?] [$($uncancellable:meta)?] [$($uncounted:meta)?], ) => {
        mod $name {
            use $crate::conformance::Fixture;
            type F = super::$fixture;

            #[tokio::test]
            async fn locator_without_identifier_is_refused() {
                $crate::conformance::locator_without_identifier_is_refused(&F::start().await).await;
            }
            #[tokio::test]
            async fn neighbours_are_never_touched() {
                $crate::conformance::neighbours_are_never_touched(&F::start().await).await;
            }
            #[tokio::test]
            async fn dry_run_counts_equal_real_counts() {
                $crate::conformance::dry_run_counts_equal_real_counts(&F::start().await).await;
            }
            #[tokio::test]
            async fn interrupted_sweep_counts_each_item_once() {
                $crate::conformance::interrupted_sweep_counts_each_item_once(&F::start().await)
                    .await;
            }
            #[tokio::test]
            async fn sweep_step_honours_budget() {
                $crate::conformance::sweep_step_honours_budget(&F::start().await).await;
            }
            #[tokio::test]
            $(#[$uncancellable])?
            async fn sweep_step_honours_cancellation() {
                $crate::conformance::sweep_step_honours_cancellation(&F::start().await).await;
            }
            #[tokio::test]
            $(#[$unbounded])?
            async fn subject_step_honours_budget() {
                $crate::conformance::subject_step_honours_budget(&F::start().await).await;
            }
            #[tokio::test]
            $(#[$unbounded])?
            async fn subject_step_honours_cancellation() {
                $crate::conformance::subject_step_honours_cancellation(&F::start().await).await;
            }
            #[tokio::test]
            $(#[$unfenced])?
            async fn subject_step_checks_leadership() {
                $crate::conformance::subject_step_checks_leadership(&F::start().await).await;
            }
            #[tokio::test]
            $(#[$sweep_unfenced])?
            async fn failed_step_keeps_its_cursor() {
                $crate::conformance::failed_step_keeps_its_cursor(&F::start().await).await;
            }
            #[tokio::test]
            $(#[$uncounted])?
            async fn lost_sweep_step_is_counted() {
                $crate::conformance::lost_sweep_step_is_counted(&F::start().await).await;
            }
            #[tokio::test]
            $(#[$uncounted])?
            async fn lost_subject_step_is_counted() {
                $crate::conformance::lost_subject_step_is_counted(&F::start().await).await;
            }
            #[tokio::test]
            async fn verify_after_erase_finds_zero() {
                $crate::conformance::verify_after_erase_finds_zero(&F::start().await).await;
            }
            #[tokio::test]
            async fn batch_counts_each_member() {
                $crate::conformance::batch::batch_counts_each_member(&F::start().await).await;
            }
            #[tokio::test]
            async fn batch_leaves_a_held_member() {
                $crate::conformance::batch::batch_leaves_a_held_member(&F::start().await).await;
            }
            #[tokio::test]
            async fn batch_resumes_exactly() {
                $crate::conformance::batch::batch_resumes_exactly(&F::start().await).await;
            }
            #[tokio::test]
            async fn no_identifier_in_any_message() {
                $crate::conformance::no_identifier_in_any_message(&F::start().await).await;
            }
            #[test]
            fn the_ignored_checks_are_the_declared_capabilities() {
                let declared = [
                    <F as Fixture>::BOUNDED_SUBJECT_STEPS,
                    <F as Fixture>::FENCED_SUBJECT_STEPS,
                    <F as Fixture>::FENCED_SWEEP_STEPS,
                    <F as Fixture>::CANCELLABLE_SWEEP_STEPS,
                    <F as Fixture>::EXACT_LOST_STEPS,
                ];
                let ignored = [
                    stringify!($($unbounded)?),
                    stringify!($($unfenced)?),
                    stringify!($($sweep_unfenced)?),
                    stringify!($($uncancellable)?),
                    stringify!($($uncounted)?),
                ];
                for (capable, ignore) in declared.iter().zip(ignored) {
                    assert_eq!(
                        *capable,
                        ignore.is_empty(),
                        "the fixture's capabilities and its conformance! line disagree"
                    );
                }
            }
        }
    };
}
