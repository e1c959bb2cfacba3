//! Field checks of request messages, before anything is sent: what each
//! RPC requires is declared with it (`upstream::Operation::validate`); the
//! checks shared by several RPCs and the shape of a violation live here.

/// One invalid request field, reported in `google.rpc.BadRequest`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// The proto field name, e.g. `invoice_id`.
    pub field: &'static str,
    pub description: String,
}

/// Longest `invoice_id` accepted: it travels in the URL, percent-encoded (up
/// to three bytes per byte), and servers commonly refuse URLs over 8 KiB.
pub const MAX_INVOICE_ID_BYTES: usize = 1024;

/// A required string field.
pub fn required(field: &'static str, value: &str) -> Option<FieldViolation> {
    value.is_empty().then(|| FieldViolation {
        field,
        description: "is required".to_owned(),
    })
}

/// Any id is encoded into one path segment, except the dot segments, which
/// URL normalisation would resolve against the path.
pub fn invoice_id(value: &str) -> Option<FieldViolation> {
    let problem = if value.is_empty() {
        "is required".to_owned()
    } else if matches!(value, "." | "..") {
        format!("must not be {value:?}")
    } else if value.len() > MAX_INVOICE_ID_BYTES {
        format!("is longer than {MAX_INVOICE_ID_BYTES} bytes")
    } else {
        return None;
    };
    Some(FieldViolation {
        field: "invoice_id",
        description: problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_segments_are_not_ids() {
        assert!(invoice_id(".").is_some());
        assert!(invoice_id("..").is_some());
        assert!(invoice_id("").is_some());
        assert!(invoice_id("...").is_none());
        assert!(invoice_id("a/b").is_none());
        assert!(invoice_id(&"x".repeat(MAX_INVOICE_ID_BYTES)).is_none());
        assert!(invoice_id(&"x".repeat(MAX_INVOICE_ID_BYTES + 1)).is_some());
    }

    #[test]
    fn required_fields_name_themselves() {
        assert_eq!(required("order_id", "o-1"), None);
        assert_eq!(
            required("order_id", ""),
            Some(FieldViolation {
                field: "order_id",
                description: "is required".into()
            })
        );
    }
}
