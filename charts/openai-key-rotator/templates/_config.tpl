{{/*
The daemon's TOML configuration (see config.example.toml), rendered from values. Strings go
through toJson: a JSON string is a valid TOML basic string.
*/}}
{{- define "okr.configToml" -}}
{{- $v := .Values -}}
[daemon]
listen = {{ printf "0.0.0.0:%d" (int $v.service.port) | toJson }}
max_concurrent_rotations = {{ int $v.daemon.maxConcurrentRotations }}
state_prefix = {{ $v.daemon.statePrefix | toJson }}
account_prefix = {{ $v.daemon.accountPrefix | toJson }}
sweep_min_age = {{ $v.daemon.sweepMinAge | toJson }}
log_format = {{ $v.daemon.logFormat | toJson }}
{{- with $v.daemon.coalesceWindow }}
coalesce_window = {{ . | toJson }}
{{- end }}
{{- with $v.daemon.maxConcurrentRollouts }}
max_concurrent_rollouts = {{ int . }}
{{- end }}
{{- with $v.daemon.inventoryInterval }}
inventory_interval = {{ . | toJson }}
{{- end }}
{{- with $v.daemon.accountNameTemplate }}
account_name_template = {{ . | toJson }}
{{- end }}
{{- with $v.daemon.env }}
env = {{ . | toJson }}
{{- end }}
{{- with $v.daemon.forensics }}

[daemon.forensics]
enabled = {{ .enabled }}
lookback = {{ .lookback | toJson }}
{{- end }}
{{- with $v.daemon.reconcile }}

[daemon.reconcile]
enabled = {{ .enabled }}
interval = {{ .interval | toJson }}
{{- end }}

[daemon.leader_election]
enabled = {{ $v.leaderElection.enabled }}
namespace = {{ .Release.Namespace | toJson }}
lease_name = {{ include "okr.fullname" . | toJson }}
lease_duration = {{ $v.leaderElection.leaseDuration | toJson }}
renew_deadline = {{ $v.leaderElection.renewDeadline | toJson }}
retry_period = {{ $v.leaderElection.retryPeriod | toJson }}

[daemon.audit]
file = "/var/lib/openai-key-rotator/audit.jsonl"
stdout = {{ $v.daemon.auditStdout }}

[openai]
base_url = {{ $v.openai.baseUrl | toJson }}
{{- if $v.openai.adminKeyVaultPath }}
admin_key_vault_path = {{ $v.openai.adminKeyVaultPath | toJson }}
{{- with $v.openai.adminKeyMaxAge }}
admin_key_max_age = {{ . | toJson }}
{{- end }}
{{- with $v.openai.adminKeyExpiry }}
admin_key_expiry = {{ . | toJson }}
{{- end }}
{{- else }}
admin_key_file = {{ printf "/etc/openai-key-rotator/openai/%s" $v.openai.adminKeySecret.key | toJson }}
{{- end }}
request_timeout = {{ $v.openai.requestTimeout | toJson }}
max_retries = {{ int $v.openai.maxRetries }}

[vault]
address = {{ $v.vault.address | toJson }}
kv_mount = {{ $v.vault.kvMount | toJson }}
request_timeout = {{ $v.vault.requestTimeout | toJson }}
{{- if $v.vault.caSecret.name }}
ca_cert = {{ printf "/etc/openai-key-rotator/vault-ca/%s" $v.vault.caSecret.key | toJson }}
{{- end }}

[vault.auth]
method = {{ $v.vault.auth.method | toJson }}
{{- if eq $v.vault.auth.method "kubernetes" }}
role = {{ $v.vault.auth.role | toJson }}
mount = {{ $v.vault.auth.mount | toJson }}
jwt_path = "/var/run/secrets/kubernetes.io/serviceaccount/token"
{{- else }}
token_file = {{ printf "/etc/openai-key-rotator/vault-token/%s" $v.vault.auth.tokenSecret.key | toJson }}
{{- end }}

[kubernetes]
{{- with $v.notifications }}
{{- if or .apiBaseUrl .overdueAfter .queueSize .webhooks }}

[notifications]
{{- with .apiBaseUrl }}
api_base_url = {{ . | toJson }}
{{- end }}
{{- with .overdueAfter }}
overdue_after = {{ . | toJson }}
{{- end }}
{{- with .queueSize }}
queue_size = {{ int . }}
{{- end }}
{{- range $i, $w := .webhooks }}

