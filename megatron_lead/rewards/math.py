"""Answer extraction (any process) and the math-verify check (grader workers only).

`extract_last_boxed` is plain string scanning: it runs in the trainer, so a worker only ever
receives the bounded content of the last box, never a megabyte response. `grade_one` runs in a
worker process (pool.py) and imports math-verify/sympy lazily, so importing this module costs
nothing in the trainer.

Model text never reaches eval/exec. math-verify's `ExprExtractionConfig` goes through sympy's
`parse_expr` (an `eval`), so both sides are parsed with `LatexExtractionConfig` only: regex
extraction, string normalisation (latex2sympy2_extended/math_normalization.py) and the ANTLR
LaTeX grammar, whose visitor builds sympy objects directly. The one string-to-sympy call on that
path is `sympy.Number(token)` for NUMBER tokens (digits, ',' and '.' only, by the grammar), which
sympy turns into `parse_expr`. As a second line of defence the worker replaces sympy's
`parse_expr` by `_numbers_only`: a plain numeric literal becomes `Integer`/`Float` without
`eval`, anything else raises, so no code path can hand model text to `eval` inside a worker.

math-verify's own signal-based timeouts are off (`parsing_timeout=None`, `timeout_seconds=None`:
SIGALRM fails outside the main thread); the pool kills a worker that overruns. Before `verify`,
`_max_digits` bounds the size of numbers sympy would have to build (`9^{9^{9^9}}`, `1000000!`),
and `precheck` refuses bracket nesting deeper than MAX_NESTING before any worker sees it, so the
common hostile answers are refused in microseconds instead of burning the timeout.
"""

from __future__ import annotations

import math
import re

REASONS = ("ok", "wrong", "no_boxed", "empty_answer", "timeout", "parse_error", "grader_error",
           "too_large", "gold_parse_error", "eval_refused")
MAX_ANSWER_CHARS = 10_000   # longer boxed content (or gold) is scored parse_error, never parsed
MAX_DIGITS = 10_000         # numbers beyond ~this many decimal digits are scored too_large
MAX_NESTING = 64            # deeper ( [ { nesting in boxed content is scored parse_error, never parsed

_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_NUMBER = re.compile(r"\s*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?\s*")


# ------------------------------------------------------------------------ extraction

