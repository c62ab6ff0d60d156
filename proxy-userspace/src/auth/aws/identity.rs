//! What STS answered: the caller's ARN and account, read from the XML of
//! `GetCallerIdentityResponse` (or the `ErrorResponse`), and the claims
//! policy matches on.
//!
//! Claims (under `aws`, so rules write `aws.account`, `aws.role`, …):
//!
//! | claim            | from `arn:aws:sts::123456789012:assumed-role/ci-deploy/i-0abc` |
//! |------------------|-------------------------------------------------|
//! | `aws.arn`        | the whole ARN (also the subject, `sub`)          |
//! | `aws.partition`  | `aws`                                            |
//! | `aws.account`    | `123456789012`                                   |
//! | `aws.type`       | `assumed-role` (`user`, `root`, `federated-user`)|
//! | `aws.role`       | `ci-deploy` (assumed roles only)                 |
//! | `aws.session`    | `i-0abc` (assumed roles only)                    |
//! | `aws.user`       | the IAM user's name (users only)                 |
//! | `aws.user_id`    | STS's `UserId`, e.g. `AROA…:i-0abc`              |

use serde_json::{Map, Value, json};

/// Who STS says signed the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerIdentity {
    pub arn: String,
    pub account: String,
    pub user_id: String,
}

/// Why STS's answer could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    #[error("STS answered with XML that is not a GetCallerIdentityResponse: {0}")]
    Shape(String),
    #[error("STS's ARN {0:?} is not an IAM user, role session, root or federated user ARN")]
    Arn(String),
    #[error("STS's ARN names account {arn}, its Account field {field}")]
    AccountMismatch { arn: String, field: String },
}

fn text_of<'a>(doc: &'a roxmltree::Document<'_>, parent: &str, name: &str) -> Option<&'a str> {
    doc.descendants()
        .find(|n| n.has_tag_name(parent))?
        .children()
        .find(|n| n.has_tag_name(name))
        .and_then(|n| n.text())
        .map(str::trim)
}

/// Reads a `GetCallerIdentityResponse`.
pub fn parse_response(xml: &str) -> Result<CallerIdentity, AnswerError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| AnswerError::Shape(e.to_string()))?;
    let field = |name: &str| {
        text_of(&doc, "GetCallerIdentityResult", name)
            .filter(|t| !t.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| AnswerError::Shape(format!("no {name}")))
    };
    Ok(CallerIdentity {
        arn: field("Arn")?,
        account: field("Account")?,
        user_id: field("UserId")?,
    })
}

/// STS's error code and message from an `ErrorResponse`, if the body is one.
#[must_use]
pub fn parse_error(xml: &str) -> Option<String> {
    let doc = roxmltree::Document::parse(xml).ok()?;
    let code = text_of(&doc, "Error", "Code")?;
    let message = text_of(&doc, "Error", "Message").unwrap_or_default();
    Some(format!("{code}: {message}").chars().take(300).collect())
}

