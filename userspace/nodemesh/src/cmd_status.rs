//! `nodemesh status`: "is the eBPF path even working?" in one command.
use std::{fmt::Write as _, path::Path};

use anyhow::Context as _;
use nodemesh_agent::status::{MapDump, ProgramCounters, Status, group_counters};
use nodemesh_loader::maps::PinnedMaps;

pub async fn run(run_dir: &Path, bpffs_dir: &Path, maps: bool, json: bool) -> anyhow::Result<()> {
    let status = match crate::admin_client::request(run_dir, hyper::Method::GET, "/status").await {
        Ok(body) => serde_json::from_str::<Status>(&body).context("decoding /status")?,
        Err(e) => return offline(bpffs_dir, &e, maps, json),
    };
    let dump = if maps {
        let body = crate::admin_client::request(run_dir, hyper::Method::GET, "/debug/maps").await?;
        Some(serde_json::from_str::<MapDump>(&body).context("decoding /debug/maps")?)
    } else {
        None
    };
    if json {
        let value = serde_json::json!({ "status": status, "maps": dump });
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{}", render(&status));
        if let Some(dump) = &dump {
            print!("{}", render_maps(dump));
        }
    }
    Ok(())
}

/// No agent answers: read what is pinned, which tells whether programs are still attached
/// and counting.
fn offline(bpffs_dir: &Path, why: &anyhow::Error, maps: bool, json: bool) -> anyhow::Result<()> {
    let pin_dir = nodemesh_loader::pin_dir(bpffs_dir);
    let pinned = PinnedMaps::open(&pin_dir)
        .with_context(|| format!("{why:#}; and nothing is pinned under {}", pin_dir.display()))?;
    let counters = group_counters(&pinned.stats.read()?);
    let dump = maps.then(|| MapDump::read(&pinned));
    if json {
        let value = serde_json::json!({
            "agent": format!("{why:#}"),
            "counters": counters,
            "maps": pinned.sizes(),
            "dump": dump,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let mut out = String::new();
    let _ = writeln!(out, "agent: not reachable ({why:#})");
    let _ = writeln!(
        out,
        "pinned state under {} (programs stay attached without the agent):",
        pin_dir.display()
    );
    out.push_str(&render_counters(&counters));
    let s = pinned.sizes();
    let _ = writeln!(
        out,
        "maps: pods {}, pending {}, orig_dst {}, sockhash {}, accelerated {}",
        s.pods, s.pending, s.orig_dst, s.sockhash, s.accelerated
    );
    print!("{out}");
    if let Some(dump) = &dump {
        print!("{}", render_maps(dump));
    }
    Ok(())
}

fn render(s: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "nodemesh {}: agent {}",
        s.version,
        if s.ready { "ready" } else { "NOT ready" }
    );
    let _ = writeln!(out, "datapath: pinned under {}", s.datapath.pin_dir);
    for p in &s.datapath.programs {
        let _ = writeln!(out, "  {:<12} {:<9} {}", p.name, p.outcome, p.attach_point);
    }
    let missing: Vec<_> = s.datapath.features.iter().filter(|f| !f.ok).collect();
    if missing.is_empty() {
        let _ = writeln!(
            out,
            "kernel features: all {} present",
            s.datapath.features.len()
        );
    } else {
        for f in missing {
            let _ = writeln!(out, "kernel feature MISSING: {}: {}", f.feature, f.detail);
        }
    }
    let sm = &s.datapath.sockmap;
    let _ = write!(
        out,
        "sockmap fast path: {} (mode {})",
        if sm.enabled { "on" } else { "off" },
        sm.mode
    );
    if let Some(t) = &sm.selftest {
        let _ = write!(
            out,
            "\n  self-test ({} ms): data {}, blocking recv {}\n  {}",
            t.elapsed_ms,
            if t.passed { "intact" } else { "FAILED" },
            if t.blocking_recv_ok {
                "ok"
            } else {
                "can return EAGAIN when woken without data"
            },
            t.detail
        );
    }
    out.push('\n');
    out.push_str(&render_counters(&s.counters));
    if let Some(m) = &s.maps {
        let _ = writeln!(
            out,
            "maps: pods {}, pending {}, orig_dst {}, sockhash {}, accelerated {}",
            m.pods, m.pending, m.orig_dst, m.sockhash, m.accelerated
        );
    }
    let _ = writeln!(
        out,
        "proxy: {} active connections on {}",
        s.proxy.active_connections, s.proxy.listen
    );
    if let Some(x) = &s.xds {
        out.push_str(&render_xds(x));
    }
    match &s.kubernetes {
        Some(k) => {
            let _ = writeln!(
                out,
                "pod source: Kubernetes, node {} via {} ({} pods not found on the node yet)",
                k.node_name, k.api_server, k.pending_pods
            );
        }
        None => {
            let _ = writeln!(out, "pod source: the registry API");
        }
    }
    let enabled = s.pods.iter().filter(|p| p.enabled).count();
    let _ = writeln!(
        out,
        "pods: {} registered, {} in the mesh",
        s.pods.len(),
        enabled
    );
    if !s.pods.is_empty() {
        let _ = writeln!(
            out,
            "  {:<20} {:<24} {:<6} {:<20} IPS",
            "NAMESPACE", "NAME", "MESH", "NETNS COOKIE"
        );
        for p in &s.pods {
            let _ = writeln!(
                out,
                "  {:<20} {:<24} {:<6} {:<20} {}",
                p.namespace,
                p.name,
                if p.enabled { "yes" } else { "no" },
                p.netns_cookie,
                p.ips.join(",")
            );
        }
    }
    out
}

fn render_counters(counters: &[ProgramCounters]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "kernel counters      {:>10} {:>10} {:>10} {:>10}",
        "hit", "miss", "fallback", "failure"
    );
    for c in counters {
        let _ = writeln!(
            out,
            "  {:<18} {:>10} {:>10} {:>10} {:>10}",
            c.program, c.hit, c.miss, c.fallback, c.failure
        );
        let details: Vec<String> = c
            .detail
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !details.is_empty() {
            let _ = writeln!(out, "      {}", details.join(" "));
        }
    }
    out
}

fn render_maps(d: &MapDump) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "NM_PODS ({}):", d.pods.len());
    for p in &d.pods {
        let _ = writeln!(
            out,
            "  netns cookie {:<20} pod {:<6} flags {:#x}",
            p.netns_cookie, p.pod_id, p.flags
        );
    }
    let _ = writeln!(out, "NM_PENDING ({}):", d.pending.len());
    for p in &d.pending {
        let _ = writeln!(
            out,
            "  socket cookie {:<20} -> {} (netns {})",
            p.socket_cookie, p.original_dst, p.netns_cookie
        );
    }
    let _ = writeln!(out, "NM_ORIG_DST ({}):", d.orig_dst.len());
    for o in &d.orig_dst {
        let _ = writeln!(
            out,
            "  {} -> {}  was going to {} (netns {})",
            o.client, o.proxy, o.original_dst, o.netns_cookie
        );
    }
    let _ = writeln!(out, "NM_ACCEL ({}):", d.accelerated.len());
    for s in &d.accelerated {
        let _ = writeln!(out, "  {} <-> {}", s.local, s.remote);
    }
    out
}

