//! The daemon's mapping between the cluster store's keys and the engine's typed records
//! (`vmha_engine::records`), both ways: stored keys decode into [`Record`]s, forwarded
//! commands and their replies; a [`Persist`] encodes into store transactions.
//!
//! Anything read from the store is checked: a value that does not decode is logged and
//! skipped, never trusted half-way.

use serde::{Deserialize, Serialize};
use vmha_engine::{
    AdminCommand, CommandError, ControllerState, Event, HostMember, HostReport, NodeState,
    OwnerRecord, Persist, Record, VmAdmin, VmSettings,
};
use vmha_model::Name;
use vmha_store::layout::{Layout, LayoutError, Target, VmRecord};
use vmha_store::{Compare, KeyValue, LeaseId, MAX_TXN_OPS, Op};

use crate::inbox::Request;

/// Writes per transaction for events and reports (below the store's limit, leaving room).
const CHUNK: usize = MAX_TXN_OPS - 8;

/// How many events each host keeps in its stream.
pub const EVENTS_KEPT: u64 = 10_000;

/// Errors encoding a commit.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// A name cannot be used in a key.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A value does not encode as JSON.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What.
        what: &'static str,
        /// Why.
        source: serde_json::Error,
    },
    /// The final transaction would carry more writes than the store takes at once.
    #[error("a commit of {0} writes is more than one store transaction takes ({MAX_TXN_OPS})")]
    TooLarge(usize),
}

/// A host's membership record as stored under `hosts/<host>` (bound to its lease).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredMember {
    /// Memory available to VMs in MiB.
    pub memory_mb: u64,
    /// vmhad's version.
    pub version: String,
}

/// A forwarded command as stored under `requests/<target>/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRequest {
    /// The host that forwarded it (and waits for the reply).
    pub from: Name,
    /// The command.
    pub command: AdminCommand,
}

/// The answer to a forwarded command, under `replies/<id>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredReply {
    /// The outcome.
    pub result: Result<(), CommandError>,
}

/// One stored key, decoded.
#[derive(Debug)]
pub enum Decoded {
    /// An engine record (present, or absent for a deletion).
    Record(Record),
    /// A forwarded command for this host or for the controller.
    Request(Request),
    /// A forwarded command is gone (answered, withdrawn, or its sender's lease ended).
    RequestGone(String),
    /// The answer to a command this host forwarded.
    Reply {
        /// Request id.
        id: String,
        /// The answer (`None`: deleted).
        reply: Option<StoredReply>,
    },
    /// The stored cluster configuration (`None`: deleted).
    Config(Option<String>),
    /// Nothing the core needs (events, elections, other hosts' requests).
    Ignored,
}

fn json<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Option<T> {
    match serde_json::from_slice(&kv.value) {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::warn!(key = %kv.key, "ignoring a stored record that does not decode: {e}");
            None
        }
    }
}

fn name(s: &str) -> Option<Name> {
    Name::new(s).ok()
}

/// Decodes the key `kv` (a put) as seen by host `me`.
pub fn decode_put(layout: &Layout, me: &Name, kv: &KeyValue) -> Decoded {
    decode(layout, me, &kv.key, Some(kv))
}

/// Decodes the deletion of `key` as seen by host `me`.
pub fn decode_delete(layout: &Layout, me: &Name, key: &str) -> Decoded {
    decode(layout, me, key, None)
}

