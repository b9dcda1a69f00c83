//! The CRD types of `tombstone.dev/v1alpha1`, one file per kind.

pub mod common;
pub mod datastore;
pub mod erasurerequest;
pub mod legalhold;
pub mod receipts;
pub mod retentionpolicy;

pub use common::{Condition, ConditionStatus, Duration, Timestamp};
pub use datastore::{DataStore, DataStoreSpec, DataStoreStatus, StoreKind};
pub use erasurerequest::{ErasureRequest, ErasureRequestSpec, ErasureRequestStatus};
pub use legalhold::{LegalHold, LegalHoldSpec, LegalHoldStatus};
pub use retentionpolicy::{RetentionPolicy, RetentionPolicySpec, RetentionPolicyStatus};
