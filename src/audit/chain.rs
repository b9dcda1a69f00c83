//! Chained receipts (pure): every receipt names its stream (the uid of the policy or request
//! it belongs to) and its sequence number in it, and carries the digest of the stream's
//! previous receipt. Status keeps the stream's head (last sequence and digest), so an edited
//! receipt, one deleted from the middle, and one deleted from the end are all detectable.
//! [`verify_stream`] checks one stream as read from the sink.

use std::fmt;

use serde_json::{json, Value};

use super::receipt::{canonical, receipt_digest};
use crate::api::receipts::{PendingReceipt, ReceiptChainStatus};

/// The kinds of object a stream belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StreamKind {
    /// The sweep receipts of one RetentionPolicy.
    Policy,
    /// The receipts of one ErasureRequest: its erasure, then the closing receipt.
    Request,
}

impl StreamKind {
    /// The folder of the kind under the sink's prefix.
    pub fn folder(self) -> &'static str {
        match self {
            StreamKind::Policy => "policies",
            StreamKind::Request => "requests",
        }
    }

    pub fn kind(self) -> &'static str {
        match self {
            StreamKind::Policy => "RetentionPolicy",
            StreamKind::Request => "ErasureRequest",
        }
    }

    fn from_folder(folder: &str) -> Option<Self> {
        match folder {
            "policies" => Some(StreamKind::Policy),
            "requests" => Some(StreamKind::Request),
            _ => None,
        }
    }
}

/// One stream: the object it belongs to. Names are of Kubernetes objects, never of people.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Stream {
    pub kind: StreamKind,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{} ({})",
            self.kind.kind(),
            self.namespace,
            self.name,
            self.uid
        )
    }
}

/// The folder of the receipts of every stream of the object `kind` `namespace/name` (one per
/// uid: a name may be used again).
pub fn object_folder(prefix: &str, kind: StreamKind, namespace: &str, name: &str) -> String {
    format!("{prefix}{}/{namespace}/{name}/", kind.folder())
}

/// The folder of a stream's receipts under `prefix`.
pub fn stream_folder(prefix: &str, stream: &Stream) -> String {
    format!(
        "{prefix}{}/{}/{}/{}/",
        stream.kind.folder(),
        stream.namespace,
        stream.name,
        stream.uid
    )
}

/// The object key of receipt `sequence` of `stream`: zero-padded, so keys sort as sequences.
pub fn object_key(prefix: &str, stream: &Stream, sequence: u64) -> String {
    format!("{}{sequence:012}.json", stream_folder(prefix, stream))
}

/// The stream and sequence an object key names (None: not a receipt key under `prefix`).
pub fn parse_key(prefix: &str, key: &str) -> Option<(Stream, u64)> {
    let rest = key.strip_prefix(prefix)?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [folder, namespace, name, uid, file] = parts.as_slice() else {
        return None;
    };
    let sequence = file.strip_suffix(".json")?.parse().ok()?;
    Some((
        Stream {
            kind: StreamKind::from_folder(folder)?,
            namespace: (*namespace).to_string(),
            name: (*name).to_string(),
            uid: (*uid).to_string(),
        },
        sequence,
    ))
}

/// A receipt sealed into its stream: what is logged, kept as the head, and uploaded.
#[derive(Clone, Debug, PartialEq)]
pub struct Sealed {
    pub sequence: u64,
    pub digest: String,
    /// The canonical JSON of the receipt.
    pub body: String,
    pub key: String,
}

/// Seals `record` as the next receipt of `stream` after `head` (None: the first).
pub fn seal(
    record: &Value,
    stream: &Stream,
    head: Option<&ReceiptChainStatus>,
    prefix: &str,
) -> Sealed {
    let sequence = head.map_or(1, |h| h.sequence.saturating_add(1));
    let mut receipt = record.clone();
    if let Value::Object(map) = &mut receipt {
        map.insert(
            "chain".into(),
            json!({
                "stream": stream.uid,
                "sequence": sequence,
                "previous": head.map(|h| h.digest.clone()),
            }),
        );
    }
    let body = canonical(&receipt);
    Sealed {
        sequence,
        digest: receipt_digest(&body),
        key: object_key(prefix, stream, sequence),
        body,
    }
}

