//! RetentionPolicy: dereference stores → plan (pure) → run one bounded step per target →
//! compute status (pure) → write it if it changed → requeue while work remains.

pub mod plan;

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tracing::{info, instrument, warn};

use super::resolve::{resolve_target, ResolvedTarget};
use super::{failure_key, object_key, Context, Error};
use crate::api::common::{find_condition, ConditionStatus};
use crate::api::legalhold::HeldSubject;
use crate::api::retentionpolicy::{
    RetentionPolicy, RetentionPolicyStatus, SweepOutcome, TargetPhase,
};
use crate::api::Timestamp;
use crate::audit;
use crate::backends::{self, Category, Failure, Next, SweepJob};
use crate::engine::Claim;
use crate::schedule;
use k8s_openapi::api::core::v1::Secret;
use plan::{Decision, Problem, StepResult};
use std::collections::BTreeMap;

pub const CONTROLLER: &str = "retentionpolicy";
/// How soon to look again when a store has not been probed yet.
const STORE_PENDING_RETRY: Duration = Duration::from_secs(5);
/// How soon to ask a store again to stop a deletion it could not be asked to stop.
const STOP_RETRY: Duration = Duration::from_secs(15);
/// How long a deleted policy keeps its finalizer while a store cannot be reached to cancel
/// what it runs for the policy; then the finalizer is released with a Warning.
const FINALIZER_PATIENCE: Duration = Duration::from_secs(60);