fn decode(layout: &Layout, me: &Name, key: &str, kv: Option<&KeyValue>) -> Decoded {
    if let Some(host) = layout.parse_host(key).and_then(name) {
        // A membership record is there while its lease lives: one this version cannot read
        // (another version wrote it) is still a live member, of unknown memory.
        let member = kv.map(|kv| HostMember {
            memory_mb: json::<StoredMember>(kv).map(|m| m.memory_mb),
            incarnation: kv.lease.map_or(0, |l| l.0.unsigned_abs()),
        });
        return Decoded::Record(Record::Host { host, member });
    }
    if let Some((vm, which)) = layout.parse_vm(key) {
        let Some(vm) = name(vm) else {
            return Decoded::Ignored;
        };
        let record = match which {
            VmRecord::Owner => Record::Owner {
                vm,
                record: kv.and_then(json::<OwnerRecord>),
                revision: kv.map_or(0, |kv| kv.mod_revision),
            },
            VmRecord::State => Record::Report {
                vm,
                report: kv.and_then(json::<HostReport>),
            },
            VmRecord::Admin => Record::Admin {
                vm,
                admin: kv.and_then(json::<VmAdmin>),
            },
            VmRecord::Settings => Record::Settings {
                vm,
                settings: kv.and_then(json::<VmSettings>),
            },
        };
        return Decoded::Record(record);
    }
    if let Some(host) = layout.parse_agent_state(key).and_then(name) {
        let state = kv.and_then(json::<NodeState>);
        return Decoded::Record(Record::Agent { host, state });
    }
    if key == layout.controller_state() {
        let state = kv.and_then(json::<ControllerState>);
        return Decoded::Record(Record::Controller { state });
    }
    if let Some((target, id)) = layout.parse_request(key) {
        let for_controller = match target {
            Target::Controller => true,
            Target::Host(h) if h == me.as_str() => false,
            Target::Host(_) => return Decoded::Ignored,
        };
        let Some(kv) = kv else {
            return Decoded::RequestGone(id.to_string());
        };
        let Some(stored) = json::<StoredRequest>(kv) else {
            return Decoded::Ignored;
        };
        return Decoded::Request(Request {
            id: id.to_string(),
            key: key.to_string(),
            revision: kv.mod_revision,
            for_controller,
            command: stored.command,
        });
    }
    if key == layout.config() {
        let text = kv.and_then(|kv| String::from_utf8(kv.value.clone()).ok());
        return Decoded::Config(text);
    }
    if let Some(id) = layout.parse_reply(key) {
        return Decoded::Reply {
            id: id.to_string(),
            reply: kv.and_then(json::<StoredReply>),
        };
    }
    Decoded::Ignored
}

fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, CodecError> {
    serde_json::to_vec(value).map_err(|source| CodecError::Encode { what, source })
}

/// One store transaction: conditions and writes.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    /// Conditions.
    pub compares: Vec<Compare>,
    /// Writes.
    pub ops: Vec<Op>,
}

/// What the commit of a [`Persist`] needs besides it.
pub struct CommitContext<'a> {
    /// This host.
    pub host: &'a Name,
    /// The controller's fencing condition when the persist holds controller writes: its
    /// leader key must still exist with the term's creation revision.
    pub fence: Option<Compare>,
    /// The requests being answered (looked up by id).
    pub requests: &'a dyn Fn(&str) -> Option<(String, u64)>,
}