/// The head after `sealed`, with it waiting for the sink when there is one.
pub fn advance(
    head: Option<ReceiptChainStatus>,
    sealed: &Sealed,
    sink: bool,
) -> ReceiptChainStatus {
    let mut head = head.unwrap_or_default();
    head.sequence = sealed.sequence;
    head.digest = sealed.digest.clone();
    if sink {
        head.pending_upload.push(PendingReceipt {
            sequence: sealed.sequence,
            key: sealed.key.clone(),
            body: sealed.body.clone(),
        });
    }
    head
}

/// The receipt kinds that close a request's stream: nothing follows them.
pub const CLOSING_KINDS: [&str; 2] = ["ErasureRequestClosed", "ErasureAbandoned"];

/// One receipt as read from the sink.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    /// The sequence its key names.
    pub sequence: u64,
    pub body: String,
}

/// What is known of the stream's object in the cluster.
#[derive(Clone, Debug, PartialEq)]
pub enum Head {
    /// The object exists; its status keeps this head (None: no receipt yet).
    Status(Option<ReceiptChainStatus>),
    /// The object is gone.
    Gone,
    /// Not checked (no cluster).
    Unknown,
}

/// A break in a chain: anything but an unbroken, complete chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Break {
    /// Receipts `from..=to` are missing.
    Gap { from: u64, to: u64 },
    /// Receipt `sequence` is not what the chain recorded of it (the next receipt, or the head
    /// in status, holds another digest), or it is not in canonical form.
    Edited { sequence: u64 },
    /// Receipt `sequence` is not JSON.
    Unreadable { sequence: u64 },
    /// Receipt `sequence` names another stream or sequence than its key.
    Misplaced { sequence: u64 },
    /// The last receipts are gone: status says the chain reaches `head`, the sink ends at
    /// `last` (0: none left).
    Truncated { last: u64, head: u64 },
    /// Receipts beyond the head that status keeps: not written by the operator.
    BeyondHead { head: u64, last: u64 },
    /// The request is gone and its chain does not end with a closing receipt.
    Unclosed { last: u64 },
}

impl Break {
    /// A stable PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Break::Gap { .. } => "ReceiptMissing",
            Break::Edited { .. } => "ReceiptEdited",
            Break::Unreadable { .. } => "ReceiptUnreadable",
            Break::Misplaced { .. } => "ReceiptMisplaced",
            Break::Truncated { .. } => "LastReceiptMissing",
            Break::BeyondHead { .. } => "ReceiptBeyondHead",
            Break::Unclosed { .. } => "ChainUnclosed",
        }
    }
}

impl fmt::Display for Break {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Break::Gap { from, to } if from == to => write!(f, "receipt {from} is missing"),
            Break::Gap { from, to } => write!(f, "receipts {from} to {to} are missing"),
            Break::Edited { sequence } => write!(
                f,
                "receipt {sequence} was altered: its hash is not the one the chain recorded"
            ),
            Break::Unreadable { sequence } => write!(f, "receipt {sequence} is not JSON"),
            Break::Misplaced { sequence } => write!(
                f,
                "receipt {sequence} names another stream or sequence than its object key"
            ),
            Break::Truncated { last, head } => write!(
                f,
                "the last receipt is missing: status records {head} receipts, the sink holds up to {last}"
            ),
            Break::BeyondHead { head, last } => write!(
                f,
                "the sink holds receipts up to {last}, beyond the {head} that status records"
            ),
            Break::Unclosed { last } => write!(
                f,
                "the request is gone but its chain ends at receipt {last} without a closing receipt"
            ),
        }
    }
}

/// The result of checking one stream.
#[derive(Clone, Debug, PartialEq)]
pub struct StreamReport {
    pub stream: Stream,
    /// Receipts found in the sink.
    pub receipts: usize,
    /// The highest sequence found (0: none).
    pub last: u64,
    /// The digest of the last receipt found, recomputed.
    pub last_digest: Option<String>,
    /// The `kind` of the last receipt found.
    pub last_kind: Option<String>,
    /// How the head was checked: `Status`, `Closed`, `Gone`, or `Unchecked`.
    pub head: &'static str,
    pub breaks: Vec<Break>,
}

