"""`head-surgeon bench`: the paper-style surgery loop and ours, side by side, on random weights in real
BLOOM shapes (no download). Surgery step tokens/s and peak memory for targets in the lowest and the top
layer; diagnosis tokens/s and peak memory, and how diagnosis memory scales with depth."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .arch import BloomAdapter, adapter_for
from .diagnosis import resolve_path, run_statistics
from .fastpath import fast_kernels
from .prefix_cache import PrefixCache
from .loss import causal_lm_loss
from .surgery import SurgeryPlan, operate
from .checkpointing import apply_checkpointing, disable_checkpointing, free_bytes, optimizer_bytes, plan_for_training

GiB = 2**30
AUTO_BUDGET_GIB = 8.0  # issue 17: checkpointing chosen by memory, peak at most 8 GiB on bloom-1b7
CARD_BUDGET_GIB = 15.5  # issue 17: bloom-7b1 surgery on a 16 GB card
CARD_CHUNK_TOKENS = 256  # ... with the loss's logits held for 256 tokens at a time (1024: 0.7 GiB more)


@dataclass(frozen=True)
class Shape:
    hidden: int
    n_layer: int
    n_head: int
    vocab: int = 250880


SHAPES = {
    "bloom-560m": Shape(1024, 24, 16),
    "bloom-1b7": Shape(2048, 24, 16),
    "bloom-3b": Shape(2560, 30, 32),
    "bloom-7b1": Shape(4096, 30, 32),
    "bloom-176b": Shape(14336, 70, 112),
    "tiny": Shape(64, 4, 4, 1000),
}


def build_random_model(shape: Shape, device: torch.device, dtype: torch.dtype):
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, n_layer=shape.n_layer, n_head=shape.n_head,
                         hidden_dropout=0.0, attention_dropout=0.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = BloomForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def band_heads(n_head: int) -> list[int]:
    """The low-slope band as in BLOOM-1b7 (H9-H15 of 16), scaled to the head count."""
    return list(range(n_head * 9 // 16, n_head))


class Meter:
    """Wall time and peak memory of a block of steps (CUDA: allocator peak; CPU: not measured)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def measure(self, out: dict):
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
        t0 = time.perf_counter()
        yield
        self.sync()
        out["seconds"] = time.perf_counter() - t0
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
            out["peak_gib"] = round(peak / GiB, 3)
            out["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(self.device) / GiB, 3)  # allocator's
            out["activation_peak_gib"] = round((peak - base) / GiB, 3)


def random_ids(vocab: int, batch: int, seq_len: int, device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq_len), generator=gen).to(device)


def reference_step_fn(model, adapter, targets):
    """The paper-style loop: whole fused tensors trainable, gradients masked outside the targets, HF loss over
    full logits, transformers' own gradient checkpointing (input gradients forced on), eager attention."""
    params, handles = [], []
    for layer in sorted({l for l, _ in targets}):
        qkv, dense = adapter.qkv(model, layer), adapter.dense(model, layer)
        for tensor, index in ((qkv.weight, lambda h: (adapter.qkv_rows(h),)), (qkv.bias, lambda h: (adapter.qkv_rows(h),)),
                              (dense.weight, lambda h: (slice(None), adapter.dense_cols(h)))):
            mask = torch.zeros_like(tensor)
            for l, h in targets:
                if l == layer:
                    mask[index(h)] = 1
            tensor.requires_grad_(True)
            handles.append(tensor.register_hook(lambda g, m=mask: g * m))
            params.append(tensor)
    model.gradient_checkpointing_enable()  # transformers' defaults, as a plain fine-tuning script has them
    model.train()
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)

    def step(ids):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cleanup():
        model.eval()
        model.disable_input_require_grads()  # else its hook outlives this case and taxes the next one
        disable_checkpointing(model)
        for handle in handles:
            handle.remove()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        opt.state.clear()

    return step, cleanup


