//! gRPC-Web on the gRPC port, over plain HTTP/1.1 as a browser or an edge
//! runtime sends it (5-byte framed messages, the status in a trailer frame or,
//! for a trailers-only answer, in the response headers), and the CORS policy
//! (`--cors-allowed-origins`).

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use prost::Message;
use serde_json::json;
use tonic_types::pb as rpc;

use gormic_gateway::cors::CorsOrigins;
use gormic_gateway::errors::{GATEWAY_DOMAIN, UPSTREAM_DOMAIN, reason};
use gormic_gateway::proto::v1 as pb;
use gormic_gateway::server::ServerOptions;

use crate::support::{API_KEY, FakeUpstream, ORGANIZATION, Scripted, TestGateway, spawn_app};

const CREATE: &str = "/gormic.om.v1.InvoiceService/CreateInvoice";
const ALLOWED_ORIGIN: &str = "https://app.example.com";

/// A gRPC-Web answer, split into its frames.
struct GrpcWebReply {
    http_status: u16,
    version: http::Version,
    headers: HeaderMap,
    /// Data frames (flag 0x00), in order.
    messages: Vec<Vec<u8>>,
    /// The trailer frame (flag 0x80), parsed; `None` if the body had none.
    trailers: Option<HeaderMap>,
}

impl GrpcWebReply {
    /// A status field, from the trailer frame or, in a trailers-only answer,
    /// from the response headers (both are valid gRPC-Web).
    fn status_field(&self, name: &str) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get(name))
            .or_else(|| self.headers.get(name))
            .map(|v| v.to_str().expect("ASCII status field").to_owned())
    }

    fn grpc_status(&self) -> String {
        self.status_field("grpc-status")
            .expect("grpc-status in the trailer frame or the headers")
    }

    fn grpc_message(&self) -> String {
        let raw = self.status_field("grpc-message").unwrap_or_default();
        percent_encoding::percent_decode_str(&raw)
            .decode_utf8()
            .expect("grpc-message is percent-encoded UTF-8")
            .into_owned()
    }

    /// `grpc-status-details-bin`: base64 → `google.rpc.Status`.
    fn status_details(&self) -> rpc::Status {
        let encoded = self
            .status_field("grpc-status-details-bin")
            .expect("grpc-status-details-bin present");
        rpc::Status::decode(base64_decode(&encoded).as_slice())
            .expect("grpc-status-details-bin decodes as google.rpc.Status")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|v| v.to_str().expect("ASCII header"))
    }
}

/// The detail of type `T` in a `google.rpc.Status`, decoded from its `Any`.
fn detail<T: Message + Default>(status: &rpc::Status, type_name: &str) -> T {
    let any = status
        .details
        .iter()
        .find(|any| any.type_url == format!("type.googleapis.com/{type_name}"))
        .unwrap_or_else(|| panic!("no {type_name} in {status:?}"));
    T::decode(any.value.as_slice()).unwrap_or_else(|e| panic!("{type_name} does not decode: {e}"))
}

fn http1_client() -> reqwest::Client {
    crate::support::http_client()
        .http1_only()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP/1.1 client")
}

