//! `kubectl tombstone hold`: puts a data subject under a LegalHold by digest, so their
//! erasure waits (Art. 17(3)(e): the establishment, exercise or defence of legal claims).

use std::collections::BTreeMap;

use kube::api::PostParams;
use kube::{Api, Client};

use super::{api_error, generated_name, Error};
use crate::api::common::Timestamp;
use crate::api::legalhold::{HeldSubject, LegalHoldSpec};
use crate::api::LegalHold;
use crate::audit::{identifier_digest, DigestKey};

/// What to hold.
#[derive(Clone, Debug)]
pub struct HoldOptions {
    pub namespace: String,
    pub name: Option<String>,
    pub reason: String,
    /// Hold the subject only in these policies' datasets; default: in all of the namespace.
    pub policies: Option<Vec<String>>,
    pub expires_at: Option<Timestamp>,
}

/// Checks that each digest has the form `tombstone digest` and `erase` print.
pub fn check_digests(digests: &[String]) -> Result<(), Error> {
    for digest in digests {
        let hex = digest.strip_prefix("hmac-sha256:").unwrap_or_default();
        if hex.len() != 64
            || !hex
                .chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
        {
            return Err(Error::NotADigest(digest.clone()));
        }
    }
    Ok(())
}

/// The digest of each identifier, as a hold matches them (any one of a subject's
/// identifier digests, or their subject digest, holds the subject).
pub fn digests_of(key: &DigestKey, identifiers: &BTreeMap<String, String>) -> Vec<String> {
    identifiers
        .iter()
        .map(|(id_type, value)| identifier_digest(key, id_type, value))
        .collect()
}

/// Creates the LegalHold; returns its name.
pub async fn hold(
    client: &Client,
    options: &HoldOptions,
    digests: &[String],
) -> Result<String, Error> {
    check_digests(digests)?;
    let name = options
        .name
        .clone()
        .unwrap_or_else(|| generated_name("hold"));
    let hold = LegalHold::new(
        &name,
        LegalHoldSpec {
            reason: options.reason.clone(),
            policies: options.policies.clone(),
            subjects: Some(
                digests
                    .iter()
                    .map(|d| HeldSubject {
                        secret_ref: None,
                        digest: Some(d.clone()),
                    })
                    .collect(),
            ),
            expires_at: options.expires_at,
        },
    );
    Api::<LegalHold>::namespaced(client.clone(), &options.namespace)
        .create(&PostParams::default(), &hold)
        .await
        .map_err(api_error("create the LegalHold"))?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_digests_in_the_printed_form_are_taken() {
        let good = format!("hmac-sha256:{}", "0a".repeat(32));
        assert!(check_digests(std::slice::from_ref(&good)).is_ok());
        for bad in [
            "alice@example.org".to_string(),
            format!("sha256:{}", "0a".repeat(32)),
            format!("hmac-sha256:{}", "0A".repeat(32)),
            format!("hmac-sha256:{}", "0a".repeat(31)),
        ] {
            assert_eq!(check_digests(&[bad]).unwrap_err().reason(), "NotADigest");
        }
    }

    #[test]
    fn every_identifier_gets_its_digest() {
        let key = DigestKey::from_bytes(&[7u8; 32]).unwrap();
        let ids = BTreeMap::from([
            ("email".to_string(), "Alice@Example.org".to_string()),
            ("userId".to_string(), "4711".to_string()),
        ]);
        let digests = digests_of(&key, &ids);
        assert_eq!(digests.len(), 2);
        assert_eq!(
            digests[0],
            identifier_digest(&key, "email", "alice@example.org")
        );
        assert!(check_digests(&digests).is_ok());
    }
}
