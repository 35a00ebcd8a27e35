//! The cluster configuration at run time: `vmha config apply FILE` (any host), `vmha config
//! reload` and SIGHUP (this daemon's own file) validate a configuration and store it in the
//! cluster store; every host follows the stored configuration and applies it — the engine's
//! node is rebuilt on it at a clean point, VM slots are added and dropped, the fence learns the
//! new VMs. A configuration that does not validate, or that changes what cannot change live
//! (the cluster's name, its store), changes nothing and is reported in the log and in
//! `vmha status`.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::oneshot;
use vmha_api::ConfigApplied;
use vmha_engine::node::{ReconfigureError, config_diff};
use vmha_model::Config;
use vmha_store::ClusterStore;

use crate::core::{Core, now};
use crate::inbox::{ConfigRefused, HostInputs};

/// What the core knows of its configuration.
pub struct ConfigState {
    /// The text of the configuration it runs.
    pub text: String,
    /// This daemon's configuration file (SIGHUP, `vmha config reload`).
    pub file: PathBuf,
    /// The runtime directory (for the slots of new VMs).
    pub runtime_dir: PathBuf,
    /// Where new slots report.
    pub inputs: HostInputs,
    /// A stored configuration waiting for a clean point to be applied.
    pub pending: Option<(String, Arc<Config>)>,
    /// Why the last stored configuration was not applied.
    pub error: Option<String>,
}

/// Whether `new` may replace `old` on a running cluster.
fn compatible(old: &Config, new: &Config) -> Result<(), String> {
    if old.cluster.name != new.cluster.name {
        return Err(format!(
            "the cluster name cannot change while the cluster runs ({} → {})",
            old.cluster.name, new.cluster.name
        ));
    }
    if old.cluster.store != new.cluster.store {
        return Err(
            "the cluster store settings cannot change while the cluster runs: restart every \
             vmhad with the new file"
                .to_string(),
        );
    }
    Ok(())
}

impl<S: ClusterStore> Core<S> {
    /// A request to store a configuration (`None`: this daemon's file again).
    pub fn config_request(
        &mut self,
        text: Option<String>,
        reply: oneshot::Sender<Result<ConfigApplied, ConfigRefused>>,
    ) {
        let reload = text.is_none();
        let (text, source) = match text {
            Some(t) => (t, "the applied configuration".to_string()),
            None => {
                let file = self.config_state.file.clone();
                // Never blocks: a FIFO or a device in place of the file is refused unopened.
                match vmha_model::file::read_text(&file) {
                    Ok(t) => (t, file.display().to_string()),
                    Err(e) => {
                        let e = e.to_string();
                        self.config_state.error = Some(e.clone());
                        let _ = reply.send(Err(ConfigRefused::Invalid(e)));
                        return;
                    }
                }
            }
        };
        let config = match Config::from_toml_str_for(&text, &source, crate::driver::DRIVERS) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("configuration refused, nothing changed:\n{e}");
                if reload {
                    // Nobody else hears of a bad file behind a SIGHUP: status says it.
                    self.config_state.error = Some(e.to_string());
                }
                let _ = reply.send(Err(ConfigRefused::Invalid(e.to_string())));
                return;
            }
        };
        if let Err(e) = compatible(&self.config, &config) {
            if reload {
                self.config_state.error = Some(e.clone());
            }
            let _ = reply.send(Err(ConfigRefused::Incompatible(e)));
            return;
        }
        let applied = ConfigApplied {
            hosts: config.hosts.len(),
            vms: config.vms.len(),
            apps: config.vms.iter().map(|v| v.apps.len()).sum(),
            change: config_diff(&self.config, &config).describe(),
        };
        if reload && text == self.config_state.text {
            // The file is what runs: nothing to store, but a past error is no longer true.
            self.config_state.error = None;
        }
        let store = self.store.clone();
        let key = self.layout.config();
        tokio::spawn(async move {
            let result = match store.put(&key, text.into_bytes(), None).await {
                Ok(_) => Ok(applied),
                Err(e) => Err(ConfigRefused::Store(e.to_string())),
            };
            let _ = reply.send(result);
        });
    }

    /// The configuration stored in the cluster store changed: apply it once the node is idle.
    pub fn stored_config(&mut self, text: Option<String>) {
        let Some(text) = text else {
            return;
        };
        if text == self.config_state.text {
            self.config_state.pending = None;
            return;
        }
        match Config::from_toml_str(&text, "the configuration in the cluster store") {
            Ok(config) => match compatible(&self.config, &config) {
                Ok(()) => self.config_state.pending = Some((text, Arc::new(config))),
                Err(e) => self.refuse(e),
            },
            Err(e) => self.refuse(e.to_string()),
        }
    }

    fn refuse(&mut self, why: String) {
        tracing::error!("the stored configuration is not applied, the previous one runs: {why}");
        self.config_state.error = Some(why);
        self.config_state.pending = None;
    }

    /// Applies a pending configuration if the node is idle; `true` if it did.
    pub fn try_reconfigure(&mut self) -> bool {
        let Some((text, config)) = self.config_state.pending.take() else {
            return false;
        };
        match self.node.reconfigure(now(), Arc::clone(&config)) {
            Ok(change) => {
                tracing::info!("new configuration applied: {}", change.describe());
                let changes = self.slots.configure(
                    &config,
                    &self.host,
                    &self.config_state.runtime_dir,
                    &self.config_state.inputs,
                    &self.fence,
                );
                for slot in changes.added {
                    tokio::spawn(async move { slot.adopt().await });
                }
                for vm in changes.removed {
                    tracing::warn!(%vm, "no longer in this host's configuration: not managed any more, left running");
                }
                self.fence
                    .set_vms(fenced_vms(&config, &self.config_state.runtime_dir));
                self.config = config;
                self.config_state.text = text;
                self.config_state.error = None;
                // The rebuilt agents learn what runs from the VMs themselves.
                self.poll_slots();
                true
            }
            Err(ReconfigureError::Busy) => {
                self.config_state.pending = Some((text, config));
                false
            }
            Err(e) => {
                self.refuse(e.to_string());
                false
            }
        }
    }
}

/// The VMs the fence kills on this host: every VM of the cluster's configuration, not only those
/// this host may run — a VM whose `hosts` no longer name this host is left running here when the
/// configuration changes, and its ownership record may still name this host, so it must die
/// with the lease like any other. (A VM removed from the configuration altogether is no longer
/// vmha's: no host will start it.)
pub fn fenced_vms(config: &Config, runtime_dir: &std::path::Path) -> Vec<vmha_qemu::VmPaths> {
    config
        .vms
        .iter()
        .filter_map(|v| vmha_qemu::VmPaths::new(runtime_dir, v.name.as_str()).ok())
        .collect()
}
