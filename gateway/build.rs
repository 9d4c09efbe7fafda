//! Finds the dashboard's chart library (uPlot, from its npm package, which
//! `scripts/setup.sh` unpacks into `.deps/npm/uplot`) for `include_bytes!`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=MMGATE_UPLOT_DIR");
    let dir = std::env::var_os("MMGATE_UPLOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.deps/npm/uplot"));
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
