//! S3 as a registered store kind: its typed parts and how its DataStore section becomes a
//! connection.

use crate::api::datastore::S3Store;
use crate::api::retentionpolicy::{S3Subject, S3Target, Target};
use crate::api::StoreKind;
use crate::backends::driver::{Capabilities, MissingKey, SecretKeys, StoreDriver, Transport};
use crate::backends::{Error, Limits};

use super::{S3Backend, S3Config, S3Credentials};

/// Where an S3 job resumes: a sweep's listing position, an erasure's or a batch's (`v1:s3:{"sweep":{…}}`
/// in status; `s3:{…}` and `s3-subject:{…}` in the previous version's status).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum S3Cursor {
    Sweep(super::SweepCursor),
    Subject(super::SubjectCursor),
    /// Many subjects in one pass (`v1:s3:{"batch":{…}}`).
    Batch(super::BatchCursor),
}

pub struct S3Driver;

impl StoreDriver for S3Driver {
    const KIND: StoreKind = StoreKind::S3;
    type Section = S3Store;
    type Config = S3Config;
    type Selector = S3Target;
    type Locator = S3Subject;
    type Cursor = S3Cursor;
    type Backend = S3Backend;

    fn capabilities() -> Capabilities {
        Capabilities {
            verify: true,
            cancel: false,
            exact_dry_run: true,
            record_level_erasure: true,
        }
    }

    crate::store_sections!(S3);

    fn transport(section: &S3Store) -> Transport<'_> {
        Transport {
            endpoint: section.endpoint.as_deref(),
            secret: section
                .credentials_secret_ref
                .as_ref()
                .map(|s| s.name.as_str()),
            ambient_without_secret: true,
        }
    }

    fn config(section: &S3Store, secret: Option<&dyn SecretKeys>) -> Result<S3Config, MissingKey> {
        let credentials = match (&section.credentials_secret_ref, secret) {
            (Some(_), Some(secret)) => Some(S3Credentials {
                access_key_id: secret.required("accessKeyId")?,
                secret_access_key: secret.required("secretAccessKey")?,
                session_token: secret.get("sessionToken"),
            }),
            _ => None,
        };
        Ok(S3Config {
            bucket: section.bucket.clone(),
            region: section.region.clone(),
            endpoint: section.endpoint.clone(),
            force_path_style: section.force_path_style.unwrap_or(false),
            credentials,
        })
    }

    fn connect(config: S3Config, limits: Limits) -> S3Backend {
        S3Backend::new(config, limits)
    }

    fn validate(
        target: &Target,
        _selector: &S3Target,
        _locator: Option<&S3Subject>,
    ) -> Result<(), Error> {
        super::validate_target(target)
    }

    fn hold_templates(s: &S3Subject) -> Vec<(String, &str)> {
        let mut templates: Vec<(String, &str)> = Vec::new();
        for (i, p) in s.key_prefixes.iter().enumerate() {
            templates.push((format!("subject.s3.keyPrefixes[{i}]"), p));
        }
        if let Some(r) = &s.records {
            templates.push(("subject.s3.records.prefix".into(), &r.prefix));
            templates.push(("subject.s3.records.equals".into(), &r.equals));
        }
        templates
    }

    fn describe(section: Option<&S3Store>, selector: Option<&S3Target>) -> Vec<String> {
        let mut head = "s3".to_string();
        if let Some(s3) = section {
            head.push_str(&format!(" bucket {}", s3.bucket));
            if let Some(region) = &s3.region {
                head.push_str(&format!(" in {region}"));
            }
        }
        let mut parts = vec![head];
        if let Some(prefix) = selector.map(|t| &t.prefix) {
            if !prefix.is_empty() {
                parts.push(format!("prefix {prefix}"));
            }
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
        let old = r#"s3:{"t":"token-1","v":true}"#;
        let Decoded::Resume {
            cursor,
            upgraded: true,
        } = decode_cursor::<S3Backend>(Some(old))
        else {
            panic!("{old} does not resume");
        };
        let text = encode_cursor::<S3Backend>(Some(&cursor));
        assert_eq!(text, r#"v1:s3:{"sweep":{"v":true,"t":"token-1"}}"#);
        assert!(matches!(
            decode_cursor::<S3Backend>(Some(&text)),
            Decoded::Resume {
                upgraded: false,
                ..
            }
        ));
        let old = r#"s3-subject:{"a":"e","p":1,"u":2}"#;
        let Decoded::Resume {
            cursor,
            upgraded: true,
        } = decode_cursor::<S3Backend>(Some(old))
        else {
            panic!("{old} does not resume");
        };
        let text = encode_cursor::<S3Backend>(Some(&cursor));
        assert_eq!(
            text,
            r#"v1:s3:{"subject":{"a":"e","p":1,"u":2,"sv":0,"sm":0,"c":0,"b":0,"m":0,"ul":0,"uo":0}}"#
        );
        assert!(matches!(
            decode_cursor::<S3Backend>(Some(&text)),
            Decoded::Resume {
                upgraded: false,
                ..
            }
        ));
        assert!(matches!(
            decode_cursor::<S3Backend>(Some("es:{}")),
            Decoded::Restart(_)
        ));
        // A batch's cursor is a variant of its own beside them.
        let batch = r#"v1:s3:{"batch":{"a":"e","p":1,"at":"5f0c","u":0,"sv":2,"sm":0,"j":{"r":"0a1b","q":3}}}"#;
        let Decoded::Resume {
            cursor: cursor @ S3Cursor::Batch(_),
            upgraded: false,
        } = decode_cursor::<S3Backend>(Some(batch))
        else {
            panic!("{batch} does not resume");
        };
        assert_eq!(encode_cursor::<S3Backend>(Some(&cursor)), batch);
    }

    /// Checkpoints as the version before typed steps wrote them in status (each JSON object
    /// with its keys in alphabetical order) resume with nothing lost: read and written
    /// again, they are the same JSON.
    #[test]
    fn cursors_in_status_before_typed_steps_resume() {
        for (main, sweep) in [
            (
                r#"v1:s3:{"sweep":{"c":{"k":"logs/a","m":["m1","m2"],"p":"v0","s":true},"i":"v1","j":{"q":7,"r":"0a1b","z":true},"k":"logs/a","t":"token-1","v":true}}"#,
                true,
            ),
            (
                r#"v1:s3:{"subject":{"a":"e","b":1,"c":90,"j":{"q":2,"r":"0c0d"},"k":["3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"],"m":3,"p":1,"r":"0a1b","sm":4,"sv":12,"u":1,"ul":5,"uo":6}}"#,
                false,
            ),
        ] {
            let Decoded::Resume {
                cursor,
                upgraded: false,
            } = decode_cursor::<S3Backend>(Some(main))
            else {
                panic!("{main} does not resume");
            };
            assert_eq!(matches!(cursor, S3Cursor::Sweep(_)), sweep, "{main}");
            if let S3Cursor::Subject(p) = &cursor {
                assert!(p.validate().is_ok());
            }
            let json = |text: &str| -> serde_json::Value {
                serde_json::from_str(text.strip_prefix("v1:s3:").unwrap()).unwrap()
            };
            assert_eq!(
                json(&encode_cursor::<S3Backend>(Some(&cursor))),
                json(main),
                "{main}"
            );
        }
    }
}
