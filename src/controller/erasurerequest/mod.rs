//! ErasureRequest: resolve the subject (identifiers → keyed digest) → check holds → run the
//! action of the current phase on every target (find, erase, verify) → derive the phase
//! (pure) → write status if it changed → requeue while work remains. Identifiers live only in
//! memory for the length of a reconcile; status, events, logs and receipts carry the digest.

pub mod plan;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ListParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tracing::{info, instrument, warn};

use super::retentionpolicy::{resolve_target, ResolvedTarget};
use super::{object_key, Context, Error};
use crate::api::common::{find_condition, ConditionStatus};
use crate::api::datastore::DataStore;
use crate::api::erasurerequest::{
    ErasurePhase, ErasureRequest, ErasureRequestStatus, ErasureTargetPhase, ErasureTargetStatus,
};
use crate::api::legalhold::LegalHold;
use crate::api::retentionpolicy::RetentionPolicy;
use crate::api::Timestamp;
use crate::audit::{self, identifier_digests, subject_digest};
use crate::backends::{Next, SubjectAction, SubjectJob};
use plan::ActionResult;

pub const CONTROLLER: &str = "erasurerequest";

#[instrument(skip_all, fields(request = %object_key(obj.as_ref())))]
pub async fn reconcile(obj: Arc<ErasureRequest>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciled(CONTROLLER);
    let namespace = obj.namespace().unwrap_or_default();
    let Some((api, request)) = super::fetch_fresh(&ctx.client, obj.as_ref()).await? else {
        return Ok(Action::await_change());
    };
    let previous = request.status.clone().unwrap_or_default();
    let now = Timestamp::now();
    if previous.phase == ErasurePhase::Completed {
        // Final: nothing runs again; an edit since is only reported.
        if previous.observed_generation != request.metadata.generation {
            let mut status = previous.clone();
            status.conditions = plan::conditions(&request, &status, &[], true, now);
            if status != previous {
                ctx.apply_status(&api, &request.name_any(), &status).await?;
            }
        }
        return Ok(Action::await_change());
    }
    let mut status = previous.clone();
    let started = status.subject_digest.is_some();
    // The spec a request started under is the one it finishes under.
    let spec_ignored = started && status.observed_generation != request.metadata.generation;
    if !started {
        status.observed_generation = request.metadata.generation;
    }

    // 1. The subject: identifiers (memory only) and their keyed digest.
    let identifiers = match identifiers(&ctx, &request).await {
        Ok(ids) => ids,
        Err(e) => return wait_on_error(&ctx, &api, &request, status, e, spec_ignored).await,
    };
    let key = audit::load_or_create_key(&ctx.client, &ctx.settings.operator_namespace)
        .await
        .map_err(|e| Error::Digest(e.reason(), e.to_string()))?;
    let digest = subject_digest(&key, &identifiers);
    if status.subject_digest.as_ref().is_some_and(|d| *d != digest) {
        let e = Error::InvalidSpec(
            "the subject's identifiers changed after the request started".into(),
        );
        status.phase = ErasurePhase::Failed;
        return wait_on_error(&ctx, &api, &request, status, e, spec_ignored).await;
    }
    status.subject_digest = Some(digest.clone());
    let received = status
        .received_at
        .or(request.spec.received_at)
        .unwrap_or_else(|| super::creation_time(&request, now));
    status.received_at = Some(received);
    status.deadline = Some(plan::deadline(received));

    // 2. Holds: on the subject (the whole request) or on policies (their targets).
    let (subject_holds, held_policies, hold_expiry) =
        holds(&ctx, &namespace, &key, &identifiers, now).await?;
    if status.phase == ErasurePhase::Pending {
        status.targets = scope(&ctx, &request).await?;
    }
    for t in &mut status.targets {
        let settled = matches!(
            t.phase,
            ErasureTargetPhase::Verified
                | ErasureTargetPhase::NothingFound
                | ErasureTargetPhase::Skipped
        );
        if held_policies.contains_key(&t.policy) && !settled {
            t.phase = ErasureTargetPhase::Blocked;
            t.message = format!("policy {} is held by a LegalHold", t.policy);
        } else if t.phase == ErasureTargetPhase::Blocked && !held_policies.contains_key(&t.policy) {
            t.phase = ErasureTargetPhase::Pending;
            t.message.clear();
            t.cursor = None;
        }
    }
    cancel_held_deletions(
        &ctx,
        &request,
        &mut status.targets,
        !subject_holds.is_empty(),
    )
    .await;
    let mut blocked_by = subject_holds.clone();
    blocked_by.extend(held_policy_names(&status.targets, &held_policies));
    blocked_by.sort();
    blocked_by.dedup();

    // 3. One action per target for the current phase, then the phase that follows.
    let mut poll_after = None;
    if !subject_holds.is_empty() {
        status.phase = ErasurePhase::Blocked;
    } else {
        status.phase = plan::resume_phase(status.phase, &status.targets);
        if status.phase != ErasurePhase::Blocked {
            poll_after = run_actions(&ctx, &request, &identifiers, &mut status).await;
            status.phase = plan::next_phase(status.phase, &status.targets, request.spec.dry_run);
        }
    }
    status.totals = Some(plan::totals(&status.targets));
    let completed = status.phase == ErasurePhase::Completed;
    if completed {
        status.completion_time = Some(Timestamp::now());
        status.receipt = Some(audit::receipt::emit(&audit::receipt::erasure_record(
            &request, &status,
        )));
    }
    status.conditions = plan::conditions(
        &request,
        &status,
        &blocked_by,
        spec_ignored,
        Timestamp::now(),
    );

    // 4. Write, tell, clean up.
    if request.status.as_ref() != Some(&status) {
        ctx.apply_status(&api, &request.name_any(), &status).await?;
    }
    report(&ctx, &request, &previous, &status).await;
    if completed && !request.spec.dry_run && !request.spec.retain_subject_secret {
        if let Some(secret) = &request.spec.subject.secret_ref {
            delete_secret(&ctx, &namespace, &secret.name).await;
        }
    }

    // 5. Requeue while work remains.
    let key = object_key(&request);
    let failing = status
        .targets
        .iter()
        .any(|t| t.phase == ErasureTargetPhase::Failed);
    Ok(match status.phase {
        ErasurePhase::Completed | ErasurePhase::Failed => Action::await_change(),
        _ if ctx.shutdown.is_cancelled() => Action::await_change(),
        ErasurePhase::Blocked => {
            let until_deadline = status.deadline.map(|d| until(d, now));
            let wake = [hold_expiry.map(|e| until(e, now)), until_deadline]
                .into_iter()
                .flatten()
                .min();
            wake.map_or(Action::await_change(), |w| {
                Action::requeue(w + Duration::from_secs(1))
            })
        }
        _ if failing => Action::requeue(ctx.backoff(&key)),
        _ => {
            ctx.reset_failures(&key);
            Action::requeue(poll_after.unwrap_or(Duration::ZERO))
        }
    })
}

