//! The behaviour suite every [`ClusterStore`] must pass (feature `testkit`).
//!
//! Each check takes a store and a key prefix of its own (so the checks can share one store, even a
//! shared etcd) and panics with a message on a violation. [`run`] runs them all. Waits are bounded
//! by [`PATIENCE`] only so that a broken store fails instead of hanging; nothing asserts a timing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use serde_json::json;

use crate::layout::Layout;
use crate::records::{EventLog, FollowFrom, LoggedEvent, OwnerChange, OwnerSwap, Records};
use crate::store::{
    CasOutcome, ClusterStore, Compare, Expect, KeyValue, LeaseId, MAX_TXN_OPS, Mutation, Op,
    Revision, StoreError, TxnOutcome, WatchEvent, WatchStream,
};

/// Upper bound for anything a check waits for (lease expiry, a campaign).
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Runs every check under `root` (e.g. `/conformance/`), each under its own sub-prefix.
pub async fn run<S: ClusterStore>(store: &S, root: &str) {
    put_get_list(store, &format!("{root}kv/")).await;
    cas_create_race(store, &format!("{root}race/")).await;
    cas_stale_revision(store, &format!("{root}stale/")).await;
    txn_conditions_and_atomicity(store, &format!("{root}txn/")).await;
    txn_delete_range(store, &format!("{root}txn-range/")).await;
    txn_validation(store, &format!("{root}txn-invalid/")).await;
    txn_with_leases(store, &format!("{root}txn-lease/")).await;
    list_tail(store, &format!("{root}tail/")).await;
    lease_expiry_deletes_keys(store, &format!("{root}expiry/")).await;
    revoke_deletes_keys(store, &format!("{root}revoke/")).await;
    watch_replays_from_revision(store, &format!("{root}watch/")).await;
    election(store, &format!("{root}election/")).await;
    ownership_records(store, "conformance-owner").await;
    event_log(store, "conformance-events").await;
}

async fn next_event<W: WatchStream>(watch: &mut W) -> WatchEvent {
    tokio::time::timeout(PATIENCE, watch.next())
        .await
        .expect("watch delivered nothing in time")
        .expect("watch failed")
}

/// Put, get, list by prefix, delete: values and revisions as documented.
pub async fn put_get_list<S: ClusterStore>(store: &S, p: &str) {
    let r1 = store
        .put(&format!("{p}a/1"), b"one".to_vec(), None)
        .await
        .unwrap();
    let r2 = store
        .put(&format!("{p}a/2"), b"two".to_vec(), None)
        .await
        .unwrap();
    store
        .put(&format!("{p}ab/1"), b"x".to_vec(), None)
        .await
        .unwrap();
    let r4 = store
        .put(&format!("{p}a/1"), b"uno".to_vec(), None)
        .await
        .unwrap();
    assert!(r1 < r2 && r2 < r4, "revisions increase with every write");

    let kv = store.get(&format!("{p}a/1")).await.unwrap().unwrap();
    assert_eq!(kv.value, b"uno");
    assert_eq!(kv.create_revision, r1, "create revision stays");
    assert_eq!(kv.mod_revision, r4, "mod revision follows the last write");
    assert_eq!(kv.lease, None);
    assert!(store.get(&format!("{p}missing")).await.unwrap().is_none());

    let listing = store.list(&format!("{p}a/")).await.unwrap();
    let keys: Vec<_> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        [format!("{p}a/1"), format!("{p}a/2")],
        "prefix, in key order"
    );
    assert!(listing.revision >= r4);
    assert_eq!(store.list(p).await.unwrap().kvs.len(), 3);

    let deleted = store.delete(&format!("{p}a/2")).await.unwrap();
    assert!(deleted.is_some_and(|r| r > r4));
    assert_eq!(
        store.delete(&format!("{p}a/2")).await.unwrap(),
        None,
        "absent: no-op"
    );
    assert!(store.get(&format!("{p}a/2")).await.unwrap().is_none());
    assert!(matches!(
        store.put("", Vec::new(), None).await,
        Err(StoreError::InvalidArgument(_))
    ));
}

