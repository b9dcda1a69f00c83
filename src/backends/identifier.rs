//! One identifier form everywhere, and matching bounded by it.
//!
//! - [`canonical`] is the form of a value that both the keyed digest
//!   ([`crate::audit::identifier_digest`]) and every store query are made from: trimmed (a
//!   trailing newline from `base64` must not turn an erasure into "nothing found"), and for
//!   e-mail types ([`is_email_type`]) lower-cased.
//! - [`fill`] fills a locator template with canonical values and remembers, for each piece,
//!   whether it is literal text of the template or an identifier, and whether that identifier
//!   matches case-insensitively (e-mail types). Every store builds its query from it, and
//!   find, erase and verify build theirs from the same [`Filled`], so they cannot disagree.
//! - [`Filled::re2_pattern`] (sent to Loki) and [`FreeText`] (run on archive lines that are not
//!   JSON) find the filled text in free text with the same rule: where the text begins or ends
//!   with a letter, digit or `_`, the character next to it must not be one, so `47` is not found
//!   in `4711`.
//! - [`Filled::check_distinctive`]: a boundary does not stop `42` from matching `10:42:13`,
//!   `10.0.0.42` or `status=42`. A value used by a bare placeholder in free text (a locator
//!   with no literal context around it) must therefore be distinctive on its own: an e-mail
//!   address for e-mail types, otherwise at least [`MIN_FREE_TEXT_CHARS`] characters with at
//!   least one letter. Errors name the placeholder and the rule, never the value.

use std::collections::BTreeMap;
use std::fmt;

use super::template;

/// The fewest characters a value of a non-e-mail type needs to be searched for in free text
/// through a bare placeholder.
pub const MIN_FREE_TEXT_CHARS: usize = 6;

/// Whether values of this identifier type are e-mail addresses: its name, in any case, is
/// `email` or ends in `email` (`email`, `Email`, `workEmail`, `contact_email`).
pub fn is_email_type(id_type: &str) -> bool {
    id_type.to_ascii_lowercase().ends_with("email")
}

/// The canonical value of an identifier: trimmed, and lower-cased for e-mail types.
pub fn canonical(id_type: &str, value: &str) -> String {
    let value = value.trim();
    if is_email_type(id_type) {
        value.to_lowercase()
    } else {
        value.to_string()
    }
}

/// Every identifier in its canonical form.
pub fn canonical_all(identifiers: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    identifiers
        .iter()
        .map(|(t, v)| (t.clone(), canonical(t, v)))
        .collect()
}

/// One piece of a filled template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text of the template itself.
    Literal(String),
    /// The canonical value of identifier `id_type`; `fold`: matched case-insensitively.
    Value {
        id_type: String,
        value: String,
        fold: bool,
    },
}

/// A template filled with canonical identifier values.
#[derive(Clone, PartialEq, Eq)]
pub struct Filled {
    pub pieces: Vec<Piece>,
}

/// Never shows the values.
impl fmt::Debug for Filled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Literal(l) => format!("{l:?}"),
                Piece::Value { id_type, .. } => format!("{{{id_type}}}"),
            })
            .collect();
        write!(f, "Filled({})", shown.join(" "))
    }
}

/// Fills `template` with the canonical values of `identifiers` (given raw or canonical). A
/// blank value is missing: the locator is skipped, never run with a blank.
pub fn fill(
    template: &str,
    identifiers: &BTreeMap<String, String>,
) -> Result<Filled, template::Error> {
    fill_with(template, identifiers, canonical)
}

/// For stores that compare exactly and cannot fold case (Redis hash fields and set members,
/// S3 key prefixes): the template filled with canonical values and, when an e-mail value
/// was given with capitals, also with that value as given (trimmed), so that an address an
/// application stored as written is found too. Find, erase and verify all use both.
pub fn exact_forms(
    template: &str,
    identifiers: &BTreeMap<String, String>,
) -> Result<Vec<String>, template::Error> {
    let canonical = fill(template, identifiers)?.text();
    let as_given = fill_with(template, identifiers, |_, v| v.trim().to_string())?.text();
    Ok(if as_given == canonical {
        vec![canonical]
    } else {
        vec![canonical, as_given]
    })
}

