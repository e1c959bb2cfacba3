//! The quotas in use: the file's [`Rules`] with this replica's buckets
//! ([`QuotaTable`]), re-read like `--credentials` (a changed, valid file
//! replaces them; a bad one leaves them in use), and which buckets a call
//! is checked against ([`Active::caller`], [`Active::organization`]).
//!
//! A reload keeps the state of every bucket whose limit did not change (an
//! unchanged entry keeps its TAT; a changed one starts full), so that
//! editing one entry does not hand every tenant a fresh burst.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};

use super::file::{self, Limit, QuotaFileError, RPCS, Rule, Rules};
use super::local::{Bucket, KeyedBuckets};
use crate::reload::change::{self, ChangeGate, Reloaded, Snapshot};
use crate::routes::Route;

/// Which kind of entry a bucket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `[callers."IDENTITY"]`.
    Caller,
    /// `[organizations."ID"]`.
    Organization,
    /// `[default]`, for an organization not listed.
    Default,
}

impl Kind {
    /// The `bucket` label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Caller => "caller",
            Kind::Organization => "organization",
            Kind::Default => "default",
        }
    }

    /// The kind in a bucket's subject: defaults are organizations too.
    pub const fn subject_kind(self) -> &'static str {
        match self {
            Kind::Caller => "caller",
            Kind::Organization | Kind::Default => "organization",
        }
    }
}

/// The quotas file and its buckets. Cheap to clone; clones share the
/// buckets and see reloads.
#[derive(Clone)]
pub struct QuotaTable(Arc<Inner>);

struct Inner {
    path: PathBuf,
    active: ArcSwap<Active>,
    gate: ChangeGate,
    /// Keys `[default]` buckets by a hash of the organization id, random
    /// per process so that no caller can aim ids at one shard.
    hasher: RandomState,
}

impl std::fmt::Debug for QuotaTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let active = self.0.active.load();
        f.debug_struct("QuotaTable")
            .field("path", &self.0.path)
            .field("default", &active.default.is_some())
            .field("organizations", &active.organizations.len())
            .field("callers", &active.callers.len())
            .finish()
    }
}

impl QuotaTable {
    /// Reads and checks the file.
    pub fn load(path: &Path) -> Result<Self, QuotaFileError> {
        let snapshot = Snapshot::read(&[path]);
        let rules = parse_snapshot(path, &snapshot)?;
        Ok(Self(Arc::new(Inner {
            path: path.to_path_buf(),
            active: ArcSwap::from_pointee(Active::build(rules, None)),
            gate: ChangeGate::new(vec![path.to_path_buf()], snapshot),
            hasher: RandomState::new(),
        })))
    }

    /// Quotas from `rules` rather than a file (tests, benchmarks): nothing
    /// to reload.
    pub fn from_rules(rules: &Rules) -> Self {
        Self(Arc::new(Inner {
            path: PathBuf::new(),
            active: ArcSwap::from_pointee(Active::build(rules.clone(), None)),
            gate: ChangeGate::new(Vec::new(), Snapshot::read(&[])),
            hasher: RandomState::new(),
        }))
    }

    /// Re-reads the file: a changed, valid file replaces the quotas (the
    /// buckets of unchanged limits keep their state), a bad one leaves
    /// them in use and is reported once.
    pub fn reload(&self) -> Result<Reloaded, QuotaFileError> {
        let Some(snapshot) = self.0.gate.next_change() else {
            return Ok(Reloaded::Unchanged);
        };
        let rules = parse_snapshot(&self.0.path, &snapshot)?;
        let previous = self.0.active.load();
        self.0
            .active
            .store(Arc::new(Active::build(rules, Some(&previous))));
        Ok(Reloaded::Replaced)
    }

    /// The file's rules now.
    pub fn rules(&self) -> Rules {
        self.0.active.load().rules.clone()
    }

    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// The quotas in use now, for one call (no lock, no count).
    pub(super) fn active(&self) -> Guard<Arc<Active>> {
        self.0.active.load()
    }

    /// The quotas in use now, to hold across an await.
    pub(super) fn active_owned(&self) -> Arc<Active> {
        self.0.active.load_full()
    }

    /// The key of an organization's `[default]` bucket.
    fn default_key(&self, organization: &[u8]) -> u64 {
        self.0.hasher.hash_one(organization)
    }

    /// The buckets of `active` a call to `route` meets, in order: the
    /// caller's (if the file names the caller), then the organization's
    /// (its entry, else its own `[default]` bucket). The organization's is
    /// looked up only once the caller's is passed.
    pub(super) fn targets<'a>(
        &'a self,
        active: &'a Active,
        route: &'a Route,
        caller: Option<&'a [u8]>,
        organization: &'a [u8],
    ) -> impl Iterator<Item = Target<'a>> + 'a {
        let caller = caller.and_then(|identity| active.caller(identity, route));
        let organization = std::iter::once_with(move || {
            active.organization(organization, route, || self.default_key(organization))
        });
        caller.into_iter().chain(organization.flatten())
    }
}

fn parse_snapshot(path: &Path, snapshot: &Snapshot) -> Result<Rules, QuotaFileError> {
    change::parse_snapshot(path, snapshot, file::parse)
}

