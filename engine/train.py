"""The surgery training loop: trainable head slices only, AdamW, warm-up + cosine, accumulation, clipping,
gradient checkpointing, periodic evaluation, checkpoints, cancellation. Reports only through a sink."""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .arch import base_model
from .checkpointing import MODES as CHECKPOINT_MODES
from .checkpointing import (CheckpointPlan, apply_checkpointing, disable_checkpointing, free_bytes, optimizer_bytes,
                            plan_for_training)
from .corpus import PackedCorpus
from .diagnosis import run_statistics
from .distributed import all_sum, any_rank, least, spread, world
from .errors import HeadSurgeonError, InputError
from .fastpath import fast_kernels
from .evaluate import EvalSettings, ablation_deltas, mean_loss, perplexity, recovery
from .loss import causal_lm_loss
from .events import (Checkpoint, EvalMetrics, HeadRecovery, Notice, NullSink, PhaseChanged, Resumed, RunFailed,
                     Sink, StepMetrics)
from .patch import save_patch
from .recipe import SLICE_DTYPE_NAMES
from .report import HeadReport
from .surgery import HeadSlices, SurgeryPlan, operate
from .prefix_cache import PrefixCache
from .tracked import TrackedSet

STATE_FILE = "state.safetensors"
SLICE_DTYPES = dict(zip(SLICE_DTYPE_NAMES, (torch.float32, torch.bfloat16), strict=True))


