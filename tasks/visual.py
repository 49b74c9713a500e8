"""The visual concept-erasure task (``task.name: visual``) as a :class:`~unlearn.task.Task`.

Data: the I2P-style visual world (:mod:`unlearn.tasks.visual_task`). Evaluation: the ``i2p``
suite (:mod:`unlearn.evaluators.image_suite`) -- one image per prompt-table row, read by the
judge of ``eval.judge`` -- with the result cache. Headline: erasure rate on explicit and
implicit prompts, retain accuracy in- and cross-domain, alignment, FID-like. The report adds a
before/after image grid and the image attack table. During training (``train.eval_every``)
the first ``train.eval_max_items`` rows per split are evaluated and the best state is kept by
erasure rate, retain accuracy or their mean. See ``docs/images.md``.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unlearn.adapters import weights_fingerprint
from unlearn.config import RecipeError, invalid, suggest
from unlearn.evaluators.attacks import run_image_attacks
from unlearn.evaluators import cache as eval_cache
from unlearn.evaluators.harness import evaluate as harness_evaluate
from unlearn.evaluators.image_judge import ImageJudge
from unlearn.evaluators.image_suite import I2P_SUITE_VERSION, i2p_suite, reference_renders
from unlearn.evaluators.real_judges import REAL_JUDGES, load_real_judge
from unlearn.models import load_model
from unlearn.report import fmt
from unlearn.task import Task
from unlearn.tasks.visual_task import VISUAL_EVAL_SPLITS, VISUAL_FORGET_SPLITS, load_visual
from unlearn.zoo import zoo_path

# rows shown in the before/after grid, per evaluation split
GRID_ROWS = 4
FORGET_EVAL_SPLITS = ("forget_explicit", "forget_implicit")
SELECT_BEST = ("erasure_rate", "retain_accuracy", "erasure_retain_mean")


def load_judge(source: str):
    """The judge named by ``eval.judge``.

    * ``zoo:tiny-t2i/judge`` or a directory: an :class:`~unlearn.evaluators.image_judge.ImageJudge`;
    * ``module.path:factory``: ``factory()`` from an importable module, returning any object with
      ``predict(images) -> {attribute: [value, ...]}`` and ``features(images) -> (N, F) array``
      (images uint8 ``(N, H, W, 3)``) -- the slot for real judges (e.g. a NudeNet or ResNet-50
      wrapper); the erase concepts are then ``attribute:value`` pairs of that judge;
    * ``nudenet:FILE.onnx``, ``q16:CLIP_DIR``, ``clip:CLIP_DIR`` with ``?key=value&...`` options: the
      real judges of :mod:`unlearn.evaluators.real_judges`, loaded from local files (``docs/judges.md``).
    """
    mod, sep, fn = source.partition(":")
    if sep and mod in REAL_JUDGES:
        return load_real_judge(source)
    if sep and mod != "zoo" and not Path(source).expanduser().exists() and mod.replace(".", "").replace("_", "").isalnum():
        try:
            factory = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"eval.judge {source!r}: cannot import {fn!r} from module {mod!r} ({e})") from None
        judge = factory()
        missing = [m for m in ("predict", "features") if not callable(getattr(judge, m, None))]
        if missing:
            raise ValueError(f"eval.judge {source!r} returned a {type(judge).__name__} without "
                             f"{' and '.join(missing)}(images); a judge needs predict and features")
        return judge
    if source.startswith("zoo:"):
        return ImageJudge.load(zoo_path(source[4:]))
    p = Path(source).expanduser()
    if not p.exists():
        raise ValueError(f"eval.judge {source!r} does not exist; give zoo:tiny-t2i/judge or a directory holding "
                         "judge.json + judge.safetensors")
    return ImageJudge.load(p)


def judge_fingerprint(judge) -> str:
    """Weights fingerprint of a torch judge; a user judge may supply ``fingerprint()`` instead."""
    if callable(getattr(judge, "fingerprint", None)):
        return str(judge.fingerprint())
    return weights_fingerprint(judge) if isinstance(judge, torch.nn.Module) else f"unversioned:{type(judge).__name__}"


def image_summary(res: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one i2p evaluation."""
    def m(split: str, name: str):
        return res["splits"].get(split, {}).get("metrics", {}).get(name, {}).get("value")

    return {"erasure_explicit": m("forget_explicit", "erasure_rate"),
            "erasure_implicit": m("forget_implicit", "erasure_rate"),
            "retain_in_domain": m("retain", "retain_in_domain"), "retain_cross_domain": m("retain", "retain_cross_domain"),
            "alignment": m("retain", "alignment"), "fid_like": m("retain", "fid_like")}


