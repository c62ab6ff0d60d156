use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("test.toml"))
}

/// The paths of the field errors `text` is rejected with.
fn error_paths(text: &str) -> Vec<String> {
    match parse(text) {
        Err(ConfigError::Invalid { errors, .. }) => errors.into_iter().map(|e| e.path).collect(),
        other => panic!("expected field errors, got {other:?}"),
    }
}

#[test]
fn minimal_forward_config_takes_defaults() {
    let config = parse(
        r#"
        auth = "none"
        [[forward]]
        listen = "127.0.0.1:7000"
        upstream = "192.0.2.10:5432"
        "#,
    )
    .expect("valid");
    assert!(config.auth.is_none());
    assert_eq!(config.agent.datapath, DatapathChoice::Auto);
    assert_eq!(config.agent.connect_timeout, Duration::from_secs(5));
    assert_eq!(config.forwards[0].display_name(), "127.0.0.1:7000");
    assert_eq!(config.audit.path, "-");
}

#[test]
fn every_invalid_field_is_reported_with_its_path() {
    let err = parse(
        r#"
        auth = "none"
        [agent]
        max_sessions = 0
        connect_timeout = "0s"
        pin_dir = "relative/dir"
        [[forward]]
        listen = "127.0.0.1:7000"
        upstream = "0.0.0.0:0"
        [[forward]]
        listen = "127.0.0.1:7000"
        upstream = "192.0.2.1:1"
        "#,
    )
    .expect_err("invalid");
    let ConfigError::Invalid { errors, .. } = &err else {
        panic!("expected field errors, got {err}");
    };
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "agent.max_sessions",
            "agent.connect_timeout",
            "agent.pin_dir",
            "forward[0].upstream",
            "forward[1].listen"
        ]
    );
    assert!(err.to_string().contains("5 invalid field(s)"), "{err}");
}

#[test]
fn unknown_fields_and_bad_types_name_the_field() {
    let err = parse("[agent]\nmax_sesions = 3\n").expect_err("typo");
    assert!(err.to_string().contains("max_sesions"), "{err}");
    let err = parse("[agent]\nconnect_timeout = \"soon\"\n").expect_err("bad duration");
    assert!(err.to_string().contains("connect_timeout"), "{err}");
    let err = parse("[agent]\ndatapath = \"kernel\"\n").expect_err("bad enum");
    assert!(err.to_string().contains("datapath"), "{err}");
}

#[test]
fn overrides_apply_after_validation() {
    let config = parse(
        "auth = \"none\"\n[[forward]]\nlisten = \"127.0.0.1:1\"\nupstream = \"192.0.2.1:2\"\n",
    )
    .expect("valid")
    .with_overrides(&Overrides {
        datapath: Some(DatapathChoice::Userspace),
        pin_dir: Some(PathBuf::from("/sys/fs/bpf/other")),
    });
    assert_eq!(config.agent.datapath, DatapathChoice::Userspace);
    assert_eq!(config.agent.pin_dir, PathBuf::from("/sys/fs/bpf/other"));
}

#[test]
fn operator_group_must_exist_or_be_a_gid() {
    let base = "[[forward]]\nlisten = \"127.0.0.1:1\"\nupstream = \"192.0.2.1:2\"\n";
    let config = parse(&format!(
        "auth = \"none\"\n[agent]\noperator_group = \"root\"\nkeep_pins = true\n{base}"
    ))
    .expect("root exists everywhere");
    assert_eq!(config.agent.operator_group.as_deref(), Some("root"));
    assert!(config.agent.keep_pins);
    parse(&format!(
        "auth = \"none\"\n[agent]\noperator_group = \"4242\"\n{base}"
    ))
    .expect("numeric gid");
    let err = parse(&format!(
        "auth = \"none\"\n[agent]\noperator_group = \"no-such-group-tcpgate\"\n{base}"
    ))
    .expect_err("unknown group");
    let text = err.to_string();
    assert!(
        text.contains("agent.operator_group") && text.contains("groupadd"),
        "{text}"
    );
    let err = parse(&format!(
        "auth = \"none\"\n[agent]\noperator_group = \"\"\n{base}"
    ))
    .expect_err("empty");
    assert!(err.to_string().contains("agent.operator_group"), "{err}");
}

