//! Redis and Redis Cluster: retention by SCAN-based batching with pipelined commands.
//!
//! Modes (API.md): `expire` gives every matching key a TTL of at most `retention`
//! (`EXPIRE … LT`, so keys already bounded are left alone and counts stay exact on re-runs);
//! `idle` unlinks keys whose OBJECT IDLETIME exceeds `retention`, judged in the deleting script
//! (one per slot on a cluster node) so a key touched meanwhile survives; `timestamp` unlinks
//! hashes whose timestamp field is older than the cutoff, read and judged in the deleting
//! script (a form of timestamp the script does not read is judged by the operator and checked
//! again in the deleting script) so a hash refreshed meanwhile survives. Counts come from
//! the replies of the deleting commands, never from what was merely selected, so a resumed
//! step cannot count a key twice.

pub mod batch;
pub mod driver;
pub mod glob;
pub mod ledger;
pub mod subject;

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, RedisResult,
};
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{
    BatchJob, BatchStep, Error, Limits, Next, Step, StepBudget, SubjectAction, SubjectJob,
    SubjectStep, SweepJob,
};
use crate::api::retentionpolicy::{RedisMode, RedisTarget, Target};
use crate::api::StoreKind;
use crate::backends::driver::{StoreBackend, StoreDriver};
use crate::backends::{held_subject_locator, identifier, template};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Keys asked for per SCAN call.
const SCAN_COUNT: usize = 5000;

/// How to reach one Redis deployment, resolved from a DataStore and its Secret.
#[derive(Clone, PartialEq)]
pub struct RedisConfig {
    pub url: String,
    pub password: Option<String>,
    pub cluster: bool,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("cluster", &self.cluster)
            .finish()
    }
}

struct Node {
    /// `host:port`, for messages.
    addr: String,
    conn: MultiplexedConnection,
    /// Major version, to choose between `EXPIRE … LT` (7+) and a PTTL check.
    major_version: u32,
    version: String,
    /// `run_id` from `INFO server`: new each time the server starts.
    run_id: String,
    /// Cluster only: the slots this primary serves (first, last), where its ledger keys are.
    slots: Vec<(u16, u16)>,
}

pub struct RedisBackend {
    config: RedisConfig,
    limits: Limits,
    /// The server, or the cluster's primaries as last seen. A cluster's is re-read before
    /// every step (see [`RedisBackend::nodes`]).
    topology: Mutex<Option<Topology>>,
}

/// The nodes to talk to and what they were chosen from.
#[derive(Clone)]
struct Topology {
    nodes: Arc<Vec<Node>>,
    /// Cluster: which primary serves which slots ([`ClusterView::fingerprint`]); standalone:
    /// the server's run (`run_id`).
    fingerprint: String,
    /// Cluster only: a slot is being migrated between two primaries.
    migrating: bool,
}

/// What `CLUSTER NODES` says (pure, unit-tested).
#[derive(Clone, Debug, PartialEq)]
pub struct ClusterView {
    /// Primaries that serve slots, by address.
    pub primaries: Vec<(String, u16)>,
    /// Slots served by a primary that is not failing (16384 when the cluster is whole).
    pub covered_slots: u32,
    /// A slot is being migrated (`[slot->-id]` or `[slot-<-id]`).
    pub migrating: bool,
    /// Every primary's id, address and slots, sorted: equal fingerprints, same routing.
    pub fingerprint: String,
    /// The slot ranges (first, last) each primary serves, by address.
    pub served: std::collections::BTreeMap<(String, u16), Vec<(u16, u16)>>,
}

/// The number of hash slots of a Redis Cluster.
pub const CLUSTER_SLOTS: u32 = 16384;

/// Reads `CLUSTER NODES` output.
pub fn cluster_view(listing: &str) -> ClusterView {
    let mut primaries = Vec::new();
    let mut covered = 0u32;
    let mut migrating = false;
    let mut lines: Vec<String> = Vec::new();
    let mut served: std::collections::BTreeMap<(String, u16), Vec<(u16, u16)>> = Default::default();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(id), Some(addr), Some(flags)) = (fields.first(), fields.get(1), fields.get(2))
        else {
            continue;
        };
        if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
            continue;
        }
        let slots = fields.get(8..).unwrap_or_default();
        if slots.is_empty() {
            continue;
        }
        let mut ranges = Vec::new();
        for slot in slots {
            if slot.starts_with('[') {
                migrating = true;
                continue;
            }
            let (from, to) = slot.split_once('-').unwrap_or((slot, slot));
            if let (Ok(from), Ok(to)) = (from.parse::<u32>(), to.parse::<u32>()) {
                covered = covered.saturating_add(to.saturating_sub(from).saturating_add(1));
            }
            if let (Ok(from), Ok(to)) = (from.parse::<u16>(), to.parse::<u16>()) {
                if from <= to && to < ledger_slots() {
                    ranges.push((from, to));
                }
            }
        }
        lines.push(format!("{id} {addr} {}", slots.join(" ")));
        let Some(host_port) = addr.split(['@', ',']).next() else {
            continue;
        };
        let Some((host, port)) = host_port.rsplit_once(':') else {
            continue;
        };
        if let Ok(port) = port.parse::<u16>() {
            if !host.is_empty() && port != 0 {
                primaries.push((host.to_string(), port));
                served.insert((host.to_string(), port), ranges);
            }
        }
    }
    primaries.sort();
    lines.sort();
    ClusterView {
        primaries,
        covered_slots: covered,
        migrating,
        fingerprint: lines.join("\n"),
        served,
    }
}

/// A step refused while a Redis Cluster slot is being migrated (retried later).
fn migrating() -> Error {
    Error::Store(
        "a Redis Cluster slot is being migrated between primaries; retrying once it is done".into(),
    )
}

/// The number of slots, as the slot ranges' type.
const fn ledger_slots() -> u16 {
    16384
}

impl RedisBackend {
    pub fn new(config: RedisConfig, limits: Limits) -> Self {
        Self {
            config,
            limits,
            topology: Mutex::new(None),
        }
    }

    fn connection_info(&self) -> Result<ConnectionInfo, Error> {
        let info = self
            .config
            .url
            .as_str()
            .into_connection_info()
            .map_err(|e| {
                Error::InvalidSpec(format!(
                    "invalid Redis URL {}: {e}",
                    redact_url(&self.config.url)
                ))
            })?;
        Ok(match &self.config.password {
            Some(password) => {
                let settings = info.redis_settings().clone().set_password(password);
                info.set_redis_settings(settings)
            }
            None => info,
        })
    }

    /// The nodes to talk to: the server (connected once), or every primary of the cluster as
    /// it is now. A cluster's `CLUSTER NODES` is read again on every call, and when a failover
    /// or a reshard changed which primary serves which slots, the new primaries are
    /// connected: a step never works on a stale topology. A cluster that does not serve
    /// every slot (a failover under way) is an error, never "nothing there".
    async fn nodes(&self) -> Result<Arc<Vec<Node>>, Error> {
        Ok(self.topology().await?.nodes)
    }

    /// The topology, refused while a slot is being migrated: keys of a migrating slot may be
    /// on either side, and neither side answers for the other.
    async fn settled_topology(&self) -> Result<Topology, Error> {
        let topology = self.topology().await?;
        if topology.migrating {
            return Err(migrating());
        }
        Ok(topology)
    }

    /// One SCAN page of the keys matching `pattern` on `node` from `cursor`: the next SCAN
    /// cursor (0: the node is done) and the keys.
    async fn scan_page(
        &self,
        node: &Node,
        pattern: &str,
        cursor: u64,
    ) -> Result<(u64, Vec<Vec<u8>>), Error> {
        self.limits.acquire(1).await;
        redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(&mut node.conn.clone())
            .await
            .map_err(|e| map_error(e, &node.addr))
    }

    async fn topology(&self) -> Result<Topology, Error> {
        let mut cached = self.topology.lock().await;
        if !self.config.cluster {
            if let Some(t) = cached.as_ref() {
                return Ok(t.clone());
            }
            let seed = connect(self.connection_info()?).await?;
            // A SCAN cursor means nothing to a restarted server (it hashes with a new random
            // seed): naming the server's run in the cursor makes a sweep resumed there start
            // over instead of skipping keys.
            let fingerprint = if seed.run_id.is_empty() {
                String::new()
            } else {
                format!("run_id {}", seed.run_id)
            };
            let t = Topology {
                nodes: Arc::new(vec![seed]),
                fingerprint,
                migrating: false,
            };
            *cached = Some(t.clone());
            return Ok(t);
        }
        let seed_info = self.connection_info()?;
        let listing = self.cluster_listing(cached.as_ref(), &seed_info).await?;
        let view = cluster_view(&listing);
        if view.covered_slots != CLUSTER_SLOTS {
            return Err(Error::Store(format!(
                "the Redis Cluster serves {} of {CLUSTER_SLOTS} slots (a failover or reshard is under way); retrying later",
                view.covered_slots
            )));
        }
        if let Some(t) = cached.as_mut() {
            if t.fingerprint == view.fingerprint {
                t.migrating = view.migrating;
                return Ok(t.clone());
            }
        }
        let mut nodes = Vec::new();
        for (host, port) in view.primaries {
            let slots = view
                .served
                .get(&(host.clone(), port))
                .cloned()
                .unwrap_or_default();
            let addr = match seed_info.addr() {
                ConnectionAddr::TcpTls {
                    insecure,
                    tls_params,
                    ..
                } => ConnectionAddr::TcpTls {
                    host,
                    port,
                    insecure: *insecure,
                    tls_params: tls_params.clone(),
                },
                _ => ConnectionAddr::Tcp(host, port),
            };
            let mut node = connect(seed_info.clone().set_addr(addr)).await?;
            node.slots = slots;
            nodes.push(node);
        }
        if nodes.is_empty() {
            return Err(Error::Store(
                "CLUSTER NODES lists no primary that serves slots".into(),
            ));
        }
        let t = Topology {
            nodes: Arc::new(nodes),
            fingerprint: view.fingerprint,
            migrating: view.migrating,
        };
        *cached = Some(t.clone());
        Ok(t)
    }

