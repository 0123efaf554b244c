"""The submitit executors every submission of the launcher goes through (a grid's stages in
`submit`, the prepare jobs in `prepare_jobs`), and the one-line error of a failed sbatch."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import submitit

from bench.launch.profiles import Profile, SchedulerError


def _check_slurm_client() -> None:
    conf = os.environ.get("SLURM_CONF")
    if conf and not Path(conf).is_file():
        raise SchedulerError(f"SLURM_CONF={conf} does not exist; unset it or point it at the cluster's slurm.conf "
                             "(for the local test cluster: eval \"$(slurm/local-cluster.sh start)\")")
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise SchedulerError("sbatch/srun not found: this machine is not a SLURM client; use --local or --debug, "
                             "or install slurm-wlm and start slurm/local-cluster.sh")


def make_executor(kind: str, folder: Path, profile: Profile, res: dict, name: str) -> submitit.AutoExecutor:
    """A submitit AutoExecutor of `kind` (slurm, local, debug) with the profile's and the job's parameters."""
    if kind == "slurm":
        _check_slurm_client()
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=profile.max_num_timeout)
        params: dict[str, Any] = {"slurm_signal_delay_s": profile.signal_delay_s,
                                  "slurm_array_parallelism": profile.array_parallelism,
                                  "nodes": res["nodes"], "cpus_per_task": res["cpus_per_task"]}
        params.update({f"slurm_{k}": getattr(profile, k) for k in ("partition", "account", "qos", "constraint")
                       if getattr(profile, k)})
        if res["gpus_per_node"]:
            params["gpus_per_node"] = res["gpus_per_node"]
        if res["mem_gb"]:
            params["mem_gb"] = float(res["mem_gb"])
        if profile.setup:
            params["slurm_setup"] = list(profile.setup)
        if profile.additional_parameters:
            params["slurm_additional_parameters"] = dict(profile.additional_parameters)
    elif kind == "local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local", local_max_num_timeout=profile.max_num_timeout)
        params = {"gpus_per_node": res["gpus_per_node"]} if res["gpus_per_node"] else {}
        if profile.setup:
            params["local_setup"] = list(profile.setup)
    else:
        executor, params = submitit.AutoExecutor(folder=folder, cluster="debug"), {}
    executor.update_parameters(name=name, timeout_min=res["timeout_min"], tasks_per_node=res["tasks_per_node"],
                               **params)
    return executor


def scheduler_error(what: str, profile: Profile, err: BaseException) -> SchedulerError:
    """One line for a failed sbatch: what, the profile, SLURM_CONF, sbatch's own error, the likely fix."""
    return SchedulerError(f"{what} to SLURM (profile {profile.name}, SLURM_CONF="
                          f"{os.environ.get('SLURM_CONF', 'unset')}): {_sbatch_error(err)}. Is the controller "
                          "running and reachable? (local test cluster: slurm/local-cluster.sh start)")


def _sbatch_error(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    useful = [ln for ln in lines if "error" in ln.lower() and not ln.startswith("Command")]
    return (useful or lines or [type(err).__name__])[-1][:400]
