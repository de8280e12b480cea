//! The decisions' counters, on the admin port next to the proxy's own.
//!
//! Labels are configuration names (filter, policy, quota): their number is bounded by the
//! configuration, never by traffic.
use nodemesh_config::filters::rbac::Action;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RbacLabels {
    filter: String,
    action: &'static str,
    /// The matched policy, or `none`.
    policy: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    stat_prefix: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaLabels {
    quota: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuotaName {
    quota: String,
}

/// Every family of the policy crate.
#[derive(Clone, Debug, Default)]
pub struct PolicyStats {
    pub rbac: RbacStats,
    pub ratelimit: RateLimitStats,
    pub quota: QuotaStats,
}

impl PolicyStats {
    pub fn register(registry: &mut Registry) -> Self {
        let s = Self::default();
        let r = registry.sub_registry_with_prefix("nodemesh");
        r.register(
            "rbac_decisions",
            "RBAC decisions by filter, action, matched policy and result (allowed, denied, \
             shadow_allowed, shadow_denied)",
            s.rbac.decisions.clone(),
        );
        r.register(
            "local_ratelimit",
            "local_ratelimit decisions by stat_prefix: ok, rate_limited, enforced",
            s.ratelimit.decisions.clone(),
        );
        r.register(
            "quota_requests",
            "Global quota decisions: allowed, denied (quota spent), fail_open, fail_closed",
            s.quota.decisions.clone(),
        );
        r.register(
            "quota_leases",
            "Lease requests to Redis: granted, exhausted (window spent), error",
            s.quota.leases.clone(),
        );
        r.register(
            "quota_lease_tokens",
            "Tokens this proxy holds on lease, by quota",
            s.quota.tokens.clone(),
        );
        s
    }
}

#[derive(Clone, Debug, Default)]
pub struct RbacStats {
    decisions: Family<RbacLabels, Counter>,
}

impl RbacStats {
    pub fn decision(&self, filter: &str, action: Action, policy: Option<&str>, allowed: bool) {
        self.decisions
            .get_or_create(&RbacLabels {
                filter: filter.to_owned(),
                action: action.as_str(),
                policy: policy.unwrap_or("none").to_owned(),
                result: if allowed { "allowed" } else { "denied" },
            })
            .inc();
    }

    pub fn shadow(&self, filter: &str, policy: Option<&str>, allowed: bool) {
        self.decisions
            .get_or_create(&RbacLabels {
                filter: filter.to_owned(),
                action: "SHADOW",
                policy: policy.unwrap_or("none").to_owned(),
                result: if allowed {
                    "shadow_allowed"
                } else {
                    "shadow_denied"
                },
            })
            .inc();
    }
}

#[derive(Clone, Debug, Default)]
pub struct RateLimitStats {
    decisions: Family<LimitLabels, Counter>,
}

impl RateLimitStats {
    pub fn count(&self, stat_prefix: &str, result: &'static str) {
        self.decisions
            .get_or_create(&LimitLabels {
                stat_prefix: stat_prefix.to_owned(),
                result,
            })
            .inc();
    }
}

#[derive(Clone, Debug, Default)]
pub struct QuotaStats {
    decisions: Family<QuotaLabels, Counter>,
    leases: Family<QuotaLabels, Counter>,
    tokens: Family<QuotaName, Gauge>,
}

impl QuotaStats {
    pub fn decision(&self, quota: &str, result: &'static str) -> Counter {
        self.decisions
            .get_or_create(&QuotaLabels {
                quota: quota.to_owned(),
                result,
            })
            .clone()
    }

    pub fn lease(&self, quota: &str, result: &'static str) {
        self.leases
            .get_or_create(&QuotaLabels {
                quota: quota.to_owned(),
                result,
            })
            .inc();
    }

    pub fn tokens(&self, quota: &str) -> Gauge {
        self.tokens
            .get_or_create(&QuotaName {
                quota: quota.to_owned(),
            })
            .clone()
    }
}
