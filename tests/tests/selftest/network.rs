//! Namespaces, the topology and the servers: traffic flows, and everything
//! is removed again, also when a test panics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use tcpgate_tests::topology::{
    RUNNER_V4, RUNNER_V6, TARGET_PRIVATE_V4, TARGET_PRIVATE_V6, TARGET_V4, TARGET_V4_EXTRA,
    TARGET_V6,
};
use tcpgate_tests::{
    ChildGuard, Netns, Payload, Signal, Topology, accept_loop, dial, read_to_end_hashed,
    require_root, serve_once, write_payload,
};

use crate::{netns_names, not_running, ns_inode};

const MIB: u64 = 1024 * 1024;

/// Runner → target upload and target → runner download of 1 MiB each, over
/// the bastion's plain kernel forwarding; the server sees the runner's own
/// address (no NAT).
fn transfer_both_ways(topo: &Topology, target: IpAddr, runner: IpAddr) {
    let upload = Payload::new(u64::from(target.is_ipv6()), MIB);
    let server = serve_once(
        &topo.target,
        SocketAddr::new(target, 0),
        |mut stream, peer| {
            (
                peer.ip(),
                read_to_end_hashed(&mut stream).expect("server reads upload"),
            )
        },
    )
    .expect("upload server");
    let mut client = dial(&topo.runner, server.local_addr()).expect("dial upload server");
    let sent = write_payload(&mut client, &upload).expect("client writes");
    client.shutdown(Shutdown::Write).expect("client shutdown");
    let (peer, received) = server.join().expect("upload server result");
    assert_eq!(peer, runner, "server sees the runner's address");
    assert_eq!(received, (MIB, sent));
    assert_eq!(sent, upload.digest());

    let download = Payload::new(7, MIB);
    let server = serve_once(
        &topo.target,
        SocketAddr::new(target, 0),
        move |mut stream, _| {
            let digest = write_payload(&mut stream, &download).expect("server writes");
            stream.shutdown(Shutdown::Write).expect("server shutdown");
            digest
        },
    )
    .expect("download server");
    let mut client = dial(&topo.runner, server.local_addr()).expect("dial download server");
    let received = read_to_end_hashed(&mut client).expect("client reads");
    let sent = server.join().expect("download server result");
    assert_eq!(received, (MIB, sent));
    assert_eq!(sent, download.digest());
}

#[test]
fn topology_forwards_ipv4_both_ways() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    transfer_both_ways(&topo, TARGET_V4.into(), RUNNER_V4.into());
}

#[test]
fn topology_forwards_ipv6_both_ways() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    transfer_both_ways(&topo, TARGET_V6.into(), RUNNER_V6.into());
}

#[test]
fn topology_reaches_extra_and_private_target_addresses() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let targets: [IpAddr; 4] = [
        TARGET_V4_EXTRA[0].into(),
        TARGET_V4_EXTRA[1].into(),
        TARGET_PRIVATE_V4.into(),
        TARGET_PRIVATE_V6.into(),
    ];
    for target in targets {
        let server = serve_once(&topo.target, SocketAddr::new(target, 0), |stream, _| {
            // Echo one line back, with the address the client dialled.
            let local = stream.local_addr().expect("local addr");
            let mut line = String::new();
            BufReader::new(&stream)
                .read_line(&mut line)
                .expect("read line");
            (&stream)
                .write_all(format!("{} {line}", local.ip()).as_bytes())
                .expect("echo");
        })
        .expect("server");
        let mut client = dial(&topo.runner, server.local_addr()).expect("dial");
        client.write_all(b"hello\n").expect("write");
        let mut reply = String::new();
        BufReader::new(&mut client)
            .read_line(&mut reply)
            .expect("reply");
        assert_eq!(reply, format!("{target} hello\n"));
        server.join().expect("server result");
    }
}

#[test]
fn run_and_spawn_thread_enter_the_namespace() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("sel").expect("netns");
    let expected = ns_inode(ns.path());
    assert_ne!(expected, ns_inode("/proc/self/ns/net"));
    let inside = ns.run(|| ns_inode("/proc/thread-self/ns/net"));
    assert_eq!(inside, expected);
    let thread = ns
        .spawn_thread(|| ns_inode("/proc/thread-self/ns/net"))
        .expect("spawn");
    assert_eq!(thread.join(), expected);
    // The calling thread itself never moved.
    assert_ne!(ns_inode("/proc/thread-self/ns/net"), expected);

    let panicked = std::panic::catch_unwind(|| ns.run(|| panic!("boom in netns")));
    assert!(panicked.is_err(), "a panic inside run reaches the caller");

    let links = ns.exec_ok(&["ip", "-o", "link", "show"]).expect("exec_ok");
    assert!(
        links.contains("lo:") && links.contains("UP"),
        "lo is up: {links}"
    );
    let err = ns
        .exec_ok(&["ip", "link", "set", "nosuchdev", "up"])
        .expect_err("no such device");
    let text = err.to_string();
    assert!(
        text.contains("nosuchdev") && text.contains(ns.name()),
        "{text}"
    );
}

