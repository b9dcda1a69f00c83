//! The LogQL text the backend sends: the target's stream selector (parsed, checked and
//! re-rendered), string literals escaped by Go's rules (LogQL strings are Go strings), and the
//! exact line filter of a subject.
//!
//! Exactness: `|= "user-47"` is a substring match and would also select `user-4711`'s lines.
//! The backend therefore sends a regex line filter `|~` built from the regex-escaped text with
//! a boundary on each side whose edge character is a letter, digit or `_`: the text must not
//! be glued to another such character there. `user-47` then matches `id=user-47 ` and
//! `"user-47"` but not `user-4711` or `xuser-47`. What it cannot tell apart: ids that extend
//! the text with punctuation (`bob@example.com` still matches inside `bob@example.com.au`,
//! `user-47` inside `user-47-b`); the policy's template can add context (`email={email} `).
//! Identifier values are canonical and e-mail addresses sit in `(?i:…)`; a bare placeholder
//! needs a distinctive value ([`identifier::Filled::check_distinctive`]).

use crate::backends::identifier;

/// A label matcher's operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Neq,
    Re,
    Nre,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Neq => "!=",
            Op::Re => "=~",
            Op::Nre => "!~",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Matcher {
    pub name: String,
    pub op: Op,
    pub value: String,
}

/// A stream selector `{name="value", …}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub matchers: Vec<Matcher>,
}

impl Selector {
    /// The selector as sent, in Loki's own canonical form (`{a="b", c=~"d"}`), so that the
    /// query of a delete request listed back compares equal to the one submitted.
    pub fn render(&self) -> String {
        let parts: Vec<String> = self
            .matchers
            .iter()
            .map(|m| format!("{}{}{}", m.name, m.op.as_str(), quote(&m.value)))
            .collect();
        format!("{{{}}}", parts.join(", "))
    }

    /// Whether some matcher names specific streams: an `=` with a value, or an `=~` that is an
    /// alternation of literals (`mailer|billing`). `{app!="x"}` or `{app=~".+"}` alone would
    /// select (nearly) every stream.
    pub fn is_selective(&self) -> bool {
        self.matchers.iter().any(|m| match m.op {
            Op::Eq => !m.value.is_empty(),
            Op::Re => literal_alternation(&m.value),
            Op::Neq | Op::Nre => false,
        })
    }
}

/// `a|b|c` with only literal (or escaped) characters, every alternative non-empty.
fn literal_alternation(pattern: &str) -> bool {
    let mut chars = pattern.chars().peekable();
    let mut current = 0usize;
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                // An escaped metacharacter is a literal; `\d`, `\w`… are classes.
                match chars.next() {
                    Some(e) if !e.is_ascii_alphanumeric() => current += 1,
                    _ => return false,
                }
            }
            '|' => {
                if current == 0 {
                    return false;
                }
                current = 0;
            }
            '(' => {
                if chars.peek() == Some(&'?') {
                    chars.next();
                    if chars.next() != Some(':') {
                        return false;
                    }
                }
            }
            ')' | '^' | '$' => {}
            '.' | '*' | '+' | '?' | '[' | ']' | '{' | '}' => return false,
            _ => current += 1,
        }
    }
    current > 0
}

/// Parses a stream selector; nothing may follow the closing brace (line filters belong in the
/// subject locator, not in the dataset's selector).
pub fn parse_selector(text: &str) -> Result<Selector, String> {
    let mut p = Parser {
        chars: text.chars().collect(),
        at: 0,
    };
    p.skip_ws();
    p.expect('{')?;
    let mut matchers = Vec::new();
    p.skip_ws();
    if p.peek() == Some('}') {
        p.at += 1;
    } else {
        loop {
            p.skip_ws();
            let name = p.label_name()?;
            p.skip_ws();
            let op = p.op()?;
            p.skip_ws();
            let value = p.string()?;
            matchers.push(Matcher { name, op, value });
            p.skip_ws();
            match p.next() {
                Some(',') => continue,
                Some('}') => break,
                _ => return Err("expected ',' or '}' after a matcher".into()),
            }
        }
    }
    p.skip_ws();
    if p.at != p.chars.len() {
        return Err("only a stream selector is allowed here, nothing after its '}'".into());
    }
    Ok(Selector { matchers })
}

