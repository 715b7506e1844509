//! Bearer tokens for token auth mode.
//!
//! Tokens live in `tokens.jsonl` in the data directory: an append-only log of
//! `create` and `revoke` records, each line synced before the command that
//! wrote it returns. Only a SHA-256 of each token's secret is stored (the
//! secret is 32 random bytes, so a fast hash is the right tool; a password
//! hash would only slow every request). The CLI writes the file under an
//! exclusive lock while the server may be running; the server re-reads it
//! when its size or modification time changes, so a revoke takes effect on
//! the next request.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use parking_lot::Mutex;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{StoreError, StoreResult};
use crate::now_ms;

const FILE: &str = "tokens.jsonl";
const PREFIX: &str = "att";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Record {
    Create { id: String, principal: String, sha256: String, created_at_ms: i64, expires_at_ms: Option<i64> },
    Revoke { id: String, at_ms: i64 },
}

/// What `attache token list` shows; never the secret.
#[derive(Debug, Clone, Serialize)]
pub struct TokenInfo {
    pub id: String,
    pub principal: String,
    pub created_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
}

/// Why a presented token was refused (all answered 401).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRejection {
    Malformed,
    Unknown,
    Expired,
    Revoked,
}

#[derive(Default)]
struct Loaded {
    stamp: Option<(u64, SystemTime)>,
    tokens: HashMap<String, (TokenInfo, [u8; 32])>,
}

pub struct TokenStore {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Who may read the tokens file: its owner only. The file holds only hashes,
/// but token ids, principals and expiry times are nobody else's business.
const FILE_MODE: u32 = 0o600;

impl TokenStore {
    /// The tokens of `data_dir`. An existing file readable by others (made by
    /// an older version) is tightened to owner-only here.
    pub fn new(data_dir: &Path) -> TokenStore {
        let store = TokenStore { path: data_dir.join(FILE), loaded: Mutex::new(Loaded::default()) };
        store.tighten();
        store
    }

    fn tighten(&self) {
        use std::os::unix::fs::PermissionsExt;
        let Ok(meta) = std::fs::metadata(&self.path) else { return };
        if meta.permissions().mode() & 0o077 != 0 {
            match std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(FILE_MODE)) {
                Ok(()) => {
                    tracing::info!(path = %self.path.display(), "tokens file was readable by others; now owner-only")
                }
                Err(err) => tracing::warn!(%err, path = %self.path.display(), "cannot make the tokens file owner-only"),
            }
        }
    }

