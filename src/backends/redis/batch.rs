//! Many data subjects' records in Redis in one pass (a batch): one SCAN per node serves the
//! key globs of every member, and the members' hash fields and set members are asked for in
//! pipelines. Every record is attributed to the member(s) whose locator selects it.
//!
//! An erase records each removal in a ledger of the step, per member (a hash of member id →
//! count, written by the same script that removes the record), and reports what that ledger
//! holds. A step repeated from an older cursor (the result of an earlier attempt was lost)
//! has the same step number, so it reads the same ledger: what the lost attempt removed is
//! counted, once, for the member it belonged to. The step after takes only its own members'
//! entries out of that ledger: members of the same run whose checkpoint of it was lost
//! resume apart from them (from the cursor before) and still find theirs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::LazyLock;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::subject::{units, Unit, SEEN_LIMIT};
use super::{glob, ledger, map_error, script_groups, Node, RedisBackend, RedisCursor, Topology};
use crate::backends::template::escape_glob;
use crate::backends::{BatchJob, BatchStep, Error, MemberStep, Next, StepBudget, SubjectAction};

/// The part of a batch a step is in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// The members' key globs: one SCAN over every node.
    #[default]
    Keys,
    /// The members' hash fields and set members.
    Records,
    /// An erase's work is done: the last ledger is removed.
    Done,
}

/// Where a batch resumes: positions shared by every member, never a member's index, key or
/// identifier, so it is valid for any subset of the members it started with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BatchPosition {
    pub(super) action: SubjectAction,
    pub(super) phase: Phase,
    /// In [`Phase::Keys`]: the node being scanned and its SCAN cursor.
    pub(super) node: usize,
    pub(super) scan: u64,
    /// [`super::topology_tag`] of the topology the node index counts (absent on a server
    /// without a run id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) topology: Option<String>,
    /// An erase's run: names its ledgers ([`ledger_name`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) run: Option<String>,
    /// The number of the step within the run: the ledger it records into. A step repeated
    /// from this cursor records into (and reports) the same ledger.
    #[serde(default)]
    pub(super) step: u64,
}

impl BatchPosition {
    fn start(action: SubjectAction) -> Self {
        Self {
            action,
            phase: Phase::Keys,
            node: 0,
            scan: 0,
            topology: None,
            run: None,
            step: 0,
        }
    }

    /// Where a batch for `action` resumes on a deployment of `nodes` nodes whose topology is
    /// `fingerprint`. A position of another action starts over; one taken on another
    /// topology (or another run of a standalone server) starts the scan over, so no node is
    /// skipped. A run id that is not one is refused before it names a key.
    pub(super) fn resume(
        cursor: Option<Self>,
        action: SubjectAction,
        nodes: usize,
        fingerprint: &str,
    ) -> Result<Self, Error> {
        let Some(mut p) = cursor else {
            return Ok(Self::start(action));
        };
        if p.action != action {
            return Ok(Self::start(action));
        }
        if p.run.as_deref().is_some_and(|r| !ledger::valid_run(r)) {
            return Err(Error::InvalidSpec(
                "checkpoint cursor is not a Redis batch cursor (its run is not a run id)".into(),
            ));
        }
        let tag = p.topology.take();
        let same_topology = match tag.as_deref() {
            Some(tag) => !fingerprint.is_empty() && tag == super::topology_tag(fingerprint),
            None => fingerprint.is_empty(),
        };
        if p.phase == Phase::Keys && (p.node >= nodes.max(1) || !same_topology) {
            p.node = 0;
            p.scan = 0;
        }
        Ok(p)
    }

    fn checkpoint(&self, fingerprint: &str) -> RedisCursor {
        RedisCursor::Batch(Self {
            topology: (!fingerprint.is_empty()).then(|| super::topology_tag(fingerprint)),
            ..self.clone()
        })
    }
}

/// Member ids taken out of a ledger key per command.
const RELEASE_CHUNK: usize = 1000;

/// The name of the ledger step `step` of `run` records into (one key per slot on a
/// cluster, see [`ledger::key`]): a hash of member id → records removed.
fn ledger_name(run: &str, step: u64) -> String {
    format!("{run}.{step}")
}

