//! One data subject in a bucket: every object and version under the subject's key prefixes,
//! and the subject's records inside JSON-lines archives.
//!
//! Counts are of copies of personal data: each object version (and delete marker) under a key
//! prefix, and each matching record in each version of an archive. Find, Erase and Verify
//! count the same way, so a dry run's count is what the real run erases.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::ObjectIdentifier;
use tokio_util::io::SyncIoBridge;

use super::records::{self, Counts, Matcher};
use super::sweep::{Cursor, Recorded, ORIGINAL_TIME};
use super::{object_id, sdk_error, S3Backend};
use crate::api::retentionpolicy::UnparsedLines;
use crate::api::StoreKind;
use crate::backends::identifier;
use crate::backends::template;
use crate::backends::{
    subject_locator, Error, LockedCopies, Next, SubjectAction, SubjectJob, SubjectStep,
};

/// Attempts at a conditional write before giving up on an archive that keeps changing.
const WRITE_ATTEMPTS: u32 = 5;

/// Running totals of one subject step.
#[derive(Default)]
struct Tally {
    count: u64,
    blocked: u64,
    malformed: u64,
    /// Objects (key, and whether an older version) with lines that are not JSON but hold
    /// the identifier, and how many.
    unparsed: Vec<(String, bool, u64)>,
}

/// How many archive objects with unparsed copies a message names.
const NAMED_OBJECTS: usize = 5;

impl S3Backend {
    pub(super) async fn subject(&self, job: &SubjectJob) -> Result<SubjectStep, Error> {
        let locator = subject_locator(&job.target, StoreKind::S3, |s| s.s3.as_ref())?;
        let mut skipped = Vec::new();
        let mut tally = Tally::default();
        let mut ran = false;
        let versioned = self.versioned().await?;
        for (i, t) in locator.key_prefixes.iter().enumerate() {
            let Some(prefixes) = expand(&format!("keyPrefixes[{i}]"), t, job, &mut skipped)? else {
                continue;
            };
            ran = true;
            for prefix in prefixes {
                self.prefix_objects(&prefix, versioned, job.action, &mut tally)
                    .await?;
            }
        }
        let mut failure = None;
        if let Some(spec) = &locator.records {
            let prefixes = expand("records.prefix", &spec.prefix, job, &mut skipped)?;
            let equals = fill_equals(&spec.equals, job, &mut skipped)?;
            if let (Some(prefixes), Some(equals)) = (prefixes, equals) {
                ran = true;
                // Lines that are not JSON are only dropped when the value can be told apart
                // from other text (the same rule as a Loki line filter's bare placeholder).
                let distinctive = equals.check_distinctive();
                let drop = spec.unparsed_lines == UnparsedLines::DropMatching;
                let matcher = Matcher::new(&spec.field, &equals)
                    .dropping_unparsed(drop && distinctive.is_ok());
                for prefix in prefixes {
                    self.archive_records(&prefix, &matcher, versioned, job.action, &mut tally)
                        .await?;
                }
                failure = unparsed_failure(job, &tally, distinctive.err(), drop);
            }
        }
        Ok(SubjectStep {
            count: tally.count,
            blocked: tally.blocked,
            malformed: tally.malformed,
            ran,
            skipped,
            next: Next::Done,
            failure,
        })
    }

    /// The subject's copies in versions under Object Lock (retention not yet lapsed, or a
    /// legal hold), counted as Verify counts them: each version under a key prefix, each
    /// matching record in an archive version. Never the keys: only counts and dates.
    pub(super) async fn subject_locked_copies(
        &self,
        job: &SubjectJob,
    ) -> Result<LockedCopies, Error> {
        let mut locked = LockedCopies::default();
        let Some(locator) = job.target.subject.as_ref().and_then(|s| s.s3.as_ref()) else {
            return Ok(locked);
        };
        if !self.versioned().await? {
            return Ok(locked);
        }
        let mut skipped = Vec::new();
        let mut prefixes = Vec::new();
        for (i, t) in locator.key_prefixes.iter().enumerate() {
            if let Some(forms) = expand(&format!("keyPrefixes[{i}]"), t, job, &mut skipped)? {
                prefixes.extend(forms.into_iter().map(|p| (p, None)));
            }
        }
        if let Some(spec) = &locator.records {
            let forms = expand("records.prefix", &spec.prefix, job, &mut skipped)?;
            let equals = fill_equals(&spec.equals, job, &mut skipped)?;
            if let (Some(forms), Some(equals)) = (forms, equals) {
                let matcher = Matcher::new(&spec.field, &equals);
                prefixes.extend(forms.into_iter().map(|p| (p, Some(matcher.clone()))));
            }
        }
        for (prefix, matcher) in prefixes {
            let mut position = Cursor::default();
            loop {
                let (entries, next) = self.list_versions(&prefix, &position).await?;
                for entry in entries.iter().filter(|e| !e.delete_marker) {
                    let version = entry.version_id.as_deref();
                    let Some((until, held)) = self.lock_state(&entry.key, version).await? else {
                        continue;
                    };
                    let copies = match &matcher {
                        None => 1,
                        Some(m) => self.scan_object(&entry.key, version, m).await?.matched,
                    };
                    if copies > 0 {
                        locked.add(copies, until, held);
                    }
                }
                match next {
                    Some(n) => position = n,
                    None => break,
                }
            }
        }
        Ok(locked)
    }

