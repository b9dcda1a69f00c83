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

/// Many subjects' records at once: one lookup from a record's field value (trimmed, and
/// lower-cased when every identifier of `equals` is an e-mail address, as [`Matcher`]
/// compares) to the members whose filled `equals` it is, built once per step. A line is
/// parsed once, only down to the field, and costs one hash lookup whatever the number of
/// members. Lines that are not JSON are searched for every member's text at once
/// (Aho-Corasick), each hit confirmed by that member's [`FreeText`].
pub struct MemberLookup {
    path: Vec<String>,
    fold: bool,
    by_value: std::collections::HashMap<String, Vec<usize>>,
    /// Finds any member's filled text in a line (ASCII letters in any case).
    texts: Option<aho_corasick::AhoCorasick>,
    /// The member of each of `texts`' patterns.
    pattern_member: Vec<usize>,
    /// Members whose text a case-insensitive ASCII search cannot find (non-ASCII letters
    /// matched without case): always confirmed.
    always: Vec<usize>,
    /// Per member index: its free-text matcher (None: not in this lookup).
    free: Vec<Option<FreeText>>,
    /// Per member index: whether its unparsed copies are dropped with its records.
    drop_unparsed: Vec<bool>,
}

/// One member of a [`MemberLookup`]: its index in the batch, its filled `equals`, and
/// whether lines that are not JSON but hold its identifier are dropped.
pub struct LookupMember<'a> {
    pub index: usize,
    pub equals: &'a Filled,
    pub drop_unparsed: bool,
}

impl MemberLookup {
    /// The lookup for `members` (indices below `size`) of one records `field`.
    pub fn new<'a>(
        field: &str,
        size: usize,
        members: impl IntoIterator<Item = LookupMember<'a>>,
    ) -> Self {
        let mut lookup = Self {
            path: field.split('.').map(str::to_string).collect(),
            fold: false,
            by_value: std::collections::HashMap::new(),
            texts: None,
            pattern_member: Vec::new(),
            always: Vec::new(),
            free: vec![None; size],
            drop_unparsed: vec![false; size],
        };
        let mut patterns = Vec::new();
        for m in members {
            if m.index >= size {
                continue;
            }
            // Every member fills the same template: its identifier types, hence `fold`, are
            // the same for all.
            lookup.fold = m.equals.folds_whole_value();
            let text = m.equals.text();
            let value = if lookup.fold {
                text.to_lowercase()
            } else {
                text.clone()
            };
            let owners = lookup.by_value.entry(value).or_default();
            if !owners.contains(&m.index) {
                owners.push(m.index);
            }
            let folds_non_ascii = m.equals.pieces.iter().any(|p| {
                matches!(p, crate::backends::identifier::Piece::Value { value, fold: true, .. }
                    if !value.is_ascii())
            });
            if folds_non_ascii {
                lookup.always.push(m.index);
            } else {
                patterns.push(text);
                lookup.pattern_member.push(m.index);
            }
            lookup.free[m.index] = Some(m.equals.free_text());
            lookup.drop_unparsed[m.index] = m.drop_unparsed;
        }
        if !patterns.is_empty() {
            lookup.texts = aho_corasick::AhoCorasick::builder()
                .ascii_case_insensitive(true)
                .build(&patterns)
                .ok();
            if lookup.texts.is_none() {
                // Too large to build: every member is confirmed on its own instead.
                lookup.always.append(&mut lookup.pattern_member);
            }
        }
        lookup
    }

    /// The members whose records the field value `text` marks.
    fn owners(&self, text: &str) -> &[usize] {
        let text = text.trim();
        let found = if self.fold {
            self.by_value.get(&text.to_lowercase())
        } else {
            self.by_value.get(text)
        };
        found.map_or(&[], Vec::as_slice)
    }

    /// The members whose identifier a line that is not JSON holds (each once), into `out`.
    fn in_free_text(&self, line: &[u8], out: &mut Vec<usize>) {
        out.clear();
        let mut candidates: Vec<usize> = self.always.clone();
        if let Some(texts) = &self.texts {
            candidates.extend(
                texts
                    .find_overlapping_iter(line)
                    .filter_map(|m| self.pattern_member.get(m.pattern().as_usize()).copied()),
            );
        }
        if candidates.is_empty() {
            return;
        }
        candidates.sort_unstable();
        candidates.dedup();
        let text = String::from_utf8_lossy(line);
        for m in candidates {
            if self
                .free
                .get(m)
                .and_then(Option::as_ref)
                .is_some_and(|f| f.is_in(&text))
            {
                out.push(m);
            }
        }
    }
}

