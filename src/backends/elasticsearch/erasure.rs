//! A subject's documents: counted (Find, Verify) or deleted by a `_delete_by_query` task
//! (Erase), after the locator's term fields are checked against the mappings.

use reqwest::Method;
use tokio::time::Instant;

use super::cursor::Cursor;
use super::sweep::Polled;
use super::transport::{answer_error, Quote, LENIENT};
use super::{query, task};
use super::{validate_target, ElasticsearchBackend};
use crate::api::retentionpolicy::{ElasticsearchSubject, Target};
use crate::api::StoreKind;
use crate::backends::driver::StoreDriver;
use crate::backends::{
    subject_locator, Error, Next, StepBudget, SubjectAction, SubjectJob, SubjectStep,
};

/// A subject target's index pattern and locator, the target checked.
pub(super) fn pattern_and_locator(target: &Target) -> Result<(&str, &ElasticsearchSubject), Error> {
    validate_target(target)?;
    let pattern = <super::driver::ElasticsearchDriver as StoreDriver>::selector(target)
        .map(|e| e.index.as_str())
        .ok_or_else(|| {
            Error::InvalidSpec(format!(
                "target {} has no elasticsearch selector",
                target.name
            ))
        })?;
    let locator = subject_locator(target, StoreKind::Elasticsearch, |s| s.elasticsearch())?;
    Ok((pattern, locator))
}

impl ElasticsearchBackend {
    /// Refuses a locator whose `term` field is analysed (`text`) in some index of the
    /// pattern: the term would silently miss the subject's documents.
    pub(super) async fn check_term_fields(
        &self,
        pattern: &str,
        fields: &[&String],
    ) -> Result<(), Error> {
        let joined = fields
            .iter()
            .map(|f| f.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let (status, answer) = self
            .send(
                Method::GET,
                &[pattern, "_mapping", "field", &joined],
                &LENIENT,
                None,
                "_mapping",
            )
            .await?;
        match status {
            200..=299 => {}
            // Reading mappings needs `view_index_metadata`; without it the check is skipped.
            403 => {
                tracing::warn!(
                    pattern,
                    "not allowed to read field mappings: term fields are not checked"
                );
                return Ok(());
            }
            404 => return Ok(()),
            _ => return Err(answer_error("_mapping", status, &answer, Quote::Reason)),
        }
        match query::analysed_fields(&answer).first() {
            Some((index, field, kind)) => Err(Error::InvalidSpec(format!(
                "subject.elasticsearch.term[{field}]: the field is mapped as {kind} in index {index}, so a term query compares with its analysed tokens and would miss the subject's documents; use a keyword field (often {field}.keyword)"
            ))),
            None => Ok(()),
        }
    }

    pub(super) async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<Cursor>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<Cursor>, Error> {
        let (pattern, locator) = pattern_and_locator(&job.target)?;
        let name = &job.target.name;
        let mut result = SubjectStep {
            count: 0,
            blocked: 0,
            malformed: 0,
            ran: false,
            skipped: Vec::new(),
            next: Next::Done,
            failure: None,
            notices: Vec::new(),
        };
        let terms = match query::expand_terms(name, &locator.term, &job.identifiers)? {
            Ok(terms) => terms,
            Err(skipped) => {
                result.skipped = skipped;
                return Ok(result);
            }
        };
        result.ran = true;
        if cursor.is_none() {
            let fields: Vec<&String> = terms.keys().collect();
            self.check_term_fields(pattern, &fields).await?;
        }
        let subject = query::subject_query(&terms);
        if job.action != SubjectAction::Erase {
            self.refresh(pattern).await?;
            result.count = self.count(pattern, subject, Quote::TypeOnly).await?;
            return Ok(result);
        }
        // Even polling counts what a task erased: a stale instance neither acts nor counts.
        budget.may_act()?;
        let deadline = Instant::now() + budget.max_time;
        let mut position = cursor.unwrap_or_default();
        if let Some(done) = position.clean.clone() {
            // The count of that task is in the checkpointed cursor already.
            self.forget_task(&done).await?;
            position.clean = None;
        }
        if position.settled {
            // Documents changed while a task ran stay, and Verify counts them.
            result.count = position.deleted;
            return Ok(result);
        }
        if position.task.is_none() {
            if budget.cancel.is_cancelled() {
                // Stopped before the store was asked for anything: the next step submits.
                result.next = Next::Continue(position.clone());
                return Ok(result);
            }
            budget.may_act()?;
            // A document indexed a moment ago would otherwise escape the deletion.
            match self
                .adopt_or_submit(&mut position, pattern, subject, Quote::TypeOnly, true)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    // The submission is named, and checkpointed before it is made.
                    result.next = Next::Continue(position.clone());
                    return Ok(result);
                }
                // The marker is kept: a submission that was made after all is found by it.
                Err(e) => {
                    result.failure = Some(e);
                    result.next = Next::Continue(position.clone());
                    return Ok(result);
                }
            }
        }
        match self.poll(&mut position, deadline, &budget.cancel).await {
            Ok(Polled::Wait) => result.next = task::wait(&position),
            Ok(Polled::Done {
                deleted,
                version_conflicts,
                problem,
            }) => {
                // The count travels in the cursor until the step that reports it (Done).
                let settled = task::settle(&mut position, deleted, version_conflicts, problem);
                result.failure = settled.retrying.or(settled.failed);
                result.next = Next::Continue(position.clone());
            }
            Err(e) => {
                // The task id is kept so a retry polls it rather than submitting again.
                result.failure = Some(e);
                result.next = Next::Continue(position.clone());
            }
        }
        Ok(result)
    }
}
