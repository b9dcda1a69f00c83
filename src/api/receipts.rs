//! The head of a stream of chained receipts, kept in the status of the object the stream
//! belongs to (a RetentionPolicy's sweeps, an ErasureRequest's erasure): a receipt deleted
//! from the end of the chain in the sink is detected against it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReceiptChainStatus {
    /// The sequence number of the stream's last receipt (the first is 1).
    pub sequence: u64,
    /// `sha256:` of the last receipt.
    pub digest: String,
    /// Receipts logged but not yet written to the receipt sink, oldest first. Written, and
    /// removed from here, as soon as the sink takes them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_upload: Vec<PendingReceipt>,
}

/// A receipt waiting for the sink: its body is kept verbatim (it holds digests and counts,
/// never an identifier) so that what is uploaded is exactly what was logged.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingReceipt {
    pub sequence: u64,
    /// The object key in the sink's bucket.
    pub key: String,
    /// The receipt: its canonical JSON.
    pub body: String,
}
