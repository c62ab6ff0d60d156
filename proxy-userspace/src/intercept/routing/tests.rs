use std::sync::{Arc, Mutex};

use super::*;

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
    intercept_mark: 0x7447,
};

#[test]
fn only_the_marks_select_never_a_destination_or_interface() {
    let fake = FakeIp::default();
    Routing::new(Box::new(fake.clone()), PARAMS)
        .install()
        .expect("install");
    let calls = fake.calls.lock().expect("lock").clone();
    let rules: Vec<&String> = calls.iter().filter(|c| c.contains("rule add")).collect();
    assert_eq!(
        rules,
        [
            "rule add priority 4760 fwmark 0x7467 lookup main protocol 213",
            "-6 rule add priority 4760 fwmark 0x7467 lookup main protocol 213",
            "rule add priority 4762 fwmark 0x7447 lookup 4765 protocol 213",
            "-6 rule add priority 4762 fwmark 0x7447 lookup 4765 protocol 213",
        ]
    );
    assert!(
        calls.contains(
            &"-4 route add local 0.0.0.0/0 dev lo table 4765 proto 213 src 127.0.0.1".to_owned()
        ),
        "{calls:?}"
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
