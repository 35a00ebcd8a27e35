//! vmha-store: the cluster store.
//!
//! - [`store`]: the [`ClusterStore`] trait and its types — the contract shared by the embedded
//!   store and the etcd store.
//! - [`embedded`]: [`EmbeddedStore`], a single-host store in one redb file.
//! - [`election`]: elections on top of the key-value primitives (used by the embedded store).
//! - [`layout`]: where vmha keeps what under `/vmha/<cluster>/`.
//! - [`records`]: typed (JSON) access to those keys and the [`records::EventLog`].
//! - `conformance` (feature `testkit`): the behaviour suite every store must pass.

#[cfg(feature = "testkit")]
pub mod conformance;
pub mod election;
pub mod embedded;
pub mod layout;
pub mod records;
pub mod store;

pub use embedded::{EmbeddedStore, EmbeddedWatch};
pub use store::{
    CasOutcome, ClusterStore, Expect, KeyValue, Leader, Lease, LeaseId, Listing, Mutation,
    Revision, StoreError, WatchEvent, WatchStream,
};
