{{/*
Chart name, overridable with nameOverride. Kubernetes names are limited to 63 characters.
*/}}
{{- define "moe-ep.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified release name: the release name alone when it already contains the chart name
(release "moe-ep" gives "moe-ep", not "moe-ep-moe-ep").
*/}}
{{- define "moe-ep.fullname" -}}
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

{{/*
Name of the operator's objects (Deployment, Service, ClusterRole, bindings): "<fullname>-operator".
*/}}
{{- define "moe-ep.operatorName" -}}
{{- printf "%s-operator" (include "moe-ep.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Chart label value: name-version.
*/}}
{{- define "moe-ep.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels that select the operator's pods. Never change these on upgrade: Deployment selectors are
immutable.
*/}}
{{- define "moe-ep.selectorLabels" -}}
app.kubernetes.io/name: {{ include "moe-ep.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Recommended labels (https://helm.sh/docs/chart_best_practices/labels/) on every object.
*/}}
{{- define "moe-ep.labels" -}}
helm.sh/chart: {{ include "moe-ep.chart" . }}
{{ include "moe-ep.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: moe-ep
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Labels of the monitoring objects (PrometheusRule, ServiceMonitor, PodMonitor): the recommended
labels plus the ones a Prometheus' ruleSelector / serviceMonitorSelector / podMonitorSelector needs.
*/}}
{{- define "moe-ep.monitoringLabels" -}}
{{ include "moe-ep.labels" .root }}
{{- with .extra }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
ServiceAccount the operator runs as.
*/}}
{{- define "moe-ep.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "moe-ep.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Operator image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "moe-ep.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Default worker image (CPU build) handed to the operator; the tag defaults to the chart's appVersion.
The CUDA build is the same reference with "-cuda" appended.
*/}}
{{- define "moe-ep.workerImage" -}}
{{- printf "%s:%s" .Values.workerImage.repository (.Values.workerImage.tag | default .Chart.AppVersion) }}
{{- end }}
