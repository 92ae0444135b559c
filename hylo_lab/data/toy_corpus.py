"""A generated, license-clean English-like corpus for the toy world: templates over a built-in vocabulary.

Structure a small LM can learn, at three scales:
- facts that hold across documents: one fixed world (`WORLD`) gives every person a town, a job, a pet, a
  colour and an age, and every town a river; all documents agree with it;
- structure inside a document: a story introduces a person and refers back to them by pronoun, name and
  attributes; a list or a code is recalled later in the same document; counting runs in order and ends with
  the total;
- local grammar: a few hundred words in fixed sentence patterns, with numbers written as digits or words.

Everything is drawn from `random.Random(seed)`: the same seed gives the same documents on every machine.
The held-out split is the same world with other documents (`toy_corpus(n, seed=heldout_seed(seed))`).
"""

from __future__ import annotations

import random

NAMES = (
    "Mara", "Tobin", "Elsa", "Jonah", "Ruth", "Felix", "Nina", "Owen", "Lena", "Hugo", "Iris", "Silas", "Greta",
    "Milo", "Clara", "Rufus", "Vera", "Otto", "Dora", "Abel", "Pia", "Leon", "Ada", "Boris", "Cora", "Emil",
    "Hanna", "Ivan", "Juno", "Karl", "Lotte", "Nils", "Olga", "Paul", "Rosa", "Sven", "Tess", "Ugo", "Wanda",
    "Yara",
)
FEMALE = {"Mara", "Elsa", "Ruth", "Nina", "Lena", "Iris", "Greta", "Clara", "Vera", "Dora", "Pia", "Ada", "Cora",
          "Hanna", "Juno", "Lotte", "Olga", "Rosa", "Tess", "Wanda", "Yara"}
TOWNS = (
    "Oakvale", "Riverton", "Stonebridge", "Millford", "Ashby", "Pinehurst", "Greenwick", "Fairhaven", "Marlow",
    "Eastbrook", "Westfield", "Highmoor", "Lowden", "Brightwater", "Kingsley", "Redcliff",
)
RIVERS = ("Amber", "Silver", "Willow", "Crane", "Otter", "Moss", "Fern", "Heron")
JOBS = (
    "baker", "farmer", "teacher", "doctor", "painter", "fisher", "tailor", "smith", "miller", "potter",
    "carpenter", "gardener", "builder", "singer", "sailor", "cook", "nurse", "driver", "writer", "weaver",
)
PETS = ("dog", "cat", "goat", "horse", "rabbit", "parrot", "duck", "pig", "sheep", "hen", "fox", "owl")
PET_NAMES = ("Pip", "Rex", "Bo", "Moss", "Ziggy", "Button", "Pepper", "Biscuit", "Toffee", "Sunny", "Bean", "Dot")
COLOURS = ("red", "blue", "green", "yellow", "white", "black", "brown", "orange", "purple", "grey", "pink", "gold")
FOODS = (
    "bread", "milk", "eggs", "honey", "cheese", "apples", "pears", "plums", "carrots", "onions", "beans", "rice",
    "butter", "flour", "salt", "tea", "soup", "cake", "nuts", "fish", "grapes", "lemons", "potatoes", "pies",
)
THINGS = (
    "box", "basket", "lamp", "hat", "coat", "book", "bag", "cup", "bowl", "chair", "table", "rope", "key",
    "map", "bell", "kite", "boat", "ring", "shoe", "clock", "jar", "spoon", "brush", "letter",
)
COUNTABLE = ("apples", "eggs", "stones", "birds", "boats", "trees", "sheep", "coins", "cups", "books", "stars",
             "shells", "pears", "keys", "ducks", "chairs")
PLACES = ("market", "river", "forest", "school", "harbour", "mill", "bakery", "garden", "square", "library",
          "hill", "bridge", "farm", "church", "station")
ADJECTIVES = ("small", "big", "old", "new", "quiet", "busy", "bright", "dark", "warm", "cold", "tall", "short",
              "kind", "happy", "tired", "clever", "brave", "gentle", "loud", "calm")
WEATHER = ("sunny", "rainy", "windy", "cloudy", "foggy", "snowy", "stormy", "clear")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
TIMES = ("morning", "afternoon", "evening")
FEELINGS = ("happy", "glad", "proud", "surprised", "tired", "calm", "hungry", "curious")
ACTIVITIES = ("read a book", "baked a cake", "painted the fence", "fixed the roof", "walked by the river",
              "planted beans", "mended a coat", "sang a song", "cleaned the house", "wrote a letter",
              "fed the animals", "cooked soup", "carried water", "sold some bread", "built a shelf")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
                "twenty")
ALL_WORD_LISTS = (NAMES, TOWNS, RIVERS, JOBS, PETS, PET_NAMES, COLOURS, FOODS, THINGS, COUNTABLE, PLACES,
                  ADJECTIVES, WEATHER, DAYS, MONTHS, TIMES, FEELINGS, ACTIVITIES, NUMBER_WORDS)


