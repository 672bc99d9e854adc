"""Per-architecture facts, declared as data.

Each supported decoder-only family (Llama-2/3, Mistral, Qwen2/2.5, Qwen3) is an
ArchSpec: where the decoder layers live, which linears each layer has, and the
AWQ scaling groups (which preceding op's output feeds which linears).  Adding a
family means adding a table entry, not an isinstance chain.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcompress.errors import LmcError


@dataclass(frozen=True)
class ScalingGroup:
    """Linears that read the same input, and the op that produces that input.

    AWQ divides the input channels by a per-channel scale s (folded into `prev_op`:
    a norm's weight or the output rows of a linear) and multiplies the weight
    columns of every linear in `linears` by s.  The best s minimises the error of
    `inspect`'s output (a submodule name relative to the decoder layer).
    """

    prev_op: str
    linears: tuple[str, ...]
    inspect: str


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_types: tuple[str, ...]
    embed: str
    final_norm: str
    lm_head: str
    layers_prefix: str
    # Linears of one decoder layer, in execution order.  Names are relative to the layer.
    linears: tuple[str, ...]
    scaling_groups: tuple[ScalingGroup, ...]
    # Projections whose outputs are the K and V caches (K is taken after q/k norm and RoPE).
    k_proj: str = "self_attn.k_proj"
    v_proj: str = "self_attn.v_proj"
    # Sets of linears GPTQ quantizes together before recomputing inputs ("true sequential").
    sequential_groups: tuple[tuple[str, ...], ...] = ()

    def layer_prefix(self, index: int) -> str:
        return f"{self.layers_prefix}.{index}."


_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LINEARS = _ATTN_QKV + ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")

# AutoAWQ's Llama groups.  v_proj -> o_proj only applies when v_proj's output
# width equals o_proj's input width, i.e. without grouped-query attention; the
# AWQ code checks shapes at run time and skips the group otherwise.
_LLAMA_SCALING = (
    ScalingGroup("input_layernorm", _ATTN_QKV, inspect="self_attn"),
    ScalingGroup("self_attn.v_proj", ("self_attn.o_proj",), inspect="self_attn.o_proj"),
    ScalingGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), inspect="mlp"),
    ScalingGroup("mlp.up_proj", ("mlp.down_proj",), inspect="mlp.down_proj"),
)

_LLAMA_SEQUENTIAL = (
    _ATTN_QKV,
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def _llama_like(name: str, model_types: tuple[str, ...]) -> ArchSpec:
    return ArchSpec(
        name=name,
        model_types=model_types,
        embed="model.embed_tokens",
        final_norm="model.norm",
        lm_head="lm_head",
        layers_prefix="model.layers",
        linears=_LLAMA_LINEARS,
        scaling_groups=_LLAMA_SCALING,
        sequential_groups=_LLAMA_SEQUENTIAL,
    )


# Qwen2 adds a bias to q/k/v; Qwen3 adds per-head RMSNorm on q and k (inside
# self_attn, after the projections), so the same scaling groups hold: the
# input norm still feeds q/k/v, and v -> o is untouched by the q/k norms.
ARCHS: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        _llama_like("llama", ("llama",)),
        _llama_like("mistral", ("mistral",)),
        _llama_like("qwen2", ("qwen2",)),
        _llama_like("qwen3", ("qwen3",)),
    )
}

SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def arch_for(config: dict) -> ArchSpec:
    """The ArchSpec for a parsed config.json, or an LmcError listing what is supported."""
    model_type = config.get("model_type")
    for spec in ARCHS.values():
        if model_type in spec.model_types:
            return spec
    supported = ", ".join(f"{SUPPORTED_ARCHITECTURES[k]} ({k})" for k in ARCHS)
    architectures = ",".join(config.get("architectures") or []) or "unknown"
    raise LmcError(
        f"unsupported architecture {architectures} (model_type={model_type!r}); "
        f"lmc supports {supported}"
    )
