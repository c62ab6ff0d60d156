use super::*;

#[tokio::test]
async fn events_are_json_lines_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("audit.jsonl");
    let log = AuditLog::open(&AuditTarget::File(path.clone()), Counter::default())
        .await
        .expect("open");
    for i in 0..3 {
        let mut event = AuditEvent::new(
            EventKind::SessionClose,
            "198.51.100.2:40000".into(),
            "192.0.2.10:5432".into(),
        );
        event.session_id = Some(i.to_string());
        event.reason = Some("client_closed".into());
        log.record(event);
    }
    log.flush().await;
    let text = std::fs::read_to_string(&path).expect("read");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[2]["session_id"], "2");
    assert_eq!(lines[0]["event"], "session_close");
    assert!(
        lines[0].get("subject").is_none(),
        "unset fields are omitted"
    );
}

#[tokio::test]
async fn unopenable_file_is_a_clear_error() {
    let err = AuditLog::open(
        &AuditTarget::File("/nonexistent-dir/audit.jsonl".into()),
        Counter::default(),
    )
    .await
    .expect_err("must fail");
    assert!(err.to_string().contains("/nonexistent-dir/audit.jsonl"));
}

fn event(kind: EventKind) -> AuditEvent {
    AuditEvent::new(kind, "198.51.100.2:40000".into(), "192.0.2.10:5432".into())
}

#[tokio::test]
async fn a_flood_of_denials_never_drops_a_session_line() {
    // A writer that cannot write until the test reads: the denial
    // queue fills, and session lines still all get through.
    let (sink, mut reader) = tokio::io::duplex(4096);
    let dropped = Counter::default();
    let log = AuditLog::with_sink(Box::new(sink), dropped.clone());
    for i in 0..QUEUE_DEPTH + 500 {
        log.record(event(EventKind::ConnectionDenied));
        if i % 100 == 0 {
            log.record(event(EventKind::SessionOpen));
            log.record(event(EventKind::SessionClose));
        }
    }
    assert!(dropped.get() >= 400, "denials dropped: {}", dropped.get());
    let reading = tokio::spawn(async move {
        let mut text = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut text)
            .await
            .expect("read");
        text
    });
    log.flush().await;
    drop(log);
    let text = reading.await.expect("reader");
    let text = String::from_utf8(text).expect("utf-8");
    let count = |kind: &str| text.lines().filter(|l| l.contains(kind)).count();
    let sessions = (QUEUE_DEPTH + 500).div_ceil(100);
    assert_eq!(count("\"session_open\""), sessions);
    assert_eq!(count("\"session_close\""), sessions);
    assert_eq!(
        count("\"connection_denied\"") as u64 + dropped.get(),
        (QUEUE_DEPTH + 500) as u64
    );
}

#[tokio::test]
async fn fields_a_peer_chooses_are_cut() {
    let (sink, mut reader) = tokio::io::duplex(1 << 20);
    let log = AuditLog::with_sink(Box::new(sink), Counter::default());
    let kid = "k".repeat(16 * 1024);
    let mut denied = event(EventKind::ConnectionDenied);
    denied.detail = Some(format!("unknown_kid: no key with kid {kid:?}"));
    denied.subject = Some("s".repeat(5000));
    let mut claims = std::collections::BTreeMap::new();
    claims.insert("ref".into(), serde_json::json!("r".repeat(5000)));
    claims.insert("groups".into(), serde_json::json!(vec!["g"; 3000]));
    claims.insert("job_id".into(), serde_json::json!(42));
    denied.claims = AuditClaims::new(claims);
    log.record(denied);
    log.flush().await;
    drop(log);
    let mut text = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut reader, &mut text)
        .await
        .expect("read");
    assert!(text.len() < 2 * 1024, "line of {} bytes", text.len());
    let line: serde_json::Value = serde_json::from_str(text.trim()).expect("json");
    let detail = line["detail"].as_str().expect("detail");
    assert!(
        detail.starts_with("unknown_kid: no key with kid"),
        "{detail}"
    );
    assert!(detail.ends_with("bytes]"), "says it was cut: {detail}");
    assert!(line["subject"].as_str().expect("subject").len() <= MAX_FIELD + 20);
    assert!(
        line["claims"]["groups"]
            .as_str()
            .is_some_and(|g| g.len() <= MAX_FIELD + 20)
    );
    assert_eq!(
        line["claims"]["job_id"], 42,
        "small values stay as they are"
    );
}

/// A sink that counts the writes it is given.
struct CountingSink {
    bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncWrite for CountingSink {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.writes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.bytes.lock().expect("lock").extend_from_slice(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn lines_queued_together_are_written_together_and_whole() {
    let bytes = std::sync::Arc::default();
    let writes = std::sync::Arc::default();
    let sink = CountingSink {
        bytes: std::sync::Arc::clone(&bytes),
        writes: std::sync::Arc::clone(&writes),
    };
    let log = AuditLog::with_sink(Box::new(sink), Counter::default());
    // On this single-threaded runtime the writer runs only once the test
    // awaits: all 200 lines are queued when it wakes.
    for _ in 0..100 {
        log.record(event(EventKind::SessionOpen));
        log.record(event(EventKind::SessionClose));
    }
    log.flush().await;
    let text = String::from_utf8(bytes.lock().expect("lock").clone()).expect("utf-8");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 200);
    for line in &lines {
        serde_json::from_str::<serde_json::Value>(line).expect("each line is whole JSON");
    }
    let writes = writes.load(std::sync::atomic::Ordering::Relaxed);
    // 200 lines of ~200 bytes fit one 64 KiB batch (a write may finish early).
    assert!(writes <= 2, "{writes} writes for 200 queued lines");
}

#[test]
fn claims_are_shared_and_cut_only_in_the_line() {
    let mut claims = std::collections::BTreeMap::new();
    claims.insert("ref".to_owned(), serde_json::json!("r".repeat(5000)));
    claims.insert("job_id".to_owned(), serde_json::json!(42));
    claims.insert("project".to_owned(), serde_json::json!("a \"quoted\" name"));
    let shared = AuditClaims::new(claims);
    let mut open = event(EventKind::SessionOpen);
    open.claims = shared.clone();
    super::bound::bound(&mut open);
    assert!(
        open.claims.ptr_eq(&shared),
        "a line never copies the claims"
    );

    let line: serde_json::Value =
        serde_json::from_slice(&serde_json::to_vec(&open).expect("line")).expect("json");
    let cut = line["claims"]["ref"].as_str().expect("ref");
    assert!(cut.len() < 400 && cut.ends_with("...[5000 bytes]"), "{cut}");
    assert_eq!(line["claims"]["job_id"], 42);
    assert_eq!(line["claims"]["project"], "a \"quoted\" name");
    assert_eq!(
        shared["ref"].as_str().map(str::len),
        Some(5000),
        "the grant's own claims are whole"
    );
    let whole: serde_json::Value =
        serde_json::from_slice(&serde_json::to_vec(&shared).expect("claims")).expect("json");
    assert_eq!(
        whole["ref"].as_str().map(str::len),
        Some(5000),
        "and the grant API shows them whole"
    );

    let none = event(EventKind::SessionOpen);
    let line = serde_json::to_string(&none).expect("line");
    assert!(!line.contains("claims"), "no claims, no field: {line}");
}