    /// `CLUSTER NODES` from the first known primary that answers, else from the seed.
    async fn cluster_listing(
        &self,
        cached: Option<&Topology>,
        seed_info: &ConnectionInfo,
    ) -> Result<String, Error> {
        let mut last = None;
        for node in cached.map(|t| t.nodes.iter()).into_iter().flatten() {
            let mut conn = node.conn.clone();
            match redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut conn)
                .await
            {
                Ok(listing) => return Ok(listing),
                Err(e) => last = Some(map_error(e, &node.addr)),
            }
        }
        match connect(seed_info.clone()).await {
            Ok(mut seed) => redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async::<String>(&mut seed.conn)
                .await
                .map_err(|e| map_error(e, &seed.addr)),
            Err(e) => Err(last.unwrap_or(e)),
        }
    }

    /// One subject step on a topology that held still: the topology is read before and
    /// after. When a failover or reshard moved slots meanwhile (or a command was
    /// redirected), keys moved to another primary may have been missed, so the step hands
    /// back a cursor that starts over the piece it started in (tagged with the new
    /// topology): a find or verify drops what it counted since, an erase keeps it (UNLINK
    /// counted keys that are gone). A slot migration under way fails the step (retried
    /// later): keys of a migrating slot may be on either side, and neither side answers for
    /// the other.
    async fn subject_on_stable_topology(
        &self,
        job: &SubjectJob,
        cursor: Option<subject::Position>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<RedisCursor>, Error> {
        let before = self.settled_topology().await?;
        let progress = self.subject(job, cursor, budget, &before).await?;
        let after = self.topology().await?;
        let redirected = matches!(&progress.step.failure, Some(Error::ClusterRedirect(_)));
        if before.fingerprint == after.fingerprint && !after.migrating && !redirected {
            return Ok(progress.step);
        }
        let mut step = progress.step;
        let mut restart = progress.start;
        // An erase keeps the count it started with: what this step erased is in its ledger,
        // and counted when the erase ends.
        restart.restart_unit(job.action == SubjectAction::Erase);
        step.count = 0;
        step.failure = None;
        step.next = Next::Continue(RedisCursor::Subject(restart.checkpoint(&after.fingerprint)));
        Ok(step)
    }

    /// Sweeps one node from `scan_cursor` until the node is done, time is up or the step is
    /// cancelled. Up to `limits.concurrency` pages are processed at once (while the next SCAN
    /// runs) but collected in order, so the cursor returned always has every page before it
    /// fully done: that is what makes the checkpoint safe.
    #[allow(clippy::too_many_arguments)]
    async fn sweep_node(
        &self,
        node: &Node,
        job: &SweepJob,
        target: &RedisTarget,
        scan_cursor: u64,
        deadline: Instant,
        budget: &StepBudget,
        held: &std::sync::Arc<Vec<String>>,
        run: Option<&str>,
    ) -> (NodeProgress, Option<Error>) {
        // Without a run (its ledger named and checkpointed), pages are only judged, as in a
        // dry run, up to the first that would delete: the step stops before it.
        let probing = run.is_none() && !job.dry_run;
        let page_job = PageJob {
            conn: node.conn.clone(),
            addr: node.addr.clone(),
            limits: self.limits.clone(),
            pattern: target.key_pattern.clone(),
            mode: target.mode,
            timestamp_field: target.timestamp_field.clone().unwrap_or_default(),
            retention_secs: job.retention.as_secs(),
            cutoff: job.cutoff,
            dry_run: job.dry_run || probing,
            cluster: self.config.cluster,
            fence: budget.fence.clone(),
            held: held.clone(),
            run: run.unwrap_or_default().to_string(),
            expire_lt: node.major_version >= 7,
        };
        let only_hashes = target.mode == RedisMode::Timestamp && node.major_version >= 6;
        let concurrency = self.limits.concurrency.max(1);
        let mut progress = NodeProgress {
            cursor: scan_cursor,
            finished: false,
            counts: PageCounts::default(),
            needs_ledger: false,
        };
        let mut in_flight: InFlight = VecDeque::new();
        let mut next_scan = Some(scan_cursor);
        let mut failure = None;
        loop {
            let may_scan =
                failure.is_none() && Instant::now() < deadline && !budget.cancel.is_cancelled();
            if let (Some(cursor), true) = (next_scan, may_scan && in_flight.len() < concurrency) {
                self.limits.acquire(1).await;
                let mut scan = redis::cmd("SCAN");
                scan.arg(cursor)
                    .arg("MATCH")
                    .arg(&page_job.pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT);
                if only_hashes {
                    scan.arg("TYPE").arg("hash");
                }
                let mut conn = node.conn.clone();
                match scan.query_async::<(u64, Vec<Vec<u8>>)>(&mut conn).await {
                    Ok((next, keys)) => {
                        next_scan = (next != 0).then_some(next);
                        in_flight.push_back((next, tokio::spawn(page_job.clone().run(keys))));
                    }
                    Err(e) => failure = Some(map_error(e, &node.addr)),
                }
                continue;
            }
            let Some((next, handle)) = in_flight.pop_front() else {
                break;
            };
            match handle.await {
                Ok(Ok(counts)) if probing && counts.deleted > 0 => {
                    // Judged again, for real, once the run is named; the pages after it too.
                    progress.needs_ledger = true;
                    for (_, later) in in_flight.drain(..) {
                        let _ = later.await;
                    }
                    break;
                }
                Ok(Ok(counts)) => {
                    progress.counts.add(counts);
                    progress.cursor = next;
                    progress.finished = next == 0;
                }
                Ok(Err(e)) => {
                    // Later pages may still finish; their counts are kept but the cursor
                    // stays before the failed page so it is retried.
                    failure.get_or_insert(e);
                    drain_counts(&mut in_flight, &mut progress).await;
                    break;
                }
                Err(join) => {
                    failure.get_or_insert(Error::Store(format!("page task failed: {join}")));
                    drain_counts(&mut in_flight, &mut progress).await;
                    break;
                }
            }
        }
        (progress, failure)
    }
}

/// Waits for the pages still in flight after a failure and adds their counts (their effects
/// happened), without moving the cursor past the failed page.
async fn drain_counts(in_flight: &mut InFlight, progress: &mut NodeProgress) {
    while let Some((_, handle)) = in_flight.pop_front() {
        if let Ok(Ok(counts)) = handle.await {
            progress.counts.add(counts);
        }
    }
}

/// Everything needed to act on one page of keys, owned so pages can run as tasks.
#[derive(Clone)]
struct PageJob {
    conn: MultiplexedConnection,
    addr: String,
    limits: Limits,
    pattern: String,
    mode: RedisMode,
    timestamp_field: String,
    retention_secs: u64,
    cutoff: DateTime<Utc>,
    dry_run: bool,
    /// Talking to one node of a Redis Cluster: multi-key commands must stay within a slot.
    cluster: bool,
    /// Checked right before each destructive command, after its rate-limit wait.
    fence: crate::leader::Fence,
    /// Globs of the keys of subjects held by a LegalHold: such keys are left alone.
    held: std::sync::Arc<Vec<String>>,
    /// The run whose ledger records every destructive batch (unused in a dry run).
    run: String,
    /// The server knows `PEXPIRE … LT` (Redis 7+).
    expire_lt: bool,
}

/// The counts of one page (and, added up, of one node).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct PageCounts {
    /// Keys matching the pattern.
    scanned: u64,
    /// Deleted or bounded (or, in a dry run, would be).
    deleted: u64,
    /// Left alone: a held subject's key.
    held: u64,
    /// Mode timestamp: no readable timestamp (field missing, unparseable, not a hash).
    unjudged: u64,
    /// Mode timestamp: the oldest timestamp among the keys kept.
    oldest: Option<DateTime<Utc>>,
}

