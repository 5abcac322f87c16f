"""Tiny BLOOM models built in code, saved with save_pretrained, and a planted-collapse editor."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import BloomConfig, BloomForCausalLM

from engine.arch import adapter_for
from engine.prompts import builtin_prompts
from engine.tokenizer import train_bpe_tokenizer

_TOKENIZER = None


def tiny_tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        _TOKENIZER = train_bpe_tokenizer(builtin_prompts() * 2, vocab_size=320)
    return _TOKENIZER


def tiny_model(n_layer: int = 3, n_head: int = 4, hidden: int = 32, seed: int = 0) -> BloomForCausalLM:
    tok = tiny_tokenizer()
    cfg = BloomConfig(vocab_size=len(tok), hidden_size=hidden, n_layer=n_layer, n_head=n_head,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return BloomForCausalLM(cfg).eval()


def save_model(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def tiny_family_model(family: str, n_layer: int = 3, n_head: int = 4, hidden: int = 32, seed: int = 0):
    """A tiny causal LM of `family` ("bloom", "mpt" or "falcon": Falcon-RW, ALiBi with biases) on the tiny tokenizer."""
    if family == "bloom":
        return tiny_model(n_layer, n_head, hidden, seed)
    from transformers import FalconConfig, FalconForCausalLM, MptConfig, MptForCausalLM

    tok = tiny_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    if family == "mpt":
        cfg = MptConfig(vocab_size=len(tok), d_model=hidden, n_layers=n_layer, n_heads=n_head, max_seq_len=512,
                        attn_config={"alibi": True, "alibi_bias_max": 8}, **ids)
        return MptForCausalLM(cfg).eval()
    cfg = FalconConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=n_layer, num_attention_heads=n_head,
                       alibi=True, multi_query=False, new_decoder_architecture=False, parallel_attn=False, bias=True,
                       **ids)
    return FalconForCausalLM(cfg).eval()


@torch.no_grad()
def plant_collapse(model, heads: list[tuple[int, int]], strength: float = 60.0) -> None:
    """Make each (layer, head) in `heads` put almost all attention on position 0 (the BOS token).

    Hidden dimension 0 becomes a BOS marker: only the BOS embedding is non-zero there and no block writes
    to it. Each planted head gets a constant query and a key that reads the marker, so the BOS key wins
    by a margin far larger than any ALiBi penalty. Without biases (MPT) the constant query reads hidden
    dimension 1, which every embedding sets to the same large value."""
    adapter = adapter_for(model)
    bos = model.config.bos_token_id
    emb = model.get_input_embeddings().weight
    emb[:, 0] = 0.0
    emb[bos] = 0.0
    emb[bos, 0] = 10.0
    biased = adapter.qkv(model, 0).bias is not None
    if not biased:
        emb[:, 1] = 5.0
    for layer, block in enumerate(adapter.blocks(model)):
        for linear in (adapter.dense(model, layer), adapter.mlp_out(block)):
            linear.weight[: 1 if biased else 2] = 0.0
            if linear.bias is not None:
                linear.bias[: 1 if biased else 2] = 0.0
    d = adapter.head_dim
    for layer, head in heads:
        qkv = adapter.qkv(model, layer)
        rows = adapter.qkv_rows(head)
        w = qkv.weight[rows].view(3, d, -1)
        w[0] = 0.0
        w[1] = 0.0
        w[1, 0, 0] = strength  # key = marker dimension
        if biased:
            b = qkv.bias[rows].view(3, d)
            b[0] = 0.0
            b[1] = 0.0
            b[0, 0] = strength  # constant query
            qkv.bias[rows] = b.view(-1)
        else:
            w[0, 0, 1] = strength  # query = the constant dimension
        qkv.weight[rows] = w.view(3 * d, -1)


class Done:
    """What a command left behind: exit status and its output, like subprocess.CompletedProcess."""

    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def run_in_process(capsys, *args) -> Done:
    """`head-surgeon ARGS` in this process (the real parser and error handling, no interpreter start-up)."""
    from tui.entry import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return Done(code, out.out, out.err)
