"""What a cluster operator applies: deploy/kubernetes and the Helm chart in deploy/helm/fracgpu.

Every object is loaded into the official ``kubernetes`` client's model of its kind and written back:
the models drop what they do not know and refuse wrong types, so an object that does not come back
as it was written has a field the API server would reject or ignore. Kinds the client has no model
for (the Prometheus operator's ServiceMonitor) are checked for what that operator requires.
"""

from __future__ import annotations

import re

import click
import pytest
import yaml

from fracgpu import cdi, config, kube, settings

kubernetes = pytest.importorskip("kubernetes", reason="the kubernetes extra is not installed")
from kubernetes import client  # noqa: E402
from kubernetes.utils import parse_quantity  # noqa: E402

from tests.support.manifests import (MANIFESTS, ROOT, as_model, check_all, cli_command,  # noqa: E402
                                     daemonsets, difference, load)

CHART = ROOT / "deploy" / "helm" / "fracgpu"
NAMESPACE = "fracgpu-system"
# Options the issue gives commands that another part of this work adds (the lead merges them all).
def test_every_manifest_loads_into_the_clients_model_of_its_kind():
    objects = check_all(load(MANIFESTS))
    assert {kind for kind, _ in objects} == {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
                                             "ConfigMap", "Service", "DaemonSet", "DeviceClass", "ServiceMonitor",
                                             "ResourceClaimTemplate", "Pod"}
    for (kind, name), obj in objects.items():
        if kind not in {"Namespace", "ClusterRole", "ClusterRoleBinding", "DeviceClass", "ResourceClaimTemplate",
                        "Pod", "ServiceMonitor"}:
            assert obj.metadata.namespace == NAMESPACE, f"{kind} {name} is not in {NAMESPACE}"


def test_a_field_the_api_does_not_have_is_caught():
    doc = load(MANIFESTS / "dra" / "daemonset.yaml")[0]
    doc["spec"]["template"]["spec"]["containers"][0]["resource"] = {}   # a misspelt `resources`
    with pytest.raises(AssertionError, match=r"containers\[0\]\.resource: not a field"):
        as_model(doc)


DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


def test_names_and_labels_are_what_the_api_server_accepts():
    """What the API server validates beyond the schema: object names are DNS subdomains, names of
    containers, volumes and ports DNS labels (ports: at most 15 characters), label values at most 63
    characters; and every fracgpu variable a container sets is a setting fracgpu reads, with a value it
    accepts."""
    for doc in load(MANIFESTS):
        obj = as_model(doc) if doc["kind"] != "ServiceMonitor" else None
        assert DNS_SUBDOMAIN.fullmatch(doc["metadata"]["name"]), doc["metadata"]["name"]
        for value in (doc["metadata"].get("labels") or {}).values():
            assert LABEL_VALUE.fullmatch(value), value
        if doc["kind"] != "DaemonSet":
            continue
        pod = obj.spec.template.spec
        for c in pod.containers + pod.init_containers:
            assert DNS_LABEL.fullmatch(c.name), c.name
            assert all(DNS_LABEL.fullmatch(p.name) and len(p.name) <= 15 for p in c.ports or [])
            fracgpu_env = {e.name: e.value for e in c.env or [] if e.name.startswith(settings.PREFIX)}
            for name in fracgpu_env:
                settings.read(name, fracgpu_env)   # KeyError: not a setting; ValueError: a value it refuses
        assert all(DNS_LABEL.fullmatch(v.name) for v in pod.volumes)


def test_the_dra_plugin_may_write_slices_and_read_claims_and_nothing_else():
    objects = check_all(load(MANIFESTS / "10-rbac.yaml"))
    rules = {(group, resource): set(rule.verbs) for rule in objects["ClusterRole", "fracgpu"].rules
             for group in rule.api_groups for resource in rule.resources}
    assert rules == {("resource.k8s.io", "resourceslices"): {"create", "get", "list", "watch", "update", "patch",
                                                             "delete"},
                     ("resource.k8s.io", "resourceclaims"): {"get", "list", "watch"},
                     ("", "nodes"): {"get"}}
    binding = objects["ClusterRoleBinding", "fracgpu"]
    assert binding.role_ref.name == "fracgpu"
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [("ServiceAccount", "fracgpu", NAMESPACE)]
    dra = daemonsets(check_all(load(MANIFESTS / "dra")))[0]
    assert dra.spec.template.spec.service_account_name == "fracgpu"


