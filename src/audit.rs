//! The tamper-evident audit trail: one JSON line per event, each carrying the SHA-256 of the
//! previous line, so `openai-key-rotator audit verify FILE` can tell whether the file is the
//! one the daemon wrote.
//!
//! # The chain
//! - Line 1 is a genesis record: `event: "audit_started"`, `seq: 1`, and `prev_sha256` a
//!   random 32-byte nonce that the line repeats in its `message` as `genesis=<hex>`.
//! - Line `n > 1` has `seq: n` and `prev_sha256` = hex SHA-256 of line `n - 1`'s bytes
//!   (without its newline).
//! - Reopening an existing file continues its chain (from the last line's seq and hash) with
//!   an `audit_started` record, so restarts are visible in the trail.
//!
//! # What it catches, and what it does not
//! Someone who edits the file without recomputing hashes is caught: an edited byte breaks
//! the next line's `prev_sha256` (or the line's own JSON or `seq`), a deleted, inserted or
//! moved line breaks the `seq` run, a deleted genesis leaves a first line that is not one, a
//! torn or truncated last line has no newline or does not parse, and hand-appended lines lack
//! the right hash.
//!
//! A hash chain alone does NOT stop someone with write access from rewriting the file: they
//! can recompute every hash from the line they change on (or replace the whole file with a new
//! chain), or drop whole lines from the end, and `verify` will pass. An edit of the *last*
//! line is likewise invisible until a later line is chained to it. What stops that is a copy
//! out of the attacker's reach made as the lines are written: the stdout sink writes every
//! line to a log collector the moment it is recorded, and comparing the file's last hash (or
//! any line) with the collector's copy exposes a rewrite or a dropped tail. The genesis nonce
//! makes each chain unique, so a chain cannot be forged by splicing lines of another.
//!
//! # Writers sharing a file
//! Each daemon replica needs its own file. One-shot commands run with the daemon's config
//! (`sweep`, `rotate --once`) append to it: every check-and-append holds an exclusive
//! `flock`, and a handle that finds lines appended since its own last write adopts them
//! when they continue the chain from there. Anything else (an edit, a truncation, a fork)
//! makes the handle refuse to write instead of forking the chain; a failed or torn write is
//! cut back off.
//!
//! # Secrets
//! Records carry ids (rotation, service account, key id, Vault version), names, statuses and
//! reasons, never a key value: [`AuditFields`] has no field that could take key material
//! ([`Secret`](crate::secret::Secret) is not convertible to `String` without `expose`), and
//! the [`Observer`] reads only ids from the journal (not even the key's hash).

use crate::rotation::{Journal, Observer, RotationEvent, Status, Step};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Prefix of the genesis record's `message`, followed by the hex nonce.
pub const GENESIS_PREFIX: &str = "genesis=";

/// One line of the audit file, as written and as `verify` reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub time: DateTime<Utc>,
    /// 1 for the genesis line, then +1 per line: equals the line number.
    pub seq: u64,
    /// Hex SHA-256 of the previous line's bytes (without its newline); the genesis nonce on
    /// the first line.
    pub prev_sha256: String,
    /// One of [`AuditEvent`]'s names.
    pub event: String,
    pub rotation_id: Option<String>,
    pub target: Option<String>,
    pub actor: Option<String>,
    pub trigger: Option<String>,
    pub reason: Option<String>,
    pub step: Option<String>,
    pub outcome: Option<String>,
    pub service_account_id: Option<String>,
    pub key_id: Option<String>,
    pub old_service_account_id: Option<String>,
    pub old_key_id: Option<String>,
    pub vault_version: Option<u64>,
    pub message: Option<String>,
}

/// What happened (a bounded set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuditEvent {
    RotationRequested,
    RotationStarted,
    StepStarted,
    StepFinished,
    Rollback,
    RotationCompleted,
    RotationRolledBack,
    RotationFailed,
    AccountDeleted,
    SweepDeleted,
    ConfigReloaded,
    TriggerRefused,
    AuditStarted,
    RollbackRefused,
    UnlistedConsumers,
    UnconfiguredTarget,
    /// The usage-anomaly detector fired for a target's key.
    UsageAnomaly,
    /// An emergency rotation's report on the old key (usage, audit-log events; ids only).
    EmergencyForensics,
    /// OpenAI's audit log (or the accounts) does not match our journals.
    AuditMismatch,
}

impl AuditEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            AuditEvent::RotationRequested => "rotation_requested",
            AuditEvent::RotationStarted => "rotation_started",
            AuditEvent::StepStarted => "step_started",
            AuditEvent::StepFinished => "step_finished",
            AuditEvent::Rollback => "rollback",
            AuditEvent::RotationCompleted => "rotation_completed",
            AuditEvent::RotationRolledBack => "rotation_rolled_back",
            AuditEvent::RotationFailed => "rotation_failed",
            AuditEvent::AccountDeleted => "account_deleted",
            AuditEvent::SweepDeleted => "sweep_deleted",
            AuditEvent::ConfigReloaded => "config_reloaded",
            AuditEvent::TriggerRefused => "trigger_refused",
            AuditEvent::AuditStarted => "audit_started",
            AuditEvent::RollbackRefused => "rollback_refused",
            AuditEvent::UnlistedConsumers => "unlisted_consumers",
            AuditEvent::UnconfiguredTarget => "unconfigured_target",
            AuditEvent::UsageAnomaly => "usage_anomaly",
            AuditEvent::EmergencyForensics => "emergency_forensics",
            AuditEvent::AuditMismatch => "audit_mismatch",
        }
    }
}

