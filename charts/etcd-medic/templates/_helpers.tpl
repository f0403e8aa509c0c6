{{/* The labels of every object; selectors use only name and component. */}}
{{- define "etcd-medic.labels" -}}
app.kubernetes.io/name: etcd-medic
app.kubernetes.io/part-of: etcd-medic
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- if .Values.helmLabels }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}
{{- end }}

{{/* The image, by digest when one is given. */}}
{{- define "etcd-medic.image" -}}
{{- $tag := .Values.image.tag | default .Chart.AppVersion -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ $tag }}
{{- end -}}
{{- end }}

{{/* The kubelet's root on the nodes: the value, else the preset's. */}}
{{- define "etcd-medic.kubeletRoot" -}}
{{- if .Values.kubeletRoot -}}
{{ .Values.kubeletRoot }}
{{- else -}}
{{ get (dict "kubeadm" "/var/lib/kubelet" "local-path" "/var/lib/kubelet" "microk8s" "/var/snap/microk8s/common/var/lib/kubelet" "k0s" "/var/lib/k0s/kubelet") .Values.preset }}
{{- end -}}
{{- end }}

{{/* Host directories of hostPath-style volumes outside the kubelet's root, as a JSON list
     of {name, path}: the preset's, then extraHostPaths. */}}
{{- define "etcd-medic.hostPaths" -}}
{{- $presets := dict
  "kubeadm" (list)
  "local-path" (list (dict "name" "local-path-kind" "path" "/var/local-path-provisioner") (dict "name" "local-path-k3s" "path" "/var/lib/rancher/k3s/storage"))
  "microk8s" (list (dict "name" "microk8s-default-storage" "path" "/var/snap/microk8s/common/default-storage"))
  "k0s" (list) -}}
{{- $paths := get $presets .Values.preset -}}
{{- $taken := list (include "etcd-medic.kubeletRoot" .) -}}
{{- range $paths }}{{ $taken = append $taken .path }}{{ end -}}
{{- range $i, $p := .Values.extraHostPaths }}
{{- /* A path mounted already (the kubelet root, the preset's) is not mounted twice. */}}
{{- if not (has $p $taken) }}
{{- $paths = append $paths (dict "name" (printf "host-path-%d" $i) "path" $p) }}
{{- $taken = append $taken $p }}
{{- end }}
{{- end }}
{{- toJson $paths -}}
{{- end }}

{{/* The agents' serving certificate: the Secret named, or the one the chart makes. */}}
{{- define "etcd-medic.tlsSecret" -}}
{{- .Values.agent.tls.secretName | default "etcd-medic-tls" -}}
{{- end }}
