//! The embedded store: the conformance suite, plus what only a file-backed store has
//! (persistence, restart semantics, the file lock, corruption).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use vmha_store::{ClusterStore, EmbeddedStore, StoreError, WatchEvent, WatchStream, conformance};

fn open(dir: &Path) -> EmbeddedStore {
    EmbeddedStore::open(dir.join("store.redb")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    conformance::run(&open(dir.path()), "/conformance/").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_revision_survive_reopen_but_leased_keys_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let (last, old_lease) = {
        let store = open(dir.path());
        store.put("/p/kept", b"v".to_vec(), None).await.unwrap();
        let lease = store.grant(Duration::from_secs(600)).await.unwrap();
        store
            .put("/p/leased", b"x".to_vec(), Some(lease.id))
            .await
            .unwrap();
        (store.list("/").await.unwrap().revision, lease.id)
    };
    let store = open(dir.path());
    let listing = store.list("/p/").await.unwrap();
    let keys: Vec<_> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(
        keys,
        ["/p/kept"],
        "keys of leases of the previous run are gone"
    );
    assert_eq!(listing.kvs[0].value, b"v");
    assert!(listing.revision > last, "deleting them took a new revision");
    assert!(matches!(
        store.keep_alive(old_lease).await,
        Err(StoreError::LeaseExpired { .. })
    ));
    let next = store.put("/p/new", Vec::new(), None).await.unwrap();
    assert!(
        next > listing.revision,
        "revisions continue after a restart"
    );
    let lease = store.grant(Duration::from_secs(60)).await.unwrap();
    assert_ne!(lease.id, old_lease, "lease ids are not reused");

    // History from before the restart is gone: such a watch must say so, not stay silent.
    assert!(matches!(
        store.watch("/p/", last).await,
        Err(StoreError::Compacted { .. })
    ));
    let mut watch = store.watch("/p/", listing.revision + 1).await.unwrap();
    assert!(matches!(watch.next().await.unwrap(), WatchEvent::Put(kv) if kv.key == "/p/new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_that_falls_behind_reports_lagged() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut watch = store.watch("/lag/", 1).await.unwrap();
    for i in 0..5_000 {
        store
            .put(&format!("/other/{i}"), Vec::new(), None)
            .await
            .unwrap();
    }
    assert!(matches!(watch.next().await, Err(StoreError::Lagged { .. })));
    assert!(watch.next().await.is_err(), "a failed watch stays failed");
}

const CHILD_ENV: &str = "VMHA_STORE_TEST_OPEN";

/// Run by `a_second_process_is_refused` in a child process: tries to open the store.
#[test]
fn child_open_attempt() {
    let Some(path) = std::env::var_os(CHILD_ENV) else {
        return; // Not the child.
    };
    match EmbeddedStore::open(path) {
        Err(StoreError::Locked { .. }) => println!("RESULT locked"),
        Err(e) => println!("RESULT other error: {e}"),
        Ok(_) => println!("RESULT opened"),
    }
}

#[test]
fn a_second_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _store = EmbeddedStore::open(&path).unwrap();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_open_attempt",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("RESULT locked"), "child said: {stdout}");
    let message = StoreError::Locked {
        path: path.display().to_string(),
    }
    .to_string();
    assert!(message.contains("already open"), "{message}");
}

#[test]
fn a_second_handle_in_the_same_process_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let _store = EmbeddedStore::open(&path).unwrap();
    assert!(matches!(
        EmbeddedStore::open(&path),
        Err(StoreError::Locked { .. })
    ));
}

#[test]
fn a_file_that_is_not_a_store_is_reported_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    std::fs::write(&path, vec![0x5a; 64 * 1024]).unwrap();
    match EmbeddedStore::open(&path) {
        Err(StoreError::Corrupt(_)) => {}
        Err(e) => panic!("expected Corrupt, got {e:?}"),
        Ok(_) => panic!("garbage opened as a store"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_reported_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let store = EmbeddedStore::open(&path).unwrap();
        for i in 0..100 {
            store
                .put(&format!("/k/{i}"), vec![7; 512], None)
                .await
                .unwrap();
        }
    }
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len / 4..len * 3 / 4] {
        *b ^= 0xff;
    }
    std::fs::write(&path, bytes).unwrap();
    match EmbeddedStore::open(&path) {
        Err(StoreError::Corrupt(_)) => {}
        Err(e) => panic!("expected Corrupt, got {e:?}"),
        Ok(_) => panic!("damaged store opened"),
    }
}