/// The folded literal prefix of a glob: the bytes before its first wildcard, escapes
/// resolved, ASCII lowercased, a case pair `[aA]` read as its letter (e-mail values match in
/// any case). Every key the glob matches starts, lowercased, with it.
fn folded_prefix(pattern: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while let Some(&b) = pattern.get(i) {
        match b {
            b'*' | b'?' => break,
            b'[' => match pattern.get(i + 1..i + 4) {
                Some(&[lo, up, b']'])
                    if lo.is_ascii_lowercase() && up == lo.to_ascii_uppercase() =>
                {
                    out.push(lo);
                    i += 4;
                }
                _ => break,
            },
            b'\\' => match pattern.get(i + 1) {
                Some(&e) => {
                    out.push(e.to_ascii_lowercase());
                    i += 2;
                }
                None => break,
            },
            b => {
                out.push(b.to_ascii_lowercase());
                i += 1;
            }
        }
    }
    out
}

/// The members' key globs, indexed by their folded literal prefix: a key is matched only
/// against the globs whose prefix it starts with, so the work per key does not grow with
/// the number of members (only with the number of distinct prefix lengths).
#[derive(Default)]
pub(super) struct GlobIndex {
    /// Each distinct glob and the members it belongs to.
    globs: Vec<(String, Vec<usize>)>,
    /// By prefix length: prefix → indices into `globs`.
    by_len: BTreeMap<usize, HashMap<Vec<u8>, Vec<usize>>>,
}

impl GlobIndex {
    pub(super) fn new(pairs: impl IntoIterator<Item = (String, usize)>) -> Self {
        let mut distinct: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for (glob, member) in pairs {
            let members = distinct.entry(glob).or_default();
            if !members.contains(&member) {
                members.push(member);
            }
        }
        let mut index = Self::default();
        for (glob, members) in distinct {
            let prefix = folded_prefix(glob.as_bytes());
            index
                .by_len
                .entry(prefix.len())
                .or_default()
                .entry(prefix)
                .or_default()
                .push(index.globs.len());
            index.globs.push((glob, members));
        }
        index
    }

    fn is_empty(&self) -> bool {
        self.globs.is_empty()
    }

    /// The members whose globs match `key`, sorted, each once.
    pub(super) fn members(&self, key: &[u8]) -> Vec<usize> {
        let folded = key.to_ascii_lowercase();
        let mut out = Vec::new();
        for (&len, prefixes) in self.by_len.range(..=key.len()) {
            let Some(candidates) = folded.get(..len).and_then(|p| prefixes.get(p)) else {
                continue;
            };
            for &g in candidates {
                if let Some((glob, members)) = self.globs.get(g) {
                    if glob::matches(glob.as_bytes(), key) {
                        out.extend_from_slice(members);
                    }
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The SCAN MATCH pattern one pass uses: the literal text every glob starts with, then
    /// `*`. Never narrower than a member's glob, so the pass finds every key the member's
    /// own step would (in the usual layouts it is the target's keyPattern, `dataset:*`).
    pub(super) fn scan_pattern(&self) -> String {
        let mut common: Option<String> = None;
        for (glob, _) in &self.globs {
            let prefix = glob::literal_prefix(glob);
            common = Some(match common {
                None => prefix,
                Some(c) => c
                    .chars()
                    .zip(prefix.chars())
                    .take_while(|(a, b)| a == b)
                    .map(|(a, _)| a)
                    .collect(),
            });
        }
        format!("{}*", escape_glob(&common.unwrap_or_default()))
    }
}

/// A hash field or a set member of one or more members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Key,
    HashField,
    SetMember,
}

impl Kind {
    fn code(self) -> &'static str {
        match self {
            Kind::Key => "k",
            Kind::HashField => "h",
            Kind::SetMember => "m",
        }
    }
}

/// One record for the batch script: a key (UNLINK), a hash field or a set member, and the
/// members it is counted for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    key: Vec<u8>,
    item: String,
    members: Vec<usize>,
}

/// What every step builds afresh from the members' identifiers.
struct Plan {
    index: GlobIndex,
    records: Vec<Entry>,
    /// Per member: whether any locator ran, and the locators skipped.
    members: Vec<MemberStep>,
    /// Member id → the members' indices.
    by_id: HashMap<String, Vec<usize>>,
}

impl Plan {
    fn build(job: &BatchJob) -> Result<Self, Error> {
        let mut globs = Vec::new();
        let mut records: BTreeMap<(Kind, String, String), Vec<usize>> = BTreeMap::new();
        let mut members = Vec::with_capacity(job.members.len());
        let mut by_id: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, member) in job.members.iter().enumerate() {
            let (found, skipped, ran) = units(&member.job(job))?;
            for unit in found {
                match unit {
                    Unit::Glob(g) => globs.push((g, i)),
                    Unit::HashField { key, field } => records
                        .entry((Kind::HashField, key, field))
                        .or_default()
                        .push(i),
                    Unit::SetMember { key, member } => records
                        .entry((Kind::SetMember, key, member))
                        .or_default()
                        .push(i),
                }
            }
            members.push(MemberStep {
                ran,
                skipped,
                ..MemberStep::default()
            });
            by_id.entry(member.id.clone()).or_default().push(i);
        }
        let records = records
            .into_iter()
            .map(|((kind, key, item), mut members)| {
                members.dedup();
                Entry {
                    kind,
                    key: key.into_bytes(),
                    item,
                    members,
                }
            })
            .collect();
        Ok(Self {
            index: GlobIndex::new(globs),
            records,
            members,
            by_id,
        })
    }
}

