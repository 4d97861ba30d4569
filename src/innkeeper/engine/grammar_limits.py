"""Bounds on client GBNF grammars, checked in Python before llama.cpp ever sees one.

llama.cpp parses a grammar and expands its parse stacks with recursive C++ functions and
matches every vocabulary entry against every stack on each sampled token. So a client
grammar can crash the process or stall the engine thread:

- deeply nested groups (`((((…"a"…))))`) or long rule chains (`rN ::= rN+1 | "a"`) overflow
  the native stack in the parser and in `llama_grammar_advance_stack`;
- many alternatives reachable at one position (`("0" | "1" | … | "59999")`) cost
  (alternatives x vocabulary) character checks per token, and building the stacks is
  quadratic in the alternatives;
- repeating something that can match nothing (`("a"?){0,300}`, `("a"?)*`) makes the stack
  expansion explode (a three-token sample took over a minute).

`check_limits` parses the grammar with a small linear-time parser (strings, character
classes, `<token>` references and `#` comments are lexed properly, so a "(" inside a string
is just a character) and measures exactly those quantities. The limits below are generous
for real grammars: llama.cpp's grammars/*.gbnf (json, json_arr, c, chess, arithmetic,
english, japanese, list) and json-schema-to-grammar output use nesting ≤ 2, fan-out ≤ 11
and rule chains ≤ 6.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


class GrammarError(ValueError):
    """A GBNF grammar llama.cpp could not parse, or one over innkeeper's limits."""


