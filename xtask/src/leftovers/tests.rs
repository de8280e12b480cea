use super::*;

/// A pid that existed and is gone: a child that has been reaped.
fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().expect("spawn true");
    let pid = child.id();
    child.wait().expect("wait");
    pid
}

#[test]
fn creator_pid_is_the_second_to_last_field() {
    assert_eq!(creator_pid("nodemesh-sim-client-4242-0"), Some(4242));
    assert_eq!(creator_pid("nodemesh-sim-two-words-77-12"), Some(77));
    assert_eq!(creator_pid("nodemesh-sim-client"), None);
    assert_eq!(creator_pid("nodemesh-sim-client-x-1"), None);
    assert_eq!(creator_pid("nodemesh-sim-a-0-1"), None);
    assert_eq!(creator_pid("other-client-4242-0"), None);
    assert_eq!(creator_pid("nmimg-agent-4242-3"), Some(4242));
}

#[test]
fn owners_follow_the_creator_process() {
    let me = std::process::id();
    assert_eq!(owner_of(&format!("{PREFIX}t-{me}-0")), Owner::Alive(me));
    let dead = dead_pid();
    assert_eq!(owner_of(&format!("{PREFIX}t-{dead}-0")), Owner::Dead(dead));
    assert_eq!(owner_of(&format!("{PREFIX}manual")), Owner::Unknown);
}

#[test]
fn netns_names_are_filtered_by_prefix() {
    let text = "nodemesh-sim-pod-12-0 (id: 3)\nsomeone-else\nnodemesh-sim-pod-12-1\n";
    assert_eq!(
        parse_netns_list(text),
        ["nodemesh-sim-pod-12-0", "nodemesh-sim-pod-12-1"]
    );
}

#[test]
fn attachments_under_sim_cgroups_are_found() {
    let text = "\
CgroupPath
ID       AttachType      AttachFlags     Name
/sys/fs/cgroup/unified/system.slice
    7        cgroup_device   multi           sd_devices
/sys/fs/cgroup/unified/nodemesh-sim-node-99-0
    45       cgroup_inet4_connect multi           nm_connect4
    46       sock_ops        multi           nm_sockops
/sys/fs/cgroup/unified/nodemesh-sim-node-99-0/pod-a
    47       sock_ops        multi           nm_sockops
/sys/fs/cgroup/unified/nodemesh-sim-idle-98-0
";
    assert_eq!(
        parse_cgroup_tree(text),
        [
            (
                "/sys/fs/cgroup/unified/nodemesh-sim-node-99-0".to_owned(),
                "nodemesh-sim-node-99-0".to_owned()
            ),
            (
                "/sys/fs/cgroup/unified/nodemesh-sim-node-99-0/pod-a".to_owned(),
                "nodemesh-sim-node-99-0".to_owned()
            ),
        ]
    );
}

#[test]
fn sweep_removes_only_what_dead_runs_left() {
    let cgroups = tempfile::tempdir().expect("tempdir");
    let bpffs = tempfile::tempdir().expect("tempdir");
    let places = Places {
        cgroup_root: cgroups.path().to_owned(),
        bpffs_root: bpffs.path().to_owned(),
        system_tools: false,
    };
    let (me, dead) = (std::process::id(), dead_pid());
    let stale = bpffs.path().join(format!("{PREFIX}t-{dead}-0"));
    let live = bpffs.path().join(format!("{PREFIX}t-{me}-0"));
    let unknown = bpffs.path().join(format!("{PREFIX}by-hand"));
    let unrelated = bpffs.path().join("someone-else");
    for dir in [&stale, &live, &unknown, &unrelated] {
        std::fs::create_dir(dir).expect("mkdir");
        std::fs::write(dir.join("map"), b"").expect("pin stand-in");
    }
    std::fs::create_dir(cgroups.path().join(format!("{PREFIX}t-{me}-1"))).expect("mkdir");

    let found = list(&places).expect("list");
    assert_eq!(found.len(), 4, "{found:?}");
    assert_eq!(found[0].kind, Kind::Cgroup);
    assert_eq!(found[0].owner, Owner::Alive(me));

    let removed = sweep(&found).expect("sweep");
    assert_eq!(removed.len(), 1, "{removed:?}");
    assert!(!stale.exists());
    assert!(live.exists() && unknown.exists() && unrelated.exists());
}
