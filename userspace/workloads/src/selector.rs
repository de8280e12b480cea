//! Kubernetes equality-based label selectors (`k=v`, `k==v`, `k!=v`, `k`, `!k`, comma =
//! AND), which is how the agent config says which namespaces get the mesh.
use std::{collections::BTreeMap, fmt, str::FromStr};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A parsed selector. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LabelSelector(Vec<Requirement>);

/// Why a selector did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid label selector {selector:?}: {reason}")]
pub struct SelectorError {
    selector: String,
    reason: String,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

impl FromStr for LabelSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| SelectorError {
            selector: s.to_owned(),
            reason: reason.to_owned(),
        };
        let mut reqs = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let req = if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(k.trim().to_owned(), v.trim().to_owned())
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::NotExists(k.trim().to_owned())
            } else {
                Requirement::Exists(term.to_owned())
            };
            let (Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k)) = &req;
            if k.is_empty() || k.contains(char::is_whitespace) || k.contains(['=', '!']) {
                return Err(err("a requirement needs a label key"));
            }
            reqs.push(req);
        }
        Ok(Self(reqs))
    }
}

impl fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self
            .0
            .iter()
            .map(|r| match r {
                Requirement::Equals(k, v) => format!("{k}={v}"),
                Requirement::NotEquals(k, v) => format!("{k}!={v}"),
                Requirement::Exists(k) => k.clone(),
                Requirement::NotExists(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&terms.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn default_selector() {
        let s: LabelSelector = "nodemesh.io/acceleration=enabled".parse().expect("parse");
        assert!(s.matches(&labels(&[("nodemesh.io/acceleration", "enabled")])));
        assert!(!s.matches(&labels(&[("nodemesh.io/acceleration", "disabled")])));
        assert!(!s.matches(&labels(&[])));
    }

    #[test]
    fn all_operators_and_conjunction() {
        let s: LabelSelector = "a==1, b!=2, c, !d".parse().expect("parse");
        assert!(s.matches(&labels(&[("a", "1"), ("c", "")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("b", "2"), ("c", "")])));
        assert!(!s.matches(&labels(&[("a", "1"), ("c", ""), ("d", "x")])));
        assert_eq!(s.to_string(), "a=1,b!=2,c,!d");
    }

    #[test]
    fn empty_matches_everything_and_garbage_is_rejected() {
        assert!(LabelSelector::default().matches(&labels(&[])));
        assert!("=x".parse::<LabelSelector>().is_err());
        assert!("a b".parse::<LabelSelector>().is_err());
    }
}
