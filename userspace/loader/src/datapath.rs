//! Load, attach, pin, adopt and remove the kernel programs.
//!
//! Layout under the configured bpffs directory (`<bpffs>/<MAP_ABI>/`):
//! ```text
//! NM_CONFIG NM_PODS ...      the maps, pinned by name (aya's `PinningType::ByName`)
//! links/nm_connect4 ...      the cgroup links (bpf_link), pinned so they outlive the agent
//! progs/nm_connect4 ...      the programs, pinned for `bpftool` and for cleanup
//! ```
//! A new agent loads the embedded object against the existing map pins (so maps, and the
//! sockets in the SockHash, are kept) and swaps each pinned link to its freshly loaded
//! program with `BPF_LINK_UPDATE`: there is no moment without a program, so connects made
//! during a restart are captured and accelerated connections keep flowing.
use std::{
    fs,
    os::{fd::AsFd, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    programs::{CgroupAttachMode, Program, links::FdLink},
};
use nodemesh_common::{MAP_ABI, map_names, program_names};
use tracing::{info, warn};

use crate::{
    LoaderError,
    maps::{ConfigMap, PodMap},
    object, probe, sys,
};

/// Severity threshold of the kernel programs' aya-log messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelLogLevel {
    Off,
    Error,
    #[default]
    Warn,
    Info,
    Debug,
}

impl KernelLogLevel {
    fn as_aya(self) -> u8 {
        // aya_log_common::Level: Error = 1 .. Trace = 5; 0 disables everything.
        match self {
            Self::Off => 0,
            Self::Error => 1,
            Self::Warn => 2,
            Self::Info => 3,
            Self::Debug => 4,
        }
    }
}

/// What the loader needs to know.
#[derive(Debug, Clone)]
pub struct DatapathConfig {
    /// The cgroup v2 directory holding the pods (and, on Kubernetes, the agent itself).
    pub cgroup: PathBuf,
    /// The agent's bpffs directory; the pins live in its `MAP_ABI` subdirectory.
    pub bpffs_dir: PathBuf,
    pub max_pods: u32,
    /// Bounds the SockHash and the original-destination maps.
    pub max_connections: u32,
    pub kernel_log_level: KernelLogLevel,
}

/// The versioned pin directory for `bpffs_dir`.
pub fn pin_dir(bpffs_dir: &Path) -> PathBuf {
    bpffs_dir.join(MAP_ABI)
}

/// How a program ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// No previous attachment: attached and pinned.
    Attached,
    /// A pinned attachment of a previous agent was kept and now runs this agent's program.
    Adopted,
    /// A pinned attachment existed but belonged elsewhere (another cgroup); replaced.
    Replaced,
}

/// One attached program, for status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AttachedProgram {
    pub name: &'static str,
    pub attach_point: String,
    pub outcome: Outcome,
}

/// The loaded and attached programs. Dropping it leaves everything attached (that is the
/// point); [`cleanup`] removes it.
pub struct Datapath {
    pin_dir: PathBuf,
    // Keeps the program fds and the log ring buffer alive for the agent's lifetime.
    _ebpf: Ebpf,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    programs: Vec<AttachedProgram>,
    checks: Vec<probe::Check>,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("pin_dir", &self.pin_dir)
            .field("programs", &self.programs)
            .finish_non_exhaustive()
    }
}

const CGROUP_PROGRAMS: [(&str, u32); 3] = [
    (program_names::CONNECT4, sys::BPF_CGROUP_INET4_CONNECT),
    (program_names::CONNECT6, sys::BPF_CGROUP_INET6_CONNECT),
    (program_names::SOCKOPS, sys::BPF_CGROUP_SOCK_OPS),
];

