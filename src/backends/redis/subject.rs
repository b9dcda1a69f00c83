//! One data subject's records in Redis: keys (globs allowed, UNLINK), hash fields (HDEL) and
//! set or sorted-set members (SREM / ZREM), found, erased and verified with the same queries.

use redis::aio::MultiplexedConnection;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    glob, keys_per_slot, ledger, map_error, per_slot, Node, RedisBackend, RedisCursor, Topology,
};
use std::collections::{BTreeMap, HashSet};
use tokio::time::Instant;

use crate::api::StoreKind;
use crate::backends::identifier::{self, exact_forms, Piece};
use crate::backends::template::{self, escape_glob, Locating};
use crate::backends::{
    subject_locator, Error, Next, StepBudget, SubjectAction, SubjectJob, SubjectStep,
};

/// A key template as one glob: the template's own text is a glob, identifier values are
/// canonical and escaped, and e-mail values match in any (ASCII) case (`[bB][oO][bB]@…`).
pub(crate) fn key_glob(
    template: &str,
    identifiers: &BTreeMap<String, String>,
) -> Result<Vec<String>, template::Error> {
    let filled = identifier::fill(template, identifiers)?;
    Ok(vec![filled.render(|piece| match piece {
        Piece::Literal(text) => text.clone(),
        Piece::Value {
            value, fold: true, ..
        } => identifier::glob_fold(value),
        Piece::Value { value, .. } => escape_glob(value),
    })])
}

/// One piece of a subject's records, in the order steps work through them. Built afresh by
/// every step from the locator and the identifiers, so a cursor names a piece by its index
/// and never holds an identifier.
pub(super) enum Unit {
    /// Keys matching a glob, on every node, SCAN page by SCAN page.
    Glob(String),
    /// One hash field (HEXISTS / HDEL) on every node.
    HashField { key: String, field: String },
    /// One set or sorted-set member on every node.
    SetMember { key: String, member: String },
}

/// The pieces of a subject's records, the locators skipped (the subject lacks an identifier
/// they need), and whether any locator ran.
pub(super) fn units(job: &SubjectJob) -> Result<(Vec<Unit>, Vec<String>, bool), Error> {
    let locator = subject_locator(&job.target, StoreKind::Redis, |s| s.redis())?;
    let mut locating = Locating::new(&job.target.name, StoreKind::Redis, &job.identifiers);
    let mut units = Vec::new();
    for (i, t) in locator.keys.iter().enumerate() {
        let Some(patterns) = locating.fill(&format!("keys[{i}]"), t, key_glob)? else {
            continue;
        };
        for pattern in patterns {
            if glob::matches_everything(&pattern) || pattern.is_empty() {
                return Err(Error::InvalidSpec(format!(
                    "target {}: subject.redis.keys[{i}] would match every key",
                    job.target.name
                )));
            }
            units.push(Unit::Glob(pattern));
        }
    }
    for (i, hf) in locator.hash_fields.iter().enumerate() {
        let what = format!("hashFields[{i}]");
        let Some(keys) = locating.fill(&what, &hf.key, exact_forms)? else {
            continue;
        };
        let Some(fields) = locating.fill(&what, &hf.field, exact_forms)? else {
            continue;
        };
        for (key, field) in pairs(&keys, &fields) {
            units.push(Unit::HashField {
                key: key.clone(),
                field: field.clone(),
            });
        }
    }
    for (i, sm) in locator.set_members.iter().enumerate() {
        let what = format!("setMembers[{i}]");
        let Some(keys) = locating.fill(&what, &sm.key, exact_forms)? else {
            continue;
        };
        let Some(members) = locating.fill(&what, &sm.member, exact_forms)? else {
            continue;
        };
        for (key, member) in pairs(&keys, &members) {
            units.push(Unit::SetMember {
                key: key.clone(),
                member: member.clone(),
            });
        }
    }
    let mut skipped = locating.skipped;
    skipped.dedup();
    let locators = locator.keys.len() + locator.hash_fields.len() + locator.set_members.len();
    let ran = skipped.len() < locators;
    Ok((units, skipped, ran))
}

