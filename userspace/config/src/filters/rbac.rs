//! `envoy.filters.http.rbac` and `envoy.filters.network.rbac` into the model.
//!
//! Both filters share `envoy.config.rbac.v3.RBAC` (an action and named policies of
//! permissions and principals). What istiod emits is the `rules` shape, one filter per
//! action (DENY, then ALLOW, and LOG for dry-run); the `matcher` tree (Envoy Gateway) and CEL
//! conditions are refused with the field named.

// `metadata` and `source_ip` are deprecated in Envoy's API but are what istiod emits.
#![allow(deprecated)]
use envoy_types::pb::envoy::{
    config::rbac::v3 as pb,
    extensions::filters::{http::rbac::v3 as http_pb, network::rbac::v3 as net_pb},
    r#type::matcher::v3 as matcher_pb,
};

use crate::{
    convert::{cidr, header_matcher, string_matcher},
    matcher::{HeaderMatcher, IpRange, StringMatcher},
    support::Diagnostics,
};

/// One RBAC filter: enforced rules and shadow (report-only) rules.
#[derive(Debug, Clone, Default)]
pub struct Rbac {
    /// `None`: nothing enforced (the filter only reports shadow results).
    pub rules: Option<Rules>,
    pub shadow: Option<Rules>,
    /// Prefix of the per-policy counters and of the shadow result keys.
    pub stat_prefix: String,
    pub shadow_stat_prefix: String,
}

/// `RBAC`: an action and its policies, sorted by name (Envoy evaluates them in
/// lexicographic order and reports the first that matches).
#[derive(Debug, Clone)]
pub struct Rules {
    pub action: Action,
    pub policies: Vec<Policy>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Allowed iff a policy matches.
    Allow,
    /// Allowed iff no policy matches.
    Deny,
    /// Always allowed; a match is logged (`access_log_hint`).
    Log,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Log => "LOG",
        }
    }
}

/// A named policy: it matches when any permission and any principal match.
#[derive(Debug, Clone)]
pub struct Policy {
    pub name: String,
    pub permissions: Vec<Permission>,
    pub principals: Vec<Principal>,
}

/// What is being done (the request or connection).
#[derive(Debug, Clone)]
pub enum Permission {
    Any,
    And(Vec<Permission>),
    Or(Vec<Permission>),
    Not(Box<Permission>),
    Header(HeaderMatcher),
    /// The path without the query string.
    UrlPath(StringMatcher),
    DestinationIp(IpRange),
    DestinationPort(u16),
    /// Half-open `[start, end)`.
    DestinationPortRange(u32, u32),
    RequestedServerName(StringMatcher),
    Metadata(MetadataMatcher),
}

/// Who is doing it (the downstream).
#[derive(Debug, Clone)]
pub enum Principal {
    Any,
    And(Vec<Principal>),
    Or(Vec<Principal>),
    Not(Box<Principal>),
    /// The peer's authenticated identity (SPIFFE id); `None` matches any authenticated peer.
    Authenticated(Option<StringMatcher>),
    /// The connection's peer address (`source_ip` is its deprecated name).
    DirectRemoteIp(IpRange),
    /// The client address after `x-forwarded-for` processing (the peer without it).
    RemoteIp(IpRange),
    Header(HeaderMatcher),
    UrlPath(StringMatcher),
    Metadata(MetadataMatcher),
}

/// `envoy.type.matcher.v3.MetadataMatcher` over the request's dynamic metadata.
#[derive(Debug, Clone)]
pub struct MetadataMatcher {
    pub filter: String,
    pub path: Vec<String>,
    pub value: ValueMatch,
    pub invert: bool,
}

#[derive(Debug, Clone)]
pub enum ValueMatch {
    String(StringMatcher),
    Bool(bool),
    Present(bool),
    /// A list value with at least one element matching.
    OneOf(Box<ValueMatch>),
}