impl PageCounts {
    fn add(&mut self, other: PageCounts) {
        self.scanned += other.scanned;
        self.deleted += other.deleted;
        self.held += other.held;
        self.unjudged += other.unjudged;
        self.oldest = match (self.oldest, other.oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
}

impl PageJob {
    /// Acts on one page; returns its counts.
    async fn run(mut self, keys: Vec<Vec<u8>>) -> Result<PageCounts, Error> {
        // The operator's own ledger keys are never swept, whatever the pattern.
        let keys: Vec<Vec<u8>> = keys
            .into_iter()
            .filter(|k| selectable(&self.pattern, k))
            .collect();
        let mut counts = PageCounts {
            scanned: keys.len() as u64,
            ..Default::default()
        };
        let (held, keys): (Vec<Vec<u8>>, Vec<Vec<u8>>) = keys
            .into_iter()
            .partition(|k| self.held.iter().any(|g| glob::matches(g.as_bytes(), k)));
        counts.held = held.len() as u64;
        if keys.is_empty() {
            return Ok(counts);
        }
        let addr = self.addr.clone();
        let err = |e| map_error(e, &addr);
        let deleted = match self.mode {
            RedisMode::Expire => {
                // Keys without a TTL (-1) or with a longer one need bounding; -2 is gone.
                let retention_ms =
                    i64::try_from(self.retention_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
                if self.dry_run {
                    let ttls: Vec<i64> = self.pipelined(&["PTTL"], &keys, &[]).await?;
                    select(keys, ttls, |ttl| ttl == -1 || ttl > retention_ms).len() as u64
                } else {
                    // Judged, recorded in the ledger and bounded in one script per slot.
                    self.limits.acquire(per_key(keys.len(), 2)).await;
                    self.may_act()?;
                    let script = if self.expire_lt {
                        &EXPIRE_LT_SCRIPT
                    } else {
                        &EXPIRE_SCRIPT
                    };
                    keys_per_slot(
                        &mut self.conn,
                        script,
                        &keys,
                        self.cluster,
                        &self.run,
                        &[retention_ms],
                    )
                    .await
                    .map_err(err)?
                }
            }
            RedisMode::Idle => {
                // The idle check and the delete happen atomically on the server (a key touched
                // in between is never deleted), and a dry run runs the very same check.
                self.limits.acquire(per_key(keys.len(), 2)).await;
                self.may_act()?;
                unlink_idle(
                    &mut self.conn,
                    &keys,
                    self.retention_secs,
                    self.dry_run,
                    self.cluster,
                    &self.run,
                )
                .await
                .map_err(|e| idle_error(e, &addr))?
            }
            RedisMode::Timestamp => {
                // Read, judged and (when expired) deleted in one script per slot, so a hash
                // refreshed meanwhile is never deleted; a dry run runs the very same check.
                self.limits.acquire(per_key(keys.len(), 2)).await;
                self.may_act()?;
                let judged = unlink_expired_hashes(
                    &mut self.conn,
                    &keys,
                    &self.timestamp_field,
                    self.cutoff,
                    self.dry_run,
                    self.cluster,
                    &self.run,
                )
                .await
                .map_err(err)?;
                let (mut unjudged, mut oldest) = (judged.unjudged, judged.oldest);
                // What the script could not read as whole seconds is parsed here, and deleted
                // by a second script only if it still holds the value judged.
                let mut expired: Vec<(Vec<u8>, String)> = Vec::new();
                for (key, value) in judged.unread {
                    let value = String::from_utf8(value).ok();
                    match value.as_deref().and_then(parse_timestamp) {
                        Some(t) if t < self.cutoff => {
                            expired.extend(value.map(|value| (key, value)));
                        }
                        Some(t) => oldest = Some(oldest.map_or(t, |o| o.min(t))),
                        // Never deleted, never called young: counted and reported.
                        None => unjudged = unjudged.saturating_add(1),
                    }
                }
                counts.unjudged = unjudged;
                counts.oldest = oldest;
                let later = if self.dry_run || expired.is_empty() {
                    expired.len() as u64
                } else {
                    self.limits.acquire(per_key(expired.len(), 2)).await;
                    self.may_act()?;
                    unlink_unchanged(
                        &mut self.conn,
                        &self.timestamp_field,
                        &expired,
                        self.cluster,
                        &self.run,
                    )
                    .await
                    .map_err(err)?
                };
                judged.deleted.saturating_add(later)
            }
        };
        counts.deleted = deleted;
        Ok(counts)
    }

    /// Whether this instance may still delete (a dry run deletes nothing, so always may).
    fn may_act(&self) -> Result<(), Error> {
        // Test-only (debug builds): skip the lease check, the bug the chaos tests must report.
        if self.dry_run || self.fence.is_valid() || crate::planted_bug("skip-lease-check") {
            Ok(())
        } else {
            Err(Error::LeadershipLost)
        }
    }

    /// One command per key, pipelined: `command key args…`, where `command` may carry a
    /// subcommand (`["OBJECT", "IDLETIME"]`).
    async fn pipelined<T: redis::FromRedisValue>(
        &mut self,
        command: &[&str],
        keys: &[Vec<u8>],
        args: &[&str],
    ) -> Result<Vec<T>, Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in keys {
            pipe.cmd(command[0]).arg(&command[1..]).arg(key).arg(args);
        }
        self.limits.acquire(per_key(keys.len(), 1)).await;
        if matches!(command[0], "EXPIRE" | "PEXPIRE" | "UNLINK") {
            self.may_act()?;
        }
        pipe.query_async(&mut self.conn)
            .await
            .map_err(|e| map_error(e, &self.addr))
    }
}

/// What acting on `keys` keys costs against the store's request rate, `each` per key.
fn per_key(keys: usize, each: u32) -> u32 {
    u32::try_from(keys).unwrap_or(u32::MAX).saturating_mul(each)
}

/// A destructive script: [`ledger::LUA_SETTLE`] and then `body`. `KEYS[1]` is the run's
/// ledger key (in the slot of the other keys), `ARGV[1]` its time to live.
fn ledger_script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{}{body}", ledger::LUA_SETTLE))
}

/// Mode idle: unlinks (or, with ARGV[2] = 1, only counts) the keys `KEYS[2..]` idle longer
/// than ARGV[3] seconds, recording them in the ledger first; returns how many. When the
/// server does not track idle time (an LFU maxmemory-policy) the script answers with the
/// error code [`NO_IDLETIME`], before anything is recorded or deleted.
const IDLE_SOURCE: &str = r"
local threshold, pcall = tonumber(ARGV[3]), redis.pcall
local expired, seen, n = {}, {}, 0
for i = 2, #KEYS do
  local key = KEYS[i]
  if not seen[key] then
    seen[key] = true
    local idle = pcall('OBJECT', 'IDLETIME', key)
    if type(idle) == 'number' then
      if idle > threshold then
        n = n + 1
        expired[n] = key
      end
    elseif type(idle) == 'table' and idle.err then
      return redis.error_reply('NOIDLETIME OBJECT IDLETIME is not available')
    end
  end
end
if ARGV[2] == '1' then
  return n
end
settle(n)
for first = 1, n, 1000 do
  redis.call('UNLINK', unpack(expired, first, math.min(first + 999, n)))
end
return n
";
static IDLE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| ledger_script(IDLE_SOURCE));

