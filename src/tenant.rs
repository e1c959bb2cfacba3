//! Who a call is for, as fair shares count it: its tenant
//! (docs/tenants.md, "Fair shares"). By default the organization, the
//! `organization-id` sent upstream (after `--credentials`); with
//! `--tenant-key caller`, the mTLS caller identity (calls without one share
//! one tenant).
//!
//! Organization ids are what callers claim: without `--credentials`, a
//! caller can make up as many as it likes. So an organization is a tenant
//! of its own only once it is *trusted*: with `--credentials` or
//! `--tenant-key caller` every tenant is (the mapping, or TLS, vouched for
//! it); otherwise once Gormic accepted a call for it ([`Tenants::answered`]),
//! for as long as it keeps doing so within an hour (`trusted`, a bounded
//! set). Every organization not trusted shares ONE tenant,
//! [`TenantId::UNVERIFIED`]: ten thousand made-up ids weigh as one tenant.
//!
//! Tenants are keyed by a 64-bit SipHash of their name with a per-process
//! random key, computed once per call, never by the caller's string: the
//! tables that use them ([`TenantMap`]) hold eight bytes per tenant, and a
//! caller cannot choose names that collide.

mod trusted;

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;

use tokio::time::Instant;

use crate::credentials::Credentials;
use crate::tls::CallerIdentity;

use trusted::{Trust, TrustedSet};

/// What a tenant is (`--tenant-key`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TenantKey {
    /// The organization-id sent upstream.
    #[default]
    Organization,
    /// The mTLS caller identity.
    Caller,
}

impl fmt::Display for TenantKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Organization => "organization",
            Self::Caller => "caller",
        })
    }
}

/// The tenant flag.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Limits")]
pub struct TenantArgs {
    /// What a tenant is for fair shares of --max-in-flight and of the
    /// upstream slots: `organization` (the organization-id sent upstream),
    /// or `caller` (the mTLS caller identity; needs --tls-client-ca), for
    /// when many services share one organization. Default organization: the
    /// unit Gormic itself keys its data and limits by.
    #[arg(
        long,
        env = "GORMIC_TENANT_KEY",
        value_name = "KEY",
        value_enum,
        default_value_t = TenantKey::Organization,
        requires_if("caller", "tls_client_ca")
    )]
    pub tenant_key: TenantKey,
}

/// A tenant, as the hash of its name; [`TenantId::UNVERIFIED`] for every
/// organization not trusted (and, with `--tenant-key caller`, every call
/// without a caller identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(u64);

impl TenantId {
    /// The one tenant of every unverified organization.
    pub const UNVERIFIED: Self = Self(0);

    /// A tenant of its own, never [`Self::UNVERIFIED`].
    fn of_hash(hash: u64) -> Self {
        Self(hash.max(1))
    }

    pub fn is_unverified(self) -> bool {
        self == Self::UNVERIFIED
    }

    /// The id as a number: a keyed hash of the tenant's name (0 for
    /// [`Self::UNVERIFIED`]).
    pub(crate) fn as_u64(self) -> u64 {
        self.0
    }

    /// A tenant of its own, by number (unit tests).
    #[cfg(test)]
    pub(crate) fn numbered(n: u64) -> Self {
        Self::of_hash(n)
    }
}

/// A map keyed by [`TenantId`]: the id is already a keyed hash, so it is
/// its own hash (no second SipHash per lookup).
pub type TenantMap<V> = HashMap<TenantId, V, BuildHasherDefault<IdHasher>>;

/// The hasher of [`TenantMap`], and of any map whose keys are hashes
/// already (a `u64`, or a `TenantId`, which hashes as its u64): the key as
/// it is.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by those keys; fold anything else in.
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A call's tenant, and what the call may teach the trusted set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    /// The organization to trust (or to keep trusting) if Gormic accepts
    /// the call; `None` when there is nothing to learn.
    learn: Option<TenantId>,
}

/// The tenants of one process: the key, the hashing key, and the
/// organizations Gormic accepted. Cheap to clone; clones share the set.
#[derive(Clone)]
pub struct Tenants(Arc<Inner>);