const FORWARD: &str = "[[forward]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"192.0.2.10:5432\"\n";

#[test]
fn no_auth_is_an_error_unless_said_explicitly() {
    assert_eq!(error_paths(FORWARD), ["auth"]);
    let text = parse(FORWARD).expect_err("no auth").to_string();
    assert!(
        text.contains(r#"auth = "none""#),
        "says how to opt out: {text}"
    );
    parse(&format!("auth = \"none\"\n{FORWARD}")).expect("explicit none");
    let err = parse(&format!("auth = \"off\"\n{FORWARD}")).expect_err("only none");
    assert!(err.to_string().contains("auth"), "{err}");
    // The table keeps its own field-level errors.
    let err = parse(&format!("{FORWARD}[auth]\nleway = \"1s\"\n")).expect_err("typo");
    assert!(err.to_string().contains("leway"), "{err}");
}

/// `[auth]` with one issuer, given its key source line, plus `policy`.
fn with_issuer(keys: &str, policy: &str) -> String {
    format!(
        "{FORWARD}[auth]\n[[auth.issuer]]\nissuer = \"https://ci.example\"\n\
         audience = \"tcpgate\"\n{keys}\n{policy}"
    )
}

#[test]
fn every_policy_rule_names_its_issuer() {
    let keys = "jwks_file = \"/etc/tcpgate/jwks.json\"";
    let rule = "[[policy]]\nname = \"db\"\nmax_lifetime = \"5m\"\n\
                allow = [{ prefix = \"127.0.0.1\", ports = [\"7000\"] }]\n";
    let paths = error_paths(&with_issuer(keys, rule));
    assert_eq!(paths, ["policy[0] (db).issuer"]);
    let named = rule.replace(
        "[[policy]]\n",
        "[[policy]]\nissuer = \"https://ci.example\"\n",
    );
    let config = parse(&with_issuer(keys, &named)).expect("rule with issuer");
    assert!(config.auth.is_some());
}

#[test]
fn hs256_secrets_are_long_and_never_beside_a_jwks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("secret");
    let keys = format!("hs256_secret_file = {secret:?}");
    // 31 bytes (the newline is trimmed) is one too few; 32 is enough.
    std::fs::write(&secret, format!("{}\n", "s".repeat(31))).expect("write");
    let field = "auth.issuer[0].hs256_secret_file";
    assert_eq!(error_paths(&with_issuer(&keys, "")), [field]);
    let text = parse(&with_issuer(&keys, ""))
        .expect_err("short")
        .to_string();
    assert!(text.contains("31 byte(s)") && text.contains("32"), "{text}");
    std::fs::write(&secret, "s".repeat(32)).expect("write");
    parse(&with_issuer(&keys, "")).expect("32 bytes");
    let beside = format!("{keys}\njwks_file = \"/etc/tcpgate/jwks.json\"");
    assert_eq!(error_paths(&with_issuer(&beside, "")), [field]);
    let missing = format!("hs256_secret_file = {:?}", dir.path().join("absent"));
    assert_eq!(error_paths(&with_issuer(&missing, "")), [field]);
}

const ONE_FORWARD: &str = "[[forward]]\nlisten = \"127.0.0.1:1\"\nupstream = \"192.0.2.1:2\"\n";

/// The paths of the `[api]` and `[admin]` field errors in `text`.
fn field_errors(text: &str) -> Vec<String> {
    match parse(text) {
        Err(ConfigError::Invalid { errors, .. }) => errors
            .into_iter()
            .map(|e| e.path)
            .filter(|p| p.starts_with("api") || p.starts_with("admin"))
            .collect(),
        Err(other) => panic!("expected field errors, got {other}"),
        Ok(_) => Vec::new(),
    }
}

