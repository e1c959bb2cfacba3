//! The one status table: every way a call fails, as a [`Failure`] value
//! (code, reason, metadata, retry delay, message, violations), one arm per
//! case, in the order a call meets them. What the upstream's own codes mean
//! is `upstream_codes`; rendering a failure is `Failure::into_status`.

use std::time::Duration;

use super::CallError;
use super::failure::Failure;
use super::reasons::GatewayReason as Reason;
use super::upstream_codes;
use crate::credentials::Refusal as Credentials;
use crate::deadline::TimeoutBound;
use crate::idempotency::METADATA_KEY as IDEMPOTENCY_KEY;
use crate::idempotency::step::Refusal as Idempotency;
use crate::limits::{RequestTooLarge, SHED_RETRY_DELAY};
use crate::units::format_millis as millis;
use crate::upstream::{Fault, UNREACHABLE_RETRY_DELAY, UpstreamError as Upstream};

impl CallError {
    /// What this error's status says; `rpc` names the call in messages.
    pub fn failure(&self, rpc: &str) -> Failure<'_> {
        match self {
            // ---- admission and size
            Self::Overloaded { max_in_flight } => Failure::gateway(
                Reason::OVERLOADED,
                format!("gateway overloaded: {max_in_flight} calls in flight (--max-in-flight)"),
            )
            .with("max_in_flight", max_in_flight.to_string())
            .retry_after(SHED_RETRY_DELAY),
            Self::RequestTooLarge(RequestTooLarge { declared, limit }) => Failure::gateway(
                Reason::REQUEST_TOO_LARGE,
                format!(
                    "request message of {declared} bytes exceeds the limit of {limit} bytes \
                     (--max-request-bytes)"
                ),
            )
            .with("size", declared.to_string())
            .with("limit", limit.to_string()),

            // ---- credentials
            Self::Credentials(Credentials::MissingApiKey) => {
                Failure::gateway(Reason::MISSING_API_KEY, "missing api-key metadata")
            }
            Self::Credentials(Credentials::CallerNotAllowed { identity: None }) => {
                Failure::gateway(
                    Reason::CALLER_NOT_ALLOWED,
                    "the client certificate names no caller identity",
                )
            }
            Self::Credentials(Credentials::CallerNotAllowed {
                identity: Some(identity),
            }) => Failure::gateway(
                Reason::CALLER_NOT_ALLOWED,
                format!("caller {identity} is not in --credentials"),
            )
            .with("caller", identity.as_str()),
            Self::Credentials(Credentials::OrganizationNotAllowed { identity }) => {
                Failure::gateway(
                    Reason::ORGANIZATION_NOT_ALLOWED,
                    format!("caller {identity} may not act for this organization-id"),
                )
                .with("caller", identity.as_str())
            }
            Self::Credentials(Credentials::MissingOrganizationId) => Failure::gateway(
                Reason::MISSING_ORGANIZATION_ID,
                "missing organization-id metadata",
            ),

            // ---- request fields
            Self::InvalidRequest(violations) => invalid_request(
                violations
                    .iter()
                    .map(|v| (v.field, v.description.as_str()))
                    .collect(),
            ),

            // ---- the tenant's fair share
            Self::TenantOverShare(over) => {
                let tenant = match over.unverified {
                    true => {
                        "the organizations Gormic has not accepted a call for yet, which \
                             share one tenant,"
                    }
                    false => "this tenant",
                };
                let failure = Failure::gateway(
                    Reason::TENANT_OVER_SHARE,
                    format!(
                        "gateway busy: {tenant} already has {} calls in flight, its fair share \
                         of --max-in-flight between the {} tenants with calls in flight; \
                         nothing was sent",
                        over.in_flight, over.tenants
                    ),
                )
                .with("share", over.share.to_string())
                .with("tenant_in_flight", over.in_flight.to_string())
                .with("tenants", over.tenants.to_string())
                .retry_after(SHED_RETRY_DELAY);
                match over.unverified {
                    true => failure.with("unverified", "true"),
                    false => failure,
                }
            }

            // ---- quotas
            Self::Quota(refused) => {
                let description = refused.description();
                let message = match refused.store_unavailable {
                    false => format!("quota exceeded for {}: {description}", refused.subject),
                    true => format!("quota of {} not checked: {description}", refused.subject),
                };
                let failure = Failure::gateway(Reason::QUOTA_EXCEEDED, message)
                    .with("quota_subject", refused.subject.as_str())
                    .with(
                        "calls_per_second",
                        refused.limit.calls_per_second.to_string(),
                    )
                    .with("burst", refused.limit.burst.to_string())
                    .retry_after(refused.retry_after)
                    .quota_violation(refused.subject.as_str(), description);
                match refused.store_unavailable {
                    true => failure.with("quota_store", "unavailable"),
                    false => failure,
                }
            }

            // ---- the idempotency key
            Self::Idempotency(Idempotency::InvalidKey(description)) => {
                invalid_request(vec![(IDEMPOTENCY_KEY, description.as_str())])
            }
            Self::Idempotency(Idempotency::Reused) => Failure::gateway(
                Reason::IDEMPOTENCY_KEY_REUSED,
                format!(
                    "idempotency-key was used before for another {rpc} request; nothing was sent"
                ),
            )
            .violation(IDEMPOTENCY_KEY, "was used before with a different request"),
            Self::Idempotency(Idempotency::InProgress { retry_after }) => Failure::gateway(
                Reason::IDEMPOTENCY_KEY_IN_PROGRESS,
                "a call with this idempotency-key is still in progress; retry after the delay",
            )
            .retry_after(*retry_after),
            Self::Idempotency(Idempotency::OutcomeUnknown) => Failure::gateway(
                Reason::IDEMPOTENCY_OUTCOME_UNKNOWN,
                "an earlier call with this idempotency-key reached the upstream and its outcome \
                 is unknown: check the invoice's state, then use a new key",
            ),
            Self::Idempotency(Idempotency::StoreUnavailable(refusal)) => {
                let failure = Failure::gateway(
                    Reason::IDEMPOTENCY_STORE_UNAVAILABLE,
                    format!(
                        "idempotency store unavailable: {}; nothing was sent",
                        refusal.detail
                    ),
                )
                .with("detail", refusal.detail.as_str())
                .with("request_sent", "false");
                let failure = match refusal.wait_shortfall {
                    true => failure.with("wait_shortfall", "true"),
                    false => failure,
                };
                match refusal.retry_after {
                    Some(delay) => failure.retry_after(delay),
                    None => failure,
                }
            }
            Self::Idempotency(Idempotency::StoreFull) => Failure::gateway(
                Reason::IDEMPOTENCY_STORE_FULL,
                "idempotency store full; nothing was sent",
            )
            .retry_after(SHED_RETRY_DELAY),

            // ---- the upstream
            Self::Upstream(Upstream::RateLimited { retry_after }) => Failure::gateway(
                Reason::UPSTREAM_RATE_LIMITED,
                format!(
                    "the upstream rate-limited this api-key and organization-id: calls with \
                     them are refused until its cooldown ends, in {}; nothing was sent",
                    millis(*retry_after)
                ),
            )
            .with("request_sent", "false")
            .retry_after(*retry_after),
            Self::Upstream(Upstream::QueueFull) => Failure::gateway(
                Reason::UPSTREAM_QUEUE_FULL,
                "every upstream connection is busy and the queue for one is full \
                 (--upstream-max-connections, --upstream-max-pending)",
            )
            .retry_after(SHED_RETRY_DELAY),
            Self::Upstream(Upstream::Timeout {
                after,
                bound,
                request_sent: false,
            }) => Failure::gateway(
                Reason::UPSTREAM_CONNECTION_TIMEOUT,
                format!(
                    "no upstream connection became available for {rpc} within {}; \
                     nothing was sent",
                    millis(*after)
                ),
            )
            .with("bound", bound.as_str())
            .with("timeout_ms", after.as_millis().to_string())
            .with("request_sent", "false"),
            Self::Upstream(Upstream::Rejected(rejection)) => upstream_codes::rejected(rejection),
            Self::Upstream(Upstream::Malformed {
                http_status,
                detail,
                request_id,
            }) => Failure::gateway(
                Reason::MALFORMED_UPSTREAM_RESPONSE,
                format!("malformed upstream answer to {detail}"),
            )
            .with("http_status", http_status.to_string())
            .with("detail", detail.as_str())
            .upstream_request_id(request_id.as_deref()),
            Self::Upstream(Upstream::Timeout {
                after,
                bound,
                request_sent: true,
            }) => Failure::gateway(
                Reason::UPSTREAM_TIMEOUT,
                match bound {
                    TimeoutBound::CallerDeadline => format!(
                        "upstream did not answer {rpc} within the caller's deadline of {}",
                        millis(*after)
                    ),
                    TimeoutBound::UpstreamTimeout => format!(
                        "upstream did not answer {rpc} within {} (--upstream-timeout)",
                        millis(*after)
                    ),
                },
            )
            .with("bound", bound.as_str())
            .with("timeout_ms", after.as_millis().to_string())
            .with("request_sent", "true"),
            Self::Upstream(Upstream::Unreachable {
                detail,
                fault,
                request_sent,
            }) => {
                let failure = Failure::gateway(
                    Reason::UPSTREAM_UNAVAILABLE,
                    match fault {
                        Fault::Deadline => format!("upstream unreachable in time: {detail}"),
                        _ => format!("upstream unreachable: {detail}"),
                    },
                )
                .with("detail", detail.as_str())
                .with("request_sent", request_sent.to_string());
                if *request_sent {
                    failure
                } else {
                    // Nothing was sent: a retry cannot repeat a side effect.
                    failure.retry_after(UNREACHABLE_RETRY_DELAY)
                }
            }
            Self::Upstream(Upstream::CircuitOpen { retry_after }) => Failure::gateway(
                Reason::UPSTREAM_UNAVAILABLE,
                format!(
                    "upstream unreachable: the circuit breaker is open after consecutive \
                     failures to reach it; nothing was sent, next probe in {}",
                    millis(*retry_after)
                ),
            )
            .with("breaker", "open")
            .with("request_sent", "false")
            .retry_after((*retry_after).max(Duration::from_millis(1))),
            Self::Upstream(Upstream::Internal { detail }) => Failure::gateway(
                Reason::GATEWAY_INTERNAL,
                format!("gateway error in {rpc}: {detail}"),
            )
            .with("detail", detail.as_str()),
        }
    }
}