@dataclass(frozen=True)
class GrammarLimits:
    """What a client grammar may cost; see the module docstring for why each one exists."""

    max_bytes: int = 64 * 1024  # UTF-8 size of the grammar text
    max_rules: int = 1024  # named rules
    max_nesting: int = 32  # depth of ( … ) groups
    max_repeat: int = 1000  # the bound of x{m,n} (llama.cpp copies x that often)
    max_elements: int = 32_768  # grammar elements after llama.cpp expands repetitions
    max_depth: int = 128  # longest leftmost chain of rule references (native recursion)
    # Alternatives reachable as the next symbol of any rule or group (parse stacks). Each
    # sampled token checks every vocabulary entry against every stack, so the budget is
    # stacks x vocabulary entries: 64 stacks on a 49k-token vocabulary, about 25 ms per token
    # on one busy core (the 60k alternatives of issue 10 took ~140 s), fewer stacks on larger
    # vocabularies, never fewer than `min_fanout`.
    fanout_budget: int = 64 * 49_152
    min_fanout: int = 16

    def max_fanout(self, n_vocab: int) -> int:
        return max(self.min_fanout, self.fanout_budget // max(n_vocab, 1))


LIMITS = GrammarLimits()


@dataclass
class _Item:
    base: int  # index of a node (rule or group), or -1 for a terminal
    size: int  # elements of a terminal (characters of a literal; 1 for a class)
    lo: int = 1
    hi: int | None = 1  # None: unbounded


@dataclass
class _Node:
    name: str
    alts: list[list[_Item]]


class _Parser:
    """GBNF, as llama.cpp's grammar-parser.cpp reads it, into rules, groups and items."""

    def __init__(self, text: str, limits: GrammarLimits) -> None:
        self.s = text
        self.i = 0
        self.limits = limits
        self.nodes: list[_Node] = []
        self.by_name: dict[str, int] = {}
        self.defined: set[str] = set()
        self.elements = 0

    def fail(self, what: str) -> GrammarError:
        line = self.s.count("\n", 0, self.i) + 1
        return GrammarError(f"the GBNF grammar could not be parsed: {what} (line {line})")

    def node(self, name: str) -> int:
        idx = self.by_name.get(name)
        if idx is None:
            if len(self.by_name) >= self.limits.max_rules:
                raise GrammarError(
                    f"the grammar has more than {self.limits.max_rules} rules (innkeeper's limit)"
                )
            idx = len(self.nodes)
            self.nodes.append(_Node(name, []))
            self.by_name[name] = idx
        return idx

    def space(self, newline_ok: bool) -> None:
        s, n = self.s, len(self.s)
        while self.i < n:
            c = s[self.i]
            if c in " \t" or (newline_ok and c in "\r\n"):
                self.i += 1
            elif c == "#":
                while self.i < n and s[self.i] not in "\r\n":
                    self.i += 1
            else:
                return

    def name(self) -> str:
        s, j = self.s, self.i
        while j < len(s) and (s[j].isascii() and (s[j].isalnum() or s[j] in "-_")):
            j += 1
        if j == self.i:
            raise self.fail("expected a rule name")
        out = s[self.i : j]
        self.i = j
        return out

    def parse(self) -> list[_Node]:
        self.space(True)
        while self.i < len(self.s):
            name = self.name()
            self.space(False)
            if not self.s.startswith("::=", self.i):
                raise self.fail("expected ::=")
            self.i += 3
            self.space(True)
            idx = self.node(name)
            self.defined.add(name)
            self.nodes[idx].alts.extend(self.alternates(0))
            self.space(True)
        return self.nodes

    def alternates(self, depth: int) -> list[list[_Item]]:
        alts = [self.sequence(depth)]
        while self.i < len(self.s) and self.s[self.i] == "|":
            self.i += 1
            self.space(True)
            alts.append(self.sequence(depth))
        return alts

    def sequence(self, depth: int) -> list[_Item]:
        s, n = self.s, len(self.s)
        nested = depth > 0
        seq: list[_Item] = []
        while self.i < n:
            c = s[self.i]
            if c == '"':
                item = _Item(-1, self.literal())
            elif c == "[":
                self.char_class()
                item = _Item(-1, 1)
            elif c == ".":
                self.i += 1
                item = _Item(-1, 1)
            elif c == "<" or (c == "!" and s.startswith("<", self.i + 1)):
                end = s.find(">", self.i)
                if end < 0:
                    raise self.fail("unterminated <token>")
                self.i = end + 1
                item = _Item(-1, 1)
            elif c == "(":
                if depth + 1 > self.limits.max_nesting:
                    raise GrammarError(
                        f"the grammar nests groups deeper than {self.limits.max_nesting} "
                        "levels (innkeeper's limit)"
                    )
                self.i += 1
                self.space(True)
                idx = len(self.nodes)
                self.nodes.append(_Node(f"({idx})", []))
                self.nodes[idx].alts = self.alternates(depth + 1)
                if self.i >= n or s[self.i] != ")":
                    raise self.fail("expected )")
                self.i += 1
                item = _Item(idx, 1)
            elif c.isascii() and (c.isalnum() or c in "-_"):
                start = self.i
                name = self.name()
                # A name followed by ::= starts the next rule (only at the top level).
                j = self.i
                while j < n and s[j] in " \t":
                    j += 1
                if not nested and s.startswith("::=", j):
                    self.i = start
                    break
                item = _Item(self.node(name), 1)
            else:
                break  # "|", ")", a newline at the top level, or an error llama.cpp reports
            self.space(nested)
            self.repetitions(item)
            self.space(nested)
            self.elements += item.size * max(item.lo, 1) + (
                (item.hi - item.lo) * (item.size + 2) if item.hi is not None else item.size + 2
            )
            if self.elements > self.limits.max_elements:
                raise GrammarError(
                    f"the grammar expands to more than {self.limits.max_elements} elements "
                    "(innkeeper's limit; large {m,n} repetitions count m..n times)"
                )
            seq.append(item)
        return seq

    def literal(self) -> int:
        s, n = self.s, len(self.s)
        self.i += 1
        count = 0
        while self.i < n and s[self.i] != '"':
            self.i += 2 if s[self.i] == "\\" else 1
            count += 1
        if self.i >= n:
            raise self.fail("unterminated string")
        self.i += 1
        return count

    def char_class(self) -> None:
        s, n = self.s, len(self.s)
        self.i += 1
        while self.i < n and s[self.i] != "]":
            self.i += 2 if s[self.i] == "\\" else 1
        if self.i >= n:
            raise self.fail("unterminated character class")
        self.i += 1

    def repetitions(self, item: _Item) -> None:
        """Apply `*`, `+`, `?` and `{m,n}`; a second operator wraps the item in a group."""
        s = self.s
        while self.i < len(s) and s[self.i] in "*+?{":
            c = s[self.i]
            if item.lo != 1 or item.hi != 1:
                idx = len(self.nodes)
                self.nodes.append(
                    _Node(f"({idx})", [[_Item(item.base, item.size, item.lo, item.hi)]])
                )
                item.base, item.size, item.lo, item.hi = idx, 1, 1, 1
            self.i += 1
            if c == "*":
                item.lo, item.hi = 0, None
            elif c == "+":
                item.lo, item.hi = 1, None
            elif c == "?":
                item.lo, item.hi = 0, 1
            else:
                item.lo, item.hi = self.braces()
            self.space(True)

    def braces(self) -> tuple[int, int | None]:
        def number() -> int:
            self.space(True)
            j = self.i
            while self.i < len(self.s) and self.s[self.i].isdigit() and self.i - j < 9:
                self.i += 1
            if j == self.i:
                raise self.fail("expected a number in {m,n}")
            return int(self.s[j : self.i])

        lo = number()
        hi: int | None = lo
        self.space(True)
        if self.s.startswith(",", self.i):
            self.i += 1
            self.space(True)
            hi = None if self.s.startswith("}", self.i) else number()
            self.space(True)
        if not self.s.startswith("}", self.i):
            raise self.fail("expected }")
        self.i += 1
        if max(lo, hi or 0) > self.limits.max_repeat:
            raise GrammarError(
                f"a repetition {{{lo},{'' if hi is None else hi}}} is over "
                f"{self.limits.max_repeat} (innkeeper's limit)"
            )
        return lo, hi


def _nullable(nodes: list[_Node]) -> list[bool]:
    """Which nodes can match the empty string (worklist, linear in the grammar size)."""
    null = [False] * len(nodes)
    # For each alternative: how many items are not (yet) known to be nullable.
    pending: list[list[int]] = []
    users: list[list[tuple[int, int]]] = [[] for _ in nodes]  # node -> (node, alt) using it
    work: list[int] = []
    for k, node in enumerate(nodes):
        counts = []
        for a, alt in enumerate(node.alts):
            needed = [item.base for item in alt if not _optional(item)]
            if any(base < 0 for base in needed):
                counts.append(-1)  # a required non-empty terminal: never empty
                continue
            for base in needed:
                users[base].append((k, a))
            counts.append(len(needed))
            if not needed and not null[k]:
                null[k] = True
                work.append(k)
        pending.append(counts)
    while work:
        done = work.pop()
        for k, a in users[done]:
            pending[k][a] -= 1
            if pending[k][a] == 0 and not null[k]:
                null[k] = True
                work.append(k)
    return null


def _analyse(nodes: list[_Node], limits: GrammarLimits, n_vocab: int) -> None:
    null = _nullable(nodes)
    for node in nodes:
        for alt in node.alts:
            for item in alt:
                repeated = item.hi is None or item.hi > 1
                if repeated and item.base >= 0 and null[item.base]:
                    raise GrammarError(
                        "the grammar repeats something that can match nothing (like "
                        '("a"?)* or ("a"?){0,9}): write the repetition without the inner '
                        "optional; llama.cpp's parse stacks explode on it"
                    )
    # Fan-out and depth over the leftmost graph: an edge from a node to every node that can
    # start one of its alternatives (through nullable items). Iterative DFS, post-order.
    lead: list[list[int]] = []
    own: list[int] = []  # terminals that can start the node directly
    for node in nodes:
        edges: list[int] = []
        terms = 0
        for alt in node.alts:
            for item in alt:
                if item.base < 0:
                    if item.size:
                        terms += 1
                else:
                    edges.append(item.base)
                if not (_optional(item) or (item.base >= 0 and null[item.base])):
                    break
        lead.append(edges)
        own.append(terms)
    max_fanout = limits.max_fanout(n_vocab)
    fanout = [0] * len(nodes)
    depth = [0] * len(nodes)
    state = [0] * len(nodes)  # 0 new, 1 on the DFS stack, 2 done
    for root in range(len(nodes)):
        if state[root]:
            continue
        stack = [(root, 0)]
        state[root] = 1
        while stack:
            k, e = stack[-1]
            if e < len(lead[k]):
                stack[-1] = (k, e + 1)
                nxt = lead[k][e]
                if state[nxt] == 1:
                    raise GrammarError(
                        f"the grammar is left-recursive (rule {_name(nodes, nxt)!r} can start "
                        "with itself), which llama.cpp cannot run"
                    )
                if state[nxt] == 0:
                    state[nxt] = 1
                    stack.append((nxt, 0))
                continue
            stack.pop()
            state[k] = 2
            fanout[k] = own[k] + sum(fanout[x] for x in lead[k])
            depth[k] = 1 + max((depth[x] for x in lead[k]), default=0)
            if fanout[k] > max_fanout:
                raise GrammarError(
                    f"rule {_name(nodes, k)!r} can start with {fanout[k]} alternatives; "
                    f"innkeeper allows {max_fanout} for this model (each one is checked "
                    "against the whole vocabulary for every generated token)"
                )
            if depth[k] > limits.max_depth:
                raise GrammarError(
                    f"rule {_name(nodes, k)!r} starts a chain of more than {limits.max_depth} "
                    "rule references (innkeeper's limit)"
                )


def _optional(item: _Item) -> bool:
    """Matches nothing by its own form: `x?`, `x*`, `x{0,n}`, or the empty string."""
    return item.lo == 0 or (item.base < 0 and item.size == 0)


def _name(nodes: list[_Node], k: int) -> str:
    name = nodes[k].name
    return name if not name.startswith("(") else "a ( … ) group"


def check_limits(grammar: str, n_vocab: int, limits: GrammarLimits = LIMITS) -> None:
    """Raise GrammarError when a grammar is over a limit; linear in its size."""
    size = len(grammar.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise GrammarError(
            f"the grammar is {size} bytes; innkeeper accepts at most {limits.max_bytes}"
        )
    _checked(grammar, n_vocab, limits)


@lru_cache(maxsize=64)
def _checked(grammar: str, n_vocab: int, limits: GrammarLimits) -> None:
    """Cached: the engine checks again when it builds the sampler (and on every backtrack)."""
    parser = _Parser(grammar, limits)
    nodes = parser.parse()
    if "root" not in parser.defined:
        raise GrammarError("the GBNF grammar has no root rule")
    _analyse(nodes, limits, n_vocab)
