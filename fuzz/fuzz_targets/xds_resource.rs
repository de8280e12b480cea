//! What a control plane sends is input from outside: any bytes as any resource type must
//! decode to a resource or an error, and a decoded one must translate (as the ADS client
//! translates a candidate) to a result or errors, never a panic; the secret-reference walk
//! over it must end.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodemesh_xds::{Resource, ResourceSet, ResourceType};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let ty = ResourceType::ALL[usize::from(which) % ResourceType::ALL.len()];
    let any = envoy_types::pb::google::protobuf::Any {
        type_url: ty.type_url().to_owned(),
        value: bytes.to_vec(),
    };
    let Ok(resource) = Resource::decode(ty, any, "1", 1 << 20) else {
        return;
    };
    let _ = nodemesh_xds::refs::secret_names([&resource.message]);
    let mut set = ResourceSet::default();
    set.insert(ty, resource);
    let t = nodemesh_config::translate(&set.to_config(&nodemesh_config::Resources::default()));
    assert_eq!(t.snapshot.is_some(), t.diagnostics.errors.is_empty());
});