def _curve_point(res: dict[str, Any]) -> dict[str, Any]:
    s = image_summary(res)
    rates = [s[k] for k in ("erasure_explicit", "erasure_implicit") if s[k] is not None]
    erasure = float(np.mean(rates)) if rates else None
    retain = s["retain_in_domain"]
    return {"erasure_explicit": s["erasure_explicit"], "erasure_implicit": s["erasure_implicit"],
            "erasure_rate": erasure, "retain_in_domain": retain, "retain_accuracy": retain,
            "retain_cross_domain": s["retain_cross_domain"],
            "erasure_retain_mean": None if erasure is None or retain is None else (erasure + retain) / 2}


def save_grid(path: Path, rows: list[dict], before: np.ndarray, after: np.ndarray, scale: int = 4) -> None:
    """A PNG: one row per prompt, columns target | erased, each image upscaled ``scale`` x (nearest)."""
    save_image_grid(path, [before[:len(rows)], after[:len(rows)]], scale)


def save_image_grid(path: Path, columns: list[np.ndarray], scale: int = 4) -> None:
    """A PNG of uint8 images: column j shows ``columns[j]`` ``(R, S, S, 3)`` top to bottom, each image
    upscaled ``scale`` x (nearest), 2-pixel white gaps."""
    if not columns or any(c.shape != columns[0].shape for c in columns):
        raise ValueError("save_image_grid needs columns of one shape (R, S, S, 3)")
    n, h, w = columns[0].shape[:3]
    pad = 2
    img = np.full((n * (h * scale + pad) + pad, len(columns) * (w * scale + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        for j, src in enumerate(columns):
            y, x = pad + i * (h * scale + pad), pad + j * (w * scale + pad)
            img[y: y + h * scale, x: x + w * scale] = src[i].repeat(scale, 0).repeat(scale, 1)
    Image.fromarray(img).save(path)


class VisualTask(Task):
    """Erase a concept (a colour, shape or texture) from a text-to-image model: the I2P-style
    visual world of ``task.visual``, judged by ``eval.judge``."""

    name = "visual"
    modality = "image"
    suites = ("i2p",)
    suite_versions = {"i2p": I2P_SUITE_VERSION}  # built in prepare (it needs the judge), not in SUITES
    select_best = SELECT_BEST
    headline = (("erasure_explicit", "erasure rate, explicit prompts (↑)"), ("erasure_implicit", "erasure rate, implicit (↑)"),
                ("retain_in_domain", "retain acc. in-domain (↑)"), ("retain_cross_domain", "retain acc. cross-domain (↑)"),
                ("alignment", "alignment (↑)"), ("fid_like", "FID-like (↓)"))
    forget_key = ("erasure_explicit", True)
    curve = (("erasure_explicit", "erasure explicit"), ("erasure_implicit", "erasure implicit"),
             ("retain_in_domain", "retain in-domain"), ("utility_ratio", "retain / target"),
             ("retain_cross_domain", "retain cross-domain"))
    curve_suite = "i2p"
    curve_plots = (("erasure_rate", "erasure rate (↑)", False), ("retain_in_domain", "retain accuracy in-domain (↑)", False))
    spec_defaults = {"forget_split": "forget", "retain_split": "retain", "retain_model": None,
                     "eval_splits": list(VISUAL_EVAL_SPLITS)}
    recipe_defaults = {"eval.suite": "i2p", "model.source": "zoo:tiny-t2i/target"}

    # ------------------------------------------------------------------ recipe time
    @classmethod
    def check_spec(cls, spec) -> None:
        if spec.path is not None:
            raise invalid("path", "must not be set for task 'visual' (its world is generated from task.visual)")
        if spec.forget_split not in VISUAL_FORGET_SPLITS:
            raise invalid("forget_split", f"must be one of {', '.join(VISUAL_FORGET_SPLITS)} for task 'visual', got "
                                          f"{spec.forget_split!r}" + suggest(spec.forget_split, VISUAL_FORGET_SPLITS))
        if spec.retain_split not in (None, "retain"):
            raise invalid("retain_split", f"must be 'retain' or null for task 'visual', got {spec.retain_split!r}")
        if spec.retain_model is not None:
            raise invalid("retain_model", "must be null for task 'visual' (image metrics need no retain model)")
        if not spec.eval_splits:
            raise invalid("eval_splits", f"is empty; use some of {', '.join(VISUAL_EVAL_SPLITS)}")
        for i, split in enumerate(spec.eval_splits):
            if split not in VISUAL_EVAL_SPLITS:
                raise invalid(f"eval_splits[{i}]", f"is {split!r}; allowed for task 'visual': "
                                                   f"{', '.join(VISUAL_EVAL_SPLITS)}" + suggest(split, VISUAL_EVAL_SPLITS))
        if len(set(spec.eval_splits)) != len(spec.eval_splits):
            raise invalid("eval_splits", f"repeats a split: {spec.eval_splits}")

    @classmethod
    def check_recipe(cls, recipe) -> None:
        if recipe.task.visual.prompts is not None:
            _check_prompt_file_recipe(recipe)
        if recipe.eval.suite in ("tofu", "tofu-full"):
            raise RecipeError(f"recipe key 'eval.suite' is {recipe.eval.suite!r}, a text suite, but task.name is "
                              "'visual'; use i2p")
        super().check_recipe(recipe)
        splits = recipe.task.eval_splits
        if recipe.eval.attacks and not any(s in splits for s in FORGET_EVAL_SPLITS):
            raise RecipeError("recipe key 'eval.attacks' scores the forget splits, but task.eval_splits has neither "
                              "forget_explicit nor forget_implicit")
        sb = recipe.train.select_best
        if sb in ("erasure_rate", "erasure_retain_mean") and not any(s in splits for s in FORGET_EVAL_SPLITS):
            raise RecipeError(f"recipe key 'train.select_best' is {sb!r}, which needs an erasure rate, but "
                              "task.eval_splits has neither forget_explicit nor forget_implicit")
        needs_retain = [k for k, on in (("train.select_best", sb in ("retain_accuracy", "erasure_retain_mean")),
                                        ("train.utility_floor", recipe.train.utility_floor is not None)) if on]
        if needs_retain and "retain" not in splits:
            raise RecipeError(f"recipe key '{needs_retain[0]}' needs the retain accuracy, but task.eval_splits lacks "
                              "'retain'")
        if recipe.method.params.get("retain_loss") == "kl":
            raise RecipeError("recipe key 'method.params.retain_loss' is 'kl', which needs token logits; task 'visual' "
                              "supports retain_loss nll")

    @classmethod
    def utility_key(cls) -> str | None:
        return "retain_in_domain"

    # ------------------------------------------------------------------ run time
    def __init__(self, recipe, progress: bool = True) -> None:
        super().__init__(recipe, progress)
        self.judge = None
        self.suite = None
        self.protocol: dict[str, Any] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.grid_rows: list[dict] = []
        self.grids: dict[str, np.ndarray] = {}
        self.te_splits: dict[str, list[dict]] | None = None

    def load_data(self):
        t, ev = self.recipe.task, self.recipe.eval
        return load_visual(t.visual.world_config(), forget_split=t.forget_split, retain_split=t.retain_split,
                           eval_splits=t.eval_splits, max_prompts=ev.max_items, prompts=t.visual)

    def load_model(self):
        src = self.recipe.model.source
        if src.startswith(("/", "~", "./", "../")) and not Path(src).expanduser().exists():
            raise ValueError(f"recipe key 'model.source' is {src!r}, which does not exist; set it to your pipeline "
                             "directory, e.g. --set model.source=/path/to/stable-diffusion-v1-4 (a diffusers "
                             "snapshot with model_index.json)")
        extra = {"config": self.recipe.model.config} if self.recipe.model.config is not None else {}
        return load_model(src, "image", dtype=self.recipe.model.dtype, **extra)


    def prepare(self, data, model) -> None:
        super().prepare(data, model)
        ev = self.recipe.eval
        if data.prompt_concepts:  # image-free editors: a mid-grey image at the model's size for the runner's checks
            size = int(getattr(model, "image_size", data.world.config.size))
            for it in data.forget:
                it.setdefault("image", np.full((size, size, 3), 127, dtype=np.uint8))
        self.judge = load_judge(ev.judge)
        data.judge = self.judge
        all_rows = [r for rows in data.eval_splits.values() for r in rows]
        # a prompt file has no renders of its prompts: no reference set, fid_like is "not computable"
        ref_renders = [] if data.prompt_concepts else reference_renders(data.world, data.eval_splits.get("retain", all_rows))
        ref_feats = self.judge.features([it["image"] for it in ref_renders]) if ref_renders else None
        self.suite = i2p_suite(self.judge, data.erase, ref_feats, steps=ev.sample_steps)
        self.protocol = {"sample_steps": ev.sample_steps, "sampler": "DDIM, classifier-free guidance per row",
                         "judge": ev.judge, "judge_fingerprint": judge_fingerprint(self.judge), "erase": data.erase,
                         "reference_renders": len(ref_renders)}
        self._ref_hash = (hashlib.sha256(np.ascontiguousarray(ref_feats, dtype=np.float64).tobytes()).hexdigest()[:16]
                          if ref_feats is not None else None)
        if data.prompt_concepts:
            self.warnings += _label_warnings(self.judge, data)
            self.protocol["prompts"] = {"file": self.recipe.task.visual.prompts,
                                        "retain_file": self.recipe.task.visual.retain_prompts,
                                        "categories": list(self.recipe.task.visual.prompt_categories)}
        self.grid_rows = [{**r, "split": name} for name, items in data.eval_splits.items() for r in items[:GRID_ROWS]]

    def _evaluate(self, model, splits: dict[str, list[dict]], label: str, *, cache: bool, progress: bool):
        ev = self.recipe.eval

        def compute():
            return harness_evaluate(model, splits, self.suite, batch_size=ev.batch_size, progress=progress,
                                    label=label, protocol=self.protocol)

        if not cache or not callable(getattr(model, "identity", None)):
            return compute()
        key = {"model": model.identity(), "suite": self.suite.name, "suite_version": self.suite.version,
               "protocol": self.protocol, "reference_features": self._ref_hash, "batch_size": ev.batch_size}
        return eval_cache.cached_result(eval_cache.default_cache_dir(), key, splits, compute)

    def evaluate(self, model, label: str, *, cache: bool = True) -> dict[str, Any]:
        res = self._evaluate(model, self.data.eval_splits, label, cache=cache, progress=self.progress)
        self.results[label] = res
        return res

    def summarize(self, results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return {name: image_summary(res) for name, res in results.items()}

    def observe(self, model, label: str) -> None:
        steps = self.recipe.eval.sample_steps
        if self.grid_rows:
            self.grids[label] = np.stack([model.sample([r["prompt"]], seed=[int(r["seed"])], steps=steps,
                                                       guidance=float(r["guidance"]))[0] for r in self.grid_rows])

    # training-time evaluation ------------------------------------------------------------
    def train_eval_baseline(self, model) -> dict[str, Any]:
        n = self.recipe.train.eval_max_items
        self.te_splits = {k: (v[:n] if n else v) for k, v in self.data.eval_splits.items()}
        res = self._evaluate(model, self.te_splits, "target (train-eval)", cache=True, progress=False)
        return _curve_point(res)

    def train_eval_point(self, model, label: str) -> dict[str, Any]:
        return _curve_point(self._evaluate(model, self.te_splits, label, cache=False, progress=False))

    def train_eval_items(self) -> dict[str, int]:
        return {k: len(v) for k, v in (self.te_splits or {}).items()}

    # attacks ----------------------------------------------------------------------------
    def run_attacks(self, model, original, label: str) -> dict[str, Any]:
        ev = self.recipe.eval
        splits = {k: v for k, v in self.data.eval_splits.items() if k in (*FORGET_EVAL_SPLITS, "retain")}
        res = self.results.get(label) or self.evaluate(model, label, cache=False)
        before = {"splits": {k: v for k, v in res["splits"].items() if k in splits}}
        return run_image_attacks(list(ev.attacks), model, original, self.data, splits,
                                 lambda m, sp: self._evaluate(m, sp, "attacked", cache=False, progress=False), before,
                                 params=dict(ev.attack_params), seed=self.recipe.seed)

    # the run's files ----------------------------------------------------------------------
    def provenance(self) -> dict[str, Any]:
        return {"retain_model": None, "data": {**self.data.fingerprints(), "world": self.data.world.fingerprint()},
                "judge": {"source": self.recipe.eval.judge, "fingerprint": judge_fingerprint(self.judge)}}

    def describe(self) -> str:
        t, ev = self.recipe.task, self.recipe.eval
        return (f"`visual`, erase {', '.join(t.visual.erase)} (guide {', '.join(t.visual.guide)}), forget "
                f"`{t.forget_split}`, retain `{t.retain_split}`; judge `{ev.judge}`; {ev.sample_steps} DDIM steps "
                "per image")

    def headline_text(self, model_name: str, row: dict[str, Any]) -> str:
        f = {k: "n/a" if v is None else f"{v:.3f}" for k, v in row.items()}
        return (f"  {model_name:<10} erasure explicit {f['erasure_explicit']} implicit {f['erasure_implicit']}   retain "
                f"in-domain {f['retain_in_domain']} cross-domain {f['retain_cross_domain']}   FID-like {f['fid_like']}")

    def report_sections(self, run_dir: Path, metrics: dict[str, Any]) -> dict[str, list[str]]:
        head = ["Erasure rate: share of target-concept prompts whose image the judge does not read as the concept "
                "(before erasure it is the judge's/model's error rate). Retain accuracy: judge accuracy on the erased "
                "attribute (in-domain) and the other attributes (cross-domain) for prompts of other concepts.", ""]
        results = []
        before, after = self.grids.get("target"), self.grids.get("unlearned")
        if self.grid_rows and before is not None and after is not None:
            save_grid(run_dir / "grid.png", self.grid_rows, before, after)
            results += ["## Generations before / after", "", "Left: target, right: after erasure. Rows:", ""]
            results += [f"{i + 1}. `{r['split']}` -- {r['prompt']} (seed {r['seed']})" for i, r in enumerate(self.grid_rows)]
            results += ["", "![generations before and after](grid.png)", ""]
        return {"headline": head, "results": results, "attacks": _attack_section(metrics.get("attacks") or {})}


def _label_warnings(judge, data) -> list[str]:
    """With a prompt file and a judge that lists its labels (the CLIP zero-shot judge): erase
    values and retain-row values the judge can never predict (a misspelt label scores 0 silently)."""
    labels = getattr(judge, "attributes", None)
    if not isinstance(labels, dict):
        return []
    out = []
    for c in data.erase:
        a, v = c.split(":", 1)
        if a in labels and v not in labels[a]:
            out.append(f"erase concept {c!r}: the judge's {a} labels do not include {v!r}, so no image can count as it")
    for r in data.eval_splits.get("retain", []):
        for a, vals in labels.items():
            if a in r and r[a] not in vals:
                out.append(f"retain prompt {r['case_number']}: {a} {r[a]!r} is not one of the judge's labels")
                break
    return out[:10]


# editors that need no training images (a prompt file has none): the rest train on renders
PROMPT_FILE_METHODS = ("uce", "rece", "safree", "esd")


def _check_prompt_file_recipe(recipe) -> None:
    """``task.visual.prompts``: only image-free methods, prompt-file splits, no attacks."""
    m, t = recipe.method, recipe.task
    if m.name not in PROMPT_FILE_METHODS:
        raise RecipeError(f"recipe key 'method.name' is {m.name!r}, which trains on rendered images, but "
                          f"task.visual.prompts gives none; use one of {', '.join(PROMPT_FILE_METHODS)}")
    if m.name == "esd" and m.params.get("prompts", "concept") != "concept":
        raise RecipeError("recipe key 'method.params.prompts' must be 'concept' with task.visual.prompts (there are "
                          "no forget captions)")
    if m.name == "rece" and m.params.get("validation", True):
        raise RecipeError("recipe key 'method.params.validation' must be false with task.visual.prompts (RECE "
                          "validates on the generated world's prompts)")
    for i, s in enumerate(t.eval_splits):
        if s not in ("forget_explicit", "retain"):
            raise RecipeError(f"recipe key 'task.eval_splits[{i}]' is {s!r}; with task.visual.prompts use "
                              "forget_explicit and retain (set task.eval_splits: [forget_explicit])")
    if "retain" in t.eval_splits and not t.visual.retain_prompts:
        raise RecipeError("recipe key 'task.eval_splits' has 'retain', but task.visual.retain_prompts is not set; "
                          "give a retain CSV or drop 'retain'")
    if recipe.eval.attacks:
        raise RecipeError("recipe key 'eval.attacks' is set, but attacks are not wired to task.visual.prompts yet; "
                          "remove it")


def _attack_section(attacks: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    head = {"forget_explicit": "erasure explicit", "forget_implicit": "erasure implicit", "retain": "retain in-domain"}
    for model in ("unlearned", "target"):
        res = attacks.get(model) or {}
        if not res:
            continue
        cols = [c for c in head if any(c in r["after"] for r in res.values())]
        if not lines:
            lines += ["## Attacks on the erased model", "",
                      "Each cell is before → after the attack (Δ). A falling erasure rate means the concept came back; "
                      "the target's rows are the same attacks on the model before erasure, for comparison.", ""]
        lines += [f"### {model}", "", "| attack | " + " | ".join(head[c] for c in cols) + " | seconds | note |",
                  "| --- | " + " | ".join("---" for _ in cols) + " | --- | --- |"]
        for name, r in res.items():
            cells = [f"{fmt(r['before'].get(c))} → {fmt(r['after'].get(c))} ({r['delta'][c]:+.3f})"
                     if c in r["delta"] else "n/a" for c in cols]
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds']} | {r['note']} |")
        lines.append("")
    return lines


__all__ = ["VisualTask", "load_judge", "judge_fingerprint", "image_summary", "save_grid", "GRID_ROWS"]
