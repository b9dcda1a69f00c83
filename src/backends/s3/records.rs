//! Records inside JSON-lines archives: a streaming filter that drops one subject's records and
//! keeps every other byte as it was.
//!
//! The filter is synchronous and works on `BufRead` → `Write`, so it runs on a blocking thread
//! over a streamed object body and never holds more than one line in memory. Gzip is detected
//! by its magic bytes, not by the key's suffix; multi-member gzip (as written by `pigz` or by
//! concatenation) is read whole.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::mpsc;
use std::thread;

use flate2::bufread::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use memchr::memmem;
use serde_json::Value;

use crate::backends::identifier::{Filled, FreeText};

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

thread_local! {
    /// A line lower-cased (ASCII) for a case-insensitive search, reused line after line.
    static LOWERED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Which records belong to the subject: those whose `field` (a dotted path) equals the
/// locator's `equals` filled with canonical identifier values ([`identifier::fill`]), without
/// case when all its identifiers are e-mail addresses. Lines that are not JSON are searched
/// for the same text with the free-text matcher Loki line filters use
/// ([`identifier::FreeText`]): where it stands on its own, the line is a copy of the subject's
/// data.
#[derive(Clone)]
pub struct Matcher {
    path: Vec<String>,
    /// The filled value; lower-cased when `fold`.
    value: String,
    fold: bool,
    /// Finds `value` in a line (lower-cased ASCII when `fold`); `None`: every line is a
    /// candidate (a folded value with non-ASCII letters).
    finder: Option<memmem::Finder<'static>>,
    free_text: FreeText,
    drop_unparsed: bool,
}

/// What the filter decided for one line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Keep,
    /// The subject's record.
    Drop,
    /// Not a JSON value: kept as it is, and counted.
    Malformed,
    /// Not a JSON value, and it holds the identifier: a copy of the subject's data. Dropped
    /// only when the matcher drops unparsed copies; counted either way.
    UnparsedCopy,
}

impl Matcher {
    pub fn new(field: &str, equals: &Filled) -> Self {
        let fold = equals.folds_whole_value();
        let value = if fold {
            equals.text().to_lowercase()
        } else {
            equals.text()
        };
        let finder =
            (!fold || value.is_ascii()).then(|| memmem::Finder::new(value.as_bytes()).into_owned());
        Self {
            path: field.split('.').map(str::to_string).collect(),
            value,
            fold,
            finder,
            free_text: equals.free_text(),
            drop_unparsed: false,
        }
    }

    /// Drop lines that are not JSON but hold the identifier (`unparsedLines: DropMatching`).
    pub fn dropping_unparsed(mut self, drop: bool) -> Self {
        self.drop_unparsed = drop;
        self
    }

    pub fn drops_unparsed(&self) -> bool {
        self.drop_unparsed
    }

    fn candidate(&self, line: &[u8]) -> bool {
        match &self.finder {
            None => true,
            // The value is lower-case: a line without capitals is searched as it is, and
            // only a line with some is lower-cased (into a buffer reused line after line).
            Some(finder) if self.fold => {
                finder.find(line).is_some()
                    || (line.iter().any(u8::is_ascii_uppercase)
                        && LOWERED.with(|buffer| {
                            let mut buffer = buffer.borrow_mut();
                            buffer.clear();
                            buffer.extend(line.iter().map(u8::to_ascii_lowercase));
                            finder.find(&buffer).is_some()
                        }))
            }
            Some(finder) => finder.find(line).is_some(),
        }
    }

    fn same(&self, text: &str) -> bool {
        let text = text.trim();
        if self.fold {
            text.to_lowercase() == self.value
        } else {
            text == self.value
        }
    }

