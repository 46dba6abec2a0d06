"""Architecture adapters: canonical names for the modules tracing and editing touch.

Why: every tool above the model layer speaks of "layer i's MLP down projection" or
"the residual stream after layer i", never of `model.transformer.blocks[3].ff_out`.
One small adapter class per module tree maps those canonical names to modules, and
is chosen by the checkpoint's ``model_type`` or architecture class name through a
registry — never by matching substrings of a model's name.  Adding a family means
writing one adapter and registering it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dlmedit.errors import UnknownArchitectureError

_REGISTRY_BY_MODEL_TYPE: dict[str, type[ArchitectureAdapter]] = {}
_REGISTRY_BY_CLASS: dict[str, type[ArchitectureAdapter]] = {}


def register_adapter(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    """Class decorator: register an adapter under its model types and module class names."""
    for model_type in cls.model_types:
        _REGISTRY_BY_MODEL_TYPE[model_type] = cls
    for class_name in cls.module_classes:
        _REGISTRY_BY_CLASS[class_name] = cls
    return cls


def registered_families() -> dict[str, list[str]]:
    """Adapter name -> model types it serves (for `dlmedit models`)."""
    out: dict[str, list[str]] = {}
    for model_type, cls in _REGISTRY_BY_MODEL_TYPE.items():
        out.setdefault(cls.family, []).append(model_type)
    for class_name, cls in _REGISTRY_BY_CLASS.items():
        out.setdefault(cls.family, []).append(class_name)
    return out


def adapter_for_module(module: nn.Module) -> ArchitectureAdapter:
    """Pick the adapter for an instantiated module: its class name first, then config.model_type."""
    cls = _REGISTRY_BY_CLASS.get(type(module).__name__)
    if cls is None:
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        cls = _REGISTRY_BY_MODEL_TYPE.get(str(model_type))
    if cls is None:
        known = ", ".join(sorted(set(_REGISTRY_BY_MODEL_TYPE) | set(_REGISTRY_BY_CLASS)))
        raise UnknownArchitectureError(
            f"no adapter for module class {type(module).__name__!r} "
            f"(config.model_type={getattr(getattr(module, 'config', None), 'model_type', None)!r}); "
            f"known: {known}. Register one with dlmedit.models.adapters.register_adapter."
        )
    return cls(module)


def adapter_class_for_model_type(model_type: str) -> type[ArchitectureAdapter]:
    """Adapter class registered for a config ``model_type``; clear error if none is."""
    try:
        return _REGISTRY_BY_MODEL_TYPE[model_type]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY_BY_MODEL_TYPE))
        raise UnknownArchitectureError(
            f"unknown architecture: model_type {model_type!r} has no adapter (known: {known})"
        ) from None


class ArchitectureAdapter:
    """Maps canonical sites to the modules of one module tree.

    Canonical sites (all per layer ``i``):
      * ``layer(i)``      — the decoder block; its output is the residual stream ("resid").
      * ``attn_out(i)``   — the attention output projection; its output is "attn_out".
      * ``mlp_down(i)``   — the MLP down projection; its *input* is the ROME key
        ("mlp_key"), its output the MLP's contribution to the residual ("mlp_out").
    plus ``embed``, ``final_norm`` and ``head``.
    """

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    module_classes: ClassVar[tuple[str, ...]] = ()
    #: True when the down projection stores its weight as [d_in, d_out] (GPT-2 Conv1D).
    down_weight_transposed: ClassVar[bool] = False
    #: Whether the module's forward accepts ``position_ids`` (needed for left padding).
    accepts_position_ids: ClassVar[bool] = True
    #: Whether the module's forward takes a transformers key/value ``Cache`` for earlier columns.
    supports_prefix_cache: ClassVar[bool] = True

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    # -- module tree --------------------------------------------------------------
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def embed(self) -> nn.Module:
        raise NotImplementedError

    def attn_out(self, i: int) -> nn.Module:
        raise NotImplementedError

    def mlp_down(self, i: int) -> nn.Module:
        raise NotImplementedError

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def head(self) -> nn.Module:
        raise NotImplementedError

    # -- derived -----------------------------------------------------------------
    def layer(self, i: int) -> nn.Module:
        return self.layers()[self.check_layer(i)]

    @property
    def n_layers(self) -> int:
        return len(self.layers())

    @property
    def d_model(self) -> int:
        return int(self.embed().weight.shape[1])

    @property
    def d_mlp(self) -> int:
        w, transposed = self.down_weight(0)
        return int(w.shape[0] if transposed else w.shape[1])

    @property
    def context_length(self) -> int | None:
        config = getattr(self.module, "config", None)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, key, None)
            if isinstance(value, int):
                return value
        return None

    def check_layer(self, i: int) -> int:
        n = len(self.layers())
        if not -n <= i < n:
            raise IndexError(f"layer index {i} out of range for a model with {n} layers (0..{n - 1})")
        return i % n

    def down_weight(self, i: int) -> tuple[nn.Parameter, bool]:
        """The down projection's weight and whether it is stored transposed ([d_in, d_out])."""
        return self.mlp_down(i).weight, self.down_weight_transposed

    def key_width(self, i: int) -> int:
        """Width of layer ``i``'s ``mlp_key`` (layers may differ: an MoE model's dense layers)."""
        w, transposed = self.down_weight(self.check_layer(i))
        return int(w.shape[0] if transposed else w.shape[1])

    def key_routing(self, layer: int, key: torch.Tensor) -> dict[str, Any] | None:
        """For a sparse-MoE layer: which experts a key vector of that layer's edit site touches
        (recorded in an edit's delta); ``None`` for dense MLPs."""
        return None

    def parameter_name(self, param: nn.Parameter) -> str:
        """Fully qualified name of ``param`` inside the model (for EditDelta)."""
        for name, candidate in self.module.named_parameters():
            if candidate is param:
                return name
        raise KeyError("parameter does not belong to this model")

    def site_module(self, layer: int, site: str) -> tuple[nn.Module, str]:
        """Module whose hook realises ``site`` at ``layer`` and whether its 'input' or 'output' is meant."""
        if site == "resid":
            return self.layer(layer), "output"
        if site == "attn_out":
            return self.attn_out(self.check_layer(layer)), "output"
        if site == "mlp_out":
            return self.mlp_down(self.check_layer(layer)), "output"
        if site == "mlp_key":
            return self.mlp_down(self.check_layer(layer)), "input"
        if site == "embed":
            return self.embed(), "output"
        raise ValueError(f"unknown site {site!r}; expected one of resid, attn_out, mlp_out, mlp_key, embed")

    # -- forward -----------------------------------------------------------------
    def forward_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for (possibly left-padded) inputs."""
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
            if self.accepts_position_ids:
                kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        out = self.module(use_cache=False, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    def forward_logits_cached(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits and every layer's keys/values ``[B, heads, T, d]`` (causal models).

        Why: :meth:`forward_logits_with_past` can then run only later columns of rows whose
        earlier columns are these (editing: the columns before the subject; batched causal
        tracing: the columns before the restored one).
        """
        from transformers import DynamicCache

        if not self.supports_prefix_cache:
            raise NotImplementedError(f"{type(self).__name__} does not take a key/value cache")
        cache = DynamicCache()
        kwargs: dict[str, Any] = {}
        if attention_mask is not None:
            kwargs = {"attention_mask": attention_mask,
                      "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)}
        out = self.module(input_ids=input_ids, use_cache=True, **{cache_keyword(self.module): cache}, **kwargs)
        return (out.logits if hasattr(out, "logits") else out[0]), [(layer.keys, layer.values) for layer in cache.layers]

    def forward_logits_with_past(
        self, input_ids: torch.Tensor, past: list[tuple[torch.Tensor, torch.Tensor]],
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the columns that follow ``past`` (every layer's keys/values of the first P columns).

        ``attention_mask`` [B, P + S] covers left-padded rows (positions follow it).  Without
        one the rows are unpadded and the causal mask is passed with a batch dimension of one,
        so ``past[j]`` may hold more rows than ``input_ids`` (batched tracing grows its batch
        mid-forward).  A fresh cache is built per call, so one ``past`` serves any number of
        forwards, with or without autograd.
        """
        from transformers import DynamicCache

        cache = DynamicCache()
        for j, (keys, values) in enumerate(past):
            cache.update(keys, values, j)
        start = int(past[0][0].shape[-2])
        q = int(input_ids.shape[1])
        if attention_mask is not None:
            kwargs: dict[str, Any] = {"attention_mask": attention_mask,
                                      "position_ids": (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:]}
        else:
            cols = torch.arange(start + q, device=input_ids.device)
            kwargs = {"attention_mask": (cols[None, :] <= (start + torch.arange(q, device=input_ids.device))[:, None])[None, None]}
        out = self.module(input_ids=input_ids, use_cache=True, **{cache_keyword(self.module): cache},
                          cache_position=torch.arange(start, start + q, device=input_ids.device), **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]

    def run_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> PrefixCache:
        """Run the first columns of left-padded rows once (no grad) and keep their keys and values."""
        with torch.no_grad():
            _, past = self.forward_logits_cached(input_ids, attention_mask)
        return PrefixCache(past, attention_mask)

    def forward_logits_after(
        self, prefix: PrefixCache, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits [B, S, V] of the S columns that follow ``prefix`` (same rows, same left padding).
        Only valid under causal attention, where earlier columns never see later ones."""
        if input_ids.shape[0] != prefix.attention_mask.shape[0]:
            raise ValueError(f"prefix holds {prefix.attention_mask.shape[0]} rows, got {input_ids.shape[0]}")
        full_mask = torch.cat([prefix.attention_mask, attention_mask.to(prefix.attention_mask)], 1)
        return self.forward_logits_with_past(input_ids, prefix.past, full_mask)


@functools.cache
def cache_keyword(module: nn.Module) -> str:
    """The forward keyword that takes a key/value cache: ``cache`` (transformers ≥ 5.24) or ``past_key_values``.

    Why ask the signature: transformers renamed the keyword and deprecates the old one with
    a ``FutureWarning`` (removal planned for 5.40), while the releases we support down to
    4.56 only know ``past_key_values``; asking the module's own forward serves both.
    """
    return _cache_keyword_of(type(module))


@functools.cache
def _cache_keyword_of(cls: type) -> str:
    import inspect

    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_has_layers() -> bool:
    """Whether this transformers' ``DynamicCache`` exposes per-layer ``keys``/``values`` (the prefix
    reuse reads them); older releases fall back to whole-row forwards."""
    try:
        from transformers import DynamicCache

        return hasattr(DynamicCache(), "layers")
    except Exception:  # any failure means: do not reuse columns
        return False


@dataclass
class PrefixCache:
    """Keys/values of a batch's first columns (see :meth:`ArchitectureAdapter.run_prefix`)."""

    past: list[tuple[torch.Tensor, torch.Tensor]]
    attention_mask: torch.Tensor


@register_adapter
class LlamaAdapter(ArchitectureAdapter):
    """Llama-style trees: LLaMA, SmolLM2, Mistral, the built-in twins, converted LLaDA."""

    family = "llama"
    model_types = ("llama", "mistral")
    module_classes = ("LlamaForCausalLM", "MistralForCausalLM")

    def _base(self) -> nn.Module:
        return self.module.model

    def layers(self) -> nn.ModuleList:
        return self._base().layers

    def embed(self) -> nn.Module:
        return self._base().embed_tokens

    def attn_out(self, i: int) -> nn.Module:
        return self.layers()[i].self_attn.o_proj

    def mlp_down(self, i: int) -> nn.Module:
        return self.layers()[i].mlp.down_proj

    def final_norm(self) -> nn.Module:
        return self._base().norm

    def head(self) -> nn.Module:
        return self.module.lm_head


@register_adapter
class Qwen2Adapter(LlamaAdapter):
    """Qwen2 / Qwen2.5 trees, and Dream checkpoints loaded onto Qwen2 modules."""

    family = "qwen2"
    model_types = ("qwen2",)
    module_classes = ("Qwen2ForCausalLM",)


@register_adapter
class DreamRemoteAdapter(LlamaAdapter):
    """A user-supplied remote-code ``DreamModel``: same tree as Qwen2 (model.layers[i].mlp.down_proj…)."""

    family = "dream"
    model_types = ()
    module_classes = ("DreamModel",)


@register_adapter
class GPT2Adapter(ArchitectureAdapter):
    """GPT-2: Conv1D projections whose weights are stored [d_in, d_out]."""

    family = "gpt2"
    model_types = ("gpt2",)
    module_classes = ("GPT2LMHeadModel",)
    down_weight_transposed = True

    def layers(self) -> nn.ModuleList:
        return self.module.transformer.h

    def embed(self) -> nn.Module:
        return self.module.transformer.wte

    def attn_out(self, i: int) -> nn.Module:
        return self.layers()[i].attn.c_proj

    def mlp_down(self, i: int) -> nn.Module:
        return self.layers()[i].mlp.c_proj

    def final_norm(self) -> nn.Module:
        return self.module.transformer.ln_f

    def head(self) -> nn.Module:
        return self.module.lm_head


@register_adapter
class LLaDARemoteAdapter(ArchitectureAdapter):
    """A user-supplied remote-code ``LLaDAModelLM`` (OLMo-style tree).

    ``model.transformer.ff_out`` is the LM head while ``blocks[i].ff_out`` is each
    block's down projection — the same attribute name at two depths, which is exactly
    why access goes through this adapter.  The remote forward takes no position ids,
    so batches for it should not be left-padded with differing lengths.
    """

    family = "llada"
    model_types = ()
    module_classes = ("LLaDAModelLM",)
    accepts_position_ids = False
    supports_prefix_cache = False

    def _transformer(self) -> nn.Module:
        return self.module.model.transformer

    def layers(self) -> nn.ModuleList:
        return self._transformer().blocks

    def embed(self) -> nn.Module:
        return self._transformer().wte

    def attn_out(self, i: int) -> nn.Module:
        return self.layers()[i].attn_out

    def mlp_down(self, i: int) -> nn.Module:
        return self.layers()[i].ff_out

    def final_norm(self) -> nn.Module:
        return self._transformer().ln_f

    def head(self) -> nn.Module:
        transformer = self._transformer()
        return transformer.ff_out if "ff_out" in transformer else transformer.wte

    def forward_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {}
        if attention_mask is not None and not bool(attention_mask.all()):
            kwargs["attention_mask"] = attention_mask
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
            out = self.module(input_ids=None, **kwargs)
        else:
            out = self.module(input_ids, **kwargs)
        return out.logits if hasattr(out, "logits") else out[0]


@register_adapter
class LLaDAMoEAdapter(LlamaAdapter):
    """LLaDA-MoE loaded onto :class:`~dlmedit.models.lladamoe.LLaDAMoEForMaskedDiffusion`.

    What each site means in a sparse-MoE layer:

    * ``mlp_out`` — the whole MLP output (routed experts + shared expert), i.e. what the
      layer's MLP adds to the residual stream: what causal tracing restores.
    * ``mlp_key`` / ``mlp_down`` — the ROME/MEMIT key/value site is the routed experts'
      down projections taken together: the key is every expert's activation scaled by its
      routing weight, concatenated (zero blocks for experts the token is not routed to),
      and the matrix is the experts' down projections side by side, ``experts_down``.
      Routed output = ``experts_down(key)`` exactly, so the editors' equations
      ``(W + ΔW) k* = v*`` hold for the MoE output unchanged; the router reads the layer
      input, which the edit cannot move.  :meth:`key_routing` names the experts a key uses.
    * ``resid`` / ``attn_out`` — as in any Llama-style tree (the edit memory uses ``resid``).

    Dense layers (``moe_layer_freq`` 0) keep an ordinary ``down_proj`` with its own width,
    so key widths can differ between layers (:meth:`key_width`).
    """

    family = "llada-moe"
    model_types = ("lladamoe",)
    module_classes = ("LLaDAMoEForMaskedDiffusion",)

    def _is_moe(self, i: int) -> bool:
        return hasattr(self.layers()[i].mlp, "experts_down")

    def mlp_down(self, i: int) -> nn.Module:
        mlp = self.layers()[i].mlp
        return mlp.experts_down if self._is_moe(i) else mlp.down_proj

    def site_module(self, layer: int, site: str) -> tuple[nn.Module, str]:
        if site == "mlp_out":
            return self.layers()[self.check_layer(layer)].mlp, "output"
        return super().site_module(layer, site)

    @property
    def d_mlp(self) -> int:
        return max(self.key_width(i) for i in range(self.n_layers))

    def key_routing(self, layer: int, key: torch.Tensor) -> dict[str, Any] | None:
        i = self.check_layer(layer)
        if not self._is_moe(i):
            return None
        mlp = self.layers()[i].mlp
        norms = mlp.expert_blocks(key.detach().float().cpu()).norm(dim=-1)
        used = [int(e) for e in torch.nonzero(norms > 0).flatten()]
        return {"site": "routed experts' down projections (concatenated)", "num_experts": mlp.num_experts,
                "top_k": mlp.top_k, "expert_width": mlp.width, "experts": used,
                "key_block_norms": {str(e): float(norms[e]) for e in used}}
