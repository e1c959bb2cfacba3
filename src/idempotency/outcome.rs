//! What a completed call answered, as recorded for replay: the encoded
//! response message, or the status with its `grpc-status-details-bin`.
//! Replaying rebuilds exactly what the first call returned.

use bytes::Bytes;

/// Largest outcome a record keeps, in bytes of [`Outcome::encoded_len`]:
/// 64 KiB, the size of the largest request the gateway accepts and far above
/// any invoice response or error status. A larger outcome is recorded as
/// unknown (the lease says so in its [`Recorded`](super::Recorded)), never
/// truncated and never dropped silently; it also bounds what one key costs a
/// store.
pub const MAX_OUTCOME_BYTES: usize = 64 * 1024;

/// A definitive answer to the first call with a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The prost-encoded response message.
    Response(Bytes),
    /// A status answered for the call (a functional error of the upstream):
    /// its code, message and `grpc-status-details-bin` (the encoded
    /// `google.rpc.Status`), byte for byte.
    Status {
        code: i32,
        message: String,
        details: Bytes,
    },
}

impl Outcome {
    /// The outcome of a successful call.
    pub fn response(message: &impl prost::Message) -> Self {
        Self::Response(Bytes::from(message.encode_to_vec()))
    }

    /// The outcome of a call answered with this status.
    pub fn status(status: &tonic::Status) -> Self {
        Self::Status {
            code: status.code() as i32,
            message: status.message().to_owned(),
            details: status.details().to_vec().into(),
        }
    }

    /// What the first call returned: the decoded response, or the status
    /// rebuilt with the same code, message and details. The outer error means
    /// the record's bytes are not a `M`: a record of another RPC cannot get
    /// here (the RPC is part of the scope), so it means a corrupted store.
    pub fn replay<M: prost::Message + Default>(
        &self,
    ) -> Result<Result<M, tonic::Status>, prost::DecodeError> {
        match self {
            Self::Response(bytes) => M::decode(bytes.clone()).map(Ok),
            Self::Status {
                code,
                message,
                details,
            } => Ok(Err(tonic::Status::with_details(
                tonic::Code::from_i32(*code),
                message.clone(),
                details.clone(),
            ))),
        }
    }

    /// Size counted against [`MAX_OUTCOME_BYTES`] and the memory store's
    /// byte bound: the payload plus the 8 bytes of a status's code and
    /// message length.
    pub fn encoded_len(&self) -> usize {
        match self {
            Self::Response(bytes) => bytes.len(),
            Self::Status {
                message, details, ..
            } => 8 + message.len() + details.len(),
        }
    }
}