/// Two tasks create the same key with compare-and-swap at once: exactly one wins, the loser sees
/// the winner's value.
pub async fn cas_create_race<S: ClusterStore>(store: &S, p: &str) {
    for round in 0..20 {
        let key = format!("{p}{round}");
        let tasks: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let store = store.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let put = Mutation::Put {
                        value: who.as_bytes().to_vec(),
                        lease: None,
                    };
                    (who, store.compare_and_swap(&key, Expect::Absent, put).await)
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for task in tasks {
            match task.await.unwrap() {
                (who, Ok(CasOutcome::Swapped { revision })) => winners.push((who, revision)),
                (_, Ok(CasOutcome::Conflict { current })) => losers.push(current),
                (_, Err(e)) => panic!("CAS failed: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "exactly one create wins");
        let (winner, revision) = winners[0];
        let current = losers.pop().flatten().expect("loser sees the key");
        assert_eq!(current.value, winner.as_bytes());
        assert_eq!(current.mod_revision, revision);
        let stored = store.get(&key).await.unwrap().unwrap();
        assert_eq!(stored.value, winner.as_bytes());
    }
}

/// A compare-and-swap on a stale revision changes nothing (not even the store revision).
pub async fn cas_stale_revision<S: ClusterStore>(store: &S, p: &str) {
    let key = format!("{p}k");
    let r1 = store.put(&key, b"v1".to_vec(), None).await.unwrap();
    let r2 = store.put(&key, b"v2".to_vec(), None).await.unwrap();
    let before = store.list(p).await.unwrap();
    for mutation in [
        Mutation::Put {
            value: b"v3".to_vec(),
            lease: None,
        },
        Mutation::Delete,
    ] {
        match store
            .compare_and_swap(&key, Expect::Revision(r1), mutation)
            .await
            .unwrap()
        {
            CasOutcome::Conflict { current } => {
                let current = current.unwrap();
                assert_eq!(
                    (current.value.as_slice(), current.mod_revision),
                    (&b"v2"[..], r2)
                );
            }
            CasOutcome::Swapped { .. } => panic!("stale CAS must not apply"),
        }
    }
    let absent = Mutation::Put {
        value: b"v4".to_vec(),
        lease: None,
    };
    assert!(matches!(
        store
            .compare_and_swap(&key, Expect::Absent, absent)
            .await
            .unwrap(),
        CasOutcome::Conflict { current: Some(_) }
    ));
    assert_eq!(store.list(p).await.unwrap(), before, "nothing changed");

    let swapped = store
        .compare_and_swap(&key, Expect::Revision(r2), Mutation::Delete)
        .await
        .unwrap();
    assert!(matches!(swapped, CasOutcome::Swapped { revision } if revision > r2));
    assert!(store.get(&key).await.unwrap().is_none());
    let missing = Mutation::Put {
        value: b"v5".to_vec(),
        lease: None,
    };
    assert!(matches!(
        store
            .compare_and_swap(&key, Expect::Revision(r2), missing)
            .await
            .unwrap(),
        CasOutcome::Conflict { current: None }
    ));
}

/// A lease that is not kept alive ends: its keys vanish, watchers see `Delete`, keepalive and puts
/// with it fail with `LeaseExpired`; keys without the lease stay.
pub async fn lease_expiry_deletes_keys<S: ClusterStore>(store: &S, p: &str) {
    let lease = store.grant(Duration::from_secs(1)).await.unwrap();
    assert!(lease.ttl >= Duration::from_secs(1));
    assert!(store.keep_alive(lease.id).await.unwrap() >= Duration::from_secs(1));
    store
        .put(&format!("{p}bound"), b"x".to_vec(), Some(lease.id))
        .await
        .unwrap();
    let cas = Mutation::Put {
        value: b"y".to_vec(),
        lease: Some(lease.id),
    };
    store
        .compare_and_swap(&format!("{p}cas-bound"), Expect::Absent, cas)
        .await
        .unwrap();
    store
        .put(&format!("{p}free"), b"z".to_vec(), None)
        .await
        .unwrap();
    let listing = store.list(p).await.unwrap();
    assert_eq!(listing.kvs[0].lease, Some(lease.id));

    let mut watch = store.watch(p, listing.revision + 1).await.unwrap();
    let mut deleted = Vec::new();
    while deleted.len() < 2 {
        match next_event(&mut watch).await {
            WatchEvent::Delete { key, .. } => deleted.push(key),
            WatchEvent::Put(kv) => panic!("unexpected put of {}", kv.key),
        }
    }
    deleted.sort();
    assert_eq!(deleted, [format!("{p}bound"), format!("{p}cas-bound")]);
    let keys: Vec<_> = store
        .list(p)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, [format!("{p}free")]);
    assert!(matches!(
        store.keep_alive(lease.id).await,
        Err(StoreError::LeaseExpired { lease: l }) if l == lease.id
    ));
    assert!(matches!(
        store
            .put(&format!("{p}late"), Vec::new(), Some(lease.id))
            .await,
        Err(StoreError::LeaseExpired { .. })
    ));
    store
        .revoke(lease.id)
        .await
        .expect("revoking an ended lease is not an error");
}

/// Revoking a lease deletes its keys at once, visible to watchers; unknown leases are refused.
pub async fn revoke_deletes_keys<S: ClusterStore>(store: &S, p: &str) {
    let lease = store.grant(Duration::from_secs(60)).await.unwrap();
    let r = store
        .put(&format!("{p}k"), b"x".to_vec(), Some(lease.id))
        .await
        .unwrap();
    let mut watch = store.watch(p, r + 1).await.unwrap();
    store.revoke(lease.id).await.unwrap();
    assert!(
        matches!(next_event(&mut watch).await, WatchEvent::Delete { key, .. } if key == format!("{p}k"))
    );
    assert!(store.get(&format!("{p}k")).await.unwrap().is_none());
    assert!(matches!(
        store
            .put(&format!("{p}k"), Vec::new(), Some(LeaseId(i64::MAX)))
            .await,
        Err(StoreError::LeaseExpired { .. })
    ));
}

/// A watch from a past revision replays the later changes under its prefix, in order, then
/// follows new ones.
pub async fn watch_replays_from_revision<S: ClusterStore>(store: &S, p: &str) {
    let from = store
        .put(&format!("{p}in/1"), b"a".to_vec(), None)
        .await
        .unwrap();
    store
        .put(&format!("{p}out"), b"b".to_vec(), None)
        .await
        .unwrap();
    store
        .put(&format!("{p}in/2"), b"c".to_vec(), None)
        .await
        .unwrap();
    store.delete(&format!("{p}in/1")).await.unwrap();
    let mut watch = store.watch(&format!("{p}in/"), from).await.unwrap();
    store
        .put(&format!("{p}in/3"), b"d".to_vec(), None)
        .await
        .unwrap();

    let mut seen = Vec::new();
    let mut last = 0;
    for _ in 0..4 {
        let event = next_event(&mut watch).await;
        assert!(event.revision() > last, "in revision order");
        last = event.revision();
        seen.push(match event {
            WatchEvent::Put(kv) => format!("put {} {}", kv.key, String::from_utf8_lossy(&kv.value)),
            WatchEvent::Delete { key, .. } => format!("delete {key}"),
        });
    }
    assert_eq!(
        seen,
        [
            format!("put {p}in/1 a"),
            format!("put {p}in/2 c"),
            format!("delete {p}in/1"),
            format!("put {p}in/3 d"),
        ]
    );
}

/// One candidate leads at once; a second waits until the first resigns, then leads with a later
/// revision.
pub async fn election<S: ClusterStore>(store: &S, p: &str) {
    let name = format!("{p}controller");
    assert_eq!(store.leader(&name).await.unwrap(), None);
    let a = store.grant(Duration::from_secs(60)).await.unwrap();
    let b = store.grant(Duration::from_secs(60)).await.unwrap();
    let first = tokio::time::timeout(PATIENCE, store.campaign(&name, b"kvm1".to_vec(), a.id))
        .await
        .expect("a lone campaigner wins")
        .unwrap();
    assert_eq!(first.value, b"kvm1");
    assert_eq!(first.lease, a.id);

    let second = tokio::spawn({
        let store = store.clone();
        let name = name.clone();
        async move { store.campaign(&name, b"kvm2".to_vec(), b.id).await }
    });
    // Wait until the second candidacy is registered, then check the first still leads.
    let wait_for_candidate = async {
        while store.list(&format!("{name}/")).await.unwrap().kvs.len() < 2 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, wait_for_candidate)
        .await
        .expect("candidate registered");
    assert_eq!(store.leader(&name).await.unwrap().as_ref(), Some(&first));

    store.resign(&first).await.unwrap();
    let next = tokio::time::timeout(PATIENCE, second)
        .await
        .expect("the waiting candidate wins after the resign")
        .unwrap()
        .unwrap();
    assert_eq!(next.value, b"kvm2");
    assert!(next.revision > first.revision, "terms increase");
    assert_eq!(store.leader(&name).await.unwrap(), Some(next.clone()));
    store
        .resign(&first)
        .await
        .expect("resigning an old term is a no-op");
    assert_eq!(store.leader(&name).await.unwrap(), Some(next));
    store.revoke(b.id).await.unwrap();
    assert_eq!(
        store.leader(&name).await.unwrap(),
        None,
        "leadership ends with the lease"
    );
    store.revoke(a.id).await.unwrap();
}

/// Ownership records: claimed only by compare-and-swap, bound to the owner's lease, gone with it.
pub async fn ownership_records<S: ClusterStore>(store: &S, cluster: &str) {
    let records = Records::new(store.clone(), Layout::new(cluster).unwrap());
    let kvm1 = store.grant(Duration::from_secs(60)).await.unwrap();
    let kvm2 = store.grant(Duration::from_secs(60)).await.unwrap();
    let owner1 = json!({"host": "kvm1"});
    let claim = |record, lease| OwnerChange::Claim { record, lease };
    let OwnerSwap::Swapped { revision } = records
        .swap_owner("db01", Expect::Absent, claim(&owner1, kvm1.id))
        .await
        .unwrap()
    else {
        panic!("claiming an unowned VM succeeds");
    };
    let owner2 = json!({"host": "kvm2"});
    match records
        .swap_owner("db01", Expect::Absent, claim(&owner2, kvm2.id))
        .await
        .unwrap()
    {
        OwnerSwap::Conflict { current } => {
            let current = current.unwrap();
            assert_eq!(current.value, owner1);
            assert_eq!(current.lease, Some(kvm1.id));
        }
        OwnerSwap::Swapped { .. } => panic!("a second claim must fail"),
    }
    let owner: serde_json::Value = records.owner("db01").await.unwrap().unwrap().value;
    assert_eq!(owner, owner1);
    store.revoke(kvm1.id).await.unwrap();
    assert!(
        records
            .owner::<serde_json::Value>("db01")
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        records
            .swap_owner("db01", Expect::Revision(revision), claim(&owner1, kvm2.id))
            .await
            .unwrap(),
        OwnerSwap::Conflict { current: None }
    ));
    store.revoke(kvm2.id).await.unwrap();
}

/// One event as the event-log check identifies it: (commit revision, host, seq).
type EventId = (Revision, String, u64);

/// Host `host` writes its events `seqs` (`{"host", "seq"}`) the way a daemon does: in one
/// transaction with its own state (here its next seq) and the trimming of its stream.
async fn write_events<S: ClusterStore>(
    store: &S,
    log: &EventLog<S>,
    layout: &Layout,
    host: &str,
    seqs: std::ops::Range<u64>,
) -> Vec<EventId> {
    let mut ops: Vec<Op> = seqs
        .clone()
        .map(|seq| {
            log.put_op(host, seq, &json!({"host": host, "seq": seq}))
                .unwrap()
        })
        .collect();
    ops.extend(log.trim_op(host, seqs.end).unwrap());
    ops.push(put(
        &layout.agent_state(host).unwrap(),
        &seqs.end.to_string(),
    ));
    let revision = committed(store, vec![], ops).await;
    seqs.map(|seq| (revision, host.to_owned(), seq)).collect()
}

fn event_ids(events: &[LoggedEvent<serde_json::Value>]) -> Vec<EventId> {
    events
        .iter()
        .map(|e| {
            assert_eq!(e.event, json!({"host": e.host, "seq": e.seq}), "decoded");
            (e.revision, e.host.clone(), e.seq)
        })
        .collect()
}

/// The events of `written` each host still keeps (its newest `keep`), in commit order.
fn kept(written: &[EventId], keep: u64) -> Vec<EventId> {
    let next = |host: &str| {
        written
            .iter()
            .filter(|e| e.1 == host)
            .map(|e| e.2 + 1)
            .max()
            .unwrap_or(0)
    };
    let mut kept: Vec<EventId> = written
        .iter()
        .filter(|e| e.2 + keep >= next(&e.1))
        .cloned()
        .collect();
    kept.sort();
    kept
}

/// The seqs stored in `host`'s stream.
async fn stream_seqs<S: ClusterStore>(store: &S, layout: &Layout, host: &str) -> Vec<u64> {
    let prefix = layout.host_events_prefix(host).unwrap();
    let kvs = store.list(&prefix).await.unwrap().kvs;
    kvs.iter()
        .map(|kv| layout.parse_host_event(&kv.key).unwrap().1)
        .collect()
}

async fn follow_events<S: ClusterStore>(
    log: &EventLog<S>,
    from: FollowFrom,
    n: usize,
) -> Vec<EventId> {
    let mut follower = log.follow::<serde_json::Value>(from).await.unwrap();
    let mut seen = Vec::with_capacity(n);
    while seen.len() < n {
        let event = tokio::time::timeout(PATIENCE, follower.next())
            .await
            .expect("the follower delivered nothing in time")
            .unwrap();
        seen.push(event);
    }
    event_ids(&seen)
}

/// The event log: one stream per host, written by the host itself in its transactions
/// (`put_op`, `trim_op`); each stream keeps its newest `keep`; `last` merges the listed hosts'
/// streams in commit order; a follower from a tail delivers every later event of any host once,
/// in order, also events written between `last` and `follow` and while `last` was reading.
pub async fn event_log<S: ClusterStore>(store: &S, cluster: &str) {
    let layout = Layout::new(cluster).unwrap();
    let log = EventLog::with_keep(store.clone(), layout.clone(), 5);
    let hosts = ["kvm1", "kvm2"];

    // Two hosts write their streams, interleaved; kvm2 once writes two events in one commit.
    let mut written = Vec::new();
    for seq in 0..8 {
        written.extend(write_events(store, &log, &layout, "kvm1", seq..seq + 1).await);
        if seq < 3 {
            written.extend(write_events(store, &log, &layout, "kvm2", seq..seq + 1).await);
        }
    }
    written.extend(write_events(store, &log, &layout, "kvm2", 3..5).await);
    assert_eq!(
        stream_seqs(store, &layout, "kvm1").await,
        [3, 4, 5, 6, 7],
        "kvm1 keeps its newest 5"
    );
    assert_eq!(
        stream_seqs(store, &layout, "kvm2").await,
        [0, 1, 2, 3, 4],
        "kvm2 has only 5"
    );
    assert_eq!(log.next_seq("kvm1").await.unwrap(), 8);

    // The newest events across hosts, in commit order.
    let all = kept(&written, 5);
    assert_eq!(all.len(), 10);
    let tail = log.last::<serde_json::Value>(&hosts, 100).await.unwrap();
    assert_eq!(
        event_ids(&tail.events),
        all,
        "every kept event, in commit order"
    );
    assert!(tail.follow_from.revision() >= all[9].0);
    let last3 = log.last::<serde_json::Value>(&hosts, 3).await.unwrap();
    assert_eq!(event_ids(&last3.events), all[7..], "the newest 3");
    assert_eq!(
        (last3.events[1].revision, last3.events[1].seq),
        (last3.events[2].revision, 3),
        "one commit: by seq"
    );
    let only2 = log
        .last::<serde_json::Value>(&["kvm2", "kvm2"], 2)
        .await
        .unwrap();
    assert_eq!(
        event_ids(&only2.events),
        [all[8].clone(), all[9].clone()],
        "one host, named twice"
    );
    let none = log.last::<serde_json::Value>(&hosts, 0).await.unwrap();
    assert!(none.events.is_empty());
    assert_eq!(none.follow_from, tail.follow_from, "nothing written since");

    // Events written between `last` and `follow` and after it, by listed and unlisted hosts,
    // several in one commit: the follower delivers each once, in commit order.
    let tail = log.last::<serde_json::Value>(&hosts, 4).await.unwrap();
    assert_eq!(event_ids(&tail.events), all[6..]);
    let mut later = write_events(store, &log, &layout, "kvm2", 5..6).await;
    later.extend(write_events(store, &log, &layout, "kvm3", 0..1).await);
    later.extend(write_events(store, &log, &layout, "kvm1", 8..10).await);
    // The follower waits for those and for the one the writer adds while it follows.
    let follower = follow_events(&log, tail.follow_from, later.len() + 1);
    let writer = async {
        tokio::task::yield_now().await;
        write_events(store, &log, &layout, "kvm2", 6..7).await
    };
    let (followed, last_write) = tokio::join!(follower, writer);
    later.extend(last_write);
    assert_eq!(
        followed, later,
        "everything after the tail, once, in commit order"
    );
    let unlisted = log.last::<serde_json::Value>(&hosts, 100).await.unwrap();
    assert!(
        unlisted.events.iter().all(|e| e.host != "kvm3"),
        "hosts not asked for are not shown"
    );
    assert_eq!(
        stream_seqs(store, &layout, "kvm1").await,
        [5, 6, 7, 8, 9],
        "trimmed in the same commits"
    );

    // Two hosts writing while `last` reads their streams (each already longer than `k`, so new
    // events push older ones out of a read): the tail is the newest `k` as of its revision and
    // the follower delivers exactly the rest.
    let racers = ["race1", "race2"];
    let big = EventLog::with_keep(store.clone(), layout.clone(), 1000);
    let writers: Vec<_> = racers
        .into_iter()
        .map(|host| {
            let (store, layout) = (store.clone(), layout.clone());
            tokio::spawn(async move {
                let log = EventLog::with_keep(store.clone(), layout.clone(), 1000);
                for seq in 0..40 {
                    write_events(&store, &log, &layout, host, seq..seq + 1).await;
                }
            })
        })
        .collect();
    let started = async {
        while big.next_seq("race1").await.unwrap() < 12 || big.next_seq("race2").await.unwrap() < 12
        {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(PATIENCE, started)
        .await
        .expect("the writers write");
    let tail = big.last::<serde_json::Value>(&racers, 10).await.unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let mut stored: Vec<EventId> = Vec::new();
    for kv in store.list(&layout.events_prefix()).await.unwrap().kvs {
        let (host, seq) = layout.parse_host_event(&kv.key).unwrap();
        if racers.contains(&host) {
            stored.push((kv.mod_revision, host.to_owned(), seq));
        }
    }
    stored.sort();
    assert_eq!(stored.len(), 80);
    let at = tail.follow_from.revision();
    let (before, after): (Vec<EventId>, Vec<EventId>) = stored.into_iter().partition(|e| e.0 <= at);
    assert_eq!(
        event_ids(&tail.events),
        before[before.len().saturating_sub(10)..],
        "the newest 10 as of the tail's revision"
    );
    assert_eq!(
        follow_events(&big, tail.follow_from, after.len()).await,
        after,
        "the rest, once each, in commit order"
    );
}

fn put(key: &str, value: &str) -> Op {
    Op::Put {
        key: key.to_owned(),
        value: value.as_bytes().to_vec(),
        lease: None,
    }
}

fn describe(event: &WatchEvent) -> String {
    match event {
        WatchEvent::Put(kv) => format!(
            "put {} {} @{}",
            kv.key,
            String::from_utf8_lossy(&kv.value),
            kv.mod_revision
        ),
        WatchEvent::Delete { key, revision } => format!("delete {key} @{revision}"),
    }
}

async fn committed<S: ClusterStore>(store: &S, compares: Vec<Compare>, ops: Vec<Op>) -> Revision {
    match store.txn(compares, ops).await.unwrap() {
        TxnOutcome::Committed { revision } => revision,
        TxnOutcome::Failed => panic!("the transaction's conditions hold; it must commit"),
    }
}

async fn current_revision<S: ClusterStore>(store: &S, p: &str) -> Revision {
    store.list(p).await.unwrap().revision
}

/// A transaction applies all its writes in one revision iff every condition holds; watchers see
/// the writes in `ops` order; a failed one changes nothing, not even the revision.
pub async fn txn_conditions_and_atomicity<S: ClusterStore>(store: &S, p: &str) {
    let (a, b, c) = (format!("{p}a"), format!("{p}b"), format!("{p}c"));
    let r1 = store.put(&a, b"1".to_vec(), None).await.unwrap();
    let mut watch = store.watch(p, r1 + 1).await.unwrap();
    let rev = committed(
        store,
        vec![
            Compare::ModRevision {
                key: a.clone(),
                revision: r1,
            },
            Compare::Absent { key: b.clone() },
            Compare::CreateRevision {
                key: a.clone(),
                revision: r1,
            },
        ],
        vec![put(&b, "2"), put(&c, "3"), Op::Delete { key: a.clone() }],
    )
    .await;
    assert!(rev > r1);
    let seen: Vec<String> = [
        next_event(&mut watch).await,
        next_event(&mut watch).await,
        next_event(&mut watch).await,
    ]
    .iter()
    .map(describe)
    .collect();
    assert_eq!(
        seen,
        [
            format!("put {b} 2 @{rev}"),
            format!("put {c} 3 @{rev}"),
            format!("delete {a} @{rev}"),
        ],
        "one revision, in ops order"
    );
    let kv_b = store.get(&b).await.unwrap().unwrap();
    assert_eq!((kv_b.create_revision, kv_b.mod_revision), (rev, rev));
    assert!(store.get(&a).await.unwrap().is_none());

    // Each failing condition alone makes the whole transaction change nothing.
    let before = store.list(p).await.unwrap();
    let failing = [
        Compare::Absent { key: b.clone() },
        Compare::ModRevision {
            key: b.clone(),
            revision: r1,
        },
        Compare::CreateRevision {
            key: b.clone(),
            revision: r1,
        },
        Compare::ModRevision {
            key: a.clone(),
            revision: 0,
        },
        Compare::CreateRevision {
            key: a.clone(),
            revision: 0,
        },
        Compare::ModRevision {
            key: a.clone(),
            revision: r1,
        },
    ];
    for condition in failing {
        let holding = Compare::ModRevision {
            key: b.clone(),
            revision: rev,
        };
        let outcome = store
            .txn(
                vec![holding, condition.clone()],
                vec![put(&b, "x"), put(&format!("{p}new"), "y")],
            )
            .await
            .unwrap();
        assert_eq!(outcome, TxnOutcome::Failed, "{condition:?} must not hold");
    }
    assert_eq!(
        store.list(p).await.unwrap(),
        before,
        "failed: nothing changed"
    );

    // The creation revision survives updates, not a delete and re-create.
    let r3 = store.put(&b, b"4".to_vec(), None).await.unwrap();
    let by_creation = |revision| Compare::CreateRevision {
        key: b.clone(),
        revision,
    };
    let r4 = committed(store, vec![by_creation(rev)], vec![put(&c, "5")]).await;
    assert!(r4 > r3);
    store.delete(&b).await.unwrap();
    store.put(&b, b"6".to_vec(), None).await.unwrap();
    assert_eq!(
        store
            .txn(vec![by_creation(rev)], vec![put(&c, "7")])
            .await
            .unwrap(),
        TxnOutcome::Failed
    );

    // Conditions only: commits at the current revision, changes nothing.
    let now = current_revision(store, p).await;
    let outcome = store
        .txn(vec![Compare::Absent { key: a.clone() }], vec![])
        .await;
    assert_eq!(outcome.unwrap(), TxnOutcome::Committed { revision: now });
    assert_eq!(current_revision(store, p).await, now);
}

/// `DeleteRange` deletes every key in `[start, end)` in the transaction's revision; watchers see
/// one `Delete` per key, in key order. A range with nothing in it changes nothing.
pub async fn txn_delete_range<S: ClusterStore>(store: &S, p: &str) {
    for k in ["a", "b", "b/1", "c", "d"] {
        store
            .put(&format!("{p}{k}"), k.as_bytes().to_vec(), None)
            .await
            .unwrap();
    }
    let from = current_revision(store, p).await + 1;
    let mut watch = store.watch(p, from).await.unwrap();
    let rev = committed(
        store,
        vec![],
        vec![
            Op::DeleteRange {
                start: format!("{p}b"),
                end: format!("{p}d"),
            },
            put(&format!("{p}e"), "e"),
        ],
    )
    .await;
    assert_eq!(rev, from, "one revision for the whole transaction");
    let seen: Vec<String> = [
        next_event(&mut watch).await,
        next_event(&mut watch).await,
        next_event(&mut watch).await,
        next_event(&mut watch).await,
    ]
    .iter()
    .map(describe)
    .collect();
    assert_eq!(
        seen,
        [
            format!("delete {p}b @{rev}"),
            format!("delete {p}b/1 @{rev}"),
            format!("delete {p}c @{rev}"),
            format!("put {p}e e @{rev}"),
        ]
    );
    let keys: Vec<String> = store
        .list(p)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(keys, [format!("{p}a"), format!("{p}d"), format!("{p}e")]);

    let empty = Op::DeleteRange {
        start: format!("{p}x"),
        end: format!("{p}y"),
    };
    assert_eq!(
        store.txn(vec![], vec![empty]).await.unwrap(),
        TxnOutcome::Committed { revision: rev },
        "deleting nothing changes nothing"
    );
    assert_eq!(current_revision(store, p).await, rev);
}

/// Invalid transactions are refused with `InvalidArgument` before anything changes.
pub async fn txn_validation<S: ClusterStore>(store: &S, p: &str) {
    let k = |s: &str| format!("{p}{s}");
    store.put(&k("kept"), b"v".to_vec(), None).await.unwrap();
    let before = store.list(p).await.unwrap();
    let too_many: Vec<Op> = (0..=MAX_TXN_OPS)
        .map(|i| put(&k(&i.to_string()), "x"))
        .collect();
    let at_limit: Vec<Op> = too_many[..MAX_TXN_OPS].to_vec();
    let range = |start: &str, end: &str| Op::DeleteRange {
        start: k(start),
        end: k(end),
    };
    let invalid: Vec<(&str, Vec<Compare>, Vec<Op>)> = vec![
        ("too many writes", vec![], too_many),
        (
            "a key written twice",
            vec![],
            vec![put(&k("a"), "1"), put(&k("a"), "2")],
        ),
        (
            "a put and a delete of one key",
            vec![],
            vec![put(&k("a"), "1"), Op::Delete { key: k("a") }],
        ),
        (
            "a put inside a deleted range",
            vec![],
            vec![range("a", "c"), put(&k("b"), "1")],
        ),
        (
            "overlapping ranges",
            vec![],
            vec![range("a", "c"), range("b", "d")],
        ),
        ("an empty key", vec![], vec![put("", "1")]),
        ("an empty range", vec![], vec![range("b", "b")]),
        ("a reversed range", vec![], vec![range("c", "a")]),
        (
            "an empty key in a condition",
            vec![Compare::Absent { key: String::new() }],
            vec![put(&k("a"), "1")],
        ),
    ];
    for (what, compares, ops) in invalid {
        match store.txn(compares, ops).await {
            Err(StoreError::InvalidArgument(_)) => {}
            other => panic!("{what}: expected InvalidArgument, got {other:?}"),
        }
    }
    assert_eq!(store.list(p).await.unwrap(), before, "nothing changed");
    let rev = committed(store, vec![], at_limit).await;
    assert_eq!(
        store.list(&k("")).await.unwrap().kvs.len(),
        MAX_TXN_OPS + 1,
        "{MAX_TXN_OPS} writes are allowed (at revision {rev})"
    );
}

/// A `Put` in a transaction binds the key to its lease; a lease that is not live fails the whole
/// transaction with `LeaseExpired`.
pub async fn txn_with_leases<S: ClusterStore>(store: &S, p: &str) {
    let lease = store.grant(Duration::from_secs(60)).await.unwrap();
    let bound = format!("{p}bound");
    let rev = committed(
        store,
        vec![Compare::Absent { key: bound.clone() }],
        vec![Op::Put {
            key: bound.clone(),
            value: b"x".to_vec(),
            lease: Some(lease.id),
        }],
    )
    .await;
    let kv = store.get(&bound).await.unwrap().unwrap();
    assert_eq!((kv.lease, kv.mod_revision), (Some(lease.id), rev));

    let before = store.list(p).await.unwrap();
    let dead = LeaseId(i64::MAX);
    let outcome = store
        .txn(
            vec![],
            vec![
                put(&format!("{p}other"), "y"),
                Op::Put {
                    key: format!("{p}dead"),
                    value: Vec::new(),
                    lease: Some(dead),
                },
            ],
        )
        .await;
    assert!(
        matches!(outcome, Err(StoreError::LeaseExpired { .. })),
        "a dead lease fails the transaction: {outcome:?}"
    );
    assert_eq!(store.list(p).await.unwrap(), before, "nothing changed");

    store.revoke(lease.id).await.unwrap();
    assert!(
        store.get(&bound).await.unwrap().is_none(),
        "gone with the lease"
    );
    let outcome = store
        .txn(
            vec![],
            vec![Op::Put {
                key: bound.clone(),
                value: Vec::new(),
                lease: Some(lease.id),
            }],
        )
        .await;
    assert!(matches!(outcome, Err(StoreError::LeaseExpired { lease: l }) if l == lease.id));
}

/// `list_tail` returns the last keys under a prefix, ascending, with the snapshot revision.
pub async fn list_tail<S: ClusterStore>(store: &S, p: &str) {
    let log = format!("{p}log/");
    store
        .put(&format!("{p}lof"), b"before".to_vec(), None)
        .await
        .unwrap();
    store
        .put(&format!("{p}log0"), b"after".to_vec(), None)
        .await
        .unwrap();
    for i in 1..=5 {
        store
            .put(&format!("{log}{i:02}"), vec![i], None)
            .await
            .unwrap();
    }
    let keys = |kvs: &[KeyValue]| -> Vec<String> {
        kvs.iter()
            .map(|kv| kv.key.trim_start_matches(&log).to_owned())
            .collect()
    };
    let full = store.list(&log).await.unwrap();
    let tail = store.list_tail(&log, 2).await.unwrap();
    assert_eq!(keys(&tail.kvs), ["04", "05"], "the last two, ascending");
    assert_eq!(tail.revision, full.revision);
    assert_eq!(tail.kvs[..], full.kvs[3..]);
    let all = store.list_tail(&log, 100).await.unwrap();
    assert_eq!(all.kvs, full.kvs, "a limit beyond the count: everything");
    let none = store.list_tail(&log, 0).await.unwrap();
    assert!(none.kvs.is_empty());
    assert_eq!(none.revision, full.revision);
    let missing = store.list_tail(&format!("{p}nothing/"), 3).await.unwrap();
    assert!(missing.kvs.is_empty());
    assert_eq!(missing.revision, full.revision);
}
