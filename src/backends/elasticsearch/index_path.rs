//! The whole-index deletion path: an index whose every document expired is judged, its
//! writes blocked, judged again, and deleted whole, or the operator's own block lifted.

use std::collections::BTreeSet;

use reqwest::Method;
use serde_json::{json, Value};

use super::indices;
use super::transport::{answer_error, Quote};
use super::ElasticsearchBackend;
use crate::backends::{Error, StepBudget};

impl ElasticsearchBackend {
    /// The open indices the pattern names itself, in name order.
    pub(super) async fn indices(&self, pattern: &str) -> Result<Vec<String>, Error> {
        let (status, answer) = self
            .send(
                Method::GET,
                &["_cat", "indices", pattern],
                &[("format", "json"), ("h", "index,status")],
                None,
                "_cat/indices",
            )
            .await?;
        if status == 404 {
            return Ok(Vec::new());
        }
        if status == 403 {
            // Listing indices needs the `monitor` index privilege; without it there is no
            // fast path, and delete-by-query does all the work.
            tracing::warn!(
                pattern,
                "not allowed to list indices (_cat/indices): no whole-index deletion"
            );
            return Ok(Vec::new());
        }
        if !(200..300).contains(&status) {
            return Err(answer_error("_cat/indices", status, &answer, Quote::Reason));
        }
        let mut names: Vec<String> = answer
            .as_array()
            .ok_or_else(|| Error::Store("_cat/indices: the answer is not a list".into()))?
            .iter()
            .filter(|row| row.get("status").and_then(Value::as_str) == Some("open"))
            .filter_map(|row| row.get("index").and_then(Value::as_str))
            .filter(|name| indices::index_matches(pattern, name))
            .map(str::to_string)
            .collect();
        names.sort();
        Ok(names)
    }

    pub(super) async fn ages(
        &self,
        index: &str,
        field: &str,
    ) -> Result<Option<indices::IndexAges>, Error> {
        let answer = self
            .call(
                Method::POST,
                &[index, "_search"],
                &[],
                Some(&indices::ages_search(field)),
                "_search",
                Quote::Reason,
            )
            .await?;
        Ok(indices::read_ages(&answer))
    }

    /// Whether `index.blocks.write` is set on the index.
    async fn write_blocked(&self, index: &str) -> Result<bool, Error> {
        let answer = self
            .call(
                Method::GET,
                &[index, "_settings"],
                &[],
                None,
                "_settings",
                Quote::Reason,
            )
            .await?;
        let value = answer.pointer(&format!(
            "/{}/settings/index/blocks/write",
            index.replace('~', "~0").replace('/', "~1")
        ));
        Ok(matches!(value, Some(Value::Bool(true)))
            || value.and_then(Value::as_str) == Some("true"))
    }

