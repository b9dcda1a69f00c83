//! Which driver serves which store kind: one line per kind in [`DRIVERS`]. Everything else
//! finds a kind's behaviour here instead of matching on [`StoreKind`].

use crate::api::datastore::DataStoreSpec;
use crate::api::retentionpolicy::Target;
use crate::api::StoreKind;

use super::driver::{Driver, Registered};
use super::{elasticsearch, loki, redis, s3};

/// Every store kind's driver.
pub static DRIVERS: &[&dyn Driver] = &[
    &Registered::<redis::driver::RedisDriver>::DRIVER,
    &Registered::<s3::driver::S3Driver>::DRIVER,
    &Registered::<loki::driver::LokiDriver>::DRIVER,
    &Registered::<elasticsearch::driver::ElasticsearchDriver>::DRIVER,
];

/// The driver of a store kind (every kind has one: a unit test checks it).
pub fn driver(kind: StoreKind) -> Option<&'static dyn Driver> {
    DRIVERS.iter().copied().find(|d| d.kind() == kind)
}

/// The driver of the one selector a target sets, or why there is none: no selector, or more
/// than one.
pub fn for_target(target: &Target) -> Result<&'static dyn Driver, String> {
    let mut selecting = DRIVERS.iter().copied().filter(|d| d.selects(target));
    match (selecting.next(), selecting.next()) {
        (Some(one), None) => Ok(one),
        // A target stored with several selectors reads as having none.
        _ => Err(format!(
            "target {} has no selector, or more than one: it needs exactly one of {}; give each store its own target",
            target.name,
            names("or")
        )),
    }
}

/// The driver of the one section a DataStore sets; None when it sets none or several.
pub fn for_store(spec: &DataStoreSpec) -> Option<&'static dyn Driver> {
    let mut configured = DRIVERS.iter().copied().filter(|d| d.configured(spec));
    match (configured.next(), configured.next()) {
        (Some(one), None) => Some(one),
        _ => None,
    }
}

/// The kinds' names as a list in prose: `redis, s3, loki or elasticsearch`.
pub fn names(conjunction: &str) -> String {
    let all: Vec<&str> = DRIVERS.iter().map(|d| d.kind().as_str()).collect();
    match all.split_last() {
        Some((last, rest)) if !rest.is_empty() => {
            format!("{} {conjunction} {last}", rest.join(", "))
        }
        _ => all.join(", "),
    }
}

