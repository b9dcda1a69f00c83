//! Identifier templates: `{name}` in a locator is replaced by the subject's identifier of type
//! `name`. A locator whose identifiers the subject lacks is skipped, never run with a blank.

use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The subject has no identifier of this type; the locator is skipped.
    #[error("needs identifier {{{0}}}")]
    MissingIdentifier(String),
    #[error("unbalanced braces in template")]
    Malformed,
}

/// The identifier types a template uses, in order of appearance.
pub fn placeholders(template: &str) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or(Error::Malformed)? + open;
        let name = &rest[open + 1..close];
        if name.is_empty() || name.contains('{') {
            return Err(Error::Malformed);
        }
        names.push(name.to_string());
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(Error::Malformed);
    }
    Ok(names)
}

/// Fills in `template`. Each identifier is passed through `escape` first, so that an
/// identifier can never widen the locator (a `*` in an id must not become a glob).
pub fn expand(
    template: &str,
    identifiers: &BTreeMap<String, String>,
    escape: impl Fn(&str) -> String,
) -> Result<String, Error> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or(Error::Malformed)? + open;
        out.push_str(&rest[..open]);
        let name = &rest[open + 1..close];
        let value = identifiers.get(name).filter(|v| !v.trim().is_empty());
        let value = value.ok_or_else(|| Error::MissingIdentifier(name.to_string()))?;
        out.push_str(&escape(value));
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(Error::Malformed);
    }
    out.push_str(rest);
    Ok(out)
}

/// Escapes Redis glob metacharacters so the value matches only itself.
pub fn escape_glob(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^' | '-') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// No escaping: the value is used as a literal (a hash field, a set member, an exact key).
pub fn literal(value: &str) -> String {
    value.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::redis::glob;

    fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn fills_in_every_placeholder() {
        let t = "user:{userId}:mail:{email}";
        let got = expand(t, &ids(&[("userId", "4711"), ("email", "a@b.c")]), literal).unwrap();
        assert_eq!(got, "user:4711:mail:a@b.c");
        assert_eq!(placeholders(t).unwrap(), vec!["userId", "email"]);
    }

    #[test]
    fn a_missing_or_blank_identifier_skips_the_locator() {
        assert_eq!(
            expand("cart:{userId}", &ids(&[("email", "a@b.c")]), literal),
            Err(Error::MissingIdentifier("userId".into()))
        );
        assert_eq!(
            expand("cart:{userId}", &ids(&[("userId", "  ")]), literal),
            Err(Error::MissingIdentifier("userId".into()))
        );
    }

    #[test]
    fn malformed_templates_are_errors() {
        assert_eq!(placeholders("a{b"), Err(Error::Malformed));
        assert_eq!(placeholders("a}b"), Err(Error::Malformed));
        assert_eq!(placeholders("a{}b"), Err(Error::Malformed));
    }

    #[test]
    fn escaped_identifiers_cannot_widen_a_glob() {
        let pattern = expand("session:{userId}:*", &ids(&[("userId", "4*")]), escape_glob).unwrap();
        assert!(glob::matches(pattern.as_bytes(), b"session:4*:x"));
        assert!(!glob::matches(pattern.as_bytes(), b"session:4711:x"));
        let pattern = expand("s:{id}", &ids(&[("id", "[a-z]?\\")]), escape_glob).unwrap();
        assert!(glob::matches(pattern.as_bytes(), b"s:[a-z]?\\"));
        assert!(!glob::matches(pattern.as_bytes(), b"s:bX\\"));
    }
}
