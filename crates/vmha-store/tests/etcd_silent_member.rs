//! The etcd store on a 3-member cluster with one member *silent*: frozen with SIGSTOP, its
//! connections stay open and nothing answers, exactly as when its host's link is down (packets
//! dropped, no RST, no refusal). Each member is made silent in turn, the etcd leader included;
//! the stores under test prefer the silent member (it is their first endpoint and answered last),
//! which is the worst case. Latencies are printed (`--nocapture`); the assertions are functional.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use tokio::time::Instant;
use vmha_store::testkit::{EtcdServer, RefusedPort};
use vmha_store::{
    CasOutcome, ClusterStore, Compare, EtcdOptions, EtcdStore, Expect, Mutation, Op, StoreError,
    TxnOutcome, WatchEvent, WatchStream,
};

/// Bound for anything a test waits for, so that a broken store fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(30);

/// How many consecutive successes each operation must reach.
const RUN: usize = 20;

/// When the silent member is the etcd leader, the others need an election (here
/// `--election-timeout 1000`: 1–2 s, plus a round of pre-vote) before anything can be committed
/// or renewed; calls may fail until then, but not longer than this after the freeze.
const ELECTION_ALLOWANCE: Duration = Duration::from_secs(6);

/// Pause between two calls of one operation.
const PACE: Duration = Duration::from_millis(100);

/// Observed latencies of one operation.
struct Samples {
    name: &'static str,
    ok: Vec<Duration>,
    /// Failures, with when they happened after the freeze.
    failures: Vec<(Duration, String)>,
    /// When the first success came, after the freeze.
    first_ok: Option<Duration>,
}

impl Samples {
    fn new(name: &'static str) -> Samples {
        Samples {
            name,
            ok: Vec::new(),
            failures: Vec::new(),
            first_ok: None,
        }
    }

    fn line(&self) -> String {
        let mut sorted = self.ok.clone();
        sorted.sort();
        let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
        let max = sorted.last().copied().unwrap_or_default();
        format!(
            "{:<22} ok {:>2}  max {:>5} ms  median {:>4} ms  first ok after freeze {:>5} ms  \
             failures {}",
            self.name,
            self.ok.len(),
            max.as_millis(),
            median.as_millis(),
            self.first_ok.map_or(0, |d| d.as_millis()),
            self.failures.len()
        )
    }

    /// Every call succeeded — or, with the leader silent, calls failed only with `Unavailable`
    /// before the first success and within the election allowance.
    fn check(&self, victim_was_leader: bool) {
        assert!(self.ok.len() >= RUN, "{}: {:?}", self.name, self.failures);
        if !victim_was_leader {
            assert!(
                self.failures.is_empty(),
                "{}: failed with a follower silent: {:?}",
                self.name,
                self.failures
            );
            return;
        }
        let first_ok = self.first_ok.unwrap();
        assert!(
            first_ok <= ELECTION_ALLOWANCE,
            "{}: first success only {first_ok:?} after the leader went silent",
            self.name
        );
        for (at, failure) in &self.failures {
            assert!(
                *at <= first_ok,
                "{}: failed after it had worked again ({at:?}): {failure}",
                self.name
            );
        }
    }
}

