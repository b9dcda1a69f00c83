//! An erasure request's side of a batch (see [`crate::engine::batch`]): its target joins the
//! batch of the store, target and action it is at, with a gate that reads the LegalHolds
//! bearing on this request afresh before every commit, and a checkpoint that writes the
//! target's cursor into this request's status after every step.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use kube::{Api, ResourceExt};

use super::holds::{holds, SubjectDigests};
use super::plan::{self, ActionResult};
use super::Context;
use crate::api::erasurerequest::{ErasureRequest, ErasureRequestStatus};
use crate::api::retentionpolicy::Target;
use crate::api::Timestamp;
use crate::audit::DigestKey;
use crate::backends::{self, Backend, BatchMember, Failure, Next, SubjectAction, SubjectStep};
use crate::engine::batch::{
    BatchKey, End, Joining, MemberCheckpoint, MemberCursor, MemberGate, Outcome, Work,
};
use crate::engine::Claim;

/// The request's status as its reconcile holds it while its targets are in batches: each
/// checkpoint changes its own target in it and writes all of it, one write at a time.
pub(super) type SharedStatus = Arc<tokio::sync::Mutex<ErasureRequestStatus>>;

/// One target of one request, joining a batch.
pub(super) struct Member<'a> {
    pub request: &'a ErasureRequest,
    pub claim: Claim,
    /// The namespace of the target's policy.
    pub namespace: &'a str,
    pub policy: &'a str,
    pub target: &'a Target,
    pub key: &'a DigestKey,
    pub identifiers: &'a BTreeMap<String, String>,
    pub action: SubjectAction,
    pub backend: Arc<dyn Backend>,
    pub store_key: &'a str,
    /// The target's index in the request's status.
    pub index: usize,
    pub status: SharedStatus,
}

/// Whether the target goes through the batcher: batching is on and the store batches, and
/// the target starts (no cursor) or resumes a batch. A target resuming a one-subject cursor
/// goes on alone. Returns where it resumes (None: from the start).
pub(super) fn batched(
    ctx: &Context,
    backend: &dyn Backend,
    cursor: Option<&str>,
) -> Option<Option<MemberCursor>> {
    if !backend.batches() {
        return None;
    }
    match cursor {
        None if ctx.batcher.settings().enabled() => Some(None),
        None => None,
        // An unreadable member cursor starts its target's work over, in a batch.
        Some(c) if MemberCursor::is_one(c) => Some(MemberCursor::decode(c)),
        Some(_) => None,
    }
}

/// Joins the target's batch (queued now) and waits for its outcome, as the step result the
/// one-subject path would have had; or, for a failure, the action's result directly. What
/// it waits on holds the outcome's receiver only: every member of a batch waits in it.
pub(super) fn join(
    ctx: &Arc<Context>,
    member: Member<'_>,
    resume: Option<MemberCursor>,
) -> impl std::future::Future<Output = Result<Result<SubjectStep, backends::Error>, ActionResult>>
       + Send
       + 'static {
    let request_namespace = member.request.namespace().unwrap_or_default();
    let key = batch_key(
        member.store_key,
        backend_id(&member.backend),
        member.namespace,
        member.policy,
        member.target,
        member.action,
        resume.as_ref(),
    );
    let joining =
        Joining {
            member: BatchMember {
                // The request's uid: unique per request even when two requests name the same
                // subject, and no personal data.
                id: member.request.metadata.uid.clone().unwrap_or_else(|| {
                    format!("{request_namespace}/{}", member.request.name_any())
                }),
                identifiers: member.identifiers.clone(),
            },
            resume,
            claim: member.claim,
            gate: Arc::new(RequestGate {
                ctx: ctx.clone(),
                request_namespace: request_namespace.clone(),
                target_namespace: member.namespace.to_string(),
                policy: member.policy.to_string(),
                subject: SubjectDigests::new(member.key, member.identifiers),
                key: member.key.clone(),
            }),
            checkpoint: Arc::new(StatusCheckpoint {
                ctx: ctx.clone(),
                api: Api::namespaced(ctx.client.clone(), &request_namespace),
                name: member.request.name_any(),
                status: member.status,
                index: member.index,
                action: member.action,
            }),
        };
    let work = Work {
        engine: ctx.engine.clone(),
        backend: member.backend,
        store_key: member.store_key.to_string(),
        target: member.target.clone(),
        action: member.action,
        cancel: ctx.shutdown.clone(),
        redact: plan::redact,
    };
    let outcome = ctx.batcher.join(key, joining, work);
    async move { as_step_result(outcome.await) }
}

/// A member's outcome as the step result the one-subject path would have had.
fn as_step_result(outcome: Outcome) -> Result<Result<SubjectStep, backends::Error>, ActionResult> {
    match outcome {
        Outcome::Alone(result) => Ok(result),
        Outcome::Batch(end) => {
            let step = |next| SubjectStep {
                count: end.count,
                blocked: end.blocked,
                malformed: end.malformed,
                ran: end.ran,
                skipped: end.skipped.clone(),
                next,
                failure: None,
                notices: end.notices.clone(),
            };
            match &end.end {
                End::Done => Ok(Ok(step(Next::Done))),
                // A target held now is marked so by the hold check that follows; it starts
                // over (its counts kept) once the hold is gone.
                End::Stopped(cursor) | End::Held(cursor) => {
                    Ok(Ok(step(Next::Continue(cursor.clone()))))
                }
                End::Failed {
                    failure,
                    cursor: Some(cursor),
                } => Err(ActionResult::FailedAt {
                    failure: failure.clone(),
                    cursor: cursor.clone(),
                }),
                End::Failed {
                    failure,
                    cursor: None,
                } => Err(ActionResult::Failed(failure.clone())),
            }
        }
    }
}

