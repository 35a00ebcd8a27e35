//! Elections built on the key-value primitives, the way etcd's election service does it: each
//! candidate creates `<election>/<lease>` bound to its lease; the candidate whose key has the
//! lowest create revision leads; the others wait for the key just before theirs to go away.
//!
//! Both stores use this, so elections behave the same on both. etcd's own election service keeps
//! the same keys, but its `Campaign` blocks server-side with no deadline of ours, and it opens a
//! server-side session on the candidate's lease (which may renew that lease as a side effect);
//! here every step is an ordinary store call with the store's deadline, and the lease lives only
//! as long as its owner keeps it alive.
//!
//! Cancelling [`campaign`] (dropping its future) leaves the candidate key bound to the lease: it
//! blocks nothing, a later campaign with the same lease resumes that candidacy (keeping its
//! place), and it vanishes with the lease or with [`resign`].

use std::time::Duration;

use crate::store::{
    CasOutcome, ClusterStore, Expect, KeyValue, Leader, LeaseId, Mutation, Revision, StoreError,
    WatchEvent, WatchStream,
};

/// Pause before re-listing after a campaign's watch failed, so that a store whose watches keep
/// failing is not hammered.
const REWATCH_PAUSE: Duration = Duration::from_millis(100);

/// How often `resign` reads the key again after its delete failed with `Unavailable`.
const RESIGN_RETRIES: u32 = 2;

/// The prefix under which `election`'s candidates keep their keys: any change of candidacy (and
/// so of leadership) is a change under it.
pub fn candidates_prefix(election: &str) -> String {
    format!("{election}/")
}

fn as_leader(election: &str, kv: KeyValue) -> Option<Leader> {
    Some(Leader {
        election: election.to_owned(),
        lease: kv.lease?,
        revision: kv.create_revision,
        key: kv.key,
        value: kv.value,
    })
}

/// Campaigns until `lease`'s candidate key is the oldest in the election; see
/// [`ClusterStore::campaign`]. Fails with [`StoreError::LeaseExpired`] if the candidate key
/// disappears while waiting (lease ended or resigned).
pub async fn campaign<S: ClusterStore>(
    store: &S,
    election: &str,
    value: Vec<u8>,
    lease: LeaseId,
) -> Result<Leader, StoreError> {
    if election.is_empty() {
        return Err(StoreError::InvalidArgument("empty election name".into()));
    }
    let prefix = candidates_prefix(election);
    let key = format!("{prefix}{lease}");
    // Creates the candidate key, or resumes a candidacy with the same lease: a put keeps the key's
    // create revision, hence its place. Unconditional, so a store may re-send it after an attempt
    // went unanswered (a conditional create could not be: its second attempt would fail).
    store.put(&key, value, Some(lease)).await?;
    loop {
        let listing = store.list(&prefix).await?;
        let mut candidates: Vec<KeyValue> = listing
            .kvs
            .into_iter()
            .filter(|kv| kv.lease.is_some())
            .collect();
        candidates.sort_by_key(|kv| kv.create_revision);
        let Some(pos) = candidates.iter().position(|kv| kv.key == key) else {
            return Err(StoreError::LeaseExpired { lease });
        };
        if pos == 0 {
            let ours = candidates.swap_remove(0);
            return as_leader(election, ours).ok_or(StoreError::LeaseExpired { lease });
        }
        let predecessor = candidates.swap_remove(pos - 1).key;
        let mut watch = store.watch(&prefix, listing.revision + 1).await?;
        loop {
            match watch.next().await {
                Ok(WatchEvent::Delete { key: gone, .. }) if gone == predecessor || gone == key => {
                    break;
                }
                Ok(_) => {}
                // Lagged or compacted: re-list.
                Err(StoreError::Lagged { .. } | StoreError::Compacted { .. }) => break,
                // The watch lost its stream (e.g. an etcd member went away): re-list, which
                // fails in turn if the store itself is unreachable.
                Err(StoreError::Unavailable(reason)) => {
                    tracing::debug!(election, %reason, "campaign watch failed; re-listing");
                    tokio::time::sleep(REWATCH_PAUSE).await;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The candidate with the oldest key; see [`ClusterStore::leader`].
pub async fn leader<S: ClusterStore>(
    store: &S,
    election: &str,
) -> Result<Option<Leader>, StoreError> {
    Ok(leader_at(store, election).await?.0)
}

/// The leader of `election` (as [`leader`]) and the revision it was read at: a watch of
/// [`candidates_prefix`] from that revision + 1 sees every later change of leadership.
pub async fn leader_at<S: ClusterStore>(
    store: &S,
    election: &str,
) -> Result<(Option<Leader>, Revision), StoreError> {
    let listing = store.list(&candidates_prefix(election)).await?;
    let leader = listing
        .kvs
        .into_iter()
        .filter(|kv| kv.lease.is_some())
        .min_by_key(|kv| kv.create_revision)
        .and_then(|kv| as_leader(election, kv));
    Ok((leader, listing.revision))
}

/// Deletes the leader's key if it is still the same term; see [`ClusterStore::resign`].
///
/// The delete is a compare-and-swap, which a networked store does not re-send once its outcome is
/// unknown; such an `Unavailable` is retried here (a few times) after reading the key again, which
/// tells whether the delete was applied.
pub async fn resign<S: ClusterStore>(store: &S, leader: &Leader) -> Result<(), StoreError> {
    let mut unknown_outcomes = 0;
    loop {
        let Some(current) = store.get(&leader.key).await? else {
            return Ok(());
        };
        if current.create_revision != leader.revision {
            return Ok(());
        }
        let outcome = store
            .compare_and_swap(
                &leader.key,
                Expect::Revision(current.mod_revision),
                Mutation::Delete,
            )
            .await;
        match outcome {
            Ok(CasOutcome::Swapped { .. }) => return Ok(()),
            Ok(CasOutcome::Conflict { .. }) => {}
            Err(StoreError::Unavailable(_)) if unknown_outcomes < RESIGN_RETRIES => {
                unknown_outcomes += 1;
            }
            Err(e) => return Err(e),
        }
    }
}
