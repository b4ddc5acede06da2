"""The cloud halves on Ray Serve (``coach serve --engine ray``): coach's own server stays the
front door and hands each batch to a replica of a Ray Serve deployment.

Why the front door stays ours: the ends speak coach's binary protocol over TCP with a token
and optional TLS, one session each with backpressure, and every frame is validated before
anything is allocated (``runtime.wire``). Ray's HTTP ingress would change that protocol and
its checks. So the server accepts, authenticates and batches per plan as with the built-in
engine; only the compute goes through deployment handles. Between the front door and the
replicas travel request bytes (validated again by the replica's decoder), arrival figures and
reply bytes: no object an end sent is ever rebuilt. The replicas load the plan directory
themselves and verify it with the token (on a cluster the directory must be readable on every
node, e.g. a shared file system).

Ray Serve places the replicas on any node of the cluster (``RaySettings.address``; None
starts a local instance), restarts a replica that dies, and autoscales on requests in flight
(``RaySettings.autoscale``). A batch whose replica died is submitted again (``RETRIES``); if
it still fails, each of its requests gets an error reply, which an end with
``fallback="local"`` answers on its device: no request is lost.

Example::

    >>> server = coach_fx.serve("plan_dir", port=0, token=token, engine="ray",
    ...                         ray=RaySettings(replicas=2))                      # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from coach_fx.runtime.cloud import Arrival, CloudHalf, CloudWorker, error_reply_to
from coach_fx.runtime.compute import Replies
from coach_fx.runtime.config import RaySettings, StreamConfig

log = logging.getLogger("coach_fx.runtime")

#: Times a batch is submitted again after its replica failed (Ray Serve routes it to a live one).
RETRIES = 3
#: Seconds a replica may take for one batch before its requests get error replies.
BATCH_TIMEOUT_S = 120.0


class RayUnavailable(RuntimeError):
    """``--engine ray`` without Ray Serve installed, or a Ray cluster that cannot be reached."""


class CloudReplica:
    """One replica of the deployment: the plan directory's cloud halves in a ``CloudWorker``.

    Its arguments are plain values (a path, the token, a slowdown, a flag, torch threads, a
    device name)."""

    def __init__(self, plan_dir: str, key: bytes | None, cloud_slowdown: float, adaptive: bool,
                 threads: int, device: str) -> None:
        from coach_fx.deploy import open_plan
        if threads:   # as many torch threads as the CPUs Ray reserved for it (not every core)
            torch.set_num_threads(threads)
        halves = open_plan(plan_dir, "cloud", key=key).cloud
        self.worker = CloudWorker(dict(halves), None, StreamConfig(cloud_slowdown=cloud_slowdown),
                                  adaptive=adaptive, device=device)
        self.worker.warm_up()

    def run(self, msgs: list[bytes], arrivals: list[tuple[float, float, int]]) -> tuple[list[bytes | None], int, int]:
        """A batch's replies, and the runs of a cloud half and the bad frames it took."""
        calls, rejected = self.worker.calls, self.worker.rejected
        replies = self.worker.handle_batch([(m, Arrival(w, t, k)) for m, (w, t, k) in zip(msgs, arrivals)])
        return ([bytes(r) if r is not None else None for r in replies],
                self.worker.calls - calls, self.worker.rejected - rejected)

    def pid(self) -> int:
        """This replica's process id (tests kill it to see a replica restarted)."""
        return os.getpid()


@contextmanager
def _working_dir(path: str) -> Iterator[None]:
    was = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(was)


def _serve_module():  # noqa: ANN202 - ray.serve, imported only here (an optional extra)
    try:
        from ray import serve
    except ImportError:
        raise RayUnavailable("--engine ray needs Ray Serve: pip install 'coach-fx[ray]' "
                             "(or pip install 'ray[serve]')") from None
    return serve


