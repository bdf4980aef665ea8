//! instinfer model runtime.
