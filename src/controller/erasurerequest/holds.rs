//! The LegalHolds in force in a namespace, read once and digested ([`HoldView`]), and how
//! they bear on one subject (pure).
//!
//! A batch asks its gate before every destructive step, for every member: a thousand
//! members asked one LegalHold list each, digested their identifiers each time, and read
//! the Secret of every hold that names its subjects by `secretRef` once per member. A view
//! is read once per question (shared, single flight, by every member asking at the same
//! moment, and never older than the question) and each member only looks its own digests
//! up in it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use kube::ResourceExt;
use tracing::warn;

use super::super::{Context, Error};
use crate::api::legalhold::LegalHold;
use crate::api::Timestamp;
use crate::audit::{self, identifier_digests, subject_digest};

/// The holds in force in a namespace, as they bear on one subject.
#[derive(Debug, Default, PartialEq)]
pub struct Holds {
    /// Holds naming this subject: the whole request waits.
    pub subject: Vec<String>,
    /// Held policy → the hold holding it.
    pub policies: BTreeMap<String, String>,
    /// Holds that could not be evaluated, each with why: the whole request waits.
    pub unverifiable: Vec<String>,
    /// The earliest expiry among the holds that bear on the request.
    pub expiry: Option<Timestamp>,
}

/// A subject as holds match it: the digest of each identifier, and of the whole subject.
/// Computed once per request, so a gate asked a thousand times digests nothing again.
#[derive(Clone, Debug)]
pub struct SubjectDigests {
    identifiers: BTreeSet<String>,
    whole: String,
}

impl SubjectDigests {
    pub fn new(key: &audit::DigestKey, identifiers: &BTreeMap<String, String>) -> Self {
        Self {
            identifiers: identifier_digests(key, identifiers),
            whole: subject_digest(key, identifiers),
        }
    }
}

/// What a held subject's Secret gave: the digests of its non-blank identifiers, or why it
/// cannot be evaluated.
pub type SecretDigests = Result<BTreeSet<String>, String>;

/// One active hold, digested.
#[derive(Debug, Default)]
struct Held {
    name: String,
    policies: Vec<String>,
    /// Digests the hold names: each matches an identifier's digest or the whole subject's.
    digests: BTreeSet<String>,
    /// Digests of the identifiers in the Secrets it names: each matches an identifier's.
    secret_digests: BTreeSet<String>,
    /// Why some of its subjects cannot be evaluated.
    unverifiable: Vec<String>,
    expires_at: Option<Timestamp>,
}

/// The LegalHolds active in one namespace, with what each holds. Fails closed: a list that
/// failed holds every subject, as does a hold that cannot be evaluated.
#[derive(Debug)]
pub struct HoldView {
    holds: Vec<Held>,
    /// Why the list failed, if it did.
    unlisted: Option<String>,
}

impl HoldView {
    /// A namespace whose LegalHolds could not be listed (`reason`: the error's reason).
    pub fn unlisted(reason: &str) -> Self {
        Self {
            holds: Vec::new(),
            unlisted: Some(format!(
                "the LegalHolds of the namespace cannot be listed ({reason})"
            )),
        }
    }

    /// The Secrets that the active holds of `list` name their subjects by (pure).
    pub fn secrets_named(list: &[LegalHold], now: Timestamp) -> BTreeSet<String> {
        list.iter()
            .filter(|hold| super::super::legalhold::is_active(hold, now))
            .flat_map(|hold| hold.spec.subjects.iter().flatten())
            .filter(|held| held.digest.is_none())
            .filter_map(|held| held.secret_ref.as_ref().map(|s| s.name.clone()))
            .collect()
    }

    /// The active holds of `list`, digested; `secrets` has what each Secret they name gave
    /// (pure).
    pub fn new(
        list: &[LegalHold],
        now: Timestamp,
        secrets: &BTreeMap<String, SecretDigests>,
    ) -> Self {
        let mut holds = Vec::new();
        for hold in list {
            if !super::super::legalhold::is_active(hold, now) {
                continue;
            }
            let name = hold.name_any();
            let mut held = Held {
                policies: hold.spec.policies.clone().unwrap_or_default(),
                expires_at: hold.spec.expires_at,
                ..Default::default()
            };
            for subject in hold.spec.subjects.iter().flatten() {
                match (&subject.digest, &subject.secret_ref) {
                    (Some(d), _) => {
                        held.digests.insert(d.clone());
                    }
                    (None, Some(secret)) => match secrets.get(&secret.name) {
                        Some(Ok(digests)) => held.secret_digests.extend(digests.iter().cloned()),
                        Some(Err(why)) => {
                            held.unverifiable.push(format!("LegalHold {name}: {why}"));
                        }
                        None => held.unverifiable.push(format!(
                            "LegalHold {name}: its Secret {} was not read",
                            secret.name
                        )),
                    },
                    (None, None) => held.unverifiable.push(format!(
                        "LegalHold {name}: a held subject has neither digest nor secretRef"
                    )),
                }
            }
            held.name = name;
            holds.push(held);
        }
        Self {
            holds,
            unlisted: None,
        }
    }

