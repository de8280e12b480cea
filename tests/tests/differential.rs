//! Envoy and `nodemesh proxy -c` on the same bootstrap, with the same requests: every case
//! of `tests/corpus/l7/` must produce the same statuses, routed upstreams, paths and the
//! headers the case names (see `nodemesh_tests::differential`).
use std::path::Path;

use nodemesh_tests::differential::{self, Proxy};

#[test]
fn envoy_and_nodemesh_agree_on_the_l7_corpus() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/l7");
    let mut cases = differential::corpus(&dir).expect("corpus");
    // `NODEMESH_DIFF_CASE=rbac`: only the cases whose file name contains it (writing a case).
    if let Ok(only) = std::env::var("NODEMESH_DIFF_CASE") {
        cases.retain(|(name, _)| name.contains(&only));
    }
    assert!(!cases.is_empty(), "no cases in {}", dir.display());
    differential::envoy_path().expect("Envoy is needed for the differential tests");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let work = tempfile::tempdir().expect("work dir");
    let mut failures = Vec::new();
    let mut compared = 0;
    for (name, case) in &cases {
        let dir = work.path().join(name);
        std::fs::create_dir_all(&dir).expect("case dir");
        let result = runtime.block_on(async {
            let envoy = differential::run(case, Proxy::Envoy, &dir).await?;
            let nodemesh = differential::run(case, Proxy::Nodemesh, &dir).await?;
            anyhow::Ok((envoy, nodemesh))
        });
        let (envoy, nodemesh) = match result {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{name}: {e:#}"));
                continue;
            }
        };
        let show = std::env::var_os("NODEMESH_DIFF_SHOW").is_some();
        for ((req, e), n) in case.requests.iter().zip(&envoy).zip(&nodemesh) {
            compared += 1;
            if show {
                // What Envoy did, for whoever writes a case: `NODEMESH_DIFF_SHOW=1`.
                println!("{name} / {}: {:?}", req.name, e.0);
            }
            if e != n {
                failures.push(format!(
                    "{name} / {}:\n{}",
                    req.name,
                    e.diff(n, "envoy", "nodemesh")
                ));
            }
            if let Some(status) = req.expect_status
                && (e.status() != status || n.status() != status)
            {
                failures.push(format!(
                    "{name} / {}: expected status {status}, envoy {} nodemesh {}",
                    req.name,
                    e.status(),
                    n.status()
                ));
            }
        }
    }
    println!("{} cases, {compared} requests compared", cases.len());
    assert!(
        failures.is_empty(),
        "{} difference(s) between Envoy and nodemesh ({case_dir}):\n{}",
        failures.len(),
        failures.join("\n"),
        case_dir = dir.display()
    );
}
