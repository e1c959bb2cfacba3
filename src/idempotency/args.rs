//! The `--idempotency-*` flags: which store keeps the records, for how
//! long, and its bounds. A Redis URL is checked while the command line is
//! parsed, and its password never appears in an error, `--help` or `Debug`.

use std::ffi::OsStr;
use std::fmt;
use std::time::Duration;

use clap::builder::TypedValueParser;

use crate::store::StoreUrl;
use crate::units::{parse_bytes, parse_duration};
use clap::error::ErrorKind;

/// Longest accepted `--idempotency-ttl`: keeps every deadline computed from
/// it far from overflow, and no caller retries a call a year later.
const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

/// The idempotency-key store and its limits; flatten into the CLI.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Idempotency")]
pub struct IdempotencyArgs {
    /// Where the records of idempotency keys live: `memory` (this process
    /// only: zero set-up, right for one replica) or a Redis shared by every
    /// replica, set to `maxmemory-policy noeviction`:
    /// `redis://[user:password@]host:port[/db]` (one server or a managed
    /// endpoint), `redis+sentinel://[user:password@]host:port[,host:port…]/service[?db=N]`
    /// (the Sentinels' primary) or `redis+cluster://[user:password@]host:port[,host:port…]`
    /// (a Redis Cluster); `rediss…` for TLS, verified against the system's
    /// trust store. The password is never printed.
    #[arg(
        long,
        env = "GORMIC_IDEMPOTENCY_STORE",
        value_name = "STORE",
        default_value = "memory",
        hide_env_values = true,
        value_parser = StoreParser
    )]
    pub idempotency_store: StoreLocation,

    /// How long a key's record is kept after the call completed: a retry with
    /// the same key replays the first answer until then, and the key may be
    /// used afresh after; 1ms to 366 days. 24h outlasts any client's retry
    /// schedule (the convention of payment APIs).
    #[arg(long, env = "GORMIC_IDEMPOTENCY_TTL", value_name = "DURATION", default_value = "24h", value_parser = parse_ttl)]
    pub idempotency_ttl: Duration,

    /// Memory store: most records kept at once, at least 1. When full, calls
    /// with a new key fail RESOURCE_EXHAUSTED (no live record is ever evicted: that
    /// could let a retry act twice). 100000 holds a day of more than one
    /// keyed call per second, sustained; busier deployments share keys
    /// through Redis.
    #[arg(long, env = "GORMIC_IDEMPOTENCY_MAX_ENTRIES", value_name = "N", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idempotency_max_entries: u64,

    /// Memory store: most memory the records may take (e.g. `64MiB`,
    /// `512KiB`), counting the recorded answers and about 160 bytes of
    /// bookkeeping per record. 64MiB fits 100000 records of the usual
    /// invoice answer size, and at least 1000 of the largest (64KiB).
    #[arg(long, env = "GORMIC_IDEMPOTENCY_MAX_BYTES", value_name = "BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub idempotency_max_bytes: u64,

    /// Redis store: how long one store operation (including connecting) may
    /// take before the call fails UNAVAILABLE. A healthy Redis answers in
    /// well under a millisecond; 1s rides out a brief network hiccup, yet
    /// fails a keyed call (which clients retry) long before the upstream
    /// timeout.
    #[arg(long, env = "GORMIC_IDEMPOTENCY_STORE_TIMEOUT", value_name = "DURATION", default_value = "1s", value_parser = parse_duration)]
    pub idempotency_store_timeout: Duration,
}

impl Default for IdempotencyArgs {
    /// The command line's defaults.
    fn default() -> Self {
        Self {
            idempotency_store: StoreLocation::Memory,
            idempotency_ttl: Duration::from_secs(24 * 3600),
            idempotency_max_entries: 100_000,
            idempotency_max_bytes: 64 * 1024 * 1024,
            idempotency_store_timeout: Duration::from_secs(1),
        }
    }
}

/// The value of `--idempotency-store`.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    Memory,
    /// A checked store URL (one server, Sentinel or Cluster); its password
    /// is never shown.
    Redis(StoreUrl),
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("memory"),
            Self::Redis(url) => f.write_str(url.redacted()),
        }
    }
}

/// Parses `--idempotency-store`. Its errors name the flag and never repeat
/// the value, which may hold a password (clap's own errors would).
#[derive(Clone)]
struct StoreParser;

impl TypedValueParser for StoreParser {
    type Value = StoreLocation;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<StoreLocation, clap::Error> {
        let flag = arg
            .and_then(clap::Arg::get_long)
            .unwrap_or("idempotency-store");
        let parsed = value
            .to_str()
            .ok_or_else(|| "not UTF-8".to_owned())
            .and_then(parse_store);
        parsed.map_err(|reason| {
            clap::Error::raw(
                ErrorKind::ValueValidation,
                format!("invalid value for '--{flag}': {reason}\n"),
            )
            .with_cmd(cmd)
        })
    }
}