def _make_world(seed: int = 1234) -> dict:
    """The fixed facts every document agrees with: person -> attributes, town -> river."""
    rng = random.Random(seed)
    people = {
        name: dict(town=rng.choice(TOWNS), job=rng.choice(JOBS), pet=rng.choice(PETS), pet_name=rng.choice(PET_NAMES),
                   colour=rng.choice(COLOURS), age=rng.randint(8, 80))
        for name in NAMES
    }
    towns = {town: dict(river=rng.choice(RIVERS), place=rng.choice(PLACES)) for town in TOWNS}
    return dict(people=people, towns=towns)


WORLD = _make_world()


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _they(name):
    return ("she", "her", "She", "Her") if name in FEMALE else ("he", "his", "He", "His")


def _and_list(items):
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _number(rng, n):
    return NUMBER_WORDS[n] if n <= 20 and rng.random() < 0.5 else str(n)


def _story(rng):
    name = rng.choice(NAMES)
    p = WORLD["people"][name]
    she, her, She, Her = _they(name)
    other = rng.choice([n for n in NAMES if n != name])
    q = WORLD["people"][other]
    place = rng.choice(PLACES)
    foods = rng.sample(FOODS, rng.randint(2, 4))
    thing, colour = rng.choice(THINGS), rng.choice(COLOURS)
    s = [
        f"{name} was {_a(p['job'])} who lived in {p['town']}.",
        f"{She} had {_a(p['colour'])} {p['pet']} called {p['pet_name']}.",
        f"One {rng.choice(TIMES)} in {rng.choice(MONTHS)}, the weather was {rng.choice(WEATHER)}.",
        f"{name} went to the {place} with {p['pet_name']} to buy {_and_list(foods)}.",
        f"At the {place}, {she} found {_a(rng.choice(ADJECTIVES))} {colour} {thing}.",
        f"There {she} met {other}, the {q['job']} from {q['town']}.",
        f"{other} said: \"What {_a(rng.choice(ADJECTIVES))} {thing}!\"",
        f"{name} and {other} {rng.choice(ACTIVITIES)} together.",
        f"{name} felt {rng.choice(FEELINGS)}.",
        f"In the {rng.choice(TIMES)}, {name} went home to {p['town']} with the {colour} {thing} and the {foods[0]}.",
    ]
    if rng.random() < 0.5:
        s.append(f"{Her} {p['pet']} {p['pet_name']} was waiting by the door.")
    return " ".join(s)


def _facts(rng):
    names = rng.sample(NAMES, rng.randint(2, 4))
    s = []
    for name in names:
        p = WORLD["people"][name]
        _, her, She, _ = _they(name)
        lines = [
            f"{name} lives in {p['town']}.", f"{name} works as {_a(p['job'])}.",
            f"{name} is {p['age']} years old.", f"{name}'s favourite colour is {p['colour']}.",
            f"{She} has {_a(p['pet'])} called {p['pet_name']}.",
            f"The river in {p['town']} is the {WORLD['towns'][p['town']]['river']} river.",
        ]
        rng.shuffle(lines)
        s += lines[: rng.randint(3, len(lines))]
    return " ".join(s)


def _questions(rng):
    s = []
    for _ in range(rng.randint(3, 6)):
        name = rng.choice(NAMES)
        p = WORLD["people"][name]
        kind = rng.randrange(5)
        if kind == 0:
            s.append(f"Where does {name} live? {name} lives in {p['town']}.")
        elif kind == 1:
            s.append(f"What is {name}'s job? {name} is {_a(p['job'])}.")
        elif kind == 2:
            s.append(f"How old is {name}? {name} is {p['age']} years old.")
        elif kind == 3:
            s.append(f"What is the name of {name}'s {p['pet']}? It is called {p['pet_name']}.")
        else:
            town = rng.choice(TOWNS)
            s.append(f"Which river runs through {town}? The {WORLD['towns'][town]['river']} river.")
    return " ".join(s)


def _counting(rng):
    name, things = rng.choice(NAMES), rng.choice(COUNTABLE)
    start, n = rng.choice((1, 1, 1, rng.randint(2, 30))), rng.randint(3, 12)
    words = start == 1 and n <= 20 and rng.random() < 0.5
    seq = [NUMBER_WORDS[i] if words else str(i) for i in range(start, start + n)]
    s = [f"{name} counted the {things}: {', '.join(seq)}."]
    if start == 1:
        s.append(f"There were {seq[-1]} {things} in all.")
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    s.append(rng.choice((f"{a} plus {b} is {a + b}.", f"{a} and {b} make {a + b}.")))
    if a >= b:
        s.append(f"{a} minus {b} is {a - b}.")
    day = rng.randrange(7)
    s.append(f"After {DAYS[day]} comes {DAYS[(day + 1) % 7]}.")
    month = rng.randrange(12)
    s.append(f"After {MONTHS[month]} comes {MONTHS[(month + 1) % 12]}.")
    return " ".join(s)


