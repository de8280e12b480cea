//! `envoy.filters.http.local_ratelimit` and the route `rate_limits` actions that build its
//! descriptors, into the model.
//!
//! Envoy's defaults are written out: `filter_enabled` and `filter_enforced` default to 0 %
//! (a filter without them counts nothing and limits nothing), `status` to 429,
//! `tokens_per_fill` to 1, `always_consume_default_token_bucket` to true.
use std::time::Duration;

use envoy_types::pb::envoy::{
    config::{core::v3 as core, route::v3 as route},
    extensions::filters::http::local_ratelimit::v3 as pb,
    r#type::v3 as type_pb,
};

use crate::{
    convert::{dur, header_matcher, header_options},
    matcher::HeaderMatcher,
    model::HeaderValueOption,
    support::Diagnostics,
};

/// `LocalRateLimit`.
#[derive(Debug, Clone)]
pub struct LocalRateLimit {
    pub stat_prefix: String,
    pub status: u16,
    /// The default bucket; `None`: only descriptors are limited.
    pub bucket: Option<TokenBucket>,
    pub enabled: Fraction,
    pub enforced: Fraction,
    pub request_headers_when_not_enforced: Vec<HeaderValueOption>,
    pub response_headers: Vec<HeaderValueOption>,
    pub descriptors: Vec<Descriptor>,
    pub stage: u32,
    /// One bucket set per downstream connection instead of one per filter.
    pub per_connection: bool,
    pub always_consume_default: bool,
    /// `enable_x_ratelimit_headers: DRAFT_VERSION_03`.
    pub x_ratelimit_headers: bool,
    pub vh_rate_limits: VhRateLimits,
    /// gRPC: `RESOURCE_EXHAUSTED` instead of `UNAVAILABLE`.
    pub resource_exhausted: bool,
    pub retry_after: bool,
    /// The filter's own descriptor actions (they replace the route's when set).
    pub rate_limits: Vec<RateLimitPolicy>,
}

/// `envoy.type.v3.TokenBucket`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    pub max_tokens: u32,
    pub tokens_per_fill: u32,
    pub fill_interval: Duration,
}

/// `RuntimeFractionalPercent` (its default value: there are no runtime overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fraction {
    pub numerator: u32,
    /// 100, 10 000 or 1 000 000.
    pub denominator: u32,
}

impl Fraction {
    pub const NONE: Self = Self {
        numerator: 0,
        denominator: 100,
    };

    /// Whether a draw in `[0, denominator)` falls under the fraction.
    pub fn admits(self, draw: u32) -> bool {
        draw < self.numerator
    }
}

/// A configured descriptor and its bucket.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// `(key, value)`; an empty value matches any value of the key.
    pub entries: Vec<(String, String)>,
    pub bucket: TokenBucket,
    pub shadow: bool,
}

/// How the virtual host's `rate_limits` combine with the route's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VhRateLimits {
    /// The virtual host's only when the route has none.
    Override,
    Include,
    Ignore,
}

/// `envoy.config.route.v3.RateLimit`: its actions make one descriptor, or none when an
/// action cannot produce its entry.
#[derive(Debug, Clone)]
pub struct RateLimitPolicy {
    pub stage: u32,
    pub actions: Vec<RateLimitAction>,
}

#[derive(Debug, Clone)]
pub enum RateLimitAction {
    GenericKey {
        key: String,
        value: String,
    },
    RequestHeader {
        header: String,
        key: String,
        skip_if_absent: bool,
    },
    /// `remote_address`: the trusted client address.
    RemoteAddress,
    HeaderValueMatch {
        key: String,
        value: String,
        expect_match: bool,
        headers: Vec<HeaderMatcher>,
    },
    /// `destination_cluster`: the routed cluster's name.
    DestinationCluster,
}

pub fn fraction(f: Option<&core::RuntimeFractionalPercent>) -> Fraction {
    let Some(v) = f.and_then(|f| f.default_value.as_ref()) else {
        return Fraction::NONE;
    };
    let denominator = match type_pb::fractional_percent::DenominatorType::try_from(v.denominator) {
        Ok(type_pb::fractional_percent::DenominatorType::TenThousand) => 10_000,
        Ok(type_pb::fractional_percent::DenominatorType::Million) => 1_000_000,
        _ => 100,
    };
    Fraction {
        numerator: v.numerator.min(denominator),
        denominator,
    }
}

fn bucket(b: &type_pb::TokenBucket, at: &str, diags: &mut Diagnostics) -> Option<TokenBucket> {
    let fill_interval = dur(b.fill_interval.as_ref()).unwrap_or_default();
    if fill_interval < Duration::from_millis(50) {
        diags.error(format!(
            "{at}.fill_interval: must be at least 50ms (Envoy's minimum)"
        ));
        return None;
    }
    if b.max_tokens == 0 {
        diags.error(format!("{at}.max_tokens: must be greater than 0"));
        return None;
    }
    Some(TokenBucket {
        max_tokens: b.max_tokens,
        tokens_per_fill: b.tokens_per_fill.as_ref().map_or(1, |v| v.value),
        fill_interval,
    })
}

