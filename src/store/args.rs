//! The shared store's own flags (the URL is `--idempotency-store`, read by
//! `idempotency::args`): how many replicas must hold a write before the
//! gateway acts on it.

use std::fmt;
use std::str::FromStr;

/// Most replicas a write may be made to wait for: more than any deployment
/// runs, and a bound on a typo.
pub const MAX_REPLICAS: u32 = 16;

/// The shared store's flags; flatten into the CLI.
#[derive(Debug, Clone, Default, clap::Args)]
#[command(next_help_heading = "Idempotency")]
pub struct StoreArgs {
    /// Redis store: how many replicas must acknowledge a lease (`WAIT`)
    /// before the call is sent upstream, and its outcome record after:
    /// `auto` (1 while the primary reports a connected replica, else 0),
    /// or a number (0 to 16). A lease not acknowledged in time fails the
    /// call UNAVAILABLE, unsent. `auto` because Redis replicates
    /// asynchronously: without a wait, a lease lost in a failover lets a
    /// retry on another replica create a second invoice; with it, that
    /// needs the acknowledging replica to fail too. A lone server pays
    /// nothing.
    #[arg(
        long,
        env = "GORMIC_IDEMPOTENCY_STORE_REPLICAS",
        value_name = "N|auto",
        default_value = "auto"
    )]
    pub idempotency_store_replicas: Replicas,
}

/// How many replicas a durable write waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Replicas {
    /// One while the primary reports a connected replica, none otherwise.
    #[default]
    Auto,
    /// Exactly this many (0: never wait).
    Exactly(u32),
}

impl Replicas {
    /// The replicas to wait for, given how many the primary (every primary,
    /// in a cluster) reports connected.
    pub fn required(self, connected: u32) -> u32 {
        match self {
            Self::Auto => connected.min(1),
            Self::Exactly(n) => n,
        }
    }
}

impl FromStr for Replicas {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        if value == "auto" {
            return Ok(Self::Auto);
        }
        match value.parse::<u32>() {
            Ok(n) if n <= MAX_REPLICAS => Ok(Self::Exactly(n)),
            _ => Err(format!(
                "expected `auto` or a number from 0 to {MAX_REPLICAS}"
            )),
        }
    }
}

impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Exactly(n) => write!(f, "{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        store: StoreArgs,
    }

    fn parse(args: &[&str]) -> Result<Replicas, String> {
        Cli::try_parse_from(std::iter::once("gw").chain(args.iter().copied()))
            .map(|c| c.store.idempotency_store_replicas)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn replicas_default_to_auto_and_take_a_bounded_number() {
        assert_eq!(parse(&[]), Ok(Replicas::Auto));
        assert_eq!(
            parse(&["--idempotency-store-replicas", "2"]),
            Ok(Replicas::Exactly(2))
        );
        for bad in ["17", "-1", "one"].map(|n| format!("--idempotency-store-replicas={n}")) {
            let error = parse(&[&bad]).unwrap_err();
            assert!(error.contains("--idempotency-store-replicas"), "{error}");
            assert!(error.contains("0 to 16"), "{error}");
        }
    }

    #[test]
    fn auto_waits_for_one_replica_when_there_is_one() {
        assert_eq!(Replicas::Auto.required(0), 0);
        assert_eq!(Replicas::Auto.required(3), 1);
        assert_eq!(Replicas::Exactly(2).required(0), 2);
        assert_eq!(Replicas::Exactly(0).required(5), 0);
    }
}
