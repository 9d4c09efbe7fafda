//! The gateway's build script finds `.deps/` from the checkout cargo runs it
//! for, not from the one that first compiled it: CI may share a target dir
//! between checkouts, and cargo then reuses the compiled script.

use std::path::PathBuf;
use std::process::Command;

/// The newest compiled `build-script-build` of this package, next to the
/// test binary (`target/<profile>/deps/…` → `target/<profile>/build/gateway-*/`).
fn build_script() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap();
    std::fs::read_dir(profile.join("build"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("gateway-"))
        .map(|e| e.path().join("build-script-build"))
        .filter(|p| p.is_file())
        .max_by_key(|p| p.metadata().unwrap().modified().unwrap())
        .expect("a compiled gateway build script")
}

#[test]
fn the_build_script_looks_for_deps_in_the_checkout_it_runs_for() {
    let other = std::env::temp_dir().join(format!("mmgate-build-script-{}", std::process::id()));
    let manifest = other.join("gateway");
    let out = other.join("out");
    std::fs::create_dir_all(&manifest).unwrap();
    std::fs::create_dir_all(&out).unwrap();
    let run = Command::new(build_script())
        .env("CARGO_MANIFEST_DIR", &manifest)
        .env("OUT_DIR", &out)
        .env_remove("MMGATE_UPLOT_DIR")
        .env_remove("MMGATE_PROTO_FDS")
        .output()
        .unwrap();
    // That checkout has no `.deps/`, so the script must stop, naming a path
    // inside it.
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    let wanted = other.join("gateway/../.deps/npm/uplot");
    let _ = std::fs::remove_dir_all(&other);
    assert!(
        stderr.contains(&wanted.display().to_string()),
        "the script did not look in {}:\n{stderr}",
        wanted.display()
    );
}
