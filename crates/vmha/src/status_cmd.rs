//! `vmha status` and `vmha explain VM`: read-only views of vmhad's state, as text tables (see
//! [`crate::render`]) or vmhad's JSON.

use std::process::ExitCode;

use anyhow::Context;
use vmha_model::Name;

use crate::client::Client;
use crate::output::{Output, print_json, print_text};
use crate::render::Render;
use vmha_api::{Explain, StatusView};

/// `GET /v1/status`, printed.
pub fn status(client: &Client, out: Output) -> anyhow::Result<ExitCode> {
    let value = client.get("/v1/status")?;
    if out.json {
        print_json(&value)?;
    } else {
        let view: StatusView =
            serde_json::from_value(value).context("unexpected status from vmhad")?;
        print_text(&Render::local().status(&view))?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `GET /v1/vms/VM/explain`, printed. `vm` is a valid [`Name`], so it is safe in the path.
pub fn explain(client: &Client, vm: &Name, out: Output) -> anyhow::Result<ExitCode> {
    let value = client.get(&format!("/v1/vms/{vm}/explain"))?;
    if out.json {
        print_json(&value)?;
    } else {
        let explain: Explain =
            serde_json::from_value(value).context("unexpected explanation from vmhad")?;
        print_text(&Render::local().explain(&explain))?;
    }
    Ok(ExitCode::SUCCESS)
}
