{{/* Name of the chart, or nameOverride. */}}
{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object's name: the release name (with the chart's name unless it is in it already), or fullnameOverride. Short enough for "-origin-headless" to fit a DNS label. */}}
{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object. */}}
{{- define "shoal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shoal
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "agent"). */}}
{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The image reference. */}}
{{- define "shoal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret holding ca.pem and each role's cert and key. */}}
{{- define "shoal.tlsSecret" -}}
{{- if eq .Values.tls.mode "secret" -}}
{{- required "tls.existingSecret is required when tls.mode is secret" .Values.tls.existingSecret -}}
{{- else if eq .Values.tls.mode "job" -}}
{{- printf "%s-tls" (include "shoal.fullname" .) -}}
{{- else -}}
{{- fail (printf "tls.mode must be job or secret, not %q" .Values.tls.mode) -}}
{{- end -}}
{{- end -}}

{{/* The TLS volume of one role: (dict "root" $ "role" "agent"). ca.pem, cert.pem, key.pem (and crl.pem) as the binaries read them. Secret volumes are updated in place, and nodes reload the files within 10 s. */}}
{{- define "shoal.tlsVolume" -}}
- name: tls
  secret:
    secretName: {{ include "shoal.tlsSecret" .root }}
    # Group-readable: the group is the pod's fsGroup where it runs as non-root.
    defaultMode: 0440
    items:
      - key: ca.pem
        path: ca.pem
      - key: {{ .role }}-cert.pem
        path: cert.pem
      - key: {{ .role }}-key.pem
        path: key.pem
      {{- if .root.Values.tls.crl }}
      - key: crl.pem
        path: crl.pem
      {{- end }}
{{- end -}}

{{/* Tracker URL as agents and origins reach it: HTTPS with mutual TLS (their node certificates). */}}
{{- define "shoal.trackerURL" -}}
{{- printf "https://%s-tracker.%s.svc.%s:%d" (include "shoal.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.tracker.port) -}}
{{- end -}}

{{/* Headless Service of the origins. */}}
{{- define "shoal.originHeadless" -}}
{{- printf "%s-origin-headless" (include "shoal.fullname" .) -}}
{{- end -}}

{{/* The upload token's Secret name. */}}
{{- define "shoal.uploadTokenSecret" -}}
{{- required "origin.uploadToken.existingSecret is required (kubectl create secret generic ... --from-literal=token=...)" .Values.origin.uploadToken.existingSecret -}}
{{- end -}}

{{/* Pod securityContext and container securityContext shared by the components. */}}
{{- define "shoal.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
{{- end -}}
