"""Anti-interference: find the few facts that matter among many that do not.

Every prompt opens with a one-line instruction, then `shots` solved examples and the query, each a block of text,
a `Question:` line and an `Answer:` line; demonstrations are independent draws and never repeat the query's text.
Distractor sentences mention rooms, colours, numbers and people's tastes but never move anyone or anything.
- Multiple Key Retrieval: a paragraph of `n_distractors` distractor sentences (with decoy numbers) hiding
  `n_keys` sentences "The secret number of KEY is NNNNN." (distinct key words and 5-digit values, shuffled in);
  the question asks for one key's value.
- Single Supporting Fact (bAbI task 1): `n_moves` sentences "ACTOR went/journeyed/... to the PLACE." over
  `n_actors` actors plus `n_distractors` distractor lines; "Where is ACTOR?" for an actor who moved; the answer is
  that actor's last place.
- Two Supporting Facts (bAbI task 2): a simulated world of `n_events` moves, pick-ups ("ACTOR picked up/got/grabbed
  the OBJECT.") and drops ("ACTOR dropped/discarded/put down the OBJECT."), objects travelling with their holder;
  "Where is the OBJECT?" for an object picked up at least once; the answer is where it is now (its holder's last
  place, or where it was dropped), which needs the pick-up and a move.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from flm.iq.items import Item, draw_demos, item_rng

NAMES = ("Mary", "John", "Daniel", "Sandra", "Fred", "Julie", "Bill", "Emma")
PLACES = ("bathroom", "hallway", "garden", "office", "kitchen", "bedroom", "cellar", "balcony")
OBJECTS = ("football", "apple", "milk", "book", "umbrella")
MOVES = ("went to", "journeyed to", "travelled to", "moved to")
GRABS = ("picked up", "got", "grabbed")
DROPS = ("dropped", "discarded", "put down")
KEYS = ("falcon", "maple", "cobalt", "juniper", "quartz", "saffron", "walrus", "nebula", "tundra", "obsidian",
        "harbor", "velvet", "lantern", "pebble", "thistle", "comet", "marble", "willow", "ember", "glacier")
COLOURS = ("red", "blue", "green", "yellow", "white", "grey")
FOODS = ("soup", "cheese", "olives", "rice", "cherries", "bread")
ANIMALS = ("cat", "dog", "parrot", "horse", "goat", "crow")


def _distractor(r: random.Random) -> str:
    """A sentence that changes nobody's whereabouts, built to look like the facts that do."""
    return r.choice((
        lambda: f"The {r.choice(PLACES)} was painted {r.choice(COLOURS)}.",
        lambda: f"{r.choice(NAMES)} likes {r.choice(FOODS)}.",
        lambda: f"A {r.choice(ANIMALS)} slept near the {r.choice(PLACES)}.",
        lambda: f"Room {r.randint(100, 99999)} has {r.randint(2, 40)} chairs.",
        lambda: f"In {r.randint(1900, 2020)} the {r.choice(ANIMALS)} counted {r.randint(10, 9999)} stars.",
    ))()


def _insert(r: random.Random, facts: list[str], n: int) -> list[str]:
    """`facts` in order with `n` distractor sentences inserted at random positions."""
    lines = list(facts)
    for _ in range(n):
        lines.insert(r.randint(0, len(lines)), _distractor(r))
    return lines


def _qa_items(subtask: str, n: int, seed: int, shots: int, instruction: str,
              make: Callable[[random.Random], tuple[str, str, dict]]) -> list[Item]:
    """Items whose query and demonstrations are independent `make` draws: (text + question, answer, meta)."""
    rng = item_rng(subtask, seed)
    items = []
    for _ in range(n):
        text, answer, meta = make(rng)
        demos = draw_demos(rng, lambda r: make(r)[:2], (text, answer), shots, distinct_outputs=False)
        prompt = "\n\n".join([instruction, *(f"{d}\nAnswer: {a}" for d, a in demos), f"{text}\nAnswer:"])
        items.append(Item(subtask=subtask, category="interference", prompt=prompt, answer=answer, meta=meta))
    return items


