"""A test API server: the REST paths of ``resource.k8s.io/v1`` a DRA driver uses, on 127.0.0.1.

No API server runs here, so the tests play one over HTTP, with the JSON bodies of the real API:

- ResourceClaims, ``/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims[/{name}]``: GET (read, list).
  The test puts claims in with ``add_claim`` (an allocated one is made by ``allocated_claim``, as the
  scheduler leaves it).
- ResourceSlices, ``/apis/resource.k8s.io/v1/resourceslices[/{name}]``: list (``fieldSelector`` on
  ``spec.nodeName``, ``spec.driver``, ``spec.pool.name`` and ``metadata.name``; ``labelSelector`` with
  ``k=v``, ``k!=v``, ``k``), create (``generateName`` honoured; 409 AlreadyExists), read, replace (409
  Conflict on a stale ``resourceVersion``), delete, and deletecollection.
- Nodes, ``/api/v1/nodes/{name}``: GET, of the nodes the test adds with ``add_node`` (a slice's owner).

It is as strict as the real server where a driver could go wrong: a bearer token is required (the
kubeconfig's), every body it accepts must load into the ``kubernetes`` client's own model of its kind
(strictly: an unknown field is refused), a ResourceSlice is checked against the API's validation rules a
driver meets (names, counts, one value per attribute, semver versions, quantities, capacity request
policies), and quantities are stored in their canonical form ("16000000000" reads back as "16G"), as
the real server stores them. Every body it serves goes through the same models first. Errors are
``Status`` objects. ``requests`` records each request's method and path (with the query).
"""

from __future__ import annotations

import copy
import datetime
import http.server
import json
import re
import threading
import urllib.parse
import uuid
from decimal import Decimal
from collections.abc import Callable
from typing import Any

import pytest

