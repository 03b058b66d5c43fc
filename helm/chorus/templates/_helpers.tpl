{{/* Chart name, truncated to the 63 characters DNS names allow. */}}
{{- define "chorus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name when it already contains the chart name, else <release>-<chart>. */}}
{{- define "chorus.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "chorus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: only name and instance, so they never change across upgrades. */}}
{{- define "chorus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chorus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chorus.labels" -}}
helm.sh/chart: {{ include "chorus.chart" . }}
{{ include "chorus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chorus
{{- end }}

{{/*
Labels of the `helm test` pod. Its name is `<chart>-test`, not the chart name, so the selector
pair (name + instance) of the Service, PodDisruptionBudget and NetworkPolicy never matches it:
matched, it would take chat traffic, block node drains (a pod without a controller) and be
held to the chat pods' egress rules.
*/}}
{{- define "chorus.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "chorus.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: smoke-test
{{- end }}

{{- define "chorus.testLabels" -}}
helm.sh/chart: {{ include "chorus.chart" . }}
{{ include "chorus.testSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: chorus
{{- end }}

{{- define "chorus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chorus.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag or repository@digest; the tag defaults to the chart's appVersion. */}}
{{- define "chorus.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "chorus.redis.fullname" -}}
{{- printf "%s-redis" (include "chorus.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "chorus.redis.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chorus.name" . }}-redis
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "chorus.redis.labels" -}}
helm.sh/chart: {{ include "chorus.chart" . }}
{{ include "chorus.redis.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.redis.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: redis
app.kubernetes.io/part-of: chorus
{{- end }}

{{- define "chorus.redis.image" -}}
{{- if .Values.redis.image.digest }}
{{- printf "%s@%s" .Values.redis.image.repository .Values.redis.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.redis.image.repository .Values.redis.image.tag }}
{{- end }}
{{- end }}

{{/* Secret and key holding the Redis password of the bundled Redis. */}}
{{- define "chorus.redis.secretName" -}}
{{- default (include "chorus.redis.fullname" .) .Values.redis.auth.existingSecret }}
{{- end }}

{{/*
The bundled Redis's password, decided once per render: the value, else the live Secret's
(`lookup`, so upgrades keep it), else a random one. The result is kept in .Values (one map for
the whole render), because each `include` re-runs the template: a randAlphaNum per include made
the Secret and the checksums disagree, and every upgrade restarted Redis (an emptyDir: all
history lost). Empty when the password lives in `redis.auth.existingSecret`.
*/}}
{{- define "chorus.redis.password" -}}
{{- $auth := .Values.redis.auth }}
{{- if not (hasKey $auth "_resolved") }}
{{- $password := $auth.password }}
{{- if and .Values.redis.enabled (not $auth.existingSecret) (not $password) }}
{{- $live := lookup "v1" "Secret" .Release.Namespace (include "chorus.redis.fullname" .) }}
{{- $password = index ($live.data | default dict) "redis-password" | default "" | b64dec }}
{{- $password = $password | default (randAlphaNum 32) }}
{{- end }}
{{- if $auth.existingSecret }}{{ $password = "" }}{{ end }}
{{- $_ := set $auth "_resolved" $password }}
{{- end }}
{{- $auth._resolved }}
{{- end }}

{{/*
What the chorus pods' checksum/secret hashes: only the secret values this chart owns (the
Redis password, the JWT secret, the external Redis URL), one per line, never a whole template.
*/}}
{{- define "chorus.secretMaterial" -}}
{{- $parts := list }}
{{- if .Values.redis.enabled }}
{{- $parts = append $parts (include "chorus.redis.password" .) }}
{{- else if not .Values.externalRedis.existingSecret }}
{{- $parts = append $parts (include "chorus.externalRedis.url" .) }}
{{- end }}
{{- if not .Values.auth.existingSecret }}
{{- $parts = append $parts .Values.auth.jwtSecret }}
{{- end }}
{{- $parts | compact | join "\n" }}
{{- end }}

{{- define "chorus.redis.secretKey" -}}
{{- if .Values.redis.auth.existingSecret }}{{ .Values.redis.auth.existingSecretKey }}{{ else }}redis-password{{ end }}
{{- end }}

{{/* The external Redis URL built from the values (any mode); empty when none is given. */}}
{{- define "chorus.externalRedis.url" -}}
{{- $r := .Values.externalRedis }}
{{- $auth := ternary (printf ":%s@" $r.password) "" (ne $r.password "") }}
{{- if $r.url }}{{ $r.url }}
{{- else if and (eq $r.mode "sentinel") $r.sentinel.hosts }}
{{- printf "%s://%s%s/%s/%d" (ternary "rediss+sentinel" "redis+sentinel" $r.tls) $auth (join "," $r.sentinel.hosts) $r.sentinel.masterName (int $r.sentinel.db) }}
{{- else if and (eq $r.mode "cluster") $r.cluster.nodes }}
{{- printf "%s://%s%s" (ternary "rediss+cluster" "redis+cluster" $r.tls) $auth (join "," $r.cluster.nodes) }}
{{- end }}
{{- end }}

{{/* Secret holding the external Redis URL. */}}
{{- define "chorus.externalRedis.secretName" -}}
{{- default (printf "%s-redis-url" (include "chorus.fullname" .)) .Values.externalRedis.existingSecret }}
{{- end }}

{{- define "chorus.externalRedis.secretKey" -}}
{{- if .Values.externalRedis.existingSecret }}{{ .Values.externalRedis.existingSecretKey }}{{ else }}redis-url{{ end }}
{{- end }}

{{- define "chorus.auth.secretName" -}}
{{- default (printf "%s-auth" (include "chorus.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "chorus.auth.secretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}jwt-secret{{ end }}
{{- end }}

{{- define "chorus.auth.enabled" -}}
{{- if or .Values.auth.jwtSecret .Values.auth.existingSecret }}true{{ end }}
{{- end }}

{{/*
CHORUS_ALLOWED_HOSTS, comma separated, or empty (any Host) when neither the user nor an
Ingress/HTTPRoute names a host. Once there is a list, the Service's in-cluster names join it so
in-cluster clients (the `helm test` pod: ws://<fullname>:<port>) are not refused.
*/}}
{{- define "chorus.allowedHosts" -}}
{{- $hosts := list }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}{{ $hosts = append $hosts .host }}{{ end }}
{{- end }}
{{- if .Values.httpRoute.enabled }}
{{- $hosts = concat $hosts (.Values.httpRoute.hostnames | default list) }}
{{- end }}
{{- $hosts = concat $hosts (.Values.config.allowedHosts | default list) }}
{{- if $hosts }}
{{- $svc := include "chorus.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts = concat $hosts (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) }}
{{- $hosts | compact | uniq | join "," }}
{{- end }}
{{- end }}

{{/* The kubelet's grace period: preStop pause + drain window + gunicorn's 10 s margin + ours. */}}
{{- define "chorus.terminationGracePeriodSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (int (ceil .Values.config.drainSeconds)) 10 (int .Values.terminationGraceMarginSeconds) }}
{{- end }}

{{/* Fail early on values that cannot work together. */}}
{{- define "chorus.validate" -}}
{{- if and (not .Values.redis.enabled) (not (include "chorus.externalRedis.url" .)) (not .Values.externalRedis.existingSecret) }}
{{- if eq .Values.externalRedis.mode "sentinel" }}
{{- fail "externalRedis.mode=sentinel needs externalRedis.sentinel.hosts (or externalRedis.url / existingSecret)" }}
{{- else if eq .Values.externalRedis.mode "cluster" }}
{{- fail "externalRedis.mode=cluster needs externalRedis.cluster.nodes (or externalRedis.url / existingSecret)" }}
{{- end }}
{{- fail "redis.enabled=false needs externalRedis.url or externalRedis.existingSecret: Chorus replicas share messages through Redis" }}
{{- end }}
{{- if and .Values.redis.enabled (or (include "chorus.externalRedis.url" .) .Values.externalRedis.existingSecret) }}
{{- fail "set redis.enabled=false to use externalRedis" }}
{{- end }}
{{- end }}

{{/*
checkov checks that do not fit this chart, skipped with the reason (rendered as annotations
checkov reads). Digest and pull policy: the chart pins an immutable version tag by default and
offers image.digest; `Always` would break images side-loaded with `kind load`. Secrets as env:
Chorus reads its settings from CHORUS_* variables only, and the Redis URL is built from the
password by Kubernetes' $(VAR) expansion, which only works for environment variables.
*/}}
{{- define "chorus.checkovSkips" -}}
checkov.io/skip1: CKV_K8S_43=Tag pinned to the chart appVersion by default; image.digest pins by digest
checkov.io/skip2: CKV_K8S_15=Immutable version tags; Always would break images loaded with kind load
checkov.io/skip3: CKV_K8S_35=Chorus reads settings from env only; the Redis URL needs $(VAR) expansion
{{- end }}
