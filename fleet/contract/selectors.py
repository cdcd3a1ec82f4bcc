"""Label selectors: which devices a rollout targets.

    site=berlin,hw=rpi4     both labels equal
    site!=berlin            the label differs or is missing
    gpu                     the label is present
    !gpu                    the label is missing
    (empty)                 every device

Terms are joined with commas and all must hold (as in Kubernetes' equality-based selectors).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from fleet.contract.errors import FleetError

_KEY = r"[A-Za-z0-9_.\-/]{1,64}"
_VALUE = r"[A-Za-z0-9_.\-/:@]{0,128}"
_TERM = re.compile(rf"^\s*(?:(?P<neg>!)\s*(?P<nkey>{_KEY})|(?P<key>{_KEY})\s*"
                   rf"(?:(?P<op>==|=|!=)\s*(?P<value>{_VALUE}))?)\s*$")


# Labels a selector can name: what devices may report and operators may set.
LABEL_KEY = re.compile(_KEY)
LABEL_VALUE = re.compile(_VALUE)
MAX_LABELS = 32


class SelectorError(FleetError):
    """A selector that does not parse; the message says which term."""


def label_problems(labels: Mapping[str, str | None]) -> list[str]:
    """What is wrong with a set of labels (values of None, a removal, are allowed); empty if
    nothing."""
    out = [f"label key {k!r}: 1-64 of A-Z a-z 0-9 _ . - /" for k in labels
           if not LABEL_KEY.fullmatch(k)]
    out += [f"label {k}={v!r}: up to 128 of A-Z a-z 0-9 _ . - / : @" for k, v in labels.items()
            if v is not None and not LABEL_VALUE.fullmatch(v)]
    if len(labels) > MAX_LABELS:
        out.append(f"{len(labels)} labels: at most {MAX_LABELS}")
    return out


@dataclass(frozen=True, slots=True)
class Term:
    key: str
    op: str  # "=", "!=", "exists", "missing"
    value: str = ""

    def matches(self, labels: dict[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "missing":
            return self.key not in labels
        if self.op == "=":
            return labels.get(self.key) == self.value
        return labels.get(self.key) != self.value


@dataclass(frozen=True, slots=True)
class Selector:
    text: str
    terms: tuple[Term, ...]

    def matches(self, labels: dict[str, str]) -> bool:
        return all(t.matches(labels) for t in self.terms)


def parse_selector(text: str) -> Selector:
    terms = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        m = _TERM.fullmatch(raw)
        if m is None:
            raise SelectorError(f"selector term {raw.strip()!r} is not key=value, key!=value, "
                                "key or !key")
        if m.group("neg"):
            terms.append(Term(m.group("nkey"), "missing"))
        elif m.group("op") is None:
            terms.append(Term(m.group("key"), "exists"))
        else:
            op = "=" if m.group("op") in ("=", "==") else "!="
            terms.append(Term(m.group("key"), op, m.group("value")))
    return Selector(text.strip(), tuple(terms))


def parse_labels(text: str) -> dict[str, str | None]:
    """`k=v,k2=v2,k3-` as given to `fleet devices label`: set k and k2, remove k3."""
    out: dict[str, str | None] = {}
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        if raw.endswith("-") and re.fullmatch(_KEY, raw[:-1]):
            out[raw[:-1]] = None
            continue
        m = re.fullmatch(rf"({_KEY})=({_VALUE})", raw)
        if m is None:
            raise SelectorError(f"label {raw!r} is not key=value (or key- to remove it)")
        out[m.group(1)] = m.group(2)
    return out