    /// Sets `index.blocks.write`, or (`on` false) removes the setting, so that lifting the
    /// operator's own block leaves the index's settings as they were. Returns false when the
    /// index does not exist (any more).
    async fn set_write_block(&self, index: &str, on: bool) -> Result<bool, Error> {
        let value = if on { Value::Bool(true) } else { Value::Null };
        let (status, answer) = self
            .send(
                Method::PUT,
                &[index, "_settings"],
                &[],
                Some(&json!({"index": {"blocks": {"write": value}}})),
                "_settings",
            )
            .await?;
        match status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(answer_error("_settings", status, &answer, Quote::Reason)),
        }
    }

    /// The indices that take writes for an alias or a data stream, which are never deleted
    /// whole; None when they cannot be listed (no permission), and then nothing is.
    pub(super) async fn write_indices(&self) -> Result<Option<BTreeSet<String>>, Error> {
        let (status, aliases) = self
            .send(
                Method::GET,
                &["_cat", "aliases"],
                &[("format", "json"), ("h", "alias,index,is_write_index")],
                None,
                "_cat/aliases",
            )
            .await?;
        match status {
            200..=299 => {}
            401 | 403 => return Ok(None),
            _ => {
                return Err(answer_error(
                    "_cat/aliases",
                    status,
                    &aliases,
                    Quote::Reason,
                ))
            }
        }
        let (status, streams) = self
            .send(Method::GET, &["_data_stream"], &[], None, "_data_stream")
            .await?;
        let streams = match status {
            200..=299 => streams,
            // A server without data streams (before Elasticsearch 7.9) has none.
            400 | 404 | 405 => Value::Null,
            401 | 403 => return Ok(None),
            _ => {
                return Err(answer_error(
                    "_data_stream",
                    status,
                    &streams,
                    Quote::Reason,
                ))
            }
        };
        Ok(Some(indices::write_indices(&aliases, &streams)))
    }

    /// First look at one index for the fast path (no change made).
    pub(super) async fn first_look(
        &self,
        index: &str,
        field: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
        write_indices: &BTreeSet<String>,
    ) -> Result<FirstLook, Error> {
        if !all_expired(&self.ages(index, field).await?, cutoff) {
            return Ok(FirstLook::Keep);
        }
        if write_indices.contains(index) {
            tracing::info!(index = %index, "every document expired, but the index takes writes for an alias or a data stream: not deleted whole");
            return Ok(FirstLook::Keep);
        }
        match self.write_blocked(index).await {
            Ok(true) => Ok(FirstLook::BlockedByOthers),
            Ok(false) => Ok(FirstLook::NeedsBlock),
            // Not allowed to read or change settings: no fast path, delete-by-query does it.
            Err(Error::AuthenticationFailed(_)) => Ok(FirstLook::Keep),
            Err(e) => Err(e),
        }
    }

    /// With writes blocked: refreshes the index, judges it again and deletes it if every
    /// document is still expired and it still takes no writes for an alias or data stream.
    /// Returns the documents deleted, or None when the index stays.
    pub(super) async fn judge_again(
        &self,
        index: &str,
        field: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
        budget: &StepBudget,
    ) -> Result<Option<u64>, Error> {
        self.refresh(index).await?;
        let Some(ages) = self.ages(index, field).await? else {
            return Ok(None);
        };
        if !indices::whole_index_expired(&ages, cutoff) {
            return Ok(None);
        }
        if self
            .write_indices()
            .await?
            .is_none_or(|w| w.contains(index))
        {
            return Ok(None);
        }
        budget.may_act()?;
        self.call(
            Method::DELETE,
            &[index],
            &[],
            None,
            "DELETE index",
            Quote::Reason,
        )
        .await?;
        Ok(Some(ages.total))
    }

    /// The second half of the fast path for an index the operator blocks itself (named in
    /// the checkpointed cursor before the block is set): blocks writes, judges again, and
    /// deletes the index or lifts its block. Run again on resume after a crash, it lifts a
    /// block left behind. With `delete` false (the fast path is over, a dry run, a hold) the
    /// block is only lifted. Errors leave the cursor naming the index, so the next step
    /// lifts the block; a fenced-out instance leaves it to the leader.
    pub(super) async fn own_block(
        &self,
        index: &str,
        field: &str,
        cutoff: chrono::DateTime<chrono::Utc>,
        budget: &StepBudget,
        delete: bool,
    ) -> Result<Option<u64>, Error> {
        budget.may_act()?;
        if delete {
            if !self.set_write_block(index, true).await? {
                return Ok(None);
            }
            let judged = self.judge_again(index, field, cutoff, budget).await;
            if matches!(judged, Ok(Some(_)) | Err(Error::LeadershipLost)) {
                return judged;
            }
            budget.may_act()?;
            self.lift_own_block(index).await?;
            return judged;
        }
        self.lift_own_block(index).await?;
        Ok(None)
    }

    pub(super) async fn lift_own_block(&self, index: &str) -> Result<(), Error> {
        self.set_write_block(index, false)
            .await
            .map(drop)
            .map_err(|e| {
                Error::Store(format!(
                    "index {index} is still write-blocked (index.blocks.write) by the fast-path check; lifting it again on the next step: {e}"
                ))
            })
    }
}

/// What the first look at an index says about the fast path.
pub(super) enum FirstLook {
    /// Not deleted whole: something is young or undated, or it takes writes.
    Keep,
    /// All expired, and writes are blocked already by someone else: judged again as it is.
    BlockedByOthers,
    /// All expired: to be judged again under the operator's own write block.
    NeedsBlock,
}

fn all_expired(ages: &Option<indices::IndexAges>, cutoff: chrono::DateTime<chrono::Utc>) -> bool {
    ages.as_ref()
        .is_some_and(|a| indices::whole_index_expired(a, cutoff))
}
