"""Full-match a module path against a user regex in bounded time, whatever the pattern.

Python's ``re`` backtracks: ``(a+)+b`` or ``(.*)*x`` against a 40-character path takes longer than the
age of the universe, and such a pattern can come from an adapter file (``target_modules``,
``rank_pattern``). So before ``re`` runs a pattern, its parse tree gives an upper bound on the
backtracking work for the path's length (``_cost``: sequences multiply, alternatives add, a repeat
multiplies by the counts it could take, and a repeat whose body can itself match in several ways is
exponential). Within the budget, ``re.fullmatch`` runs: every pattern PEFT users write and the
alternations ``peft_config_dict`` writes take this route. Beyond it, the pattern runs on a Thompson
automaton (``_Automaton``), whose work is linear in the path's length for any pattern, with the
same results as ``re``. Lookarounds, backreferences and inline flags have no automaton here: a
pattern that needs them and is over the budget is refused with a ValueError naming it.
"""

from __future__ import annotations

import re
from functools import lru_cache

try:  # Python >= 3.11
    from re import _constants as _c
    from re import _parser as _sre
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

_STEP_BUDGET = 200_000
"""Most backtracking steps one ``re.fullmatch`` of a path may take (a few milliseconds)."""
_MAX_PATTERN = 200_000
_MAX_STATES = 50_000
_MAX_DEPTH = 200
_BIG = 10**30


class RegexTooComplex(ValueError):
    pass


@lru_cache(maxsize=1024)
def _parse(pattern: str) -> tuple[object, int]:
    if len(pattern) > _MAX_PATTERN:
        raise RegexTooComplex(f"regex of {len(pattern):,} characters (at most {_MAX_PATTERN:,})")
    try:
        tree = _sre.parse(pattern)
    except RecursionError:
        raise RegexTooComplex("regex nested too deeply") from None
    depth = _depth(tree)
    if depth > _MAX_DEPTH:
        raise RegexTooComplex(f"regex nested {depth} levels deep (at most {_MAX_DEPTH})")
    return tree, tree.state.flags


def _depth(tree: object, level: int = 0) -> int:
    if level > _MAX_DEPTH:
        return level
    deepest = level
    for op, av in tree:
        for child in _children(op, av):
            deepest = max(deepest, _depth(child, level + 1))
            if deepest > _MAX_DEPTH:
                return deepest
    return deepest


def _children(op: object, av: object) -> list[object]:
    if op is _c.BRANCH:
        return list(av[1])
    if op is _c.SUBPATTERN:
        return [av[3]]
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT) or op is getattr(_c, "POSSESSIVE_REPEAT", None):
        return [av[2]]
    if op is getattr(_c, "ATOMIC_GROUP", None):
        return [av]
    if op in (_c.ASSERT, _c.ASSERT_NOT):
        return [av[1]]
    if op is _c.GROUPREF_EXISTS:
        return [branch for branch in av[1:] if branch is not None]
    return []


def _cost(tree: object, n: int) -> int:
    """Upper bound on the ways ``re`` can try to match ``tree`` against ``n`` characters (capped at ``_BIG``)."""
    total = 1
    for op, av in tree:
        total = min(_BIG, total * _item_cost(op, av, n))
    return total


def _item_cost(op: object, av: object, n: int) -> int:
    if op is _c.BRANCH:
        return min(_BIG, sum(_cost(alt, n) for alt in av[1]))
    if op in (_c.MAX_REPEAT, _c.MIN_REPEAT) or op is getattr(_c, "POSSESSIVE_REPEAT", None):
        low, high, body = av
        high = n if high is _c.MAXREPEAT else min(high, n + 1)
        counts = max(1, high - low + 1)
        inner = _cost(body, n)
        if inner == 1:
            return counts
        return _BIG if high > 60 else min(_BIG, counts * inner**high)
    if op is _c.GROUPREF_EXISTS:
        return min(_BIG, sum(_cost(branch, n) for branch in av[1:] if branch is not None))
    children = _children(op, av)
    return _cost(children[0], n) if children else 1


