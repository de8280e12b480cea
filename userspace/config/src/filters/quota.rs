//! nodemesh's global quota filter: limits shared by every node proxy of a cluster, counted
//! in Redis, configured as a typed extension of its own inside a `TypedStruct` (the way
//! Envoy configures extensions whose protos it was not built with):
//!
//! ```yaml
//! - name: nodemesh.filters.http.global_quota
//!   typed_config:
//!     "@type": type.googleapis.com/xds.type.v3.TypedStruct
//!     type_url: type.googleapis.com/nodemesh.filters.http.global_quota.v1.GlobalQuota
//!     value:
//!       redis: 127.0.0.1:6379     # IP:port of the Redis server shared by the cluster
//!       domain: shop              # key namespace in Redis
//!       failure_mode: open        # open (allow) | closed (deny, 500 RLSE) when Redis is away
//!       timeout: 100ms            # one Redis call, then the proxy counts it failed
//!       quotas:
//!       - name: api               # the counter's name (shared by every proxy)
//!         limit: 1000             # requests per window, cluster-wide
//!         window: 1s
//!         batch: 50               # tokens leased at a time (default limit/20, at least 1)
//!         prefix: /api/           # optional: only paths with this prefix
//! ```
//!
//! A route or virtual host turns it off with `typed_per_filter_config` under the filter's
//! name: the same `TypedStruct` with type URL `...global_quota.v1.GlobalQuotaPerRoute` and
//! `value: { disabled: true }`.
use std::{net::SocketAddr, time::Duration};

use serde::Deserialize;

use crate::support::Diagnostics;

pub const TYPE_URL: &str = "type.googleapis.com/nodemesh.filters.http.global_quota.v1.GlobalQuota";
pub const PER_ROUTE_TYPE_URL: &str =
    "type.googleapis.com/nodemesh.filters.http.global_quota.v1.GlobalQuotaPerRoute";

/// The filter's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlobalQuota {
    pub stat_prefix: String,
    pub redis: SocketAddr,
    pub domain: String,
    pub fail_open: bool,
    pub timeout: Duration,
    pub status: u16,
    pub quotas: Vec<Quota>,
}

/// One cluster-wide counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quota {
    pub name: String,
    pub limit: u64,
    pub window: Duration,
    pub batch: u64,
    pub prefix: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    stat_prefix: String,
    redis: String,
    domain: String,
    #[serde(default)]
    failure_mode: Option<String>,
    #[serde(default)]
    timeout: Option<String>,
    #[serde(default, deserialize_with = "opt_whole")]
    status: Option<u64>,
    quotas: Vec<RawQuota>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQuota {
    name: String,
    #[serde(deserialize_with = "whole")]
    limit: u64,
    window: String,
    #[serde(default, deserialize_with = "opt_whole")]
    batch: Option<u64>,
    #[serde(default)]
    prefix: Option<String>,
}

/// `google.protobuf.Struct` numbers are doubles: accept whole, non-negative ones.
fn whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = f64::deserialize(d)?;
    if v.fract() != 0.0 || !(0.0..=9.0e15).contains(&v) {
        return Err(serde::de::Error::custom(format!(
            "{v} is not a whole non-negative number"
        )));
    }
    Ok(v as u64)
}

fn opt_whole<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    whole(d).map(Some)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPerRoute {
    #[serde(default)]
    disabled: bool,
}

/// `1s`, `250ms`, `0.5s`, `2m` (what Envoy's YAML durations look like).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| format!("duration {s:?} needs a unit (ms, s, m)"))?;
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("duration {s:?}: bad number"))?;
    let secs = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("duration {s:?}: unknown unit {unit:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("duration {s:?}: {e}"))
}

/// Reads the `value` of the filter's `TypedStruct` (as JSON).
pub fn global(value: serde_json::Value, at: &str, diags: &mut Diagnostics) -> Option<GlobalQuota> {
    let raw: Raw = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            diags.error(format!("{at}.value: {e}"));
            return None;
        }
    };
    let errors = diags.errors.len();
    let redis = raw
        .redis
        .parse::<SocketAddr>()
        .map_err(|e| diags.error(format!("{at}.value.redis: {:?}: {e} (IP:port)", raw.redis)))
        .ok();
    let fail_open = match raw.failure_mode.as_deref() {
        None | Some("open") => true,
        Some("closed") => false,
        Some(other) => {
            diags.error(format!(
                "{at}.value.failure_mode: {other:?} (open or closed)"
            ));
            true
        }
    };
    let timeout = match raw.timeout.as_deref().map(parse_duration) {
        None => Duration::from_millis(100),
        Some(Ok(d)) if !d.is_zero() => d,
        Some(Ok(_)) => {
            diags.error(format!("{at}.value.timeout: must be more than 0"));
            Duration::ZERO
        }
        Some(Err(e)) => {
            diags.error(format!("{at}.value.timeout: {e}"));
            Duration::ZERO
        }
    };
    if raw.domain.is_empty() || raw.domain.contains(char::is_whitespace) {
        diags.error(format!("{at}.value.domain: required, without whitespace"));
    }
    let mut quotas = Vec::new();
    for q in raw.quotas {
        let qat = format!("{at}.value.quotas[{}]", q.name);
        let window = parse_duration(&q.window)
            .map_err(|e| diags.error(format!("{qat}.window: {e}")))
            .unwrap_or_default();
        if window < Duration::from_millis(100) {
            diags.error(format!("{qat}.window: must be at least 100ms"));
        }
        if q.limit == 0 || q.name.is_empty() {
            diags.error(format!("{qat}: name and a limit above 0 are required"));
        }
        let batch = q.batch.unwrap_or((q.limit / 20).max(1));
        if batch == 0 || batch > q.limit.max(1) {
            diags.error(format!("{qat}.batch: must be in [1, limit]"));
        }
        quotas.push(Quota {
            name: q.name,
            limit: q.limit,
            window,
            batch,
            prefix: q.prefix,
        });
    }
    if quotas.is_empty() {
        diags.error(format!("{at}.value.quotas: at least one quota is required"));
    }
    let status = raw.status.map_or(429, |s| u16::try_from(s).unwrap_or(0));
    if !(400..600).contains(&status) {
        diags.error(format!(
            "{at}.value.status: {status} is not a 4xx or 5xx status"
        ));
    }
    (diags.errors.len() == errors).then(|| GlobalQuota {
        stat_prefix: raw.stat_prefix,
        redis: redis.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 6379))),
        domain: raw.domain,
        fail_open,
        timeout,
        status,
        quotas,
    })
}

/// Reads a per-route override: `Some(true)` when the route turns the quota off.
pub fn per_route(value: serde_json::Value, at: &str, diags: &mut Diagnostics) -> Option<bool> {
    match serde_json::from_value::<RawPerRoute>(value) {
        Ok(r) => Some(r.disabled),
        Err(e) => {
            diags.error(format!("{at}.value: {e}"));
            None
        }
    }
}
