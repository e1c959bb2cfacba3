//! The RPCs, each declared once as an [`Operation`]: its REST route (from
//! the proto's `google.api.http`), whether repeating it is harmless, the
//! checks of its request, its JSON body and how its answer becomes the
//! proto response. Everything generic (the call path, retries, idempotency,
//! metrics, the call log) works on [`Operation`] and on the route table.
//! A new RPC touches: the proto (its messages and `google.api.http`), one
//! impl here, its JSON shapes in `wire`, and one line in `service.rs` that
//! the generated `InvoiceService` trait requires.

use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::wire;
use crate::proto::v1 as pb;
use crate::routes::{self, Route};
use crate::validation::{self, FieldViolation};

/// One RPC's REST exchange.
pub trait Operation: Send + Sync + 'static {
    type Request: prost::Message + Default + Send + Sync + 'static;
    type Response: prost::Message + Default + Send + 'static;

    /// How the RPC reaches the upstream (from its `google.api.http` option).
    const ROUTE: &'static Route;

    /// Whether sending the request twice is harmless, so that the gateway
    /// may repeat it after it may have reached the upstream: an update
    /// applied twice is `NoChanges` the second time, a delete
    /// `INVOICE_NOT_FOUND`. A second create is a second invoice and a second
    /// send a second e-mail; a second close answers `ALREADY_CLOSED` without
    /// the invoice number the first one assigned, so the caller would lose
    /// its answer. Those three are never repeated.
    const REPEATABLE: bool;

    /// What is wrong with the request (empty: nothing), before anything is
    /// sent.
    fn validate(request: &Self::Request) -> Vec<FieldViolation>;

    /// The path's `{invoice_id}`, if the route has one.
    fn invoice_id(request: &Self::Request) -> Option<&str>;

    /// The JSON body, if the route has one.
    fn body(request: &Self::Request) -> Result<Option<Bytes>, serde_json::Error>;

    /// A 2xx body as the response message.
    fn decode(body: &[u8]) -> Result<Self::Response, Undecodable>;
}

/// Why a 2xx body is not a response.
#[derive(Debug)]
pub enum Undecodable {
    /// It is not the success envelope (it may be an error body).
    NotTheEnvelope(serde_json::Error),
    /// The envelope's `data` cannot become the response message.
    Unreadable {
        detail: String,
        request_id: Option<String>,
    },
}

pub struct CreateInvoice;
pub struct UpdateInvoice;
pub struct DeleteInvoice;
pub struct CloseInvoice;
pub struct SendInvoice;

impl Operation for CreateInvoice {
    type Request = pb::CreateInvoiceRequest;
    type Response = pb::CreateInvoiceResponse;
    const ROUTE: &'static Route = &routes::CREATE_INVOICE;
    const REPEATABLE: bool = false;

    fn validate(request: &Self::Request) -> Vec<FieldViolation> {
        let mut violations: Vec<_> = validation::required("order_id", &request.order_id)
            .into_iter()
            .collect();
        if pb::InvoiceType::try_from(request.r#type).is_err() {
            violations.push(FieldViolation {
                field: "type",
                description: format!("unknown InvoiceType value {}", request.r#type),
            });
        }
        violations
    }

    fn invoice_id(_: &Self::Request) -> Option<&str> {
        None
    }

    fn body(request: &Self::Request) -> Result<Option<Bytes>, serde_json::Error> {
        json(&wire::create_body(request))
    }

    fn decode(body: &[u8]) -> Result<Self::Response, Undecodable> {
        decode(body, |e| Ok(wire::create_response(e)))
    }
}

impl Operation for UpdateInvoice {
    type Request = pb::UpdateInvoiceRequest;
    type Response = pb::UpdateInvoiceResponse;
    const ROUTE: &'static Route = &routes::UPDATE_INVOICE;
    const REPEATABLE: bool = true;

    fn validate(request: &Self::Request) -> Vec<FieldViolation> {
        validation::invoice_id(&request.invoice_id)
            .into_iter()
            .chain(validation::required("order_id", &request.order_id))
            .collect()
    }

    fn invoice_id(request: &Self::Request) -> Option<&str> {
        Some(&request.invoice_id)
    }

    fn body(request: &Self::Request) -> Result<Option<Bytes>, serde_json::Error> {
        json(&wire::update_body(request))
    }

    fn decode(body: &[u8]) -> Result<Self::Response, Undecodable> {
        decode(body, |e| Ok(wire::update_response(e)))
    }
}

impl Operation for DeleteInvoice {
    type Request = pb::DeleteInvoiceRequest;
    type Response = pb::DeleteInvoiceResponse;
    const ROUTE: &'static Route = &routes::DELETE_INVOICE;
    const REPEATABLE: bool = true;

    fn validate(request: &Self::Request) -> Vec<FieldViolation> {
        validation::invoice_id(&request.invoice_id)
            .into_iter()
            .collect()
    }

    fn invoice_id(request: &Self::Request) -> Option<&str> {
        Some(&request.invoice_id)
    }

    fn body(_: &Self::Request) -> Result<Option<Bytes>, serde_json::Error> {
        Ok(None)
    }

    fn decode(body: &[u8]) -> Result<Self::Response, Undecodable> {
        decode(body, |e| Ok(wire::delete_response(e)))
    }
}

impl Operation for CloseInvoice {
    type Request = pb::CloseInvoiceRequest;
    type Response = pb::CloseInvoiceResponse;
    const ROUTE: &'static Route = &routes::CLOSE_INVOICE;
    const REPEATABLE: bool = false;

    fn validate(request: &Self::Request) -> Vec<FieldViolation> {
        validation::invoice_id(&request.invoice_id)
            .into_iter()
            .collect()
    }

    fn invoice_id(request: &Self::Request) -> Option<&str> {
        Some(&request.invoice_id)
    }

    fn body(_: &Self::Request) -> Result<Option<Bytes>, serde_json::Error> {
        Ok(None)
    }

    fn decode(body: &[u8]) -> Result<Self::Response, Undecodable> {
        decode(body, wire::close_response)
    }
}

impl Operation for SendInvoice {
    type Request = pb::SendInvoiceRequest;
    type Response = pb::SendInvoiceResponse;
    const ROUTE: &'static Route = &routes::SEND_INVOICE;
    const REPEATABLE: bool = false;

    fn validate(request: &Self::Request) -> Vec<FieldViolation> {
        validation::invoice_id(&request.invoice_id)
            .into_iter()
            .collect()
    }

    fn invoice_id(request: &Self::Request) -> Option<&str> {
        Some(&request.invoice_id)
    }

    fn body(_: &Self::Request) -> Result<Option<Bytes>, serde_json::Error> {
        Ok(None)
    }

    fn decode(body: &[u8]) -> Result<Self::Response, Undecodable> {
        decode(body, |e| Ok(wire::send_response(e)))
    }
}

fn json(body: &impl serde::Serialize) -> Result<Option<Bytes>, serde_json::Error> {
    serde_json::to_vec(body).map(|json| Some(Bytes::from(json)))
}

fn decode<D: DeserializeOwned, R>(
    body: &[u8],
    convert: fn(wire::Envelope<D>) -> Result<R, wire::Unreadable>,
) -> Result<R, Undecodable> {
    let envelope = serde_json::from_slice(body).map_err(Undecodable::NotTheEnvelope)?;
    convert(envelope).map_err(|unreadable| Undecodable::Unreadable {
        detail: unreadable.detail,
        request_id: unreadable.request_id,
    })
}
