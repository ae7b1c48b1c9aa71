"""SQL model files: discovery, header/sidecar config, referenced tables, dependency order.

References come from a real SQL parse (sqlglot, SQLite dialect) resolved scope by scope, so
CTE shadowing, subqueries and SQLite's `x IN table` are read the way SQLite reads them; the
small tokenizer only splits off header comments and checks that a file is one SELECT.
"""

from __future__ import annotations

import graphlib
import heapq
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ModelGraphError, PipelineError

if TYPE_CHECKING:
    from sqlglot import exp

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


def referenced_tables(sql: str, *, label: str = "sql") -> list[str]:
    """Tables and views of the `main` schema a SELECT reads, lowercased and sorted.

    Parsed with sqlglot (SQLite dialect) and resolved scope by scope: a CTE name hides a table
    only inside the scope that defines it, a schema-qualified name (`main.orders`) is always the
    table even where a CTE of that name is visible, and SQLite's `x IN name` reads `name`.
    Other schemas (`temp`, attached databases) and table-valued functions are not tables.
    """
    # imported here: sqlglot takes a tenth of a second to import, and only model discovery
    # needs it, not every process that loads the pipeline definitions
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError
    from sqlglot.optimizer.scope import traverse_scope

    try:
        tree = sqlglot.parse_one(sql, read="sqlite")
        scopes = traverse_scope(tree)
    except (SqlglotError, RecursionError) as exc:
        raise PipelineError(f"{label}: cannot parse the SQL to find what it reads: {exc}") from exc
    refs: set[str] = set()
    for scope in scopes:
        ctes = {name.lower() for name in scope.cte_sources} | _enclosing_ctes(scope.expression)
        for table in scope.tables:
            if not isinstance(table.this, exp.Identifier) or isinstance(table.parent, exp.Table):
                continue  # a table-valued function, or the index of INDEXED BY
            name = _main_name(table.name, table.db, table.catalog, ctes)
            if name is not None:
                refs.add(name)
        for node in scope.find_all(exp.In):
            field = node.args.get("field")
            if isinstance(field, exp.Column):  # `x IN name`: a table, not a column
                name = _main_name(field.name, field.table, field.db, ctes)
                if name is not None:
                    refs.add(name)
    return sorted(refs)


def _enclosing_ctes(node: exp.Expression) -> set[str]:
    """Names of every CTE in each WITH clause whose CTE body contains `node`.

    SQLite makes all CTEs of a WITH visible in each of its bodies (a CTE may read one defined
    after it, and reading its own name is recursion), where sqlglot sees only earlier ones.
    """
    from sqlglot import exp

    names: set[str] = set()
    while node is not None:
        if isinstance(node, exp.CTE) and isinstance(node.parent, exp.With):
            names.update(cte.alias_or_name.lower() for cte in node.parent.expressions)
        node = node.parent
    return names


def _main_name(name: str, schema: str, catalog: str, ctes: set[str]) -> str | None:
    """The lowercased table name when a reference denotes a table of `main`, else None."""
    if catalog or (schema and schema.lower() != "main"):
        return None
    if not schema and name.lower() in ctes:
        return None  # a CTE visible in this scope; CTEs cannot be schema-qualified
    return name.lower()


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
            try:
                loaded = yaml.safe_load(side.read_text(encoding="utf-8")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise PipelineError(f"model sidecar {side}: {exc}", path=str(side)) from exc
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
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PipelineError(f"model {path}: cannot read it: {exc}", path=str(path)) from exc
        try:
            meta = _meta(path, text)
            body = single_select(text, f"model {path}")
            references = tuple(referenced_tables(body, label=f"model {path}"))
        except PipelineError as exc:
            raise exc.locate(table=name, path=str(path)) from None
        found[name.lower()] = SqlModel(
            name=name,
            path=str(path),
            sql=body,
            materialized=meta.materialized or default,
            description=meta.description or "",
            references=references,
        )
    deps = {
        m.name: sorted({found[r].name for r in m.references if r in found}) for m in found.values()
    }
    by_name = {m.name: m for m in found.values()}
    return [replace(by_name[n], depends_on=tuple(deps[n])) for n in toposort(deps)]


def toposort(deps: dict[str, list[str]]) -> list[str]:
    """Dependency order (graphlib), ties broken by name; a cycle raises naming the models on it."""
    sorter = graphlib.TopologicalSorter(deps)
    try:
        sorter.prepare()
    except graphlib.CycleError as exc:
        # graphlib lists each node before the node that depends on it: reverse it to read as
        # "a -> b" (a reads b), and start at the smallest name so the message is stable.
        cycle = list(reversed(exc.args[1]))[:-1]
        first = cycle.index(min(cycle))
        cycle = cycle[first:] + cycle[:first]
        raise ModelGraphError(
            f"models form a dependency cycle: {' -> '.join([*cycle, cycle[0]])}", table=cycle[0]
        ) from None
    ready: list[str] = []
    order: list[str] = []
    while sorter.is_active():
        for node in sorter.get_ready():
            heapq.heappush(ready, node)
        node = heapq.heappop(ready)
        order.append(node)
        sorter.done(node)
    return order
