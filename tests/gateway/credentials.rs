//! The credentials file (`--credentials`): a good file maps identities to
//! credentials; every bad file is refused with its line and problem; reload
//! keeps the old map on failure; no key text ever reaches an error or
//! `Debug` output; the flag requires mTLS.

use clap::Parser;

use gormic_gateway::credentials::{CredentialMap, CredentialsArgs, OrganizationMismatch};
use gormic_gateway::reload::{Outcome, Reloaded};
use gormic_gateway::tls::{CallerIdentity, TlsArgs};

use crate::support::certs::TestDir;

const INVOICER: &str = "spiffe://prod.example/ns/billing/sa/invoicer";
const REPORTER: &str = "reporter.analytics.svc";

/// Every key in these files contains `SECRET`, so that a leak is visible.
const GOOD: &str = r#"# Who may call, and as whom.
[[caller]]
identity = "spiffe://prod.example/ns/billing/sa/invoicer"
api_key = "gk_live_SECRET_invoicer"
organization_id = "org-42"

[[caller]]
identity = "reporter.analytics.svc"
api_key = "gk_live_SECRET_reporter"
"#;

fn identity(name: &str) -> CallerIdentity {
    CallerIdentity::new(name)
}

#[test]
fn a_good_file_maps_identities_to_credentials() {
    let dir = TestDir::new("credentials-good");
    let map = CredentialMap::load(&dir.write("credentials.toml", GOOD)).expect("valid file");
    assert_eq!(map.len(), 2);

    let invoicer = map.lookup(&identity(INVOICER)).expect("mapped");
    assert_eq!(invoicer.api_key, "gk_live_SECRET_invoicer");
    assert!(invoicer.api_key.is_sensitive());
    assert_eq!(
        invoicer.organization_id.as_ref().map(|v| v.as_bytes()),
        Some(&b"org-42"[..])
    );
    let reporter = map.lookup(&identity(REPORTER)).expect("mapped");
    assert_eq!(reporter.api_key, "gk_live_SECRET_reporter");
    assert_eq!(reporter.organization_id, None);

    assert!(map.lookup(&identity("stranger.svc")).is_none());
    assert!(
        map.lookup(&identity("spiffe://prod.example/ns/billing/sa/invoicer/"))
            .is_none(),
        "identities match exactly"
    );

    let debug = format!("{map:?} {invoicer:?} {reporter:?}");
    assert!(!debug.contains("SECRET"), "{debug}");
    assert!(
        debug.contains("org-42") && debug.contains("<redacted>"),
        "{debug}"
    );
}