/// Reads the `envoy.filters.http.rbac` configuration.
pub fn http(c: &http_pb::Rbac, at: &str, diags: &mut Diagnostics) -> Option<Rbac> {
    if c.matcher.is_some() || c.shadow_matcher.is_some() {
        diags.error(format!(
            "{at}.matcher: the matcher tree is not supported; use rules (what istiod emits)"
        ));
        return None;
    }
    Some(Rbac {
        rules: rules(c.rules.as_ref(), &format!("{at}.rules"), diags)?,
        shadow: rules(
            c.shadow_rules.as_ref(),
            &format!("{at}.shadow_rules"),
            diags,
        )?,
        stat_prefix: c.rules_stat_prefix.clone(),
        shadow_stat_prefix: c.shadow_rules_stat_prefix.clone(),
    })
}

/// Reads the `envoy.filters.network.rbac` configuration.
pub fn network(c: &net_pb::Rbac, at: &str, diags: &mut Diagnostics) -> Option<Rbac> {
    if c.matcher.is_some() || c.shadow_matcher.is_some() {
        diags.error(format!(
            "{at}.matcher: the matcher tree is not supported; use rules (what istiod emits)"
        ));
        return None;
    }
    if c.enforcement_type != 0 {
        // CONTINUOUS re-checks on every read; nodemesh checks at connection start and again
        // on every policy update, which is what CONTINUOUS exists for in practice.
        diags.warn(
            "envoy.filters.network.rbac enforcement_type CONTINUOUS is checked at connection \
             start and on every policy update"
                .to_owned(),
        );
    }
    Some(Rbac {
        rules: rules(c.rules.as_ref(), &format!("{at}.rules"), diags)?,
        shadow: rules(
            c.shadow_rules.as_ref(),
            &format!("{at}.shadow_rules"),
            diags,
        )?,
        stat_prefix: c.stat_prefix.clone(),
        shadow_stat_prefix: c.shadow_rules_stat_prefix.clone(),
    })
}

/// `Some(None)`: no rules; `None`: an error was recorded.
fn rules(r: Option<&pb::Rbac>, at: &str, diags: &mut Diagnostics) -> Option<Option<Rules>> {
    let Some(r) = r else { return Some(None) };
    let action = match pb::rbac::Action::try_from(r.action) {
        Ok(pb::rbac::Action::Allow) => Action::Allow,
        Ok(pb::rbac::Action::Deny) => Action::Deny,
        Ok(pb::rbac::Action::Log) => Action::Log,
        _ => {
            diags.error(format!("{at}.action: unknown action {}", r.action));
            return None;
        }
    };
    let mut names: Vec<&String> = r.policies.keys().collect();
    names.sort();
    let mut policies = Vec::with_capacity(names.len());
    let errors_before = diags.errors.len();
    for name in names {
        let p = &r.policies[name];
        let pat = format!("{at}.policies[{name:?}]");
        if p.condition.is_some() || p.checked_condition.is_some() || p.cel_config.is_some() {
            diags.error(format!("{pat}.condition: CEL conditions are not supported"));
            continue;
        }
        if p.permissions.is_empty() || p.principals.is_empty() {
            diags.error(format!(
                "{pat}: permissions and principals are required (use any: true)"
            ));
            continue;
        }
        let permissions = p
            .permissions
            .iter()
            .enumerate()
            .filter_map(|(i, x)| permission(x, &format!("{pat}.permissions[{i}]"), diags))
            .collect();
        let principals = p
            .principals
            .iter()
            .enumerate()
            .filter_map(|(i, x)| principal(x, &format!("{pat}.principals[{i}]"), diags))
            .collect();
        policies.push(Policy {
            name: name.clone(),
            permissions,
            principals,
        });
    }
    (diags.errors.len() == errors_before).then_some(Some(Rules { action, policies }))
}

