//! The query DSL of the Elasticsearch backend, built as JSON values (never by string
//! concatenation, so an identifier holding `"`, `\`, `|` or `}` stays one string value): the
//! ranges of a sweep, the terms of a subject, and the mapping check that keeps a `term` off
//! analysed fields.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{json, Value};

use crate::api::StoreKind;
use crate::backends::identifier;
use crate::backends::template::Locating;
use crate::backends::Error;

/// Documents older than this are deleted: `range` with `lt` on the timestamp field, with the
/// absolute cutoff (not `now-30d`), so a resumed step and a dry run judge the same instant.
/// The cutoff is cut to milliseconds downwards: never later than the sweep's cutoff.
pub fn older_than(timestamp_field: &str, cutoff: DateTime<Utc>) -> Value {
    json!({"range": {timestamp_field: {
        "lt": cutoff.to_rfc3339_opts(SecondsFormat::Millis, true),
        // How to read `lt` whatever format the field is mapped with.
        "format": "strict_date_optional_time",
    }}})
}

/// One `term` of a subject locator, filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Term {
    /// The template filled with canonical identifier values.
    pub value: String,
    /// Compared without case (`case_insensitive`, Elasticsearch 7.10+ and OpenSearch): the
    /// template's identifiers are all e-mail addresses.
    pub case_insensitive: bool,
}

/// Expired documents except those of the subjects a LegalHold holds (`held`: one
/// [`subject_query`] each). Without held subjects, exactly [`older_than`].
pub fn older_than_except(timestamp_field: &str, cutoff: DateTime<Utc>, held: &[Value]) -> Value {
    if held.is_empty() {
        return older_than(timestamp_field, cutoff);
    }
    json!({"bool": {
        "filter": [older_than(timestamp_field, cutoff)],
        "must_not": held,
    }})
}

/// The search for the oldest timestamp among the documents a sweep keeps (those `expired`
/// does not match): what remains after the sweep, in a dry run too.
pub fn oldest_kept_search(timestamp_field: &str, expired: &Value) -> Value {
    json!({
        "size": 0,
        "query": {"bool": {"must_not": [expired]}},
        "aggs": {"oldest": {"min": {"field": timestamp_field}}},
    })
}

/// Reads an [`oldest_kept_search`] answer (None: no kept document has the field).
pub fn read_oldest(answer: &Value) -> Option<DateTime<Utc>> {
    let ms = answer.pointer("/aggregations/oldest/value")?.as_f64()?;
    if !ms.is_finite() {
        return None;
    }
    DateTime::from_timestamp_millis(ms as i64)
}

/// Expired documents of the held subjects: what [`older_than_except`] keeps.
pub fn older_than_held(timestamp_field: &str, cutoff: DateTime<Utc>, held: &[Value]) -> Value {
    json!({"bool": {
        "filter": [older_than(timestamp_field, cutoff), {"bool": {"should": held}}],
    }})
}

/// The subject's documents: every `term` of the locator, all of them required. `terms` are
/// field → filled-in value. Find, erase and verify all send this query.
pub fn subject_query(terms: &BTreeMap<String, Term>) -> Value {
    let filters: Vec<Value> = terms
        .iter()
        .map(|(field, term)| term_query(field, term))
        .collect();
    json!({"bool": {"filter": filters}})
}

fn term_query(field: &str, term: &Term) -> Value {
    if term.case_insensitive {
        json!({"term": {field: {"value": term.value, "case_insensitive": true}}})
    } else {
        json!({"term": {field: {"value": term.value}}})
    }
}

/// A batch's chunk of members whose query is a `terms` query: far below Elasticsearch's
/// `index.max_terms_count` (65,536).
pub const TERMS_CHUNK: usize = 1000;
/// Clauses of a chunk whose query is a `bool` of each member's terms: half of the smallest
/// default `indices.query.bool.max_clause_count` (1,024, which Lucene 9 counts over the whole
/// query).
pub const SHOULD_CLAUSES: usize = 500;

/// How many members of `members` (each one's filled-in terms, all of one locator) one query
/// may take, by the shape [`chunk_query`] gives them.
pub fn chunk_limit(members: &[&BTreeMap<String, Term>]) -> usize {
    match shape(members) {
        Shape::Terms(_) => TERMS_CHUNK,
        Shape::Each => {
            let fields = members.first().map_or(1, |m| m.len());
            (SHOULD_CLAUSES / fields.saturating_add(1)).max(1)
        }
    }
}

