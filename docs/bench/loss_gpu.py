"""GPU check of the chunked loss's early gradient (engine.loss) against the checkpointed chunks it replaced
(logits recomputed in backward, autograd's gradient). Run from the repository root:
OUT=DIR python3 docs/bench/loss_gpu.py [SHAPE [CASE,CASE...]]

On a random-weight model of the shape (default bloom-1b7; bf16, B=8 x L=512, band heads): the loss, the
hidden states' gradient (largest and relative differences) and the memory peak of both for one batch, beside
what checkpointing plans reserve for the loss (engine.loss.peak_bytes), then our surgery step
(engine.bench.our_step_fn) with the two losses taking turns on each case, two rounds, the faster kept:
targets at layer 2n/3 in a first and a later epoch (the frozen-prefix cache), full or no checkpointing;
layer-0 targets, full and auto for 8 GiB; top-layer targets in later epochs; and the 16 GB card's
micro-batch 1 x 8 with loss chunks of 256 tokens. Writes loss_gpu_SHAPE.json into OUT."""

import json
import os
import sys

sys.path[:0] = ["."]
import torch  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402

import engine.bench as bench  # noqa: E402
from engine import loss as early  # noqa: E402
from engine.arch import adapter_for  # noqa: E402


def checkpointed_loss(lm_head, hidden, input_ids, attention_mask=None, chunk_tokens=1024, backward_scale=1.0):
    """The loss before the early gradient: every chunk checkpointed, its logits recomputed in backward."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk_tokens):
        total = total + checkpoint(early._chunk_loss_sum, lm_head, h[s : s + chunk_tokens],
                                   labels[s : s + chunk_tokens], use_reentrant=False)
    return total / labels.numel()


LOSSES = {"checkpointed": checkpointed_loss, "early": early.causal_lm_loss}


def main() -> None:
    shape_name = sys.argv[1] if len(sys.argv) > 1 else "bloom-1b7"
    shape, dev = bench.SHAPES[shape_name], torch.device("cuda")
    model = bench.build_random_model(shape, dev, torch.bfloat16)
    adapter = adapter_for(model)
    ids = bench.random_ids(shape.vocab, 8, 512, dev, 0)
    heads = bench.band_heads(shape.n_head)
    third, low, top = ([(layer, h) for h in heads] for layer in (2 * shape.n_layer // 3, 0, shape.n_layer - 1))
    step = bench.our_step_fn
    cases = {
        "third_full_first": lambda: step(model, adapter, third, "sdpa"),
        "third_full_later": lambda: step(model, adapter, third, "sdpa", prefix_cache=True),
        "third_none_first": lambda: step(model, adapter, third, "sdpa", checkpointing="none"),
        "third_none_later": lambda: step(model, adapter, third, "sdpa", prefix_cache=True, checkpointing="none"),
        "low_full": lambda: step(model, adapter, low, "sdpa"),
        "low_auto_8gib": lambda: step(model, adapter, low, "sdpa", micro_tokens=ids.numel(), checkpointing="auto",
                                      budget_gib=8.0),
        "top_none_later": lambda: step(model, adapter, top, "sdpa", prefix_cache=True, checkpointing="none"),
        "card_16gb": lambda: step(model, adapter, low, "sdpa", micro_batch=1, micro_tokens=512, checkpointing="auto",
                                  budget_gib=15.5, chunk_tokens=256),
    }
    if len(sys.argv) > 2:
        cases = {name: cases[name] for name in sys.argv[2].split(",")}

    result: dict = {"shape": shape_name, "gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                    "numerics": {}, "tokens_per_s": {}}
    torch.manual_seed(0)
    hidden = (torch.randn(8, 512, shape.hidden, device=dev) * 3).to(torch.bfloat16).requires_grad_()
    grads = {}
    for name, loss in LOSSES.items():
        loss(model.lm_head, hidden, ids, backward_scale=1 / 8)  # warm-up: compilation
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        value = loss(model.lm_head, hidden, ids, backward_scale=1 / 8)
        (grads[name],) = torch.autograd.grad(value / 8, hidden)
        result["numerics"][f"{name}_loss"] = float(value.detach())
        result["numerics"][f"{name}_peak_gib"] = round((torch.cuda.max_memory_allocated() - base) / 2**30, 3)
    result["numerics"]["peak_bytes_reserved_gib"] = round(early.peak_bytes(model.lm_head, 1024) / 2**30, 3)
    a, b = grads["early"].float(), grads["checkpointed"].float()
    result["numerics"].update(grad_max_abs_diff=float((a - b).abs().max()), grad_max_abs=float(b.abs().max()),
                              grad_relative_l2=float((a - b).norm() / b.norm()))
    print(result["numerics"], flush=True)

    runs: dict = {}
    for _ in range(2):
        for case, make in cases.items():
            for name, loss in LOSSES.items():  # the two losses take turns on each case
                bench.causal_lm_loss = loss
                r = bench.time_steps(make, dev, ids, 10, 2)
                runs.setdefault(case, {}).setdefault(name, []).append(r)
                print(case, name, r["tokens_per_s"], r.get("peak_gib"), flush=True)
    for case, by_loss in runs.items():
        best = {name: max(r, key=lambda x: x["tokens_per_s"]) for name, r in by_loss.items()}
        result["tokens_per_s"][case] = {name: b["tokens_per_s"] for name, b in best.items()} | {
            "peak_gib": {name: b.get("peak_gib") for name, b in best.items()},
            "early_vs_checkpointed": round(best["early"]["tokens_per_s"] / best["checkpointed"]["tokens_per_s"], 3)}
        print(case, result["tokens_per_s"][case])
    with open(os.path.join(os.environ.get("OUT", "."), f"loss_gpu_{shape_name}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