fn until(t: Timestamp, now: Timestamp) -> Duration {
    (t.0 - now.0).to_std().unwrap_or(Duration::ZERO)
}

/// The subject's identifiers: each key of the Secret, then the inline (pseudonymous) ones.
async fn identifiers(
    ctx: &Context,
    request: &ErasureRequest,
) -> Result<BTreeMap<String, String>, Error> {
    let mut ids = BTreeMap::new();
    if let Some(secret) = &request.spec.subject.secret_ref {
        ids.extend(
            secret_identifiers(ctx, &request.namespace().unwrap_or_default(), &secret.name).await?,
        );
    }
    ids.extend(request.spec.subject.identifiers.clone().unwrap_or_default());
    ids.retain(|_, v| !v.trim().is_empty());
    if ids.is_empty() {
        return Err(Error::InvalidSpec("the subject has no identifiers".into()));
    }
    Ok(ids)
}

async fn secret_identifiers(
    ctx: &Context,
    namespace: &str,
    name: &str,
) -> Result<BTreeMap<String, String>, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(Error::Kube)?
        .ok_or_else(|| Error::SecretNotFound(name.into()))?;
    let mut ids = BTreeMap::new();
    for (k, v) in secret.data.unwrap_or_default() {
        let value = String::from_utf8(v.0).map_err(|_| Error::SecretKeyMissing {
            secret: name.into(),
            key: k.clone(),
        })?;
        ids.insert(k, value);
    }
    ids.extend(secret.string_data.unwrap_or_default());
    Ok(ids)
}

