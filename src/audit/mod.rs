//! The operator's own trail: keyed digests of data subjects (never the identifiers
//! themselves, invariant 5) and the key they are made with.

pub mod chain;
pub mod digest;
pub mod key;
pub mod proof;
pub mod receipt;
pub mod sink;

pub use digest::{
    canonical_identifier, identifier_digest, identifier_digests, subject_digest, DigestKey,
};
pub use key::{load_key, load_or_create_key, Error, DIGEST_KEY_SECRET};
