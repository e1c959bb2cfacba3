//! The protobuf types and tonic service generated from `proto/` by `build.rs`.

/// Package `gormic.om.v1`: messages, the `InvoiceService` server trait and a client.
pub mod v1 {
    #![allow(clippy::doc_lazy_continuation, clippy::doc_overindented_list_items)]
    tonic::include_proto!("gormic.om.v1");
}

/// Encoded `FileDescriptorSet` of `proto/` and its imports, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("gormic_descriptor");
