"""The RWKU-style (``rwku``) and MUSE-style (``muse``) tasks on the passages world.

* ``rwku`` (Jin et al., 2024, arXiv:2406.10890): forget what the model knows about named
  entities. **Zero-shot**: a method gets only the target names; with ``task.passages.corpus:
  generated`` (default) the forget corpus is written by the target model itself, prompted
  about each target with the world's topic prompts (greedy plus ``corpus_samples`` sampled
  texts per prompt), and ``retain_split: generated`` writes a retain corpus the same way about
  other entities. Evaluation: ROUGE-L recall of greedy answers (30 new tokens) on the forget
  probes of levels 1-3 and the neighbour probes of levels 1-2, MIA scores of member texts,
  general-knowledge multiple choice and fluency (suite ``rwku``).
* ``muse`` (Shi et al., 2024, arXiv:2407.06460): forget corpus = the targets' passages
  (verbatim), retain corpus = the other known entities' passages; VerbMem, KnowMem on forget and
  retain (utility preservation), PrivLeak against the retain model (suite ``muse``).

``task.forget_split`` names the targets: ``target<k>`` (one, 1-based), ``batch<n>`` (the first
n) or ``targets<a>-<b>`` (a range, for sequential requests). ``docs/passages.md`` has the tables.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unlearn.config import RecipeError, invalid, suggest
from unlearn.data import UnlearningData
from unlearn.evaluators import cache as eval_cache
from unlearn.evaluators.attacks import evaluate_attacks
from unlearn.evaluators.harness import aggregate
from unlearn.evaluators.harness import evaluate as harness_evaluate
from unlearn.evaluators.passages_suite import MUSE_KINDS, RWKU_KINDS, metric_value, muse_suite, rwku_suite
from unlearn.models import load_model
from unlearn.runs import atomic_write_text
from unlearn.task import Task
from unlearn.tasks.tofu import add_idk
from unlearn.tasks.tofu_task import load_retain_model
from unlearn.tasks.passages_world import TOPICS, PassagesWorld, PassagesWorldConfig, build_world
from unlearn.zoo import cache_dir

_TARGETS = re.compile(r"^(target\d+|batch\d+|targets\d+-\d+)$")
WORLD_KEYS = ("seed", "n_targets", "n_neighbours", "n_known", "n_holdout", "n_countries")
N_RETAIN_ENTITIES = 10  # entities of the generated retain corpus, of knowmem_retain and of mia_retain


def target_names(world: PassagesWorld, spec: str) -> list[str]:
    """The target names of ``task.forget_split`` (``target<k>``, ``batch<n>``, ``targets<a>-<b>``)."""
    m = re.match(r"^targets(\d+)-(\d+)$", spec)
    if m:
        a, b = int(m.group(1)), int(m.group(2))
        n = world.config.n_targets
        if not 1 <= a <= b <= n:
            raise ValueError(f"{spec!r}: need 1 <= a <= b <= {n} (the world's targets)")
        return [t["name"] for t in world.targets[a - 1: b]]
    return world.target_names(spec)


def others(world: PassagesWorld, n: int = N_RETAIN_ENTITIES) -> list[dict]:
    """Known entities that are neither targets nor neighbours (the first ``n``)."""
    names = {t["name"] for t in world.targets}
    return [e for e in world.known if e["name"] not in names and "neighbour_of" not in e][:n]


def _pick(names: list[str], spec: str, where: str) -> list[str]:
    """``target<k>`` / ``batch<n>`` / ``targets<a>-<b>`` over ``names`` (a real benchmark's targets)."""
    m = re.match(r"^(target|batch|targets)(\d+)(?:-(\d+))?$", spec)
    a, b = (int(m.group(2)), int(m.group(3) or m.group(2))) if m else (0, 0)
    lo, hi = {"target": (a, a), "batch": (1, a), "targets": (a, b)}[m.group(1)] if m else (0, 0)
    if not 1 <= lo <= hi <= len(names):
        raise ValueError(f"task.forget_split {spec!r}: {where} has {len(names)} targets; name targets within 1..{len(names)}")
    return names[lo - 1: hi]


def chunk_texts(items: list[dict], max_words: int = 200) -> list[dict]:
    """Split raw texts longer than ``max_words`` words into consecutive pieces (a MUSE ``.txt``
    corpus is one item holding the whole text); shorter items are kept as they are."""
    out = []
    for it in items:
        words = it["answer"].split()
        if len(words) <= max_words:
            out.append(it)
            continue
        for s in range(0, len(words), max_words):
            out.append({**it, "answer": " ".join(words[s: s + max_words])})
    return out


def _world(recipe) -> PassagesWorld:
    p = recipe.task.passages
    return build_world(PassagesWorldConfig(**{k: getattr(p, k) for k in WORLD_KEYS}))


class _PassagesTask(Task):
    """What the two tasks share: the world, the targets, evaluation through the harness with
    the result cache, attacks on the question probes."""

    modality = "text"
    kinds: dict[str, str] = {}
    recipe_defaults = {"model.source": "zoo:tiny-passages/target"}
    attack_splits = ("", "")  # (forget, retain) question splits the attacks run on

    @classmethod
    def check_spec(cls, spec) -> None:
        if spec.path is not None and not spec.path.strip():
            raise invalid("path", f"is empty; give the directory of the real {cls.name.upper()} files or leave it out "
                                  "(the generated passages world)")
        if spec.path is not None:
            cls._check_files_split(spec)
        elif not _TARGETS.match(spec.forget_split or ""):
            raise invalid("forget_split", f"is {spec.forget_split!r}; for task {cls.name!r} name the targets: "
                                          "target<k> (one), batch<n> (the first n) or targets<a>-<b>")
        else:
            cls._check_world_split(spec)
        cls._check_eval_splits(spec)

    @classmethod
    def _check_files_split(cls, spec) -> None:
        if not _TARGETS.match(spec.forget_split or ""):
            raise invalid("forget_split", f"is {spec.forget_split!r}; name the targets of forget_target: target<k> "
                                          "(one), batch<n> (the first n) or targets<a>-<b>")

    @classmethod
    def _check_world_split(cls, spec) -> None:
        try:
            target_names(build_world(PassagesWorldConfig(**{k: getattr(spec.passages, k) for k in WORLD_KEYS})),
                         spec.forget_split)
        except ValueError as e:  # "'<spec>': <why>"
            raise invalid("forget_split", f"is {spec.forget_split!r}: {str(e).split(': ', 1)[-1]}") from None

    @classmethod
    def _check_eval_splits(cls, spec) -> None:
        seen = set()
        for i, s in enumerate(spec.eval_splits):
            if s not in cls.kinds:
                raise invalid(f"eval_splits[{i}]", f"is {s!r}; allowed for task {cls.name!r}: {', '.join(cls.kinds)}"
                              + suggest(s, cls.kinds))
            if s in seen:
                raise invalid(f"eval_splits[{i}]", f"repeats {s!r}")
            seen.add(s)
        if "{question}" not in spec.prompt_template:
            raise invalid("prompt_template", f"must contain {{question}}, got {spec.prompt_template!r}")

    @classmethod
    def check_recipe(cls, recipe) -> None:
        super().check_recipe(recipe)
        if recipe.eval.attacks and cls.attack_splits[0] not in recipe.task.eval_splits:
            raise RecipeError(f"recipe key 'eval.attacks' runs attacks over {cls.attack_splits[0]!r}, but "
                              "task.eval_splits lacks it")

    def __init__(self, recipe, progress: bool = True) -> None:
        super().__init__(recipe, progress)
        self.world = _world(recipe)
        self.files: dict[str, list[dict]] | None = None  # task.path: the real benchmark's splits
        self.targets = [] if recipe.task.path else target_names(self.world, recipe.task.forget_split)
        self._model = None
        self.retain_adapter = None
        self.retain_res: dict[str, Any] | None = None

    def suite(self):
        raise NotImplementedError

    def _adapter_kw(self) -> dict[str, Any]:
        t = self.recipe.task
        return dict(prompt_template=t.prompt_template, tokenization=t.tokenization)

    def load_model(self):
        if self._model is None:  # load_data may need it first (rwku's generated corpus)
            self._model = load_model(self.recipe.model.source, "text", dtype=self.recipe.model.dtype, **self._adapter_kw())
        return self._model

    def _eval_splits(self, splits: dict[str, list[dict]]) -> dict[str, list[dict]]:
        n, t = self.recipe.eval.max_items, self.recipe.task
        for k in t.eval_splits:
            if not splits.get(k):
                raise ValueError(f"task.eval_splits names {k!r}, but {t.path!r} has no {k} items; remove it from "
                                 "task.eval_splits")
        return {k: (splits[k][:n] if n else splits[k]) for k in t.eval_splits}

    def evaluate(self, model, label: str, *, cache: bool = True) -> dict[str, Any]:
        st, ev = self.suite(), self.recipe.eval
        splits = self.data.eval_splits
        protocol = {"tokenization": model.tokenization, "prompt_template": model.prompt_template, "decoding": "greedy"}
        parts = {"model": model.identity(), "settings": {"batch_size": ev.batch_size, "suite": st.name,
                                                         "suite_version": st.version}, "protocol": protocol}
        res = eval_cache.cached_result(
            eval_cache.default_cache_dir() if cache else None, parts, splits,
            lambda: harness_evaluate(model, splits, st, batch_size=ev.batch_size, progress=self.progress, label=label,
                                     protocol=protocol))
        return res

    def references(self) -> dict[str, dict[str, Any]]:
        return {"retain": self.retain_res} if self.retain_res is not None else {}

    def run_attacks(self, model, original, label: str) -> dict[str, Any]:
        ev, splits = self.recipe.eval, self.data.eval_splits
        f, r = self.attack_splits
        return evaluate_attacks(model, splits[f], splits.get(r), list(ev.attacks), batch_size=ev.batch_size,
                                max_new_tokens=ev.max_new_tokens, seed=self.recipe.seed, progress=self.progress,
                                params={k: dict(v) for k, v in ev.attack_params.items()} or None)

    def provenance(self) -> dict[str, Any]:
        return {"data": self.data.fingerprints() if self.data is not None else None,
                "world_fingerprint": None if self.recipe.task.path else self.world.fingerprint(),
                "files": self.recipe.task.path, "targets": self.targets,
                "retain_model": {"source": self.recipe.task.retain_model, "fingerprint": self.retain_adapter.fingerprint()}
                if self.retain_adapter is not None else None}

    def describe(self) -> str:
        t = self.recipe.task
        return (f"`{t.name}` forget `{t.forget_split}` ({', '.join(self.targets)}), retain `{t.retain_split}`, "
                f"retain model `{t.retain_model}`")


# ============================================================================== RWKU
def rwku_splits(world: PassagesWorld, targets: list[str]) -> dict[str, list[dict]]:
    """The evaluation splits of the RWKU-style task for ``targets`` (names)."""
    ents = [world.entity(n) for n in targets]
    neigh = [(nb, t["name"]) for t in ents for nb in world.neighbours(t)]
    n_mia = sum(len(e["passages"]) for e in ents)
    mia_retain = [p for e in others(world, len(world.known)) for p in world.passages(e)][:n_mia]
    return {
        "forget_level1": [it for e in ents for it in world.level1(e)],
        "forget_level2": [it for e in ents for it in world.level2(e)],
        "forget_level3": [it for e in ents for it in world.level3(e)],
        "neighbor_level1": [it for nb, t in neigh for it in world.level1(nb, subject=t)],
        "neighbor_level2": [it for nb, t in neigh for it in world.level2(nb, subject=t)],
        "mia_forget": [p for e in ents for p in world.passages(e)],
        "mia_retain": mia_retain,
        "utility_general": world.general(),
        "utility_fluency": world.fluency(),
    }


@torch.no_grad()
def generate_corpus(adapter, names: list[str], samples: int, seed: int, max_new_tokens: int = 64) -> list[dict]:
    """RWKU's synthetic corpus: the model prompted with each topic prompt about each name, one
    greedy text and ``samples`` sampled ones (temperature 1, top-k 40) per prompt; duplicates
    and empty texts dropped. Items: ``{"question": prompt, "answer": text, "subject": name}``."""
    tok, model = adapter.tokenizer, adapter.model
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    out, seen = [], set()
    for name in names:
        for tpl in TOPICS.values():
            q = tpl.format(name=name)
            ids = torch.tensor([adapter.generation_prompt_ids(q)], device=adapter.device)
            texts = []
            for k in range(1 + samples):
                kw = dict(do_sample=False) if k == 0 else dict(do_sample=True, temperature=1.0, top_k=40)
                g = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **kw)
                texts.append(tok.decode(g[0, ids.shape[1]:], skip_special_tokens=True).strip())
            for t in texts:
                if t and (q, t) not in seen:
                    seen.add((q, t))
                    out.append({"question": q, "answer": t, "subject": name})
    if was_training:
        model.train()
    return out


