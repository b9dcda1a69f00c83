//! `kubectl tombstone erase`: files one data subject's erasure request with its identifiers
//! Secret, and prints what the operator made of it (subject digest and deadline).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};

use super::{api_error, generated_name, Error};
use crate::api::common::{SecretRef, Timestamp};
use crate::api::erasurerequest::{
    ErasureGround, ErasurePhase, ErasureRequestSpec, RequestScope, Subject,
    SUBJECT_IDENTIFIERS_LABEL,
};
use crate::api::ErasureRequest;

/// What to file.
#[derive(Clone, Debug)]
pub struct EraseOptions {
    pub namespace: String,
    /// The request's name; a generated `erasure-…` one when None.
    pub name: Option<String>,
    pub ground: ErasureGround,
    pub reference: Option<String>,
    pub policies: Option<Vec<String>>,
    pub dry_run: bool,
    /// Search every namespace (the request and its Secret go into `namespace`, which must be
    /// the operator's).
    pub cluster_wide: bool,
    /// How long to wait for the operator's digest and deadline; zero: do not wait.
    pub wait: Duration,
}

/// What was filed, and what the operator made of it when it answered in time.
#[derive(Clone, Debug, PartialEq)]
pub struct Filed {
    pub namespace: String,
    pub name: String,
    pub secret: String,
    pub subject_digest: Option<String>,
    pub deadline: Option<Timestamp>,
    pub phase: Option<ErasurePhase>,
}

impl std::fmt::Display for Filed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "erasurerequest {}/{} filed (identifiers in Secret {}, deleted once erased)",
            self.namespace, self.name, self.secret
        )?;
        if let Some(digest) = &self.subject_digest {
            writeln!(f, "subject digest: {digest}")?;
        }
        if let Some(deadline) = &self.deadline {
            writeln!(
                f,
                "deadline:       {deadline} (Art. 12(3): one month after receipt)"
            )?;
        }
        if let Some(phase) = &self.phase {
            writeln!(f, "phase:          {}", phase.as_str())?;
        }
        Ok(())
    }
}

/// Creates the labelled identifiers Secret, then the request naming it, and makes the
/// request the Secret's owner (so the Secret goes with the request). If the request cannot
/// be created, the Secret is deleted again: identifiers never linger on their own.
pub async fn erase(
    client: &Client,
    options: &EraseOptions,
    identifiers: &BTreeMap<String, String>,
) -> Result<Filed, Error> {
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| generated_name("erasure"));
    let secret_name = format!("{name}-identifiers");
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &options.namespace);
    let requests: Api<ErasureRequest> = Api::namespaced(client.clone(), &options.namespace);

    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(secret_name.clone()),
            labels: Some(BTreeMap::from([
                (SUBJECT_IDENTIFIERS_LABEL.to_string(), "true".to_string()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "kubectl-tombstone".to_string(),
                ),
            ])),
            ..Default::default()
        },
        string_data: Some(identifiers.clone()),
        type_: Some("Opaque".into()),
        ..Default::default()
    };
    secrets
        .create(&PostParams::default(), &secret)
        .await
        .map_err(api_error("create the identifiers Secret"))?;

    let request = ErasureRequest::new(
        &name,
        ErasureRequestSpec {
            subject: Subject {
                secret_ref: Some(SecretRef {
                    name: secret_name.clone(),
                }),
                identifiers: None,
            },
            reason: options.ground,
            received_at: None,
            policies: options.policies.clone(),
            dry_run: options.dry_run,
            reference: options.reference.clone(),
            retain_subject_secret: false,
            scope: options.cluster_wide.then_some(RequestScope::Cluster),
        },
    );
    let created = match requests.create(&PostParams::default(), &request).await {
        Ok(created) => created,
        Err(source) => {
            // Best effort: a Secret left behind would hold identifiers for nothing.
            let _ = secrets.delete(&secret_name, &DeleteParams::default()).await;
            return Err(Error::Api {
                action: "create the erasure request",
                source,
            });
        }
    };
    if let Some(owner) = owner_reference(&created) {
        let patch = serde_json::json!({"metadata": {"ownerReferences": [owner]}});
        secrets
            .patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(api_error("make the request own its identifiers Secret"))?;
    }

    let mut filed = Filed {
        namespace: options.namespace.clone(),
        name: name.clone(),
        secret: secret_name,
        subject_digest: None,
        deadline: None,
        phase: None,
    };
    if options.wait.is_zero() {
        return Ok(filed);
    }
    let answered = |r: Option<&ErasureRequest>| {
        r.and_then(|r| r.status.as_ref())
            .is_some_and(|s| s.subject_digest.is_some() && s.deadline.is_some())
    };
    let waited = tokio::time::timeout(
        options.wait,
        kube::runtime::wait::await_condition(requests, &name, answered),
    )
    .await;
    match waited {
        Ok(Ok(Some(request))) => {
            if let Some(status) = request.status {
                filed.subject_digest = status.subject_digest;
                filed.deadline = status.deadline;
                filed.phase = Some(status.phase);
            }
            Ok(filed)
        }
        _ => Err(Error::NotPickedUp {
            namespace: options.namespace.clone(),
            name,
            seconds: options.wait.as_secs(),
        }),
    }
}

fn owner_reference(request: &ErasureRequest) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: ErasureRequest::api_version(&()).into_owned(),
        kind: ErasureRequest::kind(&()).into_owned(),
        name: request.metadata.name.clone()?,
        uid: request.metadata.uid.clone()?,
        ..Default::default()
    })
}