/// What the deletion a cursor waits on is, for status messages, where a driver's cursor can
/// tell (never an identifier).
pub fn describe_wait(cursor: &str) -> Option<String> {
    DRIVERS.iter().find_map(|d| d.describe_wait(cursor))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_has_exactly_one_driver() {
        for kind in StoreKind::ALL {
            let n = DRIVERS.iter().filter(|d| d.kind() == kind).count();
            assert_eq!(n, 1, "{}", kind.as_str());
            assert_eq!(driver(kind).map(|d| d.kind()), Some(kind));
        }
        assert_eq!(DRIVERS.len(), StoreKind::ALL.len());
        assert_eq!(names("or"), "redis, s3, loki or elasticsearch");
    }

    #[test]
    fn a_target_has_exactly_one_selector() {
        let t = |v: serde_json::Value| -> Target { serde_json::from_value(v).expect("a target") };
        let one = t(serde_json::json!({"name": "a", "store": "s", "s3": {"prefix": "p/"}}));
        assert_eq!(for_target(&one).map(|d| d.kind()), Ok(StoreKind::S3));
        let none = t(serde_json::json!({"name": "a", "store": "s"}));
        let why = "target a has no selector, or more than one: it needs exactly one of redis, s3, loki or elasticsearch; give each store its own target";
        assert_eq!(for_target(&none).err().as_deref(), Some(why));
        // Stored before the schema refused it: read as no selector, and refused.
        let two = t(
            serde_json::json!({"name": "a", "store": "s", "s3": {"prefix": "p/"},
            "loki": {"selector": "{a=\"b\"}"}}),
        );
        assert_eq!(two.selector, None);
        assert_eq!(for_target(&two).err().as_deref(), Some(why));
        // A selector that is there but malformed is an error, as before.
        let bad = serde_json::from_value::<Target>(
            serde_json::json!({"name": "a", "store": "s", "s3": {"prefix": 7}}),
        );
        assert!(bad.is_err());
        // The same JSON comes back out.
        let json = serde_json::json!({"name": "a", "store": "s", "s3": {"prefix": "p/"}});
        assert_eq!(serde_json::to_value(t(json.clone())).ok(), Some(json));
    }

    #[test]
    fn a_target_whose_locator_was_stored_with_several_sections_is_invalid() {
        let t: Target = serde_json::from_value(serde_json::json!({"name": "a", "store": "s",
            "s3": {"prefix": "p/"},
            "subject": {"s3": {"keyPrefixes": ["u/{userId}/"]}, "loki": {"lineFilter": "uid={userId} "}}}))
        .expect("a stored target is read");
        let e = for_target(&t)
            .expect("a driver")
            .validate(&t)
            .expect_err("refused");
        assert_eq!(e.reason(), "InvalidSpec");
        assert!(e.to_string().contains("keep subject.s3"), "{e}");
    }

    #[test]
    fn a_datastore_has_exactly_one_section() {
        let spec = |v: serde_json::Value| -> DataStoreSpec {
            serde_json::from_value(v).expect("a DataStore spec")
        };
        let json = serde_json::json!({"loki": {"url": "http://loki:3100", "tenant": "t"},
            "limits": {"concurrency": 2}, "insecure": true});
        let one = spec(json.clone());
        assert_eq!(for_store(&one).map(|d| d.kind()), Some(StoreKind::Loki));
        assert_eq!(one.kind(), Some(StoreKind::Loki));
        assert_eq!(serde_json::to_value(&one).ok(), Some(json));
        let with_null =
            spec(serde_json::json!({"redis": null, "loki": {"url": "http://loki:3100"}}));
        assert_eq!(with_null.kind(), Some(StoreKind::Loki));
        // Stored before the schema refused them: read as no section, and refused.
        for v in [
            serde_json::json!({"redis": {"url": "redis://r:6379"}, "s3": {"bucket": "bkt"}}),
            serde_json::json!({"limits": {"concurrency": 2}}),
        ] {
            let s = spec(v.clone());
            assert!(s.store.is_none() && for_store(&s).is_none(), "{v}");
        }
    }

    #[test]
    fn every_driver_finds_its_own_sections_and_transport() {
        let spec = |v: serde_json::Value| -> DataStoreSpec {
            serde_json::from_value(v).expect("a DataStore spec")
        };
        for (kind, section, url) in [
            (
                "loki",
                serde_json::json!({"url": "http://loki:3100"}),
                Some("http://loki:3100"),
            ),
            (
                "elasticsearch",
                serde_json::json!({"url": "https://es:9200"}),
                Some("https://es:9200"),
            ),
            (
                "redis",
                serde_json::json!({"url": "redis://r:6379"}),
                Some("redis://r:6379"),
            ),
            ("s3", serde_json::json!({"bucket": "b"}), None),
        ] {
            let mut section = section;
            section["credentialsSecretRef"] = serde_json::json!({"name": "creds"});
            section["passwordSecretRef"] = serde_json::json!({"name": "creds", "key": "p"});
            let spec = spec(serde_json::json!({ kind: section }));
            let driver = for_store(&spec).expect("a driver");
            assert_eq!(driver.kind().as_str(), kind);
            let transport = driver.transport(&spec).expect("its section");
            assert_eq!(
                (transport.endpoint, transport.secret),
                (url, Some("creds")),
                "{kind}"
            );
            for other in DRIVERS.iter().filter(|d| d.kind() != driver.kind()) {
                assert!(other.transport(&spec).is_none(), "{kind}");
            }
        }
        let subject: crate::api::retentionpolicy::SubjectLocator =
            serde_json::from_value(serde_json::json!({"loki": {"lineFilter": "uid={userId} "}}))
                .expect("a locator");
        let locating: Vec<&str> = DRIVERS
            .iter()
            .filter(|d| d.locates(&subject))
            .map(|d| d.kind().as_str())
            .collect();
        assert_eq!(locating, ["loki"]);
    }

    #[test]
    fn only_stores_that_run_deletions_by_themselves_can_cancel() {
        let cancels: Vec<&str> = DRIVERS
            .iter()
            .filter(|d| d.capabilities().cancel)
            .map(|d| d.kind().as_str())
            .collect();
        assert_eq!(cancels, ["loki", "elasticsearch"]);
    }
}
