//! `tcpgate revoke`: end a grant (or all of a subject's) and its sessions.

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("what").required(true).args(["grant_id", "subject"])))]
pub struct RevokeArgs {
    #[command(flatten)]
    pub admin: super::AdminArg,
    /// The grant to revoke (16 hex digits, as `tcpgate grants` shows).
    pub grant_id: Option<String>,
    /// Revoke every grant of this token subject instead.
    #[arg(long)]
    pub subject: Option<String>,
}

pub fn run(args: &RevokeArgs) -> i32 {
    let base = match args.admin.url() {
        Ok(url) => url,
        Err(e) => {
            eprintln!("tcpgate revoke: {e}");
            return crate::config::EXIT_CONFIG;
        }
    };
    let url = match (&args.grant_id, &args.subject) {
        (Some(id), _) => format!("{base}/v1/grants/{id}"),
        (None, Some(subject)) => format!("{base}/v1/grants?subject={}", urlencode(subject)),
        (None, None) => {
            eprintln!("tcpgate revoke: give a grant id or --subject");
            return crate::config::EXIT_CONFIG;
        }
    };
    super::block_on(async {
        let response = match reqwest::Client::new().delete(&url).send().await {
            Ok(response) => response,
            Err(e) => {
                eprintln!("tcpgate revoke: cannot reach the agent at {base}: {e}");
                return 1;
            }
        };
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        if status.is_success() {
            let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let grants = if value.is_array() {
                value.as_array().cloned().unwrap_or_default()
            } else {
                vec![value]
            };
            if grants.is_empty() {
                println!("no live grant matched");
            }
            for grant in grants {
                println!(
                    "revoked grant {} ({}), {} session(s) ended",
                    grant["grant_id"].as_str().unwrap_or("?"),
                    grant["subject"].as_str().unwrap_or("?"),
                    grant["sessions"]
                );
            }
            0
        } else {
            let message = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["message"].as_str().map(str::to_owned))
                .unwrap_or(body);
            eprintln!("tcpgate revoke: {status}: {message}");
            1
        }
    })
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
