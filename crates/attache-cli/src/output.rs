//! How the client commands talk to people and scripts: JSON with `--json`,
//! short text otherwise; progress bars only on a terminal; errors as
//! sentences with a hint, and exit codes that say what kind of failure it was.

use std::io::{IsTerminal, Write};

use attache_client::{Error, ErrorCode};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Exit codes of the client commands (also listed in `attache --help`).
pub mod exit {
    pub const OK: i32 = 0;
    /// Something else went wrong (an I/O error, an unexpected answer).
    pub const FAILURE: i32 = 1;
    /// The command line or its input is not valid.
    pub const USAGE: i32 = 2;
    /// The entity, attachment or stream does not exist (or is not visible to you).
    pub const NOT_FOUND: i32 = 3;
    /// The server does not let this principal do this (401/403).
    pub const NOT_PERMITTED: i32 = 4;
    /// It conflicts with what is there: exists already, closed, stopped (409).
    pub const CONFLICT: i32 = 5;
    /// The server refused the request as invalid or too large (400/413/416).
    pub const REJECTED: i32 = 6;
    /// The server could not be reached.
    pub const UNREACHABLE: i32 = 7;
    /// The server failed (5xx).
    pub const SERVER_ERROR: i32 = 8;
    /// A JSON-RPC method returned an error.
    pub const RPC_ERROR: i32 = 9;
}

pub const EXIT_CODES_HELP: &str = "Exit codes of the client commands: 0 ok, 1 other failure, 2 invalid usage, \
3 not found, 4 not permitted, 5 conflict (exists, closed, stopped), 6 rejected as invalid or too large, \
7 server unreachable, 8 server error, 9 JSON-RPC error.";

/// Where results go.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints a JSON value on one line (for `--json`), or pretty when stdout is a terminal.
    pub fn json_value<T: Serialize>(&self, value: &T) -> anyhow::Result<()> {
        let text = if std::io::stdout().is_terminal() {
            serde_json::to_string_pretty(value)?
        } else {
            serde_json::to_string(value)?
        };
        self.line(&text);
        Ok(())
    }

    /// A line on stdout (the result itself).
    pub fn line(&self, text: &str) {
        let mut out = std::io::stdout().lock();
        if let Err(e) = writeln!(out, "{text}").and_then(|_| out.flush()) {
            stdout_failed(e);
        }
    }

    /// A note for people on stderr, never in `--json` mode.
    pub fn note(&self, text: &str) {
        if !self.json {
            eprintln!("{text}");
        }
    }

    /// A progress bar on stderr when it is a terminal (and not in `--json` mode); hidden otherwise.
    pub fn progress(&self, total: Option<u64>, what: &str) -> ProgressBar {
        if self.json || !std::io::stderr().is_terminal() {
            return ProgressBar::hidden();
        }
        let bar = match total {
            Some(n) => ProgressBar::new(n),
            None => ProgressBar::new_spinner(),
        };
        let template = if total.is_some() {
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}"
        } else {
            "{msg} {spinner} {bytes} {bytes_per_sec}"
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(what.to_owned());
        bar
    }
}

/// Writes raw bytes to stdout (downloads, binary tails).
pub fn stdout_bytes(bytes: &[u8]) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(bytes).and_then(|_| out.flush()) {
        stdout_failed(e);
    }
}

/// Whoever read stdout went away (`attache tail ... | head`): stop quietly,
/// as Unix tools do. Any other write failure ends the command too.
fn stdout_failed(e: std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(exit::OK);
    }
    eprintln!("error: cannot write to stdout: {e}.");
    std::process::exit(exit::FAILURE);
}

