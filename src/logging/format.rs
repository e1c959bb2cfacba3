//! The log line format, text or JSON, written for speed: every call writes
//! one line, and tracing-subscriber's own formatter spent several times
//! this one's instructions on it (Debug-escaping every string character by
//! character, colour styling even when off). The timestamp is humantime's
//! RFC 3339 (a date cached per second saved too little to be worth code of
//! our own). JSON strings are escaped by serde_json, into a byte buffer
//! checked as UTF-8 once per line (handing each of serde_json's writes to
//! the line's `fmt::Write` cost more). The figures: BENCHMARKS.md, "Design
//! choices measured". The lines look the same as tracing-subscriber's:
//!
//! ```text
//! 2026-11-25T15:37:03.182571Z  INFO gormic_gateway::call_log: call rpc="CloseInvoice" grpc_code="OK" latency_ms=0.412
//! {"timestamp":"2026-11-25T15:37:03.182571Z","level":"INFO","message":"call","rpc":"CloseInvoice","grpc_code":"OK","latency_ms":0.412,"target":"gormic_gateway::call_log"}
//! ```

use std::fmt;
use std::io::{self, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// One line per event, text or JSON.
#[derive(Debug, Clone, Copy)]
pub struct LineFormat {
    json: bool,
}

impl LineFormat {
    pub fn text() -> Self {
        Self { json: false }
    }

    pub fn json() -> Self {
        Self { json: true }
    }
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _: &FmtContext<'_, S, N>,
        mut out: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let metadata = event.metadata();
        let now = timestamp(SystemTime::now());
        if self.json {
            // Built as bytes, for serde_json's escaping (an io::Write), then
            // checked as UTF-8 once for the whole line.
            let mut line = Vec::with_capacity(JSON_LINE_CAPACITY);
            json_line(&mut line, now, event).map_err(|_| fmt::Error)?;
            out.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)
        } else {
            write!(out, "{now}")?;
            out.write_str(match *metadata.level() {
                Level::ERROR => " ERROR ",
                Level::WARN => "  WARN ",
                Level::INFO => "  INFO ",
                Level::DEBUG => " DEBUG ",
                Level::TRACE => " TRACE ",
            })?;
            out.write_str(metadata.target())?;
            out.write_char(':')?;
            let mut fields = TextFields {
                out: &mut out,
                result: Ok(()),
            };
            event.record(&mut fields);
            fields.result?;
            out.write_char('\n')
        }
    }
}

fn level(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARN",
        Level::INFO => "INFO",
        Level::DEBUG => "DEBUG",
        Level::TRACE => "TRACE",
    }
}

/// ` message key=value key="text"`; strings quoted as Rust's Debug does.
struct TextFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl TextFields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.out.write_char(' ')?;
        self.out.write_str(field.name())?;
        self.out.write_char('=')
    }
}

impl Visit for TextFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            self.out
                .write_char(' ')
                .and_then(|()| self.out.write_str(value))
        } else {
            self.key(field).and_then(|()| quoted(self.out, value))
        };
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.result.is_ok() {
            self.result = self
                .key(field)
                .and_then(|()| self.out.write_str(itoa::Buffer::new().format(value)));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.result.is_ok() {
            self.result = self
                .key(field)
                .and_then(|()| self.out.write_str(itoa::Buffer::new().format(value)));
        }
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| write!(self.out, "{value}"));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            let value = if value { "true" } else { "false" };
            self.result = self.key(field).and_then(|()| self.out.write_str(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_err() {
            return;
        }
        self.result = if field.name() == "message" {
            write!(self.out, " {value:?}")
        } else {
            self.key(field).and_then(|()| write!(self.out, "{value:?}"))
        };
    }
}

/// `"text"` straight when nothing needs escaping, else as Debug escapes it.
fn quoted(out: &mut Writer<'_>, value: &str) -> fmt::Result {
    if value
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.write_char('"')?;
        out.write_str(value)?;
        out.write_char('"')
    } else {
        write!(out, "{value:?}")
    }
}

/// Room for a call's JSON line (about 300 bytes) without growing.
const JSON_LINE_CAPACITY: usize = 512;

/// `{"timestamp":...,"level":...,fields...,"target":...}` and a newline.
fn json_line(
    line: &mut Vec<u8>,
    now: humantime::Rfc3339Timestamp,
    event: &Event<'_>,
) -> io::Result<()> {
    let metadata = event.metadata();
    write!(line, "{{\"timestamp\":\"{now}\",\"level\":\"")?;
    line.extend_from_slice(level(metadata.level()).as_bytes());
    line.push(b'"');
    let mut fields = JsonFields {
        line: &mut *line,
        result: Ok(()),
    };
    event.record(&mut fields);
    fields.result?;
    line.extend_from_slice(b",\"target\":");
    json_string(line, metadata.target())?;
    line.extend_from_slice(b"}\n");
    Ok(())
}

/// `,"key":value` for each field.
struct JsonFields<'a> {
    line: &'a mut Vec<u8>,
    result: io::Result<()>,
}

impl JsonFields<'_> {
    /// `,"key":` then the value's bytes, unless a field already failed.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Vec<u8>) -> io::Result<()>) {
        if self.result.is_ok() {
            self.line.push(b',');
            self.result = json_string(self.line, field.name()).and_then(|()| {
                self.line.push(b':');
                value(self.line)
            });
        }
    }

    fn plain(&mut self, field: &Field, text: &str) {
        self.field(field, |line| {
            line.extend_from_slice(text.as_bytes());
            Ok(())
        });
    }
}