/// The caller's part of a record; [`Audit::record`] adds time, seq and the chain hash.
/// Build with struct update syntax:
/// `AuditFields { target: Some(t), ..AuditFields::new(AuditEvent::ConfigReloaded) }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditFields {
    pub event: AuditEvent,
    pub rotation_id: Option<String>,
    pub target: Option<String>,
    pub actor: Option<String>,
    pub trigger: Option<String>,
    pub reason: Option<String>,
    pub step: Option<String>,
    pub outcome: Option<String>,
    pub service_account_id: Option<String>,
    pub key_id: Option<String>,
    pub old_service_account_id: Option<String>,
    pub old_key_id: Option<String>,
    pub vault_version: Option<u64>,
    pub message: Option<String>,
}

impl AuditFields {
    pub fn new(event: AuditEvent) -> AuditFields {
        AuditFields {
            event,
            rotation_id: None,
            target: None,
            actor: None,
            trigger: None,
            reason: None,
            step: None,
            outcome: None,
            service_account_id: None,
            key_id: None,
            old_service_account_id: None,
            old_key_id: None,
            vault_version: None,
            message: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit file {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("audit stdout: {0}")]
    Stdout(io::Error),
    /// The existing file's last line cannot be continued from.
    #[error("audit file {}: cannot continue its chain: {reason} (run `audit verify`, then move the file aside)", path.display())]
    Unchainable { path: PathBuf, reason: String },
}

/// Result of [`verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    Ok {
        records: u64,
    },
    /// The first line (1-based) where the chain does not hold.
    Broken {
        line: u64,
        reason: String,
    },
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

struct FileSink {
    path: PathBuf,
    file: File,
    /// Length after the last complete record, to cut a torn write back off.
    len: u64,
}

/// The chain's head and the sinks, behind one lock so records are serialized.
struct Chain {
    file: Option<FileSink>,
    stream: Option<Box<dyn Write + Send>>,
    /// Seq of the last record written.
    seq: u64,
    /// Hash of the last line (the genesis nonce before the first).
    prev: String,
}

/// Handle to the audit trail; clones share it. Thread-safe.
#[derive(Clone)]
pub struct Audit {
    chain: Arc<Mutex<Chain>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit").finish_non_exhaustive()
    }
}

impl Audit {
    /// Sinks: an append-only file (fsync per record) and/or stdout (the same lines, for a log
    /// collector). An existing non-empty file's chain is continued from its last line; a new
    /// (or empty) file, or stdout alone, starts a new chain with a genesis record. With
    /// neither sink, records are chained and dropped.
    pub fn open(file: Option<&Path>, stdout: bool) -> Result<Audit, AuditError> {
        let stream: Option<Box<dyn Write + Send>> = if stdout {
            Some(Box::new(io::stdout()))
        } else {
            None
        };
        Audit::open_with(file, stream)
    }

    fn open_with(
        file: Option<&Path>,
        stream: Option<Box<dyn Write + Send>>,
    ) -> Result<Audit, AuditError> {
        let mut head = None;
        let sink = match file {
            None => None,
            Some(path) => {
                let io_err = |source| AuditError::Io {
                    path: path.to_path_buf(),
                    source,
                };
                let mut opts = OpenOptions::new();
                opts.read(true).append(true).create(true);
                #[cfg(unix)]
                std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
                let mut f = opts.open(path).map_err(io_err)?;
                let len = f.metadata().map_err(io_err)?.len();
                if len > 0 {
                    let last = read_last_line(&mut f, len).map_err(io_err)?;
                    head = Some(chain_head(&last).map_err(|reason| AuditError::Unchainable {
                        path: path.to_path_buf(),
                        reason,
                    })?);
                }
                Some(FileSink {
                    path: path.to_path_buf(),
                    file: f,
                    len,
                })
            }
        };
        let continued = head.is_some();
        let (seq, prev) = head.unwrap_or_else(|| {
            let nonce: [u8; 32] = rand::random();
            (0, hex::encode(nonce))
        });
        let audit = Audit {
            chain: Arc::new(Mutex::new(Chain {
                file: sink,
                stream,
                seq,
                prev,
            })),
        };
        let message = if continued {
            format!("continuing the chain after seq {seq}")
        } else {
            let chain = audit.chain.lock().unwrap_or_else(|e| e.into_inner());
            format!("{GENESIS_PREFIX}{}", chain.prev)
        };
        audit.record(AuditFields {
            message: Some(message),
            actor: Some(format!("openai-key-rotator {}", env!("CARGO_PKG_VERSION"))),
            ..AuditFields::new(AuditEvent::AuditStarted)
        })?;
        Ok(audit)
    }

