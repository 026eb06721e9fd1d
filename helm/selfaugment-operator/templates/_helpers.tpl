{{/* Names, labels and small computed values shared by the templates. */}}

{{- define "selfaugment.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "selfaugment.fullname" -}}
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

{{- define "selfaugment.selectorLabels" -}}
app.kubernetes.io/name: {{ include "selfaugment.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "selfaugment.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "selfaugment.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: selfaugment
{{- end -}}

{{- define "selfaugment.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "selfaugment.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "selfaugment.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Namespaces the operator watches: the release namespace unless listed (namespaced scope). */}}
{{- define "selfaugment.watchNamespaces" -}}
{{- if .Values.watch.namespaces -}}
{{- join "," .Values.watch.namespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* The Prometheus `job` label of the operator's scrape target (for the OperatorDown alert). */}}
{{- define "selfaugment.metricsJob" -}}
{{- if .Values.prometheusRule.operatorJob -}}
{{- .Values.prometheusRule.operatorJob -}}
{{- else if .Values.metrics.podMonitor.enabled -}}
{{- printf "%s/%s" .Release.Namespace (include "selfaugment.fullname" .) -}}
{{- else -}}
{{- printf "%s-metrics" (include "selfaugment.fullname" .) -}}
{{- end -}}
{{- end -}}
