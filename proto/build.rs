//! Compiles `instinfer/v1/inference.proto` with protox (a protobuf compiler in Rust, so no
//! `protoc` is needed) and generates the prost messages and tonic client and server. The
//! encoded descriptor set is written next to them for server reflection.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "instinfer/v1/inference.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("instinfer_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