impl CallerIdentity {
    /// The claims policy matches on; see the module docs.
    pub fn claims(&self, issuer: &str) -> Result<Map<String, Value>, AnswerError> {
        let bad = || AnswerError::Arn(self.arn.clone());
        let parts: Vec<&str> = self.arn.splitn(6, ':').collect();
        let ["arn", partition, service, "", account, resource] = parts.as_slice() else {
            return Err(bad());
        };
        if partition.is_empty()
            || account.is_empty()
            || !account.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        if *account != self.account {
            return Err(AnswerError::AccountMismatch {
                arn: (*account).to_owned(),
                field: self.account.clone(),
            });
        }
        let mut aws = json!({
            "arn": self.arn,
            "partition": partition,
            "account": account,
            "user_id": self.user_id,
        });
        let segments: Vec<&str> = resource.split('/').collect();
        let extra = match (*service, segments.as_slice()) {
            ("sts", ["assumed-role", role, session]) if !role.is_empty() && !session.is_empty() => {
                json!({ "type": "assumed-role", "role": role, "session": session })
            }
            ("sts", ["federated-user", user]) if !user.is_empty() => {
                json!({ "type": "federated-user", "user": user })
            }
            // IAM users are `iam`; moto answers `sts` for its default user.
            ("iam" | "sts", ["user", .., user]) if !user.is_empty() => {
                json!({ "type": "user", "user": user })
            }
            ("iam", ["root"]) => json!({ "type": "root" }),
            _ => return Err(bad()),
        };
        if let (Some(aws), Value::Object(extra)) = (aws.as_object_mut(), extra) {
            aws.extend(extra);
        }
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(issuer));
        claims.insert("sub".into(), json!(self.arn));
        claims.insert("aws".into(), aws);
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// moto's answer, which is AWS's documented one.
    const ANSWER: &str = r#"<GetCallerIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <GetCallerIdentityResult>
    <Arn>arn:aws:sts::123456789012:assumed-role/ci-deploy/i-0abc</Arn>
    <UserId>AROA123456789EXAMPLE:i-0abc</UserId>
    <Account>123456789012</Account>
  </GetCallerIdentityResult>
  <ResponseMetadata><RequestId>01234567-89ab-cdef-0123-456789abcdef</RequestId></ResponseMetadata>
</GetCallerIdentityResponse>"#;

    #[test]
    fn an_assumed_role_gives_account_role_and_session() {
        let id = parse_response(ANSWER).expect("parses");
        let claims = id.claims("aws").expect("claims");
        assert_eq!(
            claims["sub"],
            "arn:aws:sts::123456789012:assumed-role/ci-deploy/i-0abc"
        );
        assert_eq!(claims["iss"], "aws");
        let aws = &claims["aws"];
        assert_eq!(aws["account"], "123456789012");
        assert_eq!(aws["type"], "assumed-role");
        assert_eq!(aws["role"], "ci-deploy");
        assert_eq!(aws["session"], "i-0abc");
        assert_eq!(aws["user_id"], "AROA123456789EXAMPLE:i-0abc");
        assert_eq!(aws["partition"], "aws");
    }

    #[test]
    fn users_root_and_other_partitions() {
        let id = |arn: &str, account: &str| CallerIdentity {
            arn: arn.into(),
            account: account.into(),
            user_id: "AIDA".into(),
        };
        let c = id("arn:aws:iam::123456789012:user/ops/alice", "123456789012")
            .claims("aws")
            .expect("user");
        assert_eq!(
            (c["aws"]["type"].as_str(), c["aws"]["user"].as_str()),
            (Some("user"), Some("alice"))
        );
        assert!(c["aws"].get("role").is_none());
        let c = id("arn:aws-us-gov:iam::123456789012:root", "123456789012")
            .claims("aws")
            .expect("root");
        assert_eq!(c["aws"]["partition"], "aws-us-gov");
        for arn in [
            "arn:aws:s3:::bucket",
            "arn:aws:sts::123456789012:assumed-role/only-role",
            "arn:aws:sts::12345678901x:assumed-role/r/s",
            "not an arn",
        ] {
            assert!(id(arn, "123456789012").claims("aws").is_err(), "{arn}");
        }
        assert!(matches!(
            id("arn:aws:sts::111122223333:assumed-role/r/s", "123456789012").claims("aws"),
            Err(AnswerError::AccountMismatch { .. })
        ));
    }

    #[test]
    fn errors_and_garbage_are_told_apart() {
        let error = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match</Message></Error>
</ErrorResponse>"#;
        assert_eq!(
            parse_error(error).as_deref(),
            Some("SignatureDoesNotMatch: The request signature we calculated does not match")
        );
        assert!(parse_response(error).is_err());
        assert!(parse_response("<html>gateway</html>").is_err());
        assert!(parse_response("not xml").is_err());
        assert_eq!(parse_error("not xml"), None);
    }
}