impl Datapath {
    /// Probes the kernel, loads the programs, and attaches (or adopts) them.
    pub fn load(cfg: &DatapathConfig) -> Result<Self, LoaderError> {
        let bytes = object::bytes();
        if bytes.is_empty() {
            return Err(LoaderError::NoObject);
        }
        let checks = probe::require(&cfg.cgroup, &cfg.bpffs_dir)?;
        let dir = pin_dir(&cfg.bpffs_dir);
        for sub in ["links", "progs"] {
            let path = dir.join(sub);
            fs::create_dir_all(&path)
                .map_err(|e| LoaderError::io("create pin directory", &path, e))?;
        }
        let cgroup = fs::File::open(&cfg.cgroup)
            .map_err(|e| LoaderError::io("open cgroup", &cfg.cgroup, e))?;
        let cgroup_id = cgroup
            .metadata()
            .map_err(|e| LoaderError::io("stat cgroup", &cfg.cgroup, e))?
            .ino();

        let level = cfg.kernel_log_level.as_aya();
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&dir)
            .map_max_entries(map_names::PODS, cfg.max_pods)
            .map_max_entries(map_names::PENDING, cfg.max_connections)
            .map_max_entries(map_names::ORIG_DST, cfg.max_connections)
            .map_max_entries(map_names::SOCKS, cfg.max_connections)
            .map_max_entries(map_names::ACCEL, cfg.max_connections)
            .override_global(aya_log::LEVEL, &level, false)
            .load(bytes)
            .map_err(|source| LoaderError::Load {
                pin_dir: dir.clone(),
                source: Box::new(source),
            })?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                warn!(error = %e, "kernel program logs unavailable");
                None
            }
        };

        let mut programs = Vec::new();
        for (name, attach_type) in CGROUP_PROGRAMS {
            let outcome =
                attach_cgroup_program(&mut ebpf, name, attach_type, &cgroup, cgroup_id, &dir)?;
            programs.push(AttachedProgram {
                name,
                attach_point: format!("cgroup {} (id {cgroup_id})", cfg.cgroup.display()),
                outcome,
            });
        }
        attach_sk_msg(&mut ebpf, &dir)?;
        programs.push(AttachedProgram {
            name: program_names::SK_MSG,
            attach_point: format!("sockhash {}", map_names::SOCKS),
            outcome: Outcome::Attached,
        });
        info!(pin_dir = %dir.display(), cgroup = %cfg.cgroup.display(), "kernel programs attached");
        Ok(Self {
            pin_dir: dir,
            _ebpf: ebpf,
            logger,
            programs,
            checks,
        })
    }

    /// The versioned pin directory (where components open their maps).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn programs(&self) -> &[AttachedProgram] {
        &self.programs
    }

    pub fn checks(&self) -> &[probe::Check] {
        &self.checks
    }

    /// Takes the kernel log reader, to be polled by the agent (see [`KernelLogs`]).
    pub fn take_logger(&mut self) -> Option<KernelLogs> {
        self.logger.take().map(KernelLogs)
    }
}

/// The ring buffer of the programs' aya-log messages. Readable when its fd is; call
/// [`KernelLogs::flush`] to forward the records to the `log` facade.
pub struct KernelLogs(aya_log::EbpfLogger<&'static dyn log::Log>);

impl std::fmt::Debug for KernelLogs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelLogs")
    }
}

impl KernelLogs {
    pub fn flush(&mut self) {
        self.0.flush();
    }
}