/// Checks (ARGV[2] = '1') or removes the records `KEYS[2..]`, each described in ARGV from
/// ARGV[3] on by its kind (`k` key, `h` hash field, `m` set or sorted-set member), its field
/// or member, and the ids of the members it counts for. A removal is recorded first, per
/// member id, in the ledger hash `KEYS[1]` (expiring after ARGV[1] seconds). Answers 1 or 0
/// per record.
static BATCH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
local check = ARGV[2] == '1'
local out, a, gone = {}, 3, {}
for i = 2, #KEYS do
  local key, kind, item, n = KEYS[i], ARGV[a], ARGV[a + 1], tonumber(ARGV[a + 2])
  local first = a + 3
  a = first + n
  local hit, t = 0, nil
  if kind == 'k' then
    if not gone[key] and redis.call('EXISTS', key) == 1 then hit = 1 end
  else
    t = redis.call('TYPE', key).ok
    if kind == 'h' and t == 'hash' then
      hit = redis.call('HEXISTS', key, item)
    elseif kind == 'm' and t == 'set' then
      hit = redis.call('SISMEMBER', key, item)
    elseif kind == 'm' and t == 'zset' and redis.call('ZSCORE', key, item) then
      hit = 1
    end
  end
  if hit == 1 and not check then
    for j = first, first + n - 1 do
      redis.call('HINCRBY', KEYS[1], ARGV[j], 1)
    end
    redis.call('EXPIRE', KEYS[1], ARGV[1])
    if kind == 'k' then
      redis.call('UNLINK', key)
      gone[key] = true
    elseif kind == 'h' then
      redis.call('HDEL', key, item)
    elseif t == 'set' then
      redis.call('SREM', key, item)
    else
      redis.call('ZREM', key, item)
    end
  end
  out[#out + 1] = hit
end
return out
",
    )
});

/// What an attempt at a piece of work ended with.
type Outcome = Result<(), Error>;