/// One pass of a [`MemberLookup`] over one object: per member, what it found and (when
/// writing) removed. `excluded` members' records are kept: a record is dropped when a
/// member that is not excluded owns it, and then counts for every member that owns it.
pub struct MemberPass {
    lookup: std::sync::Arc<MemberLookup>,
    excluded: Vec<bool>,
    /// Per member: its records in the object.
    pub found: Vec<u64>,
    /// Per member: its records dropped.
    pub removed: Vec<u64>,
    /// Per member: lines that are not JSON holding its identifier.
    pub unparsed: Vec<u64>,
    /// Per member: such lines dropped.
    pub unparsed_removed: Vec<u64>,
    scratch: Vec<usize>,
}

impl MemberPass {
    pub fn new(
        lookup: std::sync::Arc<MemberLookup>,
        excluded: &std::collections::BTreeSet<usize>,
    ) -> Self {
        let size = lookup.free.len();
        Self {
            excluded: (0..size).map(|i| excluded.contains(&i)).collect(),
            lookup,
            found: vec![0; size],
            removed: vec![0; size],
            unparsed: vec![0; size],
            unparsed_removed: vec![0; size],
            scratch: Vec::new(),
        }
    }

    /// The member's copies found: its records, and its unparsed lines when those are
    /// dropped with them.
    pub fn found_copies(&self, m: usize) -> u64 {
        let unparsed = if self.lookup.drop_unparsed.get(m) == Some(&true) {
            self.unparsed.get(m).copied().unwrap_or(0)
        } else {
            0
        };
        self.found
            .get(m)
            .copied()
            .unwrap_or(0)
            .saturating_add(unparsed)
    }

    /// The member's copies this pass removed.
    pub fn removed_copies(&self, m: usize) -> u64 {
        let records = self.removed.get(m).copied().unwrap_or(0);
        records.saturating_add(self.unparsed_removed.get(m).copied().unwrap_or(0))
    }

    /// Whether the pass removed anything.
    pub fn removed_any(&self) -> bool {
        self.removed
            .iter()
            .chain(&self.unparsed_removed)
            .any(|n| *n > 0)
    }

    fn bump(counts: &mut [u64], m: usize) {
        if let Some(n) = counts.get_mut(m) {
            *n = n.saturating_add(1);
        }
    }
}

impl Filter for MemberPass {
    fn judge(&mut self, line: &[u8]) -> Outcome {
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            return Outcome::Keep;
        }
        let mut de = serde_json::Deserializer::from_slice(trimmed);
        let parsed = serde::de::DeserializeSeed::deserialize(Field(&self.lookup.path), &mut de)
            .and_then(|leaf| de.end().map(|()| leaf));
        match parsed {
            Ok(leaf) => {
                let owners = leaf.as_deref().map_or(&[][..], |t| self.lookup.owners(t));
                if owners.is_empty() {
                    return Outcome::Keep;
                }
                let drop = owners.iter().any(|m| !self.excluded[*m]);
                for m in owners {
                    Self::bump(&mut self.found, *m);
                    if drop {
                        Self::bump(&mut self.removed, *m);
                    }
                }
                if drop {
                    Outcome::Drop
                } else {
                    Outcome::Keep
                }
            }
            Err(_) => {
                let mut hits = std::mem::take(&mut self.scratch);
                self.lookup.in_free_text(trimmed, &mut hits);
                let drop = hits
                    .iter()
                    .any(|m| !self.excluded[*m] && self.lookup.drop_unparsed[*m]);
                for m in &hits {
                    Self::bump(&mut self.unparsed, *m);
                    if drop && self.lookup.drop_unparsed[*m] {
                        Self::bump(&mut self.unparsed_removed, *m);
                    }
                }
                let outcome = if hits.is_empty() {
                    Outcome::Malformed
                } else {
                    Outcome::Unparsed { drop }
                };
                self.scratch = hits;
                outcome
            }
        }
    }
}

