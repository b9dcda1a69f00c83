//! `DataStore`: how to reach one store.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, Duration, SecretKeyRef, SecretRef};

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tombstone.dev",
    version = "v1alpha1",
    kind = "DataStore",
    namespaced,
    status = "DataStoreStatus",
    shortname = "dstore",
    category = "tombstone",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Type","type":"string","jsonPath":".status.storeType"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Insecure","type":"boolean","jsonPath":".status.insecure","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DataStoreSpec {
    /// The store: exactly one of `redis`, `s3`, `loki`, `elasticsearch` (the schema's
    /// `oneOf`). None only for an object stored with none or several, which the operator
    /// refuses.
    #[serde(flatten, deserialize_with = "super::common::one_kind")]
    #[schemars(required)]
    pub store: Option<StoreSection>,
    /// Optional limits protecting the store from the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<StoreLimits>,
    /// Allows sending credentials in plain text: a password to a `redis://` URL, basic
    /// auth, a token or an API key to an `http://` URL, S3 request signatures to an
    /// `http://` endpoint. Without it such a store is not Ready (reason
    /// `InsecureTransport`); TLS (`rediss://`, `https://`) never needs it. Shown in status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,
}

// (Not a doc comment: flattened into its parent, it would become the parent's schema
// description.)
// A DataStore's connection section: one variant per store kind, serialized as the kind's
// key (`{"redis": {...}}`) beside the DataStore's other fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StoreSection {
    Redis(RedisStore),
    S3(S3Store),
    Loki(LokiStore),
    Elasticsearch(ElasticsearchStore),
}

impl StoreSection {
    pub fn kind(&self) -> StoreKind {
        match self {
            StoreSection::Redis(_) => StoreKind::Redis,
            StoreSection::S3(_) => StoreKind::S3,
            StoreSection::Loki(_) => StoreKind::Loki,
            StoreSection::Elasticsearch(_) => StoreKind::Elasticsearch,
        }
    }
}

/// A Redis server (`redis://`, or `rediss://` for TLS) or, with `cluster`, a Redis Cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RedisStore {
    #[schemars(regex(pattern = r"^rediss?://"))]
    pub url: String,
    /// A key of a Secret in the same namespace; the Secret must carry the label
    /// `tombstone.dev/credentials: "true"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret_ref: Option<SecretKeyRef>,
    /// Scan every primary of a Redis Cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<bool>,
}

/// An S3 bucket on AWS or any S3-compatible store.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Store {
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://"))]
    pub endpoint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_path_style: Option<bool>,
    /// Keys `accessKeyId`, `secretAccessKey` and optionally `sessionToken`; the Secret must
    /// carry the label `tombstone.dev/credentials: "true"`. Absent: the operator's own
    /// identity (the default AWS credential chain), only if the operator was started with
    /// `--allow-ambient-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
}

/// A Grafana Loki with deletion enabled on its compactor.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LokiStore {
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// Sent as `X-Scope-OrgID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Keys `username` and `password`, or `token`; the Secret must carry the label
    /// `tombstone.dev/credentials: "true"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// How long an erasure waits, after Loki processed its delete request but still returns
    /// the subject's lines (recent lines stay in the ingesters until flushed and indexed,
    /// and a delete request does not reach them), before it submits a new request. Default
    /// `2h` (the ingesters' default `max_chunk_age`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resubmit_after: Option<Duration>,
}

/// Elasticsearch or OpenSearch (same API).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ElasticsearchStore {
    #[schemars(regex(pattern = r"^https?://"))]
    pub url: String,
    /// Keys `username` and `password`, or `apiKey`; the Secret must carry the label
    /// `tombstone.dev/credentials: "true"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret_ref: Option<SecretRef>,
    /// Throttle of the deletions the store runs by itself, passed as `requests_per_second`
    /// to `_delete_by_query` (roughly documents per second, shared by its slices), so a
    /// large sweep does not crowd out the cluster's indexing. Unset: no throttle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub delete_requests_per_second: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StoreLimits {
    /// Commands (Redis) or requests (HTTP stores) per second, across all work on this store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub requests_per_second: Option<u32>,
    /// Batches in flight at once against this store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 64))]
    pub concurrency: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StoreKind {
    Redis,
    S3,
    Loki,
    Elasticsearch,
}

impl StoreKind {
    /// Every kind (each has a driver in `backends::registry`).
    pub const ALL: [StoreKind; 4] = [
        StoreKind::Redis,
        StoreKind::S3,
        StoreKind::Loki,
        StoreKind::Elasticsearch,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            StoreKind::Redis => "redis",
            StoreKind::S3 => "s3",
            StoreKind::Loki => "loki",
            StoreKind::Elasticsearch => "elasticsearch",
        }
    }
}

impl DataStoreSpec {
    /// The kind of store, when exactly one is set (the schema enforces it; this guards
    /// objects written before the schema or by a lenient server).
    pub fn kind(&self) -> Option<StoreKind> {
        self.store.as_ref().map(StoreSection::kind)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataStoreStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `redis`, `s3`, `loki` or `elasticsearch`, for the printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_type: Option<String>,
    /// True while the operator sends this store's credentials in plain text, because the
    /// spec says `insecure: true`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