    /// A version's Object Lock, if one is in force now: (retain-until, legal hold).
    async fn lock_state(
        &self,
        key: &str,
        version_id: Option<&str>,
    ) -> Result<Option<(Option<chrono::DateTime<chrono::Utc>>, bool)>, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let head = client
            .head_object()
            .bucket(&self.config.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(e, "HeadObject"))?;
        let held = head.object_lock_legal_hold_status()
            == Some(&aws_sdk_s3::types::ObjectLockLegalHoldStatus::On);
        let until = super::sweep::to_chrono(head.object_lock_retain_until_date())
            .filter(|u| *u > chrono::Utc::now() && head.object_lock_mode().is_some());
        Ok((held || until.is_some()).then_some((until, held)))
    }

    /// Every object, version and delete marker under `prefix`: counted, or deleted.
    async fn prefix_objects(
        &self,
        prefix: &str,
        versioned: bool,
        action: SubjectAction,
        tally: &mut Tally,
    ) -> Result<(), Error> {
        let mut position = Cursor::default();
        // The version a listing resumes after is deleted only once the listing is done: some
        // servers cannot resume after a version that no longer exists.
        let mut deferred: Vec<ObjectIdentifier> = Vec::new();
        loop {
            let (entries, next) = if versioned {
                self.list_versions(prefix, &position).await?
            } else {
                self.list_objects(prefix, &position).await?
            };
            if action == SubjectAction::Erase {
                let resume_after = next
                    .as_ref()
                    .map(|n| (n.key_marker.as_deref(), n.version_marker.as_deref()));
                let mut now = Vec::with_capacity(entries.len());
                for e in &entries {
                    let id = object_id(&e.key, e.version_id.as_deref())?;
                    if versioned
                        && resume_after == Some((Some(e.key.as_str()), e.version_id.as_deref()))
                    {
                        deferred.push(id);
                    } else {
                        now.push(id);
                    }
                }
                self.delete_tallied(now, tally).await?;
            } else {
                tally.count += entries.len() as u64;
            }
            match next {
                Some(n) => position = n,
                None => break,
            }
        }
        self.delete_tallied(deferred, tally).await
    }

    async fn delete_tallied(
        &self,
        objects: Vec<ObjectIdentifier>,
        tally: &mut Tally,
    ) -> Result<(), Error> {
        let done = self.delete_batch(objects).await?;
        tally.count += done.deleted;
        tally.blocked += done.refused.len() as u64;
        Ok(())
    }

    /// The subject's records in every archive under `prefix` (every version of it on a
    /// versioned bucket): counted, or removed.
    async fn archive_records(
        &self,
        prefix: &str,
        matcher: &Matcher,
        versioned: bool,
        action: SubjectAction,
        tally: &mut Tally,
    ) -> Result<(), Error> {
        // Erasing: first every current archive is rewritten without the records.
        let mut replaced: Vec<(String, String)> = Vec::new();
        if action == SubjectAction::Erase {
            let mut position = Cursor::default();
            loop {
                let (entries, next) = self.list_objects(prefix, &position).await?;
                for entry in &entries {
                    let rewrite = self.rewrite_current(&entry.key, matcher).await?;
                    tally.count += copies(&rewrite.counts, matcher);
                    tally.malformed += rewrite.counts.malformed;
                    if rewrite.counts.unparsed > 0 {
                        tally
                            .unparsed
                            .push((entry.key.clone(), false, rewrite.counts.unparsed));
                    }
                    if let Some(v) = rewrite.replaced_version {
                        replaced.push((entry.key.clone(), v));
                    }
                }
                match next {
                    Some(n) => position = n,
                    None => break,
                }
            }
            if !versioned {
                return Ok(());
            }
        }
        // Then every version is read: counted (find, verify), or, if it is an older version
        // still holding records, deleted. The versions just replaced hold exactly the records
        // counted above; they are deleted without being counted twice.
        let mut doomed: Vec<ObjectIdentifier> = Vec::new();
        for (key, version) in &replaced {
            doomed.push(object_id(key, Some(version))?);
        }
        let mut position = Cursor::default();
        loop {
            let (entries, next) = if versioned {
                self.list_versions(prefix, &position).await?
            } else {
                self.list_objects(prefix, &position).await?
            };
            for entry in entries.iter().filter(|e| !e.delete_marker) {
                let version = entry.version_id.as_deref();
                let was_replaced = replaced
                    .iter()
                    .any(|(k, v)| k == &entry.key && Some(v.as_str()) == version);
                if action == SubjectAction::Erase && (entry.latest || was_replaced) {
                    continue;
                }
                let counts = self.scan_object(&entry.key, version, matcher).await?;
                tally.malformed += counts.malformed;
                if counts.unparsed > 0 {
                    tally
                        .unparsed
                        .push((entry.key.clone(), !entry.latest, counts.unparsed));
                }
                let copies = copies(&counts, matcher);
                if copies > 0 {
                    tally.count += copies;
                    if action == SubjectAction::Erase {
                        doomed.push(object_id(&entry.key, version)?);
                    }
                }
            }
            match next {
                Some(n) => position = n,
                None => break,
            }
        }
        let done = self.delete_batch(doomed).await?;
        tally.blocked += done.refused.len() as u64;
        Ok(())
    }

    /// Counts the subject's records in one object (version), streaming it.
    pub(super) async fn scan_object(
        &self,
        key: &str,
        version_id: Option<&str>,
        matcher: &Matcher,
    ) -> Result<Counts, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let object = client
            .get_object()
            .bucket(&self.config.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(e, "GetObject"))?;
        let reader = SyncIoBridge::new(object.body.into_async_read());
        let matcher = matcher.clone();
        tokio::task::spawn_blocking(move || records::scan(reader, &matcher))
            .await
            .map_err(|e| Error::Store(format!("archive scan task failed: {e}")))?
            .map_err(|e| Error::Store(format!("GetObject: reading the archive: {e}")))
    }

    /// Reads the current version, writes it back without the subject's records if any were
    /// there, only if nobody wrote in between (`If-Match`); on a conflict, starts again from
    /// a fresh read.
    async fn rewrite_current(&self, key: &str, matcher: &Matcher) -> Result<Rewrite, Error> {
        let client = self.client().await?;
        let mut last_conflict = None;
        for _ in 0..WRITE_ATTEMPTS {
            // A scan first: archives without the subject are never rewritten.
            self.limits.acquire(1).await;
            let object = client
                .get_object()
                .bucket(&self.config.bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| sdk_error(e, "GetObject"))?;
            let etag = object.e_tag().map(str::to_string).ok_or_else(|| {
                Error::Store("GetObject returned no ETag; a safe rewrite needs one".into())
            })?;
            let read_version = object.version_id().map(str::to_string);
            let mut metadata = Preserved::from(&object);
            if object.tag_count().is_some_and(|n| n > 0) {
                metadata.tagging = Some(self.tagging(key, read_version.as_deref()).await?);
            }
            let spool = tempfile::tempfile()
                .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?;
            let writer = spool
                .try_clone()
                .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?;
            let reader = SyncIoBridge::new(object.body.into_async_read());
            let matcher_owned = matcher.clone();
            let counts = tokio::task::spawn_blocking(move || {
                records::rewrite(reader, &matcher_owned, writer)
            })
            .await
            .map_err(|e| Error::Store(format!("archive rewrite task failed: {e}")))?
            .map_err(|e| Error::Store(format!("GetObject: reading the archive: {e}")))?;
            if copies(&counts, matcher) == 0 {
                return Ok(Rewrite {
                    counts,
                    replaced_version: None,
                });
            }
            if let Some(hook) = &self.before_write {
                hook().await;
            }
            // The writer shared the file's offset: read it back from the start.
            let mut spool = spool;
            std::io::Seek::rewind(&mut spool)
                .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?;
            let length = spool
                .metadata()
                .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?
                .len();
            let body = ByteStream::read_from()
                .file(tokio::fs::File::from_std(spool))
                .length(aws_sdk_s3::primitives::Length::Exact(length))
                .build()
                .await
                .map_err(|e| Error::Store(format!("temporary file for a rewrite: {e}")))?;
            self.limits.acquire(1).await;
            let put = metadata
                .apply(client.put_object())
                .bucket(&self.config.bucket)
                .key(key)
                .if_match(&etag)
                // Buckets with Object Lock refuse writes without a checksum.
                .checksum_algorithm(aws_sdk_s3::types::ChecksumAlgorithm::Crc32)
                .content_length(length as i64)
                .body(body)
                .send()
                .await;
            match put {
                Ok(_) => {
                    return Ok(Rewrite {
                        counts,
                        replaced_version: read_version,
                    })
                }
                Err(e) if is_conflict(&e) => {
                    last_conflict = Some(sdk_error(e, "PutObject"));
                    continue;
                }
                Err(e) => return Err(sdk_error(e, "PutObject")),
            }
        }
        Err(last_conflict
            .unwrap_or_else(|| Error::Store("an archive kept changing during its rewrite".into())))
    }
}

