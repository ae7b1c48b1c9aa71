"""SQL model files: discovery, header/sidecar config, referenced tables, dependency order.

References are found with a small tokenizer rather than regexes over raw text, so names in
strings, comments, CTEs and table-valued functions are not mistaken for tables.
"""

from __future__ import annotations

import heapq
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ModelGraphError, PipelineError

Materialization = Literal["table", "view"]

_TOKEN = re.compile(
    r"""(?P<ws>\s+)
    |(?P<comment>--[^\n]*|/\*.*?(?:\*/|\Z))
    |(?P<string>'(?:[^']|'')*'|[xX]'[0-9a-fA-F]*')
    |(?P<qident>"(?:[^"]|"")*"|`(?:[^`]|``)*`|\[[^\]]*\])
    |(?P<ident>[A-Za-z_][A-Za-z0-9_$]*)
    |(?P<other>.)""",
    re.S | re.X,
)
_HEADER = re.compile(r"^--\s*(materialized|description)\s*:\s*(.*?)\s*$", re.I)
_CLAUSE_END = {
    "where", "group", "having", "order", "limit", "window", "union", "except",
    "intersect", "returning", "on", "using",
}  # fmt: skip
_NOT_NAMES = _CLAUSE_END | {
    "select", "from", "join", "inner", "left", "right", "full", "cross", "natural", "outer",
    "as", "with", "values", "lateral",
}  # fmt: skip


@dataclass(frozen=True)
class Token:
    kind: str  # 'name' (identifier), 'kw' (bare word, lowercased), 'op', 'string'
    text: str
    start: int

    def is_kw(self, *words: str) -> bool:
        return self.kind == "kw" and self.text in words


def tokenize(sql: str) -> list[Token]:
    """Significant tokens; bare words are kind 'kw' (text lowercased), quoted names 'name'."""
    tokens: list[Token] = []
    for m in _TOKEN.finditer(sql):
        kind, text = m.lastgroup, m.group()
        if kind in ("ws", "comment"):
            continue
        if kind == "qident":
            inner = text[1:-1]
            text = inner.replace('""', '"') if text[0] == '"' else inner.replace("``", "`")
            tokens.append(Token("name", text, m.start()))
        elif kind == "ident":
            tokens.append(Token("kw", text.lower(), m.start()))
        else:
            tokens.append(Token("op" if kind == "other" else "string", text, m.start()))
    return tokens


def _is_name(tok: Token) -> bool:
    return tok.kind == "name" or (tok.kind == "kw" and tok.text not in _NOT_NAMES)