/// The holds in force in the namespace: names of those holding this subject, the policies
/// held, and the earliest expiry among them.
async fn holds(
    ctx: &Context,
    namespace: &str,
    key: &audit::DigestKey,
    identifiers: &BTreeMap<String, String>,
    now: Timestamp,
) -> Result<(Vec<String>, BTreeMap<String, String>, Option<Timestamp>), Error> {
    let api: Api<LegalHold> = Api::namespaced(ctx.client.clone(), namespace);
    let ours: BTreeSet<String> = identifier_digests(key, identifiers);
    let whole = subject_digest(key, identifiers);
    let mut subject_holds = Vec::new();
    let mut held_policies = BTreeMap::new();
    let mut expiry: Option<Timestamp> = None;
    for hold in api
        .list(&ListParams::default())
        .await
        .map_err(Error::Kube)?
        .items
    {
        if !super::legalhold::is_active(&hold, now) {
            continue;
        }
        let mut relevant = false;
        for policy in hold.spec.policies.clone().unwrap_or_default() {
            held_policies.insert(policy, hold.name_any());
            relevant = true;
        }
        for held in hold.spec.subjects.clone().unwrap_or_default() {
            let matches = match (&held.digest, &held.secret_ref) {
                (Some(d), _) => ours.contains(d) || *d == whole,
                (None, Some(secret)) => {
                    match secret_identifiers(ctx, namespace, &secret.name).await {
                        Ok(theirs) => !identifier_digests(key, &theirs).is_disjoint(&ours),
                        Err(e) => {
                            warn!(hold = %hold.name_any(), reason = e.reason(), "cannot read a held subject's Secret");
                            false
                        }
                    }
                }
                (None, None) => false,
            };
            if matches {
                subject_holds.push(hold.name_any());
                relevant = true;
            }
        }
        if relevant {
            if let Some(e) = hold.spec.expires_at {
                expiry = Some(expiry.map_or(e, |x| x.min(e)));
            }
        }
    }
    Ok((subject_holds, held_policies, expiry))
}

fn held_policy_names(
    targets: &[ErasureTargetStatus],
    held: &BTreeMap<String, String>,
) -> Vec<String> {
    targets
        .iter()
        .filter(|t| t.phase == ErasureTargetPhase::Blocked)
        .filter_map(|t| held.get(&t.policy).cloned())
        .collect()
}