#[instrument(skip_all, fields(policy = %object_key(obj.as_ref())))]
pub async fn reconcile(obj: Arc<RetentionPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let namespace = obj.namespace().unwrap_or_default();
    let Some((api, policy)) = ctx.current(obj.as_ref()).await? else {
        return Ok(Action::await_change());
    };
    let key = failure_key(&policy);
    if policy.metadata.deletion_timestamp.is_some() {
        return finalize(&api, &policy, &ctx).await;
    }
    if plan::needs_finalizer(&policy) {
        match add_finalizer(&api, &policy, &ctx).await {
            Ok(()) => {}
            // Stored before the schema was tightened: no write of it is accepted, and the
            // reconcile goes on to say why (an InvalidSpec Event) instead of retrying.
            Err(e) if refused_by_schema(&e) => {
                warn!(reason = e.reason(), error = %e, "the finalizer cannot be added: the stored policy violates the installed CRD schema")
            }
            Err(e) => return Err(e),
        }
    }
    let now = Timestamp::now();
    let created = super::creation_time(&policy, now);
    let parsed_schedule = schedule::parse(policy.spec.schedule.as_ref());

    // 1. Dereference the stores of every target.
    let resolved = dereference(&policy, &ctx).await;
    let problems: Vec<(String, Problem)> = policy
        .spec
        .targets
        .iter()
        .zip(&resolved)
        .filter_map(|(t, r)| r.problem().cloned().map(|p| (t.name.clone(), p)))
        .collect();

    // 2. Plan.
    let mut decision = plan::decide(&policy, &parsed_schedule, created, now);
    if decision == Decision::Start
        && problems
            .iter()
            .any(|(_, p)| p.category == Category::Transient)
    {
        // Wait for the stores' first probe rather than fail targets needlessly.
        decision = Decision::Wait(now);
    }
    let holds = ctx
        .legal_holds(&namespace)
        .await
        .map_err(|e| Error::Kube(super::shared_error(&e)))?;
    let (held_by, policy_hold_expiry) = plan::holds_on(&policy.name_any(), &holds, now);
    let (subject_holds, subject_hold_expiry) = plan::subject_holds(&holds, now);
    let hold_expiry = [policy_hold_expiry, subject_hold_expiry]
        .into_iter()
        .flatten()
        .min();
    let holds_tag = plan::subject_holds_tag(&holds, now);
    if decision == Decision::Continue
        && policy
            .status
            .as_ref()
            .and_then(|s| s.current_sweep.as_ref())
            .is_some_and(|c| c.subject_holds != holds_tag)
    {
        // Deletions submitted under other subject holds must not run on: start over.
        info!("the LegalHolds on subjects changed: the sweep starts over");
        decision = Decision::Start;
    }
    let subjects = read_held_subjects(&ctx, &namespace, subject_holds).await;
    let (target_holds, held_subjects) = plan::target_holds(&policy, &held_by, &subjects);
    drop(subjects);
    if !target_holds.is_empty()
        && target_holds.iter().all(Option::is_some)
        && !matches!(decision, Decision::Invalid(_) | Decision::Suspended)
    {
        decision = Decision::Held;
    }

    // 3. Execute: stop what the stores still run for a sweep that a spec edit restarts, a
    // suspension or an invalid spec interrupts (cancelled while it can be, said otherwise);
    // then one bounded step.
    let stops = plan::deletions_to_stop(&decision, &policy);
    let stopped = match &stops {
        Some((_, cursors)) if !cursors.is_empty() => {
            ctx.fence.check()?;
            stop_deletions(&resolved, cursors).await
        }
        _ => Vec::new(),
    };
    let mut status = match decision {
        Decision::Start => {
            info!(dry_run = policy.spec.dry_run, "sweep started");
            let mut status = plan::begin_sweep(&policy, now);
            if let Some(current) = status.current_sweep.as_mut() {
                current.subject_holds = holds_tag.clone();
            }
            status
        }
        _ => policy.status.clone().unwrap_or_default(),
    };
    status.targets = plan::aligned_targets(&policy, &status.targets);
    let names: Vec<String> = policy.spec.targets.iter().map(|t| t.name.clone()).collect();
    let stop_events = stops.map_or_else(Vec::new, |(cause, _)| {
        plan::record_stops(&mut status, &names, cause, &stopped)
    });
    let stop_failed = stopped
        .iter()
        .any(|(_, o)| matches!(o, plan::StopOutcome::Failed(_)));
    if matches!(decision, Decision::Invalid(_) | Decision::Suspended) {
        plan::release_targets(&mut status);
    } else {
        plan::apply_holds(&mut status, &target_holds);
        cancel_held_deletions(&resolved, &mut status).await;
    }
    let mut completed = None;
    let mut poll_after: Option<Duration> = None;
    if matches!(decision, Decision::Start | Decision::Continue) {
        // The policy's consecutive failed tries, this one included if it fails too.
        let attempt = ctx.failures(&key).saturating_add(1);
        poll_after = run_steps(
            &policy,
            &ctx,
            &resolved,
            &held_subjects,
            &mut status,
            attempt,
        )
        .await;
        if let Ok(parsed) = &parsed_schedule {
            let retry = super::backoff_for(ctx.failures(&key).saturating_add(1))
                .max(Duration::from_secs(30));
            completed = plan::finish_if_done(&mut status, parsed, created, Timestamp::now(), retry);
        }
        if completed.is_some() {
            let head = audit::receipt::emit(
                &audit::receipt::sweep_record(&policy, &status),
                &audit::receipt::policy_stream(&policy),
                status.receipts.take(),
                ctx.sink_prefix(),
            );
            if let Some(last) = status.last_sweep.as_mut() {
                last.receipt = Some(head.digest.clone());
            }
            status.receipts = Some(head);
        }
    }

    // 4. Compute status.
    let invalid = match &decision {
        Decision::Invalid(msg) => Some(msg.as_str()),
        _ => None,
    };
    if let Decision::Wait(due) = decision {
        if status.current_sweep.is_none() && status.next_sweep_time.is_none() && due > now {
            status.next_sweep_time = Some(due);
        }
    }
    if decision == Decision::Suspended {
        status.next_sweep_time = None;
    }
    status.observed_generation = policy.metadata.generation;
    let period = parsed_schedule
        .as_ref()
        .map_or(schedule::DEFAULT_INTERVAL_SECS, |s| s.period_secs(now));
    status.conditions = plan::conditions(
        &policy,
        &status,
        invalid,
        &problems,
        period,
        Timestamp::now(),
    );

    // 5. Write the receipts waiting for the sink, then status if it changed, and tell what
    // happened.
    let receipts_waiting = ctx.upload_receipts(&policy, &mut status.receipts).await;
    let previous = policy.status.clone().unwrap_or_default();
    if policy.status.as_ref() != Some(&status) {
        match (
            ctx.apply_status(&api, &policy.name_any(), &status).await,
            invalid,
        ) {
            (Ok(_), _) => {}
            (Err(e), Some(message)) if refused_by_schema(&e) => {
                // Stored before the schema was tightened (no validation ratcheting before
                // Kubernetes 1.28): the API server refuses every status write on it. Say so
                // in an Event and wait for an edit instead of retrying.
                warn!(reason = "InvalidSpec", error = %e, "the policy is invalid and its status cannot be written");
                ctx.publish(
                    &policy,
                    EventType::Warning,
                    "InvalidSpec",
                    "Validate",
                    format!("{message} (the status cannot be written either: the stored object violates the installed CRD schema; edit the policy)"),
                )
                .await;
                return Ok(Action::await_change());
            }
            (Err(e), _) => return Err(e),
        }
    }
    publish_all(&policy, &ctx, "Cancel", stop_events).await;
    report(&policy, &ctx, &previous, &status, completed.as_ref()).await;
    if let Some(done) = &completed {
        if matches!(
            done.outcome,
            SweepOutcome::Failed | SweepOutcome::PartiallyFailed
        ) {
            ctx.backoff(&key);
        } else {
            ctx.reset_failures(&key);
        }
    }

    // 6. Requeue while work remains; otherwise wake up when the next sweep is due. Receipts
    // waiting for the sink are tried again with back-off whatever else waits.
    let receipts_key = format!("{key}/receipts");
    if !receipts_waiting {
        ctx.reset_failures(&receipts_key);
    } else if status.current_sweep.is_none() && !ctx.shutdown.is_cancelled() {
        return Ok(Action::requeue(ctx.backoff(&receipts_key)));
    }
    Ok(if ctx.shutdown.is_cancelled() || invalid.is_some() {
        // An invalid spec waits for an edit; a sweep it interrupted is not polled.
        Action::await_change()
    } else if decision == Decision::Held {
        // Lifting the hold triggers a reconcile through the LegalHold watch; expiry does not.
        hold_expiry.map_or(Action::await_change(), |expiry| {
            let wait = (expiry.0 - Timestamp::now().0)
                .to_std()
                .unwrap_or(Duration::ZERO);
            Action::requeue(wait + Duration::from_secs(1))
        })
    } else if decision == Decision::Suspended {
        // A suspended policy waits for an edit; a deletion its store could not be asked to
        // stop is asked again.
        if stop_failed {
            Action::requeue(STOP_RETRY)
        } else {
            Action::await_change()
        }
    } else if status.current_sweep.is_some() {
        if status.targets.iter().any(plan::retrying) {
            // A step failed and is retried, with back-off, from where it left off.
            Action::requeue(ctx.backoff(&key))
        } else {
            ctx.reset_failures(&key);
            Action::requeue(poll_after.unwrap_or(Duration::ZERO))
        }
    } else if problems
        .iter()
        .any(|(_, p)| p.category == Category::Transient)
    {
        Action::requeue(STORE_PENDING_RETRY)
    } else if let Some(next) = status.next_sweep_time {
        let wait = (next.0 - Timestamp::now().0)
            .to_std()
            .unwrap_or(Duration::ZERO);
        Action::requeue(wait + Duration::from_secs(1))
    } else {
        Action::await_change()
    })
}