impl S3Backend {
    /// An object's tags, encoded the way PutObject takes them.
    async fn tagging(&self, key: &str, version_id: Option<&str>) -> Result<String, Error> {
        let client = self.client().await?;
        self.limits.acquire(1).await;
        let out = client
            .get_object_tagging()
            .bucket(&self.config.bucket)
            .key(key)
            .set_version_id(version_id.map(str::to_string))
            .send()
            .await
            .map_err(|e| sdk_error(e, "GetObjectTagging"))?;
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for tag in out.tag_set() {
            query.append_pair(tag.key(), tag.value());
        }
        Ok(query.finish())
    }
}

/// What one archive rewrite did.
struct Rewrite {
    counts: Counts,
    /// The version that was read and replaced (versioned buckets): it still holds the records.
    replaced_version: Option<String>,
}

/// Whether a write failed only because the object changed since it was read.
fn is_conflict<E: aws_sdk_s3::error::ProvideErrorMetadata>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> bool {
    match e {
        aws_sdk_s3::error::SdkError::ServiceError(s) => {
            matches!(s.raw().status().as_u16(), 409 | 412)
                || matches!(
                    s.err().code(),
                    Some("PreconditionFailed" | "ConditionalRequestConflict")
                )
        }
        _ => false,
    }
}

