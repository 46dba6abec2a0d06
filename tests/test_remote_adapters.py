"""User-supplied remote-code module objects are served by adapters for their own module trees."""

from __future__ import annotations

import torch
from tiny_models import build_tokenizer
from torch import nn

from dlmedit import wrap_model
from dlmedit.interventions import Intervention, count_hooks, intervene


class _Block(nn.Module):
    """OLMo/LLaDA block layout: attn_norm, q/k/v_proj, attn_out, ff_norm, ff_proj (gate), up_proj, ff_out."""

    def __init__(self, d: int, h: int) -> None:
        super().__init__()
        self.attn_norm, self.ff_norm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.q_proj, self.k_proj, self.v_proj, self.attn_out = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.ff_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.ff_out = nn.Linear(h, d, bias=False)

    def forward(self, x):
        y = self.attn_norm(x)
        att = torch.softmax(self.q_proj(y) @ self.k_proj(y).transpose(1, 2) / y.shape[-1] ** 0.5, -1)  # bidirectional
        x = x + self.attn_out(att @ self.v_proj(y))
        y = self.ff_norm(x)
        return x + self.ff_out(nn.functional.silu(self.ff_proj(y)) * self.up_proj(y)), None


class _Inner(nn.Module):
    def __init__(self, vocab: int, d: int, h: int, n: int) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(vocab, d), "blocks": nn.ModuleList(_Block(d, h) for _ in range(n)),
            "ln_f": nn.RMSNorm(d), "ff_out": nn.Linear(d, vocab, bias=False)})


class LLaDAModelLM(nn.Module):
    """A stand-in with the remote-code class name and module tree of LLaDA."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.model = _Inner(vocab, 16, 32, 2)

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        t = self.model.transformer
        x = t["wte"](input_ids) if inputs_embeds is None else inputs_embeds
        for block in t["blocks"]:
            x, _ = block(x)
        return type("Out", (), {"logits": t["ff_out"](t["ln_f"](x))})()


def test_remote_llada_object_is_served():
    torch.manual_seed(0)
    tok = build_tokenizer()
    module = LLaDAModelLM(len(tok))
    lm = wrap_model(module, tok, "mdm")
    assert lm.adapter.family == "llada" and lm.paradigm.logit_shift == 0
    assert lm.adapter.head() is module.model.transformer["ff_out"]
    assert lm.adapter.mlp_down(1) is module.model.transformer["blocks"][1].ff_out
    ids = torch.tensor([lm.encode_prompt("the capital of france is")])
    with torch.no_grad(), intervene(lm.adapter, [Intervention(1, "mlp_key"), Intervention(1, "mlp_out"),
                                                  Intervention(1, "resid")]) as rec:
        lm.logits(ids)
    torch.testing.assert_close(rec["mlp_key.1"] @ lm.adapter.mlp_down(1).weight.T, rec["mlp_out.1"])
    assert rec["resid.1"].shape == (1, ids.shape[1], 16)
    assert count_hooks(module) == 0
    out = lm.generate(["the capital of france is"], max_new_tokens=4)
    assert len(out.sequences[0]) == ids.shape[1] + 4