/// The exit code for an error.
pub fn exit_code(err: &anyhow::Error) -> i32 {
    if let Some(e) = err.downcast_ref::<Error>() {
        return match e {
            Error::Api { status, code, .. } => match (status, code) {
                (_, ErrorCode::NotFound) | (404, _) | (410, _) => exit::NOT_FOUND,
                (401 | 403, _) => exit::NOT_PERMITTED,
                (409, _) => exit::CONFLICT,
                (s, _) if *s >= 500 => exit::SERVER_ERROR,
                _ => exit::REJECTED,
            },
            Error::Rpc { .. } => exit::RPC_ERROR,
            Error::Transport { .. } => exit::UNREACHABLE,
            Error::Invalid(_) | Error::Core(_) => exit::USAGE,
            // The upload under this id is another input's: a conflict with what the server holds.
            Error::UploadMismatch { .. } => exit::CONFLICT,
            _ => exit::FAILURE,
        };
    }
    if err.downcast_ref::<UsageError>().is_some() {
        return exit::USAGE;
    }
    exit::FAILURE
}

/// The JSON document a failed command prints on stdout with `--json`, so a
/// script reads one document whatever happened: `{"error": {...}}` with the
/// sentence people get on stderr, the exit code, and what the server said
/// (HTTP status and error code, or the JSON-RPC error) when it answered.
pub fn error_document(err: &anyhow::Error, sentence: &str, exit_code: i32) -> serde_json::Value {
    let mut error = serde_json::json!({
        "message": sentence.strip_prefix("error: ").unwrap_or(sentence),
        "exit_code": exit_code,
    });
    match err.downcast_ref::<Error>() {
        Some(Error::Api { status, code, .. }) => {
            error["status"] = serde_json::json!(status);
            error["code"] = serde_json::json!(code.to_string());
        }
        Some(Error::Rpc { method, error: rpc }) => {
            error["method"] = serde_json::json!(method);
            error["rpc_code"] = serde_json::json!(rpc.code);
            if let Some(data) = &rpc.data {
                error["data"] = data.clone();
            }
        }
        _ => {}
    }
    serde_json::json!({ "error": error })
}

/// A mistake in what the user typed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// The sentence a person reads when a command fails: what failed, why, and what to try.
pub fn explain(err: &anyhow::Error, server: &str) -> String {
    let Some(e) = err.downcast_ref::<Error>() else {
        return format!("error: {}.", chain(err).trim_end_matches('.'));
    };
    // What the command was doing, when it said so (anyhow context around the SDK error).
    let outer = err.to_string();
    let head = if outer != e.to_string() { format!("{outer}: ") } else { String::new() };
    match e {
        Error::Api { status, code, message, .. } => {
            let hint = match (status, code) {
                (401, _) => Some(
                    "The server wants credentials: pass --token (or set ATTACHE_TOKEN) with a token from `attache token create`.",
                ),
                (403, _) => Some(
                    "Your principal lacks the permission: the entity's owner can grant it with `attache entity grant ENTITY PRINCIPAL PERMISSION`.",
                ),
                (_, ErrorCode::NotFound) | (404, _) => Some(
                    "Check the name: `attache entity get ENTITY` and `attache ls ENTITY` show what exists for your principal.",
                ),
                (_, ErrorCode::NotRunning) => Some("The entity is stopped; spawn a new one to send to."),
                (_, ErrorCode::DuplicateId) => Some("Choose another --id, or remove the old one with `attache rm ENTITY ID`."),
                (_, ErrorCode::PayloadTooLarge) => Some("The server's limit is set with `attache serve --max-attachment-bytes`."),
                _ => None,
            };
            let mut text = format!("error: {head}{} ({status} {code}).", message.trim_end_matches('.'));
            if let Some(h) = hint {
                text.push(' ');
                text.push_str(h);
            }
            text
        }
        Error::Transport { source, .. } => format!(
            "error: {head}cannot reach the attache server at {server} ({}). Is `attache serve` running there? \
             Point to another server with --server or ATTACHE_URL.",
            root_cause(source)
        ),
        Error::Rpc { method, error } => {
            let data = error.data.as_ref().map(|d| format!(" Details: {d}.")).unwrap_or_default();
            format!("error: {head}{method} failed with JSON-RPC error {}: {}.{data}", error.code, error.message)
        }
        other => format!("error: {head}{other}."),
    }
}

/// The innermost cause ("Connection refused (os error 111)"), which says more than the outer layers.
fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

fn chain(err: &anyhow::Error) -> String {
    err.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")
}
