//! Pure planning for erasure requests: the deadline, which action each target needs next,
//! how the request's phase follows from its targets, totals and conditions.

use chrono::Months;

use crate::api::common::{merge_conditions, Condition, DesiredCondition};
use std::collections::BTreeMap;

use crate::api::erasurerequest::{
    ErasurePhase, ErasureRequest, ErasureRequestStatus, ErasureTargetPhase as T,
    ErasureTargetStatus, ErasureTotals, NamespaceProgress, NotSearched, RequestScope,
    RetainedCopiesStatus, Subject, SubjectSecretFate, ERASURE_OPT_OUT_LABEL,
    ERASURE_OPT_OUT_REASON_ANNOTATION, SUBJECT_IDENTIFIERS_LABEL,
};
use crate::api::retentionpolicy::SubjectLocator;
use crate::api::{StoreKind, Timestamp};
use crate::backends::{self, Category, Failure, SubjectAction};

/// Inline identifiers stay in etcd with the request (and in its backups) for as long as it
/// exists, so only pseudonymous ones may be given there: no e-mail address (a value with
/// `@`, or a type named like `email`). The message never contains the value.
pub fn validate_subject(subject: &Subject) -> Result<(), String> {
    for (id_type, value) in subject.identifiers.iter().flatten() {
        let lower = id_type.to_ascii_lowercase();
        let email_type = lower.contains("email") || lower.contains("e-mail") || lower == "mail";
        if email_type || value.contains('@') {
            return Err(format!(
                "spec.subject.identifiers.{id_type}: e-mail addresses may not be given inline \
                 (the value would stay in etcd with the request); put it in a Secret labelled \
                 {SUBJECT_IDENTIFIERS_LABEL}=true and name it in spec.subject.secretRef. Inline \
                 identifiers are for pseudonymous ids only"
            ));
        }
    }
    Ok(())
}

/// Why a request has nothing it could erase, or must not erase anything, if so (pure): no
/// target in scope (no policy with a subject locator, `policies: []`, or none of the named
/// policies exists); a named policy missing (the request would complete without it); or
/// every target skipped because no locator could run with the subject's identifier types.
/// Such a request ends `Failed`: nothing ran, so nothing may be reported erased.
pub fn nothing_in_scope(
    targets: &[ErasureTargetStatus],
    missing: &[String],
) -> Option<(&'static str, String)> {
    if targets.is_empty() && missing.is_empty() {
        return Some((
            "NothingInScope",
            "no RetentionPolicy in scope has a subject locator: nothing can be erased (name \
             policies with subject locators in spec.policies)"
                .into(),
        ));
    }
    if targets.is_empty() {
        return Some((
            "NothingInScope",
            format!(
                "none of the named RetentionPolicies exists ({}): nothing can be erased",
                missing.join(", ")
            ),
        ));
    }
    if !missing.is_empty() {
        return Some((
            "PolicyNotFound",
            format!(
                "the named RetentionPolicies {} do not exist: nothing is erased, so that the \
                 request cannot complete without them (file a new request)",
                missing.join(", ")
            ),
        ));
    }
    if targets.iter().all(|t| t.phase == T::Skipped) {
        let why: Vec<String> = targets
            .iter()
            .map(|t| format!("{}/{}: {}", t.policy, t.target, t.message))
            .collect();
        return Some((
            "NoApplicableLocator",
            format!(
                "no subject locator in scope can run with the identifier types the subject \
                 has, so nothing was erased; add the identifier types they need: {}",
                why.join("; ")
            ),
        ));
    }
    None
}

/// What becomes of the identifiers Secret of a completed request (pure): deleted only when
/// it is labelled as identifiers and a real erasure ran.
pub fn secret_fate(dry_run: bool, retain: bool, marked: bool) -> SubjectSecretFate {
    if dry_run {
        SubjectSecretFate::KeptDryRun
    } else if retain {
        SubjectSecretFate::KeptOnRequest
    } else if !marked {
        SubjectSecretFate::KeptUnmarked
    } else {
        SubjectSecretFate::Deleted
    }
}

/// Whether a Secret's labels mark it as a subject's identifiers.
pub fn is_marked(labels: Option<&BTreeMap<String, String>>) -> bool {
    labels
        .and_then(|l| l.get(SUBJECT_IDENTIFIERS_LABEL))
        .is_some_and(|v| v == "true")
}

/// A store's error on a subject path reduced to its kind: stores echo command arguments in
/// some errors (Redis does), and those arguments are the subject's identifiers, so only the
/// category, the reason and a fixed message reach status, events and logs. `InvalidSpec`
/// messages are the operator's own, written from the policy (never from an identifier), and
/// are kept.
pub fn redact(e: &backends::Error) -> Failure {
    use backends::Error as E;
    let fixed = match e {
        // The operator's own words, built from the policy and never from a value: what to fix.
        E::InvalidSpec(_)
        | E::IdentifierNotDistinctive(_)
        | E::UnparsedCopiesRemain(_)
        | E::DeletionModeFilterOnly(_)
        | E::DeleteRequestLost(_)
        // Built from task answers: counts, index names and error types, never a query.
        | E::StoreTaskFailed(_)
        | E::StoreTaskCancelled(_)
        | E::StoreTaskLost(_)
        | E::LeadershipLost => return e.failure(),
        E::Unreachable(_) => "cannot reach the store",
        E::AuthenticationFailed(_) => "the store refused the credentials",
        E::BucketNotFound(_) => "the bucket does not exist",
        E::Store(_) => "the store failed a command",
        E::ClusterRedirect(_) => "a cluster node redirected a command (a slot moved)",
    };
    Failure::new(
        e.category(),
        e.reason(),
        format!(
            "{fixed} (the store's own message is withheld on erasure paths: it may echo the \
             identifier; the DataStore's status shows connection problems)"
        ),
    )
}

/// How soon a request that waits on a person (a target that needs attention, an error that
/// is not retried with back-off) looks again: Secrets and what is in the stores are not
/// watched.
pub const ATTENTION_RECHECK: std::time::Duration = std::time::Duration::from_secs(60);

/// What a request does about a failure: decided here, from its category alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFailure {
    /// Retry with back-off, resuming from the target's cursor.
    Retry,
    /// Fail: the target is not tried again, and a request with nothing else left to do ends
    /// `Failed` (file a new one once the spec is fixed).
    Fail,
    /// Wait for a person, saying so in the `Complete` condition; looked at again every
    /// [`ATTENTION_RECHECK`], so that a fix is picked up by itself.
    Wait,
}

/// The decision for a failure of `category` (pure).
pub fn on_failure(category: Category) -> OnFailure {
    match category {
        Category::Transient | Category::Refused => OnFailure::Retry,
        Category::InvalidSpec => OnFailure::Fail,
        Category::NeedsAttention => OnFailure::Wait,
    }
}

/// The decision for a target, if it failed. A failure recorded without a category (by an
/// earlier version) is retried, as it was then.
pub fn target_failure(target: &ErasureTargetStatus) -> Option<OnFailure> {
    (target.phase == T::Failed)
        .then(|| on_failure(target.failure_category.unwrap_or(Category::Transient)))
}

/// When to look at a request again because of its failed targets (pure): with back-off
/// while one is retried, after [`ATTENTION_RECHECK`] while one waits for a person, or not on
/// their account (None).
pub fn failure_requeue(targets: &[ErasureTargetStatus]) -> Option<OnFailure> {
    let decisions: Vec<OnFailure> = targets.iter().filter_map(target_failure).collect();
    [OnFailure::Retry, OnFailure::Wait]
        .into_iter()
        .find(|d| decisions.contains(d))
}

/// Art. 12(3): one calendar month after receipt (the last day of the next month when it has
/// no such date, e.g. 31 January → 28/29 February).
pub fn deadline(received: Timestamp) -> Timestamp {
    Timestamp(
        received
            .0
            .checked_add_months(Months::new(1))
            .unwrap_or(received.0),
    )
}

/// What a target needs while the request is in `phase`, if anything. Failed targets retry
/// the action of the phase they failed in, unless their failure's category fails them.
pub fn action_for(
    phase: ErasurePhase,
    target: &ErasureTargetStatus,
    dry_run: bool,
) -> Option<SubjectAction> {
    if target_failure(target) == Some(OnFailure::Fail) {
        return None;
    }
    match (phase, target.phase) {
        (ErasurePhase::Discovering, T::Pending | T::Failed) => Some(SubjectAction::Find),
        (ErasurePhase::Erasing, T::Found | T::Failed) if !dry_run => Some(SubjectAction::Erase),
        (ErasurePhase::Verifying, T::Erased | T::NothingFound | T::Retained | T::Failed)
            if !dry_run =>
        {
            Some(SubjectAction::Verify)
        }
        _ => None,
    }
}

/// The result of one action on one target.
#[derive(Debug, PartialEq, Eq)]
pub enum ActionResult {
    /// `count` records found / erased / remaining; `skipped` locators lacked an identifier;
    /// `ran` whether any locator ran at all; `blocked` records the store refused to erase
    /// (Object Lock); `malformed` archive lines that are not JSON, left as they were.
    Done {
        count: u64,
        skipped: Vec<String>,
        ran: bool,
        blocked: u64,
        malformed: u64,
    },
    Failed(Failure),
    /// Failed after the store took work on (a task submitted, a task to submit again): the
    /// retry resumes from `cursor`, the one the store's step returned.
    FailedAt {
        failure: Failure,
        cursor: String,
    },
    /// The store is still working (a deletion it runs by itself): resume from `cursor`.
    InProgress {
        cursor: String,
    },
    /// Verification found `remaining` copies, all of them under a store lock kept under the
    /// target's declared Art. 17(3) ground.
    Retained {
        remaining: u64,
        retained: RetainedCopiesStatus,
    },
}