#[test]
fn bad_files_are_refused_with_line_and_problem() {
    let dir = TestDir::new("credentials-bad");
    let header = "[[caller]]\nidentity = \"a.svc\"\n";
    let cases: Vec<(&str, String, Option<usize>, &str)> = vec![
        (
            "syntax",
            "[[caller]]\nidentity = \"a.svc\"\napi_key = \"gk_live_SECRET\n".into(),
            Some(3),
            "not valid TOML",
        ),
        (
            "unknown field",
            format!("{header}api_key = \"gk_live_SECRET\"\norganisation_id = \"org-1\"\n"),
            Some(4),
            "unknown field in [[caller]] (allowed: identity, api_key, organization_id)",
        ),
        (
            "top-level key",
            "api_key = \"gk_live_SECRET\"\n".into(),
            Some(1),
            "unknown key at the top level",
        ),
        (
            "caller not a table array",
            "caller = \"gk_live_SECRET\"\n".into(),
            Some(1),
            "`caller` must be an array of tables",
        ),
        (
            "empty identity",
            "[[caller]]\nidentity = \"  \"\napi_key = \"gk_live_SECRET\"\n".into(),
            Some(2),
            "identity is empty",
        ),
        (
            "identity with spaces",
            "[[caller]]\nidentity = \"a.svc \"\napi_key = \"gk_live_SECRET\"\n".into(),
            Some(2),
            "identity has leading or trailing spaces",
        ),
        (
            "no identity",
            "\n[[caller]]\napi_key = \"gk_live_SECRET\"\n".into(),
            Some(2),
            "[[caller]] has no identity",
        ),
        (
            "no api_key",
            format!("\n\n{header}"),
            Some(3),
            "[[caller]] has no api_key",
        ),
        (
            "empty api_key",
            format!("{header}api_key = \"\"\n"),
            Some(3),
            "api_key is empty",
        ),
        (
            "api_key not a header value",
            format!("{header}api_key = \"gk_live_SECRET\\u0007x\"\n"),
            Some(3),
            "api_key is not a valid header value",
        ),
        (
            "api_key not ASCII",
            format!("{header}api_key = \"gk_live_SECRET_é\"\n"),
            Some(3),
            "api_key is not a valid header value",
        ),
        (
            "api_key not a string",
            format!("{header}api_key = 123456789\n"),
            Some(3),
            "api_key must be a string",
        ),
        (
            "organization_id not a header value",
            format!("{header}api_key = \"gk_live_SECRET\"\norganization_id = \"org\\u0000\"\n"),
            Some(4),
            "organization_id is not a valid header value",
        ),
        (
            "duplicate identity",
            format!(
                "{header}api_key = \"gk_live_SECRET_1\"\n\n{header}api_key = \"gk_live_SECRET_2\"\n"
            ),
            Some(6),
            "identity \"a.svc\" is already mapped on line 2",
        ),
        (
            "empty file",
            "# nobody yet\n".into(),
            None,
            "no [[caller]] entries",
        ),
    ];
    for (what, content, line, problem) in cases {
        let path = dir.write(
            &format!("{}.toml", what.replace(' ', "-")),
            content.as_bytes(),
        );
        let error = CredentialMap::load(&path).expect_err(what);
        let message = error.to_string();
        assert!(!message.contains("SECRET"), "{what}: a key in {message}");
        assert_eq!(error.line, line, "{what}: {message}");
        let prefix = match line {
            Some(n) => format!("{}: line {n}: ", path.display()),
            None => format!("{}: ", path.display()),
        };
        assert!(
            message.starts_with(&prefix) && message.contains(problem),
            "{what}: {message}"
        );
    }

    let not_utf8 = dir.write("latin1.toml", b"[[caller]]\nidentity = \"caf\xe9\"\n");
    let message = CredentialMap::load(&not_utf8)
        .expect_err("latin-1")
        .to_string();
    assert_eq!(
        message,
        format!("{}: line 2: not UTF-8 text", not_utf8.display())
    );

    let missing = dir.path("missing.toml");
    let message = CredentialMap::load(&missing)
        .expect_err("missing")
        .to_string();
    assert_eq!(
        message,
        format!(
            "{}: cannot read the file: it does not exist",
            missing.display()
        )
    );
}

#[test]
fn reload_replaces_the_map_and_keeps_it_on_failure() {
    let dir = TestDir::new("credentials-reload");
    let path = dir.write("credentials.toml", GOOD);
    let map = CredentialMap::load(&path).expect("valid file");
    let shared = map.clone();
    assert_eq!(map.reload().expect("same file"), Reloaded::Unchanged);

    dir.write(
        "credentials.toml",
        format!("[[caller]]\nidentity = \"{INVOICER}\"\napi_key = \"gk_live_SECRET_rotated\"\n"),
    );
    assert_eq!(map.reload().expect("valid change"), Reloaded::Replaced);
    let invoicer = shared.lookup(&identity(INVOICER)).expect("still mapped");
    assert_eq!(invoicer.api_key, "gk_live_SECRET_rotated");
    assert_eq!(invoicer.organization_id, None);
    assert!(
        shared.lookup(&identity(REPORTER)).is_none(),
        "removed callers are gone"
    );

    dir.write(
        "credentials.toml",
        format!(
            "[[caller]]\nidentity = \"{INVOICER}\"\napi_key = \"gk_live_SECRET_broken\"\nextra = 1\n"
        ),
    );
    let error = map.reload().expect_err("bad change").to_string();
    assert!(
        error.starts_with(&format!("{}: line 4: unknown field", path.display())),
        "{error}"
    );
    assert!(!error.contains("SECRET"), "{error}");
    assert_eq!(
        shared.lookup(&identity(INVOICER)).expect("old map").api_key,
        "gk_live_SECRET_rotated"
    );
    assert_eq!(map.reload().expect("reported once"), Reloaded::Unchanged);

    std::fs::remove_file(&path).expect("remove");
    let error = map.reload().expect_err("file gone").to_string();
    assert!(error.contains("does not exist"), "{error}");
    assert_eq!(shared.len(), 1, "the old map stays");

    dir.write("credentials.toml", GOOD);
    assert_eq!(map.reload().expect("restored"), Reloaded::Replaced);
    assert_eq!(shared.len(), 2);
}

