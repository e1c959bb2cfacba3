//! The sandbox's HTTP face: the five REST routes of the spec, the header
//! checks, the JSON bodies in and out, and the per-organization locking.
//! The rules themselves live in [`super::state`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{patch, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value as Json, json};

use super::fixture::Fixture;
use super::state::{CreateParams, Refusal, Tenant, UpdateParams};

/// Envelope values: fixed, so that sandbox answers are reproducible.
const APP: &str = "om";
const SERVICE: &str = "invoices";
const INSTANCE_ID: &str = "sandbox";

/// Organizations one sandbox keeps in memory; beyond, new ones are refused.
const MAX_ORGANIZATIONS: usize = 10_000;
/// Longest `x-request-id` echoed back; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;

#[derive(Clone)]
struct App {
    fixture: Arc<Fixture>,
    /// Map lock held only to find or insert an organization; each
    /// organization's own lock serialises its operations, so numbers are
    /// never duplicated and no update is lost.
    tenants: Arc<Mutex<HashMap<String, Arc<Mutex<Tenant>>>>>,
    requests: Arc<AtomicU64>,
}

/// The REST API as an axum router, every organization starting from `fixture`.
pub(crate) fn router(fixture: Fixture) -> Router {
    let app = App {
        fixture: Arc::new(fixture),
        tenants: Arc::default(),
        requests: Arc::default(),
    };
    Router::new()
        .route("/v1/om/invoices", post(create))
        .route("/v1/om/invoices/{uid}", patch(update).delete(delete))
        .route("/v1/om/invoices/{uid}/close", patch(close))
        .route("/v1/om/invoices/{uid}/send", post(send))
        .fallback(no_route)
        .with_state(app)
}

/// A request turned away before it reached an organization.
struct Turned {
    status: StatusCode,
    request_id: String,
    text: &'static str,
}

impl IntoResponse for Turned {
    fn into_response(self) -> Response {
        message(self.status, &self.request_id, self.text)
    }
}

/// One request's identity and organization, once its headers are accepted.
struct Call {
    request_id: String,
    tenant: Arc<Mutex<Tenant>>,
}

impl App {
    /// Checks `api-key` (any non-empty value; missing → 401) before
    /// `organization-id` (missing → 400 without a code), like the gateway.
    fn begin(&self, headers: &HeaderMap) -> Result<Call, Turned> {
        let request_id = self.request_id(headers);
        if header(headers, "api-key").is_none() {
            return Err(Turned {
                status: StatusCode::UNAUTHORIZED,
                request_id,
                text: "missing api-key header",
            });
        }
        let Some(organization) = header(headers, "organization-id") else {
            return Err(Turned {
                status: StatusCode::BAD_REQUEST,
                request_id,
                text: "missing organization-id header",
            });
        };
        let mut tenants = lock(&self.tenants);
        let tenant = match tenants.get(organization) {
            Some(tenant) => tenant.clone(),
            None if tenants.len() >= MAX_ORGANIZATIONS => {
                return Err(Turned {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    request_id,
                    text: "sandbox limit: too many organizations",
                });
            }
            None => {
                let tenant = Arc::new(Mutex::new(Tenant::new(&self.fixture, organization)));
                tenants.insert(organization.to_owned(), tenant.clone());
                tenant
            }
        };
        Ok(Call { request_id, tenant })
    }

    /// The caller's `x-request-id` when it is usable, else `sbx-req-<n>`.
    fn request_id(&self, headers: &HeaderMap) -> String {
        match header(headers, "x-request-id") {
            Some(id) if id.len() <= MAX_REQUEST_ID => id.to_owned(),
            _ => {
                let n = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
                format!("sbx-req-{n}")
            }
        }
    }
}

/// Every route starts with the header checks: a refused request never
/// reaches an organization.
impl FromRequestParts<App> for Call {
    type Rejection = Turned;

    async fn from_request_parts(parts: &mut Parts, app: &App) -> Result<Self, Turned> {
        app.begin(&parts.headers)
    }
}

impl Call {
    fn run<T>(
        &self,
        operation: impl FnOnce(&mut Tenant) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        operation(&mut lock(&self.tenant))
    }

