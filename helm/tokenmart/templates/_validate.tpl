{{/*
The catalog's rules across values, which a JSON schema cannot express (the schema, generated from
the catalog's pydantic models, checks each field alone). They are generated from
deployments/catalog_rules.py into _catalog_rules.tpl, the same table the app checks a catalog with,
so the render fails where the app would refuse the catalog, with the same message: edit the rules
there and run `python -m tokenmart.cluster.chart_rules`, never that file.
*/}}
{{- define "tokenmart.validate" -}}
{{- include "tokenmart.catalogRules" . -}}
{{- if and (not .Values.redis.enabled) (not .Values.redis.external.existingSecret) -}}
{{- fail "redis.external.existingSecret: with redis.enabled false, name the Secret that holds the Redis URL" -}}
{{- end -}}
{{- if and .Values.ingress.enabled (not .Values.ingress.host) -}}
{{- fail "ingress.host: set the host name the Ingress serves" -}}
{{- end -}}
{{- end -}}