struct Parser {
    chars: Vec<char>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.at += 1;
        c
    }

    fn skip_ws(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.at += 1;
        }
    }

    fn expect(&mut self, c: char) -> Result<(), String> {
        if self.next() == Some(c) {
            Ok(())
        } else {
            Err(format!("expected '{c}'"))
        }
    }

    fn label_name(&mut self) -> Result<String, String> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            self.at += 1;
        }
        let name: String = self.chars[start..self.at].iter().collect();
        if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err("expected a label name".into());
        }
        Ok(name)
    }

    fn op(&mut self) -> Result<Op, String> {
        let op = match (self.next(), self.peek()) {
            (Some('='), Some('~')) => Op::Re,
            (Some('!'), Some('=')) => Op::Neq,
            (Some('!'), Some('~')) => Op::Nre,
            (Some('='), _) => return Ok(Op::Eq),
            _ => return Err("expected one of = != =~ !~".into()),
        };
        self.at += 1;
        Ok(op)
    }

    /// A Go string literal: `"…"` with escapes, or a raw `` `…` ``.
    fn string(&mut self) -> Result<String, String> {
        match self.next() {
            Some('`') => {
                let mut out = String::new();
                loop {
                    match self.next() {
                        Some('`') => return Ok(out),
                        Some(c) => out.push(c),
                        None => return Err("unterminated string".into()),
                    }
                }
            }
            Some('"') => {
                let mut out = String::new();
                loop {
                    match self.next() {
                        Some('"') => return Ok(out),
                        Some('\\') => out.push(self.escape()?),
                        Some('\n') | None => return Err("unterminated string".into()),
                        Some(c) => out.push(c),
                    }
                }
            }
            _ => Err("expected a quoted value".into()),
        }
    }

    fn escape(&mut self) -> Result<char, String> {
        let hex = |p: &mut Parser, n: usize| -> Result<char, String> {
            let digits: String = (0..n).filter_map(|_| p.next()).collect();
            u32::from_str_radix(&digits, 16)
                .ok()
                .filter(|_| digits.len() == n)
                .and_then(char::from_u32)
                .ok_or_else(|| "invalid escape".to_string())
        };
        Ok(match self.next() {
            Some('n') => '\n',
            Some('t') => '\t',
            Some('r') => '\r',
            Some('a') => '\x07',
            Some('b') => '\x08',
            Some('f') => '\x0c',
            Some('v') => '\x0b',
            Some('\\') => '\\',
            Some('"') => '"',
            Some('x') => hex(self, 2)?,
            Some('u') => hex(self, 4)?,
            Some('U') => hex(self, 8)?,
            _ => return Err("invalid escape".into()),
        })
    }
}

/// A Go (hence LogQL) double-quoted string literal holding exactly `value`.
pub fn quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() && (c as u32) < 0x80 => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub use crate::backends::identifier::regex_escape;

/// The RE2 pattern that finds literal `text` where it stands on its own (see the module
/// docs); the same rule as [`subject_filter`], without identifiers.
pub fn exact_pattern(text: &str) -> String {
    identifier::Filled {
        pieces: vec![identifier::Piece::Literal(text.to_string())],
    }
    .re2_pattern()
}

/// The line filter selecting lines that contain literal `text` exactly.
pub fn exact_filter(text: &str) -> String {
    format!("|~ {}", quote(&exact_pattern(text)))
}

/// The line filter selecting one subject's lines: the locator filled with canonical values,
/// bounded, e-mail values case-insensitive (`(?i:…)`). Find, erase and verify all send it.
pub fn subject_filter(filled: &identifier::Filled) -> String {
    format!("|~ {}", quote(&filled.re2_pattern()))
}

/// The line filter selecting the lines of any of several subjects (a batch's chunk): one
/// regex, an alternation of each subject's [`subject_filter`] pattern, escaped the same way.
/// For one subject, exactly its [`subject_filter`].
pub fn subjects_filter(filled: &[&identifier::Filled]) -> String {
    format!("|~ {}", quote(&identifier::re2_alternation(filled)))
}