    /// Append one record (time, seq and `prev_sha256` filled in): one `write_all` of the line
    /// and its newline, then `sync_data`, before the next record may start.
    pub fn record(&self, f: AuditFields) -> Result<(), AuditError> {
        let mut chain = self.chain.lock().unwrap_or_else(|e| e.into_inner());
        let rec = AuditRecord {
            time: Utc::now(),
            seq: chain.seq + 1,
            prev_sha256: chain.prev.clone(),
            event: f.event.as_str().to_string(),
            rotation_id: f.rotation_id,
            target: f.target,
            actor: f.actor,
            trigger: f.trigger,
            reason: f.reason,
            step: f.step,
            outcome: f.outcome,
            service_account_id: f.service_account_id,
            key_id: f.key_id,
            old_service_account_id: f.old_service_account_id,
            old_key_id: f.old_key_id,
            vault_version: f.vault_version,
            message: f.message,
        };
        // JSON escapes control characters, so the line holds no newline of its own.
        let mut line = serde_json::to_string(&rec).expect("an audit record serializes");
        let hash = sha256_hex(line.as_bytes());
        line.push('\n');
        let (mut seq, mut prev) = (rec.seq, hash);
        if let Some(sink) = chain.file.as_mut() {
            // Writers in other processes (a one-shot `sweep` or `rotate --once` with the
            // daemon's config) append to the same file: an exclusive lock makes each
            // check-and-append atomic across processes.
            // (On a second handle of the same open file: the lock is the open file's.)
            let handle = sink.file.try_clone().ok();
            let _lock = handle.as_ref().map(FileLock::take);
            let len = sink.file.metadata().map(|m| m.len()).unwrap_or(sink.len);
            if len != sink.len {
                // Lines another writer appended are adopted when they continue the chain
                // from where this writer stood; anything else (an edit, a truncation, a
                // fork) stops this writer rather than write after it.
                let (s2, p2) =
                    adopt_appended(sink, len, rec.seq - 1, &rec.prev_sha256).map_err(|why| {
                        AuditError::Unchainable {
                            path: sink.path.clone(),
                            reason: format!(
                            "it changed under this writer ({} bytes expected, {len} found): {why}",
                            sink.len
                        ),
                        }
                    })?;
                sink.len = len;
                // Re-chain this record after the adopted lines.
                let rec = AuditRecord {
                    seq: s2 + 1,
                    prev_sha256: p2,
                    ..rec
                };
                line = serde_json::to_string(&rec).expect("an audit record serializes");
                seq = rec.seq;
                prev = sha256_hex(line.as_bytes());
                line.push('\n');
            }
            let written = sink
                .file
                .write_all(line.as_bytes())
                .and_then(|()| sink.file.sync_data());
            if let Err(source) = written {
                // Cut a torn write off so the file still ends at a complete record.
                let _ = sink.file.set_len(sink.len);
                return Err(AuditError::Io {
                    path: sink.path.clone(),
                    source,
                });
            }
            sink.len += line.len() as u64;
        }
        chain.seq = seq;
        chain.prev = prev;
        if let Some(s) = chain.stream.as_mut() {
            s.write_all(line.as_bytes())
                .and_then(|()| s.flush())
                .map_err(AuditError::Stdout)?;
        }
        Ok(())
    }

    /// Record and log (never propagate) a failure: for observers, which cannot return one.
    fn record_or_log(&self, f: AuditFields) {
        if let Err(e) = self.record(f) {
            tracing::error!(error = %e, "could not write an audit record");
        }
    }
}

/// An exclusive advisory lock (`flock`) on the audit file, released on drop. Taking it can
/// fail (a file system without locks): then the length check alone guards the chain.
struct FileLock<'a>(Option<&'a File>);

impl<'a> FileLock<'a> {
    #[cfg(unix)]
    fn take(f: &'a File) -> FileLock<'a> {
        use rustix::fs::{flock, FlockOperation};
        FileLock(flock(f, FlockOperation::LockExclusive).ok().map(|()| f))
    }

    #[cfg(not(unix))]
    fn take(_: &'a File) -> FileLock<'a> {
        FileLock(None)
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        #[cfg(unix)]
        if let Some(f) = self.0 {
            let _ = rustix::fs::flock(f, rustix::fs::FlockOperation::Unlock);
        }
    }
}

/// Check the bytes another writer appended after `sink.len` (up to `len`): complete lines,
/// each the next record of the chain that stood at (`seq`, `prev`). Returns the new head.
fn adopt_appended(
    sink: &mut FileSink,
    len: u64,
    mut seq: u64,
    prev: &str,
) -> Result<(u64, String), String> {
    if len < sink.len {
        return Err("it was truncated".into());
    }
    let mut buf = vec![0; usize::try_from(len - sink.len).map_err(|e| e.to_string())?];
    sink.file
        .seek(SeekFrom::Start(sink.len))
        .and_then(|_| sink.file.read_exact(&mut buf))
        .map_err(|e| format!("cannot read what was appended: {e}"))?;
    if buf.last() != Some(&b'\n') {
        return Err("the appended part does not end with a complete line".into());
    }
    let mut prev = prev.to_string();
    for l in buf[..buf.len() - 1].split(|&b| b == b'\n') {
        let rec: AuditRecord = serde_json::from_slice(l)
            .map_err(|_| format!("an appended line after seq {seq} is not a record"))?;
        if rec.seq != seq + 1 || rec.prev_sha256 != prev {
            return Err(format!(
                "an appended line (seq {}) does not continue the chain after seq {seq}",
                rec.seq
            ));
        }
        seq = rec.seq;
        prev = sha256_hex(l);
    }
    Ok((seq, prev))
}

/// The last line of a file of `len > 0` bytes, with its newline if it has one.
fn read_last_line(f: &mut File, len: u64) -> io::Result<Vec<u8>> {
    const CHUNK: u64 = 8192;
    let mut tail: Vec<u8> = Vec::new();
    let mut pos = len;
    loop {
        let n = CHUNK.min(pos);
        pos -= n;
        let mut chunk = vec![0; n as usize];
        f.seek(SeekFrom::Start(pos))?;
        f.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&tail);
        tail = chunk;
        // A newline before the final byte ends the line before the last.
        if let Some(i) = tail[..tail.len() - 1].iter().rposition(|&b| b == b'\n') {
            return Ok(tail.split_off(i + 1));
        }
        if pos == 0 {
            return Ok(tail);
        }
    }
}

/// Seq and hash of a file's last line, to continue the chain from.
fn chain_head(last: &[u8]) -> Result<(u64, String), String> {
    let Some(line) = last.strip_suffix(b"\n") else {
        return Err("the last line is incomplete (no newline at the end)".into());
    };
    let rec: AuditRecord = serde_json::from_slice(line)
        .map_err(|e| format!("the last line is not an audit record: {e}"))?;
    Ok((rec.seq, sha256_hex(line)))
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Check the whole chain of the file at `path`. `Err` only when it cannot be read.
pub fn verify(path: &Path) -> Result<VerifyOutcome, AuditError> {
    let io_err = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut reader = BufReader::new(File::open(path).map_err(io_err)?);
    let mut buf = Vec::new();
    let mut line = 0u64;
    let mut prev_hash: Option<String> = None;
    let broken = |line, reason: String| Ok(VerifyOutcome::Broken { line, reason });
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
            break;
        }
        line += 1;
        if buf.pop() != Some(b'\n') {
            return broken(
                line,
                "incomplete line (no newline at the end): truncated or torn".into(),
            );
        }
        let rec: AuditRecord = match serde_json::from_slice(&buf) {
            Ok(r) => r,
            Err(e) => return broken(line, format!("not an audit record: {e}")),
        };
        if rec.seq != line {
            return broken(
                line,
                format!(
                    "seq {} where {line} was expected: a line was deleted, inserted or moved",
                    rec.seq
                ),
            );
        }
        match &prev_hash {
            None => {
                let genesis = rec.event == AuditEvent::AuditStarted.as_str()
                    && is_hex64(&rec.prev_sha256)
                    && rec.message.as_deref()
                        == Some(format!("{GENESIS_PREFIX}{}", rec.prev_sha256).as_str());
                if !genesis {
                    return broken(
                        line,
                        "the first line is not a genesis record (audit_started whose message \
                         repeats its prev_sha256 nonce)"
                            .into(),
                    );
                }
            }
            Some(h) if *h != rec.prev_sha256 => {
                return broken(
                    line,
                    format!(
                        "prev_sha256 does not match the hash of line {}: that line or this one was altered",
                        line - 1
                    ),
                );
            }
            Some(_) => {}
        }
        prev_hash = Some(sha256_hex(&buf));
    }
    if line == 0 {
        return broken(1, "empty file: no genesis record".into());
    }
    Ok(VerifyOutcome::Ok { records: line })
}

