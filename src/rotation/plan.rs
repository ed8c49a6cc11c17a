//! The dry-run plan: what a rotation of a target would do, touching nothing.

use super::engine::{Engine, EngineError};
use crate::config::{Target, WorkloadKind};

impl Engine {
    /// What a rotation of `target` would do, touching nothing.
    pub async fn plan(&self, target: &Target) -> Result<Vec<String>, EngineError> {
        let current = self
            .store
            .read_key(&target.vault_path, &target.vault_field)
            .await?;
        let mut plan = Vec::new();
        if let Some(why) = self.refusal(target).await {
            plan.push(format!("refused: {why}"));
        }
        let name = self.account_name_for(&target.name, "<rotation-id>", self.now());
        plan.push(format!(
            "mint: create service account {name} in project {}",
            target.project_id
        ));
        plan.push(match &current {
            Some(c) => format!(
                "publish: write the new key to {}#{} (check-and-set on version {})",
                target.vault_path, target.vault_field, c.version
            ),
            None => format!(
                "publish: create {}#{} (it does not exist yet)",
                target.vault_path, target.vault_field
            ),
        });
        if let Some(s) = &target.synced_secret {
            plan.push(format!(
                "sync: wait up to {:?} until Secret {}/{} key {} holds the new key",
                s.timeout, s.namespace, s.name, s.key
            ));
        }
        let waves = target.wave_list();
        let staged = !target.waves.is_empty();
        let how = |w: &crate::config::WorkloadRef| {
            match w.kind {
            WorkloadKind::Rollout => format!(
                "restart {w} through spec.restartAt (its id in the Rollout's openai-key-rotator/rotation-id)"
            ),
            _ => format!("annotate {w} with openai-key-rotator/rotation-id"),
        }
        };
        for (i, wave) in waves.iter().enumerate() {
            let n = i + 1;
            if !staged {
                for w in wave.iter() {
                    plan.push(format!("roll: {}", how(w)));
                }
                continue;
            }
            let probes = target
                .smoke_probes
                .iter()
                .filter(|p| p.wave == Some(n))
                .count();
            let gate = if n < waves.len() {
                format!(", then wait until its rollouts complete and {probes} probe(s) pass (within {:?}) before wave {}", target.rollout_timeout, n + 1)
            } else {
                ", then verify with everything else".into()
            };
            let what: Vec<String> = wave.iter().map(how).collect();
            plan.push(format!(
                "roll wave {n}/{}: {}{gate}",
                waves.len(),
                what.join("; ")
            ));
        }
        plan.push(match self.unlisted_consumers(target).await {
            Ok(found) if found.is_empty() => "consumers: no unlisted workload reads the key".into(),
            Ok(found) => format!(
                "consumers: {} unlisted consumer(s) read the key (unlisted_consumers = \"{}\"): {}",
                found.len(),
                target.unlisted_consumers.as_str(),
                found
                    .iter()
                    .map(super::engine::describe_consumer)
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            Err(e) => format!("consumers: cannot look for unlisted consumers: {e}"),
        });
        plan.push(format!(
            "verify: rollouts complete within {:?}, the new key answers GET /v1/models, {} smoke probe(s)",
            target.rollout_timeout,
            target.smoke_probes.len()
        ));
        plan.push(match &target.drain {
            Some(d) => format!(
                "drain: grace {:?}, then wait until the old key is quiet for {:?} (at most {:?}, then {:?})",
                target.grace_period, d.quiet_for, d.max_wait, d.on_timeout
            ),
            None => format!("drain: grace {:?}", target.grace_period),
        });
        plan.push(
            match current.as_ref().and_then(|c| c.meta.account.as_ref()) {
                Some(a) => format!("retire: delete service account {} (key {})", a.id, a.key_id),
                None => "retire: nothing (the current key's service account is unknown)".into(),
            },
        );
        Ok(plan)
    }
}
