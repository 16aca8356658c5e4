//! Generates the gRPC server of containerd's snapshots API from the vendored protobufs
//! (`proto/README.md` says where they come from). Needs `protoc` (Debian: protobuf-compiler).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "proto/github.com/containerd/containerd/api";
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(false)
        .compile_protos(
            &[format!("{root}/services/snapshots/v1/snapshots.proto")],
            &["proto".to_string()],
        )?;
    Ok(())
}