/// Where a subject step resumes. The engine keeps only the cursor of an unfinished step
/// (not its counts), so the running total travels in the cursor and a finished step
/// reports the whole count.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Position {
    /// The action the position belongs to: a cursor of another action (a failed erase
    /// retried as a verify) starts over.
    pub(super) action: Option<SubjectAction>,
    /// The index of the piece ([`Unit`]) being worked on.
    pub(super) unit: usize,
    /// Within a glob: the node, and the SCAN cursor on it.
    pub(super) node: usize,
    pub(super) scan: u64,
    /// Records counted so far, all pieces together.
    pub(super) count: u64,
    /// Of `count`, those counted in the current glob: a find or verify that must start the
    /// glob over (another topology) takes them back. An erase keeps them: UNLINK counted
    /// keys that are gone.
    pub(super) in_unit: u64,
    /// An erase's ledger ([`ledger`]): every record it removes is recorded there first, so
    /// the final count includes a batch whose checkpoint was lost.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "ledger::as_text"
    )]
    #[schemars(with = "Option<String>")]
    pub(super) tally: Option<ledger::Tally>,
    /// In a checkpoint: the tag of the topology the node index counts
    /// ([`super::topology_tag`]; absent on a server without a run id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) topology: Option<String>,
}

/// How the previous version's subject cursors began.
pub(super) const CURSOR_PREFIX: &str = "subject:";

#[cfg(test)]
fn action_code(action: SubjectAction) -> &'static str {
    match action {
        SubjectAction::Find => "f",
        SubjectAction::Erase => "e",
        SubjectAction::Verify => "v",
    }
}

impl Position {
    fn start(action: SubjectAction) -> Self {
        Self {
            action: Some(action),
            ..Self::default()
        }
    }

    /// The position as a checkpoint, tagged with the topology `fingerprint` it was taken on.
    pub(super) fn checkpoint(&self, fingerprint: &str) -> Self {
        Self {
            topology: (!fingerprint.is_empty()).then(|| super::topology_tag(fingerprint)),
            ..self.clone()
        }
    }

    /// `subject:{action}:{unit}:{node}:{scan}:{count}:{in_unit}`, `:{topology}` on a
    /// topology with a fingerprint, `;{tally}` for an erase: the previous version's text.
    #[cfg(test)]
    pub(super) fn encode(&self, fingerprint: &str) -> String {
        let action = self.action.map_or("f", action_code);
        let mut base = format!(
            "{CURSOR_PREFIX}{action}:{}:{}:{}:{}:{}",
            self.unit, self.node, self.scan, self.count, self.in_unit
        );
        if !fingerprint.is_empty() {
            base = format!("{base}:{}", super::topology_tag(fingerprint));
        }
        match &self.tally {
            Some(tally) => format!("{base};{}", tally.encode()),
            None => base,
        }
    }

    /// A cursor as the previous version wrote it (see [`Self::encode`]); None when it is
    /// not one.
    pub(super) fn legacy(cursor: &str) -> Option<Self> {
        let rest = cursor.strip_prefix(CURSOR_PREFIX)?;
        let (rest, tally) = match rest.split_once(';') {
            Some((rest, tally)) => (rest, Some(ledger::Tally::parse(tally)?)),
            None => (rest, None),
        };
        let parts: Vec<&str> = rest.split(':').collect();
        if !(6..=7).contains(&parts.len()) {
            return None;
        }
        let action = match parts[0] {
            "f" => SubjectAction::Find,
            "e" => SubjectAction::Erase,
            "v" => SubjectAction::Verify,
            _ => return None,
        };
        Some(Self {
            action: Some(action),
            unit: parts[1].parse().ok()?,
            node: parts[2].parse().ok()?,
            scan: parts[3].parse().ok()?,
            count: parts[4].parse().ok()?,
            in_unit: parts[5].parse().ok()?,
            tally,
            topology: parts.get(6).map(|t| t.to_string()),
        })
    }

    /// The previous version's text read for `action` (see [`Self::resume`]).
    #[cfg(test)]
    pub(super) fn parse(
        cursor: Option<&str>,
        action: SubjectAction,
        nodes: usize,
        fingerprint: &str,
        units: usize,
    ) -> Result<Self, Error> {
        let position = match cursor {
            None => None,
            Some(text) => Some(Self::legacy(text).ok_or_else(|| {
                Error::InvalidSpec("checkpoint cursor is not a Redis subject cursor".into())
            })?),
        };
        Self::resume(position, action, nodes, fingerprint, units)
    }

