//! Finds the dashboard's chart library (uPlot, from its npm package, which
//! `scripts/setup.sh` unpacks into `.deps/npm/uplot`) for `include_bytes!`,
//! and generates the KServe v2 gRPC server from the protocol's descriptors
//! (`.deps/proto/kserve_v2.fds`, which set-up takes from the official
//! client's package), with no protoc.

use std::path::PathBuf;

fn main() {
    uplot();
    grpc();
}

fn grpc() {
    use prost::Message;
    println!("cargo:rerun-if-env-changed=MMGATE_PROTO_FDS");
    let path = std::env::var_os("MMGATE_PROTO_FDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../.deps/proto/kserve_v2.fds"));
    println!("cargo:rerun-if-changed={}", path.display());
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run `bash scripts/setup.sh` (it takes the KServe v2 gRPC descriptors from the tritonclient package)",
            path.display()
        )
    });
    let fds = tonic_prost_build::FileDescriptorSet::decode(&bytes[..])
        .unwrap_or_else(|e| panic!("{}: not a FileDescriptorSet: {e}", path.display()));
    tonic_prost_build::configure()
        .build_client(false)
        // Requests are checked on the wire before prost decodes them.
        .codec_path("crate::grpc::wire::BoundedCodec")
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("generating the gRPC server: {e}"));
}

fn uplot() {
    println!("cargo:rerun-if-env-changed=MMGATE_UPLOT_DIR");
    let dir = std::env::var_os("MMGATE_UPLOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("../.deps/npm/uplot"));
    for file in ["dist/uPlot.iife.min.js", "dist/uPlot.min.css", "LICENSE"] {
        let path = dir.join(file);
        if !path.is_file() {
            panic!(
                "{} is missing: run `bash scripts/setup.sh` (it unpacks the dashboard's chart library, uPlot, from its npm package), or point MMGATE_UPLOT_DIR at an unpacked uplot package",
                path.display()
            );
        }
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let dir = dir.canonicalize().expect("the uPlot folder");
    println!("cargo:rustc-env=MMGATE_UPLOT_DIR={}", dir.display());
}

/// The package's directory, read when the script runs: `env!` would bake in
/// the path of whichever checkout first compiled this script, and cargo reuses
/// a compiled build script from a shared target dir in another checkout.
fn manifest_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
}
