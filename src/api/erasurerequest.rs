//! `ErasureRequest`: one data subject's Art. 17 request.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, SecretRef, Timestamp};
use super::retentionpolicy::RetentionException;

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tombstone.dev",
    version = "v1alpha1",
    kind = "ErasureRequest",
    namespaced,
    status = "ErasureRequestStatus",
    shortname = "erasure",
    category = "tombstone",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Erased","type":"integer","jsonPath":".status.totals.erased"}"#,
    printcolumn = r#"{"name":"Deadline","type":"string","jsonPath":".status.deadline"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ErasureRequestSpec {
    pub subject: Subject,
    /// The Art. 17(1) ground, (a)–(f).
    pub reason: ErasureGround,
    /// When the request reached the controller; default: the object's creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<Timestamp>,
    /// Policies to erase from; default: every policy in the namespace with a subject locator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policies: Option<Vec<String>>,
    /// Find and count only.
    #[serde(default)]
    pub dry_run: bool,
    /// An external ticket id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// Keep the identifiers Secret once the request completes (default: it is deleted if it
    /// is labelled `tombstone.dev/subject-identifiers: "true"`; an unlabelled Secret is
    /// always kept).
    #[serde(default)]
    pub retain_subject_secret: bool,
    /// `Namespace` (default): the policies of the request's namespace. `Cluster`: the
    /// policies of every namespace (but those opted out, see `tombstone.dev/erasure-opt-out`),
    /// for one request per person across the organisation; accepted only in the operator's
    /// namespace, where the identifiers Secret stays (it is never copied elsewhere). With
    /// `Cluster`, `policies` names them as `namespace/name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<RequestScope>,
}

/// Which namespaces' datasets a request searches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RequestScope {
    /// The request's own namespace.
    #[default]
    Namespace,
    /// Every namespace that has not opted out.
    Cluster,
}

/// The label by which a namespace opts out of cluster-wide erasure requests. It counts only
/// with a reason in the annotation [`ERASURE_OPT_OUT_REASON_ANNOTATION`]; the reason is
/// written into every cluster-wide request's `notSearched` (and so its receipt).
pub const ERASURE_OPT_OUT_LABEL: &str = "tombstone.dev/erasure-opt-out";
/// Why a namespace opted out (for the DPO and the auditor: e.g. "holds no personal data").
pub const ERASURE_OPT_OUT_REASON_ANNOTATION: &str = "tombstone.dev/erasure-opt-out-reason";

/// Who is to be erased: identifiers from a Secret (each key an identifier type) and/or
/// inline, for pseudonymous identifiers only (an internal user id): an inline value stays in
/// etcd with the request, so e-mail addresses (a value with `@`, a type named like `email`)
/// are refused there.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("anyOf" = [{"required": ["secretRef"]}, {"required": ["identifiers"]}]))]
pub struct Subject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identifiers: Option<BTreeMap<String, String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum ErasureGround {
    NoLongerNecessary,
    ConsentWithdrawn,
    Objection,
    UnlawfulProcessing,
    LegalObligation,
    ChildConsent,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ErasurePhase {
    #[default]
    Pending,
    Discovering,
    Erasing,
    Verifying,
    Completed,
    /// Everything erased and verified except copies a store keeps under a lock for which
    /// the policy declares an Art. 17(3) ground (`status.targets[].retained`); the erasure
    /// is re-applied when the locks lapse.
    CompletedWithExceptions,
    Blocked,
    Failed,
}

impl ErasurePhase {
    pub const ALL: [ErasurePhase; 8] = [
        ErasurePhase::Pending,
        ErasurePhase::Discovering,
        ErasurePhase::Erasing,
        ErasurePhase::Verifying,
        ErasurePhase::Completed,
        ErasurePhase::CompletedWithExceptions,
        ErasurePhase::Blocked,
        ErasurePhase::Failed,
    ];

    /// The name as written in status, for messages and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErasurePhase::Pending => "Pending",
            ErasurePhase::Discovering => "Discovering",
            ErasurePhase::Erasing => "Erasing",
            ErasurePhase::Verifying => "Verifying",
            ErasurePhase::Completed => "Completed",
            ErasurePhase::CompletedWithExceptions => "CompletedWithExceptions",
            ErasurePhase::Blocked => "Blocked",
            ErasurePhase::Failed => "Failed",
        }
    }
}

/// What became of the identifiers Secret (`spec.subject.secretRef`) once the request
/// completed. The operator deletes only a Secret labelled
/// `tombstone.dev/subject-identifiers: "true"`, and only after a real erasure ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SubjectSecretFate {
    /// Deleted once the request completed.
    Deleted,
    /// Kept: it does not carry the label, so it may be something else than identifiers.
    KeptUnmarked,
    /// Kept as `retainSubjectSecret` asks.
    KeptOnRequest,
    /// Kept: a dry run erases nothing.
    KeptDryRun,
    /// Kept until the copies retained under an Art. 17(3) ground are erased too.
    KeptForRetainedCopies,
}