/// Fields every rotation record shares: which rotation, of what, asked by whom.
fn rotation_fields(j: &Journal, event: AuditEvent) -> AuditFields {
    AuditFields {
        rotation_id: Some(j.rotation_id.clone()),
        target: Some(j.target.clone()),
        ..AuditFields::new(event)
    }
}

/// The new account's ids, once minted.
fn with_new_account(mut f: AuditFields, j: &Journal) -> AuditFields {
    if let Some(a) = &j.new_account {
        f.service_account_id = Some(a.id.clone());
        f.key_id = Some(a.key_id.clone());
    }
    f
}

fn with_old_account(mut f: AuditFields, j: &Journal) -> AuditFields {
    if let Some(a) = &j.old_account {
        f.old_service_account_id = Some(a.id.clone());
        f.old_key_id = Some(a.key_id.clone());
    }
    f
}

impl Observer for Audit {
    /// Maps engine events to records: ids, statuses and reasons from the journal, never the
    /// key (nor its hash).
    fn on_event(&self, j: &Journal, event: &RotationEvent) {
        let f = match event {
            RotationEvent::Started => {
                let mut f = with_old_account(rotation_fields(j, AuditEvent::RotationStarted), j);
                f.actor = Some(j.actor.clone());
                f.trigger = Some(j.trigger.as_str().into());
                f.reason = Some(j.reason.clone());
                f.vault_version = Some(j.old_vault_version);
                f.message = match (j.emergency, j.revoke_first) {
                    (true, true) => Some("emergency, revoke_first".into()),
                    (true, false) => Some("emergency".into()),
                    _ => None,
                };
                f
            }
            RotationEvent::StepStarted(Step::Rollback) => {
                let mut f = rotation_fields(j, AuditEvent::Rollback);
                f.step = Some(Step::Rollback.as_str().into());
                f.reason = j.error.clone();
                with_old_account(with_new_account(f, j), j)
            }
            RotationEvent::StepStarted(step) => {
                let mut f = rotation_fields(j, AuditEvent::StepStarted);
                f.step = Some(step.as_str().into());
                f
            }
            RotationEvent::StepFinished {
                step,
                outcome,
                duration,
            } => {
                let mut f = with_new_account(rotation_fields(j, AuditEvent::StepFinished), j);
                f.step = Some(step.as_str().into());
                f.outcome = Some(outcome.clone());
                f.vault_version = match step {
                    Step::Publish => j.new_vault_version,
                    Step::Rollback => j.rollback_vault_version,
                    _ => None,
                };
                f.message = Some(format!("took {:.3}s", duration.as_secs_f64()));
                f
            }
            RotationEvent::Finished => {
                let event = match j.status {
                    Status::Completed => AuditEvent::RotationCompleted,
                    Status::RolledBack => AuditEvent::RotationRolledBack,
                    Status::Failed => AuditEvent::RotationFailed,
                    Status::Running | Status::RollingBack => return, // not terminal
                };
                let mut f = with_old_account(with_new_account(rotation_fields(j, event), j), j);
                f.actor = Some(j.actor.clone());
                f.trigger = Some(j.trigger.as_str().into());
                f.reason = Some(j.reason.clone());
                f.outcome = Some(j.status.as_str().into());
                f.vault_version = j.rollback_vault_version.or(j.new_vault_version);
                f.message = j.error.clone();
                if let Some(r) = &j.forensics {
                    let mut g =
                        with_old_account(rotation_fields(j, AuditEvent::EmergencyForensics), j);
                    g.outcome = Some(
                        match (&r.usage_unavailable, &r.audit_unavailable) {
                            (None, None) => "collected",
                            (Some(_), Some(_)) => "unavailable",
                            _ => "partial",
                        }
                        .into(),
                    );
                    g.message = Some(r.summary());
                    self.record_or_log(g);
                }
                if !j.pending_deletions.is_empty() {
                    let ids: Vec<&str> = j
                        .pending_deletions
                        .iter()
                        .map(|p| p.account.id.as_str())
                        .collect();
                    let pending = format!("pending deletion: {}", ids.join(", "));
                    f.message = Some(match f.message {
                        Some(m) => format!("{m}; {pending}"),
                        None => pending,
                    });
                }
                f
            }
            // Each deletion it made has its own `account_deleted` record.
            RotationEvent::PendingRetried => return,
            RotationEvent::UnlistedConsumers { found, action } => {
                let mut f = rotation_fields(j, AuditEvent::UnlistedConsumers);
                f.outcome = Some((*action).into());
                f.message = Some(found.join("; "));
                f
            }
            RotationEvent::RollbackRefused { reason } => {
                let mut f = with_old_account(
                    with_new_account(rotation_fields(j, AuditEvent::RollbackRefused), j),
                    j,
                );
                f.step = Some(Step::Rollback.as_str().into());
                f.outcome = Some("refused".into());
                f.reason = Some(reason.clone());
                f
            }
            RotationEvent::AccountDeleted { account_id, why } => {
                let mut f = rotation_fields(j, AuditEvent::AccountDeleted);
                f.reason = Some((*why).into());
                // The key id, when the journal knows the account.
                let known = j
                    .referenced_accounts()
                    .find(|a| a.id == *account_id)
                    .map(|a| a.key_id.clone());
                f.service_account_id = Some(account_id.clone());
                f.key_id = known;
                f
            }
        };
        self.record_or_log(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rotation::journal::{PendingDeletion, StepState};
    use crate::rotation::ports::AccountRef;
    use crate::rotation::Trigger;
    use std::time::Duration;

    const FORWARD: [Step; 7] = [
        Step::Mint,
        Step::Publish,
        Step::Sync,
        Step::Roll,
        Step::Verify,
        Step::Drain,
        Step::Retire,
    ];

    /// Stands in for a key value that must never reach the trail.
    const KEY_SENTINEL: &str = "sk-svcacct-SENTINEL-must-never-appear";

    fn journal() -> Journal {
        let now = Utc::now();
        Journal {
            rotation_id: "20261123215000-abc123".into(),
            target: "chat".into(),
            trigger: Trigger::Api,
            actor: "ops-token".into(),
            reason: "quarterly".into(),
            emergency: false,
            revoke_first: false,
            status: Status::Running,
            step: Step::Mint,
            step_state: StepState::Started,
            started_at: now,
            updated_at: now,
            new_account_name: "okr-chat-20261123215000-abc123".into(),
            old_account: Some(AccountRef {
                id: "svc_acct_old".into(),
                key_id: "key_old".into(),
            }),
            old_vault_version: 4,
            old_rotation_id: None,
            old_key_created_at: None,
            new_account: None,
            // Only a hash lives in the journal; a sentinel here proves the trail ignores it.
            new_key_sha256: Some(KEY_SENTINEL.into()),
            new_vault_version: None,
            rollback_vault_version: None,
            old_retired: false,
            new_key_adopted: None,
            waves: Vec::new(),
            rollout_id: None,
            pending_deletions: Vec::new(),
            steps: Vec::new(),
            error: None,
            spec: None,
            old_key_sha256: None,
            consecutive_failures: 0,
            last_failure_at: None,
            forensics: None,
        }
    }

    /// A full completed rotation through the observer: started, 7 step pairs, completed.
    fn completed_rotation(audit: &Audit) {
        let mut j = journal();
        audit.on_event(&j, &RotationEvent::Started);
        for step in FORWARD {
            j.begin(step, Utc::now());
            audit.on_event(&j, &RotationEvent::StepStarted(step));
            match step {
                Step::Mint => {
                    j.new_account = Some(AccountRef {
                        id: "svc_acct_new".into(),
                        key_id: "key_new".into(),
                    })
                }
                Step::Publish => j.new_vault_version = Some(5),
                Step::Retire => audit.on_event(
                    &j,
                    &RotationEvent::AccountDeleted {
                        account_id: "svc_acct_old".into(),
                        why: "retire",
                    },
                ),
                _ => {}
            }
            j.finish("ok", Utc::now());
            audit.on_event(
                &j,
                &RotationEvent::StepFinished {
                    step,
                    outcome: "ok".into(),
                    duration: Duration::from_millis(1500),
                },
            );
        }
        j.status = Status::Completed;
        audit.on_event(&j, &RotationEvent::Finished);
    }

    fn records(path: &Path) -> Vec<AuditRecord> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn write_lines(path: &Path, lines: &[String]) {
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(path, text).unwrap();
    }

    /// A trail of 18 records: genesis, started, 7 step pairs, account_deleted, completed.
    fn trail() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(&path), false).unwrap();
        completed_rotation(&audit);
        (dir, path)
    }

