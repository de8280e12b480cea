//! Resource files: the folder a [`crate::server`] serves.
//!
//! Each file is in the format of Envoy's filesystem subscriptions: a `DiscoveryResponse` in
//! YAML or JSON whose `resources` are typed entries (`"@type"` plus the resource's fields
//! in the protobuf JSON mapping). Any mix of types may share a file; a folder is the union
//! of its `*.yaml`, `*.yml` and `*.json` files (hidden files and others are skipped, so an
//! editor's swap file never becomes configuration).
//!
//! A folder loads whole or not at all: a file that does not parse, an entry of a type that
//! is not an xDS resource, a resource named twice, or (when checked) a set that
//! `nodemesh-config` would not translate, makes the load fail with every reason, each
//! naming the file and entry.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::SystemTime,
};

use envoy_types::pb::google::protobuf::Any;
use prost::Message as _;

use crate::types::{Resource, ResourceSet, ResourceType};

/// One loaded folder.
#[derive(Debug, Clone, Default)]
pub struct Loaded {
    /// Every resource; each `Resource::version` is a hash of its encoded bytes, so that it
    /// is the same across restarts of the control plane for the same content.
    pub set: ResourceSet,
    /// The version of each type: a hash over its resources' names and versions.
    pub type_versions: BTreeMap<ResourceType, String>,
    /// A hash over every type's version.
    pub version: String,
    /// The files read, with the number of resources each held.
    pub files: Vec<(PathBuf, usize)>,
    /// What translation warned about (ignored fields), once each.
    pub warnings: Vec<String>,
}

impl Loaded {
    pub fn type_version(&self, ty: ResourceType) -> &str {
        self.type_versions.get(&ty).map_or("", String::as_str)
    }
}

/// Why a folder did not load: one line per problem.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct LoadError(pub Vec<String>);

/// What identifies the folder's current content cheaply: names, sizes and modification
/// times of the files a load would read.
pub fn fingerprint(dir: &Path) -> std::io::Result<Vec<(PathBuf, u64, Option<SystemTime>)>> {
    let mut out = Vec::new();
    for path in resource_files(dir)? {
        let meta = std::fs::metadata(&path)?;
        out.push((path, meta.len(), meta.modified().ok()));
    }
    Ok(out)
}

fn resource_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if name.starts_with('.') || !matches!(ext, "yaml" | "yml" | "json") || !path.is_file() {
            continue;
        }
        files.push(path);
    }
    files.sort();
    Ok(files)
}

/// Loads every resource file in `dir`. With `check`, the set must also translate (as the
/// complete configuration of a proxy: every route configuration a listener names present).
pub fn load_dir(dir: &Path, check: bool) -> Result<Loaded, LoadError> {
    let files = resource_files(dir)
        .map_err(|e| LoadError(vec![format!("{}: cannot list: {e}", dir.display())]))?;
    let mut errors = Vec::new();
    let mut set = ResourceSet::default();
    let mut origin: BTreeMap<(ResourceType, String), PathBuf> = BTreeMap::new();
    let mut counted = Vec::new();
    let mut unreadable = false;
    for path in files {
        match load_file(&path) {
            Ok(resources) => {
                counted.push((path.clone(), resources.len()));
                for (ty, resource) in resources {
                    let key = (ty, resource.name.clone());
                    if let Some(first) = origin.get(&key) {
                        errors.push(format!(
                            "{}: {} {:?} is already defined in {}",
                            path.display(),
                            ty.kind(),
                            resource.name,
                            first.display()
                        ));
                        continue;
                    }
                    origin.insert(key, path.clone());
                    set.insert(ty, resource);
                }
            }
            Err(mut e) => {
                unreadable = true;
                errors.append(&mut e);
            }
        }
    }
    // A set with a file missing would report what that file defines as missing too: only
    // a set read whole (duplicates aside: the first definition counts) is translated.
    let mut warnings = Vec::new();
    if !unreadable && check {
        let mut config = set.to_config(&nodemesh_config::Resources::default());
        config.dynamic = false;
        let translated = nodemesh_config::translate(&config);
        if translated.snapshot.is_none() {
            errors.extend(translated.diagnostics.errors);
        }
        warnings.extend(translated.diagnostics.warnings);
    }
    if !errors.is_empty() {
        return Err(LoadError(errors));
    }
    let mut type_versions = BTreeMap::new();
    let mut all = String::new();
    for ty in ResourceType::ALL {
        let mut h = Fnv::default();
        for r in set.of(ty) {
            h.write(r.name.as_bytes());
            h.write(&[0]);
            h.write(r.version.as_bytes());
        }
        let v = h.hex();
        let _ = write!(all, "{v}");
        type_versions.insert(ty, v);
    }
    let mut h = Fnv::default();
    h.write(all.as_bytes());
    Ok(Loaded {
        set,
        type_versions,
        version: h.hex(),
        files: counted,
        warnings,
    })
}

