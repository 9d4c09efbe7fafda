//! The Kubernetes manifests (`deploy/kubernetes/`) validate against the
//! Kubernetes schemas, with `kubernetes-validate` from the hash-pinned
//! `.deps/kube-venv` (set-up installs it; no cluster needed), and keep the
//! promises the README makes about them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::repo;

fn validate(files: &[PathBuf]) -> std::process::Output {
    let bin = repo().join(".deps/kube-venv/bin/kubernetes-validate");
    assert!(
        bin.exists(),
        "{} is missing: run `bash scripts/setup.sh test`",
        bin.display()
    );
    Command::new(bin)
        .arg("--strict")
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_kubernetes_manifests_validate_and_keep_the_admin_listener_private() {
    let dir = repo().join("deploy/kubernetes");
    // The kustomization lists every manifest, and every manifest exists.
    let kustomization = read(&dir.join("kustomization.yaml"));
    let listed: Vec<String> = kustomization
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .filter(|l| l.ends_with(".yaml"))
        .map(str::to_string)
        .collect();
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    present.sort();
    let mut sorted = listed.clone();
    sorted.sort();
    assert_eq!(sorted, present, "kustomization.yaml lists every manifest");
    for kind in ["deployment", "service", "pdb", "hpa"] {
        assert!(listed.contains(&format!("{kind}.yaml")), "{kind} missing");
    }

    let files: Vec<PathBuf> = listed.iter().map(|f| dir.join(f)).collect();
    let out = validate(&files);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("passed for resource").count(),
        files.len(),
        "{text}"
    );

    // The validator does fail a wrong manifest (so the pass above means it).
    let bad = std::env::temp_dir().join(format!("mmgate-bad-{}.yaml", std::process::id()));
    std::fs::write(
        &bad,
        read(&dir.join("deployment.yaml")).replace("replicas: 2", "replicas: two"),
    )
    .unwrap();
    let out = validate(std::slice::from_ref(&bad));
    let _ = std::fs::remove_file(&bad);
    assert!(!out.status.success(), "a string replica count passed");

    // The admin listener is on the pod's loopback, and not in the Service.
    let deployment = read(&dir.join("deployment.yaml"));
    let service: String = read(&dir.join("service.yaml"))
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect();
    assert!(deployment.contains("- --admin-listen\n            - 127.0.0.1:8081"));
    assert!(
        !service.contains("8081"),
        "the Service exposes the admin port"
    );
    for probe in ["path: /healthz", "path: /readyz"] {
        assert!(deployment.contains(probe), "no {probe} probe");
    }
    // The pod outlives the gateway's drain: the grace period plus 10 s for
    // the children.
    let grace: u64 = deployment
        .lines()
        .find_map(|l| l.trim().strip_prefix("terminationGracePeriodSeconds:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("terminationGracePeriodSeconds");
    let drain_s = config::ServerConfig::default().server.shutdown_grace_ms / 1000 + 10;
    assert!(grace > drain_s, "{grace} s <= the drain's {drain_s} s");
}
