//! The calls' series, recorded once per call by `CallEnd`:
//! `gormic_gateway_calls_total{rpc_method, rpc_grpc_status_code}` (with
//! `organization` under `--metrics-organization-label`) and
//! `gormic_gateway_call_duration_seconds{rpc_method}`. The list of RPCs is
//! `routes::ALL`, generated from the proto: nothing here names an RPC.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::metrics::{CachedFamily, MetricsArgs, RpcLatency, Series};
use crate::routes::{self, Route};

/// Most distinct organizations counted with `--metrics-organization-label`;
/// calls of further organizations are counted under `_other`. Each
/// organization adds up to 85 series (5 RPCs × 17 codes).
pub const MAX_ORGANIZATIONS: usize = 1000;

/// Longest organization id used as a label value; longer ones, or ones with
/// characters outside `A-Z a-z 0-9 . _ : -` (or not starting with a letter
/// or digit), are counted under `_invalid`.
pub const MAX_ORGANIZATION_ID_BYTES: usize = 64;

/// How many RPCs the service has (the per-RPC caches' size).
const RPCS: usize = routes::ALL.len();

/// `rpc_grpc_status_code` values: the numeric code, as the OpenTelemetry
/// convention has it.
const GRPC_CODES: [&str; 17] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    rpc_method: &'static str,
    rpc_grpc_status_code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrganizationCallLabels {
    rpc_method: &'static str,
    rpc_grpc_status_code: &'static str,
    organization: Arc<str>,
}

/// The calls' series; registered with [`Metrics::series`](crate::metrics::Metrics::series).
#[derive(Debug)]
pub struct CallMetrics {
    calls: Calls,
    duration: RpcLatency,
}

/// `gormic_gateway_calls_total`, with or without the organization label.
#[derive(Debug)]
enum Calls {
    /// Cached at `rpc index * 17 + code`.
    Plain(CachedFamily<CallLabels, Counter>),
    ByOrganization {
        family: Family<OrganizationCallLabels, Counter>,
        organizations: Organizations,
    },
}

impl Series for CallMetrics {
    fn register(registry: &mut Registry, args: &MetricsArgs) -> Self {
        let calls = if args.metrics_organization_label {
            let family = Family::<OrganizationCallLabels, Counter>::default();
            registry.register(
                "gormic_gateway_calls",
                "gRPC calls answered, by RPC, gRPC status code and organization",
                family.clone(),
            );
            Calls::ByOrganization {
                family,
                organizations: Organizations::new(),
            }
        } else {
            let calls = CachedFamily::new(RPCS * GRPC_CODES.len());
            registry.register(
                "gormic_gateway_calls",
                "gRPC calls answered, by RPC and gRPC status code",
                calls.family().clone(),
            );
            Calls::Plain(calls)
        };

        let duration = RpcLatency::new(RPCS);
        duration.register(
            registry,
            "gormic_gateway_call_duration",
            "Time from a call's arrival to its answer, by RPC",
        );
        Self { calls, duration }
    }
}

impl CallMetrics {
    /// An admitted call was answered with `code` after `elapsed` (calls
    /// refused at admission are counted by `limits::ShedMetrics` alone).
    /// `organization` is the organization-id sent upstream for it; it is
    /// used only with `--metrics-organization-label`, and never for
    /// UNAUTHENTICATED calls (a caller that did not authenticate could claim
    /// any organization).
    pub fn call_finished(
        &self,
        route: &'static Route,
        code: tonic::Code,
        elapsed: Duration,
        organization: Option<&str>,
    ) {
        let rpc = route.rpc;
        let code_index = (code as usize).min(GRPC_CODES.len() - 1);
        let code_label = GRPC_CODES[code_index];
        match &self.calls {
            Calls::Plain(calls) => calls
                .get(route.index * GRPC_CODES.len() + code_index, || CallLabels {
                    rpc_method: rpc,
                    rpc_grpc_status_code: code_label,
                })
                .inc(),
            Calls::ByOrganization {
                family,
                organizations,
            } => {
                let organization = if code == tonic::Code::Unauthenticated {
                    None
                } else {
                    organization
                };
                let labels = OrganizationCallLabels {
                    rpc_method: rpc,
                    rpc_grpc_status_code: code_label,
                    organization: organizations.label(organization),
                };
                family.get_or_create(&labels).inc()
            }
        };
        self.duration.observe(route.index, rpc, elapsed);
    }
}

/// Interned organization label values, bounded by [`MAX_ORGANIZATIONS`].
#[derive(Debug)]
struct Organizations {
    known: RwLock<HashMap<Box<str>, Arc<str>>>,
    none: Arc<str>,
    other: Arc<str>,
    invalid: Arc<str>,
}

impl Organizations {
    fn new() -> Self {
        Self {
            known: RwLock::default(),
            none: Arc::from(""),
            other: Arc::from("_other"),
            invalid: Arc::from("_invalid"),
        }
    }

