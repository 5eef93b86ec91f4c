"""Prompt templates: zero-shot, few-shot and chat.

- chat (default): the question alone as the user message of the model's chat template (the
  engine applies the template; `generate(..., chat=True)`). This is exactly how `cold train`
  formats its training prompts, so a demo adapter sees the format it was trained on.
- zero-shot: plain text `Question: ...\\nAnswer:`, no template.
- few-shot: `shots` worked examples in the same format (each ending `The answer is X.`), then
  the question. Built-in tasks use the hand-written exemplars below (written for this project,
  not taken from any test file); the generic JSONL task uses the first rows of its own file,
  which are then left out of the evaluation.

Multiple-choice questions list their choices after the question (`Answer Choices: (A) ... (B) ...`,
as in Kojima et al. 2022). An optional instruction is appended on its own line to every question.
Plain-text prompts stop at the next `\\nQuestion:` (the model starting a new example).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from cold.errors import ColdError
from cold.tasks.readers import Problem

STYLES = ("chat", "zero-shot", "few-shot")
TEXT_STOP = ("\nQuestion:",)

# (question, worked answer) per task family; choices of multiple-choice questions are inline.
EXEMPLARS: dict[str, list[tuple[str, str]]] = {
    "arithmetic": [
        ("A baker made 24 muffins in the morning and 18 in the afternoon. She sold 30 of them. "
         "How many muffins does she have left?",
         "She made 24 + 18 = 42 muffins. After selling 30 she has 42 - 30 = 12 left. The answer is 12."),
        ("Tom reads 15 pages every day. How many pages does he read in 2 weeks?",
         "Two weeks have 2 * 7 = 14 days. He reads 15 * 14 = 210 pages. The answer is 210."),
        ("A shirt costs $20 and is on sale for 25% off. Lisa buys 3 shirts. How much does she pay?",
         "The discount is 20 * 0.25 = $5, so one shirt costs 20 - 5 = $15. Three shirts cost "
         "3 * 15 = $45. The answer is 45."),
        ("There are 5 boxes with 12 pencils in each. The pencils are shared equally among 4 "
         "students. How many pencils does each student get?",
         "There are 5 * 12 = 60 pencils. Each student gets 60 / 4 = 15 pencils. The answer is 15."),
    ],
    "coin_flip": [
        ('A coin is heads up. Ana flips the coin. Boris does not flip the coin. Chen flips the coin. '
         'Dana does not flip the coin. Is the coin still heads up? Note that "flip" here means "reverse".',
         "Ana and Chen flip the coin, so it is flipped 2 times. An even number of flips leaves it "
         "heads up. The answer is yes."),
        ('A coin is heads up. Eli does not flip the coin. Fay flips the coin. Gus does not flip the '
         'coin. Hana does not flip the coin. Is the coin still heads up? Note that "flip" here means "reverse".',
         "Only Fay flips the coin, so it is flipped 1 time. An odd number of flips leaves it tails "
         "up. The answer is no."),
        ('A coin is heads up. Ivo flips the coin. Jun flips the coin. Kim flips the coin. Lea does '
         'not flip the coin. Is the coin still heads up? Note that "flip" here means "reverse".',
         "Ivo, Jun and Kim flip the coin, so it is flipped 3 times. An odd number of flips leaves "
         "it tails up. The answer is no."),
        ('A coin is heads up. Max does not flip the coin. Noa does not flip the coin. Oli does not '
         'flip the coin. Pia does not flip the coin. Is the coin still heads up? Note that "flip" '
         'here means "reverse".',
         "Nobody flips the coin, so it is flipped 0 times. An even number of flips leaves it heads "
         "up. The answer is yes."),
    ],
    "last_letters": [
        ('Take the last letters of each words in "Alma Brent Cosmo Dilan" and concatenate them.',
         'The last letters of "Alma", "Brent", "Cosmo" and "Dilan" are "a", "t", "o" and "n". '
         "Concatenated they give aton. The answer is aton."),
        ('Take the last letters of each words in "Edgar Fiona Gil Hedy" and concatenate them.',
         'The last letters of "Edgar", "Fiona", "Gil" and "Hedy" are "r", "a", "l" and "y". '
         "Concatenated they give raly. The answer is raly."),
        ('Take the last letters of each words in "Iris Jonas Kurt Lupe" and concatenate them.',
         'The last letters of "Iris", "Jonas", "Kurt" and "Lupe" are "s", "s", "t" and "e". '
         "Concatenated they give sste. The answer is sste."),
        ('Take the last letters of each words in "Mika Nils Otto Paz" and concatenate them.',
         'The last letters of "Mika", "Nils", "Otto" and "Paz" are "a", "s", "o" and "z". '
         "Concatenated they give asoz. The answer is asoz."),
    ],
    "multiple_choice": [
        ("Where would you keep milk to stop it from going bad?\nAnswer Choices: (A) cupboard "
         "(B) refrigerator (C) garden (D) oven (E) mailbox",
         "Milk spoils unless it is kept cold, and a refrigerator keeps food cold. The answer is (B)."),
        ("What do people usually do when they are very tired?\nAnswer Choices: (A) run (B) shout "
         "(C) sleep (D) cook (E) dance",
         "Tired people need rest, and sleeping is how people rest. The answer is (C)."),
        ("If you want to read a book you do not own, where can you borrow one?\nAnswer Choices: "
         "(A) library (B) bakery (C) stadium (D) pharmacy (E) garage",
         "A library lends books to its visitors. The answer is (A)."),
        ("What happens to ice that is left in the sun?\nAnswer Choices: (A) it freezes (B) it "
         "grows (C) it burns (D) it sings (E) it melts",
         "The sun warms the ice above its melting point, so it turns into water. The answer is (E)."),
    ],
}


@dataclass(frozen=True)
class PromptStyle:
    """How questions become prompts for `Engine.generate`."""

    style: str  # one of STYLES
    exemplars: tuple[tuple[str, str], ...] = ()  # few-shot only
    instruction: str = ""

    @property
    def chat(self) -> bool:
        return self.style == "chat"

    @property
    def stop(self) -> tuple[str, ...]:
        return () if self.chat else TEXT_STOP

    def question(self, problem: Problem) -> str:
        return question_text(problem, self.instruction)

    def render(self, problem: Problem) -> str:
        """The prompt string passed to the engine (for chat: the user message)."""
        question = self.question(problem)
        return question if self.chat else plain_prompt(question, self.exemplars)


def plain_prompt(question: str, exemplars: Sequence[tuple[str, str]] = ()) -> str:
    """The zero-shot (no exemplars) or few-shot text prompt; `cold train --prompt zero-shot` trains on it."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in exemplars)
    return f"{shots}Question: {question}\nAnswer:"


