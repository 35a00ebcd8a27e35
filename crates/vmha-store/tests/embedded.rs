//! The embedded store: the conformance suite, plus what only a file-backed store has
//! (persistence, restart semantics, the file lock, corruption).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::{Path, PathBuf};
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

/// Whether this process runs as root (effective uid 0).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?.to_owned();
            line.split_whitespace().nth(2).map(|euid| euid == "0")
        })
        .unwrap_or(false)
}

/// A small tmpfs mounted on a fresh directory, unmounted on drop (also when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        assert!(
            is_root(),
            "this test mounts a {size} tmpfs to fill a disk for real and needs root \
             (CI runs as root): run `cargo test -p vmha-store` as root"
        );
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("vmha-store-test")
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(status.success(), "mount -t tmpfs failed: {status}");
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Something still holds a file there: detach it anyway.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// Writes `path` until the file system is full; returns how many bytes fit.
fn fill(path: &PathBuf) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0xa5; 16 * 1024];
    let mut written = 0;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    // Whatever the page cache holds must hit the (memory-backed) disk too.
    let _ = file.sync_all();
    written
}

/// redb refuses every write after an I/O error until its file is reopened: the store does that by
/// itself, so that once space is free again writes work through the same handle, with leases,
/// revisions and watches intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_work_again_through_the_same_handle_after_the_disk_was_full() {
    let disk = Tmpfs::mount("2m");
    let path = disk.path().join("store.redb");
    let store = EmbeddedStore::open(&path).unwrap();
    let lease = store.grant(Duration::from_secs(600)).await.unwrap();
    store
        .put("/full/leased", b"x".to_vec(), Some(lease.id))
        .await
        .unwrap();
    let before = store.put("/full/kept", b"v".to_vec(), None).await.unwrap();
    let mut watch = store.watch("/full/", before + 1).await.unwrap();

    let filler = disk.path().join("filler");
    fill(&filler);
    let mut accepted = Vec::new();
    let mut failure = None;
    for i in 0..200 {
        match store
            .put(&format!("/full/big/{i:03}"), vec![7; 32 * 1024], None)
            .await
        {
            Ok(revision) => accepted.push(revision),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let failure = failure.expect("writes must fail once the disk is full");
    match &failure {
        StoreError::Io(e) => assert_eq!(
            e.kind(),
            std::io::ErrorKind::StorageFull,
            "a full disk is reported as such: {e}"
        ),
        other => panic!("expected an I/O error, got {other:?}"),
    }
    assert!(failure.to_string().contains("disk full"), "{failure}");
    // While the disk stays full, every write fails cleanly (the store keeps trying to reopen).
    for _ in 0..3 {
        let again = store.put("/full/more", vec![1; 32 * 1024], None).await;
        assert!(matches!(again, Err(StoreError::Io(_))), "{again:?}");
    }
    assert_eq!(
        store.get("/full/kept").await.unwrap().unwrap().value,
        b"v",
        "reads still work"
    );

    std::fs::remove_file(&filler).unwrap();
    let after = store
        .put("/full/after", b"ok".to_vec(), None)
        .await
        .expect("writes work again once space is free, through the same handle");
    assert!(after > accepted.last().copied().unwrap_or(before));
    assert_eq!(
        store.get("/full/after").await.unwrap().unwrap().value,
        b"ok"
    );
    // Leases stayed valid across the reopen and keep binding keys.
    assert_eq!(
        store.keep_alive(lease.id).await.unwrap(),
        Duration::from_secs(600)
    );
    assert!(store.get("/full/leased").await.unwrap().is_some());
    store
        .put("/full/leased2", b"y".to_vec(), Some(lease.id))
        .await
        .unwrap();
    // The watch saw every accepted write, then the new one, in order.
    for revision in accepted.iter().copied().chain([after]) {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event.revision(), revision);
    }
    store.revoke(lease.id).await.unwrap();
    let keys: Vec<String> = store
        .list("/full/")
        .await
        .unwrap()
        .kvs
        .into_iter()
        .filter(|kv| !kv.key.starts_with("/full/big/"))
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        keys,
        ["/full/after", "/full/kept"],
        "revoke deleted the leased keys"
    );

    // The file itself is intact.
    drop(watch);
    drop(store);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(
        store.get("/full/after").await.unwrap().unwrap().value,
        b"ok"
    );
    drop(store);
    drop(disk);
}