/// How a chunk's members combine into one query.
enum Shape<'a> {
    /// They differ in this one field, compared with case: a `terms` query over its values,
    /// and the fields they share as `term`s.
    Terms(&'a str),
    /// Any other case (several fields differ, or one compared without case, which `terms`
    /// cannot do): a `bool` `should` of each member's [`subject_query`].
    Each,
}

fn shape<'a>(members: &[&'a BTreeMap<String, Term>]) -> Shape<'a> {
    let Some(first) = members.first() else {
        return Shape::Each;
    };
    if members.iter().any(|m| m.len() != first.len()) {
        return Shape::Each;
    }
    let varying: Vec<&String> = first
        .iter()
        .filter(|(field, term)| members.iter().any(|m| m.get(*field) != Some(*term)))
        .map(|(field, _)| field)
        .collect();
    match varying.as_slice() {
        [field]
            if members
                .iter()
                .all(|m| m.get(*field).is_some_and(|t| !t.case_insensitive)) =>
        {
            Shape::Terms(field)
        }
        _ => Shape::Each,
    }
}

/// The documents of any member of a chunk (each member's filled-in terms, all of one
/// locator): the same documents as the `bool` `should` of every member's [`subject_query`].
pub fn chunk_query(members: &[&BTreeMap<String, Term>]) -> Value {
    match (shape(members), members.first()) {
        (Shape::Terms(field), Some(first)) => {
            let mut filters: Vec<Value> = first
                .iter()
                .filter(|(f, _)| f.as_str() != field)
                .map(|(f, term)| term_query(f, term))
                .collect();
            let values: std::collections::BTreeSet<&str> = members
                .iter()
                .filter_map(|m| m.get(field).map(|t| t.value.as_str()))
                .collect();
            filters.push(json!({"terms": {field: values}}));
            json!({"bool": {"filter": filters}})
        }
        _ => {
            let mut each: Vec<Value> = members.iter().map(|m| subject_query(m)).collect();
            each.dedup();
            json!({"bool": {"should": each, "minimum_should_match": 1}})
        }
    }
}

/// One search counting each member's documents among a chunk's: a `filters` aggregation
/// with one filter per member (keyed by its place in `members`), so a document of two
/// members counts for both.
pub fn member_counts_search(members: &[&BTreeMap<String, Term>]) -> Value {
    let filters: serde_json::Map<String, Value> = members
        .iter()
        .enumerate()
        .map(|(i, m)| (i.to_string(), subject_query(m)))
        .collect();
    json!({
        "size": 0,
        "query": chunk_query(members),
        "aggs": {"members": {"filters": {"filters": filters}}},
    })
}

/// The counts of a [`member_counts_search`] answer for its `n` members, in their order.
pub fn read_member_counts(answer: &Value, n: usize) -> Option<Vec<u64>> {
    let buckets = answer.pointer("/aggregations/members/buckets")?;
    (0..n)
        .map(|i| buckets.get(i.to_string())?.get("doc_count")?.as_u64())
        .collect()
}

/// Fills in the locator's value templates with canonical identifier values
/// ([`identifier::fill`]). `Ok(Err(skipped))`: the subject lacks an identifier one of them
/// needs, so the whole locator is skipped (terms are combined with AND: running the others
/// alone would select more than the subject's documents).
pub fn expand_terms(
    target: &str,
    terms: &BTreeMap<String, String>,
    identifiers: &BTreeMap<String, String>,
) -> Result<Result<BTreeMap<String, Term>, Vec<String>>, Error> {
    let mut out = BTreeMap::new();
    let mut locating = Locating::new(target, StoreKind::Elasticsearch, identifiers);
    for (field, t) in terms {
        if let Some(filled) = locating.fill(&format!("term[{field}]"), t, identifier::fill)? {
            out.insert(
                field.clone(),
                Term {
                    value: filled.text(),
                    case_insensitive: filled.folds_whole_value(),
                },
            );
        }
    }
    Ok(if locating.skipped.is_empty() {
        Ok(out)
    } else {
        Err(locating.skipped)
    })
}