def _skip_parens(tokens: list[Token], i: int) -> int:
    """Index just past the parenthesis group that opens at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j].text == "(":
            depth += 1
        elif tokens[j].text == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(tokens)


def _cte_names(tokens: list[Token]) -> set[str]:
    """Names defined as `name [(cols)] AS [NOT] [MATERIALIZED] (` - CTEs (and window names)."""
    names: set[str] = set()
    for i, tok in enumerate(tokens):
        if not _is_name(tok):
            continue
        j = i + 1
        if j < len(tokens) and tokens[j].text == "(":
            j = _skip_parens(tokens, j)
        if j < len(tokens) and tokens[j].is_kw("as"):
            j += 1
            while j < len(tokens) and tokens[j].is_kw("not", "materialized"):
                j += 1
            if j < len(tokens) and tokens[j].text == "(":
                names.add(tok.text.lower())
    return names


def _from_clause(tokens: list[Token], i: int, out: list[str]) -> None:
    """Collect table names in table position of the FROM clause starting at tokens[i]."""
    expect_table, depth = True, 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.text == "(":
            if depth == 0 and expect_table:
                nxt = tokens[i + 1] if i + 1 < len(tokens) else tok
                if not nxt.is_kw("select", "with", "values"):  # a parenthesized join
                    _from_clause(tokens, i + 1, out)
                i, expect_table = _skip_parens(tokens, i), False
                continue
            depth += 1
        elif tok.text == ")":
            if depth == 0:
                return
            depth -= 1
        elif tok.text == ";" or (depth == 0 and tok.is_kw(*_CLAUSE_END)):
            if tok.is_kw("on", "using"):
                expect_table = False
                i += 1
                continue
            return
        elif depth == 0 and (tok.text == "," or tok.is_kw("join")):
            expect_table = True
        elif depth == 0 and expect_table and _is_name(tok):
            schema, name = None, tok.text
            if i + 2 < len(tokens) and tokens[i + 1].text == "." and _is_name(tokens[i + 2]):
                schema, name, i = name.lower(), tokens[i + 2].text, i + 2
            is_function = i + 1 < len(tokens) and tokens[i + 1].text == "("
            if not is_function and schema in (None, "main"):
                out.append(name)
            expect_table = False
        i += 1


def referenced_tables(sql: str) -> list[str]:
    """Tables and views a SELECT reads, lowercased, in first-seen order, CTE names excluded."""
    tokens = tokenize(sql)
    ctes = _cte_names(tokens)
    found: list[str] = []
    for i, tok in enumerate(tokens):
        after_distinct = i > 0 and tokens[i - 1].is_kw("distinct")  # IS DISTINCT FROM x
        # JOIN starts a scan too, to reach joins inside a parenthesized join group
        if (tok.is_kw("from") and not after_distinct) or tok.is_kw("join"):
            _from_clause(tokens, i + 1, found)
    seen: dict[str, None] = {}
    for name in found:
        if name.lower() not in ctes:
            seen.setdefault(name.lower(), None)
    return list(seen)


class _ModelMeta(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    materialized: Materialization | None = None
    description: str | None = None


@dataclass(frozen=True)
class SqlModel:
    """One `<name>.sql` file: a single SELECT materialized as a table or view named `name`."""

    name: str
    path: str
    sql: str
    materialized: Materialization
    description: str
    references: tuple[str, ...]
    depends_on: tuple[str, ...] = field(default=())


def single_select(text: str, label: str) -> str:
    """The statement without leading comments or the trailing ';'; rejects anything but one SELECT."""
    tokens = tokenize(text)
    if tokens and tokens[-1].text == ";":
        end = tokens[-1].start
        tokens = tokens[:-1]
    else:
        end = len(text)
    if not tokens or not tokens[0].is_kw("select", "with", "values"):
        raise PipelineError(f"{label}: must be one SELECT statement (found no SELECT)")
    if any(t.text == ";" for t in tokens):
        raise PipelineError(f"{label}: must be one SELECT statement (found several)")
    return text[tokens[0].start : end].strip()


def _meta(path: Path, text: str) -> _ModelMeta:
    """Header lines `-- materialized: view` / `-- description: …`, then a `<name>.yml` sidecar."""
    header: dict[str, str] = {}
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("--"):
            break
        m = _HEADER.match(stripped)
        if m:
            header[m.group(1).lower()] = m.group(2)
    sidecar: dict[str, object] = {}
    for suffix in (".yml", ".yaml"):
        side = path.with_suffix(suffix)
        if side.is_file():
            loaded = yaml.safe_load(side.read_text(encoding="utf-8")) or {}
            if not isinstance(loaded, dict):
                raise PipelineError(f"model sidecar {side}: must be a mapping")
            sidecar = loaded
    clash = [k for k in header if k in sidecar and str(sidecar[k]) != header[k]]
    if clash:
        raise PipelineError(f"model {path}: header and sidecar disagree on {clash}")
    try:
        return _ModelMeta.model_validate({**header, **sidecar})
    except ValidationError as exc:
        raise PipelineError(f"model {path}: invalid config: {exc}") from exc


def discover(models_dir: str, default: Materialization) -> list[SqlModel]:
    """All models under a directory in dependency order; raises on duplicates and cycles."""
    found: dict[str, SqlModel] = {}
    for path in sorted(Path(models_dir).rglob("*.sql")):
        name = path.stem
        if name.lower() in found:
            other = found[name.lower()].path
            raise ModelGraphError(f"two models are named {name!r}: {other} and {path}")
        text = path.read_text(encoding="utf-8")
        meta = _meta(path, text)
        body = single_select(text, f"model {path}")
        found[name.lower()] = SqlModel(
            name=name,
            path=str(path),
            sql=body,
            materialized=meta.materialized or default,
            description=meta.description or "",
            references=tuple(referenced_tables(body)),
        )
    deps = {
        m.name: sorted({found[r].name for r in m.references if r in found}) for m in found.values()
    }
    by_name = {m.name: m for m in found.values()}
    return [replace(by_name[n], depends_on=tuple(deps[n])) for n in toposort(deps)]


def toposort(deps: dict[str, list[str]]) -> list[str]:
    """Dependency order, ties broken by name; a cycle raises naming the models on it."""
    remaining = {node: set(d) for node, d in deps.items()}
    users: dict[str, list[str]] = {node: [] for node in deps}
    for node, needs in deps.items():
        for need in needs:
            users[need].append(node)
    ready = [node for node, needs in remaining.items() if not needs]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        node = heapq.heappop(ready)
        order.append(node)
        for user in users[node]:
            remaining[user].discard(node)
            if not remaining[user]:
                heapq.heappush(ready, user)
    if len(order) < len(deps):
        raise ModelGraphError(f"models form a dependency cycle: {' -> '.join(_cycle(remaining))}")
    return order


def _cycle(remaining: dict[str, set[str]]) -> list[str]:
    """One cycle among the nodes a topological sort could not place, closed (a -> b -> a)."""
    stuck = {n: needs for n, needs in remaining.items() if needs}
    node = min(stuck)
    path: list[str] = []
    while node not in path:
        path.append(node)
        node = min(n for n in stuck[node] if n in stuck)
    return [*path[path.index(node) :], node]
