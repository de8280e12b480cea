//! `envoy.filters.http.rbac` and `envoy.filters.network.rbac`: compiled policies and the
//! decision for one request or connection.
//!
//! Semantics are Envoy's (and so Istio's AuthorizationPolicy's, since istiod emits one RBAC
//! filter per action, DENY before ALLOW): an ALLOW filter allows what a policy matches and
//! denies the rest (`none` matched); a DENY filter denies what a policy matches; a LOG
//! filter allows everything and marks matches for the access log. Without an ALLOW filter
//! everything not denied is allowed; with one, what no ALLOW policy matches is denied.
//! Shadow rules are evaluated and reported, never enforced.
pub mod compile;
pub mod matchers;

use std::sync::Arc;

use nodemesh_config::filters::rbac::{Action, Rbac, Rules};

use crate::{Attributes, stats::RbacStats};

/// One compiled set of rules.
#[derive(Debug)]
struct Compiled {
    rules: Rules,
    index: compile::Index,
}

impl Compiled {
    fn new(rules: &Rules) -> Self {
        Self {
            index: compile::Index::build(&rules.policies),
            rules: rules.clone(),
        }
    }

    /// The first policy (in name order) that matches, with the permission and principal
    /// of it that matched first (for the operator: which rule of the policy decided).
    fn first_match(&self, a: &Attributes<'_>) -> Option<Match<'_>> {
        const NONE: &[u32] = &[];
        let by_port = self
            .index
            .by_port
            .get(&a.destination.port())
            .map_or(NONE, Vec::as_slice);
        let by_principal = a
            .principal
            .and_then(|p| self.index.by_principal.get(p))
            .map_or(NONE, Vec::as_slice);
        compile::merged([by_port, by_principal, &self.index.unfiled])
            .filter_map(|i| self.rules.policies.get(i as usize))
            .find_map(|p| {
                let permission = p
                    .permissions
                    .iter()
                    .position(|x| matchers::permission(x, a))?;
                let principal = p
                    .principals
                    .iter()
                    .position(|x| matchers::principal(x, a))?;
                Some(Match {
                    policy: p.name.as_str(),
                    permission,
                    principal,
                })
            })
    }
}

/// Which policy matched, and which of its permissions and principals.
#[derive(Debug, Clone, Copy)]
struct Match<'a> {
    policy: &'a str,
    permission: usize,
    principal: usize,
}

/// The outcome of one filter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Allowed {
        matched: Option<String>,
    },
    /// `policy`: the matched DENY policy, or `None` when no ALLOW policy matched.
    Denied {
        policy: Option<String>,
    },
}

impl Outcome {
    pub fn allowed(&self) -> bool {
        matches!(self, Self::Allowed { .. })
    }

    /// Envoy's response code details for a deny.
    pub fn details(&self) -> Option<String> {
        match self {
            Self::Allowed { .. } => None,
            Self::Denied { policy } => Some(format!(
                "rbac_access_denied_matched_policy[{}]",
                policy.as_deref().unwrap_or("none")
            )),
        }
    }
}

/// One RBAC filter, compiled.
#[derive(Debug)]
pub struct Engine {
    /// The filter's name (for logs).
    pub name: String,
    enforced: Option<Compiled>,
    shadow: Option<Compiled>,
    stats: RbacStats,
}

impl Engine {
    pub fn compile(name: &str, rbac: &Rbac, stats: RbacStats) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            enforced: rbac.rules.as_ref().map(Compiled::new),
            shadow: rbac.shadow.as_ref().map(Compiled::new),
            stats,
        })
    }

    /// The action of the enforced rules.
    pub fn action(&self) -> Option<Action> {
        self.enforced.as_ref().map(|c| c.rules.action)
    }

    /// Decides, counts, and reports the shadow result.
    pub fn check(&self, a: &Attributes<'_>) -> Outcome {
        if let Some(shadow) = &self.shadow {
            let matched = shadow.first_match(a).map(|m| m.policy);
            let allowed = decide(shadow.rules.action, matched).allowed();
            self.stats.shadow(&self.name, matched, allowed);
        }
        let Some(enforced) = &self.enforced else {
            return Outcome::Allowed { matched: None };
        };
        let found = enforced.first_match(a);
        let matched = found.map(|m| m.policy);
        let outcome = decide(enforced.rules.action, matched);
        self.stats.decision(
            &self.name,
            enforced.rules.action,
            matched,
            outcome.allowed(),
        );
        // Every deny is explained where an operator looks: this line names the filter, the
        // policy and the rule (which permission and principal of it matched; `none` when
        // no ALLOW policy matched), next to the response flag and the access log's
        // `response_code_details`.
        if !outcome.allowed() && tracing::enabled!(tracing::Level::DEBUG) {
            let rule = found.map_or_else(
                || "none".to_owned(),
                |m| format!("permissions[{}]/principals[{}]", m.permission, m.principal),
            );
            tracing::debug!(
                filter = %self.name,
                action = enforced.rules.action.as_str(),
                policy = matched.unwrap_or("none"),
                %rule,
                peer = %a.peer,
                remote_ip = %a.remote_ip,
                principal = a.principal.unwrap_or(""),
                destination = %a.destination,
                method = a.http.map(|h| h.method),
                path = a.http.map(|h| h.path),
                "rbac: denied"
            );
        }
        outcome
    }
}

fn decide(action: Action, matched: Option<&str>) -> Outcome {
    match (action, matched) {
        (Action::Allow, Some(p)) => Outcome::Allowed {
            matched: Some(p.to_owned()),
        },
        (Action::Allow, None) => Outcome::Denied { policy: None },
        (Action::Deny, Some(p)) => Outcome::Denied {
            policy: Some(p.to_owned()),
        },
        (Action::Deny, None) => Outcome::Allowed { matched: None },
        (Action::Log, m) => Outcome::Allowed {
            matched: m.map(str::to_owned),
        },
    }
}

#[cfg(test)]
mod tests;
