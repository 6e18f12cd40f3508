"""One Prefect task per pipeline step, each a thin wrapper over `incompat.steps`.

Caching: a task's key is its inputs (the parameter group it reads and the digests of the files it reads, so a
changed upstream file is a changed input), its own source and the engine's source (a change to, say, ispl.py
invalidates every cached cluster result). Results are small dicts: counts, paths and digests, never tensors.
Before a cached result is trusted, the flow checks that the files it names still hold those digests
(`outputs_intact`); if not, the step runs again. Retries are for I/O errors only: bad data fails at once.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from incompat import steps
from incompat.config import IngestParams, Params
from incompat.ispl import DefenseConfig
from incompat.training import TrainConfig

STEP_VERSION = "1"



class EngineSource(CachePolicy):
    """The hash of the engine's sources: the task wrappers are thin, the arithmetic lives in incompat/."""

    def compute_key(self, task_ctx, inputs, flow_parameters, **kwargs):
        from incompat.lineage import code_version

        return code_version()["engine_sha256"]


STEP_CACHE = INPUTS - "run_context" - "progress" + TASK_SOURCE + EngineSource()


def _io_error(task, task_run, state) -> bool:
    """Retry a step only when it failed on I/O (a busy disk, a network file system); bad data fails at once."""
    from incompat.data import DataError

    try:
        state.result()
    except DataError:
        return False
    except OSError:
        return True
    except Exception:
        return False
    return False


def _step(name: str):
    # JSON, not pickle: a cached result is read back from disk, and reading it must not be able to run code
    return task(name=name, version=STEP_VERSION, cache_policy=STEP_CACHE, persist_result=True,
                result_serializer="json", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_io_error)


@_step("ingest")
def ingest(root: str, flat: bool, ingest_params: dict, sources: list[str], source_digests: list[str],
           test_source: str | None, test_digest: str | None, subset: int | None) -> dict:
    known = dict(zip(sources, source_digests))
    if test_source and test_digest:
        known[test_source] = test_digest
    return steps.run_ingest(steps.Layout(root, flat), IngestParams(**ingest_params), sources, test_source, subset,
                            known_digests=known)


@_step("poison")
def poison(root: str, flat: bool, scenario: str, train_digest: str, test_digest: str | None) -> dict:
    return steps.run_poison(steps.Layout(root, flat), scenario)


@_step("cluster")
def cluster(root: str, flat: bool, defense: dict, profile: str, dataset_digest: str, truth: str | None,
            truth_digest: str | None, progress: bool = False) -> dict:
    params = Params(defense=DefenseConfig.from_dict(defense), profile=profile)
    return steps.run_cluster(steps.Layout(root, flat), params, truth=truth, progress=progress)


@_step("filter")
def filter_samples(root: str, flat: bool, defense: dict, profile: str, dataset_digest: str, scores_digest: str,
                   truth: str | None, truth_digest: str | None, run_context: dict | None = None) -> dict:
    params = Params(defense=DefenseConfig.from_dict(defense), profile=profile)
    return steps.run_filter(steps.Layout(root, flat), params, truth=truth, run_context=run_context)


@_step("retrain")
def retrain(root: str, flat: bool, train: dict, clean_digest: str, poisoned_digest: str,
            progress: bool = False) -> dict:
    return steps.run_retrain(steps.Layout(root, flat), Params(train=TrainConfig.from_dict(train)), progress=progress)


@_step("evaluate")
def evaluate(root: str, flat: bool, model_digests: list[str], test_digests: list[str]) -> dict:
    return steps.run_evaluate(steps.Layout(root, flat), Params())


@_step("report")
def report(root: str, flat: bool, input_digests: list[str], params_path: str | None, title: str | None = None,
           truth: str | None = None, truth_digest: str | None = None) -> dict:
    return steps.run_report(steps.Layout(root, flat), Path(params_path) if params_path else None, title=title,
                            truth=Path(truth) if truth else None)


def outputs_intact(result: dict) -> bool:
    """The files a (possibly cached) result names still exist with the recorded digests."""
    from incompat.data import DataError, read_metadata
    from incompat.lineage import file_sha256

    for ref in result.get("outputs", []):
        path = Path(ref["abs"])
        if not path.exists():
            return False
        try:
            digest = read_metadata(path)["dataset_digest"] if ref["kind"] == "dataset" else file_sha256(path)
        except (DataError, OSError, KeyError):
            return False
        if digest != ref["digest"]:
            return False
    return True


def digest_of(result: dict, role: str) -> str | None:
    return next((ref["digest"] for ref in result.get("outputs", []) if ref["role"] == role), None)
