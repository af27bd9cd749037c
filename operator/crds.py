"""The six ``inferencecache.io/v1alpha1`` CustomResourceDefinitions, as Python data.

Owner: ``inference-cache operator`` (issue #7). Place in the flow: this module is the one
source of truth of our API schemas. ``python -m inference_cache.operator.manifests`` (``make
manifests``) writes them to ``config/crd/bases/``, the tests compare the committed YAML with
:func:`all_crds` (drift fails ``make test``), and the operator's code reads field names and
defaults from the custom resources these schemas describe.

The schemas mirror the original Go project's controller-gen output (research
``seed-inventory.md`` §1: every field, default, enum, minimum, CEL rule, printer column,
short name and scope) plus this project's additions:

* CachePolicy ``minimumMatchedTokens``, ``routingFloorScore``, ``affinityRouting``,
  ``strategy`` (§7.2, served to ``/policy`` as version 7);
* CacheBackend ``spec.type: None`` (routing only, no cache server), ``spec.gateway`` (which
  gateway objects to emit) and ``status.gateway``;
* PromptTemplate ``allowedNamespaces`` and the chat/normalization fields the renderer
  (``inference_cache.render.spec``) reads.

Embedded Kubernetes types the operator only passes through (``affinity``,
``securityContext``, ``topologySpreadConstraints``, ``env[].valueFrom``) are open objects
(``x-kubernetes-preserve-unknown-fields``) instead of controller-gen's full copies; the Pods
they end up in are validated against the core schemas.
"""

from __future__ import annotations

from typing import Any, Final

JSON = dict[str, Any]

GROUP: Final = "inferencecache.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = f"{GROUP}/{VERSION}"

# ---- schema builders ---------------------------------------------------------------------


def _obj(
    desc: str,
    props: JSON,
    *,
    required: tuple[str, ...] = (),
    rules: tuple[JSON, ...] = (),
    extra: JSON | None = None,
) -> JSON:
    out: JSON = {"description": desc, "type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if rules:
        out["x-kubernetes-validations"] = list(rules)
    out.update(extra or {})
    return out


def _str(desc: str, **extra: Any) -> JSON:
    return {"description": desc, "type": "string", **extra}


def _int32(desc: str, **extra: Any) -> JSON:
    return {"description": desc, "type": "integer", "format": "int32", **extra}


def _int64(desc: str, **extra: Any) -> JSON:
    return {"description": desc, "type": "integer", "format": "int64", **extra}


def _bool(desc: str, **extra: Any) -> JSON:
    return {"description": desc, "type": "boolean", **extra}


def _enum(desc: str, values: tuple[str, ...], **extra: Any) -> JSON:
    return {"description": desc, "type": "string", "enum": list(values), **extra}


def _time(desc: str) -> JSON:
    return _str(desc, format="date-time")


def _str_map(desc: str) -> JSON:
    return {"description": desc, "type": "object", "additionalProperties": {"type": "string"}}


def _str_list(desc: str, **extra: Any) -> JSON:
    return {"description": desc, "type": "array", "items": {"type": "string"}, **extra}


def _map_list(desc: str, item: JSON, key: str, **extra: Any) -> JSON:
    return {
        "description": desc,
        "type": "array",
        "items": item,
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": [key],
        **extra,
    }


def _open(desc: str) -> JSON:
    return {"description": desc, "type": "object", "x-kubernetes-preserve-unknown-fields": True}


def _rule(rule: str, message: str) -> JSON:
    return {"rule": rule, "message": message}


_QUANTITY: Final[JSON] = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
    "x-kubernetes-int-or-string": True,
}
#: Go/Envoy Gateway duration shape (the EnvoyExtensionPolicy ``messageTimeout`` pattern).
DURATION_PATTERN: Final = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
#: CachePolicy ``routingFloorScore``: a non-negative decimal string (original §7.2e).
FLOOR_SCORE_PATTERN: Final = r"^(0|[1-9][0-9]{0,7})(\.[0-9]{1,6})?$"
_DNS_LABEL: Final = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