/// Field types on which `term` compares with analysed tokens rather than the whole value:
/// a subject's `Alice@Example.org` would match nothing there, and the erasure would report
/// nothing found while the documents stay.
const ANALYSED: [&str; 4] = [
    "text",
    "match_only_text",
    "search_as_you_type",
    "annotated_text",
];

/// The (index, field, type) of every analysed field in a `GET <index>/_mapping/field/<fields>`
/// answer.
pub fn analysed_fields(answer: &Value) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for (index, body) in answer.as_object().into_iter().flatten() {
        for (field, m) in body
            .get("mappings")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let types = m
                .get("mapping")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
                .filter_map(|(_, leaf)| leaf.get("type").and_then(Value::as_str));
            for t in types {
                if ANALYSED.contains(&t) {
                    found.push((index.clone(), field.clone(), t.to_string()));
                }
            }
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn hostile_identifiers_stay_one_exact_term_value() {
        for hostile in [
            r#"a" } }, {"match_all": {"#,
            r#"x\"y"#,
            "47 | user-4711",
            "}}]}",
            "\\",
            "*",
        ] {
            let terms = expand_terms(
                "t",
                &ids(&[("user.id", "{userId}")]),
                &ids(&[("userId", hostile)]),
            )
            .unwrap()
            .unwrap();
            let query = subject_query(&terms);
            // Whatever the identifier holds, the query is one bool with one term whose value
            // is exactly the identifier, and it survives a round trip through JSON text.
            let text = serde_json::to_string(&query).unwrap();
            let back: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, query);
            let filters = back.pointer("/bool/filter").unwrap().as_array().unwrap();
            assert_eq!(filters.len(), 1);
            assert_eq!(
                filters[0].pointer("/term/user.id/value"),
                Some(&Value::String(hostile.into()))
            );
            assert_eq!(back.as_object().unwrap().len(), 1);
            assert_eq!(back["bool"].as_object().unwrap().len(), 1);
        }
    }

    #[test]
    fn terms_are_all_required_and_a_missing_identifier_skips_the_locator() {
        let locator = ids(&[("user.email", "{email}"), ("tenant", "shop")]);
        let terms = expand_terms("t", &locator, &ids(&[("email", "a@b.c")]))
            .unwrap()
            .unwrap();
        assert_eq!(
            subject_query(&terms),
            json!({"bool": {"filter": [
                {"term": {"tenant": {"value": "shop"}}},
                {"term": {"user.email": {"value": "a@b.c", "case_insensitive": true}}},
            ]}})
        );
        let skipped = expand_terms("t", &locator, &ids(&[("userId", "47")]))
            .unwrap()
            .unwrap_err();
        assert_eq!(skipped, vec!["term[user.email] needs {email}"]);
        // A malformed template names the target and the field, as every driver's does.
        assert_eq!(
            expand_terms("t", &ids(&[("f", "{a")]), &ids(&[]))
                .err()
                .map(|e| e.to_string()),
            Some("target t: subject.elasticsearch.term[f] is not a valid template".into())
        );
    }

    #[test]
    fn terms_use_the_canonical_value_and_fold_only_email_terms() {
        let locator = ids(&[
            ("user.email", "{email}"),
            ("user.id", "{userId}"),
            ("pair", "{userId}:{email}"),
        ]);
        let terms = expand_terms(
            "t",
            &locator,
            &ids(&[("email", " Bob@Example.COM\n"), ("userId", "AbC-47\n")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            subject_query(&terms),
            json!({"bool": {"filter": [
                {"term": {"pair": {"value": "AbC-47:bob@example.com"}}},
                {"term": {"user.email": {"value": "bob@example.com", "case_insensitive": true}}},
                {"term": {"user.id": {"value": "AbC-47"}}},
            ]}})
        );
    }

    #[test]
    fn the_range_uses_the_absolute_cutoff_cut_to_milliseconds() {
        let cutoff = DateTime::parse_from_rfc3339("2026-11-20T09:00:00.123456789Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            older_than("@timestamp", cutoff),
            json!({"range": {"@timestamp": {
                "lt": "2026-11-20T09:00:00.123Z", "format": "strict_date_optional_time"
            }}})
        );
    }

    #[test]
    fn analysed_fields_are_found_in_a_field_mapping_answer() {
        let answer = json!({
            "mail-a": {"mappings": {
                "user.email": {"full_name": "user.email", "mapping": {"email": {"type": "text",
                    "fields": {"keyword": {"type": "keyword", "ignore_above": 256}}}}},
                "user.email.keyword": {"full_name": "user.email.keyword", "mapping": {"keyword": {"type": "keyword"}}}
            }},
            "mail-b": {"mappings": {}}
        });
        assert_eq!(
            analysed_fields(&answer),
            vec![(
                "mail-a".to_string(),
                "user.email".to_string(),
                "text".to_string()
            )]
        );
        assert!(analysed_fields(
            &json!({"x": {"mappings": {"id": {"mapping": {"id": {"type": "keyword"}}}}}})
        )
        .is_empty());
    }

    fn filled(locator: &[(&str, &str)], identifiers: &[(&str, &str)]) -> BTreeMap<String, Term> {
        expand_terms("t", &ids(locator), &ids(identifiers))
            .unwrap()
            .unwrap()
    }

    #[test]
    fn a_chunk_differing_in_one_exact_field_is_one_terms_query() {
        let locator = [("user.id", "{userId}"), ("tenant", "shop")];
        let members: Vec<BTreeMap<String, Term>> = ["u-2", "u-1", "u-2", "a\"b"]
            .iter()
            .map(|u| filled(&locator, &[("userId", u)]))
            .collect();
        let refs: Vec<&BTreeMap<String, Term>> = members.iter().collect();
        assert_eq!(
            chunk_query(&refs),
            json!({"bool": {"filter": [
                {"term": {"tenant": {"value": "shop"}}},
                {"terms": {"user.id": ["a\"b", "u-1", "u-2"]}},
            ]}}),
            "the values sorted, each once; the shared field a term"
        );
        assert_eq!(chunk_limit(&refs), TERMS_CHUNK);
        // The same chunk in another order gives the same query.
        let reversed: Vec<&BTreeMap<String, Term>> = members.iter().rev().collect();
        assert_eq!(chunk_query(&reversed), chunk_query(&refs));
    }

    #[test]
    fn chunks_a_terms_query_cannot_express_are_each_members_query() {
        // Two fields differ: a terms query per field would also match one member's user
        // with another's address.
        let locator = [("user", "{userId}"), ("mail", "{email}")];
        let a = filled(&locator, &[("userId", "A1"), ("email", "a@x.org")]);
        let b = filled(&locator, &[("userId", "B2"), ("email", "b@x.org")]);
        let query = chunk_query(&[&a, &b]);
        assert_eq!(
            query,
            json!({"bool": {"should": [subject_query(&a), subject_query(&b)], "minimum_should_match": 1}})
        );
        assert_eq!(chunk_limit(&[&a, &b]), SHOULD_CLAUSES / 3);
        // One field, but compared without case (addresses): terms cannot fold case.
        let m = |e: &str| filled(&[("mail", "{email}")], &[("email", e)]);
        let (x, y) = (m("x@a.org"), m("Y@a.org"));
        assert!(chunk_query(&[&x, &y]).pointer("/bool/should").is_some());
        assert_eq!(chunk_limit(&[&x, &y]), SHOULD_CLAUSES / 2);
        // Within the clause limit for any number of fields.
        let wide: BTreeMap<String, Term> = (0..600)
            .map(|n| {
                (
                    format!("f{n}"),
                    Term {
                        value: "v".into(),
                        case_insensitive: false,
                    },
                )
            })
            .collect();
        assert_eq!(chunk_limit(&[&wide, &a]), 1);
    }

    #[test]
    fn member_counts_are_one_filter_per_member_read_in_order() {
        let m = |u: &str| filled(&[("user", "{userId}")], &[("userId", u)]);
        let (a, b) = (m("A1"), m("B2"));
        let search = member_counts_search(&[&a, &b]);
        assert_eq!(search["size"], 0);
        assert_eq!(search["query"], chunk_query(&[&a, &b]));
        assert_eq!(
            search.pointer("/aggs/members/filters/filters/1"),
            Some(&subject_query(&b))
        );
        let answer = json!({"aggregations": {"members": {"buckets": {
            "0": {"doc_count": 3}, "1": {"doc_count": 0}}}}});
        assert_eq!(read_member_counts(&answer, 2), Some(vec![3, 0]));
        assert_eq!(read_member_counts(&answer, 3), None);
        assert_eq!(read_member_counts(&json!({}), 1), None);
    }
}
