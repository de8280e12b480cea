//! The `x-envoy-*` request headers with which an internal client steers the router: timeouts
//! and retries per request. Envoy honours them only on internal requests (see
//! [`crate::sanitize`]: external requests have them removed before routing) and consumes them:
//! they never reach the upstream.
use std::time::Duration;

use http::HeaderMap;
use nodemesh_config::model::{RetryOn, RetryPolicy};

/// What the steering headers of one request asked for.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Steering {
    /// `x-envoy-upstream-rq-timeout-ms` (`Some(None)`: 0, no timeout).
    pub timeout: Option<Option<Duration>>,
    /// `x-envoy-upstream-rq-per-try-timeout-ms`.
    pub per_try_timeout: Option<Duration>,
    /// `x-envoy-retry-on` and `x-envoy-retry-grpc-on`, added to the route's conditions.
    pub retry_on: RetryOn,
    /// `x-envoy-max-retries`.
    pub max_retries: Option<u32>,
    /// `x-envoy-retriable-status-codes`.
    pub retriable_status_codes: Vec<u16>,
}

/// Every header this module reads, plus those Envoy consumes without an effect nodemesh
/// implements (hedging, alternate stat names, header-based retry conditions).
const CONSUMED: &[&str] = &[
    "x-envoy-upstream-rq-timeout-ms",
    "x-envoy-upstream-rq-per-try-timeout-ms",
    "x-envoy-retry-on",
    "x-envoy-retry-grpc-on",
    "x-envoy-max-retries",
    "x-envoy-retriable-status-codes",
    "x-envoy-retriable-header-names",
    "x-envoy-hedge-on-per-try-timeout",
    "x-envoy-upstream-alt-stat-name",
    "x-envoy-upstream-rq-timeout-alt-response",
];

fn text<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

fn millis(h: &HeaderMap, name: &str) -> Option<u64> {
    text(h, name).and_then(|v| v.parse().ok())
}

/// Reads the steering headers of an internal request and removes them (and the other
/// headers Envoy's router consumes). Values that do not parse are ignored, as Envoy does.
pub(crate) fn take(h: &mut HeaderMap) -> Steering {
    let mut retry_on = RetryOn::empty();
    for name in ["x-envoy-retry-on", "x-envoy-retry-grpc-on"] {
        if let Some(v) = text(h, name) {
            // Unknown names are skipped, not fatal: the header comes from a client.
            for one in v.split(',') {
                if let Ok(on) = RetryOn::parse(one) {
                    retry_on |= on;
                }
            }
        }
    }
    let steering = Steering {
        timeout: millis(h, "x-envoy-upstream-rq-timeout-ms")
            .map(|ms| (ms > 0).then(|| Duration::from_millis(ms))),
        per_try_timeout: millis(h, "x-envoy-upstream-rq-per-try-timeout-ms")
            .filter(|ms| *ms > 0)
            .map(Duration::from_millis),
        retry_on,
        max_retries: text(h, "x-envoy-max-retries").and_then(|v| v.parse().ok()),
        retriable_status_codes: text(h, "x-envoy-retriable-status-codes")
            .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
            .unwrap_or_default(),
    };
    for name in CONSUMED {
        h.remove(*name);
    }
    steering
}

impl Steering {
    /// The retry policy of a request: the route's, with the request's conditions added and
    /// its limits applied. Without a route policy, conditions from the request make one with
    /// Envoy's defaults (one retry, 25 ms base back-off).
    pub(crate) fn retry_policy(&self, route: Option<&RetryPolicy>) -> Option<RetryPolicy> {
        let mut policy = match (route, self.retry_on.is_empty()) {
            (Some(p), _) => p.clone(),
            (None, true) => return None,
            (None, false) => RetryPolicy {
                retry_on: RetryOn::empty(),
                num_retries: 1,
                per_try_timeout: None,
                per_try_idle_timeout: None,
                retriable_status_codes: Vec::new(),
                backoff_base: Duration::from_millis(25),
                backoff_max: Duration::from_millis(250),
            },
        };
        policy.retry_on |= self.retry_on;
        if let Some(n) = self.max_retries {
            policy.num_retries = n;
        }
        if let Some(t) = self.per_try_timeout {
            policy.per_try_timeout = Some(t);
        }
        policy
            .retriable_status_codes
            .extend(self.retriable_status_codes.iter().copied());
        Some(policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_read_and_consumed() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-envoy-upstream-rq-timeout-ms", "100"),
            ("x-envoy-retry-on", "5xx,bogus"),
            ("x-envoy-retry-grpc-on", "unavailable"),
            ("x-envoy-max-retries", "3"),
            ("x-envoy-retriable-status-codes", "418, 409"),
            ("x-envoy-hedge-on-per-try-timeout", "true"),
            ("x-keep", "1"),
        ] {
            h.insert(k, v.parse().expect("value"));
        }
        let s = take(&mut h);
        assert_eq!(s.timeout, Some(Some(Duration::from_millis(100))));
        assert_eq!(s.retry_on, RetryOn::FIVE_XX | RetryOn::GRPC_UNAVAILABLE);
        assert_eq!(s.max_retries, Some(3));
        assert_eq!(s.retriable_status_codes, vec![418, 409]);
        assert_eq!(h.len(), 1, "only x-keep is left: {h:?}");
        let policy = s.retry_policy(None).expect("a policy from the headers");
        assert_eq!(policy.num_retries, 3);
    }

    #[test]
    fn no_headers_no_policy() {
        let s = take(&mut HeaderMap::new());
        assert_eq!(s, Steering::default());
        assert!(s.retry_policy(None).is_none());
    }
}
