//! The Art. 30 register: the records of processing activities, built from RetentionPolicies
//! and their DataStores and rendered as Markdown, CSV (RFC 4180) or JSON for a DPO.
//!
//! Storage is described by store kind, bucket, index, key pattern or stream selector and the
//! DataStore's name; never by URL, endpoint or Secret, so nothing that could carry a
//! credential reaches the register.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::api::common::{find_condition, ConditionStatus};
use crate::api::retentionpolicy::{LegalBasis, Target};
use crate::api::{DataStore, Duration, RetentionPolicy, StoreKind};

const GROUP: &str = "tombstone.dev";
const API_VERSION: &str = "tombstone.dev/v1alpha1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid YAML: {source}")]
    Yaml {
        path: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {kind} {name:?} is invalid: {source}")]
    Invalid {
        path: String,
        kind: String,
        name: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: {kind} has apiVersion {api_version}; this tombstone reads {API_VERSION}")]
    UnsupportedVersion {
        path: String,
        kind: String,
        api_version: String,
    },
    #[error("listing {kind} failed: {source}")]
    List {
        kind: &'static str,
        #[source]
        source: kube::Error,
    },
}

impl Error {
    /// A stable PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Read { .. } => "ReadFailed",
            Error::Yaml { .. } => "InvalidYaml",
            Error::Invalid { .. } => "InvalidObject",
            Error::UnsupportedVersion { .. } => "UnsupportedVersion",
            Error::List { .. } => "ListFailed",
        }
    }
}

/// The RetentionPolicies and DataStores the register is built from.
#[derive(Clone, Debug, Default)]
pub struct Objects {
    pub policies: Vec<RetentionPolicy>,
    pub stores: Vec<DataStore>,
}

impl Objects {
    /// Keeps the objects of `namespace`: objects without one are put in it, objects of
    /// another namespace are dropped. `None` keeps everything as it is.
    pub fn in_namespace(mut self, namespace: Option<&str>) -> Self {
        let Some(ns) = namespace else { return self };
        fn keep(meta: &mut kube::api::ObjectMeta, ns: &str) -> bool {
            match meta.namespace.as_deref() {
                None | Some("") => {
                    meta.namespace = Some(ns.to_string());
                    true
                }
                Some(other) => other == ns,
            }
        }
        self.policies.retain_mut(|p| keep(&mut p.metadata, ns));
        self.stores.retain_mut(|s| keep(&mut s.metadata, ns));
        self
    }
}

/// Parses a multi-document YAML text, keeping RetentionPolicies and DataStores (also inside
/// `kind: List` and `…List` documents, as `kubectl get -o yaml` writes them) and ignoring
/// every other kind: Secrets are never even deserialized. `source` names the text in errors.
pub fn parse_yaml(text: &str, source: &str, into: &mut Objects) -> Result<(), Error> {
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| Error::Yaml {
            path: source.to_string(),
            source: e,
        })?;
        collect(value, source, into)?;
    }
    Ok(())
}

fn collect(value: serde_yaml::Value, source: &str, into: &mut Objects) -> Result<(), Error> {
    let field = |name: &str| {
        value
            .get(name)
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if kind.ends_with("List") {
        if let Some(items) = value.get("items").and_then(serde_yaml::Value::as_sequence) {
            for item in items.clone() {
                collect(item, source, into)?;
            }
        }
        return Ok(());
    }
    let group = api_version.split_once('/').map(|(g, _)| g);
    if group != Some(GROUP) || !matches!(kind.as_str(), "RetentionPolicy" | "DataStore") {
        return Ok(());
    }
    if api_version != API_VERSION {
        return Err(Error::UnsupportedVersion {
            path: source.to_string(),
            kind,
            api_version,
        });
    }
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(serde_yaml::Value::as_str)
        .unwrap_or_default()
        .to_string();
    let invalid = |e| Error::Invalid {
        path: source.to_string(),
        kind: kind.clone(),
        name: name.clone(),
        source: e,
    };
    if kind == "RetentionPolicy" {
        into.policies
            .push(serde_yaml::from_value(value.clone()).map_err(invalid)?);
    } else {
        into.stores
            .push(serde_yaml::from_value(value.clone()).map_err(invalid)?);
    }
    Ok(())
}

/// Reads YAML files, and the `.yaml`/`.yml` files of directories (not recursively, in name
/// order). A file that cannot be read or parsed is an error naming it.
pub fn load_files(paths: &[PathBuf]) -> Result<Objects, Error> {
    let read_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| Error::Read { path, source }
    };
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut in_dir = Vec::new();
            for entry in std::fs::read_dir(path).map_err(read_err(path))? {
                let file = entry.map_err(read_err(path))?.path();
                let yaml = file.extension().is_some_and(|e| e == "yaml" || e == "yml");
                if yaml && !file.is_dir() {
                    in_dir.push(file);
                }
            }
            in_dir.sort();
            files.extend(in_dir);
        } else {
            files.push(path.clone());
        }
    }
    let mut objects = Objects::default();
    for file in &files {
        let text = std::fs::read_to_string(file).map_err(read_err(file))?;
        parse_yaml(&text, &file.display().to_string(), &mut objects)?;
    }
    Ok(objects)
}

