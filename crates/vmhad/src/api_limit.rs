//! Which API connections vmhad keeps open. At most [`MAX_CONNECTIONS`] at once; the last
//! [`RESERVED_FOR_OPERATOR`] of them only for the operator (root, or vmhad's own user, as the
//! socket's peer credentials say), so other users of the socket's group cannot lock the
//! operator out. When a newcomer finds no free slot, the oldest idle connection (no request in
//! progress: just connected, half-sent head, keep-alive) is shed to make room — an operator
//! sheds anybody's (others' first), anybody else only others'; when none is idle the newcomer
//! is refused with 503 `too-many-connections`. Requests in progress are never shed: they end
//! by themselves or by their timeouts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::Notify;

/// The most API connections open at once.
pub const MAX_CONNECTIONS: usize = 64;

/// Of [`MAX_CONNECTIONS`], how many only the operator (root or vmhad's user) may use.
pub const RESERVED_FOR_OPERATOR: usize = 8;

/// A connection's number, in order of admission.
pub type ConnId = u64;

/// What to do with a new connection.
#[derive(Debug)]
pub enum Admission {
    /// Serve it; `shed` is told when it must close to make room for a newer one.
    Admit {
        /// Its number.
        id: ConnId,
        /// Notified (once) when the connection is shed.
        shed: Arc<Notify>,
        /// How many of its requests are in progress (kept up to date by the connection); a
        /// connection is idle, and may be shed, when it is 0.
        busy: Arc<AtomicUsize>,
    },
    /// Every slot it may use is busy with a request in progress.
    Refuse,
}

struct Entry {
    operator: bool,
    busy: Arc<AtomicUsize>,
    shed: Arc<Notify>,
}

impl Entry {
    fn idle(&self) -> bool {
        self.busy.load(Ordering::SeqCst) == 0
    }
}

/// The open API connections, and whether each has a request in progress.
#[derive(Default)]
pub struct Connections {
    next: ConnId,
    open: BTreeMap<ConnId, Entry>,
}

impl Connections {
    /// Admits a connection of an operator (`operator`) or another user, shedding the oldest
    /// idle connection it may shed when it finds no free slot.
    pub fn admit(&mut self, operator: bool) -> Admission {
        let others = self.open.values().filter(|e| !e.operator).count();
        let full = self.open.len() >= MAX_CONNECTIONS
            || (!operator && others >= MAX_CONNECTIONS - RESERVED_FOR_OPERATOR);
        if full && self.shed_oldest_idle(operator).is_none() {
            return Admission::Refuse;
        }
        let id = self.next;
        self.next += 1;
        let shed = Arc::new(Notify::new());
        let busy = Arc::new(AtomicUsize::new(0));
        self.open.insert(
            id,
            Entry {
                operator,
                busy: Arc::clone(&busy),
                shed: Arc::clone(&shed),
            },
        );
        Admission::Admit { id, shed, busy }
    }

    /// Sheds the oldest idle connection — another user's first, an operator's only if
    /// `operator` — and frees its slot at once; returns its number.
    pub fn shed_oldest_idle(&mut self, operator: bool) -> Option<ConnId> {
        let idle = |want_operator: bool| {
            self.open
                .iter()
                .find(|(_, e)| e.idle() && e.operator == want_operator)
                .map(|(id, _)| *id)
        };
        let victim = idle(false).or_else(|| idle(true).filter(|_| operator))?;
        if let Some(entry) = self.open.remove(&victim) {
            entry.shed.notify_one();
        }
        Some(victim)
    }

    /// Connection `id` closed (a shed one was removed already).
    pub fn remove(&mut self, id: ConnId) {
        self.open.remove(&id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Admitted connections' numbers and busy counters.
    #[derive(Default)]
    struct Busy(BTreeMap<ConnId, Arc<AtomicUsize>>);

    impl Busy {
        fn set(&self, id: ConnId, busy: bool) {
            self.0[&id].store(usize::from(busy), Ordering::SeqCst);
        }
    }

    fn admit(c: &mut Connections, b: &mut Busy, operator: bool) -> Option<ConnId> {
        match c.admit(operator) {
            Admission::Admit { id, busy, .. } => {
                b.0.insert(id, busy);
                Some(id)
            }
            Admission::Refuse => None,
        }
    }

    #[test]
    fn others_leave_the_reserved_slots_to_the_operator() {
        let mut c = Connections::default();
        let mut b = Busy::default();
        let others: Vec<ConnId> = (0..MAX_CONNECTIONS - RESERVED_FOR_OPERATOR)
            .map(|_| admit(&mut c, &mut b, false).unwrap())
            .collect();
        for &id in &others {
            b.set(id, true);
        }
        // Every slot of theirs is busy: another user is refused, the operator is not.
        assert!(admit(&mut c, &mut b, false).is_none());
        for _ in 0..RESERVED_FOR_OPERATOR {
            let id = admit(&mut c, &mut b, true).unwrap();
            b.set(id, true);
        }
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        // All busy: even the operator must wait; nothing was shed.
        assert!(admit(&mut c, &mut b, true).is_none());
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        // One of theirs finishes its request: the operator sheds it (idle), not a busy one.
        b.set(others[3], false);
        let id = admit(&mut c, &mut b, true).unwrap();
        assert!(!c.open.contains_key(&others[3]));
        assert!(c.open.contains_key(&id));
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
    }

    #[test]
    fn a_newcomer_sheds_the_oldest_idle_connection_it_may_shed() {
        let mut c = Connections::default();
        let mut b = Busy::default();
        let ops: Vec<ConnId> = (0..RESERVED_FOR_OPERATOR)
            .map(|_| admit(&mut c, &mut b, true).unwrap())
            .collect();
        let others: Vec<ConnId> = (RESERVED_FOR_OPERATOR..MAX_CONNECTIONS)
            .map(|_| admit(&mut c, &mut b, false).unwrap())
            .collect();
        // Another user cannot shed the operator's idle connections, only its own kind's.
        b.set(others[0], true);
        let id = admit(&mut c, &mut b, false).unwrap();
        assert!(!c.open.contains_key(&others[1]), "oldest idle other shed");
        assert!(c.open.contains_key(&others[0]), "a busy one is never shed");
        assert!(ops.iter().all(|o| c.open.contains_key(o)));
        b.set(id, true);
        for &o in &others[2..] {
            b.set(o, true);
        }
        assert!(
            admit(&mut c, &mut b, false).is_none(),
            "only the operator's are idle"
        );
        // The operator sheds the oldest idle of its own when no other's is idle.
        admit(&mut c, &mut b, true).unwrap();
        assert!(!c.open.contains_key(&ops[0]));
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
    }

    #[test]
    fn shedding_notifies_the_connection_and_frees_its_slot_once() {
        let mut c = Connections::default();
        let Admission::Admit { id, shed, .. } = c.admit(false) else {
            panic!("refused");
        };
        assert_eq!(c.shed_oldest_idle(true), Some(id));
        assert_eq!(c.open.len(), 0);
        // The permit is stored: the connection sees it even if it was not waiting yet.
        let waited = futures_util::FutureExt::now_or_never(shed.notified());
        assert!(waited.is_some());
        // Its later end changes nothing.
        c.remove(id);
        assert_eq!(c.shed_oldest_idle(true), None);
    }
}
