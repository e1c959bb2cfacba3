//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): reading the
//! caller's `traceparent`/`tracestate` and writing the ones sent upstream.
//! A header that breaks the rules is ignored (the call starts a new trace);
//! it never fails the call.
//!
//! Written here rather than through `opentelemetry_sdk::propagation::
//! TraceContextPropagator` (already in the tree, `trace` feature), for a
//! measured reason: the gateway reads the context of every call and writes
//! a `traceparent` on every upstream request, export on or off, and the
//! SDK's propagator (an `Extractor` over the metadata, an `Injector` for
//! the header) allocates on both sides (a `Vec` of the parts, a `Context`
//! and its `Arc` to read; a `Context`, then `format!`, to write), which
//! made every call measurably dearer, with or without a `traceparent`
//! (BENCHMARKS.md, "Design choices measured"). The SDK is also looser than
//! the spec:
//! ids of any length up to 32/16 digits (`u128::from_str_radix`), the
//! Level 2 random flag dropped, one `tracestate` value only, no 512-byte
//! bound.

use std::fmt;

use http::HeaderValue;
use tonic::metadata::MetadataMap;

/// The `traceparent` flag saying the caller recorded its span.
pub const FLAG_SAMPLED: u8 = 0x01;
/// Level 2's flag saying the trace id's right 7 bytes are random.
pub const FLAG_RANDOM: u8 = 0x02;
/// Flags the gateway propagates; the spec asks for unknown ones to be zeroed.
const KNOWN_FLAGS: u8 = FLAG_SAMPLED | FLAG_RANDOM;

/// Longest `tracestate` forwarded: the spec asks vendors to propagate at
/// least 512 characters and allows dropping the header when it is longer.
pub const MAX_TRACESTATE_BYTES: usize = 512;
/// Most list members in a `tracestate` (the spec's limit).
const MAX_TRACESTATE_MEMBERS: usize = 32;

/// A trace id: 16 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId([u8; 16]);

/// A trace id's 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceIdHex([u8; 32]);

impl TraceIdHex {
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for TraceIdHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for TraceIdHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.as_str())
    }
}

/// A span id: 8 bytes, never all zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId([u8; 8]);

impl TraceId {
    /// `None` for the invalid all-zero id.
    pub fn from_bytes(bytes: [u8; 16]) -> Option<Self> {
        (bytes != [0; 16]).then_some(Self(bytes))
    }

    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// Lowercase hex on the stack, for a `&str` field (the call's log line)
    /// without allocating.
    pub fn hex(self) -> TraceIdHex {
        let mut out = [0; 32];
        put_hex(&mut out, &self.0);
        TraceIdHex(out)
    }

    /// A random id, from a fast non-cryptographic generator (trace ids need
    /// to be unique, not secret).
    pub fn random() -> Self {
        loop {
            if let Some(id) = Self::from_bytes(fastrand::u128(..).to_be_bytes()) {
                return id;
            }
        }
    }
}

impl SpanId {
    /// `None` for the invalid all-zero id.
    pub fn from_bytes(bytes: [u8; 8]) -> Option<Self> {
        (bytes != [0; 8]).then_some(Self(bytes))
    }

    pub fn to_bytes(self) -> [u8; 8] {
        self.0
    }

    pub fn random() -> Self {
        loop {
            if let Some(id) = Self::from_bytes(fastrand::u64(..).to_be_bytes()) {
                return id;
            }
        }
    }
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// Lowercase hex, as in `traceparent` and in the log line.
impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceId({self})")
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Debug for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpanId({self})")
    }
}

/// A parsed `traceparent`: the caller's trace and the span that made the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    /// The caller's span: the parent of the gateway's call span.
    pub parent_id: SpanId,
    /// Only the flags the gateway knows ([`FLAG_SAMPLED`], [`FLAG_RANDOM`]).
    pub flags: u8,
}

impl TraceParent {
    /// Parses a `traceparent` value. Version `00` must be exactly 55
    /// characters; a later version is read as far as version `00` goes
    /// (what follows must start with `-`), as the spec asks; version `ff`,
    /// uppercase hex and all-zero ids are invalid.
    pub fn parse(value: &[u8]) -> Option<Self> {
        if value.len() < 55 {
            return None;
        }
        let version = hex_byte(&value[0..2])?;
        match version {
            0x00 if value.len() != 55 => return None,
            0xff => return None,
            _ if value.len() > 55 && value[55] != b'-' => return None,
            _ => {}
        }
        if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
            return None;
        }
        let mut trace_id = [0; 16];
        for (i, byte) in trace_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[3 + 2 * i..5 + 2 * i])?;
        }
        let mut parent_id = [0; 8];
        for (i, byte) in parent_id.iter_mut().enumerate() {
            *byte = hex_byte(&value[36 + 2 * i..38 + 2 * i])?;
        }
        let flags = hex_byte(&value[53..55])?;
        Some(Self {
            trace_id: TraceId::from_bytes(trace_id)?,
            parent_id: SpanId::from_bytes(parent_id)?,
            flags: flags & KNOWN_FLAGS,
        })
    }

    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// The version `00` header value.
    pub fn to_header_value(&self) -> HeaderValue {
        let mut out = [0u8; 55];
        out[..3].copy_from_slice(b"00-");
        put_hex(&mut out[3..35], &self.trace_id.0);
        out[35] = b'-';
        put_hex(&mut out[36..52], &self.parent_id.0);
        out[52] = b'-';
        put_hex(&mut out[53..55], &[self.flags]);
        // Only `0-9 a-f -`: always a valid header value.
        HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id, self.parent_id, self.flags
        )
    }
}