/// The transactions that commit `persist`, in order: events and reports first, in chunks
/// (they only describe); the last one holds what decides — this host's state, settings, the
/// controller's records (fenced by its term) and the replies to forwarded commands (each
/// consuming its request, which must be unchanged). Acknowledged replies are thus never ahead
/// of the state they report.
pub fn commit_txns(
    layout: &Layout,
    persist: &Persist,
    ctx: &CommitContext<'_>,
) -> Result<Vec<Txn>, CodecError> {
    let host = ctx.host.as_str();
    let mut txns = Vec::new();
    let mut puts = Vec::new();
    for (seq, event) in &persist.events {
        puts.push(Op::Put {
            key: layout.host_event(host, *seq)?,
            value: encode::<Event>("an event", event)?,
            lease: None,
        });
    }
    for (vm, report) in &persist.reports {
        puts.push(Op::Put {
            key: layout.vm_state(vm.as_str())?,
            value: encode("a report", report)?,
            lease: None,
        });
    }
    for chunk in puts.chunks(CHUNK) {
        txns.push(Txn {
            compares: Vec::new(),
            ops: chunk.to_vec(),
        });
    }
    let mut last = Txn::default();
    if let Some(node) = &persist.node {
        last.ops.push(Op::Put {
            key: layout.agent_state(host)?,
            value: encode("this host's state", node)?,
            lease: None,
        });
        // Keep the newest events of this host's stream.
        if let Some(first_kept) = node.next_event.checked_sub(EVENTS_KEPT)
            && first_kept > 0
        {
            last.ops.push(Op::DeleteRange {
                start: layout.host_event(host, 0)?,
                end: layout.host_event(host, first_kept)?,
            });
        }
    }
    for (vm, settings) in &persist.settings {
        last.ops.push(Op::Put {
            key: layout.vm_settings(vm.as_str())?,
            value: encode("run-time settings", settings)?,
            lease: None,
        });
    }
    if let Some(c) = &persist.controller {
        if let Some(fence) = &ctx.fence {
            last.compares.push(fence.clone());
        }
        if let Some(state) = &c.state {
            last.ops.push(Op::Put {
                key: layout.controller_state(),
                value: encode("the controller's state", state)?,
                lease: None,
            });
        }
        for (vm, admin) in &c.admin {
            last.ops.push(Op::Put {
                key: layout.vm_admin(vm.as_str())?,
                value: encode("an admin record", admin)?,
                lease: None,
            });
        }
    }
    for (id, result) in &persist.replies {
        let reply = StoredReply {
            result: result.clone(),
        };
        if let Some((key, revision)) = (ctx.requests)(id) {
            last.compares.push(Compare::ModRevision {
                key: key.clone(),
                revision,
            });
            last.ops.push(Op::Delete { key });
        }
        last.ops.push(Op::Put {
            key: layout.reply(id)?,
            value: encode("a reply", &reply)?,
            lease: None,
        });
    }
    if last.ops.len() > MAX_TXN_OPS {
        return Err(CodecError::TooLarge(last.ops.len()));
    }
    if !last.ops.is_empty() {
        txns.push(last);
    }
    Ok(txns)
}

