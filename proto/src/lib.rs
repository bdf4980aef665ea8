//! Protobuf service definitions for instinfer. The `instinfer.v1.Inference` service and its
//! generated tonic/prost code arrive with the gRPC daemon issue; until then this crate only
//! names the package.

/// The protobuf package the service will live in.
pub const PACKAGE: &str = "instinfer.v1";