/// Mode timestamp: unlinks the hashes `KEYS[i]` (i >= 2) whose field ARGV[2] still holds the
/// value ARGV[i + 1] the sweep read and judged expired, recording them in the ledger first;
/// returns how many. Check and delete run as one script, so a hash refreshed (or replaced by
/// another type) after the read is kept.
static TIMESTAMP_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    ledger_script(
        r"
local field = ARGV[2]
local expired, seen = {}, {}
for i = 2, #KEYS do
  local key = KEYS[i]
  if not seen[key] and redis.call('TYPE', key).ok == 'hash' and redis.call('HGET', key, field) == ARGV[i + 1] then
    seen[key] = true
    expired[#expired + 1] = key
  end
end
settle(#expired)
for first = 1, #expired, 1000 do
  redis.call('UNLINK', unpack(expired, first, math.min(first + 999, #expired)))
end
return #expired
",
    )
});

/// Mode timestamp: reads field ARGV[3] of every hash `KEYS[2..]` and unlinks (or, with
/// ARGV[2] = 1, only counts) those whose value, a whole number of seconds since the epoch, is
/// below ARGV[4], recording them in the ledger first. Returns `{deleted, unjudged, 1 if a kept
/// hash was read, its oldest time, {key, value, …}}`, the last being the values it leaves to
/// the caller: any other form of timestamp. A missing field or a key of another type is
/// unjudged. Reading and deleting in one script, a hash refreshed meanwhile is never deleted.
const TIMESTAMP_SOURCE: &str = r"
local field, limit = ARGV[3], tonumber(ARGV[4])
local pcall, find = redis.pcall, string.find
local expired, seen, unread = {}, {}, {}
local n, unjudged, oldest = 0, 0, nil
for i = 2, #KEYS do
  local key = KEYS[i]
  if not seen[key] then
    seen[key] = true
    local value = pcall('HGET', key, field)
    if type(value) ~= 'string' then
      unjudged = unjudged + 1
    elseif #value <= 12 and find(value, '^%d+$') then
      local at = tonumber(value)
      if at < limit then
        n = n + 1
        expired[n] = key
      elseif not oldest or at < oldest then
        oldest = at
      end
    else
      unread[#unread + 1] = key
      unread[#unread + 1] = value
    end
  end
end
if ARGV[2] ~= '1' then
  settle(n)
  for first = 1, n, 1000 do
    redis.call('UNLINK', unpack(expired, first, math.min(first + 999, n)))
  end
end
return {n, unjudged, oldest and 1 or 0, oldest or 0, unread}
";
static TIMESTAMP_JUDGE_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| ledger_script(TIMESTAMP_SOURCE));

/// Mode expire: gives the keys `KEYS[2..]` without a TTL, or with one longer than ARGV[2]
/// milliseconds, a TTL of ARGV[2] milliseconds, recording them in the ledger first; returns
/// how many. Judged and bounded in one script, so a key bounded meanwhile is not counted.
static EXPIRE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    ledger_script(
        r"
local limit = tonumber(ARGV[2])
local selected, seen = {}, {}
for i = 2, #KEYS do
  local key = KEYS[i]
  if not seen[key] then
    seen[key] = true
    local ttl = redis.call('PTTL', key)
    if ttl == -1 or ttl > limit then
      selected[#selected + 1] = key
    end
  end
end
settle(#selected)
for _, key in ipairs(selected) do
  redis.call('PEXPIRE', key, ARGV[2])
end
return #selected
",
    )
});

/// Mode expire on Redis 7+: what [`EXPIRE_SCRIPT`] does, with one `PEXPIRE … LT` per key,
/// which bounds a key only when it has no TTL or a longer one and says whether it did. The
/// ledger is credited with every key before anything is bounded (its write still comes first)
/// and corrected by those left alone; a ledger that ends at zero is removed.
static EXPIRE_LT_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    ledger_script(
        r"
local limit, call = ARGV[2], redis.call
local credited = #KEYS - 1
call('INCRBY', KEYS[1], credited)
local bounded, seen = 0, {}
for i = 2, #KEYS do
  local key = KEYS[i]
  if not seen[key] then
    seen[key] = true
    bounded = bounded + call('PEXPIRE', key, limit, 'LT')
  end
end
if call('INCRBY', KEYS[1], bounded - credited) == 0 then
  call('DEL', KEYS[1])
else
  call('EXPIRE', KEYS[1], ARGV[1])
end
return bounded
",
    )
});

/// Erasure: unlinks the keys `KEYS[2..]` that exist, recording them in the ledger first;
/// returns how many.
pub(crate) static UNLINK_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| {
        ledger_script(
            r"
local present, seen = {}, {}
for i = 2, #KEYS do
  local key = KEYS[i]
  if not seen[key] and redis.call('EXISTS', key) == 1 then
    seen[key] = true
    present[#present + 1] = key
  end
end
settle(#present)
for first = 1, #present, 1000 do
  redis.call('UNLINK', unpack(present, first, math.min(first + 999, #present)))
end
return #present
",
        )
    });

/// Erasure: removes field ARGV[2] from the hash `KEYS[2]`, recorded in the ledger first;
/// returns 1 when it was there.
pub(crate) static HDEL_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| {
        ledger_script(
            r"
if redis.call('TYPE', KEYS[2]).ok ~= 'hash' or redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then
  return 0
end
settle(1)
return redis.call('HDEL', KEYS[2], ARGV[2])
",
        )
    });

/// Erasure: removes member ARGV[2] from the set or sorted set `KEYS[2]`, recorded in the
/// ledger first; returns 1 when it was there (0 for any other type or an absent key).
pub(crate) static MEMBER_SCRIPT: std::sync::LazyLock<redis::Script> =
    std::sync::LazyLock::new(|| {
        ledger_script(
            r"
local kind = redis.call('TYPE', KEYS[2]).ok
if kind == 'set' and redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then
  settle(1)
  return redis.call('SREM', KEYS[2], ARGV[2])
end
if kind == 'zset' and redis.call('ZSCORE', KEYS[2], ARGV[2]) then
  settle(1)
  return redis.call('ZREM', KEYS[2], ARGV[2])
end
return 0
",
        )
    });

/// Mode idle: unlinks the keys idle for longer than `threshold_secs`, judged, recorded in the
/// ledger of `run` and deleted atomically on the server (a dry run only counts them);
/// returns how many.
pub async fn unlink_idle(
    conn: &mut MultiplexedConnection,
    keys: &[Vec<u8>],
    threshold_secs: u64,
    dry_run: bool,
    cluster: bool,
    run: &str,
) -> RedisResult<u64> {
    let threshold = i64::try_from(threshold_secs).unwrap_or(i64::MAX);
    keys_per_slot(
        conn,
        &IDLE_SCRIPT,
        keys,
        cluster,
        run,
        &[i64::from(dry_run), threshold],
    )
    .await
}

/// [`per_slot`] for a script whose arguments are `keys`, then the same `args` for every
/// group (after the ledger's): the shape of every script but the timestamp check.
pub(crate) async fn keys_per_slot(
    conn: &mut MultiplexedConnection,
    script: &redis::Script,
    keys: &[Vec<u8>],
    cluster: bool,
    run: &str,
    args: &[i64],
) -> RedisResult<u64> {
    let entries: Vec<(&[u8], ())> = keys.iter().map(|k| (k.as_slice(), ())).collect();
    per_slot(conn, script, &entries, cluster, run, |invocation, group| {
        for (key, ()) in group {
            invocation.key(*key);
        }
        for arg in args {
            invocation.arg(*arg);
        }
    })
    .await
}

/// Mode timestamp: unlinks each hash of `expired` only if its `field` still holds the value
/// read for it (`(key, value)`), checked, recorded in the ledger of `run` and deleted
/// atomically on the server; returns how many the server removed.
pub async fn unlink_unchanged(
    conn: &mut MultiplexedConnection,
    field: &str,
    expired: &[(Vec<u8>, String)],
    cluster: bool,
    run: &str,
) -> RedisResult<u64> {
    per_slot(
        conn,
        &TIMESTAMP_SCRIPT,
        expired,
        cluster,
        run,
        |invocation, group| {
            invocation.arg(field);
            for (key, value) in group {
                invocation.key(key).arg(value);
            }
        },
    )
    .await
}

/// One reply of [`TIMESTAMP_SOURCE`]: deleted, unjudged, whether a kept hash was read, the
/// oldest time kept, and the keys and values left to the caller.
type TimestampReply = (u64, u64, u8, i64, Vec<Vec<u8>>);

/// What [`unlink_expired_hashes`] did to a page of hashes.
#[derive(Debug, Default, PartialEq)]
pub struct JudgedHashes {
    /// Deleted (in a dry run: would be).
    pub deleted: u64,
    /// Without a timestamp: the field missing, or not a hash.
    pub unjudged: u64,
    /// The oldest timestamp among the hashes kept.
    pub oldest: Option<DateTime<Utc>>,
    /// Hashes whose field holds another form of timestamp, with that value, left to the
    /// caller to judge.
    pub unread: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Mode timestamp: reads `field` of every hash of `keys`, and unlinks those holding a time in
/// whole seconds before `cutoff`, read, judged, recorded in the ledger of `run` and deleted
/// atomically on the server (a dry run only counts them). Values in any other form are
/// handed back in [`JudgedHashes::unread`].
pub async fn unlink_expired_hashes(
    conn: &mut MultiplexedConnection,
    keys: &[Vec<u8>],
    field: &str,
    cutoff: DateTime<Utc>,
    dry_run: bool,
    cluster: bool,
    run: &str,
) -> RedisResult<JudgedHashes> {
    // Whole seconds below the limit are exactly the times before the cutoff.
    let limit = cutoff
        .timestamp()
        .saturating_add(i64::from(cutoff.timestamp_subsec_nanos() > 0));
    let entries: Vec<(&[u8], ())> = keys.iter().map(|k| (k.as_slice(), ())).collect();
    let replies: Vec<TimestampReply> = per_slot_replies(
        conn,
        &TIMESTAMP_JUDGE_SCRIPT,
        &entries,
        cluster,
        run,
        |invocation, group| {
            for (key, ()) in group {
                invocation.key(*key);
            }
            invocation.arg(i64::from(dry_run)).arg(field).arg(limit);
        },
    )
    .await?;
    let mut judged = JudgedHashes::default();
    for (deleted, unjudged, kept, oldest, unread) in replies {
        judged.deleted = judged.deleted.saturating_add(deleted);
        judged.unjudged = judged.unjudged.saturating_add(unjudged);
        if let Some(t) = (kept == 1)
            .then(|| DateTime::from_timestamp(oldest, 0))
            .flatten()
        {
            judged.oldest = Some(judged.oldest.map_or(t, |o| o.min(t)));
        }
        let mut unread = unread.into_iter();
        while let (Some(key), Some(value)) = (unread.next(), unread.next()) {
            judged.unread.push((key, value));
        }
    }
    Ok(judged)
}

/// Runs `script` over `entries` and adds up the counts it returns (see [`per_slot_replies`]).
pub(crate) async fn per_slot<K: AsRef<[u8]>, T>(
    conn: &mut MultiplexedConnection,
    script: &redis::Script,
    entries: &[(K, T)],
    cluster: bool,
    run: &str,
    fill: impl Fn(&mut redis::ScriptInvocation<'_>, &[&(K, T)]),
) -> RedisResult<u64> {
    let counts: Vec<u64> = per_slot_replies(conn, script, entries, cluster, run, fill).await?;
    Ok(counts.iter().fold(0u64, |a, &b| a.saturating_add(b)))
}

/// Runs `script` over `entries`; returns its replies. On a cluster node a script may only
/// touch keys of one slot, so the entries are grouped by slot, one script per group (`fill`
/// sets its keys and arguments after the ledger key of `run` in the group's slot and the
/// ledger's time to live), all in one pipeline.
pub(crate) async fn per_slot_replies<K: AsRef<[u8]>, T, R: redis::FromRedisValue>(
    conn: &mut MultiplexedConnection,
    script: &redis::Script,
    entries: &[(K, T)],
    cluster: bool,
    run: &str,
    fill: impl Fn(&mut redis::ScriptInvocation<'_>, &[&(K, T)]),
) -> RedisResult<Vec<R>> {
    if entries.is_empty() {
        return Ok(Vec::new());
    }
    let invocations: Vec<redis::ScriptInvocation<'_>> = script_groups(entries, cluster)
        .iter()
        .map(|group| {
            let mut invocation = script.prepare_invoke();
            let slot = group
                .first()
                .filter(|_| cluster)
                .map(|(key, _)| ledger::slot_of(key.as_ref()));
            invocation.key(ledger::key(run, slot)).arg(ledger::TTL_SECS);
            fill(&mut invocation, group);
            invocation
        })
        .collect();
    let mut pipe = redis::pipe();
    pipe.load_script(script).ignore();
    for invocation in &invocations {
        pipe.invoke_script(invocation);
    }
    pipe.query_async(conn).await
}

/// The keys each script call may touch, in the order given: all of them on a standalone
/// server; on a cluster node, one group per hash slot.
fn script_groups<K: AsRef<[u8]>, T>(entries: &[(K, T)], cluster: bool) -> Vec<Vec<&(K, T)>> {
    if !cluster {
        return vec![entries.iter().collect()];
    }
    let mut groups: Vec<Vec<&(K, T)>> = Vec::new();
    let mut by_slot = std::collections::HashMap::new();
    for entry in entries {
        let slot = redis::cluster_routing::Slot::for_key(entry.0.as_ref());
        let index = *by_slot.entry(slot).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        if let Some(group) = groups.get_mut(index) {
            group.push(entry);
        }
    }
    groups
}

/// The error code [`IDLE_SCRIPT`] answers with when the server tracks no idle time.
const NO_IDLETIME: &str = "NOIDLETIME";

/// Whether the server answered `code` (`MOVED`, or a code a script sets), to a single
/// command or to any command of a pipeline.
fn has_code(e: &redis::RedisError, codes: &[&str]) -> bool {
    if e.code().is_some_and(|c| codes.contains(&c)) {
        return true;
    }
    e.clone()
        .into_server_errors()
        .is_some_and(|all| all.iter().any(|(_, s)| codes.contains(&s.code())))
}

/// The codes with which a cluster node redirects a command (the key's slot moved, or is
/// moving, or the cluster is not serving it now).
const REDIRECT_CODES: &[&str] = &["MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN"];

fn idle_error(e: redis::RedisError, addr: &str) -> Error {
    if has_code(&e, &[NO_IDLETIME]) {
        Error::InvalidSpec(
            "mode idle needs OBJECT IDLETIME, which Redis refuses under an LFU maxmemory-policy"
                .into(),
        )
    } else {
        map_error(e, addr)
    }
}

/// Whether a sweep with `pattern` may touch `key`: it matches, and it is not one of the
/// operator's own ledger keys (which `*` would match).
fn selectable(pattern: &str, key: &[u8]) -> bool {
    glob::matches(pattern.as_bytes(), key) && !ledger::is_ledger_key(key)
}

/// Pages being processed, each with the SCAN cursor that follows it.
type InFlight = VecDeque<(u64, JoinHandle<Result<PageCounts, Error>>)>;

struct NodeProgress {
    cursor: u64,
    finished: bool,
    counts: PageCounts,
    /// Probing without a run, a page would delete: the step stops before it.
    needs_ledger: bool,
}

fn select<T>(keys: Vec<Vec<u8>>, replies: Vec<T>, mut keep: impl FnMut(T) -> bool) -> Vec<Vec<u8>> {
    keys.into_iter()
        .zip(replies)
        .filter_map(|(k, r)| keep(r).then_some(k))
        .collect()
}

/// Where a Redis job resumes: SCAN positions, node indexes, counts, a topology tag and a
/// ledger run id. Never a key, so never an identifier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "job", rename_all = "camelCase")]
pub enum RedisCursor {
    Sweep(SweepPosition),
    Subject(subject::Position),
    Batch(batch::BatchPosition),
}

/// Where a sweep resumes: the node (an index into the primaries of the topology the tag
/// names) and its SCAN cursor, and a real sweep's ledger tally.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SweepPosition {
    pub node: usize,
    pub scan: u64,
    /// [`topology_tag`] of the topology the node index counts (absent on a server without
    /// a run id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology: Option<String>,
    /// The ledger tally (`run.counted`, `.s` once settled); absent in a dry run.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "ledger::as_text"
    )]
    #[schemars(with = "Option<String>")]
    pub ledger: Option<ledger::Tally>,
}

impl SweepPosition {
    fn at(node: usize, scan: u64, fingerprint: &str, ledger: Option<ledger::Tally>) -> Self {
        Self {
            node,
            scan,
            topology: (!fingerprint.is_empty()).then(|| topology_tag(fingerprint)),
            ledger,
        }
    }

    /// A sweep cursor as the previous version wrote it: `node:scan[:topology][;tally]`.
    fn legacy(text: &str) -> Option<Self> {
        let (position, tally) = split_cursor(Some(text)).ok()?;
        let mut parts = position?.split(':');
        let node = parts.next()?.parse().ok()?;
        let scan = parts.next()?.parse().ok()?;
        let topology = parts.next().map(str::to_string);
        if parts.next().is_some() {
            return None;
        }
        Some(Self {
            node,
            scan,
            topology,
            ledger: tally,
        })
    }
}

#[async_trait]
impl StoreBackend for RedisBackend {
    const KIND: StoreKind = StoreKind::Redis;
    type Cursor = RedisCursor;

    fn legacy_cursor(text: &str) -> Option<RedisCursor> {
        if text.starts_with(subject::CURSOR_PREFIX) {
            subject::Position::legacy(text).map(RedisCursor::Subject)
        } else {
            SweepPosition::legacy(text).map(RedisCursor::Sweep)
        }
    }

    async fn probe_store(&self) -> Result<String, Error> {
        let nodes = self.nodes().await?;
        for node in nodes.iter() {
            let mut conn = node.conn.clone();
            let pong: String = redis::cmd("PING")
                .query_async(&mut conn)
                .await
                .map_err(|e| map_error(e, &node.addr))?;
            if pong != "PONG" {
                return Err(Error::Store(format!(
                    "{} answered PING with {pong:?}",
                    node.addr
                )));
            }
        }
        let version = &nodes[0].version;
        Ok(if self.config.cluster {
            format!("redis {version} cluster, {} primaries", nodes.len())
        } else {
            format!("redis {version}")
        })
    }

    async fn subject(
        &self,
        job: &SubjectJob,
        cursor: Option<RedisCursor>,
        budget: &StepBudget,
    ) -> Result<SubjectStep<RedisCursor>, Error> {
        let position = match cursor {
            None => None,
            Some(RedisCursor::Subject(p)) => Some(p),
            Some(RedisCursor::Sweep(_) | RedisCursor::Batch(_)) => {
                return Err(Error::InvalidSpec(
                    "the checkpoint is not a Redis erasure cursor of one subject".into(),
                ))
            }
        };
        self.subject_on_stable_topology(job, position, budget).await
    }

    const BATCHES: bool = true;

    async fn subjects(
        &self,
        job: &BatchJob,
        cursor: Option<RedisCursor>,
        budget: &StepBudget,
    ) -> Result<BatchStep<RedisCursor>, Error> {
        let position = match cursor {
            None => None,
            Some(RedisCursor::Batch(p)) => Some(p),
            Some(RedisCursor::Sweep(_) | RedisCursor::Subject(_)) => {
                return Err(Error::InvalidSpec(
                    "the checkpoint is not a Redis batch cursor".into(),
                ))
            }
        };
        self.batch(job, position, budget).await
    }

    async fn sweep(
        &self,
        job: &SweepJob,
        cursor: Option<RedisCursor>,
        budget: &StepBudget,
    ) -> Result<Step<RedisCursor>, Error> {
        let target = <driver::RedisDriver as StoreDriver>::selector(&job.target)
            .ok_or_else(|| Error::InvalidSpec("target has no redis selector".into()))?;
        let held = std::sync::Arc::new(held_globs(job)?);
        let topology = self.topology().await?;
        let nodes = topology.nodes.as_slice();
        let fingerprint = topology.fingerprint.as_str();
        let position = match cursor {
            None => None,
            Some(RedisCursor::Sweep(p)) => Some(p),
            Some(RedisCursor::Subject(_) | RedisCursor::Batch(_)) => {
                return Err(Error::InvalidSpec(
                    "the checkpoint is a Redis erasure cursor, not a sweep's".into(),
                ))
            }
        };
        // A dry run deletes nothing, so it keeps no ledger. Otherwise a run's ledger is named
        // only when a page is found that would delete, and checkpointed before anything is
        // deleted under it, so the step that repeats a lost one records into the same ledger.
        // Until then pages are only judged: a sweep that finds nothing to delete finishes in
        // one step and keeps no ledger (a checkpoint of an older version without one probes
        // the same way).
        let mut tally = position
            .as_ref()
            .and_then(|p| p.ledger.clone())
            .filter(|_| !job.dry_run);
        if let Some(t) = tally.as_ref().filter(|t| t.settled) {
            // The ledger was read and its reading checkpointed: only its removal is left.
            self.remove_ledger(&topology, &t.run).await?;
            return Ok(Step::default());
        }
        let (mut node_index, mut scan_cursor) = position.as_ref().map_or((0, 0), |p| {
            resume_at(
                p.node,
                p.scan,
                p.topology.as_deref(),
                nodes.len(),
                fingerprint,
            )
        });
        let deadline = Instant::now() + budget.max_time;
        let mut step = Step::default();
        let run = tally.as_ref().map(|t| t.run.clone());
        let mut needs_ledger = false;
        while node_index < nodes.len() {
            let (progress, failure) = self
                .sweep_node(
                    &nodes[node_index],
                    job,
                    target,
                    scan_cursor,
                    deadline,
                    budget,
                    &held,
                    run.as_deref(),
                )
                .await;
            let counts = progress.counts;
            step.scanned = step.scanned.saturating_add(counts.scanned);
            step.deleted = step.deleted.saturating_add(counts.deleted);
            step.held = step.held.saturating_add(counts.held);
            step.unjudged = step.unjudged.saturating_add(counts.unjudged);
            step.oldest_remaining = match (step.oldest_remaining, counts.oldest) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            scan_cursor = progress.cursor;
            if progress.finished {
                node_index += 1;
                scan_cursor = 0;
            }
            if failure.is_some() {
                step.failure = failure;
                break;
            }
            if progress.needs_ledger {
                needs_ledger = true;
                break;
            }
            if !progress.finished {
                break;
            }
        }
        if needs_ledger {
            step.next = Next::Continue(RedisCursor::Sweep(SweepPosition::at(
                node_index,
                scan_cursor,
                fingerprint,
                Some(ledger::Tally::new(ledger::new_run())),
            )));
            // Pages only judged do not ask: an instance that no longer leads says so at once,
            // as a page that deletes would.
            step.failure = budget.may_act().err();
            return Ok(step);
        }
        let Some(tally) = tally.as_mut() else {
            if node_index < nodes.len() {
                step.next = Next::Continue(RedisCursor::Sweep(SweepPosition::at(
                    node_index,
                    scan_cursor,
                    fingerprint,
                    None,
                )));
            }
            return Ok(step);
        };
        tally.add(step.deleted);
        if node_index >= nodes.len() && step.failure.is_none() {
            // Every node is done: what the ledger holds beyond what status counts was deleted
            // by a batch whose checkpoint was lost. Counted now; the ledger is removed by the
            // next step, once this count is checkpointed.
            match self.ledger_total(&topology, &tally.run).await {
                Ok(total) => step.deleted = step.deleted.saturating_add(tally.settle(total)),
                Err(e) => step.failure = Some(e),
            }
        }
        step.next = Next::Continue(RedisCursor::Sweep(SweepPosition::at(
            node_index,
            scan_cursor,
            fingerprint,
            Some(tally.clone()),
        )));
        Ok(step)
    }
}

impl RedisBackend {
    /// The ledger keys of `run` that `node` may hold: the one key of a standalone server, one
    /// per slot the node serves on a cluster.
    fn ledger_keys(&self, node: &Node, run: &str) -> Vec<String> {
        if !self.config.cluster {
            return vec![ledger::key(run, None)];
        }
        node.slots
            .iter()
            .flat_map(|&(first, last)| first..=last)
            .map(|slot| ledger::key(run, Some(slot)))
            .collect()
    }

    /// What the ledger of `run` holds, all nodes together. A slot being migrated fails the
    /// read (its key may be on either side); it is retried.
    async fn ledger_total(&self, topology: &Topology, run: &str) -> Result<u64, Error> {
        if topology.migrating {
            return Err(migrating());
        }
        let mut total = 0u64;
        for node in topology.nodes.iter() {
            for chunk in self.ledger_keys(node, run).chunks(LEDGER_CHUNK) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("GET").arg(key);
                }
                self.limits.acquire(1).await;
                let values: Vec<Option<u64>> = pipe
                    .query_async(&mut node.conn.clone())
                    .await
                    .map_err(|e| map_error(e, &node.addr))?;
                total = values
                    .into_iter()
                    .flatten()
                    .fold(total, u64::saturating_add);
            }
        }
        Ok(total)
    }

    /// Removes the ledger of `run` from every node (its reading is checkpointed).
    async fn remove_ledger(&self, topology: &Topology, run: &str) -> Result<(), Error> {
        for node in topology.nodes.iter() {
            for chunk in self.ledger_keys(node, run).chunks(LEDGER_CHUNK) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("UNLINK").arg(key).ignore();
                }
                let () = self.on_node(node, &pipe).await?;
            }
        }
        Ok(())
    }

    /// Sends `pipe` to `node`, within the store's request rate.
    async fn on_node<T: redis::FromRedisValue>(
        &self,
        node: &Node,
        pipe: &redis::Pipeline,
    ) -> Result<T, Error> {
        self.limits.acquire(1).await;
        pipe.query_async(&mut node.conn.clone())
            .await
            .map_err(|e| map_error(e, &node.addr))
    }
}

/// Ledger keys read or removed per pipeline (a cluster node has one per slot it serves).
const LEDGER_CHUNK: usize = 2048;

/// A sweep cursor's position and, after `;`, its ledger tally (absent in a dry run and in
/// cursors written before the ledger existed).
fn split_cursor(cursor: Option<&str>) -> Result<(Option<&str>, Option<ledger::Tally>), Error> {
    let Some(cursor) = cursor else {
        return Ok((None, None));
    };
    match cursor.split_once(';') {
        None => Ok((Some(cursor), None)),
        Some((position, tally)) => {
            let tally = ledger::Tally::parse(tally).ok_or_else(|| {
                Error::InvalidSpec(format!(
                    "checkpoint cursor {cursor:?} is not a Redis cursor"
                ))
            })?;
            Ok((Some(position), Some(tally)))
        }
    }
}

async fn connect(info: ConnectionInfo) -> Result<Node, Error> {
    let addr = match info.addr() {
        ConnectionAddr::Tcp(host, port) | ConnectionAddr::TcpTls { host, port, .. } => {
            format!("{host}:{port}")
        }
        other => other.to_string(),
    };
    let client = redis::Client::open(info).map_err(|e| Error::InvalidSpec(e.to_string()))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(30)));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| map_error(e, &addr))?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(|e| map_error(e, &addr))?;
    let version = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
        .unwrap_or("unknown")
        .to_string();
    let major_version = version
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    let run_id = info
        .lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    Ok(Node {
        addr,
        conn,
        major_version,
        version,
        run_id,
        slots: Vec::new(),
    })
}