def _conditions() -> JSON:
    """``[]metav1.Condition`` exactly as controller-gen renders it."""
    return _map_list(
        "Conditions of the resource (listType=map keyed by type).",
        {
            "description": "Details for one aspect of the current state of this API Resource.",
            "type": "object",
            "required": ["lastTransitionTime", "message", "reason", "status", "type"],
            "properties": {
                "lastTransitionTime": _time("When the condition last changed status."),
                "message": _str("Human readable message about the transition.", maxLength=32768),
                "observedGeneration": _int64("The generation the condition was set for.", minimum=0),
                "reason": _str(
                    "Programmatic identifier of the last transition, CamelCase.",
                    maxLength=1024,
                    minLength=1,
                    pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
                ),
                "status": _enum("Status of the condition.", ("True", "False", "Unknown")),
                "type": _str(
                    "Type of condition in CamelCase or in foo.example.com/CamelCase.",
                    maxLength=316,
                    pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
                ),
            },
        },
        "type",
    )


def _observed_generation() -> JSON:
    return _int64("The .metadata.generation this status was computed from.", minimum=0)


def _column(name: str, json_path: str, type_: str = "string", **extra: Any) -> JSON:
    return {"name": name, "type": type_, "jsonPath": json_path, **extra}


_AGE: Final[JSON] = _column("Age", ".metadata.creationTimestamp", "date")


def _crd(
    kind: str,
    plural: str,
    short: str,
    schema: JSON,
    columns: list[JSON],
    *,
    scope: str = "Namespaced",
) -> JSON:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "shortNames": [short],
                "singular": kind.lower(),
            },
            "scope": scope,
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "additionalPrinterColumns": [*columns, _AGE],
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


