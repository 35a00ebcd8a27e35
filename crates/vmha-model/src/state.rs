//! The states of SPEC §3, with the spelling used in events, the CLI and the API.

use std::fmt;

macro_rules! spelled_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every state, in declaration order (e.g. one metric series per state).
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The spelling used in events, the CLI and the API.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

spelled_enum!(
    /// State of an app inside a VM.
    AppState {
        /// Its check passes.
        Online => "online",
        /// Intentionally offline: an admin said so.
        Offline => "offline",
        /// Failed and its restart budget is spent, or its restart failed.
        Faulted => "faulted",
        /// Failed; its start command is being run within its budget.
        Restarting => "restarting",
        /// Being started (after a VM start or an admin start).
        Starting => "starting",
        /// Being stopped (before a VM stop or an admin stop).
        Stopping => "stopping",
        /// Could not be probed: the guest channel is down or the VM is not running.
        Unknown => "unknown",
    }
);

spelled_enum!(
    /// State of a VM group on its host.
    VmState {
        /// Running.
        Online => "online",
        /// Intentionally stopped.
        Offline => "offline",
        /// Being started.
        Starting => "starting",
        /// Being stopped.
        Stopping => "stopping",
        /// Being restarted on the same host.
        Restarting => "restarting",
        /// Failed on a host and not restartable there.
        Faulted => "faulted",
        /// Being moved to another host by the cluster controller.
        FailingOver => "failing-over",
        /// Running on its owner while being migrated live to another host.
        Migrating => "migrating",
        /// Not known (e.g. its host is unreachable).
        Unknown => "unknown",
    }
);

spelled_enum!(
    /// State of a host in the cluster.
    HostState {
        /// Its lease is live.
        Up => "up",
        /// Drained by an admin: runs no HA VMs.
        Maintenance => "maintenance",
        /// Its lease expired.
        Down => "down",
        /// Known to have killed its VMs.
        Fenced => "fenced",
    }
);