    /// Where a job for `action` resumes from a checkpoint, on a deployment of `nodes`
    /// nodes whose topology is `fingerprint`, with `units` pieces to work through. An
    /// inconsistent checkpoint is refused; one of another action starts over; a position
    /// past the pieces (the locator changed) starts over, keeping an erase's count (what it
    /// unlinked is gone); one taken on another topology (or another run of a standalone
    /// server, whose SCAN cursors mean nothing now) starts the current glob over, so no
    /// node is skipped.
    pub(super) fn resume(
        cursor: Option<Self>,
        action: SubjectAction,
        nodes: usize,
        fingerprint: &str,
        units: usize,
    ) -> Result<Self, Error> {
        let Some(mut p) = cursor else {
            return Ok(Self::start(action));
        };
        if p.in_unit > p.count {
            return Err(Error::InvalidSpec(
                "checkpoint cursor is not a Redis subject cursor (it counts more in its piece than in all)".into(),
            ));
        }
        if p.action != Some(action) {
            return Ok(Self::start(action));
        }
        let tag = p.topology.take();
        let erase = action == SubjectAction::Erase;
        if !erase {
            p.tally = None;
        }
        if p.unit > units {
            let count = if erase { p.count } else { 0 };
            return Ok(Self {
                count,
                tally: p.tally,
                ..Self::start(action)
            });
        }
        let same_topology = match tag.as_deref() {
            Some(tag) => !fingerprint.is_empty() && tag == super::topology_tag(fingerprint),
            None => fingerprint.is_empty(),
        };
        if p.node >= nodes.max(1) || !same_topology {
            p.restart_unit(erase);
        }
        Ok(p)
    }

    /// Starts the current piece over on the first node.
    pub(super) fn restart_unit(&mut self, erase: bool) {
        if !erase {
            self.count = self.count.saturating_sub(self.in_unit);
        }
        self.in_unit = 0;
        self.node = 0;
        self.scan = 0;
    }

    fn add(&mut self, n: u64) {
        self.count = self.count.saturating_add(n);
        self.in_unit = self.in_unit.saturating_add(n);
    }

    fn next_unit(&mut self) {
        self.unit += 1;
        self.node = 0;
        self.scan = 0;
        self.in_unit = 0;
    }
}

/// Keys already counted in the current glob on the current node by a find or verify: SCAN
/// may return a key twice (the table was resized between calls). Bounded: past this many
/// keys a duplicate is counted again, and so is one returned again in a later step (the
/// set is not carried in the cursor, which must hold no key). An erase needs no such set:
/// its counts are UNLINK's replies, and a key unlinked is not unlinked again.
pub(super) const SEEN_LIMIT: usize = 100_000;

/// What one subject step did: the step, and where it started (to start a piece over when
/// the cluster's topology changed under it).
pub(super) struct Progress {
    pub step: SubjectStep<RedisCursor>,
    pub start: Position,
}