    /// The label value for an organization id.
    fn label(&self, organization: Option<&str>) -> Arc<str> {
        let Some(id) = organization.filter(|id| !id.is_empty()) else {
            return self.none.clone();
        };
        if !valid_organization_id(id) {
            return self.invalid.clone();
        }
        let read = self
            .known
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(label) = read.get(id) {
            return label.clone();
        }
        drop(read);
        let mut write = self
            .known
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(label) = write.get(id) {
            return label.clone();
        }
        if write.len() >= MAX_ORGANIZATIONS {
            return self.other.clone();
        }
        let label: Arc<str> = Arc::from(id);
        write.insert(Box::from(id), label.clone());
        label
    }
}

fn valid_organization_id(id: &str) -> bool {
    id.len() <= MAX_ORGANIZATION_ID_BYTES
        && id.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::metrics::tests::sample;

    #[test]
    fn calls_by_rpc_and_code_with_latency() {
        let metrics = Metrics::default();
        let calls = metrics.series::<CallMetrics>();
        calls.call_finished(
            &routes::CLOSE_INVOICE,
            tonic::Code::Ok,
            Duration::from_millis(3),
            None,
        );
        calls.call_finished(
            &routes::CLOSE_INVOICE,
            tonic::Code::Ok,
            Duration::from_millis(3),
            None,
        );
        calls.call_finished(
            &routes::CLOSE_INVOICE,
            tonic::Code::FailedPrecondition,
            Duration::from_micros(90),
            Some("org-1"),
        );
        let text = metrics.encode();
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_calls_total{rpc_method="CloseInvoice",rpc_grpc_status_code="0"}"#
            )
            .as_deref(),
            Some("2")
        );
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_calls_total{rpc_method="CloseInvoice",rpc_grpc_status_code="9"}"#
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_call_duration_seconds_bucket{rpc_method="CloseInvoice",le="0.0001"}"#
            )
            .as_deref(),
            Some("1")
        );
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_call_duration_seconds_bucket{rpc_method="CloseInvoice",le="0.005"}"#
            )
            .as_deref(),
            Some("3")
        );
        assert_eq!(
            sample(
                &text,
                r#"gormic_gateway_call_duration_seconds_count{rpc_method="CloseInvoice"}"#
            )
            .as_deref(),
            Some("3")
        );
        assert!(!text.contains("org-1"), "{text}");
    }

    #[test]
    fn every_rpc_of_the_route_table_has_its_series_and_cache_slot() {
        let metrics = Metrics::default();
        let calls = metrics.series::<CallMetrics>();
        for route in routes::ALL {
            calls.call_finished(route, tonic::Code::Ok, Duration::ZERO, None);
        }
        let text = metrics.encode();
        for route in routes::ALL {
            let calls = format!(
                r#"gormic_gateway_calls_total{{rpc_method="{}",rpc_grpc_status_code="0"}}"#,
                route.rpc
            );
            assert_eq!(sample(&text, &calls).as_deref(), Some("1"), "{calls}");
        }
    }

    #[test]
    fn organizations_are_bounded_and_sanitised() {
        let metrics = Metrics::new(&MetricsArgs {
            metrics_organization_label: true,
        });
        let calls = metrics.series::<CallMetrics>();
        let ok = tonic::Code::Ok;
        let create = &routes::CREATE_INVOICE;
        for i in 0..MAX_ORGANIZATIONS + 5 {
            let id = format!("org-{i}");
            calls.call_finished(create, ok, Duration::ZERO, Some(&id));
        }
        calls.call_finished(create, ok, Duration::ZERO, Some("org-0"));
        calls.call_finished(create, ok, Duration::ZERO, Some("bad\"id"));
        calls.call_finished(create, ok, Duration::ZERO, None);
        calls.call_finished(
            create,
            tonic::Code::Unauthenticated,
            Duration::ZERO,
            Some("org-claimed"),
        );
        let text = metrics.encode();
        let series = |code: &str, org: &str| {
            sample(
                &text,
                &format!(
                    r#"gormic_gateway_calls_total{{rpc_method="CreateInvoice",rpc_grpc_status_code="{code}",organization="{org}"}}"#
                ),
            )
        };
        assert_eq!(series("0", "org-0").as_deref(), Some("2"));
        assert_eq!(series("0", "org-999").as_deref(), Some("1"));
        assert_eq!(series("0", "org-1000"), None);
        assert_eq!(series("0", "_other").as_deref(), Some("5"));
        assert_eq!(series("0", "_invalid").as_deref(), Some("1"));
        assert_eq!(series("0", "").as_deref(), Some("1"));
        assert_eq!(series("16", "").as_deref(), Some("1"));
        assert!(!text.contains("org-claimed"));
    }

    #[test]
    fn organization_ids_accepted_as_labels() {
        assert!(valid_organization_id("org-1"));
        assert!(valid_organization_id(
            "3f2a9c1e-0b7d-4f4e-9a51-3c2d1e0f9a8b"
        ));
        assert!(valid_organization_id(
            &"a".repeat(MAX_ORGANIZATION_ID_BYTES)
        ));
        assert!(!valid_organization_id(
            &"a".repeat(MAX_ORGANIZATION_ID_BYTES + 1)
        ));
        assert!(!valid_organization_id("_other"));
        assert!(!valid_organization_id("a b"));
        assert!(!valid_organization_id("é"));
        assert!(!valid_organization_id(""));
    }
}
