{{/*
Names are fixed, not derived from the release: the RBAC in files/rbac (copied from the
repository's rbac/, the one source) names the ServiceAccounts ipvs-operator and ipvs-agent and
the leader-election Lease ipvs-operator, and the ClusterRoles are cluster-wide anyway. One
release per cluster.
*/}}

{{- define "ipvs.chart" -}}
{{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ipvs.selectorLabels" -}}
app.kubernetes.io/name: ipvs-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "ipvs.labels" -}}
{{ include "ipvs.selectorLabels" . }}
app.kubernetes.io/part-of: ipvs-operator
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "ipvs.chart" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "ipvs.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{ printf "%s@%s" $image.repository $image.digest }}
{{- else -}}
{{ printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) }}
{{- end -}}
{{- end }}
