"""Interaction loaders: MovieLens-100K (GroupLens or RecBole atomic files), Amazon Reviews 2023 JSONL, CSV.

Every loader returns :class:`~speeder_rt.data.interactions.Interactions` with rows in file order and dense
ids in order of first appearance. Every rating or review counts as one implicit interaction. Malformed input
raises :class:`DataFormatError` naming the file, the 1-based line and the field. Loaders only read.

Every non-blank line is exactly one record, so a loader reads every record the file holds or raises: a CSV
field may be quoted (``"Heat, 1995"``) but a quote must close on its line, and CSV parsing is strict (a
stray quote is an error, not a field that swallows the following rows). The machine-written formats
(GroupLens ``u.data`` / ``u.item``, RecBole atomic files) must end with a line break: a last line without
one is reported as cut short (an interrupted download), because a value such as a timestamp can be cut
and still parse. CSV and JSONL need no final line break (JSON cannot be cut and still parse; a CSV cut
inside its last unquoted field cannot be told from a complete one).
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from speeder_rt.data.interactions import Interactions

_INT64_MAX = 2**63 - 1
_UDATA_FIELDS = ("user", "item", "rating", "timestamp")


class DataFormatError(ValueError):
    """Malformed input data: the message reads ``<file>, line <n>, field '<name>': <problem>``."""

    def __init__(
        self, file: str | os.PathLike, problem: str, line: int | None = None, field: str | None = None
    ) -> None:
        self.file, self.problem, self.line, self.field = str(file), problem, line, field
        where = self.file + (f", line {line}" if line is not None else "") + (f", field {field!r}" if field else "")
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.file, self.problem, self.line, self.field)


def load_movielens(path: str | os.PathLike) -> Interactions:
    """MovieLens from directory ``path``: GroupLens form (``u.data``, optional ``u.item``) or RecBole atomic form
    (one ``*.inter`` file such as ``ml-100k.inter``, optional ``.item`` of the same stem), detected by content."""
    root = Path(path)
    if not root.is_dir():
        raise DataFormatError(root, "directory not found")
    if (root / "u.data").is_file():
        return _load_grouplens(root)
    inter = sorted(root.glob("*.inter"))
    if len(inter) == 1:
        return _load_recbole(inter[0])
    found = f"; found {', '.join(p.name for p in inter)}" if inter else ""
    raise DataFormatError(root, f"no MovieLens data: expected GroupLens 'u.data' or one RecBole '*.inter' file{found}")


def load_amazon_reviews(reviews_path: str | os.PathLike, meta_path: str | os.PathLike | None = None) -> Interactions:
    """Amazon Reviews 2023 JSONL (``.gz`` allowed): reviews give ``user_id``, ``parent_asin``, ``timestamp`` (ms).

    Items are keyed by ``parent_asin``. The optional meta file supplies ``title`` and ``description`` (a list of
    strings, joined with spaces) for the reviewed items; meta lines of other items are skipped.
    """
    users: list[str] = []
    items: list[str] = []
    timestamps: list[int] = []
    for lineno, obj in _json_lines(Path(reviews_path)):
        users.append(_key(_get(obj, "user_id", reviews_path, lineno), reviews_path, lineno, "user_id"))
        items.append(_key(_get(obj, "parent_asin", reviews_path, lineno), reviews_path, lineno, "parent_asin"))
        timestamps.append(_timestamp(_get(obj, "timestamp", reviews_path, lineno), reviews_path, lineno, "timestamp"))
    titles: dict[str, str] = {}
    descriptions: dict[str, str] = {}
    source = str(reviews_path)
    if meta_path is not None:
        source += f" + {meta_path}"
        reviewed = set(items)
        for lineno, obj in _json_lines(Path(meta_path)):
            asin = _key(_get(obj, "parent_asin", meta_path, lineno), meta_path, lineno, "parent_asin")
            if asin in reviewed and asin not in titles:
                titles[asin] = _text(_get(obj, "title", meta_path, lineno), meta_path, lineno, "title")
                descriptions[asin] = _text(obj.get("description"), meta_path, lineno, "description")
    return Interactions.from_keys(users, items, timestamps, titles, descriptions, source=source)


def load_csv(path: str | os.PathLike) -> Interactions:
    """CSV (UTF-8) whose header names ``user``, ``item``, ``timestamp`` and optionally ``title``, in any order;
    other columns are ignored. An item's title is its first non-empty one."""
    path = _existing_file(path)
    users: list[str] = []
    items: list[str] = []
    timestamps: list[int] = []
    titles: dict[str, str] = {}
    lines = _lines(path, "utf-8-sig")
    header_line, header, _ = next(lines)  # an empty file raised already
    names = [h.strip() for h in _csv_fields(header, path, header_line, [])]
    col = _columns(names, ("user", "item", "timestamp"), path)
    title_col = names.index("title") if "title" in names else None
    for line, text, _ in lines:
        row = _csv_fields(text, path, line, names)
        _check_width(row, names, path, line, "comma-separated")
        user = _key(row[col["user"]], path, line, "user")
        item = _key(row[col["item"]], path, line, "item")
        timestamps.append(_timestamp(row[col["timestamp"]], path, line, "timestamp"))
        users.append(user)
        items.append(item)
        if title_col is not None and row[title_col] and not titles.get(item):
            titles[item] = row[title_col]
    if not users:
        raise DataFormatError(path, "no data rows after the header", line=header_line + 1)
    return Interactions.from_keys(users, items, timestamps, titles, source=str(path))