/// Which backend a member resolved its store to: the engine builds a new one when the
/// DataStore's spec changes, and the members alive with one share its allocation.
fn backend_id(backend: &Arc<dyn Backend>) -> usize {
    Arc::as_ptr(backend).cast::<()>() as usize
}

/// The batch a target joins. The target's spec and the store's backend are part of it:
/// requests that read their policy or DataStore before and after an edit must not share a
/// pass, for the batch works every member with one spec and one connection (a member
/// verified under another pattern, or on the server the DataStore named before, could pass
/// while its records remain).
fn batch_key(
    store_key: &str,
    backend: usize,
    namespace: &str,
    policy: &str,
    target: &Target,
    action: SubjectAction,
    resume: Option<&MemberCursor>,
) -> BatchKey {
    use sha2::Digest;
    // Plain data: serialising cannot fail; if it did, all such targets would share the key
    // of their names alone, as before.
    let spec = serde_json::to_string(target).unwrap_or_default();
    let spec = hex::encode(&sha2::Sha256::digest(spec.as_bytes())[..8]);
    BatchKey {
        store_key: store_key.to_string(),
        target: format!("{namespace}/{policy}/{}@{spec}#{backend:x}", target.name),
        action,
        at: resume.and_then(|r| r.at.clone()),
    }
}

/// The holds bearing on one target of one request, read afresh (the list shared with the
/// reconciles asking at the same moment, never older than the question): a hold on the
/// subject or on the target's policy, in the request's namespace or the policy's; a hold
/// that cannot be evaluated holds too (fail closed).
struct RequestGate {
    ctx: Arc<Context>,
    request_namespace: String,
    target_namespace: String,
    policy: String,
    key: DigestKey,
    subject: SubjectDigests,
}

#[async_trait]
impl MemberGate for RequestGate {
    async fn held(&self) -> Result<bool, backends::Error> {
        let now = Timestamp::now();
        let mut namespaces = vec![self.request_namespace.as_str()];
        if self.target_namespace != self.request_namespace {
            namespaces.push(self.target_namespace.as_str());
        }
        for namespace in namespaces {
            let found = holds(&self.ctx, namespace, &self.key, &self.subject, now).await;
            let on_policy =
                namespace == self.target_namespace && found.policies.contains_key(&self.policy);
            if !found.subject.is_empty() || !found.unverifiable.is_empty() || on_policy {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

/// Writes a target's batch cursor into its request's status.
struct StatusCheckpoint {
    ctx: Arc<Context>,
    api: Api<ErasureRequest>,
    name: String,
    status: SharedStatus,
    index: usize,
    action: SubjectAction,
}

#[async_trait]
impl MemberCheckpoint for StatusCheckpoint {
    async fn save(&self, cursor: &str) -> Result<(), Failure> {
        let mut status = self.status.lock().await;
        let Some(target) = status.targets.get_mut(self.index) else {
            return Err(Failure::new(
                backends::Category::NeedsAttention,
                "CheckpointLost",
                "the target left the request's status while its batch ran",
            ));
        };
        plan::apply(
            target,
            self.action,
            ActionResult::InProgress {
                cursor: cursor.to_string(),
            },
        );
        let written = self
            .ctx
            .apply_status(&self.api, &self.name, &*status)
            .await
            .map_err(|e| {
                Failure::new(
                    e.category(),
                    e.reason(),
                    format!(
                        "the batch's checkpoint could not be written to status ({})",
                        e.reason()
                    ),
                )
            })?;
        if written.metadata.deletion_timestamp.is_some() {
            // Deleted: nothing more is started for it. It leaves the batch here, and its
            // reconcile, no longer waiting, closes it with its receipt.
            return Err(Failure::new(
                backends::Category::Transient,
                "RequestDeleted",
                "the request is being deleted: its batch goes on without it",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(pattern: &str) -> Target {
        serde_json::from_value(serde_json::json!({
            "name": "sessions", "store": "cache",
            "redis": {"keyPattern": pattern, "mode": "idle"},
            "subject": {"redis": {"keys": ["session:{userId}:*"]}},
        }))
        .expect("a valid target")
    }

    /// Two requests that read one policy target, or its DataStore, before and after an edit
    /// are not one batch; the same spec and backend at the same position is.
    #[test]
    fn the_batch_key_tells_a_target_or_store_edited_between_its_members_apart() {
        let keyed = |t: &Target, at: Option<&str>, backend: usize| {
            let resume = at.map(|a| MemberCursor {
                at: Some(a.into()),
                ..MemberCursor::default()
            });
            batch_key(
                "shop/cache",
                backend,
                "shop",
                "sessions",
                t,
                SubjectAction::Verify,
                resume.as_ref(),
            )
        };
        let key = |t: &Target, at: Option<&str>| keyed(t, at, 1);
        let (before, after) = (target("session:*"), target("sess*"));
        assert_eq!(key(&before, None), key(&before.clone(), None));
        assert_ne!(key(&before, None), key(&after, None));
        assert_ne!(key(&before, Some("1")), key(&before, None));
        assert_ne!(
            keyed(&before, None, 1),
            keyed(&before, None, 2),
            "the DataStore was edited between them"
        );
    }
}
