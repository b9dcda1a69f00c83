//! Dereferencing a DataStore into a connection: reads the Secrets it names, after checking
//! that the operator may send credentials there at all.
//!
//! The trust model: a DataStore can name any host, so the operator is careful not to be a
//! deputy that carries credentials somewhere they do not belong. It reads a Secret as store
//! credentials only when the Secret says so (the label [`CREDENTIALS_LABEL`]), sends them in
//! plain text only when the DataStore says `insecure: true`, and lends its own cloud identity
//! to S3 DataStores without a Secret only when the operator was started to allow it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::{Error, Settings};
use crate::api::datastore::{DataStore, DataStoreSpec};
use crate::backends::driver::{MissingKey, SecretKeys};
use crate::backends::registry;
use crate::engine::ConnectionSpec;

/// A Secret is read as store credentials only if it carries this label with the value
/// `"true"`: whoever can create a DataStore cannot send another team's password elsewhere.
pub const CREDENTIALS_LABEL: &str = "tombstone.dev/credentials";

/// A Secret the DataStore names, read only if it is marked as store credentials.
async fn credentials_secret(client: &Client, namespace: &str, name: &str) -> Result<Secret, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(Error::Kube)?
        .ok_or_else(|| Error::SecretNotFound(name.into()))?;
    check_credentials_label(name, secret.metadata.labels.as_ref())?;
    Ok(secret)
}

/// Whether a Secret's labels mark it as store credentials (pure).
pub fn check_credentials_label(
    name: &str,
    labels: Option<&BTreeMap<String, String>>,
) -> Result<(), Error> {
    match labels.and_then(|l| l.get(CREDENTIALS_LABEL)) {
        Some(value) if value == "true" => Ok(()),
        _ => Err(Error::CredentialsNotPermitted(name.into())),
    }
}

/// One key of a Secret already read, as UTF-8 (pure).
fn secret_key(secret: &Secret, name: &str, key: &str) -> Result<String, Error> {
    let missing = || Error::SecretKeyMissing {
        secret: name.into(),
        key: key.into(),
    };
    if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) {
        return String::from_utf8(bytes.0.clone()).map_err(|_| missing());
    }
    secret
        .string_data
        .as_ref()
        .and_then(|d| d.get(key))
        .cloned()
        .ok_or_else(missing)
}

/// What carries a store's credentials, from its spec alone.
#[derive(Clone, Debug, PartialEq, Eq)]
enum CredentialSource {
    None,
    /// A Secret the DataStore names.
    Secret(String),
    /// A user or password written into the URL itself.
    Url,
    /// The operator's own cloud identity (the default AWS credential chain).
    Ambient,
}

/// Whether `url` uses TLS with a verified certificate: `https://`, or `rediss://` without
/// the Redis client's `#insecure` fragment. Anything else (or anything unparsable) is
/// treated as plain text.
fn verified_tls(url: &str) -> bool {
    match url::Url::parse(url) {
        Ok(u) => match u.scheme() {
            "https" => true,
            "rediss" => u.fragment() != Some("insecure"),
            _ => false,
        },
        Err(_) => false,
    }
}

fn url_has_credentials(url: &str) -> bool {
    url::Url::parse(url).is_ok_and(|u| !u.username().is_empty() || u.password().is_some())
}

/// The store's transport (is it plain text?) and where its credentials come from, from what
/// its kind's driver says of its section.
fn transport(spec: &DataStoreSpec) -> Option<(bool, CredentialSource)> {
    let t = registry::for_store(spec)?.transport(spec)?;
    let source = match (t.secret, t.endpoint) {
        (Some(name), _) => CredentialSource::Secret(name.to_string()),
        (None, _) if t.ambient_without_secret => CredentialSource::Ambient,
        (None, Some(url)) if url_has_credentials(url) => CredentialSource::Url,
        (None, _) => CredentialSource::None,
    };
    // No endpoint: the provider's own, always over HTTPS.
    let plaintext = t.endpoint.is_some_and(|url| !verified_tls(url));
    Some((plaintext, source))
}