    fn reply(&self, result: Result<Json, Refusal>) -> Response {
        match result {
            Ok(data) => with_request_id(
                StatusCode::OK,
                &self.request_id,
                json!({
                    "app": APP,
                    "service": SERVICE,
                    "warnings": [],
                    "instanceId": INSTANCE_ID,
                    "requestId": self.request_id,
                    "data": data,
                }),
            ),
            Err(Refusal::Code(code)) => with_request_id(
                StatusCode::BAD_REQUEST,
                &self.request_id,
                json!({"error": {"code": code}, "requestId": self.request_id}),
            ),
            Err(Refusal::Missing(text)) => message(StatusCode::NOT_FOUND, &self.request_id, &text),
            Err(Refusal::Invalid(text)) => {
                message(StatusCode::BAD_REQUEST, &self.request_id, &text)
            }
        }
    }
}

/// A poisoned lock only means another request panicked mid-way; the state
/// it guards is updated in one step after all checks, so it is still whole.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get(name)?
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

fn with_request_id(status: StatusCode, request_id: &str, body: Json) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    if let Ok(value) = HeaderValue::from_str(request_id) {
        response.headers_mut().insert("x-request-id", value);
    }
    response
}

/// An error the spec gives no code for: `{"error": {"message"}, "requestId"}`.
fn message(status: StatusCode, request_id: &str, text: &str) -> Response {
    with_request_id(
        status,
        request_id,
        json!({"error": {"message": text}, "requestId": request_id}),
    )
}

// ---- request bodies --------------------------------------------------------

#[derive(Deserialize)]
struct Body<P> {
    params: P,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateBody {
    #[serde(default)]
    order_id: Option<String>,
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    reference_invoice_id: Option<String>,
    #[serde(default)]
    apply_expires_at: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateBody {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    order_id: Option<String>,
    #[serde(default)]
    reference_invoice_id: Option<String>,
    #[serde(default)]
    apply_expires_at: Option<String>,
}

/// `{"params": {...}}`, or the reason it is not one.
fn params<P: DeserializeOwned>(body: &Bytes) -> Result<P, Refusal> {
    serde_json::from_slice::<Body<P>>(body)
        .map(|body| body.params)
        .map_err(|error| Refusal::Invalid(format!("invalid request body: {error}")))
}

fn required(value: Option<String>, name: &str) -> Result<String, Refusal> {
    value
        .filter(|v| !v.is_empty())
        .ok_or_else(|| Refusal::Invalid(format!("params.{name} is required")))
}

// ---- routes ------------------------------------------------------------------

async fn create(State(app): State<App>, call: Call, body: Bytes) -> Response {
    let result = params::<CreateBody>(&body).and_then(|p| {
        let params = CreateParams {
            order_id: required(p.order_id, "orderId")?,
            kind: p.kind,
            reference_invoice_id: p.reference_invoice_id,
            apply_expires_at: p.apply_expires_at,
        };
        call.run(|tenant| tenant.create(&app.fixture, params))
    });
    call.reply(result.map(|id| json!({"id": id})))
}

async fn update(call: Call, Path(uid): Path<String>, body: Bytes) -> Response {
    let result = params::<UpdateBody>(&body).and_then(|p| {
        let params = UpdateParams {
            id: required(p.id, "id")?,
            order_id: required(p.order_id, "orderId")?,
            reference_invoice_id: p.reference_invoice_id,
            apply_expires_at: p.apply_expires_at,
        };
        call.run(|tenant| tenant.update(&uid, params))
    });
    call.reply(result.map(|()| json!({"success": true})))
}

async fn delete(State(app): State<App>, call: Call, Path(uid): Path<String>) -> Response {
    let result = call.run(|tenant| tenant.delete(&app.fixture, &uid));
    call.reply(result.map(|()| json!({"succeed": true})))
}

async fn close(State(app): State<App>, call: Call, Path(uid): Path<String>) -> Response {
    let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    let result = call.run(|tenant| tenant.close(&app.fixture, &uid, now));
    call.reply(result.map(|closed| {
        json!({
            "invoiceNumber": closed.number,
            "invoiceSource": closed.source,
            "invoicedAt": closed.invoiced_at,
        })
    }))
}

async fn send(State(app): State<App>, call: Call, Path(uid): Path<String>) -> Response {
    let result = call.run(|tenant| tenant.send(&app.fixture, &uid));
    call.reply(result.map(|message_id| json!({"success": true, "messageId": message_id})))
}

async fn no_route(State(app): State<App>, headers: HeaderMap) -> Response {
    let request_id = app.request_id(&headers);
    message(
        StatusCode::NOT_FOUND,
        &request_id,
        "no such route in the sandbox (it serves /v1/om/invoices only)",
    )
}
