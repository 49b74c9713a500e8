"""Run a recipe of task ``visual`` (text-to-image concept erasure) end to end.

load the visual world, the image model and the judge -> evaluate the target with the ``i2p``
suite (one image per prompt-table row, read by the judge) -> erase (an objective trained on
the forget renders' denoising loss, or an editor: UCE, RECE, ESD, SAFREE) -> evaluate the
erased model -> an image grid before/after -> ``metrics.json``, ``report.md``.

:func:`unlearn.runner.run` hands visual recipes here, so ``unlearn run`` and ``unlearn.run``
work for both modalities with one recipe format.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

# rows shown in the before/after grid, per evaluation split
GRID_ROWS = 4


def load_image_model(source: str):
    """An :class:`~unlearn.adapters.image.ImageAdapter` (or a wrapped one, e.g. SAFREE) from a zoo
    name or a directory."""
    from unlearn.adapters.image import ImageAdapter

    return ImageAdapter.load(source)  # rebuilds wrapped directories (wrapper.json) too


def load_judge(source: str):
    """The judge named by ``eval.judge``.

    * ``zoo:tiny-t2i/judge`` or a directory: an :class:`~unlearn.evaluators.image_judge.ImageJudge`;
    * ``module.path:factory``: ``factory()`` from an importable module, returning any object with
      ``predict(images) -> {attribute: [value, ...]}`` and ``features(images) -> (N, F) array``
      (images uint8 ``(N, H, W, 3)``) -- the slot for real judges (e.g. a NudeNet or ResNet-50
      wrapper); the erase concepts are then ``attribute:value`` pairs of that judge.
    """
    from unlearn.evaluators.image_judge import ImageJudge

    mod, sep, fn = source.partition(":")
    if sep and mod != "zoo" and not Path(source).expanduser().exists() and mod.replace(".", "").replace("_", "").isalnum():
        import importlib

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
        from unlearn.zoo import zoo_path

        return ImageJudge.load(zoo_path(source[4:]))
    p = Path(source).expanduser()
    if not p.exists():
        raise ValueError(f"eval.judge {source!r} does not exist; give zoo:tiny-t2i/judge or a directory holding "
                         "judge.json + judge.safetensors")
    return ImageJudge.load(p)


def image_summary(res: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers of one i2p evaluation."""
    def m(split: str, name: str):
        return res["splits"].get(split, {}).get("metrics", {}).get(name, {}).get("value")

    return {"erasure_explicit": m("forget_explicit", "erasure_rate"),
            "erasure_implicit": m("forget_implicit", "erasure_rate"),
            "retain_in_domain": m("retain", "retain_in_domain"), "retain_cross_domain": m("retain", "retain_cross_domain"),
            "alignment": m("retain", "alignment"), "fid_like": m("retain", "fid_like")}


