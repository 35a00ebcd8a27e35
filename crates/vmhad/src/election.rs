//! The controller election (SPEC §4.4): every host campaigns with its lease; the winner's
//! term is its leader key's creation revision, which fences every write of the controller (a
//! write carries the condition "this key still exists with this creation revision", so a
//! deposed controller can change nothing). Leadership ends when the leader key goes (lease
//! ended, resigned) or this host's lease changes; the host then campaigns again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use vmha_model::Name;
use vmha_store::{ClusterStore, Compare, Leader, LeaseId, StoreError, WatchEvent, WatchStream};

use crate::inbox::{Inbox, Msg};

/// This host's leadership, for the committer's fence.
#[derive(Debug, Default)]
pub struct Leadership {
    leader: Mutex<Option<Leader>>,
}

impl Leadership {
    fn set(&self, leader: Option<Leader>) {
        if let Ok(mut l) = self.leader.lock() {
            *l = leader;
        }
    }

    /// The fencing condition of term `term`, if this host leads in it.
    pub fn fence(&self, term: u64) -> Option<Compare> {
        let l = self.leader.lock().ok()?;
        let leader = l.as_ref().filter(|l| l.revision == term)?;
        Some(Compare::CreateRevision {
            key: leader.key.clone(),
            revision: leader.revision,
        })
    }
}

/// Campaigns for this host until the daemon exits.
pub async fn run<S: ClusterStore>(
    store: S,
    election: String,
    me: Name,
    mut lease_rx: watch::Receiver<Option<LeaseId>>,
    inbox: Inbox,
    leadership: Arc<Leadership>,
) {
    loop {
        let lease = *lease_rx.borrow_and_update();
        let Some(lease) = lease else {
            if lease_rx.changed().await.is_err() {
                return;
            }
            continue;
        };
        let campaign = store.campaign(&election, me.to_string().into_bytes(), lease);
        let won = tokio::select! {
            won = campaign => won,
            changed = lease_rx.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
        };
        match won {
            Ok(leader) => {
                tracing::info!(term = leader.revision, "elected cluster controller");
                leadership.set(Some(leader.clone()));
                if !inbox.send(Msg::Leadership(Some(leader.revision))).await {
                    return;
                }
                wait_lost(&store, &leader, &mut lease_rx).await;
                leadership.set(None);
                tracing::warn!(term = leader.revision, "no longer the cluster controller");
                if !inbox.send(Msg::Leadership(None)).await {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!("controller election: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Returns once `leader`'s key is gone or this host's lease changed.
async fn wait_lost<S: ClusterStore>(
    store: &S,
    leader: &Leader,
    lease_rx: &mut watch::Receiver<Option<LeaseId>>,
) {
    loop {
        match store.get(&leader.key).await {
            Ok(Some(kv)) if kv.create_revision == leader.revision => {}
            Ok(_) => return,
            Err(e) => tracing::debug!("checking the leader key: {e}"),
        }
        let watch = store.watch(&leader.key, leader.revision).await;
        let gone = async {
            match watch {
                Ok(mut w) => loop {
                    match w.next().await {
                        Ok(WatchEvent::Delete { key, .. }) if key == leader.key => return true,
                        Ok(_) => {}
                        Err(StoreError::Compacted { .. }) | Err(_) => return false,
                    }
                },
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    false
                }
            }
        };
        tokio::select! {
            gone = gone => if gone { return },
            _ = lease_rx.changed() => return,
        }
    }
}

/// How long the observer trusts its watch without reading the election again: a missed event
/// or a watch that broke silently hides a change of leader for at most this long.
const OBSERVE_SAFETY: Duration = Duration::from_secs(10);
/// Pause after a failed read or watch, so that a failing store is not hammered.
const OBSERVE_RETRY: Duration = Duration::from_secs(1);

/// Tells the core which host leads, whenever that changes: read at start, again as soon as
/// anything changes under the election's candidates (a watch), and at least every
/// [`OBSERVE_SAFETY`]. An idle cluster costs one watch per host, not a read per second.
pub async fn observe<S: ClusterStore>(store: S, election: String, inbox: Inbox) {
    let candidates = vmha_store::election::candidates_prefix(&election);
    let mut last: Option<Option<Name>> = None;
    loop {
        let from = match vmha_store::election::leader_at(&store, &election).await {
            Ok((leader, revision)) => {
                let now = leader
                    .and_then(|l| String::from_utf8(l.value).ok())
                    .and_then(|s| Name::new(&s).ok());
                if last.as_ref() != Some(&now) {
                    if !inbox.send(Msg::Leader(now.clone())).await {
                        return;
                    }
                    last = Some(now);
                }
                Some(revision.saturating_add(1))
            }
            Err(e) => {
                tracing::debug!("reading the controller election: {e}");
                None
            }
        };
        let changed = async {
            let Some(from) = from else {
                tokio::time::sleep(OBSERVE_RETRY).await;
                return;
            };
            let failed = match store.watch(&candidates, from).await {
                Ok(mut watch) => watch.next().await.is_err(),
                Err(_) => true,
            };
            if failed {
                tokio::time::sleep(OBSERVE_RETRY).await;
            }
        };
        // Whatever ended the wait (a change, a failure, the safety period), read again.
        let _ = tokio::time::timeout(OBSERVE_SAFETY, changed).await;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmha_store::EmbeddedStore;

    async fn next_leader(rx: &mut tokio::sync::mpsc::Receiver<Msg>) -> Option<Name> {
        match rx.recv().await {
            Some(Msg::Leader(leader)) => leader,
            _ => panic!("expected a Leader message"),
        }
    }

    /// A change of leader reaches the core as it happens (through the watch): on the paused
    /// clock no time passes between the change and the message, where polling would have
    /// waited for its next read.
    #[tokio::test(start_paused = true)]
    async fn the_observer_reports_each_change_of_leader_as_it_happens() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path().join("store.redb")).unwrap();
        let (inbox, mut rx) = crate::inbox::channel();
        tokio::spawn(observe(store.clone(), "vmha/election".into(), inbox));
        assert_eq!(next_leader(&mut rx).await, None);

        let a = store.grant(Duration::from_secs(600)).await.unwrap();
        let started = tokio::time::Instant::now();
        let leader = store
            .campaign("vmha/election", b"kvm1".to_vec(), a.id)
            .await
            .unwrap();
        assert_eq!(next_leader(&mut rx).await, Some(Name::new("kvm1").unwrap()));

        let b = store.grant(Duration::from_secs(600)).await.unwrap();
        let waiting = tokio::spawn({
            let store = store.clone();
            async move {
                store
                    .campaign("vmha/election", b"kvm2".to_vec(), b.id)
                    .await
            }
        });
        store.resign(&leader).await.unwrap();
        // Whether kvm2's candidacy is written before kvm1 resigns is up to the scheduler; if
        // it is not, the observer rightly reports the moment with no leader first.
        let mut seen = next_leader(&mut rx).await;
        if seen.is_none() {
            seen = next_leader(&mut rx).await;
        }
        assert_eq!(seen, Some(Name::new("kvm2").unwrap()));
        assert!(waiting.await.unwrap().is_ok());
        assert!(
            started.elapsed() < OBSERVE_RETRY,
            "the changes were seen by polling, after {:?}",
            started.elapsed()
        );
    }
}
