#!/usr/bin/env bash
# End to end on a local kind cluster: for users with Docker, kind, kubectl and helm.
# Not run by CI (no container engine there).
#
#   OPENAI_ADMIN_KEY=sk-admin-... OPENAI_PROJECT_ID=proj_... deploy/e2e-kind.sh
#
# What it does:
#   1. builds the image (Dockerfile) and creates a kind cluster "okr-e2e", loading the image;
#   2. installs OpenBao in dev mode (Helm chart openbao/openbao, server.dev.enabled), enables
#      Kubernetes auth and a policy for the daemon's ServiceAccount;
#   3. creates a sample workload (namespace "demo", Deployment "chatbot") that reads the key,
#      and seeds Vault with the project's current key (a service account created here);
#   4. installs this chart (Secret references only: the admin key and API tokens are created
#      as Secrets first) and runs one rotation with `openai-key-rotator rotate --wait`;
#   5. leaves the cluster running for you to look at; `kind delete cluster --name okr-e2e`.
#
# Requires a real OpenAI admin key (it creates and deletes one service account in the project).
# Set KEEP_CLUSTER=0 to delete the cluster at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

: "${OPENAI_ADMIN_KEY:?set OPENAI_ADMIN_KEY to an OpenAI admin key}"
: "${OPENAI_PROJECT_ID:?set OPENAI_PROJECT_ID to the project whose key is rotated}"
CLUSTER=${CLUSTER:-okr-e2e}
IMAGE=${IMAGE:-openai-key-rotator:e2e}
NS=openai-key-rotator
for tool in docker kind kubectl helm curl jq; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required" >&2; exit 1; }
done

step() { printf '\n==> %s\n' "$*"; }

step "build $IMAGE and create kind cluster $CLUSTER"
docker build -t "$IMAGE" .
kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER" --wait 120s
kind load docker-image "$IMAGE" --name "$CLUSTER"
if [ "${KEEP_CLUSTER:-1}" = 0 ]; then trap 'kind delete cluster --name "$CLUSTER"' EXIT; fi

step "OpenBao (dev mode, root token 'root')"
helm repo add openbao https://openbao.github.io/openbao-helm >/dev/null
helm repo update openbao >/dev/null
helm upgrade --install openbao openbao/openbao -n openbao --create-namespace \
  --set server.dev.enabled=true --set server.dev.devRootToken=root --set injector.enabled=false --wait
kubectl -n openbao wait --for=condition=Ready pod/openbao-0 --timeout=120s
bao() { kubectl -n openbao exec -i openbao-0 -- env BAO_TOKEN=root bao "$@"; }
bao auth enable kubernetes 2>/dev/null || true
bao write auth/kubernetes/config kubernetes_host=https://kubernetes.default.svc
bao policy write openai-key-rotator - <<'EOF'
path "secret/data/*"     { capabilities = ["create", "read", "update"] }
path "secret/metadata/*" { capabilities = ["read", "update", "list"] }
EOF
bao write auth/kubernetes/role/openai-key-rotator \
  bound_service_account_names=openai-key-rotator bound_service_account_namespaces=$NS \
  policies=openai-key-rotator ttl=1h

step "sample workload demo/chatbot and its first key in Vault"
# The first key: a service account made here (its key is shown once, in this response).
first=$(curl -fsS -X POST "https://api.openai.com/v1/organization/projects/$OPENAI_PROJECT_ID/service_accounts" \
  -H "Authorization: Bearer $OPENAI_ADMIN_KEY" -H 'Content-Type: application/json' \
  -d '{"name":"okr-e2e-seed"}')
sa_id=$(jq -r .id <<<"$first")
jq -r .api_key.value <<<"$first" | bao kv put secret/demo/chatbot/openai api_key=- >/dev/null
key_id=$(jq -r .api_key.id <<<"$first")
bao kv metadata put -custom-metadata=okr_service_account_id="$sa_id" -custom-metadata=okr_key_id="$key_id" \
  -custom-metadata=okr_rotation_id=seed -custom-metadata=okr_key_created_at="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
  secret/demo/chatbot/openai
kubectl create namespace demo --dry-run=client -o yaml | kubectl apply -f -
kubectl -n demo create deployment chatbot --image=registry.k8s.io/pause:3.10 --replicas=2 \
  --dry-run=client -o yaml | kubectl apply -f -
kubectl -n demo rollout status deploy/chatbot --timeout=120s

step "install the chart"
kubectl create namespace $NS --dry-run=client -o yaml | kubectl apply -f -
kubectl -n $NS create secret generic openai-admin-key --from-literal=admin-key="$OPENAI_ADMIN_KEY" \
  --dry-run=client -o yaml | kubectl apply -f -
token=$(head -c 24 /dev/urandom | base64 | tr -d '/+=')
kubectl -n $NS create secret generic okr-api-tokens --from-literal=tokens="e2e:$token" \
  --dry-run=client -o yaml | kubectl apply -f -
helm upgrade --install openai-key-rotator charts/openai-key-rotator -n $NS \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --set openai.adminKeySecret.name=openai-admin-key --set apiTokensSecret.name=okr-api-tokens \
  --set vault.address=http://openbao.openbao.svc:8200 \
  --set 'targets[0].name=chatbot' --set "targets[0].projectId=$OPENAI_PROJECT_ID" \
  --set 'targets[0].vaultPath=demo/chatbot/openai' --set 'targets[0].workloads[0]=demo/Deployment/chatbot' \
  --set 'targets[0].gracePeriod=10s' --set 'targets[0].maxKeyAge=30d' --wait --timeout 180s

step "rotate once"
kubectl -n $NS port-forward svc/openai-key-rotator 18080:8080 >/dev/null &
pf=$!
trap 'kill $pf 2>/dev/null || true' EXIT
sleep 3
kubectl -n $NS exec deploy/openai-key-rotator -- openai-key-rotator rotate chatbot \
  --addr http://127.0.0.1:8080 --token "$token" --reason "kind e2e" --wait
curl -fsS -H "Authorization: Bearer $token" http://127.0.0.1:18080/v1/targets | jq .
kubectl -n demo get pods -o custom-columns='NAME:.metadata.name,ROTATION:.metadata.annotations.openai-key-rotator/rotation-id'
echo "rotation completed; metrics: curl http://127.0.0.1:18080/metrics"
