//! One data subject's records in Redis: keys (globs allowed, UNLINK), hash fields (HDEL) and
//! set or sorted-set members (SREM / ZREM), found, erased and verified with the same queries.

use redis::aio::MultiplexedConnection;
use redis::RedisResult;

use super::{glob, map_error, Node, RedisBackend, SCAN_COUNT};
use std::collections::BTreeMap;

use crate::api::StoreKind;
use crate::backends::identifier::{self, exact_forms, Piece};
use crate::backends::template::{self, escape_glob};
use crate::backends::{subject_locator, Error, Next, SubjectAction, SubjectJob, SubjectStep};

/// Fills a template with a subject's identifiers, into the forms to look for.
type Expander = fn(&str, &BTreeMap<String, String>) -> Result<Vec<String>, template::Error>;

/// What a template expansion came to: the forms to use, or a reason to skip the locator.
fn expand_or_skip(
    what: &str,
    template: &str,
    job: &SubjectJob,
    expand: Expander,
    skipped: &mut Vec<String>,
) -> Result<Option<Vec<String>>, Error> {
    match expand(template, &job.identifiers) {
        Ok(v) => Ok(Some(v)),
        Err(template::Error::MissingIdentifier(name)) => {
            skipped.push(format!("{what} needs {{{name}}}"));
            Ok(None)
        }
        Err(template::Error::Malformed) => Err(Error::InvalidSpec(format!(
            "target {}: subject.redis.{what} is not a valid template",
            job.target.name
        ))),
    }
}

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

impl RedisBackend {
    pub(super) async fn subject(&self, job: &SubjectJob) -> Result<SubjectStep, Error> {
        let locator = subject_locator(&job.target, StoreKind::Redis, |s| s.redis.as_ref())?;
        let nodes = self.nodes().await?;
        let nodes = nodes.as_slice();
        let mut count = 0;
        let mut skipped = Vec::new();

        for (i, t) in locator.keys.iter().enumerate() {
            let Some(patterns) =
                expand_or_skip(&format!("keys[{i}]"), t, job, key_glob, &mut skipped)?
            else {
                continue;
            };
            for pattern in patterns {
                if glob::matches_everything(&pattern) || pattern.is_empty() {
                    return Err(Error::InvalidSpec(format!(
                        "target {}: subject.redis.keys[{i}] would match every key",
                        job.target.name
                    )));
                }
                for node in nodes {
                    count += self.subject_keys(node, &pattern, job.action).await?;
                }
            }
        }
        for (i, hf) in locator.hash_fields.iter().enumerate() {
            let what = format!("hashFields[{i}]");
            let Some(keys) = expand_or_skip(&what, &hf.key, job, exact_forms, &mut skipped)? else {
                continue;
            };
            let Some(fields) = expand_or_skip(&what, &hf.field, job, exact_forms, &mut skipped)?
            else {
                continue;
            };
            let command = if job.action == SubjectAction::Erase {
                "HDEL"
            } else {
                "HEXISTS"
            };
            for (key, field) in pairs(&keys, &fields) {
                for node in nodes {
                    count += self
                        .single_key(node, redis::cmd(command).arg(key).arg(field))
                        .await?;
                }
            }
        }
        for (i, sm) in locator.set_members.iter().enumerate() {
            let what = format!("setMembers[{i}]");
            let Some(keys) = expand_or_skip(&what, &sm.key, job, exact_forms, &mut skipped)? else {
                continue;
            };
            let Some(members) = expand_or_skip(&what, &sm.member, job, exact_forms, &mut skipped)?
            else {
                continue;
            };
            for (key, member) in pairs(&keys, &members) {
                for node in nodes {
                    count += self.set_member(node, key, member, job.action).await?;
                }
            }
        }
        skipped.dedup();
        let locators = locator.keys.len() + locator.hash_fields.len() + locator.set_members.len();
        Ok(SubjectStep {
            count,
            blocked: 0,
            malformed: 0,
            ran: skipped.len() < locators,
            skipped,
            next: Next::Done,
            failure: None,
        })
    }

    /// Keys matching `pattern` on one node: counted, or unlinked and counted.
    async fn subject_keys(
        &self,
        node: &Node,
        pattern: &str,
        action: SubjectAction,
    ) -> Result<u64, Error> {
        let mut conn = node.conn.clone();
        let err = |e| map_error(e, &node.addr);
        let mut cursor = 0u64;
        let mut count = 0;
        loop {
            self.limits.acquire(1).await;
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(&mut conn)
                .await
                .map_err(err)?;
            let keys: Vec<Vec<u8>> = keys
                .into_iter()
                .filter(|k| glob::matches(pattern.as_bytes(), k))
                .collect();
            if !keys.is_empty() {
                count += match action {
                    SubjectAction::Find | SubjectAction::Verify => keys.len() as u64,
                    SubjectAction::Erase => {
                        unlink_each(&mut conn, &keys, self).await.map_err(err)?
                    }
                };
            }
            if next == 0 {
                return Ok(count);
            }
            cursor = next;
        }
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

    /// A member of a set (SISMEMBER / SREM) or sorted set (ZSCORE / ZREM).
    async fn set_member(
        &self,
        node: &Node,
        key: &str,
        member: &str,
        action: SubjectAction,
    ) -> Result<u64, Error> {
        let mut conn = node.conn.clone();
        self.limits.acquire(1).await;
        let kind: String = match redis::cmd("TYPE").arg(key).query_async(&mut conn).await {
            Ok(kind) => kind,
            Err(e) if is_not_here(&e) => return Ok(0),
            Err(e) => return Err(map_error(e, &node.addr)),
        };
        let erase = action == SubjectAction::Erase;
        match kind.as_str() {
            "set" => {
                self.single_key(
                    node,
                    redis::cmd(if erase { "SREM" } else { "SISMEMBER" })
                        .arg(key)
                        .arg(member),
                )
                .await
            }
            "zset" if erase => {
                self.single_key(node, redis::cmd("ZREM").arg(key).arg(member))
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

async fn unlink_each(
    conn: &mut MultiplexedConnection,
    keys: &[Vec<u8>],
    backend: &RedisBackend,
) -> RedisResult<u64> {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("UNLINK").arg(key);
    }
    backend.limits.acquire(keys.len() as u32).await;
    let removed: Vec<u64> = pipe.query_async(conn).await?;
    Ok(removed.iter().sum())
}

fn is_not_here(e: &redis::RedisError) -> bool {
    matches!(e.code(), Some("MOVED") | Some("ASK"))
}