    fn broken_at(path: &Path) -> (u64, String) {
        match verify(path).unwrap() {
            VerifyOutcome::Broken { line, reason } => (line, reason),
            ok => panic!("tampering not detected: {ok:?}"),
        }
    }

    #[test]
    fn a_rotation_verifies_with_the_right_count_and_order() {
        let (_dir, path) = trail();
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 18 });
        let recs = records(&path);
        let events: Vec<&str> = recs.iter().map(|r| r.event.as_str()).collect();
        let mut want = vec!["audit_started", "rotation_started"];
        for step in FORWARD {
            want.push("step_started");
            if step == Step::Retire {
                want.push("account_deleted");
            }
            want.push("step_finished");
        }
        want.push("rotation_completed");
        assert_eq!(events, want);
        let steps: Vec<&str> = recs.iter().filter_map(|r| r.step.as_deref()).collect();
        assert_eq!(steps.len(), 14);
        assert_eq!(steps[0], "mint");
        assert_eq!(steps[13], "retire");
        for (i, r) in recs.iter().enumerate() {
            assert_eq!(r.seq, i as u64 + 1);
        }
        let g = &recs[0];
        assert_eq!(
            g.message.as_deref(),
            Some(format!("genesis={}", g.prev_sha256).as_str())
        );
    }

    #[test]
    fn records_carry_the_journal_ids_and_never_key_material() {
        let (_dir, path) = trail();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(KEY_SENTINEL), "key material in the trail");
        let recs = records(&path);
        let started = &recs[1];
        assert_eq!(
            started.rotation_id.as_deref(),
            Some("20261123215000-abc123")
        );
        assert_eq!(started.target.as_deref(), Some("chat"));
        assert_eq!(started.actor.as_deref(), Some("ops-token"));
        assert_eq!(started.trigger.as_deref(), Some("api"));
        assert_eq!(started.reason.as_deref(), Some("quarterly"));
        assert_eq!(
            started.old_service_account_id.as_deref(),
            Some("svc_acct_old")
        );
        assert_eq!(started.old_key_id.as_deref(), Some("key_old"));
        let mint_done = recs
            .iter()
            .find(|r| r.event == "step_finished" && r.step.as_deref() == Some("mint"))
            .unwrap();
        assert_eq!(
            mint_done.service_account_id.as_deref(),
            Some("svc_acct_new")
        );
        assert_eq!(mint_done.key_id.as_deref(), Some("key_new"));
        assert_eq!(mint_done.outcome.as_deref(), Some("ok"));
        let publish_done = recs
            .iter()
            .find(|r| r.event == "step_finished" && r.step.as_deref() == Some("publish"))
            .unwrap();
        assert_eq!(publish_done.vault_version, Some(5));
        let deleted = recs.iter().find(|r| r.event == "account_deleted").unwrap();
        assert_eq!(deleted.service_account_id.as_deref(), Some("svc_acct_old"));
        assert_eq!(deleted.key_id.as_deref(), Some("key_old"));
        assert_eq!(deleted.reason.as_deref(), Some("retire"));
        let done = recs.last().unwrap();
        assert_eq!(done.event, "rotation_completed");
        assert_eq!(done.outcome.as_deref(), Some("completed"));
        assert_eq!(done.service_account_id.as_deref(), Some("svc_acct_new"));
        assert_eq!(done.old_service_account_id.as_deref(), Some("svc_acct_old"));
        assert_eq!(done.vault_version, Some(5));
    }

    #[test]
    fn rollback_records_the_reason_the_restored_version_and_pending_deletions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(&path), false).unwrap();
        let mut j = journal();
        j.new_account = Some(AccountRef {
            id: "svc_acct_new".into(),
            key_id: "key_new".into(),
        });
        j.error = Some("verify: rollout of Deployment default/chat failed".into());
        j.begin(Step::Rollback, Utc::now());
        audit.on_event(&j, &RotationEvent::StepStarted(Step::Rollback));
        j.rollback_vault_version = Some(6);
        j.pending_deletions.push(PendingDeletion {
            account: j.new_account.clone().unwrap(),
            once_quiet_for_ms: None,
            unless_pods_carry: None,
            attempts: 1,
            last_error: None,
            ..PendingDeletion::new(
                j.new_account.clone().unwrap(),
                Default::default(),
                None,
                "proj",
                Utc::now(),
            )
        });
        j.status = Status::RolledBack;
        audit.on_event(&j, &RotationEvent::Finished);
        let recs = records(&path);
        assert_eq!(recs[1].event, "rollback");
        assert_eq!(recs[1].reason, j.error);
        let done = &recs[2];
        assert_eq!(done.event, "rotation_rolled_back");
        assert_eq!(done.vault_version, Some(6));
        let msg = done.message.as_deref().unwrap();
        assert!(
            msg.contains("rollout of Deployment default/chat failed"),
            "{msg}"
        );
        assert!(msg.contains("pending deletion: svc_acct_new"), "{msg}");
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 3 });
    }

    #[test]
    fn reopening_continues_the_chain_and_the_seq() {
        let (_dir, path) = trail();
        let audit = Audit::open(Some(&path), false).unwrap();
        audit
            .record(AuditFields {
                target: Some("chat".into()),
                message: Some("line one\nline two".into()),
                ..AuditFields::new(AuditEvent::ConfigReloaded)
            })
            .unwrap();
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 20 });
        let recs = records(&path);
        assert_eq!(recs[18].event, "audit_started");
        assert_eq!(recs[18].seq, 19);
        assert_eq!(
            recs[18].message.as_deref(),
            Some("continuing the chain after seq 18")
        );
        assert_eq!(recs[19].event, "config_reloaded");
        assert_eq!(recs[19].seq, 20);
        // The embedded newline stayed inside the JSON string.
        assert_eq!(recs[19].message.as_deref(), Some("line one\nline two"));
    }

    #[test]
    fn a_file_with_a_torn_last_line_is_not_continued() {
        let (_dir, path) = trail();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, &text[..text.len() - 5]).unwrap();
        let err = Audit::open(Some(&path), false).unwrap_err();
        assert!(matches!(err, AuditError::Unchainable { .. }), "{err}");
        // Nothing was appended to the broken file.
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().len(),
            text.len() - 5
        );
    }

    #[test]
    fn an_edited_byte_inside_a_value_breaks_the_next_line() {
        let (_dir, path) = trail();
        let mut l = lines(&path);
        let k = 5; // 1-based
        assert!(l[k - 1].contains("\"target\":\"chat\""));
        l[k - 1] = l[k - 1].replacen("\"target\":\"chat\"", "\"target\":\"chaT\"", 1);
        write_lines(&path, &l);
        let (line, reason) = broken_at(&path);
        assert_eq!(line, k as u64 + 1, "{reason}");
        assert!(reason.contains("prev_sha256"), "{reason}");
    }

    #[test]
    fn an_edited_byte_that_breaks_the_json_or_seq_is_reported_on_that_line() {
        let (_dir, path) = trail();
        let orig = lines(&path);
        let mut l = orig.clone();
        l[6].replace_range(0..1, "[");
        write_lines(&path, &l);
        assert_eq!(broken_at(&path).0, 7);

        let mut l = orig.clone();
        l[6] = l[6].replacen("\"seq\":7", "\"seq\":8", 1);
        write_lines(&path, &l);
        assert_eq!(broken_at(&path).0, 7);

        // A byte that is not even UTF-8.
        write_lines(&path, &orig);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = orig[..9].iter().map(|s| s.len() + 1).sum::<usize>() + 20;
        bytes[at] = 0xff;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(broken_at(&path).0, 10);
    }

    #[test]
    fn a_flipped_bit_anywhere_but_the_last_line_is_caught_there_or_on_the_next() {
        let (_dir, path) = trail();
        let orig = std::fs::read(&path).unwrap();
        let starts: Vec<usize> = std::iter::once(0)
            .chain(
                orig.iter()
                    .enumerate()
                    .filter(|(_, &b)| b == b'\n')
                    .map(|(i, _)| i + 1),
            )
            .collect();
        for k in 1..18usize {
            let (start, end) = (starts[k - 1], starts[k] - 1); // line k, without its newline
            for at in [start, start + 9, (start + end) / 2, end - 2, end - 1] {
                let mut bytes = orig.clone();
                bytes[at] ^= 0x01;
                std::fs::write(&path, &bytes).unwrap();
                let (line, reason) = broken_at(&path);
                assert!(
                    line == k as u64 || line == k as u64 + 1,
                    "flip in line {k} at byte {at}: reported line {line}: {reason}"
                );
            }
        }
    }

    #[test]
    fn a_deleted_line_is_caught_where_it_was() {
        for k in [1usize, 2, 9, 18] {
            let (_dir, path) = trail();
            let mut l = lines(&path);
            l.remove(k - 1);
            write_lines(&path, &l);
            if k == 18 {
                // Dropping the tail is invisible to the chain alone (see the module doc).
                assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 17 });
            } else {
                assert_eq!(broken_at(&path).0, k as u64, "deleted line {k}");
            }
        }
    }

    #[test]
    fn swapped_lines_are_caught_at_the_first() {
        let (_dir, path) = trail();
        let mut l = lines(&path);
        l.swap(7, 8); // lines 8 and 9
        write_lines(&path, &l);
        let (line, reason) = broken_at(&path);
        assert_eq!(line, 8, "{reason}");
    }

    #[test]
    fn a_truncated_last_line_is_caught() {
        let (_dir, path) = trail();
        let text = std::fs::read_to_string(&path).unwrap();
        // Cut inside the last line (its newline and some bytes).
        std::fs::write(&path, &text[..text.len() - 20]).unwrap();
        let (line, reason) = broken_at(&path);
        assert_eq!(line, 18);
        assert!(reason.contains("incomplete"), "{reason}");
        // Cut just its newline: the line is complete JSON but not a complete record line.
        std::fs::write(&path, &text[..text.len() - 1]).unwrap();
        assert_eq!(broken_at(&path).0, 18);
    }

    #[test]
    fn lines_appended_by_hand_without_the_right_hash_are_caught() {
        let (_dir, path) = trail();
        let mut l = lines(&path);
        let mut forged: AuditRecord = serde_json::from_str(&l[17]).unwrap();
        forged.seq = 19;
        forged.event = "account_deleted".into();
        forged.service_account_id = Some("svc_acct_new".into());
        // The forger copies the last line's prev hash: plausible-looking, but wrong.
        l.push(serde_json::to_string(&forged).unwrap());
        write_lines(&path, &l);
        assert_eq!(broken_at(&path).0, 19);

        // With the right hash the append passes: the chain alone cannot stop that.
        forged.prev_sha256 = sha256_hex(l[17].as_bytes());
        l[18] = serde_json::to_string(&forged).unwrap();
        write_lines(&path, &l);
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 19 });
    }

    #[test]
    fn a_fake_genesis_or_an_empty_file_is_not_accepted() {
        let (_dir, path) = trail();
        let mut l = lines(&path);
        let mut g: AuditRecord = serde_json::from_str(&l[0]).unwrap();
        g.message = Some(format!("genesis={}", "0".repeat(64)));
        l[0] = serde_json::to_string(&g).unwrap();
        write_lines(&path, &l);
        assert_eq!(broken_at(&path).0, 1);

        std::fs::write(&path, "").unwrap();
        assert_eq!(broken_at(&path).0, 1);

        let missing = path.with_file_name("nope.jsonl");
        assert!(matches!(verify(&missing), Err(AuditError::Io { .. })));
    }

    /// A writer the test can read back, standing in for stdout.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_stream_sink_gets_the_same_lines_and_alone_forms_a_valid_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let out = Shared::default();
        let audit = Audit::open_with(Some(&path), Some(Box::new(out.clone()))).unwrap();
        completed_rotation(&audit);
        let streamed = out.0.lock().unwrap().clone();
        assert_eq!(streamed, std::fs::read(&path).unwrap());

        let only = Shared::default();
        let audit = Audit::open_with(None, Some(Box::new(only.clone()))).unwrap();
        completed_rotation(&audit);
        let copy = dir.path().join("collected.jsonl");
        std::fs::write(&copy, only.0.lock().unwrap().as_slice()).unwrap();
        assert_eq!(verify(&copy).unwrap(), VerifyOutcome::Ok { records: 18 });
    }

    #[test]
    fn concurrent_writers_keep_the_chain_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(&path), false).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let a = audit.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        a.record(AuditFields {
                            message: Some(format!("writer {t} record {i}")),
                            ..AuditFields::new(AuditEvent::TriggerRefused)
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 101 });
    }

    #[test]
    fn a_second_writer_is_chained_after_and_a_foreign_line_is_refused_not_forked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let first = Audit::open(Some(&path), false).unwrap();
        let second = Audit::open(Some(&path), false).unwrap();
        // Each adopts what the other appended (it continues the chain) and writes after it.
        first
            .record(AuditFields::new(AuditEvent::ConfigReloaded))
            .unwrap();
        second
            .record(AuditFields::new(AuditEvent::ConfigReloaded))
            .unwrap();
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 4 });
        // A line that does not continue the chain (an edit, a fork) stops the writer.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        let mut l = lines(&path);
        let last = l.pop().unwrap();
        f.write_all(format!("{last}\n").as_bytes()).unwrap();
        drop(f);
        let err = first
            .record(AuditFields::new(AuditEvent::ConfigReloaded))
            .unwrap_err();
        assert!(matches!(err, AuditError::Unchainable { .. }), "{err}");
        assert!(
            err.to_string().contains("does not continue the chain"),
            "{err}"
        );
        assert_eq!(
            lines(&path).len(),
            5,
            "nothing written after the foreign line"
        );
    }

    #[test]
    fn concurrent_writers_in_two_handles_keep_the_chain_intact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let handles: Vec<Audit> = (0..2)
            .map(|_| Audit::open(Some(&path), false).unwrap())
            .collect();
        let threads: Vec<_> = handles
            .into_iter()
            .enumerate()
            .map(|(t, a)| {
                std::thread::spawn(move || {
                    for i in 0..50 {
                        a.record(AuditFields {
                            message: Some(format!("handle {t} record {i}")),
                            ..AuditFields::new(AuditEvent::TriggerRefused)
                        })
                        .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 102 });
    }

    /// Found by the crash matrix: `sweep` (a one-shot command, same config, so the same
    /// audit file) appended its records while the daemon ran; from then on every record of
    /// the daemon was refused ("it changed under this writer") and only logged, so its
    /// rotations and account deletions went unaudited for the rest of its life.
    #[test]
    fn the_daemon_keeps_its_trail_after_a_one_shot_command_appended_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let daemon = Audit::open(Some(&path), false).unwrap();
        daemon
            .record(AuditFields::new(AuditEvent::RotationStarted))
            .unwrap();
        {
            // `openai-key-rotator sweep --config <the daemon's config>`
            let sweep = Audit::open(Some(&path), false).unwrap();
            sweep
                .record(AuditFields::new(AuditEvent::SweepDeleted))
                .unwrap();
        }
        daemon
            .record(AuditFields::new(AuditEvent::AccountDeleted))
            .expect("the daemon's record after the sweep's is written");
        daemon
            .record(AuditFields::new(AuditEvent::RotationCompleted))
            .unwrap();
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 6 });
        let events: Vec<String> = lines(&path)
            .iter()
            .map(|l| serde_json::from_str::<AuditRecord>(l).unwrap().event)
            .collect();
        assert_eq!(
            events,
            [
                "audit_started",
                "rotation_started",
                "audit_started",
                "sweep_deleted",
                "account_deleted",
                "rotation_completed"
            ]
        );
    }

    #[test]
    fn the_last_line_is_found_across_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        drop(Audit::open(Some(&path), false).unwrap());
        for n in [10usize, 9000, 20_000, 3] {
            // Each reopen reads the long line written before it.
            let audit = Audit::open(Some(&path), false).unwrap();
            audit
                .record(AuditFields {
                    message: Some("x".repeat(n)),
                    ..AuditFields::new(AuditEvent::ConfigReloaded)
                })
                .unwrap();
        }
        assert_eq!(verify(&path).unwrap(), VerifyOutcome::Ok { records: 9 });
    }
}
