//! `RetentionPolicy`: one dataset of personal data — its Art. 30 record, its retention
//! period, where it lives and how to find one data subject in it.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, Duration, Timestamp};

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tombstone.dev",
    version = "v1alpha1",
    kind = "RetentionPolicy",
    namespaced,
    status = "RetentionPolicyStatus",
    shortname = "rpol",
    category = "tombstone",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Retention","type":"string","jsonPath":".spec.retention"}"#,
    printcolumn = r#"{"name":"Last Sweep","type":"date","jsonPath":".status.lastSweep.completionTime"}"#,
    printcolumn = r#"{"name":"Deleted","type":"integer","description":"Items deleted by the last sweep","jsonPath":".status.lastSweep.deleted"}"#,
    printcolumn = r#"{"name":"Compliant","type":"string","jsonPath":".status.conditions[?(@.type==\"Compliant\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Art. 30(1)(b): the purpose of the processing.
    #[schemars(length(min = 1))]
    pub purpose: String,
    /// Art. 6(1): the lawful basis of the processing.
    pub legal_basis: LegalBasis,
    /// Art. 30(1)(c): categories of data subjects.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_subjects: Vec<String>,
    /// Art. 30(1)(c): categories of personal data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_categories: Vec<String>,
    /// Art. 5(1)(e): how long the data may be kept: at least 1 of its unit, at most 100
    /// years (36525d).
    pub retention: Duration,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    #[serde(default)]
    pub suspend: bool,
    /// Sweeps report what they would delete and delete nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Keyed by `name`: the API server refuses two targets of the same name, so an erasure
    /// never silently skips one (objects stored before are refused by the reconciler).
    #[schemars(
        length(min = 1),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"])
    )]
    pub targets: Vec<Target>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LegalBasis {
    Consent,
    Contract,
    LegalObligation,
    VitalInterests,
    PublicTask,
    LegitimateInterests,
}

/// When sweeps run: a fixed interval or a cron expression (UTC). Default: every hour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["every"]}, {"required": ["cron"]}]))]
pub struct Schedule {
    /// A fixed interval: at least 1s, at most one year (366d).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<Duration>,
    /// Five fields (minute hour day-of-month month day-of-week), evaluated in UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub cron: Option<String>,
}

/// One place the dataset lives: a store and what in it belongs to the dataset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    #[schemars(regex(pattern = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"))]
    pub name: String,
    /// A DataStore in the same namespace.
    #[schemars(length(min = 1))]
    pub store: String,
    /// What in the store belongs to the dataset: exactly one of `redis`, `s3`, `loki`,
    /// `elasticsearch` (the schema's `oneOf`). None only for an object stored with none or
    /// several, which the operator refuses.
    #[serde(flatten, deserialize_with = "super::common::one_kind")]
    #[schemars(required)]
    pub selector: Option<Selector>,
    /// How to find one data subject's records in this dataset: one section, for the
    /// store's kind (`redis`, `s3`, `loki` or `elasticsearch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<SubjectLocator>,
    /// A selector that matches everything in the store (`*`, an empty prefix, `{}`) is
    /// refused unless this is true.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_match_all: bool,
}

// (Not a doc comment: flattened into its parent, it would become the parent's schema
// description.)
// A target's selector: one variant per store kind, serialized as the kind's key
// (`{"s3": {"prefix": "logs/"}}`) beside the target's other fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Selector {
    Redis(RedisTarget),
    S3(S3Target),
    Loki(LokiTarget),
    Elasticsearch(ElasticsearchTarget),
}