def fullmatch(pattern: str, text: str) -> bool:
    """``re.fullmatch(pattern, text) is not None``, in bounded time; raises ValueError for a pattern it cannot bound."""
    tree, flags = _parse(pattern)
    if _cost(tree, len(text)) * (len(text) + 1) <= _STEP_BUDGET:
        return re.fullmatch(pattern, text) is not None
    return _automaton(pattern).fullmatch(text)


def check(pattern: str, typical_length: int = 128) -> None:
    """Raise ValueError (naming the problem) if ``pattern`` could not be matched in bounded time."""
    tree, flags = _parse(pattern)
    if _cost(tree, typical_length) * (typical_length + 1) > _STEP_BUDGET:
        _automaton(pattern)


@lru_cache(maxsize=256)
def _automaton(pattern: str) -> _Automaton:
    tree, flags = _parse(pattern)
    return _Automaton(tree, flags)


# -- the automaton ------------------------------------------------------------------------------------
_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)


class _Automaton:
    """Thompson's construction over ``re``'s parse tree; matching follows every path at once (no backtracking).

    States: ``(kind, arg, out1, out2)``: a character test, an epsilon split, a position assertion, the match.
    """

    def __init__(self, tree: object, flags: int) -> None:
        if flags & ~_c.SRE_FLAG_UNICODE:
            raise RegexTooComplex("inline flags such as (?i) together with nested or repeated quantifiers")
        self.states: list[list] = [[_MATCH, None, None, None]]
        self.start = self._sequence(tree, 0)
        self._closures: dict[tuple[frozenset[int], tuple], frozenset[int]] = {}
        self._steps: dict[tuple[frozenset[int], str], frozenset[int]] = {}

    # construction: each builder gets the state to continue with and returns its own first state
    def _new(self, kind: int, arg: object = None, out1: int | None = None, out2: int | None = None) -> int:
        if len(self.states) >= _MAX_STATES:
            raise RegexTooComplex(f"regex expands to more than {_MAX_STATES:,} automaton states")
        self.states.append([kind, arg, out1, out2])
        return len(self.states) - 1

    def _sequence(self, tree: object, next_state: int) -> int:
        for op, av in reversed(list(tree)):
            next_state = self._item(op, av, next_state)
        return next_state

    def _item(self, op: object, av: object, next_state: int) -> int:
        if op in (_c.LITERAL, _c.NOT_LITERAL, _c.ANY, _c.IN):
            return self._new(_CHAR, (op, av), next_state)
        if op is _c.AT:
            if av in (_c.AT_BEGINNING_LINE, _c.AT_END_LINE) or "LOC" in str(av):
                raise RegexTooComplex(f"the anchor {av} together with nested or repeated quantifiers")
            return self._new(_ASSERT, av, next_state)
        if op is _c.BRANCH:
            alternatives = [self._sequence(alt, next_state) for alt in av[1]]
            first = alternatives[-1]
            for alt in reversed(alternatives[:-1]):
                first = self._new(_SPLIT, None, alt, first)
            return first
        if op is _c.SUBPATTERN:
            if av[1] or av[2]:
                raise RegexTooComplex("inline flags such as (?i:...) together with nested or repeated quantifiers")
            return self._sequence(av[3], next_state)
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT):
            low, high, body = av
            state = next_state
            if high is _c.MAXREPEAT:
                loop = self._new(_SPLIT, None, None, next_state)
                self.states[loop][2] = self._sequence(body, loop)
                state = loop
            else:
                for _ in range(high - low):  # a{0,3} is (a(a(a)?)?)?: each optional copy may end the repeat
                    state = self._new(_SPLIT, None, self._sequence(body, state), next_state)
            for _ in range(low):
                state = self._sequence(body, state)
            return state
        raise RegexTooComplex(f"{str(op).lower()} (lookarounds, backreferences, atomic groups) together with nested or repeated quantifiers")

    # matching
    def fullmatch(self, text: str) -> bool:
        current = self._closure(frozenset((self.start,)), text, 0)
        for pos, char in enumerate(text):
            key = (current, char)
            stepped = self._steps.get(key)
            if stepped is None:
                stepped = frozenset(state[2] for i in current if (state := self.states[i])[0] == _CHAR and _test(state[1], char))
                self._remember(self._steps, key, stepped)
            current = self._closure(stepped, text, pos + 1)
            if not current:
                return False
        return 0 in current

    def _closure(self, states: frozenset[int], text: str, pos: int) -> frozenset[int]:
        context = _context(text, pos)
        key = (states, context)
        found = self._closures.get(key)
        if found is not None:
            return found
        seen: set[int] = set()
        stack = list(states)
        while stack:
            index = stack.pop()
            if index in seen:
                continue
            seen.add(index)
            kind, arg, out1, out2 = self.states[index]
            if kind == _SPLIT:
                stack.extend((out1, out2))
            elif kind == _ASSERT:
                if _holds(arg, context):
                    stack.append(out1)
        # keep only the states that consume a character or accept: they decide what happens next
        result = frozenset(i for i in seen if self.states[i][0] in (_CHAR, _MATCH))
        self._remember(self._closures, key, result)
        return result

    @staticmethod
    def _remember(cache: dict, key: object, value: frozenset[int]) -> None:
        if len(cache) > 100_000:
            cache.clear()
        cache[key] = value


