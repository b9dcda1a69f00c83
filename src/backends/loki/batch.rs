//! Many subjects' lines in one pass. The members, in the order of their ids, are cut into
//! chunks whose queries stay under Loki's size limit ([`logql::chunk_len`]); a chunk's line
//! filter is the alternation of its members' exact patterns. Each window of the range is
//! counted once for the whole chunk, and only where it has lines once per member, so a line
//! of two members counts for both. Erase then works a chunk as the single path works one
//! subject (one delete request, polled, checked after processing and submitted again while
//! lines remain in the ingesters), asking the gate before each submission; Loki deletes
//! without counting, so each member's lines counted before the submission are its count,
//! reported by the step that submits.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chrono::Utc;

use super::cursor::{Cursor, Stage};
use super::requests::{poll_after, subject_cursor, Polled, Reuse};
use super::scan::Scan;
use super::{logql, selector, LokiBackend, CLOCK_SLACK_SECONDS, DELETE_START, WINDOW_SECONDS};
use crate::api::StoreKind;
use crate::backends::chunks::BatchPosition;
use crate::backends::identifier::{self, Filled};
use crate::backends::template::Locating;
use crate::backends::{
    subject_locator, BatchJob, BatchStep, Error, Next, StepBudget, SubjectAction,
};

/// The longest a job waits on Loki before looking again.
const MAX_POLL: Duration = Duration::from_secs(300);

/// One running member: its place in the job and its filled-in line filter.
type Running = (usize, Filled);

/// A cursor before the next chunk, after `after`.
fn next_chunk(after: Option<String>) -> Cursor {
    Cursor {
        batch: Some(BatchPosition {
            after,
            ..BatchPosition::default()
        }),
        ..Cursor::counting(DELETE_START, DELETE_START, DELETE_START)
    }
}

/// The chunk under way is done.
fn finish_chunk(c: &mut Cursor) {
    let pos = c.batch.take().unwrap_or_default();
    *c = next_chunk(pos.upto.or(pos.after));
}

/// After a submission: the chunk is done when nothing needs waiting for (`settled`: a
/// processed request covers it), else the step waits for the request (false).
fn submitted(c: &mut Cursor, settled: bool, step: &mut BatchStep<Cursor>) -> bool {
    if settled {
        finish_chunk(c);
        return true;
    }
    step.next = Next::Wait {
        cursor: c.clone(),
        poll_after: poll_after(0.0),
    };
    false
}

impl LokiBackend {
    /// Each window of (from, at] counted for the chunk's `query`; where it has lines, each
    /// member's query too (`add(k, n)`: member `k` of `members` has `n` there). True once
    /// the range is done; false when the deadline came first (at least one window).
    async fn chunk_count_scan(
        &self,
        query: &str,
        members: &[String],
        c: &mut Cursor,
        deadline: Instant,
        add: &mut (dyn FnMut(usize, u64) + Send),
    ) -> Result<bool, Error> {
        let from = c.scan_from();
        let mut at = c.at.unwrap_or(c.end);
        let mut first = true;
        while at > from {
            if !first && Instant::now() >= deadline {
                c.at = Some(at);
                return Ok(false);
            }
            first = false;
            let range = WINDOW_SECONDS.min(at.saturating_sub(from));
            let n = self.count_window(query, at, range, true).await?;
            if n > 0 {
                c.count = c.count.saturating_add(n);
                c.oldest = Some(at.saturating_sub(range));
                if let [_] = members {
                    add(0, n);
                } else {
                    for (k, member) in members.iter().enumerate() {
                        let m = self.count_window(member, at, range, true).await?;
                        if m > 0 {
                            add(k, m);
                        }
                    }
                }
            }
            at = at.saturating_sub(range);
        }
        c.at = Some(at);
        Ok(true)
    }

