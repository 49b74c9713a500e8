"""Needle: unlearn by editing the concept vectors of the forget authors only.

ConceptVectors' "Needle" baseline: locate each forget author's concept vector -- a column
``v = W_down[l][:, j]`` of an MLP down-projection whose vocabulary projection names the author
(:mod:`unlearn.probes.concept_vectors`) -- perturb it once, then train only that column with
gradient ascent on the forget QA:

1. ``setup``: search the columns whose top-``top_k`` tokens contain ``min_matches`` of the
   author's distinctive name tokens, rank them by activation specificity (how much more the
   column fires on the author's QA than on other forget authors'); with ``validate`` keep the
   ``max_candidates`` first ones that pass the causal check
   (noise ``check_noise_std`` hurts the author's answers ``ratio`` x more than other forget
   authors', by at least ``min_drop`` nats/token), best first; up to ``columns_per_author``
   per author (``fallback``: an author without a validated column gets its most specific candidate);
2. ``v <- v + N(0, noise_std^2)`` once, on every chosen column;
3. loss (minimised) ``-NLL(D_f)`` (answer-token mean), as GradAscent.

Only the chosen columns may change: use the ``columns`` parameter selection, which asks
this objective for them (:meth:`parameter_columns`)::

    method: {name: needle, selection: {name: columns}}

Defaults follow METHODS.md (noise 0.1, 1 epoch, lr 0.1-0.5); distinctiveness of name tokens
is counted over the forget authors only (the objective sees no retain set in ``setup``), hence
the looser ``max_token_share`` default of 0.1 (tokens shared by at most 2 of 20 authors).

Reference: Hong et al., 2024, "Intrinsic Evaluation of Unlearning Using Parametric Knowledge
Traces" (arXiv:2406.11614), the Needle baseline.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from unlearn.data import UnlearningData
from unlearn.objectives.base import Objective, ObjectiveConfig, mean_token_nll
from unlearn.probes.concept_vectors import (ConceptVectors, ConceptVectorsConfig, activation_specificity, causal_check,
                                            mlp_down_proj)


@dataclass
class NeedleConfig(ObjectiveConfig):
    noise_std: float = field(default=0.1, metadata={"help": "std of the noise added once to each chosen column"})
    columns_per_author: int = field(default=1, metadata={"help": "concept columns trained per forget author"})
    validate: bool = field(default=True, metadata={"help": "keep only columns that pass the causal check"})
    fallback: bool = field(default=True, metadata={
        "help": "an author without a validated column gets its most specific candidate (false: none)"})
    layers: list[int] | None = field(default=None, metadata={"help": "decoder layers searched; null: all"})
    top_k: int = field(default=20, metadata={"help": "tokens read from each column's vocabulary projection"})
    min_matches: int = field(default=2, metadata={"help": "distinctive name tokens a column's top-k must contain"})
    max_token_share: float = field(default=0.1, metadata={
        "help": "a name token is distinctive when at most this fraction of the forget authors' names contain it"})
    max_candidates: int = field(default=40, metadata={
        "help": "candidates given the causal check, highest activation specificity first"})
    check_noise_std: float = field(default=1.0, metadata={"help": "noise std of the causal check"})
    check_draws: int = field(default=1, metadata={"help": "noise draws per candidate in the causal check"})
    min_drop: float = field(default=0.05, metadata={"help": "causal check: minimum drop on the author's answers (nats/token)"})
    ratio: float = field(default=3.0, metadata={"help": "causal check: the author's drop must be ratio x the control drop"})
    seed: int = field(default=0, metadata={"help": "seed of the noise"})

    def __post_init__(self) -> None:
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        if self.columns_per_author < 1:
            raise ValueError(f"columns_per_author must be >= 1, got {self.columns_per_author}")
        if not 0.0 < self.max_token_share <= 1.0:
            raise ValueError(f"max_token_share must be in (0, 1], got {self.max_token_share}")


class Needle(Objective):
    name = "needle"
    full_parameters = "it searches, perturbs and trains single columns of the MLP down-projections in place"
    Config = NeedleConfig
    paper = ("Hong et al., 2024, Intrinsic Evaluation of Unlearning Using Parametric Knowledge Traces "
             "(arXiv:2406.11614), Needle")

    def __init__(self, config: NeedleConfig | None = None) -> None:
        super().__init__(config)
        self.columns: dict[str, list[int]] | None = None
        self.chosen: list[dict] = []

    def probe(self):
        """The concept-vector probe configured like this objective."""
        c = self.config
        return ConceptVectors(ConceptVectorsConfig(
            layers=c.layers, top_k=c.top_k, min_matches=c.min_matches, max_token_share=c.max_token_share,
            max_candidates=c.max_candidates, validate=c.validate, noise_std=c.check_noise_std,
            noise_draws=c.check_draws, min_drop=c.min_drop, ratio=c.ratio, seed=c.seed, n_random_columns=0))

    def choose(self, adapter, forget_items: list[dict]) -> list:
        """The concept columns of the forget authors (``Candidate`` objects, see the module doc)."""
        c = self.config
        probe = self.probe()
        cands, concepts, groups = probe.search(adapter, UnlearningData(forget=list(forget_items), name="needle"))
        if len(groups) > 1:
            activation_specificity(adapter, cands, groups, list(concepts), seed=c.seed)
            cands = sorted(cands, key=lambda x: -x.specificity)
        checked = cands[: c.max_candidates]
        if c.validate and checked:
            if len(groups) < 2:
                raise ValueError("needle's causal check compares one forget author with the others, but the forget set "
                                 "has one author; set method.params.validate: false")
            causal_check(adapter, checked, groups, noise_std=c.check_noise_std, noise_draws=c.check_draws,
                         n_control_items=20, min_drop=c.min_drop, ratio=c.ratio, seed=c.seed)
        chosen = []
        for aid in groups:
            mine = [x for x in checked if x.concept == aid]
            ok = [x for x in mine if x.passed] if c.validate else mine
            if c.validate:  # clearest causal effect first
                ok.sort(key=lambda x: x.drop_control - x.drop_concept)
            if not ok and c.fallback:
                ok = [x for x in cands if x.concept == aid][:1]
            chosen += ok[: c.columns_per_author]
        return chosen

    def setup(self, adapter, reference, forget_items):
        """Choose the columns, then add ``N(0, noise_std^2)`` to each of them (once)."""
        model = adapter.model
        self.chosen = self.choose(adapter, forget_items)
        if not self.chosen:
            raise ValueError("needle found no concept column for any forget author; lower method.params.min_matches, "
                             "raise top_k, or set validate: false")
        names = {id(p): n for n, p in model.named_parameters()}
        cols: dict[str, list[int]] = {}
        gen = torch.Generator().manual_seed(self.config.seed)
        with torch.no_grad():
            for x in self.chosen:
                proj, W = mlp_down_proj(model, x.layer)  # W (H, I): a view of proj.weight
                name = names[id(proj.weight)]
                if x.column in cols.get(name, []):
                    continue
                cols.setdefault(name, []).append(x.column)
                noise = torch.randn(W.shape[0], generator=gen) * self.config.noise_std  # (H,)
                W[:, x.column] += noise.to(W.device, W.dtype)
        self.columns = {k: sorted(v) for k, v in cols.items()}

    def parameter_columns(self) -> dict[str, list[int]]:
        """``{parameter name: [column indices]}`` chosen in :meth:`setup` (for the ``columns`` selection):
        columns of the projection's (out, in) matrix, which for GPT-2's Conv1D are rows of the stored weight."""
        if self.columns is None:
            raise ValueError("needle chooses its columns in setup(); call objective.setup(adapter, None, forget) first")
        return self.columns

    def loss(self, adapter, forget, retain):
        nll = mean_token_nll(adapter, forget)
        return -nll, {"forget_nll": nll.item()}