def fracgpu_containers(ds: client.V1DaemonSet):
    """(subcommand, options) of each container that runs fracgpu (the image's entrypoint: args only)."""
    for c in ds.spec.template.spec.containers:
        assert not c.command, f"container {c.name} runs fracgpu: the image's entrypoint, given args only"
        yield c, c.args[0], c.args[1:]


CONTAINERS = [(daemonset, container) for daemonset, containers in [("dra", ["kubelet-plugin", "node"]),
                                                                    ("device-plugin", ["device-plugin", "node"])]
              for container in containers]


@pytest.mark.parametrize("daemonset,container", CONTAINERS)
def test_the_daemonsets_give_each_command_only_options_it_has_and_values_it_takes(daemonset, container):
    ds = daemonsets(check_all(load(MANIFESTS / daemonset)))[0]
    [(c, name, args)] = [x for x in fracgpu_containers(ds) if x[0].name == container]
    command = cli_command(name)
    assert command is not None, f"there is no `fracgpu {name}`"
    options = {opt: p for p in command.params if isinstance(p, click.Option) for opt in p.opts}
    env = {e.name for e in c.env}
    for arg in args:
        option, _, value = arg.partition("=")
        assert arg.startswith("--") and value, f"{name}: write options as --name=value ({arg!r})"
        assert option in options, f"`fracgpu {name}` has no option {option}"
        if value.startswith("$("):   # the kubelet expands $(VAR) from the container's environment
            assert value[2:-1] in env, f"{arg}: {value[2:-1]} is not in the container's environment"
        elif not isinstance(options[option].type, click.Path):   # paths are the node's, not this machine's
            options[option].type.convert(value, options[option], None)


def mounts(container) -> dict[str, str]:
    return {m.mount_path: m.name for m in container.volume_mounts or []}


@pytest.mark.parametrize("daemonset", ["dra", "device-plugin"])
def test_every_path_a_cdi_spec_names_is_the_same_on_the_host_as_in_the_plugin(daemonset):
    """The plugin writes CDI specs in its container; the runtime reads them on the host. So the folders
    and files a spec names (the CDI folder, the files made for the spec, the state folder, the driver
    and NVML) are mounted at the path they have on the host."""
    ds = daemonsets(check_all(load(MANIFESTS / daemonset)))[0]
    pod = ds.spec.template.spec
    volumes = {v.name: v for v in pod.volumes}
    plugin = pod.containers[0]
    for container in pod.containers + pod.init_containers:
        for m in container.volume_mounts:
            assert m.name in volumes, f"{container.name} mounts {m.name}, which is no volume"
    env = {e.name: e.value for e in plugin.env}
    # The kubelet dials the socket paths a plugin gives it (DRA) or finds them in its folder (device plugin).
    kubelet = ["/var/lib/kubelet/plugins_registry", "/var/lib/kubelet/plugins"] if daemonset == "dra" else \
        ["/var/lib/kubelet/device-plugins"]
    same_path = ["/var/run/cdi", cdi.CONFIG_DIR, env[settings.REAL_LIBCUDA], env[settings.REAL_LIBNVML],
                 "/var/lib/fracgpu", *kubelet]
    for path in same_path:
        name = mounts(plugin).get(path)
        assert name, f"the plugin does not mount {path}"
        assert volumes[name].host_path and volumes[name].host_path.path == path, f"{path} is not the host's {path}"
    for lib in (settings.REAL_LIBCUDA, settings.REAL_LIBNVML):
        assert volumes[mounts(plugin)[env[lib]]].host_path.type == "File"   # a node without it: the pod says so
        # The device probe opens libcuda.so.1 and the agent libnvidia-ml.so.1 by name.
        assert env[lib].rpartition("/")[0] in env["LD_LIBRARY_PATH"].split(":")
    [install] = pod.init_containers
    assert install.command[-2:] == ["/opt/fracgpu/.", "/host/opt/fracgpu/"]
    assert volumes[mounts(install)["/host/opt/fracgpu"]].host_path.path == "/opt/fracgpu"
    assert pod.host_pid, "the node agent maps the device's host pids: it needs the host's pid namespace"
    assert all(c.security_context.privileged for c in pod.containers)