struct Inner {
    key: TenantKey,
    /// SipHash with a per-process random key.
    hasher: RandomState,
    trusted: TrustedSet,
}

impl fmt::Debug for Tenants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tenants")
            .field("key", &self.0.key)
            .finish_non_exhaustive()
    }
}

impl Tenants {
    pub fn new(key: TenantKey) -> Self {
        Self::with_capacity(key, trusted::CAPACITY)
    }

    /// With a trusted set of at most `capacity` organizations (tests).
    pub fn with_capacity(key: TenantKey, capacity: usize) -> Self {
        Self(Arc::new(Inner {
            key,
            hasher: RandomState::new(),
            trusted: TrustedSet::new(Instant::now(), capacity),
        }))
    }

    pub fn key(&self) -> TenantKey {
        self.0.key
    }

    /// The tenant of a call whose credentials are settled. `vouched`: the
    /// credentials come from `--credentials`, which vouches for the
    /// organization. One hash of the name; without `--credentials`, one
    /// look-up in the trusted set.
    pub fn identify(
        &self,
        credentials: &Credentials,
        caller: Option<&CallerIdentity>,
        vouched: bool,
    ) -> Tenant {
        let trusted = |id| Tenant { id, learn: None };
        match self.0.key {
            TenantKey::Caller => trusted(caller.map_or(TenantId::UNVERIFIED, |caller| {
                self.id_of(caller.as_str().as_bytes())
            })),
            TenantKey::Organization => {
                let id = self.id_of(credentials.organization_id.as_bytes());
                if vouched {
                    return trusted(id);
                }
                match self.0.trusted.check(id, Instant::now()) {
                    Trust::Fresh => trusted(id),
                    Trust::Stale => Tenant {
                        id,
                        learn: Some(id),
                    },
                    Trust::Unknown => Tenant {
                        id: TenantId::UNVERIFIED,
                        learn: Some(id),
                    },
                }
            }
        }
    }

    /// The upstream answered the tenant's call with `http_status`: an
    /// answer that shows Gormic accepted the api-key and organization-id
    /// ([`accepts`]) makes the organization trusted, or keeps it so.
    pub fn answered(&self, tenant: &Tenant, http_status: u16) {
        if let Some(id) = tenant.learn
            && accepts(http_status)
        {
            self.0.trusted.learn(id, Instant::now());
        }
    }

    /// Organizations trusted now (accepted within the last hour).
    pub fn trusted(&self) -> usize {
        self.0.trusted.trusted(Instant::now())
    }

    /// Organizations the trusted set holds, expired ones not yet evicted
    /// included: what it costs in memory (at most its capacity). Tests.
    #[cfg(test)]
    pub fn trusted_entries(&self) -> usize {
        self.0.trusted.entries()
    }

    fn id_of(&self, name: &[u8]) -> TenantId {
        TenantId::of_hash(self.0.hasher.hash_one(name))
    }
}