/// An entry's buckets: its own, and its per-RPC overrides.
#[derive(Debug)]
pub(super) struct Entry<B> {
    bucket: Arc<B>,
    rpc: [Option<Arc<B>>; RPCS],
}

/// The rules of one version of the file, with their buckets.
#[derive(Debug)]
pub(super) struct Active {
    rules: Rules,
    default: Option<Entry<KeyedBuckets>>,
    organizations: HashMap<Box<[u8]>, Entry<Bucket>>,
    callers: HashMap<Box<[u8]>, Entry<Bucket>>,
}

/// This replica's bucket for a call.
#[derive(Debug, Clone, Copy)]
pub(super) enum Local<'a> {
    Entry(&'a Bucket),
    Default(&'a KeyedBuckets, u64),
}

impl Local<'_> {
    /// Takes one call, or tells how long until one would pass.
    pub(super) fn take(&self) -> Result<(), Duration> {
        match self {
            Local::Entry(bucket) => bucket.take(),
            Local::Default(buckets, key) => buckets.take(*key),
        }
    }
}

/// A bucket a call is checked against.
#[derive(Debug, Clone, Copy)]
pub(super) struct Target<'a> {
    pub kind: Kind,
    /// The organization id or caller identity.
    pub subject: &'a [u8],
    /// The RPC, for a per-RPC bucket.
    pub rpc: Option<&'static str>,
    pub limit: Limit,
    pub local: Local<'a>,
}

impl Active {
    fn build(rules: Rules, previous: Option<&Active>) -> Self {
        let default = rules.default.as_ref().map(|rule| {
            entry(rule, previous.and_then(|p| p.default.as_ref()), |limit| {
                KeyedBuckets::new(limit)
            })
        });
        let entries = |rules: &HashMap<Box<[u8]>, Rule>,
                       previous: Option<&HashMap<Box<[u8]>, Entry<Bucket>>>| {
            rules
                .iter()
                .map(|(subject, rule)| {
                    let previous = previous.and_then(|p| p.get(subject));
                    (subject.clone(), entry(rule, previous, Bucket::new))
                })
                .collect()
        };
        Self {
            default,
            organizations: entries(&rules.organizations, previous.map(|p| &p.organizations)),
            callers: entries(&rules.callers, previous.map(|p| &p.callers)),
            rules,
        }
    }

    /// The caller's bucket for `route`, if the file names the caller.
    pub(super) fn caller<'a>(&'a self, identity: &'a [u8], route: &Route) -> Option<Target<'a>> {
        let entry = self.callers.get(identity)?;
        let (bucket, rpc) = entry.for_route(route);
        Some(Target {
            kind: Kind::Caller,
            subject: identity,
            rpc,
            limit: bucket.limit(),
            local: Local::Entry(bucket),
        })
    }

    /// The organization's bucket for `route`: its entry's, else its own
    /// `[default]` bucket (`key` from [`QuotaTable::default_key`], asked
    /// for only then), else none.
    pub(super) fn organization<'a>(
        &'a self,
        organization: &'a [u8],
        route: &Route,
        key: impl FnOnce() -> u64,
    ) -> Option<Target<'a>> {
        if let Some(entry) = self.organizations.get(organization) {
            let (bucket, rpc) = entry.for_route(route);
            return Some(Target {
                kind: Kind::Organization,
                subject: organization,
                rpc,
                limit: bucket.limit(),
                local: Local::Entry(bucket),
            });
        }
        let entry = self.default.as_ref()?;
        let (buckets, rpc) = entry.for_route(route);
        Some(Target {
            kind: Kind::Default,
            subject: organization,
            rpc,
            limit: buckets.limit(),
            local: Local::Default(buckets, key()),
        })
    }
}

impl<B> Entry<B> {
    /// The bucket for `route`: the per-RPC one, with the RPC's name, when
    /// the entry has one, else its own.
    fn for_route(&self, route: &Route) -> (&B, Option<&'static str>) {
        match self.rpc.get(route.index).and_then(Option::as_ref) {
            Some(bucket) => (bucket, Some(route.rpc)),
            None => (&self.bucket, None),
        }
    }
}

/// What every bucket kind tells about itself.
trait Limited {
    fn limit(&self) -> Limit;
}

impl Limited for Bucket {
    fn limit(&self) -> Limit {
        Bucket::limit(self)
    }
}

impl Limited for KeyedBuckets {
    fn limit(&self) -> Limit {
        KeyedBuckets::limit(self)
    }
}

