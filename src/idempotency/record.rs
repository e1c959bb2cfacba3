//! The bytes of one record as the Redis store keeps it (format version 1).
//! Hand-rolled rather than a schema: four shapes, all fixed fields, and the
//! in-progress shape must have a fixed length so a lease can compare the
//! stored value with the one it wrote.
//!
//! ```text
//! offset  size  field
//! 0       1     format version (1); any other value is refused, never guessed at
//! 1       1     kind: 1 in progress, 2 response, 3 status, 4 outcome unknown
//! 2       32    request digest (SHA-256, see request_digest)
//! kind 1: 34  16  owner token (8 random bytes per process, then a counter)
//!         50  8   lease in ms, big-endian
//!         58  8   the record's time to live when written, in ms, big-endian
//!                 (the lease's age is that minus the key's PTTL: Redis's own
//!                 clock, so replicas' clocks never matter)
//! kind 2: 34  ..  the prost-encoded response message
//! kind 3: 34  4   gRPC code, big-endian i32
//!         38  4   message length in bytes, big-endian
//!         42  n   message (UTF-8)
//!         42+n ..  grpc-status-details-bin
//! kind 4: nothing more
//! ```

use bytes::Bytes;

use super::{Digest, Outcome};

const VERSION: u8 = 1;
const IN_PROGRESS: u8 = 1;
const RESPONSE: u8 = 2;
const STATUS: u8 = 3;
const UNKNOWN: u8 = 4;
const HEADER_LEN: usize = 2 + 32;

/// Length of an in-progress record.
pub(crate) const IN_PROGRESS_LEN: usize = HEADER_LEN + 16 + 8 + 8;

/// A decoded record.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Record {
    InProgress { lease_ms: u64, ttl_ms: u64 },
    Done(Outcome),
    Unknown,
}

fn header(kind: u8, digest: &Digest) -> [u8; HEADER_LEN] {
    let mut out = [0; HEADER_LEN];
    out[0] = VERSION;
    out[1] = kind;
    out[2..].copy_from_slice(&digest.0);
    out
}

pub(crate) fn in_progress(
    digest: &Digest,
    token: [u8; 16],
    lease_ms: u64,
    ttl_ms: u64,
) -> [u8; IN_PROGRESS_LEN] {
    let mut out = [0; IN_PROGRESS_LEN];
    out[..HEADER_LEN].copy_from_slice(&header(IN_PROGRESS, digest));
    out[34..50].copy_from_slice(&token);
    out[50..58].copy_from_slice(&lease_ms.to_be_bytes());
    out[58..66].copy_from_slice(&ttl_ms.to_be_bytes());
    out
}

pub(crate) fn unknown(digest: &Digest) -> [u8; HEADER_LEN] {
    header(UNKNOWN, digest)
}

pub(crate) fn outcome(digest: &Digest, outcome: &Outcome) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + outcome.encoded_len());
    match outcome {
        Outcome::Response(bytes) => {
            out.extend_from_slice(&header(RESPONSE, digest));
            out.extend_from_slice(bytes);
        }
        Outcome::Status {
            code,
            message,
            details,
        } => {
            out.extend_from_slice(&header(STATUS, digest));
            out.extend_from_slice(&code.to_be_bytes());
            // Outcomes over MAX_OUTCOME_BYTES are never encoded, so this fits.
            out.extend_from_slice(&(message.len() as u32).to_be_bytes());
            out.extend_from_slice(message.as_bytes());
            out.extend_from_slice(details);
        }
    }
    out
}

/// Reads a record; the error says what is wrong with it (no contents).
pub(crate) fn decode(bytes: Bytes) -> Result<(Digest, Record), String> {
    match bytes.first() {
        Some(&VERSION) => {}
        Some(other) => {
            return Err(format!(
                "record format version {other} is not one this gateway reads (version {VERSION}); \
                 was it written by a newer gateway?"
            ));
        }
        None => return Err("empty record".into()),
    }
    if bytes.len() < HEADER_LEN {
        return Err(format!("record of {} bytes is too short", bytes.len()));
    }
    let mut digest = [0; 32];
    digest.copy_from_slice(&bytes[2..HEADER_LEN]);
    let body = &bytes[HEADER_LEN..];
    let record = match bytes[1] {
        IN_PROGRESS if body.len() == IN_PROGRESS_LEN - HEADER_LEN => Record::InProgress {
            lease_ms: u64_at(body, 16),
            ttl_ms: u64_at(body, 24),
        },
        RESPONSE => Record::Done(Outcome::Response(bytes.slice(HEADER_LEN..))),
        STATUS if body.len() >= 8 => {
            let code = i32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            let len = u32::from_be_bytes([body[4], body[5], body[6], body[7]]) as usize;
            let Some(message) = body.get(8..8 + len) else {
                return Err("status record shorter than its message length".into());
            };
            let message = std::str::from_utf8(message)
                .map_err(|_| "status record message is not UTF-8".to_owned())?
                .to_owned();
            Record::Done(Outcome::Status {
                code,
                message,
                details: bytes.slice(HEADER_LEN + 8 + len..),
            })
        }
        UNKNOWN if body.is_empty() => Record::Unknown,
        kind => {
            return Err(format!(
                "record of kind {kind} has a body of {} bytes",
                body.len()
            ));
        }
    };
    Ok((Digest(digest), record))
}

fn u64_at(body: &[u8], at: usize) -> u64 {
    let mut b = [0; 8];
    b.copy_from_slice(&body[at..at + 8]);
    u64::from_be_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: Digest = Digest([7; 32]);

    #[test]
    fn round_trips() {
        let ip = in_progress(&D, [9; 16], 1500, 86_400_000);
        assert_eq!(
            decode(Bytes::copy_from_slice(&ip)).unwrap(),
            (
                D,
                Record::InProgress {
                    lease_ms: 1500,
                    ttl_ms: 86_400_000
                }
            )
        );
        assert_eq!(
            decode(Bytes::copy_from_slice(&unknown(&D))).unwrap(),
            (D, Record::Unknown)
        );
        for o in [
            Outcome::Response(Bytes::from_static(b"\x0a\x03abc")),
            Outcome::Response(Bytes::new()),
            Outcome::Status {
                code: 9,
                message: "order is closed ✓".into(),
                details: Bytes::from_static(b"\x08\x09\x12\x00"),
            },
            Outcome::Status {
                code: 5,
                message: String::new(),
                details: Bytes::new(),
            },
        ] {
            let encoded = outcome(&D, &o);
            assert_eq!(decode(encoded.into()).unwrap(), (D, Record::Done(o)));
        }
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        let mut v2 = unknown(&D).to_vec();
        v2[0] = 2;
        let e = decode(v2.into()).unwrap_err();
        assert!(e.contains("version 2"), "{e}");
        assert!(decode(Bytes::from_static(b"\x01\x04")).is_err());
        let mut bad_kind = unknown(&D).to_vec();
        bad_kind[1] = 9;
        assert!(decode(bad_kind.into()).is_err());
        let mut short_status = outcome(
            &D,
            &Outcome::Status {
                code: 1,
                message: "abc".into(),
                details: Bytes::new(),
            },
        );
        short_status.truncate(short_status.len() - 1);
        assert!(decode(short_status.into()).is_err());
        let truncated_lease = in_progress(&D, [0; 16], 1, 1)[..60].to_vec();
        assert!(decode(truncated_lease.into()).is_err());
    }
}
