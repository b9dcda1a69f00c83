//! Redis as a registered store kind: its typed parts and how its DataStore section becomes
//! a connection.

use crate::api::datastore::RedisStore;
use crate::api::retentionpolicy::{RedisSubject, RedisTarget, Target};
use crate::api::StoreKind;
use crate::backends::driver::{Capabilities, MissingKey, SecretKeys, StoreDriver, Transport};
use crate::backends::{Error, Limits};

use super::{RedisBackend, RedisConfig};

pub struct RedisDriver;

impl StoreDriver for RedisDriver {
    const KIND: StoreKind = StoreKind::Redis;
    type Section = RedisStore;
    type Config = RedisConfig;
    type Selector = RedisTarget;
    type Locator = RedisSubject;
    type Cursor = super::RedisCursor;
    type Backend = RedisBackend;

    fn capabilities() -> Capabilities {
        Capabilities {
            verify: true,
            cancel: false,
            exact_dry_run: true,
            record_level_erasure: true,
        }
    }

    crate::store_sections!(Redis);

    fn transport(section: &RedisStore) -> Transport<'_> {
        Transport {
            endpoint: Some(&section.url),
            secret: section
                .password_secret_ref
                .as_ref()
                .map(|s| s.name.as_str()),
            ambient_without_secret: false,
        }
    }

    fn config(
        section: &RedisStore,
        secret: Option<&dyn SecretKeys>,
    ) -> Result<RedisConfig, MissingKey> {
        let password = match (&section.password_secret_ref, secret) {
            (Some(r), Some(secret)) => Some(secret.required(&r.key)?),
            _ => None,
        };
        Ok(RedisConfig {
            url: section.url.clone(),
            password,
            cluster: section.cluster.unwrap_or(false),
        })
    }

    fn connect(config: RedisConfig, limits: Limits) -> RedisBackend {
        RedisBackend::new(config, limits)
    }

    fn validate(
        target: &Target,
        _selector: &RedisTarget,
        _locator: Option<&RedisSubject>,
    ) -> Result<(), Error> {
        super::validate_target(target)
    }

    fn hold_templates(r: &RedisSubject) -> Vec<(String, &str)> {
        let mut templates: Vec<(String, &str)> = Vec::new();
        for (i, k) in r.keys.iter().enumerate() {
            templates.push((format!("subject.redis.keys[{i}]"), k));
        }
        for (i, h) in r.hash_fields.iter().enumerate() {
            templates.push((format!("subject.redis.hashFields[{i}].key"), &h.key));
        }
        for (i, m) in r.set_members.iter().enumerate() {
            templates.push((format!("subject.redis.setMembers[{i}].key"), &m.key));
        }
        templates
    }

    fn describe(section: Option<&RedisStore>, selector: Option<&RedisTarget>) -> Vec<String> {
        let cluster = section.and_then(|r| r.cluster).unwrap_or(false);
        let mut parts = vec![if cluster { "redis cluster" } else { "redis" }.to_string()];
        if let Some(r) = selector {
            parts.push(format!("keys {}", r.key_pattern));
        }
        parts
    }
}