/// An entry's buckets, each the previous version's when its limit is the
/// same (its state carries on), else a new one.
fn entry<B: Limited>(
    rule: &Rule,
    previous: Option<&Entry<B>>,
    new: impl Fn(Limit) -> B,
) -> Entry<B> {
    let reuse = |previous: Option<&Arc<B>>, limit: Limit| match previous {
        Some(bucket) if bucket.limit() == limit => bucket.clone(),
        _ => Arc::new(new(limit)),
    };
    let mut rpc: [Option<Arc<B>>; RPCS] = Default::default();
    for (index, limit) in rule.rpc.iter().enumerate() {
        if let Some(limit) = limit {
            let before = previous.and_then(|p| p.rpc[index].as_ref());
            rpc[index] = Some(reuse(before, *limit));
        }
    }
    Entry {
        bucket: reuse(previous.map(|p| &p.bucket), rule.limit),
        rpc,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routes;

    struct Dir(PathBuf);

    impl Dir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("gormic-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        fn write(&self, text: &str) -> PathBuf {
            let path = self.0.join("quotas.toml");
            std::fs::write(&path, text).unwrap();
            path
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const FILE: &str = "[default]\ncalls_per_second = 0.001\nburst = 2\n\n\
                        [organizations.\"org-1\"]\ncalls_per_second = 0.001\nburst = 1\n\n\
                        [organizations.\"org-1\".rpc.CreateInvoice]\ncalls_per_second = 0.001\nburst = 3\n\n\
                        [callers.\"job.svc\"]\ncalls_per_second = 0.001\nburst = 1\n";

    /// How many calls pass in a row (the clock barely moves: 0.001 calls a
    /// second refill nothing during a test).
    fn passing(target: Target<'_>) -> usize {
        (0..10).take_while(|_| target.local.take().is_ok()).count()
    }

    #[test]
    fn a_call_meets_its_callers_entry_and_its_organizations_entry_or_default() {
        let dir = Dir::new("quota-table-targets");
        let table = QuotaTable::load(&dir.write(FILE)).expect("a valid file");
        let active = table.active();
        let close = &routes::CLOSE_INVOICE;
        let create = &routes::CREATE_INVOICE;

        let caller = active.caller(b"job.svc", close).expect("listed");
        assert_eq!((caller.kind, caller.rpc), (Kind::Caller, None));
        assert!(active.caller(b"other.svc", close).is_none());

        let org = active.organization(b"org-1", close, || 0).expect("listed");
        assert_eq!(
            (org.kind, org.rpc, org.limit.burst),
            (Kind::Organization, None, 1)
        );
        let per_rpc = active.organization(b"org-1", create, || 0).expect("listed");
        assert_eq!(
            (per_rpc.kind, per_rpc.rpc, per_rpc.limit.burst),
            (Kind::Organization, Some("CreateInvoice"), 3)
        );
        assert_eq!(passing(org), 1);
        assert_eq!(passing(per_rpc), 3, "the per-RPC bucket is another bucket");

        let key = |org: &[u8]| table.default_key(org);
        let a = active
            .organization(b"org-2", close, || key(b"org-2"))
            .expect("default");
        assert_eq!((a.kind, a.limit.burst), (Kind::Default, 2));
        assert_eq!(passing(a), 2);
        let b = active
            .organization(b"org-3", close, || key(b"org-3"))
            .expect("default");
        assert_eq!(
            passing(b),
            2,
            "each organization has its own default bucket"
        );
    }

    #[test]
    fn a_reload_keeps_unchanged_buckets_and_a_bad_file_keeps_the_old_quotas() {
        let dir = Dir::new("quota-table-reload");
        let path = dir.write(FILE);
        let table = QuotaTable::load(&path).expect("a valid file");
        let close = &routes::CLOSE_INVOICE;
        let key = table.default_key(b"org-2");
        {
            let active = table.active();
            assert_eq!(
                passing(active.organization(b"org-1", close, || 0).unwrap()),
                1
            );
            assert_eq!(
                passing(active.organization(b"org-2", close, || key).unwrap()),
                2
            );
            assert_eq!(passing(active.caller(b"job.svc", close).unwrap()), 1);
        }
        assert_eq!(table.reload().unwrap(), Reloaded::Unchanged);

        // org-1's limit changes, the rest stays as it was.
        std::fs::write(&path, FILE.replacen("burst = 1\n", "burst = 4\n", 1)).unwrap();
        assert_eq!(table.reload().unwrap(), Reloaded::Replaced);
        {
            let active = table.active();
            let org = active.organization(b"org-1", close, || 0).unwrap();
            assert_eq!(org.limit.burst, 4);
            assert_eq!(passing(org), 4, "a changed limit starts full");
            assert_eq!(
                passing(active.organization(b"org-2", close, || key).unwrap()),
                0,
                "the unchanged default kept its state"
            );
            assert_eq!(passing(active.caller(b"job.svc", close).unwrap()), 0);
        }

        // A bad file is refused, once, and the quotas stay.
        std::fs::write(&path, "[default]\ncalls_per_second = 0\n").unwrap();
        let error = table.reload().expect_err("a bad file");
        assert_eq!(error.line, Some(2));
        assert!(
            error.problem.contains("default.calls_per_second"),
            "{error}"
        );
        assert_eq!(table.reload().unwrap(), Reloaded::Unchanged, "judged once");
        assert_eq!(table.rules().organizations[&b"org-1"[..]].limit.burst, 4);
        std::fs::remove_file(&path).unwrap();
        let error = table.reload().expect_err("a vanished file");
        assert!(error.to_string().contains("does not exist"), "{error}");
        assert_eq!(table.rules().organizations.len(), 1);
    }
}
