"""Surgery slices: equal to the paper's gradient-mask method, and nothing else changes by a single bit."""

import copy

import pytest
import torch

from engine.arch import adapter_for
from engine.errors import InputError
from engine.loss import causal_lm_loss
from engine.surgery import SurgeryPlan, init_head_weights, operate
from helpers import tiny_model

TARGETS = [(0, 1), (2, 0), (2, 3)]


def _batches(model, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, model.config.vocab_size, (2, 12), generator=gen) for _ in range(n)]


def _loss(model, ids):
    hidden = model.transformer(input_ids=ids, use_cache=False).last_hidden_state
    return causal_lm_loss(model.lm_head, hidden, ids, chunk_tokens=7)


def _target_masks(model, adapter, targets):
    """Gradient masks of the paper's method: 1 on the targets' qkv rows and dense columns, else 0."""
    masks = {}
    for layer in sorted({l for l, _ in targets}):
        qkv, dense = adapter.qkv(model, layer), adapter.dense(model, layer)
        mw, mb, md = torch.zeros_like(qkv.weight), torch.zeros_like(qkv.bias), torch.zeros_like(dense.weight)
        for l, h in targets:
            if l == layer:
                mw[adapter.qkv_rows(h)] = 1
                mb[adapter.qkv_rows(h)] = 1
                md[:, adapter.dense_cols(h)] = 1
        masks[qkv.weight], masks[qkv.bias], masks[dense.weight] = mw, mb, md
    return masks


def test_slices_match_gradient_mask_method_step_by_step_and_touch_nothing_else():
    base = tiny_model().double()
    adapter = adapter_for(base)
    plan = SurgeryPlan(TARGETS, seed=3)
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    slices = operate(ours, adapter, plan, dtype=torch.float64)
    # The reference starts from the same surgery, then trains whole tensors with masked gradients.
    operate(ref, adapter, plan, dtype=torch.float64).export()
    masks = _target_masks(ref, adapter, TARGETS)
    for p in masks:
        p.requires_grad_(True)
        p.register_hook(lambda g, m=masks[p]: g * m)
    opt_ours = torch.optim.AdamW(slices.parameters(), lr=1e-2, weight_decay=0.0)
    opt_ref = torch.optim.AdamW(list(masks), lr=1e-2, weight_decay=0.0)
    for ids in _batches(base, 4):
        for model, opt, params in ((ours, opt_ours, list(slices.parameters())), (ref, opt_ref, list(masks))):
            _loss(model, ids).backward()
            torch.nn.utils.clip_grad_norm_(params, 0.05)  # small, so clipping is active
            opt.step()
            opt.zero_grad()
        with slices.exported():
            for (name, a), b in zip(ours.named_parameters(), ref.parameters(), strict=True):
                assert torch.allclose(a, b, atol=1e-10, rtol=0), name
    slices.export()
    # Bit-exact: every value outside the targets' rows/columns equals the stock model's.
    changed = 0
    stock = dict(base.named_parameters())
    target_masks = {id(p): m for p, m in _target_masks(ours, adapter, TARGETS).items()}
    for name, p in ours.named_parameters():
        mask = target_masks.get(id(p))
        outside = torch.ones_like(p, dtype=torch.bool) if mask is None else mask == 0
        assert torch.equal(p[outside], stock[name][outside]), name
        if mask is not None:
            changed += int((p[~outside] != stock[name][~outside]).sum())
    assert changed > 0


def test_hooked_slices_compute_the_same_function_as_the_exported_model():
    model = tiny_model()
    adapter = adapter_for(model)
    slices = operate(model, adapter, SurgeryPlan(TARGETS, seed=1))
    with torch.no_grad():
        for p in slices.parameters():  # stand-in for training: any values
            p.add_(torch.randn_like(p) * 0.1)
    ids = _batches(model, 1)[0]
    with torch.no_grad():
        hooked = model(ids).logits
        with slices.exported():
            assert not slices._handles
            exported = model(ids).logits
        assert torch.allclose(hooked, exported, atol=1e-5)
        assert torch.equal(model(ids).logits, hooked)  # training state restored after the block


def test_surgery_reinitialises_qkv_rows_and_zeroes_output_columns_only():
    model = tiny_model()
    adapter = adapter_for(model)
    stock = copy.deepcopy(model)
    plan = SurgeryPlan([(1, 2)], seed=7)
    operate(model, adapter, plan).export()
    fresh = init_head_weights(plan, adapter)[(1, 2)]
    qkv, dense = adapter.qkv(model, 1), adapter.dense(model, 1)
    rows, cols = adapter.qkv_rows(2), adapter.dense_cols(2)
    assert torch.equal(qkv.weight[rows], fresh)
    assert torch.count_nonzero(qkv.bias[rows]) == 0
    assert torch.count_nonzero(dense.weight[:, cols]) == 0
    assert torch.equal(dense.bias, adapter.dense(stock, 1).bias)  # the shared bias is never touched
    assert not any(p.requires_grad for p in model.parameters())
    # Same seed, same init, on any device; another seed differs.
    assert torch.equal(init_head_weights(plan, adapter)[(1, 2)], fresh)
    assert not torch.equal(init_head_weights(SurgeryPlan([(1, 2)], seed=8), adapter)[(1, 2)], fresh)


def test_plan_errors_are_clear():
    adapter = adapter_for(tiny_model())
    with pytest.raises(InputError, match="no target heads"):
        SurgeryPlan([])
    with pytest.raises(InputError, match="both targets and frozen"):
        SurgeryPlan([(0, 1)], frozen=[(0, 1)])
    with pytest.raises(InputError, match="unknown init scheme"):
        SurgeryPlan([(0, 1)], init="kaiming")
    with pytest.raises(InputError, match="out of range"):
        SurgeryPlan.from_specs("0.9", None, adapter)
    with pytest.raises(InputError, match="'sick' needs a diagnosis"):
        SurgeryPlan.from_specs("sick", None, adapter)
    plan = SurgeryPlan.from_specs("0-1.2-3", "2.0", adapter, seed=4)
    assert SurgeryPlan.from_dict(plan.to_dict(), adapter) == plan
