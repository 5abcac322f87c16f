"""Named training recipes: head-surgeon's own defaults, and the choices of the paper's scripts.

A recipe fills in every setting the user did not give (a flag or a dialog field always wins), and its name
is recorded in the job, so a report says which recipe ran. `differences()` lists what `paper` changes,
with the reason, for the README and the report.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError

INIT_SCHEMES = ("xavier_uniform", "xavier_normal", "xavier_uniform_block")  # engine.surgery draws them
SLICE_DTYPE_NAMES = ("fp32", "bf16")  # engine.train.SLICE_DTYPES maps them to torch dtypes


@dataclass(frozen=True)
class Recipe:
    """The recipe-dependent settings of a surgery."""

    name: str
    init: str  # re-initialisation of a target's Q/K/V rows (engine.surgery.INIT_SCHEMES)
    slice_dtype: str  # "fp32": fp32 trainable slices and AdamW state; "bf16": both in bf16
    warmup_frac: float
    warmup_max_steps: int | None  # warm-up = min(this, floor(frac x total)); None: round(frac x total)
    keep_partial_step: bool  # the last, partial accumulation of an epoch is an optimizer step too
    patience: int | None  # stop a pass after this many evaluations without a better kept checkpoint
    select_on: str  # "heldout" | "tracked": the perplexity that picks the kept checkpoint (and early stopping)
    eval_at_epoch_ends: bool  # a run given in epochs evaluates at each epoch's end (unless --eval-every)


DEFAULT = Recipe(name="default", init="xavier_uniform", slice_dtype="fp32", warmup_frac=0.05, warmup_max_steps=None,
                 keep_partial_step=False, patience=None, select_on="heldout", eval_at_epoch_ends=False)

# The choices of the paper's surgery scripts (BLOOM-1b7 pass 1 and pass 2).
PAPER = Recipe(name="paper", init="xavier_uniform_block", slice_dtype="bf16", warmup_frac=0.25, warmup_max_steps=100,
               keep_partial_step=True, patience=6, select_on="tracked", eval_at_epoch_ends=True)

RECIPES = {r.name: r for r in (DEFAULT, PAPER)}
# JobInputs' fields that a recipe fills in when they are not given (eval_at_epoch_ends acts on eval_every)
RECIPE_FIELDS = ("init", "slice_dtype", "warmup_frac", "warmup_max_steps", "keep_partial_step", "patience", "select_on")

# Why each of the paper's choices differs from the default (README and `operate --help`).
WHY = {
    "init": "xavier_uniform_block: one Xavier-uniform draw over the head's whole [3d, hidden] Q/K/V block "
            "(bound sqrt(6/(hidden+3d))), as nn.init.xavier_uniform_ on that slice; the default draws q, k and v "
            "each as its own hidden -> d projection (bound sqrt(6/(hidden+d)), larger)",
    "slice_dtype": "bf16: the trained slices and AdamW's moments are bf16 (the scripts load the model in bf16 and "
                   "train its tensors directly), so many updates round away; the default keeps fp32 slices",
    "warmup": "min(100, total // 4) steps of linear warm-up; the default is 5% of the steps",
    "keep_partial_step": "the last accumulation of an epoch steps the optimizer even when it holds fewer than "
                         "grad-accum micro-batches (its loss still divided by grad-accum); the default drops it",
    "patience": "a pass stops after 6 evaluations without a lower selection perplexity; the default runs every step",
    "select_on": "the kept checkpoint (and early stopping) is chosen on the tracked in-domain set, the scripts' "
                 "'quick PPL' texts; the default chooses on the held-out blocks the verdict also reports",
    "eval_at_epoch_ends": "a run given in epochs is evaluated and checkpointed at each epoch's end, as the scripts "
                          "(checkpoint interval 1); the default evaluates ten times over --steps, every 50 steps "
                          "over --epochs",
}


def recipe(name: str | None) -> Recipe:
    """The recipe called `name` (None: the default); one line naming the choices when unknown."""
    if name in (None, ""):
        return DEFAULT
    try:
        return RECIPES[name]
    except KeyError:
        raise InputError(f"unknown recipe {name!r}: use one of {', '.join(RECIPES)}") from None


def differences(name: str) -> dict[str, str]:
    """What recipe `name` sets differently from the default, with the reason (empty for the default)."""
    r = recipe(name)
    fields = lambda k: ("warmup_frac", "warmup_max_steps") if k == "warmup" else (k,)  # noqa: E731
    return {k: why for k, why in WHY.items()
            if any(getattr(r, f) != getattr(DEFAULT, f) for f in fields(k))}
