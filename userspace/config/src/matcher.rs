//! Envoy's matchers: strings, headers, query parameters, IP ranges.
//!
//! `safe_regex` is RE2 in Envoy; here it is the `regex` crate, which is also linear-time and
//! accepts RE2's syntax except for a few rarely used constructs (the regex is compiled when
//! the configuration is read, so an unsupported one is a configuration error, never a
//! surprise at request time). Regexes match the whole value, as RE2's FullMatch does.
use std::net::IpAddr;

/// `envoy.type.matcher.v3.StringMatcher`.
#[derive(Debug, Clone)]
pub struct StringMatcher {
    pub kind: StringMatch,
    pub ignore_case: bool,
}

#[derive(Debug, Clone)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Contains(String),
    /// Anchored at both ends.
    Regex(regex::Regex),
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Exact(a), Self::Exact(b))
            | (Self::Prefix(a), Self::Prefix(b))
            | (Self::Suffix(a), Self::Suffix(b))
            | (Self::Contains(a), Self::Contains(b)) => a == b,
            (Self::Regex(a), Self::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl StringMatcher {
    pub fn exact(s: impl Into<String>) -> Self {
        Self {
            kind: StringMatch::Exact(s.into()),
            ignore_case: false,
        }
    }

    /// Compiles `pattern` to match whole values.
    pub fn regex(pattern: &str) -> Result<Self, String> {
        let anchored = format!("^(?:{pattern})$");
        regex::Regex::new(&anchored)
            .map(|r| Self {
                kind: StringMatch::Regex(r),
                ignore_case: false,
            })
            .map_err(|e| format!("regex {pattern:?}: {e}"))
    }

    pub fn matches(&self, value: &str) -> bool {
        let fold = |s: &str| {
            if self.ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_owned()
            }
        };
        match &self.kind {
            StringMatch::Exact(e) => {
                if self.ignore_case {
                    value.eq_ignore_ascii_case(e)
                } else {
                    value == e
                }
            }
            StringMatch::Prefix(p) => fold(value).starts_with(&fold(p)),
            StringMatch::Suffix(s) => fold(value).ends_with(&fold(s)),
            StringMatch::Contains(c) => fold(value).contains(&fold(c)),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// `envoy.config.route.v3.HeaderMatcher`.
#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    /// Lower case; `:path`, `:method`, `:authority`, `:scheme` address the pseudo-headers.
    pub name: String,
    pub rule: HeaderRule,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

#[derive(Debug, Clone)]
pub enum HeaderRule {
    Present(bool),
    String(StringMatcher),
    /// Half-open `[start, end)` over the value parsed as an integer.
    Range(i64, i64),
}

impl HeaderMatcher {
    /// Whether the header values (all of them joined by `,`, as Envoy does) match.
    pub fn matches(&self, value: Option<&str>) -> bool {
        let value = match value {
            None if self.treat_missing_as_empty => Some(""),
            v => v,
        };
        let hit = match (&self.rule, value) {
            (HeaderRule::Present(want), v) => v.is_some() == *want,
            // Envoy: a missing header never matches a value rule, inverted or not.
            (_, None) => return false,
            (HeaderRule::String(m), Some(v)) => m.matches(v),
            (HeaderRule::Range(start, end), Some(v)) => v
                .trim()
                .parse::<i64>()
                .is_ok_and(|n| n >= *start && n < *end),
        };
        hit != self.invert
    }
}

/// `QueryParameterMatcher`.
#[derive(Debug, Clone)]
pub struct QueryMatcher {
    pub name: String,
    /// `None`: present (any value).
    pub value: Option<StringMatcher>,
}

impl QueryMatcher {
    /// `query` is the raw query string without `?`.
    pub fn matches(&self, query: &str) -> bool {
        query
            .split('&')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                (k == self.name).then_some(v)
            })
            .any(|v| self.value.as_ref().is_none_or(|m| m.matches(v)))
    }
}

/// A CIDR range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub addr: IpAddr,
    pub prefix_len: u8,
}

impl IpRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr.to_canonical(), ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let len = u32::from(self.prefix_len.min(32));
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let len = u32::from(self.prefix_len.min(128));
                let mask = if len == 0 {
                    0
                } else {
                    u128::MAX << (128 - len)
                };
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_matchers() {
        let m = |kind, ignore_case| StringMatcher { kind, ignore_case };
        assert!(m(StringMatch::Prefix("/api".into()), false).matches("/api/v1"));
        assert!(!m(StringMatch::Prefix("/API".into()), false).matches("/api/v1"));
        assert!(m(StringMatch::Prefix("/API".into()), true).matches("/api/v1"));
        assert!(m(StringMatch::Suffix(".json".into()), false).matches("a.json"));
        assert!(m(StringMatch::Contains("mid".into()), false).matches("amidb"));
        assert!(StringMatcher::exact("x").matches("x"));
        let r = StringMatcher::regex("/v[0-9]+/.*").expect("regex");
        assert!(r.matches("/v2/users"));
        assert!(!r.matches("x/v2/users"), "anchored at the start");
        assert!(StringMatcher::regex("(").is_err());
    }

    #[test]
    fn header_matchers() {
        let hm = |rule, invert, missing_empty| HeaderMatcher {
            name: "x".into(),
            rule,
            invert,
            treat_missing_as_empty: missing_empty,
        };
        assert!(hm(HeaderRule::Present(true), false, false).matches(Some("1")));
        assert!(!hm(HeaderRule::Present(true), false, false).matches(None));
        assert!(hm(HeaderRule::Present(false), false, false).matches(None));
        assert!(hm(HeaderRule::Range(10, 20), false, false).matches(Some("15")));
        assert!(!hm(HeaderRule::Range(10, 20), false, false).matches(Some("20")));
        let exact = HeaderRule::String(StringMatcher::exact("a"));
        assert!(
            hm(exact.clone(), true, false).matches(Some("b")),
            "inverted"
        );
        assert!(
            !hm(exact.clone(), false, false).matches(None),
            "missing never matches a value rule"
        );
        assert!(
            !hm(exact.clone(), true, false).matches(None),
            "nor its inversion (Envoy)"
        );
        assert!(hm(HeaderRule::String(StringMatcher::exact("")), false, true).matches(None));
    }

    #[test]
    fn query_and_ip_matchers() {
        let q = QueryMatcher {
            name: "debug".into(),
            value: Some(StringMatcher::exact("1")),
        };
        assert!(q.matches("a=b&debug=1"));
        assert!(!q.matches("debug=2"));
        assert!(
            QueryMatcher {
                name: "flag".into(),
                value: None
            }
            .matches("flag")
        );
        let r = IpRange {
            addr: "198.18.0.0".parse().expect("ip"),
            prefix_len: 15,
        };
        assert!(r.contains("198.19.255.1".parse().expect("ip")));
        assert!(!r.contains("198.20.0.1".parse().expect("ip")));
        assert!(r.contains("::ffff:198.18.0.9".parse().expect("ip")));
    }
}
