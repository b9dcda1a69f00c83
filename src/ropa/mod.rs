//! The Art. 30 register: the records of processing activities, built from RetentionPolicies
//! and their DataStores and rendered as Markdown, CSV (RFC 4180) or JSON for a DPO.
//!
//! Storage is described by store kind, bucket, index, key pattern or stream selector and the
//! DataStore's name; never by URL, endpoint or Secret, so nothing that could carry a
//! credential reaches the register.
//!
//! This module reads the objects, from YAML files or the API server; `model` builds the
//! register from them (pure) and `format` renders it.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::api::{DataStore, RetentionPolicy};

mod format;
mod model;

pub use model::{
    duration_text, legal_basis_text, Activity, Compliance, Register, Storage, SweepSummary,
};

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

/// Policies and stores the tests of the register are built from.
#[cfg(test)]
mod fixtures {
    use serde_json::{json, Value};

    use super::API_VERSION;
    use crate::api::{DataStore, RetentionPolicy};

    pub(super) fn policy(
        ns: &str,
        name: &str,
        spec: Value,
        status: Option<Value>,
    ) -> RetentionPolicy {
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

    pub(super) fn spec(targets: Value) -> Value {
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

    pub(super) fn redis_target() -> Value {
        json!([{"name": "sessions", "store": "cache", "redis": {"keyPattern": "session:*"}}])
    }

    pub(super) fn store(ns: &str, name: &str, spec: Value) -> DataStore {
        serde_json::from_value(json!({
            "apiVersion": API_VERSION,
            "kind": "DataStore",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .expect("test store")
    }

    pub(super) fn cache(ns: &str) -> DataStore {
        store(
            ns,
            "cache",
            json!({"redis": {"url": "redis://:hunter2@redis:6379/0",
                             "passwordSecretRef": {"name": "redis-auth", "key": "password"}}}),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
