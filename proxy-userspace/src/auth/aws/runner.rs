//! The runner side: `tcpgate connect --aws` and `tcpgate grant --aws` sign
//! a fresh `GetCallerIdentity` (one per connection, so each is inside the
//! bastion's date window) with the credentials in the standard AWS
//! environment variables. Nothing is sent to AWS from the runner.

use std::time::SystemTime;

use super::request::SignedRequest;
use super::sigv4::Credentials;

/// Region used when neither `AWS_REGION` nor `AWS_DEFAULT_REGION` is set,
/// with the global endpoint, as the AWS SDKs do.
pub const DEFAULT_REGION: &str = "us-east-1";
const GLOBAL_ENDPOINT: &str = "https://sts.amazonaws.com/";
/// Overrides the endpoint the request is signed for (tests, VPC endpoints).
pub const ENDPOINT_ENV: &str = "TCPGATE_AWS_STS_ENDPOINT";

/// How a runner signs: for which bastion, and for which STS endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsSigning {
    /// The bastion's `[auth.aws] server_id`.
    pub server_id: String,
    /// `--aws-sts-endpoint`; by default the region's STS endpoint.
    pub sts_endpoint: Option<String>,
}

/// Why no signed request could be made. All are usage errors (exit 64).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsClientError {
    #[error(
        "--aws: {0} is not set; export the runner's AWS credentials (AWS_ACCESS_KEY_ID, \
         AWS_SECRET_ACCESS_KEY, and AWS_SESSION_TOKEN for a role)"
    )]
    MissingCredential(&'static str),
    #[error("--aws-server-id must not be empty (the bastion's [auth.aws] server_id)")]
    NoServerId,
    #[error("--aws-sts-endpoint {0:?} is not an http(s) URL")]
    BadEndpoint(String),
}

fn non_empty(env: &impl Fn(&str) -> Option<String>, name: &str) -> Option<String> {
    env(name)
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}

impl AwsSigning {
    /// A token (`aws-sts.…`) signed now with the credentials `env` holds.
    pub fn token_with(
        &self,
        env: impl Fn(&str) -> Option<String>,
        now: SystemTime,
    ) -> Result<String, AwsClientError> {
        if self.server_id.trim().is_empty() {
            return Err(AwsClientError::NoServerId);
        }
        let need = |name: &'static str| {
            non_empty(&env, name).ok_or(AwsClientError::MissingCredential(name))
        };
        let creds = Credentials {
            access_key_id: need("AWS_ACCESS_KEY_ID")?,
            secret_access_key: need("AWS_SECRET_ACCESS_KEY")?,
            session_token: non_empty(&env, "AWS_SESSION_TOKEN"),
        };
        let region =
            non_empty(&env, "AWS_REGION").or_else(|| non_empty(&env, "AWS_DEFAULT_REGION"));
        let endpoint = match (&self.sts_endpoint, &region) {
            (Some(url), _) => url.clone(),
            (None, Some(region)) => format!("https://sts.{region}.amazonaws.com/"),
            (None, None) => GLOBAL_ENDPOINT.to_owned(),
        };
        let url = reqwest::Url::parse(&endpoint)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some())
            .ok_or_else(|| AwsClientError::BadEndpoint(endpoint.clone()))?;
        let region = region.as_deref().unwrap_or(DEFAULT_REGION);
        Ok(SignedRequest::sign(&url, region, &self.server_id, &creds, now).encode())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::aws::request::{Expect, SERVER_ID_HEADER};

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    fn signing(endpoint: Option<&str>) -> AwsSigning {
        AwsSigning {
            server_id: "bastion-1".into(),
            sts_endpoint: endpoint.map(str::to_owned),
        }
    }

    #[test]
    fn signs_with_the_standard_variables_for_the_region() {
        let vars = env(&[
            ("AWS_ACCESS_KEY_ID", "ASIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
            ("AWS_SESSION_TOKEN", "tok"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ]);
        let now = SystemTime::now();
        let token = signing(None).token_with(vars, now).expect("token");
        let req = SignedRequest::decode(&token).expect("decodes");
        assert_eq!(req.url, "https://sts.eu-west-1.amazonaws.com/");
        assert_eq!(req.headers[SERVER_ID_HEADER], "bastion-1");
        assert_eq!(req.headers["X-Amz-Security-Token"], "tok");
        assert!(req.headers["Authorization"].contains("Credential=ASIAEXAMPLE/"));
        let expect = Expect {
            server_id: "bastion-1",
            host: "sts.eu-west-1.amazonaws.com",
            max_age: std::time::Duration::from_secs(60),
            region: Some("eu-west-1"),
        };
        assert!(req.check(&expect, now).is_ok());
        // The secret itself never travels.
        assert!(
            !token.contains("secret")
                && !String::from_utf8_lossy(
                    &base64::Engine::decode(
                        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                        &token["aws-sts.".len()..]
                    )
                    .expect("b64")
                )
                .contains("secret")
        );
    }

    #[test]
    fn endpoint_override_and_missing_credentials() {
        let vars = env(&[
            ("AWS_ACCESS_KEY_ID", "AKIA"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ]);
        let token = signing(Some("http://127.0.0.1:5000/"))
            .token_with(vars, SystemTime::now())
            .expect("token");
        let req = SignedRequest::decode(&token).expect("decodes");
        assert_eq!(req.headers["Host"], "127.0.0.1:5000");
        assert!(req.headers["Authorization"].contains("/us-east-1/sts/"));
        assert!(!req.headers.contains_key("X-Amz-Security-Token"));
        let none = env(&[("AWS_ACCESS_KEY_ID", "AKIA")]);
        assert_eq!(
            signing(None).token_with(none, SystemTime::now()),
            Err(AwsClientError::MissingCredential("AWS_SECRET_ACCESS_KEY"))
        );
        let vars = env(&[
            ("AWS_ACCESS_KEY_ID", "AKIA"),
            ("AWS_SECRET_ACCESS_KEY", "secret"),
        ]);
        assert!(matches!(
            signing(Some("ftp://x/")).token_with(vars, SystemTime::now()),
            Err(AwsClientError::BadEndpoint(_))
        ));
    }
}
