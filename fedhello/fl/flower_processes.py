"""Flower's process plumbing for ``fedhello.fl.flower.simulate``: a private SuperLink, ``flwr run``, clean stop.

``run_simulation`` starts a SuperLink in simulation mode on a free local port with its own
``FLWR_HOME`` (in the caller's working folder), runs ``flwr run`` of the app folder ``APP_DIR``
against it with the log streamed to this process's stdout, and stops the SuperLink and every
process it started (Ray's included, found by that ``FLWR_HOME`` even after re-parenting)
afterwards, on Ctrl-C within ``STOP_GRACE_S`` seconds. Nothing here imports ``flwr``: the Flower
components run in the processes started here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fedhello.errors import UserError

__all__ = ["APP_DIR", "STOP_GRACE_S", "check_app_dir", "check_resources", "free_port", "processes_with_env",
           "run_simulation", "stop_all", "wait_until_healthy"]

APP_DIR = Path(__file__).resolve().parents[2] / "flower-app"  # the Flower app folder of a source checkout
STARTUP_TIMEOUT_S = 120.0  # seconds for the SuperLink to answer its health check (a loaded machine is slow)
STOP_GRACE_S = 3.0  # after Ctrl-C: seconds the Flower and Ray processes get to end before SIGKILL


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_with_env(key: str, value: str) -> list[int]:
    """Live processes of this user whose environment has ``key=value`` (Linux ``/proc``; else none).

    Every process of a simulation inherits its private ``FLWR_HOME``, so this finds them all,
    Ray's daemons included, even after they were re-parented.
    """
    marker = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0") and int(entry.name) != os.getpid():
                stat = (entry / "stat").read_text()
                if stat[stat.rindex(")") + 2] != "Z":
                    found.append(int(entry.name))
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    return found


def stop_all(superlink: subprocess.Popen, home: str, grace: float = 20.0) -> None:
    """Stop the SuperLink's process group, then anything else still carrying this run's ``FLWR_HOME``
    (Ray's agents, re-parented): each gets ``grace`` seconds to end before SIGKILL."""
    if superlink.poll() is None:
        os.killpg(superlink.pid, signal.SIGTERM)
        try:
            superlink.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(superlink.pid, signal.SIGKILL)
            superlink.wait()
    deadline = time.monotonic() + grace
    while (left := processes_with_env("FLWR_HOME", home)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def wait_until_healthy(superlink: subprocess.Popen, port: int, log: Path) -> None:
    """Return once the SuperLink on ``port`` answers its health check; ``RuntimeError`` naming ``log``
    when it exits or stays silent for ``STARTUP_TIMEOUT_S`` seconds."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise RuntimeError(f"the Flower SuperLink exited with status {superlink.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the Flower SuperLink did not start within {STARTUP_TIMEOUT_S:.0f} s; see {log}")


def check_resources(num_cpus: int, num_gpus: float) -> None:
    """The resources each simulated node asks for must exist here (Ray would wait for them forever
    or fail deep inside); raises ``UserError`` naming the argument (``--num-cpus``, ``--num-gpus``)."""
    # Flower's simulation config holds whole CPUs per node and fractions of a GPU.
    if isinstance(num_cpus, bool) or num_cpus != int(num_cpus) or num_cpus < 1:
        raise UserError(f"num_cpus: expected a whole number of CPUs >= 1 (--num-cpus), got {num_cpus}")
    if not num_gpus >= 0:
        raise UserError(f"num_gpus: expected >= 0 (--num-gpus), got {num_gpus}")
    if num_gpus > 0:
        import torch

        if not torch.cuda.is_available():
            raise UserError(f"num_gpus: --num-gpus {num_gpus} per node asks for GPUs, but torch sees no CUDA GPU "
                            f"here; leave it at 0 to simulate the nodes on the CPU")


def check_app_dir() -> None:
    """``UserError`` when the Flower app folder of a source checkout is missing."""
    if not (APP_DIR / "pyproject.toml").is_file():
        raise UserError(f"fedhello flower: the Flower app folder {APP_DIR} is missing (it ships with a source "
                        f"checkout of fedhello; use fedhello run, or flwr run with your own app folder)")


def run_simulation(workdir: Path, run_config: str, nodes: int, num_cpus: int = 1, num_gpus: float = 0.0) -> int:
    """``flwr run`` of ``APP_DIR`` with the Flower run config ``run_config`` (``key=value ...``) against a
    private SuperLink in simulation mode with ``nodes`` virtual nodes of ``num_cpus`` CPUs and
    ``num_gpus`` GPUs each; returns ``flwr run``'s exit status. ``workdir`` (an empty temporary
    folder) receives the SuperLink's ``FLWR_HOME`` and log. No process started here outlives the call.
    """
    bin_dir = Path(sys.executable).parent
    home, port = workdir / "flwr-home", free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fedhello"\n\n[superlink.fedhello]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    # The SuperLink starts flower-superexec, flwr-simulation ... by name: this environment's first.
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = workdir / "superlink.log"
    with open(log, "wb") as sink:
        superlink = subprocess.Popen(
            [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1",
             "--port", str(port), "--disable-runtime-dependency-installation"],
            cwd=workdir, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_healthy(superlink, port, log)
        federation = (f"num-supernodes={nodes} client-resources-num-cpus={int(num_cpus)} "
                      f"client-resources-num-gpus={float(num_gpus)}")
        done = subprocess.run([str(bin_dir / "flwr"), "run", str(APP_DIR), "fedhello", "--stream",
                               "--run-config", run_config, "--federation-config", federation],
                              cwd=workdir, env=env)
    except BaseException as err:  # Ctrl-C stops at once: the run keeps its last checkpoint (written atomically)
        stop_all(superlink, str(home), grace=STOP_GRACE_S if isinstance(err, KeyboardInterrupt) else 20.0)
        raise
    stop_all(superlink, str(home))
    return done.returncode
