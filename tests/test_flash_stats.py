"""The statistics kernel (engine.flash_stats), run by Triton's CPU interpreter, against BLOOM's eager attention:
the same context and the same per-row statistics, in fp32 and bf16, for strided inputs, head sizes that are
not powers of two, lengths over several blocks and right-padded rows. (Speed is measured on a GPU by
docs/bench/flash_stats_gpu.py and `head-surgeon bench`.)"""

import math

import numpy as np
import pytest
import torch
from transformers.models.bloom.modeling_bloom import build_alibi_tensor

from engine import flash_stats, fused_stats
from engine.arch import BloomAdapter, MptAdapter
from engine.errors import InputError

pytest.importorskip("triton")  # in the dev extra; PyTorch's CUDA builds ship it


def eager_attention(q, k, v, lengths):
    """BLOOM's eager attention (modeling_bloom.BloomAttention.forward) on q, k, v [B, H, L, d] with right-padded
    rows of `lengths`: its context [B, L, H*d], scores [B, H, L, L] and additive mask [B, 1, L, L]."""
    batch, n_head, length, d = q.shape
    dtype = q.dtype
    pad = (torch.arange(length)[None] < torch.tensor(lengths)[:, None]).long()
    alibi = build_alibi_tensor(pad, n_head, dtype)
    flat = lambda x: x.reshape(batch * n_head, length, d)  # noqa: E731
    scores = alibi.baddbmm(flat(q), flat(k).transpose(1, 2), beta=1.0, alpha=1 / math.sqrt(d)).view(batch, n_head,
                                                                                                     length, length)
    visible = torch.ones(length, length, dtype=torch.bool).tril()[None] & pad.bool()[:, None, :]
    mask = torch.zeros(batch, 1, length, length, dtype=dtype).masked_fill(~visible[:, None], torch.finfo(dtype).min)
    probs = torch.softmax((scores + mask).float(), -1).to(dtype)
    ctx = (probs.view(batch * n_head, length, length) @ flat(v)).view(batch, n_head, length, d)
    return ctx.transpose(1, 2).reshape(batch, length, n_head * d), scores, mask, probs.float()


