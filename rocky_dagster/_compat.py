"""Every use of Dagster's private API, in one place: what a Dagster upgrade can break.

rocky_dagster uses Dagster's public API everywhere else. What follows has no public equivalent
in Dagster 1.12 or 1.13; each item says why it is needed and what it reaches. Tested on Dagster
1.12.22 and 1.13.29. When upgrading Dagster, this file is the checklist.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dagster import DagsterEvent, DagsterInstance, DagsterRun, Failure, Out, RetryRequested

# The only hook decorator that sees the step's events, so one hook settles either outcome:
# `success_hook` + `failure_hook` would be two hooks, hence two hook events per step.
from dagster._core.definitions.decorators.hook_decorator import event_list_hook

# What `define_asset_job` returns; dagster exports the function but not its return type, and
# `with_ledger` must recognise it to add hooks.
from dagster._core.definitions.unresolved_asset_job_definition import (
    UnresolvedAssetJobDefinition,
)

# `report_engine_event` takes its metadata wrapped in this record, and a step that yields no
# output (a skip) can carry its decision's metadata only on an engine event; dagster exports no
# public constructor for it.
from dagster._core.events import EngineEventData

# `UnresolvedAssetJobDefinition` is an immutable record with no `with_hooks`; this is how
# Dagster itself copies one with a field replaced.
from dagster_shared.record import copy as copy_record

__all__ = [
    "UnresolvedAssetJobDefinition",
    "add_run_tags",
    "asset_job_with_hooks",
    "carry_job_key_fn",
    "copy_record",
    "event_list_hook",
    "event_metadata",
    "job_key_fn",
    "job_nodes",
    "keyed_hook",
    "node_claim_subjects",
    "optional_out",
    "report_engine_event",
    "run_worker_process",
    "step_exception",
    "step_key",
    "will_retry",
]


def _step_context(op_ctx: Any) -> Any:
    # `OpExecutionContext.get_step_execution_context()` is undocumented (Dagster marks it
    # internal); it is the only way to the step key, the step's retry policy and the exception
    # Dagster captured for the step.
    return op_ctx.get_step_execution_context()


def step_key(op_ctx: Any) -> str:
    """The running step's key (an op's handle; an asset's op name). No public accessor exists."""
    return str(_step_context(op_ctx).step.key)


def will_retry(op_ctx: Any, exc: BaseException) -> bool:
    """Whether Dagster will run this step again in the same run after `exc`.

    Reads `retry_mode` and `op_retry_policy` of the step execution context (private
    attributes): the public `RetryPolicy` is on the definition, but a job-level
    `op_retry_policy` and the run's retry mode are only known to the step context.
    """
    step = _step_context(op_ctx)
    if step.retry_mode.disabled:  # DEFERRED (a multiprocess step process): its engine retries
        return False
    attempt = op_ctx.retry_number
    if isinstance(exc, RetryRequested):
        return attempt < exc.max_retries
    if isinstance(exc, Failure) and not exc.allow_retries:
        return False
    if not isinstance(exc, Exception):
        return False
    policy = step.op_retry_policy
    return policy is not None and attempt < policy.max_retries


def step_exception(op_ctx: Any) -> BaseException | None:
    """The exception Dagster recorded for the step (`step_exception`, a private attribute).

    When storing an output fails, the wrapper's generator is closed without being told why;
    this is the only place the reason (and so whether a retry follows) can be read.
    """
    return _step_context(op_ctx).step_exception


def add_run_tags(instance: DagsterInstance, run_id: str, tags: Mapping[str, str]) -> None:
    # `DagsterInstance.add_run_tags` is not part of Dagster's documented API (the UI and the
    # GraphQL layer use it), but it is the only way to tag a run after it started.
    instance.add_run_tags(run_id, dict(tags))


def report_engine_event(
    instance: DagsterInstance,
    message: str,
    run: DagsterRun,
    metadata: Mapping[str, Any],
    step_key: str | None,
) -> None:
    # `report_engine_event` is undocumented; with `EngineEventData` (above) it is the only way to
    # put a step-scoped event with metadata (a run link) in the run's log without an output.
    instance.report_engine_event(
        message, run, EngineEventData(metadata=dict(metadata)), step_key=step_key
    )


def event_metadata(event: DagsterEvent) -> Mapping[str, Any]:
    """The metadata a step attached to one of its events (output, engine event, observation,
    check evaluation, materialization), or {}.

    `event_specific_data` is public on `DagsterEvent`, but its record types are not exported, so
    their fields are read by name.
    """
    data = event.event_specific_data
    if data is None:
        return {}
    for path in (("metadata",), ("asset_observation", "metadata"), ("materialization", "metadata")):
        value: Any = data
        for attr in path:
            value = getattr(value, attr, None)
            if value is None:
                break
        if isinstance(value, Mapping):
            return value
    return {}


def asset_job_with_hooks(target: UnresolvedAssetJobDefinition, hooks: Any) -> Any:
    """`define_asset_job`'s result with `hooks` added (it has no public `with_hooks`)."""
    return copy_record(target, hooks={*(target.hooks or set()), *hooks})