/// Two lowercase hex digits (the spec's `HEXDIGLC`).
fn hex_byte(two: &[u8]) -> Option<u8> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    Some(digit(two[0])? << 4 | digit(two[1])?)
}

fn put_hex(out: &mut [u8], bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, b) in bytes.iter().enumerate() {
        out[2 * i] = HEX[usize::from(b >> 4)];
        out[2 * i + 1] = HEX[usize::from(b & 0xf)];
    }
}

/// The trace context a call arrived with.
#[derive(Debug, Clone, Default)]
pub struct TraceContext {
    /// The caller's span, when it sent a valid `traceparent`.
    pub parent: Option<TraceParent>,
    /// The caller's `tracestate`, forwarded as is: only with a valid
    /// `traceparent`, and only when it looks valid.
    pub tracestate: Option<HeaderValue>,
}

impl TraceContext {
    /// No parent: the call starts a new trace.
    pub fn root() -> Self {
        Self::default()
    }

    /// From the call's gRPC metadata.
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        let mut parents = metadata.get_all("traceparent").iter();
        let traceparent = match (parents.next(), parents.next()) {
            (Some(one), None) => Some(one.as_bytes()),
            // Several `traceparent`s are invalid (the spec): a new trace.
            _ => None,
        };
        let states = metadata.get_all("tracestate");
        Self::from_values(traceparent, states.iter().map(|v| v.as_bytes()))
    }

    /// From the raw values; several `tracestate` values join with `,` (HTTP
    /// list semantics).
    pub fn from_values<'a>(
        traceparent: Option<&[u8]>,
        tracestate: impl IntoIterator<Item = &'a [u8]>,
    ) -> Self {
        let Some(parent) = traceparent.and_then(TraceParent::parse) else {
            // Without a valid traceparent, tracestate must be ignored.
            return Self::root();
        };
        let mut states = tracestate.into_iter();
        let tracestate = match (states.next(), states.next()) {
            (None, _) => None,
            (Some(one), None) => forwardable(one),
            (Some(first), Some(second)) => {
                let mut joined = first.to_vec();
                for more in std::iter::once(second).chain(states) {
                    joined.push(b',');
                    joined.extend_from_slice(more);
                }
                forwardable(&joined)
            }
        };
        Self {
            parent: Some(parent),
            tracestate,
        }
    }
}

fn forwardable(tracestate: &[u8]) -> Option<HeaderValue> {
    if valid_tracestate(tracestate) {
        HeaderValue::from_bytes(tracestate).ok()
    } else {
        None
    }
}

