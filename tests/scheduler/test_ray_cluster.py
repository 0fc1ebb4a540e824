"""A real two-node Ray cluster on this machine: `ray job submit` runs a search, the journal
lands where the driver runs. Slow (tens of seconds): run with `pytest -m slow`.

Each node runs under `ray start --block` in its own process group, and the test stops exactly
those groups: `ray stop --force` would also kill every other Ray on a shared machine.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from evomerge.journal import Journal

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


@pytest.fixture
def cluster(tmp_path_factory) -> Iterator[str]:
    """A head (1 CPU) and a second node (1 CPU, resource `node2`); yields the dashboard URL."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    (gcs, dashboard, client, *agent) = free_ports(11)
    common = ["--block", "--num-cpus", "1", "--disable-usage-stats"]
    head = [RAY, "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent[0]), "--dashboard-agent-grpc-port", str(agent[1]),
            "--runtime-env-agent-port", str(agent[2]), "--metrics-export-port", str(agent[3]),
            "--temp-dir", str(tmp_path_factory.mktemp("rh", numbered=True))]
    node2 = [RAY, "start", "--address", f"127.0.0.1:{gcs}", "--resources", '{"node2": 1}',
             "--dashboard-agent-listen-port", str(agent[4]), "--dashboard-agent-grpc-port", str(agent[5]),
             "--runtime-env-agent-port", str(agent[6]), "--metrics-export-port", str(agent[7]),
             "--temp-dir", str(tmp_path_factory.mktemp("rw", numbered=True))]
    logs = tmp_path_factory.mktemp("ray-logs")
    nodes: list[subprocess.Popen] = []
    try:
        for name, cmd in (("head", head), ("node2", node2)):
            with open(logs / f"{name}.log", "w") as log:
                nodes.append(subprocess.Popen(cmd + common, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
            wait_for_nodes(gcs, len(nodes), env)
        yield f"http://127.0.0.1:{dashboard}"
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
        [RAY, "job", "submit", "--address", cluster, "--working-dir", str(REPO), "--submission-id", "evomerge-2n",
         "--", sys.executable, "-m", "evomerge", "search", "--backend", "python", "--budget", "30",
         "--journal", str(journal), "--workers", "2", "--fitness", "tests.scheduler._ray_fitness:squares_where",
         "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240)
    status = JobSubmissionClient(cluster).get_job_status("evomerge-2n")
    assert status == JobStatus.SUCCEEDED, submit.stdout[-3000:] + submit.stderr[-3000:]
    # The journal lands where the driver ran, with exactly the budget's evaluations.
    with Journal.open(journal) as store:
        trials = store.trials(split="fit")
        assert store.count("fit") == 30
    assert all(t.ok for t in trials)
    # Each 1-CPU node holds one of the two 1-CPU actors: two worker processes did the work.
    assert len({t.score.metrics["pid"] for t in trials}) == 2