    /// How the holds bear on `subject` (pure): those holding it, the policies held, those
    /// that cannot be evaluated, and the earliest expiry among the holds that bear on it.
    pub fn bearing_on(&self, subject: &SubjectDigests) -> Holds {
        let mut found = Holds::default();
        if let Some(why) = &self.unlisted {
            found.unverifiable.push(why.clone());
            return found;
        }
        for held in &self.holds {
            for policy in &held.policies {
                found.policies.insert(policy.clone(), held.name.clone());
            }
            found.unverifiable.extend(held.unverifiable.iter().cloned());
            let holds_subject = held.digests.contains(&subject.whole)
                || !held.digests.is_disjoint(&subject.identifiers)
                || !held.secret_digests.is_disjoint(&subject.identifiers);
            if holds_subject {
                found.subject.push(held.name.clone());
            }
            let relevant =
                !held.policies.is_empty() || !held.unverifiable.is_empty() || holds_subject;
            if let (true, Some(e)) = (relevant, held.expires_at) {
                found.expiry = Some(found.expiry.map_or(e, |x| x.min(e)));
            }
        }
        found.unverifiable.sort();
        found.unverifiable.dedup();
        found
    }
}

/// The holds of `namespace`, read afresh: one LIST (shared with the reconciles asking at the
/// same moment) and one GET per Secret the active holds name, shared by every caller that
/// asked before it was sent.
pub async fn view(
    ctx: &Context,
    namespace: &str,
    key: &audit::DigestKey,
    now: Timestamp,
) -> Arc<HoldView> {
    ctx.hold_views
        .get(namespace, || async {
            let list = match ctx.legal_holds(namespace).await {
                Ok(list) => list,
                Err(e) => {
                    let e = Error::Kube(super::super::shared_error(&e));
                    warn!(reason = e.reason(), error = %e, "cannot list LegalHolds");
                    return Arc::new(HoldView::unlisted(e.reason()));
                }
            };
            let mut secrets = BTreeMap::new();
            for name in HoldView::secrets_named(&list, now) {
                let digests = match super::secret_identifiers(ctx, namespace, &name).await {
                    Ok((mut theirs, _)) => {
                        theirs.retain(|_, v| !v.trim().is_empty());
                        if theirs.is_empty() {
                            Err(format!("its Secret {name} holds no identifier"))
                        } else {
                            Ok(identifier_digests(key, &theirs))
                        }
                    }
                    Err(e) => {
                        warn!(secret = %name, reason = e.reason(), "cannot read a held subject's Secret");
                        Err(e.to_string())
                    }
                };
                secrets.insert(name, digests);
            }
            Arc::new(HoldView::new(&list, now, &secrets))
        })
        .await
}