def extract_last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` / `\\fbox{...}` (also `\\boxed 5`), None if there is none.

    Braces are counted with escapes skipped, so `\\boxed{\\{1,2\\}}` gives `\\{1,2\\}`. If the last
    box is unbalanced (a response cut at max length), the answer is missing: None, not an
    earlier box, which is usually an intermediate result.
    """
    last = None
    for last in _BOX.finditer(text):
        pass
    if last is None:
        return None
    i, n = last.end(), len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i < n and text[i] == "{":
        depth, j = 0, i
        while j < n:
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j]
            j += 1
        return None
    if i == last.end():  # `\boxed5` is not a box; `\boxed 5` is
        return None
    m = re.compile(r"[^\s$]+").match(text, i)
    if m is None:
        return None
    return m.group(0).rstrip(".,;:") or None


def precheck(response: str, answer: str) -> tuple[str | None, str | None]:
    """(content, None) when a worker must decide, else (None, reason) decided here for free."""
    if not answer.strip():
        return None, "empty_answer"
    content = extract_last_boxed(response)
    if content is None:
        return None, "no_boxed"
    if not content.strip() or len(content) > MAX_ANSWER_CHARS or len(answer) > MAX_ANSWER_CHARS:
        return None, "parse_error"
    if _nesting(content) > MAX_NESTING:
        return None, "parse_error"
    return content, None


def _nesting(text: str) -> int:
    """Deepest bracket nesting of text (any of ( [ { against ) ] }, escaped or not).

    The LaTeX parser's cost grows steeply with depth (measured: 600 nested \\frac, 1200 \\sqrt,
    3000 parentheses each ran past a 3 s timeout, costing a worker restart apiece), and no real
    answer nests 64 deep; so such content is refused here, in microseconds.
    """
    depth = deepest = 0
    for c in text:
        if c in "([{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif c in ")]}":
            depth = max(depth - 1, 0)
    return deepest


# ------------------------------------------------------------------- inside a worker

_MV = None


def _math_verify():
    """Import math-verify once, with the no-eval guard installed before anything parses."""
    global _MV
    if _MV is None:
        import logging

        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled" notices
        import sys

        import sympy.parsing.sympy_parser as sp
        import sympy.physics.units  # noqa: F401  simplify imports it lazily; it sympifies constants
        from math_verify import LatexExtractionConfig, parse, verify

        original = sp.parse_expr
        for mod in list(sys.modules.values()):  # every module that bound the name at import
            if getattr(mod, "parse_expr", None) is original:
                mod.parse_expr = _numbers_only
        _MV = (parse, verify, [LatexExtractionConfig(boxed_match_priority=0)])
    return _MV


_REFUSED = [0]


def _numbers_only(s, *args, **kwargs):
    """Stand-in for sympy's parse_expr in workers: numeric literals only, never `eval`.

    A refusal is counted: grade_one reports `eval_refused` rather than a silent `wrong` when
    math-verify swallowed one (model text trying that path, or sympy needing a new module).
    """
    import sympy

    if isinstance(s, str) and _NUMBER.fullmatch(s):
        t = s.strip()
        return sympy.Integer(int(t)) if t.lstrip("+-").isdigit() else sympy.Float(t)
    _REFUSED[0] += 1
    raise ValueError("grader workers do not eval strings")


def _parse(latex: str) -> list:
    parse, _, cfg = _math_verify()
    text = latex if "\\boxed" in latex else "\\boxed{" + latex + "}"
    return parse(text, extraction_config=cfg, fallback_mode="first_match",
                 extraction_mode="first_match", parsing_timeout=None)


def _is_sympy(x) -> bool:
    return not isinstance(x, str)


def _max_digits(expr) -> float:
    """Largest decimal-digit count of any number that evaluating `expr` would build (rough).

    One pass over the tree; each numeric node gets log10|value| (None when symbolic). Powers
    multiply, factorials grow as n log n, so `9^{9^{9^9}}` is inf without computing anything.
    """
    import sympy

    worst = 0.0

    def mag(e):
        nonlocal worst
        if isinstance(e, sympy.MatrixBase):
            for x in e:
                mag(x)
            return None
        if not isinstance(e, sympy.Basic):
            return None
        subs = [mag(a) for a in e.args]
        out = None
        if e.is_Rational:
            out = max(_log10(abs(int(e.p))), _log10(abs(int(e.q))))
        elif e.is_Float or isinstance(e, sympy.NumberSymbol):
            f = abs(float(e))
            out = math.log10(f) if 0 < f < math.inf else (0.0 if f == 0 else math.inf)
        elif e.is_Pow and None not in subs:
            base, expo = subs
            out = 0.0 if base == 0 else abs(base) * _pow10(expo)
        elif isinstance(e, sympy.exp) and None not in subs:
            out = _pow10(subs[0]) * math.log10(math.e)
        elif isinstance(e, sympy.factorial) and None not in subs:
            n = _pow10(subs[0])
            out = n * max(1.0, math.log10(n) if n < math.inf else math.inf)
        elif (e.is_Mul or e.is_Add) and None not in subs:
            out = sum(abs(s) for s in subs) if e.is_Mul else max(subs) + 1
        if out is not None:
            worst = max(worst, out)
        return out

    for x in expr if isinstance(expr, list) else [expr]:
        if _is_sympy(x):
            mag(x)
    return worst


def _log10(n: int) -> float:
    return math.log10(n) if n > 0 else 0.0


def _pow10(x: float) -> float:
    return 10.0 ** x if x < 300 else math.inf


def grade_one(content: str, answer: str, max_digits: float | None = MAX_DIGITS) -> list:
    """[correct, reason] for one boxed content against the gold answer (a worker's task)."""
    _, verify, _ = _math_verify()
    refused = _REFUSED[0]
    correct, reason = _grade(verify, content, answer, max_digits)
    if not correct and _REFUSED[0] != refused:
        return [False, "eval_refused"]
    return [correct, reason]


def _grade(verify, content: str, answer: str, max_digits: float | None) -> list:
    gold = _parse(answer)
    if not gold:
        return [False, "gold_parse_error"]
    pred = _parse(content)
    if not pred:
        return [False, "parse_error"]
    if max_digits is not None and max(_max_digits(pred), _max_digits(gold)) > max_digits:
        return [False, "too_large"]
    if verify(gold, pred, timeout_seconds=None):
        return [True, "ok"]
    if not any(_is_sympy(p) for p in pred):
        return [False, "parse_error"]
    if not any(_is_sympy(g) for g in gold):
        return [False, "gold_parse_error"]
    return [False, "wrong"]
