//! Identifier templates: `{name}` in a locator is replaced by the subject's identifier of type
//! `name`. A locator whose identifiers the subject lacks is skipped, never run with a blank.

use std::collections::BTreeMap;

use crate::api::StoreKind;
use crate::backends::Error as StoreError;

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

/// Identifier types whose values delimit themselves in free text: an e-mail address has an
/// `@` and a domain, so a bare `{email}` line filter cannot take a timestamp, an IP address
/// or `status=42`. A bare `{userId}` could (`42` is in `10:42:13`).
pub const SELF_DELIMITING: &[&str] = &["email"];

/// Whether `c`, as literal text beside a placeholder, ends the identifier: ASCII punctuation
/// or whitespace, except `-`, `_`, `.`, `@` and `+`. Those five occur inside identifiers
/// (UUIDs, snake_case ids, e-mail addresses, host names), so `user-{userId}-*` for user `47`
/// would also take `user-47-2-…`, the keys of user `47-2`. `{` and `}` are template syntax.
pub fn is_delimiter(c: char) -> bool {
    (c.is_ascii_punctuation() || c.is_ascii_whitespace())
        && !matches!(c, '-' | '_' | '.' | '@' | '+' | '{' | '}')
}

/// How a store matches an expanded locator, which decides what bounds a placeholder at
/// either end of the template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syntax {
    /// The expansion is compared with the whole value (an exact key, a hash field, a set
    /// member, a `term` value, a JSON field): the start and the end bound a placeholder.
    Exact,
    /// A Redis glob matched against whole keys: the start and the end bound a placeholder,
    /// and `*`, `?`, `[`, `]`, `\` are wildcards, never delimiters.
    Glob,
    /// A key prefix (S3): the start bounds a placeholder, the end does not, since anything
    /// may follow (`users/{userId}` would take user 4711's objects for user 47).
    Prefix,
    /// Text searched for inside log lines: the ends of the filter bound only an identifier
    /// of a [`SELF_DELIMITING`] type; any other identifier needs literal context on both
    /// sides, with a field name before it (`uid={userId} `, `"user":"{userId}"`).
    FreeText,
}

impl Syntax {
    fn is_wildcard(self, c: char) -> bool {
        self == Syntax::Glob && matches!(c, '*' | '?' | '[' | ']' | '\\')
    }
}

enum Part<'a> {
    Literal(&'a str),
    Placeholder(&'a str),
}

fn parts(template: &str) -> Result<Vec<Part<'_>>, Error> {
    placeholders(template)?;
    let mut out = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or(Error::Malformed)? + open;
        if open > 0 {
            out.push(Part::Literal(&rest[..open]));
        }
        out.push(Part::Placeholder(&rest[open + 1..close]));
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        out.push(Part::Literal(rest));
    }
    Ok(out)
}