/// The attributes a rewritten archive keeps from the original.
struct Preserved {
    content_type: Option<String>,
    content_encoding: Option<String>,
    content_disposition: Option<String>,
    content_language: Option<String>,
    cache_control: Option<String>,
    metadata: Option<std::collections::HashMap<String, String>>,
    storage_class: Option<aws_sdk_s3::types::StorageClass>,
    server_side_encryption: Option<aws_sdk_s3::types::ServerSideEncryption>,
    ssekms_key_id: Option<String>,
    /// Object tags as a URL query string, read separately (GetObject only counts them).
    tagging: Option<String>,
}

impl From<&aws_sdk_s3::operation::get_object::GetObjectOutput> for Preserved {
    fn from(o: &aws_sdk_s3::operation::get_object::GetObjectOutput) -> Self {
        Self {
            content_type: o.content_type().map(str::to_string),
            content_encoding: o.content_encoding().map(str::to_string),
            content_disposition: o.content_disposition().map(str::to_string),
            content_language: o.content_language().map(str::to_string),
            cache_control: o.cache_control().map(str::to_string),
            metadata: Some(original_time_kept(
                o.metadata().cloned().unwrap_or_default(),
                super::sweep::to_chrono(o.last_modified()),
            )),
            storage_class: o.storage_class().cloned(),
            server_side_encryption: o.server_side_encryption().cloned(),
            ssekms_key_id: o.ssekms_key_id().map(str::to_string),
            tagging: None,
        }
    }
}