fn permission(p: &pb::Permission, at: &str, diags: &mut Diagnostics) -> Option<Permission> {
    use pb::permission::Rule as R;
    let set = |rules: &[pb::Permission], what: &str, diags: &mut Diagnostics| {
        let out: Vec<Permission> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, x)| permission(x, &format!("{at}.{what}[{i}]"), diags))
            .collect();
        (out.len() == rules.len()).then_some(out)
    };
    let fail = |diags: &mut Diagnostics, e: String| {
        diags.error(format!("{at}: {e}"));
        None
    };
    Some(match &p.rule {
        Some(R::Any(true)) => Permission::Any,
        Some(R::AndRules(s)) => Permission::And(set(&s.rules, "and_rules", diags)?),
        Some(R::OrRules(s)) => Permission::Or(set(&s.rules, "or_rules", diags)?),
        Some(R::NotRule(n)) => {
            Permission::Not(Box::new(permission(n, &format!("{at}.not_rule"), diags)?))
        }
        Some(R::Header(h)) => match header_matcher(h) {
            Ok(m) => Permission::Header(m),
            Err(e) => return fail(diags, format!("header: {e}")),
        },
        Some(R::UrlPath(pm)) => Permission::UrlPath(path_matcher(pm, at, diags)?),
        Some(R::DestinationIp(c)) => match cidr(c) {
            Ok(r) => Permission::DestinationIp(r),
            Err(e) => return fail(diags, format!("destination_ip: {e}")),
        },
        Some(R::DestinationPort(port)) => match u16::try_from(*port) {
            Ok(p) => Permission::DestinationPort(p),
            Err(_) => return fail(diags, format!("destination_port {port} is out of range")),
        },
        Some(R::DestinationPortRange(r)) => {
            let (Ok(start), Ok(end)) = (u32::try_from(r.start), u32::try_from(r.end)) else {
                return fail(diags, "destination_port_range: negative port".into());
            };
            Permission::DestinationPortRange(start, end)
        }
        Some(R::RequestedServerName(m)) => match string_matcher(m) {
            Ok(m) => Permission::RequestedServerName(m),
            Err(e) => return fail(diags, format!("requested_server_name: {e}")),
        },
        Some(R::Metadata(m)) => Permission::Metadata(metadata(m, at, diags)?),
        Some(R::Any(false)) | None => {
            return fail(
                diags,
                "a permission needs a rule (any: false is invalid)".into(),
            );
        }
        Some(_) => {
            return fail(
                diags,
                "only any, and_rules, or_rules, not_rule, header, url_path, destination_ip, \
                 destination_port, destination_port_range, requested_server_name and metadata \
                 are supported"
                    .into(),
            );
        }
    })
}