/// The holds of `namespace` as they bear on `subject`, read afresh (see [`view`]).
pub async fn holds(
    ctx: &Context,
    namespace: &str,
    key: &audit::DigestKey,
    subject: &SubjectDigests,
    now: Timestamp,
) -> Holds {
    view(ctx, namespace, key, now).await.bearing_on(subject)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> audit::DigestKey {
        audit::DigestKey::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap()
    }

    fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn hold(name: &str, spec: serde_json::Value) -> LegalHold {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tombstone.dev/v1alpha1", "kind": "LegalHold",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": spec
        }))
        .unwrap()
    }

    fn ts(s: &str) -> Timestamp {
        serde_json::from_value(serde_json::json!(s)).unwrap()
    }

    #[test]
    fn a_view_holds_the_subjects_it_names_by_digest_or_secret_and_the_policies_it_names() {
        let key = key();
        let alice = ids(&[("email", "alice@example.com"), ("userId", "4711")]);
        let bob = ids(&[("userId", "42")]);
        let carol = ids(&[("userId", "7")]);
        let by_identifier = audit::identifier_digest(&key, "userId", "4711");
        let whole_bob = subject_digest(&key, &bob);
        let list = vec![
            hold(
                "by-identifier",
                serde_json::json!({"reason": "litigation",
                "subjects": [{"digest": by_identifier}], "expiresAt": "2031-01-01T00:00:00Z"}),
            ),
            hold(
                "by-whole",
                serde_json::json!({"reason": "litigation",
                "subjects": [{"digest": whole_bob}, {"digest": whole_bob}]}),
            ),
            hold(
                "by-secret",
                serde_json::json!({"reason": "litigation",
                "subjects": [{"secretRef": {"name": "held"}}], "expiresAt": "2030-01-01T00:00:00Z"}),
            ),
            hold(
                "on-policy",
                serde_json::json!({"reason": "audit", "policies": ["mail"],
                "expiresAt": "2032-01-01T00:00:00Z"}),
            ),
            hold(
                "expired",
                serde_json::json!({"reason": "old", "policies": ["old"],
                "subjects": [{"digest": whole_bob}], "expiresAt": "2001-01-01T00:00:00Z"}),
            ),
        ];
        let now = ts("2026-01-01T00:00:00Z");
        assert_eq!(
            HoldView::secrets_named(&list, now),
            BTreeSet::from(["held".to_string()])
        );
        let secrets = BTreeMap::from([(
            "held".to_string(),
            Ok(identifier_digests(&key, &ids(&[("userId", "7")]))),
        )]);
        let view = HoldView::new(&list, now, &secrets);

        let on_alice = view.bearing_on(&SubjectDigests::new(&key, &alice));
        assert_eq!(on_alice.subject, vec!["by-identifier".to_string()]);
        assert_eq!(
            on_alice.policies,
            BTreeMap::from([("mail".to_string(), "on-policy".to_string())]),
            "an expired hold holds nothing"
        );
        assert!(on_alice.unverifiable.is_empty());
        assert_eq!(on_alice.expiry, Some(ts("2031-01-01T00:00:00Z")));

        let on_bob = view.bearing_on(&SubjectDigests::new(&key, &bob));
        assert_eq!(
            on_bob.subject,
            vec!["by-whole".to_string()],
            "named once however many of its subjects match"
        );
        assert_eq!(on_bob.expiry, Some(ts("2032-01-01T00:00:00Z")));

        let on_carol = view.bearing_on(&SubjectDigests::new(&key, &carol));
        assert_eq!(on_carol.subject, vec!["by-secret".to_string()]);
        assert_eq!(on_carol.expiry, Some(ts("2030-01-01T00:00:00Z")));

        let on_nobody = view.bearing_on(&SubjectDigests::new(&key, &ids(&[("userId", "1")])));
        assert!(on_nobody.subject.is_empty());
        assert_eq!(on_nobody.policies.len(), 1);
    }

    #[test]
    fn a_hold_that_cannot_be_evaluated_and_a_failed_list_hold_every_subject() {
        let key = key();
        let anyone = SubjectDigests::new(&key, &ids(&[("userId", "1")]));
        let list = vec![
            hold(
                "unreadable",
                serde_json::json!({"reason": "r",
                "subjects": [{"secretRef": {"name": "gone"}}]}),
            ),
            hold(
                "empty",
                serde_json::json!({"reason": "r",
                "subjects": [{"secretRef": {"name": "blank"}}]}),
            ),
            hold(
                "neither",
                serde_json::json!({"reason": "r", "subjects": [{}]}),
            ),
        ];
        let now = ts("2026-01-01T00:00:00Z");
        let secrets = BTreeMap::from([
            ("gone".to_string(), Err("Secret gone not found".to_string())),
            (
                "blank".to_string(),
                Err("its Secret blank holds no identifier".to_string()),
            ),
        ]);
        let found = HoldView::new(&list, now, &secrets).bearing_on(&anyone);
        assert!(found.subject.is_empty());
        assert_eq!(
            found.unverifiable,
            vec![
                "LegalHold empty: its Secret blank holds no identifier".to_string(),
                "LegalHold neither: a held subject has neither digest nor secretRef".to_string(),
                "LegalHold unreadable: Secret gone not found".to_string(),
            ]
        );
        let unlisted = HoldView::unlisted("Forbidden").bearing_on(&anyone);
        assert_eq!(
            unlisted.unverifiable,
            vec!["the LegalHolds of the namespace cannot be listed (Forbidden)".to_string()]
        );
    }
}