def _csv_fields(text: str, path: Path, line: int, names: list[str]) -> list[str]:
    """The fields of one CSV line, parsed strictly."""
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as e:
        index = _csv_problem_field(text)
        field = names[index] if index < len(names) else None
        if str(e) == "unexpected end of data":
            problem = "unclosed quote (a quoted field must end on its line)"
        elif "new-line character" in str(e):
            problem = "a carriage return inside the line (line endings must be \\n or \\r\\n)"
        else:
            problem = f"malformed CSV ({e})"
        raise DataFormatError(path, problem, line=line, field=field) from None


def _csv_problem_field(text: str) -> int:
    """Index of the field in which strict parsing of the CSV line ``text`` fails: the field whose quote never
    closes, the one with a character after its closing quote, or the one holding a carriage return."""
    field, quoted, at_start, i = 0, False, True, 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == '"' and text[i + 1 : i + 2] == '"':
                i += 1  # an escaped quote
            elif c == '"':
                quoted = False
                if text[i + 1 : i + 2] not in ("", ","):
                    return field
        elif c == "\r":
            return field
        elif c == '"' and at_start:
            quoted = True
        elif c == ",":
            field += 1
            at_start = True
            i += 1
            continue
        at_start = False
        i += 1
    return field


def _load_grouplens(root: Path) -> Interactions:
    data = root / "u.data"
    users: list[str] = []
    items: list[str] = []
    timestamps: list[int] = []
    for lineno, line, ended in _lines(data, "utf-8"):
        fields = line.split()
        _check_complete(ended, fields, _UDATA_FIELDS, data, lineno)
        _check_width(fields, _UDATA_FIELDS, data, lineno, "whitespace-separated")
        users.append(_key(fields[0], data, lineno, "user"))
        items.append(_key(fields[1], data, lineno, "item"))
        timestamps.append(_timestamp(fields[3], data, lineno, "timestamp"))
    titles: dict[str, str] = {}
    item_file = root / "u.item"
    if item_file.is_file():
        for lineno, line, ended in _lines(item_file, "latin-1"):
            fields = line.split("|")
            _check_complete(ended, fields, ("id", "title"), item_file, lineno)
            if len(fields) < 2:
                raise DataFormatError(
                    item_file, "expected '|'-separated fields 'id|title|...'", line=lineno, field="title"
                )
            titles[_key(fields[0], item_file, lineno, "id")] = fields[1].strip()
    return Interactions.from_keys(users, items, timestamps, titles, source=str(data))


def _load_recbole(inter: Path) -> Interactions:
    users: list[str] = []
    items: list[str] = []
    timestamps: list[int] = []
    for lineno, (user, item, ts) in _atomic_rows(inter, ("user_id", "item_id", "timestamp"), ()):
        users.append(_key(user, inter, lineno, "user_id"))
        items.append(_key(item, inter, lineno, "item_id"))
        timestamps.append(_timestamp(ts, inter, lineno, "timestamp"))
    titles: dict[str, str] = {}
    item_file = inter.with_suffix(".item")
    if item_file.is_file():
        for lineno, (item, title, year) in _atomic_rows(item_file, ("item_id", "movie_title"), ("release_year",)):
            title = title.strip()
            # GroupLens titles carry the year ("Toy Story (1995)"); RecBole keeps it apart (and "unkonwn" for none).
            if year.strip().isdigit():
                title = f"{title} ({year.strip()})"
            titles[_key(item, item_file, lineno, "item_id")] = title
    return Interactions.from_keys(users, items, timestamps, titles, source=str(inter))