/// Whether the API server refused a write because the stored object fails the installed
/// schema: 422 Invalid, or 500 when a list-map key is duplicated (server-side apply cannot
/// even build the live object).
fn refused_by_schema(e: &Error) -> bool {
    matches!(e, Error::Kube(kube::Error::Api(s)) if s.code == 422 || s.code == 500)
}

/// Resolves each target's DataStore into a backend.
async fn dereference(policy: &RetentionPolicy, ctx: &Context) -> Vec<ResolvedTarget> {
    let namespace = policy.namespace().unwrap_or_default();
    let mut resolved = Vec::with_capacity(policy.spec.targets.len());
    for target in &policy.spec.targets {
        resolved.push(resolve_target(ctx, &namespace, target).await);
    }
    resolved
}

/// Runs one step of every target still sweeping, concurrently, and folds the results into
/// `status`. Returns how long to wait when every remaining target waits on its store.
async fn run_steps(
    policy: &RetentionPolicy,
    ctx: &Context,
    resolved: &[ResolvedTarget],
    held: &backends::HeldSubjects,
    status: &mut RetentionPolicyStatus,
    attempt: u32,
) -> Option<Duration> {
    let current = status.current_sweep.clone()?;
    // Checked: validation bounds the retention, and no spec may panic the operator anyway.
    let Some(cutoff) = current
        .start_time
        .0
        .checked_sub_signed(policy.spec.retention.as_chrono())
    else {
        let now = Timestamp::now();
        for target in &mut status.targets {
            if target.phase == TargetPhase::Sweeping {
                let result = StepResult::Failed(Failure::new(
                    Category::InvalidSpec,
                    "InvalidSpec",
                    format!(
                        "retention {} reaches before any date",
                        policy.spec.retention
                    ),
                ));
                plan::apply_step(target, result, current.dry_run, now);
            }
        }
        return None;
    };
    let claim = Claim::sweep(&policy.namespace().unwrap_or_default(), &policy.name_any());
    let steps = policy
        .spec
        .targets
        .iter()
        .zip(resolved)
        .zip(status.targets.iter())
        .enumerate()
        .filter_map(|(i, ((target, resolved), target_status))| {
            if target_status.phase != TargetPhase::Sweeping {
                return None;
            }
            let cursor = target_status.cursor.clone();
            let job = SweepJob {
                target: target.clone(),
                retention: policy.spec.retention,
                dry_run: current.dry_run,
                cutoff,
                held: held.clone(),
            };
            let claim = claim.clone();
            Some(async move {
                let result = match resolved {
                    ResolvedTarget::Ready {
                        backend,
                        kind,
                        store_key,
                    } => {
                        match ctx
                            .engine
                            .sweep_step(
                                claim,
                                store_key,
                                backend.as_ref(),
                                &job,
                                cursor.as_deref(),
                                &ctx.shutdown,
                            )
                            .await
                        {
                            Ok(mut step) => {
                                // Test-only (debug builds): count every batch twice, the
                                // bug the chaos tests must report.
                                if crate::planted_bug("double-count") {
                                    step.deleted = step.deleted.saturating_mul(2);
                                }
                                if !job.dry_run {
                                    ctx.metrics.deleted(kind.as_str(), step.deleted);
                                }
                                StepResult::Ran(step)
                            }
                            Err(e) => StepResult::Failed(e.failure()),
                        }
                    }
                    ResolvedTarget::Problem(problem) => StepResult::Failed(problem.failure()),
                };
                (i, result)
            })
        });
    let results = join_all(steps).await;
    let mut poll_after: Option<Duration> = None;
    let mut all_waiting = true;
    let now = Timestamp::now();
    for (i, result) in results {
        let failure = match &result {
            StepResult::Ran(step) => {
                // What the adapter tells besides the counts (a checkpoint it could not read
                // and started over from, a step far beyond its budget): a Warning Event each.
                for notice in &step.notices {
                    let target = &policy.spec.targets[i].name;
                    let note = format!("target {target}: {}", notice.message);
                    ctx.publish(policy, EventType::Warning, notice.reason, "Sweep", note)
                        .await;
                }
                match &step.next {
                    Next::Wait { poll_after: p, .. } => {
                        poll_after = Some(poll_after.map_or(*p, |w| w.min(*p)))
                    }
                    Next::Continue(_) => all_waiting = false,
                    Next::Done => {}
                }
                step.failure.as_ref().map(backends::Error::failure)
            }
            StepResult::Failed(failure) => Some(failure.clone()),
        };
        if let Some(failure) = failure {
            warn!(target = %policy.spec.targets[i].name, reason = failure.reason, category = failure.category.as_str(), message = %failure.message, "sweep step failed");
            ctx.metrics.reconcile_error(CONTROLLER, failure.reason);
        }
        plan::apply_attempt(
            &mut status.targets[i],
            result,
            current.dry_run,
            now,
            attempt,
        );
    }
    if all_waiting {
        poll_after
    } else {
        None
    }
}

