//! Pure planning and status computation for retention sweeps: what to do now, how one step's
//! result changes the status, and which conditions the status implies. No I/O here.

use crate::api::common::{merge_conditions, DesiredCondition};
use crate::api::common::{MAX_INTERVAL, MAX_RETENTION};
use crate::api::legalhold::{HeldSubject, LegalHold};
use crate::api::retentionpolicy::{
    CurrentSweep, LastSweep, RetentionPolicy, RetentionPolicyStatus, SweepOutcome, TargetPhase,
    TargetStatus,
};
use crate::api::retentionpolicy::{RetentionPolicySpec, Target};
use crate::api::{StoreKind, Timestamp};
use crate::backends::{self, Category, Failure, HeldSubjects, Next, Step};
use crate::schedule;
use kube::ResourceExt;
use std::collections::BTreeMap;

/// Why a target cannot run now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub reason: &'static str,
    pub message: String,
    /// `Transient`: expected to clear by itself soon (the store has not been probed yet).
    pub category: Category,
}

impl Problem {
    pub fn failure(&self) -> Failure {
        Failure::new(self.category, self.reason, self.message.clone())
    }
}

/// Consecutive failed attempts (see [`apply_attempt`]) after which a `Transient` failure
/// fails its target for this sweep instead of being retried again.
pub const TRANSIENT_ATTEMPTS: u32 = 5;

/// What a sweep does about a target's failure: decided here, from its category alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Retry the step with back-off, resuming from the cursor: the target keeps sweeping.
    Retry,
    /// The target fails for this sweep; when `retry_sweep`, the next sweep comes early
    /// (someone may fix it where the operator cannot see), otherwise on schedule or when the
    /// spec changes.
    Fail { retry_sweep: bool },
    /// The target fails and waits for a person: no early sweep; `Degraded` says
    /// `NeedsAttention`.
    Wait,
}

/// The decision for a failure of `category` on its `attempt`-th consecutive try (pure).
pub fn on_failure(category: Category, attempt: u32) -> OnFailure {
    match category {
        Category::Transient if attempt < TRANSIENT_ATTEMPTS => OnFailure::Retry,
        Category::Transient | Category::Refused => OnFailure::Fail { retry_sweep: true },
        Category::InvalidSpec => OnFailure::Fail { retry_sweep: false },
        Category::NeedsAttention => OnFailure::Wait,
    }
}

/// Whether a target is retrying a failed step (it keeps sweeping, with back-off).
pub fn retrying(target: &TargetStatus) -> bool {
    target.phase == TargetPhase::Sweeping && target.failure_category.is_some()
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The spec cannot run (e.g. an unparseable cron); nothing is swept.
    Invalid(String),
    Suspended,
    /// Nothing to do until then.
    Wait(Timestamp),
    /// Start a new sweep now.
    Start,
    /// Run the next step of the sweep under way.
    Continue,
    /// A LegalHold holds the policy: nothing is swept; a sweep under way pauses.
    Held,
}

/// The names of the LegalHolds in force that hold `policy` (sorted), and the earliest time
/// one of them expires.
pub fn holds_on(
    policy: &str,
    holds: &[LegalHold],
    now: Timestamp,
) -> (Vec<String>, Option<Timestamp>) {
    let mut names = Vec::new();
    let mut earliest: Option<Timestamp> = None;
    for hold in holds {
        let holds_it = hold
            .spec
            .policies
            .as_deref()
            .unwrap_or_default()
            .iter()
            .any(|p| p == policy);
        if holds_it && crate::controller::legalhold::is_active(hold, now) {
            names.push(hold.name_any());
            if let Some(expiry) = hold.spec.expires_at {
                earliest = Some(earliest.map_or(expiry, |e| e.min(expiry)));
            }
        }
    }
    names.sort();
    (names, earliest)
}

/// The subjects held by LegalHolds in force (in `holds`, any namespace's list): the name of
/// each hold with its subjects, and the earliest expiry among those holds. A hold on a
/// subject protects their data from sweeps of every policy of the namespace, as it blocks
/// their erasure.
pub fn subject_holds(
    holds: &[LegalHold],
    now: Timestamp,
) -> (Vec<(String, HeldSubject)>, Option<Timestamp>) {
    let mut out = Vec::new();
    let mut earliest: Option<Timestamp> = None;
    for hold in holds {
        let subjects = hold.spec.subjects.as_deref().unwrap_or_default();
        if subjects.is_empty() || !crate::controller::legalhold::is_active(hold, now) {
            continue;
        }
        out.extend(subjects.iter().map(|s| (hold.name_any(), s.clone())));
        if let Some(expiry) = hold.spec.expires_at {
            earliest = Some(earliest.map_or(expiry, |e| e.min(expiry)));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    (out, earliest)
}

/// Names the LegalHolds on subjects in force, with their generations (no identifier): what a
/// sweep runs under. None when there is none.
pub fn subject_holds_tag(holds: &[LegalHold], now: Timestamp) -> Option<String> {
    let mut tags: Vec<String> = holds
        .iter()
        .filter(|h| h.spec.subjects.as_ref().is_some_and(|s| !s.is_empty()))
        .filter(|h| crate::controller::legalhold::is_active(h, now))
        .map(|h| format!("{}/{}", h.name_any(), h.metadata.generation.unwrap_or(0)))
        .collect();
    tags.sort();
    (!tags.is_empty()).then(|| tags.join(","))
}

/// What the operator could learn of one subject a LegalHold in force holds.
#[derive(Clone, PartialEq)]
pub enum HeldSubjectRead {
    /// Identifiers read from the hold's Secret (type → value; in memory only).
    Identifiers(BTreeMap<String, String>),
    /// Named by digest only: a digest cannot be turned back into identifiers.
    DigestOnly { hold: String },
    /// The hold's Secret could not be read (missing, unreadable, not text): fail closed.
    Unreadable { hold: String, reason: String },
}

impl std::fmt::Debug for HeldSubjectRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeldSubjectRead::Identifiers(ids) => {
                write!(f, "Identifiers({:?})", ids.keys().collect::<Vec<_>>())
            }
            HeldSubjectRead::DigestOnly { hold } => write!(f, "DigestOnly({hold})"),
            HeldSubjectRead::Unreadable { hold, reason } => {
                write!(f, "Unreadable({hold}: {reason})")
            }
        }
    }
}

/// Why each target of the policy is held whole (None: it sweeps, leaving out the held
/// subjects' data), in spec order, and the held subjects' identifiers the sweep leaves out
/// (pure). A hold on the policy holds every target. A held subject the operator cannot read
/// (digest only, Secret unreadable) holds every target: no locator can leave out a subject
/// whose identifiers are unknown. Otherwise a target whose subject locator cannot express
/// every held subject ([`crate::backends::hold_exclusion`]) is held whole.
pub fn target_holds(
    policy: &RetentionPolicy,
    policy_holds: &[String],
    subjects: &[(String, HeldSubjectRead)],
) -> (Vec<Option<String>>, HeldSubjects) {
    let held = HeldSubjects(
        subjects
            .iter()
            .filter_map(|(_, r)| match r {
                HeldSubjectRead::Identifiers(ids) => Some(ids.clone()),
                _ => None,
            })
            .collect(),
    );
    let mut subject_hold_names: Vec<&str> = subjects.iter().map(|(h, _)| h.as_str()).collect();
    subject_hold_names.dedup();
    let blind = subjects.iter().find_map(|(_, r)| match r {
        HeldSubjectRead::Identifiers(_) => None,
        HeldSubjectRead::DigestOnly { hold } => Some(format!(
            "held whole by LegalHold {hold}: it names a subject by digest only, and a digest cannot be turned back into the identifiers a sweep needs to leave their data out (name the subject by secretRef to let the sweep run around them)"
        )),
        HeldSubjectRead::Unreadable { hold, reason } => Some(format!(
            "held whole by LegalHold {hold}: the Secret naming its subject cannot be read ({reason}), so the sweep cannot leave their data out"
        )),
    });
    let reasons = policy
        .spec
        .targets
        .iter()
        .map(|target| {
            if !policy_holds.is_empty() {
                return Some(format!("held by LegalHold {}", policy_holds.join(", ")));
            }
            if subjects.is_empty() {
                return None;
            }
            if let Some(why) = &blind {
                return Some(why.clone());
            }
            crate::backends::hold_exclusion(target, &held)
                .err()
                .map(|why| {
                    format!(
                        "held whole by LegalHold {}: {why}",
                        subject_hold_names.join(", ")
                    )
                })
        })
        .collect();
    (reasons, held)
}

/// Applies the holds (`reasons` in spec order, None: not held). A held target is paused: with
/// no sweep under way it is Held; during a sweep, so is every target the sweep has not
/// finished, which keeps its cursor and resumes when the hold is lifted. A target no longer
/// held resumes the sweep under way, or is idle again.
pub fn apply_holds(status: &mut RetentionPolicyStatus, reasons: &[Option<String>]) {
    let sweeping = status.current_sweep.is_some();
    for (target, reason) in status.targets.iter_mut().zip(reasons) {
        match reason {
            Some(message) => {
                if !sweeping
                    || target.phase == TargetPhase::Sweeping
                    || target.phase == TargetPhase::Held
                {
                    target.phase = TargetPhase::Held;
                    target.message = message.clone();
                    target.failure_category = None;
                }
            }
            None => release_target(target, sweeping),
        }
    }
}

