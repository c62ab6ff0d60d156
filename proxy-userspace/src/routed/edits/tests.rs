//! The sweep and end programs against a real `FLOWS` (need root: they
//! load eBPF).

use aya::maps::HashMap;
use aya::programs::SchedClassifier;
use proxy_common::routed::{
    FLOW_ENDED, FLOW_EXPIRED, FLOW_OPEN, FLOW_REMOVED, FLOW_SEEN_DOWN, FlowKey, FlowValue,
    SWEEP_BATCH, SweepEntry,
};
use proxy_common::{map_names, program_names};

use super::FlowEdits;

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

/// The object loaded, with both programs verified.
fn loaded() -> (FlowEdits, aya::Ebpf) {
    let object = crate::bpf::embedded_object().expect("the build embedded the eBPF object");
    let mut ebpf = aya::Ebpf::load(object).expect("the object loads");
    for name in [program_names::ROUTED_SWEEP, program_names::ROUTED_END] {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .expect("the object has the program")
            .try_into()
            .expect("a tc program");
        program.load().expect("the verifier accepts it");
    }
    let edits = FlowEdits::of(
        tc(&ebpf, program_names::ROUTED_SWEEP),
        tc(&ebpf, program_names::ROUTED_END),
    )
    .expect("their descriptors");
    (edits, ebpf)
}

fn tc<'a>(ebpf: &'a aya::Ebpf, name: &str) -> &'a SchedClassifier {
    ebpf.program(name)
        .expect("the object has the program")
        .try_into()
        .expect("a tc program")
}

fn flows(ebpf: &mut aya::Ebpf) -> HashMap<&mut aya::maps::MapData, FlowKey, FlowValue> {
    HashMap::try_from(ebpf.map_mut(map_names::FLOWS).expect("FLOWS")).expect("typed")
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
    let (edits, mut ebpf) = loaded();
    let mut flows = flows(&mut ebpf);

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

    let removed = edits.remove(&entries).expect("the sweep runs");

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

#[test]
fn an_unanswered_flow_is_removed_only_while_its_target_has_not_answered() {
    if !privileged() {
        return;
    }
    let (edits, mut ebpf) = loaded();
    let mut flows = flows(&mut ebpf);
    // Port 1: still unanswered. Port 2: the target answered a retransmitted
    // SYN since the agent's last look.
    let answered = FlowValue {
        flags: FLOW_SEEN_DOWN,
        ..flow(20)
    };
    flows.insert(key(1), flow(10), 0).expect("insert");
    flows.insert(key(2), answered, 0).expect("insert");
    let entries = [
        SweepEntry::new(key(1), 10).if_unanswered(),
        SweepEntry::new(key(2), 20).if_unanswered(),
    ];

    assert_eq!(edits.remove(&entries).expect("the sweep runs"), 1);

    assert!(flows.get(&key(1), 0).is_err(), "the unanswered flow went");
    assert_eq!(
        flows.get(&key(2), 0).expect("kept"),
        answered,
        "the answered flow stays, untouched"
    );
    // Without the condition, as at a stop: removed.
    assert_eq!(
        edits.remove(&[SweepEntry::new(key(2), 20)]).expect("runs"),
        1
    );
    assert!(flows.get(&key(2), 0).is_err());
}

#[test]
fn a_flow_is_ended_in_place_only_while_its_entry_is_that_flow() {
    if !privileged() {
        return;
    }
    let (edits, mut ebpf) = loaded();
    let mut flows = flows(&mut ebpf);
    let open = |opened, bytes_up| FlowValue {
        state: FLOW_OPEN,
        bytes_up,
        next_seq_up: 7,
        ..flow(opened)
    };
    // Port 1: the open flow to end. Port 2: a new SYN replaced it. Port
    // 3: the kernel ended it at its deadline already. Port 4: gone.
    flows.insert(key(1), open(10, 100), 0).expect("insert");
    flows.insert(key(2), open(25, 5), 0).expect("insert");
    let expired = FlowValue {
        state: FLOW_EXPIRED,
        ..open(30, 9)
    };
    flows.insert(key(3), expired, 0).expect("insert");

    let ended = edits.end(key(1), 10).expect("the end program runs");
    let want = FlowValue {
        state: FLOW_ENDED,
        ..open(10, 100)
    };
    assert_eq!(ended, Some(want), "returned as it ended, counters and all");
    assert_eq!(flows.get(&key(1), 0).expect("kept"), want, "ended in FLOWS");

    assert_eq!(edits.end(key(2), 20).expect("runs"), None, "another flow");
    assert_eq!(
        flows.get(&key(2), 0).expect("kept"),
        open(25, 5),
        "left open"
    );

    assert_eq!(
        edits.end(key(3), 30).expect("runs"),
        Some(expired),
        "its end kept"
    );
    assert_eq!(flows.get(&key(3), 0).expect("kept"), expired);

    assert_eq!(edits.end(key(4), 40).expect("runs"), None, "no entry");
}