def _grid_rows(splits: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for name, items in splits.items():
        rows += [{**r, "split": name} for r in items[:GRID_ROWS]]
    return rows


def _sample_rows(adapter, rows: list[dict], steps: int) -> np.ndarray:
    out = [adapter.sample([r["prompt"]], seed=[int(r["seed"])], steps=steps, guidance=float(r["guidance"]))[0]
           for r in rows]
    return np.stack(out)  # (N, H, W, 3)


def run_visual(recipe, *, progress: bool = True, keep_model: bool = False):
    """Run a validated visual recipe (see :func:`unlearn.runner.run`); returns a ``RunResult``."""
    import torch

    from unlearn.config import to_dict
    from unlearn.editors import EditContext, Editor
    from unlearn.evaluators.harness import evaluate
    from unlearn.evaluators.image_suite import i2p_suite, reference_renders
    from unlearn.image_report import write_image_report
    from unlearn.recipe import resolve_method
    from unlearn.runner import RunResult, finish_run, set_seed
    from unlearn.runs import RunDir, provenance
    from unlearn.selection import apply_selection, finalize_selection
    from unlearn.tasks.visual_task import load_visual
    from unlearn.trainer import TrainLog, TrainSettings, train

    method_cls, method_config = resolve_method(recipe)
    is_editor = isinstance(method_cls, type) and issubclass(method_cls, Editor)
    torch.set_num_threads(recipe.model.threads)
    set_seed(recipe.seed)
    t_start = time.time()
    rd = RunDir(Path(recipe.output.dir or f"runs/{recipe.name}"), overwrite=recipe.output.overwrite)
    try:
        t, ev = recipe.task, recipe.eval
        data = load_visual(t.visual.world_config(), forget_split=t.forget_split, retain_split=t.retain_split,
                           eval_splits=t.eval_splits, max_prompts=ev.max_items)
        method = method_cls(method_config)
        if method.needs_retain() and data.retain is None:
            raise ValueError(f"method {recipe.method.name!r} needs task.retain_split")
        adapter = load_image_model(recipe.model.source)
        judge = load_judge(ev.judge)
        data.judge = judge
        all_rows = [r for rows in data.eval_splits.values() for r in rows]
        ref_renders = reference_renders(data.world, data.eval_splits.get("retain", all_rows))
        ref_feats = judge.features([it["image"] for it in ref_renders])
        suite = i2p_suite(judge, data.erase, ref_feats, steps=ev.sample_steps)
        protocol = {"sample_steps": ev.sample_steps, "sampler": "DDIM, classifier-free guidance per row",
                    "judge": ev.judge, "judge_fingerprint": _judge_fp(judge), "erase": data.erase,
                    "reference_renders": len(ref_renders)}
        kw = dict(suite=suite, batch_size=ev.batch_size, progress=progress, protocol=protocol)
        target_fp = adapter.fingerprint()
        grid_rows = _grid_rows(data.eval_splits)
        target_res = evaluate(adapter, data.eval_splits, label="target", **kw) if ev.compare_target else None
        grid_before = _sample_rows(adapter, grid_rows, ev.sample_steps)

        tr = recipe.train
        settings = TrainSettings(epochs=tr.epochs, max_steps=tr.max_steps, lr=tr.lr, batch_size=tr.batch_size,
                                 grad_accum=tr.grad_accum, optimizer=tr.optimizer, weight_decay=tr.weight_decay,
                                 scheduler=tr.scheduler, warmup_ratio=tr.warmup_ratio, max_grad_norm=tr.max_grad_norm)
        editor_info = sel_info = None
        attack_splits = {k: v for k, v in data.eval_splits.items() if k in ("forget_explicit", "forget_implicit", "retain")}
        if ev.attacks:  # settings are checked before anything is trained
            from unlearn.evaluators.image_attacks import IMAGE_ATTACKS, attack_config

            for n in ev.attacks:
                attack_config(IMAGE_ATTACKS.get(n), dict(ev.attack_params.get(n) or {}), n)
        original = adapter.reference() if ev.attacks else None  # the model before erasure (embedding_inversion)
        before = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
        t_edit = time.time()
        if is_editor:
            edit = method.apply(adapter, data, EditContext(settings=settings, seed=recipe.seed, progress=progress,
                                                           eval_batch_size=ev.batch_size))
            log = edit.log if edit.log is not None else TrainLog(seed=recipe.seed)
            editor_info = edit.info
            adapter = edit.adapter
        else:
            reference = adapter.reference() if method.needs_reference() else None
            method.setup(adapter, reference, data.forget)
            sel = recipe.method.selection
            sel_info = apply_selection(adapter, sel.name, dict(sel.params), objective=method)
            log = train(adapter, method, data.forget, data.retain, settings, seed=recipe.seed, progress=progress)
            finalize_selection(adapter)
            del reference
        edit_seconds = time.time() - t_edit
        changed = sorted(n for n, p in adapter.model.named_parameters() if n in before and not (p == before[n]).all())
        del before
        adapter._fingerprint = None
        unl_res = evaluate(adapter, data.eval_splits, label="unlearned", **kw)
        grid_after = _sample_rows(adapter, grid_rows, ev.sample_steps)
        attacks = None
        if ev.attacks:
            from unlearn.evaluators.image_attacks import run_image_attacks

            before_res = {"splits": {k: v for k, v in unl_res["splits"].items() if k in attack_splits}}
            akw = {**kw, "progress": False}
            attacks = {"unlearned": run_image_attacks(
                list(ev.attacks), adapter, original, data, attack_splits,
                lambda m, sp: evaluate(m, sp, label="attacked", **akw), before_res,
                params=dict(ev.attack_params), seed=recipe.seed)}
        del original

        models = {"unlearned": unl_res}
        if target_res is not None:
            models["target"] = target_res
        summary: dict[str, Any] = {name: image_summary(res) for name, res in models.items()}
        summary["edit_seconds"] = round(edit_seconds, 2)
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        summary["train_seconds"] = round(log.seconds, 1)
        prov = provenance(
            recipe_name=recipe.name, seed=recipe.seed,
            model={"source": recipe.model.source, "fingerprint_before": target_fp,
                   "fingerprint_after": adapter.fingerprint()},
            retain_model=None, data={**data.fingerprints(), "world": data.world.fingerprint()},
            judge={"source": ev.judge, "fingerprint": _judge_fp(judge)},
            objective={"name": method.name, "paper": method.paper, "kind": "editor" if is_editor else "objective"},
            selection=sel_info.to_dict() if sel_info is not None else None,
            parameters_changed=len(changed),
        )
        metrics = {"summary": summary, "models": models, "train": log.to_dict(), "recipe": to_dict(recipe),
                   "provenance": prov, "changed_parameters": changed}
        if editor_info is not None:
            metrics["editor"] = editor_info
        if attacks is not None:
            metrics["attacks"] = attacks
        final = finish_run(rd, recipe, adapter, metrics, prov,
                           lambda: write_image_report(rd.path, recipe, metrics, prov, grid_rows, grid_before, grid_after))
    except BaseException:
        rd.abort()
        raise
    return RunResult(run_dir=final, summary=summary, metrics=metrics, recipe=recipe,
                     adapter=adapter if keep_model else None)


def _judge_fp(judge) -> str:
    """Weights fingerprint of a torch judge; a user judge may supply ``fingerprint()`` instead."""
    import torch

    from unlearn.adapters import weights_fingerprint

    if callable(getattr(judge, "fingerprint", None)):
        return str(judge.fingerprint())
    return weights_fingerprint(judge) if isinstance(judge, torch.nn.Module) else f"unversioned:{type(judge).__name__}"