impl Selector {
    pub fn kind(&self) -> crate::api::StoreKind {
        use crate::api::StoreKind;
        match self {
            Selector::Redis(_) => StoreKind::Redis,
            Selector::S3(_) => StoreKind::S3,
            Selector::Loki(_) => StoreKind::Loki,
            Selector::Elasticsearch(_) => StoreKind::Elasticsearch,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisTarget {
    /// A SCAN MATCH glob.
    #[schemars(length(min = 1))]
    pub key_pattern: String,
    #[serde(default)]
    pub mode: RedisMode,
    /// Mode `timestamp` only: the hash field holding unix seconds or an RFC 3339 time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub timestamp_field: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RedisMode {
    /// Every matching key gets a TTL of at most `retention`.
    #[default]
    Expire,
    /// Matching keys idle (OBJECT IDLETIME) longer than `retention` are deleted.
    Idle,
    /// Matching hashes whose `timestampField` is older than `retention` are deleted.
    Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Target {
    /// Objects under this prefix whose LastModified is older than `retention` are deleted,
    /// with every version on versioned buckets.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub prefix: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LokiTarget {
    /// A LogQL stream selector with at least one matcher.
    #[schemars(length(min = 3))]
    pub selector: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElasticsearchTarget {
    #[schemars(length(min = 1))]
    pub index: String,
    #[schemars(length(min = 1))]
    pub timestamp_field: String,
}

/// Templates over identifier types (`{email}`, `{userId}`, …) that find one subject: one
/// section, for the target's store kind (the schema's `oneOf`: exactly one of `redis`, `s3`,
/// `loki`, `elasticsearch`).
///
/// Objects stored before the schema said so may carry several sections (or none). They are
/// still read, as [`SubjectLocator::Several`], so that one such object cannot stop the
/// operator's watch of every policy; validation then refuses that policy alone
/// (`InvalidSpec`), saying which section to keep. New ones are refused at admission.
#[derive(Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum SubjectLocator {
    Redis(RedisSubject),
    S3(S3Subject),
    Loki(LokiSubject),
    Elasticsearch(ElasticsearchSubject),
    /// Read only: the sections of an object stored with none or several, as stored.
    #[schemars(skip)]
    Several(BTreeMap<String, serde_json::Value>),
}

impl SubjectLocator {
    pub fn redis(&self) -> Option<&RedisSubject> {
        match self {
            SubjectLocator::Redis(r) => Some(r),
            _ => None,
        }
    }

    pub fn s3(&self) -> Option<&S3Subject> {
        match self {
            SubjectLocator::S3(s) => Some(s),
            _ => None,
        }
    }

    pub fn loki(&self) -> Option<&LokiSubject> {
        match self {
            SubjectLocator::Loki(l) => Some(l),
            _ => None,
        }
    }

    pub fn elasticsearch(&self) -> Option<&ElasticsearchSubject> {
        match self {
            SubjectLocator::Elasticsearch(e) => Some(e),
            _ => None,
        }
    }

    /// Why this locator cannot be used by a target of store kind `kind`: it was stored with
    /// no section or several (which to keep), or its one section is for another kind. None
    /// when it is usable.
    pub fn problem(&self, target: &str, kind: Option<crate::api::StoreKind>) -> Option<String> {
        let SubjectLocator::Several(sections) = self else {
            return None;
        };
        let names: Vec<&str> = sections.keys().map(String::as_str).collect();
        let keep = match kind {
            Some(k) if names.contains(&k.as_str()) => format!(
                "keep subject.{} (the target's store kind) and remove the others",
                k.as_str()
            ),
            Some(k) => format!("give it one subject.{} section", k.as_str()),
            None => "keep the section of the target's store kind".into(),
        };
        Some(if names.is_empty() {
            format!("target {target}: subject has no section; {keep}, or remove subject")
        } else {
            format!(
                "target {target}: subject has {} sections ({}), and a locator has exactly one; {keep}",
                names.len(),
                names.join(", ")
            )
        })
    }
}

impl Serialize for SubjectLocator {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(None)?;
        match self {
            SubjectLocator::Redis(r) => map.serialize_entry("redis", r)?,
            SubjectLocator::S3(s) => map.serialize_entry("s3", s)?,
            SubjectLocator::Loki(l) => map.serialize_entry("loki", l)?,
            SubjectLocator::Elasticsearch(e) => map.serialize_entry("elasticsearch", e)?,
            SubjectLocator::Several(sections) => {
                for (k, v) in sections {
                    map.serialize_entry(k, v)?;
                }
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for SubjectLocator {
    /// One section (written `null`, a section is absent, as before): that kind's locator; a
    /// section that is there but malformed is an error, as any malformed field is. None or
    /// several: [`SubjectLocator::Several`].
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let fields = BTreeMap::<String, serde_json::Value>::deserialize(deserializer)?;
        let sections: BTreeMap<String, serde_json::Value> =
            fields.into_iter().filter(|(_, v)| !v.is_null()).collect();
        let mut iter = sections.iter();
        let (Some((key, value)), None) = (iter.next(), iter.next()) else {
            return Ok(SubjectLocator::Several(sections));
        };
        let value = value.clone();
        match key.as_str() {
            "redis" => serde_json::from_value(value).map(SubjectLocator::Redis),
            "s3" => serde_json::from_value(value).map(SubjectLocator::S3),
            "loki" => serde_json::from_value(value).map(SubjectLocator::Loki),
            "elasticsearch" => serde_json::from_value(value).map(SubjectLocator::Elasticsearch),
            other => {
                return Err(D::Error::unknown_variant(
                    other,
                    &["redis", "s3", "loki", "elasticsearch"],
                ))
            }
        }
        .map_err(D::Error::custom)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSubject {
    /// Key templates, globs allowed; deleted with UNLINK. Each names an identifier bounded on
    /// both sides by a delimiter (`:`, `/`, …; not `-`, `_`, `.`, `@`, `+`) or the key's
    /// start or end, no wildcard touching it: `session:{userId}:*`, not `session:{userId}*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// Hash fields removed with HDEL; the key or the field names a bounded identifier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_fields: Vec<RedisHashField>,
    /// Members removed with SREM (sets) or ZREM (sorted sets); the key or the member names
    /// a bounded identifier.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set_members: Vec<RedisSetMember>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisHashField {
    pub key: String,
    pub field: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisSetMember {
    pub key: String,
    pub member: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Subject {
    /// Every object (and version) under each prefix is the subject's. Each names an
    /// identifier followed by a delimiter (`users/{userId}/`, never `users/{userId}`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_prefixes: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<S3Records>,
    /// The Art. 17(3) exception under which the subject's copies that S3 Object Lock keeps
    /// (retention or legal hold) are retained. With it, an erasure that erased and verified
    /// everything else settles as `CompletedWithExceptions` and is re-applied when the locks
    /// lapse; without it, locked copies keep the request open (and `Overdue` past its
    /// deadline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_copies: Option<RetainedCopies>,
}

/// Why copies under Object Lock are kept: a lock is a mechanism, this is the legal ground.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetainedCopies {
    pub ground: RetentionException,
    /// What obliges the retention, for the DPO and the receipt (e.g. "HGB §257: 10 years").
    #[schemars(length(min = 1))]
    pub description: String,
}

/// The exceptions of Art. 17(3) GDPR, (a)–(e).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RetentionException {
    /// (a) exercising the right of freedom of expression and information.
    FreedomOfExpression,
    /// (b) compliance with a legal obligation, or a task in the public interest.
    LegalObligation,
    /// (c) public health.
    PublicHealth,
    /// (d) archiving in the public interest, scientific or historical research, statistics.
    ArchivingOrResearch,
    /// (e) the establishment, exercise or defence of legal claims.
    LegalClaims,
}

impl RetentionException {
    /// The point of Art. 17(3) it names, for messages: `Art. 17(3)(e)`.
    pub fn article(&self) -> &'static str {
        match self {
            RetentionException::FreedomOfExpression => "Art. 17(3)(a)",
            RetentionException::LegalObligation => "Art. 17(3)(b)",
            RetentionException::PublicHealth => "Art. 17(3)(c)",
            RetentionException::ArchivingOrResearch => "Art. 17(3)(d)",
            RetentionException::LegalClaims => "Art. 17(3)(e)",
        }
    }
}

/// Records inside JSON-lines objects (optionally gzip) that belong to the subject.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Records {
    pub prefix: String,
    /// A dotted path into each JSON record.
    #[schemars(length(min = 1))]
    pub field: String,
    #[schemars(length(min = 1))]
    pub equals: String,
    /// Lines of an archive that are not JSON but hold the subject's identifier (found as it
    /// stands on its own, as Loki line filters are): `Keep` (the default) keeps them, and
    /// the request then fails this target with `UnparsedCopiesRemain`, naming the objects and
    /// line counts, until someone decides; `DropMatching` drops them with the subject's
    /// records.
    #[serde(default, skip_serializing_if = "UnparsedLines::is_keep")]
    pub unparsed_lines: UnparsedLines,
}

/// What an erasure does with archive lines that are not JSON but hold the identifier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UnparsedLines {
    /// Kept, and counted as copies that remain: the target is never `Verified` while any is
    /// there.
    #[default]
    Keep,
    /// Dropped in the rewrite with the subject's records (and counted with them).
    DropMatching,
}

impl UnparsedLines {
    pub fn is_keep(&self) -> bool {
        *self == UnparsedLines::Keep
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LokiSubject {
    /// The identifier template whose lines are the subject's, applied on the target's
    /// selector. Matched exactly: sent as a LogQL `|~` filter with word boundaries, so
    /// `user-47` never matches `user-4711`. Only an `{email}` may stand alone; any other
    /// identifier needs a field name and delimiters around it (`uid={userId} `).
    #[schemars(length(min = 1))]
    pub line_filter: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElasticsearchSubject {
    /// Field → value template, combined as exact `term` queries.
    #[schemars(length(min = 1))]
    pub term: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetentionPolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The sweep under way, if any; its per-target progress is checkpointed in `targets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_sweep: Option<CurrentSweep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sweep: Option<LastSweep>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_sweep_time: Option<Timestamp>,
    #[serde(default)]
    pub targets: Vec<TargetStatus>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// The head of this policy's chain of sweep receipts, and receipts not yet in the sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipts: Option<crate::api::receipts::ReceiptChainStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CurrentSweep {
    pub start_time: Timestamp,
    /// Whether this sweep deletes nothing (fixed when it starts).
    #[serde(default)]
    pub dry_run: bool,
    /// The policy generation the sweep runs under; an edit restarts the sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// The LegalHolds on subjects the sweep runs under (names and generations, never an
    /// identifier). A hold placed, changed or lifted restarts the sweep, cancelling what the
    /// stores still run for it, so no deletion submitted before a hold runs on regardless.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject_holds: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LastSweep {
    pub start_time: Timestamp,
    pub completion_time: Timestamp,
    pub outcome: SweepOutcome,
    /// Items deleted (or, in a dry run, that would be) across all targets.
    #[serde(default)]
    pub deleted: u64,
    /// `sha256:` of the sweep's audit record, logged under the log target `audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receipt: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SweepOutcome {
    Succeeded,
    PartiallyFailed,
    Failed,
    DryRun,
}

impl SweepOutcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            SweepOutcome::Succeeded => "Succeeded",
            SweepOutcome::PartiallyFailed => "PartiallyFailed",
            SweepOutcome::Failed => "Failed",
            SweepOutcome::DryRun => "DryRun",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum TargetPhase {
    #[default]
    Idle,
    Sweeping,
    Held,
    Failed,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    pub name: String,
    pub phase: TargetPhase,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sweep_time: Option<Timestamp>,
    /// Items examined by the last (or current) sweep.
    #[serde(default)]
    pub scanned: u64,
    /// Items deleted by the last (or current) sweep; in mode `expire`, keys given a TTL;
    /// in a dry run, what would be.
    #[serde(default)]
    pub deleted: u64,
    /// Items deleted by every sweep so far (dry runs excluded).
    #[serde(default)]
    pub deleted_total: u64,
    /// Items the store refused to delete (object lock, …).
    #[serde(default)]
    pub blocked: u64,
    /// The first few refused items by name, each with the store's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blocked_items: Vec<String>,
    /// Items the last (or current) sweep kept because a LegalHold holds a subject whose data
    /// they are (never named: their names may carry identifiers).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held: u64,
    /// Items the last (or current) sweep could not judge and kept: Elasticsearch documents
    /// without the timestamp field, Redis `timestamp`-mode keys without a readable timestamp.
    /// While any remain, the policy is not Compliant.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unjudged: u64,
    /// The oldest item the last sweep left in place, where the store tells (S3 LastModified,
    /// Redis `timestamp`-mode field, Elasticsearch timestamp field).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oldest_remaining: Option<Timestamp>,
    /// Where the current sweep resumes after a restart; absent when no sweep is under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The category of the target's last failure while it fails or retries one (the message
    /// starts with its reason); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_category: Option<crate::api::common::ErrorCategory>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[cfg(test)]
mod locator_tests {
    use super::*;

    fn target(subject: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"name": "t", "store": "s", "s3": {"prefix": "p/"}, "subject": subject})
    }

    #[test]
    fn a_locator_is_one_section_in_the_same_json() {
        let json = target(serde_json::json!({"s3": {"keyPrefixes": ["u/{userId}/"]}}));
        let t: Target = serde_json::from_value(json.clone()).expect("a target");
        assert!(matches!(t.subject, Some(SubjectLocator::S3(_))));
        assert_eq!(serde_json::to_value(&t).ok(), Some(json));
        // A section written `null` is no section, as before.
        let with_null = target(serde_json::json!({"redis": null, "s3": {"keyPrefixes": []}}));
        let t: Target = serde_json::from_value(with_null).expect("a target");
        assert!(matches!(t.subject, Some(SubjectLocator::S3(_))));
        // A section that is there but malformed is an error, as any malformed field is.
        let bad = target(serde_json::json!({"s3": {"keyPrefixes": 7}}));
        assert!(serde_json::from_value::<Target>(bad).is_err());
    }

    #[test]
    fn a_locator_stored_with_several_sections_is_read_and_refused_by_validation_alone() {
        let several = serde_json::json!({"redis": {"keys": ["k:{userId}"]},
            "s3": {"keyPrefixes": ["u/{userId}/"]}});
        // A list holding one such object is still read: the watch of every policy goes on.
        let list = serde_json::json!([
            target(several.clone()),
            target(serde_json::json!({"s3": {"keyPrefixes": ["u/{userId}/"]}})),
        ]);
        let targets: Vec<Target> = serde_json::from_value(list).expect("the list is read");
        let Some(SubjectLocator::Several(sections)) = &targets[0].subject else {
            panic!("not read as several: {:?}", targets[0].subject);
        };
        assert_eq!(sections.len(), 2);
        // Written back as it was stored.
        assert_eq!(
            serde_json::to_value(&targets[0]).ok(),
            Some(target(several))
        );
        let locator = targets[0].subject.as_ref().expect("a locator");
        assert_eq!(locator.s3(), None);
        assert_eq!(
            locator.problem("t", Some(crate::api::StoreKind::S3)).as_deref(),
            Some("target t: subject has 2 sections (redis, s3), and a locator has exactly one; keep subject.s3 (the target's store kind) and remove the others")
        );
        assert_eq!(
            locator.problem("t", Some(crate::api::StoreKind::Loki)).as_deref(),
            Some("target t: subject has 2 sections (redis, s3), and a locator has exactly one; give it one subject.loki section")
        );
        let empty: Target = serde_json::from_value(target(serde_json::json!({}))).expect("read");
        assert!(empty
            .subject
            .and_then(|s| s.problem("t", Some(crate::api::StoreKind::S3)))
            .is_some_and(|p| p.contains("no section")));
        assert_eq!(
            targets[1]
                .subject
                .as_ref()
                .and_then(|s| s.problem("t", None)),
            None
        );
    }
}
