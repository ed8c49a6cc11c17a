{{/* Chart name. */}}
{{- define "okr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full resource name prefix. */}}
{{- define "okr.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of Roles/RoleBindings created outside the release namespace (unique per release). */}}
{{- define "okr.crossNamespaceName" -}}
{{- printf "%s-%s" (include "okr.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "okr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "okr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "okr.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "okr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "okr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "okr.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Replicas: one, or leaderElection.replicas with leader election (never two unelected daemons). */}}
{{- define "okr.replicas" -}}
{{- if .Values.leaderElection.enabled -}}{{ .Values.leaderElection.replicas }}{{- else -}}1{{- end -}}
{{- end -}}

{{/* Fail early with a clear message when a mandatory value is missing. */}}
{{- define "okr.validate" -}}
{{- if not .Values.openai.adminKeyVaultPath -}}
{{- $_ := required "openai.adminKeySecret.name is required: the name of an existing Secret holding the OpenAI admin key (or set openai.adminKeyVaultPath)" .Values.openai.adminKeySecret.name -}}
{{- end -}}
{{- $_ := required "vault.address is required, e.g. https://vault.vault.svc:8200" .Values.vault.address -}}
{{- if not .Values.targets -}}
{{- fail "targets: at least one target is required (name, projectId, vaultPath, workloads or waves)" -}}
{{- end -}}
{{- if eq .Values.vault.auth.method "token" -}}
{{- $_ := required "vault.auth.tokenSecret.name is required with vault.auth.method=token" .Values.vault.auth.tokenSecret.name -}}
{{- end -}}
{{- end -}}

{{/* "30d" -> 2592000. Durations in values are "<number><unit>", unit s, m, h, d or w. */}}
{{- define "okr.seconds" -}}
{{- $d := toString . -}}
{{- $n := regexFind "^[0-9]+" $d -}}
{{- $unit := trimPrefix $n $d -}}
{{- $factor := get (dict "s" 1 "m" 60 "h" 3600 "d" 86400 "w" 604800) $unit -}}
{{- if not $factor -}}{{- fail (printf "duration %q: expected <number><unit> with unit s, m, h, d or w" $d) -}}{{- end -}}
{{- mul (int64 $n) $factor -}}
{{- end -}}

{{/*
What the daemon touches in each workload namespace, as JSON:
{"<ns>": {"resources": ["deployments", ...], "secrets": [names], "patchSecrets": [names]}}.
Secrets appear only for configured synced Secrets; patch only where a force-sync
annotation is set (the daemon patches the Secret only to nudge the operator).
*/}}
{{- define "okr.rbacByNamespace" -}}
{{- $plural := dict "Deployment" "deployments" "StatefulSet" "statefulsets" "DaemonSet" "daemonsets" -}}
{{- $all := dict -}}
{{- range $t := .Values.targets -}}
{{- $ws := $t.workloads | default list -}}
{{- range $wave := $t.waves | default list -}}
{{- $ws = concat $ws $wave -}}
{{- end -}}
{{- range $w := $ws -}}
{{- $parts := splitList "/" $w -}}
{{- $ns := index $parts 0 -}}
{{- $e := get $all $ns | default (dict "resources" (list) "rollouts" false "secrets" (list) "patchSecrets" (list)) -}}
{{- if eq (index $parts 1) "Rollout" -}}
{{- $_ := set $e "rollouts" true -}}
{{- else -}}
{{- $_ := set $e "resources" (append $e.resources (get $plural (index $parts 1)) | uniq | sortAlpha) -}}
{{- end -}}
{{- $_ := set $all $ns $e -}}
{{- end -}}
{{- with $t.syncedSecret -}}
{{- $e := get $all .namespace | default (dict "resources" (list) "rollouts" false "secrets" (list) "patchSecrets" (list)) -}}
{{- $_ := set $e "secrets" (append $e.secrets .name | uniq | sortAlpha) -}}
{{- if .forceSyncAnnotation -}}
{{- $_ := set $e "patchSecrets" (append $e.patchSecrets .name | uniq | sortAlpha) -}}
{{- end -}}
{{- $_ := set $all .namespace $e -}}
{{- end -}}
{{- end -}}
{{- toJson $all -}}
{{- end -}}