/// The targets in scope: the named policies, or every policy in the namespace, keeping the
/// targets that have a subject locator.
async fn scope(ctx: &Context, request: &ErasureRequest) -> Result<Vec<ErasureTargetStatus>, Error> {
    let namespace = request.namespace().unwrap_or_default();
    let api: Api<RetentionPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut targets = Vec::new();
    let policies: Vec<(String, Option<RetentionPolicy>)> = match &request.spec.policies {
        Some(names) => {
            let mut found = Vec::new();
            for name in names {
                found.push((name.clone(), api.get_opt(name).await.map_err(Error::Kube)?));
            }
            found
        }
        None => api
            .list(&ListParams::default())
            .await
            .map_err(Error::Kube)?
            .items
            .into_iter()
            .map(|p| (p.name_any(), Some(p)))
            .collect(),
    };
    for (name, policy) in policies {
        let Some(policy) = policy else {
            targets.push(ErasureTargetStatus {
                policy: name.clone(),
                phase: ErasureTargetPhase::Failed,
                message: format!("StoreNotFound: RetentionPolicy {name} not found"),
                ..Default::default()
            });
            continue;
        };
        // A target of an invalid policy (see the policy's Ready condition) never runs.
        let invalid = super::retentionpolicy::plan::validate(&policy.spec).err();
        for t in policy.spec.targets.iter().filter(|t| t.subject.is_some()) {
            let problems: Vec<&str> = invalid
                .iter()
                .flatten()
                .filter(|e| e.target.as_ref().is_none_or(|n| *n == t.name))
                .map(|e| e.message.as_str())
                .collect();
            let (phase, message) = if problems.is_empty() {
                (ErasureTargetPhase::Pending, String::new())
            } else {
                (
                    ErasureTargetPhase::Failed,
                    format!(
                        "InvalidSpec: RetentionPolicy {name} is invalid: {}",
                        problems.join("; ")
                    ),
                )
            };
            targets.push(ErasureTargetStatus {
                policy: name.clone(),
                target: t.name.clone(),
                store: t.store.clone(),
                phase,
                message,
                ..Default::default()
            });
        }
    }
    Ok(targets)
}

/// Runs the current phase's action on every target that needs it, concurrently. Returns how
/// long to wait before polling again when a store is working on a deletion of its own.
async fn run_actions(
    ctx: &Context,
    request: &ErasureRequest,
    identifiers: &BTreeMap<String, String>,
    status: &mut ErasureRequestStatus,
) -> Option<Duration> {
    let namespace = request.namespace().unwrap_or_default();
    let policies: Api<RetentionPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let stores: Api<DataStore> = Api::namespaced(ctx.client.clone(), &namespace);
    let phase = status.phase;
    let work = status.targets.iter().enumerate().filter_map(|(i, t)| {
        let action = plan::action_for(phase, t, request.spec.dry_run)?;
        let (policies, stores, namespace) = (policies.clone(), stores.clone(), namespace.clone());
        let (policy_name, target_name) = (t.policy.clone(), t.target.clone());
        let cursor = t.cursor.clone();
        Some(async move {
            let (result, kind, poll_after) = run_action(
                ctx,
                &policies,
                &stores,
                &namespace,
                &policy_name,
                &target_name,
                identifiers,
                action,
                cursor.as_deref(),
            )
            .await;
            (i, action, result, kind, poll_after)
        })
    });
    let mut wait: Option<Duration> = None;
    for (i, action, result, kind, poll_after) in join_all(work).await {
        if let Some(p) = poll_after {
            wait = Some(wait.map_or(p, |w| w.min(p)));
        }
        if let ActionResult::Failed { reason, message } = &result {
            warn!(target = %status.targets[i].target, reason, %message, "erasure step failed");
            ctx.metrics.reconcile_error(CONTROLLER, reason);
        }
        if let (SubjectAction::Erase, ActionResult::Done { count, .. }, Some(kind)) =
            (action, &result, kind)
        {
            ctx.metrics.erased(kind, *count);
        }
        plan::apply(&mut status.targets[i], action, result);
    }
    wait
}

