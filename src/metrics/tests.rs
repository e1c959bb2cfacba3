//! The registry's own series and flags; each component's series are tested
//! beside the component.

use std::time::{Duration, UNIX_EPOCH};

use super::*;

/// The value of one series, exactly as written in the exposition.
pub(crate) fn sample(text: &str, series: &str) -> Option<String> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map(str::to_owned)
}

#[test]
fn the_organization_flag() {
    use clap::{CommandFactory, Parser};
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        metrics: MetricsArgs,
    }
    Cli::command().debug_assert();
    let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.metrics);
    assert!(!parse(&["gw"]).expect("valid").metrics_organization_label);
    assert!(
        parse(&["gw", "--metrics-organization-label"])
            .expect("valid")
            .metrics_organization_label
    );
}

#[test]
fn handles_travel_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Metrics>();
}

#[test]
fn a_series_is_registered_once_per_registry() {
    struct Probe(prometheus_client::metrics::counter::Counter);
    impl Series for Probe {
        fn register(registry: &mut Registry, _: &MetricsArgs) -> Self {
            let counter = prometheus_client::metrics::counter::Counter::default();
            registry.register("probe", "A probe", counter.clone());
            Self(counter)
        }
    }
    let metrics = Metrics::default();
    metrics.series::<Probe>().0.inc();
    metrics.clone().series::<Probe>().0.inc();
    let text = metrics.encode();
    assert_eq!(sample(&text, "probe_total").as_deref(), Some("2"));
    assert_eq!(text.matches("# TYPE probe_total counter").count(), 1);
    assert_eq!(sample(&Metrics::default().encode(), "probe_total"), None);
}

#[test]
fn tls_expiry_appears_once_set() {
    let metrics = Metrics::default();
    let name = "gormic_gateway_tls_certificate_expiry_timestamp_seconds";
    assert!(!metrics.encode().contains(name));
    metrics.set_tls_certificate_expiry(UNIX_EPOCH + Duration::from_secs(1_900_000_000));
    assert_eq!(
        sample(&metrics.encode(), name).as_deref(),
        Some("1900000000")
    );
}

#[test]
fn dropped_log_lines_from_reports_and_a_source() {
    let metrics = Metrics::default();
    let name = "gormic_gateway_log_lines_dropped_total";
    assert_eq!(sample(&metrics.encode(), name).as_deref(), Some("0"));
    metrics.log_lines_dropped(2);
    assert!(metrics.count_log_lines_dropped_from(|| 40));
    assert!(!metrics.count_log_lines_dropped_from(|| 1));
    assert_eq!(sample(&metrics.encode(), name).as_deref(), Some("42"));
}

#[test]
fn build_info_names_version_and_commit() {
    let text = Metrics::default().encode();
    let expected = format!(
        r#"gormic_gateway_build_info{{version="{}",git_commit="{}"}} 1"#,
        env!("CARGO_PKG_VERSION"),
        GIT_COMMIT
    );
    assert!(text.lines().any(|l| l == expected), "{text}");
}
