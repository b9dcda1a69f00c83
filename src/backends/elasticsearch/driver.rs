//! Elasticsearch and OpenSearch as a registered store kind: its typed parts and how its
//! DataStore section becomes a connection.

use crate::api::datastore::ElasticsearchStore;
use crate::api::retentionpolicy::{ElasticsearchSubject, ElasticsearchTarget, Target};
use crate::api::StoreKind;
use crate::backends::driver::{
    http_auth, http_transport, Capabilities, MissingKey, SecretKeys, StoreDriver, Transport,
};
use crate::backends::{Error, Limits};

use super::{ElasticsearchBackend, ElasticsearchConfig};

pub struct ElasticsearchDriver;

impl StoreDriver for ElasticsearchDriver {
    const KIND: StoreKind = StoreKind::Elasticsearch;
    type Section = ElasticsearchStore;
    type Config = ElasticsearchConfig;
    type Selector = ElasticsearchTarget;
    type Locator = ElasticsearchSubject;
    type Cursor = super::Cursor;
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
            r#"v1:elasticsearch:{"a":"logs-2026.01.01","t":"oTUltX4IQMOUUVeiohTt8A:12345","p":3}"#
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

    /// A checkpoint as the version before typed steps wrote it in status (the JSON object
    /// with its keys in alphabetical order) resumes where it was.
    #[test]
    fn cursors_in_status_before_typed_steps_resume() {
        let main = r#"v1:elasticsearch:{"a":"logs-2026.01.01","b":"logs-2026.01.02","d":7,"e":1,"m":"tombstone-1767225600000-0123456789abcdef","n":2,"p":3,"q":true,"s":true,"t":"oTUltX4IQMOUUVeiohTt8A:12345","x":"oTUltX4IQMOUUVeiohTt8A:12344"}"#;
        let Decoded::Resume {
            cursor,
            upgraded: false,
        } = decode_cursor::<ElasticsearchBackend>(Some(main))
        else {
            panic!("{main} does not resume");
        };
        assert_eq!(
            cursor,
            super::super::Cursor {
                after: Some("logs-2026.01.01".into()),
                by_query: true,
                blocking: Some("logs-2026.01.02".into()),
                marker: Some("tombstone-1767225600000-0123456789abcdef".into()),
                task: Some("oTUltX4IQMOUUVeiohTt8A:12345".into()),
                polls: 3,
                errors: 1,
                attempts: 2,
                deleted: 7,
                clean: Some("oTUltX4IQMOUUVeiohTt8A:12344".into()),
                settled: true,
                batch: None,
            }
        );
        assert!(cursor.validate().is_ok());
        let Decoded::Resume { cursor, .. } =
            decode_cursor::<ElasticsearchBackend>(Some("v1:elasticsearch:{}"))
        else {
            panic!("an empty cursor does not resume");
        };
        assert_eq!(cursor, super::super::Cursor::default());
    }
}
