//! A thin tonic client bound to one organization, and the assertion that a
//! call was refused with a given gRPC code and `ErrorInfo.reason`.

use std::fmt::Debug;

use tonic::transport::Channel;
use tonic::{Code, Status};

use gormic_gateway::proto::v1 as pb;
use gormic_gateway::proto::v1::invoice_service_client::InvoiceServiceClient;

use crate::support::error_info;
use crate::support::sandbox::as_org;

#[derive(Clone)]
pub struct Org {
    pub client: InvoiceServiceClient<Channel>,
    pub id: String,
}

impl Org {
    pub fn new(client: InvoiceServiceClient<Channel>, id: &str) -> Self {
        Self {
            client,
            id: id.to_owned(),
        }
    }

    pub async fn create(
        &mut self,
        order_id: &str,
        kind: pb::InvoiceType,
        reference: Option<&str>,
    ) -> Result<String, Status> {
        let request = pb::CreateInvoiceRequest {
            order_id: order_id.into(),
            r#type: kind as i32,
            reference_invoice_id: reference.map(Into::into),
            apply_expires_at: None,
        };
        let response = self
            .client
            .create_invoice(as_org(&self.id, request))
            .await?;
        Ok(response.into_inner().id)
    }

    /// A standard invoice for `order_id`; the test fails if it is refused.
    pub async fn invoice(&mut self, order_id: &str) -> String {
        self.create(order_id, pb::InvoiceType::Standard, None)
            .await
            .expect("create succeeds")
    }

    pub async fn update(
        &mut self,
        invoice_id: &str,
        order_id: &str,
        reference: Option<&str>,
        expires: Option<&str>,
    ) -> Result<pb::UpdateInvoiceResponse, Status> {
        let request = pb::UpdateInvoiceRequest {
            invoice_id: invoice_id.into(),
            order_id: order_id.into(),
            reference_invoice_id: reference.map(Into::into),
            apply_expires_at: expires.map(Into::into),
        };
        Ok(self
            .client
            .update_invoice(as_org(&self.id, request))
            .await?
            .into_inner())
    }

    pub async fn delete(&mut self, invoice_id: &str) -> Result<pb::DeleteInvoiceResponse, Status> {
        let request = pb::DeleteInvoiceRequest {
            invoice_id: invoice_id.into(),
        };
        Ok(self
            .client
            .delete_invoice(as_org(&self.id, request))
            .await?
            .into_inner())
    }

    pub async fn close(&mut self, invoice_id: &str) -> Result<pb::CloseInvoiceResponse, Status> {
        let request = pb::CloseInvoiceRequest {
            invoice_id: invoice_id.into(),
        };
        Ok(self
            .client
            .close_invoice(as_org(&self.id, request))
            .await?
            .into_inner())
    }

    pub async fn send(&mut self, invoice_id: &str) -> Result<pb::SendInvoiceResponse, Status> {
        let request = pb::SendInvoiceRequest {
            invoice_id: invoice_id.into(),
        };
        Ok(self
            .client
            .send_invoice(as_org(&self.id, request))
            .await?
            .into_inner())
    }
}

/// The call failed with `code`, and its `ErrorInfo.reason` is `reason`.
#[track_caller]
pub fn assert_refused<T: Debug>(result: Result<T, Status>, code: Code, reason: &str) {
    let status = match result {
        Ok(value) => panic!("expected {code:?} {reason}, got {value:?}"),
        Err(status) => status,
    };
    assert_eq!(status.code(), code, "{status:?}");
    assert_eq!(error_info(&status).reason, reason, "{status:?}");
}
