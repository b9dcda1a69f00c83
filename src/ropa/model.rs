//! The register's model: one processing activity per RetentionPolicy, with where each of
//! its targets keeps its data, built from the objects (pure).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::api::common::{find_condition, ConditionStatus};
use crate::api::retentionpolicy::{LegalBasis, Target};
use crate::api::{DataStore, Duration, RetentionPolicy, StoreKind};

/// The register of processing activities: one row per RetentionPolicy, ordered by
/// namespace and name.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Register {
    pub activities: Vec<Activity>,
}

/// One processing activity (one RetentionPolicy).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Activity {
    pub namespace: String,
    pub name: String,
    pub description: String,
    pub purpose: String,
    /// As in the spec: `contract`, `legitimateInterests`, …
    pub legal_basis: LegalBasis,
    /// Human form: `Contract (Art. 6(1)(b))`.
    pub legal_basis_text: String,
    pub data_subjects: Vec<String>,
    pub data_categories: Vec<String>,
    pub storage: Vec<Storage>,
    /// As in the spec: `30d`.
    pub retention: Duration,
    /// Human form: `30 days`.
    pub retention_text: String,
    /// Whether the policy has a status at all (objects from files have none); without one,
    /// last sweep and compliance are unknown.
    pub status_known: bool,
    pub last_sweep: Option<SweepSummary>,
    pub compliant: Option<Compliance>,
}

/// Where one target of the policy keeps its data.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Storage {
    pub target: String,
    /// The DataStore's name.
    pub store: String,
    /// `redis`, `s3`, `loki` or `elasticsearch` (from the target, else the store).
    pub kind: Option<StoreKind>,
    /// False when no DataStore of that name was found beside the policy.
    pub store_found: bool,
    /// E.g. `s3 bucket shop-archive in eu-west-1, prefix mailer/logs/ (DataStore archive)`.
    pub location: String,
    /// True when the DataStore says `insecure: true` and its credentials travel in plain
    /// text (no TLS): a security measure (Art. 32) the register should not hide.
    pub insecure: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SweepSummary {
    pub completion_time: String,
    pub outcome: String,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Compliance {
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
}

impl Register {
    pub fn build(policies: &[RetentionPolicy], stores: &[DataStore]) -> Register {
        let by_name: BTreeMap<(&str, &str), &DataStore> = stores
            .iter()
            .map(|s| {
                let ns = s.metadata.namespace.as_deref().unwrap_or_default();
                let name = s.metadata.name.as_deref().unwrap_or_default();
                ((ns, name), s)
            })
            .collect();
        let mut activities: Vec<Activity> = policies
            .iter()
            .map(|p| {
                let namespace = p.metadata.namespace.clone().unwrap_or_default();
                let spec = &p.spec;
                let storage = spec
                    .targets
                    .iter()
                    .map(|t| storage(t, by_name.get(&(namespace.as_str(), t.store.as_str()))))
                    .collect();
                let status = p.status.as_ref();
                Activity {
                    name: p.metadata.name.clone().unwrap_or_default(),
                    description: spec.description.clone().unwrap_or_default(),
                    purpose: spec.purpose.clone(),
                    legal_basis: spec.legal_basis,
                    legal_basis_text: legal_basis_text(spec.legal_basis).to_string(),
                    data_subjects: spec.data_subjects.clone(),
                    data_categories: spec.data_categories.clone(),
                    storage,
                    retention: spec.retention,
                    retention_text: duration_text(spec.retention),
                    status_known: status.is_some(),
                    last_sweep: status
                        .and_then(|s| s.last_sweep.as_ref())
                        .map(|l| SweepSummary {
                            completion_time: l.completion_time.to_string(),
                            outcome: l.outcome.as_str().to_string(),
                        }),
                    compliant: status
                        .and_then(|s| find_condition(&s.conditions, "Compliant"))
                        .map(|c| Compliance {
                            status: match c.status {
                                ConditionStatus::True => "True",
                                ConditionStatus::False => "False",
                                ConditionStatus::Unknown => "Unknown",
                            }
                            .to_string(),
                            reason: c.reason.clone(),
                        }),
                    namespace,
                }
            })
            .collect();
        activities.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Register { activities }
    }
}

/// Art. 6(1) in words, with its point.
pub fn legal_basis_text(basis: LegalBasis) -> &'static str {
    match basis {
        LegalBasis::Consent => "Consent (Art. 6(1)(a))",
        LegalBasis::Contract => "Contract (Art. 6(1)(b))",
        LegalBasis::LegalObligation => "Legal obligation (Art. 6(1)(c))",
        LegalBasis::VitalInterests => "Vital interests (Art. 6(1)(d))",
        LegalBasis::PublicTask => "Public task (Art. 6(1)(e))",
        LegalBasis::LegitimateInterests => "Legitimate interests (Art. 6(1)(f))",
    }
}