    pub(super) async fn subjects(
        &self,
        job: &BatchJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<BatchStep<Cursor>, Error> {
        let selector = selector(&job.target)?.render();
        let locator = subject_locator(&job.target, StoreKind::Loki, |s| s.loki())?;
        let mut step = BatchStep::empty(job.members.len(), Next::Done);
        let mut running: Vec<Running> = Vec::new();
        for (i, member) in job.members.iter().enumerate() {
            let mut locating =
                Locating::new(&job.target.name, StoreKind::Loki, &member.identifiers);
            let Some(filled) =
                locating.fill("lineFilter", &locator.line_filter, identifier::fill)?
            else {
                step.members[i].skipped = locating.skipped;
                continue;
            };
            // As for one subject: a value the filter cannot tell from other text fails the
            // member's target rather than take other people's lines or be reported erased;
            // its batch-mates go on.
            if let Err(e) = filled.check_distinctive() {
                let failure = Error::IdentifierNotDistinctive(format!(
                    "target {}: subject.loki.lineFilter: {e}; nothing was sent to Loki",
                    job.target.name
                ));
                step.members[i].failure = Some(failure.failure());
                continue;
            }
            step.members[i].ran = true;
            running.push((i, filled));
        }
        running.sort_by(|a, b| job.members[a.0].id.cmp(&job.members[b.0].id));
        if running.is_empty() {
            return Ok(step);
        }
        if job.action != SubjectAction::Find {
            // Erasing would only hide the lines, and Verify would then see none of them.
            self.check_deletion_mode().await?;
        }
        let resumed = cursor.filter(|c| {
            c.batch.is_some() && (job.action == SubjectAction::Erase || c.stage == Stage::Counting)
        });
        if resumed
            .as_ref()
            .and_then(|c| c.batch.as_ref())
            .is_some_and(|b| !b.is_valid())
        {
            return Err(Error::InvalidSpec(
                "unreadable batch member id in a Loki cursor".into(),
            ));
        }
        let mut c = resumed.unwrap_or_else(|| next_chunk(None));
        let run = Run {
            job,
            running: &running,
            selector: &selector,
            deadline: Instant::now() + budget.max_time,
            now: Utc::now().timestamp(),
        };
        if job.action == SubjectAction::Erase {
            self.erase_batch(&run, &mut c, &mut step, budget).await?;
        } else {
            self.count_batch(&run, &mut c, &mut step, budget).await?;
        }
        Ok(step)
    }

    /// Starts the next chunk in `c` (false: no member is left): its members, and the
    /// range its search starts from (the store's record, as for one subject).
    async fn start_chunk(&self, run: &Run<'_>, c: &mut Cursor) -> Result<bool, Error> {
        let pos = c.batch.clone().unwrap_or_default();
        let rest: Vec<&Running> = run
            .running
            .iter()
            .filter(|(i, _)| pos.later(&run.job.members[*i]))
            .collect();
        let fills: Vec<&Filled> = rest.iter().map(|(_, f)| f).collect();
        let k = logql::chunk_len(run.selector, &fills);
        let Some((last, _)) = k.checked_sub(1).and_then(|k| rest.get(k)) else {
            return Ok(false);
        };
        let query = format!("{} {}", run.selector, logql::subjects_filter(&fills[..k]));
        let requests = self.list_deletes().await?;
        let mut next = subject_cursor(&requests, run.selector, &query, run.job.action, run.now);
        next.batch = Some(BatchPosition {
            upto: Some(run.job.members[*last].id.clone()),
            ..pos
        });
        *c = next;
        Ok(true)
    }

    /// Makes sure a chunk is under way in `c`, starting the next one when none is (unless
    /// the step's time is up after some `worked`): whether it started one; None when the
    /// step ends here, `step.next` said (done, or continued).
    async fn chunk_under_way(
        &self,
        run: &Run<'_>,
        c: &mut Cursor,
        step: &mut BatchStep<Cursor>,
        budget: &StepBudget,
        worked: bool,
    ) -> Result<Option<bool>, Error> {
        if c.batch.as_ref().is_some_and(|b| b.upto.is_some()) {
            return Ok(Some(false));
        }
        if worked && (Instant::now() >= run.deadline || budget.cancel.is_cancelled()) {
            step.next = Next::Continue(c.clone());
            return Ok(None);
        }
        if !self.start_chunk(run, c).await? {
            step.next = Next::Done;
            return Ok(None);
        }
        Ok(Some(true))
    }

    /// Find and Verify: each chunk's members counted, chunk after chunk within the step's
    /// time (one window at least). Verify counts what remains exactly.
    async fn count_batch(
        &self,
        run: &Run<'_>,
        c: &mut Cursor,
        step: &mut BatchStep<Cursor>,
        budget: &StepBudget,
    ) -> Result<(), Error> {
        let mut worked = false;
        loop {
            if self
                .chunk_under_way(run, c, step, budget, worked)
                .await?
                .is_none()
            {
                return Ok(());
            }
            let chunk = run.chunk(c, &BTreeSet::new());
            worked = true;
            let (query, members) = run.queries(&chunk);
            let done = self
                .chunk_count_scan(&query, &members, c, run.deadline, &mut |k, n| {
                    if let Some((i, _)) = chunk.get(k) {
                        step.members[*i].count = step.members[*i].count.saturating_add(n);
                    }
                })
                .await?;
            if !done {
                step.next = Next::Continue(c.clone());
                return Ok(());
            }
            finish_chunk(c);
        }
    }

    /// Erase: one chunk at a time, through the single path's stages.
    async fn erase_batch(
        &self,
        run: &Run<'_>,
        c: &mut Cursor,
        step: &mut BatchStep<Cursor>,
        budget: &StepBudget,
    ) -> Result<(), Error> {
        let search_end = run.now.saturating_add(CLOCK_SLACK_SECONDS);
        let delete_end = run.now.saturating_sub(CLOCK_SLACK_SECONDS);
        let mut excluded: BTreeSet<usize> = BTreeSet::new();
        let mut worked = false;
        // The chunk is counted: submitted next.
        let mut counted = false;
        loop {
            match self.chunk_under_way(run, c, step, budget, worked).await? {
                None => return Ok(()),
                Some(true) => counted = false,
                Some(false) => {}
            }
            worked = true;
            if c.stage != Stage::Counting || counted {
                // Each of these stages may submit (again): the members held now are left
                // out of the chunk's query from here on.
                if !self.ask_gate(run, &mut excluded, c, step).await {
                    return Ok(());
                }
            }
            let chunk = run.chunk(c, &excluded);
            if chunk.is_empty() {
                // Every member of the chunk is held: nothing to delete.
                finish_chunk(c);
                continue;
            }
            let (query, members) = run.queries(&chunk);
            match c.stage {
                Stage::Counting if !counted => {
                    let mut counts = c.batch.clone().unwrap_or_default().counts;
                    let done = self
                        .chunk_count_scan(&query, &members, c, run.deadline, &mut |k, n| {
                            if let Some((i, _)) = chunk.get(k) {
                                let id = run.job.members[*i].id.clone();
                                let total = counts.entry(id).or_default();
                                *total = total.saturating_add(n);
                            }
                        })
                        .await?;
                    if let Some(b) = c.batch.as_mut() {
                        b.counts = counts;
                    }
                    if !done || budget.cancel.is_cancelled() {
                        step.next = Next::Continue(c.clone());
                        return Ok(());
                    }
                    // Round again: the gate is asked, and the chunk's query made without
                    // the members held now.
                    counted = true;
                }
                Stage::Counting => {
                    let settled = self
                        .submit_or_reuse(c, &query, Reuse::SameStart, true, budget)
                        .await?;
                    // Submitted (or found pending, or done already): the counts of the
                    // members in it are reported with the cursor that names the request,
                    // once. A step repeated from the cursor before counts them again
                    // while Loki has deleted nothing, and reuses the pending request.
                    let counts = c
                        .batch
                        .as_mut()
                        .map(|b| std::mem::take(&mut b.counts))
                        .unwrap_or_default();
                    for (i, _) in &chunk {
                        if let Some(n) = counts.get(&run.job.members[*i].id) {
                            step.members[*i].count = step.members[*i].count.saturating_add(*n);
                        }
                    }
                    if !submitted(c, settled, step) {
                        return Ok(());
                    }
                }
                Stage::Waiting => match self.poll(c, &query, delete_end, true, budget).await? {
                    Polled::Pending(wait) => {
                        step.next = Next::Wait {
                            cursor: c.clone(),
                            poll_after: wait,
                        };
                        return Ok(());
                    }
                    Polled::Processed => {
                        // Processed is not gone: look again where lines were.
                        c.stage = Stage::Checking;
                        c.from = Some(c.oldest.unwrap_or(search_end).min(search_end));
                        c.at = Some(search_end);
                    }
                },
                Stage::Checking => match self.find_scan(&query, c, run.deadline).await? {
                    Scan::Paused => {
                        step.next = Next::Continue(c.clone());
                        return Ok(());
                    }
                    Scan::Empty => finish_chunk(c),
                    Scan::Found => {
                        let after = self.config.resubmit_after;
                        c.stage = Stage::Resting;
                        c.until = Some(run.now.saturating_add(after.as_secs() as i64));
                        step.next = Next::Wait {
                            cursor: c.clone(),
                            poll_after: after.min(MAX_POLL),
                        };
                        return Ok(());
                    }
                },
                Stage::Resting => {
                    let until = c.until.unwrap_or(run.now);
                    if run.now < until {
                        step.next = Next::Wait {
                            cursor: c.clone(),
                            poll_after: Duration::from_secs(
                                until.saturating_sub(run.now).max(1) as u64
                            )
                            .min(MAX_POLL),
                        };
                        return Ok(());
                    }
                    // Again, up to now: the lines have had time to reach the store.
                    c.end = delete_end;
                    c.until = None;
                    let settled = self
                        .submit_or_reuse(c, &query, Reuse::SameStart, true, budget)
                        .await?;
                    if !submitted(c, settled, step) {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Asks the gate which members are held now, into `excluded` (and the step's `held`).
    /// False: the gate failed, and the step ends with its cursor and the failure.
    async fn ask_gate(
        &self,
        run: &Run<'_>,
        excluded: &mut BTreeSet<usize>,
        c: &Cursor,
        step: &mut BatchStep<Cursor>,
    ) -> bool {
        match run.job.gate.held().await {
            Ok(held) => {
                excluded.extend(held);
                step.held.clone_from(excluded);
                true
            }
            Err(e) => {
                step.failure = Some(e);
                step.next = Next::Continue(c.clone());
                false
            }
        }
    }
}

/// What every stage of one batch step needs.
struct Run<'a> {
    job: &'a BatchJob,
    /// The members that run, in the order of their ids.
    running: &'a [Running],
    /// The target's stream selector, rendered.
    selector: &'a str,
    deadline: Instant,
    now: i64,
}

impl Run<'_> {
    /// The members of the chunk under way, but the excluded.
    fn chunk(&self, c: &Cursor, excluded: &BTreeSet<usize>) -> Vec<&Running> {
        let pos = c.batch.clone().unwrap_or_default();
        self.running
            .iter()
            .filter(|(i, _)| pos.in_chunk(&self.job.members[*i]) && !excluded.contains(i))
            .collect()
    }

    /// The chunk's query, and each member's.
    fn queries(&self, chunk: &[&Running]) -> (String, Vec<String>) {
        let fills: Vec<&Filled> = chunk.iter().map(|(_, f)| f).collect();
        let query = format!("{} {}", self.selector, logql::subjects_filter(&fills));
        let members = fills
            .iter()
            .map(|f| format!("{} {}", self.selector, logql::subject_filter(f)))
            .collect();
        (query, members)
    }
}