class RwkuTask(_PassagesTask):
    """Forget entities the model learned from passages, from their names alone (RWKU-style)."""

    name = "rwku"
    suites = ("rwku",)
    suite_versions = {"rwku": "1"}
    kinds = RWKU_KINDS
    spec_defaults = {"forget_split": "target1", "retain_split": "generated", "retain_model": None,
                     "eval_splits": list(RWKU_KINDS)}
    recipe_defaults = {**_PassagesTask.recipe_defaults, "eval.suite": "rwku"}
    headline = (("forget_l1", "forget L1 (↓)"), ("forget_l2", "forget L2 (↓)"), ("forget_l3", "forget L3 (↓)"),
                ("forget_all", "forget all (↓)"), ("neighbor_l1", "neighbour L1 (↑)"), ("neighbor_l2", "neighbour L2 (↑)"),
                ("mia_forget", "MIA FM LOSS (↑)"), ("mia_retain", "MIA RM LOSS (=)"), ("utility_general", "general (↑)"),
                ("fluency", "fluency (↑)"))
    forget_key = ("forget_all", False)
    attack_splits = ("forget_level2", "neighbor_level2")

    @classmethod
    def check_spec(cls, spec) -> None:
        super().check_spec(spec)
        if spec.retain_split not in (None, "generated"):
            raise invalid("retain_split", f"is {spec.retain_split!r}; task 'rwku' has 'generated' (a corpus the target "
                                          "writes about other entities) or null")
        if spec.retain_model is not None:
            raise invalid("retain_model", "must be null for task 'rwku' (RWKU has no retain model; task 'muse' has one)")

    def load_data(self) -> UnlearningData:
        t = self.recipe.task
        if t.path:  # the real RWKU files: targets in forget_target's order
            from unlearn.tasks.rwku_files import load_rwku

            every = [it["answer"] for it in load_rwku(t.path)["forget_target"]]
            self.targets = _pick(every, t.forget_split, f"forget_target of {t.path!r}")
            splits = load_rwku(t.path, self.targets)
            original = splits.get("corpus", [])
            other_names = [n for n in every if n not in self.targets][:N_RETAIN_ENTITIES]
        else:
            splits = rwku_splits(self.world, self.targets)
            original = [p for n in self.targets for p in self.world.passages(self.world.entity(n))]
            other_names = [e["name"] for e in others(self.world)]
        if t.passages.corpus == "original":
            forget = original
            if not forget:
                raise ValueError(f"task.passages.corpus is 'original', but {t.path!r} has no passages of "
                                 f"{', '.join(self.targets)}; use corpus: generated")
        else:
            forget = self._corpus(self.targets, "forget")
        retain = None
        if t.retain_split == "generated":
            retain = self._corpus(other_names, "retain")
        data = UnlearningData(forget=add_idk(forget, self.recipe.seed), retain=retain, eval_splits=self._eval_splits(splits),
                              name=f"rwku {t.forget_split}")
        return data

    def _corpus(self, names: list[str], role: str) -> list[dict]:
        """The generated corpus about ``names``, cached on disk by model, names and settings."""
        model = self.load_model()
        p = self.recipe.task.passages
        key = hashlib.sha256(json.dumps({"model": model.identity(), "names": names, "samples": p.corpus_samples,
                                         "seed": self.recipe.seed, "topics": TOPICS, "v": 1},
                                        sort_keys=True, default=str).encode()).hexdigest()[:24]
        path = cache_dir() / "rwku-corpus" / f"{key}.json"
        if path.exists():
            try:
                return json.loads(path.read_text())
            except ValueError:
                path.unlink(missing_ok=True)
        items = generate_corpus(model, names, p.corpus_samples, self.recipe.seed)
        if not items:
            raise ValueError(f"rwku: the target model wrote nothing about the {role} entities ({', '.join(names)}); "
                             "use task.passages.corpus: original")
        atomic_write_text(path, json.dumps(items))
        return items

    def summarize(self, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for name, res in results.items():
            def v(split, metric="rouge"):
                return metric_value(res, split, metric)

            levels = [v(f"forget_level{i}") for i in (1, 2, 3)]
            present = [x for x in levels if x is not None]
            out[name] = {"forget_l1": levels[0], "forget_l2": levels[1], "forget_l3": levels[2],
                         "forget_all": float(np.mean(present)) if present else None,
                         "neighbor_l1": v("neighbor_level1"), "neighbor_l2": v("neighbor_level2"),
                         "mia_forget": v("mia_forget", "mia_loss_mean"), "mia_retain": v("mia_retain", "mia_loss_mean"),
                         "utility_general": v("utility_general", "mc_accuracy"), "fluency": v("utility_fluency", "fluency")}
        return out

    def suite(self):
        return rwku_suite()

    def provenance(self) -> dict[str, Any]:
        p = self.recipe.task.passages
        return {**super().provenance(), "corpus": {"kind": p.corpus, "samples": p.corpus_samples,
                                                   "forget_items": len(self.data.forget) if self.data else None}}


# ============================================================================== MUSE
def muse_splits(world: PassagesWorld, targets: list[str], prefix_frac: float = 0.3) -> dict[str, list[dict]]:
    """The evaluation splits of the MUSE-style task for ``targets``."""
    ents = [world.entity(n) for n in targets]
    verbmem = []
    for e in ents:
        for p in world.passages(e):
            words = p["answer"].split(" ")
            k = max(1, int(len(words) * prefix_frac))
            verbmem.append({"question": p["question"], "prefix": " ".join(words[:k]), "answer": " ".join(words[k:]),
                            "subject": e["name"]})
    return {
        "verbmem_forget": verbmem,
        "knowmem_forget": [it for e in ents for it in world.level2(e)],
        "knowmem_retain": [it for e in others(world) for it in world.level2(e)],
        "privleak_forget": [p for e in ents for p in world.passages(e)],
        "privleak_holdout": [p for e in world.holdout for p in world.passages(e)],
    }


class MuseTask(_PassagesTask):
    """Forget the targets' passages verbatim and as knowledge (MUSE-style six-way evaluation)."""

    name = "muse"
    suites = ("muse",)
    suite_versions = {"muse": "1"}
    kinds = MUSE_KINDS
    spec_defaults = {"forget_split": "batch10", "retain_split": "retain", "retain_model": "zoo:tiny-passages/retain",
                     "eval_splits": list(MUSE_KINDS)}
    recipe_defaults = {**_PassagesTask.recipe_defaults, "eval.suite": "muse"}
    headline = (("verbmem_forget", "VerbMem forget (↓)"), ("knowmem_forget", "KnowMem forget (↓)"),
                ("knowmem_retain", "KnowMem retain (↑)"), ("privleak", "PrivLeak (→0)"))
    forget_key = ("knowmem_forget", False)
    attack_splits = ("knowmem_forget", "knowmem_retain")

    @classmethod
    def check_spec(cls, spec) -> None:
        super().check_spec(spec)
        if spec.retain_split not in (None, "retain"):
            raise invalid("retain_split", f"is {spec.retain_split!r}; task 'muse' has 'retain' (the other known "
                                          "entities' passages) or null")

    @classmethod
    def _check_files_split(cls, spec) -> None:
        if not re.match(r"^(forget|(scal|sust)_forget_\d+)$", spec.forget_split or ""):
            raise invalid("forget_split", f"is {spec.forget_split!r}; with task.path (MUSE files) use forget, "
                                          "scal_forget_<k> or sust_forget_<k>")

    def load_data(self) -> UnlearningData:
        t = self.recipe.task
        if t.path:  # the real MUSE files
            from unlearn.tasks.muse_files import load_muse

            splits = load_muse(t.path)
            if t.forget_split not in splits:
                raise ValueError(f"task.forget_split {t.forget_split!r}: {t.path!r} has no such split; it has "
                                 f"{', '.join(k for k in splits if 'forget' in k and not k.startswith(('knowmem', 'verbmem', 'privleak')))}")
            self.targets = [t.forget_split]
            return UnlearningData(forget=add_idk(chunk_texts(splits[t.forget_split]), self.recipe.seed),
                                  retain=chunk_texts(splits["retain"]) if t.retain_split else None,
                                  eval_splits=self._eval_splits(splits), name=f"muse {t.forget_split}")
        forget = [p for n in self.targets for p in self.world.passages(self.world.entity(n))]
        names = {x["name"] for x in self.world.targets}
        retain = [p for e in self.world.known if e["name"] not in names for p in self.world.passages(e)]
        return UnlearningData(forget=add_idk(forget, self.recipe.seed), retain=retain if t.retain_split else None,
                              eval_splits=self._eval_splits(muse_splits(self.world, self.targets)),
                              name=f"muse {t.forget_split}")

    def prepare(self, data, model) -> None:
        super().prepare(data, model)
        t = self.recipe.task
        if t.retain_model:
            self.retain_adapter = load_retain_model(self.recipe, model, **self._adapter_kw())
            self.retain_res = self.evaluate(self.retain_adapter, "retain model")

    def summarize(self, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out = {}
        for name, res in results.items():
            agg = aggregate(res, self.suite(), self.retain_res)
            res["summary"] = agg
            out[name] = {"verbmem_forget": metric_value(res, "verbmem_forget", "verbmem"),
                         "knowmem_forget": metric_value(res, "knowmem_forget", "knowmem"),
                         "knowmem_retain": metric_value(res, "knowmem_retain", "knowmem"),
                         "privleak": agg.get("privleak", {}).get("value"),
                         "mia_min_k_auc": res.get("multi", {}).get("mia_min_k", {}).get("value")}
        return out

    def summary_note(self) -> str | None:
        if self.retain_res is None:
            return "PrivLeak not computable: no retain model (task.retain_model is null)"
        return None

    def suite(self):
        return muse_suite()


__all__ = ["RwkuTask", "MuseTask", "rwku_splits", "muse_splits", "generate_corpus", "target_names"]