#[test]
fn accept_loop_serves_several_connections_over_v4_and_v6() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("acc").expect("netns");
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let bind: SocketAddr = bind.parse().expect("addr");
        let server = accept_loop(&ns, bind, 3, |mut stream, _peer| {
            read_to_end_hashed(&mut stream).expect("handler reads")
        })
        .expect("accept loop");
        let mut expected = Vec::new();
        for seed in 0..3u64 {
            let payload = Payload::new(seed, 1000 + seed);
            let mut client = dial(&ns, server.local_addr()).expect("dial");
            write_payload(&mut client, &payload).expect("write");
            client.shutdown(Shutdown::Write).expect("shutdown");
            // Wait for the handler's EOF so connections finish in order.
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).expect("read eof");
            expected.push((payload.len, payload.digest()));
        }
        // Results come back in accept order.
        assert_eq!(server.stop().expect("stop"), expected, "bind {bind}");
    }
    // The host has no listener there: the sockets were made in the netns.
    let err = dial(&ns, "127.0.0.1:1".parse().expect("addr")).expect_err("nothing listens");
    assert!(err.to_string().contains(ns.name()), "{err}");
}

#[test]
fn dropping_a_topology_removes_its_namespaces() {
    if !require_root() {
        return;
    }
    let topo = Topology::new().expect("topology");
    let names = [&topo.runner, &topo.bastion, &topo.target].map(|ns| ns.name().to_owned());
    let listed = netns_names();
    for name in &names {
        assert!(
            listed.contains(name),
            "{name} exists while the topology lives"
        );
    }
    drop(topo);
    let listed = netns_names();
    for name in &names {
        assert!(!listed.contains(name), "{name} is gone after drop");
    }
}

#[test]
fn dropping_a_netns_kills_processes_left_inside() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("kill").expect("netns");
    let name = ns.name().to_owned();
    // A direct child, and an orphan it leaves behind in the namespace.
    let mut command = ns.command("sh");
    command
        .args(["-c", "sleep 600 & echo $!; exec sleep 600"])
        .stdout(std::process::Stdio::piped());
    let mut child = ChildGuard::new(command.spawn().expect("spawn sh"), "sleeper");
    let stdout = child.child_mut().stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("orphan pid");
    let orphan: u32 = line.trim().parse().expect("pid number");
    assert!(!not_running(orphan), "orphan runs before drop");
    assert_eq!(ns.pids().expect("pids").len(), 2, "two processes inside");

    drop(ns);
    let status = child.wait_timeout(Duration::from_secs(10)).expect("wait");
    let status = status.expect("the direct child was killed by the netns drop");
    assert!(!status.success());
    assert!(not_running(orphan), "orphan {orphan} was killed");
    assert!(!netns_names().contains(&name));
}

#[test]
fn guards_clean_up_when_a_test_panics() {
    if !require_root() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let result = std::thread::spawn(move || {
        let topo = Topology::new().expect("topology");
        let names = [&topo.runner, &topo.bastion, &topo.target].map(|ns| ns.name().to_owned());
        // Left running, with no guard of its own: only the netns guard can stop it.
        let child = topo
            .target
            .command("sleep")
            .arg("600")
            .spawn()
            .expect("spawn");
        tx.send((names, child)).expect("send");
        panic!("test failed midway");
    })
    .join();
    assert!(result.is_err(), "the thread panicked");
    let (names, child) = rx.recv().expect("names");
    let listed = netns_names();
    for name in &names {
        assert!(!listed.contains(name), "{name} removed during unwinding");
    }
    let mut child = ChildGuard::new(child, "sleep in target");
    let status = child.wait_timeout(Duration::from_secs(10)).expect("wait");
    let status = status.expect("the process in the namespace was killed");
    assert_eq!(status.signal(), Some(Signal::SIGKILL as i32));
}