/// Whether the operator may send this store's credentials where its spec says, before any
/// Secret is read (pure): ambient cloud credentials only if the operator allows them, and
/// credentials in plain text only with `insecure: true`.
pub fn check_transport(spec: &DataStoreSpec, allow_ambient_credentials: bool) -> Result<(), Error> {
    let Some((plaintext, source)) = transport(spec) else {
        return Ok(());
    };
    if source == CredentialSource::Ambient && !allow_ambient_credentials {
        return Err(Error::AmbientCredentialsNotAllowed(
            "no credentialsSecretRef, and this operator does not lend its own cloud identity \
             to DataStores (start it with --allow-ambient-credentials, Helm value \
             allowAmbientCredentials: true, to allow it)"
                .into(),
        ));
    }
    if plaintext && spec.insecure != Some(true) {
        let what = match &source {
            CredentialSource::None => return Ok(()),
            CredentialSource::Secret(name) => format!("the credentials from Secret {name}"),
            CredentialSource::Url => "the credentials in the URL".to_string(),
            CredentialSource::Ambient => "requests signed with the operator's identity".into(),
        };
        return Err(Error::InsecureTransport(format!(
            "{what} would be sent without TLS: use rediss:// or https://, or set \
             insecure: true to accept plain text"
        )));
    }
    Ok(())
}

/// Whether the operator sends this store's credentials in plain text, as its spec allows
/// with `insecure: true` (pure; shown in status).
pub fn sends_plaintext_credentials(spec: &DataStoreSpec) -> bool {
    spec.insecure == Some(true)
        && transport(spec)
            .is_some_and(|(plaintext, source)| plaintext && source != CredentialSource::None)
}

/// Everything needed to connect to the store, from its spec and Secrets. Refuses, before
/// reading any Secret, what [`check_transport`] refuses, and reads only Secrets marked
/// with [`CREDENTIALS_LABEL`].
pub async fn connection_spec(
    client: &Client,
    store: &DataStore,
    settings: &Settings,
) -> Result<ConnectionSpec, Error> {
    check_transport(&store.spec, settings.allow_ambient_credentials)?;
    let exactly_one = || {
        Error::InvalidSpec(format!(
            "exactly one of {} must be set",
            registry::names("or")
        ))
    };
    let driver = registry::for_store(&store.spec).ok_or_else(exactly_one)?;
    let namespace = store.namespace().unwrap_or_default();
    let secret_name = driver
        .transport(&store.spec)
        .and_then(|t| t.secret.map(str::to_string));
    let secret = match &secret_name {
        Some(name) => Some(credentials_secret(client, &namespace, name).await?),
        None => None,
    };
    let keys = secret
        .as_ref()
        .zip(secret_name.as_deref())
        .map(|(secret, name)| ReadSecret { secret, name });
    driver
        .connection(&store.spec, keys.as_ref().map(|k| k as &dyn SecretKeys))
        .ok_or_else(exactly_one)?
        .map_err(|MissingKey(key)| Error::SecretKeyMissing {
            secret: secret_name.unwrap_or_default(),
            key,
        })
}

/// A Secret already read, as its store's driver reads it.
struct ReadSecret<'a> {
    secret: &'a Secret,
    name: &'a str,
}