/// Reads the identifiers of every held subject named by Secret. Fail closed: a Secret that is
/// missing, unreadable or not text makes the subject unreadable (the caller then holds every
/// target), never "not held". Identifiers stay in memory; only reasons are logged.
async fn read_held_subjects(
    ctx: &Context,
    namespace: &str,
    subjects: Vec<(String, HeldSubject)>,
) -> Vec<(String, plan::HeldSubjectRead)> {
    use plan::HeldSubjectRead as Read;
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let mut out = Vec::with_capacity(subjects.len());
    for (hold, subject) in subjects {
        let read = match (&subject.secret_ref, &subject.digest) {
            (Some(secret), _) => match secrets.get_opt(&secret.name).await {
                Ok(Some(s)) => match secret_identifiers(s) {
                    Some(ids) if !ids.is_empty() => Read::Identifiers(ids),
                    Some(_) => Read::Unreadable {
                        hold: hold.clone(),
                        reason: format!("Secret {} holds no identifier", secret.name),
                    },
                    None => Read::Unreadable {
                        hold: hold.clone(),
                        reason: format!("Secret {} holds a value that is not text", secret.name),
                    },
                },
                Ok(None) => Read::Unreadable {
                    hold: hold.clone(),
                    reason: format!("Secret {} not found", secret.name),
                },
                Err(e) => Read::Unreadable {
                    hold: hold.clone(),
                    reason: format!(
                        "reading Secret {}: {}",
                        secret.name,
                        Error::Kube(e).reason()
                    ),
                },
            },
            (None, _) => Read::DigestOnly { hold: hold.clone() },
        };
        if let Read::Unreadable { hold, reason } = &read {
            warn!(hold = %hold, %reason, "cannot read a held subject's identifiers: sweeps hold every target");
        }
        out.push((hold, read));
    }
    out
}

