//! The end of a request's life. Every request carries the finalizer
//! [`FINALIZER`]: when it is deleted, a closing receipt ends its chain (`ErasureAbandoned` for
//! one deleted before it finished, `ErasureRequestClosed` for one that had), logged always and
//! written to the sink when there is one, before the finalizer is released. With a sink, a
//! Completed request whose receipts are in the sink is deleted by the operator once
//! `--completed-request-ttl` has passed since it completed, with an Event; without a sink,
//! nothing is deleted.

use std::time::Duration;

use kube::api::{DeleteParams, Preconditions};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use tracing::{info, warn};

use super::receipts_key;
use crate::api::erasurerequest::{ErasurePhase, ErasureRequest, ErasureRequestStatus};
use crate::api::receipts::ReceiptChainStatus;
use crate::api::Timestamp;
use crate::audit::{chain, receipt};
use crate::controller::{with_finalizer, without_finalizer, Context, Error};

/// Held by every request until its closing receipt is recorded.
pub const FINALIZER: &str = "tombstone.dev/closing-receipt";
/// Receipt kinds of a closing receipt.
pub const ABANDONED: &str = "ErasureAbandoned";
pub const CLOSED: &str = "ErasureRequestClosed";
/// How soon to look again at a request whose receipts are not (yet) found in the sink.
const NOT_IN_SINK_RECHECK: Duration = Duration::from_secs(3600);

/// The closing receipt's kind for a request deleted in `phase` (pure): a request that reached
/// a final phase (Completed, or Failed) is closed; any other is abandoned.
pub fn closing_kind(phase: ErasurePhase) -> &'static str {
    match phase {
        ErasurePhase::Completed | ErasurePhase::Failed => CLOSED,
        _ => ABANDONED,
    }
}

/// Whether a closing receipt already waits for the sink (pure): it is not made twice.
pub fn closing_pending(head: Option<&ReceiptChainStatus>) -> bool {
    head.is_some_and(|h| {
        h.pending_upload.iter().any(|p| {
            serde_json::from_str::<serde_json::Value>(&p.body)
                .ok()
                .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from))
                .is_some_and(|k| chain::CLOSING_KINDS.contains(&k.as_str()))
        })
    })
}

/// When a Completed request is due for deletion (pure): `ttl` after it completed. None when
/// it has no completion time or the date would overflow.
pub fn expires_at(status: &ErasureRequestStatus, ttl: Duration) -> Option<Timestamp> {
    let done = status.completion_time?;
    let ttl = chrono::Duration::from_std(ttl).ok()?;
    done.0.checked_add_signed(ttl).map(Timestamp)
}

/// Adds the finalizer to a request that is not being deleted.
pub async fn ensure_finalizer(
    ctx: &Context,
    api: &Api<ErasureRequest>,
    request: &ErasureRequest,
) -> Result<(), Error> {
    let Some(finalizers) = with_finalizer(request.finalizers(), FINALIZER) else {
        return Ok(());
    };
    ctx.patch_finalizers(api, request, finalizers).await
}

/// Seals a closing receipt of `kind` onto `status`'s chain (logged now; pending for the
/// sink when there is one).
fn seal_closing(
    ctx: &Context,
    request: &ErasureRequest,
    status: &mut ErasureRequestStatus,
    kind: &str,
    by: &str,
) {
    let record = receipt::closing_record(request, status, kind, by);
    let head = receipt::emit(
        &record,
        &receipt::request_stream(request),
        status.receipts.take(),
        ctx.sink_prefix(),
    );
    status.receipts = Some(head);
}

/// A request being deleted: its closing receipt recorded (and in the sink, when there is one),
/// then the finalizer released. While the sink does not take the receipt, the finalizer stays
/// and the receipt waits in status.
pub async fn close(
    ctx: &Context,
    api: &Api<ErasureRequest>,
    request: &ErasureRequest,
) -> Result<Action, Error> {
    let Some(finalizers) = without_finalizer(request.finalizers(), FINALIZER) else {
        return Ok(Action::await_change());
    };
    let previous = request.status.clone().unwrap_or_default();
    let mut status = previous.clone();
    if !closing_pending(status.receipts.as_ref()) {
        let kind = closing_kind(status.phase);
        seal_closing(ctx, request, &mut status, kind, "User");
        if kind == ABANDONED {
            let digest = status
                .receipts
                .as_ref()
                .map(|h| h.digest.clone())
                .unwrap_or_default();
            let note = format!(
                "Deleted before it finished (phase {:?}): the abandonment is recorded in receipt {digest}",
                status.phase
            );
            info!(phase = ?status.phase, receipt = %digest, "an unfinished erasure request was deleted: abandonment recorded");
            ctx.publish(request, EventType::Warning, ABANDONED, "Close", note)
                .await;
        }
    }
    if ctx.upload_receipts(request, &mut status.receipts).await {
        if status != previous {
            ctx.apply_status(api, &request.name_any(), &status).await?;
        }
        return Ok(Action::requeue(ctx.backoff(&receipts_key(request))));
    }
    ctx.patch_finalizers(api, request, finalizers).await?;
    ctx.reset_failures(&receipts_key(request));
    Ok(Action::await_change())
}

/// When a Completed request is due for deletion: with a receipt sink, its completion time
/// and the TTL; without one, never (it stays).
pub fn deletion_due(ctx: &Context, status: &ErasureRequestStatus) -> Option<Timestamp> {
    ctx.sink.as_ref()?;
    expires_at(status, ctx.settings.completed_request_ttl)
}

/// Look again one second after `at`.
pub fn wake_after(at: Timestamp, now: Timestamp) -> Action {
    let wait = (at.0 - now.0).to_std().unwrap_or(Duration::ZERO);
    Action::requeue(wait + Duration::from_secs(1))
}