/// `INVALID_REQUEST`: each field in `BadRequest`, and all of them in the
/// message (`invalid request: order_id is required; type ...`).
fn invalid_request<'a>(violations: Vec<(&'static str, &'a str)>) -> Failure<'a> {
    let mut message = String::from("invalid request:");
    for (i, (field, description)) in violations.iter().enumerate() {
        message.push_str(if i == 0 { " " } else { "; " });
        message.push_str(field);
        message.push(' ');
        message.push_str(description);
    }
    Failure {
        violations,
        ..Failure::gateway(Reason::INVALID_REQUEST, message)
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::limits::{OverShare, ShedReason};

    #[test]
    fn a_tenant_over_its_share_is_told_its_share_and_when_to_retry() {
        let over = |unverified| {
            CallError::TenantOverShare(OverShare {
                share: 7,
                in_flight: 9,
                tenants: 2,
                unverified,
            })
        };
        let error = over(false);
        let failure = error.failure("CloseInvoice");
        assert_eq!(failure.code, Code::ResourceExhausted);
        assert_eq!(failure.reason, "TENANT_OVER_SHARE");
        assert_eq!(failure.retry_delay, Some(SHED_RETRY_DELAY));
        let metadata = |failure: &Failure<'_>, key: &str| failure.metadata.get(key).cloned();
        assert_eq!(metadata(&failure, "share").as_deref(), Some("7"));
        assert_eq!(metadata(&failure, "tenant_in_flight").as_deref(), Some("9"));
        assert_eq!(metadata(&failure, "tenants").as_deref(), Some("2"));
        assert_eq!(metadata(&failure, "unverified"), None);
        assert!(
            failure
                .message
                .contains("this tenant already has 9 calls in flight")
                && failure.message.contains("nothing was sent"),
            "{}",
            failure.message
        );
        assert_eq!(over(false).shed_reason(), Some(ShedReason::FairShare));

        let error = over(true);
        let pooled = error.failure("CloseInvoice");
        assert_eq!(metadata(&pooled, "unverified").as_deref(), Some("true"));
        assert!(
            pooled.message.contains("not accepted a call for yet"),
            "{}",
            pooled.message
        );
    }
}
