//! The KServe v2 gRPC client for `v2load`, generated from the descriptors
//! set-up takes from the official client's package (as the gateway's
//! server is).

use std::path::PathBuf;

fn main() {
    use prost::Message;
    let path = std::env::var_os("MMGATE_PROTO_FDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../.deps/proto/kserve_v2.fds"));
    println!("cargo:rerun-if-env-changed=MMGATE_PROTO_FDS");
    println!("cargo:rerun-if-changed={}", path.display());
    let bytes = std::fs::read(&path)
        .unwrap_or_else(|e| panic!("{}: {e}: run `bash scripts/setup.sh`", path.display()));
    let fds = tonic_prost_build::FileDescriptorSet::decode(&bytes[..])
        .unwrap_or_else(|e| panic!("{}: not a FileDescriptorSet: {e}", path.display()));
    tonic_prost_build::configure()
        .build_server(false)
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the gRPC client: {e}"));
}

/// The package's directory, read when the script runs: `env!` would bake in
/// the path of whichever checkout first compiled this script, and cargo reuses
/// a compiled build script from a shared target dir in another checkout.
fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
}