/// The globs of the keys of every subject a LegalHold holds, from the target's subject
/// locator: `keys` as globs (identifiers escaped), the keys of `hashFields` and `setMembers`
/// as exact keys (the whole key is kept: it holds the subject's field or member).
fn held_globs(job: &SweepJob) -> Result<Vec<String>, Error> {
    if job.held.is_empty() {
        return Ok(Vec::new());
    }
    let locator = held_subject_locator(&job.target, StoreKind::Redis, |s| s.redis())?;
    let mut globs = Vec::new();
    for (i, k) in locator.keys.iter().enumerate() {
        globs.extend(job.held.expand_all(
            &format!("subject.redis.keys[{i}]"),
            k,
            subject::key_glob,
        )?);
    }
    let exact_keys = locator
        .hash_fields
        .iter()
        .map(|h| &h.key)
        .chain(locator.set_members.iter().map(|m| &m.key));
    for k in exact_keys {
        let keys = job
            .held
            .expand_all("subject.redis key", k, identifier::exact_forms)?;
        globs.extend(keys.iter().map(|k| template::escape_glob(k)));
    }
    Ok(globs)
}

/// A short digest of a cluster's topology, kept in the sweep cursor.
fn topology_tag(fingerprint: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(fingerprint.as_bytes())[..4])
}

