//! The emulated computational storage drive (CSD): KV pages on flash, page index, retrieval
//! and near-data attention. Built out by the storage and attention-engine issues.
