//! The operator's own writes, so that their watch events do not trigger reconciles.
//!
//! Every status write and finalizer patch comes back through the watch as a new version of
//! the object. The reconcile that wrote it already decided what comes next (a requeue, or
//! nothing until a change), so a reconcile triggered by that echo only reads the object again
//! to find nothing to do: at ten thousand policies, ten thousand GETs and LegalHold lists.
//! The resource versions this process's writes returned are kept per object (the last
//! [`KEPT`]); a watch event carrying one of them is an echo and does not trigger the kind's own
//! controller. The cache is still updated from it. Any other change (a spec edit, another
//! writer) has a version of its own and triggers as before. An echo that arrives before the
//! write's answer is not recognised and triggers a reconcile, as it did before.
//!
//! The same record tells when a reconcile may work on the object as the watch brought it
//! instead of reading it afresh: when this process never wrote it (the cache was listed after
//! any earlier leader's last write), or when the cached version is the one its last write
//! returned. A write that failed, or whose answer was lost, marks the object unknown, and it is
//! read afresh until a write answers again.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use kube::Resource;

/// Versions kept per object: a reconcile writes at most a finalizer and a status.
const KEPT: usize = 4;

/// The resource versions this process's own writes produced, by object key
/// (`Kind/namespace/name`, as [`super::failure_key`]).
#[derive(Debug, Default)]
pub struct OwnWrites(Mutex<HashMap<String, VecDeque<String>>>);

impl OwnWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, VecDeque<String>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `written`, the object as a write of this process returned it.
    pub fn record<K: Resource<DynamicType = ()>>(&self, written: &K) {
        if let Some(version) = version_of(written) {
            self.push(super::failure_key(written), version.to_string());
        }
    }

    /// Records that a write of an object may have landed without this process learning its
    /// version (it failed, or its answer was lost): until the next write that answers, the
    /// object is read afresh ([`Self::is_current`] says no). `key`: the object's, as
    /// [`super::failure_key`].
    pub fn record_unknown(&self, key: String) {
        // No resource version is empty: this one matches nothing the watch brings.
        self.push(key, String::new());
    }

    fn push(&self, key: String, version: String) {
        let mut all = self.lock();
        let versions = all.entry(key).or_default();
        if versions.len() >= KEPT {
            versions.pop_front();
        }
        versions.push_back(version);
    }

    /// Whether `seen` is, version for version, what a write of this process returned.
    pub fn is_echo<K: Resource<DynamicType = ()>>(&self, seen: &K) -> bool {
        let Some(version) = version_of(seen) else {
            return false;
        };
        self.lock()
            .get(&super::failure_key(seen))
            .is_some_and(|versions| versions.iter().any(|v| v == version))
    }

    /// Whether `cached`, as the watch brought it, holds every write of this process: none
    /// was made (the cache was listed after any earlier process's last write), or it is the
    /// version the last one returned. Otherwise the watch may not have brought the last write
    /// yet (its echo is on the way), and only a fresh read holds it.
    pub fn is_current<K: Resource<DynamicType = ()>>(&self, cached: &K) -> bool {
        let Some(version) = version_of(cached) else {
            return false;
        };
        self.lock()
            .get(&super::failure_key(cached))
            .and_then(|versions| versions.back())
            .is_none_or(|last| last == version)
    }

    /// Keeps only the objects `exists` knows; returns how many were forgotten.
    pub fn retain(&self, exists: impl Fn(&str) -> bool) -> usize {
        let mut all = self.lock();
        let before = all.len();
        all.retain(|key, _| exists(key));
        before - all.len()
    }
}

/// An object's resource version; None when it has none (or an empty one).
fn version_of<K: Resource>(obj: &K) -> Option<&str> {
    obj.meta()
        .resource_version
        .as_deref()
        .filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RetentionPolicy;

    fn policy(name: &str, version: &str) -> RetentionPolicy {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "tombstone.dev/v1alpha1", "kind": "RetentionPolicy",
            "metadata": {"name": name, "namespace": "ns", "resourceVersion": version},
            "spec": {"purpose": "p", "legalBasis": "contract", "dataSubjects": ["s"],
                     "dataCategories": ["c"], "retention": "1d", "targets": []}
        }))
        .unwrap()
    }

    #[test]
    fn only_the_versions_this_process_wrote_are_echoes() {
        let writes = OwnWrites::default();
        assert!(!writes.is_echo(&policy("a", "10")), "nothing written yet");
        writes.record(&policy("a", "10"));
        writes.record(&policy("a", "12"));
        assert!(writes.is_echo(&policy("a", "10")), "the finalizer patch");
        assert!(writes.is_echo(&policy("a", "12")), "the status write");
        assert!(!writes.is_echo(&policy("a", "11")), "someone else's edit");
        assert!(!writes.is_echo(&policy("b", "12")), "another object");
        let mut unversioned = policy("a", "10");
        unversioned.metadata.resource_version = None;
        assert!(!writes.is_echo(&unversioned));
    }

    #[test]
    fn a_cached_object_is_current_until_a_write_it_does_not_hold() {
        let writes = OwnWrites::default();
        assert!(
            writes.is_current(&policy("a", "10")),
            "never written by this process: the cache was listed after any earlier write"
        );
        writes.record(&policy("a", "11"));
        assert!(
            !writes.is_current(&policy("a", "10")),
            "the echo of the write has not come yet"
        );
        assert!(writes.is_current(&policy("a", "11")), "the echo came");
        assert!(
            !writes.is_current(&policy("a", "12")),
            "another writer since: its version cannot be ordered against ours"
        );
        writes.record_unknown(crate::controller::failure_key(&policy("a", "11")));
        assert!(
            !writes.is_current(&policy("a", "11")),
            "a write that may have landed unseen"
        );
        assert!(!writes.is_echo(&policy("a", "")), "the mark is no version");
        writes.record(&policy("a", "13"));
        assert!(
            writes.is_current(&policy("a", "13")),
            "a write answered again"
        );
        let mut unversioned = policy("b", "1");
        unversioned.metadata.resource_version = None;
        assert!(!writes.is_current(&unversioned));
    }

    #[test]
    fn only_the_last_versions_are_kept_and_deleted_objects_are_forgotten() {
        let writes = OwnWrites::default();
        for v in 1..=KEPT + 1 {
            writes.record(&policy("a", &v.to_string()));
        }
        assert!(!writes.is_echo(&policy("a", "1")), "the oldest went");
        assert!(writes.is_echo(&policy("a", &(KEPT + 1).to_string())));
        writes.record(&policy("b", "7"));
        assert_eq!(writes.retain(|key| key.ends_with("/a")), 1);
        assert!(!writes.is_echo(&policy("b", "7")));
        assert!(writes.is_echo(&policy("a", &(KEPT + 1).to_string())));
    }
}
