//! The sandbox's REST face as a REST client sees it (`gormic-gateway
//! sandbox`): header checks, bodies without a spec code, the envelope.

use serde_json::{Value, json};

use gormic_gateway::sandbox::{self, Fixture};

async fn post(url: &str, headers: &[(&str, &str)], body: &str) -> (u16, Value) {
    let mut request = crate::support::http_client()
        .build()
        .expect("HTTP client")
        .post(url)
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("sandbox answers");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes).expect("JSON body");
    (status, body)
}

#[tokio::test]
async fn headers_bodies_and_envelope() {
    let (addr, _task) = sandbox::spawn(Fixture::builtin()).await.expect("spawn");
    let url = format!("http://{addr}/v1/om/invoices");
    let key = ("api-key", "k");
    let org = ("organization-id", "org-rest");

    let (status, body) = post(&url, &[org], r#"{"params":{"orderId":"ord-ready"}}"#).await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].get("code").is_none(), "{body}");

    let (status, body) = post(&url, &[key], r#"{"params":{"orderId":"ord-ready"}}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["message"], "missing organization-id header");

    let (status, body) = post(&url, &[key, org], "{not json").await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].get("code").is_none(), "{body}");

    let (status, body) = post(&url, &[key, org], r#"{"params":{}}"#).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["message"], "params.orderId is required");

    let (status, body) = post(
        &url,
        &[key, org, ("x-request-id", "r-1")],
        r#"{"params":{"orderId":"ord-ready","type":"proforma"}}"#,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": {"code": "TYPE_NOT_SUPPORTED"}, "requestId": "r-1"})
    );

    let (status, body) = post(&url, &[key, org], r#"{"params":{"orderId":"ord-ready"}}"#).await;
    assert_eq!(status, 200, "{body}");
    let id = body["data"]["id"].as_str().expect("data.id");
    assert!(id.starts_with("inv-"), "{body}");
    assert_eq!(body["app"], "om");
    assert_eq!(body["service"], "invoices");
    assert_eq!(body["instanceId"], "sandbox");
    assert_eq!(body["warnings"], json!([]));
    assert!(
        body["requestId"]
            .as_str()
            .is_some_and(|r| r.starts_with("sbx-req-")),
        "{body}"
    );
}