# query x key rows per block (CUDA's are 64 x 32). The kernel takes three kinds of key block: block 0, the blocks
# every row of a query block sees whole (no mask, no BOS or local sums), and from the block before the query
# block's first row on; at L = 140 the second kind occurs with every block shape here (from the query block
# that starts at row 3 x BLOCK_N on, rounded up to a multiple of BLOCK_M).
@pytest.mark.parametrize("blocks", [(32, 32), (64, 32), (16, 16), (32, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_computes_blooms_attention_its_statistics_and_head_norms(dtype, blocks, monkeypatch):
    monkeypatch.setattr(flash_stats, "_blocks", lambda head_dim, device: (*blocks, {}))
    batch, n_head, length, d = 2, 3, 140, 20  # several key blocks, the last partial; d padded to 32 lanes
    lengths = [140, 77]
    torch.manual_seed(0)
    fused = torch.randn(batch, length, n_head, 3, d).mul(1.5).to(dtype)  # BLOOM's [B, L, H, {q,k,v}, d] layout
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))  # strided views, as BLOOM's _reshape gives
    dense = torch.randn(7, n_head * d).to(dtype)  # an output projection: W_h = dense[:, h*d:(h+1)*d]
    w = dense.float().view(7, n_head, d).transpose(0, 1)
    gram = flash_stats.gram_parts(w.transpose(1, 2) @ w, dtype)
    ctx, rows = flash_stats.attention_with_statistics(q, k, v, fused_stats.alibi_slopes(n_head, "cpu"),
                                                      1 / math.sqrt(d), gram)
    want_ctx, scores, mask, probs = eager_attention(q, k, v, lengths)
    assert ctx.shape == (batch, length, n_head * d) and ctx.dtype == dtype and rows.shape == (4, n_head, batch, length)
    real = (torch.arange(length)[None] < torch.tensor(lengths)[:, None])  # [B, L]: rows the statistics count
    # bf16: the weights and the context are each rounded once, in another order than eager's (2^-8 apart)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert ((ctx - want_ctx).float().abs() / (1 + want_ctx.float().abs()))[real].max() < tol
    stats = rows.transpose(1, 2)  # [S, B, H, L]
    # the same scores reduced in fp32 (row_statistics, itself checked against eager's probabilities)
    want = fused_stats.row_statistics(scores, mask)
    for i, name in enumerate(("bos_mass", "entropy", "local_mass")):
        assert (stats[i] - want[i]).abs().transpose(1, 2)[real].max() < 2e-5, name
    if dtype == torch.float32:  # and against the eager probabilities themselves
        entropy = -torch.special.xlogy(probs, probs).sum(-1)
        direct = torch.stack((probs[..., 0], entropy, fused_stats.local_band(probs)))
        assert (stats[:3] - direct).abs().permute(0, 1, 3, 2)[:, real].max() < 1e-5
    assert stats[0, :, :, 0].allclose(torch.ones(())) and (stats[1] >= -1e-6).all()  # row 0 sees key 0 only
    # each head's output norm ||W_h c_h|| of the context the kernel returned, as the collector's fp32 formula
    c = ctx.float().view(batch, length, n_head, d)
    head_norm = torch.stack([(c[:, :, h] @ w[h].T).norm(dim=-1) for h in range(n_head)])  # [H, B, L]
    assert ((rows[3] - head_norm).abs() / head_norm.clamp_min(1e-3)).max() < (1e-5 if dtype == torch.float32 else 1e-4)


def test_query_blocks_smaller_than_key_blocks_are_refused(monkeypatch):
    """The key loop's three parts meet at multiples of BLOCK_N: a BLOCK_M that is not one would count keys twice."""
    monkeypatch.setattr(flash_stats, "_blocks", lambda head_dim, device: (16, 32, {}))
    q = torch.randn(1, 2, 40, 16)
    with pytest.raises(Exception, match="BLOCK_M must be a multiple of BLOCK_N"):
        flash_stats.attention_with_statistics(q, q, q, fused_stats.alibi_slopes(2, "cpu"), 0.25)


def test_output_norms_are_the_rows_norms_less_the_bias():
    y = torch.randn(2, 37, 1500).to(torch.bfloat16)  # width over one 1024-column block
    bias = torch.randn(1500).to(torch.bfloat16)
    want = (y.float() - bias.float()).norm(dim=-1).reshape(-1)
    assert (flash_stats.output_norms(y, bias) - want).abs().max() < 1e-4 * want.max()
    assert (flash_stats.output_norms(y, None) - y.float().norm(dim=-1).reshape(-1)).abs().max() < 1e-4 * want.max()


@pytest.mark.parametrize("budget", [None, 1])  # every layer's rows in one buffer; one layer at a time
def test_kernel_diagnosis_equals_the_eager_path_on_padded_batches(planted_dir, monkeypatch, budget):
    """run_statistics on the kernel path, with right-padded batches of prompts of different lengths: every
    layer's output and statistics come from the kernel (no probabilities, no mask), and BOS mass, entropy,
    local mass and contribution equal the eager path's in fp32, however many layers the row buffers hold."""
    from engine import diagnosis
    from engine.diagnosis import run_statistics, tokenize_prompts
    from engine.model import load_model
    from engine.prompts import builtin_prompts

    if budget is not None:
        monkeypatch.setattr(diagnosis, "ROWS_BUDGET_BYTES", budget)
    loaded = load_model(str(planted_dir), device="cpu")
    ids = [x[:n] for x, n in zip(tokenize_prompts(loaded.tokenizer, builtin_prompts()[:5], 40), (40, 7, 2, 23, 31))]
    assert len({len(x) for x in ids}) == 5  # every batch of 3 is padded
    eager, n_eager = run_statistics(loaded.model, loaded.adapter, ids, batch_size=3, path="eager")
    calls = []
    real = flash_stats.attention_with_statistics
    monkeypatch.setattr(flash_stats, "attention_with_statistics", lambda *a: calls.append(a[0].shape) or real(*a))
    kernel, n_kernel = run_statistics(loaded.model, loaded.adapter, ids, batch_size=3, path="kernel")
    assert n_eager == n_kernel and len(calls) == 2 * loaded.adapter.n_layer  # 2 batches, every layer
    for name in ("bos_mass", "entropy", "local_mass", "contribution"):
        np.testing.assert_allclose(kernel[name], eager[name], atol=1e-6, err_msg=name)
    assert eager["bos_mass"][0, 3] > 0.95  # the planted heads are there to be measured


def test_the_collector_drops_a_skipped_batch_and_refuses_a_batch_with_a_layer_missing(planted_dir):
    from engine.diagnosis import HeadStatsCollector
    from engine.model import load_model

    loaded = load_model(str(planted_dir), device="cpu")
    collector = HeadStatsCollector(loaded.model, loaded.adapter, hooks=False)
    collector.skip_batch()  # a rank's filler pass: rows written, nothing added
    for layer in range(loaded.adapter.n_layer):
        rows, norms = collector.layer_buffers(layer, 1, 4)
        rows.fill_(1.0)
        norms.fill_(1.0)
    collector.end_batch()
    assert collector.sums.abs().sum() == 0 and collector.layer_norm.abs().sum() == 0 and collector.count == 0
    collector.set_batch(torch.ones(1, 4, dtype=torch.long))
    collector.layer_buffers(0, 1, 4)[0].fill_(1.0)
    with pytest.raises(RuntimeError, match="measured 1 of 3 layers"):
        collector.end_batch()


def test_the_kernel_is_the_default_path_for_bloom_where_triton_runs(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100
    bloom, mpt = BloomAdapter(2, 4, 32), MptAdapter(2, 4, 32)
    assert fused_stats.default_path(bloom, torch.device("cuda")) == "kernel"
    assert fused_stats.default_path(bloom, torch.device("cpu")) == "eager"
    assert fused_stats.default_path(mpt, torch.device("cuda")) == "eager"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: no bf16 MMA
    assert fused_stats.default_path(bloom, torch.device("cuda")) == "scores"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(flash_stats, "triton", None)  # a CUDA install without Triton: the scores, reduced
    assert fused_stats.default_path(bloom, torch.device("cuda")) == "scores"


def test_asking_for_the_kernel_where_it_cannot_run_is_one_clear_error(monkeypatch):
    from engine.diagnosis import resolve_path

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InputError, match="needs Triton and a CUDA GPU"):
        resolve_path(BloomAdapter(2, 4, 32), torch.device("cpu"), "kernel")
    with pytest.raises(InputError, match="for BLOOM"):
        resolve_path(MptAdapter(2, 4, 32), torch.device("cuda"), "kernel")


def test_the_environment_names_the_path_for_every_diagnosis_and_a_bad_name_is_refused(monkeypatch, planted_dir):
    from engine.diagnosis import PATH_ENV, diagnose, resolve_path
    from engine.model import load_model
    from engine.prompts import builtin_prompts

    bloom = BloomAdapter(2, 4, 32)
    monkeypatch.setenv(PATH_ENV, "scores")
    assert resolve_path(bloom, torch.device("cpu")) == "scores"
    assert resolve_path(bloom, torch.device("cpu"), "eager") == "eager"  # an explicit path wins
    report = diagnose(load_model(str(planted_dir), device="cpu"), builtin_prompts()[:2])
    assert report.measurement["path"] == "scores"
    monkeypatch.setenv(PATH_ENV, "fast")
    with pytest.raises(InputError, match=f"{PATH_ENV} 'fast': use eager, or kernel or scores"):
        resolve_path(bloom, torch.device("cpu"))
    monkeypatch.setenv(PATH_ENV, "kernel")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(InputError, match=f"{PATH_ENV} 'kernel': the statistics kernel needs Triton"):
        resolve_path(bloom, torch.device("cpu"))
