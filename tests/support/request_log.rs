//! A Kubernetes client that records every request it makes, so the load an operator puts on
//! the API server can be counted (tests and benchmarks).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::ControlPlane;

/// Every request a client made, as "VERB resource[/subresource]" (`get`, `list`, `watch`,
/// `create`, `patch`, `update`, `delete`), in order.
#[derive(Clone, Default)]
pub struct RequestLog(Arc<Mutex<Log>>);

/// Each kind once, and the requests as indices into them: a benchmark's hundreds of
/// thousands of requests take little of the memory it measures.
#[derive(Default)]
pub struct Log {
    kinds: Vec<String>,
    requests: Vec<u32>,
    /// Paths counted one by one ([`RequestLog::count_path`]), and how many requests each got.
    paths: Vec<(String, usize)>,
}

impl RequestLog {
    /// A client of the test API server that records its requests here.
    pub fn client(&self) -> kube::Client {
        self.client_of(ControlPlane::get())
    }

    /// A client of `plane` that records its requests here.
    pub fn client_of(&self, plane: &ControlPlane) -> kube::Client {
        let log = self.clone();
        let layer =
            tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
                log.record(request.method(), request.uri());
                request
            });
        kube::client::ClientBuilder::try_from(plane.config())
            .expect("client builder")
            .with_layer(&layer)
            .build()
    }

    fn record(&self, method: &http::Method, uri: &http::Uri) {
        let kind = request_kind(method, uri.path(), uri.query().unwrap_or(""));
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, n)) = log.paths.iter_mut().find(|(p, _)| p == uri.path()) {
            *n += 1;
        }
        let index = match log.kinds.iter().position(|k| *k == kind) {
            Some(i) => i,
            None => {
                log.kinds.push(kind);
                log.kinds.len() - 1
            }
        };
        log.requests.push(u32::try_from(index).unwrap_or(u32::MAX));
    }

    /// Counts the requests to `path` (e.g. one Secret's) from now on: see [`Self::path_count`].
    pub fn count_path(&self, path: &str) {
        let mut log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !log.paths.iter().any(|(p, _)| p == path) {
            log.paths.push((path.to_string(), 0));
        }
    }

    /// The requests to `path` since [`Self::count_path`] was called for it.
    pub fn path_count(&self, path: &str) -> usize {
        let log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        log.paths
            .iter()
            .find(|(p, _)| p == path)
            .map_or(0, |(_, n)| *n)
    }

    /// How many requests were made so far (a mark for [`Self::since`]).
    pub fn len(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .requests
            .len()
    }

    /// The requests made since `mark`, counted by kind.
    pub fn since(&self, mark: usize) -> BTreeMap<String, usize> {
        let log = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let mut counts = BTreeMap::new();
        for &index in log.requests.iter().skip(mark) {
            let kind = log.kinds.get(index as usize).cloned().unwrap_or_default();
            *counts.entry(kind).or_insert(0) += 1;
        }
        counts
    }
}

/// Counts by kind as lines of a report, one kind a line.
pub fn table(counts: &BTreeMap<String, usize>) -> String {
    counts
        .iter()
        .map(|(kind, n)| format!("    {n:>7}  {kind}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// "VERB resource[/subresource]" of one request: `/api/v1/namespaces/ns/secrets/s` read with
/// GET is `get secrets`; a GET of a collection is `list` (or `watch` with `watch=true`).
pub fn request_kind(method: &http::Method, path: &str, query: &str) -> String {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    // After the group/version (api/v1 or apis/group/version) and any namespaces/<ns>.
    let mut rest: &[&str] = match parts.first() {
        Some(&"api") => parts.get(2..).unwrap_or(&[]),
        _ => parts.get(3..).unwrap_or(&[]),
    };
    if rest.first() == Some(&"namespaces") && rest.len() > 2 {
        rest = &rest[2..];
    }
    let resource = rest.first().copied().unwrap_or("");
    let named = rest.len() > 1;
    let sub = rest.get(2).map(|s| format!("/{s}")).unwrap_or_default();
    let verb = match (method.as_str(), named) {
        ("GET", _) if query.split('&').any(|q| q == "watch=true") => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PATCH", _) => "patch",
        ("PUT", _) => "update",
        ("DELETE", _) => "delete",
        (other, _) => other,
    };
    format!("{verb} {resource}{sub}")
}