/// Checks that every placeholder of `template` is bounded by its identifier on both sides:
/// preceded by a literal delimiter ([`is_delimiter`]) or the start, followed by one or the
/// end, as `syntax` allows, with no wildcard touching it. Returns the identifier types used
/// (possibly none: whether a locator must name one is the caller's rule). The error says
/// what is wrong in terms of the template only (there is no identifier value at this point).
pub fn check_bounded(template: &str, syntax: Syntax) -> Result<Vec<String>, String> {
    let parts = parts(template).map_err(|_| "is not a valid template".to_string())?;
    let mut names = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let Part::Placeholder(name) = part else {
            continue;
        };
        names.push(name.to_string());
        let before = match i.checked_sub(1).map(|j| &parts[j]) {
            None => None,
            Some(Part::Literal(l)) => Some(l.chars().next_back()),
            Some(Part::Placeholder(_)) => Some(None),
        };
        let after = match parts.get(i + 1) {
            None => None,
            Some(Part::Literal(l)) => Some(l.chars().next()),
            Some(Part::Placeholder(_)) => Some(None),
        };
        let self_delimiting = SELF_DELIMITING.contains(name);
        let side = |c: Option<Option<char>>, where_: &str, end: &str| -> Result<(), String> {
            match c {
                None => match syntax {
                    Syntax::Exact | Syntax::Glob => Ok(()),
                    Syntax::Prefix if where_ == "preceded" => Ok(()),
                    Syntax::Prefix => Err(format!(
                        "ends with {{{name}}}, so one subject's prefix would also select every identifier that starts the same (47 → 4711); end it with a delimiter such as '/'"
                    )),
                    Syntax::FreeText if self_delimiting => Ok(()),
                    Syntax::FreeText => Err(format!(
                        "has {{{name}}} at its {end}: in free text a bare identifier of this type also matches other text (42 is in 10:42:13, 10.0.0.42, status=42); give it literal context on both sides, e.g. \"uid={{{name}}} \" (only {} identifiers may stand alone, e.g. \"\\\"to\\\":\\\"{{email}}\\\"\")",
                        SELF_DELIMITING.join(", ")
                    )),
                },
                Some(None) => Err(format!(
                    "has {{{name}}} {where_} by another identifier with nothing between them"
                )),
                Some(Some(c)) if syntax.is_wildcard(c) => Err(format!(
                    "has {{{name}}} {where_} by {c:?}, a wildcard, which would also take other identifiers that start or end the same; put a delimiter such as ':' between them"
                )),
                Some(Some(c)) if !is_delimiter(c) => Err(format!(
                    "has {{{name}}} {where_} by {c:?}, which can be part of an identifier; put a delimiter such as ':' or '/' there (not '-', '_', '.', '@' or '+')"
                )),
                Some(Some(_)) => Ok(()),
            }
        };
        side(before, "preceded", "start")?;
        side(after, "followed", "end")?;
        if syntax == Syntax::FreeText && !self_delimiting {
            let named = matches!(i.checked_sub(1).map(|j| &parts[j]), Some(Part::Literal(l)) if l.chars().any(|c| c.is_alphanumeric()));
            if !named {
                return Err(format!(
                    "has {{{name}}} without a field name before it: in free text it would also match other fields (status=42 for user 42); name the field, e.g. \"uid={{{name}}} \""
                ));
            }
        }
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

/// One subject's identifiers applied to the templates of one target's locator, the same way
/// for every driver: a template is filled by the driver's `fill` (which decides the forms and
/// the escaping); a template needing an identifier the subject lacks is skipped, and the
/// reason kept without any value (`keys[1] needs {email}`); a malformed one is `InvalidSpec`,
/// naming the target and the field (`target t: subject.loki.lineFilter is not a valid
/// template`).
pub struct Locating<'a> {
    target: &'a str,
    kind: StoreKind,
    identifiers: &'a BTreeMap<String, String>,
    /// Why templates were skipped, in the order they were met.
    pub skipped: Vec<String>,
}

impl<'a> Locating<'a> {
    pub fn new(
        target: &'a str,
        kind: StoreKind,
        identifiers: &'a BTreeMap<String, String>,
    ) -> Self {
        Self {
            target,
            kind,
            identifiers,
            skipped: Vec::new(),
        }
    }

    /// The template `what` (a path inside the kind's locator section, such as `keys[0]`)
    /// filled for the subject; None when it is skipped.
    pub fn fill<T>(
        &mut self,
        what: &str,
        template: &str,
        fill: impl FnOnce(&str, &BTreeMap<String, String>) -> Result<T, Error>,
    ) -> Result<Option<T>, StoreError> {
        match fill(template, self.identifiers) {
            Ok(filled) => Ok(Some(filled)),
            Err(Error::MissingIdentifier(name)) => {
                self.skipped.push(format!("{what} needs {{{name}}}"));
                Ok(None)
            }
            Err(Error::Malformed) => Err(StoreError::InvalidSpec(format!(
                "target {}: subject.{}.{what} is not a valid template",
                self.target,
                self.kind.as_str()
            ))),
        }
    }
}