class TrainingDiverged(HeadSurgeonError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainConfig:
    """Surgery training recipe (defaults: the paper's)."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    warmup_frac: float = 0.05
    warmup_max_steps: int | None = None  # set: warm-up = min(this, floor(frac x total)), the paper's min(100, T//4)
    micro_batch: int = 1
    grad_accum: int = 8
    clip: float = 1.0
    seq_len: int = 512
    steps: int | None = None  # optimizer steps; when None, `epochs` over the training blocks
    epochs: int | None = None
    keep_partial_step: bool = False  # an epoch's last, partial accumulation steps the optimizer too
    eval_every: int | None = 50  # None: evaluate at each epoch's end only
    eval_blocks: int = 16
    track_blocks: int = 16  # the tracked in-domain set: this many training blocks, evenly spaced (0: none)
    track_texts: str | None = None  # or a fixed text file (.txt one a line, .jsonl {"text": ...}) instead
    select_on: str = "heldout"  # the perplexity that picks the kept checkpoint: "heldout" or "tracked"
    patience: int | None = None  # stop a pass after this many evaluations without a better kept checkpoint
    slice_dtype: str = "fp32"  # trainable slices and AdamW state: "fp32", or "bf16" as the paper's scripts
    checkpointing: str = "auto"  # activation checkpointing: auto (by free memory), full, selective or none
    gradient_checkpointing: bool | None = None  # before `checkpointing`: True was full, False none
    prefix_cache_gb: float = 4.0  # keep what the frozen layers below the lowest target compute, up to this (0: off)
    prefix_cache_where: str = "device"  # "device": beside the model; "host": pinned host memory
    loss_chunk_tokens: int = 1024
    attention: str = "sdpa"  # "sdpa" (fused kernel, ALiBi as a bias) or "eager" (transformers' own)
    seed: int = 0
    recipe: str = "default"  # the recipe these settings came from (engine.recipe), recorded for the report

    def __post_init__(self) -> None:
        if self.steps is not None and self.epochs is not None:
            raise InputError("give steps or epochs, not both")
        if self.steps is None and self.epochs is None:
            self.epochs = 1
        if (self.steps is not None and self.steps < 1) or (self.epochs is not None and self.epochs < 1):
            raise InputError("steps and epochs must be at least 1")
        if not (self.lr >= 0 and math.isfinite(self.lr)):  # 0 is a control: re-initialise, train nothing
            raise InputError(f"the learning rate must be zero or a positive number (got {self.lr})")
        if min(self.micro_batch, self.grad_accum, self.eval_blocks) < 1 or (self.eval_every is not None
                                                                             and self.eval_every < 1):
            raise InputError("micro batch, accumulation, eval interval and eval blocks must be at least 1")
        if self.slice_dtype not in SLICE_DTYPES:
            raise InputError(f"slice dtype must be {' or '.join(SLICE_DTYPES)} (got {self.slice_dtype!r})")
        if self.select_on not in ("heldout", "tracked"):
            raise InputError(f"select on must be heldout or tracked (got {self.select_on!r})")
        if self.select_on == "tracked" and not self.track_texts and self.track_blocks < 1:
            raise InputError("selecting on the tracked set needs one: give track blocks of at least 1 or track texts")
        if self.track_blocks < 0 or (self.patience is not None and self.patience < 1):
            raise InputError("track blocks must be 0 or more and patience at least 1")
        if self.warmup_max_steps is not None and self.warmup_max_steps < 0:
            raise InputError(f"the warm-up cap must be 0 or more steps (got {self.warmup_max_steps})")
        if self.prefix_cache_gb < 0 or self.prefix_cache_where not in ("device", "host"):
            raise InputError(f"the prefix cache takes 0 GB or more, on device or host (got {self.prefix_cache_gb} GB "
                             f"on {self.prefix_cache_where!r})")
        if self.attention not in ("sdpa", "eager"):
            raise InputError(f"attention must be sdpa or eager (got {self.attention!r})")
        if self.seq_len < 2 or self.loss_chunk_tokens < 1:
            raise InputError(f"seq len must be at least 2 and loss chunks at least 1 token (got {self.seq_len}, "
                             f"{self.loss_chunk_tokens})")
        if self.gradient_checkpointing is not None:  # a job recorded before `checkpointing`
            self.checkpointing = "full" if self.gradient_checkpointing else "none"
            self.gradient_checkpointing = None
        if self.checkpointing not in CHECKPOINT_MODES:
            raise InputError(f"checkpointing must be one of {', '.join(CHECKPOINT_MODES)} (got {self.checkpointing!r})")

    @property
    def blocks_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    def steps_per_epoch(self, n_blocks: int) -> int:
        if self.keep_partial_step:
            return max(1, -(-n_blocks // self.blocks_per_step))
        return max(1, n_blocks // self.blocks_per_step)

    def total_steps(self, n_blocks: int) -> int:
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch(n_blocks)

    def warmup_steps(self, total: int) -> int:
        if self.warmup_max_steps is not None:
            return min(self.warmup_max_steps, int(self.warmup_frac * total))
        return int(round(self.warmup_frac * total))

    @property
    def selection_key(self) -> str:
        """The evaluation point's field that picks the kept checkpoint."""
        return "tracked_ppl" if self.select_on == "tracked" else "heldout_ppl"


@dataclass
class PassResult:
    """One pass of surgery: its evaluation history, best checkpoint and how it ended."""

    plan: SurgeryPlan
    history: list[dict[str, Any]] = field(default_factory=list)
    best_step: int = -1
    best_heldout_ppl: float = float("inf")  # held-out perplexity of the kept checkpoint
    best_path: str | None = None
    steps_done: int = 0
    cancelled: bool = False
    tokens_per_s: float = 0.0
    train_seconds: float = 0.0
    selected_on: str = "heldout"  # which perplexity picked the kept checkpoint (TrainConfig.select_on)
    best_score: float = float("inf")  # that perplexity at the kept checkpoint
    stopped_early: bool = False  # early stopping (TrainConfig.patience) ended the pass
    prefix_cache: dict[str, Any] | None = None  # what the frozen-prefix cache kept and served (engine.prefix_cache)
    blocks_per_rank: list[int] | None = None  # in a distributed run: the training blocks each rank processed
    checkpointing: dict[str, Any] | None = None  # the activation checkpointing it ran with (engine.checkpointing)
    gradient_sum: str | None = None  # distributed: "exact" (the one-process sum to the bit) or "rounded" (MicroGradients)

    def to_dict(self) -> dict[str, Any]:
        finite = lambda v: v if math.isfinite(v) else None  # noqa: E731
        return {"plan": self.plan.to_dict(), "history": self.history, "best_step": self.best_step,
                "best_heldout_ppl": finite(self.best_heldout_ppl), "selected_on": self.selected_on,
                "best_selection_ppl": finite(self.best_score), "best_checkpoint": self.best_path,
                "steps_done": self.steps_done, "cancelled": self.cancelled, "stopped_early": self.stopped_early,
                "tokens_per_s": self.tokens_per_s, "train_seconds": self.train_seconds,
                "class_counts": self.class_counts(), "prefix_cache": self.prefix_cache,
                "blocks_per_rank": self.blocks_per_rank, "checkpointing": self.checkpointing,
                "gradient_sum": self.gradient_sum}

    def class_counts(self) -> dict[str, dict[str, int]] | None:
        """Class counts of the model this pass leaves (its kept checkpoint's point; the last point if none)."""
        points = [p for p in self.history if "class_counts" in p]
        kept = [p for p in points if p["step"] == self.best_step] or points[-1:]
        return {"classes": kept[0]["class_counts"], "paper": kept[0]["paper_counts"]} if kept else None


def _describe(plan: CheckpointPlan) -> str:
    chosen = " (chosen by memory)" if plan.asked == "auto" else ""
    if plan.mode != "selective":
        return plan.mode + chosen
    first, last = plan.checkpointed[0], plan.checkpointed[-1]
    layers = f"layer {first}" if first == last else f"layers {first}-{last}"
    return f"selective{chosen}: {layers} recompute, the layers above keep their activations"


def block_order(n_blocks: int, epoch: int, seed: int) -> torch.Tensor:
    """The deterministic order of training blocks in an epoch."""
    return torch.randperm(n_blocks, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def step_blocks(config: TrainConfig, n_blocks: int, step: int) -> torch.Tensor:
    """Indices of the blocks optimizer step `step` trains on (a pure function: resumable)."""
    per_epoch = config.steps_per_epoch(n_blocks)
    epoch, within = divmod(step, per_epoch)
    start = within * config.blocks_per_step
    return block_order(n_blocks, epoch, config.seed)[start : start + config.blocks_per_step]


EXACT_SLOTS_BYTES = 4 << 30  # above this, a distributed step sums its gradients in one slot (see MicroGradients)


class MicroGradients:
    """A distributed step's gradients, one slot per micro-batch of the step: each rank fills the slots of the
    micro-batches it ran, one all-reduce fills in every slot on every rank, and the slots are then added in the
    micro-batches' order, as autograd accumulates them in one process. So the summed gradient is the
    single-process one to the last bit, not just to rounding (Adam's normalised update turns rounding-level
    differences of near-zero gradients into visible ones). The loss of each micro-batch rides in the same
    buffer. The buffer holds micro-batches x trainable values in fp32; when that passes `EXACT_SLOTS_BYTES`
    (4 GiB: at accumulation 8, 18 heads of bloom-176b or 64 of bloom-7b1), each rank adds its micro-batches
    into one slot instead and the step's all-reduce is of one slot: the sum is then equal to rounding, not to
    the bit (`exact` False, recorded as the pass's `gradient_sum`)."""

    def __init__(self, params: list[torch.nn.Parameter], n_micro: int) -> None:
        self.params, self.n_micro = params, n_micro
        self.size = sum(p.numel() for p in params)
        self.exact = self.slots(self.size, n_micro) == n_micro
        self.buffer = torch.zeros(self.slots(self.size, n_micro), self.size + 2, dtype=torch.float32,
                                  device=params[0].device)

    @staticmethod
    def slots(size: int, n_micro: int) -> int:
        """Slots for `size` trained values: one a micro-batch while they fit `EXACT_SLOTS_BYTES`, else one."""
        return n_micro if n_micro * (size + 2) * 4 <= EXACT_SLOTS_BYTES else 1

    @classmethod
    def buffer_bytes(cls, params: list[torch.nn.Parameter], n_micro: int) -> int:
        """What the buffer takes for these parameters (the checkpointing plan keeps it free)."""
        size = sum(p.numel() for p in params)
        return cls.slots(size, n_micro) * (size + 2) * 4

    def keep(self, k: int, loss: float) -> None:
        """Put the gradients of micro-batch `k` (just computed, nothing accumulated) into its slot."""
        slot = k if self.exact else 0
        offset = 0
        for p in self.params:
            if p.grad is not None:
                self.buffer[slot, offset : offset + p.numel()] += p.grad.reshape(-1).float()
            offset += p.numel()
        self.buffer[slot, -2:] += torch.tensor([loss, 1.0], device=self.buffer.device)

    def sum_over_ranks(self) -> tuple[float, int]:
        """All-reduce, then each parameter's gradient as the in-order sum of the slots; (loss sum, micro-batches)."""
        all_sum(self.buffer)
        offset = 0
        for p in self.params:
            slots = self.buffer[:, offset : offset + p.numel()].to(p.dtype)
            grad = slots[0].clone()
            for k in range(1, len(slots)):
                grad += slots[k]
            p.grad = grad.view_as(p)
            offset += p.numel()
        losses = self.buffer[:, -2].tolist()
        total = 0.0
        for value in losses:  # the same float sum as one process's running total
            total += value
        return total, int(self.buffer[:, -1].sum())


class SurgeryRun:
    """One pass: operate on the plan's heads, train the slices, evaluate, checkpoint."""

    def __init__(self, loaded, plan: SurgeryPlan, corpus: PackedCorpus, config: TrainConfig, *,
                 prompt_ids: list[list[int]], out_dir: str | Path, meta: dict[str, Any],
                 eval_settings: EvalSettings | None = None, diagnosis_batch: int = 8,
                 function: dict[str, Any] | None = None, tracked: TrackedSet | None = None,
                 sink: Sink | None = None, cancelled: Callable[[], bool] = lambda: False, pass_name: str = "pass-1"):
        self.loaded, self.plan, self.corpus, self.config = loaded, plan, corpus, config
        self.prompt_ids, self.meta = prompt_ids, meta
        self.settings = eval_settings or EvalSettings()
        self.diagnosis_batch = diagnosis_batch
        self.function = function  # the function baseline: functional is judged against it at every evaluation
        self.tracked = tracked  # the fixed in-domain set measured at every evaluation
        if config.select_on == "tracked" and tracked is None:
            raise InputError("selecting checkpoints on the tracked set needs one: give track blocks or track texts")
        self.sink, self.cancelled = sink or NullSink(), cancelled
        self.pass_name = pass_name
        self.dir = Path(out_dir) / "checkpoints" / pass_name
        self.model, self.adapter = loaded.model, loaded.adapter
        self.device = next(self.model.parameters()).device
        tok = loaded.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
        self.eval_blocks = corpus.heldout[: config.eval_blocks]
        self.ablation_blocks = corpus.heldout[: self.settings.ablation_blocks]
        self.result = PassResult(plan, selected_on=config.select_on)
        self.slices: HeadSlices | None = None
        self.optimizer = None
        self.scheduler = None
        self.prefix: PrefixCache | None = None
        self.checkpoint_plan: CheckpointPlan | None = None
        self.world = world()
        self.blocks_trained = 0  # by this rank (its share of every step's blocks in a distributed run)
        self._best_tensors: dict[str, torch.Tensor] | None = None

    # --- setup -------------------------------------------------------------------------------------
    def _setup(self) -> None:
        from transformers import get_cosine_schedule_with_warmup

        c = self.config
        self.total = c.total_steps(len(self.corpus.train))
        self.slices = operate(self.model, self.adapter, self.plan, dtype=SLICE_DTYPES[c.slice_dtype])
        self.optimizer = torch.optim.AdamW(self.slices.parameters(), lr=c.lr, betas=(c.beta1, c.beta2),
                                           weight_decay=c.weight_decay)  # its moments take the slices' dtype
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, c.warmup_steps(self.total), self.total)
        # a cached micro-batch skips the prefix's blocks; in a distributed run the ranks' shares hit and miss
        # differently, and their blocks' all-gathers would no longer pair up: there it stays off
        if not self.world.active:
            self.prefix = PrefixCache.for_run(self.model, self.adapter, min(self.plan.layers),
                                              budget_gb=c.prefix_cache_gb, where=c.prefix_cache_where,
                                              total_steps=self.total,
                                              steps_per_epoch=c.steps_per_epoch(len(self.corpus.train)))
        self.checkpoint_plan = self._checkpoint_plan()
        apply_checkpointing(self.model, self.adapter, self.checkpoint_plan)

    def _checkpoint_plan(self) -> CheckpointPlan:
        """Checkpointing for this pass from the memory free now, less the prefix cache's budget, the slices'
        gradients and AdamW moments (not yet allocated) and the loss's chunks (engine.loss.peak_bytes)."""
        c = self.config
        reserve = (self.prefix.budget if self.prefix else 0) + optimizer_bytes(self.slices.parameters())
        if self.world.active:  # the gradient slots of a distributed step
            reserve += MicroGradients.buffer_bytes(list(self.slices.parameters()), c.grad_accum)
        return plan_for_training(c.checkpointing, self.model, self.adapter, self.corpus.train[:1].to(self.device),
                                 sdpa=c.attention == "sdpa", lowest=min(self.plan.layers),
                                 tokens=c.micro_batch * c.seq_len,
                                 free=int(least(free_bytes(self.device))),  # every rank the same plan
                                 reserve=reserve, chunk_tokens=c.loss_chunk_tokens)

    def _teardown(self) -> None:
        if self.checkpoint_plan is not None and self.checkpoint_plan.checkpointed:
            disable_checkpointing(self.model)
        self.model.eval()

    # --- one optimizer step --------------------------------------------------------------------------
    def _fast(self):
        return fast_kernels(self.model, self.adapter, self.config.attention == "sdpa")

    def _loss(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = base_model(self.model)(input_ids=ids, use_cache=False).last_hidden_state
        return causal_lm_loss(self.model.lm_head, hidden, ids, chunk_tokens=self.config.loss_chunk_tokens,
                              backward_scale=1 / self.config.grad_accum)  # the backward below divides by it

    def _train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step over the step's blocks; in a distributed run over this rank's share of them,
        with every rank's gradients (and losses) summed by one all-reduce before clipping."""
        c = self.config
        self.model.train()
        idx = step_blocks(c, len(self.corpus.train), step)
        micro_batches = [idx[start : start + c.micro_batch] for start in range(0, len(idx), c.micro_batch)]
        total, micro = 0.0, 0
        slots = MicroGradients(list(self.slices.parameters()), len(micro_batches)) if self.world.active else None
        with self._fast():  # around backward too: checkpointed layers recompute through the same path
            for (k, blocks), real in spread(list(enumerate(micro_batches))):
                ids = self.corpus.train[blocks].to(self.device)
                with self.prefix.around(blocks) if self.prefix else nullcontext():
                    loss = self._loss(ids)
                value = float(loss.detach())
                if not math.isfinite(value) and slots is None:
                    return value, float("nan")
                # by grad_accum even in an epoch's partial last step, as the paper's scripts do; a rank's filler
                # micro-batch (engine.distributed.spread) only keeps the ranks' collectives paired
                (loss / c.grad_accum if real else loss * 0.0).backward()
                if real:
                    total, micro = total + value, micro + 1
                    self.blocks_trained += len(blocks)
                    if slots is not None:
                        slots.keep(k, value)
                if slots is not None:
                    self.optimizer.zero_grad(set_to_none=True)
        if slots is not None:
            self.result.gradient_sum = "exact" if slots.exact else "rounded"
            total, micro = slots.sum_over_ranks()
            if not math.isfinite(total):
                return total, float("nan")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.slices.parameters(), c.clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / micro, grad_norm

    # --- evaluation -------------------------------------------------------------------------------
    def evaluate(self, step: int, train_loss: float) -> dict[str, Any]:
        """Held-out PPL, every head's statistics on the prompts, and the targets' recovery."""
        self.model.eval()
        with self.slices.exported():
            stats, _ = run_statistics(self.model, self.adapter, self.prompt_ids, batch_size=self.diagnosis_batch,
                                      pad_id=self.pad_id)
            with self._fast():
                heldout = mean_loss(self.model, self.eval_blocks, self.settings.batch_size)
                tracked = self.tracked.loss(self.model, self.settings.batch_size) if self.tracked else None
                ablation_base = mean_loss(self.model, self.ablation_blocks, self.settings.batch_size)
                deltas = ablation_deltas(self.model, self.adapter, self.plan.targets, self.ablation_blocks,
                                         self.settings.batch_size, ablation_base)
        a = self.adapter
        report = HeadReport(model=self.loaded.ref, n_layer=a.n_layer, n_head=a.n_head, slopes=a.slopes,
                            thresholds=self.settings.thresholds, **stats)
        rec = recovery(report, self.plan.targets, deltas, self.settings, function=self.function)
        targets = {k: {s: v[s] for s in ("bos_mass", "entropy", "local_mass", "contribution", "ablation_delta")}
                   for k, v in rec["per_head"].items()}
        point = {"step": step, "train_loss": train_loss, "train_ppl": perplexity(train_loss),
                 "heldout_loss": heldout, "heldout_ppl": perplexity(heldout),
                 "tracked_ppl": perplexity(tracked) if tracked is not None else None, "targets": targets,
                 "woken": rec["woken"], "functional": rec["functional"],
                 "class_counts": report.counts(), "paper_counts": report.paper_counts(),
                 "bos_mass": report.bos_mass.round(5).tolist(), "contribution": report.contribution.round(5).tolist()}
        self.result.history.append(point)
        self.sink.emit(EvalMetrics(step, train_loss, point["train_ppl"], point["heldout_ppl"], targets,
                                   point["bos_mass"], point["contribution"], report.entropy.round(5).tolist(),
                                   report.local_mass.round(5).tolist(), label=self.pass_name,
                                   tracked_ppl=point["tracked_ppl"]))
        self.sink.emit(HeadRecovery(step, rec["woken"], rec["functional"], rec["targets"], rec["per_head"]))
        return point

    # --- checkpoints ------------------------------------------------------------------------------
    def _patch_meta(self, step: int, heldout_ppl: float) -> dict[str, Any]:
        return {**self.meta, "plan": self.plan.to_dict(), "pass": self.pass_name, "step": step,
                "heldout_ppl": heldout_ppl, "train": asdict(self.config)}

    def _save_state(self, step: int) -> None:
        """Slices + optimizer + scheduler at `step`, for `resume` (atomic: a full disk keeps the last one)."""
        from safetensors.torch import save

        from .atomic import atomic_write_bytes

        if not self.world.main:  # rank 0 alone writes: nothing to serialise here
            return
        tensors = dict(self.slices.head_tensors())
        names = {id(p): n for n, p in self.slices.named_parameters()}
        opt_meta = {}
        for p, st in self.optimizer.state.items():
            n = names[id(p)]
            tensors[f"opt.{n}.exp_avg"] = st["exp_avg"].detach().cpu().contiguous()
            tensors[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"].detach().cpu().contiguous()
            opt_meta[n] = float(st["step"])
        meta = {"step": step, "opt_steps": opt_meta, "scheduler": self.scheduler.state_dict(),
                "best_step": self.result.best_step, "best_heldout_ppl": self.result.best_heldout_ppl,
                "best_score": self.result.best_score, "best_path": self.result.best_path,
                "plan": self.plan.to_dict(), "history": self.result.history}
        atomic_write_bytes(self.dir / STATE_FILE, save(tensors, metadata={"state": json.dumps(meta)}))

    def _load_state(self, path: Path) -> int:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads(fh.metadata()["state"])
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta["plan"] != self.plan.to_dict():
            raise InputError(f"resume state {path} belongs to another plan ({meta['plan']['targets']})")
        self.slices.load_head_tensors(tensors)
        for n, p in self.slices.named_parameters():
            if f"opt.{n}.exp_avg" in tensors:
                self.optimizer.state[p] = {
                    "step": torch.tensor(meta["opt_steps"][n]),
                    "exp_avg": tensors[f"opt.{n}.exp_avg"].to(p),
                    "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"].to(p),
                }
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
            group["lr"] = lr  # load_state_dict restores the schedule's position, not the optimizer's lr
        self.result.best_step, self.result.best_heldout_ppl = meta["best_step"], meta["best_heldout_ppl"]
        self.result.best_score = meta.get("best_score", meta["best_heldout_ppl"])  # states before select_on
        self.result.best_path = meta["best_path"]
        self.result.history = meta.get("history", [])
        self.sink.emit(Resumed(self.pass_name, int(meta["step"])))
        return int(meta["step"])

    def _checkpoint(self, step: int, point: dict[str, Any], epoch_end: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        ppl, score = point["heldout_ppl"], point[self.config.selection_key]
        is_best = step > 0 and score < self.result.best_score
        tensors = self.slices.head_tensors()
        if is_best:
            path = self.dir / "best.safetensors"
            save_patch(path, tensors, self._patch_meta(step, ppl))
            # `finish` reads these (in a distributed run only rank 0 wrote the file); copies: on a CPU the
            # tensors of `head_tensors` are views of the parameters the next steps change
            self._best_tensors = {name: t.clone() for name, t in tensors.items()}
            self.result.best_step, self.result.best_heldout_ppl, self.result.best_path = step, ppl, str(path)
            self.result.best_score = score
            self.sink.emit(Checkpoint(step, str(path), ppl, True))
        if epoch_end:
            path = self.dir / f"step-{step}.safetensors"
            save_patch(path, tensors, self._patch_meta(step, ppl))
            self.sink.emit(Checkpoint(step, str(path), ppl, False))
        if step > 0:
            self._save_state(step)

    # --- the loop ---------------------------------------------------------------------------------
    def run(self, resume_state: str | Path | None = None) -> PassResult:
        c = self.config
        self._setup()
        try:
            start = self._load_state(Path(resume_state)) if resume_state else 0
            per_epoch = c.steps_per_epoch(len(self.corpus.train))
            self.result.checkpointing = self.checkpoint_plan.to_dict()
            self.sink.emit(PhaseChanged(self.pass_name, f"{len(self.plan.targets)} target heads, {self.total} steps, "
                                        f"{sum(p.numel() for p in self.slices.parameters()):,} trainable values, "
                                        f"checkpointing {_describe(self.checkpoint_plan)}"))
            model_dtype = next(self.model.parameters()).dtype
            if SLICE_DTYPES[c.slice_dtype] != model_dtype and c.slice_dtype == "bf16":
                self.sink.emit(Notice(f"{self.pass_name}: bf16 slices on a {str(model_dtype).replace('torch.', '')} "
                                      "model: the targets' slices are rounded to bf16 before training (a sham arm "
                                      "starts from the rounded values, not exactly the base); run the model in bf16, "
                                      "as the paper's scripts did, for pure bf16"))
            if start == 0:
                with torch.no_grad(), self._fast():
                    ids = self.corpus.train[step_blocks(c, len(self.corpus.train), 0)].to(self.device)
                    self.model.eval()
                    loss0 = float(self._loss(ids))
                self._checkpoint(0, self.evaluate(0, loss0), epoch_end=False)
            t0, tokens, window = time.perf_counter(), 0, []
            step = start
            # a pass that had run out of patience when it was interrupted trains no further on resume
            stopped = 0 < start < self.total and self._out_of_patience()
            while step < self.total and not stopped:
                # stop at this step boundary (every rank together) and keep a state that `resume` continues
                if any_rank(self.cancelled(), self.device):
                    self.result.cancelled = True
                    if step > start:
                        self.dir.mkdir(parents=True, exist_ok=True)
                        self._save_state(step)
                    break
                loss, grad_norm = self._train_step(step)
                step += 1
                if not math.isfinite(loss):
                    return self._diverged(step, loss)
                tokens += len(step_blocks(c, len(self.corpus.train), step - 1)) * c.seq_len  # partial steps too
                window.append(loss)
                elapsed = time.perf_counter() - t0
                self.sink.emit(StepMetrics(step, self.total, loss, self.scheduler.get_last_lr()[0], grad_norm,
                                           tokens / max(elapsed, 1e-9), elapsed, epoch=(step - 1) // per_epoch))
                epoch_end = step % per_epoch == 0 or step == self.total
                if (c.eval_every and step % c.eval_every == 0) or epoch_end:
                    point = self.evaluate(step, sum(window) / len(window))
                    window = []
                    self._checkpoint(step, point, epoch_end)
                    if step < self.total and self._out_of_patience():
                        break
            self.result.steps_done = step
            if self.world.active:
                share = torch.zeros(self.world.size, dtype=torch.float64, device=self.device)
                share[self.world.rank] = self.blocks_trained
                self.result.blocks_per_rank = [int(x) for x in all_sum(share).tolist()]
            if self.prefix is not None:
                p = self.prefix
                self.result.prefix_cache = {"layers_skipped": p.lowest, "blocks_kept": len(p.store), "bytes": p.bytes,
                                            "block_visits_served": p.hits, "block_visits_computed": p.misses}
            self.result.train_seconds = round(time.perf_counter() - t0, 2)
            self.result.tokens_per_s = tokens / max(self.result.train_seconds, 1e-9)
            return self.result
        finally:
            self._teardown()

    def _out_of_patience(self) -> bool:
        """Early stopping: `patience` evaluation points in a row since the kept checkpoint without a lower
        selection perplexity (derived from the history, so a resumed pass counts the same)."""
        patience = self.config.patience
        since = [p for p in self.result.history if p["step"] > max(self.result.best_step, 0)]
        if patience is None or len(since) < patience:
            return False
        self.result.stopped_early = True
        self.sink.emit(Notice(f"{self.pass_name}: early stop at step {since[-1]['step']}: {self.config.select_on} "
                              f"perplexity did not improve for {patience} evaluations; kept step "
                              f"{self.result.best_step}"))
        return True

    def _diverged(self, step: int, loss: float):
        last = self.result.best_path
        message = (f"loss became {loss} at step {step} of {self.pass_name}: lower the learning rate or check the corpus; "
                   f"last good checkpoint: {last or 'none'}")
        self.sink.emit(RunFailed(step, message, last))
        raise TrainingDiverged(message)

    def finish(self) -> HeadSlices:
        """Load the best checkpoint's slices and write them into the model (the model is then base + best)."""
        from .patch import load_patch

        if self._best_tensors is not None:
            self.slices.load_head_tensors(self._best_tensors)
        elif self.result.best_path:  # kept before a resume
            tensors, _ = load_patch(self.result.best_path)
            self.slices.load_head_tensors(tensors)
        self.slices.export()
        return self.slices
