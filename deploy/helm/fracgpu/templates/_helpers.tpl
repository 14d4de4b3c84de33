{{- define "fracgpu.labels" -}}
app.kubernetes.io/name: fracgpu
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fracgpu.selectorLabels" -}}
app.kubernetes.io/name: fracgpu
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{- define "fracgpu.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fracgpu.mode" -}}
{{- if not (has .Values.mode (list "dra" "devicePlugin")) -}}
{{- fail (printf "mode is %q: write dra (the DRA kubelet plugin) or devicePlugin (the device plugin, for clusters without DRA)" .Values.mode) -}}
{{- end -}}
{{- .Values.mode -}}
{{- end -}}

{{- define "fracgpu.env" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef: {fieldPath: spec.nodeName}
- {name: FRACGPU_CONFIG, value: /etc/fracgpu-default/fracgpu.conf}
- {name: FRACGPU_REAL_LIBCUDA, value: {{ .Values.driver.libcuda }}}
- {name: FRACGPU_REAL_LIBNVML, value: {{ .Values.driver.libnvml }}}
- {name: LD_LIBRARY_PATH, value: {{ list (dir .Values.driver.libcuda) (dir .Values.driver.libnvml) | uniq | join ":" }}}
{{- end -}}

{{- /* What both containers mount: the books, the node's configuration, the host's driver and NVML. */ -}}
{{- define "fracgpu.nodeMounts" -}}
- {name: state, mountPath: /var/lib/fracgpu}
- {name: node-config, mountPath: /etc/fracgpu, readOnly: true}
- {name: default-config, mountPath: /etc/fracgpu-default, readOnly: true}
- {name: libcuda, mountPath: {{ .Values.driver.libcuda }}, readOnly: true}
- {name: libnvml, mountPath: {{ .Values.driver.libnvml }}, readOnly: true}
{{- end -}}
