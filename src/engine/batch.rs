//! Batches of subjects (see `Batcher`).