/// Folds an action's result into the target. A failed action keeps its cursor, so a retry
/// resumes polling the deletion already submitted instead of submitting another.
pub fn apply(target: &mut ErasureTargetStatus, action: SubjectAction, result: ActionResult) {
    let retried_category = target.failure_category.take();
    match result {
        ActionResult::InProgress { cursor } if target.phase == T::Failed => {
            // A retry under way: the target stays failed, with the failure it retries, until
            // the retry ends one way or the other.
            target.failure_category = retried_category;
            target.cursor = Some(cursor);
        }
        ActionResult::InProgress { cursor } => {
            target.message = crate::backends::describe_wait(&cursor).unwrap_or_else(|| {
                match action {
                    SubjectAction::Find => "finding",
                    SubjectAction::Erase => "the store is erasing",
                    SubjectAction::Verify => "verifying",
                }
                .into()
            });
            target.cursor = Some(cursor);
        }
        ActionResult::Failed(failure) => {
            target.phase = T::Failed;
            target.message = failure.to_string();
            target.failure_category = Some(failure.category);
        }
        ActionResult::FailedAt { failure, cursor } => {
            target.phase = T::Failed;
            target.message = failure.to_string();
            target.failure_category = Some(failure.category);
            target.cursor = Some(cursor);
        }
        ActionResult::Retained {
            remaining,
            retained,
        } => {
            target.cursor = None;
            target.phase = T::Retained;
            target.remaining = remaining;
            target.message = retained_message(&retained);
            target.retained = Some(retained);
        }
        ActionResult::Done {
            count,
            skipped,
            ran,
            blocked,
            malformed,
        } => {
            target.cursor = None;
            let mut notes = Vec::new();
            if !skipped.is_empty() {
                notes.push(format!("skipped: {}", skipped.join("; ")));
            }
            if malformed > 0 {
                notes.push(format!(
                    "{malformed} archive lines are not JSON and were left as they were"
                ));
            }
            target.message = notes.join("; ");
            if blocked > 0 {
                // Not a hold of ours: the store itself refuses until its lock lapses, so the
                // target is retried with backoff and the request cannot complete before.
                target.erased += count;
                target.phase = T::Failed;
                // The store said no: retried with back-off until the lock lapses.
                target.failure_category = Some(Category::Refused);
                target.message = format!(
                    "ObjectLocked: {blocked} object versions are protected by Object Lock (retention or legal hold) and were not erased; retrying until the lock lapses. No Art. 17(3) ground is declared for locked copies (subject.s3.retainedCopies), so the request stays open"
                );
                return;
            }
            match action {
                SubjectAction::Find if !ran => target.phase = T::Skipped,
                SubjectAction::Find => {
                    target.found = count;
                    target.phase = if count > 0 { T::Found } else { T::NothingFound };
                }
                SubjectAction::Erase => {
                    target.erased += count;
                    target.phase = T::Erased;
                }
                SubjectAction::Verify => {
                    target.remaining = count;
                    target.retained = None;
                    target.phase = match (count, target.found) {
                        (0, 0) => T::NothingFound,
                        (0, _) => T::Verified,
                        // Something is still there (written since, or not erased): erase again.
                        (_, _) => T::Found,
                    };
                }
            }
        }
    }
}

/// Whether the locator says how to find a subject in a store of this kind.
pub fn locates_in(locator: &SubjectLocator, kind: StoreKind) -> bool {
    crate::backends::registry::driver(kind).is_some_and(|d| d.locates(locator))
}

/// The phase to work in before acting: a new request starts discovering; targets that a
/// lifted hold released (back to Pending) send the request back to discovery, whatever phase
/// it was in; a request whose targets are still held stays Blocked and does nothing.
pub fn resume_phase(phase: ErasurePhase, targets: &[ErasureTargetStatus]) -> ErasurePhase {
    let any = |p: T| targets.iter().any(|t| t.phase == p);
    match phase {
        ErasurePhase::Pending => ErasurePhase::Discovering,
        ErasurePhase::Erasing | ErasurePhase::Verifying | ErasurePhase::Blocked
            if any(T::Pending) =>
        {
            ErasurePhase::Discovering
        }
        ErasurePhase::Blocked if any(T::Blocked) => ErasurePhase::Blocked,
        // Unblocked with nothing left to discover: check what is there once more.
        ErasurePhase::Blocked => ErasurePhase::Verifying,
        other => other,
    }
}

/// Whether a request that moved from `before` to `after` may run the next phase at once, in
/// the same reconcile (pure): it moved to a working phase, and no target failed or is held
/// (those wait: a retry has its back-off, a hold its lifting). The caller also requires that
/// no store is still working on a step of its own.
pub fn moves_on_at_once(
    before: ErasurePhase,
    after: ErasurePhase,
    targets: &[ErasureTargetStatus],
) -> bool {
    let working = matches!(
        after,
        ErasurePhase::Discovering | ErasurePhase::Erasing | ErasurePhase::Verifying
    );
    let waiting = targets
        .iter()
        .any(|t| matches!(t.phase, T::Failed | T::Blocked) || t.cursor.is_some());
    before != after && working && !waiting && failure_requeue(targets).is_none()
}

/// Whether a request as cached needs no reconcile at all (pure): Completed (final) for its
/// current generation, carrying the finalizer, not being deleted, and without a receipt sink
/// (with one, receipts may wait for upload and the request expires). Reading it fresh would
/// find the same: a Completed request never leaves that phase, and a change to it (an edit,
/// a deletion) arrives as a watch event of its own.
pub fn settled_as_cached(request: &ErasureRequest, finalizer: &str, sink: bool) -> bool {
    let meta = &request.metadata;
    !sink
        && meta.deletion_timestamp.is_none()
        && meta.finalizers.iter().flatten().any(|f| f == finalizer)
        && request.status.as_ref().is_some_and(|s| {
            s.phase == ErasurePhase::Completed && s.observed_generation == meta.generation
        })
}

/// The request's phase once its targets have moved (pure).
pub fn next_phase(
    phase: ErasurePhase,
    targets: &[ErasureTargetStatus],
    missing: &[String],
    dry_run: bool,
) -> ErasurePhase {
    // Targets that failed for good take no further part: once the others are done, or when
    // none is left, the request ends Failed (it never completes without them).
    let (failed, live): (Vec<ErasureTargetStatus>, Vec<ErasureTargetStatus>) = targets
        .iter()
        .cloned()
        .partition(|t| target_failure(t) == Some(OnFailure::Fail));
    if failed.is_empty() {
        return next_phase_of(phase, targets, missing, dry_run);
    }
    if live.is_empty() {
        return ErasurePhase::Failed;
    }
    match next_phase_of(phase, &live, missing, dry_run) {
        ErasurePhase::Completed | ErasurePhase::CompletedWithExceptions => ErasurePhase::Failed,
        other => other,
    }
}

fn next_phase_of(
    phase: ErasurePhase,
    targets: &[ErasureTargetStatus],
    missing: &[String],
    dry_run: bool,
) -> ErasurePhase {
    let any = |p: T| targets.iter().any(|t| t.phase == p);
    let settled = |done: &[T]| {
        targets
            .iter()
            .all(|t| done.contains(&t.phase) || t.phase == T::Blocked)
    };
    let finish = || {
        if any(T::Blocked) {
            ErasurePhase::Blocked
        } else if any(T::Retained) {
            ErasurePhase::CompletedWithExceptions
        } else {
            ErasurePhase::Completed
        }
    };
    match phase {
        ErasurePhase::Pending => ErasurePhase::Discovering,
        ErasurePhase::Discovering if nothing_in_scope(targets, missing).is_some() => {
            ErasurePhase::Failed
        }
        ErasurePhase::Discovering if any(T::Pending) => ErasurePhase::Discovering,
        ErasurePhase::Discovering if any(T::Failed) => ErasurePhase::Discovering,
        ErasurePhase::Discovering if dry_run => finish(),
        ErasurePhase::Discovering => ErasurePhase::Erasing,
        ErasurePhase::Erasing if any(T::Found) || any(T::Failed) => ErasurePhase::Erasing,
        ErasurePhase::Erasing => ErasurePhase::Verifying,
        ErasurePhase::Verifying if any(T::Found) => ErasurePhase::Erasing,
        ErasurePhase::Verifying
            if settled(&[T::Verified, T::NothingFound, T::Skipped, T::Retained]) =>
        {
            finish()
        }
        ErasurePhase::Verifying => ErasurePhase::Verifying,
        other => other,
    }
}

/// What a request covers, found when it starts: the targets it searches, the datasets it
/// does not search (with why), and the named policies that do not exist.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Scope {
    pub targets: Vec<ErasureTargetStatus>,
    pub not_searched: Vec<NotSearched>,
    pub missing: Vec<String>,
}

/// The targets of policy `policy` that a request cannot search (pure): those with no subject
/// locator, whose store holds the dataset but not a way to find one person's data in it.
pub fn not_searched(
    namespace: Option<&str>,
    policy: &str,
    targets: &[crate::api::retentionpolicy::Target],
) -> Vec<NotSearched> {
    targets
        .iter()
        .filter(|t| t.subject.is_none())
        .map(|t| NotSearched {
            namespace: namespace.map(str::to_string),
            policy: policy.to_string(),
            target: t.name.clone(),
            store: t.store.clone(),
            reason: "NoSubjectLocator".into(),
            message: format!(
                "target {} has no subject locator: a request cannot find one person's data in it; its retention still applies",
                t.name
            ),
        })
        .collect()
}