def our_step_fn(model, adapter, targets, attention: str, prefix_cache: bool = False, *, micro_batch: int | None = None,
                micro_tokens: int = 8 * 512, seq_len: int = 512, checkpointing: str = "full",
                budget_gib: float | None = None, plans: list | None = None, chunk_tokens: int = 1024):
    """Our path: slice parameters only, chunked cross-entropy, backward stopping at the lowest target layer,
    SDPA attention (or eager, to separate the kernel's share). With `prefix_cache` the frozen layers below the
    lowest target are kept on the first (warm-up) step and fed afterwards, as in a second epoch. `micro_batch`:
    the step's blocks in micro-batches of that many (accumulated), as the paper's recipe runs them.
    `checkpointing` as the training loop plans it (engine.checkpointing) for micro-batches of `micro_tokens`
    in sequences of `seq_len` (auto and selective measure what a layer keeps), from the free memory, or from
    `budget_gib` less what is allocated (a smaller card); the plan is appended to `plans`."""
    slices = operate(model, adapter, SurgeryPlan(targets))
    lowest = min(l for l, _ in targets)
    device = next(model.parameters()).device
    if budget_gib is None:
        free = free_bytes(device)
    else:
        free = int(budget_gib * GiB) - (torch.cuda.memory_allocated(device) if device.type == "cuda" else 0)
    plan = plan_for_training(checkpointing, model, adapter, random_ids(model.config.vocab_size, 1, seq_len, device, 0),
                             sdpa=attention == "sdpa", lowest=lowest, tokens=micro_tokens, free=free,
                             reserve=optimizer_bytes(slices.parameters()), chunk_tokens=chunk_tokens)
    if plans is not None:
        plans.append(plan.to_dict())
    apply_checkpointing(model, adapter, plan)
    model.train()
    opt = torch.optim.AdamW(slices.parameters(), lr=5e-5, weight_decay=0.0)
    body = model.transformer
    cache = PrefixCache(adapter.blocks(model), lowest, 2**40) if prefix_cache else None

    def step(ids):
        size = micro_batch or len(ids)
        with fast_kernels(model, adapter, attention == "sdpa"):
            for start in range(0, len(ids), size):
                part = ids[start : start + size]
                with cache.around(torch.arange(start, start + len(part))) if cache else contextlib.nullcontext():
                    hidden = body(input_ids=part, use_cache=False).last_hidden_state
                share = len(part) / len(ids)
                loss = causal_lm_loss(model.lm_head, hidden, part, chunk_tokens=chunk_tokens, backward_scale=share)
                (loss * share).backward()
        torch.nn.utils.clip_grad_norm_(slices.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def cleanup():
        model.eval()
        disable_checkpointing(model)
        slices.export()
        opt.state.clear()

    return step, cleanup


def time_steps(make, device, ids, steps: int, warmup: int) -> dict:
    step, cleanup = make()
    meter = Meter(device)
    out: dict = {}
    try:
        for _ in range(warmup):
            step(ids)
        with meter.measure(out):
            for _ in range(steps):
                step(ids)
    finally:
        cleanup()
    out["tokens_per_s"] = round(ids.numel() * steps / out["seconds"], 1)
    return out


def turns(names: list[str], rounds: int) -> list[str]:
    """The order cases take turns in: every case once a round, each round starting one case later."""
    return [name for r in range(rounds) for name in names[r % len(names):] + names[: r % len(names)]]


def time_step_cases(cases: dict, device, ids, steps: int, rounds: int = 3) -> dict:
    """Each case's fastest of `rounds` blocks of `steps` measured steps, every block after its own set-up and
    warm-up (`cases`: name -> (make, warm-up steps)), with its index (`fastest_round`); its peak memory the
    largest of its rounds, and every round's tokens/s kept. The cases take turns (`turns`): conditions on a GPU
    drift over a run, and a case timed only once has read 2x off (docs/benchmarks.md)."""
    runs: dict = {name: [] for name in cases}
    for name in turns(list(cases), rounds):
        make, warmup = cases[name]
        runs[name].append(time_steps(make, device, ids, steps, warmup))
    result = {}
    for name, done in runs.items():
        fastest = min(range(len(done)), key=lambda i: done[i]["seconds"])
        best = {**done[fastest], "fastest_round": fastest}
        for key in ("peak_gib", "peak_reserved_gib", "activation_peak_gib"):
            if key in best:
                best[key] = max(run[key] for run in done)
        best["rounds_tokens_per_s"] = [run["tokens_per_s"] for run in done]
        result[name] = best
    return result


@torch.no_grad()
def diagnosis_reference(model, ids_batches) -> None:
    """What published sink studies do: output_attentions=True over the full model, logits included."""
    for ids in ids_batches:
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
        torch.stack([a[..., 0].float().mean(dim=(0, 2)) for a in out.attentions])


def time_diagnoses(cases: dict, device, ids_batches, rounds: int = 5) -> dict:
    """Each case's fastest of `rounds` runs over the batches, after a warm-up, its time, tokens/s and peak memory.
    The cases take turns within every round, so a ratio of two compares runs made under the same conditions (a
    run takes a fraction of a second on a GPU, and conditions there drift by several percent over a minute), in
    the order of `turns`."""
    for fn in cases.values():
        fn(ids_batches[:1])  # warm-up: compilation
    runs: dict = {name: [] for name in cases}
    for name in turns(list(cases), rounds):
        out: dict = {}
        with Meter(device).measure(out):
            cases[name](ids_batches)
        runs[name].append(out)
    tokens = sum(x.numel() for x in ids_batches)
    best = {name: min(r, key=lambda run: run["seconds"]) for name, r in runs.items()}
    return {name: {**b, "tokens_per_s": round(tokens / b["seconds"], 1)} for name, b in best.items()}


PARTS = ("surgery", "diagnosis")


def _ratio(a: dict, b: dict, key: str):
    return round(a[key] / b[key], 2) if a.get(key) and b.get(key) else None


def _meets(a: dict, b: dict, goal: float) -> bool:
    """Whether a's tokens/s is at least `goal` times b's, unrounded (0.8996 does not meet 0.9)."""
    return bool(a.get("tokens_per_s") and b.get("tokens_per_s")) and a["tokens_per_s"] >= goal * b["tokens_per_s"]


def run_bench(shape_name: str, device: str | None = None, *, batch: int = 8, seq_len: int = 512, steps: int = 5,
              warmup: int = 2, rounds: int = 3, diag_batches: int = 12, parts: tuple[str, ...] = PARTS) -> dict:
    """Every case of `parts` (surgery, diagnosis) on one model of the shape, side by side; the surgery cases take
    turns over `rounds` rounds of `steps` measured steps each."""
    from .runtime import resolve_device

    shape = SHAPES[shape_name]
    dev = resolve_device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = build_random_model(shape, dev, dtype)
    adapter = adapter_for(model)
    result = {
        "shape": shape_name, "config": shape.__dict__, "batch": batch, "seq_len": seq_len, "steps": steps,
        "device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "cuda_alloc_conf": __import__("os").environ.get("PYTORCH_CUDA_ALLOC_CONF"), "parts": list(parts),
        "rounds": rounds,
    }
    if "surgery" in parts:
        result.update(_surgery_cases(model, adapter, shape, dev, batch, seq_len, steps, warmup, rounds))
    if "diagnosis" in parts:
        result.update(_diagnosis_cases(model, adapter, shape, dev, batch, seq_len, diag_batches))
    return result


def _surgery_cases(model, adapter, shape: Shape, dev, batch: int, seq_len: int, steps: int, warmup: int,
                   rounds: int) -> dict:
    heads = band_heads(shape.n_head)
    ids = random_ids(shape.vocab, batch, seq_len, dev, 0)
    placements = {"low": 0, "high": shape.n_layer - 1}
    band = {where: [(layer, h) for h in heads] for where, layer in placements.items()}
    third = [(2 * shape.n_layer // 3, h) for h in heads]  # targets at the bottom of the top third
    top = band["high"]
    plans: dict = {}

    def ours(name, targets, attention="sdpa", **kw):  # (make, warm-up steps); the prefix cache fills on warm-up
        plans[name] = []
        return (lambda: our_step_fn(model, adapter, targets, attention, seq_len=seq_len, plans=plans[name], **kw),
                max(warmup, 1) if kw.get("prefix_cache") else warmup)

    auto = dict(micro_tokens=ids.numel(), checkpointing="auto")
    auto_8gib = dict(auto, budget_gib=AUTO_BUDGET_GIB)
    cases = {
        # the frozen-prefix cache: a first epoch (no cache to read) and every later one (the prefix fed from the
        # cache), checkpointing chosen from the free memory as a run does; top-layer targets in later epochs
        "prefix/first_epoch": ours("prefix/first_epoch", third, **auto),
        "prefix/later_epochs": ours("prefix/later_epochs", third, prefix_cache=True, **auto),
        "prefix/top_layer_later_epochs": ours("prefix/top_layer_later_epochs", top, prefix_cache=True),
        # the paper's recipe on a 16 GB card: micro-batch 1 x accumulation 8, band of layer 0 (backward through
        # every layer), checkpointing chosen for 15.5 GiB, the loss's logits in chunks of 256 tokens
        "card": ours("card", band["low"], micro_batch=1, micro_tokens=seq_len, checkpointing="auto",
                     budget_gib=CARD_BUDGET_GIB, chunk_tokens=CARD_CHUNK_TOKENS),
        # top-layer targets in later epochs with both: checkpointing for 8 GiB and the prefix fed from the cache
        "ours_auto_8gib/high_later_epochs": ours("ours_auto_8gib/high_later_epochs", top, prefix_cache=True,
                                                 **auto_8gib),
    }
    for where, targets in band.items():
        cases[f"ours/{where}"] = ours(f"ours/{where}", targets)
        # checkpointing chosen by memory, for a card with 8 GiB (the goal's budget)
        cases[f"ours_auto_8gib/{where}"] = ours(f"ours_auto_8gib/{where}", targets, **auto_8gib)
        cases[f"ours_eager/{where}"] = ours(f"ours_eager/{where}", targets, "eager")
        cases[f"reference/{where}"] = ((lambda t=targets: reference_step_fn(model, adapter, t)), warmup)
    timed = time_step_cases(cases, dev, ids, steps, rounds)
    for name, row in timed.items():
        if plans.get(name):  # the plan its fastest round ran; every round's where they differ
            row["plan"] = plans[name][row["fastest_round"]]
            if any((p["mode"], p["checkpointed"]) != (row["plan"]["mode"], row["plan"]["checkpointed"])
                   for p in plans[name]):
                row["round_plans"] = plans[name]
    surgery: dict = {"reference": {}, "ours": {}, "ours_eager": {}, "ours_auto_8gib": {}}
    for name, row in timed.items():
        group, _, where = name.partition("/")
        if group in surgery:
            surgery[group][where] = row
    order = ("low", "high", "high_later_epochs")
    surgery["ours_auto_8gib"] = {w: surgery["ours_auto_8gib"][w] for w in order}
    prefix = {w.removeprefix("prefix/"): timed[w] for w in timed if w.startswith("prefix/")}
    card = timed["card"]
    card.update(budget_gib=CARD_BUDGET_GIB, loss_chunk_tokens=CARD_CHUNK_TOKENS)
    auto_plans = [surgery["ours_auto_8gib"][w]["plan"] for w in order]
    prefix_plans = [prefix[w]["plan"] for w in ("first_epoch", "later_epochs")]

    return {
        "target_heads": heads,
        "surgery": surgery,
        "speedup": {w: _ratio(surgery["ours"][w], surgery["reference"][w], "tokens_per_s") for w in placements},
        "speedup_from_sdpa": {w: _ratio(surgery["ours"][w], surgery["ours_eager"][w], "tokens_per_s") for w in placements},
        "memory_ratio": {w: _ratio(surgery["reference"][w], surgery["ours"][w], "peak_gib") for w in placements},
        "high_vs_low_cost": _ratio(surgery["ours"]["high"], surgery["ours"]["low"], "tokens_per_s"),
        "checkpointing_auto_8gib": {"plans": dict(zip((*placements, "high_later_epochs"), auto_plans)),
                                    "budget_gib": AUTO_BUDGET_GIB,
                                    "vs_reference": {w: _ratio(surgery["ours_auto_8gib"][w],
                                                              surgery["reference"][w.removesuffix("_later_epochs")],
                                                              "tokens_per_s") for w in surgery["ours_auto_8gib"]},
                                    "goals": {"low": 2.0, "high": 4.0, "high_later_epochs": 4.0}},
        "card_16gb": card,
        "prefix_cache": {**prefix, "target_layer": third[0][0],
                         "plans": dict(zip(("first_epoch", "later_epochs"), prefix_plans)),
                         "later_vs_first": _ratio(prefix["later_epochs"], prefix["first_epoch"], "tokens_per_s"),
                         "goal": 3.0,
                         "top_layer_later_vs_reference": _ratio(prefix["top_layer_later_epochs"],
                                                               surgery["reference"]["high"], "tokens_per_s")},
    }


def _diagnosis_cases(model, adapter, shape: Shape, dev, batch: int, seq_len: int, diag_batches: int) -> dict:
    batches = [random_ids(shape.vocab, batch, seq_len, dev, 1 + i) for i in range(diag_batches)]
    # diagnosis takes token lists, as the tokenizer gives them: made here, not in the timed runs (their batching
    # and the copies to the GPU are timed)
    token_lists = {id(b): b.cpu().tolist() for b in batches}

    def ours_diag(bs, a=adapter, path=None):  # the default path: the statistics kernel for BLOOM on CUDA
        run_statistics(model, a, [row for b in bs for row in token_lists[id(b)]], batch_size=batch, path=path)

    @torch.no_grad()
    def plain_forward(bs):  # what diagnosis would cost if it were free: the body's forward through SDPA
        model.eval()
        with fast_kernels(model, adapter):
            for b in bs:
                model.transformer(input_ids=b, use_cache=False)

    cases = {"reference": lambda bs: diagnosis_reference(model, bs), "ours": ours_diag,
             "ours_scores": lambda bs: ours_diag(bs, path="scores"),  # the GPU's fallback without the kernel
             "ours_eager_probabilities": lambda bs: ours_diag(bs, path="eager"), "plain_sdpa_forward": plain_forward}
    if dev.type != "cuda":
        del cases["ours_scores"]
    diagnosis = time_diagnoses(cases, dev, batches)
    diagnosis.setdefault("ours_scores", {})
    # Depth scaling: the same diagnosis through the first half of the layers only.
    full_layers, half = model.transformer.h, shape.n_layer // 2
    model.transformer.h = full_layers[:half]
    try:
        half_adapter = BloomAdapter(half, adapter.n_head, adapter.hidden_size)
        diagnosis.update(time_diagnoses({"ours_half_depth": lambda bs: ours_diag(bs, half_adapter)}, dev, batches))
    finally:
        model.transformer.h = full_layers

    return {
        "diagnosis": diagnosis,
        "diag_batches": diag_batches,
        "diagnosis_path": resolve_path(adapter, dev),
        "diagnosis_speedup": _ratio(diagnosis["ours"], diagnosis["reference"], "tokens_per_s"),
        "diagnosis_vs_forward": _ratio(diagnosis["ours"], diagnosis["plain_sdpa_forward"], "tokens_per_s"),
    }


def print_bench(result: dict, console) -> None:
    """The bench's tables and every goal with met / missed, for the parts that ran."""
    if "surgery" in result:
        _print_surgery(result, console)
    if "diagnosis" in result:
        _print_diagnosis(result, console)


def _print_surgery(result: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"surgery step, {result['shape']} shape, B={result['batch']} x L={result['seq_len']}, "
                        f"heads {result['target_heads'][0]}-{result['target_heads'][-1]} of one layer "
                        f"({result['gpu'] or result['device']})")
    for col in ("path", "targets", "tokens/s", "peak GiB"):
        table.add_column(col, justify="right")
    for path, rows in result["surgery"].items():
        for where, row in rows.items():
            table.add_row(path, f"{where} layer", f"{row['tokens_per_s']:,.0f}", str(row.get("peak_gib", "—")))
    console.print(table)
    console.print(f"speedup {result['speedup']}, memory ratio {result['memory_ratio']}, "
                  f"SDPA share {result['speedup_from_sdpa']}")
    a = result["checkpointing_auto_8gib"]
    for where, goal in a["goals"].items():
        row, got = result["surgery"]["ours_auto_8gib"][where], a["vs_reference"][where]
        reference = result["surgery"]["reference"][where.removesuffix("_later_epochs")]
        verdict = "memory not measured on CPU" if row.get("peak_gib") is None else \
            "met" if _meets(row, reference, goal) and row["peak_gib"] <= a["budget_gib"] else "missed"
        console.print(f"checkpointing auto for {a['budget_gib']:g} GiB, {where} layer: {a['plans'][where]['mode']}, "
                      f"{got}x the paper-style loop, peak {row.get('peak_gib', '—')} GiB (goal {goal:g}x within "
                      f"{a['budget_gib']:g} GiB: {verdict})")
    c = result["card_16gb"]
    held = c.get("peak_reserved_gib")  # what the process holds from the GPU (the allocator's peak), not only in use
    verdict = "not measured on CPU" if held is None else "met" if held <= c["budget_gib"] else "missed"
    console.print(f"16 GB card (micro-batch 1 x 8, layer-0 band, checkpointing {c['plan']['mode']}): peak "
                  f"{c.get('peak_gib', '—')} GiB allocated, {held or '—'} GiB reserved, {c['tokens_per_s']:,.0f} "
                  f"tok/s (goal {c['budget_gib']:g} GiB reserved: {verdict})")
    p = result["prefix_cache"]
    met = "met" if _meets(p["later_epochs"], p["first_epoch"], p["goal"]) else "missed"
    console.print(f"frozen-prefix cache, targets in layer {p['target_layer']} (checkpointing "
                  f"{p['plans']['first_epoch']['mode']} / {p['plans']['later_epochs']['mode']}): later epochs "
                  f"{p['later_epochs']['tokens_per_s']:,.0f} tok/s vs first {p['first_epoch']['tokens_per_s']:,.0f} "
                  f"({p['later_vs_first']}x; goal {p['goal']:g}x: {met}); top-layer targets in later epochs "
                  f"{p['top_layer_later_epochs']['tokens_per_s']:,.0f} tok/s, {p['top_layer_later_vs_reference']}x the "
                  "paper-style loop")


def _print_diagnosis(result: dict, console) -> None:
    from rich.table import Table

    diag = Table(title=f"diagnosis, {result['shape']} shape, {result['diag_batches']} batches of B={result['batch']} x "
                       f"L={result['seq_len']} (ours: the {result['diagnosis_path']} path)")
    for col in ("path", "tokens/s", "peak GiB", "activation peak GiB"):
        diag.add_column(col, justify="right")
    for path, row in result["diagnosis"].items():
        if row:  # ours_scores: GPU only
            diag.add_row(path, f"{row['tokens_per_s']:,.0f}", str(row.get("peak_gib", "—")),
                         str(row.get("activation_peak_gib", "—")))
    console.print(diag)
    vs = result["diagnosis_vs_forward"]
    met = _meets(result["diagnosis"]["ours"], result["diagnosis"]["plain_sdpa_forward"], 0.9)
    console.print(f"diagnosis speedup over output_attentions {result['diagnosis_speedup']}; diagnosis_vs_forward {vs} "
                  f"(goal 0.9: {'met' if met else 'missed'})")