class RayCompute:
    """The ``runtime.compute.Compute`` engine on Ray Serve: batches go to the replicas of one
    deployment named ``name``; up to ``inflight_per_replica`` × max replicas out at once."""

    def __init__(self, plan_dir: str, key: bytes | None, halves: dict[int, CloudHalf],
                 config: StreamConfig, ray: RaySettings, *, adaptive: bool = False, name: str = "coach",
                 device: str = "cpu") -> None:
        if device.split(":")[0] not in ("cpu", "cuda"):   # checked here: the replicas may have a GPU, not this node
            raise ValueError(f"a cloud device is 'cpu' or 'cuda[:N]', got {device!r}")
        serve = _serve_module()
        import ray as ray_module
        self.plans = halves
        self.max_batch = config.batching.max_batch
        self.parallelism = ray.inflight_per_replica * ray.max_replicas
        self.rejected = self.calls = 0
        self.name = name
        self._started_ray = not ray_module.is_initialized()
        if self._started_ray:
            try:
                # Ray puts the driver's working directory first on its workers' import path: run
                # from a source checkout, its coach_fx/ folder (without runtime/, which the
                # install maps into the package) would shadow the installed package there
                with _working_dir(tempfile.gettempdir()):
                    ray_module.init(address=ray.address, include_dashboard=False, log_to_driver=False,
                                    logging_level=logging.WARNING)
            except Exception as e:  # noqa: BLE001 - named for the user: which cluster, why
                raise RayUnavailable(f"cannot start or reach Ray at {ray.address or 'a local instance'}: "
                                     f"{type(e).__name__}: {e}") from None
        logging.getLogger("ray.serve").setLevel(logging.ERROR)   # one line per dead replica per request otherwise
        scaling = ({"autoscaling_config": {"min_replicas": ray.autoscale[0], "max_replicas": ray.autoscale[1],
                                           "target_ongoing_requests": ray.inflight_per_replica}}
                   if ray.autoscale else {"num_replicas": ray.replicas})
        deployment = serve.deployment(CloudReplica, name=f"{name}-cloud").options(
            ray_actor_options={"num_cpus": ray.cpus_per_replica,   # a GPU each for a CUDA cloud half
                               "num_gpus": 1 if device.startswith("cuda") else 0},
            max_ongoing_requests=ray.inflight_per_replica, **scaling)
        threads = max(1, round(ray.cpus_per_replica)) if ray.cpus_per_replica else 0
        try:
            serve.start(http_options={"location": "NoServer"})   # the front door is coach's server
            self.handle = serve.run(deployment.bind(str(Path(plan_dir).resolve()), key, config.cloud_slowdown,
                                                    adaptive, threads, device), name=name, route_prefix=None)
        except BaseException:
            if self._started_ray:   # nothing of this engine outlives its failure
                serve.shutdown()
                ray_module.shutdown()
            raise

    def warm_up(self) -> None:
        """Nothing here: each replica warms its halves up before it takes requests."""

    def shared_batch(self) -> int:
        """``max_batch``: the replicas' costs are not measured here (several run at once)."""
        return self.max_batch

    def submit(self, msgs: Sequence[tuple[bytes, Arrival]]) -> Replies:
        raw = [bytes(m) for m, _ in msgs]
        arrivals = [(a.wire_s, a.at_s, a.ends) for _, a in msgs]
        first = self.handle.run.remote(raw, arrivals)

        def replies() -> list[bytes | None]:
            response, tries = first, 0
            while True:
                try:
                    out, calls, rejected = response.result(timeout_s=BATCH_TIMEOUT_S)
                    self.calls += calls
                    self.rejected += rejected
                    return out
                except Exception as e:  # noqa: BLE001 - a dead or stuck replica: again, then errors
                    tries += 1
                    if tries > RETRIES:
                        log.error("coach cloud: a batch of %d failed on %d replicas: %s: %s",
                                  len(raw), tries, type(e).__name__, e)
                        failed = RuntimeError(f"the cloud's replicas failed this request: {type(e).__name__}")
                        return [error_reply_to(m, failed) for m in raw]
                    log.warning("coach cloud: a replica failed a batch (%s); submitting it again",
                                type(e).__name__)
                    response = self.handle.run.remote(raw, arrivals)
        return replies

    def replica_pids(self, tries: int = 20) -> set[int]:
        """The process ids of the replicas that answer ``tries`` calls."""
        return {self.handle.pid.remote().result(timeout_s=BATCH_TIMEOUT_S) for _ in range(tries)}

    def close(self) -> None:
        """Delete the deployment (and stop Ray where this engine started it)."""
        serve = _serve_module()
        try:
            serve.delete(self.name)
        except Exception as e:  # noqa: BLE001 - closing never raises
            log.warning("coach cloud: deleting the Ray Serve application failed: %s", e)
        if self._started_ray:
            import ray as ray_module
            serve.shutdown()
            ray_module.shutdown()


__all__ = ["CloudReplica", "RayCompute", "RayUnavailable", "RETRIES"]
