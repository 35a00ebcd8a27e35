//! The etcd store against a real etcd (Debian's `etcd-server`, started by
//! `vmha_store::testkit::EtcdServer`): the conformance suite, plus what only a networked store has
//! (compaction, a member dying, deadlines, fencing tokens).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

use tokio::time::Instant;
use vmha_store::testkit::{EtcdServer, RefusedPort};
use vmha_store::{
    ClusterStore, Compare, EtcdOptions, EtcdStore, Op, StoreError, TxnOutcome, WatchEvent,
    WatchStream, conformance,
};

/// Bound for anything a test waits for, so that a broken store fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(30);

fn start() -> EtcdServer {
    EtcdServer::start().unwrap_or_else(|e| panic!("{e}"))
}

async fn next_event<W: WatchStream>(watch: &mut W) -> WatchEvent {
    tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("watch delivered nothing in time")
        .expect("watch failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_store_passes_the_conformance_suite() {
    let etcd = start();
    let store = etcd.store().await.unwrap();
    conformance::run(&store, "/conformance/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_from_a_compacted_revision_reports_compacted() {
    let etcd = start();
    let store = etcd.store().await.unwrap();
    let first = store.put("/c/k", b"1".to_vec(), None).await.unwrap();
    store.put("/c/k", b"2".to_vec(), None).await.unwrap();
    let last = store.put("/c/k", b"3".to_vec(), None).await.unwrap();

    // A watch that is running when history is compacted away keeps working: it is past it.
    let mut live = store.watch("/c/", last + 1).await.unwrap();

    let mut client = etcd_client::Client::connect(etcd.endpoints(), None)
        .await
        .unwrap();
    client
        .compact(i64::try_from(last).unwrap(), None)
        .await
        .unwrap();

    match store.watch("/c/", first).await {
        Err(StoreError::Compacted {
            requested,
            compact_revision,
        }) => {
            assert_eq!(requested, first);
            assert_eq!(
                compact_revision,
                last - 1,
                "the last revision forgotten (etcd keeps the compaction revision itself)"
            );
        }
        Err(e) => panic!("expected Compacted, got {e}"),
        Ok(_) => panic!("a watch from compacted history must fail"),
    }
    // From the compaction revision on, history is there.
    let mut watch = store.watch("/c/", last).await.unwrap();
    assert!(matches!(next_event(&mut watch).await, WatchEvent::Put(kv) if kv.mod_revision == last));

    let next = store.put("/c/k", b"4".to_vec(), None).await.unwrap();
    assert_eq!(next_event(&mut live).await.revision(), next);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_sees_lease_expiry_as_deletes() {
    let etcd = start();
    let store = etcd.store().await.unwrap();
    let lease = store.grant(Duration::from_secs(1)).await.unwrap();
    assert!(
        lease.ttl >= Duration::from_secs(2),
        "etcd's minimum TTL is 2 s"
    );
    let r1 = store
        .put("/exp/a", b"x".to_vec(), Some(lease.id))
        .await
        .unwrap();
    store
        .put("/exp/b", b"y".to_vec(), Some(lease.id))
        .await
        .unwrap();
    let mut watch = store.watch("/exp/", r1 + 2).await.unwrap();
    let started = Instant::now();
    let first = next_event(&mut watch).await;
    let second = next_event(&mut watch).await;
    let waited = started.elapsed();
    let mut deleted = Vec::new();
    for event in [first, second] {
        match event {
            WatchEvent::Delete { key, revision } => deleted.push((key, revision)),
            WatchEvent::Put(kv) => panic!("unexpected put of {}", kv.key),
        }
    }
    assert_eq!(deleted[0].0, "/exp/a");
    assert_eq!(deleted[1].0, "/exp/b");
    assert_eq!(
        deleted[0].1, deleted[1].1,
        "one revision for the lease's keys"
    );
    assert!(
        waited >= lease.ttl - Duration::from_millis(500),
        "a lease lives at least its TTL (waited {waited:?})"
    );
    assert!(matches!(
        store.keep_alive(lease.id).await,
        Err(StoreError::LeaseExpired { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_revision_fences_writes_of_earlier_terms() {
    let etcd = start();
    let store = etcd.store().await.unwrap();
    let election = "/fence/election/controller";
    let mut terms = Vec::new();
    for round in 0..3 {
        let lease = store.grant(Duration::from_secs(30)).await.unwrap();
        let leader = tokio::time::timeout(
            PATIENCE,
            store.campaign(election, format!("host{round}").into_bytes(), lease.id),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(leader.key, format!("{election}/{}", lease.id));
        let kv = store.get(&leader.key).await.unwrap().unwrap();
        assert_eq!(
            leader.revision, kv.create_revision,
            "the key's create revision"
        );
        assert_eq!(store.leader(election).await.unwrap(), Some(leader.clone()));
        terms.push((leader, lease));
        let (leader, lease) = terms.last().unwrap();
        // The current leader's guarded write commits.
        let guard = Compare::CreateRevision {
            key: leader.key.clone(),
            revision: leader.revision,
        };
        let write = Op::Put {
            key: "/fence/state".into(),
            value: format!("term {round}").into_bytes(),
            lease: None,
        };
        assert!(matches!(
            store.txn(vec![guard], vec![write]).await.unwrap(),
            TxnOutcome::Committed { .. }
        ));
        // End the term: by resigning, then by the lease ending.
        if round % 2 == 0 {
            store.resign(leader).await.unwrap();
        } else {
            store.revoke(lease.id).await.unwrap();
        }
    }
    for pair in terms.windows(2) {
        assert!(
            pair[1].0.revision > pair[0].0.revision,
            "fencing tokens increase"
        );
    }
    // Every earlier term's guarded write is refused.
    for (leader, _) in &terms {
        let guard = Compare::CreateRevision {
            key: leader.key.clone(),
            revision: leader.revision,
        };
        let write = Op::Put {
            key: "/fence/state".into(),
            value: b"stale".to_vec(),
            lease: None,
        };
        assert_eq!(
            store.txn(vec![guard], vec![write]).await.unwrap(),
            TxnOutcome::Failed
        );
    }
    assert_eq!(
        store.get("/fence/state").await.unwrap().unwrap().value,
        b"term 2"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_campaign_blocks_no_later_campaign() {
    let etcd = start();
    let store = etcd.store().await.unwrap();
    let election = "/cancel/election";
    let a = store.grant(Duration::from_secs(30)).await.unwrap();
    let b = store.grant(Duration::from_secs(30)).await.unwrap();
    let first = store.campaign(election, b"a".to_vec(), a.id).await.unwrap();

    // b waits behind a; cancel it while it waits.
    let pending = tokio::time::timeout(
        Duration::from_millis(500),
        store.campaign(election, b"b".to_vec(), b.id),
    )
    .await;
    assert!(pending.is_err(), "b cannot win while a leads");
    assert_eq!(store.leader(election).await.unwrap(), Some(first.clone()));

    // b campaigns again with the same lease: it resumes its place and wins once a resigns.
    let again = tokio::spawn({
        let store = store.clone();
        async move { store.campaign(election, b"b2".to_vec(), b.id).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.resign(&first).await.unwrap();
    let second = tokio::time::timeout(PATIENCE, again)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(second.lease, b.id);
    assert_eq!(second.value, b"b2");
    assert!(second.revision > first.revision);

    // a, cancelled nowhere, campaigns again behind b and wins after b's lease ends.
    let third = tokio::spawn({
        let store = store.clone();
        async move { store.campaign(election, b"a2".to_vec(), a.id).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.revoke(b.id).await.unwrap();
    let third = tokio::time::timeout(PATIENCE, third)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(third.lease, a.id);
    assert!(third.revision > second.revision);
}

/// Every call against an endpoint that cannot answer fails with `Unavailable` within the deadline:
/// nothing listening (connection refused), and a peer that accepts but never speaks (a cut
/// network looks like that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_an_unreachable_endpoint_fail_within_the_deadline() {
    let silent = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let options = EtcdOptions {
        connect_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_millis(800),
    };
    let refused = RefusedPort::new().unwrap();
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", refused.port())).is_err(),
        "the reserved port refuses connections"
    );
    for endpoint in [
        refused.endpoint(),
        format!("http://127.0.0.1:{silent_port}"),
    ] {
        let store = EtcdStore::connect(std::slice::from_ref(&endpoint), options)
            .await
            .unwrap();
        let started = Instant::now();
        let bound = options.request_timeout + Duration::from_millis(500);
        macro_rules! unavailable {
            ($what:literal, $call:expr) => {{
                let call_started = Instant::now();
                let result = tokio::time::timeout(Duration::from_secs(10), $call)
                    .await
                    .unwrap_or_else(|_| panic!("{} against {endpoint} hung", $what));
                let took = call_started.elapsed();
                match result {
                    Err(StoreError::Unavailable(_)) => {}
                    Err(e) => panic!(
                        "{} against {endpoint}: expected Unavailable, got {e}",
                        $what
                    ),
                    Ok(_) => panic!("{} against {endpoint} succeeded", $what),
                }
                assert!(
                    took <= bound,
                    "{} took {took:?} (deadline {:?})",
                    $what,
                    options.request_timeout
                );
            }};
        }
        unavailable!("get", store.get("/k"));
        unavailable!("list", store.list("/"));
        unavailable!("put", store.put("/k", Vec::new(), None));
        unavailable!(
            "txn",
            store.txn(vec![], vec![Op::Delete { key: "/k".into() }])
        );
        unavailable!("grant", store.grant(Duration::from_secs(5)));
        unavailable!("keep_alive", store.keep_alive(vmha_store::LeaseId(1)));
        unavailable!("watch", store.watch("/", 1));
        unavailable!("leader", store.leader("/e"));
        assert!(started.elapsed() < 8 * bound);
    }
    drop(silent);
}

/// A store on a 3-member cluster keeps working when one member dies: keepalives, reads, writes, and
/// watches (re-created when theirs broke). Each member is killed in turn, so that whichever one the
/// streams were on is killed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_survives_losing_one_member() {
    let mut etcd = EtcdServer::start_cluster(3).unwrap_or_else(|e| panic!("{e}"));
    let store = etcd.store().await.unwrap();
    let lease = store.grant(Duration::from_secs(5)).await.unwrap();
    let held = store
        .put("/ha/held", b"x".to_vec(), Some(lease.id))
        .await
        .unwrap();
    let mut watch = store.watch("/ha/", held + 1).await.unwrap();
    let mut next_revision = held + 1;

    // Keeps the lease alive every second throughout; ends only if the lease expired. Reports the
    // longest time between two acknowledged keepalives.
    let keeper = tokio::spawn({
        let store = store.clone();
        async move {
            let mut last_ok = Instant::now();
            let mut longest = Duration::ZERO;
            loop {
                match store.keep_alive(lease.id).await {
                    Ok(_) => {
                        longest = longest.max(last_ok.elapsed());
                        last_ok = Instant::now();
                    }
                    Err(StoreError::LeaseExpired { .. }) => {
                        return format!("lease expired (longest gap so far {longest:?})");
                    }
                    Err(e) => eprintln!("background keep_alive: {e}"),
                }
                if last_ok.elapsed() > 2 * lease.ttl {
                    return format!("no keepalive for {:?}", last_ok.elapsed());
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    });

    for victim in 0..3 {
        etcd.kill(victim).unwrap();
        let value = format!("after killing member {victim}");
        // Writes and reads work again within a few deadlines (a leader election may be under way).
        let deadline = Instant::now() + PATIENCE;
        let written = loop {
            match store
                .put("/ha/state", value.clone().into_bytes(), None)
                .await
            {
                Ok(revision) => break revision,
                Err(StoreError::Unavailable(reason)) if Instant::now() < deadline => {
                    eprintln!("put after killing member {victim}: {reason}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("put after killing member {victim}: {e}"),
            }
        };
        let read = store.get("/ha/state").await.unwrap().unwrap();
        assert_eq!(read.value, value.as_bytes());
        assert!(
            store.get("/ha/held").await.unwrap().is_some(),
            "the lease lives"
        );

        // The watch delivers the write, or reports its broken stream and is re-created.
        let mut recreated = 0;
        loop {
            match tokio::time::timeout(PATIENCE, watch.next()).await.unwrap() {
                Ok(event) => {
                    assert!(event.revision() >= next_revision, "in order, none twice");
                    next_revision = event.revision() + 1;
                    if let WatchEvent::Delete { key, .. } = &event {
                        assert_ne!(key, "/ha/held", "the kept-alive key must not vanish");
                    }
                    if event.revision() == written {
                        break;
                    }
                }
                Err(StoreError::Unavailable(reason)) => {
                    eprintln!("watch after killing member {victim}: {reason}; re-creating");
                    recreated += 1;
                    assert!(recreated < 20, "the watch cannot be re-created");
                    watch = loop {
                        match store.watch("/ha/", next_revision).await {
                            Ok(watch) => break watch,
                            Err(StoreError::Unavailable(_)) => {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                            Err(e) => panic!("re-creating the watch: {e}"),
                        }
                    };
                }
                Err(e) => panic!("watch after killing member {victim}: {e}"),
            }
        }
        // The lease is renewed through the surviving members, for longer than its TTL.
        let down_since = Instant::now();
        while down_since.elapsed() < lease.ttl + Duration::from_secs(1) {
            let ttl = tokio::time::timeout(PATIENCE, async {
                loop {
                    match store.keep_alive(lease.id).await {
                        Ok(ttl) => break ttl,
                        Err(StoreError::Unavailable(reason)) => {
                            eprintln!("keep_alive after killing member {victim}: {reason}");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Err(e) => panic!("keep_alive after killing member {victim}: {e}"),
                    }
                }
            })
            .await
            .expect("keep_alive works again in time");
            assert_eq!(ttl, lease.ttl);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert!(
            store.get("/ha/held").await.unwrap().is_some(),
            "the lease lives"
        );
        etcd.restart(victim).unwrap();
    }
    assert!(!keeper.is_finished(), "keepalive loop: {:?}", keeper.await);
    keeper.abort();
    assert!(store.get("/ha/held").await.unwrap().is_some());
    store.revoke(lease.id).await.unwrap();
}

/// A member that stops answering (frozen: its connections stay open, as with a cut network) turns
/// every call into `Unavailable` within the deadline, and an idle watch into `Unavailable` within
/// about twice the deadline; once it answers again, the same handle works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_stops_answering_is_unavailable_within_the_deadline() {
    let mut etcd = start();
    let options = EtcdOptions {
        connect_timeout: Duration::from_millis(500),
        request_timeout: Duration::from_secs(1),
    };
    let store = EtcdStore::connect(&etcd.endpoints(), options)
        .await
        .unwrap();
    let lease = store.grant(Duration::from_secs(20)).await.unwrap();
    store.keep_alive(lease.id).await.unwrap();
    let rev = store
        .put("/frozen/k", b"1".to_vec(), Some(lease.id))
        .await
        .unwrap();
    let mut watch = store.watch("/frozen/", rev + 1).await.unwrap();

    etcd.freeze(0).unwrap();
    let bound = options.request_timeout + Duration::from_millis(500);
    for what in ["get", "put", "keep_alive", "txn"] {
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            match what {
                "get" => store.get("/frozen/k").await.map(|_| ()),
                "put" => store.put("/frozen/k", Vec::new(), None).await.map(|_| ()),
                "keep_alive" => store.keep_alive(lease.id).await.map(|_| ()),
                _ => store.txn(vec![], vec![]).await.map(|_| ()),
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} hung"));
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{what}: {result:?}"
        );
        assert!(
            started.elapsed() <= bound,
            "{what} took {:?}",
            started.elapsed()
        );
    }
    let started = Instant::now();
    let failed = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("an idle watch on a silent stream must fail, not hang");
    assert!(
        matches!(failed, Err(StoreError::Unavailable(_))),
        "{failed:?}"
    );
    assert!(
        started.elapsed() <= 2 * options.request_timeout + Duration::from_millis(500),
        "the watch noticed after {:?}",
        started.elapsed()
    );
    assert!(watch.next().await.is_err(), "a failed watch stays failed");

    etcd.thaw(0).unwrap();
    let deadline = Instant::now() + PATIENCE;
    let written = loop {
        match store.put("/frozen/k", b"2".to_vec(), Some(lease.id)).await {
            Ok(revision) => break revision,
            Err(StoreError::Unavailable(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put after thawing: {e}"),
        }
    };
    assert_eq!(
        store.keep_alive(lease.id).await.unwrap(),
        lease.ttl,
        "the keepalive stream is recreated"
    );
    let mut watch = store.watch("/frozen/", rev + 1).await.unwrap();
    let mut last = 0;
    while last < written {
        last = next_event(&mut watch).await.revision();
    }
    assert_eq!(last, written);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refuses_bad_arguments() {
    fn send_sync_clone<T: Send + Sync + Clone + 'static>() {}
    send_sync_clone::<EtcdStore>();
    let options = EtcdOptions::default();
    assert_eq!(options.connect_timeout, Duration::from_secs(2));
    assert_eq!(options.request_timeout, Duration::from_secs(2));
    assert!(matches!(
        EtcdStore::connect(&[], options).await,
        Err(StoreError::InvalidArgument(_))
    ));
    assert!(matches!(
        EtcdStore::connect(&["http://exa mple:1".to_owned()], options).await,
        Err(StoreError::InvalidArgument(_))
    ));
    let zero = EtcdOptions {
        request_timeout: Duration::ZERO,
        ..options
    };
    assert!(matches!(
        EtcdStore::connect(&["http://127.0.0.1:1".to_owned()], zero).await,
        Err(StoreError::InvalidArgument(_))
    ));
}

const CHILD_ENV: &str = "VMHA_STORE_TEST_NO_ETCD";

/// Run by `without_etcd_the_tests_fail_naming_the_package` in a child process whose
/// `$VMHA_ETCD_BIN` points nowhere: starts etcd the way every test here does.
#[test]
fn child_starts_etcd() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return; // Not the child.
    }
    drop(start());
}

#[test]
fn without_etcd_the_tests_fail_naming_the_package() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_starts_etcd",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env(vmha_store::testkit::ETCD_BIN_ENV, "/nonexistent/etcd")
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "the test must fail, not skip: {output}"
    );
    assert!(
        output.contains("install the Debian package etcd-server"),
        "{output}"
    );
}

/// Responses larger than gRPC's default 4 MiB message limit (a big listing, a replayed history)
/// are accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_listings_and_replays_work() {
    let etcd = start();
    let store = etcd.store().await.unwrap();
    let value = vec![b'v'; 20 * 1024];
    let mut first = None;
    for batch in 0..6 {
        let ops = (0..50)
            .map(|i| Op::Put {
                key: format!("/big/{batch}/{i:02}"),
                value: value.clone(),
                lease: None,
            })
            .collect();
        let TxnOutcome::Committed { revision } = store.txn(vec![], ops).await.unwrap() else {
            panic!("unconditional transaction failed");
        };
        first.get_or_insert(revision);
    }
    let listing = store.list("/big/").await.unwrap();
    assert_eq!(listing.kvs.len(), 300, "6 MB in one listing");
    let tail = store.list_tail("/big/", 3).await.unwrap();
    assert_eq!(tail.kvs[..], listing.kvs[297..]);
    let mut watch = store.watch("/big/", first.unwrap()).await.unwrap();
    for expected in &listing.kvs {
        match next_event(&mut watch).await {
            WatchEvent::Put(kv) => assert_eq!(&kv, expected),
            WatchEvent::Delete { key, .. } => panic!("unexpected delete of {key}"),
        }
    }
}
