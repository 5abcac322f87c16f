"""Stage 2, pretraining (GPU): prepared data -> BloomForCausalLM trained on BOS-started random crops,
diagnosed on held-out text -> save_pretrained + the run record."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from engine.arch import adapter_for
from engine.atomic import atomic_write_text
from engine.corpus import pack_blocks
from engine.diagnosis import run_statistics
from engine.errors import InputError
from engine.evaluate import mean_loss, perplexity
from engine.events import NullSink, PhaseChanged, Sink, StepMetrics
from engine.report import HeadReport

from .band import band_probe, band_summary
from .data import DATA_META, load_data
from .data_parallel import DataParallel
from .recipe import OrganismConfig, build_model, crops, lr_at, pretrain_step

RECORD_FILE = "organism.json"
PROBE_BLOCKS = 8  # held-out blocks per mid-pretraining band probe: a reading, not the final diagnosis


def heldout_blocks(heldout: torch.Tensor, config: OrganismConfig, bos: int) -> torch.Tensor:
    """The first `eval_blocks` BOS-started blocks of the held-out stream: what the run is diagnosed on."""
    blocks = pack_blocks(heldout, config.seq_len, bos)[: config.eval_blocks]
    if len(blocks) < 1:
        raise InputError("held-out split is shorter than one block: prepare with a larger held-out fraction")
    return blocks


def heldout_ppl(model, blocks: torch.Tensor, device, batch: int = 16) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return perplexity(mean_loss(model, blocks, batch))


def budgeted_steps(config: OrganismConfig, steps_done: int, elapsed_s: float, rate_steps_per_s: float,
                   budget_s: float) -> int:
    """Total steps that fit `budget_s` at the measured rate (never more than `config.steps`, never fewer
    than are done)."""
    remaining = max(budget_s - elapsed_s, 0.0)
    return max(steps_done + 1, min(config.steps, steps_done + int(remaining * rate_steps_per_s)))


def train_organism(config: OrganismConfig, data_dir: str | Path, out_dir: str | Path | None, *, device=None,
                   sink: Sink | None = None, cancelled=lambda: False, time_limit_s: float | None = None,
                   time_budget_s: float | None = None, probe_every: int | None = None,
                   compile_blocks: bool = False, state: str | Path | None = None) -> dict:
    """Pretrain, diagnose on held-out text, save (bf16) and return the run record.

    `time_budget_s` sizes the run to a machine lease: the step rate is measured during warm-up (before the
    cosine schedule depends on the total), and `steps` is lowered to what fits; the record then holds the
    steps that reproduce the run. `time_limit_s` simply stops pretraining early (recorded as `stopped_early`).
    `probe_every` N diagnoses the first few held-out blocks every N steps, so the record's `trajectory` shows
    how the band emerges. `compile_blocks` runs each transformer block through `torch.compile` while
    pretraining (fused LayerNorm and elementwise kernels: 1.2x on an H200); probes, the held-out diagnosis
    and perplexity run eagerly.

    `state` (a file) makes the run resumable across machine leases: if it exists the run continues from it
    (same recipe required), and a run stopped by `time_limit_s` or cancellation writes it before the usual
    stopped-early diagnosis and save. Not combinable with `time_budget_s`, which resizes the recipe.

    Started by `torchrun --nproc-per-node N`, the run is data-parallel: `batch_size` is the global batch,
    rank 0 reports and saves, and the result equals the single-process run up to summation order."""
    from engine.runtime import resolve_device

    if state is not None and time_budget_s is not None:
        raise InputError("--time-budget resizes the run, so it cannot resume one: give --steps and --time-limit")
    dev = resolve_device(device)
    dp = DataParallel.from_env(dev.type)
    try:
        return _train_organism(config, data_dir, out_dir, dp.device(dev), dp, sink if dp.is_main else None,
                               cancelled, time_limit_s, time_budget_s, probe_every, compile_blocks, state)
    finally:
        dp.close()


def _train_organism(config: OrganismConfig, data_dir, out_dir, dev: torch.device, dp: DataParallel, sink,
                    cancelled, time_limit_s, time_budget_s, probe_every, compile_blocks, state) -> dict:
    from engine.fastpath import fast_kernels
    from .train_state import Progress, load_state, save_state

    sink = sink or NullSink()
    tokenizer, train, heldout = load_data(data_dir)
    bos = tokenizer.bos_token_id
    model = build_model(config, tokenizer).to(dev)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=(config.beta1, config.beta2), fused=dev.type == "cuda",
    )
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(config.seed)  # the same on every rank: each takes its rows of one batch
    where = f"{dp.world} x {dev.type}" if dp.world > 1 else str(dev)
    sink.emit(PhaseChanged("pretrain", f"{sum(p.numel() for p in params)/1e6:.2f}M parameters on {where}"))
    probe_from, probe_to = min(10, config.warmup // 4), max(1, config.warmup // 2)
    blocks = heldout_blocks(heldout, config, bos)  # the final diagnosis's blocks; probes read the first few
    probe_blocks = blocks[:PROBE_BLOCKS] if probe_every else None
    trajectory: list[dict] = []
    adapter = adapter_for(model)
    if compile_blocks:
        for block in adapter.blocks(model):
            block.compile()
    eager = (lambda: torch.compiler.set_stance("force_eager")) if compile_blocks else contextlib.nullcontext
    step, loss_value, stop, prior_seconds, sessions = 0, float("nan"), False, 0.0, 1
    if state is not None and Path(state).exists():
        progress = load_state(state, model, opt, gen, asdict(config))
        step, loss_value, trajectory = progress.step, progress.loss, progress.trajectory
        prior_seconds, sessions = progress.train_seconds, progress.sessions + 1
        sink.emit(PhaseChanged("pretrain", f"resumed from {state} at step {step} (session {sessions})"))
    first_step = step
    t0 = time.perf_counter()
    t_probe = t0
    while step < config.steps and not stop:
        # Pretraining runs on the fast kernels; a band probe needs the attention probabilities, so it runs
        # outside them, between segments.
        segment_end = min(config.steps, (step // probe_every + 1) * probe_every) if probe_every else config.steps
        with fast_kernels(model, adapter):
            while step < min(segment_end, config.steps):
                if dp.world == 1 or step % 50 == 0:  # ranks decide together, at steps that sync anyway
                    stop = dp.any(cancelled() or (time_limit_s is not None
                                                  and time.perf_counter() - t0 > time_limit_s), dev)
                if stop:
                    break
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, config)
                ids = dp.shard(crops(train, config.batch_size, config.seq_len - 1, bos, gen)).to(dev, non_blocking=True)
                loss, grad_norm = pretrain_step(model, opt, params, ids, config.clip, dp)
                step += 1
                if time_budget_s is not None and step in (probe_from, probe_to):
                    float(loss.detach())  # wait for the GPU, so the clock measures the steps themselves
                    now = time.perf_counter()
                    if step == probe_from:
                        t_probe = now
                    else:
                        rate = (probe_to - probe_from) / max(now - t_probe, 1e-9)
                        steps = dp.min_int(budgeted_steps(config, step, now - t0, rate, time_budget_s), dev)
                        config = replace(config, steps=steps)
                        sink.emit(PhaseChanged("pretrain", f"{rate:.1f} steps/s: {config.steps} steps fit the "
                                                           f"{time_budget_s:.0f} s budget"))
                if step % 50 == 1 or step == config.steps:
                    loss_value = float(dp.mean(loss.detach()))
                    if not math.isfinite(loss_value):
                        raise InputError(f"pretraining diverged at step {step} (loss {loss_value}): lower --lr")
                    elapsed = time.perf_counter() - t0
                    sink.emit(StepMetrics(step, config.steps, loss_value, lr_at(step - 1, config), float(grad_norm),
                                          (step - first_step) * ids.numel() * dp.world / elapsed,
                                          prior_seconds + elapsed))
        if probe_blocks is not None and not stop and step % probe_every == 0 and step < config.steps:
            with eager():
                point = band_probe(model, adapter, probe_blocks, step, float(dp.mean(loss.detach())))
            trajectory.append(point)
            sink.emit(PhaseChanged("probe", f"step {step}: {point['heads_over_0.5']} heads with BOS mass > 0.5, "
                                            f"upper-half mean {point['mean_bos_upper_half']:.3f}"))
    train_seconds = prior_seconds + time.perf_counter() - t0
    if state is not None and step < config.steps and dp.is_main:
        save_state(state, model, opt, gen, Progress(step, asdict(config), train_seconds, loss_value, trajectory, sessions))
        sink.emit(PhaseChanged("pretrain", f"stopped at step {step}: state saved to {state}"))
    step -= 1  # index of the last step taken
    model.eval()
    with eager():
        ppl = heldout_ppl(model, blocks, dev)
        sink.emit(PhaseChanged("diagnose", f"held-out perplexity {ppl:.2f}"))
        stats, n_tokens = run_statistics(model, adapter, blocks.tolist(), batch_size=8)
    report = HeadReport(model=str(out_dir or "organism"), n_layer=adapter.n_layer, n_head=adapter.n_head,
                        slopes=adapter.slopes, n_prompts=len(blocks), n_tokens=n_tokens, **stats)
    record = {
        "config": asdict(config),
        "data": json.loads((Path(data_dir) / DATA_META).read_text()) if (Path(data_dir) / DATA_META).exists() else {},
        "steps_done": step + 1,
        "stopped_early": step + 1 < config.steps,
        "train_seconds": round(train_seconds, 1),
        "sessions": sessions,
        "final_train_loss": loss_value,
        "heldout_ppl": ppl,
        "device": (f"{dp.world} x " if dp.world > 1 else "")
        + (torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "heldout_diagnosis": band_summary(report),
        "bos_mass": np.round(report.bos_mass, 4).tolist(),
    }
    if probe_every:
        record["trajectory"] = trajectory
    if out_dir is not None and dp.is_main:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if config.alibi:  # a no-ALiBi control would silently regain ALiBi when reloaded: keep only its record
            model.to(torch.bfloat16).save_pretrained(out)
            tokenizer.save_pretrained(out)
        atomic_write_text(out / RECORD_FILE, json.dumps(record, indent=1))
    return record