/// One length-prefixed, uncompressed gRPC-Web data frame.
fn frame(message: &impl Message) -> Vec<u8> {
    let payload = message.encode_to_vec();
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.push(0x00);
    out.extend_from_slice(&u32::try_from(payload.len()).expect("small").to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// POSTs one gRPC-Web call over HTTP/1.1 with `headers` (metadata included).
async fn grpc_web_call(
    gateway: &TestGateway,
    path: &str,
    message: &impl Message,
    headers: &[(&str, &str)],
) -> GrpcWebReply {
    let mut request = http1_client()
        .post(format!("http://{}{path}", gateway.addr))
        .header("content-type", "application/grpc-web+proto")
        .header("accept", "application/grpc-web+proto")
        .header("x-grpc-web", "1")
        .body(frame(message));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("gRPC-Web request");
    let http_status = response.status().as_u16();
    let version = response.version();
    let headers = response.headers().clone();
    let body = response.bytes().await.expect("gRPC-Web body").to_vec();

    let mut messages = Vec::new();
    let mut trailers = None;
    let mut rest = body.as_slice();
    while !rest.is_empty() {
        assert!(rest.len() >= 5, "truncated frame header: {rest:?}");
        let flag = rest[0];
        let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
        assert!(
            rest.len() >= 5 + len,
            "truncated frame: {len} bytes announced"
        );
        let payload = &rest[5..5 + len];
        rest = &rest[5 + len..];
        if flag & 0x80 != 0 {
            assert!(trailers.is_none(), "two trailer frames");
            assert!(rest.is_empty(), "frames after the trailer frame");
            trailers = Some(parse_trailers(payload));
        } else {
            assert_eq!(flag, 0, "compressed frame without grpc-encoding");
            messages.push(payload.to_vec());
        }
    }
    GrpcWebReply {
        http_status,
        version,
        headers,
        messages,
        trailers,
    }
}

/// A trailer frame's payload: `name:value` lines separated by CRLF.
fn parse_trailers(payload: &[u8]) -> HeaderMap {
    let text = std::str::from_utf8(payload).expect("trailer frame is ASCII");
    let mut map = HeaderMap::new();
    for line in text.split("\r\n").filter(|l| !l.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .unwrap_or_else(|| panic!("trailer line without colon: {line:?}"));
        map.append(
            http::HeaderName::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
                .expect("trailer name"),
            HeaderValue::from_str(value.trim()).expect("trailer value"),
        );
    }
    map
}

/// Standard base64, padded or not (gRPC emits it unpadded).
fn base64_decode(text: &str) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for byte in text.trim_end_matches('=').bytes() {
        let sextet = ALPHABET
            .iter()
            .position(|&c| c == byte)
            .unwrap_or_else(|| panic!("not base64: {byte:#x} in {text:?}"));
        acc = (acc << 6) | sextet as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

fn create_request() -> pb::CreateInvoiceRequest {
    pb::CreateInvoiceRequest {
        order_id: "ord-1".into(),
        r#type: pb::InvoiceType::Standard as i32,
        reference_invoice_id: None,
        apply_expires_at: None,
    }
}

const METADATA: [(&str, &str); 2] = [("api-key", API_KEY), ("organization-id", ORGANIZATION)];

#[tokio::test]
async fn grpc_web_over_http1_returns_the_message_and_an_ok_trailer() {
    let (upstream, gateway) = spawn_app().await;
    upstream.respond(Scripted::ok(json!({"id": "inv-42"})));

    let reply = grpc_web_call(&gateway, CREATE, &create_request(), &METADATA).await;

    assert_eq!(reply.http_status, 200);
    assert_eq!(reply.version, http::Version::HTTP_11);
    assert_eq!(
        reply.header("content-type"),
        Some("application/grpc-web+proto")
    );
    assert_eq!(reply.messages.len(), 1, "one data frame");
    let response = pb::CreateInvoiceResponse::decode(reply.messages[0].as_slice())
        .expect("data frame decodes as CreateInvoiceResponse");
    assert_eq!(response.id, "inv-42");
    assert_eq!(
        response.meta.expect("meta").request_id,
        "req-upstream-1",
        "envelope carried through"
    );
    let trailers = reply.trailers.as_ref().expect("a trailer frame");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );

    // The metadata travelled as HTTP/1.1 headers and reached the upstream.
    let request = upstream.only_request();
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/v1/om/invoices");
    assert_eq!(request.header("api-key"), Some(API_KEY));
    assert_eq!(request.header("organization-id"), Some(ORGANIZATION));
    assert_eq!(
        request.json(),
        json!({"params": {"orderId": "ord-1", "type": "standard"}})
    );
}

#[tokio::test]
async fn grpc_web_upstream_error_carries_code_and_error_details() {
    let (upstream, gateway) = spawn_app().await;
    upstream.respond(Scripted::code("ORDER_CLOSED"));

    let reply = grpc_web_call(&gateway, CREATE, &create_request(), &METADATA).await;

    assert_eq!(reply.http_status, 200, "gRPC-Web errors travel as a status");
    assert!(reply.messages.is_empty(), "no message on failure");
    // A failure before any message is a trailers-only answer: the status is
    // in the response headers (hence the CORS policy exposes them).
    assert!(
        reply.trailers.is_none(),
        "trailers-only: {:?}",
        reply.trailers
    );
    assert_eq!(reply.header("grpc-status"), Some("9"));
    assert_eq!(reply.grpc_status(), "9", "FAILED_PRECONDITION");
    assert_eq!(reply.grpc_message(), "order is closed (ORDER_CLOSED)");

    let status = reply.status_details();
    assert_eq!(status.code, 9);
    assert_eq!(status.message, "order is closed (ORDER_CLOSED)");
    let info: rpc::ErrorInfo = detail(&status, "google.rpc.ErrorInfo");
    assert_eq!(info.reason, "ORDER_CLOSED");
    assert_eq!(info.domain, UPSTREAM_DOMAIN);
    assert_eq!(
        info.metadata.get("upstream_code").map(String::as_str),
        Some("ORDER_CLOSED")
    );
    assert_eq!(
        info.metadata.get("http_status").map(String::as_str),
        Some("400")
    );
    let request_info: rpc::RequestInfo = detail(&status, "google.rpc.RequestInfo");
    assert_eq!(request_info.request_id, "req-upstream-1");
}

#[tokio::test]
async fn grpc_web_gateway_error_carries_the_gateway_domain() {
    let (upstream, gateway) = spawn_app().await;

    let reply = grpc_web_call(
        &gateway,
        CREATE,
        &create_request(),
        &[("organization-id", ORGANIZATION)],
    )
    .await;

    assert_eq!(reply.grpc_status(), "16", "UNAUTHENTICATED");
    let status = reply.status_details();
    assert_eq!(status.code, 16);
    let info: rpc::ErrorInfo = detail(&status, "google.rpc.ErrorInfo");
    assert_eq!(info.reason, reason::MISSING_API_KEY);
    assert_eq!(info.domain, GATEWAY_DOMAIN);
    assert!(upstream.requests().is_empty(), "nothing sent upstream");
}

async fn gateway_with_cors(cors: CorsOrigins) -> (FakeUpstream, TestGateway) {
    let upstream = FakeUpstream::start().await;
    let options = ServerOptions {
        grace: Duration::from_secs(5),
        cors,
        ..Default::default()
    };
    let gateway = TestGateway::builder(&upstream.url())
        .server(options)
        .start()
        .await;
    (upstream, gateway)
}

/// A browser's preflight before a gRPC-Web call from `origin`.
async fn preflight(gateway: &TestGateway, origin: &str) -> reqwest::Response {
    http1_client()
        .request(
            reqwest::Method::OPTIONS,
            format!("http://{}{CREATE}", gateway.addr),
        )
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "content-type,x-grpc-web,x-user-agent,api-key,organization-id,x-request-id,grpc-timeout",
        )
        .send()
        .await
        .expect("preflight request")
}

fn header_list(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|v| v.to_str().expect("ASCII").split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .collect()
}

#[tokio::test]
async fn cors_allows_a_configured_origin() {
    let origins = CorsOrigins::parse(ALLOWED_ORIGIN).expect("origin list");
    let (upstream, gateway) = gateway_with_cors(origins).await;

    let response = preflight(&gateway, ALLOWED_ORIGIN).await;
    assert_eq!(response.status(), 200);
    let headers = response.headers();
    assert_eq!(
        headers
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(ALLOWED_ORIGIN.as_bytes())
    );
    assert_eq!(
        header_list(headers, "access-control-allow-methods"),
        ["post"]
    );
    let allowed = header_list(headers, "access-control-allow-headers");
    for name in [
        "content-type",
        "x-grpc-web",
        "x-user-agent",
        "grpc-timeout",
        "api-key",
        "organization-id",
        "x-request-id",
    ] {
        assert!(allowed.iter().any(|a| a == name), "{name} in {allowed:?}");
    }

    // The call itself: the browser may read the status headers.
    upstream.respond(Scripted::ok(json!({"id": "inv-7"})));
    let mut metadata = METADATA.to_vec();
    metadata.push(("origin", ALLOWED_ORIGIN));
    let reply = grpc_web_call(&gateway, CREATE, &create_request(), &metadata).await;
    assert_eq!(
        reply.header("access-control-allow-origin"),
        Some(ALLOWED_ORIGIN)
    );
    let exposed = header_list(&reply.headers, "access-control-expose-headers");
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        assert!(exposed.iter().any(|e| e == name), "{name} in {exposed:?}");
    }
    let response = pb::CreateInvoiceResponse::decode(reply.messages[0].as_slice())
        .expect("CreateInvoiceResponse");
    assert_eq!(response.id, "inv-7");

    // Another origin gets no permission.
    let response = preflight(&gateway, "https://evil.example").await;
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none(),
        "{:?}",
        response.headers()
    );
}

