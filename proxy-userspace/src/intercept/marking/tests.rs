use super::*;
use crate::config::test_set;

fn params(interfaces: Option<&[&str]>) -> MarkingParams {
    MarkingParams {
        routed: None,
        mark: 0x7447,
        upstream_mark: 0x7467,
        interfaces: interfaces.map(|list| list.iter().map(|s| (*s).to_owned()).collect()),
    }
}

/// The lines of one chain's body.
fn chain<'a>(rules: &'a str, name: &str) -> Vec<&'a str> {
    rules
        .split(&format!("chain {name} {{"))
        .nth(1)
        .and_then(|c| c.split("\t}").next())
        .expect("chain present")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn forwarded_traffic_is_marked_from_every_interface_but_lo() {
    let rules = ruleset(&test_set(&[("192.0.2.0/24", &["80"])]), &params(None), &[]);
    assert_eq!(
        chain(&rules, "prerouting"),
        [
            "type filter hook prerouting priority mangle; policy accept;",
            "iifname \"lo\" return",
            "jump select",
        ]
    );
    let only = ruleset(
        &test_set(&[("192.0.2.0/24", &["80"])]),
        &params(Some(&["eth1", "wg0"])),
        &[],
    );
    assert!(
        chain(&only, "prerouting").contains(&"iifname != { \"eth1\", \"wg0\" } return"),
        "{only}"
    );
}

#[test]
fn local_processes_are_marked_in_a_route_chain_except_the_agents_upstreams() {
    let rules = ruleset(&test_set(&[("192.0.2.0/24", &["80"])]), &params(None), &[]);
    assert_eq!(
        chain(&rules, "output"),
        [
            "type route hook output priority mangle; policy accept;",
            "meta mark 0x7467 return",
            "jump select",
        ]
    );
}

/// A port is marked when any prefix covering the address lists it, as the
/// trie's values carry the ports of every containing prefix.
#[test]
fn each_prefix_marks_its_own_ports() {
    let set = test_set(&[
        ("192.0.2.0/24", &["22", "8000-8099"]),
        ("192.0.2.10/32", &["5432"]),
        ("2001:db8::/64", &["1-65535"]),
    ]);
    let rules = ruleset(&set, &params(None), &[]);
    let select = chain(&rules, "select");
    assert_eq!(
        &select[2..],
        [
            "ip daddr 192.0.2.0/24 tcp dport { 22, 8000-8099 } meta mark set 0x7447 return",
            "ip daddr 192.0.2.10/32 tcp dport { 5432 } meta mark set 0x7447 return",
            "ip6 daddr 2001:db8::/64 meta l4proto tcp meta mark set 0x7447 return",
        ],
        "{rules}"
    );
}

#[test]
fn pinned_sessions_stay_marked_until_unpinned() {
    let pins = [
        Pin {
            client: "198.51.100.2:40000".parse().expect("addr"),
            destination: "192.0.2.10:5432".parse().expect("addr"),
        },
        Pin {
            client: "[2001:db8:100::2]:40001".parse().expect("addr"),
            destination: "[2001:db8:2::10]:80".parse().expect("addr"),
        },
    ];
    let rules = ruleset(
        &test_set(&[("203.0.113.0/24", &["5432"])]),
        &params(None),
        &pins,
    );
    assert!(
        rules.contains("elements = { 198.51.100.2 . 40000 . 192.0.2.10 . 5432 }"),
        "{rules}"
    );
    assert!(
        rules.contains("elements = { 2001:db8:100::2 . 40001 . 2001:db8:2::10 . 80 }"),
        "{rules}"
    );
    let select = chain(&rules, "select");
    assert_eq!(
        &select[..2],
        [
            "ip saddr . tcp sport . ip daddr . tcp dport @pinned4 meta mark set 0x7447 return",
            "ip6 saddr . tcp sport . ip6 daddr . tcp dport @pinned6 meta mark set 0x7447 return",
        ]
    );

    #[derive(Default)]
    struct Recorder(std::sync::Arc<std::sync::Mutex<Vec<String>>>);
    impl NftRunner for Recorder {
        fn apply(&self, script: &str) -> Result<(), FirewallError> {
            self.0.lock().expect("lock").push(script.to_owned());
            Ok(())
        }
        fn list(&self, _: &str) -> Result<Option<String>, FirewallError> {
            Ok(Some(String::new()))
        }
    }
    let calls = std::sync::Arc::default();
    let marking = Marking::new(Box::new(Recorder(std::sync::Arc::clone(&calls))));
    marking.unpin(pins[0]).expect("unpin");
    assert!(marking.remove().expect("remove"), "was present");
    let calls = calls.lock().expect("lock").clone();
    assert_eq!(
        calls[0],
        "delete element inet tcpgate_intercept pinned4 { 198.51.100.2 . 40000 . 192.0.2.10 . 5432 }\n"
    );
    assert_eq!(
        calls[1],
        "table inet tcpgate_intercept {}\ndelete table inet tcpgate_intercept\n"
    );
}

#[test]
fn routed_packets_are_never_marked_for_interception() {
    let mut with_routed = params(Some(&["eth1"]));
    with_routed.routed = Some(RoutedMarking {
        mark: 0x7452,
        target_sees: TargetSees::Runner,
    });
    let rules = ruleset(&test_set(&[("192.0.2.0/24", &["80"])]), &with_routed, &[]);
    assert_eq!(
        chain(&rules, "prerouting"),
        [
            "type filter hook prerouting priority mangle; policy accept;",
            "iifname != { \"eth1\" } return",
            "meta mark 0x7452 return",
            "jump select",
        ]
    );
    // The bastion's own processes cannot use the routed mark to skip it.
    assert!(!chain(&rules, "output").iter().any(|l| l.contains("0x7452")));
}

#[test]
fn a_nat_chain_exists_only_when_the_target_sees_the_bastion() {
    let set = test_set(&[("192.0.2.0/24", &["80"])]);
    let mut p = params(Some(&["eth1"]));
    for target_sees in [None, Some(TargetSees::Runner)] {
        p.routed = target_sees.map(|target_sees| RoutedMarking {
            mark: 0x7452,
            target_sees,
        });
        assert!(!ruleset(&set, &p, &[]).contains("nat"), "{target_sees:?}");
    }
    p.routed = Some(RoutedMarking {
        mark: 0x7452,
        target_sees: TargetSees::Bastion,
    });
    let rules = ruleset(&set, &p, &[]);
    assert_eq!(
        chain(&rules, "routed_snat"),
        [
            "type nat hook postrouting priority srcnat; policy accept;",
            "meta mark 0x7452 masquerade",
        ]
    );
}
