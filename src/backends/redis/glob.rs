//! Redis glob patterns (the syntax of SCAN MATCH and KEYS), matched client-side as a second
//! guard: a key the server returns that does not match the target's pattern is never touched.

/// Whether `key` matches the Redis glob `pattern` (`*`, `?`, `[abc]`, `[^a]`, `[a-z]`, `\x`).
pub fn matches(pattern: &[u8], key: &[u8]) -> bool {
    let (mut p, mut k) = (0usize, 0usize);
    // Where to retry when a `*` has to absorb one more byte.
    let mut star: Option<(usize, usize)> = None;
    while k < key.len() {
        if p < pattern.len() {
            match pattern[p] {
                b'*' => {
                    star = Some((p, k));
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    k += 1;
                    continue;
                }
                b'[' => {
                    if let Some((matched, next)) = match_class(pattern, p, key[k]) {
                        if matched {
                            p = next;
                            k += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pattern.len() => {
                    if pattern[p + 1] == key[k] {
                        p += 2;
                        k += 1;
                        continue;
                    }
                }
                c => {
                    if c == key[k] {
                        p += 1;
                        k += 1;
                        continue;
                    }
                }
            }
        }
        match star {
            Some((sp, sk)) => {
                p = sp + 1;
                k = sk + 1;
                star = Some((sp, sk + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// Matches one byte against the class starting at `pattern[start] == b'['`; returns whether
/// it matched and where the pattern continues. None for an unterminated class.
fn match_class(pattern: &[u8], start: usize, c: u8) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut matched = false;
    loop {
        let b = *pattern.get(i)?;
        if b == b']' {
            return Some((matched != negate, i + 1));
        }
        if b == b'\\' && i + 1 < pattern.len() {
            matched |= pattern[i + 1] == c;
            i += 2;
        } else if pattern.get(i + 1) == Some(&b'-')
            && pattern.get(i + 2).is_some_and(|&e| e != b']')
        {
            let (lo, hi) = (b.min(pattern[i + 2]), b.max(pattern[i + 2]));
            matched |= (lo..=hi).contains(&c);
            i += 3;
        } else {
            matched |= b == c;
            i += 1;
        }
    }
}

/// Whether a pattern matches every key (`*`, `**`, …): such a selector wipes a whole store.
pub fn matches_everything(pattern: &str) -> bool {
    !pattern.is_empty() && pattern.bytes().all(|b| b == b'*')
}

/// The literal text every key the pattern matches starts with: the bytes before its first
/// wildcard (`*`, `?`, `[`), escapes resolved. `session:*` → `session:`; `*:*`, `?*`,
/// `[a-z]*` → empty.
pub fn literal_prefix(pattern: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' | '?' | '[' => break,
            '\\' => match chars.next() {
                Some(e) => out.push(e),
                None => break,
            },
            c => out.push(c),
        }
    }
    out
}

/// Whether a retention pattern selects a named part of the key space: an anchored literal
/// prefix with at least one letter or digit (`session:*`, `cache:v2:*`). Decided by what the
/// pattern can match, not by how it is spelled: `*`, `**`, `*:*`, `?*`, `[a-z]*`, `*-*` and
/// `:*` all take (nearly) every key.
pub fn has_anchored_prefix(pattern: &str) -> bool {
    literal_prefix(pattern).chars().any(|c| c.is_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, k: &str) -> bool {
        matches(p.as_bytes(), k.as_bytes())
    }

    #[test]
    fn stars_and_literals() {
        assert!(m("session:*", "session:1"));
        assert!(m("session:*", "session:"));
        assert!(!m("session:*", "sessions:1"));
        assert!(!m("session:*", "xsession:1"));
        assert!(m("user:*:cart", "user:47:cart"));
        assert!(!m("user:*:cart", "user:47:carts"));
        assert!(m("*", ""));
        assert!(m("a*b*c", "aXbYbc"));
        assert!(!m("a*b*c", "aXbYb"));
    }

    #[test]
    fn question_marks_classes_and_escapes() {
        assert!(m("h?llo", "hello"));
        assert!(!m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo"));
        assert!(!m("h[ae]llo", "hillo"));
        assert!(m("h[^e]llo", "hallo"));
        assert!(!m("h[^e]llo", "hello"));
        assert!(m("h[a-c]llo", "hbllo"));
        assert!(!m("h[a-c]llo", "hdllo"));
        assert!(m(r"a\*b", "a*b"));
        assert!(!m(r"a\*b", "axb"));
    }

    #[test]
    fn neighbouring_ids_do_not_match() {
        assert!(m("session:47:*", "session:47:a"));
        assert!(!m("session:47:*", "session:4711:a"));
    }

    #[test]
    fn retention_patterns_need_an_anchored_literal_prefix() {
        for ok in [
            "session:*",
            "a*",
            "cache:v2:*",
            "user:?",
            r"\*x*",
            "s[0-9]*",
            "exact-key",
        ] {
            assert!(has_anchored_prefix(ok), "{ok} has a literal prefix");
        }
        for all in [
            "*",
            "**",
            "*:*",
            "?*",
            "[a-z]*",
            "*-*",
            ":*",
            "-*",
            "??*",
            "[s]ession:*",
            r"\**",
            "*session",
        ] {
            assert!(!has_anchored_prefix(all), "{all} selects nearly every key");
        }
        assert_eq!(literal_prefix(r"a\*b*c"), "a*b");
    }

    #[test]
    fn match_everything_detection() {
        assert!(matches_everything("*"));
        assert!(matches_everything("***"));
        assert!(!matches_everything("a*"));
        assert!(!matches_everything(""));
    }
}