/// `memory`, or a store URL. The error never contains the password.
pub fn parse_store(value: &str) -> Result<StoreLocation, String> {
    if value == "memory" {
        return Ok(StoreLocation::Memory);
    }
    StoreUrl::parse(value).map(StoreLocation::Redis)
}

fn parse_ttl(value: &str) -> Result<Duration, String> {
    let ttl = parse_duration(value)?;
    if ttl < Duration::from_millis(1) {
        return Err("must be at least 1ms".into());
    }
    if ttl > MAX_TTL {
        return Err("must be at most 366 days".into());
    }
    Ok(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        idempotency: IdempotencyArgs,
    }

    fn parse(args: &[&str]) -> Result<IdempotencyArgs, String> {
        Cli::try_parse_from(std::iter::once("gw").chain(args.iter().copied()))
            .map(|c| c.idempotency)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults() {
        let a = parse(&[]).unwrap();
        assert_eq!(a.idempotency_store, StoreLocation::Memory);
        assert_eq!(a.idempotency_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(a.idempotency_max_entries, 100_000);
        assert_eq!(a.idempotency_max_bytes, 64 << 20);
        assert_eq!(a.idempotency_store_timeout, Duration::from_secs(1));
    }

    #[test]
    fn redis_urls_are_checked_and_redacted() {
        let a = parse(&[
            "--idempotency-store",
            "redis://app:s3cret@cache.internal:6380/2",
        ])
        .unwrap();
        let StoreLocation::Redis(url) = &a.idempotency_store else {
            panic!("a redis URL: {a:?}");
        };
        assert_eq!(url.redacted(), "redis://app:***@cache.internal:6380/2");
        assert_eq!(url.expose(), "redis://app:s3cret@cache.internal:6380/2");
        assert!(!url.is_tls());
        assert!(!format!("{a:?}").contains("s3cret"), "{a:?}");

        let tls = parse_store("rediss://:pw@h:6379").unwrap();
        assert_eq!(tls.to_string(), "rediss://:***@h:6379");
        assert_eq!(parse_store("redis://h").unwrap().to_string(), "redis://h");

        for (bad, why) in [
            ("redis://:s3cret@h:notaport", "port"),
            ("http://:s3cret@h:1", "http"),
            ("redis://:s3cret@h:1/x", "database"),
            ("redis://:s3cret@h:1/0?protocol=resp3", "query"),
            ("rediss://:s3cret@h:1#insecure", "fragment"),
            ("s3cret", "expected"),
            ("redis://:s3cret@:1", "host"),
        ] {
            let error = parse(&["--idempotency-store", bad]).unwrap_err();
            assert!(error.contains("--idempotency-store"), "{bad}: {error}");
            assert!(error.contains(why), "{bad}: {error}");
            assert!(!error.contains("s3cret"), "{bad}: {error}");
        }
    }

    #[test]
    fn help_hides_the_store_url_from_the_environment() {
        use clap::CommandFactory;
        let mut cmd = Cli::command();
        let store = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some("idempotency-store"))
            .expect("the flag");
        // `--help` would otherwise print `[env: GORMIC_IDEMPOTENCY_STORE=redis://…]`.
        assert!(store.is_hide_env_values_set());
        let help = cmd.render_help().to_string();
        assert!(help.contains("GORMIC_IDEMPOTENCY_STORE"), "{help}");
    }

    #[test]
    fn bounds_and_durations() {
        let a = parse(&[
            "--idempotency-max-bytes",
            "512KiB",
            "--idempotency-max-entries",
            "10",
            "--idempotency-ttl",
            "90s",
            "--idempotency-store-timeout",
            "250ms",
        ])
        .unwrap();
        assert_eq!(a.idempotency_max_bytes, 512 * 1024);
        assert_eq!(a.idempotency_max_entries, 10);
        assert_eq!(a.idempotency_ttl, Duration::from_secs(90));
        assert_eq!(a.idempotency_store_timeout, Duration::from_millis(250));
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        for (flag, bad) in [
            ("--idempotency-max-bytes", "0"),
            ("--idempotency-max-bytes", "12MB"),
            ("--idempotency-max-entries", "0"),
            ("--idempotency-ttl", "0s"),
            ("--idempotency-ttl", "400days"),
            ("--idempotency-store-timeout", "soon"),
        ] {
            let error = parse(&[flag, bad]).unwrap_err();
            assert!(error.contains(flag), "{flag} {bad}: {error}");
        }
    }
}