/// The identifiers in a Secret (each key a type), trimmed, empty values dropped; None when a
/// value is not UTF-8.
fn secret_identifiers(secret: Secret) -> Option<BTreeMap<String, String>> {
    let mut ids = BTreeMap::new();
    for (k, v) in secret.data.unwrap_or_default() {
        ids.insert(k, String::from_utf8(v.0).ok()?);
    }
    ids.extend(secret.string_data.unwrap_or_default());
    Some(
        ids.into_iter()
            .map(|(k, v)| (k, v.trim().to_string()))
            .filter(|(_, v)| !v.is_empty())
            .collect(),
    )
}

/// Holds win: a deletion a store runs by itself (a Loki delete request in its cancel period,
/// an Elasticsearch task) that a hold now covers is cancelled while it still can be. The
/// target then starts that work over once released.
async fn cancel_held_deletions(resolved: &[ResolvedTarget], status: &mut RetentionPolicyStatus) {
    for (target, resolved) in status.targets.iter_mut().zip(resolved) {
        let (Some(cursor), Some(backend)) = (target.cursor.clone(), resolved.backend()) else {
            continue;
        };
        if target.phase != TargetPhase::Held {
            continue;
        }
        match backend.cancel(&cursor).await {
            Ok(backends::Cancel::Cancelled { deleted }) => {
                info!(target = %target.name, deleted, "cancelled the store's deletion under way: a LegalHold covers it");
                target.cursor = None;
                // What it deleted before it stopped is deleted all the same: counted.
                target.deleted = target.deleted.saturating_add(deleted);
                target.deleted_total = target.deleted_total.saturating_add(deleted);
            }
            Ok(_) => {}
            Err(e) => {
                warn!(target = %target.name, reason = e.reason(), error = %e, "could not cancel the store's deletion under way")
            }
        }
    }
}

