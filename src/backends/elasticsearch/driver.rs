//! Elasticsearch and OpenSearch as a registered store kind: its typed parts and how its
//! DataStore section becomes a connection.

use crate::api::datastore::ElasticsearchStore;
use crate::api::retentionpolicy::{ElasticsearchSubject, ElasticsearchTarget, Target};
use crate::api::StoreKind;
use crate::backends::driver::JsonCursor;
use crate::backends::driver::{
    http_auth, http_transport, Capabilities, MissingKey, SecretKeys, StoreDriver, Transport,
};
use crate::backends::{Error, Limits};

use super::{ElasticsearchBackend, ElasticsearchConfig};

/// How the steps write their cursor ([`super::cursor::Cursor`]) as text; in status it is
/// `v1:elasticsearch:{…}`, and this form is the previous version's there.
pub(super) const TEXT: &str = "es:";

/// The steps' text cursor as the typed one.
pub(super) fn read_back(text: String) -> Result<JsonCursor, Error> {
    JsonCursor::from_text(&text, TEXT).ok_or_else(|| {
        Error::Store("an Elasticsearch step returned a cursor it cannot read back".into())
    })
}

pub struct ElasticsearchDriver;

impl StoreDriver for ElasticsearchDriver {
    const KIND: StoreKind = StoreKind::Elasticsearch;
    type Section = ElasticsearchStore;
    type Config = ElasticsearchConfig;
    type Selector = ElasticsearchTarget;
    type Locator = ElasticsearchSubject;
    type Cursor = JsonCursor;
    type Backend = ElasticsearchBackend;

    fn capabilities() -> Capabilities {
        Capabilities {
            verify: true,
            cancel: true,
            exact_dry_run: true,
            record_level_erasure: true,
        }
    }

    crate::store_sections!(Elasticsearch);

    fn transport(section: &ElasticsearchStore) -> Transport<'_> {
        http_transport(&section.url, section.credentials_secret_ref.as_ref())
    }

    fn config(
        section: &ElasticsearchStore,
        secret: Option<&dyn SecretKeys>,
    ) -> Result<ElasticsearchConfig, MissingKey> {
        Ok(ElasticsearchConfig {
            url: section.url.clone(),
            auth: http_auth(secret, "apiKey")?,
            delete_requests_per_second: section.delete_requests_per_second,
        })
    }

    fn connect(config: ElasticsearchConfig, limits: Limits) -> ElasticsearchBackend {
        ElasticsearchBackend::new(config, limits)
    }

    fn validate(
        target: &Target,
        _selector: &ElasticsearchTarget,
        _locator: Option<&ElasticsearchSubject>,
    ) -> Result<(), Error> {
        super::validate_target(target)
    }

    fn hold_templates(e: &ElasticsearchSubject) -> Vec<(String, &str)> {
        e.term
            .iter()
            .map(|(field, t)| (format!("subject.elasticsearch.term[{field}]"), t.as_str()))
            .collect()
    }

    fn describe(
        _section: Option<&ElasticsearchStore>,
        selector: Option<&ElasticsearchTarget>,
    ) -> Vec<String> {
        let mut parts = vec!["elasticsearch".to_string()];
        if let Some(e) = selector {
            parts.push(format!("index {}", e.index));
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::driver::{decode_cursor, encode_cursor, Decoded};

    #[test]
    fn cursors_of_the_previous_version_resume_in_the_common_format() {
        let old = r#"es:{"a":"logs-2026.01.01","t":"oTUltX4IQMOUUVeiohTt8A:12345","p":3}"#;
        let Decoded::Resume {
            cursor,
            upgraded: true,
        } = decode_cursor::<ElasticsearchBackend>(Some(old))
        else {
            panic!("{old} does not resume");
        };
        let text = encode_cursor::<ElasticsearchBackend>(Some(&cursor));
        assert_eq!(
            text,
            r#"v1:elasticsearch:{"a":"logs-2026.01.01","p":3,"t":"oTUltX4IQMOUUVeiohTt8A:12345"}"#
        );
        assert!(matches!(
            decode_cursor::<ElasticsearchBackend>(Some(&text)),
            Decoded::Resume {
                upgraded: false,
                ..
            }
        ));
        assert!(matches!(
            decode_cursor::<ElasticsearchBackend>(Some("s3:{}")),
            Decoded::Restart(_)
        ));
    }
}