def multi_key_retrieval(n: int, seed: int, shots: int = 2, n_keys: int = 4, n_distractors: int = 16) -> list[Item]:
    def make(r: random.Random) -> tuple[str, str, dict]:
        keys = dict(zip(r.sample(KEYS, n_keys), (str(v) for v in r.sample(range(10000, 100000), n_keys)),
                        strict=True))
        facts = [f"The secret number of {k} is {v}." for k, v in keys.items()]
        key = r.choice(list(keys))
        text = " ".join(_insert(r, r.sample(facts, len(facts)), n_distractors))
        return f"{text}\nQuestion: What is the secret number of {key}?", keys[key], {"key": key, "keys": keys}

    return _qa_items("multi_key_retrieval", n, seed, shots,
                     "Read each text and answer the question with the number only.", make)


def single_supporting_fact(n: int, seed: int, shots: int = 2, n_actors: int = 3, n_moves: int = 6,
                           n_distractors: int = 4) -> list[Item]:
    def make(r: random.Random) -> tuple[str, str, dict]:
        actors, where, facts = r.sample(NAMES, n_actors), {}, []
        for _ in range(n_moves):
            actor = r.choice(actors)
            where[actor] = r.choice([p for p in PLACES if p != where.get(actor)])
            facts.append(f"{actor} {r.choice(MOVES)} the {where[actor]}.")
        actor = r.choice(sorted(where))
        text = "\n".join(_insert(r, facts, n_distractors))
        return f"{text}\nQuestion: Where is {actor}?", where[actor], {"actor": actor}

    return _qa_items("single_supporting_fact", n, seed, shots,
                     "Read each story and answer the question with one word.", make)


def two_supporting_facts(n: int, seed: int, shots: int = 2, n_actors: int = 3, n_objects: int = 2,
                         n_events: int = 8, n_distractors: int = 4) -> list[Item]:
    def make(r: random.Random) -> tuple[str, str, dict]:
        while True:  # redraw the rare world where nothing was ever picked up
            actors, objects = r.sample(NAMES, n_actors), r.sample(OBJECTS, n_objects)
            where: dict[str, str] = {}  # actor -> place
            holder: dict[str, str | None] = dict.fromkeys(objects)  # object -> actor holding it
            lying: dict[str, str] = {}  # object -> place where it was dropped
            facts = []
            for _ in range(n_events):
                actor = r.choice(actors)
                held = [o for o in objects if holder[o] == actor]
                free = [o for o in objects if holder[o] is None and lying.get(o, where.get(actor)) == where.get(actor)]
                options = ["move"] + ["grab"] * bool(free and actor in where) + ["drop"] * bool(held)
                kind = r.choice(options)
                if kind == "move":
                    where[actor] = r.choice([p for p in PLACES if p != where.get(actor)])
                    facts.append(f"{actor} {r.choice(MOVES)} the {where[actor]}.")
                elif kind == "grab":
                    obj = r.choice(free)
                    holder[obj] = actor
                    lying.pop(obj, None)
                    facts.append(f"{actor} {r.choice(GRABS)} the {obj}.")
                else:
                    obj = r.choice(held)
                    holder[obj], lying[obj] = None, where[actor]
                    facts.append(f"{actor} {r.choice(DROPS)} the {obj}.")
            place = {o: where[a] for o, a in holder.items() if a is not None} | lying
            if place:
                break
        obj = r.choice(sorted(place))
        text = "\n".join(_insert(r, facts, n_distractors))
        return f"{text}\nQuestion: Where is the {obj}?", place[obj], {"object": obj}

    return _qa_items("two_supporting_facts", n, seed, shots,
                     "Read each story and answer the question with one word.", make)
