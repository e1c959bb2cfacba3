//! The `--quotas` file: its TOML format, parsed into [`Rules`] with every
//! problem reported as `FILE: line N: field: problem`. Unknown keys are
//! errors, not ignored: a typo (`burts`, `organisations`) must not silently
//! remove a limit.
//!
//! ```toml
//! [default]                     # optional: each organization not listed gets its own bucket
//! calls_per_second = 50
//! burst = 100                   # optional, default max(1, ceil(calls_per_second))
//! [organizations."org-1"]
//! calls_per_second = 20
//! burst = 40
//! [organizations."org-1".rpc.CreateInvoice]   # this bucket instead, for this RPC
//! calls_per_second = 5
//! [callers."spiffe://prod.example/ns/batch/sa/job"]   # mTLS caller identities
//! calls_per_second = 2
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use toml::Spanned;
use toml::de::DeValue;

use crate::reload::change::{FileError, TomlFile};
use crate::routes;

/// How many RPCs the service has (the per-RPC overrides' slots).
pub(crate) const RPCS: usize = routes::ALL.len();

/// Lowest `calls_per_second`: one call every 1000 s. Below it a bucket's
/// arithmetic (in nanoseconds here, microseconds in Redis) would leave
/// the range where it is exact.
pub const MIN_CALLS_PER_SECOND: f64 = 0.001;
/// Highest `calls_per_second`: one call every microsecond, the resolution
/// of Redis's clock.
pub const MAX_CALLS_PER_SECOND: f64 = 1_000_000.0;
/// Highest `burst`.
pub const MAX_BURST: u32 = 1_000_000;

/// One bucket's limit: GCRA with an emission interval of
/// `1 / calls_per_second` and a capacity of `burst` calls.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    pub calls_per_second: f64,
    pub burst: u32,
}

impl Limit {
    /// The time one call uses up (GCRA's emission interval), to the
    /// nanosecond, at least 1 ns.
    pub fn interval(&self) -> Duration {
        Duration::from_nanos(((1e9 / self.calls_per_second).round() as u64).max(1))
    }

    /// The burst a file gets when it names none: one second's calls, at
    /// least one.
    pub fn default_burst(calls_per_second: f64) -> u32 {
        (calls_per_second.ceil() as u32).clamp(1, MAX_BURST)
    }
}

impl fmt::Display for Limit {
    /// `20 calls per second, burst 40`; `0.5 calls per second, burst 1`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} calls per second, burst {}",
            self.calls_per_second, self.burst
        )
    }
}

/// One entry of the file: its bucket, and the per-RPC buckets that replace
/// it for those RPCs (indexed by [`routes::Route::index`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub limit: Limit,
    pub rpc: [Option<Limit>; RPCS],
}

/// What a quotas file says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rules {
    /// `[default]`: a bucket of its own for each organization not listed.
    pub default: Option<Rule>,
    /// `[organizations."ID"]`, by organization id.
    pub organizations: HashMap<Box<[u8]>, Rule>,
    /// `[callers."IDENTITY"]`, by mTLS caller identity.
    pub callers: HashMap<Box<[u8]>, Rule>,
}

/// The kind of [`QuotaFileError`]: a quotas file.
#[derive(Debug, Clone)]
pub enum QuotasFile {}

/// A quotas file that cannot be used: `FILE: line N: problem`.
pub type QuotaFileError = FileError<QuotasFile>;

/// Parses a quotas file.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Rules, QuotaFileError> {
    let (file, document) = TomlFile::open(path, bytes)?;
    let parser = Parser { file };

    let mut rules = Rules::default();
    for (key, value) in document.get_ref() {
        match key.get_ref().as_ref() {
            "default" => rules.default = Some(parser.rule("default", key.span().start, value)?),
            "organizations" => {
                rules.organizations = parser.entries("organizations", "organization id", value)?
            }
            "callers" => rules.callers = parser.entries("callers", "caller identity", value)?,
            other => {
                return Err(parser.error(
                    Some(key.span().start),
                    format!(
                        "unknown key {other:?} at the top level \
                         (allowed: [default], [organizations.\"ID\"], [callers.\"IDENTITY\"])"
                    ),
                ));
            }
        }
    }
    if rules.default.is_none() && rules.organizations.is_empty() && rules.callers.is_empty() {
        return Err(parser.error(
            None,
            "no quotas: no [default], [organizations.\"ID\"] or [callers.\"IDENTITY\"] \
             (a file read mid-write?)"
                .into(),
        ));
    }
    Ok(rules)
}