impl StreamReport {
    pub fn intact(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Checks one stream: every hash recomputed, every link to the previous receipt, the
/// sequence without gaps from 1, and the end against `head`. `receipts` in any order.
pub fn verify_stream(stream: &Stream, receipts: &[Stored], head: &Head) -> StreamReport {
    let mut sorted: Vec<&Stored> = receipts.iter().collect();
    sorted.sort_by_key(|r| r.sequence);
    let mut breaks = Vec::new();
    // (sequence, digest) of the receipt before, when it could be read.
    let mut before: Option<(u64, String)> = None;
    let mut expected = 1u64;
    let mut last_kind = None;
    let mut last_digest = None;
    for r in &sorted {
        if r.sequence > expected {
            breaks.push(Break::Gap {
                from: expected,
                to: r.sequence.saturating_sub(1),
            });
        }
        expected = r.sequence.saturating_add(1);
        let digest = receipt_digest(&r.body);
        last_digest = Some(digest.clone());
        let Ok(value) = serde_json::from_str::<Value>(&r.body) else {
            breaks.push(Break::Unreadable {
                sequence: r.sequence,
            });
            before = None;
            last_kind = None;
            continue;
        };
        last_kind = value.get("kind").and_then(Value::as_str).map(String::from);
        if canonical(&value) != r.body {
            breaks.push(Break::Edited {
                sequence: r.sequence,
            });
        }
        let chain = value.get("chain");
        let named_stream = chain.and_then(|c| c.get("stream")).and_then(Value::as_str);
        let named_sequence = chain
            .and_then(|c| c.get("sequence"))
            .and_then(Value::as_u64);
        if named_stream != Some(stream.uid.as_str()) || named_sequence != Some(r.sequence) {
            breaks.push(Break::Misplaced {
                sequence: r.sequence,
            });
        }
        let previous = chain
            .and_then(|c| c.get("previous"))
            .and_then(Value::as_str);
        match &before {
            // The link to the receipt before: it must hash to what this one recorded.
            Some((seq, d))
                if seq.saturating_add(1) == r.sequence && previous != Some(d.as_str()) =>
            {
                push_once(&mut breaks, Break::Edited { sequence: *seq });
            }
            _ if r.sequence == 1 && previous.is_some() => {
                push_once(&mut breaks, Break::Edited { sequence: 1 });
            }
            _ => {}
        }
        before = Some((r.sequence, digest));
    }
    let last = sorted.last().map_or(0, |r| r.sequence);
    let head_checked = match head {
        Head::Status(status) => {
            let (head_seq, head_digest) = status
                .as_ref()
                .map_or((0, None), |h| (h.sequence, Some(h.digest.as_str())));
            if head_seq > last {
                breaks.push(Break::Truncated {
                    last,
                    head: head_seq,
                });
            } else if head_seq < last {
                breaks.push(Break::BeyondHead {
                    head: head_seq,
                    last,
                });
            } else if head_seq > 0 && last_digest.as_deref() != head_digest {
                push_once(&mut breaks, Break::Edited { sequence: last });
            }
            "Status"
        }
        Head::Gone if stream.kind == StreamKind::Request => {
            if last_kind
                .as_deref()
                .is_some_and(|k| CLOSING_KINDS.contains(&k))
            {
                "Closed"
            } else {
                breaks.push(Break::Unclosed { last });
                "Gone"
            }
        }
        Head::Gone => "Gone",
        Head::Unknown => "Unchecked",
    };
    StreamReport {
        stream: stream.clone(),
        receipts: sorted.len(),
        last,
        last_digest,
        last_kind,
        head: head_checked,
        breaks,
    }
}

fn push_once(breaks: &mut Vec<Break>, b: Break) {
    if !breaks.contains(&b) {
        breaks.push(b);
    }
}

/// The reports as a table, one line per stream, then one line per break.
pub fn table(reports: &[StreamReport]) -> String {
    let mut out = format!(
        "{:<16} {:<40} {:<36} {:>8} {:>6} {:<9} {}\n",
        "KIND", "OBJECT", "STREAM", "RECEIPTS", "LAST", "HEAD", "RESULT"
    );
    for r in reports {
        let result = if r.intact() {
            "OK".to_string()
        } else {
            let mut reasons: Vec<&str> = r.breaks.iter().map(Break::reason).collect();
            reasons.dedup();
            format!("BROKEN ({})", reasons.join(", "))
        };
        out.push_str(&format!(
            "{:<16} {:<40} {:<36} {:>8} {:>6} {:<9} {}\n",
            r.stream.kind.kind(),
            format!("{}/{}", r.stream.namespace, r.stream.name),
            r.stream.uid,
            r.receipts,
            r.last,
            r.head,
            result
        ));
    }
    for r in reports {
        for b in &r.breaks {
            out.push_str(&format!("{}: {}: {b}\n", r.stream, b.reason()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream() -> Stream {
        Stream {
            kind: StreamKind::Request,
            namespace: "ns".into(),
            name: "dsr-1".into(),
            uid: "u-1".into(),
        }
    }

    /// A chain of `n` receipts, the last of kind `last_kind`; and its head.
    fn chain(n: u64, last_kind: &str) -> (Vec<Stored>, ReceiptChainStatus) {
        let mut head: Option<ReceiptChainStatus> = None;
        let mut stored = Vec::new();
        for i in 1..=n {
            let kind = if i == n { last_kind } else { "ErasureReceipt" };
            let sealed = seal(
                &json!({"kind": kind, "n": i}),
                &stream(),
                head.as_ref(),
                "r/",
            );
            stored.push(Stored {
                sequence: sealed.sequence,
                body: sealed.body.clone(),
            });
            head = Some(advance(head, &sealed, false));
        }
        (stored, head.unwrap_or_default())
    }

    fn reasons(r: &StreamReport) -> Vec<&'static str> {
        r.breaks.iter().map(Break::reason).collect()
    }

    #[test]
    fn keys_name_stream_and_sequence_and_parse_back() {
        let key = object_key("receipts/", &stream(), 7);
        assert_eq!(key, "receipts/requests/ns/dsr-1/u-1/000000000007.json");
        assert_eq!(parse_key("receipts/", &key), Some((stream(), 7)));
        assert_eq!(parse_key("other/", &key), None);
        assert_eq!(parse_key("receipts/", "receipts/requests/ns/x.json"), None);
    }

    #[test]
    fn each_receipt_links_to_the_previous_and_the_head_follows() {
        let first = seal(&json!({"kind": "A"}), &stream(), None, "r/");
        assert_eq!(first.sequence, 1);
        assert!(first.body.contains(r#""previous":null"#), "{}", first.body);
        let head = advance(None, &first, true);
        assert_eq!(head.pending_upload.len(), 1);
        let second = seal(&json!({"kind": "B"}), &stream(), Some(&head), "r/");
        assert_eq!(second.sequence, 2);
        assert!(second.body.contains(&first.digest), "{}", second.body);
        assert_eq!(second.digest, receipt_digest(&second.body));
        let head = advance(Some(head), &second, false);
        assert_eq!(
            (head.sequence, head.digest.as_str()),
            (2, second.digest.as_str())
        );
        assert_eq!(
            head.pending_upload.len(),
            1,
            "without a sink nothing is added"
        );
    }

    #[test]
    fn an_unbroken_chain_verifies_against_its_head() {
        let (stored, head) = chain(4, "ErasureReceipt");
        let report = verify_stream(&stream(), &stored, &Head::Status(Some(head)));
        assert!(report.intact(), "{:?}", report.breaks);
        assert_eq!(
            (report.receipts, report.last, report.head),
            (4, 4, "Status")
        );
    }

    #[test]
    fn an_edited_receipt_is_detected_in_the_middle_and_at_the_end() {
        let (mut stored, head) = chain(3, "ErasureReceipt");
        stored[1].body = stored[1].body.replace(r#""n":2"#, r#""n":9"#);
        let report = verify_stream(&stream(), &stored, &Head::Status(Some(head.clone())));
        assert_eq!(report.breaks, vec![Break::Edited { sequence: 2 }]);
        let (mut stored, _) = chain(3, "ErasureReceipt");
        stored[2].body = stored[2].body.replace(r#""n":3"#, r#""n":4"#);
        let report = verify_stream(&stream(), &stored, &Head::Status(Some(head)));
        assert_eq!(report.breaks, vec![Break::Edited { sequence: 3 }]);
    }

    #[test]
    fn a_reformatted_receipt_counts_as_edited() {
        let (mut stored, head) = chain(2, "ErasureReceipt");
        stored[0].body = format!("{} ", stored[0].body);
        let report = verify_stream(&stream(), &stored, &Head::Status(Some(head)));
        assert!(reasons(&report).contains(&"ReceiptEdited"), "{report:?}");
    }

    #[test]
    fn deleted_receipts_are_detected_first_middle_and_last() {
        let (stored, head) = chain(4, "ErasureReceipt");
        let without = |i: usize| {
            let mut s = stored.clone();
            s.remove(i);
            s
        };
        let h = Head::Status(Some(head));
        assert_eq!(
            verify_stream(&stream(), &without(0), &h).breaks,
            vec![Break::Gap { from: 1, to: 1 }]
        );
        assert_eq!(
            verify_stream(&stream(), &without(2), &h).breaks,
            vec![Break::Gap { from: 3, to: 3 }]
        );
        assert_eq!(
            verify_stream(&stream(), &without(3), &h).breaks,
            vec![Break::Truncated { last: 3, head: 4 }]
        );
        assert_eq!(
            verify_stream(&stream(), &[], &h).breaks,
            vec![Break::Truncated { last: 0, head: 4 }]
        );
    }

    #[test]
    fn a_receipt_moved_to_another_key_is_misplaced() {
        let (mut stored, head) = chain(2, "ErasureReceipt");
        stored[1].sequence = 3;
        let report = verify_stream(&stream(), &stored, &Head::Status(Some(head)));
        assert!(reasons(&report).contains(&"ReceiptMisplaced"), "{report:?}");
    }

    #[test]
    fn receipts_beyond_the_head_are_a_break() {
        let (stored, head) = chain(3, "ErasureReceipt");
        let older = ReceiptChainStatus {
            sequence: 2,
            digest: "sha256:x".into(),
            ..head
        };
        let report = verify_stream(&stream(), &stored, &Head::Status(Some(older)));
        assert_eq!(report.breaks, vec![Break::BeyondHead { head: 2, last: 3 }]);
    }

    #[test]
    fn a_gone_request_needs_a_closing_receipt() {
        let (closed, _) = chain(2, "ErasureRequestClosed");
        let report = verify_stream(&stream(), &closed, &Head::Gone);
        assert!(report.intact(), "{report:?}");
        assert_eq!(report.head, "Closed");
        let (open, _) = chain(2, "ErasureReceipt");
        let report = verify_stream(&stream(), &open, &Head::Gone);
        assert_eq!(report.breaks, vec![Break::Unclosed { last: 2 }]);
        // A gone policy, or no cluster: the end cannot be checked, which is not a break.
        let policy = Stream {
            kind: StreamKind::Policy,
            ..stream()
        };
        assert!(verify_stream(&policy, &open, &Head::Gone).intact());
        assert_eq!(
            verify_stream(&stream(), &open, &Head::Unknown).head,
            "Unchecked"
        );
    }

    #[test]
    fn the_table_names_each_stream_and_each_break() {
        let (stored, head) = chain(2, "ErasureReceipt");
        let ok = verify_stream(&stream(), &stored, &Head::Status(Some(head.clone())));
        let broken = verify_stream(&stream(), &stored[..1], &Head::Status(Some(head)));
        let text = table(&[ok, broken]);
        assert!(text.contains(" OK\n"), "{text}");
        assert!(text.contains("BROKEN (LastReceiptMissing)"), "{text}");
        assert!(text.contains("the last receipt is missing"), "{text}");
    }
}