fn fill_with(
    template: &str,
    identifiers: &BTreeMap<String, String>,
    form: impl Fn(&str, &str) -> String,
) -> Result<Filled, template::Error> {
    let mut pieces = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..].find('}').ok_or(template::Error::Malformed)? + open;
        if open > 0 {
            pieces.push(Piece::Literal(rest[..open].to_string()));
        }
        let name = &rest[open + 1..close];
        if name.is_empty() || name.contains('{') {
            return Err(template::Error::Malformed);
        }
        let value = identifiers
            .get(name)
            .map(|v| form(name, v))
            .filter(|v| !v.is_empty())
            .ok_or_else(|| template::Error::MissingIdentifier(name.to_string()))?;
        pieces.push(Piece::Value {
            id_type: name.to_string(),
            fold: is_email_type(name),
            value,
        });
        rest = &rest[close + 1..];
    }
    if rest.contains('}') {
        return Err(template::Error::Malformed);
    }
    if !rest.is_empty() {
        pieces.push(Piece::Literal(rest.to_string()));
    }
    Ok(Filled { pieces })
}

/// Why a value cannot be told apart from other text. Names the placeholder, never the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the bare placeholder {{{placeholder}}} is all the locator has to go on, and this subject's value {why}: in free text it would also match other people's data (timestamps such as 10:42:13, addresses such as 10.0.0.42, fields such as status=42); add literal context to the template (`uid={{{placeholder}}} `, `\"to\":\"{{{placeholder}}}\"`)")]
pub struct NotDistinctive {
    pub placeholder: String,
    pub why: &'static str,
}

/// Whether a value of `id_type` stands out in free text on its own (see the module docs).
pub fn distinctive(id_type: &str, value: &str) -> Result<(), &'static str> {
    if is_email_type(id_type) {
        return if looks_like_email(value) {
            Ok(())
        } else {
            Err("is not an e-mail address (local@domain.tld)")
        };
    }
    if value.chars().all(|c| c.is_ascii_digit()) {
        return Err("is only digits");
    }
    if value.chars().count() < MIN_FREE_TEXT_CHARS {
        return Err("is shorter than 6 characters");
    }
    if !value.chars().any(char::is_alphabetic) {
        return Err("has no letter (only digits and punctuation)");
    }
    Ok(())
}

/// `local@domain.tld`: one `@`, a non-empty local part, a domain of non-empty dot-separated
/// labels with at least one dot, no whitespace.
fn looks_like_email(value: &str) -> bool {
    let Some((local, domain)) = value.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && !value.chars().any(char::is_whitespace)
        && domain.contains('.')
        && domain.split('.').all(|label| !label.is_empty())
}

/// A Redis glob matching `value` exactly but for the case of ASCII letters (`[bB][oO][bB]@…`),
/// every other glob metacharacter escaped.
pub fn glob_fold(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 4);
    for c in value.chars() {
        if c.is_ascii_alphabetic() {
            out.push('[');
            out.push(c.to_ascii_lowercase());
            out.push(c.to_ascii_uppercase());
            out.push(']');
        } else {
            out.push_str(&template::escape_glob(&c.to_string()));
        }
    }
    out
}