    pub fn verdict(&self, line: &[u8]) -> Verdict {
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            return Verdict::Keep;
        }
        // A record can only hold the value if its bytes appear literally or JSON escapes
        // could spell them; everything else only needs a validity check, which is cheaper.
        let candidate = self.candidate(trimmed) || trimmed.contains(&b'\\');
        if !candidate {
            return match serde_json::from_slice::<serde::de::IgnoredAny>(trimmed) {
                Ok(_) => Verdict::Keep,
                Err(_) => Verdict::Malformed,
            };
        }
        let Ok(record) = serde_json::from_slice::<Value>(trimmed) else {
            return if self.free_text.is_in(&String::from_utf8_lossy(trimmed)) {
                Verdict::UnparsedCopy
            } else {
                Verdict::Malformed
            };
        };
        let mut node = &record;
        for part in &self.path {
            match node.get(part) {
                Some(next) => node = next,
                None => return Verdict::Keep,
            }
        }
        let equal = match node {
            Value::String(s) => self.same(s),
            Value::Number(n) => self.same(&n.to_string()),
            _ => false,
        };
        if equal {
            Verdict::Drop
        } else {
            Verdict::Keep
        }
    }
}

/// The counts of one pass over one object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub lines: u64,
    /// The subject's records (dropped, when writing).
    pub matched: u64,
    /// Lines that are not JSON (including `unparsed`).
    pub malformed: u64,
    /// Lines that are not JSON but hold the identifier (dropped when writing, if the matcher
    /// drops them).
    pub unparsed: u64,
    /// Bytes of the decoded (uncompressed) content read.
    pub bytes: u64,
}

/// A reader that yields the bytes sniffed, then the rest.
type Sniffed<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// Reads the first two bytes to tell gzip from plain content, and gives back a reader that
/// still yields them.
fn sniff<R: Read>(mut input: R) -> io::Result<(bool, Sniffed<R>)> {
    let mut head = Vec::with_capacity(2);
    while head.len() < 2 {
        let mut byte = [0u8; 2];
        let n = input.read(&mut byte[..2 - head.len()])?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&byte[..n]);
    }
    let gzip = head == GZIP_MAGIC;
    Ok((gzip, io::Cursor::new(head).chain(input)))
}

/// Counts the subject's records in an object, reading it once.
pub fn scan(input: impl Read, matcher: &Matcher) -> io::Result<Counts> {
    let (gzip, input) = sniff(input)?;
    let input = BufReader::with_capacity(256 * 1024, input);
    if gzip {
        let decoded = BufReader::with_capacity(256 * 1024, MultiGzDecoder::new(input));
        filter_lines(decoded, matcher, None::<&mut io::Sink>)
    } else {
        filter_lines(input, matcher, None::<&mut io::Sink>)
    }
}

/// Writes the object without the subject's records to `output`, compressed the way the input
/// was. Compression runs on a second thread, so reading, filtering and compressing overlap.
pub fn rewrite(
    input: impl Read,
    matcher: &Matcher,
    output: impl Write + Send,
) -> io::Result<Counts> {
    let (gzip, input) = sniff(input)?;
    let input = BufReader::with_capacity(256 * 1024, input);
    if !gzip {
        let mut output = io::BufWriter::with_capacity(256 * 1024, output);
        let counts = filter_lines(input, matcher, Some(&mut output))?;
        output.flush()?;
        return Ok(counts);
    }
    let decoded = BufReader::with_capacity(256 * 1024, MultiGzDecoder::new(input));
    thread::scope(|scope| {
        let (sender, receiver) = mpsc::sync_channel::<Vec<u8>>(8);
        let compressor = scope.spawn(move || -> io::Result<()> {
            let mut encoder = GzEncoder::new(output, Compression::default());
            for chunk in receiver {
                encoder.write_all(&chunk)?;
            }
            encoder.finish()?.flush()
        });
        let mut chunks = ChunkSender {
            sender,
            buffer: Vec::with_capacity(CHUNK),
        };
        let filtered = filter_lines(decoded, matcher, Some(&mut chunks)).and_then(|counts| {
            chunks.flush()?;
            Ok(counts)
        });
        drop(chunks);
        let compressed = compressor
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("compressor thread panicked")));
        let counts = filtered?;
        compressed?;
        Ok(counts)
    })
}

const CHUNK: usize = 256 * 1024;

/// Hands filled buffers to the compressor thread.
struct ChunkSender {
    sender: mpsc::SyncSender<Vec<u8>>,
    buffer: Vec<u8>,
}

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buffer, Vec::with_capacity(CHUNK));
        self.sender
            .send(full)
            .map_err(|_| io::Error::other("compressor thread stopped"))
    }
}