/// Reads a `LocalRateLimit` (the filter's configuration, or a per-route one).
pub fn local(c: &pb::LocalRateLimit, at: &str, diags: &mut Diagnostics) -> Option<LocalRateLimit> {
    let errors = diags.errors.len();
    let status = match c.status.as_ref().map(|s| s.code) {
        None | Some(0) => 429,
        Some(code) => match u16::try_from(code) {
            Ok(s) if (400..600).contains(&s) => s,
            _ => {
                diags.error(format!("{at}.status: {code} is not a 4xx or 5xx status"));
                429
            }
        },
    };
    let default_bucket = c
        .token_bucket
        .as_ref()
        .and_then(|b| bucket(b, &format!("{at}.token_bucket"), diags));
    let mut descriptors = Vec::new();
    for (i, d) in c.descriptors.iter().enumerate() {
        let dat = format!("{at}.descriptors[{i}]");
        let Some(b) = d.token_bucket.as_ref() else {
            diags.error(format!("{dat}.token_bucket: required"));
            continue;
        };
        let Some(b) = bucket(b, &format!("{dat}.token_bucket"), diags) else {
            continue;
        };
        if d.entries.is_empty() {
            diags.error(format!("{dat}.entries: at least one entry is required"));
            continue;
        }
        descriptors.push(Descriptor {
            entries: d
                .entries
                .iter()
                .map(|e| (e.key.clone(), e.value.clone()))
                .collect(),
            bucket: b,
            shadow: d.shadow_mode,
        });
    }
    if c.local_cluster_rate_limit.is_some() {
        diags.error(format!(
            "{at}.local_cluster_rate_limit: sharing a limit across a cluster is not supported; \
             use nodemesh's global quota"
        ));
    }
    if c.max_dynamic_descriptors.is_some() {
        diags.error(format!(
            "{at}.max_dynamic_descriptors: dynamic descriptors are not supported"
        ));
    }
    let vh_rate_limits = match c.vh_rate_limits {
        0 => VhRateLimits::Override,
        1 => VhRateLimits::Include,
        _ => VhRateLimits::Ignore,
    };
    let rate_limits = c
        .rate_limits
        .iter()
        .enumerate()
        .filter_map(|(i, r)| rate_limit(r, &format!("{at}.rate_limits[{i}]"), diags))
        .collect();
    let local = LocalRateLimit {
        stat_prefix: c.stat_prefix.clone(),
        status,
        bucket: default_bucket,
        enabled: fraction(c.filter_enabled.as_ref()),
        enforced: fraction(c.filter_enforced.as_ref()),
        request_headers_when_not_enforced: header_options(
            &c.request_headers_to_add_when_not_enforced,
            &format!("{at}.request_headers_to_add_when_not_enforced"),
            diags,
        ),
        response_headers: header_options(
            &c.response_headers_to_add,
            &format!("{at}.response_headers_to_add"),
            diags,
        ),
        descriptors,
        stage: c.stage,
        per_connection: c.local_rate_limit_per_downstream_connection,
        always_consume_default: c
            .always_consume_default_token_bucket
            .as_ref()
            .is_none_or(|b| b.value),
        x_ratelimit_headers: c.enable_x_ratelimit_headers == 1,
        vh_rate_limits,
        resource_exhausted: c.rate_limited_as_resource_exhausted,
        retry_after: c.enable_retry_after_header,
        rate_limits,
    };
    (diags.errors.len() == errors).then_some(local)
}

/// Reads a route's or virtual host's `rate_limits` entry.
pub fn rate_limit(
    r: &route::RateLimit,
    at: &str,
    diags: &mut Diagnostics,
) -> Option<RateLimitPolicy> {
    use route::rate_limit::action::ActionSpecifier as A;
    if r.limit.is_some() || r.hits_addend.is_some() || r.apply_on_stream_done {
        diags.error(format!(
            "{at}: limit, hits_addend and apply_on_stream_done are not supported"
        ));
        return None;
    }
    let mut actions = Vec::new();
    for (i, a) in r.actions.iter().enumerate() {
        let aat = format!("{at}.actions[{i}]");
        let action = match &a.action_specifier {
            Some(A::GenericKey(g)) => RateLimitAction::GenericKey {
                key: if g.descriptor_key.is_empty() {
                    "generic_key".into()
                } else {
                    g.descriptor_key.clone()
                },
                value: g.descriptor_value.clone(),
            },
            Some(A::RequestHeaders(h)) => RateLimitAction::RequestHeader {
                header: h.header_name.to_ascii_lowercase(),
                key: h.descriptor_key.clone(),
                skip_if_absent: h.skip_if_absent,
            },
            Some(A::RemoteAddress(_)) => RateLimitAction::RemoteAddress,
            Some(A::DestinationCluster(_)) => RateLimitAction::DestinationCluster,
            Some(A::HeaderValueMatch(h)) => {
                let mut headers = Vec::new();
                for m in &h.headers {
                    match header_matcher(m) {
                        Ok(m) => headers.push(m),
                        Err(e) => {
                            diags.error(format!("{aat}.header_value_match.headers: {e}"));
                            return None;
                        }
                    }
                }
                RateLimitAction::HeaderValueMatch {
                    key: if h.descriptor_key.is_empty() {
                        "header_match".into()
                    } else {
                        h.descriptor_key.clone()
                    },
                    value: h.descriptor_value.clone(),
                    expect_match: h.expect_match.as_ref().is_none_or(|b| b.value),
                    headers,
                }
            }
            _ => {
                diags.error(format!(
                    "{aat}: only generic_key, request_headers, remote_address, \
                     destination_cluster and header_value_match are supported"
                ));
                return None;
            }
        };
        actions.push(action);
    }
    Some(RateLimitPolicy {
        stage: r.stage.as_ref().map_or(0, |v| v.value),
        actions,
    })
}
