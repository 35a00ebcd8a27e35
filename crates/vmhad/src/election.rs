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

/// Tells the core which host leads, whenever that changes (checked every second).
pub async fn observe<S: ClusterStore>(store: S, election: String, inbox: Inbox) {
    let mut last: Option<Option<Name>> = None;
    loop {
        let now = match store.leader(&election).await {
            Ok(l) => Some(
                l.and_then(|l| String::from_utf8(l.value).ok())
                    .and_then(|s| Name::new(&s).ok()),
            ),
            Err(e) => {
                tracing::debug!("reading the controller election: {e}");
                None
            }
        };
        if let Some(now) = now
            && last.as_ref() != Some(&now)
        {
            if !inbox.send(Msg::Leader(now.clone())).await {
                return;
            }
            last = Some(now);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
