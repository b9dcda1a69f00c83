//! Requests to the REST API: URLs, the shared HTTP client and credentials, the request
//! budget, and error answers mapped to the backend's error categories.

use reqwest::Method;
use serde_json::{json, Value};

use super::ElasticsearchBackend;
use crate::backends::http;
use crate::backends::Error;

/// Multi-index parameters: a concrete index deleted by the fast path (or a pattern matching
/// nothing) is not an error.
pub(super) const LENIENT: [(&str, &str); 2] =
    [("ignore_unavailable", "true"), ("allow_no_indices", "true")];

/// Whether an error answer may be quoted: not when the request carried an identifier (the
/// store may echo the query back).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Quote {
    Reason,
    TypeOnly,
}

impl ElasticsearchBackend {
    fn url(&self, segments: &[&str], params: &[(&str, &str)]) -> Result<url::Url, Error> {
        let mut url = url::Url::parse(&self.config.url).map_err(|e| {
            Error::InvalidSpec(format!(
                "invalid Elasticsearch URL {:?}: {e}",
                self.config.url
            ))
        })?;
        {
            let mut path = url.path_segments_mut().map_err(|_| {
                Error::InvalidSpec(format!("invalid Elasticsearch URL {:?}", self.config.url))
            })?;
            path.pop_if_empty();
            // Each segment is percent-encoded on its own: an index pattern or task id
            // cannot add path segments.
            path.extend(segments);
        }
        if !params.is_empty() {
            url.query_pairs_mut().extend_pairs(params);
        }
        Ok(url)
    }

    /// Sends one request and returns the status and the JSON answer (Null when the body is
    /// not JSON). Only a request that got no answer is an error here.
    pub(super) async fn send(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&str, &str)],
        body: Option<&Value>,
        what: &str,
    ) -> Result<(u16, Value), Error> {
        self.send_named(method, segments, params, body, what, None)
            .await
    }

    /// [`send`](Self::send), with an `X-Opaque-Id` header if `opaque_id` is given (a task
    /// started by the request carries it in `_tasks` and in its stored result).
    pub(super) async fn send_named(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&str, &str)],
        body: Option<&Value>,
        what: &str,
        opaque_id: Option<&str>,
    ) -> Result<(u16, Value), Error> {
        let url = self.url(segments, params)?;
        let mut request = self.http.request(method, url).await?;
        if let Some(id) = opaque_id {
            request = request.header("X-Opaque-Id", id);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let (status, text) = self.http.exchange(what, request).await?;
        Ok((
            status.as_u16(),
            serde_json::from_str(&text).unwrap_or(Value::Null),
        ))
    }

    /// [`send`](Self::send), with anything but a 2xx answer as an error.
    pub(super) async fn call(
        &self,
        method: Method,
        segments: &[&str],
        params: &[(&str, &str)],
        body: Option<&Value>,
        what: &str,
        quote: Quote,
    ) -> Result<Value, Error> {
        let (status, answer) = self.send(method, segments, params, body, what).await?;
        if (200..300).contains(&status) {
            Ok(answer)
        } else {
            Err(answer_error(what, status, &answer, quote))
        }
    }

    pub(super) async fn refresh(&self, pattern: &str) -> Result<(), Error> {
        self.call(
            Method::POST,
            &[pattern, "_refresh"],
            &LENIENT,
            None,
            "_refresh",
            Quote::Reason,
        )
        .await
        .map(drop)
    }

    pub(super) async fn count(
        &self,
        pattern: &str,
        query: Value,
        quote: Quote,
    ) -> Result<u64, Error> {
        let answer = self
            .call(
                Method::POST,
                &[pattern, "_count"],
                &LENIENT,
                Some(&json!({"query": query})),
                "_count",
                quote,
            )
            .await?;
        answer
            .get("count")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::Store("_count: the answer has no count".into()))
    }
}

/// An error answer as an error of the backend's categories. Elasticsearch answers
/// `{"error": {"type": …, "reason": …}, "status": …}`; the reason is quoted only if the
/// request carried no identifier.
pub(super) fn answer_error(what: &str, status: u16, answer: &Value, quote: Quote) -> Error {
    let kind = answer
        .pointer("/error/type")
        .and_then(Value::as_str)
        .or_else(|| answer.get("error").and_then(Value::as_str));
    let reason = answer.pointer("/error/reason").and_then(Value::as_str);
    let detail = match (kind, reason, quote) {
        (Some(k), Some(r), Quote::Reason) => format!("{k}: {r}"),
        (Some(k), _, _) => k.to_string(),
        (None, _, _) => String::new(),
    };
    let status = reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::BAD_GATEWAY);
    http::status_error(what, status, &detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backends::elasticsearch::ElasticsearchConfig;
    use crate::backends::http::HttpAuth;
    use crate::backends::Limits;

    #[test]
    fn error_answers_are_quoted_only_when_no_identifier_was_sent() {
        let answer = json!({"error": {"type": "query_shard_exception",
            "reason": "failed to create query: user-47@example.org"}, "status": 400});
        let quoted = answer_error("_count", 400, &answer, Quote::Reason).to_string();
        assert!(quoted.contains("user-47@example.org"), "{quoted}");
        let reduced = answer_error("_count", 400, &answer, Quote::TypeOnly);
        assert_eq!(reduced.reason(), "StoreError");
        assert!(!reduced.to_string().contains("user-47"), "{reduced}");
        assert_eq!(
            answer_error(
                "GET /",
                401,
                &json!({"error": {"type": "security_exception"}}),
                Quote::Reason
            )
            .reason(),
            "AuthenticationFailed"
        );
        assert_eq!(
            answer_error("x", 429, &Value::Null, Quote::Reason).reason(),
            "Unreachable"
        );
        assert_eq!(
            answer_error("x", 503, &Value::Null, Quote::Reason).reason(),
            "Unreachable"
        );
    }

    #[test]
    fn urls_keep_patterns_and_task_ids_inside_their_segment() {
        let backend = ElasticsearchBackend::new(
            ElasticsearchConfig {
                url: "http://es:9200/prefix/".into(),
                auth: HttpAuth::None,
                delete_requests_per_second: None,
            },
            Limits::default(),
        );
        let url = backend
            .url(&["logs-*,-logs-keep", "_count"], &LENIENT)
            .unwrap();
        assert_eq!(
            url.as_str(),
            "http://es:9200/prefix/logs-*,-logs-keep/_count?ignore_unavailable=true&allow_no_indices=true"
        );
        let url = backend.url(&["_tasks", "../_all"], &[]).unwrap();
        assert_eq!(url.path(), "/prefix/_tasks/..%2F_all");
    }
}
