//! `envoy.filters.http.local_ratelimit`: token buckets per filter (or per connection), one
//! default bucket and one per configured descriptor.
//!
//! Envoy's order: not enabled (`filter_enabled`) → untouched and uncounted; the request's
//! descriptors (from the filter's `rate_limits`, else the route's and virtual host's) take
//! a token from each matching descriptor's bucket, then from the default bucket when no
//! descriptor matched or `always_consume_default_token_bucket` holds; the first empty
//! bucket limits the request. Limited and enforced (`filter_enforced`) → the configured
//! status (429) with body `local_rate_limited`, flag `RL`; limited but not enforced → the
//! request goes on with `request_headers_to_add_when_not_enforced`.
use std::sync::Arc;

use nodemesh_config::filters::ratelimit::{LocalRateLimit, RateLimitPolicy, VhRateLimits};

use super::{bucket::Bucket, descriptors};
use crate::{Attributes, Denial, Verdict, stats::RateLimitStats};

/// One filter's buckets.
#[derive(Debug)]
pub struct Limiter {
    pub config: Arc<LocalRateLimit>,
    default: Option<Bucket>,
    descriptors: Vec<Bucket>,
    stats: RateLimitStats,
}

/// What the route contributes.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteLimits<'a> {
    pub route: &'a [RateLimitPolicy],
    pub virtual_host: &'a [RateLimitPolicy],
}

impl Limiter {
    pub fn new(config: Arc<LocalRateLimit>, stats: RateLimitStats) -> Self {
        Self {
            default: config.bucket.as_ref().map(Bucket::new),
            descriptors: config
                .descriptors
                .iter()
                .map(|d| Bucket::new(&d.bucket))
                .collect(),
            config,
            stats,
        }
    }

    pub fn check(&self, a: &Attributes<'_>, route: RouteLimits<'_>, grpc: bool) -> Verdict {
        let c = &self.config;
        if !c.enabled.admits(fastrand::u32(0..c.enabled.denominator)) {
            return Verdict::Continue;
        }
        let request = if c.descriptors.is_empty() {
            Vec::new()
        } else {
            let policies: Vec<&RateLimitPolicy> = if !c.rate_limits.is_empty() {
                c.rate_limits.iter().collect()
            } else {
                let vh = match c.vh_rate_limits {
                    VhRateLimits::Include => true,
                    VhRateLimits::Override => route.route.is_empty(),
                    VhRateLimits::Ignore => false,
                };
                route
                    .route
                    .iter()
                    .chain(route.virtual_host.iter().filter(|_| vh))
                    .collect()
            };
            descriptors::build(&policies, c.stage, a)
        };
        let matched: Vec<usize> = c
            .descriptors
            .iter()
            .enumerate()
            .filter(|(_, d)| request.iter().any(|r| entries_match(&d.entries, r)))
            .map(|(i, _)| i)
            .collect();
        let mut allowed = true;
        let mut tightest: Option<&Bucket> = None;
        for &i in &matched {
            let bucket = &self.descriptors[i];
            let shadow = c.descriptors[i].shadow;
            if !bucket.try_take() && !shadow {
                allowed = false;
                tightest = Some(bucket);
                break;
            }
            if tightest.is_none_or(|t| bucket.remaining() < t.remaining()) {
                tightest = Some(bucket);
            }
        }
        if allowed
            && (matched.is_empty() || c.always_consume_default)
            && let Some(default) = &self.default
        {
            if !default.try_take() {
                allowed = false;
                tightest = Some(default);
            } else if tightest.is_none() {
                tightest = Some(default);
            }
        }
        let rate_headers = |b: Option<&Bucket>| -> Vec<(String, String)> {
            match (c.x_ratelimit_headers, b) {
                (true, Some(b)) => vec![
                    ("x-ratelimit-limit".into(), b.max_tokens().to_string()),
                    ("x-ratelimit-remaining".into(), b.remaining().to_string()),
                    ("x-ratelimit-reset".into(), b.reset_secs().to_string()),
                ],
                _ => Vec::new(),
            }
        };
        if allowed {
            self.stats.count(&c.stat_prefix, "ok");
            let response_headers = rate_headers(tightest);
            return if response_headers.is_empty() {
                Verdict::Continue
            } else {
                Verdict::ContinueWith {
                    request_headers: Vec::new(),
                    response_headers,
                }
            };
        }
        self.stats.count(&c.stat_prefix, "rate_limited");
        if !c.enforced.admits(fastrand::u32(0..c.enforced.denominator)) {
            return Verdict::ContinueWith {
                request_headers: c.request_headers_when_not_enforced.clone(),
                response_headers: Vec::new(),
            };
        }
        self.stats.count(&c.stat_prefix, "enforced");
        let mut headers: Vec<(String, String)> = c
            .response_headers
            .iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect();
        headers.extend(rate_headers(tightest));
        if c.retry_after
            && let Some(b) = tightest
        {
            headers.push(("retry-after".into(), b.reset_secs().max(1).to_string()));
        }
        let _ = grpc;
        if tracing::enabled!(tracing::Level::DEBUG) {
            tracing::debug!(
                stat_prefix = %c.stat_prefix,
                descriptor = tightest.is_some(),
                peer = %a.peer,
                path = a.http.map(|h| h.path),
                "local_ratelimit: rate limited (429)"
            );
        }
        Verdict::Deny(Denial {
            status: c.status,
            body: "local_rate_limited",
            flag: "RL",
            details: "local_rate_limited".into(),
            // RESOURCE_EXHAUSTED (8) or UNAVAILABLE (14).
            grpc_status: if c.resource_exhausted { 8 } else { 14 },
            headers,
        })
    }
}

/// A configured descriptor matches a request descriptor with the same keys in order and
/// equal values (an empty configured value matches any value).
fn entries_match(config: &[(String, String)], request: &[(String, String)]) -> bool {
    config.len() == request.len()
        && config
            .iter()
            .zip(request)
            .all(|((ck, cv), (rk, rv))| ck == rk && (cv.is_empty() || cv == rv))
}
