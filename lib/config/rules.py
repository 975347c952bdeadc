"""What values a config key accepts: small rule objects that ``defaults.py`` declares beside its keys.

A rule says whether a value passes (``ok``) and what is allowed (``allowed``, for the error line). Bounds,
lengths and divisors may name another key (``integer(lo="TRAIN.BEGIN_EPOCH")``): they are read from the
merged config, so constraints between keys are declared like any other; ``given`` makes a key's rule depend on
another key's value (``LOSS.FPC`` only with ``DEQ.GRAD phantom``). ``check_values`` runs every rule
after the YAML and the overrides are merged and raises a one-line ``ConfigError`` naming the key, the value,
what is allowed and where the value came from.

Rules whose choices live in a registry (``registered("deqlab.solvers", "SOLVERS")``) import it only when a
config is checked, so importing ``deqlab.config`` stays cheap.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable, Iterable, Mapping

from deqlab.errors import ConfigError

Bound = int | float | str | None  # a number, or the name of the key holding it
DEFAULT_SOURCE = "defaults"


def lookup(cfg: Any, key: str) -> Any:
    """The value of the dotted ``key`` in ``cfg``."""
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _value(bound: Bound, cfg: Any) -> Any:
    return lookup(cfg, bound) if isinstance(bound, str) else bound


def _show(bound: Bound, cfg: Any) -> str:
    return f"{bound} ({lookup(cfg, bound)})" if isinstance(bound, str) else str(bound)


def _is_number(value: Any, kind: tuple[type, ...]) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


class Rule:
    """Base class: ``ok(value, cfg)``, ``allowed(cfg)``, the keys the rule reads (``refs``), a ``hint``."""

    unused = False  # set by ``unused``: the key is accepted so original YAMLs load, and nothing reads it
    refs: tuple[str, ...] = ()

    def ok(self, value: Any, cfg: Any) -> bool:
        raise NotImplementedError

    def allowed(self, cfg: Any) -> str:
        raise NotImplementedError

    def hint(self, value: Any, cfg: Any) -> str:
        return ""


class Anything(Rule):
    def ok(self, value: Any, cfg: Any) -> bool:
        return True

    def allowed(self, cfg: Any) -> str:
        return "any value of the default's type"


class Choice(Rule):
    def __init__(self, options: Callable[[], Iterable[Any]], case_sensitive: bool) -> None:
        self.options, self.case_sensitive = options, case_sensitive

    def _fold(self, value: Any) -> Any:
        return value if self.case_sensitive or not isinstance(value, str) else value.lower()

    def ok(self, value: Any, cfg: Any) -> bool:
        return self._fold(value) in {self._fold(o) for o in self.options()}

    def allowed(self, cfg: Any) -> str:
        options = [str(o) for o in self.options()]
        return f"one of {', '.join(options)}" if len(options) > 1 else options[0]

    def hint(self, value: Any, cfg: Any) -> str:
        close = difflib.get_close_matches(str(value), [str(o) for o in self.options()], n=1)
        return f"; did you mean {close[0]}?" if close else ""


class Number(Rule):
    def __init__(self, kind: tuple[type, ...], noun: str, lo: Bound, hi: Bound, lo_open: bool, hi_open: bool,
                 multiple_of: Bound) -> None:
        self.kind, self.noun = kind, noun
        self.lo, self.hi, self.lo_open, self.hi_open, self.multiple_of = lo, hi, lo_open, hi_open, multiple_of
        self.refs = tuple(b for b in (lo, hi, multiple_of) if isinstance(b, str))

    def ok(self, value: Any, cfg: Any) -> bool:
        if not _is_number(value, self.kind):
            return False
        lo, hi, step = (_value(b, cfg) for b in (self.lo, self.hi, self.multiple_of))
        return ((lo is None or (value > lo if self.lo_open else value >= lo))
                and (hi is None or (value < hi if self.hi_open else value <= hi))
                and (step is None or (step != 0 and value % step == 0)))

    def allowed(self, cfg: Any) -> str:
        lo, hi = self.lo, self.hi
        if lo is not None and hi is not None:
            text = (f"{self.noun} in {'(' if self.lo_open else '['}{_show(lo, cfg)}, {_show(hi, cfg)}"
                    f"{')' if self.hi_open else ']'}")
        elif lo is not None:
            text = f"{self.noun} {'>' if self.lo_open else '>='} {_show(lo, cfg)}"
        elif hi is not None:
            text = f"{self.noun} {'<' if self.hi_open else '<='} {_show(hi, cfg)}"
        else:
            text = self.noun
        return text if self.multiple_of is None else f"{text} and a multiple of {_show(self.multiple_of, cfg)}"


class ListOf(Rule):
    def __init__(self, item: Rule, length: Bound, min_length: Bound) -> None:
        self.item, self.length, self.min_length = item, length, min_length
        self.refs = item.refs + tuple(b for b in (length, min_length) if isinstance(b, str))

    def ok(self, value: Any, cfg: Any) -> bool:
        if not isinstance(value, (list, tuple)):
            return False
        n, at_least = _value(self.length, cfg), _value(self.min_length, cfg)
        return ((n is None or len(value) == n) and (at_least is None or len(value) >= at_least)
                and all(self.item.ok(v, cfg) for v in value))

    def allowed(self, cfg: Any) -> str:
        if self.length is not None:
            size = f"{_show(self.length, cfg)} "
        elif self.min_length is not None:
            size = f"at least {_show(self.min_length, cfg)} "
        else:
            size = ""
        return f"a list of {size}items, each {self.item.allowed(cfg)}"


class EmptyOr(Rule):
    def __init__(self, rule: Rule, meaning: str) -> None:
        self.rule, self.meaning, self.refs = rule, meaning, rule.refs

    def ok(self, value: Any, cfg: Any) -> bool:
        return (isinstance(value, (list, tuple)) and len(value) == 0) or self.rule.ok(value, cfg)

    def allowed(self, cfg: Any) -> str:
        return f"[] ({self.meaning}) or {self.rule.allowed(cfg)}"


class Unused(Rule):
    unused = True

    def __init__(self, rule: Rule) -> None:
        self.rule, self.refs = rule, rule.refs

    def ok(self, value: Any, cfg: Any) -> bool:
        return self.rule.ok(value, cfg)

    def allowed(self, cfg: Any) -> str:
        return f"{self.rule.allowed(cfg)} (the key is kept so original YAMLs load; nothing reads it)"


class Given(Rule):
    """``rule`` while key ``ref``'s value passes ``condition``, else ``otherwise`` (see :func:`given`)."""

    def __init__(self, ref: str, condition: Rule, rule: Rule, otherwise: Rule) -> None:
        self.ref, self.condition, self.rule, self.otherwise = ref, condition, rule, otherwise
        self.refs = (ref, *condition.refs, *rule.refs, *otherwise.refs)

    def _holds(self, cfg: Any) -> bool:
        return self.condition.ok(lookup(cfg, self.ref), cfg)

    def ok(self, value: Any, cfg: Any) -> bool:
        return (self.rule if self._holds(cfg) else self.otherwise).ok(value, cfg)

    def allowed(self, cfg: Any) -> str:
        if self._holds(cfg):
            return self.rule.allowed(cfg)
        return (f"{self.otherwise.allowed(cfg)} when {self.ref} is {lookup(cfg, self.ref)!r} "
                f"(not {self.condition.allowed(cfg)})")

    def hint(self, value: Any, cfg: Any) -> str:
        return (self.rule if self._holds(cfg) else self.otherwise).hint(value, cfg)