/// Why a searched target was not searched after all, while that lasts: a locator needing an
/// identifier type the subject was not given (`Skipped`), or a store not ready before the
/// target found anything.
const PASSING_GAPS: [&str; 2] = ["IdentifierNotGiven", "StoreNotReady"];

/// The datasets not searched (pure): those known when the scope was taken (no subject
/// locator, namespace opted out), kept, and those of `targets` that could not be searched
/// now, derived anew each time (so a store that becomes ready leaves the list).
pub fn coverage(not_searched: &[NotSearched], targets: &[ErasureTargetStatus]) -> Vec<NotSearched> {
    let mut all: Vec<NotSearched> = not_searched
        .iter()
        .filter(|n| !PASSING_GAPS.contains(&n.reason.as_str()))
        .cloned()
        .collect();
    for t in targets {
        let reason = match t.phase {
            T::Skipped => "IdentifierNotGiven",
            T::Failed
                if t.message.starts_with("StoreNotReady") && t.found == 0 && t.erased == 0 =>
            {
                "StoreNotReady"
            }
            _ => continue,
        };
        all.push(NotSearched {
            namespace: t.namespace.clone(),
            policy: t.policy.clone(),
            target: t.target.clone(),
            store: t.store.clone(),
            reason: reason.into(),
            message: t.message.clone(),
        });
    }
    all
}

/// Whether the request is cluster-wide.
pub fn cluster_wide(request: &ErasureRequest) -> bool {
    request.spec.scope == Some(RequestScope::Cluster)
}

/// A cluster-wide request is accepted only in the operator's namespace, where its
/// identifiers Secret stays; and its `policies` are `namespace/name` (pure). The message
/// names no identifier.
pub fn validate_scope(request: &ErasureRequest, operator_namespace: &str) -> Result<(), String> {
    if !cluster_wide(request) {
        return Ok(());
    }
    let namespace = request.metadata.namespace.as_deref().unwrap_or_default();
    if namespace != operator_namespace {
        return Err(format!(
            "a cluster-wide request (scope: Cluster) is accepted only in the operator's \
             namespace {operator_namespace}, where its identifiers stay; this one is in {namespace}"
        ));
    }
    for name in request.spec.policies.iter().flatten() {
        if qualified_policy(name).is_none() {
            return Err(format!(
                "spec.policies of a cluster-wide request names policies as namespace/name; \
                 {name:?} is not"
            ));
        }
    }
    Ok(())
}

/// `namespace/name` split, both parts non-empty.
pub fn qualified_policy(name: &str) -> Option<(&str, &str)> {
    let (namespace, policy) = name.split_once('/')?;
    (!namespace.is_empty() && !policy.is_empty() && !policy.contains('/'))
        .then_some((namespace, policy))
}

/// Whether a change to the policy `namespace/name` may let `request` go on (pure): the
/// request searches that policy (names it, or names none and so searches every policy in
/// its scope), and its targets are not known yet or include one of the policy's. So a
/// thousand policies listed at start-up wake only the requests that name them, not every
/// request once per policy.
pub fn may_concern_policy(request: &ErasureRequest, namespace: &str, name: &str) -> bool {
    let searched = request.spec.policies.as_ref().is_none_or(|names| {
        names.iter().any(|n| match qualified_policy(n) {
            Some((ns, policy)) if cluster_wide(request) => ns == namespace && policy == name,
            _ => n == name && request.metadata.namespace.as_deref() == Some(namespace),
        })
    });
    // A target's policy lives in the namespace its status names, else the request's own.
    let of_this_policy = |t: &ErasureTargetStatus| {
        t.policy == name
            && t.namespace
                .as_deref()
                .or(request.metadata.namespace.as_deref())
                == Some(namespace)
    };
    searched
        && request
            .status
            .as_ref()
            .is_none_or(|s| s.targets.is_empty() || s.targets.iter().any(of_this_policy))
}

/// Why a namespace opted out of cluster-wide requests, if it did (pure): the label
/// `tombstone.dev/erasure-opt-out: "true"` together with a non-empty reason annotation. A
/// label without a reason does not count (the namespace is searched).
pub fn opt_out_reason(namespace: &k8s_openapi::api::core::v1::Namespace) -> Option<String> {
    let labelled = namespace
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(ERASURE_OPT_OUT_LABEL))
        .is_some_and(|v| v == "true");
    let reason = namespace
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ERASURE_OPT_OUT_REASON_ANNOTATION))
        .map(|r| r.trim().to_string())
        .filter(|r| !r.is_empty());
    labelled.then_some(reason).flatten()
}

/// Every target of a policy in a namespace that opted out, as not searched (pure).
pub fn opted_out(
    namespace: &str,
    reason: &str,
    policy: &str,
    targets: &[crate::api::retentionpolicy::Target],
) -> Vec<NotSearched> {
    targets
        .iter()
        .map(|t| NotSearched {
            namespace: Some(namespace.to_string()),
            policy: policy.to_string(),
            target: t.name.clone(),
            store: t.store.clone(),
            reason: "NamespaceOptedOut".into(),
            message: format!(
                "namespace {namespace} opted out of cluster-wide erasure requests: {reason}"
            ),
        })
        .collect()
}

/// A cluster-wide request's progress per namespace, sorted by name (pure).
pub fn namespace_progress(
    targets: &[ErasureTargetStatus],
    not_searched: &[NotSearched],
) -> Vec<NamespaceProgress> {
    let mut by: BTreeMap<String, NamespaceProgress> = BTreeMap::new();
    let entry = |by: &mut BTreeMap<String, NamespaceProgress>, ns: &str| {
        by.entry(ns.to_string())
            .or_insert_with(|| NamespaceProgress {
                namespace: ns.to_string(),
                ..Default::default()
            })
            .namespace
            .clone()
    };
    for t in targets {
        let Some(ns) = &t.namespace else { continue };
        let key = entry(&mut by, ns);
        if let Some(p) = by.get_mut(&key) {
            p.targets = p.targets.saturating_add(1);
            let done = matches!(
                t.phase,
                T::Verified | T::NothingFound | T::Skipped | T::Retained
            );
            p.done = p.done.saturating_add(u32::from(done));
            p.blocked = p.blocked.saturating_add(u32::from(t.phase == T::Blocked));
            p.failed = p.failed.saturating_add(u32::from(t.phase == T::Failed));
            p.found = p.found.saturating_add(t.found);
            p.erased = p.erased.saturating_add(t.erased);
        }
    }
    for n in not_searched {
        let Some(ns) = &n.namespace else { continue };
        let key = entry(&mut by, ns);
        if let Some(p) = by.get_mut(&key) {
            p.not_searched = p.not_searched.saturating_add(1);
        }
    }
    by.into_values().collect()
}

/// How long a request may go without progress before it counts as stalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StallAfter {
    /// In one unfinished phase (other than `Blocked` by a LegalHold, which is lawful).
    pub no_progress: std::time::Duration,
    /// Blocked by a LegalHold that cannot be evaluated, or with a target `Failed`.
    pub failing: std::time::Duration,
}

impl Default for StallAfter {
    fn default() -> Self {
        Self {
            no_progress: std::time::Duration::from_secs(86_400),
            failing: std::time::Duration::from_secs(3_600),
        }
    }
}

/// The ways a request stalls, as metric labels (every one listed in the gauges).
pub const STALLS: [&str; 3] = ["NoProgress", "HoldUnverifiable", "TargetFailing"];

/// Phases a request moves on from by itself: time spent in one is time without an answer.
const UNFINISHED: [ErasurePhase; 5] = [
    ErasurePhase::Pending,
    ErasurePhase::Discovering,
    ErasurePhase::Erasing,
    ErasurePhase::Verifying,
    ErasurePhase::Blocked,
];

/// Whole seconds from `since` to `now` (0 if `since` is later).
fn seconds_since(since: Timestamp, now: Timestamp) -> i64 {
    (now.0 - since.0).num_seconds().max(0)
}

/// When the request entered its phase: `phaseSince`, else (never reconciled) its creation.
fn in_phase_since(request: &ErasureRequest) -> Option<Timestamp> {
    request
        .status
        .as_ref()
        .and_then(|s| s.phase_since)
        .or_else(|| {
            request
                .metadata
                .creation_timestamp
                .as_ref()
                .and_then(|t| chrono::DateTime::from_timestamp(t.0.as_second(), 0))
                .map(Timestamp)
        })
}

/// Why a request counts as stalled at `now`, if it does (pure): a LegalHold that cannot be
/// evaluated or a target failing for `after.failing`, or one unfinished phase for
/// `after.no_progress` (a request held by a LegalHold is waiting lawfully, not stalled).
pub fn stalled(
    request: &ErasureRequest,
    now: Timestamp,
    after: &StallAfter,
) -> Option<&'static str> {
    let phase = request
        .status
        .as_ref()
        .map_or(ErasurePhase::Pending, |s| s.phase);
    if !UNFINISHED.contains(&phase) {
        return None;
    }
    let longer = |since: Timestamp, limit: std::time::Duration| {
        u64::try_from(seconds_since(since, now)).unwrap_or(0) >= limit.as_secs()
    };
    if let Some(status) = &request.status {
        let unverifiable = status.conditions.iter().any(|c| {
            c.type_ == "Blocked"
                && c.status == crate::api::ConditionStatus::True
                && c.reason == "HoldUnverifiable"
                && longer(c.last_transition_time, after.failing)
        });
        if unverifiable {
            return Some("HoldUnverifiable");
        }
        let failing = status.targets.iter().any(|t| {
            t.phase == T::Failed
                && t.phase_since
                    .is_some_and(|since| longer(since, after.failing))
        });
        if failing {
            return Some("TargetFailing");
        }
    }
    let progressing_lawfully = phase == ErasurePhase::Blocked;
    match in_phase_since(request) {
        Some(since) if !progressing_lawfully && longer(since, after.no_progress) => {
            Some("NoProgress")
        }
        _ => None,
    }
}