def _root(desc: str, spec: JSON, status: JSON, *, spec_required: bool) -> JSON:
    return _obj(
        desc,
        {
            "apiVersion": _str("APIVersion of this representation of the object."),
            "kind": _str("Kind of this object."),
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        required=("spec",) if spec_required else (),
    )


# ---- CacheBackend ------------------------------------------------------------------------

#: ``spec.type`` values with an adapter or a meaning (the CRD keeps the field open, as the
#: original did; admission rejects unsupported (engine, type) pairs).
BACKEND_TYPES: Final = ("LMCache", "SGLangHiCache", "AIBrix", "Mooncake", "NIXL", "External", "None")
GATEWAY_MODES: Final = ("None", "InferencePool", "EnvoyGateway")
BODY_MODES: Final = ("Buffered", "FullDuplexStreamed")
FAIL_OPEN_STREAMED_MESSAGE: Final = (
    "failOpen must be false when bodyMode is FullDuplexStreamed (Envoy cannot fail open once a "
    "streamed body is in flight)"
)
HTTPROUTE_REQUIRED_MESSAGE: Final = "httpRouteRef is required when mode is EnvoyGateway"


def _gateway_spec() -> JSON:
    port = _obj(
        "A port of the engine pods the gateway may send requests to.",
        {"number": _int32("Port number (one per vLLM data-parallel rank).", minimum=1, maximum=65535)},
        required=("number",),
    )
    return _obj(
        "Which gateway objects the operator emits so that a gateway calls our ext_proc server for "
        "this backend's engine pods. One mode per backend: both on one route would run ext_proc twice.",
        {
            "mode": _enum(
                "None: no gateway objects. InferencePool: an inference.networking.k8s.io/v1 "
                "InferencePool with our server as endpoint picker (Inference-Extension gateways). "
                "EnvoyGateway: an EnvoyExtensionPolicy (ext_proc) and a BackendTrafficPolicy "
                "(endpointOverride) on httpRouteRef.",
                GATEWAY_MODES,
                default="None",
            ),
            "modelName": _str("The OpenAI model name the engine pods serve (the request's `model`)."),
            "httpRouteRef": _obj(
                "The HTTPRoute (same namespace) the Envoy Gateway policies attach to.",
                {"name": _str("Name of the HTTPRoute.", minLength=1, maxLength=253)},
                required=("name",),
            ),
            "bodyMode": _enum(
                "How Envoy sends the request body to ext_proc: Buffered (whole body, up to the "
                "listener's buffer limit) or FullDuplexStreamed.",
                BODY_MODES,
                default="Buffered",
            ),
            "messageTimeout": _str(
                "How long Envoy waits for each ext_proc response; long enough for whole bodies.",
                default="60s",
                pattern=DURATION_PATTERN,
            ),
            "failOpen": _bool(
                "Let requests through unrouted when ext_proc fails. Must be false with FullDuplexStreamed.",
                default=True,
            ),
            "responseProcessing": _bool(
                "Also send response headers to ext_proc (processingMode.response).", default=False
            ),
            "targetPorts": _map_list(
                "Engine ports behind the gateway (InferencePool targetPorts; one per data-parallel rank).",
                port,
                "number",
                minItems=1,
                maxItems=8,
                default=[{"number": 8000}],
            ),
        },
        rules=(
            _rule(
                "!(has(self.bodyMode) && self.bodyMode == 'FullDuplexStreamed' && "
                "(!has(self.failOpen) || self.failOpen))",
                FAIL_OPEN_STREAMED_MESSAGE,
            ),
            _rule(
                "!has(self.mode) || self.mode != 'EnvoyGateway' || has(self.httpRouteRef)",
                HTTPROUTE_REQUIRED_MESSAGE,
            ),
        ),
    )


def _pod_template() -> JSON:
    toleration = _obj(
        "A core/v1 Toleration.",
        {
            "effect": _str("Taint effect to match; empty matches all."),
            "key": _str("Taint key; empty with operator Exists matches all."),
            "operator": _str("Exists or Equal (default Equal)."),
            "tolerationSeconds": _int64("How long a NoExecute taint is tolerated."),
            "value": _str("Taint value to match."),
        },
    )
    pull_secret = _obj(
        "A core/v1 LocalObjectReference.",
        {"name": _str("Name of the Secret.", default="")},
        extra={"x-kubernetes-map-type": "atomic"},
    )
    return _obj(
        "Pod-level overrides for the managed cache server's Pods. No containers.",
        {
            "nodeSelector": _str_map("Node labels the Pods must run on."),
            "affinity": _open("A core/v1 Affinity."),
            "tolerations": {"description": "core/v1 Tolerations.", "type": "array", "items": toleration},
            "topologySpreadConstraints": {
                "description": "core/v1 TopologySpreadConstraints.",
                "type": "array",
                "items": _open("A core/v1 TopologySpreadConstraint."),
            },
            "imagePullSecrets": {
                "description": "Secrets for pulling the server image.",
                "type": "array",
                "items": pull_secret,
            },
            "serviceAccountName": _str("ServiceAccount of the Pods."),
            "securityContext": _open("A core/v1 PodSecurityContext."),
            "priorityClassName": _str("PriorityClass of the Pods."),
            "schedulerName": _str("Scheduler of the Pods."),
            "runtimeClassName": _str("RuntimeClass of the Pods."),
            "terminationGracePeriodSeconds": _int64("Grace period for Pod termination.", minimum=0),
        },
    )


def _backend_spec() -> JSON:
    env_var = _obj(
        "A core/v1 EnvVar.",
        {
            "name": _str("Environment variable name."),
            "value": _str("Literal value."),
            "valueFrom": _open("A core/v1 EnvVarSource."),
        },
        required=("name",),
    )
    return _obj(
        "Desired state of a cache backend and how engine pods use it.",
        {
            "type": _str(
                "Cache server kind: LMCache (managed), External (spec.endpoint), None (no cache "
                "server: KV events and routing only), or SGLangHiCache, AIBrix, Mooncake, NIXL. "
                "Not an enum: admission rejects unsupported (engine, type) pairs.",
                default="LMCache",
            ),
            "deploymentKind": _enum(
                "Workload kind of a managed server; StatefulSet is deferred (treated as unmanaged).",
                ("Deployment", "StatefulSet"),
                default="Deployment",
            ),
            "replicas": _int32("Managed server replicas.", default=1, minimum=0),
            "storage": _obj(
                "Persistent storage for the server (inert: no PVC wiring).",
                {
                    "pvc": _obj(
                        "A PersistentVolumeClaim for the server.",
                        {
                            "size": {**_QUANTITY, "description": "Requested size."},
                            "storageClassName": _str("StorageClass of the claim."),
                        },
                        required=("size",),
                    )
                },
            ),
            "autoscaling": _obj(
                "A HorizontalPodAutoscaler for the managed server.",
                {
                    "minReplicas": _int32(
                        "Lower bound; the defaulting webhook sets it to spec.replicas (if >= 1).", minimum=1
                    ),
                    "maxReplicas": _int32("Upper bound.", minimum=1),
                    "targetCPUUtilizationPercent": _int32(
                        "Target mean CPU utilisation (the controller uses 80 when unset).",
                        minimum=1,
                        maximum=100,
                    ),
                },
                required=("maxReplicas",),
                rules=(
                    _rule(
                        "!has(self.minReplicas) || self.minReplicas <= self.maxReplicas",
                        "minReplicas must not exceed maxReplicas",
                    ),
                ),
            ),
            "integration": _obj(
                "How matching engine pods are wired to the backend (by the pod webhook).",
                {
                    "engine": _str("Inference engine (lower-cased when read; vllm).", default="vllm"),
                    "role": _enum(
                        "The engines' LMCache kv_role.",
                        ("ReadOnly", "WriteOnly", "ReadWrite"),
                        default="ReadWrite",
                    ),
                    "failOpen": _bool(
                        "Engines keep serving when the cache is down; false = fail-closed.",
                        default=True,
                    ),
                    "firstEventTimeout": _str(
                        "How long after the server is first Available a KV event must arrive before "
                        "Degraded (<= 0 means 5m).",
                        default="5m",
                    ),
                    "engineOverrides": _obj(
                        "Adjustments to what the webhook injects into engine containers.",
                        {
                            "args": _str_list("Extra args; replace injected ones with the same flag."),
                            "suppressArgs": _str_list("Injected flags to leave out."),
                            "env": {
                                "description": "Extra env vars.",
                                "type": "array",
                                "items": env_var,
                            },
                            "suppressEnv": _str_list("Injected environment variable names to leave out."),
                        },
                    ),
                },
            ),
            "engineSelector": _obj(
                "Engine pods in this namespace the backend claims (equality only; empty claims nothing).",
                {"matchLabels": _str_map("Labels a pod must carry.")},
            ),
            "backendConfig": _str_map(
                "Free-form server settings (serverImage, serverCommand, chunkSize, remoteSerde, localCPU, "
                "maxLocalCPU, model)."
            ),
            "template": _pod_template(),
            "endpoint": _str("host:port (optional lm:// scheme) of an External server; only for External."),
            "allowCrossNamespace": _bool("Allow an endpoint Service in another namespace.", default=False),
            "gateway": _gateway_spec(),
        },
    )


def _backend_status() -> JSON:
    emitted = _obj(
        "An object the operator applied.",
        {"kind": _str("Kind of the object."), "name": _str("Name of the object.")},
        required=("kind", "name"),
    )
    skipped = _obj(
        "An object the operator could not emit.",
        {"kind": _str("Kind of the object."), "reason": _str("Why it was not emitted.")},
        required=("kind", "reason"),
    )
    return _obj(
        "Observed state of the backend.",
        {
            "endpoint": _str("Where engines reach the cache server (host:port)."),
            "capacity": _str("Reserved; always empty."),
            "matchedEnginePods": _int32("Pods matching engineSelector at the last reconcile.", minimum=0),
            "uninjectedEnginePods": _str_list(
                "Matching engine pods created without the webhook's injection (first 20 names); "
                "restart them to inject.",
                maxItems=20,
            ),
            "failOpen": _bool("The effective integration.failOpen."),
            "observedGeneration": _observed_generation(),
            "firstKVEventObservedAt": _time("When the index first saw a KV event from the engines."),
            "firstAvailableAt": _time("When the managed server first became Available."),
            "indexParticipation": _obj(
                "What the index holds for this backend's engines.",
                {
                    "prefixCount": _int64("Prefixes in the index.", minimum=0),
                    "lastEventAt": _time("Last KV event."),
                    "hitRate": _str("Reserved."),
                },
                required=("prefixCount",),
            ),
            "conditions": _conditions(),
            "gateway": _obj(
                "Gateway objects emitted for spec.gateway, and those skipped with the reason.",
                {
                    "emitted": {"description": "Objects applied.", "type": "array", "items": emitted},
                    "skipped": {"description": "Objects not applied.", "type": "array", "items": skipped},
                },
            ),
        },
    )


def cache_backend() -> JSON:
    return _crd(
        "CacheBackend",
        "cachebackends",
        "cb",
        _root(
            "CacheBackend: a KV-cache server (or none) for engine pods, and how a gateway routes to them.",
            _backend_spec(),
            _backend_status(),
            spec_required=False,
        ),
        [
            _column("Type", ".spec.type"),
            _column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
            _column("Matched", ".status.matchedEnginePods", "integer"),
            _column("Endpoint", ".status.endpoint"),
            _column("Prefixes", ".status.indexParticipation.prefixCount", "integer"),
            _column("LastEvent", ".status.indexParticipation.lastEventAt", "date"),
            _column("Gateway", ".spec.gateway.mode", priority=1),
        ],
    )


# ---- CachePolicy -------------------------------------------------------------------------


def cache_policy() -> JSON:
    strategy = _obj(
        "Gates on the lookup strategies.",
        {
            "enableChainMatching": _bool("Match block-hash chains (false: exact prefix only).", default=True),
            "requireChain": _bool("POLICY_REQUIRES_CHAIN for lookups without a valid chain.", default=False),
            "enableTenantHot": _bool("Allow TENANT_HOT answers.", default=True),
        },
    )
    spec = _obj(
        "Cache policy of the namespace (tenant). One per namespace.",
        {
            "eviction": _enum("Eviction order of the tenant's index entries.", ("LRU", "LFU"), default="LRU"),
            "evictionTTL": _str("Entry lifetime (Go duration, > 0; server default 30m)."),
            "minimumPrefixTokens": _int32("Lookups with fewer prefix tokens get no hint.", minimum=0),
            "lookupTimeoutMs": _int32("Deadline of one lookup in milliseconds.", minimum=0),
            "minimumMatchedTokens": _int32(
                "Drop replicas that matched fewer tokens from a PREFIX_MATCH answer (0 disables).",
                default=64,
                minimum=0,
            ),
            "routingFloorScore": _str(
                'A PREFIX_MATCH whose top score is below this decimal becomes no match ("0" disables).',
                default="0.1",
                pattern=FLOOR_SCORE_PATTERN,
            ),
            "affinityRouting": _enum(
                "Pin misses to a consistent-hash replica of the scope (AFFINITY_HINT).",
                ("Enabled", "Disabled"),
                default="Enabled",
            ),
            "strategy": strategy,
        },
    )
    status = _obj("Reserved.", {"observedGeneration": _observed_generation(), "conditions": _conditions()})
    return _crd(
        "CachePolicy",
        "cachepolicies",
        "cpol",
        _root("CachePolicy sets the index policy of its namespace.", spec, status, spec_required=True),
        [_column("Eviction", ".spec.eviction")],
    )


# ---- CacheTenant -------------------------------------------------------------------------


def cache_tenant() -> JSON:
    spec = _obj(
        "A tenant of the index and its quota.",
        {
            "tenantID": _str("Tenant id as sent in lookups and cache reports.", minLength=1),
            "quota": _obj(
                "Bounds of the tenant's share of the index.",
                {
                    "maxIndexEntries": _int64(
                        "Entries the tenant may hold (absent: unbounded; 0: none).", minimum=0
                    )
                },
            ),
            "isolationMode": _enum("How tenants share the index.", ("Fairness",), default="Fairness"),
            "crypto": {
                **_open("Reserved; must be empty."),
                "maxProperties": 0,
            },
        },
        required=("tenantID",),
    )
    status = _obj(
        "Observed state of the tenant.",
        {
            "observedGeneration": _observed_generation(),
            "indexEntries": _int64("Entries the index holds for the tenant (absent: not yet observed)."),
            "conditions": _conditions(),
        },
    )
    return _crd(
        "CacheTenant",
        "cachetenants",
        "ct",
        _root("CacheTenant declares an index tenant and its quota.", spec, status, spec_required=True),
        [
            _column("Tenant", ".spec.tenantID"),
            _column("Entries", ".status.indexEntries", "integer"),
            _column("Quota", ".spec.quota.maxIndexEntries", "integer"),
            _column("Isolation", ".spec.isolationMode"),
        ],
    )


# ---- PromptTemplate ----------------------------------------------------------------------

NORMALIZATIONS: Final = ("none", "trim", "collapse")
MESSAGE_ROLES: Final = ("system", "developer", "user", "assistant")
BODY_XOR_MESSAGES_MESSAGE: Final = "exactly one of body (text) and messages (chat) is required"


def prompt_template() -> JSON:
    slot = _obj(
        "A named value the template is rendered with.",
        {
            "name": _str("Slot name, used as {{.name}}.", minLength=1, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$"),
            "type": _enum(
                "Stable slots form the cacheable prefix; Mutable ones (after them) vary per request.",
                ("Stable", "Mutable"),
            ),
            "required": _bool("The value must be given."),
            "description": _str("What the slot holds."),
            "maxLength": _int32("Longest accepted value.", minimum=1),
            "normalization": _enum(
                "This slot's normalization (overrides spec.normalization).", NORMALIZATIONS
            ),
        },
        required=("name", "type"),
    )
    message = _obj(
        "One chat message of a chat template.",
        {
            "role": _enum("Message role.", MESSAGE_ROLES),
            "body": _str("Message text with {{.slot}} placeholders.", minLength=1),
        },
        required=("role", "body"),
    )
    spec = _obj(
        "A prompt template: a text body or chat messages with {{.slot}} placeholders.",
        {
            "body": _str("Text template with {{.slot}} placeholders.", minLength=1),
            "messages": {"description": "Chat template.", "type": "array", "items": message, "minItems": 1},
            "slots": _map_list("The template's slots.", slot, "name"),
            "normalization": _enum("Normalization of Stable values.", NORMALIZATIONS, default="none"),
            "allowedNamespaces": {
                "description": "Namespaces besides the template's own whose requests may use it.",
                "type": "array",
                "items": {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL},
                "x-kubernetes-list-type": "set",
            },
        },
        rules=(_rule("has(self.body) != has(self.messages)", BODY_XOR_MESSAGES_MESSAGE),),
    )
    status = _obj(
        "Observed state of the template.",
        {
            "templateRevision": _str("Content hash of the canonical spec."),
            "observedGeneration": _observed_generation(),
            "conditions": _conditions(),
        },
    )
    return _crd(
        "PromptTemplate",
        "prompttemplates",
        "pt",
        _root("PromptTemplate is a prompt with stable and mutable slots.", spec, status, spec_required=True),
        [_column("Revision", ".status.templateRevision")],
    )


# ---- PDTopology --------------------------------------------------------------------------


def pd_topology() -> JSON:
    pool = _obj(
        "A pool of prefill or decode engines.",
        {
            "name": _str("Pool name.", minLength=1),
            "matchLabels": _str_map("Labels of the pool's pods."),
            "replicas": _int32("Pool size.", minimum=0),
            "acceleratorType": _str("Name of an acceleratorTypes entry."),
        },
        required=("name",),
    )
    accelerator = _obj(
        "An accelerator kind.",
        {
            "name": _str("Accelerator type name."),
            "vendor": _str("Vendor."),
            "model": _str("Model."),
            "matchLabels": _str_map("Labels of nodes with this accelerator."),
        },
        required=("name",),
    )
    spec = _obj(
        "Prefill/decode disaggregation topology (types only).",
        {
            "prefillPools": _map_list("Prefill pools.", pool, "name"),
            "decodePools": _map_list("Decode pools.", pool, "name"),
            "acceleratorTypes": _map_list("Accelerator types.", accelerator, "name"),
        },
    )
    status = _obj("Reserved.", {"observedGeneration": _observed_generation(), "conditions": _conditions()})
    return _crd(
        "PDTopology",
        "pdtopologies",
        "pdt",
        _root("PDTopology describes prefill and decode pools.", spec, status, spec_required=False),
        [_column("Prefill", ".spec.prefillPools[*].name"), _column("Decode", ".spec.decodePools[*].name")],
    )


# ---- CacheIndex --------------------------------------------------------------------------


def cache_index() -> JSON:
    replica = _obj(
        "A replica with stats.",
        {
            "id": _str("Replica id (ip:port)."),
            "tenant": _str("Tenant the replica reports under."),
            "cacheMemoryBytes": _int64("Cache memory in use."),
            "hitRate": _str("Hit rate (decimal)."),
            "pressure": _str("Cache pressure."),
            "lastUpdate": _time("Last stats report."),
        },
        required=("id",),
    )
    tenant = _obj(
        "A tenant's share of the index.",
        {
            "id": _str('Tenant id ("" = untenanted).'),
            "indexEntries": _int64("Index entries."),
            "memoryUsed": _int64("Sum of the tenant's replicas' cache memory."),
            "hitRate": _str("Mean hit rate (decimal)."),
        },
        required=("id",),
    )
    status = _obj(
        "The cluster's cache state, from the server's /snapshot (written on change).",
        {
            "replicas": _map_list("Replicas with stats.", replica, "id"),
            "tenants": _map_list("Tenants.", tenant, "id"),
            "prefixes": _obj(
                "Prefix counts.",
                {
                    "summary": _obj(
                        "Totals.",
                        {
                            "total": _int64("Prefixes in the index."),
                            "hot": _int64("Hot prefixes (0)."),
                        },
                    )
                },
            ),
            "observedServer": _str("The snapshot URL scraped."),
            "lastUpdated": _time("Time of the last change."),
        },
    )
    return _crd(
        "CacheIndex",
        "cacheindices",
        "ci",
        _root(
            "CacheIndex mirrors the index state (singleton cluster-default).",
            _obj("Empty.", {}),
            status,
            spec_required=False,
        ),
        [
            _column("Prefixes", ".status.prefixes.summary.total", "integer"),
            _column("Changed", ".status.lastUpdated", "date"),
        ],
        scope="Cluster",
    )


def all_crds() -> list[JSON]:
    """Our six CRDs, in a stable order."""
    return [cache_backend(), cache_policy(), cache_tenant(), prompt_template(), pd_topology(), cache_index()]