/// Lists every RetentionPolicy and DataStore of `namespace`, or of all namespaces.
pub async fn load_cluster(
    client: &kube::Client,
    namespace: Option<&str>,
) -> Result<Objects, Error> {
    fn api<K>(client: &kube::Client, namespace: Option<&str>) -> kube::Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
    {
        match namespace {
            Some(ns) => kube::Api::namespaced(client.clone(), ns),
            None => kube::Api::all(client.clone()),
        }
    }
    let params = kube::api::ListParams::default();
    let policies = api::<RetentionPolicy>(client, namespace)
        .list(&params)
        .await
        .map_err(|source| Error::List {
            kind: "RetentionPolicies",
            source,
        })?;
    let stores = api::<DataStore>(client, namespace)
        .list(&params)
        .await
        .map_err(|source| Error::List {
            kind: "DataStores",
            source,
        })?;
    Ok(Objects {
        policies: policies.items,
        stores: stores.items,
    })
}

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

    /// A GitHub-flavoured Markdown table. The Namespace column is left out when no row has
    /// a namespace (objects read from files without one).
    pub fn to_markdown(&self) -> String {
        let with_ns = self.activities.iter().any(|a| !a.namespace.is_empty());
        let mut headers = COLUMNS.to_vec();
        if !with_ns {
            headers.remove(0);
        }
        let mut out = String::new();
        out.push_str(&format!("| {} |\n", headers.join(" | ")));
        out.push_str(&format!("|{}\n", "---|".repeat(headers.len())));
        for a in &self.activities {
            let mut cells = a.cells(markdown_cell, "<br>");
            if !with_ns {
                cells.remove(0);
            }
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }

    /// CSV as RFC 4180 has it: a header row, CRLF line ends, fields quoted when they hold a
    /// comma, a quote or a line break, quotes doubled.
    pub fn to_csv(&self) -> String {
        let mut out = String::new();
        let row = |cells: &[String]| {
            let fields: Vec<String> = cells.iter().map(|c| csv_field(c)).collect();
            format!("{}\r\n", fields.join(","))
        };
        let headers: Vec<String> = COLUMNS.iter().map(|c| c.to_string()).collect();
        out.push_str(&row(&headers));
        for a in &self.activities {
            out.push_str(&row(&a.cells(str::to_string, "; ")));
        }
        out
    }

    /// Pretty JSON: `{"activities": [...]}`, with a trailing newline.
    pub fn to_json(&self) -> String {
        let mut out = serde_json::to_string_pretty(self).expect("the register serializes");
        out.push('\n');
        out
    }
}

const COLUMNS: [&str; 11] = [
    "Namespace",
    "Processing activity",
    "Description",
    "Purpose",
    "Legal basis",
    "Data subjects",
    "Categories of data",
    "Storage",
    "Retention",
    "Last sweep",
    "Compliant",
];

