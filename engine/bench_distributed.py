"""`head-surgeon bench --nproc N`: diagnosis and surgery of a random-weight model in a real shape, spread over
N processes (one GPU each) exactly as `operate` and `diagnose` spread them: the frozen base sharded with FSDP2,
each rank its share of every global batch, one all-reduce of the slices' gradients per step. With N = 1 the
same loop runs in one process on an unsharded model: the baseline of the scaling efficiency.

Reports global tokens/s and every rank's peak GPU memory; rank 0 prints and writes."""

from __future__ import annotations

import time

import torch

from .bench import GiB, SHAPES, band_heads, build_random_model, random_ids
from .diagnosis import run_statistics
from .distributed import all_sum, spread, world
from .fastpath import fast_kernels
from .loss import causal_lm_loss
from .surgery import SurgeryPlan, operate
from .checkpointing import disable_checkpointing, enable_checkpointing
from .train import MicroGradients


def _model(shape_name: str, device: torch.device, dtype: torch.dtype):
    from transformers import BloomConfig

    from .arch import adapter_for
    from .sharded_load import random_sharded

    shape = SHAPES[shape_name]
    if not world().active:
        model = build_random_model(shape, device, dtype)
        return model, adapter_for(model)
    config = BloomConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, n_layer=shape.n_layer,
                         n_head=shape.n_head, hidden_dropout=0.0, attention_dropout=0.0)
    adapter = adapter_for(config)
    model = random_sharded(config, adapter, dtype, device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, adapter


def _synced(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    all_sum(torch.zeros(1, device=device))  # every rank at the same point
    return time.perf_counter()


def _peaks(device: torch.device) -> list[float] | None:
    """Every rank's peak allocated GPU memory (GiB), gathered on every rank."""
    if device.type != "cuda":
        return None
    w = world()
    peaks = torch.zeros(w.size, dtype=torch.float64, device=device)
    peaks[w.rank] = torch.cuda.max_memory_allocated(device) / GiB
    return [round(x, 3) for x in all_sum(peaks).tolist()]


def _reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_distributed_bench(shape_name: str, device: torch.device, *, batch: int = 8, seq_len: int = 512,
                          steps: int = 3, warmup: int = 1, diag_batches: int = 4) -> dict:
    """Diagnosis and surgery steps (band heads of the top-third layer, micro-batch 1 x accumulation `batch`,
    the paper's step) over this world; tokens/s are global (all ranks together)."""
    w = world()
    shape = SHAPES[shape_name]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    _reset(device)
    t0 = time.perf_counter()
    model, adapter = _model(shape_name, device, dtype)
    load_s = time.perf_counter() - t0
    after_load = _peaks(device)

    # diagnosis: the statistics path, each rank its share of the global batches
    prompts = [row.tolist() for i in range(max(diag_batches, w.size))
               for row in random_ids(shape.vocab, batch, seq_len, "cpu", 1 + i)]  # at least a batch for each rank
    run_statistics(model, adapter, prompts[:batch * max(1, w.size)], batch_size=batch)  # warm-up
    _reset(device)
    t0 = _synced(device)
    run_statistics(model, adapter, prompts, batch_size=batch)
    diag_s = _synced(device) - t0
    diagnosis = {"tokens_per_s": round(len(prompts) * seq_len / diag_s, 1), "seconds": round(diag_s, 3),
                 "peak_gib_per_rank": _peaks(device)}

    # surgery: the training loop's step
    heads = band_heads(shape.n_head)
    layer = 2 * shape.n_layer // 3
    slices = operate(model, adapter, SurgeryPlan([(layer, h) for h in heads]))
    params = list(slices.parameters())
    optimizer = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
    enable_checkpointing(model)
    model.train()
    body = adapter.body(model)

    def step(ids: torch.Tensor) -> None:
        micro = [ids[i : i + 1] for i in range(len(ids))]
        slots = MicroGradients(params, len(micro)) if w.active else None
        with fast_kernels(model, adapter):
            for (k, one), real in spread(list(enumerate(micro))):
                one = one.to(device)
                loss = causal_lm_loss(model.lm_head, body(input_ids=one, use_cache=False).last_hidden_state, one,
                                      backward_scale=1 / len(micro))
                (loss / len(micro) if real else loss * 0.0).backward()
                if slots is not None:
                    if real:
                        slots.keep(k, float(loss.detach()))
                    optimizer.zero_grad(set_to_none=True)
        if slots is not None:
            slots.sum_over_ranks()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    ids = random_ids(shape.vocab, batch, seq_len, "cpu", 0)
    try:
        for _ in range(warmup):
            step(ids)
        _reset(device)
        t0 = _synced(device)
        for _ in range(steps):
            step(ids)
        train_s = _synced(device) - t0
    finally:
        model.eval()
        disable_checkpointing(model)
    surgery = {"tokens_per_s": round(steps * batch * seq_len / train_s, 1),
               "seconds_per_step": round(train_s / steps, 3),
               "peak_gib_per_rank": _peaks(device), "target_layer": layer, "target_heads": heads}
    return {"shape": shape_name, "config": shape.__dict__, "world_size": w.size, "backend": w.backend,
            "batch": batch, "seq_len": seq_len, "steps": steps, "micro_batch": 1, "grad_accum": batch,
            "device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": str(dtype).replace("torch.", ""), "load_seconds": round(load_s, 2),
            "peak_gib_per_rank_after_load": after_load, "diagnosis": diagnosis, "surgery": surgery,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}


SCALING_GOAL = {2: 1.8}  # issue 19: bloom-7b1 surgery on 2 GPUs at least 1.8x one GPU


def scaling(result: dict, baseline: dict) -> dict:
    """This run's tokens/s over a run of the same shape and batch on fewer processes (`--baseline FILE`)."""
    from .errors import InputError

    same = ("shape", "batch", "seq_len", "grad_accum", "dtype")
    if any(result[k] != baseline.get(k) for k in same) or baseline.get("world_size", 0) >= result["world_size"]:
        raise InputError(f"the baseline must be a bench --nproc run of the same {', '.join(same)} on fewer "
                         f"processes (it has {[baseline.get(k) for k in (*same, 'world_size')]})")
    out = {"baseline_world_size": baseline["world_size"]}
    for case in ("diagnosis", "surgery"):
        out[case] = round(result[case]["tokens_per_s"] / baseline[case]["tokens_per_s"], 3)
    out["goal"] = SCALING_GOAL.get(result["world_size"]) if baseline["world_size"] == 1 else None
    return out


def print_distributed_bench(result: dict, console) -> None:
    r, d, s = result, result["diagnosis"], result["surgery"]
    console.print(f"{r['shape']} shape over {r['world_size']} process(es) ({r['backend'] or 'one process'}, "
                  f"{r['gpu'] or r['device']}, {r['dtype']}), B={r['batch']} x L={r['seq_len']}")
    console.print(f"  load (random weights) {r['load_seconds']} s; peak GiB per rank after load "
                  f"{r['peak_gib_per_rank_after_load'] or '—'}")
    console.print(f"  diagnosis {d['tokens_per_s']:,.0f} tok/s; peak GiB per rank {d['peak_gib_per_rank'] or '—'}")
    console.print(f"  surgery (heads {s['target_heads'][0]}-{s['target_heads'][-1]} of layer {s['target_layer']}, "
                  f"micro-batch 1 x {r['grad_accum']}) {s['tokens_per_s']:,.0f} tok/s, "
                  f"{s['seconds_per_step']} s a step; "
                  f"peak GiB per rank {s['peak_gib_per_rank'] or '—'}")
    if "scaling" in r:
        sc = r["scaling"]
        verdict = "" if sc["goal"] is None else f" (goal {sc['goal']:g}x: {'met' if sc['surgery'] >= sc['goal'] else 'missed'})"
        console.print(f"  against {sc['baseline_world_size']} process(es): surgery {sc['surgery']}x{verdict}, "
                      f"diagnosis {sc['diagnosis']}x")
