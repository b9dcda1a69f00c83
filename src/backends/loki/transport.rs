//! Requests to Loki: URL, tenant header and credentials, the request budget, failed answers
//! mapped to the backend's error categories, and the tenant's deletion mode.

use super::LokiBackend;
use crate::backends::http;
use crate::backends::Error;

pub(super) const DELETION_DISABLED: &str = "deletion is not available for this tenant";
/// The tenant of a single-tenant Loki (`auth_enabled: false`).
const SINGLE_TENANT: &str = "fake";
const FILTER_ONLY: &str = "filter-only";

/// `limits_config.deletion_mode` in the YAML of `GET /config` (the default of every tenant).
fn default_deletion_mode(config_yaml: &str) -> Option<String> {
    let value: serde_yaml::Value = serde_yaml::from_str(config_yaml).ok()?;
    value
        .get("limits_config")?
        .get("deletion_mode")?
        .as_str()
        .map(str::to_string)
}

/// The tenant's `deletion_mode` override in the YAML of `GET /runtime_config`.
fn runtime_deletion_mode(runtime_yaml: &str, tenant: &str) -> Option<String> {
    let value: serde_yaml::Value = serde_yaml::from_str(runtime_yaml).ok()?;
    value
        .get("overrides")?
        .get(tenant)?
        .get("deletion_mode")?
        .as_str()
        .map(str::to_string)
}

impl LokiBackend {
    pub(super) async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, Error> {
        let base = url::Url::parse(&self.config.url)
            .map_err(|e| Error::InvalidSpec(format!("invalid Loki url: {e}")))?;
        let url = format!("{}{path}", base.as_str().trim_end_matches('/'));
        let url = url::Url::parse(&url)
            .map_err(|e| Error::InvalidSpec(format!("invalid Loki url: {e}")))?;
        let mut builder = self.http.request(method, url).await?;
        if let Some(tenant) = &self.config.tenant {
            builder = builder.header("X-Scope-OrgID", tenant);
        }
        Ok(builder)
    }

    /// Sends a request and returns the body of a success. `personal`: the request carries an
    /// identifier, so the store's error text (which may echo the query) is not copied.
    pub(super) async fn send(
        &self,
        what: &str,
        builder: reqwest::RequestBuilder,
        personal: bool,
    ) -> Result<String, Error> {
        let (status, body) = self.http.exchange(what, builder).await?;
        if status.is_success() {
            return Ok(body);
        }
        Err(error_for(what, status, &body, personal))
    }

    /// The body of a GET on an administrative path, or None when Loki does not serve it
    /// here (404, or refused by a gateway in front of it).
    async fn get_admin(&self, path: &str) -> Result<Option<String>, Error> {
        let builder = self.request(reqwest::Method::GET, path).await?;
        let what = format!("GET {path}");
        let (status, body) = self.http.exchange(&what, builder).await?;
        match status.as_u16() {
            200..=299 => Ok(Some(body)),
            403..=405 => Ok(None),
            _ => Err(error_for(&what, status, &body, false)),
        }
    }

    /// The tenant's `deletion_mode` as Loki reports it: its override in `GET /runtime_config`,
    /// else `limits_config.deletion_mode` in `GET /config`. None when Loki does not expose
    /// either (then it cannot be detected; the README says how to check by hand).
    pub async fn deletion_mode(&self) -> Result<Option<String>, Error> {
        let tenant = self.config.tenant.as_deref().unwrap_or(SINGLE_TENANT);
        if let Some(body) = self.get_admin("/runtime_config").await? {
            if let Some(mode) = runtime_deletion_mode(&body, tenant) {
                return Ok(Some(mode));
            }
        }
        Ok(self
            .get_admin("/config")
            .await?
            .and_then(|body| default_deletion_mode(&body)))
    }

    /// Refuses to delete where Loki would only hide lines (`filter-only`).
    pub(super) async fn check_deletion_mode(&self) -> Result<(), Error> {
        match self.deletion_mode().await?.as_deref() {
            Some(FILTER_ONLY) => Err(Error::DeletionModeFilterOnly(format!(
                "Loki's deletion_mode for tenant {} is {FILTER_ONLY}: deleted lines are only hidden from queries and stay in storage, so nothing is deleted and nothing could be verified; set limits_config.deletion_mode (or the tenant's runtime override) to filter-and-delete",
                self.config.tenant.as_deref().unwrap_or(SINGLE_TENANT)
            ))),
            _ => Ok(()),
        }
    }
}

/// Maps a failed answer. Known Loki messages are named (deletion disabled, missing tenant);
/// for `personal` requests no other body text is copied.
pub(super) fn error_for(
    what: &str,
    status: reqwest::StatusCode,
    body: &str,
    personal: bool,
) -> Error {
    if status.as_u16() == 403 && body.contains(DELETION_DISABLED) {
        return Error::Store(format!(
            "{what}: HTTP 403: Loki refuses deletion ({DELETION_DISABLED}): run the compactor with retention_enabled: true and set limits_config.deletion_mode to filter-and-delete for this tenant"
        ));
    }
    if status.as_u16() == 401 && body.contains("no org id") {
        return Error::AuthenticationFailed(format!(
            "{what}: HTTP 401: no org id: this Loki is multi-tenant, set spec.loki.tenant on the DataStore"
        ));
    }
    let body = if personal {
        "(Loki's message is not shown: it may echo an identifier)"
    } else {
        body
    };
    http::status_error(what, status, body)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::backends::loki::requests::poll_after;

    #[test]
    fn errors_name_deletion_disabled_and_never_copy_personal_bodies() {
        let s = |c| reqwest::StatusCode::from_u16(c).unwrap();
        let e = error_for("POST", s(403), DELETION_DISABLED, true);
        assert_eq!(e.reason(), "StoreError");
        assert!(e.to_string().contains("deletion_mode"));
        let e = error_for("POST", s(400), "parse error near \"bob@example.com\"", true);
        assert!(!e.to_string().contains("bob"), "{e}");
        assert_eq!(
            error_for("GET", s(429), "slow down", false).reason(),
            "Unreachable"
        );
        assert_eq!(
            error_for("GET", s(401), "no org id", false).reason(),
            "AuthenticationFailed"
        );
        assert_eq!(poll_after(0.0), Duration::from_secs(1));
        assert_eq!(poll_after(1e9), Duration::from_secs(300));
    }

    #[test]
    fn the_deletion_mode_is_read_from_the_tenant_override_or_the_default() {
        let config = "auth_enabled: true\nlimits_config:\n  retention_period: 0s\n  deletion_mode: filter-and-delete\n";
        assert_eq!(
            default_deletion_mode(config).as_deref(),
            Some("filter-and-delete")
        );
        assert_eq!(default_deletion_mode("server: {}\n"), None);
        assert_eq!(default_deletion_mode("not: [yaml"), None);
        let runtime = "overrides:\n  shop:\n    deletion_mode: filter-only\n  \"fake\":\n    deletion_mode: disabled\n";
        assert_eq!(
            runtime_deletion_mode(runtime, "shop").as_deref(),
            Some("filter-only")
        );
        assert_eq!(
            runtime_deletion_mode(runtime, "fake").as_deref(),
            Some("disabled")
        );
        assert_eq!(runtime_deletion_mode(runtime, "other"), None);
        assert_eq!(runtime_deletion_mode("overrides: {}\n", "shop"), None);
    }
}