/// Where a sweep checkpointed at `node`/`scan` on the topology tagged `tag` resumes. A
/// cursor taken on another topology (a failover or reshard since: the node index may name
/// another primary) starts the sweep over, so that no primary is skipped; what was deleted
/// is gone and not counted twice.
fn resume_at(
    node: usize,
    scan: u64,
    tag: Option<&str>,
    nodes: usize,
    fingerprint: &str,
) -> (usize, u64) {
    let same_topology = match tag {
        Some(tag) => !fingerprint.is_empty() && tag == topology_tag(fingerprint),
        None => fingerprint.is_empty() || nodes == 1,
    };
    // `nodes:0` on the same topology: every node is done.
    let done = node == nodes && scan == 0;
    if (node >= nodes && !done) || !same_topology {
        return (0, 0);
    }
    (node, scan)
}

/// Unix seconds (integer or fractional) or RFC 3339.
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0);
    }
    if let Ok(secs) = s.parse::<f64>() {
        return DateTime::from_timestamp(secs.trunc() as i64, 0);
    }
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The store's failure by its kind and code (never by its text).
fn map_error(e: redis::RedisError, addr: &str) -> Error {
    if let Some(code) = REDIRECT_CODES.iter().find(|c| has_code(&e, &[c])) {
        // The slot moved (failover, reshard): the caller reads the topology again.
        return Error::ClusterRedirect(format!("{addr}: {code} (cluster redirection)"));
    }
    let code = e.code().unwrap_or_default();
    if has_code(&e, &["NOPERM"]) {
        // An ACL that lets the operator delete but not record what it deletes: the ledger
        // write comes first in every destructive script, so nothing was deleted.
        return Error::Store(format!(
            "{addr}: NOPERM: the Redis user may not run a command or touch a key the operator needs; it needs the keys it deletes and its ledger keys {}* (see the README's Redis ACL)",
            ledger::PREFIX
        ));
    }
    if e.kind() == redis::ErrorKind::AuthenticationFailed || code == "NOAUTH" || code == "WRONGPASS"
    {
        Error::AuthenticationFailed(format!("{addr}: {code}"))
    } else if e.is_io_error()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_connection_dropped()
    {
        Error::Unreachable(format!("{addr}: {e}"))
    } else {
        Error::Store(format!("{addr}: {e}"))
    }
}

