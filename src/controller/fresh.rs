//! Fresh reads shared among the reconciles that ask at the same moment (single flight).
//!
//! Some reads must be fresh: the LegalHolds of a namespace are listed before every
//! destructive step, so that a hold placed a moment ago wins. Thousands of reconciles asking
//! at once would each send their own LIST; instead, per key, one read is in flight at a time,
//! and every caller that asked while it was in flight shares the *next* one. A caller reuses
//! a read only if that read was sent after the caller asked: it is as fresh as the caller's
//! own would have been, never older.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Reads of type `T` by key (a namespace), each shared by the callers it is fresh enough for.
pub struct FreshReads<T> {
    keys: Mutex<HashMap<String, Arc<Key<T>>>>,
}

struct Key<T> {
    /// Tickets handed out to callers, in the order they asked.
    asked: AtomicU64,
    /// Held while a read is in flight; holds the last read and the last ticket it serves
    /// (every caller that asked before it was sent).
    last: tokio::sync::Mutex<Option<(u64, T)>>,
}

impl<T> Default for FreshReads<T> {
    fn default() -> Self {
        Self {
            keys: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone> FreshReads<T> {
    /// The result of a read of `key` sent after this call began: the read in flight when
    /// this caller's turn comes if it was sent after the caller asked, else `read()` sent now.
    pub async fn get<F, Fut>(&self, key: &str, read: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let state = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.entry(key.to_string())
                .or_insert_with(|| {
                    Arc::new(Key {
                        asked: AtomicU64::new(0),
                        last: tokio::sync::Mutex::new(None),
                    })
                })
                .clone()
        };
        let ticket = state.asked.fetch_add(1, Ordering::SeqCst).wrapping_add(1);
        // Fair (first come, first served): callers queue behind the read in flight.
        let mut last = state.last.lock().await;
        if let Some((serves, value)) = last.as_ref() {
            if *serves >= ticket {
                return value.clone();
            }
        }
        // Every caller that has a ticket by now asked before this read is sent.
        let serves = state.asked.load(Ordering::SeqCst);
        let value = read().await;
        *last = Some((serves, value.clone()));
        value
    }

    /// Drops the keys no caller is using now (e.g. namespaces gone); returns how many.
    pub fn forget_idle(&self) -> usize {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let before = keys.len();
        keys.retain(|_, k| Arc::strong_count(k) > 1);
        before - keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tokio::sync::oneshot;

    /// A read sent before a caller asked is never handed to it; callers that asked while a
    /// read was in flight share the next one.
    #[tokio::test]
    async fn a_read_sent_before_the_ask_is_never_reused() {
        let reads: Arc<FreshReads<usize>> = Arc::default();
        let sent = Arc::new(AtomicUsize::new(0));
        // The first read is sent and held in flight until released.
        let (release, held) = oneshot::channel::<()>();
        let (first_sent_tx, first_sent) = oneshot::channel::<()>();
        let first = {
            let (reads, sent) = (reads.clone(), sent.clone());
            tokio::spawn(async move {
                reads
                    .get("ns", || async move {
                        let n = sent.fetch_add(1, Ordering::SeqCst) + 1;
                        let _ = first_sent_tx.send(());
                        let _ = held.await;
                        n
                    })
                    .await
            })
        };
        first_sent.await.expect("the first read is sent");
        // Two callers ask while it is in flight: they must not get its result.
        let later: Vec<_> = (0..2)
            .map(|_| {
                let (reads, sent) = (reads.clone(), sent.clone());
                tokio::spawn(async move {
                    reads
                        .get(
                            "ns",
                            || async move { sent.fetch_add(1, Ordering::SeqCst) + 1 },
                        )
                        .await
                })
            })
            .collect();
        // Let them queue behind the read in flight, then release it.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        let _ = release.send(());
        assert_eq!(
            first.await.unwrap(),
            1,
            "the first caller gets its own read"
        );
        let mut seen = Vec::new();
        for l in later {
            seen.push(l.await.unwrap());
        }
        assert_eq!(
            seen,
            vec![2, 2],
            "both later callers share one read sent after they asked"
        );
        assert_eq!(sent.load(Ordering::SeqCst), 2, "two reads in all");
        // A caller asking once everything is done sends a read of its own.
        let n = reads
            .get("ns", || async { sent.fetch_add(1, Ordering::SeqCst) + 1 })
            .await;
        assert_eq!(n, 3, "a finished read is not reused by a later ask");
        // Keys are independent.
        let other = reads.get("other", || async { 100 }).await;
        assert_eq!(other, 100);
        assert_eq!(reads.forget_idle(), 2, "idle keys are forgotten");
    }
}