/// The xDS client's state, from the agent's status JSON (`nodemesh_xds::client::Status`).
fn render_xds(x: &serde_json::Value) -> String {
    let str_of =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
    let num_of =
        |v: &serde_json::Value, k: &str| v.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "xds: {} ({}), {}; {} connects, {} snapshots published",
        str_of(x, "server"),
        str_of(x, "variant"),
        str_of(x, "state"),
        num_of(x, "connects"),
        num_of(x, "published"),
    );
    if let Some(e) = x.get("last_error").and_then(|v| v.as_str()) {
        let _ = writeln!(out, "  last error: {e}");
    }
    if let Some(w) = x
        .get("warming")
        .and_then(|v| v.as_array())
        .filter(|w| !w.is_empty())
    {
        let names: Vec<&str> = w.iter().filter_map(|v| v.as_str()).collect();
        let _ = writeln!(out, "  warming: {}", names.join(", "));
    }
    if let Some(types) = x.get("types").and_then(|v| v.as_object()) {
        for (ty, t) in types {
            let _ = writeln!(
                out,
                "  {ty}: version {:?}, {} resources, {} acks, {} nacks",
                str_of(t, "version"),
                num_of(t, "resources"),
                num_of(t, "acks"),
                num_of(t, "nacks"),
            );
            if let Some(n) = t.get("last_nack").filter(|n| !n.is_null()) {
                let _ = writeln!(
                    out,
                    "    last NACK (version {:?}): {}",
                    str_of(n, "version"),
                    str_of(n, "reason")
                );
            }
        }
    }
    if let Some(w) = x.get("warnings").and_then(|v| v.as_array()) {
        for w in w.iter().filter_map(|v| v.as_str()) {
            let _ = writeln!(out, "  warning: {w}");
        }
    }
    out
}