/// Holds the targets: with no sweep under way all of them; during a sweep, those it has not
/// finished, which keep their cursors and resume when the hold is lifted.
pub fn hold_targets(status: &mut RetentionPolicyStatus, holds: &[String]) {
    let message = Some(format!("held by LegalHold {}", holds.join(", ")));
    let reasons = vec![message; status.targets.len()];
    apply_holds(status, &reasons);
}

/// Lifts a hold: paused targets resume the sweep under way, the others are idle again.
pub fn release_targets(status: &mut RetentionPolicyStatus) {
    let sweeping = status.current_sweep.is_some();
    for target in &mut status.targets {
        release_target(target, sweeping);
    }
}

fn release_target(target: &mut TargetStatus, sweeping: bool) {
    if target.phase == TargetPhase::Held {
        target.phase = if sweeping {
            TargetPhase::Sweeping
        } else {
            TargetPhase::Idle
        };
        target.message.clear();
    }
}

/// One reason a policy cannot run: the target it concerns (None: the whole policy) and a
/// message naming the field, never an identifier value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub target: Option<String>,
    pub message: String,
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// The store kind a target selects, from the one selector it has.
pub fn target_kind(target: &Target) -> Result<StoreKind, String> {
    crate::backends::registry::for_target(target).map(|d| d.kind())
}

