//! The sweep program against a real `FLOWS` (needs root: it loads eBPF).

use aya::maps::HashMap;
use aya::programs::SchedClassifier;
use proxy_common::routed::{FLOW_REMOVED, FlowKey, FlowValue, SWEEP_BATCH, SweepEntry};
use proxy_common::{map_names, program_names};

use super::Sweeper;

/// Whether to run: as root always; otherwise skipped, unless CI requires
/// the privileged tests (`TCPGATE_PRIVILEGED_TESTS=required`).
fn privileged() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert_ne!(
        std::env::var("TCPGATE_PRIVILEGED_TESTS").as_deref(),
        Ok("required"),
        "this test loads eBPF and needs root"
    );
    false
}

fn key(port: u16) -> FlowKey {
    FlowKey {
        runner_addr: [192, 0, 2, 1],
        target_addr: [198, 51, 100, 7],
        runner_port: port,
        target_port: 9000,
    }
}

fn flow(opened_mono_ns: u64) -> FlowValue {
    FlowValue {
        opened_mono_ns,
        ..FlowValue::default()
    }
}

#[test]
fn a_flow_is_removed_only_while_its_entry_is_that_flow() {
    if !privileged() {
        return;
    }
    let object = crate::bpf::embedded_object().expect("the build embedded the eBPF object");
    let mut ebpf = aya::Ebpf::load(object).expect("the object loads");
    let program: &mut SchedClassifier = ebpf
        .program_mut(program_names::ROUTED_SWEEP)
        .expect("the object has the sweep")
        .try_into()
        .expect("a tc program");
    program.load().expect("the verifier accepts the sweep");
    let sweeper = Sweeper::of(program).expect("its descriptor");
    let mut flows: HashMap<_, FlowKey, FlowValue> =
        HashMap::try_from(ebpf.map_mut(map_names::FLOWS).expect("FLOWS")).expect("typed");

    // Port 1: the flow the agent saw finish. Port 2: a new SYN replaced
    // it (a later SYN time). Port 3: gone already. Port 4: a SYN on
    // another CPU is taking it over (marked removed). Ports 100..: more
    // than one run's worth, all the flows the agent saw.
    flows.insert(key(1), flow(10), 0).expect("insert");
    flows.insert(key(2), flow(25), 0).expect("insert");
    flows.insert(key(4), flow(FLOW_REMOVED), 0).expect("insert");
    let many = u16::try_from(2 * SWEEP_BATCH + 3).expect("fits");
    for port in 100..100 + many {
        flows
            .insert(key(port), flow(u64::from(port)), 0)
            .expect("insert");
    }
    let mut entries = vec![
        SweepEntry::new(key(1), 10),
        SweepEntry::new(key(2), 20),
        SweepEntry::new(key(3), 30),
        SweepEntry::new(key(4), 40),
    ];
    entries.extend((100..100 + many).map(|port| SweepEntry::new(key(port), u64::from(port))));

    let removed = sweeper.remove(&entries).expect("the sweep runs");

    assert_eq!(
        removed,
        1 + usize::from(many),
        "removed: the seen flows only"
    );
    let mut left: Vec<(FlowKey, FlowValue)> = flows.iter().map(|e| e.expect("entry")).collect();
    left.sort_by_key(|(key, _)| key.runner_port);
    assert_eq!(
        left,
        vec![(key(2), flow(25)), (key(4), flow(FLOW_REMOVED))],
        "the new flow keeps its entry; the one taken over is left to its taker"
    );
}