[[notifications.webhooks]]
url_file = {{ printf "/etc/openai-key-rotator/webhooks/%d/url" $i | toJson }}
{{- if $w.signingSecret }}
secret_file = {{ printf "/etc/openai-key-rotator/webhooks/%d/secret" $i | toJson }}
{{- end }}
{{- with $w.format }}
format = {{ . | toJson }}
{{- end }}
{{- with $w.events }}
events = {{ . | toJson }}
{{- end }}
{{- with $w.timeout }}
timeout = {{ . | toJson }}
{{- end }}
{{- if kindIs "float64" $w.maxRetries }}
max_retries = {{ int $w.maxRetries }}
{{- end }}
{{- with $w.cooldown }}
cooldown = {{ . | toJson }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- range $t := $v.targets }}

[[targets]]
name = {{ $t.name | toJson }}
project_id = {{ $t.projectId | toJson }}
vault_path = {{ $t.vaultPath | toJson }}
{{- with $t.vaultField }}
vault_field = {{ . | toJson }}
{{- end }}
{{- with $t.unlistedConsumers }}
unlisted_consumers = {{ . | toJson }}
{{- end }}
{{- if $t.waves }}
waves = {{ $t.waves | toJson }}
{{- else }}
workloads = {{ $t.workloads | toJson }}
{{- end }}
{{- with $t.schedule }}
schedule = {{ . | toJson }}
{{- end }}
{{- with $t.maxKeyAge }}
max_key_age = {{ . | toJson }}
{{- end }}
{{- with $t.jitter }}
jitter = {{ . | toJson }}
{{- end }}
{{- with $t.gracePeriod }}
grace_period = {{ . | toJson }}
{{- end }}
{{- with $t.rolloutTimeout }}
rollout_timeout = {{ . | toJson }}
{{- end }}
{{- with $t.keyExpiry }}
key_expiry = {{ . | toJson }}
{{- end }}
{{- with $t.syncedSecret }}

[targets.synced_secret]
namespace = {{ .namespace | toJson }}
name = {{ .name | toJson }}
{{- with .key }}
key = {{ . | toJson }}
{{- end }}
{{- with .forceSyncAnnotation }}
force_sync_annotation = {{ . | toJson }}
{{- end }}
{{- with .timeout }}
timeout = {{ . | toJson }}
{{- end }}
{{- end }}
{{- with $t.drain }}

[targets.drain]
quiet_for = {{ .quietFor | toJson }}
max_wait = {{ .maxWait | toJson }}
{{- with .onTimeout }}
on_timeout = {{ . | toJson }}
{{- end }}
{{- end }}
{{- with $t.adoption }}

[targets.adoption]
timeout = {{ .timeout | toJson }}
{{- with .minRequests }}
min_requests = {{ . }}
{{- end }}
{{- end }}
{{- with $t.anomaly }}

[targets.anomaly]
{{- with .window }}
window = {{ . | toJson }}
{{- end }}
{{- with .baseline }}
baseline = {{ . | toJson }}
{{- end }}
{{- with .ratio }}
ratio = {{ float64 . }}
{{- end }}
{{- with .minRequests }}
min_requests = {{ int . }}
{{- end }}
{{- with .action }}
action = {{ . | toJson }}
{{- end }}
{{- with .cooldown }}
cooldown = {{ . | toJson }}
{{- end }}
{{- with .bucketWidth }}
bucket_width = {{ . | toJson }}
{{- end }}
{{- with .pollInterval }}
poll_interval = {{ . | toJson }}
{{- end }}
{{- end }}
{{- range $p := $t.smokeProbes }}

[[targets.smoke_probes]]
url = {{ $p.url | toJson }}
{{- with $p.expectStatus }}
expect_status = {{ int . }}
{{- end }}
{{- with $p.consecutiveSuccesses }}
consecutive_successes = {{ int . }}
{{- end }}
{{- with $p.interval }}
interval = {{ . | toJson }}
{{- end }}
{{- with $p.timeout }}
timeout = {{ . | toJson }}
{{- end }}
{{- with $p.wave }}
wave = {{ int . }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}