/// Asks the stores to stop the deletions they run by themselves under `cursors` (target
/// index, cursor).
async fn stop_deletions(
    resolved: &[ResolvedTarget],
    cursors: &[(usize, String)],
) -> Vec<(usize, plan::StopOutcome)> {
    use plan::StopOutcome;
    let mut outcomes = Vec::with_capacity(cursors.len());
    for (i, cursor) in cursors {
        let outcome = match resolved.get(*i) {
            Some(ResolvedTarget::Ready { backend, .. }) => match backend.cancel(cursor).await {
                Ok(c) => StopOutcome::Stopped(c),
                Err(e) => StopOutcome::Failed(format!("{}: {e}", e.reason())),
            },
            Some(ResolvedTarget::Problem(p)) => {
                StopOutcome::StoreGone(format!("{}: {}", p.reason, p.message))
            }
            None => StopOutcome::StoreGone("StoreNotReady: store unresolved".into()),
        };
        match &outcome {
            StopOutcome::Stopped(c) => {
                info!(target = *i, outcome = ?c, "asked the store to stop its deletion under way")
            }
            StopOutcome::Failed(e) | StopOutcome::StoreGone(e) => {
                warn!(target = *i, error = %e, "could not cancel the store's deletion under way")
            }
        }
        outcomes.push((*i, outcome));
    }
    outcomes
}

async fn publish_all(
    policy: &RetentionPolicy,
    ctx: &Context,
    action: &str,
    events: Vec<plan::EventNote>,
) {
    for (warning, reason, note) in events {
        let type_ = if warning {
            EventType::Warning
        } else {
            EventType::Normal
        };
        ctx.publish(policy, type_, reason, action, note).await;
    }
}

/// Adds the finalizer when it is missing. A merge patch carrying the resourceVersion read,
/// so a concurrent change to the finalizers is never overwritten (409, retried). Only while
/// this instance leads.
async fn add_finalizer(
    api: &Api<RetentionPolicy>,
    policy: &RetentionPolicy,
    ctx: &Context,
) -> Result<(), Error> {
    let Some(finalizers) = super::with_finalizer(policy.finalizers(), plan::FINALIZER) else {
        return Ok(());
    };
    ctx.patch_finalizers(api, policy, finalizers).await
}

/// A deleted policy: cancel what its stores still run for it, then release the finalizer.
/// A store that is gone releases it at once; one that cannot be reached is tried again for
/// [`FINALIZER_PATIENCE`], then released. Whatever could not be cancelled is said in a
/// Warning Event.
async fn finalize(
    api: &Api<RetentionPolicy>,
    policy: &RetentionPolicy,
    ctx: &Context,
) -> Result<Action, Error> {
    let Some(finalizers) = super::without_finalizer(policy.finalizers(), plan::FINALIZER) else {
        return Ok(Action::await_change());
    };
    let key = failure_key(policy);
    let cursors = policy
        .status
        .as_ref()
        .map(|s| plan::cursors(policy, s))
        .unwrap_or_default();
    let mut outcomes = Vec::new();
    if !cursors.is_empty() {
        ctx.fence.check()?;
        let resolved = dereference(policy, ctx).await;
        outcomes = stop_deletions(&resolved, &cursors).await;
    }
    let now = Timestamp::now();
    let deleted_at = policy
        .metadata
        .deletion_timestamp
        .as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.0.as_second(), 0))
        .map_or(now, Timestamp);
    if !plan::may_release(&outcomes, deleted_at, now, FINALIZER_PATIENCE) {
        // Nothing is recorded: the cursors stay as they are and are asked about again.
        return Ok(Action::requeue(ctx.backoff(&key).min(STOP_RETRY)));
    }
    let mut status = policy.status.clone().unwrap_or_default();
    status.targets = plan::aligned_targets(policy, &status.targets);
    let names: Vec<String> = policy.spec.targets.iter().map(|t| t.name.clone()).collect();
    let events = plan::record_stops(&mut status, &names, plan::StopCause::Deleted, &outcomes);
    let unresolved = events.iter().any(|(warning, _, _)| *warning);
    publish_all(policy, ctx, "Finalize", events).await;
    if unresolved {
        ctx.publish(
            policy,
            EventType::Warning,
            "FinalizerReleased",
            "Finalize",
            "released the finalizer although a store-side deletion could not be cancelled (see the events before)".into(),
        )
        .await;
    }
    ctx.patch_finalizers(api, policy, finalizers).await?;
    ctx.reset_failures(&key);
    info!("finalizer released");
    Ok(Action::await_change())
}

