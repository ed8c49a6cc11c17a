//! Fault injection around the ports, for unit tests and the deterministic simulation: at
//! any call a [`FaultPlan`] may crash the "process" before or after the call's effect, fail
//! it as a transient error, lose its answer, or let it land late.
//!
//! A crash is modelled as what it is to the code: the call never returns. Every wrapped
//! call of the crashed process then hangs too, and [`Crash::run`] hands control back to the
//! test, which drops the engine (or daemon) future and "restarts" with fresh ports over the
//! same backends. No crash hook lives in the engine itself.

use super::ports::*;
use crate::config::WorkloadRef;
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Every port operation, a fixed set (plans and histories name them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    CreateAccount,
    ListAccounts,
    DeleteAccount,
    CheckKey,
    KeyUsage,
    ReadKey,
    ReadKeyMeta,
    ReadKeyVersion,
    WriteKey,
    WriteKeyMeta,
    ReadDoc,
    WriteDoc,
    List,
    Roll,
    RolloutState,
    ReadyPods,
    SecretSha256,
    NudgeSecret,
    Event,
}

impl Op {
    pub fn backend(self) -> Backend {
        use Op::*;
        match self {
            CreateAccount | ListAccounts | DeleteAccount | CheckKey | KeyUsage => Backend::OpenAi,
            ReadKey | ReadKeyMeta | ReadKeyVersion | WriteKey | WriteKeyMeta | ReadDoc
            | WriteDoc | List => Backend::Vault,
            Roll | RolloutState | ReadyPods | SecretSha256 | NudgeSecret | Event => {
                Backend::Kubernetes
            }
        }
    }

    /// Calls that change something (the ones a crash or a late landing matters for).
    pub fn is_write(self) -> bool {
        use Op::*;
        matches!(
            self,
            CreateAccount
                | DeleteAccount
                | WriteKey
                | WriteKeyMeta
                | WriteDoc
                | Roll
                | NudgeSecret
                | Event
        )
    }
}

/// One call as a plan sees it.
#[derive(Debug, Clone)]
pub struct Call {
    pub op: Op,
    /// What it is about: a path, an account id or name, a workload.
    pub subject: String,
    /// For `WriteDoc`: the document written (a journal: its `step`, `step_state`, `status`).
    pub doc: Option<serde_json::Value>,
}

impl Call {
    /// For a journal write: its `(step, step_state, status)` as written.
    pub fn journal_state(&self) -> Option<(&str, &str, &str)> {
        let d = self.doc.as_ref()?;
        Some((
            d.get("step")?.as_str()?,
            d.get("step_state")?.as_str()?,
            d.get("status")?.as_str()?,
        ))
    }
}

/// What happens to a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The process dies before the call leaves it.
    CrashBefore,
    /// The call takes effect, then the process dies before it hears the answer.
    CrashAfter,
    /// The call fails (transient) and has no effect.
    Transient,
    /// The call takes effect but its answer is lost (a transient error comes back).
    LostAnswer,
    /// The call times out now and takes effect this much later.
    LateEffect(Duration),
}

/// Decides, call by call, which fault (if any) to inject.
pub trait FaultPlan: Send + Sync {
    fn fault(&self, call: &Call) -> Option<Fault>;
}

/// No faults.
pub struct NoFaults;
impl FaultPlan for NoFaults {
    fn fault(&self, _: &Call) -> Option<Fault> {
        None
    }
}

/// A plan from a closure.
pub struct PlanFn<F>(pub F);
impl<F: Fn(&Call) -> Option<Fault> + Send + Sync> FaultPlan for PlanFn<F> {
    fn fault(&self, call: &Call) -> Option<Fault> {
        (self.0)(call)
    }
}

/// `fault` at the first call matching `when`, then nothing.
pub fn once(
    when: impl Fn(&Call) -> bool + Send + Sync + 'static,
    fault: Fault,
) -> Arc<dyn FaultPlan> {
    let fired = std::sync::atomic::AtomicBool::new(false);
    Arc::new(PlanFn(move |c: &Call| {
        if when(c) && !fired.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Some(fault)
        } else {
            None
        }
    }))
}

/// The fate of one simulated process: once crashed, every wrapped call hangs.
#[derive(Clone, Default)]
pub struct Crash(CancellationToken);

impl Crash {
    pub fn crashed(&self) -> bool {
        self.0.is_cancelled()
    }

    pub fn crash(&self) {
        self.0.cancel();
    }

    /// Run `f` until it finishes (`Some`) or the process crashes (`None`; `f` is dropped
    /// where it stood, as a killed process would leave it).
    pub async fn run<F: Future>(&self, f: F) -> Option<F::Output> {
        tokio::select! {
            biased;
            _ = self.0.cancelled() => None,
            r = f => Some(r),
        }
    }