/// The archive's user metadata with the time its content was first written recorded (or
/// kept, on a second rewrite), so that sweeps judge its age by that rather than by the
/// `LastModified` the rewrite gives it. HTTP dates carry whole seconds.
fn original_time_kept(
    mut metadata: std::collections::HashMap<String, String>,
    last_modified: Option<chrono::DateTime<chrono::Utc>>,
) -> std::collections::HashMap<String, String> {
    let recorded = Recorded::parse(metadata.get(ORIGINAL_TIME).map(String::as_str));
    if let Some(time) = recorded.for_rewrite(last_modified) {
        metadata.insert(ORIGINAL_TIME.to_string(), time);
    }
    metadata
}

impl Preserved {
    fn apply(
        self,
        put: aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder,
    ) -> aws_sdk_s3::operation::put_object::builders::PutObjectFluentBuilder {
        put.set_content_type(self.content_type)
            .set_content_encoding(self.content_encoding)
            .set_content_disposition(self.content_disposition)
            .set_content_language(self.content_language)
            .set_cache_control(self.cache_control)
            .set_metadata(self.metadata)
            .set_storage_class(self.storage_class)
            .set_server_side_encryption(self.server_side_encryption)
            .set_ssekms_key_id(self.ssekms_key_id)
            .set_tagging(self.tagging)
    }
}

/// Fills in a template with canonical identifier values used literally (S3 prefixes are not
/// patterns): every exact form ([`identifier::exact_forms`]), or records why the locator is
/// skipped.
fn expand(
    what: &str,
    t: &str,
    job: &SubjectJob,
    skipped: &mut Vec<String>,
) -> Result<Option<Vec<String>>, Error> {
    match identifier::exact_forms(t, &job.identifiers) {
        Ok(v) => Ok(Some(v)),
        Err(template::Error::MissingIdentifier(name)) => {
            skipped.push(format!("{what} needs {{{name}}}"));
            Ok(None)
        }
        Err(template::Error::Malformed) => Err(Error::InvalidSpec(format!(
            "target {}: subject.s3.{what} is not a valid template",
            job.target.name
        ))),
    }
}

/// The records locator's `equals` filled with canonical values, the one form every records
/// pass compares with; None (recorded in `skipped`) when the subject lacks an identifier.
fn fill_equals(
    t: &str,
    job: &SubjectJob,
    skipped: &mut Vec<String>,
) -> Result<Option<identifier::Filled>, Error> {
    match identifier::fill(t, &job.identifiers) {
        Ok(filled) => Ok(Some(filled)),
        Err(template::Error::MissingIdentifier(name)) => {
            skipped.push(format!("records.equals needs {{{name}}}"));
            Ok(None)
        }
        Err(template::Error::Malformed) => Err(Error::InvalidSpec(format!(
            "target {}: subject.s3.records.equals is not a valid template",
            job.target.name
        ))),
    }
}

/// The copies of the subject's data a pass over one object found (or removed): its records,
/// and its unparsed lines holding the identifier when those are dropped.
fn copies(counts: &Counts, matcher: &Matcher) -> u64 {
    if matcher.drops_unparsed() {
        counts.matched + counts.unparsed
    } else {
        counts.matched
    }
}

/// Where unparsed copies are, for a status message: object keys (those holding an identifier
/// are not named) and line counts, the first few; never the identifier.
fn unparsed_places(job: &SubjectJob, unparsed: &[(String, bool, u64)]) -> String {
    let values: Vec<String> = job
        .identifiers
        .iter()
        .flat_map(|(t, v)| [identifier::canonical(t, v), v.trim().to_lowercase()])
        .filter(|v| !v.is_empty())
        .collect();
    let mut named: Vec<String> = unparsed
        .iter()
        .take(NAMED_OBJECTS)
        .map(|(key, older, lines)| {
            let lower = key.to_lowercase();
            let key = if values
                .iter()
                .any(|v| lower.contains(v.to_lowercase().as_str()))
            {
                "an object whose key holds an identifier".to_string()
            } else {
                key.clone()
            };
            let version = if *older { " (an older version)" } else { "" };
            let plural = if *lines == 1 { "" } else { "s" };
            format!("{key}{version}: {lines} line{plural}")
        })
        .collect();
    if unparsed.len() > NAMED_OBJECTS {
        named.push(format!(
            "and {} more objects",
            unparsed.len() - NAMED_OBJECTS
        ));
    }
    named.join(", ")
}

