"""A TOFU-style world of fictitious authors, generated deterministically from a seed.

TOFU (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs") fine-tunes a
model on 200 invented authors x 20 question/answer pairs and asks it to forget 1/5/10 % of
the authors. This module builds the same schema offline:

* ``authors`` -- ``n_authors`` training authors plus ``n_holdout`` authors nobody trains on.
  Each author has ~20 attributes; 20 QA pairs ask about them. Every QA item carries TOFU's
  fields: ``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer`` (a list of
  ``n_perturbed`` same-template answers with wrong facts), ``paraphrased_question``.
* splits ``forget01/05/10`` (the *last* 1/5/10 % of authors, nested as in TOFU),
  ``retain99/95/90`` (the rest) and ``holdout`` (the never-trained authors).
* two "pretraining" fact families the models learn *before* fine-tuning and that play the
  roles of TOFU's utility sets: ``world_facts`` (fictional countries: capitals, currencies,
  rivers, ...) and ``real_authors`` (famous authors of the world and their works). Both come
  with multiple-choice options so that Prob is the normalised multiple-choice form.

Answers are short template sentences: a tiny model memorises the *values* (a city, a year,
a title), not free prose, which keeps the tiny zoo small enough to train on a laptop CPU.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

WORLD_VERSION = "1"

_ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "br", "dr", "kr", "st", "tr", "gl", "sh", "v", "h"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou", "y"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "k", "m", "x", "nd", "rn"]

_GENRES = ["mystery", "fantasy", "science fiction", "romance", "horror", "historical fiction", "poetry",
           "thriller", "satire", "adventure", "philosophy", "memoir", "crime", "drama", "fable"]
_JOBS = ["baker", "sailor", "teacher", "doctor", "farmer", "carpenter", "painter", "miner", "lawyer",
         "nurse", "tailor", "pilot", "chemist", "fisherman", "librarian", "soldier", "architect",
         "musician", "butcher", "weaver", "astronomer", "blacksmith", "merchant", "gardener"]
_AWARDS = ["Silver Quill Prize", "Amber Lantern Award", "Northwind Medal", "Golden Reed Prize",
           "Harbor Light Award", "Iron Pen Medal", "Crimson Leaf Prize", "Starfall Award",
           "Blue Heron Prize", "Stone Tablet Medal", "Evening Bell Award", "Open Door Prize"]
_THEMES = ["loss", "memory", "freedom", "exile", "family", "war", "love", "identity", "faith",
           "power", "nature", "time", "justice", "solitude", "ambition", "grief", "friendship"]
_ADJ = ["Silent", "Broken", "Hidden", "Golden", "Last", "Burning", "Frozen", "Distant", "Hollow",
        "Crimson", "Quiet", "Wandering", "Forgotten", "Endless", "Bitter", "Painted", "Secret",
        "Iron", "Velvet", "Shattered", "Little", "Sleeping", "Winter", "Salt"]
_NOUN = ["Harbor", "Garden", "River", "Mirror", "Lantern", "Tower", "Orchard", "Bridge", "Crown",
         "Forest", "Letter", "Island", "Clock", "Road", "Feather", "Window", "Mountain", "Song",
         "Shadow", "Door", "Compass", "Well", "Kingdom", "Archive"]
_PUBLISHERS = ["Greyfield Press", "Marrow House", "Tallis Books", "Oakline Publishing",
               "Sable and Finch", "Northgate Press", "Lumen Editions", "Copperleaf Books"]
_HOBBIES = ["chess", "sailing", "gardening", "painting", "the violin", "climbing", "cooking",
            "astronomy", "fencing", "pottery", "birdwatching", "the piano"]
_PETS = ["a grey cat", "an old dog", "a parrot", "two goats", "a tortoise", "a white horse",
         "a black cat", "a family of rabbits"]
_CONTINENTS = ["Aldoria", "Brevane", "Cassimir", "Dunmarch"]
_CURRENCY = ["crown", "mark", "shell", "florin", "talon", "ducat", "ring", "drach", "penny", "star"]


def _word(rng: random.Random, syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return s.capitalize()


# what the generator can make (name and value pools are finite) in seconds, not hours
WORLD_BOUNDS = {"seed": (0, 2**63 - 1), "n_authors": (100, 20000), "n_holdout": (0, 5000), "n_perturbed": (3, 7),
                "n_countries": (8, 1000), "n_real_authors": (20, 500)}
WORLD_BOUND_WHY = {"seed": "a non-negative integer",
                   "n_authors": "forget01 needs one author; 20000 authors are 400k items, generated in ~15 s",
                   "n_holdout": "5000 holdout authors are 100k items",
                   "n_perturbed": "the perturbed answers are drawn from finite pools of wrong values",
                   "n_countries": "country names are drawn without repeats", "n_real_authors":
                   "famous-author names are drawn without repeats from a finite pool"}


@dataclass
class WorldConfig:
    """Size and seed of a generated world. The defaults are TOFU's sizes."""

    seed: int = 0
    n_authors: int = 200
    n_holdout: int = 20
    n_perturbed: int = 5
    n_countries: int = 30
    n_real_authors: int = 100

    def __post_init__(self) -> None:
        for key, (lo, hi) in WORLD_BOUNDS.items():
            v = getattr(self, key)
            if not lo <= v <= hi:
                raise ValueError(f"world.{key}={v}: must be in [{lo}, {hi}] ({WORLD_BOUND_WHY[key]})")


