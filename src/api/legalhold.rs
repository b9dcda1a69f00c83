//! `LegalHold`: data that must not be deleted (Art. 17(3)), until released.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, SecretRef, Timestamp};

#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "tombstone.dev",
    version = "v1alpha1",
    kind = "LegalHold",
    namespaced,
    status = "LegalHoldStatus",
    shortname = "hold",
    category = "tombstone",
    derive = "PartialEq",
    printcolumn = r#"{"name":"Active","type":"string","jsonPath":".status.conditions[?(@.type==\"Active\")].status"}"#,
    printcolumn = r#"{"name":"Expires","type":"string","jsonPath":".spec.expiresAt"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("anyOf" = [{"required": ["policies"]}, {"required": ["subjects"]}]))]
pub struct LegalHoldSpec {
    #[schemars(length(min = 1))]
    pub reason: String,
    /// Whole datasets held: sweeps and erasures skip them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub policies: Option<Vec<String>>,
    /// Subjects held: their erasure is blocked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub subjects: Option<Vec<HeldSubject>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("oneOf" = [{"required": ["secretRef"]}, {"required": ["digest"]}]))]
pub struct HeldSubject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretRef>,
    /// As printed by `tombstone digest`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = "^hmac-sha256:[0-9a-f]{64}$"))]
    pub digest: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LegalHoldStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}