impl RedisBackend {
    /// One bounded step of finding, erasing or verifying a subject on `topology`: works
    /// through the pieces from `cursor` until all are done, `budget.max_time` is spent or
    /// `budget.cancel` is cancelled (then hands back a cursor). At least one SCAN page (or
    /// one hash field or member) is done per step unless the step is cancelled before it
    /// starts, so steps always progress. A failure after some progress is returned with
    /// the cursor before the piece that failed, so counts are kept and nothing is redone.
    pub(super) async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<Position>,
        budget: &StepBudget,
        topology: &Topology,
    ) -> Result<Progress, Error> {
        let (units, skipped, ran) = units(job)?;
        let nodes = topology.nodes.as_slice();
        let fresh = cursor.is_none();
        let start = Position::resume(
            cursor,
            job.action,
            nodes.len(),
            &topology.fingerprint,
            units.len(),
        )?;
        let erase = job.action == SubjectAction::Erase;
        let mut pos = start.clone();
        if erase && pos.tally.is_none() {
            // The run's ledger id is checkpointed before anything is erased under it, so the
            // step that repeats a lost one records into the same ledger.
            let mut tally = ledger::Tally::new(ledger::new_run());
            tally.counted = pos.count;
            pos.tally = Some(tally);
            if fresh {
                // Erases nothing yet, but an instance that no longer leads does not start.
                budget.may_act()?;
                return Ok(Progress {
                    step: SubjectStep {
                        count: 0,
                        blocked: 0,
                        malformed: 0,
                        ran,
                        skipped,
                        next: Next::Continue(RedisCursor::Subject(
                            pos.checkpoint(&topology.fingerprint),
                        )),
                        failure: None,
                        notices: Vec::new(),
                    },
                    start,
                });
            }
        }
        if let Some(tally) = pos.tally.as_ref().filter(|t| t.settled) {
            // The ledger was read and the count it completed is checkpointed: only the
            // ledger's removal is left.
            self.remove_ledger(topology, &tally.run).await?;
            return Ok(Progress {
                step: SubjectStep {
                    count: pos.count,
                    blocked: 0,
                    malformed: 0,
                    ran,
                    skipped,
                    next: Next::Done,
                    failure: None,
                    notices: Vec::new(),
                },
                start,
            });
        }
        let run = pos
            .tally
            .as_ref()
            .map(|t| t.run.clone())
            .unwrap_or_default();
        let deadline = Instant::now() + budget.max_time;
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut worked = false;
        let mut failure = None;
        while let Some(unit) = units.get(pos.unit) {
            if budget.cancel.is_cancelled() || (worked && Instant::now() >= deadline) {
                break;
            }
            worked = true;
            let done = match unit {
                Unit::Glob(pattern) => {
                    let Some(node) = nodes.get(pos.node) else {
                        pos.next_unit();
                        continue;
                    };
                    match self
                        .subject_page(node, pattern, pos.scan, job.action, budget, &mut seen, &run)
                        .await
                    {
                        Ok((next, n)) => {
                            pos.add(n);
                            if next == 0 {
                                seen.clear();
                                pos.node += 1;
                                pos.scan = 0;
                            } else {
                                pos.scan = next;
                            }
                            pos.node >= nodes.len()
                        }
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                Unit::HashField { key, field } => {
                    let mut n = 0u64;
                    for node in nodes {
                        let r = async {
                            if erase {
                                budget.may_act()?;
                                self.erase_one(node, &super::HDEL_SCRIPT, key, field, &run)
                                    .await
                            } else {
                                self.single_key(node, redis::cmd("HEXISTS").arg(key).arg(field))
                                    .await
                            }
                        }
                        .await;
                        match r {
                            Ok(k) => n = n.saturating_add(k),
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        }
                    }
                    // A hash field removed on one node before another failed is gone: its
                    // count is kept, and the retry finds nothing more there.
                    pos.add(n);
                    if failure.is_some() {
                        break;
                    }
                    true
                }
                Unit::SetMember { key, member } => {
                    let mut n = 0u64;
                    for node in nodes {
                        match self
                            .set_member(node, key, member, job.action, budget, &run)
                            .await
                        {
                            Ok(k) => n = n.saturating_add(k),
                            Err(e) => {
                                failure = Some(e);
                                break;
                            }
                        }
                    }
                    pos.add(n);
                    if failure.is_some() {
                        break;
                    }
                    true
                }
            };
            if done {
                pos.next_unit();
            }
        }
        let mut finished = pos.unit >= units.len() && failure.is_none();
        if let (true, Some(tally)) = (finished, pos.tally.as_mut()) {
            // Every piece is done: what the ledger holds beyond what the cursor counts was
            // erased by a batch whose checkpoint was lost. Counted into the cursor, reported
            // by the next step, which removes the ledger once this is checkpointed.
            finished = false;
            tally.counted = pos.count;
            match self.ledger_total(topology, &tally.run).await {
                Ok(total) => {
                    let missing = tally.settle(total);
                    pos.count = pos.count.saturating_add(missing);
                }
                Err(e) => failure = Some(e),
            }
        } else if let Some(tally) = pos.tally.as_mut() {
            tally.counted = pos.count;
        }
        let next = if finished {
            Next::Done
        } else {
            Next::Continue(RedisCursor::Subject(pos.checkpoint(&topology.fingerprint)))
        };
        Ok(Progress {
            step: SubjectStep {
                // As every driver's: an unfinished step reports nothing, the finished one
                // the whole count (the running total travels in the cursor).
                count: if finished { pos.count } else { 0 },
                blocked: 0,
                malformed: 0,
                ran,
                skipped,
                next,
                failure,
                notices: Vec::new(),
            },
            start,
        })
    }

    /// One SCAN page of keys matching `pattern` on one node: counted, or unlinked and
    /// counted. Returns the next SCAN cursor (0: the node is done) and the count.
    #[allow(clippy::too_many_arguments)]
    async fn subject_page(
        &self,
        node: &Node,
        pattern: &str,
        cursor: u64,
        action: SubjectAction,
        budget: &StepBudget,
        seen: &mut HashSet<Vec<u8>>,
        run: &str,
    ) -> Result<(u64, u64), Error> {
        let (next, keys) = self.scan_page(node, pattern, cursor).await?;
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|k| glob::matches(pattern.as_bytes(), k) && !ledger::is_ledger_key(k))
            .collect();
        if keys.is_empty() {
            return Ok((next, 0));
        }
        let count = match action {
            SubjectAction::Find | SubjectAction::Verify => {
                let mut n = 0u64;
                for key in keys {
                    if seen.contains(&key) {
                        continue;
                    }
                    n += 1;
                    if seen.len() < SEEN_LIMIT {
                        seen.insert(key);
                    }
                }
                n
            }
            SubjectAction::Erase => {
                unlink_each(&mut node.conn.clone(), &keys, self, budget, run, &node.addr).await?
            }
        };
        Ok((next, count))
    }

    /// A command on one key that answers an integer. On a cluster node that does not own the
    /// key the answer is MOVED, which means "not here": 0.
    async fn single_key(&self, node: &Node, command: &mut redis::Cmd) -> Result<u64, Error> {
        let mut conn = node.conn.clone();
        self.limits.acquire(1).await;
        match command.query_async::<u64>(&mut conn).await {
            Ok(n) => Ok(n),
            Err(e) if is_not_here(&e) => Ok(0),
            Err(e) => Err(map_error(e, &node.addr)),
        }
    }

    /// One key's record erased by `script` (`KEYS[2]` = `key`, `ARGV[2]` = `item`), recorded
    /// in the ledger of `run` first. On a cluster node that does not own the key: 0.
    async fn erase_one(
        &self,
        node: &Node,
        script: &redis::Script,
        key: &str,
        item: &str,
        run: &str,
    ) -> Result<u64, Error> {
        let mut conn = node.conn.clone();
        self.limits.acquire(1).await;
        let entries = [(key.as_bytes().to_vec(), item)];
        match per_slot(
            &mut conn,
            script,
            &entries,
            self.config.cluster,
            run,
            |invocation, group| {
                for (key, item) in group {
                    invocation.key(key).arg(*item);
                }
            },
        )
        .await
        {
            Ok(n) => Ok(n),
            Err(e) if is_not_here(&e) => Ok(0),
            Err(e) => Err(map_error(e, &node.addr)),
        }
    }

    /// A member of a set (SISMEMBER / SREM) or sorted set (ZSCORE / ZREM).
    async fn set_member(
        &self,
        node: &Node,
        key: &str,
        member: &str,
        action: SubjectAction,
        budget: &StepBudget,
        run: &str,
    ) -> Result<u64, Error> {
        if action == SubjectAction::Erase {
            budget.may_act()?;
            // Type check, membership, ledger and removal in one script.
            return self
                .erase_one(node, &super::MEMBER_SCRIPT, key, member, run)
                .await;
        }
        let mut conn = node.conn.clone();
        self.limits.acquire(1).await;
        let kind: String = match redis::cmd("TYPE").arg(key).query_async(&mut conn).await {
            Ok(kind) => kind,
            Err(e) if is_not_here(&e) => return Ok(0),
            Err(e) => return Err(map_error(e, &node.addr)),
        };
        match kind.as_str() {
            "set" => {
                self.single_key(node, redis::cmd("SISMEMBER").arg(key).arg(member))
                    .await
            }
            "zset" => {
                self.limits.acquire(1).await;
                let score: Option<f64> = redis::cmd("ZSCORE")
                    .arg(key)
                    .arg(member)
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| map_error(e, &node.addr))?;
                Ok(u64::from(score.is_some()))
            }
            // Absent ("none") or another type: the subject is not a member of anything here.
            _ => Ok(0),
        }
    }
}

