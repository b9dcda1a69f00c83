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
        streams,
        receipts,
    })
}
