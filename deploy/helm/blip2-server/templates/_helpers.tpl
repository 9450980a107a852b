{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "blip2-server.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart, or the release name alone when it already contains the chart name. */}}
{{- define "blip2-server.fullname" -}}
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

{{- define "blip2-server.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of a release (a Deployment's selector is immutable). */}}
{{- define "blip2-server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "blip2-server.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "blip2-server.labels" -}}
helm.sh/chart: {{ include "blip2-server.chart" . }}
{{ include "blip2-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: inference
app.kubernetes.io/part-of: blip2-server
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "blip2-server.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "blip2-server.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "blip2-server.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* Whether an autoscaler owns the replica count. */}}
{{- define "blip2-server.autoscaling" -}}
{{- if or .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}true{{ end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: delay (/ready 503, still serving) + grace (drain) + preStop sleep
+ margin, unless set explicitly; an explicit value must still cover delay + grace + preStop.
*/}}
{{- define "blip2-server.minGracePeriod" -}}
{{- add (int64 .Values.server.shutdownDelayS) (int64 .Values.server.shutdownGraceS) (int64 .Values.preStopSleepS) }}
{{- end }}

{{- define "blip2-server.terminationGracePeriodSeconds" -}}
{{- $min := include "blip2-server.minGracePeriod" . | int64 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $min (int64 .Values.terminationGracePeriodMarginS) }}
{{- else }}
{{- $set := int64 .Values.terminationGracePeriodSeconds }}
{{- if lt $set $min }}
{{- fail (printf "terminationGracePeriodSeconds=%d is below server.shutdownDelayS + server.shutdownGraceS + preStopSleepS = %d: the kubelet would kill the pod while it still drains requests. Raise it, or leave it null to derive it." $set $min) }}
{{- end }}
{{- $set }}
{{- end }}
{{- end }}

{{/* An env value from a values scalar: integers without exponent, lists joined with commas. */}}
{{- define "blip2-server.envValue" -}}
{{- $v := . }}
{{- if kindIs "slice" $v }}
{{- $parts := list }}
{{- range $v }}{{ $parts = append $parts (include "blip2-server.envValue" .) }}{{ end }}
{{- join "," $parts }}
{{- else if or (kindIs "float64" $v) (kindIs "int" $v) (kindIs "int64" $v) }}
{{- if eq (float64 $v) (float64 (int64 $v)) }}{{ int64 $v }}{{ else }}{{ $v }}{{ end }}
{{- else }}
{{- $v }}
{{- end }}
{{- end }}

{{/* Ingress read/send timeout: the request timeout plus a margin (3600 s when it is off). */}}
{{- define "blip2-server.ingressTimeout" -}}
{{- $t := int64 .Values.server.requestTimeoutS }}
{{- if eq $t 0 }}3600{{ else }}{{ add $t (int64 .Values.ingress.nginx.timeoutMarginS) }}{{ end }}
{{- end }}

{{/* nginx proxy-body-size: max_body_bytes rounded up to whole MiB. */}}
{{- define "blip2-server.ingressBodySize" -}}
{{- $b := int64 .Values.server.maxBodyBytes }}
{{- printf "%dm" (add (div (sub $b 1) 1048576) 1) }}
{{- end }}

{{/* Checks that span several values; included by the Deployment so every render runs them. */}}
{{- define "blip2-server.validate" -}}
{{- if and .Values.autoscaling.keda.enabled .Values.autoscaling.hpa.enabled }}
{{- fail "autoscaling.keda.enabled and autoscaling.hpa.enabled are mutually exclusive: KEDA creates its own HorizontalPodAutoscaler for the Deployment, and two autoscalers on one Deployment fight over its replicas. Enable one of them." }}
{{- end }}
{{- $managed := dict "model" "set model.id instead" "revision" "set model.revision instead" "dtype" "set model.dtype instead" "quantize" "set model.quantize instead" "port" "set server.port instead" "log_format" "set server.logFormat instead" "request_timeout_s" "set server.requestTimeoutS instead" "max_body_bytes" "set server.maxBodyBytes instead" "shutdown_delay_s" "set server.shutdownDelayS instead" "shutdown_grace_s" "set server.shutdownGraceS instead" "api_key" "set apiKey.existingSecret instead" "host" "the pod must listen on 0.0.0.0 for probes and the Service" }}
{{- range $key, $_ := .Values.config }}
{{- if hasKey $managed $key }}
{{- fail (printf "config.%s is managed by the chart: %s" $key (get $managed $key)) }}
{{- end }}
{{- end }}
{{- if gt (int64 .Values.autoscaling.minReplicas) (int64 .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int64 .Values.autoscaling.minReplicas) (int64 .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- end }}

{{/* Probe timing fields from a probe's values (enabled and the path are handled by the caller). */}}
{{- define "blip2-server.probeTiming" -}}
initialDelaySeconds: {{ int64 .initialDelaySeconds }}
periodSeconds: {{ int64 .periodSeconds }}
timeoutSeconds: {{ int64 .timeoutSeconds }}
failureThreshold: {{ int64 .failureThreshold }}
{{- if hasKey . "successThreshold" }}
successThreshold: {{ int64 .successThreshold }}
{{- end }}
{{- end }}