def test_the_default_node_configuration_puts_the_books_on_the_host(tmp_path):
    objects = check_all(load(MANIFESTS / "20-config.yaml"))
    conf = tmp_path / "fracgpu.conf"
    conf.write_text(objects["ConfigMap", "fracgpu-node-config"].data["fracgpu.conf"])
    values = config.read(str(conf)).values   # the shim's own parser: refuses an unknown key or a bad value
    state_dir = values[settings.STATE_DIR]
    assert values[settings.LEDGER].startswith(state_dir + "/")
    for daemonset in ("dra", "device-plugin"):
        pod = daemonsets(check_all(load(MANIFESTS / daemonset)))[0].spec.template.spec
        volumes = {v.name: v for v in pod.volumes}
        for c in pod.containers:
            assert volumes[mounts(c)[state_dir]].host_path.path == state_dir
            assert {e.name: e.value for e in c.env}[settings.CONFIG] == "/etc/fracgpu-default/fracgpu.conf"
            assert volumes[mounts(c)["/etc/fracgpu-default"]].config_map.name == "fracgpu-node-config"
            assert volumes[mounts(c)["/etc/fracgpu"]].host_path.path == "/etc/fracgpu"   # the node's own file wins


def test_prometheus_finds_the_exporter_of_every_node():
    objects = check_all(load(MANIFESTS / "30-service.yaml", MANIFESTS / "monitoring", MANIFESTS / "dra",
                             MANIFESTS / "device-plugin"))
    service = objects["Service", "fracgpu-metrics"]
    monitor = objects["ServiceMonitor", "fracgpu"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service.metadata.labels.items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p.name for p in service.spec.ports}
    assert all(e["honorLabels"] for e in monitor["spec"]["endpoints"]), \
        "the series' namespace/pod/container labels name the pod that holds the GPU, not the exporter's"
    for ds in daemonsets(objects):
        assert service.spec.selector.items() <= ds.spec.template.metadata.labels.items()
        [node] = [c for c in ds.spec.template.spec.containers if c.name == "node"]
        [port] = [p for p in node.ports if p.name == service.spec.ports[0].target_port]
        assert f"--metrics-port={port.container_port}" in node.args and "--metrics-address=0.0.0.0" in node.args


@pytest.mark.parametrize("daemonset,container", CONTAINERS)
def test_each_container_is_ready_when_its_command_says_so(daemonset, container):
    [c] = [c for c in daemonsets(check_all(load(MANIFESTS / daemonset)))[0].spec.template.spec.containers
           if c.name == container]
    [ready] = [a.partition("=")[2] for a in c.args if a.startswith("--ready-file=")]
    assert c.readiness_probe.var_exec.command == ["test", "-f", ready]
    # The commands write the file but do not make its folder: one every image has.
    assert ready.rpartition("/")[0] == "/tmp"


def test_the_example_claim_asks_8_gib_and_25_percent_of_a_fracgpu_gpu():
    objects = check_all(load(MANIFESTS / "examples" / "claim-8gib-25pct.yaml", MANIFESTS / "dra"))
    [template] = [o for (kind, _), o in objects.items() if kind == "ResourceClaimTemplate"]
    [request] = template.spec.spec.devices.requests
    assert request.exactly.device_class_name == kube.DRIVER
    assert {k: parse_quantity(v) for k, v in request.exactly.capacity.requests.items()} == {"memory": 8 * 2**30,
                                                                                           "compute": 25}
    [conf] = template.spec.spec.devices.config
    assert conf.requests == [request.name] and conf.opaque.driver == kube.DRIVER
    assert conf.opaque.parameters["apiVersion"] == f"{kube.DRIVER}/v1alpha1"
    assert conf.opaque.parameters["kind"] == "GpuConfig"
    device_class = objects["DeviceClass", kube.DRIVER]
    assert [s.cel.expression for s in device_class.spec.selectors] == [f'device.driver == "{kube.DRIVER}"']
    pod = next(o for (kind, _), o in objects.items() if kind == "Pod")
    [claim] = pod.spec.resource_claims
    assert claim.resource_claim_template_name == template.metadata.name
    assert [c.name for c in pod.spec.containers[0].resources.claims] == [claim.name]
    assert pod.metadata.namespace == template.metadata.namespace


def test_the_example_pod_asks_two_slices_of_the_device_plugin():
    [pod] = check_all(load(MANIFESTS / "examples" / "pod-2-slices.yaml")).values()
    assert parse_quantity(pod.spec.containers[0].resources.limits[kube.SLICE_RESOURCE]) == 2


