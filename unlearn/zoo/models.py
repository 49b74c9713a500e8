"""Tiny model zoo: the tokenizer and model configs, built from standard transformers classes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class TinyLlamaSpec:
    """Size of the tiny dense Llama-family model (defaults: ~1.5M parameters)."""

    vocab_size: int = 1024
    hidden_size: int = 160
    intermediate_size: int = 448
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128

    def to_dict(self) -> dict:
        return asdict(self)


SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE trained locally on ``texts``; BOS is prepended by the post-processor
    (as Llama's tokenizer does). Deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[SPECIAL_TOKENS[k] for k in ("pad_token", "bos_token", "eos_token", "unk_token")],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(texts, trainer=trainer)
    bos = SPECIAL_TOKENS["bos_token"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tk.token_to_id(bos))]
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIAL_TOKENS)
    tok.padding_side = "right"
    return tok


def _config_kwargs(spec, tokenizer) -> dict:
    """The config fields the tiny dense and MoE models share (sizes, special tokens, attention)."""
    return dict(
        vocab_size=max(spec.vocab_size, len(tokenizer)),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_attention_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )


def _init(model_cls, cfg, tokenizer, seed: int):
    """A freshly initialised ``model_cls(cfg)``, deterministic from ``seed``."""
    import torch

    torch.manual_seed(seed)
    model = model_cls(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def build_tiny_llama(spec: TinyLlamaSpec, tokenizer, seed: int):
    """A freshly initialised ``LlamaForCausalLM`` for the tokenizer (deterministic from seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _init(LlamaForCausalLM, LlamaConfig(**_config_kwargs(spec, tokenizer)), tokenizer, seed)


@dataclass
class TinyMoESpec:
    """Size of the tiny Mixtral-style mixture-of-experts model: the dense tiny model's width and
    depth, its MLP replaced by ``num_local_experts`` routed experts of which ``num_experts_per_tok``
    run per token (defaults: 8 experts of width 112, top-2; ~2.5M parameters, ~1.2M active per token)."""

    vocab_size: int = 1024
    hidden_size: int = 160
    intermediate_size: int = 112  # per expert
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 128
    num_local_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


def build_tiny_moe(spec: TinyMoESpec, tokenizer, seed: int):
    """A freshly initialised ``MixtralForCausalLM`` for the tokenizer (deterministic from seed).

    Parameter names (transformers >= 5 stores the experts of a layer as fused 3-D tensors):
    ``model.layers.<l>.mlp.gate.weight`` (E, H) is layer l's router;
    ``model.layers.<l>.mlp.experts.gate_up_proj`` (E, 2*I, H) and ``...experts.down_proj``
    (E, H, I) hold expert e's FFN in row e. ``output_router_logits`` is off by default (callers
    that need the router ask for it per call)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    if not 1 <= spec.num_experts_per_tok <= spec.num_local_experts:
        raise ValueError(f"num_experts_per_tok must be in 1..num_local_experts ({spec.num_local_experts}), "
                         f"got {spec.num_experts_per_tok}")
    cfg = MixtralConfig(
        **_config_kwargs(spec, tokenizer),
        num_local_experts=spec.num_local_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        router_aux_loss_coef=spec.router_aux_loss_coef,
        output_router_logits=False,
        sliding_window=None,
    )
    return _init(MixtralForCausalLM, cfg, tokenizer, seed)
