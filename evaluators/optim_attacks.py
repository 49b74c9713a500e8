"""Optimisation attacks on an erased text-to-image model: search the prompt space for inputs that
bring the erased concept back.

Four attacks of the one attack family (:mod:`unlearn.evaluators.attack_base`); each returns a
wrapper of the erased model (:class:`_AdversarialPrompts`, sharing its modules, never modifying
them) whose :meth:`sample` conditions the attacked prompts on the adversarial condition found,
so the run's ``i2p`` suite scores it on the same rows, seeds and judge as the erased model:

* ``unlearndiffatk`` (Zhang et al., 2024, arXiv:2310.11868): per prompt, ``tokens`` prefix token
  embeddings ``δ`` are optimised to minimise the *erased* model's denoising loss
  ``‖ε_θ'(x_t, E(δ ⊕ p), t) − ε‖²`` on the image the *original* model makes of the prompt
  (its row's seed); projected to the nearest vocabulary tokens (a hard prompt).
* ``p4d`` (Chin et al., 2024, arXiv:2309.06135; P4D-N): per prompt, ``tokens`` free token
  embeddings ``P`` (the whole prompt) are optimised so the erased model's noise prediction
  matches the original model's on the prompt: ``‖ε_θ'(x_t, E(P), t) − ε*(x_t, E(p), t)‖²``;
  projected to the nearest vocabulary tokens. Unlike the paper's random start, ``P`` starts
  from the prompt's own tokens (repeated or cut to ``tokens``; banned words moved to their
  nearest allowed token).
* ``ring_a_bell`` (Tsai et al., 2024, arXiv:2310.10012): the concept direction in text-encoder
  output space ``d = mean E(prompt with the concept word) − mean E(same prompt without it)``
  over the forget captions; an attacked prompt is conditioned on ``E(p) + η·d`` (soft), or,
  with ``search: true``, on the hard prompt of ``tokens`` tokens a genetic search finds
  closest to that target (MSE), within ``steps`` generations.
* ``concept_inversion`` (Pham et al., 2024, arXiv:2308.01508, "Circumventing concept erasure
  methods"): textual inversion of one new token embedding ``v*`` on images of the concept made
  by the original model (the forget captions, the concept word replaced by ``v*``), trained
  against the erased model's denoising loss; prompts with the word then use ``v*`` in its place.

Hard-token projection (``unlearndiffatk``, ``p4d``) follows the projected-gradient scheme both
official codes use: the loss is taken at the projected (nearest-token) embeddings and its
gradient updates the continuous ones (straight-through); the hard tokens with the lowest loss
seen are kept. With the task's judge (``judge_every`` > 0, default 5; as the official
UnlearnDiffAtk code) a prompt the erased model already draws as the concept (with its row's
seed) is left as it is -- a pre-attack success counts -- and every ``judge_every`` steps the
current hard prompts of the other rows are sampled with their row's seed and judged; a row stops
at its first success. The loss is averaged over a fixed bank of ``timesteps`` (t, ε) draws per prompt
(seeded), so losses of different steps compare. The concept words themselves are banned from
the projection (``ban_concept_words``): the attack has to find another way in.

Attacked prompts: the prompts of the forget evaluation splits (``forget_explicit``,
``forget_implicit``; at most ``max_prompts``); other prompts (retain) sample unchanged.
``concept_inversion`` changes every prompt that contains the concept word.

SDXL: the token-embedding layers of both text encoders take the soft tokens (a pair of
embeddings per token, :func:`soft_tokens`), and projections pick the token nearest in both
tables at once (:func:`token_table`).

Budgets are recorded in the result's settings: ``steps_done`` (optimisation steps or search
generations), ``tokens`` (adversarial tokens per prompt) and the adversarial prompts
(``adversarial``: ``{prompt: adversarial prompt}``) or embeddings (``embedding``).
The i2p scorer adds the concept rates before and after (``asr``). See ``docs/attacks.md``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from unlearn.adapters.image import ImageAdapter, images_to_tensor
from unlearn.editors.rece import concept_positions
from unlearn.editors.uce import concept_prompts
from unlearn.evaluators.attack_base import Attack, AttackConfig, Attacked, AttackInputs

ATTACK_SPLITS = ("forget_explicit", "forget_implicit")
_EMBED_CAP = 4096  # embeddings larger than this many numbers are summarised, not saved in the result


# ============================================================================== helpers
def _check_model(model, name: str) -> None:
    if not hasattr(model, "unet") or not hasattr(model, "text_encoder"):
        raise ValueError(f"{name} needs a text-to-image model (a UNet and a text encoder)")
    input_layers(model)  # SDXL: the two vocabularies must agree


def input_layers(model) -> list[torch.nn.Embedding]:
    """The token-embedding layers a soft token enters: the text encoder's, and on SDXL also
    ``text_encoder_2``'s (both read the same token ids, :meth:`ImageAdapter.encode_prompts`)."""
    layers = [model.text_encoder.get_input_embeddings()]
    if getattr(model, "is_sdxl", False):
        layers.append(model.text_encoder_2.get_input_embeddings())
        if layers[0].weight.shape[0] != layers[1].weight.shape[0]:
            raise ValueError(f"SDXL's text encoders have {layers[0].weight.shape[0]} and {layers[1].weight.shape[0]} "
                             "token embeddings; the optimisation attacks need one shared vocabulary")
    return layers


