//! The decision agent (SPEC §4.2, the patent's "decision making agent"): turns the app states of
//! one VM, their priorities and the VM's policy into "no action" or "restart the VM".
//!
//! [`decide`] is a pure, allocation-free function; [`explain`] gives the same verdict with the
//! arithmetic as a human-readable reason (used for events and `vmha explain`).

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use vmha_model::{AppState, Policy, Tie};

/// What the decision agent sees of one app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppView<'a> {
    /// App name (for reasons).
    pub name: &'a str,
    /// Its current state.
    pub state: AppState,
    /// Its priority (higher = more important).
    pub priority: u32,
    /// Marked `critical`.
    pub critical: bool,
}

/// The decision agent's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The VM is fine as it is.
    NoAction,
    /// The VM must be restarted (within its budget; else it faults on this host).
    RestartVm,
}

impl Verdict {
    /// "restart VM" or "no action", as used in reasons.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::NoAction => "no action",
            Verdict::RestartVm => "restart VM",
        }
    }
}

fn tie_verdict(tie: Tie) -> Verdict {
    match tie {
        Tie::Restart => Verdict::RestartVm,
        Tie::NoAction => Verdict::NoAction,
    }
}

fn sum(apps: &[AppView<'_>], pick: impl Fn(AppState) -> bool) -> u64 {
    apps.iter()
        .filter(|a| pick(a.state))
        .map(|a| u64::from(a.priority))
        .sum()
}

fn is_online_or_offline(s: AppState) -> bool {
    matches!(s, AppState::Online | AppState::Offline)
}

/// Decides for one VM. Guarantees (SPEC §4.2): with no app `faulted` the verdict is always
/// `NoAction`; `unknown`, `restarting`, `starting` and `stopping` apps count in no sum.
pub fn decide(policy: Policy, tie: Tie, apps: &[AppView<'_>]) -> Verdict {
    if !apps.iter().any(|a| a.state == AppState::Faulted) {
        return Verdict::NoAction;
    }
    match policy {
        Policy::HighestPriority => {
            let top = apps.iter().map(|a| a.priority).max().unwrap_or(0);
            if apps
                .iter()
                .any(|a| a.priority == top && a.state == AppState::Faulted)
            {
                Verdict::RestartVm
            } else {
                Verdict::NoAction
            }
        }
        Policy::Weighted => {
            let faulted = sum(apps, |s| s == AppState::Faulted);
            let online = sum(apps, |s| s == AppState::Online);
            compare(faulted, online, tie)
        }
        Policy::WeightedWithOffline => {
            let faulted = sum(apps, |s| s == AppState::Faulted);
            let up = sum(apps, is_online_or_offline);
            compare(faulted, up, tie)
        }
        Policy::Critical => {
            if apps
                .iter()
                .any(|a| a.critical && a.state == AppState::Faulted)
            {
                Verdict::RestartVm
            } else {
                Verdict::NoAction
            }
        }
    }
}

fn compare(faulted: u64, other: u64, tie: Tie) -> Verdict {
    match faulted.cmp(&other) {
        std::cmp::Ordering::Greater => Verdict::RestartVm,
        std::cmp::Ordering::Less => Verdict::NoAction,
        std::cmp::Ordering::Equal => tie_verdict(tie),
    }
}

/// Lists `name priority` of the apps matching `pick`, e.g. `db 100, queue 50`.
fn terms(apps: &[AppView<'_>], pick: impl Fn(AppState) -> bool) -> String {
    let mut out = String::new();
    for a in apps.iter().filter(|a| pick(a.state)) {
        if !out.is_empty() {
            out.push_str(", ");
        }
        let _ = write!(out, "{} {}", a.name, a.priority);
    }
    out
}

fn names(apps: &[AppView<'_>], pick: impl Fn(&AppView<'_>) -> bool) -> String {
    apps.iter()
        .filter(|a| pick(a))
        .map(|a| a.name)
        .collect::<Vec<_>>()
        .join(", ")
}

fn sum_term(label: &str, total: u64, terms: &str) -> String {
    if terms.is_empty() {
        format!("{label} {total}")
    } else {
        format!("{label} {total} ({terms})")
    }
}

/// Same verdict as [`decide`], with the arithmetic, e.g.
/// `weighted: faulted 150 (db 100, queue 50) > online 20 (web 20) → restart VM`.
pub fn explain(policy: Policy, tie: Tie, apps: &[AppView<'_>]) -> (Verdict, String) {
    let verdict = decide(policy, tie, apps);
    let name = policy_name(policy);
    if !apps.iter().any(|a| a.state == AppState::Faulted) {
        return (verdict, format!("{name}: no app faulted → no action"));
    }
    let reason = match policy {
        Policy::HighestPriority => {
            let top = apps.iter().map(|a| a.priority).max().unwrap_or(0);
            let holders = names(apps, |a| a.priority == top);
            let faulted_top = names(apps, |a| a.priority == top && a.state == AppState::Faulted);
            if faulted_top.is_empty() {
                let below = names(apps, |a| a.state == AppState::Faulted);
                format!(
                    "{name}: top priority {top} ({holders}) not faulted; faulted below it: {below} → no action"
                )
            } else {
                format!(
                    "{name}: top priority {top} ({holders}); faulted: {faulted_top} → restart VM"
                )
            }
        }
        Policy::Weighted | Policy::WeightedWithOffline => {
            let faulted = sum(apps, |s| s == AppState::Faulted);
            let f = sum_term("faulted", faulted, &terms(apps, |s| s == AppState::Faulted));
            let o = if policy == Policy::Weighted {
                let online = sum(apps, |s| s == AppState::Online);
                sum_term("online", online, &terms(apps, |s| s == AppState::Online))
            } else {
                let up = sum(apps, is_online_or_offline);
                sum_term("online+offline", up, &terms(apps, is_online_or_offline))
            };
            let other = if policy == Policy::Weighted {
                sum(apps, |s| s == AppState::Online)
            } else {
                sum(apps, is_online_or_offline)
            };
            match faulted.cmp(&other) {
                std::cmp::Ordering::Greater => format!("{name}: {f} > {o} → restart VM"),
                std::cmp::Ordering::Less => format!("{name}: {f} < {o} → no action"),
                std::cmp::Ordering::Equal => {
                    let t = match tie {
                        Tie::Restart => "restart",
                        Tie::NoAction => "no-action",
                    };
                    format!("{name}: {f} = {o}; tie = {t} → {}", verdict.as_str())
                }
            }
        }
        Policy::Critical => {
            let crit = names(apps, |a| a.critical && a.state == AppState::Faulted);
            if crit.is_empty() {
                let faulted = names(apps, |a| a.state == AppState::Faulted);
                format!("{name}: no critical app faulted (faulted: {faulted}) → no action")
            } else {
                format!("{name}: critical app faulted: {crit} → restart VM")
            }
        }
    };
    (verdict, reason)
}

/// The configuration spelling of a policy.
pub fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::HighestPriority => "highest-priority",
        Policy::Weighted => "weighted",
        Policy::WeightedWithOffline => "weighted-with-offline",
        Policy::Critical => "critical",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use AppState::*;

    fn v(name: &'static str, state: AppState, priority: u32) -> AppView<'static> {
        AppView {
            name,
            state,
            priority,
            critical: false,
        }
    }

    #[test]
    fn patent_example_higher_running_lower_failed_no_restart() {
        let apps = [v("db", Online, 100), v("web", Faulted, 10)];
        assert_eq!(
            decide(Policy::HighestPriority, Tie::Restart, &apps),
            Verdict::NoAction
        );
    }

    #[test]
    fn patent_example_higher_failed_lower_running_restart() {
        let apps = [v("db", Faulted, 100), v("web", Online, 10)];
        assert_eq!(
            decide(Policy::HighestPriority, Tie::Restart, &apps),
            Verdict::RestartVm
        );
        let (_, reason) = explain(Policy::HighestPriority, Tie::Restart, &apps);
        assert_eq!(
            reason,
            "highest-priority: top priority 100 (db); faulted: db → restart VM"
        );
    }

    #[test]
    fn no_faulted_app_never_restarts() {
        for policy in [
            Policy::HighestPriority,
            Policy::Weighted,
            Policy::WeightedWithOffline,
            Policy::Critical,
        ] {
            let apps = [v("a", Offline, 100), v("b", Offline, 1)];
            assert_eq!(decide(policy, Tie::Restart, &apps), Verdict::NoAction);
            assert_eq!(decide(policy, Tie::Restart, &[]), Verdict::NoAction);
        }
    }

    #[test]
    fn weighted_sums_and_ties() {
        let apps = [
            v("db", Faulted, 100),
            v("queue", Faulted, 50),
            v("web", Online, 20),
        ];
        let (verdict, reason) = explain(Policy::Weighted, Tie::Restart, &apps);
        assert_eq!(verdict, Verdict::RestartVm);
        assert_eq!(
            reason,
            "weighted: faulted 150 (db 100, queue 50) > online 20 (web 20) → restart VM"
        );
        let tie = [v("a", Faulted, 30), v("b", Online, 30), v("c", Unknown, 99)];
        assert_eq!(
            decide(Policy::Weighted, Tie::Restart, &tie),
            Verdict::RestartVm
        );
        assert_eq!(
            decide(Policy::Weighted, Tie::NoAction, &tie),
            Verdict::NoAction
        );
        // Offline counts for weighted-with-offline only.
        let off = [v("a", Faulted, 30), v("b", Offline, 40)];
        assert_eq!(
            decide(Policy::Weighted, Tie::NoAction, &off),
            Verdict::RestartVm
        );
        assert_eq!(
            decide(Policy::WeightedWithOffline, Tie::NoAction, &off),
            Verdict::NoAction
        );
    }

    #[test]
    fn transitional_states_count_in_no_sum() {
        let apps = [
            v("a", Faulted, 10),
            v("b", Restarting, 100),
            v("c", Starting, 100),
            v("d", Stopping, 100),
            v("e", Unknown, 100),
        ];
        assert_eq!(
            decide(Policy::Weighted, Tie::NoAction, &apps),
            Verdict::RestartVm
        );
        assert_eq!(
            decide(Policy::WeightedWithOffline, Tie::NoAction, &apps),
            Verdict::RestartVm
        );
    }

    #[test]
    fn critical_policy() {
        let mut apps = [v("ledger", Faulted, 1), v("reports", Online, 100)];
        assert_eq!(
            decide(Policy::Critical, Tie::Restart, &apps),
            Verdict::NoAction
        );
        apps[0].critical = true;
        assert_eq!(
            decide(Policy::Critical, Tie::Restart, &apps),
            Verdict::RestartVm
        );
    }
}