#[allow(clippy::too_many_arguments)]
async fn run_action(
    ctx: &Context,
    policies: &Api<RetentionPolicy>,
    stores: &Api<DataStore>,
    namespace: &str,
    policy_name: &str,
    target_name: &str,
    identifiers: &BTreeMap<String, String>,
    action: SubjectAction,
    cursor: Option<&str>,
) -> (ActionResult, Option<&'static str>, Option<Duration>) {
    let failed = |e: Error| {
        (
            ActionResult::Failed {
                reason: e.reason(),
                message: e.to_string(),
            },
            None,
            None,
        )
    };
    let policy = match policies.get_opt(policy_name).await {
        Ok(Some(p)) => p,
        Ok(None) => {
            return failed(Error::InvalidSpec(format!(
                "RetentionPolicy {policy_name} not found"
            )))
        }
        Err(e) => return failed(Error::Kube(e)),
    };
    let Some(target) = policy.spec.targets.iter().find(|t| t.name == target_name) else {
        return failed(Error::InvalidSpec(format!(
            "policy {policy_name} has no target {target_name}"
        )));
    };
    let resolved = match resolve_target(ctx, stores, namespace, target).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let Some((backend, kind, store_key)) = resolved.backend else {
        let p = resolved
            .problem
            .unwrap_or(super::retentionpolicy::plan::Problem {
                reason: "StoreNotReady",
                message: "store unresolved".into(),
                transient: true,
            });
        return (
            ActionResult::Failed {
                reason: p.reason,
                message: p.message,
            },
            None,
            None,
        );
    };
    let locator = target
        .subject
        .as_ref()
        .is_some_and(|s| plan::locates_in(s, kind));
    if !locator {
        // The target has a locator, but for another kind of store: nothing to run here.
        let skipped = vec![format!(
            "no subject locator for store kind {}",
            kind.as_str()
        )];
        return (
            ActionResult::Done {
                count: 0,
                skipped,
                ran: false,
                blocked: 0,
                malformed: 0,
            },
            None,
            None,
        );
    }
    let job = SubjectJob {
        target: target.clone(),
        identifiers: identifiers.clone(),
        action,
    };
    match ctx
        .engine
        .subject_step(&store_key, backend.as_ref(), &job, cursor)
        .await
    {
        Ok(step) => match (step.failure, step.next) {
            (Some(e), _) => failed(e.into()),
            (None, Next::Wait { cursor, poll_after }) => {
                (ActionResult::InProgress { cursor }, None, Some(poll_after))
            }
            (None, Next::Continue(cursor)) => (
                ActionResult::InProgress { cursor },
                None,
                Some(Duration::ZERO),
            ),
            (None, Next::Done) => (
                ActionResult::Done {
                    count: step.count,
                    ran: step.ran,
                    skipped: step.skipped,
                    blocked: step.blocked,
                    malformed: step.malformed,
                },
                Some(kind.as_str()),
                None,
            ),
        },
        Err(e) => failed(e.into()),
    }
}

/// Holds win: the deletions stores run by themselves for targets a hold now covers (all of
/// them under a hold on the subject) are cancelled while they still can be; the work starts
/// over once the hold is lifted.
async fn cancel_held_deletions(
    ctx: &Context,
    request: &ErasureRequest,
    targets: &mut [ErasureTargetStatus],
    whole_request_held: bool,
) {
    let namespace = request.namespace().unwrap_or_default();
    let policies: Api<RetentionPolicy> = Api::namespaced(ctx.client.clone(), &namespace);
    let stores: Api<DataStore> = Api::namespaced(ctx.client.clone(), &namespace);
    for t in targets.iter_mut() {
        let Some(cursor) = t.cursor.clone() else {
            continue;
        };
        if !whole_request_held && t.phase != ErasureTargetPhase::Blocked {
            continue;
        }
        let Ok(Some(policy)) = policies.get_opt(&t.policy).await else {
            continue;
        };
        let Some(target) = policy.spec.targets.iter().find(|x| x.name == t.target) else {
            continue;
        };
        let Ok(ResolvedTarget {
            backend: Some((backend, _, _)),
            ..
        }) = resolve_target(ctx, &stores, &namespace, target).await
        else {
            continue;
        };
        match backend.cancel(&cursor).await {
            Ok(true) => {
                info!(target = %t.target, "cancelled the store's erasure under way: a LegalHold covers it");
                t.cursor = None;
            }
            Ok(false) => {}
            Err(e) => {
                warn!(target = %t.target, reason = e.reason(), error = %e, "could not cancel the store's erasure under way")
            }
        }
    }
}

