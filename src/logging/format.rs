//! The log line format, text or JSON, written for speed: every call writes
//! one line, and tracing-subscriber's own formatter spent ~14k instructions
//! on it (Debug-escaping every string character by character, colour
//! styling even when off). The timestamp is humantime's RFC 3339 (its
//! calendar arithmetic per line measured ~440 instructions per call more
//! than a date cached per second, 0.4 %: not worth code of our own). The
//! lines look the same as tracing-subscriber's:
//!
//! ```text
//! 2026-11-25T15:37:03.182571Z  INFO gormic_gateway::call_log: call rpc="CloseInvoice" grpc_code="OK" latency_ms=0.412
//! {"timestamp":"2026-11-25T15:37:03.182571Z","level":"INFO","message":"call","rpc":"CloseInvoice","grpc_code":"OK","latency_ms":0.412,"target":"gormic_gateway::call_log"}
//! ```

use std::fmt;
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
            write!(out, "{{\"timestamp\":\"{now}")?;
            out.write_str("\",\"level\":\"")?;
            out.write_str(level(metadata.level()))?;
            out.write_char('"')?;
            let mut fields = JsonFields {
                out: &mut out,
                result: Ok(()),
            };
            event.record(&mut fields);
            fields.result?;
            out.write_str(",\"target\":")?;
            json_string(&mut out, metadata.target())?;
            out.write_str("}\n")
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

/// `,"key":value` for each field.
struct JsonFields<'a, 'w> {
    out: &'a mut Writer<'w>,
    result: fmt::Result,
}

impl JsonFields<'_, '_> {
    fn key(&mut self, field: &Field) -> fmt::Result {
        self.out.write_char(',')?;
        json_string(self.out, field.name())?;
        self.out.write_char(':')
    }
}

impl Visit for JsonFields<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.result.is_ok() {
            self.result = self.key(field).and_then(|()| json_string(self.out, value));
        }
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
            // JSON has no NaN or infinities.
            self.result = self.key(field).and_then(|()| match value.is_finite() {
                true => write!(self.out, "{value}"),
                false => self.out.write_str("null"),
            });
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.result.is_ok() {
            let value = if value { "true" } else { "false" };
            self.result = self.key(field).and_then(|()| self.out.write_str(value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.result.is_ok() {
            let text = format!("{value:?}");
            self.result = self.key(field).and_then(|()| json_string(self.out, &text));
        }
    }
}

/// A JSON string literal, escaped as RFC 8259 requires.
fn json_string(out: &mut Writer<'_>, value: &str) -> fmt::Result {
    out.write_char('"')?;
    let mut plain = 0;
    for (i, b) in value.bytes().enumerate() {
        let escape = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.write_str(&value[plain..i])?;
        if escape.is_empty() {
            write!(out, "\\u{b:04x}")?;
        } else {
            out.write_str(escape)?;
        }
        plain = i + 1;
    }
    out.write_str(&value[plain..])?;
    out.write_char('"')
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
    }
}