def _shopping(rng):
    name = rng.choice(NAMES)
    p = WORLD["people"][name]
    she, her, She, _ = _they(name)
    items = rng.sample(FOODS, rng.randint(3, 6))
    counts = [rng.randint(1, 9) for _ in items]
    s = [f"{name} wrote a list for the {rng.choice(PLACES)} in {p['town']}:"]
    s += [f"{_number(rng, c)} {item}," if i < len(items) - 1 else f"{_number(rng, c)} {item}."
          for i, (item, c) in enumerate(zip(items, counts))]
    k = rng.randrange(len(items))
    s.append(f"{She} bought the {items[k]} first.")
    s.append(f"The list had {_number(rng, len(items))} things on it.")
    s.append(f"How many {items[k]} did {name} buy? {She} bought {counts[k]}.")
    return " ".join(s)


def _diary(rng):
    name = rng.choice(NAMES)
    p = WORLD["people"][name]
    she, her, She, Her = _they(name)
    start = rng.randrange(7)
    s = [f"This is the week of {name} the {p['job']}."]
    for i in range(rng.randint(3, 7)):
        day = DAYS[(start + i) % 7]
        s.append(f"On {day} it was {rng.choice(WEATHER)} in {p['town']} and {name} {rng.choice(ACTIVITIES)}.")
    s.append(f"{Her} {p['pet']} {p['pet_name']} slept by the fire.")
    return " ".join(s)


def _town(rng):
    town = rng.choice(TOWNS)
    t = WORLD["towns"][town]
    people = [n for n, p in WORLD["people"].items() if p["town"] == town] or [rng.choice(NAMES)]
    s = [f"{town} is {_a(rng.choice(ADJECTIVES))} town by the {t['river']} river.",
         f"The best place in {town} is the {t['place']}."]
    for name in rng.sample(people, min(len(people), rng.randint(1, 3))):
        p = WORLD["people"][name]
        s.append(f"{name} the {p['job']} lives in {town}.")
    s.append(f"In {rng.choice(MONTHS)} the {t['place']} is {rng.choice(ADJECTIVES)} and the river is "
             f"{rng.choice(('high', 'low', 'fast', 'slow', 'clear', 'cold', 'warm'))}.")
    return " ".join(s)


def _codes(rng):
    """Numbers that must be copied back from earlier in the document (what in-context recall is made of)."""
    name = rng.choice(NAMES)
    She = _they(name)[2]
    items = rng.sample([f"the {c} {t}" for c in COLOURS for t in THINGS], rng.randint(2, 5))
    codes = [str(rng.randrange(10 ** (n - 1), 10 ** n)) for n in (rng.randint(3, 7) for _ in items)]
    s = [f"{name} kept a note of codes."]
    s += [f"The code of {item} is {code}." for item, code in zip(items, codes)]
    s.append(f"{She} put the note away and went to the {rng.choice(PLACES)}.")
    for k in rng.sample(range(len(items)), rng.randint(1, len(items))):
        s.append(f"What is the code of {items[k]}? The code of {items[k]} is {codes[k]}.")
    return " ".join(s)


def _echo(rng):
    """A long number or a word list said once and repeated back verbatim: dense practice in copying."""
    name, other = rng.sample(NAMES, 2)
    s = []
    for _ in range(rng.randint(1, 3)):
        if rng.random() < 0.6:
            said = "".join(rng.choice("0123456789") for _ in range(rng.randint(6, 24)))
            s.append(f"{name} read out the number {said}. {other} wrote it down: {said}.")
        else:
            said = ", ".join(rng.choice(FOODS + THINGS + COLOURS + PETS) for _ in range(rng.randint(3, 8)))
            s.append(f"{name} named the words {said}. {other} said them back: {said}.")
    return " ".join(s)


DOCUMENT_KINDS = (_story, _story, _facts, _questions, _counting, _shopping, _diary, _town, _codes, _echo, _echo)


def toy_document(rng: random.Random) -> str:
    """One document: one to three pieces of the kinds above, one paragraph each."""
    return "\n".join(rng.choice(DOCUMENT_KINDS)(rng) for _ in range(rng.randint(1, 3)))


def toy_corpus(num_docs: int, seed: int = 0) -> list[str]:
    """`num_docs` generated documents, the same for the same seed."""
    rng = random.Random(f"toy-corpus-{seed}")
    return [toy_document(rng) for _ in range(num_docs)]


def heldout_seed(seed: int) -> int:
    """The seed of the held-out split that goes with training seed `seed` (a disjoint stream)."""
    return 1_000_003 + seed


def vocabulary() -> list[str]:
    """Every word the templates use (names, towns, ... and the words inside the multi-word lists)."""
    words = {w for lst in ALL_WORD_LISTS for item in lst for w in item.split()}
    return sorted(words)