/// Writes a waiting status for an error before any target ran (a missing Secret, …).
async fn wait_on_error(
    ctx: &Context,
    api: &Api<ErasureRequest>,
    request: &ErasureRequest,
    mut status: ErasureRequestStatus,
    error: Error,
    spec_ignored: bool,
) -> Result<Action, Error> {
    let now = Timestamp::now();
    status.conditions = plan::conditions(request, &status, &[], spec_ignored, now);
    if let Some(c) = status.conditions.iter_mut().find(|c| c.type_ == "Complete") {
        if c.reason != error.reason() {
            c.last_transition_time = now;
        }
        c.reason = error.reason().to_string();
        c.message = error.to_string();
    }
    if request.status.as_ref() != Some(&status) {
        ctx.apply_status(api, &request.name_any(), &status).await?;
    }
    ctx.metrics.reconcile_error(CONTROLLER, error.reason());
    Ok(
        if error.is_retryable() && status.phase != ErasurePhase::Failed {
            Action::requeue(ctx.backoff(&object_key(request)))
        } else {
            Action::await_change()
        },
    )
}

async fn delete_secret(ctx: &Context, namespace: &str, name: &str) {
    // Only an instance that still leads deletes anything.
    if ctx.fence.check().is_err() {
        return;
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    match secrets.delete(name, &DeleteParams::default()).await {
        Ok(_) => info!(
            secret = name,
            "deleted the identifiers Secret of a completed request"
        ),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => warn!(secret = name, error = %e, "could not delete the identifiers Secret"),
    }
}

/// Events on transitions: started, completed, blocked, overdue.
async fn report(
    ctx: &Context,
    request: &ErasureRequest,
    previous: &ErasureRequestStatus,
    status: &ErasureRequestStatus,
) {
    let totals = status.totals.clone().unwrap_or_default();
    if previous.phase != status.phase {
        match status.phase {
            ErasurePhase::Discovering if previous.phase == ErasurePhase::Pending => {
                let note = format!("Erasure started across {} targets", status.targets.len());
                ctx.publish(request, EventType::Normal, "ErasureStarted", "Erase", note)
                    .await;
            }
            ErasurePhase::Completed => {
                let note = if request.spec.dry_run {
                    format!("Dry run: found {} records; nothing erased", totals.found)
                } else {
                    format!(
                        "Erased {} records; verification found none left",
                        totals.erased
                    )
                };
                ctx.publish(
                    request,
                    EventType::Normal,
                    "ErasureCompleted",
                    "Erase",
                    note,
                )
                .await;
            }
            ErasurePhase::Blocked => {
                let note = find_condition(&status.conditions, "Blocked")
                    .map(|c| c.message.clone())
                    .unwrap_or_default();
                ctx.publish(request, EventType::Warning, "ErasureBlocked", "Erase", note)
                    .await;
            }
            _ => {}
        }
    }
    let overdue = |s: &ErasureRequestStatus| {
        find_condition(&s.conditions, "Overdue").is_some_and(|c| c.status == ConditionStatus::True)
    };
    if overdue(status) && !overdue(previous) {
        let note = format!(
            "Past the Art. 12(3) deadline {}",
            status.deadline.map(|d| d.to_string()).unwrap_or_default()
        );
        ctx.publish(request, EventType::Warning, "ErasureOverdue", "Erase", note)
            .await;
    }
}

pub fn error_policy(request: Arc<ErasureRequest>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_error(CONTROLLER, error.reason());
    warn!(request = %object_key(request.as_ref()), reason = error.reason(), error = %error, "reconcile failed");
    Action::requeue(ctx.backoff(&object_key(request.as_ref())))
}