def optional_out(out: Out) -> Out:
    # `Out` is a NamedTuple in Dagster 1.12/1.13 (`_replace` is the NamedTuple API): copying it
    # field by field would drop fields later Dagster versions add.
    return out._replace(is_required=False)


def asset_children(context: Any, key: Any) -> set[Any]:
    """The asset keys directly downstream of `key` in the running job's asset graph.

    `job_def` is public; its asset layer's `asset_graph` (and a node's `child_keys`) is not,
    and is the only place the graph's edges are known inside a step (there may be no
    repository, e.g. under `materialize()`).
    """
    graph = context.job_def.asset_layer.asset_graph
    if not graph.has(key):
        return set()
    return set(graph.get(key).child_keys)


def run_asset_selection(context: Any) -> set[Any]:
    """The assets the running job materializes (a run's `asset_selection` is empty when the
    whole job runs, e.g. under `materialize()`); the job's asset layer is not public."""
    selection = context.run.asset_selection
    if selection:
        return set(selection)
    return set(context.job_def.asset_layer.selected_asset_keys)


def run_worker_process(run_id: str) -> Any | None:
    """The run worker of `run_id` (a `multiprocessing` parent process), when this process is the
    multiprocess executor's step process of that run; None otherwise (the step runs in the run
    worker itself, or in a process some other executor started).

    Dagster starts each step with `multiprocessing` (spawn by default, or forkserver)
    running its `MultiprocessExecutorChildProcessCommand`; the step process's own `Process`
    object (`current_process()`) keeps that command in its `_args`, which is the only sign, in
    the step, that its parent is the run worker. `multiprocessing.parent_process()` is public:
    its `pid` is the process that started the step (the run worker, under forkserver too) and
    its `is_alive()` watches a pipe that the run worker's death closes.
    """
    import multiprocessing

    parent = multiprocessing.parent_process()
    if parent is None:
        return None
    try:
        from dagster._core.executor.multiprocess import MultiprocessExecutorChildProcessCommand
    except ImportError:  # pragma: no cover - moved in a later Dagster: no worker check
        return None
    for arg in getattr(multiprocessing.current_process(), "_args", None) or ():
        if isinstance(arg, MultiprocessExecutorChildProcessCommand):
            run = getattr(arg, "dagster_run", None)
            return parent if getattr(run, "run_id", None) == run_id else None
    return None


# --- a job's key_fn, carried by the job definition itself -------------------------------------
#
# Dagster has no public slot for a Python object on a job: tags and metadata must serialize.
# `ledger_job` owns the graph it builds, so the key_fn rides on that graph object (every copy of
# the job — resources bound, hooks added, `execute_in_process` — keeps its graph); `with_ledger`
# attaches the ledger hook anyway, so there it rides on that hook's function (asset jobs have no
# graph until Definitions resolve them). A subset job is reached from its parent, through the
# selection data (not public) Dagster keeps for the run's lineage.

_KEY_FN_ATTR = "rocky_dagster_key_fn"


def carry_job_key_fn(graph: Any, key_fn: Any) -> None:
    """Make `graph` (a graph `ledger_job` built or copied for one job) carry the job's key_fn."""
    setattr(graph, _KEY_FN_ATTR, key_fn)


class _KeyedHookFn:
    """A hook function that also carries a job's key_fn (see `keyed_hook`)."""

    def __init__(self, fn: Any, key_fn: Any) -> None:
        self.fn = fn
        setattr(self, _KEY_FN_ATTR, key_fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


def keyed_hook(hook: Any, key_fn: Any) -> Any:
    """`hook` (a `HookDefinition`, a NamedTuple) whose function carries `key_fn`."""
    return hook._replace(hook_fn=_KeyedHookFn(hook.hook_fn, key_fn))


def job_key_fn(job_def: Any) -> Any | None:
    """The key_fn carried by `job_def`, its hooks, or the job it is a subset of; else None."""
    job = job_def
    while job is not None:
        carried = getattr(job.graph, _KEY_FN_ATTR, None)
        for hook in job.hook_defs:
            carried = carried or getattr(hook.hook_fn, _KEY_FN_ATTR, None)
        if carried is not None:
            return carried
        selection = job.op_selection_data or job.asset_selection_data
        job = selection.parent_job_def if selection is not None else None
    return None


def job_nodes(job: Any) -> list[tuple[Any, Any]]:
    """(handle, op definition) of every op of `job`, nested graphs included."""
    return [
        (handle, job.graph.get_node(handle).definition)
        for handle in job.graph.iterate_node_handles()
    ]


def node_claim_subjects(job: Any, handle: Any) -> list[Any]:
    """The asset and check keys the op at `handle` materializes in `job` (the job's asset layer
    is not public; it is where Dagster keeps which assets each op produces)."""
    return sorted(
        job.asset_layer.get_selected_entity_keys_for_node(handle),
        key=lambda k: k.to_user_string(),
    )
