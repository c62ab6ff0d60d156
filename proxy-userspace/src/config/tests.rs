use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(text, Path::new("test.toml"))
}

#[test]
fn minimal_forward_config_takes_defaults() {
    let config = parse(
        r#"
        [[forward]]
        listen = "127.0.0.1:7000"
        upstream = "192.0.2.10:5432"
        "#,
    )
    .expect("valid");
    assert_eq!(config.agent.datapath, DatapathChoice::Auto);
    assert_eq!(config.agent.connect_timeout, Duration::from_secs(5));
    assert_eq!(config.forwards[0].display_name(), "127.0.0.1:7000");
    assert_eq!(config.audit.path, "-");
}

#[test]
fn every_invalid_field_is_reported_with_its_path() {
    let err = parse(
        r#"
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
    let config = parse("[[forward]]\nlisten = \"127.0.0.1:1\"\nupstream = \"192.0.2.1:2\"\n")
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
        "[agent]\noperator_group = \"root\"\nkeep_pins = true\n{base}"
    ))
    .expect("root exists everywhere");
    assert_eq!(config.agent.operator_group.as_deref(), Some("root"));
    assert!(config.agent.keep_pins);
    parse(&format!("[agent]\noperator_group = \"4242\"\n{base}")).expect("numeric gid");
    let err = parse(&format!(
        "[agent]\noperator_group = \"no-such-group-tcpgate\"\n{base}"
    ))
    .expect_err("unknown group");
    let text = err.to_string();
    assert!(
        text.contains("agent.operator_group") && text.contains("groupadd"),
        "{text}"
    );
    let err = parse(&format!("[agent]\noperator_group = \"\"\n{base}")).expect_err("empty");
    assert!(err.to_string().contains("agent.operator_group"), "{err}");
}

#[test]
fn guard_fields_are_checked_and_name_their_path() {
    let err = parse(
        r#"
        [agent]
        upstream_mark = 0x7447
        [intercept]
        interfaces = ["eth0\" accept", "wg+"]
        protect = ["not a prefix", "0.0.0.0/0", "192.0.2.1/24"]
        [[intercept.prefix]]
        prefix = "192.0.2.0/24"
        ports = ["22"]
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
            "intercept.mark",
            "intercept.interfaces[0]",
            "intercept.interfaces[1]",
            "intercept.protect[0]",
            "intercept.protect[1]",
            "intercept.protect[2]",
        ],
        "{err}"
    );
    let config = parse(
        r#"
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
