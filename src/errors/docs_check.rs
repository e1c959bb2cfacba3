//! docs/errors.md against the code, both ways, so that the two cannot
//! drift: the gateway's reasons ([`GatewayReason::ALL`]) and the upstream's
//! codes ([`UPSTREAM_CODES`]) each appear there with their status, the HTTP
//! table says what [`http_status_code`] does for every status, and the page
//! lists nothing the code lacks.

use std::collections::BTreeMap;

use super::reasons::{GatewayReason, ReasonCode};
use super::upstream_codes::{UPSTREAM_CODES, http_status_code, reason_of};
use super::{CallError, StatusContext, UPSTREAM_DOMAIN};
use crate::grpc_code;
use crate::upstream::{Rejection, UpstreamError};

const PAGE: &str = include_str!("../../docs/errors.md");

/// The rows of the table in the section whose heading starts with
/// `heading`, each a list of cells without their backticks.
fn table(heading: &str) -> Vec<Vec<String>> {
    let mut lines = PAGE.lines();
    lines
        .by_ref()
        .find(|line| {
            line.starts_with('#') && line.trim_start_matches('#').trim().starts_with(heading)
        })
        .unwrap_or_else(|| panic!("docs/errors.md has no section {heading:?}"));
    let rows: Vec<Vec<String>> = lines
        .take_while(|line| !line.starts_with('#'))
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2) // the header and its underline
        .map(|line| {
            line.trim()
                .trim_matches('|')
                .split('|')
                .map(|cell| cell.trim().replace('`', ""))
                .collect()
        })
        .collect();
    assert!(
        !rows.is_empty(),
        "no table under {heading:?} in docs/errors.md"
    );
    rows
}

/// The first `N` cells of each row, keyed by the first; a key listed twice fails.
fn keyed<const N: usize>(rows: Vec<Vec<String>>) -> BTreeMap<String, Vec<String>> {
    let mut keyed = BTreeMap::new();
    for row in rows {
        assert!(
            row.len() >= N,
            "docs/errors.md: a row with fewer than {N} cells: {row:?}"
        );
        let key = row[0].clone();
        let before = keyed.insert(key.clone(), row[1..N].to_vec());
        assert!(before.is_none(), "docs/errors.md lists {key} twice");
    }
    keyed
}

/// Fails naming what only one side has, and what they disagree on.
fn same(what: &str, docs: &BTreeMap<String, Vec<String>>, code: &BTreeMap<String, Vec<String>>) {
    let only_code: Vec<_> = code.keys().filter(|k| !docs.contains_key(*k)).collect();
    let only_docs: Vec<_> = docs.keys().filter(|k| !code.contains_key(*k)).collect();
    let differ: Vec<_> = code
        .iter()
        .filter_map(|(k, v)| docs.get(k).filter(|d| *d != v).map(|d| (k, v, d)))
        .collect();
    assert!(
        only_code.is_empty() && only_docs.is_empty() && differ.is_empty(),
        "{what}: in the code but not in docs/errors.md: {only_code:?}; \
         in docs/errors.md but not in the code: {only_docs:?}; \
         differ (key, code, docs): {differ:?}"
    );
}

#[test]
fn the_docs_list_every_gateway_reason_with_its_status_and_no_other() {
    let docs = keyed::<2>(table("Errors the gateway finds itself"));
    let code = GatewayReason::ALL
        .iter()
        .map(|reason| {
            let status = match reason.code {
                ReasonCode::Always(code) => grpc_code::name(code),
                ReasonCode::ByHttpStatus => "by HTTP status",
            };
            (reason.name.to_owned(), vec![status.to_owned()])
        })
        .collect();
    same("gateway reasons", &docs, &code);
}

#[test]
fn the_docs_list_every_upstream_code_with_its_status_and_no_other() {
    let docs = keyed::<4>(table("Upstream error codes"));
    let code = UPSTREAM_CODES
        .iter()
        .map(|&(code, status, words)| {
            let row = vec![
                reason_of(code).into_owned(),
                grpc_code::name(status).to_owned(),
                format!("{words} ({code})"),
            ];
            (code.to_owned(), row)
        })
        .collect();
    same("upstream codes", &docs, &code);
}

/// What the table says is what a call gets: each code, in a 400 body.
#[test]
fn each_upstream_code_is_answered_as_its_row_says() {
    use tonic_types::StatusExt;
    let docs = keyed::<4>(table("Upstream error codes"));
    for (code, row) in &docs {
        let error = CallError::Upstream(UpstreamError::Rejected(Box::new(Rejection {
            http_status: 400,
            code: Some(code.clone()),
            ..Default::default()
        })));
        let context = StatusContext {
            rpc: "CloseInvoice",
            request_id: None,
            attempts: None,
        };
        let (status, reason) = error.to_status_and_reason(&context);
        let details = status.get_error_details();
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(
            [
                &info.reason,
                grpc_code::name(status.code()),
                status.message()
            ],
            [&row[0], &row[1], &row[2]]
        );
        assert_eq!(reason, row[0]);
        assert_eq!(info.domain, UPSTREAM_DOMAIN);
        assert_eq!(info.metadata["upstream_code"], *code);
    }
}

#[test]
fn the_docs_http_table_says_what_every_http_status_becomes() {
    let mut exact = BTreeMap::new();
    let mut class = BTreeMap::new();
    let mut anything_else = None;
    for row in table("Upstream answers without a recognised code") {
        let (statuses, status) = (row[0].as_str(), row[1].clone());
        if statuses == "anything else" {
            assert!(
                anything_else.replace(status).is_none(),
                "two rows 'anything else'"
            );
        } else if let Some(hundreds) = statuses
            .strip_prefix("other ")
            .and_then(|c| c.strip_suffix("xx"))
        {
            let hundreds: u16 = hundreds.parse().expect("other Nxx");
            assert!(
                class.insert(hundreds, status).is_none(),
                "two rows {statuses}"
            );
        } else {
            for http in statuses.split(", ") {
                let http: u16 = http
                    .parse()
                    .unwrap_or_else(|_| panic!("HTTP status {http:?}"));
                assert!(
                    exact.insert(http, status.clone()).is_none(),
                    "{http} listed twice"
                );
            }
        }
    }
    let anything_else = anything_else.expect("a row 'anything else'");
    for http in (0..=1000).chain([u16::MAX]) {
        let documented = exact
            .get(&http)
            .or_else(|| class.get(&(http / 100)))
            .unwrap_or(&anything_else);
        assert_eq!(
            grpc_code::name(http_status_code(http)),
            documented,
            "HTTP {http}"
        );
    }
}