/// The URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("redacted"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "<unparseable URL>".to_string(),
    }
}

pub fn validate_target(target: &Target) -> Result<(), Error> {
    let redis = <driver::RedisDriver as StoreDriver>::selector(target).ok_or_else(|| {
        Error::InvalidSpec(format!(
            "target {} needs a redis selector for a redis store",
            target.name
        ))
    })?;
    if redis.key_pattern.is_empty() {
        return Err(Error::InvalidSpec(format!(
            "target {}: keyPattern is empty",
            target.name
        )));
    }
    if !glob::has_anchored_prefix(&redis.key_pattern) && !target.allow_match_all {
        return Err(Error::InvalidSpec(format!(
            "target {}: keyPattern {:?} has no literal prefix (such as \"session:\" in \"session:*\") and selects (nearly) every key in the store; set allowMatchAll: true if that is really meant",
            target.name, redis.key_pattern
        )));
    }
    if let Some(subject) = target.subject.as_ref().and_then(|s| s.redis()) {
        validate_subject(&target.name, subject)?;
    }
    match (redis.mode, redis.timestamp_field.as_deref()) {
        (RedisMode::Timestamp, None | Some("")) => Err(Error::InvalidSpec(format!(
            "target {}: mode timestamp needs timestampField",
            target.name
        ))),
        (RedisMode::Expire | RedisMode::Idle, Some(_)) => Err(Error::InvalidSpec(format!(
            "target {}: timestampField is only used with mode timestamp",
            target.name
        ))),
        _ => Ok(()),
    }
}

