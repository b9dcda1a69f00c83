//! The proof of one erasure request, for an auditor: its receipts fetched from the sink, every
//! hash recomputed, the chain checked, and its head compared with the digest the request's
//! status keeps (while the request exists). [`Proof`]'s `Display` is a summary to keep.

use std::fmt;

use kube::Api;
use serde_json::Value;

use super::chain::{self, Head, StreamKind, StreamReport};
use super::sink::{self, Sink};
use crate::api::ErasureRequest;

/// One receipt of the request, as read from the sink.
#[derive(Clone, Debug, PartialEq)]
pub struct ProofReceipt {
    pub sequence: u64,
    pub kind: String,
    /// `sha256:` recomputed from the object.
    pub digest: String,
    pub key: String,
    /// The receipt, parsed (None: not JSON).
    pub record: Option<Value>,
}

/// The proof of one request: every stream of its name (one per uid) and what its receipts say.
#[derive(Clone, Debug, PartialEq)]
pub struct Proof {
    pub namespace: String,
    pub request: String,
    /// The bucket and prefix the receipts were read from.
    pub location: String,
    /// The uid of the request while it exists.
    pub uid: Option<String>,
    /// The digest the request's status keeps, while it exists.
    pub status_digest: Option<String>,
    /// Receipts that wait in the request's status for the sink.
    pub pending: usize,
    pub streams: Vec<StreamReport>,
    /// Every receipt, stream by stream, in sequence order.
    pub receipts: Vec<ProofReceipt>,
}

impl Proof {
    /// Receipts were found and every chain is unbroken, its head checked.
    pub fn verified(&self) -> bool {
        !self.streams.is_empty() && self.streams.iter().all(StreamReport::intact)
    }

    /// The last erasure receipt (the record of what was done).
    pub fn erasure(&self) -> Option<&Value> {
        self.receipts
            .iter()
            .rev()
            .find(|r| r.kind == "ErasureReceipt")
            .and_then(|r| r.record.as_ref())
    }
}

fn field(record: &Value, name: &str) -> String {
    match record.get(name) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

impl fmt::Display for Proof {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Proof of erasure: ErasureRequest {}/{}",
            self.namespace, self.request
        )?;
        writeln!(f, "Receipts read from: {}", self.location)?;
        let verdict = if self.verified() {
            "VERIFIED: every receipt hashes to what the chain recorded, no receipt is missing"
        } else if self.streams.is_empty() {
            "NOT VERIFIED: no receipt of this request is in the sink"
        } else {
            "BROKEN: the chain does not verify (see below)"
        };
        writeln!(f, "Result: {verdict}")?;
        match (&self.uid, &self.status_digest) {
            (Some(uid), Some(d)) => writeln!(
                f,
                "Request: exists (uid {uid}); its status records receipt {d}"
            )?,
            (Some(uid), None) => writeln!(f, "Request: exists (uid {uid}); no receipt yet")?,
            (None, _) => writeln!(
                f,
                "Request: deleted; its chain must end with a closing receipt"
            )?,
        }
        if self.pending > 0 {
            writeln!(
                f,
                "Pending: {} receipt(s) wait in the request's status for the sink; prove again once written",
                self.pending
            )?;
        }
        if let Some(e) = self.erasure() {
            writeln!(f, "Subject (keyed digest): {}", field(e, "subjectDigest"))?;
            writeln!(
                f,
                "Ground: {}   Reference: {}   Dry run: {}",
                field(e, "ground"),
                field(e, "reference"),
                field(e, "dryRun")
            )?;
            writeln!(
                f,
                "Received: {}   Deadline: {}   Completed: {}",
                field(e, "receivedAt"),
                field(e, "deadline"),
                field(e, "completionTime")
            )?;
            let totals = e.get("totals").cloned().unwrap_or(Value::Null);
            let targets = e
                .get("targets")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            writeln!(
                f,
                "Records: found {}, erased {}, retained under a declared ground {}, in {targets} target(s)",
                field(&totals, "found"),
                field(&totals, "erased"),
                field(&totals, "retained")
            )?;
            let not_searched = e
                .get("notSearched")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            writeln!(f, "Datasets in scope not searched: {not_searched}")?;
            writeln!(f, "Identifiers Secret: {}", field(e, "subjectSecret"))?;
        } else {
            writeln!(f, "No erasure receipt: the request did not complete")?;
        }
        writeln!(f, "Receipts:")?;
        for r in &self.receipts {
            writeln!(
                f,
                "  {:>3}  {:<22} {}  {}",
                r.sequence, r.kind, r.digest, r.key
            )?;
        }
        for s in &self.streams {
            for b in &s.breaks {
                writeln!(f, "Break: {}: {b}", b.reason())?;
            }
        }
        Ok(())
    }
}