/// A Completed request whose receipts are all in the sink (`status` has none pending): once
/// its time is up, its chain is closed and it is deleted, with an Event. Returns when to look
/// again; without a sink, None (it stays).
pub async fn expire(
    ctx: &Context,
    api: &Api<ErasureRequest>,
    request: &ErasureRequest,
    status: &ErasureRequestStatus,
    now: Timestamp,
) -> Result<Option<Action>, Error> {
    let Some(sink) = &ctx.sink else {
        return Ok(None);
    };
    let Some(at) = expires_at(status, ctx.settings.completed_request_ttl) else {
        return Ok(None);
    };
    if at > now {
        return Ok(Some(wake_after(at, now)));
    }
    // Safely in the sink: the receipt status names is there, and hashes to that digest.
    let Some(head) = status.receipts.clone() else {
        return Ok(Some(Action::requeue(NOT_IN_SINK_RECHECK)));
    };
    let stream = receipt::request_stream(request);
    let key = chain::object_key(sink.settings().prefix.as_str(), &stream, head.sequence);
    let body = match sink.fetch(&ctx.client, &key).await {
        Ok(body) => body,
        Err(e) => {
            warn!(reason = e.reason(), error = %e, "cannot read the sink to confirm a completed request's receipts before deleting it");
            ctx.metrics.receipt_upload_failed(e.reason());
            return Ok(Some(Action::requeue(ctx.backoff(&receipts_key(request)))));
        }
    };
    let in_sink = body
        .as_deref()
        .is_some_and(|b| receipt::receipt_digest(b) == head.digest);
    if !in_sink {
        let note = format!(
            "Kept past its time: receipt {} is not in the sink as status records it, so the request is not deleted",
            head.digest
        );
        ctx.publish(
            request,
            EventType::Warning,
            "ReceiptNotInSink",
            "Expire",
            note,
        )
        .await;
        return Ok(Some(Action::requeue(NOT_IN_SINK_RECHECK)));
    }
    let closed = body
        .as_deref()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
        .and_then(|v| v.get("kind").and_then(|k| k.as_str()).map(String::from))
        .is_some_and(|k| chain::CLOSING_KINDS.contains(&k.as_str()));
    let mut closing = status.clone();
    if !closed {
        seal_closing(ctx, request, &mut closing, CLOSED, "Lifecycle");
        if ctx.upload_receipts(request, &mut closing.receipts).await {
            ctx.apply_status(api, &request.name_any(), &closing).await?;
            return Ok(Some(Action::requeue(ctx.backoff(&receipts_key(request)))));
        }
    }
    let digest = closing
        .receipts
        .as_ref()
        .map(|h| h.digest.clone())
        .unwrap_or_default();
    let days = ctx.settings.completed_request_ttl.as_secs() / 86_400;
    let note = format!(
        "Deleted {days} day(s) after it completed; its receipts are in the sink, the last is {digest}"
    );
    ctx.publish(
        request,
        EventType::Normal,
        "ErasureRequestExpired",
        "Expire",
        note,
    )
    .await;
    // The chain is closed: the finalizer has nothing left to record.
    if let Some(finalizers) = without_finalizer(request.finalizers(), FINALIZER) {
        ctx.patch_finalizers(api, request, finalizers).await?;
    }
    ctx.fence.check()?;
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: request.uid(),
            resource_version: None,
        }),
        ..Default::default()
    };
    match api.delete(&request.name_any(), &params).await {
        Ok(_) => info!(receipt = %digest, "deleted a completed erasure request past its time"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(Error::Kube(e)),
    }
    ctx.reset_failures(&receipts_key(request));
    Ok(Some(Action::await_change()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::receipts::PendingReceipt;

    #[test]
    fn unfinished_requests_are_abandoned_final_ones_closed() {
        assert_eq!(closing_kind(ErasurePhase::Completed), CLOSED);
        assert_eq!(closing_kind(ErasurePhase::Failed), CLOSED);
        for phase in [
            ErasurePhase::Pending,
            ErasurePhase::Discovering,
            ErasurePhase::Erasing,
            ErasurePhase::Verifying,
            ErasurePhase::Blocked,
            ErasurePhase::CompletedWithExceptions,
        ] {
            assert_eq!(closing_kind(phase), ABANDONED, "{phase:?}");
        }
    }

    #[test]
    fn a_closing_receipt_waiting_for_the_sink_is_not_made_twice() {
        let pending = |kind: &str| ReceiptChainStatus {
            sequence: 2,
            digest: "sha256:x".into(),
            pending_upload: vec![PendingReceipt {
                sequence: 2,
                key: "k".into(),
                body: format!(r#"{{"kind":"{kind}"}}"#),
            }],
        };
        assert!(closing_pending(Some(&pending(ABANDONED))));
        assert!(closing_pending(Some(&pending(CLOSED))));
        assert!(!closing_pending(Some(&pending("ErasureReceipt"))));
        assert!(!closing_pending(None));
    }

    #[test]
    fn a_request_expires_its_ttl_after_completion_and_never_overflows() {
        let t = |s: &str| Timestamp(s.parse().unwrap());
        let status = ErasureRequestStatus {
            completion_time: Some(t("2026-11-01T00:00:00Z")),
            ..Default::default()
        };
        assert_eq!(
            expires_at(&status, Duration::from_secs(30 * 86_400)),
            Some(t("2026-12-01T00:00:00Z"))
        );
        assert_eq!(expires_at(&status, Duration::from_secs(u64::MAX)), None);
        assert_eq!(
            expires_at(&ErasureRequestStatus::default(), Duration::ZERO),
            None
        );
    }
}
