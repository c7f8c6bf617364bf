"""The needles of the needle benchmark: short facts with one-word or one-number answers, the
questions that ask for them, and how an answer is judged (`Needle`), in fixed sets (`NEEDLE_SETS`)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class Needle:
    """One fact and its question. `kind`: name | number | word | place | count | order. An order
    needle comes with a `cue` caption right before its fact and a `decoy` caption (the same sort
    of event, another answer) two frames before the cue: the question asks what came right after
    the cue, so only the order tells fact from decoy."""

    fact: str
    question: str
    answer: str  # the word an answer must contain (case-insensitive, whole word)
    kind: str = "word"
    also: tuple[str, ...] = ()  # other spellings that count ("three" for "3")
    cue: str | None = None
    decoy: str | None = None
    wrong: tuple[str, ...] = ()  # an answer naming one of these is wrong even if it names the answer

    def judge(self, text: str) -> bool:
        said = lambda w: re.search(rf"\b{re.escape(w)}\b", text, re.IGNORECASE) is not None  # noqa: E731
        return any(map(said, (self.answer, *self.also))) and not any(map(said, self.wrong))


def _order(fact: str, question: str, answer: str, cue: str, decoy: str, wrong: str) -> Needle:
    return Needle(fact, question, answer, "order", cue=cue, decoy=decoy, wrong=(wrong,))


def _count(fact: str, question: str, number: int, word: str) -> Needle:
    return Needle(fact, question, str(number), "count", also=(word,))


# Answers appear nowhere else in the stream (not in filler captions, not in other needles of the
# set). Set 0 starts with the ten needles every run before 2026-12-05 used (comparable results).
NEEDLE_SETS = [
    [
        Needle("The code word for minute 3 is PEACH.", "What is the code word for minute 3? Answer with one word.", "peach"),
        Needle("The delivery truck number is 4721.", "What is the delivery truck number? Answer with the number only.",
               "4721", "number"),
        Needle("The guest speaker's name is Margaret.", "What is the guest speaker's name? Answer with one word.",
               "margaret", "name"),
        Needle("The lost dog is called Biscuit.", "What is the lost dog called? Answer with one word.", "biscuit", "name"),
        Needle("The secret password is TANGERINE.", "What is the secret password? Answer with one word.", "tangerine"),
        Needle("The parcel was sent to Lisbon.", "Which city was the parcel sent to? Answer with one word.", "lisbon", "place"),
        Needle("The winning lottery number is 8362.", "What is the winning lottery number? Answer with the number only.",
               "8362", "number"),
        Needle("The captain's favourite colour is violet.", "What is the captain's favourite colour? Answer with one word.",
               "violet"),
        Needle("The train to the coast leaves from platform 15.",
               "Which platform does the train to the coast leave from? Answer with the number only.", "15", "number"),
        Needle("The bakery's special cake today is lemon.", "What is the bakery's special cake today? Answer with one word.",
               "lemon"),
        _count("Seven red kites flew over the hill.", "How many red kites flew over the hill? Answer with a number.", 7, "seven"),
        _order("A fox ran across the road.", "Which animal ran across the road right after the church bell rang? "
               "Answer with one word.", "fox", "The church bell rang loudly.", "A goat ran across the road.", "goat"),
    ],
    [
        Needle("The new mayor's name is Theodore.", "What is the new mayor's name? Answer with one word.", "theodore", "name"),
        Needle("The pilot of the balloon is called Ingrid.", "What is the balloon pilot called? Answer with one word.",
               "ingrid", "name"),
        Needle("The museum ticket costs 64 euros.", "How many euros does the museum ticket cost? Answer with the number only.",
               "64", "number"),
        Needle("The hotel room number is 5190.", "What is the hotel room number? Answer with the number only.", "5190", "number"),
        Needle("The concert will take place in Vienna.", "In which city will the concert take place? Answer with one word.",
               "vienna", "place"),
        Needle("The old ship sank near Malta.", "Near which island did the old ship sink? Answer with one word.", "malta", "place"),
        _count("Four white swans swam on the lake.", "How many white swans swam on the lake? Answer with a number.", 4, "four"),
        _count("Nine kids waited at the bus stop.", "How many kids waited at the bus stop? Answer with a number.", 9, "nine"),
        Needle("The chef's secret spice is saffron.", "What is the chef's secret spice? Answer with one word.", "saffron"),
        _order("A tractor drove up the lane.", "Which vehicle drove up the lane right after the whistle blew? "
               "Answer with one word.", "tractor", "A loud whistle blew.", "A scooter drove up the lane.", "scooter"),
        _order("An owl landed on the fence.", "Which bird landed on the fence right after the lights went out? "
               "Answer with one word.", "owl", "The street lights went out.", "A crow landed on the fence.", "crow"),
        _count("Two green umbrellas lay on the bench.", "How many green umbrellas lay on the bench? Answer with a number.",
               2, "two"),
    ],
]
NEEDLES = NEEDLE_SETS[0]
