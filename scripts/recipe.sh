#!/usr/bin/env bash
# The shell recipe users script today to rotate OpenAI keys, kept as the daemon's baseline
# (benches/daemon.rs runs it against the sandbox). Per target, in sequence: create a service
# account, write its key to Vault, restart the workload and wait for the rollout, delete the
# old account. No verification that the new key works or that pods took it, no rollback,
# no journal.
#
# Usage: recipe.sh TARGETS_FILE
#   TARGETS_FILE lines: name project_id vault_path namespace deployment old_account_id
# Env: OPENAI_URL (…/v1), OPENAI_ADMIN_KEY_FILE, VAULT_ADDR, VAULT_TOKEN, KUBECONFIG;
#      curl, jq, bao (or vault: VAULT_CLI) and kubectl on PATH.
set -euo pipefail
admin=$(cat "$OPENAI_ADMIN_KEY_FILE")
vault_cli=${VAULT_CLI:-bao}
export VAULT_ADDR VAULT_TOKEN KUBECONFIG
while read -r name project path ns deploy old; do
  [ -n "$name" ] || continue
  resp=$(curl -sf -X POST -H "Authorization: Bearer $admin" -H 'Content-Type: application/json' \
    -d "{\"name\":\"recipe-$name-$(date +%s%N)\"}" \
    "$OPENAI_URL/organization/projects/$project/service_accounts")
  key=$(jq -r .api_key.value <<<"$resp")
  "$vault_cli" kv put -mount=secret "$path" api_key="$key" >/dev/null
  kubectl rollout restart "deployment/$deploy" -n "$ns" >/dev/null
  kubectl rollout status "deployment/$deploy" -n "$ns" --timeout=300s >/dev/null
  curl -sf -X DELETE -H "Authorization: Bearer $admin" \
    "$OPENAI_URL/organization/projects/$project/service_accounts/$old" >/dev/null
  echo "$name rotated"
done <"$1"