/// Fetches the request's receipts from the sink, recomputes them, checks the chain and, while
/// the request exists, its head against the digest in status.
pub async fn proof(
    client: kube::Client,
    sink: &Sink,
    namespace: &str,
    request: &str,
) -> Result<Proof, sink::Error> {
    let api: Api<ErasureRequest> = Api::namespaced(client.clone(), namespace);
    let live = api
        .get_opt(request)
        .await
        .map_err(|e| sink::Error::Resolve(crate::controller::Error::Kube(e)))?;
    let uid = live.as_ref().and_then(|r| r.metadata.uid.clone());
    let head = live
        .as_ref()
        .and_then(|r| r.status.as_ref())
        .and_then(|s| s.receipts.clone());
    let status_digest = live
        .as_ref()
        .and_then(|r| r.status.as_ref())
        .and_then(|s| s.receipt.clone());
    let pending = head.as_ref().map_or(0, |h| h.pending_upload.len());
    let folder = chain::object_folder(sink.prefix(), StreamKind::Request, namespace, request);
    let mut streams = Vec::new();
    let mut receipts = Vec::new();
    for (stream, stored) in sink.streams(Some(&folder)).await? {
        // A request of the same name deleted earlier is another stream; only the live one's
        // head is in status.
        let this_head = match &uid {
            Some(u) if *u == stream.uid => Head::Status(head.clone()),
            Some(_) => Head::Gone,
            None => Head::Gone,
        };
        let mut sorted = stored.clone();
        sorted.sort_by_key(|s| s.sequence);
        for s in &sorted {
            let record = serde_json::from_str::<Value>(&s.body).ok();
            receipts.push(ProofReceipt {
                sequence: s.sequence,
                kind: record
                    .as_ref()
                    .and_then(|r| r.get("kind"))
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string(),
                digest: super::receipt::receipt_digest(&s.body),
                key: chain::object_key(sink.prefix(), &stream, s.sequence),
                record,
            });
        }
        streams.push(chain::verify_stream(&stream, &stored, &this_head));
    }
    if streams.is_empty() {
        if let (Some(uid), Some(head)) = (&uid, &head) {
            // Status records receipts, the sink holds none: every one of them is missing.
            let stream = chain::Stream {
                kind: StreamKind::Request,
                namespace: namespace.into(),
                name: request.into(),
                uid: uid.clone(),
            };
            streams.push(chain::verify_stream(
                &stream,
                &[],
                &Head::Status(Some(head.clone())),
            ));
        }
    }
    Ok(Proof {
        namespace: namespace.into(),
        request: request.into(),
        location: format!("s3://{}/{folder}", sink.bucket()),
        uid,
        status_digest,
        pending,
        streams,
        receipts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::chain::{seal, verify_stream, Stored, Stream};
    use serde_json::json;

    fn proof_of(bodies: &[(&str, Value)], head_ok: bool) -> Proof {
        let stream = Stream {
            kind: StreamKind::Request,
            namespace: "shop".into(),
            name: "dsr-1".into(),
            uid: "u-1".into(),
        };
        let mut head = None;
        let mut stored = Vec::new();
        let mut receipts = Vec::new();
        for (kind, record) in bodies {
            let sealed = seal(record, &stream, head.as_ref(), "p/");
            stored.push(Stored {
                sequence: sealed.sequence,
                body: sealed.body.clone(),
            });
            receipts.push(ProofReceipt {
                sequence: sealed.sequence,
                kind: (*kind).into(),
                digest: sealed.digest.clone(),
                key: sealed.key.clone(),
                record: serde_json::from_str(&sealed.body).ok(),
            });
            head = Some(chain::advance(head, &sealed, false));
        }
        let mut head = head.unwrap_or_default();
        if !head_ok {
            head.sequence += 1;
        }
        Proof {
            namespace: "shop".into(),
            request: "dsr-1".into(),
            location: "s3://b/p/requests/shop/dsr-1/".into(),
            uid: Some("u-1".into()),
            status_digest: Some(head.digest.clone()),
            pending: 0,
            streams: vec![verify_stream(&stream, &stored, &Head::Status(Some(head)))],
            receipts,
        }
    }

    #[test]
    fn the_summary_says_what_was_erased_and_whether_the_chain_holds() {
        let record = json!({"kind": "ErasureReceipt", "subjectDigest": "hmac-sha256:abc",
            "ground": "objection", "totals": {"found": 3, "erased": 3, "retained": 0},
            "targets": [{}, {}], "notSearched": [{}], "subjectSecret": "Deleted"});
        let proof = proof_of(&[("ErasureReceipt", record.clone())], true);
        assert!(proof.verified());
        let text = proof.to_string();
        for needle in [
            "Proof of erasure: ErasureRequest shop/dsr-1",
            "Result: VERIFIED",
            "Subject (keyed digest): hmac-sha256:abc",
            "Records: found 3, erased 3, retained under a declared ground 0, in 2 target(s)",
            "Datasets in scope not searched: 1",
            "Identifiers Secret: Deleted",
        ] {
            assert!(text.contains(needle), "{needle:?} not in\n{text}");
        }
        let broken = proof_of(&[("ErasureReceipt", record)], false);
        assert!(!broken.verified());
        let text = broken.to_string();
        assert!(text.contains("Result: BROKEN"), "{text}");
        assert!(text.contains("Break: LastReceiptMissing"), "{text}");
    }

    #[test]
    fn no_receipt_is_no_proof() {
        let proof = Proof {
            namespace: "shop".into(),
            request: "dsr-1".into(),
            location: "s3://b/p/".into(),
            uid: None,
            status_digest: None,
            pending: 0,
            streams: Vec::new(),
            receipts: Vec::new(),
        };
        assert!(!proof.verified());
        assert!(proof.to_string().contains("NOT VERIFIED"));
    }
}
