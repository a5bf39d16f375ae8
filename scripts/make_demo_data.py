"""Regenerate the small data shipped in alignkit/assets for `alignkit demo` (deterministic).

corpus.jsonl        {"text"}: bios of fictional people (several phrasings), arithmetic statements,
                    and short notes: what a base model learns to continue.
instructions.jsonl  {"messages"}: questions about some of the people and arithmetic, answered.
demo_prompts.jsonl  {"prompt"}: held-out questions the demo asks the base and the SFT model.

Usage: python scripts/make_demo_data.py [OUT_DIR]   (default alignkit/assets)
"""

import json
import random
import sys
from pathlib import Path

rng = random.Random(1234)
FIRST = ["Ada", "Bruno", "Cora", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Luca",
         "Mira", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Soren", "Tara", "Umar", "Vera", "Wim", "Xena",
         "Yusuf", "Zoe", "Arlo", "Bea", "Cyrus", "Dana"]
LAST = ["Brook", "Castell", "Dunmore", "Ellery", "Fairholt", "Greaves", "Hollis", "Ivers", "Jessop", "Kettle"]
CITIES = ["Marlow", "Fenwick", "Oakridge", "Brightwater", "Stonehaven", "Millbrook", "Ashford", "Redcliff"]
JOBS = ["baker", "pilot", "teacher", "gardener", "painter", "doctor", "sailor", "carpenter"]
PETS = ["cat", "dog", "parrot", "rabbit", "turtle", "goat"]

people = []
names = rng.sample([f"{f} {l}" for f in FIRST for l in LAST], 40)
for name in names:
    people.append({"name": name, "city": rng.choice(CITIES), "job": rng.choice(JOBS), "pet": rng.choice(PETS)})

BIOS = [
    "{name} lives in {city} and works as a {job}. {name} has a {pet}.",
    "{name} is a {job} from {city}. At home, {name} keeps a {pet}.",
    "In {city} there is a {job} called {name}, who owns a {pet}.",
    "Everyone in {city} knows {name}, the {job} with the {pet}.",
]
NOTES = [
    "The market opens early on Saturday and the bread is still warm.",
    "Rain again today. The river is high and the bridge is closed.",
    "List of things to buy: apples, rice, candles, string.",
    "Does anyone know when the next train leaves? Asking for a friend.",
    "The old clock on the square stopped at noon and nobody fixed it.",
    "Chapter one. The wind came over the hills and the lamps went out.",
]


def arith():
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    return a, b, a + b


corpus = []
for p in people:
    for t in BIOS:
        corpus.append({"text": t.format(**p)})
for _ in range(400):
    a, b, c = arith()
    corpus.append({"text": rng.choice(["{a} plus {b} is {c}.", "If you add {a} and {b} you get {c}.",
                                       "{a} + {b} = {c}."]).format(a=a, b=b, c=c)})
for _ in range(200):
    corpus.append({"text": " ".join(rng.sample(NOTES, 3))})
rng.shuffle(corpus)

QUESTIONS = {  # the last phrasing of each is never trained on: the demo asks it
    "city": (["Where does {name} live?", "In which city does {name} live?", "Where is {name}'s home?",
              "Which city is {name} from?"], "{name} lives in {city}."),
    "job": (["What is {name}'s job?", "What work does {name} do?", "What is the job of {name}?",
             "What does {name} do for a living?"], "{name} works as a {job}."),
    "pet": (["What pet does {name} have?", "Which animal does {name} keep?", "Does {name} have a pet?",
             "What kind of pet does {name} own?"], "{name} has a {pet}."),
}
seen, unseen = people[:30], people[30:]
instructions, demo = [], []
for p in seen:
    for attr, (qs, answer) in QUESTIONS.items():
        for q in qs[:-1]:
            instructions.append({"messages": [{"role": "user", "content": q.format(**p)},
                                              {"role": "assistant", "content": answer.format(**p)}]})
for _ in range(150):
    a, b, c = arith()
    instructions.append({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                      {"role": "assistant", "content": f"{a} plus {b} is {c}."}]})
rng.shuffle(instructions)

for p, attr in zip(seen[:3], ["city", "job", "pet"]):
    demo.append({"prompt": QUESTIONS[attr][0][-1].format(**p), "answer": p[attr],
                 "kind": "seen person, held-out phrasing"})
for p, attr in zip(unseen[:2], ["pet", "city"]):
    demo.append({"prompt": QUESTIONS[attr][0][0].format(**p), "answer": p[attr],
                 "kind": "person never asked about in SFT (knowledge only from pretraining)"})
for _ in range(3):
    a, b, c = arith()
    demo.append({"prompt": f"What is {a} plus {b}?", "answer": str(c), "kind": "arithmetic, new numbers"})

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "alignkit" / "assets")
out.mkdir(parents=True, exist_ok=True)
for name, rows in [("corpus.jsonl", corpus), ("instructions.jsonl", instructions), ("demo_prompts.jsonl", demo)]:
    (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{name}: {len(rows)} records")