def question_text(problem: Problem, instruction: str = "") -> str:
    text = problem.question
    if problem.choices:
        text += "\nAnswer Choices: " + " ".join(f"({label}) {choice}" for label, choice in problem.choices)
    if instruction:
        text += "\n" + instruction
    return text


def make_style(style: str, family: str = "", shots: int = 4, instruction: str = "",
               own_exemplars: Sequence[Problem] = ()) -> PromptStyle:
    """A prompt style; few-shot takes `shots` exemplars of the task family, or `own_exemplars`.

    `own_exemplars` (problems of the task itself, for tasks without built-in exemplars) are shown
    with the answer `The answer is GOLD.`
    """
    if style not in STYLES:
        raise ColdError(f"--prompt must be one of {', '.join(STYLES)}, got {style!r}")
    if style != "few-shot":
        return PromptStyle(style, (), instruction)
    if shots < 1:
        raise ColdError(f"--shots must be >= 1 for few-shot prompts, got {shots}")
    if family:
        pool = EXEMPLARS[family]
        if shots > len(pool):
            raise ColdError(f"--shots {shots}: only {len(pool)} built-in exemplars for this task")
        exemplars = pool[:shots]
    else:
        exemplars = [(question_text(p), f"The answer is {_shown(p)}.") for p in own_exemplars[:shots]]
    return PromptStyle(style, tuple(exemplars), instruction)


def _shown(problem: Problem) -> str:
    return f"({problem.gold})" if problem.choices else problem.gold