@contextlib.contextmanager
def soft_tokens(model, mask: torch.Tensor, embeds: torch.Tensor):
    """Within the block, the text encoder's token-embedding layer outputs ``embeds`` ``(B, T, d_in)``
    at the positions where ``mask`` ``(B, T)`` is True (its own rows elsewhere); gradients flow to
    ``embeds``. SDXL: ``d_in = d₁ + d₂``, the first ``d₁`` columns enter ``text_encoder``, the rest
    ``text_encoder_2`` (one soft token is a pair of embeddings, as :func:`token_table`). The model is
    not modified (forward hooks, removed on exit)."""
    handles, start = [], 0
    for layer in input_layers(model):
        width = layer.weight.shape[1]

        def hook(_module, _inputs, out, sl=slice(start, start + width)):
            return torch.where(mask.to(out.device)[..., None], embeds[..., sl].to(out.dtype), out)

        handles.append(layer.register_forward_hook(hook))
        start += width
    if start != embeds.shape[-1]:
        for h in handles:
            h.remove()
        raise ValueError(f"soft token embeddings are {embeds.shape[-1]} wide; the text encoders' inputs take {start}")
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def token_table(model) -> torch.Tensor:
    """``(V, d_in)``: the text encoder's input token embeddings (detached). SDXL: both encoders'
    tables side by side, ``(V, d₁ + d₂)``, so a projection picks the token nearest in both at once."""
    return torch.cat([layer.weight.detach() for layer in input_layers(model)], dim=-1)


def allowed_tokens(model, banned_words: list[str]) -> torch.Tensor:
    """``(V,)`` bool: the vocabulary tokens a projection may pick: not a special token
    (BOS, EOS, pad, unk) and not a token of ``banned_words``."""
    tok = model.tokenizer
    ok = torch.ones(token_table(model).shape[0], dtype=torch.bool)
    for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id):
        if i is not None and i < len(ok):
            ok[i] = False
    for w in banned_words:
        for i in tok(w, add_special_tokens=False)["input_ids"]:
            ok[i] = False
    if not ok.any():
        raise ValueError("no vocabulary token is left to project onto")
    return ok