# The chart: rendered by Helm's own engine (Helm's Go SDK, through helm-python-sdk's libhelm_c).

HELM_LABELS = {"app.kubernetes.io/instance", "app.kubernetes.io/managed-by", "helm.sh/chart"}


def render(values: dict | None = None) -> list[dict]:
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's engine) is not installed")
    with helm.Chart.load(str(CHART)) as chart:
        out = chart.render(values or {}, name="fracgpu", namespace=NAMESPACE)
    return [doc for text in out.values() for doc in yaml.safe_load_all(text) if doc is not None]


def without_helm_labels(value):
    if isinstance(value, dict):
        return {k: without_helm_labels(v) for k, v in value.items() if k not in HELM_LABELS}
    if isinstance(value, list):
        return [without_helm_labels(v) for v in value]
    return value


def by_kind_and_name(docs: list[dict]) -> dict:
    return {(d["kind"], d["metadata"]["name"]): without_helm_labels(d) for d in docs}


@pytest.mark.parametrize("mode,folder,monitor", [("dra", "dra", True), ("devicePlugin", "device-plugin", False)])
def test_the_chart_makes_the_objects_of_the_manifests(mode, folder, monitor):
    rendered = render({"mode": mode, "metrics": {"serviceMonitor": {"enabled": monitor}}})
    check_all(rendered)
    expected = load(MANIFESTS / "20-config.yaml", MANIFESTS / "30-service.yaml", MANIFESTS / folder)
    if mode == "dra":
        expected += load(MANIFESTS / "10-rbac.yaml")
    if monitor:
        expected += load(MANIFESTS / "monitoring")
    made, written = by_kind_and_name(rendered), by_kind_and_name(expected)
    assert made.keys() == written.keys()
    for key in written:
        problem = difference(written[key], made[key])
        assert problem is None, f"{key[0]} {key[1]}: the chart and the manifest differ at {problem}"


def test_the_charts_values_reach_the_daemonset():
    rendered = render({"mode": "devicePlugin", "slices": 8, "image": {"repository": "registry.example/fracgpu",
                                                                       "tag": "1.2.3"},
                       "nodeSelector": {"fracgpu.dev/gpu": None, "gpu": "yes"}, "driver": {"libcuda": "/usr/lib64/libcuda.so.1"}})
    [ds] = daemonsets(check_all(rendered))
    pod = ds.spec.template.spec
    assert pod.node_selector == {"gpu": "yes"}
    assert {c.image for c in pod.containers + pod.init_containers} == {"registry.example/fracgpu:1.2.3"}
    assert "--slices=8" in pod.containers[0].args
    assert {"name": "libcuda", "mountPath": "/usr/lib64/libcuda.so.1", "readOnly": True} in [
        client.ApiClient().sanitize_for_serialization(m) for m in pod.containers[0].volume_mounts]
    env = {e.name: e.value for e in pod.containers[1].env}
    assert env[settings.REAL_LIBCUDA] == "/usr/lib64/libcuda.so.1"
    assert env["LD_LIBRARY_PATH"] == "/usr/lib64:/usr/lib/x86_64-linux-gnu"   # NVML stayed where it was


@pytest.mark.fault("Helm chart values: an unknown mode, or slices out of 1..64", "the render fails naming the value")
@pytest.mark.parametrize("values,message", [({"mode": "mig"}, 'mode is "mig": write dra'),
                                            ({"slices": 65}, "slices is 65: each GPU is shown as 1 to 64 slices")])
def test_bad_chart_values_fail_the_render_naming_the_value(values, message):
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's engine) is not installed")
    with pytest.raises(helm.HelmRenderError, match=message):
        render(values)


def test_the_chart_passes_helms_lint():
    helm = pytest.importorskip("helm_python", reason="helm-python-sdk (Helm's engine) is not installed")
    result = helm.lint(str(CHART), strict=True, namespace=NAMESPACE, kube_version="1.36.0")
    assert result["errors"] == [] and [m for m in result["messages"] if m["severity"] > 1] == []


def test_the_readmes_claim_and_pod_are_the_example_shipped():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Kubernetes\n", 1)[1].split("\n## ", 1)[0]
    [block] = [b.split("\n", 1)[1] for b in section.split("```")[1::2]
               if b.startswith("yaml\n") and "kind: ResourceClaimTemplate" in b]
    assert list(yaml.safe_load_all(block)) == load(MANIFESTS / "examples" / "claim-8gib-25pct.yaml")