/// Reads a JSON value down to the field at a dotted path only: its text when it is a string
/// or a number (as [`Matcher`] reads it: the last of duplicate keys), None otherwise;
/// everything else is validated and passed over.
struct Field<'p>(&'p [String]);

/// Whether a map key is the one looked for, without allocating it.
struct KeyIs<'p>(&'p str);

impl<'de> serde::de::DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map key")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Field<'_> {
    type Value = Option<String>;

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Field<'_> {
    type Value = Option<String>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(self.0.is_empty().then(|| v.to_string()))
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(self.0.is_empty().then(|| v.to_string()))
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(self.0.is_empty().then(|| v.to_string()))
    }

    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(self
            .0
            .is_empty()
            .then(|| serde_json::Number::from_f64(v).map(|n| n.to_string()))
            .flatten())
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(None)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let Some((first, rest)) = self.0.split_first() else {
            while map
                .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                .is_some()
            {}
            return Ok(None);
        };
        let mut found = None;
        while let Some(ours) = map.next_key_seed(KeyIs(first))? {
            if ours {
                found = map.next_value_seed(Field(rest))?;
            } else {
                map.next_value::<serde::de::IgnoredAny>()?;
            }
        }
        Ok(found)
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

/// What a filter decided for one line, for [`filter_lines`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Keep,
    /// A record dropped (counted in [`Counts::matched`]).
    Drop,
    /// Not a JSON value: kept as it is, and counted.
    Malformed,
    /// Not a JSON value, and it holds an identifier; dropped when `drop`.
    Unparsed {
        drop: bool,
    },
}

/// Decides line by line what a pass over an archive keeps: one subject's [`Matcher`], or
/// many subjects' [`MemberPass`].
pub trait Filter {
    fn judge(&mut self, line: &[u8]) -> Outcome;
}

impl Filter for Matcher {
    fn judge(&mut self, line: &[u8]) -> Outcome {
        (&*self).judge(line)
    }
}

impl Filter for &Matcher {
    fn judge(&mut self, line: &[u8]) -> Outcome {
        match self.verdict(line) {
            Verdict::Keep => Outcome::Keep,
            Verdict::Drop => Outcome::Drop,
            Verdict::Malformed => Outcome::Malformed,
            Verdict::UnparsedCopy => Outcome::Unparsed {
                drop: self.drop_unparsed,
            },
        }
    }
}

/// Counts the subject's records in an object, reading it once.
pub fn scan(input: impl Read, matcher: &Matcher) -> io::Result<Counts> {
    scan_with(input, &mut { matcher })
}

/// Runs `filter` over every line of an object without writing anything, reading it once.
pub fn scan_with(input: impl Read, filter: &mut impl Filter) -> io::Result<Counts> {
    let (gzip, input) = sniff(input)?;
    let input = BufReader::with_capacity(256 * 1024, input);
    if gzip {
        let decoded = BufReader::with_capacity(256 * 1024, MultiGzDecoder::new(input));
        filter_lines(decoded, filter, None::<&mut io::Sink>)
    } else {
        filter_lines(input, filter, None::<&mut io::Sink>)
    }
}

/// Writes the object without the subject's records to `output`, compressed the way the input
/// was. Compression runs on a second thread, so reading, filtering and compressing overlap.
pub fn rewrite(
    input: impl Read,
    matcher: &Matcher,
    output: impl Write + Send,
) -> io::Result<Counts> {
    rewrite_with(input, &mut { matcher }, output)
}