impl Activity {
    /// The cells in the order of `COLUMNS`, each text passed through `escape`; storage
    /// entries are escaped one by one and joined by `sep`.
    fn cells(&self, escape: fn(&str) -> String, sep: &str) -> Vec<String> {
        let locations: Vec<String> = self.storage.iter().map(|s| escape(&s.location)).collect();
        let last_sweep = match (&self.last_sweep, self.status_known) {
            (Some(l), _) => format!("{} ({})", l.completion_time, l.outcome),
            (None, true) => "never".to_string(),
            (None, false) => "unknown".to_string(),
        };
        let compliant = match &self.compliant {
            Some(c) if c.reason.is_empty() => c.status.clone(),
            Some(c) => format!("{} ({})", c.status, c.reason),
            None => "unknown".to_string(),
        };
        let mut cells: Vec<String> = [
            &self.namespace,
            &self.name,
            &self.description,
            &self.purpose,
            &self.legal_basis_text,
            &self.data_subjects.join(", "),
            &self.data_categories.join(", "),
        ]
        .into_iter()
        .map(|c| escape(c))
        .collect();
        cells.push(locations.join(sep));
        cells.extend([&self.retention_text, &last_sweep, &compliant].map(|c| escape(c)));
        cells
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

fn target_kind(t: &Target) -> Option<StoreKind> {
    if t.redis.is_some() {
        Some(StoreKind::Redis)
    } else if t.s3.is_some() {
        Some(StoreKind::S3)
    } else if t.loki.is_some() {
        Some(StoreKind::Loki)
    } else if t.elasticsearch.is_some() {
        Some(StoreKind::Elasticsearch)
    } else {
        None
    }
}

/// Describes where a target keeps its data: kind, bucket or tenant, what it selects, and the
/// DataStore by name. Never a URL, an endpoint or a Secret.
fn storage(target: &Target, store: Option<&&DataStore>) -> Storage {
    let spec = store.map(|s| &s.spec);
    let kind = target_kind(target).or_else(|| spec.and_then(|s| s.kind()));
    let mut parts: Vec<String> = Vec::new();
    match kind {
        Some(StoreKind::Redis) => {
            let cluster = spec
                .and_then(|s| s.redis.as_ref())
                .and_then(|r| r.cluster)
                .unwrap_or(false);
            parts.push(if cluster { "redis cluster" } else { "redis" }.to_string());
            if let Some(r) = &target.redis {
                parts.push(format!("keys {}", r.key_pattern));
            }
        }
        Some(StoreKind::S3) => {
            let mut head = "s3".to_string();
            if let Some(s3) = spec.and_then(|s| s.s3.as_ref()) {
                head.push_str(&format!(" bucket {}", s3.bucket));
                if let Some(region) = &s3.region {
                    head.push_str(&format!(" in {region}"));
                }
            }
            parts.push(head);
            if let Some(prefix) = target.s3.as_ref().map(|t| &t.prefix) {
                if !prefix.is_empty() {
                    parts.push(format!("prefix {prefix}"));
                }
            }
        }
        Some(StoreKind::Loki) => {
            let mut head = "loki".to_string();
            if let Some(tenant) = spec
                .and_then(|s| s.loki.as_ref())
                .and_then(|l| l.tenant.as_ref())
            {
                head.push_str(&format!(" tenant {tenant}"));
            }
            parts.push(head);
            if let Some(l) = &target.loki {
                parts.push(format!("streams {}", l.selector));
            }
        }
        Some(StoreKind::Elasticsearch) => {
            parts.push("elasticsearch".to_string());
            if let Some(e) = &target.elasticsearch {
                parts.push(format!("index {}", e.index));
            }
        }
        None => parts.push("unknown store".to_string()),
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

/// One Markdown table cell: Markdown's own characters backslash-escaped (a pipe would end
/// the cell, `*` or `_` start emphasis), line breaks as `<br>`.
fn markdown_cell(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' | '|' | '*' | '_' | '`' | '<' | '[' | '~' => {
                out.push('\\');
                out.push(c);
            }
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("<br>");
            }
            '\n' => out.push_str("<br>"),
            _ => out.push(c),
        }
    }
    out
}

/// One RFC 4180 field: quoted when it holds a comma, a quote or a line break, quotes doubled.
fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    fn policy(ns: &str, name: &str, spec: Value, status: Option<Value>) -> RetentionPolicy {
        let mut obj = json!({
            "apiVersion": API_VERSION,
            "kind": "RetentionPolicy",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        });
        if let Some(status) = status {
            obj["status"] = status;
        }
        serde_json::from_value(obj).expect("test policy")
    }

    fn spec(targets: Value) -> Value {
        json!({
            "description": "Web sessions",
            "purpose": "Keep customers signed in",
            "legalBasis": "contract",
            "dataSubjects": ["customers", "visitors"],
            "dataCategories": ["user ID", "session data"],
            "retention": "30d",
            "targets": targets,
        })
    }

    fn redis_target() -> Value {
        json!([{"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"}}])
    }

    fn store(ns: &str, name: &str, spec: Value) -> DataStore {
        serde_json::from_value(json!({
            "apiVersion": API_VERSION,
            "kind": "DataStore",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .expect("test store")
    }

    fn cache(ns: &str) -> DataStore {
        store(
            ns,
            "cache",
            json!({"redis": {"url": "redis://:hunter2@redis:6379/0",
                             "passwordSecretRef": {"name": "redis-auth", "key": "password"}}}),
        )
    }

    /// The `|` of a Markdown row that separate cells (not the escaped ones).
    fn cell_separators(row: &str) -> usize {
        let mut n = 0;
        let mut escaped = false;
        for c in row.chars() {
            match c {
                '\\' if !escaped => escaped = true,
                '|' if !escaped => n += 1,
                _ => escaped = false,
            }
            if c != '\\' {
                escaped = false;
            }
        }
        n
    }

    #[test]
    fn markdown_escapes_pipes_line_breaks_and_emphasis() {
        let mut s = spec(redis_target());
        s["description"] = json!("Sessions | carts\nand more\r\nstill");
        s["purpose"] = json!("*very* important_stuff `code` <b> [link] back\\slash");
        let register = Register::build(&[policy("shop", "p", s, None)], &[cache("shop")]);
        let md = register.to_markdown();
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines.len(), 3, "header, rule, one row: {md}");
        let columns = cell_separators(lines[0]);
        assert_eq!(columns, COLUMNS.len() + 1);
        assert_eq!(lines[1], format!("|{}", "---|".repeat(COLUMNS.len())));
        assert_eq!(cell_separators(lines[2]), columns, "{}", lines[2]);
        assert!(lines[2].contains("| Sessions \\| carts<br>and more<br>still |"));
        assert!(lines[2]
            .contains("| \\*very\\* important\\_stuff \\`code\\` \\<b> \\[link] back\\\\slash |"));
        assert!(lines[2].contains("redis keys session:\\* (DataStore cache)"));
    }

    #[test]
    fn markdown_leaves_out_an_empty_namespace_column() {
        let register = Register::build(&[policy("", "p", spec(redis_target()), None)], &[]);
        let md = register.to_markdown();
        assert!(
            md.starts_with("| Processing activity | Description |"),
            "{md}"
        );
        let with_ns = Register::build(&[policy("shop", "p", spec(redis_target()), None)], &[]);
        assert!(with_ns
            .to_markdown()
            .starts_with("| Namespace | Processing activity |"));
        assert!(with_ns
            .to_markdown()
            .contains("\n| shop | p | Web sessions |"));
    }

    #[test]
    fn status_absent_never_swept_and_swept() {
        let none = policy("shop", "a", spec(redis_target()), None);
        let never = policy(
            "shop",
            "b",
            spec(redis_target()),
            Some(json!({"conditions": []})),
        );
        let swept = policy(
            "shop",
            "c",
            spec(redis_target()),
            Some(json!({
                "lastSweep": {"startTime": "2026-11-20T03:00:00Z",
                              "completionTime": "2026-11-20T03:00:12Z",
                              "outcome": "PartiallyFailed", "deleted": 5},
                "conditions": [{"type": "Compliant", "status": "False", "reason": "SweepFailed",
                                "lastTransitionTime": "2026-11-20T03:00:12Z"}],
            })),
        );
        let register = Register::build(&[swept, never, none], &[cache("shop")]);
        let rows: Vec<Vec<String>> = register
            .activities
            .iter()
            .map(|a| a.cells(str::to_string, "; "))
            .collect();
        let (sweep, compliant) = (COLUMNS.len() - 2, COLUMNS.len() - 1);
        assert_eq!(
            (&*rows[0][sweep], &*rows[0][compliant]),
            ("unknown", "unknown")
        );
        assert_eq!(
            (&*rows[1][sweep], &*rows[1][compliant]),
            ("never", "unknown")
        );
        assert_eq!(rows[2][sweep], "2026-11-20T03:00:12Z (PartiallyFailed)");
        assert_eq!(rows[2][compliant], "False (SweepFailed)");
        assert!(!register.activities[0].status_known);
        assert!(register.activities[1].status_known);
    }

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
    fn csv_follows_rfc_4180() {
        assert_eq!(csv_field("plain text"), "plain text");
        assert_eq!(csv_field("a, b"), "\"a, b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("two\nlines"), "\"two\nlines\"");
        assert_eq!(csv_field("cr\rhere"), "\"cr\rhere\"");
        assert_eq!(csv_field(""), "");

        let mut s = spec(redis_target());
        s["description"] = json!("Sessions, \"carts\"\nand more");
        let csv = Register::build(&[policy("shop", "p", s, None)], &[cache("shop")]).to_csv();
        assert!(csv.ends_with("\r\n"));
        let records: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(
            records.len(),
            3,
            "header, one record, and the final CRLF: {csv:?}"
        );
        assert_eq!(records[0], COLUMNS.join(","));
        assert_eq!(
            records[1],
            "shop,p,\"Sessions, \"\"carts\"\"\nand more\",Keep customers signed in,\
             Contract (Art. 6(1)(b)),\"customers, visitors\",\"user ID, session data\",\
             redis keys session:* (DataStore cache),30 days,unknown,unknown"
        );
    }

    #[test]
    fn json_has_one_object_per_activity() {
        let register = Register::build(
            &[policy("shop", "p", spec(redis_target()), None)],
            &[cache("shop")],
        );
        let value: Value = serde_json::from_str(&register.to_json()).expect("valid JSON");
        assert_eq!(
            value,
            json!({"activities": [{
                "namespace": "shop",
                "name": "p",
                "description": "Web sessions",
                "purpose": "Keep customers signed in",
                "legalBasis": "contract",
                "legalBasisText": "Contract (Art. 6(1)(b))",
                "dataSubjects": ["customers", "visitors"],
                "dataCategories": ["user ID", "session data"],
                "storage": [{"target": "sessions", "store": "cache", "kind": "redis",
                             "storeFound": true,
                             "location": "redis keys session:* (DataStore cache)",
                             "insecure": false}],
                "retention": "30d",
                "retentionText": "30 days",
                "statusKnown": false,
                "lastSweep": null,
                "compliant": null,
            }]})
        );
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

    #[test]
    fn yaml_keeps_only_tombstone_policies_and_stores() {
        let text = r#"
# a comment-only document
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: replace-me}
---
apiVersion: tombstone.dev/v1alpha1
kind: RetentionPolicy
metadata: {name: sessions}
spec:
  purpose: Keep customers signed in
  legalBasis: contract
  retention: 30d
  targets: [{name: sessions, store: cache, redis: {keyPattern: "session:*"}}]
---
apiVersion: tombstone.dev/v1alpha1
kind: ErasureRequest
metadata: {name: dsr}
spec: {subject: {identifiers: {userId: "4711"}}, reason: objection}
---
apiVersion: v1
kind: List
items:
- apiVersion: tombstone.dev/v1alpha1
  kind: DataStore
  metadata: {name: cache, namespace: shop}
  spec: {redis: {url: "redis://redis:6379"}}
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: other}
---
"#;
        let mut objects = Objects::default();
        parse_yaml(text, "test.yaml", &mut objects).expect("parses");
        assert_eq!(objects.policies.len(), 1);
        assert_eq!(objects.stores.len(), 1);
        assert_eq!(
            objects.stores[0].metadata.namespace.as_deref(),
            Some("shop")
        );

        let objects = objects.in_namespace(Some("shop"));
        assert_eq!(
            objects.policies[0].metadata.namespace.as_deref(),
            Some("shop")
        );
        assert_eq!(objects.stores.len(), 1);
        let objects = objects.in_namespace(Some("other"));
        assert!(objects.policies.is_empty() && objects.stores.is_empty());
    }

    #[test]
    fn bad_yaml_names_the_file() {
        let mut objects = Objects::default();
        let error = parse_yaml("a: [unclosed", "broken.yaml", &mut objects).unwrap_err();
        assert_eq!(error.reason(), "InvalidYaml");
        assert!(error.to_string().starts_with("broken.yaml "), "{error}");

        let invalid = "apiVersion: tombstone.dev/v1alpha1\nkind: RetentionPolicy\n\
                       metadata: {name: p}\nspec: {purpose: x, legalBasis: whim}\n";
        let error = parse_yaml(invalid, "policy.yaml", &mut objects).unwrap_err();
        assert_eq!(error.reason(), "InvalidObject");
        assert!(
            error
                .to_string()
                .starts_with("policy.yaml: RetentionPolicy \"p\""),
            "{error}"
        );

        let future = "apiVersion: tombstone.dev/v2\nkind: DataStore\nmetadata: {name: s}\n";
        let error = parse_yaml(future, "store.yaml", &mut objects).unwrap_err();
        assert_eq!(error.reason(), "UnsupportedVersion");
    }
}
