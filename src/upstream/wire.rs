//! The JSON shapes of the Gormic invoices API (private serde structs) and
//! their conversion to and from the proto messages: the one place where
//! camelCase REST meets snake_case proto.
//!
//! Unknown JSON fields are ignored so that the upstream can grow.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::proto::v1 as pb;

// ---- requests ----------------------------------------------------------

/// `{"params": {...}}`, the body of create and update.
#[derive(Serialize)]
pub(super) struct Params<P> {
    params: P,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CreateParams<'a> {
    order_id: &'a str,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    invoice_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference_invoice_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    apply_expires_at: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct UpdateParams<'a> {
    id: &'a str,
    order_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    reference_invoice_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    apply_expires_at: Option<&'a str>,
}

pub(super) fn create_body(request: &pb::CreateInvoiceRequest) -> Params<CreateParams<'_>> {
    Params {
        params: CreateParams {
            order_id: &request.order_id,
            invoice_type: invoice_type(request.r#type),
            reference_invoice_id: request.reference_invoice_id.as_deref(),
            apply_expires_at: request.apply_expires_at.as_deref(),
        },
    }
}

pub(super) fn update_body(request: &pb::UpdateInvoiceRequest) -> Params<UpdateParams<'_>> {
    Params {
        params: UpdateParams {
            id: &request.invoice_id,
            order_id: &request.order_id,
            reference_invoice_id: request.reference_invoice_id.as_deref(),
            apply_expires_at: request.apply_expires_at.as_deref(),
        },
    }
}

/// The REST value of an `InvoiceType`; `None` leaves `type` out of the body.
/// Unknown numbers are refused by validation before this is called.
fn invoice_type(value: i32) -> Option<&'static str> {
    match pb::InvoiceType::try_from(value).ok()? {
        pb::InvoiceType::Unspecified => None,
        pb::InvoiceType::Standard => Some("standard"),
        pb::InvoiceType::Prepayment => Some("prepayment"),
        pb::InvoiceType::CreditNote => Some("credit-note"),
        pb::InvoiceType::DebitNote => Some("debit-note"),
    }
}

// ---- answers -----------------------------------------------------------

/// The envelope of every 2xx answer. Only `data` is needed to build a
/// response; a missing envelope field is left empty rather than failing an
/// operation that the upstream has already carried out.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct Envelope<D> {
    #[serde(default)]
    app: Option<String>,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    warnings: Option<Vec<Json>>,
    #[serde(default)]
    instance_id: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
    data: D,
}

#[derive(Deserialize)]
pub(super) struct CreateData {
    id: String,
}

/// `data` of update: `{success}`.
#[derive(Deserialize)]
pub(super) struct SuccessData {
    success: bool,
}

