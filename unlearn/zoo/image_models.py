"""Tiny text-to-image zoo configs: a pixel-space ``UNet2DConditionModel`` + ``CLIPTextModel``
+ a word-level tokenizer built locally from the visual world's captions (nothing is downloaded).

The model is Stable Diffusion's architecture at toy size: the UNet denoises 3-channel
``image_size`` x ``image_size`` pixels directly (no VAE), conditioned through cross-attention
(``attn2``) on the text encoder's token embeddings; a DDPM scheduler defines the noise
schedule for training and the DDIM scheduler built from its config samples.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

IMAGE_SPECIAL_TOKENS = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<|startoftext|>",
                        "eos_token": "<|endoftext|>"}
# ids 0..3 in this order; EOS must not be id 2 (CLIPTextModel treats eos_token_id == 2 as a legacy
# config and pools at argmax(input_ids) instead of at the first EOS)
_SPECIAL_ORDER = ("pad_token", "unk_token", "bos_token", "eos_token")


@dataclass
class TinyT2ISpec:
    """Size of the tiny text-to-image model (defaults: ~0.2M UNet + ~20k text-encoder parameters)."""

    image_size: int = field(default=16, metadata={"help": "pixels per side (the UNet works in pixel space)"})
    block_out_channels: tuple[int, ...] = field(default=(16, 32), metadata={"help": "UNet channels per resolution"})
    layers_per_block: int = field(default=1, metadata={"help": "resnet (+ attention) layers per UNet block"})
    attention_head_dim: int = field(default=8, metadata={"help": "channels per attention head"})
    text_hidden_size: int = field(default=32, metadata={"help": "text-encoder width = cross-attention dim"})
    text_layers: int = field(default=2, metadata={"help": "text-encoder transformer layers"})
    text_heads: int = field(default=2, metadata={"help": "text-encoder attention heads"})
    max_length: int = field(default=24, metadata={"help": "tokens per prompt (BOS + words + EOS, padded)"})
    num_train_timesteps: int = field(default=100, metadata={"help": "diffusion steps of the DDPM schedule"})

    def __post_init__(self) -> None:
        self.block_out_channels = tuple(self.block_out_channels)
        if self.image_size % (2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2^(len(block_out_channels)-1)")
        if any(c % 8 for c in self.block_out_channels):
            raise ValueError(f"block_out_channels={self.block_out_channels}: each must be a multiple of 8 "
                             "(GroupNorm uses 8 groups)")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d


def caption_words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, the tokenizer's pre-tokenisation."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def build_caption_tokenizer(texts: list[str], max_length: int = 24):
    """A word-level tokenizer over the words of ``texts`` (sorted, so deterministic), CLIP-style
    framing ``<|startoftext|> words <|endoftext|>``, right padding with ``<pad>`` to ``max_length``.
    Unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w in caption_words(t)})
    vocab = {IMAGE_SPECIAL_TOKENS[k]: i for i, k in enumerate(_SPECIAL_ORDER)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=IMAGE_SPECIAL_TOKENS["unk_token"]))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    bos, eos = IMAGE_SPECIAL_TOKENS["bos_token"], IMAGE_SPECIAL_TOKENS["eos_token"]
    tk.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, model_max_length=max_length, **IMAGE_SPECIAL_TOKENS)
    tok.padding_side = "right"
    return tok


def build_tiny_t2i(spec: TinyT2ISpec, tokenizer, seed: int, vae=None):
    """Freshly initialised ``(unet, text_encoder, scheduler)`` for ``tokenizer`` (deterministic from seed).

    With ``vae`` (a diffusers ``AutoencoderKL``) the UNet is a latent one: it denoises the VAE's
    ``latent_channels`` x ``image_size / factor`` x ``image_size / factor`` latents (factor
    ``2 ** (len(vae.block_out_channels) - 1)``), as Stable Diffusion's does."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tcfg = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_hidden_size, intermediate_size=2 * spec.text_hidden_size,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        max_position_embeddings=spec.max_length, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = CLIPTextModel(tcfg)
    n = len(spec.block_out_channels)
    channels, size = 3, spec.image_size
    if vae is not None:
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        if spec.image_size % (factor * 2 ** (n - 1)):
            raise ValueError(f"image_size={spec.image_size} / the VAE's factor {factor} must be divisible by "
                             f"2^(len(block_out_channels)-1) = {2 ** (n - 1)}")
        channels, size = int(vae.config.latent_channels), spec.image_size // factor
    unet = UNet2DConditionModel(
        sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=spec.layers_per_block,
        block_out_channels=spec.block_out_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=spec.text_hidden_size, attention_head_dim=spec.attention_head_dim, norm_num_groups=8,
    )
    # no x0 clipping when sampling: with the cosine schedule's near-zero ᾱ at the first DDIM steps,
    # clipping the predicted x0 to [-1, 1] wrecked the tiny zoo's samples (judge accuracy on 48
    # prompts, 20 steps, guidance 3: shape 0.83 / colour 1.00 / texture 0.92 without, far lower with)
    scheduler = DDPMScheduler(num_train_timesteps=spec.num_train_timesteps, beta_schedule="squaredcos_cap_v2",
                              prediction_type="epsilon", clip_sample=False)
    return unet, text_encoder, scheduler