impl RedisBackend {
    /// One bounded batch step (see [`crate::backends::driver::StoreBackend::subjects`]).
    pub(super) async fn batch(
        &self,
        job: &BatchJob,
        cursor: Option<BatchPosition>,
        budget: &StepBudget,
    ) -> Result<BatchStep<RedisCursor>, Error> {
        let before = self.settled_topology().await?;
        let plan = Plan::build(job)?;
        let fingerprint = before.fingerprint.as_str();
        let erase = job.action == SubjectAction::Erase;
        let mut pos = BatchPosition::resume(cursor, job.action, before.nodes.len(), fingerprint)?;
        let mut step = BatchStep::empty(job.members.len(), Next::Done);
        step.members.clone_from(&plan.members);
        if erase && pos.run.is_none() {
            // The run is checkpointed before anything is erased under it, so the step that
            // repeats a lost one records into (and reads) the same ledger.
            budget.may_act()?;
            pos = BatchPosition {
                run: Some(ledger::new_run()),
                ..BatchPosition::start(job.action)
            };
            step.next = Next::Continue(pos.checkpoint(fingerprint));
            return Ok(step);
        }
        let run = pos.run.clone().unwrap_or_default();
        if erase {
            if let Some(previous) = pos.step.checked_sub(1) {
                // The step before this cursor is checkpointed, with what its ledger held, for
                // these members; not for members of the run behind them (whose checkpoint
                // was lost), who repeat that step and read their entries.
                let ids: Vec<&str> = job.members.iter().map(|m| m.id.as_str()).collect();
                self.release_ledger(&before, &ledger_name(&run, previous), &ids)
                    .await?;
            }
            if pos.phase == Phase::Done {
                return Ok(step);
            }
        }
        let start = pos.clone();
        let outcome = self
            .batch_work(job, &plan, &before, &mut pos, &mut step, budget)
            .await;
        let after = self.topology().await?;
        let redirected = matches!(&outcome, Err(Error::ClusterRedirect(_)));
        let moved = before.fingerprint != after.fingerprint || after.migrating || redirected;
        if moved {
            // Keys moved to another primary meanwhile may have been missed: the phase the
            // step started in starts over on the new topology. What an erase removed is in
            // its ledger and reported below.
            pos = BatchPosition {
                node: 0,
                scan: 0,
                ..start
            };
        }
        // A redirect only said that the topology moved: the restarted phase deals with it.
        let outcome = if redirected { Ok(()) } else { outcome };
        if !erase {
            if moved {
                for m in &mut step.members {
                    m.count = 0;
                }
            }
            step.failure = outcome.err();
            step.next = match pos.phase {
                Phase::Done => Next::Done,
                _ => Next::Continue(pos.checkpoint(&after.fingerprint)),
            };
            return Ok(step);
        }
        // An erase reports what its ledger holds: what this attempt removed and what any
        // lost attempt of the same step did. A failed step reports nothing and keeps its
        // step number, so the attempt that follows reports all of it.
        let counted = match outcome {
            Ok(()) => {
                self.batch_ledger(&after, &ledger_name(&run, pos.step))
                    .await
            }
            Err(e) => Err(e),
        };
        match counted {
            Ok(counts) => {
                for (id, n) in counts {
                    for &i in plan.by_id.get(&id).into_iter().flatten() {
                        if let Some(m) = step.members.get_mut(i) {
                            m.count = m.count.saturating_add(n);
                        }
                    }
                }
                pos.step = pos.step.saturating_add(1);
            }
            Err(e) => step.failure = Some(e),
        }
        step.next = Next::Continue(pos.checkpoint(&after.fingerprint));
        Ok(step)
    }

    /// Works through the phases from `pos` until all are done, the time is spent or the step
    /// is cancelled; at least one SCAN page or the records phase is done per step.
    async fn batch_work(
        &self,
        job: &BatchJob,
        plan: &Plan,
        topology: &Topology,
        pos: &mut BatchPosition,
        step: &mut BatchStep<RedisCursor>,
        budget: &StepBudget,
    ) -> Outcome {
        let nodes = topology.nodes.as_slice();
        let deadline = Instant::now() + budget.max_time;
        let run = pos.run.as_deref().map(|r| ledger_name(r, pos.step));
        let pattern = plan.index.scan_pattern();
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        let mut worked = false;
        loop {
            if pos.phase == Phase::Done
                || budget.cancel.is_cancelled()
                || (worked && Instant::now() >= deadline)
            {
                return Ok(());
            }
            match pos.phase {
                Phase::Keys => {
                    let node = nodes.get(pos.node).filter(|_| !plan.index.is_empty());
                    let Some(node) = node else {
                        pos.phase = Phase::Records;
                        pos.node = 0;
                        pos.scan = 0;
                        continue;
                    };
                    worked = true;
                    let next = self
                        .batch_page(
                            node,
                            &pattern,
                            pos.scan,
                            job,
                            plan,
                            step,
                            budget,
                            &mut seen,
                            run.as_deref(),
                        )
                        .await?;
                    pos.scan = next;
                    if next == 0 {
                        seen.clear();
                        pos.node += 1;
                        if pos.node >= nodes.len() {
                            // A cursor past the nodes would read as another topology's.
                            pos.phase = Phase::Records;
                            pos.node = 0;
                        }
                    }
                }
                Phase::Records => {
                    worked = true;
                    self.batch_records(topology, job, plan, step, budget, run.as_deref())
                        .await?;
                    pos.phase = Phase::Done;
                }
                Phase::Done => return Ok(()),
            }
        }
    }