struct Parser<'a> {
    file: TomlFile<'a>,
}

type Value<'i> = Spanned<DeValue<'i>>;

impl Parser<'_> {
    fn error(&self, offset: Option<usize>, problem: String) -> QuotaFileError {
        self.file.error(offset, problem)
    }

    /// `[organizations."ID"]` or `[callers."IDENTITY"]`: a table of entries.
    fn entries(
        &self,
        section: &str,
        what: &str,
        value: &Value<'_>,
    ) -> Result<HashMap<Box<[u8]>, Rule>, QuotaFileError> {
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.error(
                Some(value.span().start),
                format!("{section} must be tables, written [{section}.\"ID\"]"),
            ));
        };
        let mut entries = HashMap::with_capacity(table.len());
        for (key, value) in table {
            let name = key.get_ref().as_ref();
            let at = Some(key.span().start);
            if name.trim().is_empty() {
                return Err(self.error(at, format!("{section}: the {what} is empty")));
            }
            if name.trim() != name || name.chars().any(char::is_control) {
                return Err(self.error(
                    at,
                    format!(
                        "{section}.{name:?}: the {what} has leading or trailing spaces or \
                         control characters (it must be written exactly as sent)"
                    ),
                ));
            }
            let rule = self.rule(&format!("{section}.{name:?}"), key.span().start, value)?;
            entries.insert(Box::from(name.as_bytes()), rule);
        }
        Ok(entries)
    }

    /// One entry: its limit and its `rpc` overrides.
    /// `at`: where its name is written.
    fn rule(&self, field: &str, at: usize, value: &Value<'_>) -> Result<Rule, QuotaFileError> {
        let (limit, rpc) = self.limit(field, at, value, true)?;
        let mut overrides = [None; RPCS];
        if let Some(rpc) = rpc {
            let DeValue::Table(table) = rpc.get_ref() else {
                return Err(self.error(
                    Some(rpc.span().start),
                    format!("{field}.rpc must be tables, written [{field}.rpc.CreateInvoice]"),
                ));
            };
            for (key, value) in table {
                let name = key.get_ref().as_ref();
                let Some(route) = routes::ALL.iter().find(|route| route.rpc == name) else {
                    let names: Vec<&str> = routes::ALL.iter().map(|route| route.rpc).collect();
                    return Err(self.error(
                        Some(key.span().start),
                        format!(
                            "{field}.rpc.{name}: not an RPC of gormic.om.v1.InvoiceService \
                             (one of {})",
                            names.join(", ")
                        ),
                    ));
                };
                let (limit, _) = self.limit(
                    &format!("{field}.rpc.{name}"),
                    key.span().start,
                    value,
                    false,
                )?;
                overrides[route.index] = Some(limit);
            }
        }
        Ok(Rule {
            limit,
            rpc: overrides,
        })
    }

    /// A table with `calls_per_second` and `burst` (and `rpc`, when
    /// `with_rpc`, returned as it is); `at`: where its name is written.
    fn limit<'v, 'i>(
        &self,
        field: &str,
        at: usize,
        value: &'v Value<'i>,
        with_rpc: bool,
    ) -> Result<(Limit, Option<&'v Value<'i>>), QuotaFileError> {
        let DeValue::Table(table) = value.get_ref() else {
            return Err(self.error(
                Some(value.span().start),
                format!("{field} must be a table, written [{field}]"),
            ));
        };
        let mut rate = None;
        let mut burst = None;
        let mut rpc = None;
        for (key, value) in table {
            match key.get_ref().as_ref() {
                "calls_per_second" => rate = Some(self.calls_per_second(field, value)?),
                "burst" => burst = Some(self.burst(field, value)?),
                "rpc" if with_rpc => rpc = Some(value),
                other => {
                    let allowed = if with_rpc {
                        "calls_per_second, burst, rpc"
                    } else {
                        "calls_per_second, burst"
                    };
                    return Err(self.error(
                        Some(key.span().start),
                        format!("{field}: unknown field {other:?} (allowed: {allowed})"),
                    ));
                }
            }
        }
        let Some(calls_per_second) = rate else {
            return Err(self.error(Some(at), format!("{field} has no calls_per_second")));
        };
        let limit = Limit {
            calls_per_second,
            burst: burst.unwrap_or_else(|| Limit::default_burst(calls_per_second)),
        };
        Ok((limit, rpc))
    }

    fn calls_per_second(&self, field: &str, value: &Value<'_>) -> Result<f64, QuotaFileError> {
        let number = match value.get_ref() {
            DeValue::Integer(integer) => i64::from_str_radix(integer.as_str(), integer.radix())
                .ok()
                .map(|n| n as f64),
            DeValue::Float(float) => float.as_str().parse::<f64>().ok(),
            _ => None,
        };
        match number {
            Some(n) if (MIN_CALLS_PER_SECOND..=MAX_CALLS_PER_SECOND).contains(&n) => Ok(n),
            _ => Err(self.error(
                Some(value.span().start),
                format!(
                    "{field}.calls_per_second must be a number from {MIN_CALLS_PER_SECOND} to \
                     {MAX_CALLS_PER_SECOND}, not {}",
                    shown(value)
                ),
            )),
        }
    }

    fn burst(&self, field: &str, value: &Value<'_>) -> Result<u32, QuotaFileError> {
        let number = match value.get_ref() {
            DeValue::Integer(integer) => {
                i64::from_str_radix(integer.as_str(), integer.radix()).ok()
            }
            _ => None,
        };
        match number.and_then(|n| u32::try_from(n).ok()) {
            Some(n) if (1..=MAX_BURST).contains(&n) => Ok(n),
            _ => Err(self.error(
                Some(value.span().start),
                format!(
                    "{field}.burst must be a whole number from 1 to {MAX_BURST}, not {}",
                    shown(value)
                ),
            )),
        }
    }
}