/// [`rewrite`] with any [`Filter`]: what it drops is left out, every other byte kept.
pub fn rewrite_with(
    input: impl Read,
    filter: &mut impl Filter,
    output: impl Write + Send,
) -> io::Result<Counts> {
    let (gzip, input) = sniff(input)?;
    let input = BufReader::with_capacity(256 * 1024, input);
    if !gzip {
        let mut output = io::BufWriter::with_capacity(256 * 1024, output);
        let counts = filter_lines(input, filter, Some(&mut output))?;
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
        let filtered = filter_lines(decoded, filter, Some(&mut chunks)).and_then(|counts| {
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
    filter: &mut impl Filter,
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
        match filter.judge(&line) {
            Outcome::Drop => {
                counts.matched += 1;
                continue;
            }
            Outcome::Malformed => counts.malformed += 1,
            Outcome::Unparsed { drop } => {
                counts.malformed += 1;
                counts.unparsed += 1;
                if drop {
                    continue;
                }
            }
            Outcome::Keep => {}
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

    fn lookup(field: &str, members: &[(&str, &str, bool)]) -> std::sync::Arc<MemberLookup> {
        let filled: Vec<Filled> = members.iter().map(|(t, v, _)| filled(t, v)).collect();
        std::sync::Arc::new(MemberLookup::new(
            field,
            members.len(),
            members
                .iter()
                .zip(&filled)
                .enumerate()
                .map(|(index, ((_, _, drop), equals))| LookupMember {
                    index,
                    equals,
                    drop_unparsed: *drop,
                }),
        ))
    }

    const MANY: &str = concat!(
        "{\"msg\":{\"to\":\"alice@example.com\"},\"n\":1}\n",
        "{\"msg\":{\"to\":\"bob@example.com\"},\"n\":2}\n",
        "{\"msg\":{\"to\":\"carol@example.com\"},\"n\":3}\n",
        "{\"msg\":{\"to\":\"ALICE@example.com \"},\"n\":4}\r\n",
        "not json, sent to Bob@Example.com\n",
        "{\"msg\":{\"to\":\"al\\u0069ce@example.com\"},\"n\":5}\n",
        "\n",
        "{\"msg\":{\"to\":\"alice@example.com.evil\"},\"n\":6}\n",
        "{\"msg\":{\"to\":\"dave@example.com\"},\"msg\":{\"to\":\"x\"},\"n\":7}\n",
        "{\"msg\":{\"to\":\"bob@example.com\"},\"n\":8}"
    );

    #[test]
    fn one_pass_attributes_each_record_to_its_member_and_keeps_the_rest_byte_for_byte() {
        let lookup = lookup(
            "msg.to",
            &[
                ("email", "Alice@Example.com", false),
                ("email", "bob@example.com", true),
                ("email", "dave@example.com", false),
                ("email", "nobody@example.com", false),
            ],
        );
        let mut pass = MemberPass::new(lookup.clone(), &Default::default());
        let mut out = Vec::new();
        let counts = rewrite_with(MANY.as_bytes(), &mut pass, &mut out).unwrap();
        assert_eq!(
            pass.found,
            vec![3, 2, 0, 0],
            "the last of duplicate keys counts"
        );
        assert_eq!(pass.removed, pass.found);
        assert_eq!(pass.unparsed, vec![0, 1, 0, 0]);
        assert_eq!(pass.unparsed_removed, vec![0, 1, 0, 0], "bob's are dropped");
        assert_eq!(
            (0..4).map(|m| pass.removed_copies(m)).collect::<Vec<_>>(),
            vec![3, 3, 0, 0]
        );
        assert_eq!(
            (counts.matched, counts.malformed, counts.unparsed),
            (5, 1, 1)
        );
        let expected: String = MANY
            .split_inclusive('\n')
            .filter(|l| {
                ![
                    "\"n\":1}", "\"n\":2}", "\"n\":4}", "\"n\":5}", "Bob@", "\"n\":8}",
                ]
                .iter()
                .any(|m| l.contains(m))
            })
            .collect();
        assert_eq!(String::from_utf8(out).unwrap(), expected);
        // The same verdicts as one member's matcher, member by member.
        for (m, who) in ["alice@example.com", "bob@example.com"].iter().enumerate() {
            let single = email_matcher("msg.to", who);
            assert_eq!(
                scan(MANY.as_bytes(), &single).unwrap().matched,
                pass.found[m]
            );
        }
        // Gzip in, gzip out, the same lines.
        let mut again = MemberPass::new(lookup, &Default::default());
        let mut zipped = Vec::new();
        rewrite_with(&gzip(MANY.as_bytes())[..], &mut again, &mut zipped).unwrap();
        assert_eq!(gunzip(&zipped), expected.as_bytes());
    }

    #[test]
    fn a_record_of_two_members_is_dropped_once_and_counted_for_both() {
        let lookup = lookup(
            "userId",
            &[
                ("userId", "47", false),
                ("userId", "47", false),
                ("userId", "4711", false),
            ],
        );
        let lines = "{\"userId\":47}\n{\"userId\":\"4711\"}\n{\"userId\":470}\n";
        let mut pass = MemberPass::new(lookup.clone(), &Default::default());
        let mut out = Vec::new();
        let counts = rewrite_with(lines.as_bytes(), &mut pass, &mut out).unwrap();
        assert_eq!(counts.matched, 2, "each line dropped once");
        assert_eq!(pass.removed, vec![1, 1, 1]);
        assert_eq!(String::from_utf8(out).unwrap(), "{\"userId\":470}\n");
        let mut found = MemberPass::new(lookup, &Default::default());
        let counts = scan_with(lines.as_bytes(), &mut found).unwrap();
        assert_eq!((found.found.clone(), counts.lines), (vec![1, 1, 1], 3));
    }

    #[test]
    fn an_excluded_members_records_are_kept_unless_another_member_owns_them() {
        let lookup = lookup(
            "to",
            &[
                ("email", "a@example.com", true),
                ("email", "b@example.com", true),
                ("email", "a@example.com", true),
            ],
        );
        let lines = concat!(
            "{\"to\":\"a@example.com\"}\n",
            "{\"to\":\"b@example.com\"}\n",
            "free text for b@example.com\n",
            "{\"to\":\"c@example.com\"}\n",
        );
        let held = [1].into_iter().collect();
        let mut pass = MemberPass::new(lookup.clone(), &held);
        let mut out = Vec::new();
        rewrite_with(lines.as_bytes(), &mut pass, &mut out).unwrap();
        assert_eq!(pass.removed_copies(1), 0);
        assert_eq!((pass.removed_copies(0), pass.removed_copies(2)), (1, 1));
        assert_eq!(pass.found_copies(1), 2, "found, and kept");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            lines.split_inclusive('\n').skip(1).collect::<String>()
        );
        // Excluding one of two owners of a record still drops it: the other owns it too.
        let held = [0].into_iter().collect();
        let mut pass = MemberPass::new(lookup, &held);
        let mut out = Vec::new();
        rewrite_with(lines.as_bytes(), &mut pass, &mut out).unwrap();
        assert_eq!(pass.removed, vec![1, 1, 1]);
        assert!(!String::from_utf8(out).unwrap().contains("a@example.com"));
    }

    #[test]
    fn the_lookup_reads_values_as_the_single_matcher_does() {
        let lookup = lookup(
            "a.b",
            &[("userId", "AbC-47", false), ("userId", "1.5", false)],
        );
        let mut pass = MemberPass::new(lookup, &Default::default());
        for (line, outcome) in [
            (&b"{\"a\":{\"b\":\"AbC-47\"}}"[..], Outcome::Drop),
            (b"{\"a\":{\"b\":\" AbC-47 \"}}", Outcome::Drop),
            (b"{\"a\":{\"b\":\"abc-47\"}}", Outcome::Keep),
            (b"{\"a\":{\"b\":1.5}}", Outcome::Drop),
            (b"{\"a\":[{\"b\":\"AbC-47\"}]}", Outcome::Keep),
            (b"{\"a\":{\"b\":[\"AbC-47\"]}}", Outcome::Keep),
            (
                b"{\"a\":{\"b\":\"AbC-47\"}} trailing",
                Outcome::Unparsed { drop: false },
            ),
            (b"[1,2", Outcome::Malformed),
            (b"   ", Outcome::Keep),
        ] {
            assert_eq!(
                pass.judge(line),
                outcome,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(pass.found, vec![2, 1]);
        assert_eq!(pass.unparsed, vec![1, 0]);
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