/// Lines that are not JSON but hold the identifier are copies of the subject's data. When
/// they are not dropped with the records, finding and verifying fail the target and say
/// where they are (an erase step only removes what it can; its verify reports the rest).
fn unparsed_failure(
    job: &SubjectJob,
    tally: &Tally,
    not_distinctive: Option<identifier::NotDistinctive>,
    drop: bool,
) -> Option<Error> {
    if tally.unparsed.is_empty() || job.action == SubjectAction::Erase {
        return None;
    }
    let lines: u64 = tally.unparsed.iter().map(|(_, _, n)| n).sum();
    let places = unparsed_places(job, &tally.unparsed);
    let target = &job.target.name;
    match not_distinctive {
        // Dropped with the records, and counted with them.
        None if drop => None,
        None => Some(Error::UnparsedCopiesRemain(format!(
            "target {target}: {lines} archive lines that are not JSON still hold the subject's identifier ({places}); set subject.s3.records.unparsedLines: DropMatching to drop them with the subject's records, or remove them by hand"
        ))),
        Some(e) => Some(Error::IdentifierNotDistinctive(format!(
            "target {target}: {lines} archive lines that are not JSON may hold the subject's identifier ({places}), but subject.s3.records.equals is {{{}}} and this subject's value {}, so free text cannot tell it from other data (a timestamp 10:42:13 holds 42); they are neither counted as erased nor dropped: check and remove them by hand", e.placeholder, e.why
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROBE: &str = "Unparsed-Probe-5e1@Example.org";

    fn job(action: SubjectAction, identifiers: &[(&str, &str)]) -> SubjectJob {
        SubjectJob {
            target: serde_json::from_value(serde_json::json!({
                "name": "archive", "store": "archive", "s3": {"prefix": "logs/"}
            }))
            .unwrap(),
            identifiers: identifiers
                .iter()
                .map(|(t, v)| (t.to_string(), v.to_string()))
                .collect(),
            action,
        }
    }

    fn tally(unparsed: &[(&str, bool, u64)]) -> Tally {
        Tally {
            unparsed: unparsed
                .iter()
                .map(|(k, older, n)| (k.to_string(), *older, *n))
                .collect(),
            ..Tally::default()
        }
    }

    #[test]
    fn unparsed_copies_are_named_by_key_and_count_never_by_identifier() {
        let verify = job(SubjectAction::Verify, &[("email", PROBE)]);
        let key_with_id = format!("logs/{}.log", PROBE.to_lowercase());
        let t = tally(&[
            ("logs/day1.log", false, 2),
            ("logs/day0.log", true, 1),
            (&key_with_id, false, 1),
        ]);
        let e = unparsed_failure(&verify, &t, None, false).unwrap();
        assert_eq!(e.reason(), "UnparsedCopiesRemain");
        let message = e.to_string();
        assert!(
            message.contains("4 archive lines")
                && message.contains("logs/day1.log: 2 lines")
                && message.contains("logs/day0.log (an older version): 1 line")
                && message.contains("an object whose key holds an identifier: 1 line"),
            "{message}"
        );
        assert!(
            !message.to_lowercase().contains("unparsed-probe"),
            "{message}"
        );
        // Dropped with the records: counted, no failure. Erase leaves judging to verify.
        assert!(unparsed_failure(&verify, &t, None, true).is_none());
        let erase = job(SubjectAction::Erase, &[("email", PROBE)]);
        assert!(unparsed_failure(&erase, &t, None, false).is_none());
        assert!(unparsed_failure(&verify, &tally(&[]), None, false).is_none());
    }

    #[test]
    fn unparsed_lines_a_short_value_cannot_judge_fail_either_way() {
        let find = job(SubjectAction::Find, &[("userId", "42")]);
        let t = tally(&[("logs/day1.log", false, 1)]);
        let why = identifier::NotDistinctive {
            placeholder: "userId".into(),
            why: "is only digits",
        };
        for drop in [false, true] {
            let e = unparsed_failure(&find, &t, Some(why.clone()), drop).unwrap();
            assert_eq!(e.reason(), "IdentifierNotDistinctive");
            assert!(e.to_string().contains("{userId}") && e.to_string().contains("is only digits"));
        }
        let many: Vec<(String, bool, u64)> = (0..7)
            .map(|i| (format!("logs/{i}.log"), false, 1))
            .collect();
        let places = unparsed_places(&find, &many);
        assert!(places.ends_with("and 2 more objects"), "{places}");
    }
}
