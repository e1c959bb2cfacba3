//! A failed call as one value ([`Failure`]): everything its status says,
//! and the one function that renders it into a `tonic::Status` with its
//! `google.rpc` details (`ErrorInfo` always; `RetryInfo`, `BadRequest`,
//! `QuotaFailure`, `RequestInfo` when they apply).

use std::borrow::Cow;
use std::collections::HashMap;
use std::time::Duration;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::reasons::{GatewayReason, ReasonCode};
use super::{GATEWAY_DOMAIN, UPSTREAM_DOMAIN};

/// What a failed call's status says, before it is rendered.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure<'a> {
    pub code: Code,
    /// `ErrorInfo.reason`: one of the gateway's, or the upstream's code.
    pub reason: Cow<'a, str>,
    /// `ErrorInfo.domain`.
    pub domain: &'static str,
    /// `ErrorInfo.metadata` (`attempts` is added when rendering). Built as
    /// the map `ErrorInfo` takes, so that rendering moves it, never copies.
    pub metadata: HashMap<String, String>,
    /// `RetryInfo.retry_delay`.
    pub retry_delay: Option<Duration>,
    /// The status message.
    pub message: Cow<'a, str>,
    /// `BadRequest` field violations: (field, description).
    pub violations: Vec<(&'static str, &'a str)>,
    /// `QuotaFailure` violations: (subject, description).
    pub quota_violations: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// The upstream's request id, when it gave one: reported instead of the
    /// call's.
    pub request_id: Option<&'a str>,
}

impl<'a> Failure<'a> {
    pub fn new(
        code: Code,
        reason: impl Into<Cow<'a, str>>,
        domain: &'static str,
        message: impl Into<Cow<'a, str>>,
    ) -> Self {
        Self {
            code,
            reason: reason.into(),
            domain,
            metadata: HashMap::new(),
            retry_delay: None,
            message: message.into(),
            violations: Vec::new(),
            quota_violations: Vec::new(),
            request_id: None,
        }
    }

    /// A failure the gateway found, with its reason's status.
    pub fn gateway(reason: GatewayReason, message: impl Into<Cow<'a, str>>) -> Self {
        let code = match reason.code {
            ReasonCode::Always(code) => code,
            ReasonCode::ByHttpStatus => {
                debug_assert!(false, "{} is built with its status", reason.name);
                Code::Unknown
            }
        };
        Self::new(code, reason.name, GATEWAY_DOMAIN, message)
    }

    /// A failure the upstream reported with an error code of its own.
    pub fn upstream(code: Code, reason: Cow<'a, str>, message: impl Into<Cow<'a, str>>) -> Self {
        Self::new(code, reason, UPSTREAM_DOMAIN, message)
    }

    /// Adds `key` to `ErrorInfo.metadata`.
    pub fn with(mut self, key: &'static str, value: impl Into<String>) -> Self {
        self.metadata.insert(key.to_owned(), value.into());
        self
    }

    /// Suggests retrying after `delay` (`RetryInfo`).
    pub fn retry_after(mut self, delay: Duration) -> Self {
        self.retry_delay = Some(delay);
        self
    }

    /// Adds a `BadRequest` field violation.
    pub fn violation(mut self, field: &'static str, description: &'a str) -> Self {
        self.violations.push((field, description));
        self
    }

    /// Adds a `QuotaFailure` violation: the quota's subject and its limit.
    pub fn quota_violation(
        mut self,
        subject: impl Into<Cow<'a, str>>,
        description: impl Into<Cow<'a, str>>,
    ) -> Self {
        self.quota_violations
            .push((subject.into(), description.into()));
        self
    }

    /// The upstream's request id, reported instead of the call's.
    pub fn upstream_request_id(mut self, id: Option<&'a str>) -> Self {
        self.request_id = id;
        self
    }

    /// The status, with the call's `request_id` (unless the upstream gave
    /// its own) and `attempts` (upstream requests made, when any was tried).
    pub fn into_status(self, request_id: Option<&str>, attempts: Option<u32>) -> Status {
        let mut details = ErrorDetails::new();
        let mut metadata = self.metadata;
        if let Some(attempts) = attempts {
            metadata.insert("attempts".to_owned(), attempts.to_string());
        }
        details.set_error_info(self.reason.into_owned(), self.domain, metadata);
        if let Some(delay) = self.retry_delay {
            details.set_retry_info(Some(delay));
        }
        for (field, description) in self.violations {
            details.add_bad_request_violation(field, description);
        }
        for (subject, description) in self.quota_violations {
            details.add_quota_failure_violation(subject, description);
        }
        if let Some(id) = self.request_id.or(request_id) {
            details.set_request_info(id, "");
        }
        Status::with_error_details(self.code, self.message, details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_renders_every_detail_once() {
        let failure = Failure::gateway(GatewayReason::INVALID_REQUEST, "invalid request: x y")
            .with("detail", "d")
            .retry_after(Duration::from_millis(1500))
            .violation("x", "y")
            .violation("z", "w");
        let status = failure.clone().into_status(Some("call-1"), Some(2));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid request: x y");
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(info.reason, "INVALID_REQUEST");
        assert_eq!(info.domain, GATEWAY_DOMAIN);
        let metadata: Vec<_> = {
            let mut m: Vec<_> = info.metadata.iter().collect();
            m.sort();
            m
        };
        assert_eq!(
            metadata,
            [
                (&"attempts".to_owned(), &"2".to_owned()),
                (&"detail".to_owned(), &"d".to_owned())
            ]
        );
        let retry = details.retry_info().expect("RetryInfo");
        assert_eq!(retry.retry_delay, Some(Duration::from_millis(1500)));
        let violations = &details.bad_request().expect("BadRequest").field_violations;
        let fields: Vec<_> = violations
            .iter()
            .map(|v| (v.field.as_str(), v.description.as_str()))
            .collect();
        assert_eq!(fields, [("x", "y"), ("z", "w")]);
        assert_eq!(
            details.request_info().expect("RequestInfo").request_id,
            "call-1"
        );

        // The upstream's request id wins; without attempts or an id, none.
        let upstream = failure.clone().upstream_request_id(Some("up-1"));
        let details = upstream
            .into_status(Some("call-1"), None)
            .get_error_details();
        assert_eq!(
            details.request_info().expect("RequestInfo").request_id,
            "up-1"
        );
        assert!(
            !details
                .error_info()
                .expect("ErrorInfo")
                .metadata
                .contains_key("attempts")
        );
        let details = failure.into_status(None, None).get_error_details();
        assert!(details.request_info().is_none());
    }

    #[test]
    fn a_quota_failure_renders_its_subject_and_description() {
        let status = Failure::gateway(GatewayReason::QUOTA_EXCEEDED, "quota exceeded")
            .quota_violation(
                "organization:org-1",
                "20 calls per second, burst 40 (--quotas)",
            )
            .into_status(None, None);
        let details = status.get_error_details();
        let violations = &details.quota_failure().expect("QuotaFailure").violations;
        assert_eq!(violations.len(), 1);
        assert_eq!(violations[0].subject, "organization:org-1");
        assert_eq!(
            violations[0].description,
            "20 calls per second, burst 40 (--quotas)"
        );
        let status =
            Failure::gateway(GatewayReason::OVERLOADED, "overloaded").into_status(None, None);
        assert!(status.get_error_details().quota_failure().is_none());
    }
}
