//! What the upstream's error answers mean: the status of each of its error
//! codes and the words for it, the status of an HTTP status that came
//! without a recognised code, and the `ErrorInfo.reason` a code becomes.
//! docs/errors.md lists both tables; a test holds it to them.

use std::borrow::Cow;

use tonic::Code;

use super::GATEWAY_DOMAIN;
use super::failure::Failure;
use super::reasons::reason;
use crate::upstream::{Rejection, RetryAfter};

/// The status of each upstream error code, and the words that describe it.
/// A code listed here decides the status whatever HTTP status came with it.
/// A code not listed, arriving in a 400 body, is FAILED_PRECONDITION.
#[rustfmt::skip]
pub const UPSTREAM_CODES: &[(&str, Code, &str)] = &[
    // ---- the resource the call names does not exist
    ("NotFound",                          Code::NotFound,           "not found"),
    ("INVOICE_NOT_FOUND",                 Code::NotFound,           "invoice not found"),
    ("REF_INVOICE_NOT_FOUND",             Code::NotFound,           "reference invoice not found"),
    // ---- the request asks for something the API does not support
    ("TYPE_NOT_SUPPORTED",                Code::InvalidArgument,    "invoice type not supported"),
    // ---- the caller may not do this
    ("NOT_ALLOWED",                       Code::PermissionDenied,   "operation not allowed"),
    // ---- the invoice or order is not in a state that allows the call
    ("NoChanges",                         Code::FailedPrecondition, "nothing to change"),
    ("NON_STANDARD_REF_INVOICE",          Code::FailedPrecondition, "reference invoice is not a standard invoice"),
    ("ORDER_CANCELED",                    Code::FailedPrecondition, "order is canceled"),
    ("ORDER_CLOSED",                      Code::FailedPrecondition, "order is closed"),
    ("ORDER_NOT_CLOSED",                  Code::FailedPrecondition, "order is not closed"),
    ("REF_INVOICE_STILL_OPEN",            Code::FailedPrecondition, "reference invoice is still open"),
    ("INVOICE_CLOSED",                    Code::FailedPrecondition, "invoice is closed"),
    ("INVOICE_CONTAIN_LINES",             Code::FailedPrecondition, "invoice contains lines"),
    ("ALREADY_CLOSED",                    Code::FailedPrecondition, "invoice is already closed"),
    ("CUSTOMER_REQUIRED",                 Code::FailedPrecondition, "order has no customer"),
    ("DRAFT_LINES_EXISTS",                Code::FailedPrecondition, "order has draft lines"),
    ("GIFT_CARD_RECIPIENT_NOT_EXIST",     Code::FailedPrecondition, "gift card recipient does not exist"),
    ("INVALID_GIFT_CARD_RECIPIENT_PHONE", Code::FailedPrecondition, "gift card recipient phone is invalid"),
    ("INVOICE_EMPTY",                     Code::FailedPrecondition, "invoice is empty"),
    ("MISSING_GIFT_CARD_RECIPIENT",       Code::FailedPrecondition, "gift card recipient is missing"),
    ("PAYMENT_NOT_COMPLETE",              Code::FailedPrecondition, "payment is not complete"),
    ("EMAIL_NOT_DEFINED",                 Code::FailedPrecondition, "customer has no e-mail address"),
    ("INVOICE_NOT_CLOSED",                Code::FailedPrecondition, "invoice is not closed"),
    ("INVOICE_NOT_GENERATED",             Code::FailedPrecondition, "invoice document is not generated"),
];

/// The status and words of a code [`UPSTREAM_CODES`] lists.
pub fn upstream_code(code: &str) -> Option<(Code, &'static str)> {
    UPSTREAM_CODES
        .iter()
        .find(|(listed, ..)| *listed == code)
        .map(|&(_, status, words)| (status, words))
}

