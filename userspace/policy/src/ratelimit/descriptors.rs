//! Route `rate_limits` actions into the request's descriptors.
use nodemesh_config::filters::ratelimit::{RateLimitAction, RateLimitPolicy};

use crate::Attributes;

/// One descriptor: its entries in action order.
pub type Descriptor = Vec<(String, String)>;

/// The descriptors of `policies` at `stage`; a policy whose action cannot produce its
/// entry yields none (Envoy).
pub fn build(policies: &[&RateLimitPolicy], stage: u32, a: &Attributes<'_>) -> Vec<Descriptor> {
    policies
        .iter()
        .filter(|p| p.stage == stage)
        .filter_map(|p| {
            let mut entries = Vec::with_capacity(p.actions.len());
            for action in &p.actions {
                match entry(action, a)? {
                    Some(e) => entries.push(e),
                    None => continue,
                }
            }
            (!entries.is_empty()).then_some(entries)
        })
        .collect()
}

/// `None`: the descriptor is dropped; `Some(None)`: the action adds nothing.
fn entry(action: &RateLimitAction, a: &Attributes<'_>) -> Option<Option<(String, String)>> {
    let http = a.http.as_ref();
    match action {
        RateLimitAction::GenericKey { key, value } => Some(Some((key.clone(), value.clone()))),
        RateLimitAction::RequestHeader {
            header,
            key,
            skip_if_absent,
        } => match http.and_then(|h| h.header(header)) {
            Some(v) => Some(Some((key.clone(), v.into_owned()))),
            None if *skip_if_absent => Some(None),
            None => None,
        },
        RateLimitAction::RemoteAddress => Some(Some((
            "remote_address".into(),
            a.remote_ip.to_canonical().to_string(),
        ))),
        RateLimitAction::DestinationCluster => http
            .and_then(|h| h.cluster)
            .map(|c| Some(("destination_cluster".into(), c.to_owned()))),
        RateLimitAction::HeaderValueMatch {
            key,
            value,
            expect_match,
            headers,
        } => {
            let matched = headers.iter().all(|m| {
                let v = http.and_then(|h| h.header(&m.name));
                m.matches(v.as_deref())
            });
            (matched == *expect_match).then(|| Some((key.clone(), value.clone())))
        }
    }
}