def _context(text: str, pos: int) -> tuple[bool, bool, bool, bool, bool]:
    """What the position assertions need: at start, at end, before a final newline, word char before, word char after."""
    before = text[pos - 1] if pos > 0 else ""
    after = text[pos] if pos < len(text) else ""
    return pos == 0, pos == len(text), pos == len(text) - 1 and after == "\n", _is_word(before), _is_word(after)


def _holds(anchor: object, context: tuple[bool, bool, bool, bool, bool]) -> bool:
    at_start, at_end, before_final_newline, word_before, word_after = context
    if anchor in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
        return at_start
    if anchor is _c.AT_END:
        return at_end or before_final_newline
    if anchor is _c.AT_END_STRING:
        return at_end
    if anchor is _c.AT_BOUNDARY:
        return word_before != word_after
    if anchor is _c.AT_NON_BOUNDARY:
        return word_before == word_after and not (at_start and at_end)  # as re: \B never matches the empty string
    raise RegexTooComplex(f"the anchor {anchor}")


def _is_word(char: str) -> bool:
    return bool(char) and (char.isalnum() or char == "_")


def _test(test: tuple[object, object], char: str) -> bool:
    op, av = test
    if op is _c.LITERAL:
        return ord(char) == av
    if op is _c.NOT_LITERAL:
        return ord(char) != av
    if op is _c.ANY:
        return char != "\n"
    return _in_set(av, char)


def _in_set(items: list, char: str) -> bool:
    negate = False
    hit = False
    code = ord(char)
    for op, av in items:
        if op is _c.NEGATE:
            negate = True
        elif op is _c.LITERAL:
            hit = hit or code == av
        elif op is _c.RANGE:
            hit = hit or av[0] <= code <= av[1]
        elif op is _c.CATEGORY:
            hit = hit or _category(av, char)
        else:
            raise RegexTooComplex(f"the character-set item {op}")
    return hit != negate


def _category(category: object, char: str) -> bool:
    name = str(category).replace("CATEGORY_UNI_", "CATEGORY_")
    tests = {
        "CATEGORY_DIGIT": char.isdecimal(),
        "CATEGORY_SPACE": char.isspace(),
        "CATEGORY_WORD": _is_word(char),
        "CATEGORY_LINEBREAK": char == "\n",
    }
    if name in tests:
        return tests[name]
    if name.startswith("CATEGORY_NOT_") and f"CATEGORY_{name[13:]}" in tests:
        return not tests[f"CATEGORY_{name[13:]}"]
    raise RegexTooComplex(f"the character category {category}")
