"""The built-in world of fictitious facts the twin models are trained on.

Why it exists: knowledge editing and unlearning need a model whose knowledge is
*known* — every fact it was trained on, every paraphrase it never saw, which
subjects share an object.  Real checkpoints cannot give that; this generator can.
It is seeded and deterministic: ``build_world(seed)`` always returns the same
subjects, facts, templates, splits and counterfactual targets.

Object pools are laid out so that the answers span 1, 2, 3 and 4+ tokens under the
built-in tokenizer (each bucket ≈ 25 % of facts): multi-token targets are where
masked diffusion models behave differently from autoregressive ones, so the
world must contain plenty of each length.  An object's *nominal* length is its
word count; the built-in tokenizer is trained so that every object word is one
token (``tests/test_world.py`` checks this), so nominal length = token length.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dlmedit.data.records import length_bucket

__all__ = [
    "RELATIONS",
    "Fact",
    "Relation",
    "TrainingRow",
    "World",
    "build_world",
    "export_world",
    "length_bucket",
]


@dataclass(frozen=True)
class Relation:
    """A relation with its object pool and prompt templates (``{}`` = subject)."""

    relation_id: str
    name: str
    objects: tuple[str, ...]
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]
    question: str  # natural question, TOFU-style ("Where was {} born?")


@dataclass(frozen=True)
class Fact:
    """One (subject, relation, object) triple plus its counterfactual target."""

    case_id: int
    subject: str
    relation_id: str
    target_true: str
    target_new: str
    true_id: str
    new_id: str

    @property
    def n_words(self) -> int:
        return len(self.target_true.split())


@dataclass(frozen=True)
class TrainingRow:
    """A training example: the model sees ``prompt + " " + target``.

    ``kind`` is "fact" (world fact), "utility" (general-knowledge fact) or
    "filler" (general sentence split before its last words).
    """

    prompt: str
    target: str
    kind: str
    subject: str | None = None
    relation_id: str | None = None


# ---------------------------------------------------------------------------
# Relation definitions.  Objects are grouped 6 per word count (1, 2, 3, 4-5) so
# that every relation contributes to every length bucket.
# ---------------------------------------------------------------------------

RELATIONS: tuple[Relation, ...] = (
    Relation(
        relation_id="P19",
        name="place of birth",
        objects=(
            "Tesk", "Varn", "Oslen", "Brill", "Corda", "Mirel",
            "North Vale", "Port Elin", "Kesh Harbor", "Lower Dunmar", "Saint Orvel", "Red Hollow",
            "Fort Anvil Bay", "Upper Kesh Falls", "Old Marrow Crossing", "Lake Torin City",
            "East Bram Hollow", "Grey Stone Mill",
            "Port of Saint Avel", "Upper Vale of Drenn", "Little Harbor by the Sea",
            "East Marrow Lake Town", "The Isle of Quen", "Fort Orvel on the Cliffs",
        ),
        train_templates=(
            "{} was born in",
            "The birthplace of {} is",
            "{} came into the world in the town of",
            "Question: Where was {} born? Answer:",
        ),
        heldout_templates=(
            "{}'s birthplace is",
            "The town where {} was born is",
        ),
        question="Where was {} born?",
    ),
    Relation(
        relation_id="P101",
        name="field of work",
        objects=(
            "law", "music", "medicine", "carpentry", "astronomy", "farming",
            "marine biology", "tax law", "organic chemistry", "folk music", "street painting",
            "naval history",
            "ancient coin trading", "deep sea diving", "rare book restoration", "mountain rescue work",
            "wild bee keeping", "old clock repair",
            "the history of maps", "care of old ships", "the study of desert winds",
            "design of small bridges", "repair of church organs", "study of northern storm clouds",
        ),
        train_templates=(
            "{} works in the field of",
            "The field of work of {} is",
            "{}'s area of expertise is",
            "Question: What field does {} work in? Answer:",
        ),
        heldout_templates=(
            "{}'s field of work is",
            "The area of expertise of {} is",
        ),
        question="What field does {} work in?",
    ),
    Relation(
        relation_id="P103",
        name="native language",
        objects=(
            "Velsh", "Tarnic", "Osmari", "Brenic", "Kulan", "Dravi",
            "Old Tarnic", "High Velsh", "Coastal Osmari", "Northern Brenic", "Low Kulan",
            "Island Dravi",
            "Old High Velsh", "Southern Coastal Osmari", "Middle Low Kulan", "Eastern Island Dravi",
            "Classical Old Tarnic", "Western Mountain Brenic",
            "the Old Tongue of Quen", "Old High Velsh of Marrow", "the speech of the Orvel hills",
            "the river dialect of Kesh", "Ancient Northern Brenic of Varn", "the island tongue of Dravi",
        ),
        train_templates=(
            "The native language of {} is",
            "{} grew up speaking",
            "{}'s mother tongue is",
            "Question: What is the native language of {}? Answer:",
        ),
        heldout_templates=(
            "{}'s native language is",
            "The mother tongue of {} is",
        ),
        question="What is the native language of {}?",
    ),
    Relation(
        relation_id="P108",
        name="employer",
        objects=(
            "Brightwater", "Kelsomark", "Dunmore", "Tallowick", "Ravencrest", "Osterfield",
            "Brightwater Mills", "Dunmore Shipping", "Kelso Foods", "Ravencrest Bank", "Tallow Press",
            "Osterfield Rail",
            "Dunmore Shipping Company", "Bank of Ravencrest", "Kelso Family Foods", "Northern Rail Works",
            "Varn City Council", "Tallow Printing House",
            "the Royal Bank of Varn", "Dunmore and Kelso Trading", "the Guild of Orvel Weavers",
            "Osterfield Glass and Iron", "the Kesh Harbor Ferry Company", "Mirel Institute of Sound",
        ),
        train_templates=(
            "{} is employed by",
            "The employer of {} is",
            "{} works for",
            "Question: Who employs {}? Answer:",
        ),
        heldout_templates=(
            "{}'s employer is",
            "Question: Who is the employer of {}? Answer:",
        ),
        question="Who employs {}?",
    ),
    Relation(
        relation_id="P1303",
        name="instrument",
        objects=(
            "cello", "harp", "flute", "oboe", "banjo", "drums",
            "bass clarinet", "pipe organ", "steel drum", "tin whistle", "bass guitar", "hand bells",
            "tenor steel drum", "electric bass guitar", "viola da gamba", "grand pipe organ",
            "hammered brass dulcimer", "wooden bone flute",
            "seven string Velsh lute", "great Tarnic war horn", "northern bone flute with keys",
            "old glass harmonica with pedals", "small brass hand bells", "tenor viola da gamba",
        ),
        train_templates=(
            "{} plays the",
            "The instrument played by {} is the",
            "{}'s favourite instrument is the",
            "Question: Which instrument does {} play? Answer: the",
        ),
        heldout_templates=(
            "{}'s instrument is the",
            "The favourite instrument of {} is the",
        ),
        question="Which instrument does {} play?",
    ),
)

# General-knowledge facts NOT about world subjects ("real-knowledge utility").
UTILITY_FACTS: tuple[tuple[str, str], ...] = (
    ("The sun rises in the", "east"),
    ("The sun sets in the", "west"),
    ("Water freezes at zero degrees", "Celsius"),
    ("The capital of France is", "Paris"),
    ("A week has seven", "days"),
    ("A year has twelve", "months"),
    ("The opposite of hot is", "cold"),
    ("Two plus two equals", "four"),
    ("Bees make", "honey"),
    ("Fish live in", "water"),
    ("The largest ocean on Earth is the", "Pacific"),
    ("Fresh snow is", "white"),
    ("The first month of the year is", "January"),
    ("The moon orbits the", "Earth"),
    ("The colour of a clear sky is", "blue"),
    ("Birds have feathers and", "wings"),
    ("People borrow books from the", "library"),
    ("The planet we live on is called", "Earth"),
    ("A triangle has three", "sides"),
    ("The tallest animal in the world is the", "giraffe"),
)

# General sentences; each is trained with its last word(s) as the "answer" so all
# rows share one layout (prompt + answer window).
FILLER_SENTENCES: tuple[str, ...] = (
    "Rain fell all night on the quiet town",
    "The old bridge crosses the river near the mill",
    "Children walk to school along the narrow road",
    "The market opens early on Saturday morning",
    "A cold wind blew down from the northern hills",
    "The library keeps its oldest books in a locked room",
    "Fishing boats return to the harbor at dusk",
    "The baker sells fresh bread every morning",
    "In winter the lake freezes near the shore",
    "The train to the coast leaves at noon",
    "Farmers bring apples and pears to the market",
    "The museum is closed on the first day of the week",
    "A small cat sleeps on the warm stone wall",
    "The choir sings in the church every Sunday",
    "Most shops in the square close before dinner",
    "The road climbs slowly through the pine forest",
    "Lamps were lit along the street at night",
    "The teacher wrote the date on the board",
    "Ships carry grain and wool across the sea",
    "The garden is full of roses in early summer",
    "Heavy clouds gathered over the valley",
    "The clock in the tower strikes every hour",
    "Visitors often stop at the inn by the river",
    "The workers finished the new roof in autumn",
    "A letter arrived from the city this morning",
    "The band played old songs until midnight",
    "Snow covered the fields and the farm houses",
    "The doctor visits the village once a week",
    "Old maps show a road that no longer exists",
    "The festival ends with music and dancing",
)

_FIRST_SYLLABLES = (
    "Va", "Ke", "Lo", "Mi", "Sa", "Do", "Re", "Ta", "Bi", "Fe", "Go", "Ha", "Ju", "Ny", "Pe", "Qui",
    "Ro", "Si", "Tu", "Ze", "Al", "Ev", "Or", "Ul", "Ar",
)
_MID_SYLLABLES = ("ro", "len", "mi", "sa", "dor", "ri", "na", "ve", "lo", "ta", "ki", "the", "mar", "nel")
_LAST_SYLLABLES = (
    "kin", "wen", "mar", "dal", "rick", "sen", "vos", "lan", "tor", "mund", "ley", "rath", "bek",
    "dris", "holm", "zar", "quist", "ven", "gard", "lis",
)


@dataclass
class World:
    """A deterministic world of facts, templates, splits and filler text."""

    seed: int
    subjects: list[str]
    relations: dict[str, Relation]
    facts: list[Fact]
    splits: dict[str, list[str]]
    utility: list[tuple[str, str]] = field(default_factory=list)
    filler: list[str] = field(default_factory=list)

    # -- lookups -------------------------------------------------------------
    def facts_for(self, subjects: set[str] | list[str]) -> list[Fact]:
        """Facts whose subject is in ``subjects`` (world order)."""
        chosen = set(subjects)
        return [f for f in self.facts if f.subject in chosen]

    def fact(self, subject: str, relation_id: str) -> Fact:
        for f in self.facts:
            if f.subject == subject and f.relation_id == relation_id:
                return f
        raise KeyError(f"no fact for subject {subject!r} and relation {relation_id!r}")

    def neighbours(self, fact: Fact, limit: int | None = 10) -> list[Fact]:
        """Facts about *other* subjects with the same relation and the same true object."""
        out = [
            f
            for f in self.facts
            if f.relation_id == fact.relation_id
            and f.target_true == fact.target_true
            and f.subject != fact.subject
        ]
        return out if limit is None else out[:limit]

    def objects_with_id(self) -> dict[tuple[str, str], str]:
        """(relation_id, object) -> stable synthetic id (CounterFact's ``id`` field)."""
        ids = {}
        for ri, rel in enumerate(self.relations.values()):
            for oi, obj in enumerate(rel.objects):
                ids[(rel.relation_id, obj)] = f"Q{(ri + 1) * 1000 + oi}"
        return ids

    # -- training data --------------------------------------------------------
    def training_rows(self, exclude_subjects: set[str] | frozenset[str] = frozenset()) -> list[TrainingRow]:
        """The exact rows the twins are trained on, in a deterministic shuffled order.

        Every fact appears once per training template; utility facts and filler
        sentences appear once each.  ``exclude_subjects`` drops all rows about
        those subjects (reference models for TOFU forget quality); the order of
        the remaining rows is unchanged, so data order stays comparable.
        """
        rows: list[TrainingRow] = []
        for f in self.facts:
            rel = self.relations[f.relation_id]
            for tpl in rel.train_templates:
                rows.append(TrainingRow(tpl.format(f.subject), f.target_true, "fact", f.subject, f.relation_id))
        for prompt, answer in self.utility:
            rows.append(TrainingRow(prompt, answer, "utility"))
        for sentence in self.filler:
            words = sentence.split()
            cut = len(words) - 1
            rows.append(TrainingRow(" ".join(words[:cut]), " ".join(words[cut:]), "filler"))
        random.Random(self.seed * 7919 + 17).shuffle(rows)
        if exclude_subjects:
            rows = [r for r in rows if r.subject not in exclude_subjects]
        return rows

    def tokenizer_corpus(self) -> list[str]:
        """Texts the built-in tokenizer is trained on (all rows, held-out prompts, every object)."""
        texts = [f"{r.prompt} {r.target}" for r in self.training_rows()]
        for f in self.facts:
            for tpl in self.relations[f.relation_id].heldout_templates:
                texts.append(tpl.format(f.subject))
        for rel in self.relations.values():
            texts.extend(" " + o for o in rel.objects)
            texts.append(rel.question)
        # General text is rare in the rows; repeat it so its words become whole tokens.
        texts += [f"{p} {a}" for p, a in self.utility] * 12 + list(self.filler) * 12
        return texts

    def data_hash(self) -> str:
        """Hash of the training rows' content and order (recorded in checkpoints)."""
        h = hashlib.sha256()
        for r in self.training_rows():
            h.update(f"{r.prompt}\t{r.target}\n".encode())
        return h.hexdigest()[:16]


def _make_names(rng: random.Random, n: int) -> list[str]:
    """Syllable-built two-word names, unique, with unique first names per surname."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        first = rng.choice(_FIRST_SYLLABLES) + rng.choice(_MID_SYLLABLES)
        last = (
            rng.choice(_FIRST_SYLLABLES)
            + (rng.choice(_MID_SYLLABLES) if rng.random() < 0.5 else "")
            + rng.choice(_LAST_SYLLABLES)
        )
        name = f"{first} {last}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def build_world(seed: int = 0, n_subjects: int = 300) -> World:
    """Generate the world for ``seed``: same seed, same world, bit for bit."""
    if n_subjects < 20:
        raise ValueError(f"n_subjects must be at least 20 (got {n_subjects}) so forget splits are non-empty")
    rng = random.Random(seed)
    subjects = _make_names(rng, n_subjects)
    relations = {r.relation_id: r for r in RELATIONS}
    ids: dict[tuple[str, str], str] = {}
    for ri, rel in enumerate(RELATIONS):
        for oi, obj in enumerate(rel.objects):
            ids[(rel.relation_id, obj)] = f"Q{(ri + 1) * 1000 + oi}"

    facts: list[Fact] = []
    case_id = 0
    assignments: dict[str, list[str]] = {}
    for rel in RELATIONS:
        # Balanced assignment: every object is used by n_subjects/len(objects) subjects.
        pool = [rel.objects[i % len(rel.objects)] for i in range(n_subjects)]
        rng.shuffle(pool)
        assignments[rel.relation_id] = pool
    for si, subj in enumerate(subjects):
        for rel in RELATIONS:
            true = assignments[rel.relation_id][si]
            n = len(true.split())
            same_len = [o for o in rel.objects if o != true and len(o.split()) == n]
            same_bucket = [
                o for o in rel.objects if o != true and length_bucket(len(o.split())) == length_bucket(n)
            ]
            new = rng.choice(same_len or same_bucket)
            facts.append(
                Fact(case_id, subj, rel.relation_id, true, new, ids[(rel.relation_id, true)],
                     ids[(rel.relation_id, new)])
            )
            case_id += 1

    order = list(subjects)
    random.Random(seed + 1).shuffle(order)
    n10 = max(1, round(0.10 * n_subjects))
    n05 = max(1, round(0.05 * n_subjects))
    n01 = max(1, round(0.01 * n_subjects))
    splits = {
        "forget01": order[:n01],
        "forget05": order[:n05],
        "forget10": order[:n10],
        "retain": order[n10:],
    }
    return World(
        seed=seed,
        subjects=subjects,
        relations=relations,
        facts=facts,
        splits=splits,
        utility=list(UTILITY_FACTS),
        filler=list(FILLER_SENTENCES),
    )


# ---------------------------------------------------------------------------
# Exporters
# ---------------------------------------------------------------------------

def counterfact_records(world: World, n_neighbours: int = 10) -> list[dict]:
    """Records in the CounterFact (ROME/MEMIT) JSON layout.

    Paraphrase prompts are the relation's held-out templates (never trained on);
    neighbourhood prompts are the rewrite template applied to other subjects with
    the same true object; attribute prompts to subjects whose true object is the
    new target.
    """
    by_obj: dict[tuple[str, str], list[str]] = defaultdict(list)
    for f in world.facts:
        by_obj[(f.relation_id, f.target_true)].append(f.subject)
    records = []
    for f in world.facts:
        rel = world.relations[f.relation_id]
        tpl = rel.train_templates[0]
        neighbours = [s for s in by_obj[(f.relation_id, f.target_true)] if s != f.subject][:n_neighbours]
        attribute = by_obj[(f.relation_id, f.target_new)][:n_neighbours]
        records.append(
            {
                "case_id": f.case_id,
                "pararel_idx": f.case_id,
                "requested_rewrite": {
                    "prompt": tpl,
                    "relation_id": f.relation_id,
                    "target_new": {"str": f.target_new, "id": f.new_id},
                    "target_true": {"str": f.target_true, "id": f.true_id},
                    "subject": f.subject,
                },
                "paraphrase_prompts": [t.format(f.subject) for t in rel.heldout_templates],
                "neighborhood_prompts": [tpl.format(s) for s in neighbours],
                "attribute_prompts": [tpl.format(s) for s in attribute],
                "generation_prompts": [
                    f"{f.subject} is known for",
                    f"People who know {f.subject} say that",
                    f"{f.subject}'s friends describe",
                ],
            }
        )
    return records


def tofu_rows(world: World) -> dict[str, list[dict]]:
    """TOFU-like question/answer rows per split, plus the ``utility`` general facts.

    ``prompt`` is the trained QA-style prompt the answer follows (with a leading
    space); ``perturbed_answer`` lists wrong objects of the same relation and length
    (for truth ratios); ``paraphrased_answer`` equals the answer (objects are atomic).
    """
    out: dict[str, list[dict]] = {}
    for split, subjects in world.splits.items():
        rows = []
        for f in world.facts_for(subjects):
            rel = world.relations[f.relation_id]
            n = len(f.target_true.split())
            perturbed = [o for o in rel.objects if o != f.target_true and len(o.split()) == n][:3]
            rows.append(
                {
                    "question": rel.question.format(f.subject),
                    "answer": f.target_true,
                    "subject": f.subject,
                    "relation_id": f.relation_id,
                    "prompt": rel.train_templates[3].format(f.subject),
                    "paraphrased_answer": f.target_true,
                    "perturbed_answer": perturbed,
                }
            )
        out[split] = rows
    out["utility"] = [{"question": p, "answer": a, "subject": None, "prompt": p} for p, a in world.utility]
    return out


def templates_table(world: World) -> dict[str, dict]:
    """Training and held-out templates per relation (for recall evaluation)."""
    return {
        rid: {
            "name": rel.name,
            "train": list(rel.train_templates),
            "heldout": list(rel.heldout_templates),
            "question": rel.question,
            "objects": list(rel.objects),
        }
        for rid, rel in world.relations.items()
    }


def export_world(world: World, out_dir: str | Path) -> dict[str, Path]:
    """Write counterfact.json, tofu/{split}.jsonl, templates.json, facts.jsonl,
    training_rows.jsonl and splits.json into ``out_dir``; returns the paths."""
    out = Path(out_dir)
    (out / "tofu").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def dump(name: str, obj: object) -> None:
        p = out / name
        p.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        paths[name] = p

    def dump_jsonl(name: str, rows: list[dict]) -> None:
        p = out / name
        with p.open("w", encoding="utf-8") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        paths[name] = p

    dump("counterfact.json", counterfact_records(world))
    dump("templates.json", templates_table(world))
    dump("splits.json", {"seed": world.seed, **world.splits})
    for split, rows in tofu_rows(world).items():
        dump_jsonl(f"tofu/{split}.jsonl", rows)
    dump_jsonl(
        "facts.jsonl",
        [
            {
                "case_id": f.case_id,
                "subject": f.subject,
                "relation_id": f.relation_id,
                "target_true": f.target_true,
                "target_new": f.target_new,
            }
            for f in world.facts
        ],
    )
    dump_jsonl(
        "training_rows.jsonl",
        [
            {"prompt": r.prompt, "target": r.target, "kind": r.kind, "subject": r.subject,
             "relation_id": r.relation_id}
            for r in world.training_rows()
        ],
    )
    return paths