/// The label that marks a Secret as holding a data subject's identifiers, which the
/// operator may delete once their erasure is done.
pub const SUBJECT_IDENTIFIERS_LABEL: &str = "tombstone.dev/subject-identifiers";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ErasureTargetPhase {
    #[default]
    Pending,
    Found,
    Erased,
    Verified,
    NothingFound,
    Skipped,
    Blocked,
    /// Everything else erased; the copies left are under a store lock kept under a declared
    /// Art. 17(3) ground (see `retained`).
    Retained,
    Failed,
}

/// The copies of a target kept under a store lock and a declared Art. 17(3) ground.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetainedCopiesStatus {
    /// Copies retained (counted as verification counts them), never their keys.
    pub count: u64,
    pub ground: RetentionException,
    pub description: String,
    /// The earliest and latest retain-until dates among them; the erasure is re-applied at
    /// the earliest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest_retain_until: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest_retain_until: Option<Timestamp>,
    /// Copies under an Object Lock legal hold (no date: kept until it is removed).
    #[serde(default)]
    pub legal_holds: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErasureTargetStatus {
    /// The policy's namespace, in a cluster-wide request (omitted: the request's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub policy: String,
    pub target: String,
    pub store: String,
    pub phase: ErasureTargetPhase,
    /// When the target entered its current phase: a target `Failed` for long is a stall.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Timestamp>,
    #[serde(default)]
    pub found: u64,
    #[serde(default)]
    pub erased: u64,
    #[serde(default)]
    pub remaining: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// Where the target's current action resumes while the store works on a deletion of its
    /// own (a Loki delete request, an Elasticsearch task); never holds an identifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    /// The kind of store the target's locators ran in, once one did (`redis`, `s3`, `loki`,
    /// `elasticsearch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_kind: Option<String>,
    /// Copies kept under a store lock and a declared Art. 17(3) ground (phase `Retained`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained: Option<RetainedCopiesStatus>,
    /// The category of the target's failure while it is `Failed` (the message starts with
    /// its reason): `Transient` and `Refused` are retried with back-off, `InvalidSpec` and
    /// `NeedsAttention` wait for a change and are looked at again now and then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_category: Option<crate::api::common::ErrorCategory>,
}

/// A dataset in the request's scope that it does not search, and why.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NotSearched {
    /// The policy's namespace, in a cluster-wide request (omitted: the request's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub policy: String,
    pub target: String,
    pub store: String,
    /// `NoSubjectLocator`; `NamespaceOptedOut` (a cluster-wide request, in a namespace that
    /// opted out; the message gives its reason); while it lasts, `IdentifierNotGiven` (a
    /// `Skipped` target: its locator needs an identifier type the subject was not given) or
    /// `StoreNotReady` (its store was not ready before it found anything).
    pub reason: String,
    pub message: String,
}

/// One namespace of a cluster-wide request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NamespaceProgress {
    pub namespace: String,
    /// Targets searched in it, and how many of them are done (verified, nothing found,
    /// skipped or retained).
    pub targets: u32,
    pub done: u32,
    /// Targets blocked by a LegalHold, and failing.
    #[serde(default)]
    pub blocked: u32,
    #[serde(default)]
    pub failed: u32,
    #[serde(default)]
    pub found: u64,
    #[serde(default)]
    pub erased: u64,
    /// Datasets of the namespace not searched (see `notSearched`).
    #[serde(default)]
    pub not_searched: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErasureTotals {
    pub found: u64,
    pub erased: u64,
    pub blocked: u64,
    /// Copies kept under a store lock and a declared Art. 17(3) ground.
    #[serde(default)]
    pub retained: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErasureRequestStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub phase: ErasurePhase,
    /// When the request entered its current phase: one that stays in a phase for long is
    /// reported as stalled (the `tombstone_erasure_requests_stalled` metric) before its
    /// deadline passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_since: Option<Timestamp>,
    /// `hmac-sha256:` keyed digest of the subject; the identifiers never appear.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub received_at: Option<Timestamp>,
    /// `receivedAt` + one calendar month (Art. 12(3)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Timestamp>,
    #[serde(default)]
    pub targets: Vec<ErasureTargetStatus>,
    /// Datasets in scope that the request does not search, each with why (see `reason`): a
    /// target with no subject locator, a namespace opted out of a cluster-wide request, and,
    /// while so, a target skipped because its locator needs an identifier type not given or
    /// whose store is not ready (those are in `targets` too).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_searched: Vec<NotSearched>,
    /// Policies named in `spec.policies` that do not exist: the request fails without
    /// erasing anything (`NothingInScope` or `PolicyNotFound`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missing_policies: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub totals: Option<ErasureTotals>,
    /// A cluster-wide request's progress per namespace (derived from `targets` and
    /// `notSearched`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<NamespaceProgress>,
    /// What became of the identifiers Secret once the request completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_secret: Option<SubjectSecretFate>,
    /// `sha256:` of the canonical audit record of what was done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The head of this request's receipt chain, and receipts not yet in the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipts: Option<crate::api::receipts::ReceiptChainStatus>,
}