def _atomic_rows(path: Path, required: tuple[str, ...], optional: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """Rows of a RecBole atomic file (tab-separated, header ``name:type``): the named columns, "" if absent."""
    lines = _lines(path, "utf-8")
    first_line, first, _ = next(lines)  # an empty file raised already
    names = [h.split(":", 1)[0].strip() for h in first.split("\t")]
    col = _columns(names, required, path)
    picks = [col[c] for c in required] + [names.index(c) if c in names else None for c in optional]
    rows = 0
    for lineno, line, ended in lines:
        fields = line.split("\t")
        _check_complete(ended, fields, names, path, lineno)
        _check_width(fields, names, path, lineno, "tab-separated")
        rows += 1
        yield lineno, [fields[i] if i is not None else "" for i in picks]
    if not rows:
        raise DataFormatError(path, "no data rows after the header", line=first_line + 1)


def _raw_lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    """Every line of ``path`` (gzip if it ends in ``.gz``), decoded one by one, with its 1-based number."""
    path = _existing_file(path)
    opener = gzip.open if path.suffix == ".gz" else open
    lineno = 0
    with opener(path, "rb") as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    text = raw.decode(encoding)
                except UnicodeDecodeError as e:
                    raise DataFormatError(
                        path, f"not valid {encoding} ({e.reason} at byte {e.start})", line=lineno
                    ) from None
                yield lineno, text
        except (OSError, EOFError) as e:
            raise DataFormatError(path, f"unreadable ({e})", line=lineno + 1) from None


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str, bool]]:
    """The non-blank lines of ``path``: (number, text without its line ending, whether it had a line break);
    an empty file is an error."""
    count = 0
    for lineno, raw in _raw_lines(path, encoding):
        text = raw.rstrip("\r\n")
        if text.strip():
            count += 1
            yield lineno, text, raw.endswith("\n")
    if not count:
        raise DataFormatError(path, "empty file", line=1)


def _json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """JSON objects of a JSONL file, one per non-blank line."""
    for lineno, line, _ in _lines(path, "utf-8"):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFormatError(path, f"invalid JSON ({e.msg} at column {e.colno})", line=lineno) from None
        if not isinstance(obj, dict):
            raise DataFormatError(path, f"expected a JSON object, got {type(obj).__name__}", line=lineno)
        yield lineno, obj


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    return path


def _columns(names: list[str], required: tuple[str, ...], path: Path) -> dict[str, int]:
    """Index of each required column in header ``names`` (line 1)."""
    for name in required:
        if name not in names:
            raise DataFormatError(
                path, f"header lacks required column (header: {', '.join(names)})", line=1, field=name
            )
    return {name: names.index(name) for name in required}


def _check_complete(ended: bool, fields: list[str], names: tuple[str, ...] | list[str], path: Path, line: int) -> None:
    """A line of a machine-written file without a line break is the file's last, cut short."""
    if not ended:
        field = names[min(len(fields), len(names)) - 1]
        raise DataFormatError(path, "the file ends inside this line (no line break after it): cut short by an "
                                    "interrupted download or copy? (if the line is complete, end the file with a "
                                    "newline)", line=line, field=field)


def _check_width(fields: list[str], names: tuple[str, ...] | list[str], path: Path, line: int, sep: str) -> None:
    if len(fields) < len(names):
        problem = f"missing: expected {len(names)} {sep} fields ({', '.join(names)}), got {len(fields)}"
        raise DataFormatError(path, problem, line=line, field=names[len(fields)])
    if len(fields) > len(names):
        problem = f"expected {len(names)} {sep} fields ({', '.join(names)}), got {len(fields)}"
        raise DataFormatError(path, problem, line=line)


def _get(obj: dict[str, Any], name: str, path: str | os.PathLike, line: int) -> Any:
    if name not in obj:
        raise DataFormatError(path, "key missing", line=line, field=name)
    return obj[name]


def _key(value: Any, path: str | os.PathLike, line: int, field: str) -> str:
    """A user or item key: a non-empty string (integers are accepted and stringified)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataFormatError(path, f"expected a non-empty key, got {value!r}", line=line, field=field)
    return value.strip()


def _text(value: Any, path: str | os.PathLike, line: int, field: str) -> str:
    """A title or description: a string, a list of strings (joined with spaces) or null (empty)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    raise DataFormatError(path, f"expected a string or a list of strings, got {value!r:.80}", line=line, field=field)


def _timestamp(value: Any, path: str | os.PathLike, line: int, field: str) -> int:
    """An int64 timestamp from an integer, or a number or string with an integral value (``881250949.0``)."""
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise InvalidOperation
        d = Decimal(value.strip() if isinstance(value, str) else value)
        if not d.is_finite() or d != d.to_integral_value():
            raise InvalidOperation
    except InvalidOperation:
        raise DataFormatError(
            path, f"expected an integer timestamp, got {value!r:.80}", line=line, field=field
        ) from None
    if d.adjusted() > 18 or not -_INT64_MAX - 1 <= int(d) <= _INT64_MAX:
        raise DataFormatError(path, f"timestamp {value!r:.80} outside the int64 range", line=line, field=field)
    return int(d)