impl Visit for JsonFields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |line| json_string(line, value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.plain(field, itoa::Buffer::new().format(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.plain(field, itoa::Buffer::new().format(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        // JSON has no NaN or infinities.
        match value.is_finite() {
            true => self.field(field, |line| write!(line, "{value}")),
            false => self.plain(field, "null"),
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.plain(field, if value { "true" } else { "false" });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        self.field(field, |line| json_string(line, &text));
    }
}

/// A JSON string literal, escaped by serde_json (RFC 8259: `"`, `\\` and
/// the control characters).
fn json_string(line: &mut Vec<u8>, value: &str) -> io::Result<()> {
    serde_json::to_writer(line, value).map_err(io::Error::from)
}

/// RFC 3339 in UTC with microseconds (`2026-11-25T15:37:03.182571Z`), by
/// humantime. humantime panics on a time before 1970 and refuses one from
/// the year 10000 on: a clock that far off is logged as the epoch rather
/// than costing the line.
fn timestamp(now: SystemTime) -> humantime::Rfc3339Timestamp {
    // 10000-01-01T00:00:00Z, humantime's first refused second.
    const YEAR_10000: Duration = Duration::from_secs(253_402_300_800);
    let in_range = now
        .duration_since(UNIX_EPOCH)
        .is_ok_and(|since| since < YEAR_10000);
    humantime::format_rfc3339_micros(if in_range { now } else { UNIX_EPOCH })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `2026-11-25T15:37:03.182571Z`.
    const TIMESTAMP_LEN: usize = 27;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let at = |micros| timestamp(UNIX_EPOCH + Duration::from_micros(micros)).to_string();
        assert_eq!(at(1_795_621_023_182_571), "2026-11-25T15:37:03.182571Z");
        assert_eq!(at(951_782_400_000_000), "2000-02-29T00:00:00.000000Z"); // a leap day
        assert_eq!(at(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(at(253_402_300_799_999_999), "9999-12-31T23:59:59.999999Z");
    }

    #[test]
    fn a_clock_out_of_range_is_logged_as_the_epoch() {
        let epoch = "1970-01-01T00:00:00.000000Z";
        let before = UNIX_EPOCH - Duration::from_secs(1);
        assert_eq!(timestamp(before).to_string(), epoch);
        let year_10000 = UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(timestamp(year_10000).to_string(), epoch);
    }

    /// The lines of one event, as each format writes them.
    fn lines(json: bool) -> String {
        use std::sync::{Arc, Mutex};
        let buffer = Arc::new(Mutex::new(Vec::new()));
        let sink = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(if json {
                LineFormat::json()
            } else {
                LineFormat::text()
            })
            .with_writer(move || Sink(sink.clone()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(
                rpc = "CloseInvoice",
                error = "say \"no\"\n",
                upstream_status = 200u16,
                latency_ms = 0.25f64,
                replayed = true,
                "call"
            );
        });
        String::from_utf8(buffer.lock().unwrap().clone()).unwrap()
    }

    struct Sink(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_lines_quote_strings_and_put_the_message_first() {
        let line = lines(false);
        let after_timestamp = &line[TIMESTAMP_LEN..];
        assert_eq!(
            after_timestamp,
            "  INFO gormic_gateway::logging::format::tests: call rpc=\"CloseInvoice\" \
             error=\"say \\\"no\\\"\\n\" upstream_status=200 latency_ms=0.25 replayed=true\n"
        );
    }

    #[test]
    fn json_strings_escape_what_rfc_8259_requires() {
        let escaped = |value: &str| {
            let mut line = Vec::new();
            json_string(&mut line, value).expect("a Vec takes every write");
            String::from_utf8(line).expect("serde_json writes UTF-8")
        };
        assert_eq!(escaped("plain"), "\"plain\"");
        assert_eq!(
            escaped("say \"no\"\\\n\r\t\u{1}\u{1f}"),
            "\"say \\\"no\\\"\\\\\\n\\r\\t\\u0001\\u001f\""
        );
        assert_eq!(escaped("é → ✓"), "\"é → ✓\"");
    }

    #[test]
    fn json_lines_parse_and_keep_every_field() {
        let line = lines(true);
        let value: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["message"], "call");
        assert_eq!(value["rpc"], "CloseInvoice");
        assert_eq!(value["error"], "say \"no\"\n");
        assert_eq!(value["upstream_status"], 200);
        assert_eq!(value["latency_ms"], 0.25);
        assert_eq!(value["replayed"], true);
        assert_eq!(value["target"], "gormic_gateway::logging::format::tests");
        assert_eq!(
            value["timestamp"].as_str().map(str::len),
            Some(TIMESTAMP_LEN)
        );
        assert!(line.ends_with("}\n"));
        let prefix = "{\"timestamp\":\"".len();
        assert_eq!(
            &line[prefix + TIMESTAMP_LEN..],
            "\",\"level\":\"INFO\",\"message\":\"call\",\"rpc\":\"CloseInvoice\",\
             \"error\":\"say \\\"no\\\"\\n\",\"upstream_status\":200,\"latency_ms\":0.25,\
             \"replayed\":true,\"target\":\"gormic_gateway::logging::format::tests\"}\n"
        );
    }
}
