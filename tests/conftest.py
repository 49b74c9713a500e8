"""Shared fixtures: a tiny tokenizer and a tiny Llama built inside the tests (no zoo needed).

Every test runs on one CPU thread: the machines these tests run on are small and shared.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

torch.set_num_threads(1)
# results cached by one test session must never answer for another: a private cache per session
os.environ["UNLEARN_CACHE"] = tempfile.mkdtemp(prefix="unlearn-test-cache-")


@pytest.fixture(scope="session")
def tiny_qa() -> list[dict]:
    """The first 20 QA items (all about one author) of a small generated TOFU-style world."""
    from unlearn.tasks.tofu_world import WorldConfig, build_world

    return build_world(WorldConfig(n_authors=100, n_holdout=0)).qa[:20]


@pytest.fixture(scope="session")
def tiny_tok(tiny_qa):
    """Byte-level BPE (vocab 300) trained on the prompts + answers of ``tiny_qa`` and the refusals.

    Session-scoped: tests must not mutate it (deep-copy it first).
    """
    from unlearn.tasks.refusals import REFUSALS
    from unlearn.zoo.models import train_tokenizer

    texts = [f"Question: {q['question']}\nAnswer: {q['answer']}" for q in tiny_qa] + list(REFUSALS)
    return train_tokenizer(texts, vocab_size=300)


TINY_SPEC = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)


@pytest.fixture
def tiny_adapter(tiny_tok):
    """A freshly initialised 2-layer Llama (~40k parameters, seed 0) behind ``TextAdapter``."""
    from unlearn.adapters.text import TextAdapter
    from unlearn.zoo.models import TinyLlamaSpec, build_tiny_llama

    model = build_tiny_llama(TinyLlamaSpec(**TINY_SPEC), tiny_tok, seed=0)
    model.eval()
    return TextAdapter(model, tiny_tok, source="<tiny-test-llama>")


@pytest.fixture
def qa_items(tiny_qa) -> list[dict]:
    """8 QA items, each with an ``idk`` refusal (``add_idk``, seed 0)."""
    from unlearn.tasks.tofu import add_idk

    return add_idk(tiny_qa[:8], seed=0)


# ---------------------------------------------------------------------------- tiny text-to-image models
TINY_T2I_SPEC = dict(image_size=8, block_out_channels=(8, 16), attention_head_dim=4, text_hidden_size=16,
                     text_layers=1, text_heads=2, num_train_timesteps=50)


@pytest.fixture(scope="session")
def make_image_adapter():
    """Factory: ``make(world) -> ImageAdapter``, a freshly initialised 8 x 8 text-to-image model (eval
    mode) with the world's tokenizer; the same weights for the same ``seed``."""
    from unlearn.adapters.image import ImageAdapter
    from unlearn.zoo.build_t2i import world_tokenizer
    from unlearn.zoo.image_models import TinyT2ISpec, build_tiny_t2i

    def make(world, seed: int = 0):
        spec = TinyT2ISpec(**TINY_T2I_SPEC)
        tok = world_tokenizer(world, spec.max_length)
        unet, te, sched = build_tiny_t2i(spec, tok, seed)
        return ImageAdapter(unet.eval(), te.eval(), tok, sched)

    return make