#[derive(Deserialize)]
pub(super) struct DeleteData {
    succeed: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CloseData {
    invoice_number: serde_json::Number,
    invoice_source: String,
    invoiced_at: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SendData {
    success: bool,
    #[serde(default)]
    message_id: Option<String>,
}

impl<D> Envelope<D> {
    /// Splits the envelope into its `data` and the proto `ResponseMeta`.
    fn split(self) -> (D, Option<pb::ResponseMeta>) {
        let meta = pb::ResponseMeta {
            app: self.app.unwrap_or_default(),
            service: self.service.unwrap_or_default(),
            instance_id: self.instance_id.unwrap_or_default(),
            request_id: self.request_id.unwrap_or_default(),
            warnings: self
                .warnings
                .unwrap_or_default()
                .into_iter()
                .map(warning)
                .collect(),
        };
        (self.data, Some(meta))
    }
}

pub(super) fn create_response(envelope: Envelope<CreateData>) -> pb::CreateInvoiceResponse {
    let (data, meta) = envelope.split();
    pb::CreateInvoiceResponse { id: data.id, meta }
}

pub(super) fn update_response(envelope: Envelope<SuccessData>) -> pb::UpdateInvoiceResponse {
    let (data, meta) = envelope.split();
    pb::UpdateInvoiceResponse {
        success: data.success,
        meta,
    }
}

pub(super) fn delete_response(envelope: Envelope<DeleteData>) -> pb::DeleteInvoiceResponse {
    let (data, meta) = envelope.split();
    pb::DeleteInvoiceResponse {
        succeed: data.succeed,
        meta,
    }
}

/// A 2xx answer whose `data` cannot become the response message.
pub(super) struct Unreadable {
    pub(super) detail: String,
    /// The envelope's `requestId`, for the error details.
    pub(super) request_id: Option<String>,
}

/// Fails when `invoiceNumber` is not an exact integer (see [`integral`]).
pub(super) fn close_response(
    envelope: Envelope<CloseData>,
) -> Result<pb::CloseInvoiceResponse, Unreadable> {
    let (data, meta) = envelope.split();
    let Some(invoice_number) = integral(&data.invoice_number) else {
        return Err(Unreadable {
            detail: format!(
                "data.invoiceNumber is not an integer that fits int64: {}",
                data.invoice_number
            ),
            request_id: meta.map(|m| m.request_id).filter(|id| !id.is_empty()),
        });
    };
    Ok(pb::CloseInvoiceResponse {
        invoice_number,
        invoice_source: data.invoice_source,
        invoiced_at: data.invoiced_at,
        meta,
    })
}

pub(super) fn send_response(envelope: Envelope<SendData>) -> pb::SendInvoiceResponse {
    let (data, meta) = envelope.split();
    pb::SendInvoiceResponse {
        success: data.success,
        message_id: data.message_id,
        meta,
    }
}

/// `1043` and `1043.0` are 1043; `1043.5`, `1e300` and `-0.5` are not
/// integers. A JSON number outside int64 arrives as a float that has lost
/// digits, so floats are accepted only where they are exact (|n| ≤ 2^53).
fn integral(number: &serde_json::Number) -> Option<i64> {
    const EXACT: f64 = 9_007_199_254_740_992.0; // 2^53
    if let Some(n) = number.as_i64() {
        return Some(n);
    }
    let f = number.as_f64()?;
    (f.fract() == 0.0 && f.abs() <= EXACT).then_some(f as i64)
}

/// The body of an error answer: `{"error": {"code": …}, "requestId": …}`.
#[derive(Debug, Default)]
pub(super) struct ErrorBody {
    pub(super) code: Option<String>,
    pub(super) message: Option<String>,
    pub(super) request_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawErrorBody {
    #[serde(default)]
    error: Option<Json>,
    #[serde(default)]
    request_id: Option<Json>,
}

impl ErrorBody {
    /// Reads whatever an error body offers; `None` when it is not a JSON
    /// object. A non-string `message` or `requestId` is kept in its JSON text.
    pub(super) fn parse(bytes: &[u8]) -> Option<Self> {
        let raw: RawErrorBody = serde_json::from_slice(bytes).ok()?;
        let error = raw.error.unwrap_or(Json::Null);
        Some(Self {
            // Only a non-empty string is a code; any other shape leaves the
            // answer without one (its body is then quoted in the error).
            code: match error.get("code") {
                Some(Json::String(code)) if !code.is_empty() => Some(code.clone()),
                _ => None,
            },
            message: text(error.get("message")),
            request_id: text(raw.request_id.as_ref()),
        })
    }
}

fn text(value: Option<&Json>) -> Option<String> {
    match value? {
        Json::Null => None,
        Json::String(s) if s.is_empty() => None,
        Json::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// A warning as a `Struct`; a non-object is kept as `{"value": warning}`.
fn warning(value: Json) -> prost_types::Struct {
    match value {
        Json::Object(fields) => object(fields),
        other => prost_types::Struct {
            fields: [("value".to_owned(), to_proto(other))].into(),
        },
    }
}

fn object(fields: serde_json::Map<String, Json>) -> prost_types::Struct {
    prost_types::Struct {
        fields: fields.into_iter().map(|(k, v)| (k, to_proto(v))).collect(),
    }
}

fn to_proto(value: Json) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match value {
        Json::Null => Kind::NullValue(0),
        Json::Bool(b) => Kind::BoolValue(b),
        // google.protobuf.Value holds numbers as doubles.
        Json::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Json::String(s) => Kind::StringValue(s),
        Json::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_proto).collect(),
        }),
        Json::Object(fields) => Kind::StructValue(object(fields)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(json: &str) -> serde_json::Number {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn integral_numbers_only() {
        assert_eq!(integral(&number("1043")), Some(1043));
        assert_eq!(integral(&number("1043.0")), Some(1043));
        assert_eq!(integral(&number("-7")), Some(-7));
        assert_eq!(integral(&number("1043.5")), None);
        assert_eq!(integral(&number("1e300")), None);
        assert_eq!(integral(&number("18446744073709551615")), None);
        assert_eq!(integral(&number("-9223372036854775809")), None);
        assert_eq!(integral(&number("9007199254740993.0")), None);
        assert_eq!(integral(&number("9007199254740992.0")), Some(1 << 53));
    }

    #[test]
    fn create_body_leaves_unset_fields_out() {
        let request = pb::CreateInvoiceRequest {
            order_id: "o-1".into(),
            ..Default::default()
        };
        let json = serde_json::to_value(create_body(&request)).unwrap();
        assert_eq!(json, serde_json::json!({"params": {"orderId": "o-1"}}));
    }

    #[test]
    fn error_body_codes_are_non_empty_strings() {
        let body = ErrorBody::parse(br#"{"error":{"code":42},"requestId":17}"#).unwrap();
        assert_eq!(body.code, None);
        assert_eq!(body.request_id.as_deref(), Some("17"));
        let body = ErrorBody::parse(br#"{"error":{"code":"ORDER_CLOSED"}}"#).unwrap();
        assert_eq!(body.code.as_deref(), Some("ORDER_CLOSED"));
        assert!(ErrorBody::parse(b"<html>").is_none());
    }
}
