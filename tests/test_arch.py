
import pytest
import torch
from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

from engine.arch import BloomAdapter, alibi_slopes
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
    assert a.qkv_rows(0) == slice(0, 384) and a.qkv_rows(15) == slice(15 * 384, 16 * 384)
    assert a.dense_cols(9) == slice(9 * 128, 10 * 128)


def test_non_bloom_config_is_refused():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="supports BLOOM"):
        BloomAdapter.from_config(GPT2Config())