/// The membership record of this host, bound to `lease`.
pub fn member_op(
    layout: &Layout,
    host: &Name,
    memory_mb: u64,
    lease: LeaseId,
) -> Result<Op, CodecError> {
    let member = StoredMember {
        memory_mb,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    Ok(Op::Put {
        key: layout.host(host.as_str())?,
        value: encode("the membership record", &member)?,
        lease: Some(lease),
    })
}

/// A forwarded command to write under `requests/<target>/<id>`, bound to the sender's lease
/// (it vanishes with the sender).
pub fn request_op(
    layout: &Layout,
    target: Target<'_>,
    id: &str,
    request: &StoredRequest,
    lease: Option<LeaseId>,
) -> Result<Op, CodecError> {
    Ok(Op::Put {
        key: layout.request(target, id)?,
        value: encode("a forwarded command", request)?,
        lease,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use vmha_engine::{ControllerPersist, Desired, ObjectRef, Origin, Timestamp, VmReport};
    use vmha_model::VmState;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    fn kv(key: String, value: Vec<u8>, revision: u64, lease: Option<i64>) -> KeyValue {
        KeyValue {
            key,
            value,
            create_revision: revision,
            mod_revision: revision,
            lease: lease.map(LeaseId),
        }
    }

    #[test]
    fn records_decode_from_their_keys() {
        let l = Layout::new("c").unwrap();
        let me = n("kvm1");
        let member = serde_json::to_vec(&StoredMember {
            memory_mb: 512,
            version: "x".into(),
        })
        .unwrap();
        match decode_put(&l, &me, &kv(l.host("kvm2").unwrap(), member, 3, Some(42))) {
            Decoded::Record(Record::Host { host, member }) => {
                assert_eq!(host, n("kvm2"));
                let m = member.unwrap();
                assert_eq!((m.memory_mb, m.incarnation), (Some(512), 42));
            }
            other => panic!("{other:?}"),
        }
        let owner = OwnerRecord {
            owner: Some(n("kvm1")),
            desired: Desired::Run,
            move_to: None,
            parked: false,
            migrate: None,
        };
        let v = serde_json::to_vec(&owner).unwrap();
        match decode_put(&l, &me, &kv(l.vm_owner("shop").unwrap(), v, 9, None)) {
            Decoded::Record(Record::Owner {
                record, revision, ..
            }) => {
                assert_eq!(record, Some(owner));
                assert_eq!(revision, 9);
            }
            other => panic!("{other:?}"),
        }
        // A deletion is an absent record; garbage is skipped, not trusted.
        assert!(matches!(
            decode_delete(&l, &me, &l.vm_admin("shop").unwrap()),
            Decoded::Record(Record::Admin { admin: None, .. })
        ));
        let junk = kv(
            l.vm_settings("shop").unwrap(),
            b"{not json".to_vec(),
            2,
            None,
        );
        assert!(matches!(
            decode_put(&l, &me, &junk),
            Decoded::Record(Record::Settings { settings: None, .. })
        ));
        // A membership this version cannot read is still a live member (its lease lives).
        let odd = kv(l.host("kvm3").unwrap(), b"{\"v\":2}".to_vec(), 4, Some(7));
        match decode_put(&l, &me, &odd) {
            Decoded::Record(Record::Host { member, .. }) => {
                let m = member.unwrap();
                assert_eq!((m.memory_mb, m.incarnation), (None, 7));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn requests_for_other_hosts_are_ignored() {
        let l = Layout::new("c").unwrap();
        let me = n("kvm1");
        let req = serde_json::to_vec(&StoredRequest {
            from: n("kvm3"),
            command: AdminCommand::Freeze { vm: n("shop") },
        })
        .unwrap();
        let mine = kv(
            l.request(Target::Host("kvm1"), "r1").unwrap(),
            req.clone(),
            5,
            None,
        );
        let ctl = kv(
            l.request(Target::Controller, "r2").unwrap(),
            req.clone(),
            6,
            None,
        );
        let other = kv(l.request(Target::Host("kvm2"), "r3").unwrap(), req, 7, None);
        assert!(matches!(
            decode_put(&l, &me, &mine),
            Decoded::Request(Request {
                for_controller: false,
                revision: 5,
                ..
            })
        ));
        assert!(matches!(
            decode_put(&l, &me, &ctl),
            Decoded::Request(Request {
                for_controller: true,
                ..
            })
        ));
        assert!(matches!(decode_put(&l, &me, &other), Decoded::Ignored));
    }

    #[test]
    fn the_decisive_writes_go_last_fenced_and_consuming_their_requests() {
        let l = Layout::new("c").unwrap();
        let host = n("kvm1");
        let event = Event {
            time: Timestamp(1),
            origin: Origin::Host(host.clone()),
            object: ObjectRef::Vm(n("shop")),
            from: "a".into(),
            to: "b".into(),
            reason: "r".into(),
        };
        let persist = Persist {
            node: Some(NodeState::default()),
            reports: vec![(
                n("shop"),
                HostReport {
                    host: host.clone(),
                    incarnation: 1,
                    report: VmReport {
                        state: VmState::Online,
                        running: true,
                        reason: String::new(),
                        revision: 1,
                        migration: None,
                    },
                },
            )],
            events: (0..300).map(|s| (s, event.clone())).collect(),
            controller: Some(ControllerPersist {
                term: 7,
                state: Some(ControllerState::default()),
                admin: vec![],
            }),
            replies: vec![("r1".into(), Ok(()))],
            ..Persist::default()
        };
        let fence = Compare::CreateRevision {
            key: "leader".into(),
            revision: 7,
        };
        let lookup = |id: &str| (id == "r1").then(|| ("req-key".to_string(), 11));
        let ctx = CommitContext {
            host: &host,
            fence: Some(fence.clone()),
            requests: &lookup,
        };
        let txns = commit_txns(&l, &persist, &ctx).unwrap();
        assert!(txns.len() >= 4, "301 describing writes take several chunks");
        assert!(txns.iter().all(|t| t.ops.len() <= MAX_TXN_OPS));
        let last = txns.last().unwrap();
        assert!(last.compares.contains(&fence));
        assert!(last.compares.contains(&Compare::ModRevision {
            key: "req-key".into(),
            revision: 11
        }));
        assert!(last.ops.contains(&Op::Delete {
            key: "req-key".into()
        }));
        assert!(
            last.ops.iter().any(
                |op| matches!(op, Op::Put { key, .. } if *key == l.agent_state("kvm1").unwrap())
            )
        );
        for t in &txns[..txns.len() - 1] {
            assert!(t.compares.is_empty());
        }
    }
}
