use std::sync::{Arc, Mutex};

use super::*;
use crate::config::test_set;

/// Records every `ip` invocation and answers `show` with canned JSON.
#[derive(Clone, Default)]
struct FakeIp {
    calls: Arc<Mutex<Vec<String>>>,
    rules_v4: String,
}

impl IpRunner for FakeIp {
    fn ip(&self, args: &[String]) -> Result<String, RoutingError> {
        let line = args.join(" ");
        self.calls.lock().expect("lock").push(line.clone());
        if line == "-4 -j rule show" {
            return Ok(self.rules_v4.clone());
        }
        Ok(if line.contains("-j") {
            "[]".to_owned()
        } else {
            String::new()
        })
    }
}

const PARAMS: RoutingParams = RoutingParams {
    table: 4765,
    priority: 4760,
    mark: 0x7467,
};

#[test]
fn prefix_rules_cover_each_origin_range_and_family() {
    let set = test_set(&[
        ("192.0.2.0/24", &["5432", "8000-8099"]),
        ("2001:db8::/64", &["1-65535"]),
    ]);
    let rules = prefix_rules(&set, PARAMS, &["to-runner".to_owned()]);
    let rendered: Vec<String> = rules.iter().map(|r| r.args("add").join(" ")).collect();
    let v4 = |origin: &str, ports: &str| {
        format!(
            "rule add priority 4762 {origin} to 192.0.2.0/24 ipproto tcp dport {ports} lookup 4765 protocol 213"
        )
    };
    let v6 = |origin: &str| {
        format!(
            "-6 rule add priority 4762 {origin} to 2001:db8::/64 ipproto tcp lookup 4765 protocol 213"
        )
    };
    assert_eq!(
        rendered,
        [
            v4("iif to-runner", "5432-5432"),
            v4("iif to-runner", "8000-8099"),
            v4("from 0.0.0.0/32", "5432-5432"),
            v4("from 0.0.0.0/32", "8000-8099"),
            v4("from 127.0.0.1/32", "5432-5432"),
            v4("from 127.0.0.1/32", "8000-8099"),
            v6("iif to-runner"),
            v6("from ::/128"),
            v6("from ::1/128"),
        ]
    );
    assert!(
        rendered
            .iter()
            .all(|r| r.contains(" iif ") || r.contains(" from ")),
        "never a bare destination rule"
    );
}

#[test]
fn all_interfaces_skips_loopback() {
    struct Links;
    impl IpRunner for Links {
        fn ip(&self, _: &[String]) -> Result<String, RoutingError> {
            Ok(r#"[{"ifname":"lo","link_type":"loopback"},{"ifname":"eth0","link_type":"ether"},{"ifname":"to-runner","link_type":"ether"}]"#.to_owned())
        }
    }
    assert_eq!(
        all_interfaces(&Links).expect("parse"),
        ["eth0", "to-runner"]
    );
}

#[test]
fn session_rule_pins_the_five_tuple() {
    let rule = session_rule(
        "198.51.100.2:40000".parse().expect("addr"),
        "192.0.2.10:5432".parse().expect("addr"),
        PARAMS,
    );
    assert_eq!(
        rule.args("add").join(" "),
        "rule add priority 4761 from 198.51.100.2/32 to 192.0.2.10/32 ipproto tcp sport 40000 dport 5432 lookup 4765 protocol 213"
    );
}

#[test]
fn remove_all_deletes_only_our_rules_and_refuses_foreign_ones() {
    let ours = r#"[{"priority":0,"table":"local"},{"priority":4760,"fwmark":"0x7467","table":"main","protocol":"213"},{"priority":4762,"table":"4765","protocol":"213"},{"priority":32766,"table":"main"}]"#;
    let fake = FakeIp {
        rules_v4: ours.to_owned(),
        ..FakeIp::default()
    };
    let routing = Routing::new(Box::new(fake.clone()), PARAMS);
    assert_eq!(routing.remove_all().expect("clean"), 2);
    let calls = fake.calls.lock().expect("lock").clone();
    assert!(
        calls.contains(&"-4 rule del priority 4760 protocol 213".to_owned()),
        "{calls:?}"
    );
    assert!(
        calls.contains(&"-4 rule del priority 4762 protocol 213".to_owned()),
        "{calls:?}"
    );

    let foreign = r#"[{"priority":4761,"table":"main"}]"#;
    let routing = Routing::new(
        Box::new(FakeIp {
            rules_v4: foreign.to_owned(),
            ..FakeIp::default()
        }),
        PARAMS,
    );
    assert!(matches!(
        routing.remove_all(),
        Err(RoutingError::PriorityTaken { priority: 4761 })
    ));
}