    async fn hang<T>(&self) -> T {
        self.crash();
        std::future::pending().await
    }
}

/// A port wrapped with a fault plan and a process fate.
pub struct Faulty<P: ?Sized> {
    inner: Arc<P>,
    plan: Arc<dyn FaultPlan>,
    crash: Crash,
}

impl<P: ?Sized> Clone for Faulty<P> {
    fn clone(&self) -> Self {
        Faulty {
            inner: self.inner.clone(),
            plan: self.plan.clone(),
            crash: self.crash.clone(),
        }
    }
}

impl<P: ?Sized + Send + Sync + 'static> Faulty<P> {
    pub fn new(inner: Arc<P>, plan: Arc<dyn FaultPlan>, crash: Crash) -> Self {
        Faulty { inner, plan, crash }
    }

    /// Run one call under the plan. `make` builds the real call (owned, so a late landing
    /// can run it after the caller gave up).
    async fn call<T: Send + 'static>(
        &self,
        call: Call,
        make: impl FnOnce(Arc<P>) -> BoxFuture<'static, Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        if self.crash.crashed() {
            return self.crash.hang().await;
        }
        let injected = |what: &str| BackendError::Failed {
            backend: call.op.backend(),
            message: format!("{what} (injected at {:?} {})", call.op, call.subject),
            transient: true,
        };
        match self.plan.fault(&call) {
            None => make(self.inner.clone()).await,
            Some(Fault::CrashBefore) => self.crash.hang().await,
            Some(Fault::CrashAfter) => {
                let _ = make(self.inner.clone()).await;
                self.crash.hang().await
            }
            Some(Fault::Transient) => Err(injected("transient failure")),
            Some(Fault::LostAnswer) => {
                let _ = make(self.inner.clone()).await;
                Err(injected("answer lost"))
            }
            Some(Fault::LateEffect(after)) => {
                let fut = make(self.inner.clone());
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    let _ = fut.await;
                });
                Err(injected("timed out"))
            }
        }
    }
}

fn call(op: Op, subject: impl Into<String>) -> Call {
    Call {
        op,
        subject: subject.into(),
        doc: None,
    }
}

#[async_trait]
impl<P: KeyIssuer + ?Sized + 'static> KeyIssuer for Faulty<P> {
    async fn create_service_account(
        &self,
        project: &str,
        name: &str,
    ) -> Result<MintedKey, BackendError> {
        let (project, name) = (project.to_string(), name.to_string());
        self.call(call(Op::CreateAccount, name.clone()), move |p| {
            Box::pin(async move { p.create_service_account(&project, &name).await })
        })
        .await
    }
    async fn list_service_accounts(&self, project: &str) -> Result<Vec<AccountInfo>, BackendError> {
        let project = project.to_string();
        self.call(call(Op::ListAccounts, project.clone()), move |p| {
            Box::pin(async move { p.list_service_accounts(&project).await })
        })
        .await
    }
    async fn delete_service_account(&self, project: &str, id: &str) -> Result<(), BackendError> {
        let (project, id) = (project.to_string(), id.to_string());
        self.call(call(Op::DeleteAccount, id.clone()), move |p| {
            Box::pin(async move { p.delete_service_account(&project, &id).await })
        })
        .await
    }
    async fn check_key(&self, key: &Secret) -> Result<(), BackendError> {
        let key = key.clone();
        self.call(call(Op::CheckKey, "key"), move |p| {
            Box::pin(async move { p.check_key(&key).await })
        })
        .await
    }
    async fn key_usage(
        &self,
        project: &str,
        key_id: &str,
        since: DateTime<Utc>,
    ) -> Result<KeyUsage, BackendError> {
        let (project, key_id) = (project.to_string(), key_id.to_string());
        self.call(call(Op::KeyUsage, key_id.clone()), move |p| {
            Box::pin(async move { p.key_usage(&project, &key_id, since).await })
        })
        .await
    }
}

