"""The chunked loss: with a frozen head its gradient is taken in the forward pass (logits computed once, never
again in backward) and equals the checkpointed chunks' (logits recomputed in backward, autograd's gradient) to
rounding; a trainable head keeps the checkpointed chunks and gets its gradient."""

import pytest
import torch

import engine.loss
from engine.loss import causal_lm_loss

VOCAB, HIDDEN = 300, 24


def _case(dtype, bias=False):
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=bias).to(dtype).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(VOCAB, HIDDEN, generator=gen))
        if bias:
            head.bias.copy_(torch.randn(VOCAB, generator=gen))
    hidden = torch.randn(3, 21, HIDDEN, generator=gen).to(dtype).requires_grad_()
    ids = torch.randint(0, VOCAB, (3, 21), generator=gen)
    mask = torch.ones_like(ids)
    mask[2, 15:] = 0
    return head, hidden, ids, mask


def _calls(head):
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _checkpointed(head, hidden, ids, mask, chunk, factor):
    """The reference: the same loss with the head made trainable, which takes the checkpointed chunks."""
    head.weight.requires_grad_(True)
    try:
        loss = causal_lm_loss(head, hidden, ids, mask, chunk_tokens=chunk)
        (grad,) = torch.autograd.grad(loss * factor, hidden)
    finally:
        head.weight.requires_grad_(False)
    return loss, grad


def _close(a, b, dtype):
    """Equal to rounding: fp32 to 1e-6 of the largest value; bf16 hidden states get bf16 gradients, which one
    rounding step of a logit's gradient may move by an ulp."""
    scale = b.abs().max()
    if dtype == torch.float32:
        return (a - b).abs().max() <= 1e-6 * scale
    return (a.float() - b.float()).norm() <= 1e-3 * b.float().norm() and (a - b).abs().max() <= 1e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulation", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_early_gradient_equals_the_checkpointed_chunks(dtype, accumulation, bias, monkeypatch):
    head, hidden, ids, mask = _case(dtype, bias)
    fused, calls = engine.loss.loss_and_input_gradient, _calls(head)
    kept = []  # each chunk's gradient as the forward pass took it

    def counted(*args):
        kept.append(fused(*args))
        return kept[-1]

    monkeypatch.setattr(engine.loss, "loss_and_input_gradient", counted)
    loss = causal_lm_loss(head, hidden, ids, mask, chunk_tokens=16, backward_scale=1 / accumulation)
    (grad,) = torch.autograd.grad(loss / accumulation, hidden)  # as the training loop calls it
    assert len(kept) == -(-3 * 20 // 16) and not calls  # each chunk's logits once, none in backward
    # the announced scale is the upstream gradient that arrives: backward passes the kept gradient on unchanged
    assert torch.equal(grad[:, :-1].reshape(-1, HIDDEN), torch.cat([g for _, g in kept]))
    ref_loss, ref_grad = _checkpointed(head, hidden, ids, mask, 16, 1 / accumulation)
    assert len(calls) == 2 * len(kept)  # the reference: the head in forward, again in backward
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    assert _close(grad, ref_grad, dtype)
    assert grad[2, 14:].abs().max() == 0 and grad[2, :14].abs().max() > 0  # padded labels give no gradient


def test_an_unexpected_upstream_factor_is_rescaled():
    head, hidden, ids, mask = _case(torch.float32)
    loss = causal_lm_loss(head, hidden, ids, mask, chunk_tokens=16)  # expects a plain backward()
    (grad,) = torch.autograd.grad(loss * 0.37, hidden, retain_graph=True)
    _, ref_grad = _checkpointed(head, hidden, ids, mask, 16, 0.37)
    assert _close(grad, ref_grad, torch.float32)
    (zero,) = torch.autograd.grad(loss * 0.0, hidden)  # a distributed run's filler micro-batch
    assert zero.abs().max() == 0


def test_the_compiled_form_computes_what_the_in_place_one_does():
    """The functional one-hot that compilation takes (traced here through dynamo and AOT autograd, whose kernels
    run as they are; the CUDA runs compile it with Inductor) against the in-place one, with a bias and a last
    chunk of one token."""
    head, hidden, ids, _ = _case(torch.float32, bias=True)
    traced = torch.compile(engine.loss.loss_and_input_gradient, backend="aot_eager", dynamic=True)
    labels = ids[:, 1:].reshape(-1).clone()
    labels[5] = -100
    h = hidden.detach()[:, :-1].reshape(-1, HIDDEN)
    for rows in (slice(0, 16), slice(59, 60)):
        args = (h[rows], head.weight, head.bias, labels[rows], torch.tensor(0.125))
        (loss, grad), (ref_loss, ref_grad) = traced(*args), engine.loss.loss_and_input_gradient(*args)
        assert torch.allclose(loss, ref_loss, rtol=1e-6) and torch.allclose(grad, ref_grad, rtol=1e-5, atol=1e-9)
    _, ignored = traced(h[5:6], head.weight, head.bias, labels[5:6], torch.tensor(1.0))  # its label is -100
    assert grad.abs().max() > 0 and ignored.abs().max() == 0


def test_a_filler_factor_of_zero_gives_a_zero_gradient():
    head, hidden, ids, mask = _case(torch.float32)
    loss = causal_lm_loss(head, hidden, ids, mask, chunk_tokens=16, backward_scale=0.0)
    (grad,) = torch.autograd.grad(loss * 0.0, hidden, retain_graph=True)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0  # not 0 / 0


def test_the_loss_reserve_follows_the_path(monkeypatch):
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False).requires_grad_(False)
    assert engine.loss.peak_bytes(head, 1024) == (4 + 2 * 4) * 1024 * VOCAB  # in place: fp32 work, logits, gradient
    assert engine.loss.peak_bytes(head.to(torch.bfloat16), 1024) == (4 + 2 * 2) * 1024 * VOCAB
    monkeypatch.setattr(engine.loss, "_chunk_function", lambda device_type: "compiled")
    assert engine.loss.peak_bytes(head, 1024) == int(2.5 * 2 * 1024 * VOCAB)  # compiled: bf16 logits and gradient
    head.weight.requires_grad_(True)
    assert engine.loss.peak_bytes(head, 1024) == int(3.5 * 4 * 1024 * VOCAB)  # checkpointed chunks


