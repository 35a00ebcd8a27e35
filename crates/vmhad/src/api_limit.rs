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
    },
    /// Every slot it may use is busy with a request in progress.
    Refuse,
}

struct Entry {
    operator: bool,
    busy: usize,
    shed: Arc<Notify>,
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
        self.open.insert(
            id,
            Entry {
                operator,
                busy: 0,
                shed: Arc::clone(&shed),
            },
        );
        Admission::Admit { id, shed }
    }

    /// Sheds the oldest idle connection — another user's first, an operator's only if
    /// `operator` — and frees its slot at once; returns its number.
    pub fn shed_oldest_idle(&mut self, operator: bool) -> Option<ConnId> {
        let idle = |want_operator: bool| {
            self.open
                .iter()
                .find(|(_, e)| e.busy == 0 && e.operator == want_operator)
                .map(|(id, _)| *id)
        };
        let victim = idle(false).or_else(|| idle(true).filter(|_| operator))?;
        if let Some(entry) = self.open.remove(&victim) {
            entry.shed.notify_one();
        }
        Some(victim)
    }

    /// A request of connection `id` started (`true`) or ended (`false`).
    pub fn set_busy(&mut self, id: ConnId, started: bool) {
        if let Some(entry) = self.open.get_mut(&id) {
            if started {
                entry.busy += 1;
            } else {
                entry.busy = entry.busy.saturating_sub(1);
            }
        }
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

    fn admit(c: &mut Connections, operator: bool) -> Option<ConnId> {
        match c.admit(operator) {
            Admission::Admit { id, .. } => Some(id),
            Admission::Refuse => None,
        }
    }

    #[test]
    fn others_leave_the_reserved_slots_to_the_operator() {
        let mut c = Connections::default();
        let others: Vec<ConnId> = (0..MAX_CONNECTIONS - RESERVED_FOR_OPERATOR)
            .map(|_| admit(&mut c, false).unwrap())
            .collect();
        for &id in &others {
            c.set_busy(id, true);
        }
        // Every slot of theirs is busy: another user is refused, the operator is not.
        assert!(admit(&mut c, false).is_none());
        for _ in 0..RESERVED_FOR_OPERATOR {
            let id = admit(&mut c, true).unwrap();
            c.set_busy(id, true);
        }
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        // All busy: even the operator must wait; nothing was shed.
        assert!(admit(&mut c, true).is_none());
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        // One of theirs finishes its request: the operator sheds it (idle), not a busy one.
        c.set_busy(others[3], false);
        let id = admit(&mut c, true).unwrap();
        assert!(!c.open.contains_key(&others[3]));
        assert!(c.open.contains_key(&id));
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
    }

    #[test]
    fn a_newcomer_sheds_the_oldest_idle_connection_it_may_shed() {
        let mut c = Connections::default();
        let ops: Vec<ConnId> = (0..RESERVED_FOR_OPERATOR)
            .map(|_| admit(&mut c, true).unwrap())
            .collect();
        let others: Vec<ConnId> = (RESERVED_FOR_OPERATOR..MAX_CONNECTIONS)
            .map(|_| admit(&mut c, false).unwrap())
            .collect();
        // Another user cannot shed the operator's idle connections, only its own kind's.
        c.set_busy(others[0], true);
        let id = admit(&mut c, false).unwrap();
        assert!(!c.open.contains_key(&others[1]), "oldest idle other shed");
        assert!(c.open.contains_key(&others[0]), "a busy one is never shed");
        assert!(ops.iter().all(|o| c.open.contains_key(o)));
        c.set_busy(id, true);
        for &o in &others[2..] {
            c.set_busy(o, true);
        }
        assert!(
            admit(&mut c, false).is_none(),
            "only the operator's are idle"
        );
        // The operator sheds the oldest idle of its own when no other's is idle.
        admit(&mut c, true).unwrap();
        assert!(!c.open.contains_key(&ops[0]));
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
    }

    #[test]
    fn shedding_notifies_the_connection_and_frees_its_slot_once() {
        let mut c = Connections::default();
        let Admission::Admit { id, shed } = c.admit(false) else {
            panic!("refused");
        };
        assert_eq!(c.shed_oldest_idle(true), Some(id));
        assert_eq!(c.open.len(), 0);
        // The permit is stored: the connection sees it even if it was not waiting yet.
        let waited = futures_util::FutureExt::now_or_never(shed.notified());
        assert!(waited.is_some());
        // Its later end (and a stray request end) change nothing.
        c.set_busy(id, false);
        c.remove(id);
        assert_eq!(c.shed_oldest_idle(true), None);
    }
}