/// The status of an upstream answer that has no recognised error code.
pub fn http_status_code(status: u16) -> Code {
    match status {
        // the request was refused without saying why
        400 => Code::InvalidArgument,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::NotFound,
        // the upstream gave up waiting for our request
        408 => Code::DeadlineExceeded,
        409 => Code::Aborted,
        412 => Code::FailedPrecondition,
        422 => Code::InvalidArgument,
        429 => Code::ResourceExhausted,
        // client closed request (nginx)
        499 => Code::Cancelled,
        500 => Code::Internal,
        501 => Code::Unimplemented,
        502 | 503 => Code::Unavailable,
        504 => Code::DeadlineExceeded,
        // redirects are never followed: the upstream URL is misconfigured
        s if (300..400).contains(&s) => Code::Internal,
        // any other refusal: retrying the same request will not help
        s if (400..500).contains(&s) => Code::FailedPrecondition,
        // any other server fault
        s if (500..600).contains(&s) => Code::Internal,
        // 1xx, or a 2xx error body without a code
        _ => Code::Unknown,
    }
}

/// `NoChanges` → `NO_CHANGES`, `NotFound` → `NOT_FOUND`; codes already in
/// UPPER_SNAKE_CASE are unchanged (and borrowed); other characters become
/// `_`, and a code that does not start with a letter gets a `CODE_` prefix,
/// as `ErrorInfo.reason` must.
pub fn reason_of(code: &str) -> Cow<'_, str> {
    if is_upper_snake_case(code) {
        return Cow::Borrowed(code);
    }
    let mut out = String::with_capacity(code.len() + 8);
    if !code.starts_with(|c: char| c.is_ascii_alphabetic()) {
        out.push_str("CODE_");
    }
    let mut previous: Option<char> = None;
    for c in code.chars() {
        if c.is_ascii_uppercase()
            && previous.is_some_and(|p| p.is_ascii_lowercase() || p.is_ascii_digit())
        {
            out.push('_');
        }
        out.push(if c.is_ascii_alphanumeric() {
            c.to_ascii_uppercase()
        } else {
            '_'
        });
        previous = Some(c);
    }
    Cow::Owned(out)
}

/// Whether [`reason_of`] would leave `code` as it is: a capital first, then
/// capitals, digits and `_`, and no capital right after a digit.
fn is_upper_snake_case(code: &str) -> bool {
    let bytes = code.as_bytes();
    bytes.first().is_some_and(u8::is_ascii_uppercase)
        && bytes
            .iter()
            .all(|&b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
        && !bytes
            .windows(2)
            .any(|pair| pair[0].is_ascii_digit() && pair[1].is_ascii_uppercase())
}

/// Longest part of the upstream's `error.message` quoted in the status
/// message of an answer without a code (all of it is in
/// `metadata.upstream_message`): a status message is read on one line.
const QUOTED_MESSAGE_CHARS: usize = 256;

/// An error answer: the code table first, the HTTP status otherwise.
pub(super) fn rejected(rejection: &Rejection) -> Failure<'_> {
    let http = rejection.http_status;
    let failure = match &rejection.code {
        Some(code) => {
            let (status, words) = match upstream_code(code) {
                Some(known) => known,
                // A code the table does not know yet: the upstream's own
                // words, if any.
                None => (
                    if http == 400 {
                        Code::FailedPrecondition
                    } else {
                        http_status_code(http)
                    },
                    rejection
                        .message
                        .as_deref()
                        .unwrap_or("upstream refused the request"),
                ),
            };
            Failure::upstream(status, reason_of(code), format!("{words} ({code})"))
                .with("upstream_code", code.as_str())
        }
        None => Failure::new(
            http_status_code(http),
            reason::UPSTREAM_HTTP_ERROR,
            GATEWAY_DOMAIN,
            without_code(http, rejection.message.as_deref()),
        ),
    };
    let mut failure = failure
        .with("http_status", http.to_string())
        .upstream_request_id(rejection.request_id.as_deref());
    if let Some(message) = &rejection.message {
        failure = failure.with("upstream_message", message.as_str());
    }
    if let Some(excerpt) = &rejection.body_excerpt {
        failure = failure.with("upstream_body", excerpt.as_str());
    }
    let failure = match &rejection.retry_after {
        Some(RetryAfter::Delay(delay)) => failure.retry_after(*delay),
        Some(RetryAfter::Other(value)) => failure.with("retry_after", value.as_str()),
        None => failure,
    };
    // The cooldown the answer opened: the gateway refuses the credential
    // until then, so that is when a retry can go.
    match rejection.cooldown {
        Some(cooldown) => failure.retry_after(cooldown),
        None => failure,
    }
}

