//! The built-in sandbox on a loopback port with a gateway in front of it, as
//! `gormic-gateway --sandbox` runs them, and requests for any organization.

use gormic_gateway::sandbox::{self, Fixture};

use super::{API_KEY, TestGateway};

/// A fresh sandbox seeded with the default fixture, and a gateway in front.
pub async fn sandbox_app() -> TestGateway {
    sandbox_app_with(Fixture::builtin()).await
}

pub async fn sandbox_app_with(fixture: Fixture) -> TestGateway {
    let (addr, _task) = sandbox::spawn(fixture).await.expect("sandbox binds");
    TestGateway::builder(&format!("http://{addr}"))
        .start()
        .await
}

/// A request with the test api-key, for `organization`.
pub fn as_org<T>(organization: &str, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request
        .metadata_mut()
        .insert("api-key", API_KEY.parse().expect("ascii"));
    request.metadata_mut().insert(
        "organization-id",
        organization.parse().expect("ascii organization"),
    );
    request
}
