//! instinfer-proto: gRPC service definitions for instinfer: the `instinfer.v1.Inference`
//! service (`instinfer/v1/inference.proto`) with its prost messages and tonic client and
//! server. It holds generated code and the descriptor for reflection only: no server logic
//! (that is the `instinfer` daemon crate) and no conversions to the runtime's types (those
//! happen at the gRPC edge, in the daemon's service).

/// The protobuf package of the service.
pub const PACKAGE: &str = "instinfer.v1";

/// The `.proto` source, for clients that generate their own stubs.
pub const PROTO_SOURCE: &str = include_str!("../instinfer/v1/inference.proto");

/// Path of the `.proto` file inside this crate.
pub const PROTO_PATH: &str = "instinfer/v1/inference.proto";

/// Encoded `FileDescriptorSet` of the service, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/instinfer_descriptor.bin"));

/// Generated code of package `instinfer.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/instinfer.v1.rs"));
}
