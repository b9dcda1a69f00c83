//! `kubectl tombstone`: the Data Protection Officer's commands. The same binary, installed
//! (or linked) as `kubectl-tombstone`, is found by kubectl as a plugin; `tombstone kubectl …`
//! runs the same commands. Identifiers are read from a file or standard input, never from
//! the command line (which ends up in shell history and process listings), and are never
//! printed: only keyed digests are.

use std::collections::BTreeMap;

pub mod erase;
pub mod hold;
pub mod status;

/// Why a plugin command could not do what was asked. Messages never carry an identifier.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("identifiers, line {line}: {problem}")]
    Identifiers { line: usize, problem: &'static str },
    #[error("no identifiers given: write one `type=value` per line")]
    NoIdentifiers,
    #[error("the Kubernetes API refused to {action}: {source}")]
    Api {
        action: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error(
        "the operator has not picked up {namespace}/{name} within {seconds}s: is it running \
         and does it watch this namespace? (`kubectl get erasure -n {namespace} {name}`)"
    )]
    NotPickedUp {
        namespace: String,
        name: String,
        seconds: u64,
    },
    #[error("loading the digest key: {0}")]
    DigestKey(#[from] crate::audit::Error),
    #[error("{0} is not a digest as `tombstone digest` prints it (hmac-sha256:<64 hex digits>)")]
    NotADigest(String),
}

impl Error {
    /// A stable name for the failure, as the operator's own errors have.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Identifiers { .. } => "InvalidIdentifiers",
            Error::NoIdentifiers => "NoIdentifiers",
            Error::Api { .. } => "ApiError",
            Error::NotPickedUp { .. } => "NotPickedUp",
            Error::DigestKey(_) => "DigestKeyUnavailable",
            Error::NotADigest(_) => "NotADigest",
        }
    }
}

pub(crate) fn api_error(action: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { action, source }
}

/// Parses identifiers as `type=value`, one per line (blank lines and `#` comments are
/// skipped). A type is a Secret key (letters, digits, `-`, `_`, `.`), given once; the value
/// is taken as written, without the surrounding blanks. Errors name the line, never its text.
pub fn parse_identifiers(text: &str) -> Result<BTreeMap<String, String>, Error> {
    let mut identifiers = BTreeMap::new();
    for (index, raw) in text.lines().enumerate() {
        let line = index.saturating_add(1);
        let trimmed = raw.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let problem = |problem| Error::Identifiers { line, problem };
        let (id_type, value) = trimmed
            .split_once('=')
            .ok_or_else(|| problem("expected `type=value`"))?;
        let (id_type, value) = (id_type.trim(), value.trim());
        if id_type.is_empty() {
            return Err(problem("the identifier type is empty"));
        }
        if !id_type
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(problem(
                "the identifier type may hold only letters, digits, `-`, `_` and `.`",
            ));
        }
        if value.is_empty() {
            return Err(problem("the value is empty"));
        }
        if identifiers
            .insert(id_type.to_string(), value.to_string())
            .is_some()
        {
            return Err(problem("this identifier type was given before"));
        }
    }
    if identifiers.is_empty() {
        return Err(Error::NoIdentifiers);
    }
    Ok(identifiers)
}

/// `prefix-` and eight random hex digits: a name no one has to think of.
pub(crate) fn generated_name(prefix: &str) -> String {
    let mut bytes = [0u8; 4];
    // Without randomness (never seen in practice) the time still makes clashes unlikely.
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = chrono::Utc::now().timestamp_subsec_nanos();
        bytes = nanos.to_be_bytes();
    }
    format!("{prefix}-{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: &str = "zz-probe-31c9@example.org";

    #[test]
    fn identifiers_are_read_one_per_line_and_comments_are_skipped() {
        let parsed = parse_identifiers(&format!(
            "# subject 1\n email = {PROBE} \r\n\nuserId=4711\n"
        ))
        .unwrap();
        assert_eq!(parsed["email"], PROBE);
        assert_eq!(parsed["userId"], "4711");
        assert_eq!(parsed.len(), 2);
    }

    #[test]
    fn bad_lines_are_refused_by_number_without_their_text() {
        for (text, line) in [
            (format!("email={PROBE}\n{PROBE}\n"), 2),
            (format!("=\n{PROBE}"), 1),
            (format!("e mail={PROBE}"), 1),
            ("email=\n".to_string(), 1),
            (format!("email={PROBE}\nemail={PROBE}x"), 2),
        ] {
            let error = parse_identifiers(&text).unwrap_err();
            let message = error.to_string();
            assert!(
                matches!(error, Error::Identifiers { line: l, .. } if l == line),
                "{message}"
            );
            assert_eq!(error.reason(), "InvalidIdentifiers");
            assert!(!message.contains("probe"), "{message}");
        }
        assert!(matches!(
            parse_identifiers("# nothing\n\n"),
            Err(Error::NoIdentifiers)
        ));
    }

    #[test]
    fn generated_names_are_valid_and_differ() {
        let a = generated_name("erasure");
        let b = generated_name("erasure");
        assert_ne!(a, b);
        assert_eq!(a.len(), "erasure-".len() + 8);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'));
    }
}
