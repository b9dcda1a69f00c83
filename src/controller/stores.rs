//! Dereferencing a DataStore into a connection: reads the Secrets it names.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client, ResourceExt};

use super::Error;
use crate::api::datastore::DataStore;
use crate::backends::http::HttpAuth;
use crate::engine::ConnectionSpec;

/// Reads one key of a Secret as UTF-8.
pub async fn secret_value(
    client: &Client,
    namespace: &str,
    name: &str,
    key: &str,
) -> Result<String, Error> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(Error::Kube)?
        .ok_or_else(|| Error::SecretNotFound(name.into()))?;
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

/// Everything needed to connect to the store, from its spec and Secrets.
pub async fn connection_spec(client: &Client, store: &DataStore) -> Result<ConnectionSpec, Error> {
    let namespace = store.namespace().unwrap_or_default();
    if let Some(redis) = &store.spec.redis {
        let password = match &redis.password_secret_ref {
            Some(r) => Some(secret_value(client, &namespace, &r.name, &r.key).await?),
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
            Some(r) => Some(crate::backends::s3::S3Credentials {
                access_key_id: secret_value(client, &namespace, &r.name, "accessKeyId").await?,
                secret_access_key: secret_value(client, &namespace, &r.name, "secretAccessKey")
                    .await?,
                session_token: match secret_value(client, &namespace, &r.name, "sessionToken").await
                {
                    Ok(token) => Some(token),
                    Err(Error::SecretKeyMissing { .. }) => None,
                    Err(e) => return Err(e),
                },
            }),
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
    let optional = |r: Result<String, Error>| match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::SecretKeyMissing { .. }) => Ok(None),
        Err(e) => Err(e),
    };
    let token = optional(secret_value(client, namespace, &secret.name, token_key).await)?;
    if let Some(token) = token {
        return Ok(if token_key == "apiKey" {
            HttpAuth::ApiKey(token)
        } else {
            HttpAuth::Bearer(token)
        });
    }
    let username = optional(secret_value(client, namespace, &secret.name, "username").await)?;
    match username {
        Some(username) => Ok(HttpAuth::Basic {
            username,
            password: secret_value(client, namespace, &secret.name, "password").await?,
        }),
        None => Err(Error::SecretKeyMissing {
            secret: secret.name.clone(),
            key: format!("{token_key} (or username and password)"),
        }),
    }
}