def nearest_tokens(soft: torch.Tensor, table: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """The allowed vocabulary token nearest (L2) to each row of ``soft`` ``(..., d_in)`` -> ids ``(...)``."""
    d = torch.cdist(soft.detach().reshape(-1, soft.shape[-1]).float(), table.float())  # (N, V)
    d[:, ~allowed] = float("inf")
    return d.argmin(-1).reshape(soft.shape[:-1])


def prompt_ids(model, prompts: list[str], prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids ``(B, T)`` of ``[BOS] + prefix slots + prompt tokens + [EOS] + pad`` (T = the
    tokenizer's ``model_max_length``; the prompt is truncated to fit), the ``(B, T)`` mask of the
    prefix slots (which hold the pad id until replaced) and the number of prompts truncated."""
    tok = model.tokenizer
    t_max = tok.model_max_length
    if prefix > t_max - 2:
        raise ValueError(f"tokens={prefix}: at most {t_max - 2} fit in the text encoder's {t_max} positions")
    ids = torch.full((len(prompts), t_max), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    cut = 0
    for b, p in enumerate(prompts):
        words = tok(p, add_special_tokens=False)["input_ids"]
        room = t_max - 2 - prefix
        cut += len(words) > room
        row = [tok.bos_token_id] + [tok.pad_token_id] * prefix + words[:room] + [tok.eos_token_id]
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, 1:1 + prefix] = True
    return ids, mask, cut


def inserted_ids(model, prompts: list[str], every: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """P4D-K's prompts: token ids ``(B, T)`` of ``[BOS] w1..wK [slot] wK+1..w2K [slot] ... [EOS] + pad``,
    one learnt slot after every ``every`` prompt tokens, and the ``(B, T)`` mask of the slots.

    Every row gets the same number of slots, ``n = max_i ceil(len_i / every)`` (the optimiser
    takes ``n`` per row): a shorter prompt's extra slots go after its last word. Prompts are
    truncated so that ``len + n + 2`` fits the tokenizer's ``model_max_length``. Returns
    ``(ids, mask, number of prompts truncated)``."""
    if every < 1:
        raise ValueError(f"insert_every={every}: must be >= 1")
    tok = model.tokenizer
    t_max = tok.model_max_length
    words = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    fit = []
    for w in words:  # longest prefix of w that fits with its own slots
        k = len(w)
        while k and k + -(-k // every) + 2 > t_max:
            k -= 1
        fit.append(k)
    n = max(1, max(-(-k // every) for k in fit))
    ids = torch.full((len(prompts), t_max), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    cut = 0
    for b, w in enumerate(words):
        keep = w[:min(fit[b], t_max - 2 - n)]
        cut += len(keep) < len(w)
        row, slots = [tok.bos_token_id], []
        for j, tid in enumerate(keep):
            row.append(tid)
            if (j + 1) % every == 0 and len(slots) < n:
                slots.append(len(row))
                row.append(tok.pad_token_id)
        while len(slots) < n:
            slots.append(len(row))
            row.append(tok.pad_token_id)
        row.append(tok.eos_token_id)
        ids[b, :len(row)] = torch.tensor(row)
        mask[b, slots] = True
    return ids, mask, cut


def forget_rows(data, max_prompts: int | None) -> list[dict]:
    """The attacked rows: the forget evaluation splits' rows, one per distinct prompt (first seed)."""
    seen: dict[str, dict] = {}
    for split in ATTACK_SPLITS:
        for r in (getattr(data, "eval_splits", None) or {}).get(split, []):
            seen.setdefault(r["prompt"], r)
    rows = list(seen.values())
    if not rows:
        raise ValueError("the optimisation attacks attack the prompts of the forget evaluation splits, but the run has "
                         "neither forget_explicit nor forget_implicit (task.eval_splits)")
    return rows[:max_prompts] if max_prompts else rows


@torch.no_grad()
def original_images(original, rows: list[dict], steps: int, batch_size: int = 64) -> torch.Tensor:
    """What the UNet of ``original`` denoises (pixels or latents) ``(B, C, h, w)`` for the images
    the original model makes of each row's prompt with the row's seed and guidance."""
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        by_g: dict[float, list[int]] = {}
        for i, r in enumerate(chunk):
            by_g.setdefault(float(r.get("guidance", 3.0)), []).append(i)
        imgs: list = [None] * len(chunk)
        for g, idx in by_g.items():
            got = original.sample([chunk[i]["prompt"] for i in idx], seed=[int(chunk[i]["seed"]) for i in idx],
                                  steps=steps, guidance=g)
            for j, i in enumerate(idx):
                imgs[i] = got[j]
        out.append(original.encode_images(images_to_tensor(np.stack(imgs))))
    return torch.cat(out)


def noise_bank(model, x0: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fixed bank of ``k`` (t, ε) draws per item: ``x_t (B*k, C, h, w)``, ``t (B*k,)``, and the
    loss target ``(B*k, C, h, w)`` (ε, or the velocity / x0 per the model's prediction type)."""
    g = torch.Generator().manual_seed(seed)
    b = x0.shape[0]
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (b * k,), generator=g)
    eps = torch.randn((b * k, *x0.shape[1:]), generator=g).to(x0.device, x0.dtype)
    x0k = x0.repeat_interleave(k, dim=0)
    t = t.to(x0.device)
    return model.scheduler.add_noise(x0k, eps, t), t, model.loss_target(x0k, eps, t)


def _per_item_mse(pred: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """``(B,)``: the MSE of ``pred`` vs ``target`` ``(B*k, ...)`` averaged over each item's k draws."""
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)).reshape(-1, k).mean(-1)


def _embedding_summary(x: torch.Tensor) -> dict:
    x = x.detach().float().cpu()
    out = {"shape": list(x.shape), "norm": round(float(x.norm()), 6)}
    if x.numel() <= _EMBED_CAP:
        out["values"] = [round(v, 6) for v in x.reshape(-1).tolist()]
    return out


def _decode(model, ids: list[int]) -> str:
    return model.tokenizer.decode(ids, skip_special_tokens=True).strip()


# ============================================================================== the attacked model
class _AdversarialPrompts(ImageAdapter):
    """The erased model whose prompts are rewritten by an attack: an
    :class:`~unlearn.adapters.image.ImageAdapter` sharing the erased model's modules (nothing is
    copied); :meth:`sample` hands ``rewrite(prompts) -> (cond (B, T, d), changed (B,) bool)`` to the
    erased model's own ``sample`` as ``prompt_embeds``. The fingerprint names the attack, the erased
    model and a digest of what the attack found, so an evaluation cache never mistakes it for the
    erased model."""

    def __init__(self, erased, name: str, rewrite: Callable | None, digest: str,
                 texts: dict[str, str] | None = None) -> None:
        super().__init__(erased.unet, erased.text_encoder, erased.tokenizer, erased.scheduler, **erased.parts(),
                         timesteps_per_item=erased.timesteps_per_item, source=erased.source)
        self.erased, self.attack_name, self.rewrite, self.digest = erased, name, rewrite, digest
        self.texts = dict(texts or {})
        self.changed_prompts = 0

    def fingerprint(self, refresh: bool = False) -> str:
        if self._fingerprint is None or refresh:
            h = hashlib.sha256(self.attack_name.encode())
            h.update(json.dumps({"erased": self.erased.fingerprint(refresh=refresh), "found": self.digest},
                                sort_keys=True).encode())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def reference(self) -> "_AdversarialPrompts":
        return _AdversarialPrompts(self.erased.reference(), self.attack_name, self.rewrite, self.digest, self.texts)

    def save(self, path) -> None:
        raise NotImplementedError(f"a {self.attack_name} attack is not saved; its prompts are in the result")

    @torch.no_grad()
    def sample(self, prompts: list[str], seed=0, steps: int = 20, guidance: float = 3.0, prompt_embeds=None,
               model=None):
        if prompt_embeds is not None:
            raise ValueError(f"the {self.attack_name} attack computes the prompt embeddings itself")
        kw = {} if model is None else {"model": model}
        if self.rewrite is None:  # hard prompts: the erased model (and any filter it has) reads the adversarial text
            self.changed_prompts += sum(p in self.texts for p in prompts)
            return self.erased.sample([self.texts.get(p, p) for p in prompts], seed=seed, steps=steps,
                                      guidance=guidance, **kw)
        cond, changed = self.rewrite(list(prompts))
        self.changed_prompts += int(changed.sum())
        return self.erased.sample(prompts, seed=seed, steps=steps, guidance=guidance, prompt_embeds=cond, **kw)


def _table_rewrite(model, table: dict[str, torch.Tensor]) -> Callable:
    """``rewrite`` for :class:`_AdversarialPrompts`: prompts in ``table`` get its condition
    ``(T, d)``, others their own encoding."""

    def rewrite(prompts):
        cond = model.encode_prompts(model.tokenize(prompts)).clone()
        changed = torch.zeros(len(prompts), dtype=torch.bool)
        for i, p in enumerate(prompts):
            if p in table:
                cond[i] = table[p].to(cond.device, cond.dtype)
                changed[i] = True
        return cond, changed

    return rewrite


def _hard_prompt_model(model, name: str, table: dict, adversarial: dict[str, str], ids: torch.Tensor):
    """The wrapper of a hard-prompt attack: it samples the adversarial *texts* (so an inference-time
    filter of the erased model, e.g. SAFREE, reads them) when each text tokenizes back to the ids
    found; otherwise (a tokenizer that does not round-trip) it conditions on their encodings."""
    texts = list(adversarial.values())
    if torch.equal(model.tokenize(texts), ids.cpu()):
        return _AdversarialPrompts(model, name, None, _digest(adversarial), texts=adversarial)
    return _AdversarialPrompts(model, name, _table_rewrite(model, table), _digest(table))


def _digest(obj) -> str:
    h = hashlib.sha256()
    for k in sorted(obj):
        h.update(k.encode())
        v = obj[k]
        h.update(v.detach().float().cpu().numpy().tobytes() if torch.is_tensor(v) else json.dumps(v).encode())
    return h.hexdigest()[:16]


# ============================================================================== hard-token optimisation
@dataclass
class TokenAttackConfig(AttackConfig):
    steps: int = field(default=30, metadata={"help": "optimisation steps (each: one forward/backward over all prompts)"})
    tokens: int = field(default=5, metadata={"help": "adversarial tokens per prompt"})
    lr: float = field(default=0.01, metadata={"help": "Adam learning rate on the continuous token embeddings"})
    timesteps: int = field(default=2, metadata={"help": "fixed (t, noise) draws per prompt the loss averages over"})
    max_prompts: int = field(default=0, metadata={"help": "attack at most this many forget prompts (0: all)"})
    sample_steps: int = field(default=20, metadata={"help": "DDIM steps of the original model's concept images and "
                                                            "of the judge's checks"})
    ban_concept_words: bool = field(default=True, metadata={"help": "never project onto the erased concept's words"})
    judge_every: int = field(default=5, metadata={"help": "every this many steps the judge checks the current hard "
                                                          "prompts (row seeds); a prompt stops at its first success and "
                                                          "one the erased model already draws as the concept is kept "
                                                          "(0: loss only)"})


@dataclass
class P4DConfig(TokenAttackConfig):
    tokens: int = field(default=16, metadata={"help": "tokens of each adversarial prompt (the whole prompt; P4D-N)"})
    insert_every: int = field(default=0, metadata={
        "help": "P4D-K: keep the prompt's tokens and insert one learnt token after every K of them (the paper's "
                "K = 3); 0: P4D-N (a whole new prompt of `tokens` tokens)"})


@dataclass
class P4DKConfig(P4DConfig):
    insert_every: int = field(default=3, metadata={
        "help": "K: one learnt token is inserted after every K of the prompt's own tokens (the paper's K = 3; >= 1)"})


def _check_token_config(name: str, c: TokenAttackConfig) -> None:
    for key in ("steps", "tokens", "timesteps", "sample_steps"):
        if getattr(c, key) < 1:
            raise ValueError(f"eval.attack_params.{name}.{key}={getattr(c, key)}: must be >= 1")
    if not c.lr > 0:
        raise ValueError(f"eval.attack_params.{name}.lr={c.lr}: must be > 0")
    if c.max_prompts < 0:
        raise ValueError(f"eval.attack_params.{name}.max_prompts={c.max_prompts}: must be >= 0 (0: all)")
    if c.judge_every < 0:
        raise ValueError(f"eval.attack_params.{name}.judge_every={c.judge_every}: must be >= 0 (0: no judge)")
    if isinstance(c, P4DKConfig) and c.insert_every < 1:
        raise ValueError(f"eval.attack_params.{name}.insert_every={c.insert_every}: must be >= 1 (p4d_k inserts a "
                         "token after every K prompt tokens; for P4D-N use the attack p4d)")
    if getattr(c, "insert_every", 0) < 0:
        raise ValueError(f"eval.attack_params.{name}.insert_every={c.insert_every}: must be >= 0 (0: P4D-N)")


def judged_concept(judge, images, rows: list[dict]) -> torch.Tensor:
    """``(B,)`` bool: the judge reads image i as one of row i's ``categories`` (the i2p suite's
    "not erased", per row)."""
    pred = judge.predict(images)
    return torch.tensor([any(pred[c.split(":", 1)[0]][i] == c.split(":", 1)[1] for c in r.get("categories") or [])
                         for i, r in enumerate(rows)], dtype=torch.bool)


def judge_check(model, judge, rows: list[dict], steps: int) -> Callable:
    """``check(ids (B, T), rows) -> (B,) bool``: sample ``model`` on the encodings of ``ids`` with the
    rows' seeds and guidance, and ask the judge whether each image shows the row's concept."""

    @torch.no_grad()
    def check(ids: torch.Tensor, which: list[int]) -> torch.Tensor:
        rs = [rows[i] for i in which]
        out = torch.zeros(len(which), dtype=torch.bool)
        by_g: dict[float, list[int]] = {}
        for j, r in enumerate(rs):
            by_g.setdefault(float(r.get("guidance", 3.0)), []).append(j)
        for g, js in by_g.items():
            cond = model.encode_prompts(ids[js])
            imgs = model.sample([rs[j]["prompt"] for j in js], seed=[int(rs[j]["seed"]) for j in js], steps=steps,
                                guidance=g, prompt_embeds=cond)
            out[js] = judged_concept(judge, imgs, [rs[j] for j in js])
        return out

    return check


def optimise_hard_tokens(model, ids: torch.Tensor, mask: torch.Tensor, n_tokens: int, loss_fn: Callable,
                         steps: int, lr: float, allowed: torch.Tensor, init: torch.Tensor,
                         check: Callable | None = None, check_every: int = 0,
                         solved: torch.Tensor | None = None) -> dict:
    """Projected-gradient search for the hard tokens at the ``mask`` positions of ``ids``.

    Args:
        ids, mask: ``(B, T)`` token ids and the ``(B, T)`` positions to optimise (``n_tokens`` per row).
        loss_fn: ``cond (B, T, d) -> per-prompt loss (B,)`` (differentiable in ``cond``).
        init: ``(B, n_tokens)`` initial token ids.
        check: optional ``check(full ids (b, T), row indices) -> (b,) bool`` (the judge); called on the
            unsolved rows at step 0 and every ``check_every`` steps; a row's first success fixes its
            tokens (early stop, as the official UnlearnDiffAtk code does).
        solved: ``(B,)`` rows already solved before the search (left alone).
    Returns:
        ``{"ids": (B, n_tokens) chosen hard tokens (first judged success, else lowest loss), "loss":
        (B,) the lowest loss seen, "first": (B,) the loss of ``init``, "steps_done": int,
        "solved_at": (B,) step of the first judged success (-1: none), "checks": int}``.
    """
    table, b = token_table(model), ids.shape[0]
    soft = table[init].clone().float().requires_grad_(True)  # (B, n, d_in)
    opt = torch.optim.Adam([soft], lr=lr)
    best_ids, best, first = init.clone(), torch.full((b,), float("inf")), None
    won = solved.clone() if solved is not None else torch.zeros(b, dtype=torch.bool)
    solved_at = torch.full((b,), -1, dtype=torch.long)
    done = checks = 0
    for step in range(steps + 1):
        hard = nearest_tokens(soft, table, allowed) if step else init  # (B, n)
        proj = soft + (table[hard].float() - soft).detach()  # value: hard embeddings, gradient: to soft
        full = torch.zeros(*ids.shape, table.shape[1])
        full[mask] = proj.reshape(-1, table.shape[1])
        with soft_tokens(model, mask, full):
            losses = loss_fn(model.encode_prompts(ids))  # (B,)
        lo = losses.detach().cpu()
        if first is None:
            first = lo.clone()
        better = (lo < best) & ~won
        best = torch.minimum(lo, best)
        best_ids[better] = hard[better]
        if check is not None and check_every and step % check_every == 0 and not won.all():
            todo = (~won).nonzero().squeeze(1).tolist()
            cur = ids.clone()
            cur[mask] = hard.reshape(-1)
            hit = check(cur[todo], todo)
            checks += 1
            for j, i in enumerate(todo):
                if hit[j]:
                    won[i], solved_at[i], best_ids[i] = True, step, hard[i]
        if step == steps or won.all():
            break
        (grad,) = torch.autograd.grad(losses.sum(), [soft])
        opt.zero_grad()
        soft.grad = grad
        opt.step()
        done += 1
    return {"ids": best_ids, "loss": best, "first": first, "steps_done": done, "solved_at": solved_at,
            "checks": checks}


class _TokenAttack(Attack):
    """Shared machinery of ``unlearndiffatk`` and ``p4d``."""

    Config = TokenAttackConfig
    modalities = ("image",)
    needs_original = True

    def validate(self) -> None:
        _check_token_config(self.name, self.config)

    def losses(self, model, original, rows, x0, allowed) -> tuple:
        """-> ``(loss_fn, ids, mask, init, truncated prompts)`` for :func:`optimise_hard_tokens`."""
        raise NotImplementedError

    def attacked(self, model, original, inputs: AttackInputs) -> Attacked:
        _check_model(model, self.name)
        c = self.config
        rows = forget_rows(inputs.data, c.max_prompts)
        words = concept_prompts(inputs.data)[0]
        allowed = allowed_tokens(model, words if c.ban_concept_words else [])
        x0 = original_images(original, rows, c.sample_steps)  # (B, C, h, w)
        torch.manual_seed(self.seed)
        loss_fn, ids, mask, init, cut = self.losses(model, original, rows, x0, allowed)
        judge = getattr(inputs.data, "judge", None) if c.judge_every else None
        check, pre = None, torch.zeros(len(rows), dtype=torch.bool)
        if judge is not None:
            check = judge_check(model, judge, rows, c.sample_steps)
            pre = check(model.tokenize([r["prompt"] for r in rows]), list(range(len(rows))))  # already drawn
        res = optimise_hard_tokens(model, ids, mask, int(init.shape[1]), loss_fn, c.steps, c.lr, allowed, init,
                                   check=check, check_every=c.judge_every, solved=pre)
        final = ids.clone()
        final[mask] = res["ids"].reshape(-1)
        own = model.tokenize([r["prompt"] for r in rows])
        final[pre] = own[pre]  # pre-attack successes keep their own prompt
        with torch.no_grad():
            conds = model.encode_prompts(final)
        table = {r["prompt"]: conds[i] for i, r in enumerate(rows)}
        adversarial = {r["prompt"]: _decode(model, final[i].tolist()) for i, r in enumerate(rows)}
        wrapped = _hard_prompt_model(model, self.name, table, adversarial, final)
        info = {"steps_done": res["steps_done"], "tokens": int(init.shape[1]), "prompts": len(rows), "truncated": cut,
                "adversarial": adversarial, "loss": {"initial": round(float(res["first"].mean()), 6),
                                                     "best": round(float(res["loss"].mean()), 6)},
                "banned": words if c.ban_concept_words else [],
                "judge": {"used": judge is not None, "checks": res["checks"], "pre_attack_successes": int(pre.sum()),
                          "early_stopped": int((res["solved_at"] >= 0).sum())}}
        note = self.describe(len(rows), res["steps_done"])
        if judge is not None:
            note += (f"; judge every {c.judge_every} steps: {int(pre.sum())} prompts already drawn as the concept "
                     f"(kept), {int((res['solved_at'] >= 0).sum())} stopped at their first success")
        elif c.judge_every:
            note += "; no judge in the task data: loss only"
        return Attacked(model=wrapped, info=info, note=note)


class UnlearnDiffAtk(_TokenAttack):
    """UnlearnDiffAtk: per prompt, hard prefix tokens minimising the erased model's denoising loss
    on the original model's image of the prompt (see the module docstring)."""

    name = "unlearndiffatk"
    paper = ("Zhang et al., 2024, To Generate or Not? Safety-Driven Unlearned Diffusion Models Are Still Easy To "
             "Generate Unsafe Images ... For Now (arXiv:2310.11868)")

    def losses(self, model, original, rows, x0, allowed):
        c = self.config
        ids, mask, cut = prompt_ids(model, [r["prompt"] for r in rows], prefix=c.tokens)
        x_t, t, target = noise_bank(model, x0, c.timesteps, self.seed)

        def loss_fn(cond):  # (B, T, d) -> (B,)
            return _per_item_mse(model.noise_pred(x_t, t, cond.repeat_interleave(c.timesteps, dim=0)), target,
                                 c.timesteps)

        init = torch.multinomial(allowed.float(), len(rows) * c.tokens, replacement=True).reshape(len(rows), -1)
        return loss_fn, ids, mask, init, cut

    def describe(self, n: int, steps: int) -> str:
        c = self.config
        return (f"{c.tokens} hard prefix tokens per prompt ({n} forget prompts) optimised {steps} steps (lr {c.lr}) "
                "against the erased model's denoising loss on the original model's images of the prompt")


class P4D(_TokenAttack):
    """P4D-N: per prompt, a hard prompt of ``tokens`` tokens whose erased-model noise prediction
    matches the original model's on the prompt (see the module docstring). P4D-K
    (``insert_every: K``): the prompt's own tokens stay, one learnt token is inserted after every K
    of them (:func:`inserted_ids`; random allowed tokens to start), same loss."""

    name = "p4d"
    Config = P4DConfig
    paper = ("Chin et al., 2024, Prompting4Debugging: Red-Teaming Text-to-Image Diffusion Models by Finding "
             "Problematic Prompts (arXiv:2309.06135)")

    def losses(self, model, original, rows, x0, allowed):
        c = self.config
        x_t, t, _ = noise_bank(model, x0, c.timesteps, self.seed)
        with torch.no_grad():
            own = original.encode_prompts(original.tokenize([r["prompt"] for r in rows]))
            want = original.noise_pred(x_t, t, own.repeat_interleave(c.timesteps, dim=0))  # ε*(x_t, E(p), t)
        def loss_fn(cond):
            return _per_item_mse(model.noise_pred(x_t, t, cond.repeat_interleave(c.timesteps, dim=0)), want,
                                 c.timesteps)

        if c.insert_every:  # P4D-K
            ids, mask, cut = inserted_ids(model, [r["prompt"] for r in rows], c.insert_every)
            n = int(mask[0].sum())
            init = torch.multinomial(allowed.float(), len(rows) * n, replacement=True).reshape(len(rows), n)
            return loss_fn, ids, mask, init, cut
        ids, mask, _ = prompt_ids(model, [""] * len(rows), prefix=c.tokens)

        # start from the prompt's own tokens (repeated or cut to `tokens`), banned ones moved to their
        # nearest allowed token: the search starts where the original model draws the concept
        table, cut = token_table(model), 0
        init = torch.empty((len(rows), c.tokens), dtype=torch.long)
        for i, r in enumerate(rows):
            own = model.tokenizer(r["prompt"], add_special_tokens=False)["input_ids"] or [int(allowed.nonzero()[0])]
            cut += len(own) > c.tokens
            row = torch.tensor((own * c.tokens)[:c.tokens])
            bad = ~allowed[row]
            row[bad] = nearest_tokens(table[row[bad]], table, allowed) if bad.any() else row[bad]
            init[i] = row
        return loss_fn, ids, mask, init, cut

    def describe(self, n: int, steps: int) -> str:
        c = self.config
        if c.insert_every:
            return (f"P4D-K: one learnt token after every {c.insert_every} prompt tokens ({n} forget prompts), "
                    f"optimised {steps} steps (lr {c.lr}) so the erased model's noise prediction matches the "
                    "original model's on the prompt")
        return (f"a hard prompt of {c.tokens} tokens per prompt ({n} forget prompts) optimised {steps} steps "
                f"(lr {c.lr}) so the erased model's noise prediction matches the original model's on the prompt")


# ============================================================================== Ring-A-Bell
@dataclass
class RingABellConfig(AttackConfig):
    strength: float = field(default=3.0, metadata={"help": "η: the concept direction's weight in E(p) + η·d"})
    search: bool = field(default=False, metadata={"help": "find hard prompts near the target (genetic search); "
                                                          "false: condition on the target embedding itself"})
    steps: int = field(default=50, metadata={"help": "generations of the genetic search (search: true)"})
    tokens: int = field(default=16, metadata={"help": "tokens of each searched prompt (search: true)"})
    population: int = field(default=32, metadata={"help": "candidates per prompt per generation (search: true)"})
    mutation: float = field(default=0.1, metadata={"help": "per-token mutation probability (search: true)"})
    max_prompts: int = field(default=0, metadata={"help": "attack at most this many forget prompts (0: all)"})
    ban_concept_words: bool = field(default=True, metadata={"help": "never put the erased concept's words in a "
                                                                    "searched prompt"})


def concept_direction(model, captions: list[str], words: list[str]) -> tuple[torch.Tensor, int]:
    """Ring-A-Bell's concept direction ``(T, d)``: mean text-encoder output of the captions that
    contain one of ``words`` minus the mean of the same captions with those words deleted; and
    the number of pairs."""
    tok = model.tokenizer
    pats = [tok(w, add_special_tokens=False)["input_ids"] for w in words]
    with_w, without = [], []
    for cap in dict.fromkeys(captions):
        ids = tok(cap, add_special_tokens=False)["input_ids"]
        keep = list(ids)
        for p in pats:
            i = 0
            while i <= len(keep) - len(p):
                if keep[i:i + len(p)] == p:
                    del keep[i:i + len(p)]
                else:
                    i += 1
        if len(keep) != len(ids):
            with_w.append(cap)
            without.append(tok.decode(keep))
    if not with_w:
        raise ValueError(f"ring_a_bell: no forget caption contains the concept words {words}; the direction needs "
                         "prompt pairs with and without them")
    with torch.no_grad():
        a = model.encode_prompts(model.tokenize(with_w)).mean(0)
        b = model.encode_prompts(model.tokenize(without)).mean(0)
    return a - b, len(with_w)


@torch.no_grad()
def genetic_search(model, targets: torch.Tensor, n_tokens: int, generations: int, population: int,
                   mutation: float, allowed: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per target ``(B, T, d)``, a hard prompt of ``n_tokens`` tokens whose encoding is closest (MSE)
    to it: elitist genetic search (keep the better half, uniform crossover, mutation) for
    ``generations``. -> ``(ids (B, T), mse (B,), generations done)``."""
    g = torch.Generator().manual_seed(seed)
    b = targets.shape[0]
    pool = torch.nonzero(allowed).squeeze(1)
    ids0, mask, _ = prompt_ids(model, [""], prefix=n_tokens)
    pick = lambda *shape: pool[torch.randint(0, len(pool), shape, generator=g)]  # noqa: E731
    pop = pick(b, population, n_tokens)  # (B, P, n)

    def fitness(pop):
        full = ids0.repeat(b * population, 1)
        full[:, mask[0]] = pop.reshape(-1, n_tokens)
        enc = model.encode_prompts(full).reshape(b, population, *targets.shape[1:])
        return ((enc - targets[:, None]) ** 2).mean(dim=(2, 3))  # (B, P)

    fit = fitness(pop)
    for _ in range(generations):
        order = fit.argsort(dim=1)
        elite = torch.gather(pop, 1, order[:, :population // 2, None].expand(-1, -1, n_tokens))  # (B, P/2, n)
        pa = torch.randint(0, elite.shape[1], (b, population - elite.shape[1]), generator=g)
        pb = torch.randint(0, elite.shape[1], (b, population - elite.shape[1]), generator=g)
        ga = torch.gather(elite, 1, pa[..., None].expand(-1, -1, n_tokens))
        gb = torch.gather(elite, 1, pb[..., None].expand(-1, -1, n_tokens))
        child = torch.where(torch.rand(ga.shape, generator=g) < 0.5, ga, gb)
        mut = torch.rand(child.shape, generator=g) < mutation
        child = torch.where(mut, pick(*child.shape), child)
        pop = torch.cat([elite, child], dim=1)
        fit = fitness(pop)
    best = fit.argmin(dim=1)
    out = ids0.repeat(b, 1)
    out[:, mask[0]] = pop[torch.arange(b), best]
    return out, fit[torch.arange(b), best], generations


class RingABell(Attack):
    """Ring-A-Bell: the concept direction in text-encoder space added to the forget prompts, as a
    soft condition or searched hard prompts (see the module docstring). Needs no original model."""

    name = "ring_a_bell"
    Config = RingABellConfig
    paper = ("Tsai et al., 2024, Ring-A-Bell! How Reliable are Concept Removal Methods for Diffusion Models? "
             "(arXiv:2310.10012)")
    modalities = ("image",)

    def validate(self) -> None:
        c = self.config
        for key in ("steps", "tokens"):
            if getattr(c, key) < 1:
                raise ValueError(f"eval.attack_params.ring_a_bell.{key}={getattr(c, key)}: must be >= 1")
        if c.population < 2:
            raise ValueError(f"eval.attack_params.ring_a_bell.population={c.population}: must be >= 2")
        if not 0 <= c.mutation <= 1:
            raise ValueError(f"eval.attack_params.ring_a_bell.mutation={c.mutation}: must be in [0, 1]")
        if c.max_prompts < 0:
            raise ValueError(f"eval.attack_params.ring_a_bell.max_prompts={c.max_prompts}: must be >= 0 (0: all)")

    def attacked(self, model, original, inputs: AttackInputs) -> Attacked:
        _check_model(model, self.name)
        c = self.config
        rows = forget_rows(inputs.data, c.max_prompts)
        words = concept_prompts(inputs.data)[0]
        direction, pairs = concept_direction(model, [it["caption"] for it in inputs.forget], words)  # (T, d)
        with torch.no_grad():
            own = model.encode_prompts(model.tokenize([r["prompt"] for r in rows]))
        targets = own + c.strength * direction  # (B, T, d)
        info = {"strength": c.strength, "pairs": pairs, "prompts": len(rows), "direction": _embedding_summary(direction)}
        if c.search:
            allowed = allowed_tokens(model, words if c.ban_concept_words else [])
            ids, mse, done = genetic_search(model, targets, c.tokens, c.steps, c.population, c.mutation, allowed,
                                            self.seed)
            with torch.no_grad():
                conds = model.encode_prompts(ids)
            info.update(steps_done=done, tokens=c.tokens, target_mse=round(float(mse.mean()), 6),
                        adversarial={r["prompt"]: _decode(model, ids[i].tolist()) for i, r in enumerate(rows)})
            note = (f"hard prompts of {c.tokens} tokens found by a genetic search ({done} generations, population "
                    f"{c.population}) near E(p) + {c.strength}·d for {len(rows)} forget prompts")
        else:
            conds = targets
            info.update(steps_done=0, tokens=0)
            note = (f"{len(rows)} forget prompts conditioned on E(p) + {c.strength}·d, d = the concept direction "
                    f"from {pairs} caption pairs with/without {words}")
        table = {r["prompt"]: conds[i] for i, r in enumerate(rows)}
        if c.search:
            wrapped = _hard_prompt_model(model, self.name, table, info["adversarial"], ids)
        else:
            wrapped = _AdversarialPrompts(model, self.name, _table_rewrite(model, table), _digest(table))
        return Attacked(model=wrapped, info=info, note=note)


# ============================================================================== concept inversion
@dataclass
class InversionTokenConfig(AttackConfig):
    steps: int = field(default=100, metadata={"help": "textual-inversion optimisation steps"})
    lr: float = field(default=0.005, metadata={"help": "Adam learning rate on the new token embedding"})
    images: int = field(default=16, metadata={"help": "original-model images of the forget captions to invert"})
    batch_size: int = field(default=8, metadata={"help": "images per step"})
    sample_steps: int = field(default=10, metadata={"help": "DDIM steps of the original model's concept images"})


class ConceptInversion(Attack):
    """Concept inversion: a new token embedding learnt by textual inversion against the erased
    model on original-model images of the concept, used in place of the concept word."""

    name = "concept_inversion"
    Config = InversionTokenConfig
    paper = ("Pham et al., 2024, Circumventing Concept Erasure Methods for Text-to-Image Generative Models "
             "(arXiv:2308.01508)")
    modalities = ("image",)
    needs_original = True

    def validate(self) -> None:
        c = self.config
        for key in ("steps", "images", "batch_size", "sample_steps"):
            if getattr(c, key) < 1:
                raise ValueError(f"eval.attack_params.concept_inversion.{key}={getattr(c, key)}: must be >= 1")
        if not c.lr > 0:
            raise ValueError(f"eval.attack_params.concept_inversion.lr={c.lr}: must be > 0")

    def attacked(self, model, original, inputs: AttackInputs) -> Attacked:
        _check_model(model, self.name)
        c = self.config
        words = concept_prompts(inputs.data)[0]
        tok = model.tokenizer
        caps = [cap for cap in dict.fromkeys(it["caption"] for it in inputs.forget)
                if concept_positions(tok, model.tokenize([cap]), words).any()]
        if not caps:
            raise ValueError(f"concept_inversion: no forget caption contains the concept words {words}")
        g = torch.Generator().manual_seed(self.seed)
        pick = torch.randint(0, len(caps), (c.images,), generator=g).tolist()
        rows = [{"prompt": caps[i], "seed": int(torch.randint(0, 2**31 - 1, (1,), generator=g)), "guidance": 3.0}
                for i in pick]
        x0 = original_images(original, rows, c.sample_steps)  # (N, C, h, w)
        ids = model.tokenize([r["prompt"] for r in rows])
        mask = concept_positions(tok, ids, words)  # (N, T)
        table = token_table(model)
        first = tok(words[0], add_special_tokens=False)["input_ids"]
        v = table[first].mean(0).clone().float().requires_grad_(True)  # (d_in,): starts at the word's embedding
        opt = torch.optim.Adam([v], lr=c.lr)
        losses = []
        for step in range(c.steps):
            idx = torch.randint(0, len(rows), (min(c.batch_size, len(rows)),), generator=g)
            x_t, t, target = noise_bank(model, x0[idx], 1, self.seed + step)
            with soft_tokens(model, mask[idx], v.expand(len(idx), ids.shape[1], -1)):
                loss = _per_item_mse(model.noise_pred(x_t, t, model.encode_prompts(ids[idx])), target, 1).mean()
            (grad,) = torch.autograd.grad(loss, [v])
            opt.zero_grad()
            v.grad = grad
            opt.step()
            losses.append(float(loss.detach()))
        v = v.detach()

        def rewrite(prompts):
            pid = model.tokenize(prompts)
            m = concept_positions(tok, pid, words)
            with soft_tokens(model, m, v.expand(len(prompts), pid.shape[1], -1)):
                cond = model.encode_prompts(pid)
            return cond, m.any(dim=1)

        wrapped = _AdversarialPrompts(model, self.name, rewrite, _digest({"v": v}))
        k = max(1, len(losses) // 10)
        info = {"steps_done": c.steps, "tokens": 1, "images": len(rows), "words": words,
                "embedding": _embedding_summary(v),
                "loss": {"first": round(float(np.mean(losses[:k])), 6), "last": round(float(np.mean(losses[-k:])), 6)}}
        note = (f"one token embedding learnt by textual inversion ({c.steps} steps, lr {c.lr}) on {len(rows)} "
                f"original-model images of the forget captions, used in place of {words} in every prompt with them")
        return Attacked(model=wrapped, info=info, note=note)


class P4DK(P4D):
    """P4D-K under its own name, so that a run can report it next to P4D-N (``p4d``): the prompt's own
    tokens stay and one learnt token is inserted after every ``insert_every`` (K, default 3) of them."""

    name = "p4d_k"
    Config = P4DKConfig


OPTIMISATION_ATTACKS = (UnlearnDiffAtk, P4D, P4DK, RingABell, ConceptInversion)

__all__ = ["UnlearnDiffAtk", "P4D", "P4DK", "RingABell", "ConceptInversion", "TokenAttackConfig", "RingABellConfig",
           "InversionTokenConfig", "P4DConfig", "P4DKConfig", "OPTIMISATION_ATTACKS", "soft_tokens", "nearest_tokens",
           "prompt_ids", "input_layers", "token_table",
           "concept_direction", "genetic_search", "optimise_hard_tokens"]
