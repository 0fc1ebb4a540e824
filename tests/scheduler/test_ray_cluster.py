"""A real two-node Ray cluster on this machine: `ray job submit` runs a search, the journal
lands where the driver runs; an api search reaches a real provider with auth on although neither
node was started with the key. Slow (tens of seconds): run with `pytest -m slow`.

Each node runs under `ray start --block` in its own process group, and the test stops exactly
those groups: `ray stop --force` would also kill every other Ray on a shared machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient
from ray.util.state import list_actors

from evomerge.journal import Journal
from tests.helpers.api_search import EXAMPLES, VALIDATION, ledger_queries, served
from tests.helpers.provider import API_KEY, tiny_repo  # noqa: F401  (pytest fixture)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def stop(group: subprocess.Popen) -> None:
    """End one node: its whole process group, gently first."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(group.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + grace
        while time.time() < deadline:
            try:
                os.killpg(group.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


@dataclass(frozen=True)
class Cluster:
    url: str
    """The dashboard's address (job submission, state API)."""
    dirs: tuple[Path, ...]
    """Everything the nodes write: their temp dirs (session logs) and their own output."""


@pytest.fixture
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A head (1 CPU) and a second node (1 CPU, resource `node2`), started without any API key."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    (gcs, dashboard, client, *agent) = free_ports(11)
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    temps = [tmp_path_factory.mktemp("rh", numbered=True), tmp_path_factory.mktemp("rw", numbered=True)]
    head = [RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent[0]), "--dashboard-agent-grpc-port", str(agent[1]),
            "--runtime-env-agent-port", str(agent[2]), "--metrics-export-port", str(agent[3]),
            "--temp-dir", str(temps[0])]
    node2 = [RAY, "start", "--address", f"127.0.0.1:{gcs}", "--resources", '{"node2": 1}',
             "--dashboard-agent-listen-port", str(agent[4]), "--dashboard-agent-grpc-port", str(agent[5]),
             "--runtime-env-agent-port", str(agent[6]), "--metrics-export-port", str(agent[7]),
             "--temp-dir", str(temps[1])]
    logs = tmp_path_factory.mktemp("ray-logs")
    nodes: list[subprocess.Popen] = []
    try:
        for name, cmd in (("head", head), ("node2", node2)):
            with open(logs / f"{name}.log", "w") as log:
                nodes.append(subprocess.Popen(cmd + common, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            wait_for_nodes(gcs, len(nodes), env)
        yield Cluster(f"http://127.0.0.1:{dashboard}", (*temps, logs))
    finally:
        for node in reversed(nodes):
            stop(node)


def wait_for_nodes(gcs: int, count: int, env: dict[str, str], timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run([RAY, "status", "--address", f"127.0.0.1:{gcs}"], env=env,
                             capture_output=True, text=True).stdout
        if out.count(" node_") >= count:
            return
        time.sleep(1.0)
    raise TimeoutError(f"the Ray cluster did not reach {count} node(s) in {timeout:.0f}s")


def test_a_search_submitted_as_a_ray_job_runs_on_both_nodes(cluster, tmp_path):
    journal = tmp_path / "run.sqlite"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.url, "--working-dir", str(REPO), "--submission-id", "evomerge-2n",
         "--", sys.executable, "-m", "evomerge", "search", "--backend", "python", "--budget", "30",
         "--journal", str(journal), "--workers", "2", "--fitness", "tests.helpers.ray_fitness:squares_where",
         "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240)
    status = JobSubmissionClient(cluster.url).get_job_status("evomerge-2n")
    assert status == JobStatus.SUCCEEDED, submit.stdout[-3000:] + submit.stderr[-3000:]
    # The journal lands where the driver ran, with exactly the budget's evaluations.
    with Journal.open(journal) as store:
        trials = store.trials(split="fit")
        assert store.count("fit") == 30
    assert all(t.ok for t in trials)
    # Each 1-CPU node holds one of the two 1-CPU actors: two worker processes did the work.
    assert len({t.score.metrics["pid"] for t in trials}) == 2


KEY_ENV = "EVOMERGE_CLUSTER_TEST_KEY"


@pytest.fixture
def provider(tiny_repo, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`evomerge serve` with auth on, as a process of its own; yields (its /v1 URL, its output file)."""
    (port,) = free_ports(1)
    out = tmp_path_factory.mktemp("serve") / "serve.log"
    with open(out, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "evomerge", "serve", "--repository", str(tiny_repo),
                                 "--port", str(port), "--api-key-env", KEY_ENV, "--torch-threads", "1"],
                                env={**os.environ, KEY_ENV: API_KEY}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                httpx.get(url + "/models", headers={"Authorization": f"Bearer {API_KEY}"}).raise_for_status()
                break
            except httpx.ConnectError:
                assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
                time.sleep(0.3)
        yield url, out
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes()]


def test_an_api_search_submitted_as_a_ray_job_reaches_the_provider_from_both_nodes(cluster, provider, tmp_path):
    """The key lives only in the submitter's environment and goes into the job's runtime_env (how
    Ray passes secrets); the driver hands it to its actors the same way, so the actor on the node
    started without it is answered, not refused with 401. The key is in no file the run leaves but
    Ray's own runtime-env logs."""
    assert KEY_ENV not in os.environ  # the nodes' environment (the fixture's) never held it
    url, serve_log = provider
    run = tmp_path / "run"
    run.mkdir()
    tasks = run / "task.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": e.prompt, "answer": e.answer, "id": e.id}) + "\n"
                             for e in EXAMPLES + VALIDATION))
    journal = run / "run.sqlite"
    config = {"backend": "api", "budget": 6, "seed": 3, "journal": str(journal), "workers": 2, "batch_size": 4,
              "executor": "ray", "test_table": "none", "task": {"files": [str(tasks)], "validation": 0.25},
              "api": {"base": url, "key_env": KEY_ENV, "provider": "evomerge"}}
    (run / "config.yaml").write_text(json.dumps(config))  # JSON is YAML
    before = served(url, API_KEY)
    client = JobSubmissionClient(cluster.url)
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m evomerge search --config {run / 'config.yaml'} --no-progress",
        submission_id="evomerge-api-2n",
        runtime_env={"working_dir": str(REPO), "env_vars": {KEY_ENV: API_KEY, "RAY_AUTH_MODE": "disabled"}})
    deadline = time.monotonic() + 240
    while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(1.0)
    job_logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, job_logs[-4000:]
    with Journal.open(journal) as store:
        trials = store.trials(split="fit")
        assert store.count("fit") == 6
    assert all(t.ok for t in trials), [t.score.error for t in trials if not t.ok]
    # One 1-CPU actor on each 1-CPU node: the second node's actor was answered too.
    actors = list_actors(address=cluster.url, filters=[("class_name", "=", "_EvalActor")], detail=True)
    assert len({a.node_id for a in actors}) == 2, actors
    assert served(url, API_KEY) - before == ledger_queries(journal) > 6  # the start-up probe's query included
    assert API_KEY not in job_logs
    leaks = [f for root in (run, serve_log.parent, *cluster.dirs) for f in files_holding(root, API_KEY)]
    # Ray writes every runtime_env it creates, env_vars' values included, to its runtime-env logs
    # on each node, and confines them there (ray-project/ray#29985; it has no secret env vars,
    # ray-project/ray#28276): the only place the key may be is those files, on the nodes.
    ray_env_logs = [f for f in leaks if f.name == "runtime_env_agent.log" or f.name.startswith("runtime_env_setup-")]
    assert leaks == ray_env_logs, leaks  # not the journal, the job's or the workers' logs, the provider's output
