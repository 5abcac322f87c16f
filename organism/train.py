"""The organism: a small ALiBi BLOOM pretrained from scratch until its low-slope heads collapse.

Two stages, so data preparation (CPU, `datasets`, `tokenizers`) and pretraining (GPU) can run on
different machines:
  prepare_data: corpus -> byte-level BPE tokenizer (prepends BOS) + token stream (safetensors)
  train_organism: prepared data -> BloomForCausalLM trained on BOS-started random crops -> save_pretrained
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engine.arch import adapter_for
from engine.atomic import atomic_write_text
from engine.corpus import CorpusSpec, load_texts, pack_blocks, token_stream
from engine.diagnosis import run_statistics
from engine.errors import InputError
from engine.evaluate import mean_loss, perplexity
from engine.events import NullSink, PhaseChanged, Sink, StepMetrics
from engine.loss import causal_lm_loss
from engine.report import HeadReport
from engine.tokenizer import train_bpe_tokenizer

from .data_parallel import DataParallel

DATA_FILE = "tokens.safetensors"
DATA_META = "data.json"
RECORD_FILE = "organism.json"
TOKENIZER_CHARS = 64_000_000  # more text than this gains the 4k-token BPE little and costs minutes
PROBE_BLOCKS = 8  # held-out blocks per mid-pretraining band probe: a reading, not the final diagnosis


@dataclass
class OrganismConfig:
    """Architecture and pretraining recipe (defaults: the recipe that makes the low-slope band collapse)."""

    layers: int = 6
    heads: int = 16
    hidden: int = 256
    seq_len: int = 512
    batch_size: int = 32
    steps: int = 4000
    lr: float = 6e-4
    min_lr_frac: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    alibi: bool = True
    eval_blocks: int = 64

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise InputError(f"--hidden {self.hidden} is not divisible by --heads {self.heads}")
        if min(self.layers, self.heads, self.steps, self.batch_size) < 1 or self.seq_len < 8:
            raise InputError("layers, heads, steps and batch size must be >= 1 and seq len >= 8")


# --- stage 1: data -------------------------------------------------------------------------------------
def prepare_data(spec: CorpusSpec, out_dir: str | Path, vocab_size: int = 4096, heldout_frac: float = 0.02,
                 sink: Sink | None = None, tokenizer_chars: int = TOKENIZER_CHARS) -> dict:
    """Train the tokenizer on the corpus and write it with the tokenised stream into `out_dir`."""
    sink = sink or NullSink()
    sink.emit(PhaseChanged("prepare", f"reading {spec.describe()}"))
    return prepare_texts(load_texts(spec), spec.describe(), out_dir, vocab_size, heldout_frac, sink, tokenizer_chars)


def sample_stride(texts: list[str], max_chars: int) -> int:
    """k such that every k-th document holds about `max_chars` characters (1 when all of them fit)."""
    return max(1, math.ceil(sum(map(len, texts)) / max(max_chars, 1)))


def tokenizer_sample(texts: list[str], max_chars: int) -> list[str]:
    """Every k-th document, k chosen so the sample holds about `max_chars` characters (all when fewer)."""
    return texts[:: sample_stride(texts, max_chars)]


def prepare_texts(texts: list[str], description: str, out_dir: str | Path, vocab_size: int = 4096,
                  heldout_frac: float = 0.02, sink: Sink | None = None, tokenizer_chars: int = TOKENIZER_CHARS) -> dict:
    """`prepare_data` for documents already read: the tokenizer is trained on an evenly spread sample of at
    most about `tokenizer_chars` characters; the last `heldout_frac` of the token stream is held out."""
    from safetensors.torch import save_file

    sink = sink or NullSink()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sample = tokenizer_sample(texts, tokenizer_chars)
    sink.emit(PhaseChanged("prepare", f"training a {vocab_size}-token BPE on {len(sample)} of {len(texts)} documents"))
    tokenizer = train_bpe_tokenizer(sample, vocab_size=vocab_size)
    sink.emit(PhaseChanged("prepare", "tokenising"))
    stream = token_stream(tokenizer, texts)
    n_held = max(int(len(stream) * heldout_frac), 1)
    if len(stream) - n_held < 4 * 512:
        raise InputError(f"corpus {description!r} gives only {len(stream)} tokens: give more text")
    tokenizer.save_pretrained(out)
    dtype = torch.int16 if len(tokenizer) < 2**15 else torch.int32
    save_file({"train": stream[:-n_held].to(dtype).contiguous(), "heldout": stream[-n_held:].to(dtype).contiguous()}, out / DATA_FILE)
    meta = {"corpus": description, "documents": len(texts), "characters": sum(map(len, texts)),
            "tokenizer_documents": len(sample), "tokens": len(stream), "heldout_tokens": n_held,
            "vocab_size": len(tokenizer)}
    atomic_write_text(out / DATA_META, json.dumps(meta, indent=1))
    return meta


def load_data(data_dir: str | Path):
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    data_dir = Path(data_dir)
    if not (data_dir / DATA_FILE).is_file():
        raise InputError(f"{data_dir} holds no {DATA_FILE}: run head-surgeon organism prepare first")
    tensors = load_file(data_dir / DATA_FILE)
    tokenizer = AutoTokenizer.from_pretrained(data_dir)
    return tokenizer, tensors["train"].long(), tensors["heldout"].long()


# --- stage 2: pretraining ------------------------------------------------------------------------------
def build_model(config: OrganismConfig, tokenizer):
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, n_layer=config.layers, n_head=config.heads,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(config.seed)
    model = BloomForCausalLM(cfg)
    if not config.alibi:
        disable_alibi(model)
    return model


def disable_alibi(model) -> None:
    """Control experiment: every attention layer receives a zero ALiBi bias (the model then has no positional
    signal besides causal masking). A forward pre-hook on each attention module does it, so it holds whichever
    way transformers builds the bias (newer versions skip `build_alibi_tensor` when no attention mask is
    given) and under `fast_kernels`. Only for this process: a saved model always reloads with ALiBi."""
    last: list = [None, None]  # (incoming bias, its zeros): one zeros object per forward, shared by all layers

    def zero_alibi(module, args, kwargs):
        alibi = kwargs["alibi"] if "alibi" in kwargs else args[2]
        if last[0] is not alibi:
            last[:] = [alibi, torch.zeros_like(alibi)]
        if "alibi" in kwargs:
            return args, {**kwargs, "alibi": last[1]}
        return (*args[:2], last[1], *args[3:]), kwargs

    adapter = adapter_for(model)
    for layer in range(adapter.n_layer):
        adapter.attention(model, layer).register_forward_pre_hook(zero_alibi, with_kwargs=True)


def crops(stream: torch.Tensor, n: int, body: int, bos: int, generator: torch.Generator) -> torch.Tensor:
    """`n` random crops of `body` tokens, each prefixed with BOS."""
    starts = torch.randint(0, len(stream) - body, (n,), generator=generator)
    idx = starts[:, None] + torch.arange(body)[None, :]
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), stream[idx]], dim=1)


def lr_at(step: int, config: OrganismConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_frac + (1 - config.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def heldout_blocks(heldout: torch.Tensor, config: OrganismConfig, bos: int) -> torch.Tensor:
    blocks = pack_blocks(heldout, config.seq_len, bos)[: config.eval_blocks]
    if len(blocks) < 1:
        raise InputError("held-out split is shorter than one block: prepare with a larger held-out fraction")
    return blocks


def heldout_ppl(model, blocks: torch.Tensor, device, batch: int = 16) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return perplexity(mean_loss(model, blocks, batch))


def band_numbers(bos: np.ndarray) -> dict:
    """The numbers the organism is judged by, from a [layer, head] BOS-mass grid: share of heads above 0.5
    and the upper/lower head-index ratio."""
    half = bos.shape[1] // 2
    lower, upper = float(bos[:, :half].mean()), float(bos[:, half:].mean())
    return {
        "heads_over_0.5": int((bos > 0.5).sum()),
        "frac_over_0.5": float((bos > 0.5).mean()),
        "mean_bos_lower_half": lower,
        "mean_bos_upper_half": upper,
        "upper_to_lower": upper / max(lower, 1e-9),
    }


def band_summary(report: HeadReport) -> dict:
    """`band_numbers` of a diagnosis, with its column means and class counts."""
    return {**band_numbers(report.bos_mass), "column_mean_bos": report.column_mean_bos(), "counts": report.counts()}


def band_probe(model, adapter, blocks: torch.Tensor, step: int, train_loss: float) -> dict:
    """A quick band reading mid-pretraining (a few held-out blocks): where the collapse stands at `step`."""
    stats, _ = run_statistics(model, adapter, blocks.tolist(), batch_size=len(blocks))
    band = band_numbers(stats["bos_mass"])
    return {"step": step, "train_loss": round(train_loss, 4), "heads_over_0.5": band["heads_over_0.5"],
            "mean_bos_upper_half": round(band["mean_bos_upper_half"], 4),
            "max_bos": round(float(stats["bos_mass"].max()), 4)}


def pretrain_step(model, opt: torch.optim.Optimizer, params: list, ids: torch.Tensor, clip: float,
                  dp: DataParallel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on `ids` (bf16 autocast on CUDA, chunked loss, gradient all-reduce under torchrun,
    clipping); returns the loss and gradient norm as tensors, so the GPU is not waited for."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        hidden = model.transformer(input_ids=ids, use_cache=False).last_hidden_state
        loss = causal_lm_loss(model.lm_head, hidden, ids, chunk_tokens=8192)
    loss.backward()
    if dp is not None:
        dp.average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm


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
