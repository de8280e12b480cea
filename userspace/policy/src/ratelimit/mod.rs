//! Local rate limits: token buckets ([`bucket`]), the descriptors a request makes
//! ([`descriptors`]), and the `local_ratelimit` filter's decision ([`local`]).
pub mod bucket;
pub mod descriptors;
pub mod local;
