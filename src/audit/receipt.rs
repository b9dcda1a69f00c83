//! Receipts: the audit record of a completed erasure or sweep, chained into its stream (see
//! `chain`), written as one JSON line on the log under the tracing target `audit`, with its
//! SHA-256 in status, and, with a sink configured, as one object in the sink (see `sink`). The
//! record carries the subject's keyed digest, counts and times, never the identifiers.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::chain::{self, Stream, StreamKind};
use crate::api::erasurerequest::{ErasureRequest, ErasureRequestStatus};
use crate::api::receipts::ReceiptChainStatus;
use crate::api::retentionpolicy::{RetentionPolicy, RetentionPolicyStatus};

/// The tracing target receipts are logged under; a log pipeline keeps these lines.
pub const AUDIT_TARGET: &str = "audit";

/// The audit record of an erasure request in its final state.
pub fn erasure_record(request: &ErasureRequest, status: &ErasureRequestStatus) -> Value {
    json!({
        "kind": "ErasureReceipt",
        "operatorVersion": env!("CARGO_PKG_VERSION"),
        "namespace": request.metadata.namespace,
        "request": request.metadata.name,
        "uid": request.metadata.uid,
        "reference": request.spec.reference,
        "ground": request.spec.reason,
        "dryRun": request.spec.dry_run,
        "subjectDigest": status.subject_digest,
        "receivedAt": status.received_at,
        "deadline": status.deadline,
        "completionTime": status.completion_time,
        "targets": status.targets,
        "notSearched": status.not_searched,
        "totals": status.totals,
        "subjectSecret": status.subject_secret,
        "queryTextRetainedBy": query_text_retained_by(status),
    })
}

/// Store kinds the request ran in that keep the text of a subject query (so an identifier)
/// because of how they delete: a Loki delete request keeps its LogQL query; an Elasticsearch
/// task document in `.tasks` keeps the delete-by-query request. Sorted, without repeats.
pub fn query_text_retained_by(status: &ErasureRequestStatus) -> Vec<String> {
    let mut kinds: Vec<String> = status
        .targets
        .iter()
        .filter_map(|t| t.store_kind.clone())
        .filter(|k| QUERY_TEXT_KEPT_BY.contains(&k.as_str()))
        .collect();
    kinds.sort();
    kinds.dedup();
    kinds
}

/// The store kinds whose deletion mechanism keeps the query text.
pub const QUERY_TEXT_KEPT_BY: [&str; 2] = ["elasticsearch", "loki"];

/// The audit record of a completed retention sweep: what each target scanned and deleted.
pub fn sweep_record(policy: &RetentionPolicy, status: &RetentionPolicyStatus) -> Value {
    let targets: Vec<Value> = status
        .targets
        .iter()
        .map(|t| json!({"name": t.name, "phase": t.phase, "scanned": t.scanned, "deleted": t.deleted, "blocked": t.blocked, "held": t.held, "unjudged": t.unjudged}))
        .collect();
    json!({
        "kind": "SweepReceipt",
        "operatorVersion": env!("CARGO_PKG_VERSION"),
        "namespace": policy.metadata.namespace,
        "policy": policy.metadata.name,
        "uid": policy.metadata.uid,
        "generation": policy.metadata.generation,
        "retention": policy.spec.retention,
        "purpose": policy.spec.purpose,
        "legalBasis": policy.spec.legal_basis,
        "lastSweep": status.last_sweep,
        "targets": targets,
    })
}

/// The canonical form: compact JSON with object keys sorted at every level, whatever order
/// the map type keeps.
pub fn canonical(record: &Value) -> String {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(map) => {
                let mut keys: Vec<&String> = map.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&map[k])))
                        .collect(),
                )
            }
            Value::Array(items) => Value::Array(items.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    sorted(record).to_string()
}

/// `sha256:` + hex of the canonical form.
pub fn receipt_digest(canonical: &str) -> String {
    format!(
        "sha256:{}",
        hex::encode(Sha256::digest(canonical.as_bytes()))
    )
}

/// The stream of a policy's sweep receipts.
pub fn policy_stream(policy: &RetentionPolicy) -> Stream {
    Stream {
        kind: StreamKind::Policy,
        namespace: policy.metadata.namespace.clone().unwrap_or_default(),
        name: policy.metadata.name.clone().unwrap_or_default(),
        uid: policy.metadata.uid.clone().unwrap_or_default(),
    }
}

/// The stream of a request's receipts.
pub fn request_stream(request: &ErasureRequest) -> Stream {
    Stream {
        kind: StreamKind::Request,
        namespace: request.metadata.namespace.clone().unwrap_or_default(),
        name: request.metadata.name.clone().unwrap_or_default(),
        uid: request.metadata.uid.clone().unwrap_or_default(),
    }
}

/// The receipt that closes a request's stream when the request is deleted: `kind` is
/// `ErasureAbandoned` (deleted before it finished) or `ErasureRequestClosed` (deleted after,
/// by its owner or when its time was up); `by` says which (`User`, `Lifecycle`).
pub fn closing_record(
    request: &ErasureRequest,
    status: &ErasureRequestStatus,
    kind: &str,
    by: &str,
) -> Value {
    json!({
        "kind": kind,
        "operatorVersion": env!("CARGO_PKG_VERSION"),
        "namespace": request.metadata.namespace,
        "request": request.metadata.name,
        "uid": request.metadata.uid,
        "deletedBy": by,
        "phase": status.phase,
        "subjectDigest": status.subject_digest,
        "receivedAt": status.received_at,
        "deadline": status.deadline,
        "completionTime": status.completion_time,
        "totals": status.totals,
        "closedAt": crate::api::Timestamp::now(),
    })
}

/// Seals `record` as the next receipt of `stream` after `head`, logs it on the `audit`
/// target, and returns the new head: its digest is the receipt, and with a sink (`sink_prefix`)
/// the receipt waits in it for upload.
pub fn emit(
    record: &Value,
    stream: &Stream,
    head: Option<ReceiptChainStatus>,
    sink_prefix: Option<&str>,
) -> ReceiptChainStatus {
    let sealed = chain::seal(
        record,
        stream,
        head.as_ref(),
        sink_prefix.unwrap_or_default(),
    );
    tracing::info!(target: AUDIT_TARGET, receipt = %sealed.digest, stream = %stream.uid, sequence = sealed.sequence, record = %sealed.body, "audit record");
    chain::advance(head, &sealed, sink_prefix.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receipt_names_the_store_kinds_that_keep_the_query_text() {
        use crate::api::erasurerequest::ErasureTargetStatus;
        let target = |kind: Option<&str>| ErasureTargetStatus {
            store_kind: kind.map(str::to_string),
            ..Default::default()
        };
        let status = ErasureRequestStatus {
            targets: vec![
                target(Some("loki")),
                target(Some("redis")),
                target(None),
                target(Some("loki")),
                target(Some("elasticsearch")),
            ],
            ..Default::default()
        };
        assert_eq!(
            query_text_retained_by(&status),
            vec!["elasticsearch".to_string(), "loki".to_string()]
        );
    }

    #[test]
    fn the_canonical_form_sorts_keys_and_the_digest_is_sha256() {
        let a = json!({"b": 1, "a": {"d": 2, "c": 3}});
        assert_eq!(canonical(&a), r#"{"a":{"c":3,"d":2},"b":1}"#);
        // printf '%s' '{"a":{"c":3,"d":2},"b":1}' | sha256sum
        assert_eq!(
            receipt_digest(&canonical(&a)),
            "sha256:78d48859c3252943aab7306f76c80f3f07783582e05ab8f944ce0696f2dbfc67"
        );
    }
}
