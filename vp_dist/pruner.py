"""VariancePruner: the one stateful orchestrator of Variance Pruning.

It owns the meters, the masks and the schedule position; it composes the pure pieces (stats,
selection, squeeze) with two pluggable collaborators that carry everything distributed:

- a reducer, which sums the step buffer over the data-parallel group and checks that all ranks
  hold the same masks (`vp_dist.distributed.reducer`; a no-op on one process), and
- a parameter store, which writes pruned rows wherever the parameter lives (`masking`).

Given a DeepSpeed engine, both default to the engine's data-parallel group and ZeRO state. Under
DeepSpeed AutoTP (tensor parallelism) the meters and masks stay global (full rows); each rank
observes and writes only its shard (`LayerShard`, from `distributed.zero`) and the reducer spans
all tp x dp ranks; the squeeze shards the squeezed layers itself (`distributed.tp_squeeze`). Build
the pruner after `deepspeed.initialize`: AutoTP replaces the layers there.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from . import adapters
from .config import VPConfig
from .masking import GradientMask, ParameterStore, TorchParameterStore, ensure_bias
from .schedule import PruningSchedule
from .selection import select_rows
from .squeeze import ParamOrigin, squeeze_model
from .stats import MeterLayout, MeterState, MomentWorkspace, StepSums, update_meters
from .stats_log import DroppedSteps

logger = logging.getLogger(__name__)

STATE_VERSION = 1


class LocalReducer:
    """Single process: the local sums are the global sums."""

    def sum_(self, flat: torch.Tensor) -> None:
        pass

    def sum_async(self, flat: torch.Tensor) -> None:
        return None

    def check_identical(self, kept: torch.Tensor) -> None:
        pass


@dataclass
class PruneEvent:
    step: int
    target_sparsity: float
    sparsity: dict[str, float]              # projection type -> fraction of rows pruned
    kept_rows: dict[str, int]               # module name -> rows kept
    newly_pruned: int
    ewmv: torch.Tensor = field(repr=False)  # [D] float64 snapshot at this pruning
    window_mean: torch.Tensor = field(repr=False)
    dropped_steps: int = 0                  # steps of this window dropped as non-finite

    def to_json(self) -> dict:
        out = asdict(self)
        out.pop("ewmv"), out.pop("window_mean")
        return out


def prepare_model(model: nn.Module, config: VPConfig | None = None) -> nn.Module:
    """Give every prunable layer a bias (zero: same function), so a pruned row can hold its mean.

    Call it before building the optimizer or DeepSpeed engine; VariancePruner(model) calls it too.
    """
    families = config.families if config is not None else ()
    for layer in adapters.prunable_layers(model, families):
        ensure_bias(layer.module)
    return model


def _is_engine(obj) -> bool:
    return hasattr(obj, "module") and hasattr(obj, "optimizer") and hasattr(obj, "global_steps")


class VariancePruner:
    """Variance Pruning of a Hugging Face model or a DeepSpeed engine wrapping one.

    Build it before the optimizer (it gives bias-free layers a zero bias). Per optimizer step:
    run each forward pass inside `observe(attention_mask)`, then call `step(optimizer)` once after
    `optimizer.step()` (with an engine: after every `engine.step()`; it acts once per optimizer step).
    """

    def __init__(self, model: nn.Module, config: VPConfig | None = None, *, reducer=None,
                 store: ParameterStore | None = None):
        self.config = config or VPConfig()
        self.engine = model if _is_engine(model) else None
        self.model = model.module if self.engine is not None else model
        if self.engine is not None and (reducer is None or store is None):
            from .distributed import engine_collaborators  # deferred: deepspeed is heavy to import
            default_reducer, default_store = engine_collaborators(self.engine)
            reducer, store = reducer or default_reducer, store or default_store
        elif self.config.squeeze_at_target:
            raise ValueError("VPConfig.squeeze_at_target needs a DeepSpeed engine; for a plain model "
                             "call pruner.squeeze() and build a new optimizer for the smaller model")
        self.reducer = reducer or LocalReducer()
        self._store = store
        self.schedule = PruningSchedule.from_config(self.config)

        self.layers = adapters.prunable_layers(self.model, self.config.families)
        self.folds = adapters.fold_sites(self.model, self.config.families)
        # Under tensor parallelism (AutoTP), what this rank holds and observes of each layer.
        self.shards = None
        if self.engine is not None:
            from .distributed import engine_layer_shards
            self.shards = engine_layer_shards(layer.module for layer in self.layers)
        if self.engine is not None and any(layer.module.bias is None for layer in self.layers):
            raise ValueError("the engine's model has prunable layers without a bias, which the optimizer "
                             "would not know: call vp_dist.prepare_model(model) before deepspeed.initialize")
        prepare_model(self.model, self.config)
        # ZeRO-3 keeps a partitioned weight's logical shape in `ds_shape`.
        if self.shards is None:
            self.layout = MeterLayout(tuple(getattr(layer.module.weight, "ds_shape", layer.module.weight.shape)[0]
                                            for layer in self.layers))
        else:
            self.layout = MeterLayout(tuple(shard.full_rows for shard in self.shards))
        device = self.layers[0].module.weight.device
        dtype = getattr(torch, self.config.stats_dtype)
        self.row_layer = self.layout.row_layer(device)
        if self.shards is None:
            workspace = MomentWorkspace(self.layout)  # the hooks' fp32 partials, shared by both
            # filled by the hooks; last step's, being all-reduced
            self.step_sums = StepSums(self.layout, device, dtype, deferred=True, workspace=workspace)
            self._reduced_sums = StepSums(self.layout, device, dtype, deferred=True, workspace=workspace)
        else:
            self._init_sharded_collection(device, dtype)
        self._meters = MeterState.zeros(self.layout, device, dtype)
        self._pending_reduction = None  # (work handle or None) while _reduced_sums awaits its update
        self._shift_known = False       # False until a first step has been folded into the meters
        self.skipped_steps = 0          # optimizer steps the loss scaler skipped (no observation)
        self.dropped = DroppedSteps([layer.name for layer in self.layers], self.config.warn_dropped_steps)
        self.kept = torch.ones(self.layout.total_rows, dtype=torch.bool, device=device)
        self.type_rows = self._rows_by_type()
        self.steps_done = 0
        self.events: list[PruneEvent] = []
        self.squeezed = False
        self.tensor_parallel_squeezed = 0  # the TP size once squeezed into tensor-parallel layers (tp x dp engine)
        self._engine_steps_seen = self.engine.global_steps if self.engine is not None else None
        self._valid: torch.Tensor | None = None
        self._num_valid: torch.Tensor | None = None
        self._observing = False
        self._grad_masks: dict[int, GradientMask] = {}
        self._hook_handles = []
        self._attach_hooks()

    # ------------------------------------------------------------------ collection (SPEC 1)
    def _init_sharded_collection(self, device, dtype) -> None:
        """Tensor parallelism: the hooks fill a local buffer of the rows this rank observes; each
        step it is placed into the global flat layout (zeros elsewhere) and the world all-reduce
        then holds every row and token count exactly once, as on one rank.

        Column-parallel layers: this rank's slice of rows; row-parallel layers (full output on every
        TP rank): TP rank 0 alone; token counts: TP rank 0 alone (a TP group reads one batch).
        """
        observed = [shard.observed or slice(0, 0) for shard in self.shards]
        local_layout = MeterLayout(tuple(rows.stop - rows.start for rows in observed))
        self.step_sums = StepSums(local_layout, device, dtype, deferred=True)
        self._reduced_sums = StepSums(self.layout, device, dtype, deferred=True)
        self._observed_rows = torch.cat([torch.arange(offset + rows.start, offset + rows.stop, device=device)
                                         for offset, rows in zip(self.layout.offsets, observed)])
        L, D, d = self.layout.num_layers, self.layout.total_rows, local_layout.total_rows
        counted = torch.tensor([i for i, shard in enumerate(self.shards) if shard.counts_tokens],
                               dtype=torch.long, device=device)
        local_rows = torch.arange(d, device=device)
        self._local_positions = torch.cat([counted, L + local_rows, L + d + local_rows])
        self._global_positions = torch.cat([counted, L + self._observed_rows, L + D + self._observed_rows])
        self._collection_shift = torch.zeros(D, dtype=torch.float32, device=device)

    def _begin_collection(self, shift: torch.Tensor, centre_each_batch: bool) -> None:
        """Start filling the step sums with the global shift [D] (its observed rows under TP)."""
        if self.shards is None:
            self.step_sums.begin(shift, centre_each_batch)
            return
        self._collection_shift.copy_(shift)
        self.step_sums.begin(self._collection_shift[self._observed_rows], centre_each_batch)

    @property
    def _collection_shift_global(self) -> torch.Tensor:
        return self.step_sums.shift if self.shards is None else self._collection_shift

    def held_kept(self, index: int) -> torch.Tensor:
        """Bool kept mask of the output rows this rank's weight holds: the layer's mask, or under
        tensor parallelism this rank's slice of it for column-parallel layers."""
        kept = self.layer_kept(index)
        return kept if self.shards is None else kept[self.shards[index].held]

    def _rows_by_type(self) -> dict[str, torch.Tensor]:
        rows: dict[str, list[torch.Tensor]] = {}
        for index, (layer, offset) in enumerate(zip(self.layers, self.layout.offsets)):
            rows.setdefault(layer.projection_type, []).append(
                torch.arange(offset, offset + self.layout.sizes[index], device=self.kept.device))
        return {t: torch.cat(r) for t, r in rows.items()}

    def _attach_hooks(self) -> None:
        for index, layer in enumerate(self.layers):
            self._hook_handles.append(layer.module.register_forward_hook(self._make_hook(index)))
        for index, mask in list(self._grad_masks.items()):
            self._grad_masks[index] = GradientMask(self.layers[index].module.weight)
            self._grad_masks[index].update(self.held_kept(index))

    def _detach_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        for mask in self._grad_masks.values():
            mask.remove()

    def _make_hook(self, index: int):
        if self.shards is not None and self.shards[index].observed is None:
            return lambda module, inputs, output: None  # another TP rank observes this layer
        # A closure, not a bound method: deepcopy of a model must never copy the pruner.
        def hook(module, inputs, output):
            if not self._observing:
                return
            # A forward inside backward (activation checkpointing recomputes, reentrant or not)
            # runs within an autograd graph task: those outputs were counted when first computed.
            # Left out while Dynamo traces (it would break the graph): a traced hook's update is an
            # input mutation of the compiled forward, and checkpointed blocks run eagerly (README).
            if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
                return
            self.step_sums.accumulate(index, output, self._valid, self._num_valid)
        return hook

    @property
    def collecting(self) -> bool:
        """Statistics are gathered until the final pruning; after it they would serve nothing."""
        return not self.schedule.is_finished(self.steps_done) and not self.squeezed

    @contextlib.contextmanager
    def observe(self, attention_mask: torch.Tensor | None = None):
        """Count this forward pass's valid tokens (attention_mask == 1) in the current observation.

        Several `observe` blocks before one `step` (gradient accumulation) form one observation.
        """
        if not self.collecting:
            yield
            return
        if attention_mask is not None:
            valid = attention_mask.reshape(-1).to(self.step_sums.buffer.device) == 1
            self._valid = valid.to(torch.float32)
            self._num_valid = valid.sum()
        else:
            self._valid = self._num_valid = None
        self._observing = True
        try:
            yield
        finally:
            self._observing = False
            self._valid = self._num_valid = None
            self.step_sums.end_forward()

    @property
    def meters(self) -> MeterState:
        """The meters, up to date with every step closed so far (waits for a pending reduction)."""
        self._fold_reduced_sums()
        return self._meters

    def _close_observation(self) -> None:
        """Hand this step's sums to the reducer and start the next step's; no host synchronisation.

        The all-reduce runs asynchronously; its result is folded into the meters at first use
        (`_fold_reduced_sums`), by then usually long done. The next step's shift comes from the
        meters as they stand, one step behind: any value identical on all ranks serves.
        """
        self._fold_reduced_sums()
        self.step_sums.flush()
        if self.shards is None:
            self.step_sums, self._reduced_sums = self._reduced_sums, self.step_sums
        else:  # place this rank's rows in the global layout; the local buffer is free again
            self._reduced_sums.buffer.zero_()
            self._reduced_sums.buffer[self._global_positions] = self.step_sums.buffer[self._local_positions]
            self._reduced_sums.shift.copy_(self._collection_shift)
        start = getattr(self.reducer, "sum_async", None)
        if start is not None:
            self._pending_reduction = (start(self._reduced_sums.buffer), self.steps_done)
        else:  # a reducer with only the blocking sum_
            self.reducer.sum_(self._reduced_sums.buffer)
            self._pending_reduction = (None, self.steps_done)
        self._begin_collection(self._meters.shift, centre_each_batch=not self._shift_known)

    def _fold_reduced_sums(self) -> None:
        if self._pending_reduction is None:
            return
        (handle, step), self._pending_reduction = self._pending_reduction, None
        if handle is not None:
            handle.wait()
        bad_layers = update_meters(self._meters, self._reduced_sums, self.row_layer, self.config.alpha)
        self._shift_known = True
        self.dropped.record(step, bad_layers)

    # ------------------------------------------------------------------ schedule (SPEC 2-4)
    def step(self, optimizer: torch.optim.Optimizer | None = None) -> PruneEvent | None:
        """Close one optimizer step's observation; prune when the schedule says so.

        With an engine, a step that DeepSpeed's fp16 loss scaler skipped for overflow
        (`engine.was_step_applied()` False) is no optimizer step (SPEC 1): its sums are discarded
        and it does not count towards the schedule.
        """
        if self.engine is not None:
            if self.engine.global_steps == self._engine_steps_seen:
                return None  # inside a gradient-accumulation window: no optimizer step yet
            self._engine_steps_seen = self.engine.global_steps
            if not getattr(self.engine, "was_step_applied", lambda: True)():
                self.skipped_steps += 1
                self.step_sums.zero_()
                logger.info("optimizer step skipped by the loss scaler (%d so far): its statistics are "
                            "discarded", self.skipped_steps)
                return None
        observed_this_step = self.collecting  # decided before counting the step: the final
        self.steps_done += 1                   # pruning's own step is still an observation
        if observed_this_step:
            self._close_observation()
        self.dropped.poll()
        sparsity = self.schedule.sparsity_at(self.steps_done)
        if sparsity is None or self.squeezed:
            return None
        event = self._prune(sparsity, self._store or TorchParameterStore(optimizer))
        if self.engine is not None and self.config.squeeze_at_target and self.schedule.is_finished(self.steps_done):
            self.squeeze()
        return event

    def _prune(self, sparsity: float, store: ParameterStore) -> PruneEvent:
        # A pruning step synchronises with the host anyway (selection sorts, events are logged).
        self.dropped.poll(wait=True)
        if int(self.meters.observed_steps.min()) == 0:
            raise RuntimeError(
                f"pruning due at step {self.steps_done} but some layers saw no tokens since the last "
                f"pruning: run forward passes inside `with pruner.observe(attention_mask):`")
        if not bool(torch.isfinite(self.meters.ewmv).all()):  # only a corrupt loaded state can do this
            raise RuntimeError(f"pruning due at step {self.steps_done} but the EWMV holds non-finite values; "
                               "the pruner state was corrupted: resume from an earlier checkpoint")
        new_kept = select_rows(self.meters.ewmv, self.kept, self.type_rows, self.row_layer,
                               sparsity, self.config.min_rows_per_layer, self.config.align)
        if self.config.verify_masks:
            self.reducer.check_identical(new_kept)
        newly_pruned = self.kept & ~new_kept
        mean = self.meters.window_mean(self.row_layer)
        for index, (layer, rows, means) in enumerate(zip(
                self.layers, self.layout.split(newly_pruned), self.layout.split(mean))):
            if not bool(rows.any()):
                continue
            if self.shards is not None:  # this rank's rows of the weight and bias
                rows, means = rows[self.shards[index].held], means[self.shards[index].held]
            store.write_rows(layer.module.weight, rows, 0.0, zero_optimizer_state=True)
            store.write_rows(layer.module.bias, rows, means[rows], zero_optimizer_state=False)
            if index not in self._grad_masks:
                self._grad_masks[index] = GradientMask(layer.module.weight)
        self.kept = new_kept
        for index, mask in self._grad_masks.items():
            mask.update(self.held_kept(index))
        event = PruneEvent(
            step=self.steps_done, target_sparsity=sparsity, sparsity=self.sparsity(),
            kept_rows={layer.name: int(k.sum()) for layer, k in zip(self.layers, self.layout.split(self.kept))},
            newly_pruned=int(newly_pruned.sum()), ewmv=self.meters.ewmv.detach().cpu().clone(),
            window_mean=mean.detach().cpu().clone(), dropped_steps=int(self.meters.dropped_steps))
        self.events.append(event)
        self.meters.reset_()
        self.dropped.new_window()
        logger.info("step %d: pruned %d rows, sparsity %s", event.step, event.newly_pruned,
                    {t: round(s, 4) for t, s in event.sparsity.items()})
        return event

    # ------------------------------------------------------------------ views
    def layer_kept(self, index: int) -> torch.Tensor:
        offset = self.layout.offsets[index]
        return self.kept[offset:offset + self.layout.sizes[index]]

    def masks(self) -> dict[str, torch.Tensor]:
        """Module name -> bool [d_out], True = kept."""
        return {layer.name: k.cpu().clone() for layer, k in zip(self.layers, self.layout.split(self.kept))}

    def statistics(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module name -> (window mean, EWMV), float64 [d_out] each, of the current window."""
        mean = self.layout.split(self.meters.window_mean(self.row_layer).double().cpu())
        ewmv = self.layout.split(self.meters.ewmv.double().cpu())
        return {layer.name: (m.clone(), v.clone()) for layer, m, v in zip(self.layers, mean, ewmv)}

    def sparsity(self) -> dict[str, float]:
        """Projection type -> fraction of its rows pruned."""
        return {t: float((~self.kept[rows]).sum()) / rows.numel()
                for t, rows in self.type_rows.items()}

    # ------------------------------------------------------------------ squeeze (SPEC 5)
    def squeeze(self, inplace: bool = False, folds: list | None = None):
        """The squeezed model (same function, smaller matrices).

        Plain model: returns a squeezed copy (or squeezes in place with `inplace=True`; then
        build a new optimizer). Engine: rebuilds the engine around the squeezed model, carrying
        Adam moments of kept rows, and returns it; `pruner.engine` is the engine to train with.
        An AutoTP engine (tensor parallelism) becomes a tp x dp engine around balanced
        tensor-parallel squeezed layers (`vp_dist.distributed.tp_squeeze`).
        folds: the fold sites to apply (plain model only; default: `squeeze_folds()`, which the
        engine rebuild applies too); a checkpoint loader passes the saved run's choice.
        """
        if self.shards is not None:  # AutoTP: balanced tensor-parallel squeezed layers, a tp x dp engine
            from .distributed.tp_squeeze import rebuild_tensor_parallel_squeezed
            return rebuild_tensor_parallel_squeezed(self)
        if self.engine is not None:
            from .distributed.rebuild import rebuild_engine_squeezed
            return rebuild_engine_squeezed(self)
        target = self.model
        if not inplace:
            self._detach_hooks()
            try:
                target = copy.deepcopy(self.model)
            finally:
                self._attach_hooks()
        if folds is None:
            folds = self.squeeze_folds()
        self.last_origins: dict[str, ParamOrigin] = squeeze_model(target, self.masks_on_device(), folds,
                                                                  self.config.pad_ffn, self.config.head_widths)
        if inplace:
            self._detach_hooks()
            self.squeezed = True
        return target

    def squeeze_folds(self) -> list:
        """The fold sites a squeeze applies, on a plain model and in the engine rebuild alike: every
        FFN fold and attention shrink of the model when `config.fold_ffn`, none otherwise."""
        return list(self.folds) if self.config.fold_ffn else []

    def masks_on_device(self) -> dict[str, torch.Tensor]:
        return {layer.name: k for layer, k in zip(self.layers, self.layout.split(self.kept))}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "version": STATE_VERSION,
            "config": self.config.to_dict(),
            "layer_names": [layer.name for layer in self.layers],
            "layer_sizes": list(self.layout.sizes),
            "steps_done": self.steps_done,
            "kept": self.kept.cpu().clone(),
            "meters": {k: v.cpu().clone() for k, v in self.meters.as_dict().items()},
            # The shift the current step's hooks use (the meters' own is one step ahead of it):
            # a resumed run then collects exactly as an uninterrupted one.
            "collection": {"shift": self._collection_shift_global.cpu().clone(),
                           "centre_each_batch": self.step_sums.centre_each_batch,
                           "shift_known": self._shift_known, "skipped_steps": self.skipped_steps},
            "events": [e.to_json() for e in self.events],
            "squeezed": self.squeezed,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore the pruner; refuses, before touching anything, a state of another model."""
        check_state_compatible(state, [layer.name for layer in self.layers], list(self.layout.sizes))
        device = self.kept.device
        self.kept = state["kept"].to(device=device, dtype=torch.bool)
        for key, value in state["meters"].items():
            getattr(self.meters, key).copy_(value.to(device))
        collection = state.get("collection", {"shift": self._meters.shift, "centre_each_batch": True,
                                              "shift_known": False, "skipped_steps": 0})
        self._begin_collection(collection["shift"].to(device), collection["centre_each_batch"])
        self._shift_known = bool(collection["shift_known"])
        self.skipped_steps = int(collection["skipped_steps"])
        self.steps_done = int(state["steps_done"])
        self.events = [PruneEvent(**e, ewmv=torch.empty(0), window_mean=torch.empty(0)) for e in state["events"]]
        for index in range(len(self.layers)):
            if not bool(self.layer_kept(index).all()) and index not in self._grad_masks:
                self._grad_masks[index] = GradientMask(self.layers[index].module.weight)
            if index in self._grad_masks:
                self._grad_masks[index].update(self.held_kept(index))
        if self.engine is not None:
            self._engine_steps_seen = self.engine.global_steps


def check_state_compatible(state: dict, names: list[str], sizes: list[int]) -> None:
    required = ("version", "layer_names", "layer_sizes", "steps_done", "kept", "meters", "events")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"Variance Pruning state is incomplete (missing {missing}): truncated checkpoint?")
    if state["version"] != STATE_VERSION:
        raise ValueError(f"Variance Pruning state version {state['version']} != {STATE_VERSION}")
    if state["layer_names"] != names or list(state["layer_sizes"]) != sizes:
        raise ValueError(
            "Variance Pruning state belongs to another model: its layers "
            f"{len(state['layer_names'])} x {sum(state['layer_sizes'])} rows do not match this model's "
            f"{len(names)} x {sum(sizes)} rows (first difference: "
            f"{next(((a, b) for a, b in zip(state['layer_names'], names) if a != b), 'sizes')})")
    if state["kept"].numel() != sum(sizes):
        raise ValueError(f"Variance Pruning state has {state['kept'].numel()} mask rows, model has {sum(sizes)}")