impl AsFd for KernelLogs {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl std::os::fd::AsRawFd for KernelLogs {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

fn program_error(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> LoaderError {
    move |source| LoaderError::Program {
        program,
        source: Box::new(source),
    }
}

fn missing_program(name: &str) -> LoaderError {
    LoaderError::Other(format!(
        "program {name} is missing from the embedded object"
    ))
}

/// Loads `name`, then swaps it into the pinned link or attaches and pins a new link.
fn attach_cgroup_program(
    ebpf: &mut Ebpf,
    name: &'static str,
    attach_type: u32,
    cgroup: &fs::File,
    cgroup_id: u64,
    dir: &Path,
) -> Result<Outcome, LoaderError> {
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| missing_program(name))?;
    match program {
        Program::CgroupSockAddr(p) => p.load(),
        Program::SockOps(p) => p.load(),
        _ => {
            return Err(LoaderError::Other(format!(
                "program {name} has an unexpected type"
            )));
        }
    }
    .map_err(program_error(name))?;

    let link_path = dir.join("links").join(name);
    let mut outcome = Outcome::Attached;
    if link_path.exists() {
        match adopt(program, &link_path, cgroup_id, attach_type) {
            Ok(()) => {
                info!(program = name, "adopted the pinned attachment");
                pin_program(program, dir, name)?;
                return Ok(Outcome::Adopted);
            }
            Err(reason) => {
                warn!(program = name, %reason, "replacing a pinned attachment");
                fs::remove_file(&link_path)
                    .map_err(|e| LoaderError::io("remove stale link pin", &link_path, e))?;
                outcome = Outcome::Replaced;
            }
        }
    }

    // Cgroup bpf_links always coexist with other programs on the cgroup (the kernel rejects
    // attach flags on link creation), so `Single` here means "no flags", not exclusivity.
    let link: FdLink = match program {
        Program::CgroupSockAddr(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            p.take_link(id).map_err(program_error(name))?.try_into()
        }
        Program::SockOps(p) => {
            let id = p
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(program_error(name))?;
            p.take_link(id).map_err(program_error(name))?.try_into()
        }
        _ => unreachable!("checked above"),
    }
    .map_err(|e| {
        LoaderError::Other(format!(
            "program {name}: the kernel did not give a bpf_link ({e}); Linux >= 5.7 is required"
        ))
    })?;
    link.pin(&link_path)
        .map_err(|e| LoaderError::Other(format!("pin link {}: {e}", link_path.display())))?;
    pin_program(program, dir, name)?;
    Ok(outcome)
}

/// Points the pinned link at `program` if it is attached where this agent wants it.
fn adopt(
    program: &Program,
    link_path: &Path,
    cgroup_id: u64,
    attach_type: u32,
) -> Result<(), String> {
    let link = sys::obj_get(link_path).map_err(|e| format!("open pin: {e}"))?;
    let info = sys::link_info(link.as_fd()).map_err(|e| format!("link info: {e}"))?;
    if info.link_type != sys::BPF_LINK_TYPE_CGROUP || info.attach_type != attach_type {
        return Err(format!(
            "link type {} / attach type {}",
            info.link_type, info.attach_type
        ));
    }
    if info.cgroup_id != cgroup_id {
        return Err(format!(
            "attached to cgroup id {}, configured {cgroup_id}",
            info.cgroup_id
        ));
    }
    let prog_fd = program.fd().map_err(|e| e.to_string())?;
    sys::link_update(link.as_fd(), prog_fd.as_fd()).map_err(|e| format!("BPF_LINK_UPDATE: {e}"))
}

fn pin_program(program: &mut Program, dir: &Path, name: &str) -> Result<(), LoaderError> {
    let path = dir.join("progs").join(name);
    if path.exists() {
        fs::remove_file(&path).map_err(|e| LoaderError::io("remove old program pin", &path, e))?;
    }
    program
        .pin(&path)
        .map_err(|e| LoaderError::Other(format!("pin program {}: {e}", path.display())))
}

fn attach_sk_msg(ebpf: &mut Ebpf, dir: &Path) -> Result<(), LoaderError> {
    let name = program_names::SK_MSG;
    let socks_path = dir.join(map_names::SOCKS);
    let socks = aya::maps::MapData::from_pin(&socks_path)
        .map_err(|e| LoaderError::map(map_names::SOCKS, e))?;
    let program = ebpf
        .program_mut(name)
        .ok_or_else(|| missing_program(name))?;
    let Program::SkMsg(p) = program else {
        return Err(LoaderError::Other(format!(
            "program {name} has an unexpected type"
        )));
    };
    p.load().map_err(program_error(name))?;
    // A raw attach: aya's link guard would detach on drop, but the attachment must outlive
    // the agent. Attaching replaces the previous agent's program for new sockets.
    let prog_fd = p.fd().map_err(program_error(name))?;
    sys::prog_attach(socks.fd().as_fd(), prog_fd.as_fd(), sys::BPF_SK_MSG_VERDICT)
        .map_err(|e| LoaderError::Other(format!("attach {name} to {}: {e}", map_names::SOCKS)))?;
    pin_program(program, dir, name)
}

/// What [`cleanup`] removed.
#[derive(Debug, Default, serde::Serialize)]
pub struct CleanupReport {
    pub removed: Vec<String>,
}

/// Detaches and removes everything the agent pinned under `bpffs_dir`. Idempotent.
///
/// Before detaching, the sockmap switch is turned off and the pod map emptied, so that no new
/// connection is captured or accelerated while the programs go away.
pub fn cleanup(bpffs_dir: &Path) -> Result<CleanupReport, LoaderError> {
    let mut report = CleanupReport::default();
    let dir = pin_dir(bpffs_dir);
    if !dir.exists() {
        remove_empty_dir(bpffs_dir, &mut report);
        return Ok(report);
    }
    if let Ok(mut config) = ConfigMap::open(&dir)
        && let Ok(mut cfg) = config.get()
    {
        cfg.flags = 0;
        let _ = config.set(cfg);
    }
    if let Ok(mut pods) = PodMap::open(&dir) {
        for (cookie, _) in pods.entries() {
            let _ = pods.remove(cookie);
        }
    }
    // Cgroup links detach when their last reference (the pin) goes.
    let links = dir.join("links");
    for entry in read_dir(&links)? {
        remove_file(&entry, &mut report)?;
    }
    // The sk_msg attachment lives in the SockHash; detach it explicitly.
    let sk_msg = dir.join("progs").join(program_names::SK_MSG);
    if sk_msg.exists()
        && let Ok(socks) = aya::maps::MapData::from_pin(dir.join(map_names::SOCKS))
        && let Ok(prog) = aya::programs::SkMsg::from_pin(&sk_msg)
        && let Ok(prog_fd) = prog.fd()
        && let Err(e) =
            sys::prog_detach(socks.fd().as_fd(), prog_fd.as_fd(), sys::BPF_SK_MSG_VERDICT)
    {
        warn!(error = %e, "detaching sk_msg from the SockHash (it goes with the map anyway)");
    }
    for entry in read_dir(&dir.join("progs"))? {
        remove_file(&entry, &mut report)?;
    }
    for entry in read_dir(&dir)? {
        if entry.is_file() || !entry.is_dir() {
            remove_file(&entry, &mut report)?;
        }
    }
    for sub in [links, dir.join("progs"), dir.clone()] {
        remove_empty_dir(&sub, &mut report);
    }
    remove_empty_dir(bpffs_dir, &mut report);
    Ok(report)
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, LoaderError> {
    match fs::read_dir(dir) {
        Ok(entries) => Ok(entries.filter_map(Result::ok).map(|e| e.path()).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(LoaderError::io("read pin directory", dir, e)),
    }
}

fn remove_file(path: &Path, report: &mut CleanupReport) -> Result<(), LoaderError> {
    if path.is_dir() {
        return Ok(());
    }
    fs::remove_file(path).map_err(|e| LoaderError::io("remove pin", path, e))?;
    report.removed.push(path.display().to_string());
    Ok(())
}

fn remove_empty_dir(path: &Path, report: &mut CleanupReport) {
    if fs::remove_dir(path).is_ok() {
        report.removed.push(path.display().to_string());
    }
}