/// A `tracestate` the gateway forwards: at most 512 bytes of printable
/// ASCII, at most 32 `key=value` members, empty members allowed (the spec
/// lets list members be empty). The gateway does not rewrite it: it adds no
/// member of its own.
fn valid_tracestate(value: &[u8]) -> bool {
    if value.is_empty() || value.len() > MAX_TRACESTATE_BYTES {
        return false;
    }
    if !value.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return false;
    }
    let mut members = 0;
    for member in value.split(|&b| b == b',') {
        let member = member.trim_ascii();
        if member.is_empty() {
            continue;
        }
        members += 1;
        let Some(eq) = member.iter().position(|&b| b == b'=') else {
            return false;
        };
        let (key, value) = (&member[..eq], &member[eq + 1..]);
        let key_ok = !key.is_empty()
            && key.len() <= 256
            && key.iter().all(|&b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'_' | b'-' | b'*' | b'/' | b'@')
            });
        // Values: printable ASCII except `,` and `=`, not ending in a space.
        let value_ok = !value.is_empty()
            && value.len() <= 256
            && !value.contains(&b'=')
            && value.last() != Some(&b' ');
        if !key_ok || !value_ok {
            return false;
        }
    }
    members > 0 && members <= MAX_TRACESTATE_MEMBERS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the W3C specification.
    const SPEC: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    fn parse(s: &str) -> Option<TraceParent> {
        TraceParent::parse(s.as_bytes())
    }

    #[test]
    fn the_specification_examples() {
        let p = parse(SPEC).expect("valid");
        assert_eq!(p.trace_id.to_string(), "0af7651916cd43dd8448eb211c80319c");
        assert_eq!(p.parent_id.to_string(), "b7ad6b7169203331");
        assert!(p.sampled());
        assert_eq!(p.to_string(), SPEC);
        assert_eq!(p.to_header_value(), SPEC);

        let unsampled =
            parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00").expect("valid");
        assert!(!unsampled.sampled());
    }

    #[test]
    fn invalid_traceparents() {
        let cases = [
            ("", "empty"),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
                "no flags",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-",
                "version 00 longer than 55",
            ),
            (
                "00-00000000000000000000000000000000-b7ad6b7169203331-01",
                "all-zero trace id",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
                "all-zero parent id",
            ),
            (
                "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
                "uppercase hex",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319g-b7ad6b7169203331-01",
                "non-hex",
            ),
            (
                "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                "version ff",
            ),
            (
                "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
                "short version",
            ),
            (
                "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
                "wrong separators",
            ),
            (
                "00-0af7651916cd43dd8448eb211c80319-cb7ad6b7169203331-01",
                "misplaced dash",
            ),
            (
                "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01x",
                "later version without a dash after 55",
            ),
        ];
        for (value, why) in cases {
            assert_eq!(parse(value), None, "{why}: {value:?}");
        }
    }

    #[test]
    fn later_versions_are_read_as_far_as_version_00_goes() {
        let p =
            parse("cc-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what-the-future-holds")
                .expect("forward compatible");
        assert_eq!(p.to_string(), SPEC);
        let same_length = parse("01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert!(same_length.is_some());
    }

    #[test]
    fn unknown_flags_are_dropped() {
        let p = parse("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff").expect("valid");
        assert_eq!(p.flags, FLAG_SAMPLED | FLAG_RANDOM);
    }

    #[test]
    fn tracestate_only_with_a_valid_traceparent() {
        let state: [&[u8]; 1] = [b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"];
        let ctx = TraceContext::from_values(Some(SPEC.as_bytes()), state);
        assert_eq!(
            ctx.tracestate.as_ref().map(|v| v.as_bytes()),
            Some(&b"rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"[..])
        );
        let orphan = TraceContext::from_values(Some(b"garbage"), state);
        assert!(orphan.parent.is_none());
        assert!(orphan.tracestate.is_none());
        let joined = TraceContext::from_values(Some(SPEC.as_bytes()), [&b"a=1"[..], b"b@v=2"]);
        assert_eq!(
            joined.tracestate.as_ref().map(|v| v.as_bytes()),
            Some(&b"a=1,b@v=2"[..])
        );
    }

    #[test]
    fn tracestate_validity() {
        assert!(valid_tracestate(b"rojo=00f067aa0ba902b7"));
        assert!(valid_tracestate(b"a=1 , ,b=2"));
        assert!(valid_tracestate(b"tenant@vendor=x/y:z"));
        assert!(!valid_tracestate(b""));
        assert!(!valid_tracestate(b"novalue"));
        assert!(!valid_tracestate(b"UPPER=1"));
        assert!(!valid_tracestate(b"a=b=c"));
        assert!(!valid_tracestate(b"a=\x01"));
        assert!(!valid_tracestate("a=é".as_bytes()));
        let long = format!("a={}", "x".repeat(MAX_TRACESTATE_BYTES));
        assert!(!valid_tracestate(long.as_bytes()));
        let many = (0..33)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(!valid_tracestate(many.as_bytes()));
        let most = (0..32)
            .map(|i| format!("k{i}=v"))
            .collect::<Vec<_>>()
            .join(",");
        assert!(valid_tracestate(most.as_bytes()));
    }

    #[test]
    fn from_metadata_refuses_duplicate_traceparents() {
        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", SPEC.parse().expect("ascii"));
        metadata.insert("tracestate", "a=1".parse().expect("ascii"));
        let ctx = TraceContext::from_metadata(&metadata);
        assert_eq!(ctx.parent.map(|p| p.to_string()).as_deref(), Some(SPEC));
        assert_eq!(
            ctx.tracestate.as_ref().map(|v| v.as_bytes()),
            Some(&b"a=1"[..])
        );

        metadata.append("traceparent", SPEC.parse().expect("ascii"));
        let ctx = TraceContext::from_metadata(&metadata);
        assert!(ctx.parent.is_none());
        assert!(ctx.tracestate.is_none());
    }

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = TraceId::random();
        let b = TraceId::random();
        assert_ne!(a, b);
        assert_ne!(a.to_bytes(), [0; 16]);
        assert_ne!(SpanId::random(), SpanId::random());
        assert_eq!(a.to_string().len(), 32);
        assert_eq!(a.hex().as_str(), a.to_string());
    }
}
