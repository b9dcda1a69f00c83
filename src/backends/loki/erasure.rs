//! A subject's lines: counted (Find), looked for (Verify), or deleted by a delete request,
//! checked after processing and submitted again while lines remain in the ingesters (Erase).

use std::time::{Duration, Instant};

use chrono::Utc;

use super::cursor::{Cursor, Stage};
use super::requests::{poll_after, subject_cursor, Polled, Reuse};
use super::scan::Scan;
use super::{logql, selector, LokiBackend, CLOCK_SLACK_SECONDS};
use crate::api::StoreKind;
use crate::backends::identifier;
use crate::backends::template::Locating;
use crate::backends::{
    subject_locator, Error, Next, StepBudget, SubjectAction, SubjectJob, SubjectStep,
};

/// The longest a job waits on Loki before looking again.
const MAX_POLL: Duration = Duration::from_secs(300);

impl LokiBackend {
    pub(super) async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<Cursor>, Error> {
        let selector = selector(&job.target)?;
        let locator = subject_locator(&job.target, StoreKind::Loki, |s| s.loki())?;
        let mut step: SubjectStep<Cursor> = SubjectStep {
            count: 0,
            blocked: 0,
            malformed: 0,
            ran: false,
            skipped: Vec::new(),
            next: Next::Done,
            failure: None,
            notices: Vec::new(),
        };
        let mut locating = Locating::new(&job.target.name, StoreKind::Loki, &job.identifiers);
        let Some(filled) = locating.fill("lineFilter", &locator.line_filter, identifier::fill)?
        else {
            step.skipped = locating.skipped;
            return Ok(step);
        };
        // A value the line filter cannot tell apart from other text fails the target: it is
        // neither run (it would take other people's lines) nor skipped (and reported erased).
        filled.check_distinctive().map_err(|e| {
            Error::IdentifierNotDistinctive(format!(
                "target {}: subject.loki.lineFilter: {e}; nothing was sent to Loki",
                job.target.name
            ))
        })?;
        step.ran = true;
        // Find, erase and verify send this same query.
        let query = format!("{} {}", selector.render(), logql::subject_filter(&filled));
        let deadline = Instant::now() + budget.max_time;
        let now = Utc::now().timestamp();
        // Searches reach a little past now (clock skew); deletes may not.
        let search_end = now.saturating_add(CLOCK_SLACK_SECONDS);
        let delete_end = now.saturating_sub(CLOCK_SLACK_SECONDS);
        if job.action != SubjectAction::Find {
            // Erasing would only hide the lines, and Verify would then see none of them.
            self.check_deletion_mode().await?;
        }
        let resumed = match cursor {
            // A scan's cursor resumes only the same kind of scan (a failed Erase keeps its
            // cursor, and the retry may be a Verify).
            Some(c) if job.action == SubjectAction::Erase => Some(c),
            Some(c) if job.action == SubjectAction::Find && c.stage == Stage::Counting => Some(c),
            Some(c) if job.action == SubjectAction::Verify && c.stage == Stage::Checking => {
                Some(c).filter(|c| c.id.is_none())
            }
            _ => None,
        };
        let mut c = match resumed {
            Some(c) => c,
            None => {
                // The store's record bounds the range searched: the target's processed sweeps
                // (its selector), or this subject's own processed erasures (this query).
                let requests = self.list_deletes().await?;
                let mut c = subject_cursor(&requests, &selector.render(), &query, job.action, now);
                if job.action == SubjectAction::Verify {
                    c.stage = Stage::Checking;
                }
                c
            }
        };
        let pause = |c: &Cursor| Next::Continue(c.clone());
        match job.action {
            SubjectAction::Find => {
                if self
                    .count_scan(&query, &mut c, false, deadline, true)
                    .await?
                {
                    step.count = c.count;
                } else {
                    step.next = pause(&c);
                }
            }
            SubjectAction::Verify => match self.find_scan(&query, &mut c, deadline).await? {
                // Stopped at the first line: at least one remains (counting them all would
                // cost the scan this avoids).
                Scan::Found => step.count = 1,
                Scan::Empty => step.count = 0,
                Scan::Paused => step.next = pause(&c),
            },
            SubjectAction::Erase => loop {
                match c.stage {
                    Stage::Counting => {
                        if !self
                            .count_scan(&query, &mut c, false, deadline, true)
                            .await?
                        {
                            step.next = pause(&c);
                            break;
                        }
                        if self
                            .submit_or_reuse(&mut c, &query, Reuse::SameStart, true, budget)
                            .await?
                        {
                            step.count = c.count;
                            break;
                        }
                        step.next = Next::Wait {
                            cursor: c.clone(),
                            poll_after: poll_after(0.0),
                        };
                        break;
                    }
                    Stage::Waiting => {
                        match self.poll(&mut c, &query, delete_end, true, budget).await? {
                            Polled::Pending(wait) => {
                                step.next = Next::Wait {
                                    cursor: c.clone(),
                                    poll_after: wait,
                                };
                                break;
                            }
                            Polled::Processed => {
                                // Processed is not gone: look again where lines were.
                                c.stage = Stage::Checking;
                                c.from = Some(c.oldest.unwrap_or(search_end).min(search_end));
                                c.at = Some(search_end);
                            }
                        }
                    }
                    Stage::Checking => match self.find_scan(&query, &mut c, deadline).await? {
                        Scan::Paused => {
                            step.next = pause(&c);
                            break;
                        }
                        Scan::Empty => {
                            step.count = c.count;
                            break;
                        }
                        Scan::Found => {
                            let after = self.config.resubmit_after;
                            c.stage = Stage::Resting;
                            c.until = Some(now.saturating_add(after.as_secs() as i64));
                            step.next = Next::Wait {
                                cursor: c.clone(),
                                poll_after: after.min(MAX_POLL),
                            };
                            break;
                        }
                    },
                    Stage::Resting => {
                        let until = c.until.unwrap_or(now);
                        if now < until {
                            step.next = Next::Wait {
                                cursor: c.clone(),
                                poll_after: Duration::from_secs(
                                    until.saturating_sub(now).max(1) as u64
                                )
                                .min(MAX_POLL),
                            };
                            break;
                        }
                        // Again, up to now: the lines have had time to reach the store.
                        c.end = delete_end;
                        c.until = None;
                        if self
                            .submit_or_reuse(&mut c, &query, Reuse::SameStart, true, budget)
                            .await?
                        {
                            step.count = c.count;
                            break;
                        }
                        step.next = Next::Wait {
                            cursor: c.clone(),
                            poll_after: poll_after(0.0),
                        };
                        break;
                    }
                }
            },
        }
        Ok(step)
    }
}