/// The resources of one file, or why not (each reason naming the file and entry).
fn load_file(path: &Path) -> Result<Vec<(ResourceType, Resource)>, Vec<String>> {
    let at = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| vec![format!("{at}: {e}")])?;
    let value: serde_json::Value = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_yaml::from_str(&text).map_err(|e| vec![format!("{at}: not YAML or JSON: {e}")])?
    };
    let entries = match value {
        serde_json::Value::Null => return Ok(Vec::new()),
        serde_json::Value::Object(mut o) => match o.remove("resources") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(a)) => a,
            Some(_) => return Err(vec![format!("{at}: `resources` is not a list")]),
        },
        _ => {
            return Err(vec![format!(
                "{at}: not a DiscoveryResponse (expected a mapping with `resources`)"
            )]);
        }
    };
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (i, entry) in entries.into_iter().enumerate() {
        match load_entry(entry) {
            Ok(r) => out.push(r),
            Err(e) => errors.push(format!("{at}: resources[{i}]: {e}")),
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

fn load_entry(entry: serde_json::Value) -> Result<(ResourceType, Resource), String> {
    let serde_json::Value::Object(mut fields) = entry else {
        return Err("not a mapping".into());
    };
    let url = match fields.remove("@type") {
        Some(serde_json::Value::String(s)) => s,
        _ => return Err("has no \"@type\"".into()),
    };
    let ty = ResourceType::from_type_url(&url).ok_or_else(|| {
        format!(
            "type {url:?} is not an xDS resource type (expected one of {})",
            ResourceType::ALL.map(ResourceType::type_url).join(", ")
        )
    })?;
    let message = nodemesh_config::pool::from_json(fields.into(), ty.message_name())
        .map_err(|e| e.to_string())?;
    let bytes = message.encode_to_vec();
    let mut h = Fnv::default();
    h.write(&bytes);
    let any = Any {
        type_url: ty.type_url().to_owned(),
        value: bytes,
    };
    let resource = Resource::decode(ty, any, &h.hex(), usize::MAX).map_err(|e| e.to_string())?;
    Ok((ty, resource))
}

/// FNV-1a (64 bit): stable across runs and builds, which a version string must be so that
/// a client resuming after a control-plane restart is not sent what it already holds.
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).expect("write a resource file");
    }

    const CLUSTER: &str = r#"
resources:
- "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
  name: web
  type: STATIC
  load_assignment:
    cluster_name: web
    endpoints:
    - lb_endpoints:
      - endpoint: { address: { socket_address: { address: 198.18.0.10, port_value: 80 } } }
"#;

    #[test]
    fn loads_a_folder_and_versions_are_stable() {
        let dir = tempfile::tempdir().expect("temporary folder");
        write(dir.path(), "c.yaml", CLUSTER);
        write(dir.path(), ".c.yaml.swp", "garbage");
        write(dir.path(), "README.txt", "not configuration");
        let a = load_dir(dir.path(), true).expect("the folder loads");
        assert_eq!(a.set.names(ResourceType::Cluster).len(), 1);
        assert_eq!(a.files.len(), 1);
        let b = load_dir(dir.path(), true).expect("the folder loads");
        assert_eq!(a.version, b.version);
        assert_eq!(
            a.type_version(ResourceType::Cluster),
            b.type_version(ResourceType::Cluster)
        );
        write(
            dir.path(),
            "c.yaml",
            &CLUSTER.replace("port_value: 80", "port_value: 81"),
        );
        let c = load_dir(dir.path(), true).expect("the folder loads");
        assert_ne!(a.version, c.version);
        assert_ne!(
            a.type_version(ResourceType::Cluster),
            c.type_version(ResourceType::Cluster)
        );
        assert_eq!(
            a.type_version(ResourceType::Listener),
            c.type_version(ResourceType::Listener)
        );
    }

    #[test]
    fn every_problem_is_named_with_its_file() {
        let dir = tempfile::tempdir().expect("temporary folder");
        write(dir.path(), "a.yaml", CLUSTER);
        write(dir.path(), "b.yaml", CLUSTER);
        write(
            dir.path(),
            "c.json",
            r#"{"resources": [{"@type": "type.googleapis.com/google.protobuf.Duration"}, {"name": "x"}]}"#,
        );
        write(dir.path(), "d.yaml", "resources: [ {");
        let err = load_dir(dir.path(), true)
            .expect_err("the folder is invalid")
            .0;
        let all = err.join("\n");
        assert!(
            all.contains("b.yaml: Cluster \"web\" is already defined in"),
            "{all}"
        );
        assert!(all.contains("c.json: resources[0]: type \"type.googleapis.com/google.protobuf.Duration\" is not an xDS resource type"), "{all}");
        assert!(
            all.contains("c.json: resources[1]: has no \"@type\""),
            "{all}"
        );
        assert!(all.contains("d.yaml: not YAML or JSON"), "{all}");
    }

    #[test]
    fn a_checked_load_refuses_what_would_not_translate() {
        let dir = tempfile::tempdir().expect("temporary folder");
        write(
            dir.path(),
            "l.yaml",
            r#"
resources:
- "@type": type.googleapis.com/envoy.config.listener.v3.Listener
  name: l
  address: { socket_address: { address: 198.18.0.1, port_value: 8080 } }
  filter_chains:
  - filters:
    - name: envoy.filters.network.tcp_proxy
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
        stat_prefix: t
        cluster: nowhere
"#,
        );
        let err = load_dir(dir.path(), true)
            .expect_err("the folder is invalid")
            .to_string();
        assert!(err.contains("nowhere"), "{err}");
        // Unchecked, the same folder is served as it is (for testing clients' rejections).
        assert_eq!(
            load_dir(dir.path(), false)
                .expect("loads unchecked")
                .set
                .len(ResourceType::Listener),
            1
        );
    }
}