/// A value as the file wrote it, for an error message (numbers, or the
/// kind of anything else).
fn shown(value: &Value<'_>) -> String {
    match value.get_ref() {
        DeValue::Integer(integer) => integer.to_string(),
        DeValue::Float(float) => float.to_string(),
        DeValue::String(_) => "a string".into(),
        other => format!("a {}", other.type_str()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"# The example of docs/tenants.md.
[default]
calls_per_second = 50
burst = 100

[organizations."org-1"]
calls_per_second = 20
burst = 40

[organizations."org-1".rpc.CreateInvoice]
calls_per_second = 5

[organizations.slow]
calls_per_second = 0.5

[callers."spiffe://prod.example/ns/batch/sa/job"]
calls_per_second = 2
"#;

    fn parsed(text: &str) -> Result<Rules, QuotaFileError> {
        parse(Path::new("quotas.toml"), text.as_bytes())
    }

    fn limit(calls_per_second: f64, burst: u32) -> Limit {
        Limit {
            calls_per_second,
            burst,
        }
    }

    #[test]
    fn a_good_file_gives_every_limit_with_the_default_burst() {
        let rules = parsed(GOOD).expect("a valid file");
        let default = rules.default.as_ref().expect("[default]");
        assert_eq!(default.limit, limit(50.0, 100));
        assert_eq!(default.rpc, [None; RPCS]);

        let org = &rules.organizations[&b"org-1"[..]];
        assert_eq!(org.limit, limit(20.0, 40));
        let create = routes::CREATE_INVOICE.index;
        assert_eq!(org.rpc[create], Some(limit(5.0, 5)), "burst: ceil(5)");
        assert_eq!(
            org.rpc.iter().filter(|rpc| rpc.is_some()).count(),
            1,
            "{:?}",
            org.rpc
        );
        assert_eq!(
            rules.organizations[&b"slow"[..]].limit,
            limit(0.5, 1),
            "burst: at least 1"
        );
        let caller = &rules.callers[&b"spiffe://prod.example/ns/batch/sa/job"[..]];
        assert_eq!(caller.limit, limit(2.0, 2));
        assert_eq!(rules.organizations.len(), 2);
        assert_eq!(rules.callers.len(), 1);
    }

    #[test]
    fn limits_read_as_the_docs_write_them_and_give_their_interval() {
        assert_eq!(limit(20.0, 40).to_string(), "20 calls per second, burst 40");
        assert_eq!(limit(0.5, 1).to_string(), "0.5 calls per second, burst 1");
        assert_eq!(limit(20.0, 40).interval(), Duration::from_millis(50));
        assert_eq!(limit(0.5, 1).interval(), Duration::from_secs(2));
        assert_eq!(limit(3.0, 1).interval(), Duration::from_nanos(333_333_333));
        assert_eq!(Limit::default_burst(2.5), 3);
        assert_eq!(Limit::default_burst(0.001), 1);
    }

    /// Each kind of bad file: the line, the field and the problem.
    #[test]
    fn bad_files_are_refused_naming_line_and_field() {
        let cases: &[(&str, &str, usize, &str)] = &[
            (
                "syntax",
                "[default]\ncalls_per_second = \n",
                2,
                "not valid TOML",
            ),
            (
                "top-level typo",
                "[organisations.\"org-1\"]\ncalls_per_second = 1\n",
                1,
                "unknown key \"organisations\" at the top level",
            ),
            (
                "field typo",
                "[organizations.\"org-1\"]\ncalls_per_second = 1\nburts = 4\n",
                3,
                "organizations.\"org-1\": unknown field \"burts\" (allowed: calls_per_second, burst, rpc)",
            ),
            (
                "no rate",
                "[default]\ncalls_per_second = 1\n\n[organizations.\"org-1\"]\nburst = 4\n",
                4,
                "organizations.\"org-1\" has no calls_per_second",
            ),
            (
                "zero rate",
                "[default]\ncalls_per_second = 0\n",
                2,
                "default.calls_per_second must be a number from 0.001 to 1000000, not 0",
            ),
            (
                "negative rate",
                "[callers.\"a.svc\"]\ncalls_per_second = -2.5\n",
                2,
                "callers.\"a.svc\".calls_per_second must be a number from 0.001 to 1000000, not -2.5",
            ),
            (
                "rate as a string",
                "[default]\ncalls_per_second = \"20\"\n",
                2,
                "default.calls_per_second must be a number from 0.001 to 1000000, not a string",
            ),
            (
                "not-a-number rate",
                "[default]\ncalls_per_second = nan\n",
                2,
                "default.calls_per_second must be a number",
            ),
            (
                "fractional burst",
                "[default]\ncalls_per_second = 2\nburst = 1.5\n",
                3,
                "default.burst must be a whole number from 1 to 1000000, not 1.5",
            ),
            (
                "zero burst",
                "[default]\ncalls_per_second = 2\nburst = 0\n",
                3,
                "default.burst must be a whole number from 1 to 1000000, not 0",
            ),
            (
                "unknown RPC",
                "[organizations.\"org-1\"]\ncalls_per_second = 1\n\n\
                 [organizations.\"org-1\".rpc.CreateInvoices]\ncalls_per_second = 1\n",
                4,
                "organizations.\"org-1\".rpc.CreateInvoices: not an RPC of \
                 gormic.om.v1.InvoiceService (one of CreateInvoice, UpdateInvoice, \
                 DeleteInvoice, CloseInvoice, SendInvoice)",
            ),
            (
                "nested rpc",
                "[default]\ncalls_per_second = 1\n[default.rpc.SendInvoice]\n\
                 calls_per_second = 1\nrpc = 2\n",
                5,
                "default.rpc.SendInvoice: unknown field \"rpc\" (allowed: calls_per_second, burst)",
            ),
            (
                "entry not a table",
                "organizations = 5\n",
                1,
                "organizations must be tables",
            ),
            (
                "default not a table",
                "default = 5\n",
                1,
                "default must be a table",
            ),
            (
                "empty id",
                "[organizations.\"\"]\ncalls_per_second = 1\n",
                1,
                "organizations: the organization id is empty",
            ),
            (
                "id with spaces",
                "\n[callers.\" a.svc\"]\ncalls_per_second = 1\n",
                2,
                "callers.\" a.svc\": the caller identity has leading or trailing spaces",
            ),
            (
                "duplicate",
                "[organizations.\"org-1\"]\ncalls_per_second = 1\n\
                 [organizations.org-1]\ncalls_per_second = 2\n",
                3,
                "not valid TOML",
            ),
        ];
        for (name, text, line, problem) in cases {
            let error = parsed(text).expect_err(name);
            assert_eq!(error.line, Some(*line), "{name}: {error}");
            assert!(error.problem.contains(problem), "{name}: {error}");
            let shown = error.to_string();
            assert!(
                shown.starts_with(&format!("quotas.toml: line {line}: ")),
                "{name}: {shown}"
            );
        }
    }

    #[test]
    fn an_empty_file_or_one_that_is_not_text_is_refused() {
        let error = parsed("# nothing yet\n").expect_err("empty");
        assert_eq!(error.line, None);
        assert!(error.problem.starts_with("no quotas"), "{error}");
        let error = parse(Path::new("q.toml"), b"[default]\n\xff = 1\n").expect_err("binary");
        assert_eq!(error.line, Some(2));
        assert_eq!(error.problem, "not UTF-8 text");
    }
}
