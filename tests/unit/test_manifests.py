"""The Kubernetes manifests of deploy/kubernetes, checked offline: valid against Kubernetes'
own schemas, every zrpc container's arguments accepted by the zrpc command line, the probes
answering what they claim, and the pieces agreeing with each other (names, ports, labels, the
etcd members the cluster URL lists). Each check also runs on a broken copy, to show it fails.

The schemas come from kubernetes-validate (Kubernetes' OpenAPI schemas as JSON Schema, shipped
in the wheel: no cluster, no network); `kubectl kustomize` renders the kustomization when
kubectl is on PATH."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from unittest import mock

import click
import pytest

from tests import REPO
from zrpc import _defaults as D
from zrpc._core._membership import GrantLease, LeaseGranted, Membership, Put, Registered, parse_cluster
from zrpc._tools.cli import broker as broker_cli
from zrpc._tools.cli import main
from zrpc._tools.cli import worker as worker_cli
from zrpc.broker._config import BrokerConfig
from zrpc.testing import FakeClock

yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate (the dev extra)")

DEPLOY = REPO / "deploy" / "kubernetes"
KUSTOMIZATION = "kustomization.yaml"
WORKLOADS = ("Deployment", "StatefulSet")

POD_IP = "10.244.1.7"
"""What $(POD_IP) (the downward API's status.podIP) stands for in the checks."""

Doc = dict[str, Any]
Checker = Callable[[Path], list[str]]


# --- reading the manifests ----------------------------------------------------------------


def manifest_files(where: Path) -> list[Path]:
    return sorted(p for p in where.glob("*.yaml") if p.name != KUSTOMIZATION)


def load(where: Path) -> list[tuple[str, Doc]]:
    """Every document of every manifest, with the file it came from."""
    out: list[tuple[str, Doc]] = []
    for path in manifest_files(where):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                out.append((path.name, doc))
    return out


def of_kind(docs: list[tuple[str, Doc]], kind: str) -> list[Doc]:
    return [d for _, d in docs if d.get("kind") == kind]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(docs: list[tuple[str, Doc]]) -> Iterator[tuple[Doc, Doc]]:
    """(workload, container) for every container of every Deployment and StatefulSet."""
    for _, doc in docs:
        if doc.get("kind") in WORKLOADS:
            for c in pod_spec(doc).get("containers", []):
                yield doc, c


def zrpc_containers(docs: list[tuple[str, Doc]], command: str | None = None) -> Iterator[tuple[Doc, Doc]]:
    """The containers that run `zrpc` (`zrpc COMMAND` when given)."""
    for doc, c in containers(docs):
        if c.get("command") == ["zrpc"] and (command is None or c.get("args", [None])[0] == command):
            yield doc, c


def sample_pod_name(doc: Doc) -> str:
    """What $(POD_NAME) is in the workload's first pod."""
    name = str(doc["metadata"]["name"])
    return f"{name}-0" if doc["kind"] == "StatefulSet" else f"{name}-5d8f7c9b6-x2k4q"


def container_env(docs: list[tuple[str, Doc]], doc: Doc, c: Doc) -> tuple[dict[str, str], list[str]]:
    """The container's environment as Kubernetes builds it (downward API fields as samples,
    ConfigMap keys from the ConfigMaps beside it), and what cannot be resolved."""
    config = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    fields = {"metadata.name": sample_pod_name(doc), "status.podIP": POD_IP,
              "metadata.namespace": "default", "spec.nodeName": "node-1"}
    env: dict[str, str] = {}
    problems: list[str] = []
    for e in c.get("env", []):
        name, source = e["name"], e.get("valueFrom")
        if source is None:
            env[name] = expand(str(e.get("value", "")), env)
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path not in fields:
                problems.append(f"{c['name']}: env {name}: no sample for fieldRef {path}")
            env[name] = fields.get(path, "")
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            value = config.get(ref["name"], {}).get(ref["key"])
            if value is None:
                problems.append(f"{c['name']}: env {name}: no ConfigMap {ref['name']} with key {ref['key']}")
            env[name] = str(value or "")
        else:
            problems.append(f"{c['name']}: env {name}: unexpected source {sorted(source)}")
    return env, problems


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of command, args and env values: a defined variable is
    replaced, an undefined reference stays as it is, $$ is a literal $."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env.get(name, m.group(0))

    return _REF.sub(one, text)


def expanded_args(docs: list[tuple[str, Doc]], doc: Doc, c: Doc) -> tuple[list[str], dict[str, str], list[str]]:
    """The container's args as its process gets them, its environment, and what went wrong."""
    env, problems = container_env(docs, doc, c)
    args = [expand(str(a), env) for a in c.get("args", [])]
    for a in args:
        if "$(" in a:
            problems.append(f"{c['name']}: {a!r} names a variable the container does not define")
    return args, env, problems


def option(args: list[str], flag: str) -> str | None:
    """The value given to `flag` (as `--flag VALUE` or `--flag=VALUE`), None when absent."""
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


# --- the checks: each returns what is wrong, [] when nothing is --------------------------


def schema_errors(where: Path) -> list[str]:
    """Every document against Kubernetes' schema (strict: an unknown field is an error), for
    the oldest and the newest Kubernetes the validator ships schemas for."""
    kv = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is in the dev extra")
    versions = kv.utils.all_versions()
    errors: list[str] = []
    for name, doc in load(where):
        for version in dict.fromkeys((versions[0], versions[-1])):
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                path = "/".join(str(p) for p in exc.absolute_path)
                errors.append(f"{name} (Kubernetes {version}): {path}: {exc.message}")
            except kv.SchemaNotFoundError as exc:
                errors.append(f"{name}: {exc.message}")
    return errors


def parse_zrpc(args: list[str], env: Mapping[str, str]) -> click.Context:
    """`zrpc ARGS` parsed by the command line itself, in the container's environment (click
    reads the options' environment variables while parsing). Raises click's errors."""
    outside = {k: v for k, v in os.environ.items() if not k.startswith("ZRPC_")}
    with mock.patch.dict(os.environ, {**outside, **env}, clear=True):
        root = click.Context(main, info_name="zrpc")
        command = main.get_command(root, args[0]) if args else None
        if command is None:
            raise click.UsageError(f"no zrpc command {args[:1]}")
        return command.make_context(args[0], args[1:], parent=root)


def check_broker(sub: click.Context) -> None:
    """What `zrpc broker` checks before it starts, and the config it would build."""
    broker_cli._check_elect(sub, sub.params)
    broker_cli._check_cluster(sub, sub.params)
    BrokerConfig(**broker_cli.OPTIONS.keywords(sub.params))


def check_worker(sub: click.Context) -> None:
    worker_cli.load_services(sub.params["services"])


CHECKS: dict[str, Callable[[click.Context], None]] = {"broker": check_broker, "worker": check_worker}


def cli_errors(where: Path) -> list[str]:
    """Every zrpc container's args, expanded as Kubernetes does, accepted by `zrpc`."""
    errors: list[str] = []
    docs = load(where)
    for doc, c in zrpc_containers(docs):
        args, env, problems = expanded_args(docs, doc, c)
        errors += problems
        try:
            sub = parse_zrpc(args, env)
            if args[0] in CHECKS:
                CHECKS[args[0]](sub)
        except click.ClickException as exc:
            errors.append(f"{doc['metadata']['name']}/{c['name']}: zrpc {' '.join(args)}: {exc.format_message()}")
    return errors


def kustomization_errors(where: Path) -> list[str]:
    """The kustomization lists every manifest, each once, and nothing else; it names the
    image the zrpc containers use."""
    k = yaml.safe_load((where / KUSTOMIZATION).read_text())
    listed = list(k.get("resources", []))
    files = [p.name for p in manifest_files(where)]
    errors = [f"{KUSTOMIZATION} does not list {f}" for f in files if f not in listed]
    errors += [f"{KUSTOMIZATION} lists {r}, which is not a file here" for r in listed if r not in files]
    errors += [f"{KUSTOMIZATION} lists {r} twice" for r in set(listed) if listed.count(r) > 1]
    images = {i["name"] for i in k.get("images", [])}
    for _, c in zrpc_containers(load(where)):
        if c["image"].rsplit(":", 1)[0] not in images:
            errors.append(f"{c['name']}: image {c['image']} is not among the kustomization's images {sorted(images)}")
    return errors


def selects(selector: Mapping[str, str], doc: Doc) -> bool:
    labels = doc["spec"]["template"]["metadata"].get("labels", {})
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def workloads(docs: list[tuple[str, Doc]]) -> list[Doc]:
    return [d for _, d in docs if d.get("kind") in WORKLOADS]


def policy_errors(where: Path) -> list[str]:
    """What the schemas cannot see and a zrpc cluster needs: selectors that select, headless
    Services, the broker and worker settings, etcd members, the image's user."""
    docs = load(where)
    errors: list[str] = []
    services = {d["metadata"]["name"]: d for d in of_kind(docs, "Service")}
    for w in workloads(docs):
        name = w["metadata"]["name"]
        if not selects(w["spec"]["selector"].get("matchLabels", {}), w):
            errors.append(f"{name}: its selector does not match its pods' labels")
        for c in pod_spec(w)["containers"]:
            requests = c.get("resources", {}).get("requests", {})
            if not {"cpu", "memory"} <= set(requests):
                errors.append(f"{name}/{c['name']}: no cpu and memory requests")
        if w["kind"] == "StatefulSet":
            svc = services.get(w["spec"].get("serviceName", ""))
            if svc is None or svc["spec"].get("clusterIP") != "None" or not selects(svc["spec"].get("selector", {}), w):
                errors.append(f"{name}: serviceName must be a headless Service selecting its pods")
    for s in services.values():
        if not any(selects(s["spec"].get("selector", {}), w) for w in workloads(docs)):
            errors.append(f"Service {s['metadata']['name']} selects no pods")
    for p in of_kind(docs, "PodDisruptionBudget"):
        if not any(selects(p["spec"]["selector"].get("matchLabels", {}), w) for w in workloads(docs)):
            errors.append(f"PodDisruptionBudget {p['metadata']['name']} selects no pods")
    errors += broker_errors(docs, services)
    errors += worker_errors(docs)
    errors += etcd_errors(docs)
    errors += image_user_errors(where, docs)
    return errors


def broker_errors(docs: list[tuple[str, Doc]], services: Mapping[str, Doc]) -> list[str]:
    errors: list[str] = []
    found = list(zrpc_containers(docs, "broker"))
    if not found:
        return ["no workload runs zrpc broker"]
    for w, c in found:
        name = w["metadata"]["name"]
        args, _, _ = expanded_args(docs, w, c)
        if w["kind"] != "StatefulSet" or w["spec"].get("replicas", 1) < 3:
            errors.append(f"{name}: brokers run as a StatefulSet of 3 or more (stable member names)")
        if option(args, "--name") != sample_pod_name(w):
            errors.append(f"{name}: --name must be $(POD_NAME), one member name per pod")
        frontend = option(args, "--frontend") or ""
        if not frontend.startswith(f"tcp://{POD_IP}:"):
            errors.append(f"{name}: --frontend must bind the pod IP (tcp://$(POD_IP):PORT): it is what "
                          f"the broker registers, got {frontend!r}")
        if not option(args, "--monitor"):
            errors.append(f"{name}: no --monitor")
        port = int(frontend.rpartition(":")[2] or 0)
        if port not in {p["containerPort"] for p in c.get("ports", [])}:
            errors.append(f"{name}: the frontend port {port} is not a containerPort")
        svc = services.get(w["spec"].get("serviceName", ""))
        if svc is not None and port not in {p["port"] for p in svc["spec"].get("ports", [])}:
            errors.append(f"{name}: Service {svc['metadata']['name']} does not list the frontend port {port}")
        for probe in ("readinessProbe", "livenessProbe"):
            if probe not in c:
                errors.append(f"{name}: no {probe}")
        pdbs = [p for p in of_kind(docs, "PodDisruptionBudget") if selects(p["spec"]["selector"]["matchLabels"], w)]
        if not pdbs:
            errors.append(f"{name}: no PodDisruptionBudget")
        for p in pdbs:
            spec = p["spec"]
            if spec.get("maxUnavailable") != 1 and spec.get("minAvailable") != w["spec"]["replicas"] - 1:
                errors.append(f"{name}: its PodDisruptionBudget should let one broker out at a time")
        errors += probe_errors(docs, w, c)
    return errors


def worker_errors(docs: list[tuple[str, Doc]]) -> list[str]:
    errors: list[str] = []
    found = list(zrpc_containers(docs, "worker"))
    if not found:
        return ["no workload runs zrpc worker"]
    for w, c in found:
        name = w["metadata"]["name"]
        args, env, _ = expanded_args(docs, w, c)
        grace = pod_spec(w).get("terminationGracePeriodSeconds", 30)
        if grace <= D.DRAIN_TIMEOUT:
            errors.append(f"{name}: terminationGracePeriodSeconds {grace} leaves a stopping worker no time to "
                          f"finish its calls (it waits up to {D.DRAIN_TIMEOUT:g} s)")
        if not option(args, "--cluster") and "ZRPC_CLUSTER" not in env:
            errors.append(f"{name}: a worker joins with --cluster (it follows every broker)")
    return errors


def cluster_url(docs: list[tuple[str, Doc]]) -> str | None:
    for w, c in zrpc_containers(docs, "broker"):
        return option(expanded_args(docs, w, c)[0], "--cluster")
    return None


def etcd_errors(docs: list[tuple[str, Doc]]) -> list[str]:
    """The cluster URL names members of the etcd StatefulSet (when it is deployed here), and
    etcd's initial cluster is its members."""
    url = cluster_url(docs)
    if url is None:
        return ["the brokers have no --cluster"]
    try:
        hosts = parse_cluster(url)
    except ValueError as exc:
        return [str(exc)]
    etcd = [w for w in workloads(docs) if any(c["name"] == "etcd" for c in pod_spec(w)["containers"])]
    if not etcd:
        return []  # an etcd run elsewhere (managed): nothing here to compare with
    errors: list[str] = []
    sts = etcd[0]
    name, svc, replicas = sts["metadata"]["name"], sts["spec"]["serviceName"], sts["spec"]["replicas"]
    members = [f"{name}-{i}" for i in range(replicas)]
    if replicas < 3 or replicas % 2 == 0:
        errors.append(f"{name}: etcd needs an odd number of members, 3 or more, got {replicas}")
    c = next(c for c in pod_spec(sts)["containers"] if c["name"] == "etcd")
    client_ports = {p["containerPort"] for p in c.get("ports", []) if p.get("name") == "client"}
    for host, port in hosts:
        member, _, domain = host.partition(".")
        if member not in members or domain != svc or port not in client_ports:
            errors.append(f"--cluster names {host}:{port}, not one of the etcd members "
                          f"{', '.join(f'{m}.{svc}' for m in members)} (client port {sorted(client_ports)})")
    if len(hosts) != replicas:
        errors.append(f"--cluster lists {len(hosts)} etcd endpoints, the StatefulSet runs {replicas}")
    initial = option([str(a) for a in c.get("args", [])], "--initial-cluster") or ""
    named = sorted(part.partition("=")[0] for part in initial.split(","))
    if named != members:
        errors.append(f"{name}: --initial-cluster names {named}, the StatefulSet runs {members}")
    return errors


def image_user_errors(where: Path, docs: list[tuple[str, Doc]]) -> list[str]:
    """The pods run as the user the Dockerfile creates."""
    dockerfile = (where / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\d+)", dockerfile, re.M)
    errors = [] if users else ["Dockerfile: no numeric USER"]
    for w, _ in zrpc_containers(docs):
        uid = pod_spec(w).get("securityContext", {}).get("runAsUser")
        if users and str(uid) != users[-1]:
            errors.append(f"{w['metadata']['name']}: runAsUser {uid}, the image's user is {users[-1]}")
    return errors


# --- the broker's probes, run against what a broker answers ------------------------------


def member_status(registered: bool, etcd_lost: bool = False, serving: bool = True) -> dict[str, Any]:
    """zrpc.status as a cluster member answers it, its `cluster` part from the membership
    core itself (registered, or not yet, or lost with etcd)."""
    clock = FakeClock()
    m = Membership(clock, "zrpc-broker-0", {"frontend": f"tcp://{POD_IP}:5555", "boot": "b1"})
    grant = next(a for a in m.start() if isinstance(a, GrantLease))
    if registered:
        put = next(a for a in m.handle(LeaseGranted(grant.seq, 1, D.LEASE_TTL)) if isinstance(a, Put))
        m.handle(Registered(put.seq, 1, 7))
    if etcd_lost:
        for _ in range(D.LEASE_TTL * 4):  # renewals unanswered: the lease passes its TTL
            clock.advance(0.5)
            m.tick()
    return {"broker": {"endpoint": f"tcp://{POD_IP}:5555", "state": "active", "serving": serving,
                       "name": "zrpc-broker-0"}, "cluster": m.snapshot(), "services": [], "workers": []}


class NoAnswer(Exception):
    """zrpc.ZrpcError in the fake zrpc the probes import."""


def run_probe(script: str, env: Mapping[str, str], answer: dict[str, Any] | None) -> tuple[bool, list[str]]:
    """Runs a `python -c` probe with a fake zrpc whose Client answers `answer` (None: no
    answer, ZrpcError): (whether it exits 0, the endpoints it asked)."""
    asked: list[str] = []

    class Client:
        def __init__(self, brokers: list[str], **_: Any) -> None:
            asked.extend(brokers)

        def __enter__(self) -> Client:
            return self

        def __exit__(self, *_: object) -> None:
            return None

        def call(self, service: str, method: str, *args: Any) -> Any:
            assert (service, method) == ("zrpc", "status")
            if answer is None:
                raise NoAnswer("zrpc.status: no reply before the deadline")
            return copy.deepcopy(answer)

    fake = types.ModuleType("zrpc")
    fake.__dict__.update(Client=Client, ZrpcError=NoAnswer)
    code: object = 0
    with mock.patch.dict(sys.modules, {"zrpc": fake}), mock.patch.dict(os.environ, env):
        try:
            exec(compile(script, "<probe>", "exec"), {"__name__": "__main__"})
        except SystemExit as exc:
            code = exc.code
        except Exception:  # noqa: BLE001 - python -c exits 1 on any exception
            code = 1
    return code in (None, 0), asked


PROBE_CASES: list[tuple[str, dict[str, Any] | None, bool, bool]] = [
    # what the broker answers, ready, alive
    ("registered and serving", member_status(True), True, True),
    ("started, not yet registered", member_status(False), False, True),
    ("cut off from etcd, lease lost", member_status(True, etcd_lost=True), False, True),
    ("registered, not serving", member_status(True, serving=False), False, True),
    ("no answer", None, False, False),
]


def probe_errors(docs: list[tuple[str, Doc]], w: Doc, c: Doc) -> list[str]:
    """Readiness: the broker answers and is registered in etcd. Liveness: it answers, etcd or
    not (a member cut off from etcd keeps serving; restarting it would not help). Both ask
    the broker's own frontend."""
    args, env, _ = expanded_args(docs, w, c)
    frontend = option(args, "--frontend")
    errors: list[str] = []
    for probe, column in (("readinessProbe", 0), ("livenessProbe", 1)):
        command = c.get(probe, {}).get("exec", {}).get("command", [])
        if command[:2] != ["python", "-c"] or len(command) != 3:
            errors.append(f"{c['name']}: {probe} is not `python -c SCRIPT`")
            continue
        for what, answer, *expected in PROBE_CASES:
            ok, asked = run_probe(command[2], env, answer)
            if ok != expected[column]:
                errors.append(f"{c['name']}: {probe} {'passes' if ok else 'fails'} when the broker is {what}")
            if asked != [frontend]:
                errors.append(f"{c['name']}: {probe} asks {asked}, not the broker's frontend {frontend}")
    return errors


# --- the tests ----------------------------------------------------------------------------


def test_the_manifests_are_there() -> None:
    names = {p.name for p in manifest_files(DEPLOY)}
    assert len(names) >= 7, names
    for extra in (KUSTOMIZATION, "Dockerfile", "README.md"):
        assert (DEPLOY / extra).is_file(), extra
    assert len(load(DEPLOY)) == len(names)  # one resource per file: the kustomization lists them


def test_every_manifest_is_valid_kubernetes() -> None:
    assert schema_errors(DEPLOY) == []


def test_every_zrpc_container_runs_a_valid_zrpc_command() -> None:
    assert cli_errors(DEPLOY) == []


def test_workers_join_through_the_cluster() -> None:
    """Workers find the brokers in etcd, at the URL the brokers register in."""
    docs = load(DEPLOY)
    (w, c), = zrpc_containers(docs, "worker")
    args, _, _ = expanded_args(docs, w, c)
    url = option(args, "--cluster")
    assert url is not None and url == cluster_url(docs)
    assert parse_zrpc(args, {}).params["cluster"] == url


def test_the_kustomization_lists_every_manifest() -> None:
    assert kustomization_errors(DEPLOY) == []


def test_the_pieces_fit_together() -> None:
    assert policy_errors(DEPLOY) == []


def test_the_readme_names_the_image_placeholder() -> None:
    k = yaml.safe_load((DEPLOY / KUSTOMIZATION).read_text())
    readme = (DEPLOY / "README.md").read_text()
    for image in k["images"]:
        assert image["newName"] in readme and image["name"] in readme
    assert "zrpc-ha[cluster]" in (DEPLOY / "Dockerfile").read_text()


BREAKAGES: list[tuple[str, str, str, str, Checker]] = [
    # what is broken, file, text, replacement, the check that must catch it
    ("a misspelt field", "worker-deployment.yaml", "      containers:\n", "      containrs:\n", schema_errors),
    ("a wrong type", "broker-pdb.yaml", "maxUnavailable: 1", "maxUnavailable: [1]", schema_errors),
    ("an unknown broker option", "broker-statefulset.yaml", "- --frontend\n", "- --frontnd\n", cli_errors),
    ("a member without --name", "broker-statefulset.yaml", "            - --name\n            - $(POD_NAME)\n",
     "", cli_errors),
    ("an undefined variable", "broker-statefulset.yaml", "$(POD_NAME)", "$(POD_NAM)", cli_errors),
    ("a service that is not there", "worker-deployment.yaml", "- zrpc.examples.calc:calc\n",
     "- zrpc.examples.calc:nothing\n", cli_errors),
    ("a manifest left out", KUSTOMIZATION, "  - broker-pdb.yaml\n", "", kustomization_errors),
    ("a broker Service with a virtual IP", "broker-service.yaml", "  clusterIP: None\n", "", policy_errors),
    ("a wildcard frontend", "broker-statefulset.yaml", "tcp://$(POD_IP):5555", "tcp://*:5555", policy_errors),
    ("an etcd member that does not exist", "configmap.yaml", "zrpc-etcd-2.zrpc-etcd:2379",
     "zrpc-etcd-3.zrpc-etcd:2379", policy_errors),
    ("workers cut off while draining", "worker-deployment.yaml", "terminationGracePeriodSeconds: 40",
     "terminationGracePeriodSeconds: 20", policy_errors),
    ("a readiness that ignores registration", "broker-statefulset.yaml", 'registration != "registered"',
     "registration is None and False", policy_errors),
    ("a liveness that needs etcd", "broker-statefulset.yaml", '\n                          c.call("zrpc", "status")\n',
     '\n                          assert c.call("zrpc", "status")["cluster"]["etcd"] == "ok"\n', policy_errors),
    ("a PDB that selects nothing", "broker-pdb.yaml", "      app.kubernetes.io/component: broker\n",
     "      app.kubernetes.io/component: brokers\n", policy_errors),
    ("no resource requests", "worker-deployment.yaml", "              cpu: 250m\n", "", policy_errors),
]


@pytest.mark.parametrize("what, name, old, new, check", BREAKAGES, ids=[b[0] for b in BREAKAGES])
def test_a_broken_copy_is_caught(tmp_path: Path, what: str, name: str, old: str, new: str, check: Checker) -> None:
    broken = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, broken)
    text = (broken / name).read_text()
    assert text.count(old) == 1, f"{name} no longer holds {old!r} once: update this breakage"
    (broken / name).write_text(text.replace(old, new))
    assert check(broken) != [], f"{check.__name__} missed {what}"