impl SecretKeys for ReadSecret<'_> {
    fn get(&self, key: &str) -> Option<String> {
        secret_key(self.secret, self.name, key).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(value: serde_json::Value) -> DataStoreSpec {
        serde_json::from_value(value).expect("a DataStore spec")
    }

    fn reason(spec: &DataStoreSpec, allow_ambient: bool) -> Option<&'static str> {
        check_transport(spec, allow_ambient)
            .err()
            .map(|e| e.reason())
    }

    #[test]
    fn credentials_in_plain_text_need_insecure() {
        for (s, plain) in [
            (
                json!({"redis": {"url": "redis://r:6379", "passwordSecretRef": {"name": "a", "key": "p"}}}),
                true,
            ),
            (json!({"redis": {"url": "redis://:pw@r:6379"}}), true),
            (
                json!({"redis": {"url": "rediss://r:6379#insecure", "passwordSecretRef": {"name": "a", "key": "p"}}}),
                true,
            ),
            (
                json!({"loki": {"url": "http://loki:3100", "credentialsSecretRef": {"name": "a"}}}),
                true,
            ),
            (
                json!({"elasticsearch": {"url": "http://elastic:pw@es:9200"}}),
                true,
            ),
            (
                json!({"elasticsearch": {"url": "HTTP://es:9200", "credentialsSecretRef": {"name": "a"}}}),
                true,
            ),
            (
                json!({"s3": {"bucket": "bkt", "endpoint": "http://minio:9000", "credentialsSecretRef": {"name": "a"}}}),
                true,
            ),
            (
                json!({"redis": {"url": "rediss://r:6379", "passwordSecretRef": {"name": "a", "key": "p"}}}),
                false,
            ),
            (
                json!({"loki": {"url": "https://loki", "credentialsSecretRef": {"name": "a"}}}),
                false,
            ),
            (
                json!({"s3": {"bucket": "bkt", "endpoint": "https://minio:9000", "credentialsSecretRef": {"name": "a"}}}),
                false,
            ),
            (
                json!({"s3": {"bucket": "bkt", "credentialsSecretRef": {"name": "a"}}}),
                false,
            ),
        ] {
            let mut sp = spec(s.clone());
            let expected = plain.then_some("InsecureTransport");
            assert_eq!(reason(&sp, false), expected, "{s}");
            assert!(!sends_plaintext_credentials(&sp), "{s}");
            sp.insecure = Some(true);
            assert_eq!(reason(&sp, false), None, "{s}");
            assert_eq!(sends_plaintext_credentials(&sp), plain, "{s}");
        }
    }

    #[test]
    fn no_credentials_need_no_tls() {
        for s in [
            json!({"redis": {"url": "redis://r:6379"}}),
            json!({"loki": {"url": "http://loki:3100"}}),
            json!({"elasticsearch": {"url": "http://es:9200"}}),
        ] {
            let mut sp = spec(s.clone());
            assert_eq!(reason(&sp, false), None, "{s}");
            sp.insecure = Some(true);
            assert!(!sends_plaintext_credentials(&sp), "{s}");
        }
    }

    #[test]
    fn the_operators_own_identity_only_when_allowed() {
        let ambient = spec(json!({"s3": {"bucket": "bkt"}}));
        assert_eq!(
            reason(&ambient, false),
            Some("AmbientCredentialsNotAllowed")
        );
        assert_eq!(reason(&ambient, true), None);
        // Signed with the operator's identity over plain HTTP: also needs insecure.
        let mut plain = spec(json!({"s3": {"bucket": "bkt", "endpoint": "http://minio:9000"}}));
        assert_eq!(reason(&plain, false), Some("AmbientCredentialsNotAllowed"));
        assert_eq!(reason(&plain, true), Some("InsecureTransport"));
        plain.insecure = Some(true);
        assert_eq!(reason(&plain, true), None);
        assert!(sends_plaintext_credentials(&plain));
    }

    #[test]
    fn only_secrets_labelled_as_credentials_are_read() {
        let labels = |v: &str| BTreeMap::from([(CREDENTIALS_LABEL.to_string(), v.to_string())]);
        assert!(check_credentials_label("a", Some(&labels("true"))).is_ok());
        for l in [
            None,
            Some(labels("false")),
            Some(labels("yes")),
            Some(BTreeMap::new()),
        ] {
            let e = check_credentials_label("team-db", l.as_ref()).unwrap_err();
            assert_eq!(e.reason(), "CredentialsNotPermitted");
            let message = e.to_string();
            assert!(message.contains("team-db"), "{message}");
            assert!(message.contains(CREDENTIALS_LABEL), "{message}");
        }
    }
}