RESOURCE = "/apis/resource.k8s.io/v1"
API_VERSION = "resource.k8s.io/v1"
TOKEN = "fracgpu-test-token"

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SEMVER = re.compile(r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?")
_C_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E"}


class Invalid(Exception):
    """A body the API server refuses: ``code`` and ``reason`` of its Status."""

    def __init__(self, code: int, reason: str, message: str):
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


def _model(kind: str):
    from kubernetes import client

    return {"ResourceSlice": client.V1ResourceSlice, "ResourceSliceList": client.V1ResourceSliceList,
            "ResourceClaim": client.ResourceV1ResourceClaim, "ResourceClaimList": client.V1ResourceClaimList,
            "Status": client.V1Status, "Node": client.V1Node}[kind]


def through_models(kind: str, body: dict) -> dict:
    """``body`` read into the kubernetes client's model of ``kind`` and written back as the API's JSON; Invalid
    (400) when the model refuses it: a wrong type, or an unknown field (as the API server's strict field
    validation, ``fieldValidation=Strict``, refuses one; its default drops it with a warning, and a field the
    driver meant to set would be lost)."""
    from kubernetes import client

    try:
        model = _model(kind).model_validate(body)   # strict, where the model's from_dict drops unknown fields
    except Exception as e:   # pydantic's ValidationError, or the model's own checks
        raise Invalid(400, "BadRequest", f"strict decoding error: the body is not a {kind}: {e}") from None
    return client.ApiClient().sanitize_for_serialization(model)


def canonical_quantity(text: str) -> str:
    """A quantity as the API server stores it: binary-suffixed input keeps the largest binary suffix that writes
    it exactly; any other the largest decimal one ("16000000000" -> "16G", "0.5" -> "500m")."""
    from kubernetes.utils import parse_quantity

    value = Decimal(parse_quantity(text))   # ValueError for what is not a quantity
    suffix = text.strip().lstrip("+-0123456789.")
    if suffix in _BINARY and value == value.to_integral_value() and value >= 1024:
        power, n = 0, int(value)
        while n % 1024 == 0 and power < 6:
            n, power = n // 1024, power + 1
        if power:
            return f"{n}{next(s for s, p in _BINARY.items() if p == power)}"
    for exponent in sorted(_DECIMAL, reverse=True):
        scaled = value / (Decimal(10) ** exponent)
        if scaled == scaled.to_integral_value() and (scaled != 0 or exponent == 0):
            return f"{int(scaled)}{_DECIMAL[exponent]}"
    return text


def _quantity(where: str, text: Any) -> Decimal:
    from kubernetes.utils import parse_quantity

    try:
        return Decimal(parse_quantity(text))
    except (ValueError, TypeError, ArithmeticError):
        raise Invalid(422, "Invalid", f"{where}: {text!r} is not a quantity") from None


def validate_slice(body: dict) -> dict:
    """What the API server checks of a ResourceSlice that a driver could get wrong; the slice with its
    quantities in canonical form. Invalid (422) naming the field."""
    def invalid(field: str, problem: str) -> Invalid:
        return Invalid(422, "Invalid", f"ResourceSlice.resource.k8s.io \"{name}\" is invalid: {field}: {problem}")

    body = copy.deepcopy(body)
    meta, spec = body.get("metadata") or {}, body.get("spec") or {}
    name = meta.get("name") or meta.get("generateName") or ""
    driver = spec.get("driver", "")
    if not _DNS_SUBDOMAIN.fullmatch(driver) or len(driver) > 63:
        raise invalid("spec.driver", f"{driver!r} must be a DNS subdomain of at most 63 characters")
    selectors = [k for k in ("nodeName", "nodeSelector", "allNodes", "perDeviceNodeSelection") if spec.get(k)]
    if len(selectors) != 1:
        raise invalid("spec", "exactly one of nodeName, nodeSelector, allNodes, perDeviceNodeSelection must be set")
    pool = spec.get("pool") or {}
    if not pool.get("name") or len(pool["name"]) > 253:
        raise invalid("spec.pool.name", "required, at most 253 characters")
    if pool.get("generation", -1) < 0:
        raise invalid("spec.pool.generation", "must be at least 0")
    if pool.get("resourceSliceCount", 0) < 1:
        raise invalid("spec.pool.resourceSliceCount", "must be at least 1")
    devices = spec.get("devices") or []
    if len(devices) > 128:
        raise invalid("spec.devices", f"{len(devices)} devices, at most 128")
    seen = set()
    for i, device in enumerate(devices):
        where = f"spec.devices[{i}]"
        if not _DNS_LABEL.fullmatch(device.get("name", "")) or len(device["name"]) > 63:
            raise invalid(f"{where}.name", f"{device.get('name')!r} must be a DNS label")
        if device["name"] in seen:
            raise invalid(f"{where}.name", f"duplicate device {device['name']!r}")
        seen.add(device["name"])
        attributes, capacity = device.get("attributes") or {}, device.get("capacity") or {}
        if len(attributes) + len(capacity) > 32:
            raise invalid(where, "at most 32 attributes and capacities together")
        for key, value in attributes.items():
            _check_name(invalid, f"{where}.attributes[{key}]", key)
            set_ = [k for k, v in value.items() if v is not None]
            if len(set_) != 1:
                raise invalid(f"{where}.attributes[{key}]", f"exactly one value must be set, not {set_}")
            kind = set_[0]
            if kind == "string" and len(value["string"]) > 64:
                raise invalid(f"{where}.attributes[{key}].string", "at most 64 characters")
            if kind == "version" and (not _SEMVER.fullmatch(value["version"]) or len(value["version"]) > 64):
                raise invalid(f"{where}.attributes[{key}].version", f"{value['version']!r} is not semver 2.0.0")
        for key, cap in capacity.items():
            field = f"{where}.capacity[{key}]"
            _check_name(invalid, field, key)
            _check_capacity(invalid, field, cap, device.get("allowMultipleAllocations", False))
    return body


def _check_name(invalid, field: str, key: str) -> None:
    domain, _, ident = key.rpartition("/")
    if not _C_IDENTIFIER.fullmatch(ident) or len(ident) > 32 or (domain and not _DNS_SUBDOMAIN.fullmatch(domain)):
        raise invalid(field, f"{key!r} must be a C identifier of at most 32 characters, optionally after a domain/")


def _check_capacity(invalid, field: str, cap: dict, multiple: bool) -> None:
    """Value, and the request policy's rules (KEP-5075), as the API server's validation has them: a policy only
    on a device that allows multiple allocations; validRange and validValues exclusive, either needing a default;
    min <= default <= max <= value; default and max are min plus a multiple of step; min + step <= value."""
    value = _quantity(f"{field}.value", cap.get("value"))
    cap["value"] = canonical_quantity(cap["value"])
    policy = cap.get("requestPolicy")
    if policy is None:
        return
    if not multiple:
        raise invalid(f"{field}.requestPolicy", "only a device that allows multiple allocations has one")
    span = policy.get("validRange")
    if span is not None and policy.get("validValues"):
        raise invalid(f"{field}.requestPolicy", "validRange and validValues are exclusive")
    if (span is not None or policy.get("validValues")) and policy.get("default") is None:
        raise invalid(f"{field}.requestPolicy.default", "required with validRange or validValues")
    default = _quantity(f"{field}.requestPolicy.default", policy["default"]) if "default" in policy else None
    if default is not None:
        policy["default"] = canonical_quantity(policy["default"])
        if default > value:
            raise invalid(f"{field}.requestPolicy.default", "must not exceed the capacity's value")
    if span is None:
        return
    low = _quantity(f"{field}.requestPolicy.validRange.min", span.get("min"))
    high = _quantity(f"{field}.requestPolicy.validRange.max", span["max"]) if span.get("max") else None
    step = _quantity(f"{field}.requestPolicy.validRange.step", span["step"]) if span.get("step") else None
    for key in ("min", "max", "step"):
        if span.get(key):
            span[key] = canonical_quantity(span[key])
    if low < 0 or low > value:
        raise invalid(f"{field}.requestPolicy.validRange.min", "must be between 0 and the capacity's value")
    if high is not None and (high > value or high < low):
        raise invalid(f"{field}.requestPolicy.validRange.max", "must be between min and the capacity's value")
    if default is not None and (default < low or (high is not None and default > high)):
        raise invalid(f"{field}.requestPolicy.default", "must be within validRange")
    if step is not None:
        if step <= 0 or low + step > value:
            raise invalid(f"{field}.requestPolicy.validRange.step", "must be positive, and min + step <= value")
        for key, amount in (("max", high), ("default", default)):
            if amount is not None and (amount - low) % step != 0:
                raise invalid(f"{field}.requestPolicy.{'validRange.' if key == 'max' else ''}{key}",
                              "must be min plus a multiple of step")


def _selector_matches(selector: str, get) -> bool:
    """Whether an object matches a field or label selector ``a=b,c!=d,e`` (``get(key)``: its value or None)."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            if get(key.strip()) != value.strip():
                return False
        elif get(term) is None:
            return False
    return True


def _slice_field(obj: dict, key: str) -> str | None:
    fields = {"metadata.name": obj["metadata"].get("name"), "spec.nodeName": obj["spec"].get("nodeName"),
              "spec.driver": obj["spec"].get("driver"), "spec.pool.name": obj["spec"]["pool"].get("name")}
    if key not in fields:
        raise Invalid(400, "BadRequest", f"field label not supported: {key}")
    return fields[key]


class KubeApiServer:
    """The test API server (see the module's docstring). Start it with ``start()`` or as a context manager."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._version = 0
        self.slices: dict[str, dict] = {}
        self.claims: dict[tuple[str, str], dict] = {}
        self.nodes: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []
        # Called with (method, path) before each request is served: a test plays another writer here.
        self.before: Callable[[str, str], None] | None = None
        self._server: http.server.ThreadingHTTPServer | None = None

    # -- life ------------------------------------------------------------------------------------------------
    def start(self) -> KubeApiServer:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> KubeApiServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "the test API server is not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self, path) -> str:
        """Writes a kubeconfig for this server (plain HTTP, its bearer token) to ``path``; the path."""
        config = {"apiVersion": "v1", "kind": "Config", "current-context": "fracgpu-test",
                  "clusters": [{"name": "fracgpu-test", "cluster": {"server": self.url}}],
                  "users": [{"name": "fracgpu-test", "user": {"token": TOKEN}}],
                  "contexts": [{"name": "fracgpu-test", "context": {"cluster": "fracgpu-test", "user": "fracgpu-test"}}]}
        with open(path, "w") as f:
            json.dump(config, f)   # JSON is YAML
        return str(path)

    # -- what the tests put in and read --------------------------------------------------------------------
    def _stamp(self, obj: dict, new: bool) -> None:
        """Sets what the API server sets on a write: resourceVersion, and uid/creationTimestamp/generation on create,
        generation + 1 when the spec changed."""
        self._version += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self._version)
        if new:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            meta["generation"] = 1

    def add_claim(self, claim) -> dict:
        """Puts a claim (the client's ``ResourceV1ResourceClaim`` or its dict) in, as the API server would hold it
        (uid, resourceVersion, creationTimestamp assigned; a uid the claim already has is kept); the stored dict."""
        from kubernetes import client

        body = client.ApiClient().sanitize_for_serialization(claim) if not isinstance(claim, dict) else claim
        body = through_models("ResourceClaim", {**body, "apiVersion": API_VERSION, "kind": "ResourceClaim"})
        for result in (((body.get("status") or {}).get("allocation") or {}).get("devices") or {}).get("results") or []:
            if result.get("consumedCapacity"):
                result["consumedCapacity"] = {k: canonical_quantity(v) for k, v in result["consumedCapacity"].items()}
        meta = body.setdefault("metadata", {})
        if not meta.get("name") or not meta.get("namespace"):
            raise ValueError("a claim needs metadata.name and metadata.namespace")
        with self._lock:
            uid = meta.get("uid")
            self._stamp(body, new=True)
            if uid:
                meta["uid"] = uid
            self.claims[(meta["namespace"], meta["name"])] = body
        return copy.deepcopy(body)

    def add_node(self, name: str) -> dict:
        """Puts a Node in (uid assigned); the stored dict."""
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}
        with self._lock:
            self._stamp(node, new=True)
            self.nodes[name] = node
        return copy.deepcopy(node)

    def remove_claim(self, namespace: str, name: str) -> None:
        with self._lock:
            del self.claims[(namespace, name)]

    def touch_slice(self, name: str) -> None:
        """Another writer's update of slice ``name``: a new resourceVersion, the spec as it was."""
        with self._lock:
            self._stamp(self.slices[name], new=False)

    def slice_list(self) -> list[dict]:
        with self._lock:
            return copy.deepcopy(list(self.slices.values()))

    def writes(self) -> list[tuple[str, str]]:
        """The requests that could change something (not GET)."""
        return [(m, p) for m, p in self.requests if m != "GET"]

    # -- the REST paths ---------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, query: dict[str, str], body: dict | None) -> tuple[int, str, dict]:
        """(status, kind of the answer, answer) for one request; Invalid for a refusal."""
        parts = [p for p in path.split("/") if p]
        if parts[:3] == ["api", "v1", "nodes"] and len(parts) == 4 and method == "GET":
            with self._lock:
                node = self.nodes.get(parts[3])
            if node is None:
                raise Invalid(404, "NotFound", f'nodes "{parts[3]}" not found')
            return 200, "Node", copy.deepcopy(node)
        base = [p for p in RESOURCE.split("/") if p]
        if parts[:len(base)] != base:
            raise Invalid(404, "NotFound", f"the server could not find the requested resource ({path})")
        rest = parts[len(base):]
        if self.before is not None:
            self.before(method, path)
        with self._lock:
            if rest and rest[0] == "resourceslices" and len(rest) <= 2:
                return self._slices(method, rest[1] if len(rest) == 2 else None, query, body)
            if len(rest) in (3, 4) and rest[0] == "namespaces" and rest[2] == "resourceclaims" and method == "GET":
                return self._claims(rest[1], rest[3] if len(rest) == 4 else None)
        raise Invalid(405 if rest and rest[0] in ("resourceslices", "namespaces") else 404,
                      "MethodNotAllowed" if rest else "NotFound", f"{method} {path} is not served here")

    def _claims(self, namespace: str, name: str | None) -> tuple[int, str, dict]:
        if name is None:
            items = [c for (ns, _), c in sorted(self.claims.items()) if ns == namespace]
            return 200, "ResourceClaimList", {"apiVersion": API_VERSION, "kind": "ResourceClaimList",
                                              "metadata": {"resourceVersion": str(self._version)},
                                              "items": copy.deepcopy(items)}
        claim = self.claims.get((namespace, name))
        if claim is None:
            raise Invalid(404, "NotFound", f'resourceclaims.resource.k8s.io "{name}" not found')
        return 200, "ResourceClaim", copy.deepcopy(claim)

    def _slices(self, method: str, name: str | None, query: dict[str, str], body: dict | None):
        if name is None and method == "GET":
            items = [s for _, s in sorted(self.slices.items())
                     if _selector_matches(query.get("fieldSelector", ""), lambda k, s=s: _slice_field(s, k))
                     and _selector_matches(query.get("labelSelector", ""),
                                           lambda k, s=s: (s["metadata"].get("labels") or {}).get(k))]
            return 200, "ResourceSliceList", {"apiVersion": API_VERSION, "kind": "ResourceSliceList",
                                              "metadata": {"resourceVersion": str(self._version)},
                                              "items": copy.deepcopy(items)}
        if name is None and method == "POST":
            return self._create_slice(body)
        if name is None and method == "DELETE":
            doomed = [n for n, s in self.slices.items()
                      if _selector_matches(query.get("fieldSelector", ""), lambda k, s=s: _slice_field(s, k))
                      and _selector_matches(query.get("labelSelector", ""),
                                            lambda k, s=s: (s["metadata"].get("labels") or {}).get(k))]
            for n in doomed:
                del self.slices[n]
            return 200, "Status", {"apiVersion": "v1", "kind": "Status", "status": "Success", "metadata": {}}
        if name is None:
            raise Invalid(405, "MethodNotAllowed", f"{method} on the ResourceSlice collection is not allowed")
        current = self.slices.get(name)
        if current is None:
            raise Invalid(404, "NotFound", f'resourceslices.resource.k8s.io "{name}" not found')
        if method == "GET":
            return 200, "ResourceSlice", copy.deepcopy(current)
        if method == "DELETE":
            del self.slices[name]
            return 200, "ResourceSlice", copy.deepcopy(current)
        if method == "PUT":
            return self._replace_slice(name, current, body)
        raise Invalid(405, "MethodNotAllowed", f"{method} on a ResourceSlice is not served here")

    def _create_slice(self, body: dict | None) -> tuple[int, str, dict]:
        obj = validate_slice(through_models("ResourceSlice", body or {}))
        meta = obj.setdefault("metadata", {})
        if meta.get("resourceVersion"):
            raise Invalid(400, "BadRequest", "resourceVersion should not be set on objects to be created")
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise Invalid(422, "Invalid", "metadata.name: Required value: name or generateName is required")
            meta["name"] = meta["generateName"][:58] + uuid.uuid4().hex[:5]
        if meta["name"] in self.slices:
            raise Invalid(409, "AlreadyExists", f'resourceslices.resource.k8s.io "{meta["name"]}" already exists')
        self._stamp(obj, new=True)
        self.slices[meta["name"]] = obj
        return 201, "ResourceSlice", copy.deepcopy(obj)

    def _replace_slice(self, name: str, current: dict, body: dict | None) -> tuple[int, str, dict]:
        obj = validate_slice(through_models("ResourceSlice", body or {}))
        meta = obj.setdefault("metadata", {})
        if meta.get("name") != name:
            raise Invalid(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the name "
                          f"on the URL ({name})")
        have = meta.get("resourceVersion")
        if have and have != current["metadata"]["resourceVersion"]:
            raise Invalid(409, "Conflict", f'Operation cannot be fulfilled on resourceslices.resource.k8s.io "{name}": '
                          "the object has been modified; please apply your changes to the latest version and try again")
        for key in ("uid", "creationTimestamp", "generation"):
            meta[key] = current["metadata"][key]
        if obj["spec"] != current["spec"]:
            meta["generation"] = current["metadata"]["generation"] + 1
        self._stamp(obj, new=False)
        self.slices[name] = obj
        return 200, "ResourceSlice", copy.deepcopy(obj)