/// Everything wrong with a spec (pure), checked before anything is swept or erased and
/// whatever the schema the object was stored under: the bounds of `retention` and
/// `schedule.every`, unique target names, and each target's selector and subject locators
/// (match-everything guards, identifiers bounded on both sides). Also used to keep the
/// targets of an invalid policy out of erasures.
pub fn validate(spec: &RetentionPolicySpec) -> Result<(), Vec<Invalid>> {
    let mut errors = Vec::new();
    let whole = |message: String| Invalid {
        target: None,
        message,
    };
    if let Err(m) = spec.retention.check("retention", MAX_RETENTION) {
        errors.push(whole(m));
    }
    if let Some(every) = spec.schedule.as_ref().and_then(|s| s.every) {
        if let Err(m) = every.check("schedule.every", MAX_INTERVAL) {
            errors.push(whole(m));
        }
    }
    if spec.targets.is_empty() {
        errors.push(whole("the policy has no targets".into()));
    }
    let mut seen = std::collections::BTreeSet::new();
    for target in &spec.targets {
        if !seen.insert(target.name.as_str()) {
            errors.push(Invalid {
                target: Some(target.name.clone()),
                message: format!(
                    "target name {} is used more than once; each target needs its own name",
                    target.name
                ),
            });
            continue;
        }
        let checked = crate::backends::registry::for_target(target)
            .and_then(|driver| driver.validate(target).map_err(|e| e.to_string()));
        if let Err(message) = checked {
            errors.push(Invalid {
                target: Some(target.name.clone()),
                message,
            });
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// The errors of [`validate`] as one message.
pub fn describe(errors: &[Invalid]) -> String {
    errors
        .iter()
        .map(|e| e.message.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// What to do now (pure): a function of the spec, the status written so far and the clock.
/// An invalid spec (see [`validate`]) is never swept.
pub fn decide(
    policy: &RetentionPolicy,
    schedule: &Result<schedule::Parsed, schedule::Error>,
    created: Timestamp,
    now: Timestamp,
) -> Decision {
    if let Err(errors) = validate(&policy.spec) {
        return Decision::Invalid(describe(&errors));
    }
    let schedule = match schedule {
        Ok(s) => s,
        Err(e) => return Decision::Invalid(e.to_string()),
    };
    if policy.spec.suspend {
        return Decision::Suspended;
    }
    let status = policy.status.clone().unwrap_or_default();
    let generation = policy.metadata.generation;
    let spec_changed =
        status.observed_generation.is_some() && status.observed_generation != generation;
    if let Some(current) = &status.current_sweep {
        // A sweep started under an older spec is restarted under the new one.
        return if current.generation == generation {
            Decision::Continue
        } else {
            Decision::Start
        };
    }
    if spec_changed && status.last_sweep.is_some() {
        return Decision::Start;
    }
    match status
        .next_sweep_time
        .or_else(|| schedule.next_after(status.last_sweep.as_ref().map(|l| l.start_time), created))
    {
        Some(due) if due > now => Decision::Wait(due),
        Some(_) => Decision::Start,
        None => Decision::Invalid("the schedule has no future occurrence".into()),
    }
}

/// The status a new sweep starts from: every target sweeping from the beginning, counts of
/// the last sweep cleared, totals kept.
pub fn begin_sweep(policy: &RetentionPolicy, now: Timestamp) -> RetentionPolicyStatus {
    let mut status = policy.status.clone().unwrap_or_default();
    status.targets = aligned_targets(policy, &status.targets)
        .into_iter()
        .map(|t| TargetStatus {
            phase: TargetPhase::Sweeping,
            scanned: 0,
            deleted: 0,
            blocked: 0,
            blocked_items: Vec::new(),
            held: 0,
            unjudged: 0,
            oldest_remaining: None,
            cursor: None,
            message: String::new(),
            failure_category: None,
            ..t
        })
        .collect();
    status.current_sweep = Some(CurrentSweep {
        start_time: now,
        dry_run: policy.spec.dry_run,
        generation: policy.metadata.generation,
        subject_holds: None,
    });
    status.next_sweep_time = None;
    status
}

/// One entry per target of the spec, in spec order, keeping what is known of each.
pub fn aligned_targets(policy: &RetentionPolicy, existing: &[TargetStatus]) -> Vec<TargetStatus> {
    policy
        .spec
        .targets
        .iter()
        .map(|t| {
            existing
                .iter()
                .find(|s| s.name == t.name)
                .cloned()
                .unwrap_or_else(|| TargetStatus {
                    name: t.name.clone(),
                    ..Default::default()
                })
        })
        .collect()
}

/// The finalizer a policy carries while a deletion of it must first stop what its stores
/// still run for it.
pub const FINALIZER: &str = "tombstone.dev/store-deletions";

/// Why the deletions a store runs for a policy are being stopped, for status and Events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopCause {
    /// A new sweep starts under a changed spec (retention, dryRun, selectors, subject holds).
    Restarted,
    Suspended,
    Invalid,
    Deleted,
}

impl StopCause {
    pub fn describe(self) -> &'static str {
        match self {
            StopCause::Restarted => "the sweep restarted under a changed spec",
            StopCause::Suspended => "the policy was suspended",
            StopCause::Invalid => "the policy's spec became invalid",
            StopCause::Deleted => "the policy was deleted",
        }
    }
}

/// The deletions stores still run for the sweep under way that `decision` stops (pure), by
/// target index with their cursors, and why: a sweep restarted under a new spec, a policy
/// suspended or made invalid. Held targets are left to the hold (their cursor resumes when
/// the hold lifts); a sweep that continues keeps its cursors.
pub fn deletions_to_stop(
    decision: &Decision,
    policy: &RetentionPolicy,
) -> Option<(StopCause, Vec<(usize, String)>)> {
    let cause = match decision {
        Decision::Start => StopCause::Restarted,
        Decision::Suspended => StopCause::Suspended,
        Decision::Invalid(_) => StopCause::Invalid,
        _ => return None,
    };
    // A sweep under way, or a target that failed with a deletion still named in its cursor.
    let previous = policy
        .status
        .as_ref()
        .filter(|s| s.current_sweep.is_some() || s.targets.iter().any(|t| t.cursor.is_some()))?;
    Some((cause, cursors(policy, previous)))
}

/// Every target's cursor in `status`, aligned with the spec (pure).
pub fn cursors(policy: &RetentionPolicy, status: &RetentionPolicyStatus) -> Vec<(usize, String)> {
    aligned_targets(policy, &status.targets)
        .into_iter()
        .enumerate()
        .filter_map(|(i, t)| t.cursor.map(|c| (i, c)))
        .collect()
}

/// What became of one deletion the operator asked a store to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopOutcome {
    Stopped(backends::Cancel),
    /// The store could not be asked (unreachable, refused): `reason: message`.
    Failed(String),
    /// The target's store is gone or cannot be used: `reason: message`.
    StoreGone(String),
}

/// A Kubernetes Event to publish: type Warning when true, reason, note.
pub type EventNote = (bool, &'static str, String);

/// Folds the outcomes of stopping deletions into the status (pure) and says which Events to
/// publish. A cancelled or finished deletion's cursor is dropped, so no later step adopts it;
/// one the store could not be asked about keeps its cursor while the sweep it belongs to is
/// paused (suspended, invalid), so that it is tried again. A deletion that could not be
/// stopped is never passed over in silence: the target's message and a Warning say so.
pub fn record_stops(
    status: &mut RetentionPolicyStatus,
    names: &[String],
    cause: StopCause,
    outcomes: &[(usize, StopOutcome)],
) -> Vec<EventNote> {
    let mut events = Vec::new();
    let why = cause.describe();
    for (i, outcome) in outcomes {
        let name = names.get(*i).map_or("?", String::as_str);
        let target = status.targets.get_mut(*i);
        let (drop_cursor, note): (bool, Option<EventNote>) = match outcome {
            StopOutcome::Stopped(backends::Cancel::Cancelled { deleted }) => (
                true,
                Some((
                    false,
                    "StoreDeletionCancelled",
                    format!("target {name}: cancelled the deletion the store was running ({deleted} deleted before it stopped): {why}"),
                )),
            ),
            StopOutcome::Stopped(backends::Cancel::Nothing) => (true, None),
            StopOutcome::Stopped(backends::Cancel::TooLate) => (
                true,
                Some((
                    true,
                    "StoreDeletionNotCancellable",
                    format!(
                        "target {name}: {why}, but the store's deletion under way was past the point where it can be cancelled (already processed or finished): what it covered is deleted"
                    ),
                )),
            ),
            StopOutcome::Failed(e) | StopOutcome::StoreGone(e) => (
                cause == StopCause::Deleted,
                Some((
                    true,
                    "StoreDeletionNotCancelled",
                    format!(
                        "target {name}: {why}, but the store's deletion under way could not be cancelled ({e}); it may still delete what the current spec keeps"
                    ),
                )),
            ),
        };
        if let Some(target) = target {
            let paused = matches!(cause, StopCause::Suspended | StopCause::Invalid);
            if drop_cursor || !paused {
                target.cursor = None;
            }
            if let StopOutcome::Stopped(backends::Cancel::Cancelled { deleted }) = outcome {
                // Deleted before it stopped, so counted: in the lifetime total, and in the
                // sweep's own count when the sweep is only paused (a restarted one is new).
                target.deleted_total = target.deleted_total.saturating_add(*deleted);
                if paused {
                    target.deleted = target.deleted.saturating_add(*deleted);
                }
            }
            if let Some((true, reason, message)) = &note {
                target.message = format!("{reason}: {message}");
            }
        }
        events.extend(note);
    }
    events
}

/// Whether a policy needs the finalizer (pure): one of its targets is on a store that runs
/// deletions by itself after a step returns (Loki delete requests, Elasticsearch tasks),
/// which must be cancelled when the policy is deleted. Judged by the selectors, before any
/// deletion is submitted, so none can run unknown to a finalizer.
pub fn needs_finalizer(policy: &RetentionPolicy) -> bool {
    policy
        .spec
        .targets
        .iter()
        .any(|t| crate::backends::registry::for_target(t).is_ok_and(|d| d.capabilities().cancel))
}

/// Whether a deleted policy may let go of its finalizer now (pure): every deletion has an
/// outcome other than a failure to reach the store, or it has tried for `patience` since the
/// deletion: a store that stays unreachable never blocks the deletion for longer.
pub fn may_release(
    outcomes: &[(usize, StopOutcome)],
    deleted_at: Timestamp,
    now: Timestamp,
    patience: std::time::Duration,
) -> bool {
    let waited = (now.0 - deleted_at.0).to_std().unwrap_or_default();
    waited >= patience
        || !outcomes
            .iter()
            .any(|(_, o)| matches!(o, StopOutcome::Failed(_)))
}

/// Refused items kept by name in a target's status.
const NAMED_BLOCKED_ITEMS: usize = 5;

/// What one step of one target came to.
#[derive(Debug)]
pub enum StepResult {
    Ran(Step),
    /// The target could not run at all (store missing, invalid selector, connection failed).
    Failed(Failure),
}

/// [`apply_attempt`] for a first attempt.
pub fn apply_step(target: &mut TargetStatus, result: StepResult, dry_run: bool, now: Timestamp) {
    apply_attempt(target, result, dry_run, now, 1)
}

/// Folds one step's result into the target's status. The counts and the cursor move together
/// in the same status write, which is what makes a resumed sweep count nothing twice. A
/// failure is handled as [`on_failure`] decides for its category on this `attempt` (the
/// consecutive tries of the policy's steps that failed, this one included).
pub fn apply_attempt(
    target: &mut TargetStatus,
    result: StepResult,
    dry_run: bool,
    now: Timestamp,
    attempt: u32,
) {
    match result {
        StepResult::Ran(step) => {
            target.scanned += step.scanned;
            target.deleted += step.deleted;
            target.blocked += step.blocked;
            target.held += step.held;
            target.unjudged += step.unjudged;
            if let Some(t) = step.oldest_remaining {
                let t = Timestamp::truncate(t);
                target.oldest_remaining =
                    Some(target.oldest_remaining.map_or(t, |o: Timestamp| o.min(t)));
            }
            for item in step.blocked_items {
                if target.blocked_items.len() < NAMED_BLOCKED_ITEMS {
                    target.blocked_items.push(item);
                }
            }
            if !dry_run {
                target.deleted_total += step.deleted;
            }
            let cursor = match step.next {
                Next::Continue(cursor) | Next::Wait { cursor, .. } => Some(cursor),
                Next::Done => None,
            };
            if let Some(failure) = step.failure {
                let failure = failure.failure();
                // A step that failed with nothing left to resume from cannot be retried
                // without counting its work twice: it fails.
                let decision = match cursor {
                    Some(_) => on_failure(failure.category, attempt),
                    None => on_failure(failure.category, u32::MAX),
                };
                if decision == OnFailure::Retry {
                    retry(target, &failure);
                } else {
                    fail(target, &failure, now);
                }
                // What the store may still run for it (a task, a write block of its own) stays
                // named: a retry resumes it, the next sweep cancels or lifts it instead of
                // orphaning it.
                target.cursor = cursor;
                return;
            }
            if target.failure_category.take().is_some() {
                // Recovered from a failure it was retrying.
                target.message.clear();
            }
            if let Some(setback) = step.retrying {
                target.message = format!("{}: {setback}", setback.reason());
            }
            match cursor {
                Some(cursor) => target.cursor = Some(cursor),
                None => {
                    target.phase = TargetPhase::Idle;
                    target.cursor = None;
                    target.last_sweep_time = Some(now);
                    target.message = summary(target, dry_run);
                }
            }
        }
        StepResult::Failed(failure) => match on_failure(failure.category, attempt) {
            // Nothing ran: the cursor stays where it was, and the retry resumes from it.
            OnFailure::Retry => retry(target, &failure),
            _ => {
                fail(target, &failure, now);
                target.cursor = None;
            }
        },
    }
}

fn retry(target: &mut TargetStatus, failure: &Failure) {
    target.failure_category = Some(failure.category);
    target.message = format!("{failure} (retried with back-off)");
}

fn fail(target: &mut TargetStatus, failure: &Failure, now: Timestamp) {
    target.phase = TargetPhase::Failed;
    target.failure_category = Some(failure.category);
    target.last_sweep_time = Some(now);
    target.message = failure.to_string();
}

fn summary(target: &TargetStatus, dry_run: bool) -> String {
    let verb = if dry_run { "would delete" } else { "deleted" };
    let mut s = format!("scanned {}, {verb} {}", target.scanned, target.deleted);
    if target.blocked > 0 {
        s.push_str(&format!(", {} blocked by the store", target.blocked));
        if !target.blocked_items.is_empty() {
            s.push_str(&format!(": {}", target.blocked_items.join(", ")));
        }
    }
    if target.held > 0 {
        s.push_str(&format!(
            ", {} kept for subjects a LegalHold holds",
            target.held
        ));
    }
    if target.unjudged > 0 {
        s.push_str(&format!(
            ", {} could not be judged (no readable timestamp) and were kept",
            target.unjudged
        ));
    }
    if let Some(oldest) = target.oldest_remaining {
        s.push_str(&format!(", oldest remaining from {oldest}"));
    }
    s
}

/// How many policies are Compliant, not, or not yet known (pure), for the gauges.
pub fn compliance_counts(policies: &[&RetentionPolicy]) -> Vec<(&'static str, i64)> {
    let status_of = |p: &RetentionPolicy| {
        p.status
            .as_ref()
            .and_then(|s| crate::api::common::find_condition(&s.conditions, "Compliant"))
            .map_or("Unknown", |c| match c.status {
                crate::api::ConditionStatus::True => "True",
                crate::api::ConditionStatus::False => "False",
                _ => "Unknown",
            })
    };
    ["True", "False", "Unknown"]
        .into_iter()
        .map(|want| {
            let n = policies.iter().filter(|p| status_of(p) == want).count();
            (want, n as i64)
        })
        .collect()
}

/// How many policies have gone more than twice their schedule without completing a sweep
/// (pure), for the gauge that alerts on it: counted from the last completed sweep, or from
/// the policy's creation before the first. Suspended, invalid and fully held policies do not
/// sweep on purpose and are not counted.
pub fn late_sweeps(policies: &[&RetentionPolicy], now: Timestamp) -> i64 {
    policies
        .iter()
        .filter(|p| !p.spec.suspend)
        .filter(|p| {
            let status = p.status.as_ref();
            let held = status.is_some_and(|s| {
                !s.targets.is_empty() && s.targets.iter().all(|t| t.phase == TargetPhase::Held)
            });
            let invalid = status.is_some_and(|s| {
                crate::api::common::find_condition(&s.conditions, "Ready").is_some_and(|c| {
                    c.status == crate::api::ConditionStatus::False && c.reason == "InvalidSpec"
                })
            });
            !held && !invalid
        })
        .filter(|p| {
            let Ok(schedule) = crate::schedule::parse(p.spec.schedule.as_ref()) else {
                return false;
            };
            let since = p
                .status
                .as_ref()
                .and_then(|s| s.last_sweep.as_ref())
                .map(|l| l.completion_time)
                .unwrap_or_else(|| super::super::creation_time(**p, now));
            let allowed = schedule.period_secs(now).saturating_mul(2);
            let elapsed = u64::try_from((now.0 - since.0).num_seconds()).unwrap_or(0);
            elapsed > allowed
        })
        .count() as i64
}

/// A sweep that just completed, for events and metrics.
#[derive(Clone, Debug, PartialEq)]
pub struct Completed {
    pub outcome: SweepOutcome,
    pub deleted: u64,
    pub seconds: f64,
}

/// Closes the sweep once no target is still sweeping. `retry_after_failure` bounds the wait
/// before the next sweep when this one failed.
pub fn finish_if_done(
    status: &mut RetentionPolicyStatus,
    schedule: &schedule::Parsed,
    created: Timestamp,
    now: Timestamp,
    retry_after_failure: std::time::Duration,
) -> Option<Completed> {
    let current = status.current_sweep.clone()?;
    if status
        .targets
        .iter()
        .any(|t| t.phase == TargetPhase::Sweeping)
    {
        return None;
    }
    let failed = status
        .targets
        .iter()
        .filter(|t| t.phase == TargetPhase::Failed)
        .count();
    let outcome = match failed {
        0 if current.dry_run => SweepOutcome::DryRun,
        0 => SweepOutcome::Succeeded,
        n if n == status.targets.len() => SweepOutcome::Failed,
        _ => SweepOutcome::PartiallyFailed,
    };
    let deleted = status.targets.iter().map(|t| t.deleted).sum();
    status.last_sweep = Some(LastSweep {
        start_time: current.start_time,
        completion_time: now,
        outcome,
        deleted,
        receipt: None,
    });
    status.current_sweep = None;
    let mut next = schedule.next_after(Some(current.start_time), created);
    let retry_sweep = status.targets.iter().any(|t| {
        t.phase == TargetPhase::Failed
            && on_failure(t.failure_category.unwrap_or(Category::Refused), u32::MAX)
                == (OnFailure::Fail { retry_sweep: true })
    });
    if retry_sweep {
        let retry = i64::try_from(retry_after_failure.as_secs())
            .ok()
            .and_then(chrono::Duration::try_seconds)
            .and_then(|d| now.0.checked_add_signed(d))
            .map(Timestamp);
        if let Some(retry) = retry {
            next = Some(next.map_or(retry, |n| n.min(retry)));
        }
    }
    status.next_sweep_time = next;
    Some(Completed {
        outcome,
        deleted,
        seconds: (now.0 - current.start_time.0).num_milliseconds().max(0) as f64 / 1000.0,
    })
}

/// The conditions the status implies (pure). `problems` are the targets that cannot run,
/// `invalid` an error in the spec itself.
pub fn conditions(
    policy: &RetentionPolicy,
    status: &RetentionPolicyStatus,
    invalid: Option<&str>,
    problems: &[(String, Problem)],
    period_secs: u64,
    now: Timestamp,
) -> Vec<crate::api::Condition> {
    let ready = match (invalid, problems.first()) {
        (Some(msg), _) => DesiredCondition::new("Ready", false, "InvalidSpec", msg),
        (None, Some((_, first))) => DesiredCondition::new(
            "Ready",
            false,
            first.reason,
            problems
                .iter()
                .map(|(t, p)| format!("target {t}: {}", p.message))
                .collect::<Vec<_>>()
                .join("; "),
        ),
        (None, None) => {
            let mut stores: Vec<&str> = policy
                .spec
                .targets
                .iter()
                .map(|t| t.store.as_str())
                .collect();
            stores.sort();
            stores.dedup();
            DesiredCondition::new(
                "Ready",
                true,
                "Valid",
                format!(
                    "{} targets on stores {}",
                    policy.spec.targets.len(),
                    stores.join(", ")
                ),
            )
        }
    };

    let failing: Vec<&TargetStatus> = status
        .targets
        .iter()
        .filter(|t| t.phase == TargetPhase::Failed)
        .collect();
    let attention = failing
        .iter()
        .any(|t| t.failure_category == Some(Category::NeedsAttention));
    let degraded = if failing.is_empty() {
        DesiredCondition::new("Degraded", false, "AllTargetsHealthy", "")
    } else {
        DesiredCondition::new(
            "Degraded",
            true,
            if attention {
                "NeedsAttention"
            } else {
                "TargetFailed"
            },
            failing
                .iter()
                .map(|t| format!("target {}: {}", t.name, t.message))
                .collect::<Vec<_>>()
                .join("; "),
        )
    };

    let compliant = compliance(policy, status, invalid, period_secs, now);
    let existing = policy
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    merge_conditions(
        existing,
        vec![ready, compliant, degraded],
        policy.metadata.generation,
        now,
    )
}

fn compliance(
    policy: &RetentionPolicy,
    status: &RetentionPolicyStatus,
    invalid: Option<&str>,
    period_secs: u64,
    now: Timestamp,
) -> DesiredCondition {
    const C: &str = "Compliant";
    if invalid.is_some() {
        return DesiredCondition::new(
            C,
            false,
            "InvalidSpec",
            "the policy cannot run; see the Ready condition",
        );
    }
    if policy.spec.suspend {
        return DesiredCondition::unknown(
            C,
            "Suspended",
            "sweeps are suspended; expired data is not being deleted",
        );
    }
    if !status.targets.is_empty() && status.targets.iter().all(|t| t.phase == TargetPhase::Held) {
        // Keeping data a legal obligation or claim requires is lawful (Art. 17(3)).
        return DesiredCondition::new(
            C,
            true,
            "LegalHold",
            format!(
                "{}; data older than {} is kept lawfully (Art. 17(3))",
                status.targets[0].message, policy.spec.retention
            ),
        );
    }
    let Some(last) = &status.last_sweep else {
        return DesiredCondition::unknown(C, "NotYetSwept", "no sweep has completed yet");
    };
    // Overdue: the next sweep should have started more than one period (at least 5m) ago.
    let grace = i64::try_from(period_secs.max(300))
        .ok()
        .and_then(chrono::Duration::try_seconds)
        .unwrap_or(chrono::Duration::MAX);
    if let Some(next) = status.next_sweep_time {
        let overdue_at = next.0.checked_add_signed(grace);
        if status.current_sweep.is_none() && overdue_at.is_some_and(|t| now.0 > t) {
            return DesiredCondition::new(
                C,
                false,
                "SweepOverdue",
                format!("the sweep due at {next} has not run"),
            );
        }
    }
    let blocked: u64 = status.targets.iter().map(|t| t.blocked).sum();
    let unjudged: Vec<String> = status
        .targets
        .iter()
        .filter(|t| t.unjudged > 0)
        .map(|t| format!("{} in target {}", t.unjudged, t.name))
        .collect();
    let held: Vec<&str> = status
        .targets
        .iter()
        .filter(|t| t.phase == TargetPhase::Held || t.held > 0)
        .map(|t| t.name.as_str())
        .collect();
    match last.outcome {
        SweepOutcome::Failed | SweepOutcome::PartiallyFailed => DesiredCondition::new(
            C,
            false,
            "SweepFailed",
            format!(
                "the last sweep {}; see the Degraded condition",
                last.outcome.as_str()
            ),
        ),
        _ if blocked > 0 => DesiredCondition::new(
            C,
            false,
            "ItemsBlocked",
            format!(
                "{blocked} items older than {} could not be deleted",
                policy.spec.retention
            ),
        ),
        // Measured, not inferred: what the sweep could not judge may be older than allowed.
        _ if !unjudged.is_empty() => DesiredCondition::new(
            C,
            false,
            "ItemsUnjudged",
            format!(
                "items without a readable timestamp were kept and may be older than {}: {}",
                policy.spec.retention,
                unjudged.join(", ")
            ),
        ),
        SweepOutcome::DryRun if last.deleted > 0 => DesiredCondition::new(
            C,
            false,
            "DryRun",
            format!(
                "dry run: {} items older than {} would be deleted",
                last.deleted, policy.spec.retention
            ),
        ),
        SweepOutcome::DryRun => DesiredCondition::new(
            C,
            true,
            "NothingExpired",
            "dry run found nothing older than the retention period",
        ),
        // Keeping what a legal obligation or claim requires is lawful (Art. 17(3)).
        SweepOutcome::Succeeded if !held.is_empty() => DesiredCondition::new(
            C,
            true,
            "LegalHold",
            format!(
                "nothing older than {} remains as of {} except what LegalHolds keep (targets {}; Art. 17(3))",
                policy.spec.retention,
                last.start_time,
                held.join(", ")
            ),
        ),
        SweepOutcome::Succeeded => DesiredCondition::new(
            C,
            true,
            "SweepSucceeded",
            format!(
                "nothing older than {} remains as of {}",
                policy.spec.retention, last.start_time
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::common::ConditionStatus;
    use crate::api::retentionpolicy::{
        LegalBasis, RedisMode, RedisTarget, RetentionPolicySpec, Schedule, Target,
    };
    use crate::backends;
    use chrono::{DateTime, Utc};

    fn ts(s: &str) -> Timestamp {
        Timestamp(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
    }

    fn target(name: &str) -> Target {
        Target {
            name: name.into(),
            store: "cache".into(),
            selector: Some(crate::api::retentionpolicy::Selector::Redis(RedisTarget {
                key_pattern: format!("{name}:*"),
                mode: RedisMode::Idle,
                timestamp_field: None,
            })),
            subject: None,
            allow_match_all: false,
        }
    }

    fn policy(targets: &[&str]) -> RetentionPolicy {
        let mut p = RetentionPolicy::new(
            "sessions",
            RetentionPolicySpec {
                description: None,
                purpose: "p".into(),
                legal_basis: LegalBasis::Contract,
                data_subjects: vec![],
                data_categories: vec![],
                retention: "30d".parse().unwrap(),
                schedule: Some(Schedule {
                    every: Some("1h".parse().unwrap()),
                    cron: None,
                }),
                suspend: false,
                dry_run: false,
                targets: targets.iter().map(|t| target(t)).collect(),
            },
        );
        p.metadata.generation = Some(1);
        p
    }

    fn sched(p: &RetentionPolicy) -> Result<schedule::Parsed, schedule::Error> {
        schedule::parse(p.spec.schedule.as_ref())
    }

    fn step(scanned: u64, deleted: u64, next: Next) -> StepResult {
        StepResult::Ran(Step {
            scanned,
            deleted,
            next,
            ..Step::default()
        })
    }

    const T0: &str = "2026-11-20T09:00:00Z";

    #[test]
    fn compliance_is_counted_per_condition_status_and_unknown_without_one() {
        let with = |status: Option<ConditionStatus>| {
            let mut p = policy(&["a"]);
            if let Some(status) = status {
                p.status = Some(RetentionPolicyStatus {
                    conditions: vec![crate::api::Condition {
                        type_: "Compliant".into(),
                        status,
                        reason: "R".into(),
                        message: String::new(),
                        last_transition_time: ts(T0),
                        observed_generation: None,
                    }],
                    ..Default::default()
                });
            }
            p
        };
        let policies = [
            with(Some(ConditionStatus::True)),
            with(Some(ConditionStatus::False)),
            with(Some(ConditionStatus::False)),
            with(None),
        ];
        let refs: Vec<&RetentionPolicy> = policies.iter().collect();
        assert_eq!(
            compliance_counts(&refs),
            vec![("True", 1), ("False", 2), ("Unknown", 1)]
        );
    }

    #[test]
    fn a_sweep_is_late_past_twice_its_schedule_unless_the_policy_is_not_meant_to_sweep() {
        let now = ts("2026-11-20T12:00:00Z");
        let created = |p: &mut RetentionPolicy, at: &str| {
            p.metadata.creation_timestamp = Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at.parse().unwrap()),
            );
        };
        let swept = |completed: &str| {
            let mut p = policy(&["a"]);
            created(&mut p, "2026-11-01T00:00:00Z");
            p.status = Some(RetentionPolicyStatus {
                last_sweep: Some(crate::api::retentionpolicy::LastSweep {
                    start_time: ts(completed),
                    completion_time: ts(completed),
                    outcome: SweepOutcome::Succeeded,
                    deleted: 0,
                    receipt: None,
                }),
                ..Default::default()
            });
            p
        };
        // Every hour: late once more than two hours have passed since the last completion.
        let on_time = swept("2026-11-20T10:30:00Z");
        let late = swept("2026-11-20T09:59:00Z");
        let mut never = policy(&["a"]);
        created(&mut never, "2026-11-20T09:00:00Z");
        let mut young = policy(&["a"]);
        created(&mut young, "2026-11-20T11:00:00Z");
        let mut suspended = swept("2026-11-01T00:00:00Z");
        suspended.spec.suspend = true;
        let mut held = swept("2026-11-01T00:00:00Z");
        if let Some(s) = held.status.as_mut() {
            s.targets = vec![TargetStatus {
                name: "a".into(),
                phase: TargetPhase::Held,
                ..Default::default()
            }];
        }
        assert_eq!(late_sweeps(&[&on_time], now), 0);
        assert_eq!(late_sweeps(&[&late], now), 1);
        assert_eq!(
            late_sweeps(&[&never, &young], now),
            1,
            "counted from creation before the first sweep"
        );
        assert_eq!(
            late_sweeps(&[&suspended, &held], now),
            0,
            "not meant to sweep"
        );
    }

    #[test]
    fn validation_refuses_out_of_bounds_durations_and_duplicate_targets() {
        let mut p = policy(&["a", "b"]);
        assert_eq!(validate(&p.spec), Ok(()));
        for (retention, ok) in [
            ("0d", false),
            ("1s", true),
            ("36525d", true),
            ("36526d", false),
            ("1000000000w", false),
            ("99999999999999999999w", false),
        ] {
            p.spec.retention = retention.parse().unwrap();
            let got = validate(&p.spec);
            assert_eq!(got.is_ok(), ok, "retention {retention}: {got:?}");
            if let Err(errors) = got {
                assert_eq!(errors[0].target, None);
                assert!(errors[0].message.contains("retention"), "{errors:?}");
            }
            // Never a panic, whatever the retention: the decision is Invalid, not a crash.
            let d = decide(&p, &sched(&p), ts(T0), ts(T0));
            assert_eq!(matches!(d, Decision::Invalid(_)), !ok, "{retention}: {d:?}");
        }
        p.spec.retention = "30d".parse().unwrap();
        for (every, ok) in [("0s", false), ("1m", true), ("366d", true), ("367d", false)] {
            p.spec.schedule = Some(Schedule {
                every: Some(every.parse().unwrap()),
                cron: None,
            });
            assert_eq!(validate(&p.spec).is_ok(), ok, "every {every}");
        }
        p.spec.schedule = None;
        let dup = policy(&["a", "b", "a"]);
        let errors = validate(&dup.spec).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].target.as_deref(), Some("a"));
        assert!(errors[0].message.contains("more than once"));
        assert!(matches!(
            decide(&dup, &sched(&dup), ts(T0), ts(T0)),
            Decision::Invalid(m) if m.contains("target name a")
        ));
    }

    #[test]
    fn validation_checks_every_target_selector_and_locator() {
        let mut p = policy(&["a", "b"]);
        p.spec.targets[1].subject = Some(
            serde_json::from_value(serde_json::json!({"redis": {"keys": ["session:*"]}})).unwrap(),
        );
        if let Some(crate::api::retentionpolicy::Selector::Redis(r)) =
            p.spec.targets[0].selector.as_mut()
        {
            r.key_pattern = "*:*".into();
        }
        let errors = validate(&p.spec).unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(errors[0].target.as_deref(), Some("a"));
        assert!(errors[0].message.contains("allowMatchAll"));
        assert_eq!(errors[1].target.as_deref(), Some("b"));
        assert!(errors[1].message.contains("keys[0] \"session:*\""));
        let mut none = policy(&["a"]);
        none.spec.targets[0].selector = None;
        assert!(validate(&none.spec).unwrap_err()[0]
            .message
            .contains("no selector"));
    }

    #[test]
    fn overdue_and_retry_arithmetic_cannot_overflow() {
        let mut p = policy(&["a"]);
        p.status = Some(RetentionPolicyStatus {
            last_sweep: Some(LastSweep {
                start_time: ts(T0),
                completion_time: ts(T0),
                outcome: SweepOutcome::Succeeded,
                deleted: 0,
                receipt: None,
            }),
            next_sweep_time: Some(Timestamp(DateTime::<Utc>::MAX_UTC)),
            ..Default::default()
        });
        let status = p.status.clone().unwrap();
        let c = conditions(&p, &status, None, &[], u64::MAX, ts(T0));
        assert!(c.iter().any(|c| c.type_ == "Compliant"));
        let mut status = begin_sweep(&p, ts(T0));
        apply_step(
            &mut status.targets[0],
            StepResult::Failed(Failure::new(Category::Refused, "X", "x")),
            false,
            Timestamp(DateTime::<Utc>::MAX_UTC),
        );
        let s = sched(&p).unwrap();
        assert!(finish_if_done(
            &mut status,
            &s,
            ts(T0),
            Timestamp(DateTime::<Utc>::MAX_UTC),
            std::time::Duration::from_secs(u64::MAX),
        )
        .is_some());
    }

    #[test]
    fn a_new_interval_policy_sweeps_at_once() {
        let p = policy(&["a"]);
        assert_eq!(decide(&p, &sched(&p), ts(T0), ts(T0)), Decision::Start);
    }

    #[test]
    fn a_new_cron_policy_waits_for_its_time() {
        let mut p = policy(&["a"]);
        p.spec.schedule = Some(Schedule {
            every: None,
            cron: Some("0 3 * * *".into()),
        });
        assert_eq!(
            decide(&p, &sched(&p), ts(T0), ts(T0)),
            Decision::Wait(ts("2026-11-21T03:00:00Z"))
        );
    }

    #[test]
    fn suspended_and_invalid_policies_do_nothing() {
        let mut p = policy(&["a"]);
        p.spec.suspend = true;
        assert_eq!(decide(&p, &sched(&p), ts(T0), ts(T0)), Decision::Suspended);
        p.spec.schedule = Some(Schedule {
            every: None,
            cron: Some("nope".into()),
        });
        assert!(matches!(
            decide(&p, &sched(&p), ts(T0), ts(T0)),
            Decision::Invalid(_)
        ));
    }

    #[test]
    fn a_full_sweep_checkpoints_then_completes_and_schedules_the_next() {
        let mut p = policy(&["a", "b"]);
        let mut status = begin_sweep(&p, ts(T0));
        assert!(status
            .targets
            .iter()
            .all(|t| t.phase == TargetPhase::Sweeping && t.cursor.is_none()));
        p.status = Some(status.clone());
        assert_eq!(decide(&p, &sched(&p), ts(T0), ts(T0)), Decision::Continue);

        apply_step(
            &mut status.targets[0],
            step(1000, 10, Next::Continue("0:77".into())),
            false,
            ts(T0),
        );
        assert_eq!(status.targets[0].cursor.as_deref(), Some("0:77"));
        assert_eq!(status.targets[0].deleted_total, 10);
        let s = sched(&p).unwrap();
        assert_eq!(
            finish_if_done(
                &mut status,
                &s,
                ts(T0),
                ts(T0),
                std::time::Duration::from_secs(30)
            ),
            None
        );

        apply_step(
            &mut status.targets[0],
            step(500, 5, Next::Done),
            false,
            ts(T0),
        );
        apply_step(
            &mut status.targets[1],
            step(20, 0, Next::Done),
            false,
            ts(T0),
        );
        let done = finish_if_done(
            &mut status,
            &s,
            ts(T0),
            ts("2026-11-20T09:00:10Z"),
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(done.outcome, SweepOutcome::Succeeded);
        assert_eq!(done.deleted, 15);
        assert_eq!(status.targets[0].deleted_total, 15);
        assert_eq!(status.targets[0].message, "scanned 1500, deleted 15");
        assert_eq!(status.next_sweep_time, Some(ts("2026-11-20T10:00:00Z")));
        assert!(status.current_sweep.is_none());

        p.status = Some(RetentionPolicyStatus {
            observed_generation: Some(1),
            ..status.clone()
        });
        assert_eq!(
            decide(&p, &sched(&p), ts(T0), ts("2026-11-20T09:30:00Z")),
            Decision::Wait(ts("2026-11-20T10:00:00Z"))
        );
        assert_eq!(
            decide(&p, &sched(&p), ts(T0), ts("2026-11-20T10:00:00Z")),
            Decision::Start
        );
        // A new sweep clears the last sweep's counts but keeps the totals.
        let again = begin_sweep(&p, ts("2026-11-20T10:00:00Z"));
        assert_eq!(
            (again.targets[0].deleted, again.targets[0].deleted_total),
            (0, 15)
        );
    }

    #[test]
    fn dry_runs_count_but_add_nothing_to_totals() {
        let mut p = policy(&["a"]);
        p.spec.dry_run = true;
        let mut status = begin_sweep(&p, ts(T0));
        apply_step(
            &mut status.targets[0],
            step(10, 4, Next::Done),
            true,
            ts(T0),
        );
        let done = finish_if_done(
            &mut status,
            &sched(&p).unwrap(),
            ts(T0),
            ts(T0),
            Default::default(),
        )
        .unwrap();
        assert_eq!(
            (done.outcome, done.deleted, status.targets[0].deleted_total),
            (SweepOutcome::DryRun, 4, 0)
        );
        assert_eq!(status.targets[0].message, "scanned 10, would delete 4");
        p.status = Some(status.clone());
        let c = conditions(&p, &status, None, &[], 3600, ts(T0));
        let compliant = c.iter().find(|c| c.type_ == "Compliant").unwrap();
        assert_eq!(
            (compliant.status, compliant.reason.as_str()),
            (ConditionStatus::False, "DryRun")
        );
    }

    #[test]
    fn a_spec_edit_restarts_a_running_sweep_and_triggers_an_idle_one() {
        let mut p = policy(&["a"]);
        p.status = Some(RetentionPolicyStatus {
            observed_generation: Some(1),
            ..begin_sweep(&p, ts(T0))
        });
        p.metadata.generation = Some(2);
        assert_eq!(decide(&p, &sched(&p), ts(T0), ts(T0)), Decision::Start);

        let mut status = begin_sweep(&policy(&["a"]), ts(T0));
        apply_step(
            &mut status.targets[0],
            step(1, 0, Next::Done),
            false,
            ts(T0),
        );
        finish_if_done(
            &mut status,
            &sched(&p).unwrap(),
            ts(T0),
            ts(T0),
            Default::default(),
        );
        status.observed_generation = Some(1);
        p.status = Some(status);
        assert_eq!(decide(&p, &sched(&p), ts(T0), ts(T0)), Decision::Start);
    }

    #[test]
    fn failures_mark_the_target_degrade_the_policy_and_retry_sooner() {
        let p = policy(&["a", "b"]);
        let mut status = begin_sweep(&p, ts(T0));
        apply_step(
            &mut status.targets[0],
            StepResult::Failed(Failure::new(
                Category::Refused,
                "StoreNotFound",
                "DataStore cache not found",
            )),
            false,
            ts(T0),
        );
        // A transient failure on its last attempt.
        let failure = backends::Error::Unreachable("10.0.0.1:6379".into());
        apply_attempt(
            &mut status.targets[1],
            StepResult::Ran(Step {
                scanned: 5,
                deleted: 2,
                next: Next::Continue("0:9".into()),
                failure: Some(failure),
                ..Step::default()
            }),
            false,
            ts(T0),
            TRANSIENT_ATTEMPTS,
        );
        assert_eq!(
            status.targets[1].deleted_total, 2,
            "work done before the failure is still counted"
        );
        assert_eq!(
            (status.targets[1].phase, status.targets[1].cursor.as_deref()),
            (TargetPhase::Failed, Some("0:9")),
            "a failed step keeps the cursor the store returned: what it still runs stays named"
        );
        // A setback the store recovers from keeps the target sweeping, saying why.
        let mut retrying = status.targets[1].clone();
        retrying.phase = TargetPhase::Sweeping;
        apply_step(
            &mut retrying,
            StepResult::Ran(Step {
                deleted: 1,
                next: Next::Continue("es:{}".into()),
                retrying: Some(backends::Error::StoreTaskLost("gone".into())),
                ..Step::default()
            }),
            false,
            ts(T0),
        );
        assert_eq!(
            (
                retrying.phase,
                retrying.cursor.as_deref(),
                retrying.deleted_total
            ),
            (TargetPhase::Sweeping, Some("es:{}"), 3)
        );
        assert_eq!(retrying.message, "StoreTaskLost: gone");
        let done = finish_if_done(
            &mut status,
            &sched(&p).unwrap(),
            ts(T0),
            ts(T0),
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(done.outcome, SweepOutcome::Failed);
        assert_eq!(status.next_sweep_time, Some(ts("2026-11-20T09:00:30Z")));
        let c = conditions(&p, &status, None, &[], 3600, ts(T0));
        let get = |t: &str| c.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(get("Degraded").status, ConditionStatus::True);
        assert!(get("Degraded").message.contains("target a: StoreNotFound"));
        assert_eq!(get("Compliant").reason, "SweepFailed");
    }

    fn transient(reason: &'static str) -> Failure {
        Failure::new(Category::Transient, reason, "10.0.0.1:6379 refused")
    }

    #[test]
    fn a_transient_failure_is_retried_and_keeps_the_cursor() {
        let p = policy(&["a"]);
        let mut status = begin_sweep(&p, ts(T0));
        let t = &mut status.targets[0];
        t.cursor = Some("0:5".into());
        // Nothing ran: the cursor stays, the target keeps sweeping.
        apply_attempt(
            t,
            StepResult::Failed(transient("Unreachable")),
            false,
            ts(T0),
            1,
        );
        assert_eq!(
            (t.phase, t.cursor.as_deref(), t.failure_category),
            (
                TargetPhase::Sweeping,
                Some("0:5"),
                Some(Category::Transient)
            )
        );
        assert!(t.message.starts_with("Unreachable: "), "{}", t.message);
        assert!(retrying(t));
        // A step that failed after some progress resumes from the cursor it returned.
        apply_attempt(
            t,
            StepResult::Ran(Step {
                scanned: 3,
                next: Next::Wait {
                    cursor: "es:task-1".into(),
                    poll_after: std::time::Duration::from_secs(1),
                },
                failure: Some(backends::Error::Unreachable("503".into())),
                ..Step::default()
            }),
            false,
            ts(T0),
            2,
        );
        assert_eq!(
            (t.phase, t.cursor.as_deref(), t.scanned),
            (TargetPhase::Sweeping, Some("es:task-1"), 3)
        );
        // Recovered: the failure is cleared, the sweep goes on.
        apply_attempt(
            t,
            StepResult::Ran(Step {
                next: Next::Continue("es:task-1".into()),
                ..Step::default()
            }),
            false,
            ts(T0),
            3,
        );
        assert_eq!((t.failure_category, t.message.as_str()), (None, ""));
        assert!(!retrying(t));
        // Retried a bounded number of times, then the target fails for this sweep, and the
        // next sweep comes early.
        apply_attempt(
            t,
            StepResult::Failed(transient("Unreachable")),
            false,
            ts(T0),
            TRANSIENT_ATTEMPTS,
        );
        assert_eq!(t.phase, TargetPhase::Failed);
        assert_eq!(
            on_failure(Category::Transient, TRANSIENT_ATTEMPTS),
            OnFailure::Fail { retry_sweep: true }
        );
        finish_if_done(
            &mut status,
            &sched(&p).unwrap(),
            ts(T0),
            ts(T0),
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(status.next_sweep_time, Some(ts("2026-11-20T09:00:30Z")));
    }

    #[test]
    fn an_invalid_spec_fails_the_target_without_retry() {
        let p = policy(&["a"]);
        let mut status = begin_sweep(&p, ts(T0));
        status.targets[0].cursor = Some("0:5".into());
        let invalid = Failure::new(
            Category::InvalidSpec,
            "IdentifierNotDistinctive",
            "subject.loki.lineFilter cannot tell",
        );
        assert_eq!(
            on_failure(Category::InvalidSpec, 1),
            OnFailure::Fail { retry_sweep: false }
        );
        apply_attempt(
            &mut status.targets[0],
            StepResult::Failed(invalid),
            false,
            ts(T0),
            1,
        );
        let t = &status.targets[0];
        assert_eq!(
            (t.phase, t.failure_category),
            (TargetPhase::Failed, Some(Category::InvalidSpec))
        );
        assert!(t.message.starts_with("IdentifierNotDistinctive: "));
        assert!(!retrying(t));
        let s = sched(&p).unwrap();
        let done = finish_if_done(
            &mut status,
            &s,
            ts(T0),
            ts(T0),
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(done.outcome, SweepOutcome::Failed);
        assert_eq!(
            status.next_sweep_time,
            s.next_after(Some(ts(T0)), ts(T0)),
            "no early retry: the next sweep is the scheduled one"
        );
        let c = conditions(&p, &status, None, &[], 3600, ts(T0));
        let degraded = c.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(degraded.reason, "TargetFailed");
    }

    #[test]
    fn a_failure_that_needs_attention_sets_the_condition_and_waits() {
        let p = policy(&["a"]);
        let mut status = begin_sweep(&p, ts(T0));
        apply_attempt(
            &mut status.targets[0],
            StepResult::Ran(Step {
                next: Next::Wait {
                    cursor: "es:task-1".into(),
                    poll_after: std::time::Duration::from_secs(1),
                },
                failure: Some(backends::Error::StoreTaskCancelled(
                    "task cancelled by someone else".into(),
                )),
                ..Step::default()
            }),
            false,
            ts(T0),
            1,
        );
        let t = &status.targets[0];
        assert_eq!(
            (t.phase, t.failure_category, t.cursor.as_deref()),
            (
                TargetPhase::Failed,
                Some(Category::NeedsAttention),
                Some("es:task-1")
            ),
            "not retried; what the store ran stays named"
        );
        let s = sched(&p).unwrap();
        finish_if_done(
            &mut status,
            &s,
            ts(T0),
            ts(T0),
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(
            status.next_sweep_time,
            s.next_after(Some(ts(T0)), ts(T0)),
            "waits: no early retry"
        );
        let c = conditions(&p, &status, None, &[], 3600, ts(T0));
        let degraded = c.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(
            (degraded.status, degraded.reason.as_str()),
            (ConditionStatus::True, "NeedsAttention")
        );
        assert!(degraded
            .message
            .contains("StoreTaskCancelled: task cancelled"));
    }

    #[test]
    fn ready_reports_every_problem_target() {
        let p = policy(&["a", "b"]);
        let problems = vec![(
            "b".to_string(),
            Problem {
                reason: "StoreNotFound",
                message: "DataStore cache not found".into(),
                category: Category::InvalidSpec,
            },
        )];
        let c = conditions(
            &p,
            &RetentionPolicyStatus::default(),
            None,
            &problems,
            3600,
            ts(T0),
        );
        let ready = c.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (ConditionStatus::False, "StoreNotFound")
        );
        assert_eq!(ready.message, "target b: DataStore cache not found");
        let ok = conditions(
            &p,
            &RetentionPolicyStatus::default(),
            None,
            &[],
            3600,
            ts(T0),
        );
        assert_eq!(
            ok.iter().find(|c| c.type_ == "Ready").unwrap().message,
            "2 targets on stores cache"
        );
    }

    #[test]
    fn holds_pause_a_sweep_and_lifting_them_resumes_it() {
        let p = policy(&["a", "b"]);
        let mut status = begin_sweep(&p, ts(T0));
        apply_step(
            &mut status.targets[0],
            step(10, 1, Next::Done),
            false,
            ts(T0),
        );
        apply_step(
            &mut status.targets[1],
            step(10, 1, Next::Continue("0:5".into())),
            false,
            ts(T0),
        );
        hold_targets(&mut status, &["litigation".into()]);
        assert_eq!(
            status.targets[0].phase,
            TargetPhase::Idle,
            "finished before the hold"
        );
        assert_eq!(status.targets[1].phase, TargetPhase::Held);
        assert_eq!(
            status.targets[1].cursor.as_deref(),
            Some("0:5"),
            "the checkpoint is kept"
        );
        release_targets(&mut status);
        assert_eq!(status.targets[1].phase, TargetPhase::Sweeping);

        let mut idle = RetentionPolicyStatus {
            targets: aligned_targets(&p, &[]),
            ..Default::default()
        };
        hold_targets(&mut idle, &["a".into(), "b".into()]);
        assert!(idle
            .targets
            .iter()
            .all(|t| t.phase == TargetPhase::Held && t.message == "held by LegalHold a, b"));
        let mut held_policy = p.clone();
        held_policy.status = Some(idle.clone());
        let c = conditions(&held_policy, &idle, None, &[], 3600, ts(T0));
        let compliant = c.iter().find(|c| c.type_ == "Compliant").unwrap();
        assert_eq!(
            (compliant.status, compliant.reason.as_str()),
            (ConditionStatus::True, "LegalHold")
        );
        release_targets(&mut idle);
        assert!(idle
            .targets
            .iter()
            .all(|t| t.phase == TargetPhase::Idle && t.message.is_empty()));
    }

    #[test]
    fn only_holds_in_force_that_name_the_policy_count() {
        use crate::api::legalhold::LegalHoldSpec;
        let hold = |name: &str, policies: &[&str], expires: Option<&str>| {
            LegalHold::new(
                name,
                LegalHoldSpec {
                    reason: "r".into(),
                    policies: Some(policies.iter().map(|p| p.to_string()).collect()),
                    subjects: None,
                    expires_at: expires.map(ts),
                },
            )
        };
        let holds = vec![
            hold("z-later", &["sessions"], Some("2026-12-01T00:00:00Z")),
            hold("a-sooner", &["sessions", "x"], Some("2026-11-25T00:00:00Z")),
            hold("expired", &["sessions"], Some("2026-11-01T00:00:00Z")),
            hold("other", &["billing"], None),
        ];
        let (names, expiry) = holds_on("sessions", &holds, ts(T0));
        assert_eq!(names, vec!["a-sooner", "z-later"]);
        assert_eq!(expiry, Some(ts("2026-11-25T00:00:00Z")));
        assert_eq!(
            holds_on("billing", &holds, ts(T0)),
            (vec!["other".to_string()], None)
        );
    }

    #[test]
    fn compliance_follows_the_last_sweep_and_the_clock() {
        let mut p = policy(&["a"]);
        let mut status = begin_sweep(&p, ts(T0));
        apply_step(
            &mut status.targets[0],
            step(3, 1, Next::Done),
            false,
            ts(T0),
        );
        finish_if_done(
            &mut status,
            &sched(&p).unwrap(),
            ts(T0),
            ts(T0),
            Default::default(),
        );
        p.status = Some(status.clone());
        let compliant = |now: &str| {
            conditions(&p, &status, None, &[], 3600, ts(now))
                .into_iter()
                .find(|c| c.type_ == "Compliant")
                .unwrap()
        };
        assert_eq!(compliant(T0).reason, "SweepSucceeded");
        assert_eq!(compliant(T0).status, ConditionStatus::True);
        assert_eq!(compliant("2026-11-20T11:30:00Z").reason, "SweepOverdue");
    }

    #[test]
    fn subject_holds_hold_targets_whose_locator_cannot_leave_the_subject_out() {
        let mut p = policy(&["plain"]);
        p.spec.targets.push(
            serde_json::from_value(serde_json::json!({"name": "located", "store": "cache",
                "redis": {"keyPattern": "session:*", "mode": "idle"},
                "subject": {"redis": {"keys": ["session:{userId}:*"]}}}))
            .unwrap(),
        );
        let ids = |pairs: &[(&str, &str)]| {
            HeldSubjectRead::Identifiers(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            )
        };
        let read = |r: HeldSubjectRead| vec![("lit".to_string(), r)];

        let (reasons, held) = target_holds(&p, &[], &[]);
        assert_eq!((reasons, held.0.len()), (vec![None, None], 0));

        let (reasons, held) = target_holds(&p, &[], &read(ids(&[("userId", "u-1")])));
        assert!(reasons[0]
            .as_deref()
            .is_some_and(|m| m
                .starts_with("held whole by LegalHold lit: target plain has no subject locator")));
        assert_eq!(reasons[1], None, "swept around the held subject");
        assert_eq!(held.0.len(), 1);

        let (reasons, _) = target_holds(&p, &[], &read(ids(&[("email", "a@b.example")])));
        assert!(
            reasons[1]
                .as_deref()
                .is_some_and(|m| m.contains("has no {userId}, which subject.redis.keys[0] needs")),
            "{reasons:?}"
        );

        let (reasons, _) = target_holds(
            &p,
            &[],
            &read(HeldSubjectRead::DigestOnly { hold: "lit".into() }),
        );
        assert!(reasons
            .iter()
            .all(|r| r.as_deref().is_some_and(|m| m.contains("by digest only"))));

        let (reasons, _) = target_holds(
            &p,
            &[],
            &[
                ("a".to_string(), ids(&[("userId", "u-1")])),
                (
                    "b".to_string(),
                    HeldSubjectRead::Unreadable {
                        hold: "b".into(),
                        reason: "Secret s not found".into(),
                    },
                ),
            ],
        );
        assert!(
            reasons.iter().all(|r| r
                .as_deref()
                .is_some_and(|m| m.contains("LegalHold b: the Secret naming its subject cannot be read (Secret s not found)"))),
            "fail closed: {reasons:?}"
        );

        let (reasons, _) = target_holds(&p, &["whole".into()], &[]);
        assert!(reasons
            .iter()
            .all(|r| r.as_deref() == Some("held by LegalHold whole")));
    }

    #[test]
    fn held_identifiers_never_show_in_debug_output() {
        let probe = "probe-3f9a@example.org";
        let read = HeldSubjectRead::Identifiers([("email".to_string(), probe.to_string())].into());
        assert!(!format!("{read:?}").contains(probe));
        let held = HeldSubjects(vec![[("email".to_string(), probe.to_string())].into()]);
        assert!(!format!("{held:?}").contains(probe));
    }

    #[test]
    fn a_partial_hold_sweeps_the_other_targets_and_unjudged_items_are_not_compliant() {
        let mut p = policy(&["a", "b"]);
        let mut status = begin_sweep(&p, ts(T0));
        apply_holds(
            &mut status,
            &[None, Some("held whole by LegalHold x".into())],
        );
        assert_eq!(status.targets[0].phase, TargetPhase::Sweeping);
        assert_eq!(status.targets[1].phase, TargetPhase::Held);
        apply_step(
            &mut status.targets[0],
            StepResult::Ran(Step {
                scanned: 5,
                deleted: 1,
                held: 2,
                next: Next::Done,
                ..Step::default()
            }),
            false,
            ts(T0),
        );
        let s = sched(&p).unwrap();
        let done = finish_if_done(&mut status, &s, ts(T0), ts(T0), Default::default()).unwrap();
        assert_eq!(done.outcome, SweepOutcome::Succeeded);
        assert_eq!(
            status.targets[0].message,
            "scanned 5, deleted 1, 2 kept for subjects a LegalHold holds"
        );
        p.status = Some(status.clone());
        let compliant = |status: &RetentionPolicyStatus| {
            conditions(&p, status, None, &[], 3600, ts(T0))
                .into_iter()
                .find(|c| c.type_ == "Compliant")
                .unwrap()
        };
        let c = compliant(&status);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::True, "LegalHold")
        );
        assert!(c.message.contains("targets a, b"), "{}", c.message);

        // The hold lifted: the held target is idle again, with no stale message.
        apply_holds(&mut status, &[None, None]);
        assert_eq!(status.targets[1].phase, TargetPhase::Idle);
        assert!(status.targets[1].message.is_empty());

        status.targets[0].unjudged = 3;
        let c = compliant(&status);
        assert_eq!(
            (c.status, c.reason.as_str()),
            (ConditionStatus::False, "ItemsUnjudged")
        );
        assert!(c.message.contains("3 in target a"), "{}", c.message);
    }

    #[test]
    fn the_subject_holds_tag_names_holds_in_force_and_changes_with_them() {
        use crate::api::legalhold::{HeldSubject, LegalHoldSpec};
        let hold = |name: &str, generation: i64, subjects: bool, expires: Option<&str>| {
            let mut h = LegalHold::new(
                name,
                LegalHoldSpec {
                    reason: "r".into(),
                    policies: None,
                    subjects: subjects.then(|| {
                        vec![HeldSubject {
                            secret_ref: None,
                            digest: Some(format!("hmac-sha256:{}", "0".repeat(64))),
                        }]
                    }),
                    expires_at: expires.map(ts),
                },
            );
            h.metadata.generation = Some(generation);
            h
        };
        assert_eq!(subject_holds_tag(&[], ts(T0)), None);
        let holds = vec![
            hold("b", 2, true, None),
            hold("a", 1, true, None),
            hold("policies-only", 1, false, None),
            hold("expired", 1, true, Some("2026-11-01T00:00:00Z")),
        ];
        assert_eq!(
            subject_holds_tag(&holds, ts(T0)).as_deref(),
            Some("a/1,b/2")
        );
        let edited = vec![hold("a", 2, true, None), hold("b", 2, true, None)];
        assert_ne!(
            subject_holds_tag(&edited, ts(T0)),
            subject_holds_tag(&holds, ts(T0))
        );
    }
}

#[cfg(test)]
mod stop_tests {
    use super::*;
    use crate::api::retentionpolicy::{CurrentSweep, RetentionPolicySpec};
    use crate::backends::Cancel;

    fn policy(targets: serde_json::Value, cursors: &[Option<&str>]) -> RetentionPolicy {
        let spec: RetentionPolicySpec = serde_json::from_value(serde_json::json!({
            "purpose": "p", "legalBasis": "contract", "retention": "30d",
            "schedule": {"every": "1h"}, "targets": targets,
        }))
        .expect("a valid spec");
        let mut p = RetentionPolicy::new("logs", spec);
        p.metadata.generation = Some(2);
        p.status = Some(RetentionPolicyStatus {
            current_sweep: Some(CurrentSweep {
                start_time: Timestamp::now(),
                dry_run: false,
                generation: Some(1),
                subject_holds: None,
            }),
            targets: p
                .spec
                .targets
                .iter()
                .zip(cursors)
                .map(|(t, c)| TargetStatus {
                    name: t.name.clone(),
                    phase: TargetPhase::Sweeping,
                    cursor: c.map(str::to_string),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        });
        p
    }

    fn two() -> serde_json::Value {
        serde_json::json!([
            {"name": "logs", "store": "loki", "loki": {"selector": "{app=\"a\"}"}},
            {"name": "events", "store": "es",
             "elasticsearch": {"index": "ev-*", "timestampField": "@timestamp"}},
        ])
    }

    #[test]
    fn restart_suspension_and_invalid_specs_stop_the_cursors_of_the_sweep_under_way() {
        let p = policy(two(), &[Some("loki:x"), None]);
        for (decision, cause) in [
            (Decision::Start, StopCause::Restarted),
            (Decision::Suspended, StopCause::Suspended),
            (Decision::Invalid("bad".into()), StopCause::Invalid),
        ] {
            assert_eq!(
                deletions_to_stop(&decision, &p),
                Some((cause, vec![(0, "loki:x".to_string())]))
            );
        }
        assert_eq!(deletions_to_stop(&Decision::Continue, &p), None);
        assert_eq!(deletions_to_stop(&Decision::Held, &p), None);
        // A finished sweep whose target failed with a deletion still named: stopped too.
        let mut failed = p.clone();
        failed.status.as_mut().unwrap().current_sweep = None;
        assert_eq!(
            deletions_to_stop(&Decision::Start, &failed),
            Some((StopCause::Restarted, vec![(0, "loki:x".to_string())]))
        );
        let mut idle = policy(two(), &[None, None]);
        idle.status.as_mut().unwrap().current_sweep = None;
        assert_eq!(deletions_to_stop(&Decision::Start, &idle), None);
    }

    #[test]
    fn a_deletion_that_could_not_be_stopped_is_said_and_a_paused_sweep_keeps_its_cursor() {
        let p = policy(two(), &[Some("loki:x"), Some("es:y")]);
        let names = vec!["logs".to_string(), "events".to_string()];
        let outcomes = vec![
            (0, StopOutcome::Stopped(Cancel::TooLate)),
            (1, StopOutcome::Failed("Unreachable: refused".into())),
        ];
        let mut status = p.status.clone().unwrap();
        let events = record_stops(&mut status, &names, StopCause::Suspended, &outcomes);
        assert_eq!(status.targets[0].cursor, None, "never adopted again");
        assert!(status.targets[0]
            .message
            .starts_with("StoreDeletionNotCancellable: target logs: the policy was suspended"));
        assert_eq!(
            status.targets[1].cursor.as_deref(),
            Some("es:y"),
            "asked again"
        );
        assert!(status.targets[1]
            .message
            .starts_with("StoreDeletionNotCancelled:"));
        assert_eq!(
            events.iter().map(|e| (e.0, e.1)).collect::<Vec<_>>(),
            vec![
                (true, "StoreDeletionNotCancellable"),
                (true, "StoreDeletionNotCancelled")
            ]
        );
        // A restarted sweep drops every old cursor; a cancelled one is a Normal event.
        let mut status = p.status.clone().unwrap();
        let events = record_stops(
            &mut status,
            &names,
            StopCause::Restarted,
            &[
                (0, StopOutcome::Stopped(Cancel::Cancelled { deleted: 7 })),
                (1, StopOutcome::Failed("Unreachable: refused".into())),
            ],
        );
        assert!(status.targets.iter().all(|t| t.cursor.is_none()));
        // What the cancelled deletion did before it stopped stays counted.
        assert_eq!(
            status.targets[0].deleted_total,
            p.status.as_ref().unwrap().targets[0].deleted_total + 7
        );
        assert_eq!(status.targets[0].message, "");
        assert_eq!(
            (events[0].0, events[0].1),
            (false, "StoreDeletionCancelled")
        );
        let none = record_stops(
            &mut status,
            &names,
            StopCause::Restarted,
            &[(0, StopOutcome::Stopped(Cancel::Nothing))],
        );
        assert!(none.is_empty());
    }

    #[test]
    fn the_finalizer_is_for_policies_whose_stores_delete_by_themselves() {
        let p = policy(two(), &[None, None]);
        assert!(needs_finalizer(&p));
        let redis = policy(
            serde_json::json!([{"name": "s", "store": "r",
                "redis": {"keyPattern": "s:*", "mode": "idle"}}]),
            &[None],
        );
        assert!(!needs_finalizer(&redis));
    }

    #[test]
    fn an_unreachable_store_holds_the_finalizer_only_for_a_while() {
        let t0 = Timestamp::now();
        let later = |s: i64| Timestamp(t0.0 + chrono::Duration::seconds(s));
        let patience = std::time::Duration::from_secs(60);
        let failed = vec![(0, StopOutcome::Failed("Unreachable: x".into()))];
        assert!(!may_release(&failed, t0, later(10), patience));
        assert!(may_release(&failed, t0, later(61), patience));
        let gone = vec![(0, StopOutcome::StoreGone("StoreNotFound: x".into()))];
        assert!(may_release(&gone, t0, t0, patience));
        assert!(may_release(&[], t0, t0, patience));
    }
}
