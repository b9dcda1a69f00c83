//! Issue 10: Tombstone fails closed. One submodule per area.

mod erasure;
