//! `rpc`: call a JSON-RPC method of the task face.

use std::io::IsTerminal;

use anyhow::Context;
use serde_json::json;

use super::{json_arg, Conn};
use crate::output::Output;

#[derive(clap::Args, Debug)]
pub struct RpcArgs {
    #[command(flatten)]
    pub(super) conn: Conn,
    /// The method, e.g. task.create
    method: String,
    /// The params as JSON [default: {}]; - reads stdin
    params: Option<String>,
}

pub(super) async fn rpc(a: RpcArgs, out: Output) -> anyhow::Result<()> {
    let client = a.conn.client()?;
    let params = match a.params.as_deref() {
        None => json!({}),
        Some("-") => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading params from stdin")?;
            json_arg("the params on stdin", &text)?
        }
        Some(raw) => json_arg("the params", raw)?,
    };
    let result = client.rpc(&a.method, params).await?;
    if out.json || !std::io::stdout().is_terminal() {
        out.json_value(&result)
    } else {
        out.line(&serde_json::to_string_pretty(&result)?);
        Ok(())
    }
}