fn is_word(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

const WORD: &str = "0-9A-Za-z_";

/// Escapes RE2 metacharacters (the set of Go's `regexp.QuoteMeta`).
pub fn regex_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `body` with a boundary before it (`start`) and after it (`end`): the character next to
/// it there must not be a letter, digit or `_`.
fn bounded(start: bool, body: &str, end: bool) -> String {
    let mut pattern = String::new();
    if start {
        pattern.push_str(&format!("(?:^|[^{WORD}])"));
    }
    pattern.push_str(body);
    if end {
        pattern.push_str(&format!("(?:$|[^{WORD}])"));
    }
    pattern
}

/// One RE2 pattern finding what any of `filled` finds ([`Filled::re2_pattern`]): the
/// members that need the same boundaries share them (`B(?:a|b)B`), each set of them an
/// alternative. The same members in any order give the same pattern; one member gives its
/// own pattern.
pub fn re2_alternation(filled: &[&Filled]) -> String {
    let mut groups: BTreeMap<(bool, bool), std::collections::BTreeSet<String>> = BTreeMap::new();
    for f in filled {
        groups.entry(f.edges()).or_default().insert(f.re2_body());
    }
    let parts: Vec<String> = groups
        .into_iter()
        .map(|((start, end), bodies)| {
            let bodies: Vec<String> = bodies.into_iter().collect();
            match bodies.as_slice() {
                [one] => bounded(start, one, end),
                _ => bounded(start, &format!("(?:{})", bodies.join("|")), end),
            }
        })
        .collect();
    match parts.as_slice() {
        [one] => one.clone(),
        _ => parts
            .iter()
            .map(|p| format!("(?:{p})"))
            .collect::<Vec<_>>()
            .join("|"),
    }
}

impl Filled {
    /// The filled text: literal pieces as written, identifiers canonical.
    pub fn text(&self) -> String {
        self.pieces
            .iter()
            .map(|p| match p {
                Piece::Literal(l) => l.as_str(),
                Piece::Value { value, .. } => value.as_str(),
            })
            .collect()
    }

    /// The template with each piece rendered by `render` (a store's escaping).
    pub fn render(&self, render: impl Fn(&Piece) -> String) -> String {
        self.pieces.iter().map(render).collect()
    }

    /// Whether the template has identifiers and every one matches case-insensitively: then a
    /// store that can only fold a whole value (an Elasticsearch `term`, an archive field)
    /// compares without case. With a case-sensitive identifier in it, the value is compared
    /// exactly, so that `AbC` is never taken for `abc`.
    pub fn folds_whole_value(&self) -> bool {
        let mut values = self.pieces.iter().filter_map(|p| match p {
            Piece::Value { fold, .. } => Some(*fold),
            Piece::Literal(_) => None,
        });
        values
            .next()
            .is_some_and(|first| first && values.all(|f| f))
    }

    /// Whether the template is a bare placeholder: nothing but identifiers and whitespace.
    pub fn is_bare(&self) -> bool {
        self.pieces.iter().all(|p| match p {
            Piece::Literal(l) => l.trim().is_empty(),
            Piece::Value { .. } => true,
        })
    }

    /// For a bare placeholder searched in free text: every value must be distinctive on its
    /// own. Templates with literal context pass.
    pub fn check_distinctive(&self) -> Result<(), NotDistinctive> {
        if !self.is_bare() {
            return Ok(());
        }
        for p in &self.pieces {
            if let Piece::Value { id_type, value, .. } = p {
                distinctive(id_type, value).map_err(|why| NotDistinctive {
                    placeholder: id_type.clone(),
                    why,
                })?;
            }
        }
        Ok(())
    }

    fn edges(&self) -> (bool, bool) {
        let text = self.text();
        (
            text.chars().next().is_some_and(is_word),
            text.chars().last().is_some_and(is_word),
        )
    }

    /// The RE2 pattern finding the filled text in a line (Loki `|~`): literal text escaped,
    /// e-mail values inside `(?i:…)`, and a boundary on each side whose edge is a letter,
    /// digit or `_`.
    pub fn re2_pattern(&self) -> String {
        let (start, end) = self.edges();
        bounded(start, &self.re2_body(), end)
    }

    /// [`Self::re2_pattern`] without its boundaries.
    fn re2_body(&self) -> String {
        let mut pattern = String::new();
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => pattern.push_str(&regex_escape(l)),
                Piece::Value { value, fold, .. } => {
                    let escaped = regex_escape(value);
                    if *fold && value.chars().any(char::is_alphabetic) {
                        pattern.push_str(&format!("(?i:{escaped})"));
                    } else {
                        pattern.push_str(&escaped);
                    }
                }
            }
        }
        pattern
    }

    /// The same match as [`Self::re2_pattern`], run here (archive lines that are not JSON).
    pub fn free_text(&self) -> FreeText {
        let (start, end) = self.edges();
        let mut chars = Vec::new();
        for p in &self.pieces {
            match p {
                Piece::Literal(l) => chars.extend(l.chars().map(|c| (c, false))),
                Piece::Value { value, fold, .. } => chars.extend(value.chars().map(|c| (c, *fold))),
            }
        }
        FreeText { chars, start, end }
    }
}

