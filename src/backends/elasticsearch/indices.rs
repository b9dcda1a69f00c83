//! Index patterns and concrete indices (pure): the checks that keep a pattern from selecting
//! every index, pattern matching, write indices of aliases and data streams, and the
//! fast-path decision that deletes a whole index only when every document in it is old.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

/// Whether an index pattern selects every index (`*`, `_all`, `**`, or a list with such an
/// element).
pub fn matches_everything(pattern: &str) -> bool {
    pattern.trim().is_empty()
        || pattern.split(',').any(|p| {
            let p = p.trim();
            p == "_all" || (!p.starts_with('-') && p.chars().all(|c| c == '*'))
        })
}

/// The first inclusion of `pattern` that names no index by a literal prefix: the text before
/// its first `*` must hold a letter or digit. `*`, `*-x`, `.*`, `-*` select every (hidden)
/// index whatever they are spelt like; `logs-*` and `.kibana*` are anchored.
pub fn unanchored_inclusion(pattern: &str) -> Option<&str> {
    pattern.split(',').map(str::trim).find(|p| {
        !p.starts_with('-')
            && (*p == "_all"
                || !p
                    .split('*')
                    .next()
                    .is_some_and(|prefix| prefix.chars().any(|c| c.is_alphanumeric())))
    })
}

/// Checks an index pattern: a comma-separated list of index names with `*` wildcards and
/// `-` exclusions. Date math (`<…>`), remote clusters (`a:b`) and characters Elasticsearch
/// forbids in index names are refused, so the pattern means the same to the store as to
/// [`index_matches`].
pub fn check_pattern(pattern: &str) -> Result<(), String> {
    if pattern.trim().is_empty() {
        return Err("the index pattern is empty".into());
    }
    for (i, part) in pattern.split(',').enumerate() {
        let name = part.strip_prefix('-').unwrap_or(part);
        if name.is_empty() {
            return Err(format!("{pattern:?} has an empty element"));
        }
        if i == 0 && part.starts_with('-') {
            return Err(format!(
                "{pattern:?} starts with an exclusion; name the indices first"
            ));
        }
        if let Some(c) = name.chars().find(|c| {
            matches!(
                c,
                ' ' | '"' | '\\' | '/' | '?' | '<' | '>' | '|' | '#' | ':' | '{' | '}'
            ) || c.is_uppercase()
                || c.is_control()
        }) {
            return Err(format!(
                "{pattern:?} contains {c:?}, which is not allowed in an index pattern (lower-case names, `*` wildcards and `-` exclusions only; no date math or remote clusters)"
            ));
        }
    }
    Ok(())
}

/// Whether `index` is selected by `pattern`: named by an inclusion and by no exclusion. Used
/// to keep the fast path (whole-index deletion) to indices the pattern names itself; an
/// alias or data stream resolves to indices of other names, which are never deleted whole.
pub fn index_matches(pattern: &str, index: &str) -> bool {
    let mut included = false;
    for part in pattern.split(',') {
        match part.strip_prefix('-') {
            Some(excluded) => {
                if glob(excluded, index) {
                    return false;
                }
            }
            None => included |= glob(part, index),
        }
    }
    included
}