    /// One SCAN page on one node: each key matched against the members' globs, counted for
    /// each member it belongs to, or removed (once) and recorded for each. Returns the next
    /// SCAN cursor (0: the node is done).
    #[allow(clippy::too_many_arguments)]
    async fn batch_page(
        &self,
        node: &Node,
        pattern: &str,
        cursor: u64,
        job: &BatchJob,
        plan: &Plan,
        step: &mut BatchStep<RedisCursor>,
        budget: &StepBudget,
        seen: &mut HashSet<Vec<u8>>,
        run: Option<&str>,
    ) -> Result<u64, Error> {
        let (next, keys) = self.scan_page(node, pattern, cursor).await?;
        let mut entries = Vec::new();
        for key in keys {
            if ledger::is_ledger_key(&key) {
                continue;
            }
            let members = plan.index.members(&key);
            if members.is_empty() {
                continue;
            }
            entries.push(Entry {
                kind: Kind::Key,
                key,
                item: String::new(),
                members,
            });
        }
        match run {
            None => {
                for entry in entries {
                    if seen.contains(&entry.key) {
                        continue;
                    }
                    count(step, &entry.members);
                    if seen.len() < SEEN_LIMIT {
                        seen.insert(entry.key);
                    }
                }
            }
            Some(run) => self.erase(node, entries, job, step, budget, run).await?,
        }
        Ok(next)
    }

    /// The members' hash fields and set members, each asked of the node that serves its key
    /// (pipelined, one script per slot), counted or removed and recorded.
    async fn batch_records(
        &self,
        topology: &Topology,
        job: &BatchJob,
        plan: &Plan,
        step: &mut BatchStep<RedisCursor>,
        budget: &StepBudget,
        run: Option<&str>,
    ) -> Outcome {
        let nodes = topology.nodes.as_slice();
        let mut per_node: Vec<Vec<Entry>> = vec![Vec::new(); nodes.len()];
        for entry in &plan.records {
            let at = if self.config.cluster {
                let slot = ledger::slot_of(&entry.key);
                nodes.iter().position(|n| {
                    n.slots
                        .iter()
                        .any(|&(first, last)| (first..=last).contains(&slot))
                })
            } else {
                Some(0)
            };
            let Some(list) = at.and_then(|i| per_node.get_mut(i)) else {
                return Err(Error::Store(
                    "no Redis Cluster primary serves the slot of a record".into(),
                ));
            };
            list.push(entry.clone());
        }
        for (node, entries) in nodes.iter().zip(per_node) {
            if entries.is_empty() {
                continue;
            }
            match run {
                None => {
                    let hits = self.run_script(node, job, &entries, "check", true).await?;
                    for (entry, hit) in entries.iter().zip(hits) {
                        if hit > 0 {
                            count(step, &entry.members);
                        }
                    }
                }
                Some(run) => self.erase(node, entries, job, step, budget, run).await?,
            }
        }
        Ok(())
    }

    /// Removes `entries` on `node`, recorded in the ledger `run`: the gate is asked first,
    /// and a record of a member it holds (now or earlier in the step) is kept.
    async fn erase(
        &self,
        node: &Node,
        mut entries: Vec<Entry>,
        job: &BatchJob,
        step: &mut BatchStep<RedisCursor>,
        budget: &StepBudget,
        run: &str,
    ) -> Outcome {
        if entries.is_empty() {
            return Ok(());
        }
        step.held.extend(job.gate.held().await?);
        entries.retain(|e| !e.members.iter().any(|m| step.held.contains(m)));
        if entries.is_empty() {
            return Ok(());
        }
        self.limits
            .acquire(u32::try_from(entries.len()).unwrap_or(u32::MAX))
            .await;
        // Right before the destructive batch, after the rate-limit wait.
        budget.may_act()?;
        // The counts come from the ledger at the end of the step.
        self.run_script(node, job, &entries, run, false).await?;
        Ok(())
    }