    fn read_all(&self) -> StoreResult<HashMap<String, (TokenInfo, [u8; 32])>> {
        let mut tokens = HashMap::new();
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(tokens),
            Err(e) => return Err(e.into()),
        };
        for line in BufReader::new(file).lines() {
            let line = line?;
            // A torn last line (crash mid-write, never acknowledged) is skipped.
            let Ok(record) = serde_json::from_str::<Record>(&line) else { continue };
            match record {
                Record::Create { id, principal, sha256, created_at_ms, expires_at_ms } => {
                    let mut hash = [0u8; 32];
                    if hex::decode_to_slice(&sha256, &mut hash).is_err() {
                        continue;
                    }
                    let info = TokenInfo { id: id.clone(), principal, created_at_ms, expires_at_ms, revoked: false };
                    tokens.insert(id, (info, hash));
                }
                Record::Revoke { id, .. } => {
                    if let Some((info, _)) = tokens.get_mut(&id) {
                        info.revoked = true;
                    }
                }
            }
        }
        Ok(tokens)
    }

    fn refresh(&self) -> StoreResult<()> {
        let stamp =
            std::fs::metadata(&self.path).ok().map(|m| (m.len(), m.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
        let mut loaded = self.loaded.lock();
        if loaded.stamp != stamp || stamp.is_none() {
            loaded.tokens = self.read_all()?;
            loaded.stamp = stamp;
        }
        Ok(())
    }

    fn append(&self, record: &Record) -> StoreResult<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = OpenOptions::new().create(true).append(true).mode(FILE_MODE).open(&self.path)?;
        self.tighten();
        file.lock()?;
        let mut line = serde_json::to_vec(record).map_err(|e| StoreError::Storage(e.to_string()))?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()?;
        Ok(())
    }

    /// Creates a token for `principal`; the returned string is shown once and never stored.
    pub fn create(&self, principal: &str, expires_at_ms: Option<i64>) -> StoreResult<(TokenInfo, String)> {
        let mut id_bytes = [0u8; 6];
        let mut secret_bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut id_bytes);
        rand::rng().fill_bytes(&mut secret_bytes);
        let id = hex::encode(id_bytes);
        let secret = hex::encode(secret_bytes);
        let created_at_ms = now_ms();
        self.append(&Record::Create {
            id: id.clone(),
            principal: principal.to_owned(),
            sha256: hex::encode(digest(&secret)),
            created_at_ms,
            expires_at_ms,
        })?;
        let info =
            TokenInfo { id: id.clone(), principal: principal.to_owned(), created_at_ms, expires_at_ms, revoked: false };
        Ok((info, format!("{PREFIX}_{id}_{secret}")))
    }

    pub fn list(&self) -> StoreResult<Vec<TokenInfo>> {
        let mut all: Vec<TokenInfo> = self.read_all()?.into_values().map(|(info, _)| info).collect();
        all.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then_with(|| a.id.cmp(&b.id)));
        Ok(all)
    }

    /// Revokes a token by id; false when there is no such token.
    pub fn revoke(&self, id: &str) -> StoreResult<bool> {
        match self.read_all()?.get(id) {
            None => Ok(false),
            Some((info, _)) if info.revoked => Ok(true),
            Some(_) => {
                self.append(&Record::Revoke { id: id.to_owned(), at_ms: now_ms() })?;
                Ok(true)
            }
        }
    }

    /// The principal a presented token stands for.
    /// The principal a presented token names, looked up by its id alone (no
    /// secret check, no reload): to account a request whose token [`verify`]
    /// has accepted to its principal, never to let one in.
    ///
    /// [`verify`]: TokenStore::verify
    pub fn principal_of(&self, presented: &str) -> Option<String> {
        let id = presented.split('_').nth(1)?;
        self.loaded.lock().tokens.get(id).map(|(info, _)| info.principal.clone())
    }

    pub fn verify(&self, presented: &str) -> Result<String, TokenRejection> {
        let mut parts = presented.splitn(3, '_');
        let (Some(PREFIX), Some(id), Some(secret)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenRejection::Malformed);
        };
        self.refresh().map_err(|_| TokenRejection::Unknown)?;
        let loaded = self.loaded.lock();
        let (info, hash) = loaded.tokens.get(id).ok_or(TokenRejection::Unknown)?;
        if !bool::from(digest(secret).ct_eq(hash)) {
            return Err(TokenRejection::Unknown);
        }
        if info.revoked {
            return Err(TokenRejection::Revoked);
        }
        if info.expires_at_ms.is_some_and(|at| now_ms() >= at) {
            return Err(TokenRejection::Expired);
        }
        Ok(info.principal.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_until_revoked_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path());
        let (info, token) = store.create("user:sam", None).unwrap();
        assert_eq!(store.verify(&token).unwrap(), "user:sam");
        // One hex digit changed (to a digit it is not already).
        let last = if token.ends_with('0') { '1' } else { '0' };
        let tampered = format!("{}{last}", &token[..token.len() - 1]);
        assert_eq!(store.verify(&tampered), Err(TokenRejection::Unknown));
        assert_eq!(store.verify("nonsense"), Err(TokenRejection::Malformed));
        assert!(store.revoke(&info.id).unwrap());
        assert_eq!(store.verify(&token), Err(TokenRejection::Revoked));
        let (_, old) = store.create("user:ann", Some(now_ms() - 1)).unwrap();
        assert_eq!(store.verify(&old), Err(TokenRejection::Expired));
        assert!(!store.revoke("nope").unwrap());
        let raw = std::fs::read_to_string(dir.path().join(FILE)).unwrap();
        assert!(!raw.contains(token.rsplit('_').next().unwrap()), "the secret is never stored");
    }
}