/// `*`-only glob matching.
fn glob(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            pi += 1;
            mark = ti;
        } else if pi < p.len() && p[pi] == t[ti] {
            pi += 1;
            ti += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A margin below the cutoff for the fast path: the `max` aggregation answers in (possibly
/// rounded) milliseconds, and an index that close to the cutoff is cheap to handle by query.
pub const FAST_PATH_MARGIN_MS: i64 = 1000;

/// What the fast-path probe of one index found.
#[derive(Clone, Debug, PartialEq)]
pub struct IndexAges {
    /// Documents in the index.
    pub total: u64,
    /// Documents without the timestamp field.
    pub missing: u64,
    /// The newest timestamp, epoch milliseconds (None: no document has the field).
    pub max_ms: Option<f64>,
}

/// Whether the whole index may be deleted: it holds documents, every one has the timestamp
/// field, and the newest is older than the cutoff. A document without the field, or an
/// unknown maximum, keeps the index (delete-by-query would keep such documents too).
pub fn whole_index_expired(ages: &IndexAges, cutoff: DateTime<Utc>) -> bool {
    let limit = (cutoff.timestamp_millis() - FAST_PATH_MARGIN_MS) as f64;
    ages.total > 0 && ages.missing == 0 && ages.max_ms.is_some_and(|m| m.is_finite() && m < limit)
}

/// The search that judges one index for the fast path.
pub fn ages_search(timestamp_field: &str) -> Value {
    json!({
        "size": 0,
        "track_total_hits": true,
        "aggs": {
            "newest": {"max": {"field": timestamp_field}},
            "undated": {"missing": {"field": timestamp_field}},
        }
    })
}

/// Reads an [`ages_search`] answer.
pub fn read_ages(answer: &Value) -> Option<IndexAges> {
    let total = answer.pointer("/hits/total/value")?.as_u64()?;
    if answer
        .pointer("/hits/total/relation")
        .and_then(Value::as_str)
        != Some("eq")
    {
        return None;
    }
    let missing = answer
        .pointer("/aggregations/undated/doc_count")?
        .as_u64()?;
    let max_ms = answer
        .pointer("/aggregations/newest/value")
        .and_then(Value::as_f64);
    Some(IndexAges {
        total,
        missing,
        max_ms,
    })
}

/// One concrete index name: no wildcard, list, path or expression that could name others.
pub fn valid_index_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && !name.starts_with(['-', '_', '+'])
        && !name.contains([
            '*', ',', '/', '\\', '?', '"', '<', '>', '|', ' ', '#', ':', '(', ')', '{', '}',
        ])
}

/// The indices that take writes for an alias or a data stream: of `_cat/aliases` rows
/// (`alias`, `index`, `is_write_index`), the index marked `true`, or the only index of an
/// alias none of whose indices is marked (Elasticsearch writes there); of `_data_stream`,
/// each stream's last backing index. Unreadable answers name none.
pub fn write_indices(aliases: &Value, data_streams: &Value) -> BTreeSet<String> {
    let mut by_alias: BTreeMap<&str, Vec<(&str, &str)>> = BTreeMap::new();
    for row in aliases.as_array().into_iter().flatten() {
        let (Some(alias), Some(index)) = (
            row.get("alias").and_then(Value::as_str),
            row.get("index").and_then(Value::as_str),
        ) else {
            continue;
        };
        let flag = row
            .get("is_write_index")
            .and_then(Value::as_str)
            .unwrap_or("-");
        by_alias.entry(alias).or_default().push((index, flag));
    }
    let mut out = BTreeSet::new();
    for rows in by_alias.values() {
        let marked: Vec<&str> = rows
            .iter()
            .filter(|(_, flag)| *flag == "true")
            .map(|(index, _)| *index)
            .collect();
        if !marked.is_empty() {
            out.extend(marked.into_iter().map(str::to_string));
        } else if let [(index, flag)] = rows.as_slice() {
            if *flag != "false" {
                out.insert((*index).to_string());
            }
        }
    }
    let streams = data_streams
        .get("data_streams")
        .and_then(Value::as_array)
        .into_iter()
        .flatten();
    for stream in streams {
        let last = stream
            .get("indices")
            .and_then(Value::as_array)
            .and_then(|indices| indices.last())
            .and_then(|i| i.get("index_name"))
            .and_then(Value::as_str);
        if let Some(index) = last {
            out.insert(index.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_that_select_everything_or_something_else_are_recognised() {
        for all in ["*", "_all", "**", "logs-*,*", " "] {
            assert!(matches_everything(all), "{all}");
        }
        for some in ["logs-*", "a,b", "logs-*,-logs-keep"] {
            assert!(!matches_everything(some), "{some}");
        }
        assert!(check_pattern("logs-*,-logs-keep,.audit-*").is_ok());
        for bad in [
            "<logs-{now/d}>",
            "remote:logs-*",
            "Logs",
            "a b",
            "-logs",
            "a,,b",
            "a/b",
        ] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn index_matching_follows_inclusions_and_exclusions() {
        assert!(index_matches("logs-*", "logs-2026.01.01"));
        assert!(!index_matches("logs-*", "logsx"));
        assert!(!index_matches("logs-*", ".ds-logs-app-000001"));
        assert!(index_matches("logs", "logs"));
        assert!(!index_matches("logs", "logs-000001"));
        assert!(index_matches("a-*,b-*", "b-1"));
        assert!(!index_matches("logs-*,-logs-keep*", "logs-keep-1"));
        assert!(index_matches("l*s-*-x", "logs-1-x"));
        assert!(!index_matches("l*s-*-x", "logs-1-y"));
    }

    #[test]
    fn write_indices_of_aliases_and_data_streams_are_recognised() {
        let aliases = json!([
            // Marked write index among several.
            {"alias": "logs", "index": "logs-1", "is_write_index": "false"},
            {"alias": "logs", "index": "logs-2", "is_write_index": "true"},
            // The only index of an alias, unmarked: Elasticsearch writes there.
            {"alias": "single", "index": "single-1", "is_write_index": "-"},
            // Several unmarked: the alias takes no writes.
            {"alias": "read", "index": "r-1", "is_write_index": "-"},
            {"alias": "read", "index": "r-2", "is_write_index": "-"},
            // The only index, marked false: no write index.
            {"alias": "off", "index": "off-1", "is_write_index": "false"},
            {"alias": "broken"}
        ]);
        let streams = json!({"data_streams": [
            {"name": "metrics", "indices": [
                {"index_name": ".ds-metrics-000001"}, {"index_name": ".ds-metrics-000002"}
            ]}
        ]});
        let write: Vec<String> = write_indices(&aliases, &streams).into_iter().collect();
        assert_eq!(write, vec![".ds-metrics-000002", "logs-2", "single-1"]);
        assert!(write_indices(&Value::Null, &Value::Null).is_empty());
    }

    #[test]
    fn only_an_index_whose_every_document_is_old_is_deleted_whole() {
        let cutoff = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let ms = cutoff.timestamp_millis() as f64;
        let ages = |total, missing, max_ms| IndexAges {
            total,
            missing,
            max_ms,
        };
        assert!(whole_index_expired(
            &ages(3, 0, Some(ms - 86_400_000.0)),
            cutoff
        ));
        // One young document, or one right at the cutoff.
        assert!(!whole_index_expired(&ages(3, 0, Some(ms + 1.0)), cutoff));
        assert!(!whole_index_expired(&ages(3, 0, Some(ms - 1.0)), cutoff));
        // A document without the field, no maximum, an empty index.
        assert!(!whole_index_expired(&ages(3, 1, Some(0.0)), cutoff));
        assert!(!whole_index_expired(&ages(3, 0, None), cutoff));
        assert!(!whole_index_expired(&ages(0, 0, None), cutoff));
    }
}
