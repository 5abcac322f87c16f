
import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from engine.arch import (BloomAdapter, FalconAdapter, MptAdapter, adapter_for, alibi_slopes, falcon_alibi_slopes,
                         mpt_alibi_slopes)
from engine.errors import UnsupportedModelError


@pytest.mark.parametrize("n_head", [16, 32, 112, 12, 70])
def test_slopes_equal_transformers(n_head):
    ours = alibi_slopes(n_head)
    theirs = _get_alibi_slopes(n_head, torch.device("cpu")).tolist()
    assert len(ours) == n_head
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("n_head", [16, 32])
def test_power_of_two_slopes_follow_the_formula(n_head):
    expected = [2 ** (-8 * (h + 1) / n_head) for h in range(n_head)]
    assert alibi_slopes(n_head) == pytest.approx(expected, rel=1e-6)
    assert alibi_slopes(n_head)[-1] == min(alibi_slopes(n_head))  # high-index heads have the smallest slopes


def test_head_slices_tile_the_fused_tensors():
    a = BloomAdapter(n_layer=2, n_head=16, hidden_size=2048)
    assert a.head_dim == 128
    assert a.qkv_rows(0).tolist() == list(range(384)) and a.qkv_rows(15).tolist() == list(range(15 * 384, 16 * 384))
    assert a.dense_cols(9) == slice(9 * 128, 10 * 128)
    # MPT: all queries, then all keys, then all values; a head's rows are its q, k and v rows in that order
    m = MptAdapter(n_layer=2, n_head=4, hidden_size=32)
    assert m.qkv_rows(1).tolist() == [*range(8, 16), *range(40, 48), *range(72, 80)]
    rows = torch.cat([m.qkv_rows(h) for h in range(4)])
    assert sorted(rows.tolist()) == list(range(96))  # the heads tile Wqkv exactly once


@pytest.mark.parametrize("n_head", [16, 32, 12, 6])
def test_mpt_and_falcon_slopes_are_their_transformers_biases(n_head):
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor as falcon_alibi
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    mpt = mpt_alibi_slopes(n_head, alibi_bias_max=8)
    bias = build_mpt_alibi_tensor(n_head, 5, alibi_bias_max=8)[:, 0]  # [H, 5]: slope * (j - 4)
    assert torch.allclose(bias, torch.tensor(mpt)[:, None] * torch.arange(-4, 1), atol=1e-6)
    assert mpt_alibi_slopes(n_head, alibi_bias_max=16) != mpt  # alibi_bias_max moves them
    d = 64
    alibi = falcon_alibi(torch.ones(1, 5, dtype=torch.long), n_head, torch.float32)[:, 0] / d ** 0.5  # as on logits
    # Falcon multiplies slope and position in bf16: equal to bf16 rounding (8 bits of mantissa)
    assert torch.allclose(alibi, torch.tensor(falcon_alibi_slopes(n_head, d))[:, None] * torch.arange(5), rtol=4e-3)


def test_other_families_are_refused_in_one_line_naming_the_supported_ones():
    from transformers import FalconConfig, GPT2Config, LlamaConfig

    for config in (GPT2Config(), LlamaConfig(), FalconConfig(alibi=False)):
        with pytest.raises(UnsupportedModelError, match="supports BLOOM .*, MPT .* and Falcon with ALiBi") as err:
            adapter_for(config)
        assert "\n" not in str(err.value)
    with pytest.raises(UnsupportedModelError, match="share keys and values"):
        adapter_for(FalconConfig(alibi=True, multi_query=True))
    assert isinstance(adapter_for(FalconConfig(alibi=True, multi_query=False)), FalconAdapter)