def test_a_trainable_head_gets_its_gradient():
    head, hidden, ids, mask = _case(torch.float32)
    head.weight.requires_grad_(True)
    loss = causal_lm_loss(head, hidden, ids, mask, chunk_tokens=16)
    loss.backward()
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100).reshape(-1)
    full = torch.nn.functional.cross_entropy(head(hidden[:, :-1]).reshape(-1, VOCAB), labels)
    (expected,) = torch.autograd.grad(full, head.weight)
    assert torch.allclose(loss, full, atol=1e-6)
    assert torch.allclose(head.weight.grad, expected, atol=1e-7)


def test_no_gradient_mode_computes_the_loss_only():
    head, hidden, ids, mask = _case(torch.float32)
    calls = _calls(head)
    with torch.no_grad():
        loss = causal_lm_loss(head, hidden, ids, mask, chunk_tokens=16)
    assert not loss.requires_grad and len(calls) == 4
    assert torch.equal(loss, _checkpointed(head, hidden, ids, mask, 16, 1.0)[0])


def test_the_chunk_function_is_compiled_on_cuda_only_where_triton_is(monkeypatch):
    assert engine.loss._chunk_function("cpu") is engine.loss.loss_and_input_gradient
    if engine.loss.importlib.util.find_spec("triton") is not None:  # the dev extra installs it on Linux
        assert engine.loss._chunk_function("cuda") is engine.loss._compiled()  # compiled lazily, at its first call
        assert engine.loss._chunk_function("cuda") is not engine.loss.loss_and_input_gradient
    monkeypatch.setattr(engine.loss.importlib.util, "find_spec", lambda name: None)
    engine.loss._compiled.cache_clear()  # Triton is looked up once a process
    try:
        assert engine.loss._chunk_function("cuda") is engine.loss.loss_and_input_gradient
    finally:
        engine.loss._compiled.cache_clear()
