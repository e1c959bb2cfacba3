//! The request of one call: its URL (the base URL's path, then the route's,
//! the invoice id one percent-encoded segment) and JSON body, built once
//! per call ([`Prepared`]); then, for each attempt, the HTTP request with
//! its headers (credentials, request id, trace context) and a body that
//! tells when a connection took it (`super::sent`).

use bytes::Bytes;
use http::HeaderValue;
use http::header::{CONTENT_TYPE, HeaderName};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use url::Url;

use super::error::UpstreamError;
use super::operation::Operation;
use super::sent::{SentFlag, TrackedBody};
use super::{CallContext, Upstream};
use crate::routes::Route;
use crate::trace::UpstreamSpan;

/// Everything but RFC 3986 unreserved characters (`A-Z a-z 0-9 - . _ ~`) is
/// percent-encoded, so an id is always exactly one path segment.
const PATH_SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const JSON: HeaderValue = HeaderValue::from_static("application/json");
const API_KEY: HeaderName = HeaderName::from_static("api-key");
const ORGANIZATION_ID: HeaderName = HeaderName::from_static("organization-id");
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// A request ready to be sent, as many times as the retries need.
pub(super) struct Prepared {
    pub(super) route: &'static Route,
    url: Url,
    body: Option<Bytes>,
}

impl Upstream {
    pub(super) fn prepare<Op: Operation>(
        &self,
        request: &Op::Request,
    ) -> Result<Prepared, UpstreamError> {
        let route = Op::ROUTE;
        let body = Op::body(request).map_err(|e| UpstreamError::Internal {
            detail: format!("cannot encode the request body: {e}"),
        })?;
        debug_assert_eq!(
            body.is_some(),
            route.has_body,
            "{}: body vs google.api.http",
            route.rpc
        );
        let mut url = self.shared.base.clone();
        url.set_path(&self.path(route, Op::invoice_id(request)));
        Ok(Prepared { route, url, body })
    }

    /// `base path + route`, with the id as one percent-encoded segment.
    fn path(&self, route: &Route, invoice_id: Option<&str>) -> String {
        let base = &self.shared.base_path;
        let mut path = String::with_capacity(base.len() + route.template.len() + 32);
        path.push_str(base);
        path.push_str(route.before_id);
        if let (Some(id), Some(after)) = (invoice_id, route.after_id) {
            path.extend(utf8_percent_encode(id, PATH_SEGMENT));
            path.push_str(after);
        }
        path
    }
}

impl Prepared {
    /// One attempt's HTTP request: `span` is the attempt's (its id goes
    /// upstream in `traceparent`), `sent` is raised when a connection takes
    /// the request.
    pub(super) fn request(
        &self,
        call: &CallContext<'_>,
        span: Option<&UpstreamSpan>,
        sent: &SentFlag,
    ) -> reqwest::Request {
        let mut request = reqwest::Request::new(self.route.method.clone(), self.url.clone());
        let headers = request.headers_mut();
        headers.reserve(6);
        if self.body.is_some() {
            headers.insert(CONTENT_TYPE, JSON);
        }
        headers.insert(API_KEY, call.credentials.api_key.clone());
        headers.insert(ORGANIZATION_ID, call.credentials.organization_id.clone());
        headers.insert(REQUEST_ID, call.request_id.clone());
        if let Some(span) = span {
            headers.insert(TRACEPARENT, span.traceparent());
            if let Some(tracestate) = span.tracestate() {
                headers.insert(TRACESTATE, tracestate);
            }
        }
        *request.body_mut() = Some(reqwest::Body::wrap(TrackedBody::new(
            self.body.clone(),
            sent.clone(),
        )));
        request
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes;
    use crate::upstream::UpstreamOptions;

    fn upstream(base: &str) -> Upstream {
        let url = Url::parse(base).unwrap();
        Upstream::new(&url, UpstreamOptions::default()).unwrap()
    }

    #[test]
    fn hostile_ids_stay_one_segment_under_the_base_path() {
        let up = upstream("http://h:1/api/gormic/");
        let cases = [
            (
                "../orders/1",
                "/api/gormic/v1/om/invoices/..%2Forders%2F1/close",
            ),
            ("a/b", "/api/gormic/v1/om/invoices/a%2Fb/close"),
            ("x?y", "/api/gormic/v1/om/invoices/x%3Fy/close"),
            ("x#y", "/api/gormic/v1/om/invoices/x%23y/close"),
            ("é %", "/api/gormic/v1/om/invoices/%C3%A9%20%25/close"),
            ("A-z.0_9~", "/api/gormic/v1/om/invoices/A-z.0_9~/close"),
        ];
        for (id, path) in cases {
            let mut url = up.shared.base.clone();
            url.set_path(&up.path(&routes::CLOSE_INVOICE, Some(id)));
            assert_eq!(url.path(), path, "id {id:?}");
            assert_eq!(url.query(), None);
        }
    }

    #[test]
    fn create_has_no_id_segment() {
        let path = upstream("https://h").path(&routes::CREATE_INVOICE, None);
        assert_eq!(path, "/v1/om/invoices");
    }
}