#[test]
fn grant_api_needs_tls_unless_insecure_http_is_said() {
    let errors = field_errors(&format!(
        "{ONE_FORWARD}[api]\nlisten = \"127.0.0.1:8443\"\n"
    ));
    assert!(errors.contains(&"api.tls_cert".to_owned()), "{errors:?}");
    let text = parse(&format!(
        "{ONE_FORWARD}[api]\nlisten = \"127.0.0.1:8443\"\n"
    ))
    .expect_err("no tls")
    .to_string();
    assert!(text.contains("insecure_http = true"), "{text}");
    let errors = field_errors(&format!(
        "{ONE_FORWARD}[api]\nlisten = \"127.0.0.1:8443\"\ninsecure_http = true\n"
    ));
    assert!(
        !errors.iter().any(|e| e.starts_with("api.tls")),
        "{errors:?}"
    );
    let errors = field_errors(&format!(
        "{ONE_FORWARD}[api]\nlisten = \"127.0.0.1:8443\"\ntls_cert = \"/c\"\n"
    ));
    assert!(errors.contains(&"api.tls_key".to_owned()), "{errors:?}");
}

#[test]
fn grant_api_listens_on_one_address_or_a_list() {
    let one = "[api]\nlisten = \"127.0.0.1:8443\"\ninsecure_http = true\n";
    let many = "[api]\nlisten = [\"127.0.0.1:8443\", \"[::1]:8443\"]\ninsecure_http = true\n";
    for (text, want) in [(one, 1), (many, 2)] {
        let config: Config = toml::from_str(text).expect("parses");
        assert_eq!(config.api.expect("api").listen.len(), want);
    }
    let err = parse(&format!("{ONE_FORWARD}[api]\nlisten = 8443\n")).expect_err("bad type");
    assert!(err.to_string().contains("listen"), "{err}");
    let errors = field_errors(&format!(
        "{ONE_FORWARD}[api]\nlisten = [\"127.0.0.1:1\", \"127.0.0.1:1\"]\ninsecure_http = true\n"
    ));
    assert!(errors.contains(&"api.listen".to_owned()), "{errors:?}");
}

#[test]
fn admin_is_a_socket_by_default_and_tcp_needs_a_token() {
    assert!(field_errors(&format!("{ONE_FORWARD}[admin]\n")).is_empty());
    let config: Config = toml::from_str("[admin]\n").expect("parses");
    let admin = config.admin.expect("admin");
    assert_eq!(
        admin.socket_path(),
        Some(PathBuf::from(DEFAULT_ADMIN_SOCKET))
    );
    assert_eq!(admin.limits.max_connections, 256);
    let errors = field_errors(&format!(
        "{ONE_FORWARD}[admin]\nlisten = \"127.0.0.1:9470\"\n"
    ));
    assert_eq!(errors, ["admin.token_file"]);
    let tcp = "[admin]\nlisten = \"127.0.0.1:9470\"\ntoken_file = \"/etc/t\"\n";
    assert!(field_errors(&format!("{ONE_FORWARD}{tcp}")).is_empty());
    let config: Config = toml::from_str(tcp).expect("parses");
    assert_eq!(config.admin.expect("admin").socket_path(), None);
    let errors = field_errors(&format!(
        "{ONE_FORWARD}[admin]\nsocket = \"rel.sock\"\n[admin.limits]\nheader_timeout = \"0s\"\nmax_body = 0\nmax_header_bytes = 100\nmax_connections = 0\n"
    ));
    assert_eq!(
        errors,
        [
            "admin.socket",
            "admin.limits.header_timeout",
            "admin.limits.max_body",
            "admin.limits.max_header_bytes",
            "admin.limits.max_connections"
        ]
    );
}

#[test]
fn guard_fields_are_checked_and_name_their_path() {
    let paths = error_paths(
        r#"
        auth = "none"
        [agent]
        upstream_mark = 0x7447
        [intercept]
        interfaces = ["eth0\" accept", "wg+"]
        protect = ["not a prefix", "0.0.0.0/0", "192.0.2.1/24"]
        [[intercept.prefix]]
        prefix = "192.0.2.0/24"
        ports = ["22"]
        "#,
    );
    assert_eq!(
        paths,
        [
            "intercept.mark",
            "intercept.interfaces[0]",
            "intercept.interfaces[1]",
            "intercept.protect[0]",
            "intercept.protect[1]",
            "intercept.protect[2]",
        ]
    );
    let config = parse(
        r#"
        auth = "none"
        [intercept]
        pass = ["icmp", "icmpv6"]
        protect = ["10.0.0.0/8"]
        [[intercept.prefix]]
        prefix = "192.0.2.0/24"
        ports = ["22"]
        "#,
    )
    .expect("valid");
    assert_eq!(config.intercept_set.pass, [Pass::Icmp, Pass::Icmpv6]);
    assert_eq!(
        config.intercept_set.protected(),
        [
            "192.0.2.0/24".parse::<ipnet::IpNet>().expect("net"),
            "10.0.0.0/8".parse().expect("net"),
        ]
    );
}

