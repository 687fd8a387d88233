"""answers.py: the GSM8K answer format, graded: the final number of a reasoning path, by value.

    extract_answer(text, mode)    strict: the number after "####" (GSM8K's own format)
                                  flexible: also "The answer is N", "A: N", else the last number
                                  checked: strict's, and only if every <<a=b>> annotation computes
    is_correct(completion, gold)  compare the extracted number with the gold one by value

Used by data.py (a data file's answers must be gradable) and eval.py (accuracy).
"""
import ast
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction

# -----------------------------------------------------------------------------
# Answer extraction. Normalization follows the official grader (drop thousands commas, compare
# the number after "####"): https://github.com/openai/grade-school-math/blob/master/grade_school_math/dataset.py
# and lm-evaluation-harness's "strict-match" / "flexible-extract" filters for gsm8k.

# a number as people write it: optional sign, optional "$", "1,234" or "1234", optional ".5";
# a "-" is a sign only when it does not follow a word or ")" (so "16-3" gives 3, not -3)
NUMBER = r"(?:(?<![\w.)])-)?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
NUMBER_RE = re.compile(NUMBER)
STRICT_RE = re.compile(r"####[ \t]*(" + NUMBER + ")")  # GSM8K: "#### 1,234"
# answer cues a model may use instead of "####", on the same line as the number
CUE_RE = re.compile(r"(?:\banswer[ \t]+is|\banswer[ \t]*:|\bA:)[ \t]*:?[ \t]*(" + NUMBER + ")", re.IGNORECASE)
ANSWER_LINE_RE = re.compile(r"####[^\n]*\n")  # a path ends with the first "####" line
MODES = ("strict", "flexible", "checked")
# a calculator annotation as GSM8K writes it: "<<48/2=24>>"
ANNOTATION_RE = re.compile(r"<<([^<>]*)>>")


def _normalize(number: str) -> str | None:
    """'$1,234.50' -> '1234.5', '18.00' -> '18', '-0' -> '0' (a canonical string of the value)."""
    try:
        value = Decimal(number.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    out = format(value.normalize(), "f")  # 'f' keeps "1800" from becoming "1.8E+3"
    return "0" if out == "-0" else out


def _value(node) -> Fraction:
    """Exact value of an arithmetic expression tree of numbers, + - * / // and unary minus."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
           ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: Fraction(a // b)}  # ZeroDivisionError: the caller's
    if isinstance(node, ast.BinOp) and type(node.op) in ops:
        return ops[type(node.op)](_value(node.left), _value(node.right))
    raise ValueError("not plain arithmetic")


def annotations_hold(text: str) -> bool:
    """Does every calculator annotation "<<expression=result>>" in text compute? (True with none.)"""
    for body in ANNOTATION_RE.findall(text):
        expr, eq, result = body.rpartition("=")
        if not eq or len(body) > 200:
            return False
        try:
            if _value(ast.parse(expr.replace(",", ""), mode="eval").body) != Fraction(result.replace(",", "").strip()):
                return False
        except (SyntaxError, ValueError, ZeroDivisionError, TypeError, RecursionError):
            return False
    return True


def extract_answer(text: str, mode: str = "flexible") -> str | None:
    """The final numeric answer of `text` as a normalized string, or None if there is none.
    strict: the first "#### N". flexible: "#### N", else the last "The answer is N" / "Answer: N" /
    "A: N", else the last number anywhere in the text. checked: strict's, and only if every
    calculator annotation of the text computes (`annotations_hold`): in a small answer space a
    garbled path often ends in the right number by chance (docs/study.md, "The testbed")."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}, expected one of {MODES}")
    if mode == "checked" and not annotations_hold(text):
        return None
    m = STRICT_RE.search(text)
    if m:
        return _normalize(m.group(1))
    if mode in ("strict", "checked"):
        return None
    cues = CUE_RE.findall(text)
    if cues:
        return _normalize(cues[-1])
    numbers = NUMBER_RE.findall(text)
    return _normalize(numbers[-1]) if numbers else None


def gold_answer(gold: str) -> str:
    """The normalized gold number of a GSM8K answer field ("... #### 1,234") or a bare number."""
    answer = extract_answer(gold, "flexible")
    if answer is None:
        raise ValueError(f"gold answer has no number: {gold[-80:]!r}")
    return answer


def is_correct(completion: str, gold: str, mode: str = "flexible") -> bool:
    """Does the completion's final answer equal the gold answer (by value, so 18 == 18.00)?"""
    pred = extract_answer(completion, mode)
    return pred is not None and Decimal(pred) == Decimal(gold_answer(gold))
