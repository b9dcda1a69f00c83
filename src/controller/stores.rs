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
use crate::backends::http::HttpAuth;
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

/// An optional key: absent is `None`, anything else wrong is an error.
fn optional_key(secret: &Secret, name: &str, key: &str) -> Result<Option<String>, Error> {
    match secret_key(secret, name, key) {
        Ok(v) => Ok(Some(v)),
        Err(Error::SecretKeyMissing { .. }) => Ok(None),
        Err(e) => Err(e),
    }
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

/// The store's transport (is it plain text?) and where its credentials come from.
fn transport(spec: &DataStoreSpec) -> Option<(bool, CredentialSource)> {
    let from_url = |url: &str, secret: Option<&str>| {
        let source = match secret {
            Some(name) => CredentialSource::Secret(name.to_string()),
            None if url_has_credentials(url) => CredentialSource::Url,
            None => CredentialSource::None,
        };
        (!verified_tls(url), source)
    };
    if let Some(r) = &spec.redis {
        return Some(from_url(
            &r.url,
            r.password_secret_ref.as_ref().map(|s| s.name.as_str()),
        ));
    }
    if let Some(s3) = &spec.s3 {
        // No endpoint: AWS itself, always over HTTPS.
        let plaintext = s3.endpoint.as_deref().is_some_and(|e| !verified_tls(e));
        let source = match &s3.credentials_secret_ref {
            Some(r) => CredentialSource::Secret(r.name.clone()),
            None => CredentialSource::Ambient,
        };
        return Some((plaintext, source));
    }
    if let Some(l) = &spec.loki {
        return Some(from_url(
            &l.url,
            l.credentials_secret_ref.as_ref().map(|s| s.name.as_str()),
        ));
    }
    if let Some(e) = &spec.elasticsearch {
        return Some(from_url(
            &e.url,
            e.credentials_secret_ref.as_ref().map(|s| s.name.as_str()),
        ));
    }
    None
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
    let namespace = store.namespace().unwrap_or_default();
    if let Some(redis) = &store.spec.redis {
        let password = match &redis.password_secret_ref {
            Some(r) => {
                let secret = credentials_secret(client, &namespace, &r.name).await?;
                Some(secret_key(&secret, &r.name, &r.key)?)
            }
            None => None,
        };
        return Ok(ConnectionSpec::Redis(crate::backends::redis::RedisConfig {
            url: redis.url.clone(),
            password,
            cluster: redis.cluster.unwrap_or(false),
        }));
    }
    if let Some(s3) = &store.spec.s3 {
        let credentials = match &s3.credentials_secret_ref {
            Some(r) => {
                let secret = credentials_secret(client, &namespace, &r.name).await?;
                Some(crate::backends::s3::S3Credentials {
                    access_key_id: secret_key(&secret, &r.name, "accessKeyId")?,
                    secret_access_key: secret_key(&secret, &r.name, "secretAccessKey")?,
                    session_token: optional_key(&secret, &r.name, "sessionToken")?,
                })
            }
            None => None,
        };
        return Ok(ConnectionSpec::S3(crate::backends::s3::S3Config {
            bucket: s3.bucket.clone(),
            region: s3.region.clone(),
            endpoint: s3.endpoint.clone(),
            force_path_style: s3.force_path_style.unwrap_or(false),
            credentials,
        }));
    }
    if let Some(loki) = &store.spec.loki {
        let auth = http_auth(
            client,
            &namespace,
            loki.credentials_secret_ref.as_ref(),
            "token",
        )
        .await?;
        return Ok(ConnectionSpec::Loki(crate::backends::loki::LokiConfig {
            url: loki.url.clone(),
            tenant: loki.tenant.clone(),
            auth,
            resubmit_after: loki
                .resubmit_after
                .map_or(crate::backends::loki::DEFAULT_RESUBMIT_AFTER, |d| {
                    std::time::Duration::from_secs(d.as_secs())
                }),
        }));
    }
    if let Some(es) = &store.spec.elasticsearch {
        let auth = http_auth(
            client,
            &namespace,
            es.credentials_secret_ref.as_ref(),
            "apiKey",
        )
        .await?;
        return Ok(ConnectionSpec::Elasticsearch(
            crate::backends::elasticsearch::ElasticsearchConfig {
                url: es.url.clone(),
                auth,
                delete_requests_per_second: es.delete_requests_per_second,
            },
        ));
    }
    Err(Error::InvalidSpec(
        "exactly one of redis, s3, loki, elasticsearch must be set".into(),
    ))
}

/// Credentials for an HTTP store: `username` and `password`, or the single `token_key`
/// (`token` for Loki, `apiKey` for Elasticsearch); no Secret, no credentials.
async fn http_auth(
    client: &Client,
    namespace: &str,
    secret: Option<&crate::api::common::SecretRef>,
    token_key: &str,
) -> Result<HttpAuth, Error> {
    let Some(secret) = secret else {
        return Ok(HttpAuth::None);
    };
    let name = secret.name.as_str();
    let secret = credentials_secret(client, namespace, name).await?;
    if let Some(token) = optional_key(&secret, name, token_key)? {
        return Ok(if token_key == "apiKey" {
            HttpAuth::ApiKey(token)
        } else {
            HttpAuth::Bearer(token)
        });
    }
    match optional_key(&secret, name, "username")? {
        Some(username) => Ok(HttpAuth::Basic {
            username,
            password: secret_key(&secret, name, "password")?,
        }),
        None => Err(Error::SecretKeyMissing {
            secret: name.to_string(),
            key: format!("{token_key} (or username and password)"),
        }),
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