def test_the_probes_see_what_they_claim() -> None:
    """Spelled out (policy_errors runs the same): run against a member that lost its lease
    with etcd, readiness fails and liveness passes."""
    docs = load(DEPLOY)
    (w, c), = zrpc_containers(docs, "broker")
    _, env, _ = expanded_args(docs, w, c)
    lost = member_status(True, etcd_lost=True)
    assert lost["cluster"]["etcd"] == "unreachable" and lost["cluster"]["registration"] != "registered"
    ready = c["readinessProbe"]["exec"]["command"][2]
    alive = c["livenessProbe"]["exec"]["command"][2]
    assert run_probe(ready, env, lost) == (False, [f"tcp://{POD_IP}:5555"])
    assert run_probe(alive, env, lost) == (True, [f"tcp://{POD_IP}:5555"])
    assert run_probe(ready, env, member_status(True)) == (True, [f"tcp://{POD_IP}:5555"])


KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH: the kustomization is not rendered")
def test_kubectl_kustomize_renders_every_resource(tmp_path: Path) -> None:
    assert KUBECTL is not None
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d is not None]
    assert sorted((d["kind"], d["metadata"]["name"]) for d in rendered) == \
        sorted((d["kind"], d["metadata"]["name"]) for _, d in load(DEPLOY))
    k = yaml.safe_load((DEPLOY / KUSTOMIZATION).read_text())
    images = {f"{i['newName']}:{i['newTag']}" for i in k["images"]}
    pods = [c["image"] for d in rendered if d["kind"] in WORKLOADS for c in pod_spec(d)["containers"]]
    assert images <= set(pods), pods
    # what kubectl would apply is valid too
    (tmp_path / "rendered.yaml").write_text(out.stdout)
    assert schema_errors(tmp_path) == []
    # and a kustomization naming a file that is not there fails to render
    broken = tmp_path / "broken"
    shutil.copytree(DEPLOY, broken)
    (broken / "broker-pdb.yaml").unlink()
    failed = subprocess.run([KUBECTL, "kustomize", str(broken)], capture_output=True, text=True, timeout=60)
    assert failed.returncode != 0