/// Calls `op` every [`PACE`] until [`RUN`] consecutive successes (or gives up after 3 × RUN
/// calls), recording each call's latency.
async fn measure<F, Fut>(name: &'static str, frozen_at: Instant, mut op: F) -> Samples
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<(), StoreError>>,
{
    let mut samples = Samples::new(name);
    let mut streak = 0;
    for call in 0..3 * RUN {
        let started = Instant::now();
        let result = tokio::time::timeout(PATIENCE, op(call))
            .await
            .unwrap_or_else(|_| panic!("{name} hung"));
        let took = started.elapsed();
        match result {
            Ok(()) => {
                samples.ok.push(took);
                samples.first_ok.get_or_insert(frozen_at.elapsed());
                streak += 1;
                if streak == RUN {
                    break;
                }
            }
            Err(StoreError::Unavailable(reason)) => {
                samples
                    .failures
                    .push((frozen_at.elapsed(), format!("after {took:?}: {reason}")));
                streak = 0;
            }
            Err(e) => panic!("{name}: {e}"),
        }
        tokio::time::sleep(PACE).await;
    }
    samples
}

/// The index of the member that currently leads the etcd cluster.
async fn leader_index(etcd: &EtcdServer) -> usize {
    let deadline = Instant::now() + PATIENCE;
    loop {
        for i in 0..etcd.size() {
            let endpoint = etcd.endpoint(i).unwrap();
            let status = tokio::time::timeout(Duration::from_secs(2), async {
                let mut client = etcd_client::Client::connect([endpoint], None).await?;
                client.status().await
            })
            .await;
            if let Ok(Ok(status)) = status {
                let me = status.header().map(|h| h.member_id());
                if status.leader() != 0 && me == Some(status.leader()) {
                    return i;
                }
            }
        }
        assert!(Instant::now() < deadline, "the cluster has no leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until member `i` serves linearizable reads again (after a thaw).
async fn wait_serving(etcd: &EtcdServer, i: usize) {
    let only = EtcdStore::connect(&[etcd.endpoint(i).unwrap()], EtcdOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + PATIENCE;
    while only.get("/probe").await.is_err() {
        assert!(Instant::now() < deadline, "member {i} does not serve again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The endpoints with member `first` first (the store's first preferred member) or last.
fn endpoints_with(etcd: &EtcdServer, member: usize, first: bool) -> Vec<String> {
    let mut endpoints = etcd.endpoints();
    endpoints.rotate_left(member);
    if !first {
        endpoints.rotate_left(1);
    }
    endpoints
}

/// A store whose preferred member is `victim`: it answered its last call.
async fn preferring(etcd: &EtcdServer, victim: usize) -> EtcdStore {
    let store = EtcdStore::connect(&endpoints_with(etcd, victim, true), EtcdOptions::default())
        .await
        .unwrap();
    store.get("/warm-up").await.unwrap();
    assert_eq!(store.preferred_endpoint(), etcd.endpoint(victim).unwrap());
    store
}

async fn next_event<W: WatchStream>(watch: &mut W) -> Result<WatchEvent, StoreError> {
    tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("the watch neither delivered nor failed")
}

/// One round: member `victim` goes silent while every operation is measured on stores that
/// preferred it.
async fn silent_member_round(etcd: &mut EtcdServer, victim: usize) {
    let leader = leader_index(etcd).await;
    let victim_was_leader = victim == leader;
    let base = format!("/silent/{victim}/");
    // The helper store prefers a healthy member: it sets up and drives the scenario.
    let helper = EtcdStore::connect(&endpoints_with(etcd, victim, false), EtcdOptions::default())
        .await
        .unwrap();

    // Keepalive: the stream is open on the victim.
    let keep_store = preferring(etcd, victim).await;
    let lease = keep_store.grant(Duration::from_secs(5)).await.unwrap();
    keep_store.keep_alive(lease.id).await.unwrap();
    let held = helper
        .put(&format!("{base}held"), b"x".to_vec(), Some(lease.id))
        .await
        .unwrap();
    let get_store = preferring(etcd, victim).await;
    let put_store = preferring(etcd, victim).await;
    let txn_store = preferring(etcd, victim).await;
    let list_store = preferring(etcd, victim).await;

    // A watch open on the victim.
    let watch_store = preferring(etcd, victim).await;
    let watch_prefix = format!("{base}w/");
    let mut watch = watch_store.watch(&watch_prefix, held + 1).await.unwrap();

    // An election led through the helper, with a candidate waiting on a store that prefers the
    // victim (its watch for the leader's key is on the victim).
    let election = format!("{base}election");
    let leading_lease = helper.grant(Duration::from_secs(30)).await.unwrap();
    let leading = helper
        .campaign(&election, b"first".to_vec(), leading_lease.id)
        .await
        .unwrap();
    let waiting_store = preferring(etcd, victim).await;
    let waiting_lease = helper.grant(Duration::from_secs(30)).await.unwrap();
    let waiting = tokio::spawn({
        let store = waiting_store.clone();
        let election = election.clone();
        async move {
            let result = store
                .campaign(&election, b"second".to_vec(), waiting_lease.id)
                .await;
            (Instant::now(), result)
        }
    });
    let lone_store = preferring(etcd, victim).await;
    let lone_lease = helper.grant(Duration::from_secs(30)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "the second candidate waits");

    etcd.freeze(victim).unwrap();
    let frozen_at = Instant::now();

    let keep_alive = tokio::spawn(measure("keep_alive", frozen_at, move |_| {
        let store = keep_store.clone();
        async move {
            let ttl = store.keep_alive(lease.id).await?;
            assert_eq!(ttl, lease.ttl);
            Ok(())
        }
    }));
    let get = tokio::spawn(measure("get", frozen_at, {
        let key = format!("{base}held");
        move |_| {
            let store = get_store.clone();
            let key = key.clone();
            async move {
                let kv = store.get(&key).await?;
                assert!(kv.is_some(), "the kept-alive key is there");
                Ok(())
            }
        }
    }));
    let put = tokio::spawn(measure("put", frozen_at, {
        let key = format!("{base}put");
        move |call| {
            let store = put_store.clone();
            let key = key.clone();
            async move {
                store.put(&key, call.to_string().into_bytes(), None).await?;
                Ok(())
            }
        }
    }));
    let txn = tokio::spawn(measure("txn (no compares)", frozen_at, {
        let base = base.clone();
        move |call| {
            let store = txn_store.clone();
            let ops = vec![
                Op::Put {
                    key: format!("{base}txn/a"),
                    value: call.to_string().into_bytes(),
                    lease: None,
                },
                Op::Put {
                    key: format!("{base}txn/b"),
                    value: call.to_string().into_bytes(),
                    lease: Some(lease.id),
                },
            ];
            async move {
                let outcome = store.txn(Vec::new(), ops).await?;
                assert!(matches!(outcome, TxnOutcome::Committed { .. }));
                Ok(())
            }
        }
    }));
    let list = tokio::spawn(measure("list", frozen_at, {
        let base = base.clone();
        move |_| {
            let store = list_store.clone();
            let base = base.clone();
            async move {
                let listing = store.list(&base).await?;
                assert!(!listing.kvs.is_empty());
                Ok(())
            }
        }
    }));

    // The lone campaign, on a store that preferred the victim.
    let lone_started = Instant::now();
    // During the election a campaign may fail like any write; a repeated campaign with the same
    // lease resumes the same candidacy.
    let lone = loop {
        let attempt = tokio::time::timeout(
            PATIENCE,
            lone_store.campaign(&format!("{base}lone"), b"lone".to_vec(), lone_lease.id),
        )
        .await
        .expect("the lone campaign hung");
        match attempt {
            Err(StoreError::Unavailable(reason))
                if victim_was_leader && frozen_at.elapsed() < ELECTION_ALLOWANCE =>
            {
                eprintln!("lone campaign during the election: {reason}");
                tokio::time::sleep(PACE).await;
            }
            other => break other,
        }
    };
    let lone_took = lone_started.elapsed();

    // The watch created before the freeze delivers writes made after it (re-created by the store
    // on a healthy member, or, failing that, reporting an error after which a new one works).
    let mut watch_samples = Samples::new("watch delivery");
    let mut watch_errors = Vec::new();
    let mut next_revision = held + 1;
    for j in 0..5 {
        let key = format!("{watch_prefix}{j}");
        let written = loop {
            match helper.put(&key, b"w".to_vec(), None).await {
                Ok(revision) => break revision,
                Err(StoreError::Unavailable(reason))
                    if victim_was_leader && frozen_at.elapsed() < ELECTION_ALLOWANCE =>
                {
                    eprintln!("helper put during the election: {reason}");
                    tokio::time::sleep(PACE).await;
                }
                Err(e) => panic!("helper put: {e}"),
            }
        };
        let put_done = Instant::now();
        loop {
            match next_event(&mut watch).await {
                Ok(event) => {
                    assert!(event.revision() >= next_revision, "in order, none twice");
                    next_revision = event.revision() + 1;
                    if event.revision() == written {
                        assert_eq!(event.key(), key);
                        watch_samples.ok.push(put_done.elapsed());
                        watch_samples.first_ok.get_or_insert(frozen_at.elapsed());
                        break;
                    }
                }
                Err(StoreError::Unavailable(reason)) => {
                    watch_errors.push(reason);
                    assert!(watch_errors.len() < 5, "watch: {watch_errors:?}");
                    watch = watch_store
                        .watch(&watch_prefix, next_revision)
                        .await
                        .expect("a new watch works");
                }
                Err(e) => panic!("watch: {e}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The waiting candidate wins once the first one resigns.
    let resigned_at = loop {
        match helper.resign(&leading).await {
            Ok(()) => break Instant::now(),
            Err(StoreError::Unavailable(reason))
                if victim_was_leader && frozen_at.elapsed() < ELECTION_ALLOWANCE =>
            {
                eprintln!("resign during the election: {reason}");
                tokio::time::sleep(PACE).await;
            }
            Err(e) => panic!("resign: {e}"),
        }
    };
    let (won_at, won) = tokio::time::timeout(PATIENCE, waiting)
        .await
        .expect("the waiting campaign did not complete")
        .unwrap();
    let won = won.expect("the waiting candidate wins");
    assert_eq!(won.lease, waiting_lease.id);
    assert!(won.revision > leading.revision);

    let samples = [
        keep_alive.await.unwrap(),
        get.await.unwrap(),
        put.await.unwrap(),
        txn.await.unwrap(),
        list.await.unwrap(),
    ];
    let role = if victim_was_leader {
        "the etcd leader"
    } else {
        "a follower"
    };
    println!("member {victim} ({role}) silent:");
    for s in &samples {
        println!("  {}", s.line());
        for (at, failure) in &s.failures {
            println!(
                "    failure {} ms after the freeze: {failure}",
                at.as_millis()
            );
        }
    }
    println!("  {}", watch_samples.line());
    println!(
        "  watch errors seen by the caller: {} {watch_errors:?}",
        watch_errors.len()
    );
    println!(
        "  lone campaign: {} ms; waiting campaign won {} ms after the resign",
        lone_took.as_millis(),
        won_at.saturating_duration_since(resigned_at).as_millis()
    );
    let lone = lone.expect("the lone campaign wins");
    assert_eq!(lone.lease, lone_lease.id);
    for s in &samples {
        s.check(victim_was_leader);
    }
    assert_eq!(watch_samples.ok.len(), 5);
    assert!(
        helper.get(&format!("{base}held")).await.unwrap().is_some(),
        "the kept-alive lease never ended"
    );

    etcd.thaw(victim).unwrap();
    wait_serving(etcd, victim).await;
    for lease in [lease.id, leading_lease.id, waiting_lease.id, lone_lease.id] {
        helper.revoke(lease).await.unwrap();
    }
}

/// With any one member silent — each in turn, the leader included — keepalives, reads, writes,
/// transactions without conditions, watches and campaigns keep working on stores that were
/// sending everything to that member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_keeps_working_with_one_member_silent() {
    let mut etcd = EtcdServer::start_cluster(3).unwrap_or_else(|e| panic!("{e}"));
    for victim in 0..3 {
        silent_member_round(&mut etcd, victim).await;
    }
}

/// The etcd leader going silent, explicitly (whatever member it is).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_keeps_working_with_the_leader_silent() {
    let mut etcd = EtcdServer::start_cluster(3).unwrap_or_else(|e| panic!("{e}"));
    let leader = leader_index(&etcd).await;
    silent_member_round(&mut etcd, leader).await;
}

/// A transaction with conditions is not re-sent once an attempt may have reached a server: when
/// its member goes silent with the request sent, the call fails with `Unavailable` saying the
/// outcome is unknown — never with a `Failed` that a re-sent copy would have produced after the
/// first one committed. Once the member is known to be silent, conditional writes go to the
/// others; and one whose attempt certainly was not sent (connection refused) is retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conditional_write_with_an_unknown_outcome_is_unavailable_not_failed() {
    let mut etcd = EtcdServer::start_cluster(3).unwrap_or_else(|e| panic!("{e}"));
    let leader = leader_index(&etcd).await;
    let victim = (leader + 1) % 3;
    let options = EtcdOptions::default();

    // A transaction: the preferred member goes silent right before the call.
    let store = preferring(&etcd, victim).await;
    let key = "/unknown/txn".to_owned();
    etcd.freeze(victim).unwrap();
    let started = Instant::now();
    let result = store
        .txn(
            vec![Compare::Absent { key: key.clone() }],
            vec![Op::Put {
                key: key.clone(),
                value: b"first".to_vec(),
                lease: None,
            }],
        )
        .await;
    let took = started.elapsed();
    println!("txn with compares, preferred member silent: {took:?}: {result:?}");
    match &result {
        Err(StoreError::Unavailable(reason)) => {
            assert!(reason.contains("outcome is unknown"), "{reason}");
        }
        other => panic!("expected Unavailable (outcome unknown), got {other:?}"),
    }
    assert!(took <= options.request_timeout + Duration::from_millis(300));

    // Now the member is known to be silent: the next conditional writes go elsewhere.
    let started = Instant::now();
    let outcome = store
        .txn(
            vec![Compare::Absent { key: key.clone() }],
            vec![Op::Put {
                key: key.clone(),
                value: b"second".to_vec(),
                lease: None,
            }],
        )
        .await
        .unwrap();
    println!("the next txn with compares: {:?}", started.elapsed());
    assert!(matches!(outcome, TxnOutcome::Committed { .. }));
    assert_ne!(store.preferred_endpoint(), etcd.endpoint(victim).unwrap());

    // A compare-and-swap on a fresh store that still prefers the silent member.
    etcd.thaw(victim).unwrap();
    wait_serving(&etcd, victim).await;
    let cas_store = preferring(&etcd, victim).await;
    etcd.freeze(victim).unwrap();
    let started = Instant::now();
    let result = cas_store
        .compare_and_swap(
            "/unknown/cas",
            Expect::Absent,
            Mutation::Put {
                value: b"1".to_vec(),
                lease: None,
            },
        )
        .await;
    println!(
        "compare_and_swap, preferred member silent: {:?}: {result:?}",
        started.elapsed()
    );
    match &result {
        Err(StoreError::Unavailable(reason)) => {
            assert!(reason.contains("outcome is unknown"), "{reason}");
        }
        other => panic!("expected Unavailable (outcome unknown), got {other:?}"),
    }
    // Unconditional writes and reads on the same store do not fail.
    cas_store
        .put("/unknown/plain", b"x".to_vec(), None)
        .await
        .unwrap();
    etcd.thaw(victim).unwrap();
    wait_serving(&etcd, victim).await;
    // The frozen member got the first transaction before it froze: once thawed it may still
    // apply it, but its condition no longer holds. Either way the key holds the second value.
    assert_eq!(store.get(&key).await.unwrap().unwrap().value, b"second");

    // A conditional write whose first attempt certainly was not sent (refused) is retried.
    let refused = RefusedPort::new().unwrap();
    let mut endpoints = vec![refused.endpoint()];
    endpoints.extend(etcd.endpoints());
    let store = EtcdStore::connect(&endpoints, options).await.unwrap();
    let outcome = store
        .txn(
            vec![Compare::Absent {
                key: "/unknown/refused".into(),
            }],
            vec![Op::Put {
                key: "/unknown/refused".into(),
                value: b"1".to_vec(),
                lease: None,
            }],
        )
        .await
        .unwrap();
    assert!(matches!(outcome, TxnOutcome::Committed { .. }));
    let swapped = store
        .compare_and_swap(
            "/unknown/refused-cas",
            Expect::Absent,
            Mutation::Put {
                value: b"1".to_vec(),
                lease: None,
            },
        )
        .await
        .unwrap();
    assert!(matches!(swapped, CasOutcome::Swapped { .. }));

    // Likewise after the preferred member was killed (its connections refused from then on).
    let store = preferring(&etcd, victim).await;
    etcd.kill(victim).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let outcome = store
        .txn(
            vec![Compare::Absent {
                key: "/unknown/killed".into(),
            }],
            vec![Op::Put {
                key: "/unknown/killed".into(),
                value: b"1".to_vec(),
                lease: None,
            }],
        )
        .await
        .unwrap();
    assert!(matches!(outcome, TxnOutcome::Committed { .. }));
}