/// `30d` → `30 days`, in the largest unit that divides the duration exactly.
pub fn duration_text(d: Duration) -> String {
    let secs = d.as_secs();
    for (unit, factor) in [
        ("week", 7 * 86_400),
        ("day", 86_400),
        ("hour", 3600),
        ("minute", 60),
    ] {
        if secs > 0 && secs.is_multiple_of(factor) {
            let n = secs / factor;
            return format!("{n} {unit}{}", if n == 1 { "" } else { "s" });
        }
    }
    format!("{secs} second{}", if secs == 1 { "" } else { "s" })
}

/// Describes where a target keeps its data: kind, bucket or tenant, what it selects, and the
/// DataStore by name. Never a URL, an endpoint or a Secret.
fn storage(target: &Target, store: Option<&&DataStore>) -> Storage {
    let spec = store.map(|s| &s.spec);
    let driver = crate::backends::registry::for_target(target)
        .ok()
        .or_else(|| spec.and_then(crate::backends::registry::for_store));
    let kind = driver.map(|d| d.kind());
    let mut parts = match driver {
        Some(d) => d.describe(spec, target),
        None => vec!["unknown store".to_string()],
    };
    if parts.is_empty() {
        parts.push(kind.map_or("unknown store", |k| k.as_str()).to_string());
    }
    // "redis keys session:*", but "s3 bucket b in r, prefix p".
    let separator = if parts[0].contains(' ') { ", " } else { " " };
    let mut location = parts.join(separator);
    let found = store.is_some();
    let insecure = spec.is_some_and(crate::controller::stores::sends_plaintext_credentials);
    location.push_str(&format!(
        " (DataStore {}{}{})",
        target.store,
        if found { "" } else { ", not found" },
        if insecure {
            ", insecure: credentials sent without TLS"
        } else {
            ""
        }
    ));
    Storage {
        target: target.name.clone(),
        store: target.store.clone(),
        kind,
        store_found: found,
        location,
        insecure,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ropa::fixtures::{cache, policy, redis_target, spec, store};

    #[test]
    fn every_target_names_its_store_and_never_a_credential() {
        let targets = json!([
            {"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"}},
            {"name": "archive", "store": "archive", "s3": {"prefix": "mailer/logs/"}},
            {"name": "logs", "store": "logs", "loki": {"selector": "{app=\"mailer\"}"}},
            {"name": "events", "store": "search",
             "elasticsearch": {"index": "mailer-*", "timestampField": "@timestamp"}},
            {"name": "gone", "store": "missing", "s3": {"prefix": "x/"}},
        ]);
        let stores = [
            cache("shop"),
            store(
                "shop",
                "archive",
                json!({"s3": {"bucket": "shop-archive", "region": "eu-west-1",
                              "endpoint": "http://minio.storage.svc:9000",
                              "credentialsSecretRef": {"name": "archive-s3-credentials"}}}),
            ),
            store(
                "shop",
                "logs",
                json!({"loki": {"url": "http://user:pw@loki.svc", "tenant": "shop",
                                "credentialsSecretRef": {"name": "loki-auth"}}}),
            ),
            store(
                "shop",
                "search",
                json!({"elasticsearch": {"url": "https://elastic:changeme@es.svc:9200"}}),
            ),
            // Same name in another namespace: not this policy's store.
            store("other", "missing", json!({"s3": {"bucket": "elsewhere"}})),
        ];
        let register = Register::build(&[policy("shop", "p", spec(targets), None)], &stores);
        let locations: Vec<&str> = register.activities[0]
            .storage
            .iter()
            .map(|s| s.location.as_str())
            .collect();
        assert_eq!(
            locations,
            [
                "redis keys session:* (DataStore cache)",
                "s3 bucket shop-archive in eu-west-1, prefix mailer/logs/ (DataStore archive)",
                "loki tenant shop, streams {app=\"mailer\"} (DataStore logs)",
                "elasticsearch index mailer-* (DataStore search)",
                "s3 prefix x/ (DataStore missing, not found)",
            ]
        );
        assert!(!register.activities[0].storage[4].store_found);
        for out in [
            register.to_markdown(),
            register.to_csv(),
            register.to_json(),
        ] {
            for secret in [
                "hunter2",
                "redis-auth",
                "minio",
                "archive-s3-credentials",
                "user:pw",
                "loki-auth",
                "changeme",
                "://",
                "elsewhere",
            ] {
                assert!(!out.contains(secret), "{secret} leaked into {out}");
            }
        }
    }

    #[test]
    fn a_store_sent_credentials_in_plain_text_says_so() {
        let mut plain = cache("shop");
        plain.spec.insecure = Some(true);
        let mut tls = store(
            "shop",
            "tls",
            json!({"redis": {"url": "rediss://redis:6380",
                             "passwordSecretRef": {"name": "redis-auth", "key": "password"}}}),
        );
        tls.spec.insecure = Some(true);
        let targets = json!([
            {"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"}},
            {"name": "carts", "store": "tls", "redis": {"keyPattern": "cart:*"}},
        ]);
        let register = Register::build(&[policy("shop", "p", spec(targets), None)], &[plain, tls]);
        let storage = &register.activities[0].storage;
        assert_eq!(
            storage[0].location,
            "redis keys session:* (DataStore cache, insecure: credentials sent without TLS)"
        );
        assert!(storage[0].insecure);
        assert_eq!(storage[1].location, "redis keys cart:* (DataStore tls)");
        assert!(!storage[1].insecure);
        assert!(register.to_json().contains("\"insecure\": true"));
        // Without insecure: true nothing is sent, and the register does not claim it is.
        let register = Register::build(
            &[policy("shop", "p", spec(redis_target()), None)],
            &[cache("shop")],
        );
        assert!(!register.activities[0].storage[0].insecure);
    }

    #[test]
    fn rows_are_ordered_by_namespace_then_name() {
        let p = |ns: &str, name: &str| policy(ns, name, spec(redis_target()), None);
        let register = Register::build(&[p("b", "a"), p("a", "z"), p("a", "b")], &[]);
        let order: Vec<(&str, &str)> = register
            .activities
            .iter()
            .map(|a| (a.namespace.as_str(), a.name.as_str()))
            .collect();
        assert_eq!(order, [("a", "b"), ("a", "z"), ("b", "a")]);
    }

    #[test]
    fn legal_bases_and_retentions_read_as_words() {
        assert_eq!(
            legal_basis_text(LegalBasis::LegitimateInterests),
            "Legitimate interests (Art. 6(1)(f))"
        );
        assert_eq!(
            legal_basis_text(LegalBasis::Consent),
            "Consent (Art. 6(1)(a))"
        );
        for (d, text) in [
            ("30d", "30 days"),
            ("1d", "1 day"),
            ("2w", "2 weeks"),
            ("36h", "36 hours"),
            ("90s", "90 seconds"),
            ("15m", "15 minutes"),
            ("0s", "0 seconds"),
        ] {
            assert_eq!(duration_text(d.parse().unwrap()), text);
        }
    }
}