/// Events and metrics for what changed: a completed sweep, a spec that became invalid.
async fn report(
    policy: &RetentionPolicy,
    ctx: &Context,
    previous: &RetentionPolicyStatus,
    status: &RetentionPolicyStatus,
    completed: Option<&plan::Completed>,
) {
    let held = |s: &RetentionPolicyStatus| {
        s.targets
            .iter()
            .find(|t| t.phase == TargetPhase::Held)
            .map(|t| t.message.clone())
    };
    match (held(previous), held(status)) {
        (None, Some(message)) => {
            ctx.publish(
                policy,
                EventType::Normal,
                "Held",
                "Hold",
                format!("Sweeps {message}"),
            )
            .await
        }
        (Some(_), None) => {
            ctx.publish(
                policy,
                EventType::Normal,
                "Released",
                "Hold",
                "No LegalHold holds this policy any more".into(),
            )
            .await
        }
        _ => {}
    }
    if let Some(done) = completed {
        ctx.metrics
            .sweep_completed(done.outcome.as_str(), done.seconds);
        let failed: Vec<String> = status
            .targets
            .iter()
            .filter(|t| t.phase == TargetPhase::Failed)
            .map(|t| format!("{}: {}", t.name, t.message))
            .collect();
        let (type_, reason, note) = match done.outcome {
            SweepOutcome::Succeeded => (
                EventType::Normal,
                "SweepCompleted",
                format!("Deleted {} expired items", done.deleted),
            ),
            SweepOutcome::DryRun => (
                EventType::Normal,
                "DryRunCompleted",
                format!("Would delete {} expired items", done.deleted),
            ),
            _ => (
                EventType::Warning,
                "SweepFailed",
                format!(
                    "Sweep {}; deleted {}; {}",
                    done.outcome.as_str(),
                    done.deleted,
                    failed.join("; ")
                ),
            ),
        };
        info!(
            outcome = done.outcome.as_str(),
            deleted = done.deleted,
            seconds = done.seconds,
            "sweep completed"
        );
        ctx.publish(policy, type_, reason, "Sweep", note).await;
    }
    let ready_before =
        find_condition(&previous.conditions, "Ready").map(|c| (c.status, c.reason.clone()));
    if let Some(ready) = find_condition(&status.conditions, "Ready") {
        if ready.status == ConditionStatus::False
            && ready_before != Some((ready.status, ready.reason.clone()))
        {
            ctx.publish(
                policy,
                EventType::Warning,
                &ready.reason,
                "Validate",
                ready.message.clone(),
            )
            .await;
        }
    }
}

pub fn error_policy(policy: Arc<RetentionPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(CONTROLLER, error.reason());
    warn!(policy = %object_key(policy.as_ref()), reason = error.reason(), error = %error, "reconcile failed");
    Action::requeue(ctx.backoff(&failure_key(policy.as_ref())))
}