/// Every subject locator must be bounded by its identifier on both sides (see
/// [`template::check_bounded`]): a key glob names an identifier; of a hash field's or a set
/// member's key and field (member), at least one does.
fn validate_subject(
    target: &str,
    subject: &crate::api::retentionpolicy::RedisSubject,
) -> Result<(), Error> {
    use crate::backends::template::{check_bounded, Syntax};
    let invalid = |what: String, t: &str, m: String| {
        Error::InvalidSpec(format!("target {target}: subject.redis.{what} {t:?} {m}"))
    };
    for (i, key) in subject.keys.iter().enumerate() {
        let what = format!("keys[{i}]");
        let names = check_bounded(key, Syntax::Glob).map_err(|m| invalid(what.clone(), key, m))?;
        if names.is_empty() {
            return Err(invalid(
                what,
                key,
                "names no identifier ({userId}, {email}, …): every erasure would take the same keys, whoever the subject".into(),
            ));
        }
    }
    let pairs = subject
        .hash_fields
        .iter()
        .enumerate()
        .map(|(i, h)| (format!("hashFields[{i}]"), &h.key, "field", &h.field))
        .chain(
            subject
                .set_members
                .iter()
                .enumerate()
                .map(|(i, m)| (format!("setMembers[{i}]"), &m.key, "member", &m.member)),
        );
    for (what, key, second, value) in pairs {
        let key_names = check_bounded(key, Syntax::Exact)
            .map_err(|m| invalid(format!("{what}.key"), key, m))?;
        let value_names = check_bounded(value, Syntax::Exact)
            .map_err(|m| invalid(format!("{what}.{second}"), value, m))?;
        if key_names.is_empty() && value_names.is_empty() {
            return Err(Error::InvalidSpec(format!(
                "target {target}: subject.redis.{what} names no identifier in its key or {second}: every erasure would remove the same {second}, whoever the subject"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sweep cursor in the previous version's text, read as an upgrade reads it.
    fn parse_cursor(text: Option<&str>, nodes: usize, fp: &str) -> Result<(usize, u64), ()> {
        let Some(text) = text else {
            return Ok((0, 0));
        };
        let p = SweepPosition::legacy(text).ok_or(())?;
        Ok(resume_at(p.node, p.scan, p.topology.as_deref(), nodes, fp))
    }

    /// `node:scan[:topology]`, as the previous version wrote it.
    fn encode_cursor(node: usize, scan: u64, fp: &str) -> String {
        match SweepPosition::at(node, scan, fp, None).topology {
            Some(tag) => format!("{node}:{scan}:{tag}"),
            None => format!("{node}:{scan}"),
        }
    }

    #[test]
    fn sweep_cursors_of_the_previous_version_resume() {
        let tally = ledger::Tally::parse("0a1b2c.5000");
        assert_eq!(
            RedisBackend::legacy_cursor("1:17:ab12cd34;0a1b2c.5000"),
            Some(RedisCursor::Sweep(SweepPosition {
                node: 1,
                scan: 17,
                topology: Some("ab12cd34".into()),
                ledger: tally.clone(),
            }))
        );
        assert_eq!(
            RedisBackend::legacy_cursor("0:99"),
            Some(RedisCursor::Sweep(SweepPosition {
                node: 0,
                scan: 99,
                topology: None,
                ledger: None,
            }))
        );
        for bad in ["", "x:1", "0:17;x.1", "1:2:3:4", "es:{}", "v1:redis:{}"] {
            assert_eq!(RedisBackend::legacy_cursor(bad), None, "{bad}");
        }
        // In the common format, with the tally in its text form (checked when read).
        let cursor = RedisCursor::Sweep(SweepPosition::at(2, 5, "", tally));
        let text = crate::backends::driver::encode_cursor::<RedisBackend>(Some(&cursor));
        assert_eq!(
            text,
            r#"v1:redis:{"job":"sweep","node":2,"scan":5,"ledger":"0a1b2c.5000"}"#
        );
        let bad_run = r#"v1:redis:{"job":"sweep","node":2,"scan":5,"ledger":"../x.1"}"#;
        assert!(matches!(
            crate::backends::driver::decode_cursor::<RedisBackend>(Some(bad_run)),
            crate::backends::driver::Decoded::Restart(_)
        ));
    }

    #[test]
    fn errors_are_classified_by_kind_and_code_never_by_text() {
        use redis::{ErrorKind, ServerErrorKind};
        let addr = "10.0.0.1:6379";
        let reason = |e: redis::RedisError| map_error(e, addr).reason();
        // Redirects by their code: the caller reads the topology again.
        for kind in [
            ServerErrorKind::Moved,
            ServerErrorKind::Ask,
            ServerErrorKind::TryAgain,
            ServerErrorKind::ClusterDown,
        ] {
            let e = redis::RedisError::from((ErrorKind::Server(kind), "redirected"));
            assert_eq!(reason(e), "ClusterRedirect", "{kind:?}");
        }
        // Text that merely mentions a code, or the old leadership message, is no such thing.
        let mentions = redis::make_extension_error(
            "ERR".into(),
            Some("MOVED ASK NOPERM leadership lost LFU".into()),
        );
        assert_eq!(reason(mentions.clone()), "StoreError");
        assert_eq!(idle_error(mentions, addr).reason(), "StoreError");
        let client = redis::RedisError::from((ErrorKind::Client, "leadership lost"));
        assert_eq!(reason(client), "StoreError");
        // The code the idle script sets, and the server's own codes.
        let no_idle = redis::make_extension_error(NO_IDLETIME.into(), Some("x".into()));
        assert_eq!(idle_error(no_idle, addr).reason(), "InvalidSpec");
        let noperm = redis::RedisError::from((ErrorKind::Server(ServerErrorKind::NoPerm), "x"));
        assert!(map_error(noperm, addr).to_string().contains("ledger keys"));
        let auth = redis::make_extension_error("WRONGPASS".into(), None);
        assert_eq!(reason(auth), "AuthenticationFailed");
    }

    #[test]
    fn the_idle_script_answers_with_the_code_it_is_matched_by() {
        assert!(IDLE_SOURCE.contains(&format!("error_reply('{NO_IDLETIME} ")));
    }

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        assert_eq!(parse_cursor(None, 1, "").unwrap(), (0, 0));
        assert_eq!(parse_cursor(Some("0:1234"), 1, "").unwrap(), (0, 1234));
        assert_eq!(parse_cursor(Some("2:5"), 3, "").unwrap(), (2, 5));
        assert_eq!(parse_cursor(Some("3:5"), 3, "").unwrap(), (0, 0));
        assert!(parse_cursor(Some("s3-token"), 1, "").is_err());
        assert!(parse_cursor(Some("1:2:3:4"), 3, "").is_err());
    }

    #[test]
    fn sweeps_never_select_ledger_keys() {
        for pattern in ["*", "tombstone:*", "t*", "*ledger*"] {
            assert!(
                !selectable(pattern, b"tombstone:ledger:0a1b2c"),
                "{pattern}"
            );
            assert!(
                !selectable(pattern, b"tombstone:ledger:0a1b2c:{7}"),
                "{pattern}"
            );
        }
        assert!(selectable("*", b"tombstone:other"));
        assert!(selectable("*", b"session:1"));
        assert!(!selectable("session:*", b"cart:1"));
    }

    #[test]
    fn sweep_cursors_carry_the_ledger_tally() {
        assert_eq!(split_cursor(None).unwrap(), (None, None));
        assert_eq!(split_cursor(Some("0:17")).unwrap(), (Some("0:17"), None));
        let (position, tally) = split_cursor(Some("1:17:ab12cd34;0a1b2c.5000")).unwrap();
        assert_eq!(position, Some("1:17:ab12cd34"));
        let tally = tally.unwrap();
        assert_eq!((tally.run.as_str(), tally.counted), ("0a1b2c", 5000));
        for bad in ["0:17;", "0:17;x.1", "0:17;0a.1;0a.2", "0:17;0a.-5"] {
            assert_eq!(
                split_cursor(Some(bad)).unwrap_err().reason(),
                "InvalidSpec",
                "{bad}"
            );
        }
        // Past the last node: every node is done (the ledger still to be read).
        assert_eq!(parse_cursor(Some("1:0"), 1, "").unwrap(), (1, 0));
        assert_eq!(parse_cursor(Some("1:5"), 1, "").unwrap(), (0, 0));
    }

    #[test]
    fn a_cluster_cursor_from_another_topology_starts_the_sweep_over() {
        let cursor = encode_cursor(2, 77, "a 1.1.1.1:1 0-16383");
        assert_eq!(
            parse_cursor(Some(&cursor), 3, "a 1.1.1.1:1 0-16383").unwrap(),
            (2, 77)
        );
        assert_eq!(
            parse_cursor(Some(&cursor), 3, "b 1.1.1.2:1 0-16383").unwrap(),
            (0, 0),
            "a failover or reshard since the checkpoint"
        );
        assert_eq!(
            parse_cursor(Some("2:77"), 3, "a 1.1.1.1:1 0-16383").unwrap(),
            (0, 0),
            "an untagged cursor says nothing of the primaries it counted"
        );
    }

    #[test]
    fn the_cluster_view_counts_slots_and_sees_migrations() {
        let whole = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
a3 127.0.0.1:7003@17003 master - 0 0 3 connected 10923-16383
";
        let v = cluster_view(whole);
        assert_eq!((v.covered_slots, v.migrating), (16384, false));
        let failing = whole.replace(
            "a3 127.0.0.1:7003@17003 master",
            "a3 127.0.0.1:7003@17003 master,fail",
        );
        assert_eq!(cluster_view(&failing).covered_slots, 10923);
        let moving = whole.replace("5461-10922", "5461-10922 [5461->-a3]");
        let m = cluster_view(&moving);
        assert!(m.migrating);
        assert_ne!(m.fingerprint, v.fingerprint);
        // Pings and epochs change all the time; the routing did not.
        let pinged = whole.replace("- 0 0 2 connected", "- 1700000000 1700000001 2 connected");
        assert_eq!(cluster_view(&pinged).fingerprint, v.fingerprint);
    }

    #[test]
    fn cluster_primaries_skip_replicas_and_failed_nodes() {
        let listing = "\
a1 127.0.0.1:7001@17001 myself,master - 0 0 1 connected 0-5460
a2 127.0.0.1:7002@17002 master - 0 0 2 connected 5461-10922
a3 127.0.0.1:7003@17003,host3 master - 0 0 3 connected 10923-16383
r1 127.0.0.1:7004@17004 slave a1 0 0 1 connected
f1 127.0.0.1:7005@17005 master,fail - 0 0 4 disconnected 1-2
e1 127.0.0.1:7006@17006 master - 0 0 5 connected
";
        let view = cluster_view(listing);
        assert_eq!(
            view.served.get(&("127.0.0.1".to_string(), 7002)),
            Some(&vec![(5461, 10922)])
        );
        let primaries = view.primaries;
        assert_eq!(
            primaries,
            vec![
                ("127.0.0.1".into(), 7001),
                ("127.0.0.1".into(), 7002),
                ("127.0.0.1".into(), 7003)
            ]
        );
    }

    #[test]
    fn cluster_scripts_are_grouped_by_slot() {
        let entries: Vec<(Vec<u8>, u8)> = ["a:{u1}:x", "b", "a:{u1}:y", "c", "{u1}"]
            .iter()
            .map(|k| (k.as_bytes().to_vec(), 0))
            .collect();
        assert_eq!(script_groups(&entries, false).len(), 1);
        let groups = script_groups(&entries, true);
        let names: Vec<Vec<&[u8]>> = groups
            .iter()
            .map(|g| g.iter().map(|(k, _)| k.as_slice()).collect())
            .collect();
        // "b" and "c" hash to different slots; the three {u1} keys share one.
        assert_eq!(
            names,
            vec![
                vec![&b"a:{u1}:x"[..], b"a:{u1}:y", b"{u1}"],
                vec![&b"b"[..]],
                vec![&b"c"[..]],
            ]
        );
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), entries.len());
    }

    #[test]
    fn timestamps_in_seconds_or_rfc3339() {
        assert_eq!(
            parse_timestamp("1700000000").unwrap().timestamp(),
            1_700_000_000
        );
        assert_eq!(
            parse_timestamp("1700000000.5").unwrap().timestamp(),
            1_700_000_000
        );
        assert_eq!(
            parse_timestamp("2023-11-14T22:13:20Z").unwrap().timestamp(),
            1_700_000_000
        );
        assert!(parse_timestamp("yesterday").is_none());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("redis://:hunter2@cache:6379/0"),
            "redis://:redacted@cache:6379/0"
        );
        assert!(!redact_url("rediss://user:hunter2@cache:6379").contains("hunter2"));
    }

    fn target(pattern: &str, mode: RedisMode, field: Option<&str>, allow: bool) -> Target {
        Target {
            name: "t".into(),
            store: "cache".into(),
            selector: Some(crate::api::retentionpolicy::Selector::Redis(RedisTarget {
                key_pattern: pattern.into(),
                mode,
                timestamp_field: field.map(Into::into),
            })),
            subject: None,
            allow_match_all: allow,
        }
    }

    #[test]
    fn match_everything_needs_an_explicit_opt_in() {
        assert!(validate_target(&target("*", RedisMode::Expire, None, false)).is_err());
        assert!(validate_target(&target("*", RedisMode::Expire, None, true)).is_ok());
        assert!(validate_target(&target("session:*", RedisMode::Expire, None, false)).is_ok());
        for all in ["**", "*:*", "?*", "[a-z]*", "*-*", ":*"] {
            let e = validate_target(&target(all, RedisMode::Expire, None, false)).unwrap_err();
            assert!(e.to_string().contains("allowMatchAll"), "{all}: {e}");
            assert!(validate_target(&target(all, RedisMode::Expire, None, true)).is_ok());
        }
    }

    fn with_subject(subject: serde_json::Value) -> Target {
        let mut t = target("session:*", RedisMode::Expire, None, false);
        t.subject = Some(serde_json::from_value(serde_json::json!({ "redis": subject })).unwrap());
        t
    }

    #[test]
    fn subject_locators_are_bounded_by_their_identifier() {
        use serde_json::json;
        for ok in [
            json!({"keys": ["session:{userId}:*", "cart:{userId}", "mail:{email}"]}),
            json!({"hashFields": [{"key": "user:{userId}", "field": "email"}]}),
            json!({"hashFields": [{"key": "profiles", "field": "{userId}"}]}),
            json!({"setMembers": [{"key": "newsletter", "member": "{email}"}]}),
        ] {
            assert!(validate_target(&with_subject(ok.clone())).is_ok(), "{ok}");
        }
        for (bad, names) in [
            (json!({"keys": ["session:*"]}), "keys[0] \"session:*\""),
            (
                json!({"keys": ["session:{userId}*"]}),
                "keys[0] \"session:{userId}*\"",
            ),
            (
                json!({"keys": ["ok:{userId}", "session:*{userId}"]}),
                "keys[1]",
            ),
            (json!({"keys": ["{userId}*"]}), "keys[0]"),
            (json!({"keys": ["session-{userId}-*"]}), "keys[0]"),
            (
                json!({"hashFields": [{"key": "profiles", "field": "email"}]}),
                "hashFields[0]",
            ),
            (
                json!({"hashFields": [{"key": "p:{userId}x", "field": "f"}]}),
                "hashFields[0].key",
            ),
            (
                json!({"setMembers": [{"key": "s", "member": "m"}]}),
                "setMembers[0]",
            ),
            (
                json!({"setMembers": [{"key": "s", "member": "u{userId}"}]}),
                "setMembers[0].member",
            ),
        ] {
            let e = validate_target(&with_subject(bad.clone())).unwrap_err();
            assert_eq!(e.reason(), "InvalidSpec");
            assert!(e.to_string().contains(names), "{bad}: {e}");
        }
    }

    #[test]
    fn timestamp_mode_needs_its_field() {
        assert!(validate_target(&target("h:*", RedisMode::Timestamp, None, false)).is_err());
        assert!(validate_target(&target(
            "h:*",
            RedisMode::Timestamp,
            Some("createdAt"),
            false
        ))
        .is_ok());
        assert!(
            validate_target(&target("h:*", RedisMode::Idle, Some("createdAt"), false)).is_err()
        );
    }
}
