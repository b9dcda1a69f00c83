//! Loki as a registered store kind: its typed parts and how its DataStore section becomes a
//! connection.

use crate::api::datastore::LokiStore;
use crate::api::retentionpolicy::{LokiSubject, LokiTarget, Target};
use crate::api::StoreKind;
use crate::backends::driver::{
    http_auth, http_transport, Capabilities, MissingKey, SecretKeys, StoreDriver, Transport,
};
use crate::backends::{Error, Limits};

use super::{LokiBackend, LokiConfig, DEFAULT_RESUBMIT_AFTER};

pub struct LokiDriver;

impl StoreDriver for LokiDriver {
    const KIND: StoreKind = StoreKind::Loki;
    type Section = LokiStore;
    type Config = LokiConfig;
    type Selector = LokiTarget;
    type Locator = LokiSubject;
    type Cursor = super::Cursor;
    type Backend = LokiBackend;

    fn capabilities() -> Capabilities {
        Capabilities {
            verify: true,
            cancel: true,
            // Lines still in the ingesters are counted but not yet deletable.
            exact_dry_run: false,
            record_level_erasure: true,
        }
    }

    crate::store_sections!(Loki);

    fn transport(section: &LokiStore) -> Transport<'_> {
        http_transport(&section.url, section.credentials_secret_ref.as_ref())
    }

    fn config(
        section: &LokiStore,
        secret: Option<&dyn SecretKeys>,
    ) -> Result<LokiConfig, MissingKey> {
        Ok(LokiConfig {
            url: section.url.clone(),
            tenant: section.tenant.clone(),
            auth: http_auth(secret, "token")?,
            resubmit_after: section.resubmit_after.map_or(DEFAULT_RESUBMIT_AFTER, |d| {
                std::time::Duration::from_secs(d.as_secs())
            }),
        })
    }

    fn connect(config: LokiConfig, limits: Limits) -> LokiBackend {
        LokiBackend::new(config, limits)
    }

    fn validate(
        target: &Target,
        _selector: &LokiTarget,
        _locator: Option<&LokiSubject>,
    ) -> Result<(), Error> {
        super::validate_target(target)
    }

    fn hold_templates(l: &LokiSubject) -> Vec<(String, &str)> {
        vec![("subject.loki.lineFilter".into(), &l.line_filter)]
    }

    fn describe(section: Option<&LokiStore>, selector: Option<&LokiTarget>) -> Vec<String> {
        let mut head = "loki".to_string();
        if let Some(tenant) = section.and_then(|l| l.tenant.as_ref()) {
            head.push_str(&format!(" tenant {tenant}"));
        }
        let mut parts = vec![head];
        if let Some(l) = selector {
            parts.push(format!("streams {}", l.selector));
        }
        parts
    }
}