fn principal(p: &pb::Principal, at: &str, diags: &mut Diagnostics) -> Option<Principal> {
    use pb::principal::Identifier as I;
    let set = |ids: &[pb::Principal], what: &str, diags: &mut Diagnostics| {
        let out: Vec<Principal> = ids
            .iter()
            .enumerate()
            .filter_map(|(i, x)| principal(x, &format!("{at}.{what}[{i}]"), diags))
            .collect();
        (out.len() == ids.len()).then_some(out)
    };
    let fail = |diags: &mut Diagnostics, e: String| {
        diags.error(format!("{at}: {e}"));
        None
    };
    let ip = |c, what: &str, diags: &mut Diagnostics| match cidr(c) {
        Ok(r) => Some(r),
        Err(e) => {
            diags.error(format!("{at}.{what}: {e}"));
            None
        }
    };
    Some(match &p.identifier {
        Some(I::Any(true)) => Principal::Any,
        Some(I::AndIds(s)) => Principal::And(set(&s.ids, "and_ids", diags)?),
        Some(I::OrIds(s)) => Principal::Or(set(&s.ids, "or_ids", diags)?),
        Some(I::NotId(n)) => {
            Principal::Not(Box::new(principal(n, &format!("{at}.not_id"), diags)?))
        }
        Some(I::Authenticated(a)) => match &a.principal_name {
            None => Principal::Authenticated(None),
            Some(m) => match string_matcher(m) {
                Ok(m) => Principal::Authenticated(Some(m)),
                Err(e) => return fail(diags, format!("authenticated.principal_name: {e}")),
            },
        },
        Some(I::SourceIp(c)) => Principal::DirectRemoteIp(ip(c, "source_ip", diags)?),
        Some(I::DirectRemoteIp(c)) => Principal::DirectRemoteIp(ip(c, "direct_remote_ip", diags)?),
        Some(I::RemoteIp(c)) => Principal::RemoteIp(ip(c, "remote_ip", diags)?),
        Some(I::Header(h)) => match header_matcher(h) {
            Ok(m) => Principal::Header(m),
            Err(e) => return fail(diags, format!("header: {e}")),
        },
        Some(I::UrlPath(pm)) => Principal::UrlPath(path_matcher(pm, at, diags)?),
        Some(I::Metadata(m)) => Principal::Metadata(metadata(m, at, diags)?),
        Some(I::Any(false)) | None => {
            return fail(
                diags,
                "a principal needs an identifier (any: false is invalid)".into(),
            );
        }
        Some(_) => {
            return fail(
                diags,
                "only any, and_ids, or_ids, not_id, authenticated, source_ip, direct_remote_ip, \
                 remote_ip, header, url_path and metadata are supported"
                    .into(),
            );
        }
    })
}

fn path_matcher(
    pm: &matcher_pb::PathMatcher,
    at: &str,
    diags: &mut Diagnostics,
) -> Option<StringMatcher> {
    let Some(matcher_pb::path_matcher::Rule::Path(m)) = &pm.rule else {
        diags.error(format!("{at}.url_path: path is required"));
        return None;
    };
    string_matcher(m)
        .map_err(|e| diags.error(format!("{at}.url_path: {e}")))
        .ok()
}

fn metadata(
    m: &matcher_pb::MetadataMatcher,
    at: &str,
    diags: &mut Diagnostics,
) -> Option<MetadataMatcher> {
    use matcher_pb::metadata_matcher::path_segment::Segment;
    let path = m
        .path
        .iter()
        .filter_map(|s| s.segment.as_ref().map(|Segment::Key(k)| k.clone()))
        .collect();
    let Some(v) = &m.value else {
        diags.error(format!("{at}.metadata.value: required"));
        return None;
    };
    Some(MetadataMatcher {
        filter: m.filter.clone(),
        path,
        value: value_match(v, at, diags)?,
        invert: m.invert,
    })
}

fn value_match(
    v: &matcher_pb::ValueMatcher,
    at: &str,
    diags: &mut Diagnostics,
) -> Option<ValueMatch> {
    use matcher_pb::{list_matcher, value_matcher::MatchPattern as M};
    Some(match &v.match_pattern {
        Some(M::StringMatch(s)) => match string_matcher(s) {
            Ok(m) => ValueMatch::String(m),
            Err(e) => {
                diags.error(format!("{at}.metadata.value: {e}"));
                return None;
            }
        },
        Some(M::BoolMatch(b)) => ValueMatch::Bool(*b),
        Some(M::PresentMatch(p)) => ValueMatch::Present(*p),
        Some(M::ListMatch(l)) => match &l.match_pattern {
            Some(list_matcher::MatchPattern::OneOf(inner)) => {
                ValueMatch::OneOf(Box::new(value_match(inner, at, diags)?))
            }
            None => {
                diags.error(format!(
                    "{at}.metadata.value.list_match: one_of is required"
                ));
                return None;
            }
        },
        _ => {
            diags.error(format!(
                "{at}.metadata.value: only string_match, bool_match, present_match and \
                 list_match are supported"
            ));
            return None;
        }
    })
}
