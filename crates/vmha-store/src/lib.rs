//! vmha-store: the cluster store.
//!
//! - [`store`]: the [`ClusterStore`] trait and its types — the contract shared by the embedded
//!   store and the etcd store.
//! - [`embedded`]: [`EmbeddedStore`], a single-host store in one redb file.
//! - [`etcd`]: [`EtcdStore`], the multi-host store on an etcd 3.4 cluster.
//! - [`election`]: elections on top of the key-value primitives (used by both stores).
//! - [`layout`]: where vmha keeps what under `/vmha/<cluster>/`.
//! - [`records`]: typed (JSON) access to those keys and the [`records::EventLog`].
//! - `conformance` (feature `testkit`): the behaviour suite every store must pass.
//! - `testkit` (feature `testkit`): a real `etcd` (one member or a cluster) for tests.

#[cfg(feature = "testkit")]
pub mod conformance;
pub mod election;
pub mod embedded;
pub mod etcd;
pub mod layout;
pub mod records;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
mod txn;

pub use embedded::{EmbeddedStore, EmbeddedWatch};
pub use etcd::{EtcdOptions, EtcdStore, EtcdWatch};
pub use store::{
    CasOutcome, ClusterStore, Compare, Expect, KeyValue, Leader, Lease, LeaseId, Listing,
    MAX_TXN_OPS, Mutation, Op, Revision, StoreError, TxnOutcome, WatchEvent, WatchStream,
};