/// Whether an upstream answer shows that Gormic accepted the call's
/// api-key and organization-id: any answer but 401 and 403 (refused
/// credentials), 429 (a rate limit may refuse before anything is checked)
/// and 5xx (a failure, or a proxy's answer, proves nothing).
pub fn accepts(http_status: u16) -> bool {
    http_status < 500 && !matches!(http_status, 401 | 403 | 429)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn credentials(organization: &'static str) -> Credentials {
        Credentials {
            api_key: HeaderValue::from_static("k"),
            organization_id: HeaderValue::from_static(organization),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_organization_is_unverified_until_gormic_accepts_a_call_for_it() {
        let tenants = Tenants::new(TenantKey::Organization);
        let first = tenants.identify(&credentials("org-1"), None, false);
        assert_eq!(first.id, TenantId::UNVERIFIED);
        assert_eq!(
            tenants.identify(&credentials("made-up"), None, false).id,
            TenantId::UNVERIFIED,
            "made-up ids share the one tenant"
        );
        tenants.answered(&first, 403);
        tenants.answered(&first, 401);
        tenants.answered(&first, 503);
        tenants.answered(&first, 429);
        assert_eq!(tenants.trusted(), 0, "refused credentials teach nothing");
        assert_eq!(
            tenants.identify(&credentials("org-1"), None, false).id,
            TenantId::UNVERIFIED
        );

        tenants.answered(&first, 400);
        assert_eq!(tenants.trusted(), 1);
        let org1 = tenants.identify(&credentials("org-1"), None, false);
        assert!(!org1.id.is_unverified());
        assert_eq!(org1.learn, None, "fresh: nothing to learn");
        let other = tenants.identify(&credentials("org-2"), None, false);
        assert_eq!(other.id, TenantId::UNVERIFIED);

        // Trust lasts an hour from the last accepted call.
        tokio::time::advance(trusted::REFRESH + trusted::REFRESH / 2).await;
        let stale = tenants.identify(&credentials("org-1"), None, false);
        assert_eq!(stale.id, org1.id);
        assert_eq!(stale.learn, Some(org1.id), "an accepted call refreshes it");
        tenants.answered(&stale, 200);
        tokio::time::advance(trusted::TTL - trusted::REFRESH).await;
        assert_eq!(
            tenants.identify(&credentials("org-1"), None, false).id,
            org1.id,
            "still trusted: refreshed less than an hour ago"
        );
        tokio::time::advance(trusted::REFRESH * 2).await;
        assert_eq!(
            tenants.identify(&credentials("org-1"), None, false).id,
            TenantId::UNVERIFIED,
            "not accepted for over an hour"
        );
        assert_eq!(tenants.trusted(), 0);
    }

    #[test]
    fn credentials_vouch_for_every_organization() {
        let tenants = Tenants::new(TenantKey::Organization);
        let a = tenants.identify(&credentials("org-a"), None, true);
        let b = tenants.identify(&credentials("org-b"), None, true);
        assert!(!a.id.is_unverified() && !b.id.is_unverified());
        assert_ne!(a.id, b.id);
        assert_eq!(a, tenants.identify(&credentials("org-a"), None, true));
        assert_eq!(a.learn, None);
        assert_eq!(tenants.trusted_entries(), 0, "nothing to learn");
    }

    #[test]
    fn with_the_caller_key_the_identity_is_the_tenant() {
        let tenants = Tenants::new(TenantKey::Caller);
        let billing = CallerIdentity::new("spiffe://prod/billing");
        let batch = CallerIdentity::new("spiffe://prod/batch");
        let one = tenants.identify(&credentials("org-1"), Some(&billing), false);
        let two = tenants.identify(&credentials("org-1"), Some(&batch), false);
        assert!(!one.id.is_unverified() && !two.id.is_unverified());
        assert_ne!(one.id, two.id, "one organization, two tenants");
        assert_eq!(
            tenants
                .identify(&credentials("org-2"), Some(&billing), false)
                .id,
            one.id,
            "the organization does not matter"
        );
        assert_eq!(
            tenants.identify(&credentials("org-1"), None, false).id,
            TenantId::UNVERIFIED,
            "calls without an identity share one tenant"
        );
    }

    #[test]
    fn ids_are_keyed_per_process() {
        let a = Tenants::new(TenantKey::Organization);
        let b = Tenants::new(TenantKey::Organization);
        let id = |t: &Tenants| t.identify(&credentials("org-1"), None, true).id;
        assert_ne!(id(&a), id(&b), "another key, another hash");
    }

    #[test]
    fn the_tenant_flag() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            tenants: TenantArgs,
            #[arg(long)]
            tls_client_ca: Option<String>,
        }
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.tenants.tenant_key);
        assert_eq!(parse(&["gw"]).expect("valid"), TenantKey::Organization);
        assert_eq!(
            parse(&["gw", "--tenant-key", "caller", "--tls-client-ca", "ca.pem"]).expect("valid"),
            TenantKey::Caller
        );
        let error = parse(&["gw", "--tenant-key", "caller"])
            .expect_err("caller identities need mTLS")
            .to_string();
        assert!(error.contains("--tls-client-ca"), "{error}");
        let error = parse(&["gw", "--tenant-key", "team"])
            .expect_err("not a key")
            .to_string();
        assert!(
            error.contains("organization") && error.contains("caller"),
            "{error}"
        );
    }
}