/// Finds a filled template in free text (see [`Filled::free_text`]).
#[derive(Clone, Debug)]
pub struct FreeText {
    /// Each character, and whether it matches case-insensitively.
    chars: Vec<(char, bool)>,
    /// Bounded at the start / at the end.
    start: bool,
    end: bool,
}

fn same_folded(a: char, b: char) -> bool {
    a == b || a.to_lowercase().eq(b.to_lowercase())
}

impl FreeText {
    /// Whether `line` holds the text where it stands on its own.
    pub fn is_in(&self, line: &str) -> bool {
        let hay: Vec<char> = line.chars().collect();
        let n = self.chars.len();
        if n == 0 || hay.len() < n {
            return false;
        }
        (0..=hay.len() - n).any(|at| {
            let end = at + n;
            if self.start && at > 0 && is_word(hay[at - 1]) {
                return false;
            }
            if self.end && end < hay.len() && is_word(hay[end]) {
                return false;
            }
            self.chars
                .iter()
                .zip(&hay[at..end])
                .all(|(&(p, fold), &h)| p == h || (fold && same_folded(p, h)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_canonical_form_is_trimmed_and_lower_cases_email_types_only() {
        assert_eq!(canonical("email", "bob@example.com\n"), "bob@example.com");
        assert_eq!(canonical("email", " Bob@Example.COM "), "bob@example.com");
        assert_eq!(canonical("workEmail", "Bob@Example.com"), "bob@example.com");
        assert_eq!(canonical("contact_EMAIL", "A@B.c"), "a@b.c");
        assert_eq!(canonical("userId", " AbC-42\r\n"), "AbC-42");
        assert!(is_email_type("Email"));
        assert!(!is_email_type("emailVerified2"));
        assert!(!is_email_type("userId"));
    }

    #[test]
    fn fill_uses_canonical_values_and_skips_blank_ones() {
        let filled = fill("to={email} ", &ids(&[("email", "Bob@Example.com\n")])).unwrap();
        assert_eq!(filled.text(), "to=bob@example.com ");
        assert_eq!(
            fill("{userId}", &ids(&[("userId", " \n")])),
            Err(template::Error::MissingIdentifier("userId".into()))
        );
        assert_eq!(fill("a{b", &ids(&[])), Err(template::Error::Malformed));
        assert_eq!(fill("a}b", &ids(&[])), Err(template::Error::Malformed));
        let shown = format!("{filled:?}");
        assert!(!shown.contains("bob"), "{shown}");
    }

    /// The matcher table: what a free-text match of a filled template takes and leaves.
    #[test]
    fn free_text_matching_is_bounded_and_folds_only_email_values() {
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, bool);
        let cases: &[Case] = &[
            ("{userId}", &[("userId", "47")], "order 47 paid", true),
            ("{userId}", &[("userId", "47")], "order 4711 paid", false),
            ("{userId}", &[("userId", "47")], "x47", false),
            // What a boundary cannot stop (hence the distinctiveness check).
            ("{userId}", &[("userId", "42")], "10:42:13 login", true),
            ("{userId}", &[("userId", "42")], "from 10.0.0.42", true),
            ("{userId}", &[("userId", "42")], "status=42", true),
            // Context stops them.
            (
                "uid={userId} ",
                &[("userId", "42")],
                "10:42:13 uid=7 ",
                false,
            ),
            (
                "uid={userId} ",
                &[("userId", "42")],
                "uid=9 status=42 ",
                false,
            ),
            (
                "uid={userId} ",
                &[("userId", "42")],
                "order uid=42 paid",
                true,
            ),
            ("uid={userId}", &[("userId", "42")], "uid=4711", false),
            // E-mail values fold case; others do not.
            (
                "{email}",
                &[("email", "bob@example.com")],
                "to BOB@Example.COM",
                true,
            ),
            (
                "{email}",
                &[("email", "Bob@Example.com\n")],
                "to bob@example.com,",
                true,
            ),
            (
                "{email}",
                &[("email", "bob@example.com")],
                "to xbob@example.com",
                false,
            ),
            (
                "{userId}",
                &[("userId", "AbC-4711x")],
                "id abc-4711x",
                false,
            ),
            ("{userId}", &[("userId", "AbC-4711x")], "id AbC-4711x", true),
            // Literal text of the template is exact.
            ("To={email}", &[("email", "a@b.co")], "to=A@B.CO", false),
            ("To={email}", &[("email", "a@b.co")], "To=A@B.CO", true),
        ];
        for (template, values, line, expected) in cases {
            let filled = fill(template, &ids(values)).unwrap();
            assert_eq!(
                filled.free_text().is_in(line),
                *expected,
                "{template} in {line:?}"
            );
        }
    }

    /// The RE2 pattern Loki gets and the in-process matcher agree, line by line (the `regex`
    /// crate follows RE2's syntax and semantics for what the pattern uses).
    #[test]
    fn the_loki_pattern_and_the_free_text_matcher_agree() {
        let templates: &[(&str, &[(&str, &str)])] = &[
            ("{userId}", &[("userId", "47")]),
            ("{userId}", &[("userId", "42")]),
            ("uid={userId} ", &[("userId", "42")]),
            ("{userId}", &[("userId", "AbC-4711x")]),
            ("{email}", &[("email", "Bob@Example.com\n")]),
            ("To={email}", &[("email", "a@b.co")]),
            ("<{userId}>", &[("userId", "a.b*c|d")]),
            ("{userId}", &[("userId", "Ärger-47")]),
        ];
        let lines = [
            "order 47 paid",
            "order 4711 paid",
            "x47",
            "10:42:13 login",
            "from 10.0.0.42",
            "status=42",
            "uid=42 ",
            "uid=420 ",
            "id abc-4711x",
            "id AbC-4711x",
            "to BOB@Example.COM",
            "to xbob@example.com",
            "to bob@example.com.au",
            "to=A@B.CO",
            "To=A@B.CO",
            "<a.b*c|d>",
            "<aXb*c|d>",
            "ärger-47",
            "ÄRGER-47",
            "",
        ];
        for (template, values) in templates {
            let filled = fill(template, &ids(values)).unwrap();
            let re2 = regex::Regex::new(&filled.re2_pattern()).unwrap();
            let here = filled.free_text();
            for line in lines {
                assert_eq!(
                    here.is_in(line),
                    re2.is_match(line),
                    "{template} on {line:?} ({})",
                    filled.re2_pattern()
                );
            }
        }
    }

    #[test]
    fn the_loki_pattern_says_what_the_free_text_matcher_does() {
        let p = |t: &str, v: &[(&str, &str)]| fill(t, &ids(v)).unwrap().re2_pattern();
        assert_eq!(
            p("{userId}", &[("userId", "user-47")]),
            r"(?:^|[^0-9A-Za-z_])user-47(?:$|[^0-9A-Za-z_])"
        );
        assert_eq!(
            p("{email}", &[("email", "Bob.X@Example.com ")]),
            r"(?:^|[^0-9A-Za-z_])(?i:bob\.x@example\.com)(?:$|[^0-9A-Za-z_])"
        );
        assert_eq!(p("<{userId}>", &[("userId", "47")]), r"<47>");
        assert_eq!(
            p(
                "to={email} uid={userId}",
                &[("email", "a@b.c"), ("userId", "7")]
            ),
            r"(?:^|[^0-9A-Za-z_])to=(?i:a@b\.c) uid=7(?:$|[^0-9A-Za-z_])"
        );
    }

    #[test]
    fn bare_placeholders_need_distinctive_values() {
        let check = |t: &str, v: &[(&str, &str)]| fill(t, &ids(v)).unwrap().check_distinctive();
        for (t, v, why) in [
            ("{userId}", ("userId", "42"), "is only digits"),
            ("{userId}", ("userId", "4711004711"), "is only digits"),
            (
                " {userId} ",
                ("userId", "u-47"),
                "is shorter than 6 characters",
            ),
            (
                "{userId}",
                ("userId", "10.0.0.42"),
                "has no letter (only digits and punctuation)",
            ),
            (
                "{userId}",
                ("userId", "10:42:13"),
                "has no letter (only digits and punctuation)",
            ),
            (
                "{email}",
                ("email", "bob"),
                "is not an e-mail address (local@domain.tld)",
            ),
            (
                "{email}",
                ("email", "bob@localhost"),
                "is not an e-mail address (local@domain.tld)",
            ),
            (
                "{email}",
                ("email", "@example.com"),
                "is not an e-mail address (local@domain.tld)",
            ),
            (
                "{email}",
                ("email", "a@b@c.de"),
                "is not an e-mail address (local@domain.tld)",
            ),
        ] {
            let err = check(t, &[v]).unwrap_err();
            assert_eq!((err.placeholder.as_str(), err.why), (v.0, why), "{v:?}");
            assert!(!err.to_string().contains(&format!(" {} ", v.1)));
        }
        assert!(check("{email}", &[("email", "Bob@Example.com\n")]).is_ok());
        assert!(check("{userId}", &[("userId", "user-47")]).is_ok());
        assert!(distinctive("userId", "abcde")
            .unwrap_err()
            .contains(&MIN_FREE_TEXT_CHARS.to_string()));
        assert!(check("{userId}", &[("userId", "550e8400-e29b")]).is_ok());
        // Context makes a short value safe to search for.
        assert!(check("uid={userId} ", &[("userId", "42")]).is_ok());
        let err = check("{userId}", &[("userId", "42")])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("{userId}") && err.contains("uid={userId} "),
            "{err}"
        );
    }

    #[test]
    fn exact_stores_try_the_canonical_form_and_the_address_as_given() {
        let forms = |v: &str| exact_forms("user:{email}", &ids(&[("email", v)])).unwrap();
        assert_eq!(forms("bob@example.com\n"), vec!["user:bob@example.com"]);
        assert_eq!(
            forms(" Bob@Example.com\n"),
            vec!["user:bob@example.com", "user:Bob@Example.com"]
        );
        assert_eq!(
            exact_forms("u:{userId}", &ids(&[("userId", "AbC\n")])).unwrap(),
            vec!["u:AbC"]
        );
    }

    #[test]
    fn whole_values_fold_only_when_every_identifier_is_an_email() {
        let f = |t: &str| {
            fill(t, &ids(&[("email", "a@b.c"), ("userId", "U1")]))
                .unwrap()
                .folds_whole_value()
        };
        assert!(f("{email}"));
        assert!(f("mailto:{email}"));
        assert!(!f("{userId}"));
        assert!(!f("{userId}/{email}"));
        assert!(!f("literal"));
    }
}