/// Stamps when the request and each of its targets entered their current phase (pure): kept
/// while the phase stays, `now` when it changed.
pub fn stamp_phases(
    previous: &ErasureRequestStatus,
    status: &mut ErasureRequestStatus,
    now: Timestamp,
) {
    if status.phase != previous.phase || previous.phase_since.is_none() {
        status.phase_since = Some(now);
    } else {
        status.phase_since = previous.phase_since;
    }
    for target in &mut status.targets {
        let before = previous
            .targets
            .iter()
            .find(|p| p.policy == target.policy && p.target == target.target);
        target.phase_since = match before {
            Some(p) if p.phase == target.phase && p.phase_since.is_some() => p.phase_since,
            _ => Some(now),
        };
    }
}

/// The gauges' view of all requests at `now` (pure).
pub fn counts(
    requests: &[&ErasureRequest],
    now: Timestamp,
    stall_after: &StallAfter,
) -> crate::metrics::ErasureCounts {
    use ErasurePhase::*;
    let phase_of = |r: &ErasureRequest| r.status.as_ref().map_or(Pending, |s| s.phase);
    let by_phase = ErasurePhase::ALL
        .into_iter()
        .map(|p| {
            (
                p.as_str(),
                requests.iter().filter(|r| phase_of(r) == p).count() as i64,
            )
        })
        .collect();
    let week = chrono::Duration::days(7);
    let open_deadlines: Vec<Timestamp> = requests
        .iter()
        .filter(|r| !matches!(phase_of(r), Completed | CompletedWithExceptions))
        .filter_map(|r| r.status.as_ref().and_then(|s| s.deadline))
        .collect();
    let longest_in_phase = UNFINISHED
        .into_iter()
        .map(|p| {
            let longest = requests
                .iter()
                .filter(|r| phase_of(r) == p)
                .filter_map(|r| in_phase_since(r))
                .map(|since| seconds_since(since, now))
                .max()
                .unwrap_or(0);
            (p.as_str(), longest)
        })
        .collect();
    let stalls: Vec<&'static str> = requests
        .iter()
        .filter_map(|r| stalled(r, now, stall_after))
        .collect();
    let stalled = STALLS
        .into_iter()
        .map(|why| (why, stalls.iter().filter(|s| **s == why).count() as i64))
        .collect();
    crate::metrics::ErasureCounts {
        by_phase,
        overdue: open_deadlines.iter().filter(|d| now >= **d).count() as i64,
        due_soon: open_deadlines
            .iter()
            .filter(|d| now < **d && d.0 - now.0 <= week)
            .count() as i64,
        longest_in_phase,
        stalled,
    }
}

pub fn totals(targets: &[ErasureTargetStatus]) -> ErasureTotals {
    ErasureTotals {
        found: targets.iter().map(|t| t.found).sum(),
        erased: targets.iter().map(|t| t.erased).sum(),
        blocked: targets
            .iter()
            .filter(|t| t.phase == T::Blocked)
            .map(|t| t.found.max(1))
            .sum(),
        retained: targets
            .iter()
            .filter_map(|t| t.retained.as_ref())
            .map(|r| r.count)
            .sum(),
    }
}

