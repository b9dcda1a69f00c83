//! Keyed digests of data subjects: how a subject is named in status, events, logs, metrics,
//! receipts and LegalHolds without its identifiers ever being stored (invariant 5).
//!
//! A digest is `hmac-sha256:` + lowercase hex of HMAC-SHA256 over the canonical identifier
//! (`type=value`), keyed by the operator's [`DigestKey`]. Without the key, a digest cannot be
//! checked against guessed identifiers (emails are easy to enumerate; a plain hash would
//! not protect them). Pure: no I/O here; the key is loaded by [`super::key`].

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The prefix of every digest, naming the algorithm.
pub const DIGEST_PREFIX: &str = "hmac-sha256:";

/// The fewest key bytes accepted (and the number [`DigestKey::generate`] makes).
pub const MIN_KEY_LEN: usize = 32;

/// The secret key of every digest. `Debug` shows only the length, never the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct DigestKey(Vec<u8>);

/// A key shorter than [`MIN_KEY_LEN`] bytes. Carries only the length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the digest key is {len} bytes; at least {MIN_KEY_LEN} are required")]
pub struct KeyTooShort {
    pub len: usize,
}

impl DigestKey {
    /// A key from raw bytes (at least [`MIN_KEY_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyTooShort> {
        if bytes.len() < MIN_KEY_LEN {
            return Err(KeyTooShort { len: bytes.len() });
        }
        Ok(Self(bytes.to_vec()))
    }

    /// A fresh key of [`MIN_KEY_LEN`] bytes from the operating system's random source.
    ///
    /// # Panics
    /// If the operating system cannot provide random bytes; see [`Self::try_generate`].
    pub fn generate() -> Self {
        Self::try_generate().expect("the operating system's random source failed")
    }

    /// A fresh key of [`MIN_KEY_LEN`] bytes, or the random source's error.
    pub fn try_generate() -> Result<Self, getrandom::Error> {
        let mut bytes = vec![0u8; MIN_KEY_LEN];
        getrandom::fill(&mut bytes)?;
        Ok(Self(bytes))
    }

    /// The raw key bytes, to store the key. Never log them.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn digest(&self, message: &[u8]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes a key of any length");
        mac.update(message);
        format!(
            "{DIGEST_PREFIX}{}",
            hex::encode(mac.finalize().into_bytes())
        )
    }
}

impl fmt::Debug for DigestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DigestKey(<redacted, {} bytes>)", self.0.len())
    }
}

/// `type=value` with the value in the canonical form every store query also uses
/// ([`crate::backends::identifier::canonical`]): trimmed, and for e-mail types (`email`,
/// `workEmail`, …) also lower-cased. The type is kept as given (types are Secret keys such as
/// `email` or `userId`).
pub fn canonical_identifier(id_type: &str, value: &str) -> String {
    format!(
        "{id_type}={}",
        crate::backends::identifier::canonical(id_type, value)
    )
}

/// The digest of one identifier: what `tombstone digest TYPE VALUE` prints and what a
/// LegalHold's `subjects[].digest` holds.
pub fn identifier_digest(key: &DigestKey, id_type: &str, value: &str) -> String {
    key.digest(canonical_identifier(id_type, value).as_bytes())
}

/// The digest of a whole subject: HMAC over its canonical identifiers, sorted and joined
/// with `\n`, so it does not depend on the order of the map. For a subject with exactly one
/// identifier it equals that identifier's [`identifier_digest`].
pub fn subject_digest(key: &DigestKey, identifiers: &BTreeMap<String, String>) -> String {
    let mut canonical: Vec<String> = identifiers
        .iter()
        .map(|(id_type, value)| canonical_identifier(id_type, value))
        .collect();
    // Sorted as strings, not by type: `user.id=…` sorts before `user=…`.
    canonical.sort();
    key.digest(canonical.join("\n").as_bytes())
}