/// The longest LogQL query a batch sends, in bytes: Loki's parser refuses queries of 5,120
/// bytes or more (`maxInputSize`), counted on the whole query text (a count's
/// `sum(count_over_time(…))` too).
pub const MAX_QUERY_BYTES: usize = 4096;

/// How many of `filled` (at least one), from the front, one query under `selector` may take:
/// the longest query made of them, a window's count, stays within [`MAX_QUERY_BYTES`].
pub fn chunk_len(selector: &str, filled: &[&identifier::Filled]) -> usize {
    let fits = |k: usize| {
        let log_query = format!("{selector} {}", subjects_filter(&filled[..k]));
        count_query(&log_query, super::WINDOW_SECONDS).len() <= MAX_QUERY_BYTES
    };
    let mut k = 1.min(filled.len());
    while k < filled.len() && fits(k + 1) {
        k += 1;
    }
    k
}

/// A metric query counting the lines of `log_query` in the `seconds` before its time.
pub fn count_query(log_query: &str, seconds: i64) -> String {
    format!("sum(count_over_time({log_query} [{seconds}s]))")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_parse_and_render_canonically() {
        let s = parse_selector(r#" { namespace = "mailer",app=~`a|b`, env!="dev" } "#).unwrap();
        assert_eq!(
            s.render(),
            r#"{namespace="mailer", app=~"a|b", env!="dev"}"#
        );
        assert_eq!(parse_selector(&s.render()).unwrap(), s);
        let escaped = parse_selector(r#"{a="q\"\\\n\x41\u00e9"}"#).unwrap();
        assert_eq!(escaped.matchers[0].value, "q\"\\\nAé");
        assert_eq!(parse_selector(&escaped.render()).unwrap(), escaped);
    }

    #[test]
    fn malformed_selectors_and_pipelines_are_refused() {
        for bad in [
            r#"{app="mailer""#,
            r#"app="mailer""#,
            r#"{app="mailer"} |= "x""#,
            r#"{app=="mailer"}"#,
            r#"{1a="b"}"#,
            r#"{app="a\q"}"#,
            r#"{app="mailer",}"#,
        ] {
            assert!(parse_selector(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_selector("{ }").unwrap().matchers.len(), 0);
    }

    #[test]
    fn only_selectors_naming_streams_are_selective() {
        let sel = |s: &str| parse_selector(s).unwrap().is_selective();
        assert!(sel(r#"{app="mailer"}"#));
        assert!(sel(r#"{app=~"mailer|billing"}"#));
        assert!(sel(r#"{app=~"^(?:mailer|bill\\.ing)$", env!="dev"}"#));
        assert!(!sel("{}"));
        assert!(!sel(r#"{app=""}"#));
        assert!(!sel(r#"{app!="mailer"}"#));
        assert!(!sel(r#"{app=~".+"}"#));
        assert!(!sel(r#"{app=~"mailer|"}"#));
        assert!(!sel(r#"{app=~"mail.*"}"#));
        assert!(!sel(r#"{app=~"\\w+"}"#));
    }

    #[test]
    fn strings_are_quoted_by_go_rules() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
        assert_eq!(quote("l1\nl2\t\x01\u{85}"), r#""l1\nl2\t\x01\u0085""#);
        assert_eq!(quote("é|}"), "\"é|}\"");
    }

    #[test]
    fn identifiers_cannot_break_out_of_the_filter() {
        // Each hostile id stays inside one string literal: the only unescaped quotes are the
        // literal's own, and every regex metacharacter is escaped.
        for id in [
            r#"x" |= "" or "#,
            r#"a\"#,
            "a|b",
            "a}b{",
            "a\"}\n{b=\"c",
            ".*",
        ] {
            let filter = exact_filter(id);
            let literal = filter.strip_prefix("|~ ").unwrap();
            let mut p = Parser {
                chars: literal.chars().collect(),
                at: 0,
            };
            let pattern = p.string().unwrap();
            assert_eq!(
                p.at,
                p.chars.len(),
                "{id}: the literal ends where it should"
            );
            assert!(pattern.contains(&regex_escape(id)), "{id}");
        }
        assert_eq!(regex_escape("a.b*c|d}e\\"), r"a\.b\*c\|d\}e\\");
    }

    #[test]
    fn the_exact_pattern_bounds_word_edges_only() {
        assert_eq!(
            exact_pattern("user-47"),
            r"(?:^|[^0-9A-Za-z_])user-47(?:$|[^0-9A-Za-z_])"
        );
        assert_eq!(exact_pattern("<47>"), r"<47>");
        assert_eq!(exact_pattern("a.b@"), r"(?:^|[^0-9A-Za-z_])a\.b@");
        assert_eq!(
            count_query(r#"{a="b"}"#, 60),
            r#"sum(count_over_time({a="b"} [60s]))"#
        );
    }

    fn filled(template: &str, pairs: &[(&str, &str)]) -> identifier::Filled {
        let ids = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        identifier::fill(template, &ids).unwrap()
    }

    #[test]
    fn an_alternation_finds_what_each_subjects_filter_finds_and_nothing_else() {
        let members = [
            filled("{userId}", &[("userId", "user-47")]),
            filled("{userId}", &[("userId", "<a|b>.*")]),
            filled("{email}", &[("email", "Bob@Example.org")]),
            filled("{userId}", &[("userId", "x\"}y\\")]),
        ];
        let refs: Vec<&identifier::Filled> = members.iter().collect();
        let pattern = identifier::re2_alternation(&refs);
        let re = regex::Regex::new(&pattern).unwrap();
        let each: Vec<regex::Regex> = members
            .iter()
            .map(|m| regex::Regex::new(&m.re2_pattern()).unwrap())
            .collect();
        for line in [
            "id=user-47 ok",
            "id=user-4711",
            "xuser-47",
            "<a|b>.* here",
            "<a|b>xx",
            "to: BOB@example.ORG",
            "to: bob@example.org.au",
            "x\"}y\\ end",
            "nothing",
            "a",
        ] {
            assert_eq!(
                re.is_match(line),
                each.iter().any(|r| r.is_match(line)),
                "{line}: {pattern}"
            );
        }
        // Order does not matter; one subject's filter is the single path's.
        let reversed: Vec<&identifier::Filled> = members.iter().rev().collect();
        assert_eq!(identifier::re2_alternation(&reversed), pattern);
        assert_eq!(subjects_filter(&refs[..1]), subject_filter(&members[0]));
        // The filter stays one string literal whatever the identifiers hold.
        let filter = subjects_filter(&refs);
        let mut p = Parser {
            chars: filter.strip_prefix("|~ ").unwrap().chars().collect(),
            at: 0,
        };
        assert_eq!(p.string().unwrap(), pattern);
        assert_eq!(p.at, p.chars.len());
    }

    #[test]
    fn chunks_keep_every_query_under_lokis_parser_limit() {
        let members: Vec<identifier::Filled> = (0..500)
            .map(|n| {
                filled(
                    "user={userId} mail={email} ",
                    &[
                        ("userId", &format!("member-{n}")),
                        ("email", &format!("member-{n}@example.org")),
                    ],
                )
            })
            .collect();
        let refs: Vec<&identifier::Filled> = members.iter().collect();
        let selector = r#"{app="mailer"}"#;
        let mut at = 0;
        let mut chunks = 0;
        while at < refs.len() {
            let k = chunk_len(selector, &refs[at..]);
            assert!(k >= 1);
            let query = format!("{selector} {}", subjects_filter(&refs[at..at + k]));
            let count = count_query(&query, crate::backends::loki::WINDOW_SECONDS);
            assert!(count.len() <= MAX_QUERY_BYTES && MAX_QUERY_BYTES < 5120);
            if at + k < refs.len() {
                let more = format!("{selector} {}", subjects_filter(&refs[at..at + k + 1]));
                assert!(
                    count_query(&more, crate::backends::loki::WINDOW_SECONDS).len()
                        > MAX_QUERY_BYTES
                );
            }
            at += k;
            chunks += 1;
        }
        assert!((5..50).contains(&chunks), "{chunks} chunks");
        assert_eq!(chunk_len(selector, &[]), 0);
        // A subject too long for any query still gets a chunk of its own.
        let long = filled("{userId}", &[("userId", &"x".repeat(6000))]);
        assert_eq!(chunk_len(selector, &[&long, &members[0]]), 1);
    }
}