/// `upstream answered HTTP 404 Not Found: invoice "inv-x" not found`: the
/// status, and what the upstream said about it (cut at
/// [`QUOTED_MESSAGE_CHARS`]).
fn without_code(http: u16, said: Option<&str>) -> String {
    let mut message = format!("upstream answered HTTP {http}");
    if let Some(text) = http_reason(http) {
        message.push(' ');
        message.push_str(text);
    }
    if let Some(said) = said {
        message.push_str(": ");
        match said.char_indices().nth(QUOTED_MESSAGE_CHARS) {
            Some((cut, _)) => {
                message.push_str(&said[..cut]);
                message.push('…');
            }
            None => message.push_str(said),
        }
    }
    message
}

fn http_reason(status: u16) -> Option<&'static str> {
    http::StatusCode::from_u16(status).ok()?.canonical_reason()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_upper_snake_case() {
        assert_eq!(reason_of("NoChanges"), "NO_CHANGES");
        assert_eq!(reason_of("NotFound"), "NOT_FOUND");
        assert_eq!(reason_of("ORDER_CLOSED"), "ORDER_CLOSED");
        assert_eq!(reason_of("INVOICE_NOT_FOUND"), "INVOICE_NOT_FOUND");
        assert_eq!(reason_of("rate-limited"), "RATE_LIMITED");
        assert_eq!(reason_of("42-x"), "CODE_42_X");
        assert_eq!(reason_of("ERR2X"), "ERR2_X");
        assert_eq!(reason_of("E_2"), "E_2");
        assert_eq!(reason_of(""), "CODE_");
    }

    #[test]
    fn only_codes_already_in_upper_snake_case_are_borrowed() {
        for code in ["ORDER_CLOSED", "E_2", "A", "X_1_Y"] {
            assert!(matches!(reason_of(code), Cow::Borrowed(_)), "{code}");
        }
        for code in ["NoChanges", "ERR2X", "_X", "1A", "A-B", "É", ""] {
            assert!(matches!(reason_of(code), Cow::Owned(_)), "{code}");
        }
    }

    #[test]
    fn an_answer_without_a_code_quotes_what_the_upstream_said() {
        assert_eq!(
            without_code(404, Some("invoice \"inv-x\" not found")),
            "upstream answered HTTP 404 Not Found: invoice \"inv-x\" not found"
        );
        assert_eq!(
            without_code(404, None),
            "upstream answered HTTP 404 Not Found"
        );
        assert_eq!(without_code(299, None), "upstream answered HTTP 299");
        let long = "é".repeat(QUOTED_MESSAGE_CHARS + 1);
        let message = without_code(400, Some(&long));
        let quoted = message
            .strip_prefix("upstream answered HTTP 400 Bad Request: ")
            .unwrap();
        assert_eq!(
            quoted,
            format!("{}…", "é".repeat(QUOTED_MESSAGE_CHARS)),
            "cut at {QUOTED_MESSAGE_CHARS} characters"
        );
        let exact = "x".repeat(QUOTED_MESSAGE_CHARS);
        assert!(without_code(400, Some(&exact)).ends_with(&format!(": {exact}")));
    }
}