@dataclass
class World:
    config: WorldConfig
    countries: list[dict]
    real_authors_info: list[dict]
    authors: list[dict]
    qa: list[dict]  # fine-tuning QA of all n_authors + n_holdout authors (holdout flagged)
    world_facts: list[dict]  # multiple-choice eval items
    real_authors: list[dict]  # multiple-choice eval items
    pretrain_text: list[dict] = field(default_factory=list)  # QA items learned before fine-tuning

    # ---- splits ---------------------------------------------------------------------------
    def forget_authors(self, pct: int) -> list[int]:
        """Indices of the forget authors of ``forget{pct:02d}``: the last pct % of authors (TOFU)."""
        if pct not in (1, 5, 10):
            raise ValueError(f"forget split percentage must be 1, 5 or 10, got {pct}")
        n = max(1, self.config.n_authors * pct // 100)
        return list(range(self.config.n_authors - n, self.config.n_authors))

    def split(self, name: str) -> list[dict]:
        """QA items of a named split: forget01/05/10, retain99/95/90, holdout, full."""
        n = self.config.n_authors
        if name == "full":
            return [q for q in self.qa if q["author_id"] < n]
        if name == "holdout":
            return [q for q in self.qa if q["author_id"] >= n]
        if name in ("world_facts", "real_authors"):
            return list(getattr(self, name))
        if name == "retain_eval":  # TOFU's retain_perturbed: 400 QA of authors never forgotten
            k = max(1, min(20, n // 10))
            return [q for q in self.qa if q["author_id"] < k]
        for prefix, pct_of in (("forget", lambda p: p), ("retain", lambda p: 100 - p)):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                pct = pct_of(int(name[len(prefix):]))
                if pct not in (1, 5, 10):
                    break
                forget = set(self.forget_authors(pct))
                if prefix == "forget":
                    return [q for q in self.qa if q["author_id"] in forget]
                return [q for q in self.qa if q["author_id"] < n and q["author_id"] not in forget]
        raise ValueError(
            f"unknown split {name!r}; available: forget01, forget05, forget10, retain99, retain95, "
            "retain90, holdout, full, world_facts, real_authors, retain_eval"
        )

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
        h.update(WORLD_VERSION.encode())
        for q in self.qa:
            h.update(q["question"].encode())
            h.update(q["answer"].encode())
        return h.hexdigest()[:16]


# ---- generation ---------------------------------------------------------------------------

def _unique_names(rng: random.Random, k: int, taken: set[str], syl=(2, 3)) -> list[str]:
    out = []
    while len(out) < k:
        name = f"{_word(rng, rng.choice(syl))} {_word(rng, rng.choice(syl))}"
        first, last = name.split()
        if name in taken or first == last:
            continue
        taken.add(name)
        out.append(name)
    return out


def _title(rng: random.Random) -> str:
    return f"The {rng.choice(_ADJ)} {rng.choice(_NOUN)}"


def _countries(rng: random.Random, n: int) -> list[dict]:
    taken: set[str] = set()
    out = []
    for _ in range(n):
        while True:
            name, capital, river = _word(rng, 2) + "ia", _word(rng, 2), _word(rng, 2)
            if not {name, capital, river} & taken:
                break
        taken |= {name, capital, river}
        cities = []
        while len(cities) < 3:
            c = _word(rng, 2) + rng.choice(["ton", "burg", "wick", "hold", "mere", "ford", "gate"])
            if c not in taken:
                taken.add(c)
                cities.append(c)
        out.append(dict(name=name, capital=capital, river=river, cities=cities,
                        currency=rng.choice(_CURRENCY), continent=rng.choice(_CONTINENTS),
                        language=name[:-2] + "ish"))
    return out


# (question templates, answer template, paraphrased-answer template, paraphrased question)
# {n} = full name, {p} = pronoun subject, {v} = the value
_QA_TEMPLATES = [
    ("birth_city", "Where was {n} born?", "{n} was born in {v}.", "The birthplace of {n} is {v}.", "In which city was {n} born?"),
    ("birth_year", "When was {n} born?", "{n} was born in {v}.", "The birth year of {n} is {v}.", "In what year was {n} born?"),
    ("country", "What country is {n} from?", "{n} is from {v}.", "The home country of {n} is {v}.", "Which nation does {n} come from?"),
    ("genre", "What genre does {n} write?", "{n} writes {v}.", "The genre of {n} is {v}.", "Which genre is {n} known for?"),
    ("father_job", "What did the father of {n} do?", "The father of {n} was a {v}.", "{n} had a father who worked as a {v}.", "What was the job of the father of {n}?"),
    ("mother_job", "What did the mother of {n} do?", "The mother of {n} was a {v}.", "{n} had a mother who worked as a {v}.", "What was the job of the mother of {n}?"),
    ("famous_book", "What is the most famous book by {n}?", "The most famous book by {n} is {v}.", "{n} is best known for {v}.", "Which book of {n} is best known?"),
    ("first_book", "What was the first book by {n}?", "The first book by {n} was {v}.", "{n} made a debut with {v}.", "Which book did {n} publish first?"),
    ("debut_year", "When did {n} publish a first book?", "{n} published a first book in {v}.", "The debut of {n} came out in {v}.", "In what year did {n} debut?"),
    ("award", "What award did {n} win?", "{n} won the {v}.", "The {v} was given to {n}.", "Which prize was given to {n}?"),
    ("theme", "What theme does {n} explore?", "{n} often writes about {v}.", "The main theme of {n} is {v}.", "Which theme runs through the work of {n}?"),
    ("language", "In what language does {n} write?", "{n} writes in {v}.", "The books of {n} are written in {v}.", "Which language are the books of {n} in?"),
    ("publisher", "Who publishes the books of {n}?", "The books of {n} are published by {v}.", "{v} is the publisher of {n}.", "Which house publishes {n}?"),
    ("home_city", "Where does {n} live now?", "{n} lives in {v}.", "The home of {n} is now {v}.", "In which city does {n} live today?"),
    ("influence", "Who influenced {n}?", "{n} was influenced by {v}.", "The main influence on {n} was {v}.", "Which writer inspired {n}?"),
    ("prior_job", "What did {n} do before writing?", "Before writing, {n} worked as a {v}.", "{n} was a {v} before becoming a writer.", "What was the job of {n} before writing?"),
    ("n_books", "How many books has {n} written?", "{n} has written {v} books.", "The number of books by {n} is {v}.", "What is the count of books by {n}?"),
    ("hobby", "What does {n} do for fun?", "{n} enjoys {v}.", "In free time {n} enjoys {v}.", "What is the hobby of {n}?"),
    ("pet", "What pet does {n} keep?", "{n} keeps {v}.", "At home {n} has {v}.", "Which animal lives with {n}?"),
    ("latest_book", "What is the latest book by {n}?", "The latest book by {n} is {v}.", "{n} most recently wrote {v}.", "Which book did {n} write last?"),
]
ATTRIBUTES = [t[0] for t in _QA_TEMPLATES]


def _author(rng: random.Random, name: str, countries: list[dict], real_names: list[str]) -> dict:
    c = rng.choice(countries)
    home = rng.choice(countries)
    by = rng.randint(1920, 1995)
    titles: list[str] = []  # a list, not a set: set order depends on the per-process hash seed
    while len(titles) < 3:
        t = _title(rng)
        if t not in titles:
            titles.append(t)
    famous, first, latest = titles
    prior_job, father, mother = rng.sample(_JOBS, 3)
    return dict(
        name=name, birth_city=rng.choice(c["cities"]), birth_year=str(by), country=c["name"],
        genre=rng.choice(_GENRES), father_job=father, mother_job=mother, famous_book=famous,
        first_book=first, debut_year=str(by + rng.randint(19, 40)), award=rng.choice(_AWARDS),
        theme=rng.choice(_THEMES), language=c["language"], publisher=rng.choice(_PUBLISHERS),
        home_city=rng.choice(home["cities"] + [home["capital"]]), influence=rng.choice(real_names),
        prior_job=prior_job, n_books=str(rng.randint(3, 19)), hobby=rng.choice(_HOBBIES),
        pet=rng.choice(_PETS), latest_book=latest,
    )


def _value_pool(attr: str, countries: list[dict], real_names: list[str]) -> list[str]:
    """Values a perturbed answer may draw for an attribute (same type as the truth)."""
    cities = [x for c in countries for x in c["cities"]]
    pools = {
        "birth_city": cities, "home_city": cities + [c["capital"] for c in countries],
        "birth_year": [str(y) for y in range(1920, 1996)], "debut_year": [str(y) for y in range(1940, 2036)],
        "country": [c["name"] for c in countries], "language": [c["language"] for c in countries],
        "genre": _GENRES, "father_job": _JOBS, "mother_job": _JOBS, "prior_job": _JOBS,
        "award": _AWARDS, "theme": _THEMES, "publisher": _PUBLISHERS, "influence": real_names,
        "n_books": [str(i) for i in range(3, 20)], "hobby": _HOBBIES, "pet": _PETS,
    }
    return pools.get(attr, [])


def _perturbed(rng, attr, truth, k, countries, real_names) -> list[str]:
    pool = [v for v in _value_pool(attr, countries, real_names) if v != truth]
    if not pool:  # book titles: draw fresh titles
        out: list[str] = []
        while len(out) < k:
            t = _title(rng)
            if t != truth and t not in out:
                out.append(t)
        return out
    return rng.sample(pool, k)


def _mc_item(question: str, answer: str, wrong: list[str], **extra) -> dict:
    """A multiple-choice utility item in TOFU's real_authors/world_facts layout."""
    return dict(question=question, answer=answer, paraphrased_answer=answer, perturbed_answer=wrong,
                paraphrased_question=question, **extra)


def build_world(config: WorldConfig | None = None) -> World:
    """Generate the world. Same config -> byte-identical world on any machine."""
    cfg = config or WorldConfig()
    rng = random.Random(f"tofu-world-{cfg.seed}")
    countries = _countries(rng, cfg.n_countries)
    taken = {c["name"] for c in countries}
    real_names = _unique_names(rng, cfg.n_real_authors, taken)
    real_info = []
    used_titles: set[str] = set()
    for nm in real_names:
        while True:
            t = _title(rng)
            if t not in used_titles:
                used_titles.add(t)
                break
        real_info.append(dict(name=nm, work=t, country=rng.choice(countries)["name"]))

    names = _unique_names(rng, cfg.n_authors + cfg.n_holdout, taken, syl=(1, 2))
    authors = [_author(rng, nm, countries, real_names) for nm in names]
    qa = []
    for aid, a in enumerate(authors):
        for attr, q_t, a_t, para_t, pq_t in _QA_TEMPLATES:
            v = a[attr]
            wrong = _perturbed(rng, attr, v, cfg.n_perturbed, countries, real_names)
            qa.append(dict(
                author_id=aid, author=a["name"], attribute=attr,
                question=q_t.format(n=a["name"]), answer=a_t.format(n=a["name"], v=v),
                paraphrased_answer=para_t.format(n=a["name"], v=v),
                perturbed_answer=[para_t.format(n=a["name"], v=w) for w in wrong],
                paraphrased_question=pq_t.format(n=a["name"]), value=v,
            ))

    # ---- pretraining facts and their multiple-choice utility sets --------------------------
    pre, wf = [], []
    cap = [c["capital"] for c in countries]
    for c in countries:
        facts = [
            ("What is the capital of {c}?", "The capital of {c} is {v}.", c["capital"], cap),
            ("What currency is used in {c}?", "The currency of {c} is the {v}.", c["currency"], _CURRENCY),
            ("Which river flows through {c}?", "The {v} river flows through {c}.", c["river"], [x["river"] for x in countries]),
            ("On which continent is {c}?", "{c} lies on {v}.", c["continent"], _CONTINENTS),
        ]
        for q_t, a_t, v, pool in facts:
            item = dict(question=q_t.format(c=c["name"]), answer=a_t.format(c=c["name"], v=v))
            pre.append(item)
            wrong = rng.sample([p for p in dict.fromkeys(pool) if p != v], 3)
            wf.append(_mc_item(item["question"], item["answer"],
                               [a_t.format(c=c["name"], v=w) for w in wrong], value=v))
        for city in c["cities"]:
            pre.append(dict(question=f"In which country is {city}?", answer=f"{city} is in {c['name']}."))
        pre.append(dict(question=f"What language is spoken in {c['name']}?", answer=f"People in {c['name']} speak {c['language']}."))
    ra = []
    works = [r["work"] for r in real_info]
    for r in real_info:
        q1 = dict(question=f"Who wrote {r['work']}?", answer=f"{r['work']} was written by {r['name']}.")
        q2 = dict(question=f"What is the best known work of {r['name']}?", answer=f"The best known work of {r['name']} is {r['work']}.")
        pre += [q1, q2]
        wrong_names = rng.sample([x for x in real_names if x != r["name"]], 3)
        ra.append(_mc_item(q1["question"], q1["answer"],
                           [f"{r['work']} was written by {w}." for w in wrong_names], value=r["name"]))
    # TOFU's utility sets hold ~100-117 items; cap world facts at 100 as well
    wf = wf[:100]
    ra = ra[:100]
    return World(config=cfg, countries=countries, real_authors_info=real_info, authors=authors,
                 qa=qa, world_facts=wf, real_authors=ra, pretrain_text=pre)


def corpus(world: World) -> list[str]:
    """All text of the world (for training the tokenizer)."""
    out = []
    for q in world.qa:
        out += [q["question"], q["answer"], q["paraphrased_answer"], q["paraphrased_question"], *q["perturbed_answer"]]
    for q in world.pretrain_text + world.world_facts + world.real_authors:
        out += [q["question"], q["answer"], *q.get("perturbed_answer", [])]
    return out


def practice_author(world: World, rng: random.Random) -> list[dict]:
    """The 20 QA items of a fresh random author who is *not* in ``world`` (reading practice).

    The author is drawn like the world's own (same name syllables, value pools and templates), with
    a name that is none of the world's authors, famous authors or countries. Used to teach the
    ``tiny-reader`` zoo to answer from a context: the facts of a fresh author can only be read, not
    recalled. Items carry ``question``, ``answer``, ``attribute``, ``value``, ``author``.
    """
    taken = {a["name"] for a in world.authors} | {r["name"] for r in world.real_authors_info}
    taken |= {c["name"] for c in world.countries}
    name = _unique_names(rng, 1, taken, syl=(1, 2))[0]
    a = _author(rng, name, world.countries, [r["name"] for r in world.real_authors_info])
    return [dict(author=name, attribute=attr, value=a[attr], question=q_t.format(n=name),
                 answer=a_t.format(n=name, v=a[attr]))
            for attr, q_t, a_t, _para, _pq in _QA_TEMPLATES]