/// `[auth.aws]` alone, with `fields` after the required ones, and a rule.
fn with_aws(fields: &str, rule_issuer: &str) -> String {
    format!(
        "{FORWARD}[auth.aws]\nsts_endpoint = \"https://sts.eu-west-1.amazonaws.com/\"\n\
         server_id = \"bastion-1\"\n{fields}\n[[policy]]\nname = \"role\"\nissuer = {rule_issuer:?}\n\
         max_lifetime = \"5m\"\nmatch = {{ \"aws.role\" = \"ci-deploy\" }}\n\
         allow = [{{ prefix = \"127.0.0.1\", ports = [\"7000\"] }}]\n"
    )
}

#[test]
fn aws_alone_is_an_identity_source_and_its_fields_are_checked() {
    let config = parse(&with_aws("", "aws")).expect("[auth.aws] alone, default issuer");
    let aws = config.auth.and_then(|a| a.aws).expect("aws section");
    assert_eq!(
        (aws.max_age(), aws.max_concurrent),
        (Duration::from_secs(300), 16)
    );
    assert_eq!(
        error_paths(&with_aws("", "https://ci.example")),
        ["policy[0] (role).issuer"]
    );
    let bad = "max_age = \"soon\"\nsts_timeout = \"0s\"\nmax_concurrent = 0\nregion = \"\"";
    assert_eq!(
        error_paths(&with_aws(bad, "aws")),
        [
            "auth.aws.region",
            "auth.aws.max_age",
            "auth.aws.sts_timeout",
            "auth.aws.max_concurrent"
        ]
    );
    let endpoint =
        |url: &str| with_aws("", "aws").replace("https://sts.eu-west-1.amazonaws.com/", url);
    for url in [
        "ftp://sts.example/",
        "https://sts.example/path",
        "not a url",
    ] {
        assert_eq!(
            error_paths(&endpoint(url)),
            ["auth.aws.sts_endpoint"],
            "{url}"
        );
    }
    let blank_id = with_aws("", "aws").replace("\"bastion-1\"", "\" \"");
    assert_eq!(error_paths(&blank_id), ["auth.aws.server_id"]);
    let err = parse(&with_aws("sts_url = \"x\"", "aws")).expect_err("typo");
    assert!(err.to_string().contains("sts_url"), "{err}");
}

#[test]
fn takeover_settings_default_and_are_checked() {
    let forward = "[[forward]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"192.0.2.1:1\"\n";
    let config = parse(&format!("auth = \"none\"\n{forward}")).expect("defaults");
    assert_eq!(
        config.agent.takeover_socket,
        PathBuf::from("/run/tcpgate/takeover.sock")
    );
    assert_eq!(config.agent.takeover_timeout, Duration::from_secs(30));
    let err = parse(&format!(
        "auth = \"none\"\n[agent]\ntakeover_socket = \"takeover.sock\"\ntakeover_timeout = \"0s\"\n{forward}"
    ))
    .expect_err("invalid");
    let ConfigError::Invalid { errors, .. } = &err else {
        panic!("expected field errors, got {err}");
    };
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, ["agent.takeover_socket", "agent.takeover_timeout"]);
}

#[test]
fn splice_after_bytes_defaults_to_at_once_and_is_bounded() {
    let forward = "[[forward]]\nlisten = \"127.0.0.1:7000\"\nupstream = \"192.0.2.1:1\"\n";
    let config = parse(&format!("auth = \"none\"\n{forward}")).expect("defaults");
    assert_eq!(config.agent.splice_after_bytes, 0, "splices at once");
    let tuned = format!("auth = \"none\"\n[agent]\nsplice_after_bytes = 65536\n{forward}");
    assert_eq!(
        parse(&tuned).expect("valid").agent.splice_after_bytes,
        65536
    );
    let over = format!("auth = \"none\"\n[agent]\nsplice_after_bytes = 1073741825\n{forward}");
    assert_eq!(error_paths(&over), ["agent.splice_after_bytes"]);
}