# ---- the constructors defaults.py uses ---------------------------------------------------------------------
ANY = Anything()


def choice(*options: Any, case_sensitive: bool = True) -> Rule:
    """One of ``options`` (compared lowercased where the code lowercases the value)."""
    return Choice(lambda: options, case_sensitive)


def registered(module: str, attr: str, case_sensitive: bool = True) -> Rule:
    """A name in the registry (dict or tuple) ``module.attr``, imported only when a config is checked."""
    return Choice(lambda: sorted(getattr(importlib.import_module(module), attr)), case_sensitive)


def integer(lo: Bound = None, hi: Bound = None, multiple_of: Bound = None) -> Rule:
    """An int in [lo, hi] (either bound may be omitted or name a key), optionally a multiple of something."""
    return Number((int,), "an int", lo, hi, False, False, multiple_of)


def number(lo: Bound = None, hi: Bound = None, lo_open: bool = False, hi_open: bool = False) -> Rule:
    """A real number in the interval from lo to hi, each end closed unless ``*_open``."""
    return Number((int, float), "a number", lo, hi, lo_open, hi_open, None)


def list_of(item: Rule, length: Bound = None, min_length: Bound = None) -> Rule:
    """A list whose items all pass ``item``, of exactly ``length`` / at least ``min_length`` items."""
    return ListOf(item, length, min_length)


def empty_or(rule: Rule, meaning: str) -> Rule:
    """An empty list, meaning ``meaning``, or a value ``rule`` accepts."""
    return EmptyOr(rule, meaning)


def unused(rule: Rule = ANY) -> Rule:
    """Mark a key nothing reads (kept so the original YAMLs load); values are still checked by ``rule``."""
    return Unused(rule)


def given(ref: str, condition: Rule, rule: Rule, otherwise: Rule) -> Rule:
    """A rule between keys: ``rule`` while key ``ref`` passes ``condition``, else ``otherwise`` (its error names
    ``ref`` and its value), e.g. ``given("DEQ.GRAD", choice("phantom"), ANY, otherwise=choice(False))``."""
    return Given(ref, condition, rule, otherwise)


def check_values(cfg: Any, rules: Mapping[str, Rule], sources: Mapping[str, str]) -> None:
    """Raise a ConfigError for the first key whose value breaks its rule, in declaration order.

    The error names where the offending values came from: the file or command line that set the key or any
    key its rule reads (``sources``), else the defaults.
    """
    for key, rule in rules.items():
        value = lookup(cfg, key)
        if rule.ok(value, cfg):
            continue
        origins = dict.fromkeys(sources.get(k, DEFAULT_SOURCE) for k in (key, *rule.refs))
        where = ", ".join(o for o in origins if o != DEFAULT_SOURCE) or DEFAULT_SOURCE
        raise ConfigError(f"{where}: {key} must be {rule.allowed(cfg)}, got {value!r}{rule.hint(value, cfg)}")