/// Reads line by line (keeping each line's own ending), writes every kept line to `output`.
fn filter_lines<W: Write>(
    mut input: impl BufRead,
    matcher: &Matcher,
    mut output: Option<&mut W>,
) -> io::Result<Counts> {
    let mut counts = Counts::default();
    let mut line = Vec::with_capacity(4096);
    loop {
        line.clear();
        let n = input.read_until(b'\n', &mut line)?;
        if n == 0 {
            break;
        }
        counts.lines += 1;
        counts.bytes += n as u64;
        match matcher.verdict(&line) {
            Verdict::Drop => {
                counts.matched += 1;
                continue;
            }
            Verdict::Malformed => counts.malformed += 1,
            Verdict::UnparsedCopy => {
                counts.malformed += 1;
                counts.unparsed += 1;
                if matcher.drops_unparsed() {
                    continue;
                }
            }
            Verdict::Keep => {}
        }
        if let Some(out) = output.as_deref_mut() {
            out.write_all(&line)?;
        }
    }
    Ok(counts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::read::GzDecoder;

    const ARCHIVE: &str = concat!(
        "{\"recipient\":\"alice@example.com\",\"n\":1}\n",
        "{\"recipient\":\"bob@example.com\",\"n\":2}\n",
        "not json at all, alice@example.com\n",
        "\n",
        "{\"recipient\":\"alice@example.com.evil\",\"n\":3}\n",
        "{\"meta\":{\"to\":\"alice@example.com\"},\"n\":4}\r\n",
        "{\"recipient\":\"al\\u0069ce@example.com\",\"n\":5}\n",
        "{\"recipient\":\"bob@example.com\",\"n\":6}"
    );

    fn filled(id_type: &str, value: &str) -> Filled {
        let ids = [(id_type.to_string(), value.to_string())].into();
        crate::backends::identifier::fill(&format!("{{{id_type}}}"), &ids).unwrap()
    }

    fn email_matcher(field: &str, value: &str) -> Matcher {
        Matcher::new(field, &filled("email", value))
    }

    fn id_matcher(field: &str, value: &str) -> Matcher {
        Matcher::new(field, &filled("userId", value))
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn gunzip(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        GzDecoder::new(data).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn drops_exactly_the_subjects_records_and_keeps_every_other_byte() {
        let matcher = email_matcher("recipient", "alice@example.com");
        let mut out = Vec::new();
        let counts = rewrite(ARCHIVE.as_bytes(), &matcher, &mut out).unwrap();
        assert_eq!(counts.matched, 2, "the plain and the \\u-escaped record");
        assert_eq!(counts.malformed, 1);
        assert_eq!(counts.lines, 8);
        let expected: String = ARCHIVE
            .split_inclusive('\n')
            .filter(|l| !l.contains("\"n\":1}") && !l.contains("\"n\":5}"))
            .collect();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn dotted_paths_and_numbers_match() {
        let nested = email_matcher("meta.to", "alice@example.com");
        assert_eq!(
            nested.verdict(b"{\"meta\":{\"to\":\"alice@example.com\"}}\n"),
            Verdict::Drop
        );
        assert_eq!(
            nested.verdict(b"{\"meta\":\"alice@example.com\"}"),
            Verdict::Keep
        );
        let id = id_matcher("userId", "47");
        assert_eq!(id.verdict(b"{\"userId\":47}"), Verdict::Drop);
        assert_eq!(id.verdict(b"{\"userId\":4711}"), Verdict::Keep);
        assert_eq!(id.verdict(b"{\"userId\":\"4711\"}"), Verdict::Keep);
        assert_eq!(id.verdict(b"[47]"), Verdict::Keep);
    }

    #[test]
    fn gzip_is_detected_by_content_and_rewritten_as_gzip() {
        let matcher = email_matcher("recipient", "alice@example.com");
        let compressed = gzip(ARCHIVE.as_bytes());
        let counts = scan(&compressed[..], &matcher).unwrap();
        assert_eq!((counts.matched, counts.malformed), (2, 1));
        let mut out = Vec::new();
        rewrite(&compressed[..], &matcher, &mut out).unwrap();
        assert!(out.starts_with(&GZIP_MAGIC));
        let mut plain = Vec::new();
        rewrite(ARCHIVE.as_bytes(), &matcher, &mut plain).unwrap();
        assert_eq!(gunzip(&out), plain);
    }

    #[test]
    fn concatenated_gzip_members_are_read_whole() {
        let matcher = email_matcher("recipient", "alice@example.com");
        let mut two = gzip(b"{\"recipient\":\"alice@example.com\"}\n");
        two.extend(gzip(
            b"{\"recipient\":\"alice@example.com\"}\n{\"recipient\":\"x\"}\n",
        ));
        assert_eq!(scan(&two[..], &matcher).unwrap().matched, 2);
    }

    #[test]
    fn an_archive_without_the_subject_is_unchanged() {
        let matcher = email_matcher("recipient", "carol@example.com");
        let mut out = Vec::new();
        let counts = rewrite(ARCHIVE.as_bytes(), &matcher, &mut out).unwrap();
        assert_eq!(counts.matched, 0);
        assert_eq!(out, ARCHIVE.as_bytes());
        assert_eq!(scan(&b""[..], &matcher).unwrap(), Counts::default());
    }

    #[test]
    fn email_records_match_without_case_and_other_ids_exactly() {
        let m = email_matcher("to", "Alice@Example.com\n");
        assert_eq!(m.verdict(b"{\"to\":\"ALICE@example.COM\"}"), Verdict::Drop);
        assert_eq!(m.verdict(b"{\"to\":\"alice@example.com \"}"), Verdict::Drop);
        assert_eq!(m.verdict(b"{\"to\":\"xalice@example.com\"}"), Verdict::Keep);
        let id = id_matcher("userId", "AbC-47\n");
        assert_eq!(id.verdict(b"{\"userId\":\"AbC-47\"}"), Verdict::Drop);
        assert_eq!(id.verdict(b"{\"userId\":\"abc-47\"}"), Verdict::Keep);
    }

    const UNPARSED: &str = concat!(
        "{\"recipient\":\"alice@example.com\",\"n\":1}\n",
        "2026-11-01 10:42:13 sent to ALICE@example.com\n",
        "2026-11-01 10:42:14 sent to xalice@example.com.evil\n",
        "{\"recipient\":\"bob@example.com\",\"n\":2}\n",
        "{\"recipient\":\"alice@exa\n",
    );

    #[test]
    fn lines_that_are_not_json_but_hold_the_identifier_are_copies() {
        let keep = email_matcher("recipient", "alice@example.com");
        let mut out = Vec::new();
        let counts = rewrite(UNPARSED.as_bytes(), &keep, &mut out).unwrap();
        assert_eq!(
            (counts.matched, counts.unparsed, counts.malformed),
            (1, 1, 3),
            "a truncated record does not hold the whole address"
        );
        let kept = String::from_utf8(out).unwrap();
        assert!(
            kept.contains("sent to ALICE@example.com"),
            "kept by default"
        );
        let drop = email_matcher("recipient", "alice@example.com").dropping_unparsed(true);
        let mut out = Vec::new();
        let counts = rewrite(UNPARSED.as_bytes(), &drop, &mut out).unwrap();
        assert_eq!((counts.matched, counts.unparsed), (1, 1));
        let expected: String = UNPARSED
            .split_inclusive('\n')
            .filter(|l| !l.contains("\"n\":1") && !l.contains("ALICE"))
            .collect();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        assert_eq!(scan(UNPARSED.as_bytes(), &drop).unwrap().unparsed, 1);
    }

    #[test]
    fn a_short_id_is_found_in_free_text_only_where_it_stands_on_its_own() {
        let id = id_matcher("userId", "42");
        for line in ["login from 4711", "x42y", "uid=420"] {
            assert_eq!(id.verdict(line.as_bytes()), Verdict::Malformed, "{line}");
        }
        assert_eq!(id.verdict(b"uid 42 paid"), Verdict::UnparsedCopy);
        // What a boundary cannot tell: the step refuses to judge such a value in free text
        // (IdentifierNotDistinctive) rather than count or drop these lines.
        assert_eq!(id.verdict(b"10:42:13 login"), Verdict::UnparsedCopy);
        // A distinctive id is never taken for a timestamp.
        let long = id_matcher("userId", "user-4711x");
        assert_eq!(long.verdict(b"10:42:13 user-4711xy"), Verdict::Malformed);
        assert_eq!(long.verdict(b"10:42:13 user-4711x"), Verdict::UnparsedCopy);
    }
}
