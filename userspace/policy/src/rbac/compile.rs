//! Policies into an index, so that a decision looks only at the policies that can match.
//!
//! Each policy is filed under what it requires of every request it can match: a set of
//! destination ports (Istio's `to.operation.ports`), else a set of exact principals
//! (`from.source.principals`), else nothing (checked for every request). A decision takes
//! the candidates for the request's port and principal plus the unfiled ones, in policy
//! name order (the order Envoy reports matches in): its cost grows with the policies that
//! share the request's port or principal, not with the number configured.
use std::collections::{BTreeSet, HashMap};

use nodemesh_config::{
    filters::rbac::{Permission, Policy, Principal},
    matcher::StringMatch,
};

/// Ports of a range expanded into the index at most (wider ranges stay unfiled).
const MAX_EXPANDED_RANGE: u32 = 64;

/// The index over one RBAC's policies (their positions in name order).
#[derive(Debug, Default)]
pub struct Index {
    pub by_port: HashMap<u16, Vec<u32>>,
    pub by_principal: HashMap<String, Vec<u32>>,
    pub unfiled: Vec<u32>,
}

impl Index {
    pub fn build(policies: &[Policy]) -> Self {
        let mut index = Self::default();
        for (i, p) in policies.iter().enumerate() {
            let i = i as u32;
            if let Some(ports) = union(p.permissions.iter().map(ports)) {
                for port in ports {
                    index.by_port.entry(port).or_default().push(i);
                }
            } else if let Some(ids) = union(p.principals.iter().map(principals)) {
                for id in ids {
                    index.by_principal.entry(id).or_default().push(i);
                }
            } else {
                index.unfiled.push(i);
            }
        }
        index
    }
}

/// The union of the sets, if every one is constrained.
fn union<T: Ord>(sets: impl Iterator<Item = Option<BTreeSet<T>>>) -> Option<BTreeSet<T>> {
    let mut all = BTreeSet::new();
    let mut any = false;
    for s in sets {
        all.extend(s?);
        any = true;
    }
    any.then_some(all)
}

/// The destination ports a permission can match, if it is limited to some.
fn ports(p: &Permission) -> Option<BTreeSet<u16>> {
    match p {
        Permission::DestinationPort(port) => Some(BTreeSet::from([*port])),
        Permission::DestinationPortRange(start, end)
            if end > start && end - start <= MAX_EXPANDED_RANGE =>
        {
            Some(
                (*start..*end)
                    .filter_map(|p| u16::try_from(p).ok())
                    .collect(),
            )
        }
        // Every rule must match: any constrained one bounds the whole.
        Permission::And(rules) => rules.iter().filter_map(ports).min_by_key(BTreeSet::len),
        Permission::Or(rules) => union(rules.iter().map(ports)),
        _ => None,
    }
}

/// The exact principals a principal matcher can match, if limited to some.
fn principals(p: &Principal) -> Option<BTreeSet<String>> {
    match p {
        Principal::Authenticated(Some(m)) if !m.ignore_case => match &m.kind {
            StringMatch::Exact(s) => Some(BTreeSet::from([s.clone()])),
            _ => None,
        },
        Principal::And(ids) => ids.iter().filter_map(principals).min_by_key(BTreeSet::len),
        Principal::Or(ids) => union(ids.iter().map(principals)),
        _ => None,
    }
}

/// Candidates in ascending order from up to three ascending lists.
pub fn merged<'a>(lists: [&'a [u32]; 3]) -> impl Iterator<Item = u32> + 'a {
    let mut pos = [0usize; 3];
    std::iter::from_fn(move || {
        let mut best: Option<(usize, u32)> = None;
        for (k, list) in lists.iter().enumerate() {
            if let Some(&v) = list.get(pos[k])
                && best.is_none_or(|(_, b)| v < b)
            {
                best = Some((k, v));
            }
        }
        let (k, v) = best?;
        // A policy filed in two lists is not possible (one list each), but equal heads are
        // skipped all the same.
        for (j, list) in lists.iter().enumerate() {
            if list.get(pos[j]) == Some(&v) {
                pos[j] += 1;
            }
        }
        let _ = k;
        Some(v)
    })
}