    /// [`BATCH_SCRIPT`] over `entries` on `node`, one call per slot on a cluster, all in one
    /// pipeline; the answers in the order of `entries`.
    async fn run_script(
        &self,
        node: &Node,
        job: &BatchJob,
        entries: &[Entry],
        run: &str,
        check: bool,
    ) -> Result<Vec<u64>, Error> {
        let keyed: Vec<(Vec<u8>, usize)> = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.key.clone(), i))
            .collect();
        let groups = script_groups(&keyed, self.config.cluster);
        let mut pipe = redis::pipe();
        pipe.load_script(&BATCH_SCRIPT).ignore();
        let mut order = Vec::with_capacity(entries.len());
        let mut invocations = Vec::with_capacity(groups.len());
        for group in &groups {
            let mut invocation = BATCH_SCRIPT.prepare_invoke();
            let slot = group
                .first()
                .filter(|_| self.config.cluster)
                .map(|(key, _)| ledger::slot_of(key));
            invocation
                .key(ledger::key(run, slot))
                .arg(ledger::TTL_SECS)
                .arg(if check { "1" } else { "0" });
            for &(key, i) in group {
                let Some(entry) = entries.get(*i) else {
                    continue;
                };
                invocation
                    .key(key)
                    .arg(entry.kind.code())
                    .arg(&entry.item)
                    .arg(entry.members.len());
                for &m in &entry.members {
                    invocation.arg(job.members.get(m).map_or("", |x| x.id.as_str()));
                }
                order.push(*i);
            }
            invocations.push(invocation);
        }
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        self.limits.acquire(1).await;
        let replies: Vec<Vec<u64>> = pipe
            .query_async(&mut node.conn.clone())
            .await
            .map_err(|e| map_error(e, &node.addr))?;
        let mut hits = vec![0u64; entries.len()];
        for (i, hit) in order.into_iter().zip(replies.into_iter().flatten()) {
            if let Some(h) = hits.get_mut(i) {
                *h = hit;
            }
        }
        Ok(hits)
    }

    /// Takes the entries of `ids` out of the ledger `name`; Redis removes a hash whose last
    /// entry goes. On a cluster most slots have no ledger key: which exist is asked first.
    async fn release_ledger(
        &self,
        topology: &Topology,
        name: &str,
        ids: &[&str],
    ) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        for node in topology.nodes.iter() {
            for chunk in self.ledger_keys(node, name).chunks(super::LEDGER_CHUNK) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("EXISTS").arg(key);
                }
                let exists: Vec<bool> = self.on_node(node, &pipe).await?;
                let mut pipe = redis::pipe();
                let existing = chunk.iter().zip(exists).filter(|(_, e)| *e);
                for (key, _) in existing {
                    for some in ids.chunks(RELEASE_CHUNK) {
                        pipe.cmd("HDEL").arg(key).arg(some).ignore();
                    }
                }
                if pipe.cmd_iter().next().is_none() {
                    continue;
                }
                let () = self.on_node(node, &pipe).await?;
            }
        }
        Ok(())
    }

    /// What the ledger `name` holds, member id → records removed, all nodes together.
    async fn batch_ledger(
        &self,
        topology: &Topology,
        name: &str,
    ) -> Result<HashMap<String, u64>, Error> {
        let mut total: HashMap<String, u64> = HashMap::new();
        for node in topology.nodes.iter() {
            for chunk in self.ledger_keys(node, name).chunks(super::LEDGER_CHUNK) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("HGETALL").arg(key);
                }
                self.limits.acquire(1).await;
                let values: Vec<HashMap<String, u64>> = pipe
                    .query_async(&mut node.conn.clone())
                    .await
                    .map_err(|e| map_error(e, &node.addr))?;
                for (id, n) in values.into_iter().flatten() {
                    let sum = total.entry(id).or_default();
                    *sum = sum.saturating_add(n);
                }
            }
        }
        Ok(total)
    }
}

