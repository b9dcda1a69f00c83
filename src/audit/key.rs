//! The digest key, kept in a Secret the operator owns in its own namespace: read it, or
//! create it on first start. Losing that Secret makes every earlier digest unmatchable, so
//! it is created once and never rotated or rewritten here.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use super::digest::{DigestKey, MIN_KEY_LEN};

/// The name of the Secret holding the digest key, in the operator's namespace.
pub const DIGEST_KEY_SECRET: &str = "tombstone-digest-key";

/// The data key of that Secret: the raw key bytes.
pub const DIGEST_KEY_FIELD: &str = "key";

/// Why the digest key cannot be had. Messages name the Secret, never its bytes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading Secret {namespace}/{DIGEST_KEY_SECRET} failed: {source}")]
    Read {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error("creating Secret {namespace}/{DIGEST_KEY_SECRET} failed: {source}")]
    Create {
        namespace: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "Secret {namespace}/{DIGEST_KEY_SECRET} not found (the operator creates it when it \
         starts in that namespace)"
    )]
    NotFound { namespace: String },
    #[error("Secret {namespace}/{DIGEST_KEY_SECRET} is invalid: {problem}")]
    Invalid { namespace: String, problem: String },
    #[error("cannot generate a digest key: {0}")]
    Random(getrandom::Error),
}

impl Error {
    /// A stable PascalCase reason for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Read { .. } | Error::Create { .. } | Error::Random(_) => "DigestKeyUnavailable",
            Error::NotFound { .. } => "DigestKeyNotFound",
            Error::Invalid { .. } => "DigestKeyInvalid",
        }
    }

    /// Whether retrying with backoff may help; an invalid key needs a person to fix it.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Error::Invalid { .. })
    }
}

/// Reads the digest key from Secret [`DIGEST_KEY_SECRET`] in `namespace`; never creates it
/// (for the CLI, and for anything that must not invent a key).
pub async fn load_key(client: &Client, namespace: &str) -> Result<DigestKey, Error> {
    match read(&api(client, namespace), namespace).await? {
        Some(key) => Ok(key),
        None => Err(Error::NotFound {
            namespace: namespace.into(),
        }),
    }
}

/// Reads the digest key from Secret [`DIGEST_KEY_SECRET`] in `namespace`, creating the
/// Secret with a fresh random key if it does not exist. Safe to call from several replicas
/// at once: whoever loses the create race reads the winner's key.
pub async fn load_or_create_key(client: &Client, namespace: &str) -> Result<DigestKey, Error> {
    let secrets = api(client, namespace);
    if let Some(key) = read(&secrets, namespace).await? {
        return Ok(key);
    }
    let key = DigestKey::try_generate().map_err(Error::Random)?;
    let params = PostParams {
        field_manager: Some("tombstone".into()),
        ..Default::default()
    };
    match secrets.create(&params, &key_secret(&key)).await {
        Ok(_) => {
            tracing::info!(
                namespace,
                secret = DIGEST_KEY_SECRET,
                "created the digest key Secret; back it up: without it, earlier digests cannot be matched"
            );
            Ok(key)
        }
        // Another replica (or call) created it first: use its key.
        Err(kube::Error::Api(e)) if e.code == 409 => match read(&secrets, namespace).await? {
            Some(key) => Ok(key),
            None => Err(Error::NotFound {
                namespace: namespace.into(),
            }),
        },
        Err(source) => Err(Error::Create {
            namespace: namespace.into(),
            source,
        }),
    }
}

fn api(client: &Client, namespace: &str) -> Api<Secret> {
    Api::namespaced(client.clone(), namespace)
}

/// The key in the Secret, `None` if the Secret does not exist.
async fn read(secrets: &Api<Secret>, namespace: &str) -> Result<Option<DigestKey>, Error> {
    let secret = secrets
        .get_opt(DIGEST_KEY_SECRET)
        .await
        .map_err(|source| Error::Read {
            namespace: namespace.into(),
            source,
        })?;
    secret
        .map(|secret| {
            key_from_secret(&secret).map_err(|problem| Error::Invalid {
                namespace: namespace.into(),
                problem,
            })
        })
        .transpose()
}

/// The key in a Secret's data, or what is wrong with it (never the bytes themselves).
fn key_from_secret(secret: &Secret) -> Result<DigestKey, String> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(DIGEST_KEY_FIELD))
        .ok_or_else(|| format!("it has no data key `{DIGEST_KEY_FIELD}`"))?;
    DigestKey::from_bytes(&bytes.0).map_err(|e| e.to_string())
}

/// The Secret that holds `key`. Immutable: a changed key would silently stop every held
/// digest from matching; replacing it takes a deliberate delete and create.
fn key_secret(key: &DigestKey) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(DIGEST_KEY_SECRET.into()),
            labels: Some(BTreeMap::from([
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "tombstone".to_string(),
                ),
                (
                    "app.kubernetes.io/name".to_string(),
                    "tombstone".to_string(),
                ),
            ])),
            annotations: Some(BTreeMap::from([(
                "tombstone.dev/description".to_string(),
                format!(
                    "HMAC key of every subject digest; back it up. Without it, digests in \
                     LegalHolds, statuses and receipts can no longer be matched. At least \
                     {MIN_KEY_LEN} random bytes."
                ),
            )])),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        immutable: Some(true),
        data: Some(BTreeMap::from([(
            DIGEST_KEY_FIELD.to_string(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_secret_round_trips_the_key() {
        let key = DigestKey::generate();
        let secret = key_secret(&key);
        assert_eq!(secret.metadata.name.as_deref(), Some(DIGEST_KEY_SECRET));
        assert_eq!(
            secret.metadata.labels.as_ref().unwrap()["app.kubernetes.io/managed-by"],
            "tombstone"
        );
        assert_eq!(secret.immutable, Some(true));
        assert_eq!(key_from_secret(&secret), Ok(key));
    }

    #[test]
    fn invalid_secrets_are_reported_without_their_bytes() {
        let short = Secret {
            data: Some(BTreeMap::from([(
                DIGEST_KEY_FIELD.to_string(),
                ByteString(b"secret-bytes".to_vec()),
            )])),
            ..Default::default()
        };
        let problem = key_from_secret(&short).unwrap_err();
        assert!(problem.contains("12 bytes"), "{problem}");
        assert!(!problem.contains("secret-bytes"), "{problem}");
        let error = Error::Invalid {
            namespace: "ns".into(),
            problem,
        };
        assert_eq!(error.reason(), "DigestKeyInvalid");
        assert!(!error.is_retryable());
        assert!(!error.to_string().contains("secret-bytes"));

        let empty = Secret::default();
        assert!(key_from_secret(&empty).unwrap_err().contains("`key`"));
    }

    #[test]
    fn reasons_are_stable() {
        let missing = Error::NotFound {
            namespace: "ns".into(),
        };
        assert_eq!(missing.reason(), "DigestKeyNotFound");
        assert!(missing.is_retryable());
        assert!(missing.to_string().contains("ns/tombstone-digest-key"));
    }
}
