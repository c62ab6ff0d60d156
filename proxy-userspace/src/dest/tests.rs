use super::*;

#[test]
fn normalize_merges_overlapping_and_adjacent_ranges() {
    let r = |first, last| PortRange { first, last };
    assert_eq!(
        normalize_ports(vec![r(8050, 8100), r(22, 22), r(20, 21), r(8000, 8099)]),
        [r(20, 22), r(8000, 8100)]
    );
    assert!(normalize_ports(Vec::new()).is_empty());
}

fn dest(prefix: &str, ports: &[&str]) -> Destination {
    Destination::parse(&DestinationSpec {
        prefix: prefix.into(),
        ports: ports.iter().map(|p| p.to_string()).collect(),
    })
    .expect("valid destination")
}

#[test]
fn parses_ports_and_ranges() {
    assert_eq!(
        "5432".parse(),
        Ok(PortRange {
            first: 5432,
            last: 5432
        })
    );
    assert_eq!(
        "1-1024".parse(),
        Ok(PortRange {
            first: 1,
            last: 1024
        })
    );
    assert!(matches!(
        "0".parse::<PortRange>(),
        Err(DestinationParseError::BadPort(_))
    ));
    assert!(matches!(
        "65536".parse::<PortRange>(),
        Err(DestinationParseError::BadPort(_))
    ));
    assert!(matches!(
        "x".parse::<PortRange>(),
        Err(DestinationParseError::BadPort(_))
    ));
    assert!(matches!(
        "90-80".parse::<PortRange>(),
        Err(DestinationParseError::ReversedRange(_))
    ));
}

#[test]
fn parses_prefixes_and_single_addresses() {
    assert_eq!(
        parse_prefix("192.0.2.10").map(|n| n.to_string()),
        Ok("192.0.2.10/32".into())
    );
    assert_eq!(
        parse_prefix("2001:db8::/64").map(|n| n.to_string()),
        Ok("2001:db8::/64".into())
    );
    assert_eq!(
        parse_prefix("::ffff:192.0.2.0/120").map(|n| n.to_string()),
        Ok("192.0.2.0/24".into())
    );
    assert!(matches!(
        parse_prefix("192.0.2.7/24"),
        Err(DestinationParseError::HostBitsSet { .. })
    ));
    assert!(matches!(
        parse_prefix("nope"),
        Err(DestinationParseError::BadPrefix(_))
    ));
}

#[test]
fn parse_reports_every_bad_part() {
    let spec = DestinationSpec {
        prefix: "bad".into(),
        ports: vec!["0".into(), "9-1".into()],
    };
    assert_eq!(Destination::parse(&spec).map_err(|e| e.len()), Err(3));
}

#[test]
fn contains_checks_address_and_port_and_maps_v4_in_v6() {
    let d = dest("192.0.2.0/24", &["5432", "8000-8099"]);
    assert!(d.contains("192.0.2.10:5432".parse().expect("addr")));
    assert!(d.contains("192.0.2.10:8050".parse().expect("addr")));
    assert!(d.contains("[::ffff:192.0.2.10]:5432".parse().expect("addr")));
    assert!(!d.contains("192.0.2.10:22".parse().expect("addr")));
    assert!(!d.contains("198.51.100.1:5432".parse().expect("addr")));
}

#[test]
fn covering_handles_unions_of_ports_and_split_prefixes() {
    let outer = [
        dest("10.0.0.0/24", &["1-100"]),
        dest("10.0.1.0/24", &["1-100"]),
        dest("10.0.0.0/23", &["101-200"]),
    ];
    assert!(is_covered(&dest("10.0.0.0/23", &["50-150"]), &outer));
    assert!(is_covered(&dest("10.0.0.128/25", &["1-200"]), &outer));
    assert!(!is_covered(&dest("10.0.0.0/22", &["50"]), &outer));
    assert!(!is_covered(&dest("10.0.0.0/23", &["201"]), &outer));
    assert!(!is_covered(&dest("2001:db8::/64", &["50"]), &outer));
    let v6 = [dest("2001:db8::/32", &["22"])];
    assert!(is_covered(&dest("2001:db8::/64", &["22"]), &v6));
    assert!(!is_covered(&dest("2001:db8::/64", &["22-23"]), &v6));
}

#[test]
fn serde_round_trip_uses_strings() {
    let d = dest("2001:db8::/64", &["22", "8000-8099"]);
    let json = serde_json::to_string(&d).expect("serialize");
    assert_eq!(
        json,
        r#"{"prefix":"2001:db8::/64","ports":["22","8000-8099"]}"#
    );
    assert_eq!(
        serde_json::from_str::<Destination>(&json).expect("deserialize"),
        d
    );
    assert!(serde_json::from_str::<Destination>(r#"{"prefix":"x","ports":[]}"#).is_err());
}