#[tokio::test]
async fn cors_any_origin_answers_star() {
    let (_upstream, gateway) = gateway_with_cors(CorsOrigins::Any).await;

    let response = preflight(&gateway, "https://anywhere.example").await;
    assert_eq!(response.status(), 200);
    assert_eq!(
        response
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.as_bytes()),
        Some(&b"*"[..])
    );
}

#[tokio::test]
async fn without_cors_configuration_no_cors_header_is_sent() {
    let (upstream, gateway) = spawn_app().await;

    let response = preflight(&gateway, ALLOWED_ORIGIN).await;
    let names: Vec<&str> = response
        .headers()
        .keys()
        .map(http::HeaderName::as_str)
        .filter(|name| name.starts_with("access-control-"))
        .collect();
    assert!(names.is_empty(), "CORS headers sent: {names:?}");

    // Non-browser gRPC-Web clients (which CORS does not concern) still work.
    upstream.respond(Scripted::ok(json!({"id": "inv-8"})));
    let mut metadata = METADATA.to_vec();
    metadata.push(("origin", ALLOWED_ORIGIN));
    let reply = grpc_web_call(&gateway, CREATE, &create_request(), &metadata).await;
    assert!(
        reply.header("access-control-allow-origin").is_none(),
        "{:?}",
        reply.headers
    );
    let response = pb::CreateInvoiceResponse::decode(reply.messages[0].as_slice())
        .expect("CreateInvoiceResponse");
    assert_eq!(response.id, "inv-8");
}

#[test]
fn base64_decoder_matches_known_vectors() {
    assert_eq!(base64_decode("aGVsbG8"), b"hello");
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("AP8Q"), [0x00, 0xff, 0x10]);
}
