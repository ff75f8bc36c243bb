"""Answer extraction and scoring for the instruction-tuning evaluations.

- Commonsense (LLM-Adapters' ``commonsense_evaluate.py``): the first option word in the response --
  ``true|false`` (BoolQ), ``solution1|2`` (PIQA), ``answer1..5`` (SIQA, ARC-e, ARC-c, OBQA; SIQA has three
  options but LLM-Adapters matches all five words), ``ending1..4`` (HellaSwag), ``option1|2`` (WinoGrande);
  correct when it equals the record's ``answer``.
- GSM8K: the last number of the response (commas dropped), correct within ``1e-3`` of the answer
  (LLM-Adapters' ``extract_answer_number``); a GSM8K-style answer ``"... #### 42"`` is read after ``####``.
- MATH: the content of the last ``\\boxed{...}`` (braces matched), else what follows the last "The answer
  is" (MetaMathQA's ending); compared to the answer (or the boxed answer of the record's solution) after a
  light normalisation (spaces, ``\\left``/``\\right``, ``\\dfrac``, ``\\text{}``, ``$``, degrees, percent,
  trailing period), or numerically when both parse as numbers. No symbolic equivalence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

_ANSWER_WORDS = "answer1|answer2|answer3|answer4|answer5"

CHOICE_PATTERNS: dict[str, str] = {
    "boolq": "true|false",
    "piqa": "solution1|solution2",
    "social_i_qa": _ANSWER_WORDS,
    "hellaswag": "ending1|ending2|ending3|ending4",
    "winogrande": "option1|option2",
    "arc-challenge": _ANSWER_WORDS,
    "arc-easy": _ANSWER_WORDS,
    "openbookqa": _ANSWER_WORDS,
}

_NUMBER = re.compile(r"-?\d+\.?\d*")


def extract_choice(dataset: str, response: str) -> str:
    """The first option word of ``dataset`` in ``response`` (``""`` when there is none)."""
    found = re.findall(CHOICE_PATTERNS[dataset.lower()], response.strip())
    return found[0] if found else ""


def extract_number(response: str) -> float | None:
    """The last number in ``response`` (thousands separators dropped), or ``None``."""
    found = _NUMBER.findall(response.replace(",", ""))
    return float(found[-1]) if found else None


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``), braces matched."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    body = start + (len("\\boxed") if text.startswith("\\boxed", start) else len("\\fbox"))
    if text.startswith(" ", body):
        words = text[body:].split("$")[0].split()
        return words[0] if words else None
    if not text.startswith("{", body):
        return None
    depth = 0
    for i in range(body, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[body + 1 : i]
    return None


def extract_math_answer(response: str) -> str | None:
    """The boxed answer, else the text after the last "The answer is" (to the end of its line)."""
    boxed = extract_boxed(response)
    if boxed is not None:
        return boxed
    found = re.findall(r"The answer is:?\s*(.*)", response)
    return found[-1].strip() if found else None


def normalize_math(answer: str) -> str:
    """A light canonical form of a MATH answer string (see the module docstring)."""
    s = re.sub(r"\\text\{(.*?)\}", r"\1", answer)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("$", "")):
        s = s.replace(old, new)
    for old, new in (("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("^{\\circ}", ""), ("^\\circ", "")):
        s = s.replace(old, new)
    s = s.replace("\\%", "").replace("%", "")
    return re.sub(r"\s+", "", s).rstrip(".")


def _float(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def math_correct(prediction: str | None, answer: str) -> bool:
    """Whether a MATH prediction equals the answer after `normalize_math` (or as numbers)."""
    if prediction is None:
        return False
    a, b = normalize_math(prediction), normalize_math(answer)
    if a == b:
        return True
    x, y = _float(a), _float(b)
    return x is not None and y is not None and abs(x - y) <= 1e-6 * max(1.0, abs(y))


def number_correct(prediction: float | None, answer: str) -> bool:
    """Whether a GSM8K prediction is within ``1e-3`` of the answer (``"42"`` or ``"... #### 42"``)."""
    reference = _float(answer.split("####")[-1].strip())
    if reference is None:
        reference = extract_number(answer)
    return prediction is not None and reference is not None and abs(prediction - reference) <= 1e-3


def reference_answer(record: Mapping[str, str]) -> str:
    """A test record's answer: its ``answer`` field, else the boxed answer of its ``output`` (MATH solutions)."""
    return record.get("answer") or extract_boxed(record.get("output", "")) or ""


@dataclass(frozen=True)
class Evaluator:
    """How one evaluation set is scored: ``extract(response)``, ``correct(prediction, answer)``, token budget."""

    extract: Callable[[str], object]
    correct: Callable[[object, str], bool]
    max_new_tokens: int


def _choice_evaluator(dataset: str) -> Evaluator:
    return Evaluator(lambda response: extract_choice(dataset, response), lambda p, a: bool(p) and p == a, 32)


# evaluation set (LLM-Adapters' folder names, lower-cased) -> evaluator; token budgets are the paper's (C.3, C.4)
EVALUATORS: dict[str, Evaluator] = {name: _choice_evaluator(name) for name in CHOICE_PATTERNS}
EVALUATORS["gsm8k"] = Evaluator(extract_number, number_correct, 256)
EVALUATORS["math"] = Evaluator(extract_math_answer, math_correct, 512)


def get_evaluator(name: str) -> Evaluator:
    """The evaluator of an evaluation set (case-insensitive: ``ARC-Easy``, ``boolq``, ``gsm8k``, ``MATH``)."""
    if name.lower() not in EVALUATORS:
        raise ValueError(f"evaluation set {name!r} is not allowed: one of {', '.join(EVALUATORS)} (any case)")
    return EVALUATORS[name.lower()]