fn count(step: &mut BatchStep<RedisCursor>, members: &[usize]) {
    for &m in members {
        if let Some(s) = step.members.get_mut(m) {
            s.count = s.count.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::driver::{decode_cursor, encode_cursor, Decoded};
    use crate::backends::identifier::glob_fold;
    use std::sync::Arc;

    fn index(globs: &[(&str, usize)]) -> GlobIndex {
        GlobIndex::new(globs.iter().map(|(g, m)| (g.to_string(), *m)))
    }

    #[test]
    fn folded_prefixes_stop_at_the_first_wildcard() {
        let p = |g: &str| String::from_utf8(folded_prefix(g.as_bytes())).unwrap();
        assert_eq!(p("ds:u:Ab47:*"), "ds:u:ab47:");
        assert_eq!(
            p(&format!("ds:m:{}:*", glob_fold("Bob@x.org"))),
            "ds:m:bob@x.org:"
        );
        assert_eq!(p(r"a\*b\[c*"), "a*b[c");
        assert_eq!(p("s[0-9]:*"), "s");
        assert_eq!(p("[aB]x"), "");
        assert_eq!(p("*:47"), "");
        assert_eq!(p("k?"), "k");
        assert_eq!(p("exact"), "exact");
    }

    #[test]
    fn a_key_is_attributed_to_every_member_whose_glob_matches_it() {
        let mail = format!("ds:m:{}:*", glob_fold("Bob@x.org"));
        let idx = index(&[
            ("ds:u:Ab47:*", 0),
            ("ds:u:Ab4711:*", 1),
            (mail.as_str(), 2),
            // Two members with the same user id: the key counts for both.
            ("ds:u:Ab47:*", 3),
            ("ds:u:ab47:*", 4),
            ("*:shared", 5),
        ]);
        assert_eq!(idx.members(b"ds:u:Ab47:1"), [0, 3]);
        assert_eq!(idx.members(b"ds:u:Ab4711:1"), [1]);
        assert_eq!(idx.members(b"ds:u:ab47:1"), [4], "case-sensitive ids");
        assert_eq!(idx.members(b"ds:m:BOB@X.org:7"), [2], "e-mail in any case");
        assert_eq!(idx.members(b"ds:m:bob@x.orgx:7"), Vec::<usize>::new());
        assert_eq!(idx.members(b"ds:u:Ab47:shared"), [0, 3, 5]);
        assert_eq!(idx.members(b"ds:"), Vec::<usize>::new());
        assert_eq!(idx.members(b""), Vec::<usize>::new());
    }

    #[test]
    fn a_key_is_checked_only_against_globs_sharing_its_prefix() {
        let globs: Vec<(String, usize)> = (0..10_000)
            .map(|i| (format!("ds:u:user{i}:*"), i))
            .collect();
        let idx = GlobIndex::new(globs);
        // One prefix length per id length (4 here): a lookup touches at most that many
        // buckets, each with only the globs of that exact prefix.
        assert!(idx.by_len.len() <= 5, "{}", idx.by_len.len());
        assert!(idx
            .by_len
            .values()
            .flat_map(|m| m.values())
            .all(|globs| globs.len() == 1));
        assert_eq!(idx.members(b"ds:u:user4711:a"), [4711]);
        assert_eq!(idx.members(b"ds:u:user47110:a"), Vec::<usize>::new());
    }

    #[test]
    fn one_scan_pattern_covers_every_glob() {
        let mail = format!("ds:m:{}:*", glob_fold("bob@x.org"));
        let idx = index(&[("ds:u:Ab47:*", 0), (mail.as_str(), 1)]);
        assert_eq!(idx.scan_pattern(), "ds:*");
        assert_eq!(index(&[("ds:u:1:*", 0)]).scan_pattern(), "ds:u:1:*");
        assert_eq!(index(&[("a-b*", 0), ("a-c*", 1)]).scan_pattern(), r"a\-*");
        assert_eq!(index(&[("ds:*", 0), ("x*", 1)]).scan_pattern(), "*");
        for key in ["ds:u:Ab47:1", "ds:m:BOB@x.org:2"] {
            assert!(glob::matches(idx.scan_pattern().as_bytes(), key.as_bytes()));
        }
    }

    fn at(phase: Phase, node: usize, scan: u64) -> BatchPosition {
        BatchPosition {
            phase,
            node,
            scan,
            run: Some("0a1b2c3d4e5f".into()),
            step: 7,
            ..BatchPosition::start(SubjectAction::Erase)
        }
    }

    #[test]
    fn a_batch_cursor_round_trips_and_names_no_member() {
        let cursor = at(Phase::Keys, 1, 4711).checkpoint("run_id abc");
        let text = encode_cursor::<RedisBackend>(Some(&cursor));
        assert!(
            text.starts_with(r#"v1:redis:{"job":"batch","action":"erase","#),
            "{text}"
        );
        assert!(!text.contains("member"), "{text}");
        assert_eq!(
            decode_cursor::<RedisBackend>(Some(&text)),
            Decoded::Resume {
                cursor: cursor.clone(),
                upgraded: false
            }
        );
        let RedisCursor::Batch(p) = cursor else {
            panic!("not a batch cursor");
        };
        let erase = SubjectAction::Erase;
        assert_eq!(
            BatchPosition::resume(Some(p.clone()), erase, 2, "run_id abc").unwrap(),
            at(Phase::Keys, 1, 4711)
        );
        // Another run of the server, a node index past the nodes: the scan starts over,
        // the run and its step number stay.
        assert_eq!(
            BatchPosition::resume(Some(p.clone()), erase, 2, "run_id def").unwrap(),
            at(Phase::Keys, 0, 0)
        );
        assert_eq!(
            BatchPosition::resume(Some(p.clone()), erase, 1, "run_id abc").unwrap(),
            at(Phase::Keys, 0, 0)
        );
        // Another action starts over.
        assert_eq!(
            BatchPosition::resume(Some(p), SubjectAction::Verify, 2, "run_id abc").unwrap(),
            BatchPosition::start(SubjectAction::Verify)
        );
        // Past the scan, the position does not depend on the topology.
        let records = at(Phase::Records, 0, 0);
        assert_eq!(
            BatchPosition::resume(Some(records.clone()), erase, 3, "other").unwrap(),
            records
        );
    }

    #[test]
    fn old_cursors_still_decode_and_a_forged_run_is_refused() {
        let Decoded::Resume { cursor, .. } =
            decode_cursor::<RedisBackend>(Some("subject:e:2:1:4711:20000:300"))
        else {
            panic!("an old subject cursor does not resume");
        };
        assert!(matches!(cursor, RedisCursor::Subject(_)));
        let mut forged = at(Phase::Keys, 0, 0);
        forged.run = Some("x:*".into());
        let e = BatchPosition::resume(Some(forged), SubjectAction::Erase, 1, "").unwrap_err();
        assert_eq!(e.reason(), "InvalidSpec");
    }

    #[test]
    fn a_plan_groups_records_and_keeps_each_members_locators() {
        let target: crate::api::retentionpolicy::Target = serde_json::from_value(
            serde_json::json!({"name": "t", "store": "s", "redis": {"keyPattern": "s:*"},
            "subject": {"redis": {"keys": ["s:{userId}:*"],
                "hashFields": [{"key": "h:{userId}", "field": "f"}],
                "setMembers": [{"key": "emails", "member": "{email}"}]}}}),
        )
        .expect("a target");
        let member = crate::backends::BatchMember::of;
        let job = BatchJob {
            target,
            action: SubjectAction::Find,
            members: vec![
                member("d0", &[("userId", "47"), ("email", "a@x.org")]),
                member("d1", &[("userId", "47")]),
                member("d2", &[("email", "b@x.org")]),
            ],
            gate: Arc::new(crate::backends::NoHolds),
        };
        let plan = Plan::build(&job).expect("a plan");
        assert_eq!(plan.index.members(b"s:47:1"), [0, 1]);
        let records: Vec<(Kind, &[u8], &str, &[usize])> = plan
            .records
            .iter()
            .map(|e| {
                (
                    e.kind,
                    e.key.as_slice(),
                    e.item.as_str(),
                    e.members.as_slice(),
                )
            })
            .collect();
        assert_eq!(
            records,
            [
                (Kind::HashField, &b"h:47"[..], "f", &[0, 1][..]),
                (Kind::SetMember, &b"emails"[..], "a@x.org", &[0][..]),
                (Kind::SetMember, &b"emails"[..], "b@x.org", &[2][..]),
            ]
        );
        assert!(plan.members.iter().all(|m| m.ran));
        assert_eq!(
            plan.members[2].skipped,
            ["keys[0] needs {userId}", "hashFields[0] needs {userId}"]
        );
        assert_eq!(plan.by_id.get("d1"), Some(&vec![1]));
    }
}