#[derive(Debug, Parser)]
struct Cli {
    #[command(flatten)]
    tls: TlsArgs,
    #[command(flatten)]
    credentials: CredentialsArgs,
}

#[test]
fn the_credentials_flag_requires_mtls() {
    let error = Cli::try_parse_from(["gw", "--credentials", "c.toml"])
        .expect_err("without --tls-client-ca")
        .to_string();
    assert!(error.contains("--tls-client-ca"), "{error}");
    let cli = Cli::try_parse_from([
        "gw",
        "--credentials",
        "c.toml",
        "--tls-client-ca",
        "ca.crt",
        "--tls-cert",
        "tls.crt",
        "--tls-key",
        "tls.key",
    ])
    .expect("with mTLS");
    assert_eq!(
        cli.credentials.credentials.as_deref(),
        Some(std::path::Path::new("c.toml"))
    );
}

#[test]
fn the_mapped_organization_wins_and_a_different_one_is_refused() {
    let dir = TestDir::new("credentials-organization");
    let map = CredentialMap::load(&dir.write("credentials.toml", GOOD)).expect("valid file");
    let header = |value: &str| http::HeaderValue::from_str(value).expect("header value");

    let invoicer = map.lookup(&identity(INVOICER)).expect("mapped with org-42");
    assert_eq!(
        invoicer.organization_id_for(None),
        Ok(Some(header("org-42")))
    );
    assert_eq!(
        invoicer.organization_id_for(Some(&header("org-42"))),
        Ok(Some(header("org-42")))
    );
    assert_eq!(
        invoicer.organization_id_for(Some(&header("org-7"))),
        Err(OrganizationMismatch)
    );

    let reporter = map.lookup(&identity(REPORTER)).expect("mapped without org");
    assert_eq!(
        reporter.organization_id_for(Some(&header("org-7"))),
        Ok(Some(header("org-7")))
    );
    assert_eq!(reporter.organization_id_for(None), Ok(None));
}

#[tokio::test]
async fn a_refused_reload_is_logged_without_the_key() {
    let logs = crate::support::logs();
    let dir = TestDir::new("credentials-logged");
    let path = dir.write("credentials.toml", GOOD);
    let map = CredentialMap::load(&path).expect("valid file");

    let (outcomes_tx, mut outcomes) = tokio::sync::mpsc::unbounded_channel();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let watched = map.clone();
    let task = tokio::spawn(gormic_gateway::reload::watch(
        std::time::Duration::from_millis(20),
        async move {
            let _ = stopped.await;
        },
        "credentials",
        move || watched.reload(),
        move |what, outcome| {
            let _ = outcomes_tx.send((what, outcome));
        },
    ));
    dir.write(
        "credentials.toml",
        "[[caller]]\nidentity = \"a.svc\"\napi_key = \"gk_live_SECRET_logged\"\napi_kee = \"gk_live_SECRET_typo\"\n",
    );
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(20), outcomes.recv())
        .await
        .expect("the watch task reports")
        .expect("the watch task runs");
    assert_eq!(outcome, ("credentials", Outcome::Failure));
    stop.send(()).expect("the watch task is waiting");
    crate::support::within("the watch task to stop", crate::support::PATIENCE, task)
        .await
        .expect("the watch task stops");

    let text = logs.text();
    let line = text
        .lines()
        .find(|line| line.contains("reload of credentials refused"))
        .unwrap_or_else(|| panic!("no warn line in:\n{text}"));
    assert!(
        line.contains("\"level\":\"WARN\"")
            && line.contains(&format!("{}: line 4: unknown field", path.display())),
        "{line}"
    );
    assert!(!text.contains("SECRET"), "a key reached the logs:\n{text}");
    assert_eq!(map.len(), 2, "the old map stays");
}