class _Handler(http.server.BaseHTTPRequestHandler):
    api: KubeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:   # quiet: the tests read `requests`
        pass

    def _serve(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        self.api.requests.append((self.command, self.path))
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                raise Invalid(401, "Unauthorized", "Unauthorized")
            try:
                body = json.loads(raw) if raw else None
            except json.JSONDecodeError as e:
                raise Invalid(400, "BadRequest", f"the body is not JSON: {e}") from None
            if self.command == "DELETE" and isinstance(body, dict) and body.get("kind") == "DeleteOptions":
                body = None
            code, kind, answer = self.api.handle(self.command, url.path, query, body)
            answer = through_models(kind, answer)   # what is served loads into the client's models too
        except Invalid as e:
            code, answer = e.code, {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
                                    "message": e.message, "reason": e.reason, "code": e.code}
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve


# ---------------------------------------------------------------------------------------------------------------
# Claims as the scheduler leaves them
# ---------------------------------------------------------------------------------------------------------------
def allocated_claim(namespace: str, name: str, *, driver: str, pool: str, device: str, request: str = "gpu",
                    consumed: dict[str, str] | None = None, config: dict | None = None,
                    config_source: str = "FromClaim", node: str | None = None, share_id: str | None = None,
                    uid: str | None = None):
    """An allocated ResourceClaim (the client's ``ResourceV1ResourceClaim``), as the scheduler leaves it: one request
    ``request`` given ``device`` of ``pool`` for ``driver``, with ``consumed`` capacity ({"memory": "8Gi",
    "compute": "25"}; None: an exclusive allocation) and a share id when it consumed some, the opaque ``config``
    for the driver (the parameters) recorded from ``config_source``, and a node selector for ``node`` (default:
    the pool's name)."""
    from kubernetes import client

    spec = client.V1ResourceClaimSpec(devices=client.V1DeviceClaim(
        requests=[client.V1DeviceRequest(name=request, exactly=client.V1ExactDeviceRequest(
            device_class_name=driver,
            capacity=client.V1CapacityRequirements(requests=dict(consumed)) if consumed else None))],
        config=[client.V1DeviceClaimConfiguration(requests=[request], opaque=client.V1OpaqueDeviceConfiguration(
            driver=driver, parameters=config))] if config is not None and config_source == "FromClaim" else None))
    configs = [client.V1DeviceAllocationConfiguration(source=config_source, requests=[request],
                                                      opaque=client.V1OpaqueDeviceConfiguration(driver=driver,
                                                                                                parameters=config))
               ] if config is not None else None
    node_name = node or pool
    allocation = client.V1AllocationResult(
        devices=client.V1DeviceAllocationResult(
            results=[client.V1DeviceRequestAllocationResult(
                request=request, driver=driver, pool=pool, device=device, consumed_capacity=consumed,
                share_id=share_id or (str(uuid.uuid4()) if consumed else None))],
            config=configs),
        node_selector=client.V1NodeSelector(node_selector_terms=[client.V1NodeSelectorTerm(
            match_fields=[client.V1NodeSelectorRequirement(key="metadata.name", operator="In", values=[node_name])])]))
    return client.ResourceV1ResourceClaim(
        api_version=API_VERSION, kind="ResourceClaim",
        metadata=client.V1ObjectMeta(namespace=namespace, name=name, uid=uid),
        spec=spec, status=client.V1ResourceClaimStatus(allocation=allocation))


@pytest.fixture
def kube_apiserver():
    """A test API server of this test's own, started."""
    with KubeApiServer() as server:
        yield server
