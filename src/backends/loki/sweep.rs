//! The retention sweep: one delete request for the selector (less held subjects' lines) from
//! where the store's record ends to the cutoff, counted before and checked after.

use std::time::Instant;

use super::cursor::{Cursor, Stage};
use super::requests::{covered_until, poll_after, searched_until, sweep_start, Polled, Reuse};
use super::{logql, selector, LokiBackend, LOOKBACK_SECONDS};
use crate::api::StoreKind;
use crate::backends::identifier;
use crate::backends::{held_subject_locator, Error, Next, Step, StepBudget, SweepJob};

impl LokiBackend {
    pub(super) async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<Step<Cursor>, Error> {
        let held = held_filters(job)?;
        // With held subjects the query carries identifiers: it is personal.
        let personal = !held.is_empty();
        let selector = selector(&job.target)?.render();
        let query = format!("{selector}{held}");
        let deadline = Instant::now() + budget.max_time;
        let mut step = Step::default();
        let mut c = match cursor {
            Some(c) => c,
            None => {
                let end = job.cutoff.timestamp();
                let requests = self.list_deletes().await?;
                // Not the past again: from where this query's processed requests reach.
                // With held subjects' filters Loki splits the request by day: it covers
                // the range counted, not all time from 2001 (see `searched_until`).
                let start = if personal {
                    sweep_start(searched_until(&requests, &selector, &query))
                        .max(end.saturating_sub(LOOKBACK_SECONDS))
                } else {
                    sweep_start(covered_until(&requests, &query))
                };
                if end <= start {
                    return Ok(step);
                }
                Cursor::counting(start, end, end.saturating_sub(LOOKBACK_SECONDS).max(start))
            }
        };
        loop {
            match c.stage {
                Stage::Counting => {
                    if !self
                        .count_scan(&query, &mut c, false, deadline, personal)
                        .await?
                    {
                        step.next = Next::Continue(c.clone());
                        return Ok(step);
                    }
                    if job.dry_run {
                        (step.scanned, step.deleted) = (c.count, c.count);
                        return Ok(step);
                    }
                    self.check_deletion_mode().await?;
                    if self
                        .submit_or_reuse(&mut c, &query, Reuse::Exact, personal, budget)
                        .await?
                    {
                        (step.scanned, step.deleted) = (c.count, c.count);
                        return Ok(step);
                    }
                    step.next = Next::Wait {
                        cursor: c.clone(),
                        poll_after: poll_after(0.0),
                    };
                    return Ok(step);
                }
                Stage::Waiting => {
                    let end = c.end;
                    match self.poll(&mut c, &query, end, personal, budget).await? {
                        Polled::Pending(wait) => {
                            step.next = Next::Wait {
                                cursor: c.clone(),
                                poll_after: wait,
                            };
                            return Ok(step);
                        }
                        Polled::Processed => {
                            // Count what is left where lines were: only what went is reported.
                            c.stage = Stage::Checking;
                            c.from = Some(c.oldest.unwrap_or(c.end));
                            c.at = Some(c.end);
                            c.left = 0;
                        }
                    }
                }
                Stage::Checking => {
                    if !self
                        .count_scan(&query, &mut c, true, deadline, personal)
                        .await?
                    {
                        step.next = Next::Continue(c.clone());
                        return Ok(step);
                    }
                    step.scanned = c.count;
                    step.deleted = c.count.saturating_sub(c.left);
                    return Ok(step);
                }
                Stage::Resting => return Ok(step),
            }
        }
    }
}

/// The negative line filters that keep every held subject's lines out of a sweep's delete
/// request: `!~` with the same exact pattern an erasure of that subject selects with (empty
/// without held subjects).
fn held_filters(job: &SweepJob) -> Result<String, Error> {
    if job.held.is_empty() {
        return Ok(String::new());
    }
    let locator = held_subject_locator(&job.target, StoreKind::Loki, |s| s.loki())?;
    let filled =
        job.held
            .expand_all("subject.loki.lineFilter", &locator.line_filter, |t, ids| {
                identifier::fill(t, ids).map(|f| vec![f])
            })?;
    Ok(filled
        .iter()
        .map(|f| format!(" !~ {}", logql::quote(&f.re2_pattern())))
        .collect())
}