/// Complete, Overdue and Blocked (pure). `blocked_by` names the holds blocking the request;
/// `unverifiable` says which holds could not be evaluated (each blocks the whole request);
/// `spec_ignored` is set when the spec was edited after the request started.
pub fn conditions(
    request: &ErasureRequest,
    status: &ErasureRequestStatus,
    blocked_by: &[String],
    unverifiable: &[String],
    spec_ignored: bool,
    now: Timestamp,
) -> Vec<Condition> {
    let dry_run = request.spec.dry_run;
    let secret_note = secret_note(request, status);
    let complete = match status.phase {
        ErasurePhase::Completed if dry_run => DesiredCondition::new(
            "Complete",
            true,
            "DryRun",
            format!("dry run: found and counted, nothing erased{secret_note}"),
        ),
        ErasurePhase::Completed => DesiredCondition::new(
            "Complete",
            true,
            "Verified",
            format!("erased, and verification found nothing left{secret_note}"),
        ),
        ErasurePhase::CompletedWithExceptions => DesiredCondition::new(
            "Complete",
            true,
            "CompletedWithExceptions",
            format!(
                "erased and verified, except copies kept under a declared Art. 17(3) ground: {}; \
                 the erasure is re-applied when their locks lapse{secret_note}",
                retained_summary(status)
            ),
        ),
        ErasurePhase::Failed => match nothing_in_scope(&status.targets, &status.missing_policies) {
            Some((reason, message)) => DesiredCondition::new("Complete", false, reason, message),
            None => DesiredCondition::new("Complete", false, "Failed", failed_message(status)),
        },
        phase
            if phase != ErasurePhase::Blocked
                && failure_requeue(&status.targets) == Some(OnFailure::Wait) =>
        {
            DesiredCondition::new(
                "Complete",
                false,
                "NeedsAttention",
                format!(
                    "{}: waiting for a person: {}",
                    status.phase.as_str(),
                    status
                        .targets
                        .iter()
                        .filter(|t| target_failure(t) == Some(OnFailure::Wait))
                        .map(|t| format!("{}/{}: {}", t.policy, t.target, t.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            )
        }
        phase => {
            let what = match phase {
                ErasurePhase::Erasing => "erasing the subject's data",
                ErasurePhase::Verifying => "verifying that nothing is left",
                ErasurePhase::Blocked => {
                    "waiting: a LegalHold blocks it (see the Blocked condition)"
                }
                _ => "finding the subject's data",
            };
            DesiredCondition::new(
                "Complete",
                false,
                "InProgress",
                format!("{}: {what}", phase.as_str()),
            )
        }
    };
    let overdue = match status.deadline {
        Some(deadline) if !settled_phase(status.phase) && now >= deadline => DesiredCondition::new(
            "Overdue",
            true,
            "PastDeadline",
            format!("the deadline {deadline} has passed (Art. 12(3))"),
        ),
        Some(deadline) => DesiredCondition::new(
            "Overdue",
            false,
            "WithinDeadline",
            format!("due by {deadline}"),
        ),
        None => DesiredCondition::unknown("Overdue", "NoDeadline", "not received yet"),
    };
    let blocked = if !unverifiable.is_empty() {
        DesiredCondition::new(
            "Blocked",
            true,
            "HoldUnverifiable",
            format!(
                "a LegalHold cannot be evaluated, so nothing is erased until it can: {}",
                unverifiable.join("; ")
            ),
        )
    } else if blocked_by.is_empty() {
        DesiredCondition::new(
            "Blocked",
            false,
            "NotHeld",
            "no LegalHold covers the subject or its datasets",
        )
    } else {
        DesiredCondition::new(
            "Blocked",
            true,
            "LegalHold",
            format!("held by LegalHold {} (Art. 17(3))", blocked_by.join(", ")),
        )
    };
    let mut desired = vec![complete, overdue, blocked];
    if spec_ignored {
        desired.push(DesiredCondition::new(
            "SpecChangeIgnored",
            true,
            "RequestStarted",
            "the spec was edited after the request started; the edit is ignored (file a new request)",
        ));
    }
    let existing = request
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    merge_conditions(existing, desired, status.observed_generation, now)
}

/// What became of the identifiers Secret, for the Complete condition's message.
fn secret_note(request: &ErasureRequest, status: &ErasureRequestStatus) -> String {
    let Some(secret) = &request.spec.subject.secret_ref else {
        return String::new();
    };
    let name = &secret.name;
    match status.subject_secret {
        Some(SubjectSecretFate::Deleted) => format!("; the identifiers Secret {name} is deleted"),
        Some(SubjectSecretFate::KeptUnmarked) => format!(
            "; the Secret {name} was kept: it is not labelled {SUBJECT_IDENTIFIERS_LABEL}=true, \
             so the operator does not delete it (delete it yourself if it only held the \
             identifiers)"
        ),
        Some(SubjectSecretFate::KeptOnRequest) => {
            format!("; the Secret {name} was kept (retainSubjectSecret)")
        }
        Some(SubjectSecretFate::KeptForRetainedCopies) => format!(
            "; the identifiers Secret {name} is kept until the retained copies are erased too"
        ),
        Some(SubjectSecretFate::KeptDryRun) | None => String::new(),
    }
}

/// Phases that answer the request within its deadline: `Overdue` never fires for them.
pub fn settled_phase(phase: ErasurePhase) -> bool {
    matches!(
        phase,
        ErasurePhase::Completed | ErasurePhase::CompletedWithExceptions
    )
}

/// Whether retained copies are due for another look at `now`: the earliest retain-until
/// date has passed, or some are kept by a legal hold only (no date: looked at on each wake).
pub fn retained_due(targets: &[ErasureTargetStatus], now: Timestamp) -> bool {
    targets
        .iter()
        .filter_map(|t| t.retained.as_ref())
        .any(|r| r.earliest_retain_until.is_none_or(|e| e <= now))
}

/// When to look at retained copies again: the earliest retain-until date still ahead.
pub fn retained_wake(targets: &[ErasureTargetStatus], now: Timestamp) -> Option<Timestamp> {
    targets
        .iter()
        .filter_map(|t| t.retained.as_ref())
        .filter_map(|r| r.earliest_retain_until)
        .filter(|e| *e > now)
        .min()
}

fn retained_message(r: &RetainedCopiesStatus) -> String {
    let mut until = Vec::new();
    if let (Some(e), Some(l)) = (r.earliest_retain_until, r.latest_retain_until) {
        until.push(format!("retained until {e} (earliest) to {l} (latest)"));
    }
    if r.legal_holds > 0 {
        until.push(format!(
            "{} under an Object Lock legal hold (until it is removed)",
            r.legal_holds
        ));
    }
    format!(
        "{} copies kept under Object Lock, retained under {} ({}): {}; the erasure is re-applied when the locks lapse",
        r.count,
        r.ground.article(),
        r.description,
        until.join("; ")
    )
}

fn retained_summary(status: &ErasureRequestStatus) -> String {
    status
        .targets
        .iter()
        .filter(|t| t.retained.is_some())
        .map(|t| format!("{}/{}: {}", t.policy, t.target, t.message))
        .collect::<Vec<_>>()
        .join("; ")
}

fn failed_message(status: &ErasureRequestStatus) -> String {
    status
        .targets
        .iter()
        .filter(|t| t.phase == T::Failed)
        .map(|t| format!("{}/{}: {}", t.policy, t.target, t.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{DateTime, Utc};

    fn ts(s: &str) -> Timestamp {
        Timestamp(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc))
    }

    fn target(phase: T) -> ErasureTargetStatus {
        ErasureTargetStatus {
            policy: "p".into(),
            target: "t".into(),
            store: "s".into(),
            phase,
            ..Default::default()
        }
    }

    #[test]
    fn a_policy_concerns_only_the_requests_that_search_it_and_wait_on_it() {
        let named = |spec: serde_json::Value| -> ErasureRequest {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest",
                "metadata": {"name": "r", "namespace": "ns"},
                "spec": spec
            }))
            .unwrap()
        };
        let subject = serde_json::json!({"identifiers": {"userId": "u"}});
        let mut one = named(serde_json::json!(
            {"subject": subject, "reason": "consentWithdrawn", "policies": ["p"]}));
        assert!(may_concern_policy(&one, "ns", "p"));
        assert!(
            !may_concern_policy(&one, "ns", "q"),
            "a policy it does not name"
        );
        assert!(
            !may_concern_policy(&one, "other", "p"),
            "a namesake elsewhere"
        );
        let every = named(serde_json::json!({"subject": subject, "reason": "consentWithdrawn"}));
        assert!(
            may_concern_policy(&every, "ns", "q"),
            "naming none searches all"
        );
        let cluster = named(
            serde_json::json!({"subject": subject, "reason": "consentWithdrawn",
            "scope": "Cluster", "policies": ["other/p"]}),
        );
        assert!(may_concern_policy(&cluster, "other", "p"));
        assert!(!may_concern_policy(&cluster, "ns", "p"));
        // Once its targets are known, only a change to a policy of its targets concerns it.
        one.status = Some(ErasureRequestStatus {
            targets: vec![target(T::Found)],
            ..Default::default()
        });
        assert!(may_concern_policy(&one, "ns", "p"));
        let mut every = every;
        every.status = one.status.clone();
        assert!(!may_concern_policy(&every, "ns", "q"));
        // A cluster-wide request's target names its policy's namespace: a namesake elsewhere
        // that the request also searches is not one of its targets.
        let mut wide = named(
            serde_json::json!({"subject": subject, "reason": "consentWithdrawn", "scope": "Cluster"}),
        );
        wide.status = Some(ErasureRequestStatus {
            targets: vec![ErasureTargetStatus {
                namespace: Some("other".into()),
                ..target(T::Found)
            }],
            ..Default::default()
        });
        assert!(may_concern_policy(&wide, "other", "p"));
        assert!(
            !may_concern_policy(&wide, "third", "p"),
            "the namesake of a target's policy in another namespace"
        );
    }

    #[test]
    fn only_a_completed_request_of_its_generation_is_skipped_as_cached() {
        let mut r: ErasureRequest = serde_json::from_value(serde_json::json!({
            "apiVersion": "tombstone.dev/v1alpha1", "kind": "ErasureRequest",
            "metadata": {"name": "r", "namespace": "ns", "generation": 1, "finalizers": ["f"]},
            "spec": {"subject": {"identifiers": {"userId": "u"}}, "reason": "consentWithdrawn"}
        }))
        .expect("a request");
        r.status = Some(ErasureRequestStatus {
            phase: ErasurePhase::Completed,
            observed_generation: Some(1),
            ..Default::default()
        });
        assert!(settled_as_cached(&r, "f", false));
        assert!(
            !settled_as_cached(&r, "f", true),
            "receipts may wait for a sink"
        );
        assert!(
            !settled_as_cached(&r, "other", false),
            "the finalizer is missing"
        );
        let mut edited = r.clone();
        edited.metadata.generation = Some(2);
        assert!(
            !settled_as_cached(&edited, "f", false),
            "an edit is reported"
        );
        let mut deleted = r.clone();
        deleted.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                "2026-11-30T00:00:00Z".parse().unwrap(),
            ));
        assert!(
            !settled_as_cached(&deleted, "f", false),
            "a deletion closes it"
        );
        for phase in [
            ErasurePhase::Pending,
            ErasurePhase::Verifying,
            ErasurePhase::CompletedWithExceptions,
            ErasurePhase::Failed,
        ] {
            let mut open = r.clone();
            open.status.as_mut().unwrap().phase = phase;
            assert!(!settled_as_cached(&open, "f", false), "{phase:?}");
        }
    }

    #[test]
    fn a_request_passes_its_quick_phases_at_once_but_waits_on_failures_holds_and_stores() {
        use ErasurePhase::*;
        let nothing = [target(T::NothingFound)];
        assert!(moves_on_at_once(Discovering, Erasing, &nothing));
        assert!(moves_on_at_once(Erasing, Verifying, &nothing));
        assert!(moves_on_at_once(Verifying, Erasing, &[target(T::Found)]));
        // Not moved, or arrived at a phase that waits or ends.
        assert!(!moves_on_at_once(Discovering, Discovering, &nothing));
        for end in [Completed, CompletedWithExceptions, Failed, Blocked, Pending] {
            assert!(!moves_on_at_once(Verifying, end, &nothing), "{end:?}");
        }
        // A target failing (retried with back-off), held, or a step the store still runs.
        let failing = ErasureTargetStatus {
            failure_category: Some(Category::Transient),
            ..target(T::Failed)
        };
        assert!(!moves_on_at_once(
            Discovering,
            Erasing,
            &[target(T::Found), failing]
        ));
        assert!(!moves_on_at_once(
            Discovering,
            Erasing,
            &[target(T::Found), target(T::Blocked)]
        ));
        let running = ErasureTargetStatus {
            cursor: Some("task-1".into()),
            ..target(T::Found)
        };
        assert!(!moves_on_at_once(Discovering, Erasing, &[running]));
    }

    #[test]
    fn a_failed_target_under_retry_keeps_its_failure_until_the_retry_ends() {
        let mut t = ErasureTargetStatus {
            phase: T::Failed,
            message: "ObjectLocked: 1 object versions are protected".into(),
            failure_category: Some(Category::Refused),
            ..Default::default()
        };
        let step = ActionResult::InProgress {
            cursor: "v1:s3:{}".into(),
        };
        apply(&mut t, SubjectAction::Erase, step);
        assert_eq!(
            (t.phase, t.failure_category, t.cursor.as_deref()),
            (T::Failed, Some(Category::Refused), Some("v1:s3:{}"))
        );
        assert!(t.message.starts_with("ObjectLocked"), "{}", t.message);
    }

    #[test]
    fn an_erase_the_store_runs_itself_is_polled_through_its_cursor() {
        let mut t = ErasureTargetStatus {
            phase: T::Found,
            found: 2,
            ..Default::default()
        };
        let step = |cursor: &str| ActionResult::InProgress {
            cursor: cursor.into(),
        };
        apply(&mut t, SubjectAction::Erase, step("loki:abc"));
        assert_eq!((t.phase, t.cursor.as_deref()), (T::Found, Some("loki:abc")));
        assert_eq!(t.message, "the store is erasing");
        // What a Loki erasure waits for, and until when, is in the message.
        let resting = r#"loki:{"id":"r1","start":1000000000,"end":1795361677,"count":1,"stage":"resting","until":1795365277}"#;
        apply(&mut t, SubjectAction::Erase, step(resting));
        assert!(
            t.message.starts_with("LinesInIngesters") && t.message.contains("2026-11-22T16:34:37Z"),
            "{}",
            t.message
        );
        apply(&mut t, SubjectAction::Erase, step("loki:abc"));
        assert_eq!(
            next_phase(ErasurePhase::Erasing, std::slice::from_ref(&t), &[], false),
            ErasurePhase::Erasing
        );
        assert_eq!(
            action_for(ErasurePhase::Erasing, &t, false),
            Some(SubjectAction::Erase)
        );
        // A failed poll keeps the cursor: the retry polls the same deletion.
        apply(
            &mut t,
            SubjectAction::Erase,
            ActionResult::Failed(Failure::new(Category::Transient, "Unreachable", "x")),
        );
        assert_eq!(t.cursor.as_deref(), Some("loki:abc"));
        // A step that failed after the store took work on hands back a new cursor: kept.
        apply(
            &mut t,
            SubjectAction::Erase,
            ActionResult::FailedAt {
                failure: Failure::new(Category::Refused, "StoreTaskFailed", "submitted again"),
                cursor: "loki:def".into(),
            },
        );
        assert_eq!(
            (t.phase, t.cursor.as_deref()),
            (T::Failed, Some("loki:def"))
        );
        assert!(t.message.starts_with("StoreTaskFailed: "), "{}", t.message);
        apply(
            &mut t,
            SubjectAction::Erase,
            ActionResult::Done {
                count: 2,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!(
            (t.phase, t.erased, t.cursor.as_deref()),
            (T::Erased, 2, None)
        );
    }

    #[test]
    fn an_erase_the_store_refuses_is_retried_not_verified() {
        let mut t = ErasureTargetStatus {
            phase: T::Found,
            found: 4,
            ..Default::default()
        };
        apply(
            &mut t,
            SubjectAction::Erase,
            ActionResult::Done {
                count: 3,
                skipped: vec![],
                ran: true,
                blocked: 1,
                malformed: 2,
            },
        );
        assert_eq!((t.phase, t.erased), (T::Failed, 3));
        assert!(t.message.starts_with("ObjectLocked: 1 object versions"));
        assert_eq!(
            next_phase(ErasurePhase::Erasing, &[t], &[], false),
            ErasurePhase::Erasing
        );
    }

    #[test]
    fn the_deadline_is_one_calendar_month() {
        assert_eq!(
            deadline(ts("2026-11-20T09:00:00Z")),
            ts("2026-12-20T09:00:00Z")
        );
        assert_eq!(
            deadline(ts("2027-01-31T12:00:00Z")),
            ts("2027-02-28T12:00:00Z")
        );
        assert_eq!(
            deadline(ts("2028-01-31T12:00:00Z")),
            ts("2028-02-29T12:00:00Z")
        );
    }

    #[test]
    fn a_request_walks_discover_erase_verify_complete() {
        use ErasurePhase::*;
        let mut ts_ = vec![target(T::Pending), target(T::Pending)];
        assert_eq!(next_phase(Pending, &ts_, &[], false), Discovering);
        apply(
            &mut ts_[0],
            SubjectAction::Find,
            ActionResult::Done {
                count: 3,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!(
            next_phase(Discovering, &ts_, &[], false),
            Discovering,
            "one target still pending"
        );
        apply(
            &mut ts_[1],
            SubjectAction::Find,
            ActionResult::Done {
                count: 0,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!(next_phase(Discovering, &ts_, &[], false), Erasing);
        assert_eq!(
            action_for(Erasing, &ts_[0], false),
            Some(SubjectAction::Erase)
        );
        assert_eq!(action_for(Erasing, &ts_[1], false), None);
        apply(
            &mut ts_[0],
            SubjectAction::Erase,
            ActionResult::Done {
                count: 3,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!(next_phase(Erasing, &ts_, &[], false), Verifying);
        for t in ts_.iter_mut() {
            apply(
                t,
                SubjectAction::Verify,
                ActionResult::Done {
                    count: 0,
                    skipped: vec![],
                    ran: true,
                    blocked: 0,
                    malformed: 0,
                },
            );
        }
        assert_eq!((ts_[0].phase, ts_[1].phase), (T::Verified, T::NothingFound));
        assert_eq!(next_phase(Verifying, &ts_, &[], false), Completed);
        assert_eq!(
            totals(&ts_),
            ErasureTotals {
                found: 3,
                erased: 3,
                blocked: 0,
                retained: 0
            }
        );
    }

    #[test]
    fn a_dry_run_completes_after_discovery() {
        let mut t = vec![target(T::Pending)];
        apply(
            &mut t[0],
            SubjectAction::Find,
            ActionResult::Done {
                count: 2,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!(
            next_phase(ErasurePhase::Discovering, &t, &[], true),
            ErasurePhase::Completed
        );
        assert_eq!(action_for(ErasurePhase::Erasing, &t[0], true), None);
    }

    #[test]
    fn failures_are_retried_and_never_count_as_erased() {
        let mut t = vec![target(T::Found)];
        t[0].found = 2;
        apply(
            &mut t[0],
            SubjectAction::Erase,
            ActionResult::Failed(Failure::new(Category::Transient, "Unreachable", "down")),
        );
        assert_eq!(t[0].erased, 0);
        assert_eq!(
            next_phase(ErasurePhase::Erasing, &t, &[], false),
            ErasurePhase::Erasing
        );
        assert_eq!(
            action_for(ErasurePhase::Erasing, &t[0], false),
            Some(SubjectAction::Erase)
        );
        // Verification that still finds records sends the target back to erasing.
        let mut v = vec![target(T::Erased)];
        v[0].found = 2;
        apply(
            &mut v[0],
            SubjectAction::Verify,
            ActionResult::Done {
                count: 1,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!(v[0].phase, T::Found);
        assert_eq!(
            next_phase(ErasurePhase::Verifying, &v, &[], false),
            ErasurePhase::Erasing
        );
    }

    fn failed(category: Category, reason: &'static str) -> ActionResult {
        ActionResult::Failed(Failure::new(category, reason, "m"))
    }

    fn request() -> ErasureRequest {
        use crate::api::erasurerequest::{ErasureGround, ErasureRequestSpec};
        ErasureRequest::new(
            "r",
            ErasureRequestSpec {
                subject: Subject {
                    secret_ref: None,
                    identifiers: None,
                },
                reason: ErasureGround::Objection,
                received_at: None,
                policies: None,
                dry_run: false,
                reference: None,
                retain_subject_secret: false,
                scope: None,
            },
        )
    }

    #[test]
    fn a_transient_failure_is_retried_with_backoff_and_keeps_the_cursor() {
        let mut t = vec![target(T::Found)];
        t[0].cursor = Some("es:task-1".into());
        apply(
            &mut t[0],
            SubjectAction::Erase,
            failed(Category::Transient, "Unreachable"),
        );
        assert_eq!(
            (t[0].phase, t[0].cursor.as_deref(), t[0].failure_category),
            (T::Failed, Some("es:task-1"), Some(Category::Transient))
        );
        assert_eq!(
            action_for(ErasurePhase::Erasing, &t[0], false),
            Some(SubjectAction::Erase)
        );
        assert_eq!(failure_requeue(&t), Some(OnFailure::Retry));
        // The store said no (Object Lock, credentials): retried the same way.
        apply(
            &mut t[0],
            SubjectAction::Erase,
            failed(Category::Refused, "AuthenticationFailed"),
        );
        assert_eq!(failure_requeue(&t), Some(OnFailure::Retry));
        // Recovered: the category goes with the failure.
        apply(
            &mut t[0],
            SubjectAction::Erase,
            ActionResult::Done {
                count: 1,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!((t[0].phase, t[0].failure_category), (T::Erased, None));
        assert_eq!(failure_requeue(&t), None);
    }

    #[test]
    fn an_invalid_spec_fails_the_target_without_retry_and_the_request_once_the_rest_is_done() {
        let mut t = vec![target(T::Pending), target(T::Pending)];
        apply(
            &mut t[0],
            SubjectAction::Find,
            failed(Category::InvalidSpec, "IdentifierNotDistinctive"),
        );
        assert_eq!(t[0].phase, T::Failed);
        assert!(t[0].message.starts_with("IdentifierNotDistinctive: "));
        assert_eq!(action_for(ErasurePhase::Discovering, &t[0], false), None);
        assert_eq!(action_for(ErasurePhase::Erasing, &t[0], false), None);
        assert_eq!(failure_requeue(&t), None, "no back-off on its account");
        // The other target goes on.
        assert_eq!(
            next_phase(ErasurePhase::Discovering, &t, &[], false),
            ErasurePhase::Discovering
        );
        t[1].phase = T::Found;
        assert_eq!(
            next_phase(ErasurePhase::Discovering, &t, &[], false),
            ErasurePhase::Erasing
        );
        t[1].phase = T::Verified;
        assert_eq!(
            next_phase(ErasurePhase::Verifying, &t, &[], false),
            ErasurePhase::Failed,
            "never Completed without the failed target"
        );
        assert_eq!(
            next_phase(ErasurePhase::Discovering, &t[..1], &[], false),
            ErasurePhase::Failed
        );
        // A failure recorded by an earlier version (no category) is retried as it was.
        let mut old = target(T::Failed);
        old.message = "InvalidSpec: x".into();
        assert_eq!(target_failure(&old), Some(OnFailure::Retry));
    }

    #[test]
    fn a_failure_that_needs_attention_sets_the_condition_and_waits() {
        let mut t = vec![target(T::Found), target(T::Found)];
        apply(
            &mut t[0],
            SubjectAction::Erase,
            failed(Category::NeedsAttention, "UnparsedCopiesRemain"),
        );
        assert_eq!(failure_requeue(&t), Some(OnFailure::Wait));
        // Looked at again (a fix is picked up by itself), never completed meanwhile.
        assert_eq!(
            action_for(ErasurePhase::Erasing, &t[0], false),
            Some(SubjectAction::Erase)
        );
        t[1].phase = T::Erased;
        assert_eq!(
            next_phase(ErasurePhase::Erasing, &t, &[], false),
            ErasurePhase::Erasing
        );
        let status = ErasureRequestStatus {
            phase: ErasurePhase::Erasing,
            targets: t.clone(),
            ..Default::default()
        };
        let c = conditions(
            &request(),
            &status,
            &[],
            &[],
            false,
            ts("2026-11-20T09:00:00Z"),
        );
        let complete = c.iter().find(|c| c.type_ == "Complete").unwrap();
        assert_eq!(
            (complete.status, complete.reason.as_str()),
            (crate::api::ConditionStatus::False, "NeedsAttention")
        );
        assert!(complete.message.contains("p/t: UnparsedCopiesRemain: m"));
        // A retried failure next to it wins the requeue: back-off, not the slow look.
        apply(
            &mut t[1],
            SubjectAction::Verify,
            failed(Category::Transient, "Unreachable"),
        );
        assert_eq!(failure_requeue(&t), Some(OnFailure::Retry));
    }

    #[test]
    fn gauges_count_phases_overdue_and_due_soon() {
        let request = |phase: ErasurePhase, deadline: &str| {
            let mut r = in_phase(phase, "2026-11-19T23:00:00Z");
            if let Some(s) = r.status.as_mut() {
                s.deadline = Some(ts(deadline));
            }
            r
        };
        let rs = [
            request(ErasurePhase::Completed, "2026-11-01T00:00:00Z"),
            request(ErasurePhase::Blocked, "2026-11-10T00:00:00Z"),
            request(ErasurePhase::Erasing, "2026-11-25T00:00:00Z"),
            request(ErasurePhase::Erasing, "2026-12-20T00:00:00Z"),
        ];
        let c = counts(
            &rs.iter().collect::<Vec<_>>(),
            ts("2026-11-20T00:00:00Z"),
            &StallAfter::default(),
        );
        assert_eq!(
            (c.overdue, c.due_soon),
            (1, 1),
            "a completed request is never overdue"
        );
        assert!(c.by_phase.contains(&("Erasing", 2)) && c.by_phase.contains(&("Pending", 0)));
        assert_eq!(c.by_phase.len(), 8);
    }

    fn in_phase(phase: ErasurePhase, since: &str) -> ErasureRequest {
        let mut r = request();
        r.status = Some(ErasureRequestStatus {
            phase,
            phase_since: Some(ts(since)),
            ..Default::default()
        });
        r
    }

    #[test]
    fn a_request_stalls_after_a_day_in_one_phase_but_never_while_held_or_finished() {
        use ErasurePhase::*;
        let after = StallAfter::default();
        let now = ts("2026-11-20T12:00:00Z");
        let day_ago = "2026-11-19T11:00:00Z";
        let hour_ago = "2026-11-20T11:00:00Z";
        assert_eq!(
            stalled(&in_phase(Erasing, day_ago), now, &after),
            Some("NoProgress")
        );
        assert_eq!(
            stalled(&in_phase(Pending, day_ago), now, &after),
            Some("NoProgress")
        );
        assert_eq!(stalled(&in_phase(Erasing, hour_ago), now, &after), None);
        assert_eq!(
            stalled(&in_phase(Blocked, day_ago), now, &after),
            None,
            "a LegalHold is lawful"
        );
        for done in [Completed, CompletedWithExceptions, Failed] {
            assert_eq!(stalled(&in_phase(done, day_ago), now, &after), None);
        }

        // A target failing for an hour, and a hold that cannot be evaluated for an hour.
        let mut failing = in_phase(Erasing, hour_ago);
        if let Some(s) = failing.status.as_mut() {
            s.targets = vec![ErasureTargetStatus {
                phase: T::Failed,
                phase_since: Some(ts("2026-11-20T10:59:00Z")),
                ..Default::default()
            }];
        }
        assert_eq!(stalled(&failing, now, &after), Some("TargetFailing"));
        let mut unverifiable = in_phase(Blocked, hour_ago);
        if let Some(s) = unverifiable.status.as_mut() {
            s.conditions = vec![Condition {
                type_: "Blocked".into(),
                status: crate::api::ConditionStatus::True,
                reason: "HoldUnverifiable".into(),
                message: String::new(),
                last_transition_time: ts("2026-11-20T10:00:00Z"),
                observed_generation: None,
            }];
        }
        assert_eq!(
            stalled(&unverifiable, now, &after),
            Some("HoldUnverifiable")
        );

        let rs = [
            in_phase(Erasing, day_ago),
            failing,
            unverifiable,
            in_phase(Verifying, hour_ago),
        ];
        let c = counts(&rs.iter().collect::<Vec<_>>(), now, &after);
        assert_eq!(
            c.stalled,
            vec![
                ("NoProgress", 1),
                ("HoldUnverifiable", 1),
                ("TargetFailing", 1)
            ]
        );
        assert!(c.longest_in_phase.contains(&("Erasing", 25 * 3600)));
        assert!(c.longest_in_phase.contains(&("Verifying", 3600)));
        assert!(c.longest_in_phase.contains(&("Discovering", 0)));
    }

    #[test]
    fn targets_without_a_subject_locator_are_listed_as_not_searched() {
        let targets: Vec<crate::api::retentionpolicy::Target> =
            serde_json::from_value(serde_json::json!([
                {"name": "sessions", "store": "cache", "redis": {"keyPattern": "s:*"},
                 "subject": {"redis": {"keys": ["s:{userId}:*"]}}},
                {"name": "metrics", "store": "cache", "redis": {"keyPattern": "m:*"}}
            ]))
            .unwrap();
        let missing = not_searched(None, "shop", &targets);
        assert_eq!(missing.len(), 1);
        assert_eq!(
            (
                missing[0].policy.as_str(),
                missing[0].target.as_str(),
                missing[0].reason.as_str()
            ),
            ("shop", "metrics", "NoSubjectLocator")
        );
    }

    #[test]
    fn phases_are_stamped_when_they_change_and_kept_while_they_stay() {
        let then = ts("2026-11-20T10:00:00Z");
        let now = ts("2026-11-20T12:00:00Z");
        let target = |phase: T, since: Option<Timestamp>| ErasureTargetStatus {
            policy: "p".into(),
            target: "t".into(),
            phase,
            phase_since: since,
            ..Default::default()
        };
        let previous = ErasureRequestStatus {
            phase: ErasurePhase::Erasing,
            phase_since: Some(then),
            targets: vec![target(T::Found, Some(then))],
            ..Default::default()
        };
        let mut same = previous.clone();
        stamp_phases(&previous, &mut same, now);
        assert_eq!(same, previous, "nothing changed, nothing to write");

        let mut moved = previous.clone();
        moved.phase = ErasurePhase::Verifying;
        moved.targets[0].phase = T::Erased;
        stamp_phases(&previous, &mut moved, now);
        assert_eq!(moved.phase_since, Some(now));
        assert_eq!(moved.targets[0].phase_since, Some(now));

        // A status written before phases were stamped gets its first stamp.
        let unstamped = ErasureRequestStatus {
            phase: ErasurePhase::Erasing,
            ..Default::default()
        };
        let mut first = unstamped.clone();
        stamp_phases(&unstamped, &mut first, now);
        assert_eq!(first.phase_since, Some(now));
    }

    #[test]
    fn released_targets_send_the_request_back_to_discovery_and_held_ones_keep_it_blocked() {
        use ErasurePhase::*;
        let held = vec![target(T::Verified), target(T::Blocked)];
        assert_eq!(
            resume_phase(Blocked, &held),
            Blocked,
            "no busy loop while a hold stands"
        );
        let released = vec![target(T::Verified), target(T::Pending)];
        for phase in [Blocked, Erasing, Verifying] {
            assert_eq!(resume_phase(phase, &released), Discovering, "{phase:?}");
        }
        assert_eq!(resume_phase(Pending, &[]), Discovering);
        assert_eq!(resume_phase(Erasing, &[target(T::Found)]), Erasing);
        assert_eq!(resume_phase(Blocked, &[target(T::Verified)]), Verifying);
    }

    #[test]
    fn a_locator_for_another_store_kind_does_not_count() {
        let locator = SubjectLocator::Redis(crate::api::retentionpolicy::RedisSubject::default());
        assert!(locates_in(&locator, StoreKind::Redis));
        assert!(!locates_in(&locator, StoreKind::S3));
    }

    #[test]
    fn skipped_and_blocked_targets() {
        let mut t = vec![target(T::Pending), target(T::Blocked)];
        apply(
            &mut t[0],
            SubjectAction::Find,
            ActionResult::Done {
                count: 0,
                skipped: vec!["keys[0] needs {userId}".into()],
                ran: false,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!(t[0].phase, T::Skipped);
        assert_eq!(t[0].message, "skipped: keys[0] needs {userId}");
        assert_eq!(
            next_phase(ErasurePhase::Verifying, &t, &[], false),
            ErasurePhase::Blocked
        );
    }

    #[test]
    fn inline_email_addresses_are_refused_without_echoing_them() {
        let subject = |k: &str, v: &str| Subject {
            secret_ref: None,
            identifiers: Some([(k.to_string(), v.to_string())].into()),
        };
        for (k, v) in [
            ("email", "u-1"),
            ("workEmail", "u-1"),
            ("e-mail", "u-1"),
            ("contact", "probe-91@example.org"),
        ] {
            let e = validate_subject(&subject(k, v)).unwrap_err();
            assert!(e.contains("Secret") && !e.contains("probe-91"), "{e}");
        }
        assert!(validate_subject(&subject("userId", "u-42")).is_ok());
        let none = Subject {
            secret_ref: None,
            identifiers: None,
        };
        assert!(validate_subject(&none).is_ok());
    }

    #[test]
    fn nothing_in_scope_is_a_failure_not_a_completion() {
        use ErasurePhase::*;
        assert_eq!(next_phase(Discovering, &[], &[], false), Failed);
        assert_eq!(
            next_phase(Discovering, &[], &[], true),
            Failed,
            "dry run too"
        );
        assert_eq!(nothing_in_scope(&[], &[]).unwrap().0, "NothingInScope");
        let missing = vec!["crm".to_string()];
        let (reason, message) = nothing_in_scope(&[], &missing).unwrap();
        assert_eq!(reason, "NothingInScope");
        assert!(message.contains("crm"), "{message}");
        assert_eq!(next_phase(Discovering, &[], &missing, false), Failed);
        // One named policy missing among others: nothing runs rather than a partial erasure
        // reported complete.
        let found = vec![target(T::Pending)];
        assert_eq!(
            nothing_in_scope(&found, &missing).unwrap().0,
            "PolicyNotFound"
        );
        assert_eq!(next_phase(Discovering, &found, &missing, false), Failed);
        let mut skipped = vec![target(T::Pending), target(T::Pending)];
        for t in skipped.iter_mut() {
            apply(
                t,
                SubjectAction::Find,
                ActionResult::Done {
                    count: 0,
                    skipped: vec!["keys[0] needs {userId}".into()],
                    ran: false,
                    blocked: 0,
                    malformed: 0,
                },
            );
        }
        assert_eq!(next_phase(Discovering, &skipped, &[], false), Failed);
        let (reason, message) = nothing_in_scope(&skipped, &[]).unwrap();
        assert_eq!(reason, "NoApplicableLocator");
        assert!(message.contains("{userId}"), "{message}");
        // One target that ran is enough: the skipped one is noted, the request goes on.
        skipped[1].phase = T::NothingFound;
        assert_eq!(nothing_in_scope(&skipped, &[]), None);
        assert_eq!(next_phase(Discovering, &skipped, &[], false), Erasing);
    }

    #[test]
    fn only_a_marked_secret_of_a_real_erasure_is_deleted() {
        use SubjectSecretFate::*;
        assert_eq!(secret_fate(false, false, true), Deleted);
        assert_eq!(secret_fate(false, false, false), KeptUnmarked);
        assert_eq!(secret_fate(true, false, true), KeptDryRun);
        assert_eq!(secret_fate(false, true, true), KeptOnRequest);
        let label = |v: &str| {
            Some(BTreeMap::from([(
                SUBJECT_IDENTIFIERS_LABEL.to_string(),
                v.to_string(),
            )]))
        };
        assert!(is_marked(label("true").as_ref()));
        assert!(!is_marked(label("yes").as_ref()));
        assert!(!is_marked(None));
    }

    #[test]
    fn store_errors_are_reduced_to_their_kind() {
        use crate::backends::Error as E;
        let probe = "probe-5c1@example.org";
        for e in [
            E::Store(format!(
                "ERR unknown command 'SISMEMBER', with args beginning with: 'k' '{probe}'"
            )),
            E::Unreachable(probe.into()),
            E::AuthenticationFailed(probe.into()),
            E::BucketNotFound(probe.into()),
        ] {
            let f = redact(&e);
            assert_eq!((f.reason, f.category), (e.reason(), e.category()));
            assert!(!f.message.contains("probe-5c1"), "{}", f.message);
        }
        let spec =
            E::InvalidSpec("target t: subject.s3.keyPrefixes[0] is not a valid template".into());
        assert_eq!(redact(&spec), spec.failure());
    }

    #[test]
    fn copies_retained_under_a_ground_settle_the_request_and_are_looked_at_again() {
        use crate::api::retentionpolicy::RetentionException;
        use ErasurePhase::*;
        let retained = RetainedCopiesStatus {
            count: 2,
            ground: RetentionException::LegalClaims,
            description: "tax claims".into(),
            earliest_retain_until: Some(ts("2027-01-01T00:00:00Z")),
            latest_retain_until: Some(ts("2030-01-01T00:00:00Z")),
            legal_holds: 0,
        };
        let mut t = vec![target(T::Erased), target(T::Erased)];
        t[0].found = 3;
        apply(
            &mut t[0],
            SubjectAction::Verify,
            ActionResult::Retained {
                remaining: 2,
                retained: retained.clone(),
            },
        );
        apply(
            &mut t[1],
            SubjectAction::Verify,
            ActionResult::Done {
                count: 0,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!(t[0].phase, T::Retained);
        assert!(
            t[0].message.contains("Art. 17(3)(e)") && t[0].message.contains("2030-01-01"),
            "{}",
            t[0].message
        );
        assert_eq!(
            next_phase(Verifying, &t, &[], false),
            CompletedWithExceptions
        );
        assert_eq!(totals(&t).retained, 2);
        assert!(settled_phase(CompletedWithExceptions));
        // Not due before the earliest date; due after; a legal hold (no date) always is.
        assert!(!retained_due(&t, ts("2026-12-31T00:00:00Z")));
        assert_eq!(
            retained_wake(&t, ts("2026-12-31T00:00:00Z")),
            Some(ts("2027-01-01T00:00:00Z"))
        );
        assert!(retained_due(&t, ts("2027-01-01T00:00:00Z")));
        assert_eq!(
            action_for(Verifying, &t[0], false),
            Some(SubjectAction::Verify)
        );
        // The lock lapsed: verification finds copies no longer retained, so they are erased.
        apply(
            &mut t[0],
            SubjectAction::Verify,
            ActionResult::Done {
                count: 2,
                skipped: vec![],
                ran: true,
                blocked: 0,
                malformed: 0,
            },
        );
        assert_eq!((t[0].phase, t[0].retained.as_ref()), (T::Found, None));
        assert_eq!(next_phase(Verifying, &t, &[], false), Erasing);
    }

    #[test]
    fn a_cluster_wide_request_is_taken_only_in_the_operators_namespace_with_qualified_policies() {
        let mut r = request();
        r.metadata.namespace = Some("shop".into());
        assert!(
            validate_scope(&r, "tombstone-system").is_ok(),
            "namespaced: anywhere"
        );
        r.spec.scope = Some(RequestScope::Cluster);
        let refused = validate_scope(&r, "tombstone-system").unwrap_err();
        assert!(
            refused.contains("tombstone-system") && refused.contains("shop"),
            "{refused}"
        );
        r.metadata.namespace = Some("tombstone-system".into());
        assert!(validate_scope(&r, "tombstone-system").is_ok());
        r.spec.policies = Some(vec!["mail/sessions".into(), "sessions".into()]);
        assert!(validate_scope(&r, "tombstone-system")
            .unwrap_err()
            .contains("\"sessions\""));
        assert_eq!(
            qualified_policy("mail/sessions"),
            Some(("mail", "sessions"))
        );
        for bad in ["/x", "x/", "a/b/c", "plain"] {
            assert_eq!(qualified_policy(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_namespace_opts_out_only_with_the_label_and_a_reason() {
        let ns = |labels: serde_json::Value, annotations: serde_json::Value| {
            serde_json::from_value::<k8s_openapi::api::core::v1::Namespace>(serde_json::json!({
                "metadata": {"name": "legacy", "labels": labels, "annotations": annotations}
            }))
            .unwrap()
        };
        let label = serde_json::json!({"tombstone.dev/erasure-opt-out": "true"});
        let reason =
            serde_json::json!({"tombstone.dev/erasure-opt-out-reason": " No personal data "});
        assert_eq!(
            opt_out_reason(&ns(label.clone(), reason.clone())).as_deref(),
            Some("No personal data")
        );
        assert_eq!(
            opt_out_reason(&ns(label.clone(), serde_json::json!({}))),
            None
        );
        let blank = serde_json::json!({"tombstone.dev/erasure-opt-out-reason": "  "});
        assert_eq!(opt_out_reason(&ns(label, blank)), None);
        let off = serde_json::json!({"tombstone.dev/erasure-opt-out": "false"});
        assert_eq!(opt_out_reason(&ns(off, reason)), None);
    }

    #[test]
    fn progress_is_summed_per_namespace() {
        let target = |ns: Option<&str>, phase, erased| ErasureTargetStatus {
            namespace: ns.map(str::to_string),
            phase,
            found: erased,
            erased,
            ..Default::default()
        };
        let targets = [
            target(Some("shop"), T::Verified, 4),
            target(Some("shop"), T::Failed, 0),
            target(Some("mail"), T::Blocked, 0),
            target(None, T::Verified, 9),
        ];
        let not_searched = [NotSearched {
            namespace: Some("legacy".into()),
            reason: "NamespaceOptedOut".into(),
            ..Default::default()
        }];
        let progress = namespace_progress(&targets, &not_searched);
        let names: Vec<&str> = progress.iter().map(|p| p.namespace.as_str()).collect();
        assert_eq!(names, ["legacy", "mail", "shop"]);
        let shop = &progress[2];
        assert_eq!(
            (shop.targets, shop.done, shop.failed, shop.erased),
            (2, 1, 1, 4)
        );
        assert_eq!((progress[1].blocked, progress[0].not_searched), (1, 1));
        assert!(
            namespace_progress(&targets[3..], &[]).is_empty(),
            "a namespaced request has none"
        );
    }

    #[test]
    fn skipped_targets_and_stores_not_ready_are_listed_as_not_searched_while_so() {
        let kept = NotSearched {
            policy: "p".into(),
            target: "metrics".into(),
            reason: "NoSubjectLocator".into(),
            ..Default::default()
        };
        let target = |name: &str, phase, message: &str, found| ErasureTargetStatus {
            policy: "p".into(),
            target: name.into(),
            phase,
            message: message.into(),
            found,
            ..Default::default()
        };
        let targets = [
            target("a", T::Skipped, "skipped: keys[0] needs {userId}", 0),
            target(
                "b",
                T::Failed,
                "StoreNotReady: DataStore cache is not ready",
                0,
            ),
            target(
                "c",
                T::Failed,
                "StoreNotReady: DataStore cache is not ready",
                3,
            ),
            target("d", T::Failed, "StoreError: the store failed", 0),
            target("e", T::Verified, "", 2),
        ];
        let first = coverage(std::slice::from_ref(&kept), &targets);
        let reasons: Vec<(&str, &str)> = first
            .iter()
            .map(|n| (n.target.as_str(), n.reason.as_str()))
            .collect();
        assert_eq!(
            reasons,
            [
                ("metrics", "NoSubjectLocator"),
                ("a", "IdentifierNotGiven"),
                ("b", "StoreNotReady")
            ]
        );
        // Once the store is ready and the target found its data, it leaves the list.
        let mut later = targets.clone();
        later[1] = target("b", T::Verified, "", 1);
        let second = coverage(&first, &later);
        assert_eq!(second.len(), 2, "{second:?}");
        assert!(second.iter().all(|n| n.target != "b"));
    }
}