#[async_trait]
impl<P: SecretStore + ?Sized + 'static> SecretStore for Faulty<P> {
    async fn read_key(&self, path: &str, field: &str) -> Result<Option<StoredKey>, BackendError> {
        let (path, field) = (path.to_string(), field.to_string());
        self.call(call(Op::ReadKey, path.clone()), move |p| {
            Box::pin(async move { p.read_key(&path, &field).await })
        })
        .await
    }
    async fn read_key_meta(
        &self,
        path: &str,
        field: &str,
    ) -> Result<Option<KeyInfo>, BackendError> {
        let (path, field) = (path.to_string(), field.to_string());
        self.call(call(Op::ReadKeyMeta, path.clone()), move |p| {
            Box::pin(async move { p.read_key_meta(&path, &field).await })
        })
        .await
    }
    async fn read_key_version(
        &self,
        path: &str,
        field: &str,
        version: u64,
    ) -> Result<Secret, BackendError> {
        let (path, field) = (path.to_string(), field.to_string());
        self.call(call(Op::ReadKeyVersion, path.clone()), move |p| {
            Box::pin(async move { p.read_key_version(&path, &field, version).await })
        })
        .await
    }
    async fn write_key(
        &self,
        path: &str,
        field: &str,
        key: &Secret,
        meta: &KeyMeta,
        expected_version: u64,
    ) -> Result<u64, BackendError> {
        let (path, field, key, meta) = (
            path.to_string(),
            field.to_string(),
            key.clone(),
            meta.clone(),
        );
        self.call(call(Op::WriteKey, path.clone()), move |p| {
            Box::pin(async move {
                p.write_key(&path, &field, &key, &meta, expected_version)
                    .await
            })
        })
        .await
    }
    async fn write_key_meta(&self, path: &str, meta: &KeyMeta) -> Result<(), BackendError> {
        let (path, meta) = (path.to_string(), meta.clone());
        self.call(call(Op::WriteKeyMeta, path.clone()), move |p| {
            Box::pin(async move { p.write_key_meta(&path, &meta).await })
        })
        .await
    }
    async fn read_doc(&self, path: &str) -> Result<Option<(u64, serde_json::Value)>, BackendError> {
        let path = path.to_string();
        self.call(call(Op::ReadDoc, path.clone()), move |p| {
            Box::pin(async move { p.read_doc(&path).await })
        })
        .await
    }
    async fn write_doc(
        &self,
        path: &str,
        doc: &serde_json::Value,
        expected_version: u64,
    ) -> Result<u64, BackendError> {
        let (path, doc) = (path.to_string(), doc.clone());
        let c = Call {
            op: Op::WriteDoc,
            subject: path.clone(),
            doc: Some(doc.clone()),
        };
        self.call(c, move |p| {
            Box::pin(async move { p.write_doc(&path, &doc, expected_version).await })
        })
        .await
    }
    async fn list(&self, prefix: &str) -> Result<Vec<String>, BackendError> {
        let prefix = prefix.to_string();
        self.call(call(Op::List, prefix.clone()), move |p| {
            Box::pin(async move { p.list(&prefix).await })
        })
        .await
    }
}

#[async_trait]
impl<P: WorkloadRoller + ?Sized + 'static> WorkloadRoller for Faulty<P> {
    async fn roll(&self, workload: &WorkloadRef, rollout_id: &str) -> Result<(), BackendError> {
        let (w, id) = (workload.clone(), rollout_id.to_string());
        self.call(call(Op::Roll, w.to_string()), move |p| {
            Box::pin(async move { p.roll(&w, &id).await })
        })
        .await
    }
    async fn rollout_state(
        &self,
        workload: &WorkloadRef,
        rollout_id: &str,
    ) -> Result<RolloutState, BackendError> {
        let (w, id) = (workload.clone(), rollout_id.to_string());
        self.call(call(Op::RolloutState, w.to_string()), move |p| {
            Box::pin(async move { p.rollout_state(&w, &id).await })
        })
        .await
    }
    async fn ready_pods_with(
        &self,
        workload: &WorkloadRef,
        rollout_id: &str,
    ) -> Result<u32, BackendError> {
        let (w, id) = (workload.clone(), rollout_id.to_string());
        self.call(call(Op::ReadyPods, w.to_string()), move |p| {
            Box::pin(async move { p.ready_pods_with(&w, &id).await })
        })
        .await
    }
    async fn secret_sha256(
        &self,
        namespace: &str,
        name: &str,
        key: &str,
    ) -> Result<Option<String>, BackendError> {
        let (ns, name, key) = (namespace.to_string(), name.to_string(), key.to_string());
        self.call(call(Op::SecretSha256, format!("{ns}/{name}")), move |p| {
            Box::pin(async move { p.secret_sha256(&ns, &name, &key).await })
        })
        .await
    }
    async fn nudge_secret(
        &self,
        namespace: &str,
        name: &str,
        annotation: &str,
        value: &str,
    ) -> Result<(), BackendError> {
        let (ns, name, a, v) = (
            namespace.to_string(),
            name.to_string(),
            annotation.to_string(),
            value.to_string(),
        );
        self.call(call(Op::NudgeSecret, format!("{ns}/{name}")), move |p| {
            Box::pin(async move { p.nudge_secret(&ns, &name, &a, &v).await })
        })
        .await
    }
    async fn event(
        &self,
        workload: &WorkloadRef,
        type_: EventType,
        reason: &str,
        note: &str,
    ) -> Result<(), BackendError> {
        let (w, reason, note) = (workload.clone(), reason.to_string(), note.to_string());
        self.call(call(Op::Event, w.to_string()), move |p| {
            Box::pin(async move { p.event(&w, type_, &reason, &note).await })
        })
        .await
    }
}