/// [`Locating::fill`] for a driver that collects the skipped templates itself: one template
/// of `job`'s locator section for `kind`, filled or skipped (the reason appended to
/// `skipped`), the same way and with the same errors.
pub fn fill_or_skip<T>(
    job: &crate::backends::SubjectJob,
    kind: StoreKind,
    what: &str,
    template: &str,
    fill: impl FnOnce(&str, &BTreeMap<String, String>) -> Result<T, Error>,
    skipped: &mut Vec<String>,
) -> Result<Option<T>, StoreError> {
    let mut locating = Locating::new(&job.target.name, kind, &job.identifiers);
    let filled = locating.fill(what, template, fill);
    skipped.append(&mut locating.skipped);
    filled
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
    fn every_driver_skips_and_refuses_templates_alike() {
        let ids = ids(&[("userId", "47")]);
        let mut locating = Locating::new("t", StoreKind::Loki, &ids);
        let filled = locating.fill("lineFilter", "uid={userId} ", |t, i| expand(t, i, literal));
        assert_eq!(filled.ok().flatten().as_deref(), Some("uid=47 "));
        let skipped = locating.fill("term[a]", "{email}", |t, i| expand(t, i, literal));
        assert!(matches!(skipped, Ok(None)));
        assert_eq!(locating.skipped, ["term[a] needs {email}"]);
        let bad = locating.fill("keys[1]", "{userId", |t, i| expand(t, i, literal));
        assert_eq!(
            bad.err().map(|e| (e.reason(), e.to_string())),
            Some((
                "InvalidSpec",
                "target t: subject.loki.keys[1] is not a valid template".to_string()
            ))
        );
    }

    #[test]
    fn a_driver_collecting_its_own_skips_gets_the_same_answers() {
        let job = crate::backends::SubjectJob {
            target: serde_json::from_value(serde_json::json!(
                {"name": "t", "store": "s", "s3": {"prefix": "p/"}}
            ))
            .expect("a target"),
            identifiers: ids(&[("userId", "47")]),
            action: crate::backends::SubjectAction::Find,
        };
        let mut skipped = vec!["earlier".to_string()];
        let exact = |t: &str, i: &BTreeMap<String, String>| expand(t, i, literal);
        let filled = fill_or_skip(
            &job,
            StoreKind::S3,
            "keyPrefixes[0]",
            "u/{userId}/",
            exact,
            &mut skipped,
        );
        assert_eq!(filled.ok().flatten().as_deref(), Some("u/47/"));
        let none = fill_or_skip(
            &job,
            StoreKind::S3,
            "records.equals",
            "{email}",
            exact,
            &mut skipped,
        );
        assert!(matches!(none, Ok(None)));
        assert_eq!(skipped, ["earlier", "records.equals needs {email}"]);
        let bad = fill_or_skip(
            &job,
            StoreKind::S3,
            "records.prefix",
            "a{",
            exact,
            &mut skipped,
        );
        assert_eq!(
            bad.err().map(|e| e.to_string()),
            Some("target t: subject.s3.records.prefix is not a valid template".to_string())
        );
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
    fn placeholders_must_be_bounded_on_both_sides() {
        use Syntax::*;
        let ok = |t: &str, s: Syntax| {
            assert!(
                check_bounded(t, s).is_ok(),
                "{t:?} ({s:?}) must be accepted"
            );
        };
        let refused = |t: &str, s: Syntax| {
            let e = check_bounded(t, s).expect_err(t);
            assert!(
                e.contains('{'),
                "{t:?}: the message names the placeholder: {e}"
            );
        };
        for t in [
            "user:{userId}",
            "{userId}",
            "a:{userId}:b",
            "mail/{email}",
            "u={a},{b}",
        ] {
            ok(t, Exact);
        }
        for t in [
            "user{userId}",
            "u-{userId}",
            "u_{userId}",
            "u.{userId}",
            "{a}{b}",
            "{userId}x",
        ] {
            refused(t, Exact);
        }
        for t in [
            "session:{userId}:*",
            "session:{userId}",
            "*:{userId}",
            "{userId}:*",
            "cart:{userId}|*",
        ] {
            ok(t, Glob);
        }
        for t in [
            "session:{userId}*",
            "session:*{userId}",
            "{userId}*",
            "*{userId}",
            "s:[{userId}]",
            "s:{userId}?",
            "s:\\{userId}",
            "session-{userId}-*",
        ] {
            refused(t, Glob);
        }
        for t in ["users/{userId}/", "{userId}/", "t/{tenant}/u/{userId}/"] {
            ok(t, Prefix);
        }
        for t in ["users/{userId}", "users-{userId}/", "u/{userId}.json"] {
            refused(t, Prefix);
        }
        for t in [
            "{email}",
            "uid={userId} ",
            "\"to\":\"{email}\"",
            "\"user\":\"{userId}\"",
            "user {userId} ",
        ] {
            ok(t, FreeText);
        }
        for t in [
            "{userId}",
            "={userId} ",
            "uid={userId}",
            " {userId} ",
            "{userId} done",
            "uid:{email}x",
        ] {
            refused(t, FreeText);
        }
        // No placeholder at all is not this check's business; callers require one.
        assert_eq!(check_bounded("session:*", Glob), Ok(vec![]));
        assert_eq!(
            check_bounded("t/{tenant}/{userId}/", Prefix),
            Ok(vec!["tenant".to_string(), "userId".to_string()])
        );
        assert!(check_bounded("a{b", Exact).is_err());
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
