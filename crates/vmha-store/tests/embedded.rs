//! The embedded store: the conformance suite, plus what only a file-backed store has
//! (persistence, restart semantics, the file lock, corruption).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::os::unix::fs::MetadataExt as _;
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

/// A store with some data, as vmhad leaves it; returns its bytes.
async fn good_store(path: &Path) -> Vec<u8> {
    {
        let store = EmbeddedStore::open(path).unwrap();
        for i in 0..100 {
            store
                .put(&format!("/k/{i}"), vec![7; 512], None)
                .await
                .unwrap();
        }
    }
    std::fs::read(path).unwrap()
}

/// The content of `path` if it is a regular file (reading a FIFO would block).
fn read_if_file(path: &Path) -> Option<Vec<u8>> {
    std::fs::metadata(path)
        .is_ok_and(|m| m.is_file())
        .then(|| std::fs::read(path).unwrap())
}

/// Checks that opening `path` is refused as unusable, naming the file and the way to recover,
/// and that nothing at `path` changed.
fn assert_refused(path: &Path, kind: &str) {
    let before = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.len(), m.mode()));
    let bytes_before = read_if_file(path);
    let error = match EmbeddedStore::open(path) {
        Err(e @ StoreError::Unusable { .. }) => e.to_string(),
        Err(e) => panic!("{kind}: expected Unusable, got {e:?}"),
        Ok(_) => panic!("{kind}: opened as a store"),
    };
    for needle in [
        &path.display().to_string()[..],
        "left as it is",
        "restore",
        "remove it to start with an empty store",
        "frozen VMs",
    ] {
        assert!(
            error.contains(needle),
            "{kind}: {needle:?} missing in: {error}"
        );
    }
    let after = std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.len(), m.mode()));
    assert_eq!(before, after, "{kind}: the file was changed");
    assert!(
        bytes_before == read_if_file(path),
        "{kind}: the content was changed"
    );
    let dir = path.parent().unwrap();
    let names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["store.redb"], "{kind}: nothing else is created");
}

/// Every kind of damage, including an empty file (a crashed copy, a full disk), is refused with
/// the file's name and the way to recover, and the file is left as it was: an existing file is
/// never re-initialised as an empty store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_file_that_cannot_be_read_is_refused_and_left_as_it_is() {
    let scratch = tempfile::tempdir().unwrap();
    let good = good_store(&scratch.path().join("store.redb")).await;
    let len = good.len();
    let flip = |range: std::ops::Range<usize>| {
        let mut b = good.clone();
        for x in &mut b[range] {
            *x ^= 0xff;
        }
        b
    };
    let foreign = {
        let path = scratch.path().join("foreign.redb");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def: redb::TableDefinition<&str, &str> = redb::TableDefinition::new("other");
            txn.open_table(def).unwrap().insert("a", "b").unwrap();
        }
        txn.commit().unwrap();
        drop(db);
        std::fs::read(&path).unwrap()
    };
    let mut noise = Vec::with_capacity(len);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        noise.push(x.to_le_bytes()[0]);
    }
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("empty file", Vec::new()),
        ("one byte", good[..1].to_vec()),
        ("half a header", good[..256].to_vec()),
        ("first page only", good[..4096].to_vec()),
        ("truncated to half", good[..len / 2].to_vec()),
        ("zeros", vec![0; len]),
        ("garbage", vec![0x5a; 64 * 1024]),
        ("noise", noise),
        ("header flipped", flip(0..64)),
        ("middle flipped", flip(len / 4..len * 3 / 4)),
        ("a redb database of something else", foreign),
        ("a text file", b"[cluster]\nname = \"c\"\n".to_vec()),
    ];
    for (kind, bytes) in files {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("store.redb");
        std::fs::write(&path, bytes).unwrap();
        assert_refused(&path, kind);
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    std::fs::create_dir(&path).unwrap();
    assert_refused(&path, "a directory");
    std::fs::remove_dir(&path).unwrap();
    std::os::unix::fs::symlink("/nonexistent/store.redb", &path).unwrap();
    assert_refused(&path, "a dangling symlink");
    std::fs::remove_file(&path).unwrap();
    let made = Command::new("mkfifo").arg(&path).status().unwrap();
    assert!(made.success());
    assert_refused(&path, "a FIFO");
}

const CRASH_ENV: &str = "VMHA_STORE_TEST_CRASH";

/// Run by `a_store_left_by_a_crashed_process_opens_with_its_data` in a child process: writes,
/// then dies without closing the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn child_write_and_crash() {
    let Some(path) = std::env::var_os(CRASH_ENV) else {
        return; // Not the child.
    };
    let store = EmbeddedStore::open(path).unwrap();
    store.put("/crash/kept", b"v".to_vec(), None).await.unwrap();
    std::process::abort();
}

/// A store whose process crashed is not damaged: it needs repair, which opening it does; it is
/// not refused as unusable.
#[test]
fn a_store_left_by_a_crashed_process_opens_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_write_and_crash",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_ENV, &path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the child crashed");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    let kept = runtime.block_on(store.get("/crash/kept")).unwrap();
    assert_eq!(kept.unwrap().value, b"v");
}

/// A new store is created only where nothing exists, complete, owner-only (0600 whatever the
/// umask), with no temporary file left; a good store still opens after that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_store_is_created_complete_and_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    good_store(&path).await;
    let mode = std::fs::metadata(&path).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o600, "store mode {mode:o}");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["store.redb"]);
    let store = EmbeddedStore::open(&path).unwrap();
    assert_eq!(store.list("/k/").await.unwrap().kvs.len(), 100);
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

/// A full disk at first start leaves no store file behind (an empty one would be refused at the
/// next start): creating fails cleanly, and works once there is space.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_at_first_start_leaves_no_store_file() {
    let disk = Tmpfs::mount("1m");
    let path = disk.path().join("store.redb");
    let filler = disk.path().join("filler");
    fill(&filler);
    match EmbeddedStore::open(&path) {
        Err(StoreError::Io(_)) => {}
        Err(e) => panic!("expected an I/O error, got {e:?}"),
        Ok(_) => panic!("a store was created on a full disk"),
    }
    let names: Vec<_> = std::fs::read_dir(disk.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["filler"], "nothing is left behind");
    std::fs::remove_file(&filler).unwrap();
    let store = EmbeddedStore::open(&path).unwrap();
    store.put("/a", b"1".to_vec(), None).await.unwrap();
}
