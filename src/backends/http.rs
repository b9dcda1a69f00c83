//! What the HTTP-based stores (Loki, Elasticsearch/OpenSearch) share: credentials, one client
//! per store, and the mapping of HTTP outcomes to the backend's error categories.

use std::time::Duration;

use super::{Error, Limits};

/// Credentials from a DataStore's Secret.
#[derive(Clone, PartialEq)]
pub enum HttpAuth {
    None,
    /// Keys `username` and `password`.
    Basic {
        username: String,
        password: String,
    },
    /// Key `token` (Loki behind a gateway): `Authorization: Bearer …`.
    Bearer(String),
    /// Key `apiKey` (Elasticsearch): `Authorization: ApiKey …`, the encoded id:key.
    ApiKey(String),
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HttpAuth::None => f.write_str("None"),
            HttpAuth::Basic { username, .. } => write!(f, "Basic({username}, <redacted>)"),
            HttpAuth::Bearer(_) => f.write_str("Bearer(<redacted>)"),
            HttpAuth::ApiKey(_) => f.write_str("ApiKey(<redacted>)"),
        }
    }
}

impl HttpAuth {
    /// Adds the credentials to a request.
    pub fn apply(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            HttpAuth::None => request,
            HttpAuth::Basic { username, password } => request.basic_auth(username, Some(password)),
            HttpAuth::Bearer(token) => request.bearer_auth(token),
            HttpAuth::ApiKey(key) => request.header("Authorization", format!("ApiKey {key}")),
        }
    }
}

/// A client with the timeouts every store call gets: a store that stops answering must not
/// hold a job slot forever. Redirects are never followed: a redirect to the same host on
/// `http://` would carry the credentials there in plain text, and a store's API never needs one.
pub fn client() -> Result<reqwest::Client, Error> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|e| Error::Store(format!("HTTP client: {e}")))
}

/// One HTTP store's connection: the client (made on first use, then shared by every job on
/// the store), its credentials and its request budget. Loki and Elasticsearch build their
/// URLs and read their answers; sending is done here, once.
pub struct HttpStore {
    client: tokio::sync::OnceCell<reqwest::Client>,
    auth: HttpAuth,
    limits: Limits,
}

impl HttpStore {
    pub fn new(auth: HttpAuth, limits: Limits) -> Self {
        Self {
            client: tokio::sync::OnceCell::new(),
            auth,
            limits,
        }
    }

    /// A request to `url` carrying the store's credentials.
    pub async fn request(
        &self,
        method: reqwest::Method,
        url: url::Url,
    ) -> Result<reqwest::RequestBuilder, Error> {
        let client = self.client.get_or_try_init(|| async { client() }).await?;
        Ok(self.auth.apply(client.request(method, url)))
    }

    /// Sends `request` within the store's request budget: the status and body of whatever
    /// answer came back. Only a request that got no answer is an error here.
    pub async fn exchange(
        &self,
        what: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(reqwest::StatusCode, String), Error> {
        self.limits.acquire(1).await;
        let response = request
            .send()
            .await
            .map_err(|e| transport_error(what, &e))?;
        let status = response.status();
        let body = response
            .text()
            .await
            .map_err(|e| transport_error(what, &e))?;
        Ok((status, body))
    }
}

/// A request that never got an answer.
pub fn transport_error(what: &str, e: &reqwest::Error) -> Error {
    // The URL is left out: a query string may carry an identifier.
    let text = e.without_url_ref();
    if e.is_builder() {
        Error::InvalidSpec(format!("{what}: {text}"))
    } else {
        Error::Unreachable(format!("{what}: {text}"))
    }
}

/// An answer that is not a success, by its status. `body` is the store's message, cut short;
/// callers must not pass bodies that echo identifiers back.
pub fn status_error(what: &str, status: reqwest::StatusCode, body: &str) -> Error {
    let body: String = body.trim().chars().take(300).collect();
    let detail = format!("{what}: HTTP {}: {body}", status.as_u16());
    match status.as_u16() {
        401 | 403 => Error::AuthenticationFailed(detail),
        404 => Error::Store(detail),
        // Too many requests, or the store is struggling: back off and try again.
        408 | 429 | 500..=599 => Error::Unreachable(detail),
        _ => Error::Store(detail),
    }
}

/// `without_url` for a borrowed error (reqwest only offers it by value).
trait WithoutUrlRef {
    fn without_url_ref(&self) -> String;
}

impl WithoutUrlRef for reqwest::Error {
    fn without_url_ref(&self) -> String {
        let text = self.to_string();
        match self.url() {
            Some(url) => text.replace(url.as_str(), "<url>"),
            None => text,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_categories() {
        let e =
            |s: u16| status_error("Op", reqwest::StatusCode::from_u16(s).unwrap(), "x").reason();
        assert_eq!(e(401), "AuthenticationFailed");
        assert_eq!(e(403), "AuthenticationFailed");
        assert_eq!(e(429), "Unreachable");
        assert_eq!(e(503), "Unreachable");
        assert_eq!(e(400), "StoreError");
    }

    /// A store answering with a redirect to plain HTTP on the same host gets no second request,
    /// so the credentials never leave over the redirect.
    #[tokio::test]
    async fn redirects_are_not_followed_with_the_credentials() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let store = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target_port = target.local_addr().unwrap().port();
        let store_url = format!("http://127.0.0.1:{}/", store.local_addr().unwrap().port());
        tokio::spawn(async move {
            let (mut socket, _) = store.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = socket.read(&mut request).await;
            let answer = format!(
                "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{target_port}/\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            let _ = socket.write_all(answer.as_bytes()).await;
        });
        let auth = HttpAuth::Basic {
            username: "elastic".into(),
            password: "pw-redirect-probe".into(),
        };
        let response = auth
            .apply(client().unwrap().get(&store_url))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 307);
        let followed = tokio::time::timeout(Duration::from_millis(300), target.accept()).await;
        assert!(followed.is_err(), "the client followed the redirect");
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let shown = format!(
            "{:?} {:?} {:?}",
            HttpAuth::Basic {
                username: "elastic".into(),
                password: "pw-secret".into()
            },
            HttpAuth::Bearer("tok-secret".into()),
            HttpAuth::ApiKey("key-secret".into())
        );
        assert!(!shown.contains("secret"), "{shown}");
    }
}