/// One [`identifier_digest`] per identifier. A held digest matches a subject when it is in
/// this set or equals the subject's [`subject_digest`].
pub fn identifier_digests(
    key: &DigestKey,
    identifiers: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    identifiers
        .iter()
        .map(|(id_type, value)| identifier_digest(key, id_type, value))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 32 bytes: `tombstone-test-key-0123456789abc`.
    const TEST_KEY: &[u8; 32] = b"tombstone-test-key-0123456789abc";

    fn key() -> DigestKey {
        DigestKey::from_bytes(TEST_KEY).unwrap()
    }

    fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(t, v)| (t.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn known_answer() {
        // printf 'email=alice@example.com' |
        //   openssl dgst -sha256 -hmac 'tombstone-test-key-0123456789abc'
        assert_eq!(
            identifier_digest(&key(), "email", "alice@example.com"),
            "hmac-sha256:8b597af7306f62b3190175de306e5e952c9f4225c79b58eb85566dcbf8002acc"
        );
        // printf 'email=alice@example.com\nuserId=4711' |
        //   openssl dgst -sha256 -hmac 'tombstone-test-key-0123456789abc'
        assert_eq!(
            subject_digest(
                &key(),
                &ids(&[("userId", "4711"), ("email", "alice@example.com")])
            ),
            "hmac-sha256:ea40b69e9fafdd551406276d544193b88e47df916518a2ab7b2d504258fb0764"
        );
    }

    #[test]
    fn canonical_form() {
        assert_eq!(
            canonical_identifier("email", "  Alice@Example.COM "),
            "email=alice@example.com"
        );
        assert_eq!(canonical_identifier("userId", " AbC-42\n"), "userId=AbC-42");
        // Every e-mail type is lower-cased (before, only `email` was: a digest of an `Email`
        // or `workEmail` value with capitals changed when the rule became one for all).
        assert_eq!(canonical_identifier("Email", "A@B.c"), "Email=a@b.c");
        assert_eq!(
            canonical_identifier("workEmail", "A@B.c\n"),
            "workEmail=a@b.c"
        );
        // A trailing newline (`base64` of `echo`) is not part of the value.
        assert_eq!(
            canonical_identifier("email", "bob@example.com\n"),
            "email=bob@example.com"
        );
    }

    #[test]
    fn email_is_normalised() {
        assert_eq!(
            identifier_digest(&key(), "email", "  Alice@Example.COM "),
            identifier_digest(&key(), "email", "alice@example.com")
        );
    }

    #[test]
    fn user_id_is_not_lower_cased() {
        assert_ne!(
            identifier_digest(&key(), "userId", "AbC"),
            identifier_digest(&key(), "userId", "abc")
        );
        assert_eq!(
            identifier_digest(&key(), "userId", " AbC "),
            identifier_digest(&key(), "userId", "AbC")
        );
    }

    #[test]
    fn digest_shape() {
        let digest = identifier_digest(&key(), "userId", "4711");
        let hex = digest.strip_prefix(DIGEST_PREFIX).unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex
            .chars()
            .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    }

    #[test]
    fn subject_digest_is_order_independent() {
        let a = ids(&[("email", "alice@example.com"), ("userId", "4711")]);
        let b = ids(&[("userId", "4711"), ("email", " ALICE@example.com")]);
        assert_eq!(subject_digest(&key(), &a), subject_digest(&key(), &b));
        // Sorted as canonical strings, not by type: the result must not change when types
        // that sort differently as keys and as `type=value` strings are inserted in any order.
        let c = ids(&[("user", "1"), ("user.id", "2")]);
        let mut d = BTreeMap::new();
        d.insert("user.id".to_string(), "2".to_string());
        d.insert("user".to_string(), "1".to_string());
        assert_eq!(subject_digest(&key(), &c), subject_digest(&key(), &d));
        assert_eq!(
            subject_digest(&key(), &c),
            key().digest(b"user.id=2\nuser=1")
        );
    }

    #[test]
    fn single_identifier_subject_equals_identifier_digest() {
        assert_eq!(
            subject_digest(&key(), &ids(&[("email", " Alice@Example.com")])),
            identifier_digest(&key(), "email", "alice@example.com")
        );
        assert_eq!(
            subject_digest(&key(), &ids(&[("userId", "4711")])),
            identifier_digest(&key(), "userId", "4711")
        );
    }

    #[test]
    fn identifier_digests_has_one_per_identifier() {
        let subject = ids(&[("email", "alice@example.com"), ("userId", "4711")]);
        let digests = identifier_digests(&key(), &subject);
        assert_eq!(
            digests,
            BTreeSet::from([
                identifier_digest(&key(), "email", "alice@example.com"),
                identifier_digest(&key(), "userId", "4711"),
            ])
        );
        assert!(!digests.contains(&subject_digest(&key(), &subject)));
    }

    #[test]
    fn different_keys_give_different_digests() {
        let other = DigestKey::from_bytes(&[7u8; 32]).unwrap();
        assert_ne!(
            identifier_digest(&key(), "userId", "4711"),
            identifier_digest(&other, "userId", "4711")
        );
    }

    #[test]
    fn short_keys_are_rejected() {
        assert_eq!(
            DigestKey::from_bytes(&[1u8; 31]),
            Err(KeyTooShort { len: 31 })
        );
        assert!(DigestKey::from_bytes(&[1u8; 64]).is_ok());
    }

    #[test]
    fn generated_keys_are_fresh() {
        let a = DigestKey::generate();
        let b = DigestKey::generate();
        assert_eq!(a.as_bytes().len(), MIN_KEY_LEN);
        assert_ne!(a, b);
    }

    #[test]
    fn debug_does_not_leak_the_key() {
        let shown = format!("{:?} {:#?}", key(), key());
        assert!(!shown.contains("tombstone-test-key"), "{shown}");
        // Nor as byte values or hex.
        assert!(!shown.contains("116, 111"), "{shown}");
        assert!(!shown.contains(&hex::encode(TEST_KEY)), "{shown}");
        assert!(shown.contains("32 bytes"), "{shown}");
    }
}