/// Every combination of the exact forms of a key and of a field or member.
fn pairs<'a>(keys: &'a [String], items: &'a [String]) -> Vec<(&'a String, &'a String)> {
    keys.iter()
        .flat_map(|k| items.iter().map(move |i| (k, i)))
        .collect()
}

/// Unlinks the keys of one SCAN page that still exist, recorded in the ledger of `run` first
/// (one script per slot on a cluster node); returns how many.
async fn unlink_each(
    conn: &mut MultiplexedConnection,
    keys: &[Vec<u8>],
    backend: &RedisBackend,
    budget: &StepBudget,
    run: &str,
    addr: &str,
) -> Result<u64, Error> {
    backend
        .limits
        .acquire(u32::try_from(keys.len()).unwrap_or(u32::MAX))
        .await;
    // Right before the destructive batch, after the rate-limit wait.
    budget.may_act()?;
    keys_per_slot(
        conn,
        &super::UNLINK_SCRIPT,
        keys,
        backend.config.cluster,
        run,
        &[],
    )
    .await
    .map_err(|e| map_error(e, addr))
}

fn is_not_here(e: &redis::RedisError) -> bool {
    super::has_code(e, &["MOVED", "ASK"])
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIND: SubjectAction = SubjectAction::Find;
    const ERASE: SubjectAction = SubjectAction::Erase;

    fn at(
        action: SubjectAction,
        unit: usize,
        node: usize,
        scan: u64,
        count: u64,
        in_unit: u64,
    ) -> Position {
        Position {
            action: Some(action),
            unit,
            node,
            scan,
            count,
            in_unit,
            tally: None,
            topology: None,
        }
    }

    #[test]
    fn subject_cursors_of_the_previous_version_resume() {
        use crate::backends::driver::{decode_cursor, encode_cursor, Decoded, StoreBackend};
        let mut p = at(ERASE, 2, 1, 4711, 20_000, 300);
        p.tally = ledger::Tally::parse("0a1b2c3d4e5f.300");
        let old = "subject:e:2:1:4711:20000:300:ab12cd34;0a1b2c3d4e5f.300";
        let Decoded::Resume { cursor, upgraded } = decode_cursor::<RedisBackend>(Some(old)) else {
            panic!("an old subject cursor does not resume");
        };
        assert!(upgraded);
        let mut tagged = p.clone();
        tagged.topology = Some("ab12cd34".into());
        assert_eq!(cursor, RedisCursor::Subject(tagged.clone()));
        // Written again in the common format, it reads back the same.
        let text = encode_cursor::<RedisBackend>(Some(&cursor));
        assert!(
            text.starts_with(r#"v1:redis:{"job":"subject","action":"erase","#),
            "{text}"
        );
        assert_eq!(
            decode_cursor::<RedisBackend>(Some(&text)),
            Decoded::Resume {
                cursor,
                upgraded: false
            }
        );
        // Resumed on the topology it names, it is where it stopped.
        let RedisCursor::Subject(position) = RedisBackend::legacy_cursor(old).expect("old") else {
            panic!("not a subject cursor");
        };
        let fp = "the fingerprint";
        let mut on = tagged.clone();
        on.topology = Some(super::super::topology_tag(fp));
        assert_eq!(Position::resume(Some(on), ERASE, 2, fp, 5).unwrap(), p);
        assert_ne!(
            Position::resume(Some(position), ERASE, 2, fp, 5).unwrap(),
            p
        );
    }

    #[test]
    fn locators_are_filled_skipped_and_refused_as_every_drivers() {
        let job = |subject: serde_json::Value| SubjectJob {
            target: serde_json::from_value(serde_json::json!({"name": "t", "store": "s",
                "redis": {"keyPattern": "s:*"}, "subject": {"redis": subject}}))
            .expect("a target"),
            identifiers: [("userId".to_string(), "47".to_string())].into(),
            action: FIND,
        };
        let (found, skipped, ran) = units(&job(serde_json::json!({
            "keys": ["s:{userId}:*", "m:{email}:*"],
            "hashFields": [{"key": "h", "field": "{email}"}]})))
        .expect("units");
        assert_eq!((found.len(), ran), (1, true));
        assert_eq!(
            skipped,
            ["keys[1] needs {email}", "hashFields[0] needs {email}"]
        );
        let bad = units(&job(
            serde_json::json!({"setMembers": [{"key": "k", "member": "{userId"}]}),
        ));
        assert_eq!(
            bad.err().map(|e| e.to_string()),
            Some("target t: subject.redis.setMembers[0] is not a valid template".to_string())
        );
    }

    #[test]
    fn a_cursor_resumes_where_it_stopped_and_names_no_key() {
        let p = at(ERASE, 2, 1, 4711, 20_000, 300);
        let standalone = p.encode("");
        assert_eq!(standalone, "subject:e:2:1:4711:20000:300");
        assert_eq!(
            Position::parse(Some(&standalone), ERASE, 2, "", 5).unwrap(),
            p
        );
        let cluster = p.encode("a b c");
        assert_eq!(
            Position::parse(Some(&cluster), ERASE, 3, "a b c", 5).unwrap(),
            p
        );
        assert_eq!(
            Position::parse(None, FIND, 3, "", 5).unwrap(),
            Position::start(FIND)
        );
    }

    #[test]
    fn an_erase_cursor_carries_its_ledger_and_other_actions_drop_it() {
        let mut p = at(ERASE, 2, 0, 99, 300, 10);
        p.tally = Some(ledger::Tally {
            run: "0a1b2c3d4e5f".into(),
            counted: 300,
            settled: false,
        });
        let c = p.encode("");
        assert_eq!(c, "subject:e:2:0:99:300:10;0a1b2c3d4e5f.300");
        assert_eq!(Position::parse(Some(&c), ERASE, 1, "", 5).unwrap(), p);
        // Past the pieces (the locator changed): the ledger stays with the erase.
        let beyond = Position::parse(Some(&c), ERASE, 1, "", 1).unwrap();
        assert_eq!(beyond.tally, p.tally);
        assert_eq!(
            Position::parse(Some(&c), FIND, 1, "", 5).unwrap(),
            Position::start(FIND)
        );
        for bad in ["subject:e:2:0:99:300:10;", "subject:e:2:0:99:300:10;zz.1"] {
            assert!(
                Position::parse(Some(bad), ERASE, 1, "", 5).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn malformed_cursors_are_refused_never_a_panic() {
        for bad in [
            "",
            "subject:",
            "subject:e:1:0:0:5",
            "subject:x:1:0:0:5:0",
            "subject:e:-1:0:0:5:0",
            "subject:e:1:0:0:5:0:tag:more",
            "subject:e:1:0:99999999999999999999999:5:0",
            "subject:e:1:0:0:5:6",
            "0:0",
            "s3:{}",
            "subject:e:1:0:0:5:0:\u{e9}",
        ] {
            let e = Position::parse(Some(bad), ERASE, 1, "", 3);
            if bad.ends_with('\u{e9}') {
                // Well-formed but from another topology: the glob starts over.
                assert_eq!(e.unwrap(), at(ERASE, 1, 0, 0, 5, 0));
                continue;
            }
            let e = e.unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec", "{bad}: {e}");
        }
    }

    #[test]
    fn another_topology_starts_the_glob_over_and_only_a_find_takes_its_count_back() {
        let find = at(FIND, 1, 1, 99, 50, 20).encode("old");
        assert_eq!(
            Position::parse(Some(&find), FIND, 2, "new", 3).unwrap(),
            at(FIND, 1, 0, 0, 30, 0)
        );
        let erase = at(ERASE, 1, 1, 99, 50, 20).encode("old");
        assert_eq!(
            Position::parse(Some(&erase), ERASE, 2, "new", 3).unwrap(),
            at(ERASE, 1, 0, 0, 50, 0)
        );
        // A standalone server that restarted, and a node index past the nodes.
        let standalone = at(FIND, 0, 0, 99, 10, 10).encode("run_id 1");
        assert_eq!(
            Position::parse(Some(&standalone), FIND, 1, "run_id 2", 3).unwrap(),
            at(FIND, 0, 0, 0, 0, 0)
        );
        let past = at(FIND, 0, 4, 99, 10, 4).encode("");
        assert_eq!(
            Position::parse(Some(&past), FIND, 1, "", 3).unwrap(),
            at(FIND, 0, 0, 0, 6, 0)
        );
    }

    #[test]
    fn a_cursor_of_another_action_or_a_changed_locator_starts_over() {
        let erase = at(ERASE, 1, 0, 9, 7, 1).encode("");
        assert_eq!(
            Position::parse(Some(&erase), SubjectAction::Verify, 1, "", 3).unwrap(),
            Position::start(SubjectAction::Verify)
        );
        let beyond = at(ERASE, 9, 0, 9, 7, 1).encode("");
        assert_eq!(
            Position::parse(Some(&beyond), ERASE, 1, "", 3).unwrap(),
            at(ERASE, 0, 0, 0, 7, 0),
            "an erase keeps the count of keys it unlinked"
        );
        let beyond = at(FIND, 9, 0, 9, 7, 1).encode("");
        assert_eq!(
            Position::parse(Some(&beyond), FIND, 1, "", 3).unwrap(),
            Position::start(FIND)
        );
    }
}
