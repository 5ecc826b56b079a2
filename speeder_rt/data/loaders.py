"""Interaction loaders: MovieLens-100K (GroupLens or RecBole atomic files), Amazon Reviews 2023 JSONL, CSV, Parquet.

Every loader returns :class:`~speeder_rt.data.interactions.Interactions` with rows in file order and dense
ids in order of first appearance. Every rating or review counts as one implicit interaction. Malformed input
raises :class:`DataFormatError` naming the file, the 1-based line (Parquet: the 0-based row) and the field.
Loaders only read.

The work is columnar, on polars: a text file is read in blocks of whole lines, each block becomes a column of
lines and is split, decoded and checked with polars expressions over the whole column. A check finds the
first offending line with one vectorised mask; the scalar checker of that one record (``_key``, ``_timestamp``,
the csv module for a CSV line, ``json.loads`` for a JSON line) then words the error. Nothing is dropped or
coerced: a value the masks reject is an error even where the scalar checker would have read it.

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
from collections.abc import Callable, Iterator
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import polars as pl
from tqdm import tqdm

from speeder_rt.data.interactions import Interactions

_INT64_MAX = 2**63 - 1
_UDATA_FIELDS = ("user", "item", "rating", "timestamp")
_BLOCK_BYTES = 32 << 20  # a text file is read and parsed this many bytes (whole lines) at a time
# a field of a strictly quoted CSV line: quoted (a quote inside doubled), unquoted (not starting with a quote), empty
_CSV_FIELD = r'("(?:[^"]|"")*"|[^",\r\n][^,\r\n]*|)'
_INTEGRAL = r"^[+-]?\d+(?:\.0*)?$"  # a timestamp: digits, optionally with a zero fraction ("881250949.0")
_NON_KEY_JSON = r"^(?:true|false|-?\d+\.\d*(?:[eE][+-]?\d+)?|-?\d+[eE][+-]?\d+)$"  # a JSON bool or float, decoded
_NON_TEXT_JSON = r"^(?:true|false|-?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)$"  # a JSON bool or number, decoded


class DataFormatError(ValueError):
    """Malformed input data: the message reads ``<file>, line <n>, field '<name>': <problem>`` (Parquet:
    ``<file>, row <r>, field '<name>': <problem>`` with the 0-based row)."""

    def __init__(self, file: str | os.PathLike, problem: str, line: int | None = None, field: str | None = None,
                 row: int | None = None) -> None:
        self.file, self.problem, self.line, self.field, self.row = str(file), problem, line, field, row
        where = (self.file + (f", line {line}" if line is not None else "") + (f", row {row}" if row is not None else "")
                 + (f", field {field!r}" if field else ""))
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.file, self.problem, self.line, self.field, self.row)


# --- loaders ---------------------------------------------------------------------------------------------


def load_movielens(path: str | os.PathLike, progress: bool = False) -> Interactions:
    """MovieLens from directory ``path``: GroupLens form (``u.data``, optional ``u.item``) or RecBole atomic form
    (one ``*.inter`` file such as ``ml-100k.inter``, optional ``.item`` of the same stem), detected by content."""
    root = Path(path)
    if not root.is_dir():
        raise DataFormatError(root, "directory not found")
    if (root / "u.data").is_file():
        return _load_grouplens(root, progress)
    inter = sorted(root.glob("*.inter"))
    if len(inter) == 1:
        return _load_recbole(inter[0], progress)
    found = f"; found {', '.join(p.name for p in inter)}" if inter else ""
    raise DataFormatError(root, f"no MovieLens data: expected GroupLens 'u.data' or one RecBole '*.inter' file{found}")


def load_amazon_reviews(reviews_path: str | os.PathLike, meta_path: str | os.PathLike | None = None,
                        progress: bool = False) -> Interactions:
    """Amazon Reviews 2023 JSONL (``.gz`` allowed): reviews give ``user_id``, ``parent_asin``, ``timestamp`` (ms).

    Items are keyed by ``parent_asin``. The optional meta file supplies ``title`` and ``description`` (a list of
    strings, joined with spaces) for the reviewed items; meta lines of other items are skipped.
    """
    reviews_path = _existing_file(reviews_path)
    schema = {"user_id": pl.String, "parent_asin": pl.String, "timestamp": pl.String}
    parts = []
    for lines, _ in _line_blocks(reviews_path, "utf-8", progress):
        frame = _with_timestamps(_json_frame(lines, schema, reviews_path), "timestamp")
        _raise_first(frame, [_json_key_check(c, reviews_path) for c in ("user_id", "parent_asin")]
                     + [_timestamp_check("timestamp", reviews_path, json_line=True)])
        parts.append(frame.select(pl.col("user_id").str.strip_chars().alias("user"),
                                  pl.col("parent_asin").str.strip_chars().alias("item"),
                                  pl.col("ts").alias("timestamp")))
    rows = _nonempty(parts, reviews_path)
    catalog = None
    source = str(reviews_path)
    if meta_path is not None:
        meta_path = _existing_file(meta_path)
        source += f" + {meta_path}"
        reviewed = rows.get_column("item").unique()
        meta_schema = {"parent_asin": pl.String, "title": pl.String, "description": pl.List(pl.String)}
        meta_parts = []
        for lines, _ in _line_blocks(meta_path, "utf-8", progress):
            frame = _json_frame(lines, meta_schema, meta_path)
            _raise_first(frame, [_json_key_check("parent_asin", meta_path)])
            meta_parts.append(frame.with_columns(pl.col("parent_asin").str.strip_chars())
                              .filter(pl.col("parent_asin").is_in(reviewed.implode())))
        meta = _nonempty(meta_parts, meta_path, allow_empty=True).unique("parent_asin", keep="first", maintain_order=True)
        _raise_first(meta, [_json_title_check(meta_path), _json_description_check(meta_path)])
        catalog = meta.select(pl.col("parent_asin").alias("item"), pl.col("title").fill_null(""),
                              pl.col("description").list.join(" ").fill_null(""))
    return _interactions(rows, catalog, source, extra_items=False)


def load_csv(path: str | os.PathLike, progress: bool = False) -> Interactions:
    """CSV (UTF-8) whose header names ``user``, ``item``, ``timestamp`` and optionally ``title``, in any order;
    other columns are ignored. An item's title is its first non-empty one."""
    path = _existing_file(path)
    parts: list[pl.DataFrame] = []
    titles: list[pl.DataFrame] = []
    header = lambda text, line: [h.strip() for h in _csv_fields(text, path, line, [])]  # noqa: E731
    blocks = _headed_blocks(path, "utf-8-sig", progress, header, ("user", "item", "timestamp"))
    for names, header_line, lines, _ in blocks:  # noqa: B007 (header_line names the file's header after the loop)
        frame = _csv_frame(lines, names, path)
        pick = ["user", "item", "timestamp"] + (["title"] if "title" in names else [])
        frame = _with_timestamps(frame.rename({f"field_{names.index(c)}": c for c in pick}), "timestamp")
        _raise_first(frame, [_csv_structure_check(path, names)] + [_key_check(c, path) for c in ("user", "item")]
                     + [_timestamp_check("timestamp", path)])
        rows = frame.select(*_keys(frame, ("user", "item")), pl.col("ts").alias("timestamp"),
                            *([pl.col("title")] if "title" in names else []))
        parts.append(_first_titles(rows, titles) if "title" in names else rows)
    return _interactions(_body(parts, path, header_line), _catalog(titles), str(path), extra_items=False)


def load_parquet(path: str | os.PathLike) -> Interactions:
    """Parquet with columns ``user`` and ``item`` (strings or integers), ``timestamp`` (integers) and optionally
    ``title`` (strings); other columns are ignored. No nulls, no empty keys; an item's title is its first
    non-empty one. Errors name the 0-based row."""
    path = _existing_file(path)
    try:
        schema = pl.read_parquet_schema(path)
    except Exception as e:  # noqa: BLE001 (polars raises several kinds for a file that is not Parquet)
        raise DataFormatError(path, f"not a readable Parquet file ({str(e).splitlines()[0]})") from None
    for name in ("user", "item", "timestamp"):
        if name not in schema:
            raise DataFormatError(path, f"column missing (columns: {', '.join(schema)})", field=name)
    for name in ("user", "item"):
        if not (schema[name] == pl.String or schema[name].is_integer()):
            raise DataFormatError(path, f"expected a string or integer column, got {schema[name]}", field=name)
    if not schema["timestamp"].is_integer():
        raise DataFormatError(path, f"expected an integer column, got {schema['timestamp']}", field="timestamp")
    if "title" in schema and schema["title"] != pl.String:
        raise DataFormatError(path, f"expected a string column, got {schema['title']}", field="title")
    frame = pl.read_parquet(path, columns=["user", "item", "timestamp"]).with_row_index("row")
    if not len(frame):
        raise DataFormatError(path, "no rows")

    def at_row(field: str, problem: Callable[[dict[str, Any]], str]) -> Callable[[dict[str, Any]], None]:
        def fail(row: dict[str, Any]) -> None:
            raise DataFormatError(path, problem(row), row=row["row"], field=field)
        return fail

    checks = []
    for name in ("user", "item", "timestamp"):
        checks.append((pl.col(name).is_null(), at_row(name, lambda row: "null value")))
        if name != "timestamp":
            checks.append((pl.col(name).cast(pl.String).str.strip_chars() == "",
                           at_row(name, lambda row, n=name: f"expected a non-empty key, got {row[n]!r}")))
    checks.append((pl.col("timestamp").cast(pl.Int64, strict=False).is_null() & pl.col("timestamp").is_not_null(),
                   at_row("timestamp", lambda row: f"timestamp {row['timestamp']} outside the int64 range")))
    _raise_first(frame, checks)
    frame = frame.with_columns(pl.col("user", "item").cast(pl.String))
    rows = frame.select(*_keys(frame, ("user", "item")), pl.col("timestamp").cast(pl.Int64))
    del frame
    titles: list[pl.DataFrame] = []
    if "title" in schema:  # read again for the titles alone: the rows never hold a title column
        items = pl.scan_parquet(path).select(pl.col("item").cast(pl.String), pl.col("title").fill_null(""))
        items = items.collect()
        _first_titles(items.select(*_keys(items, ("item",)), "title"), titles)
    return _interactions(rows, _catalog(titles), str(path), extra_items=False)


def _load_grouplens(root: Path, progress: bool) -> Interactions:
    data = root / "u.data"
    parts = []
    for lines, unended in _line_blocks(data, "utf-8", progress):
        # whitespace-separated: the runs of whitespace become one tab each
        tabbed = lines.with_columns(pl.col("text").str.strip_chars().str.replace_all(r"\s+", "\t"))
        frame = _with_timestamps(_split_frame(tabbed, "\t", len(_UDATA_FIELDS), unended).rename(
            {f"field_{i}": n for i, n in enumerate(_UDATA_FIELDS)}), "timestamp")
        _raise_first(frame, [_structure_check(data, _UDATA_FIELDS, "whitespace-separated", str.split, unended)]
                     + [_key_check(c, data) for c in ("user", "item")] + [_timestamp_check("timestamp", data)])
        parts.append(frame.select(pl.col("user", "item").str.strip_chars(), pl.col("ts").alias("timestamp")))
    rows = _nonempty(parts, data)
    catalog = None
    item_file = root / "u.item"
    if item_file.is_file():
        items = []
        for lines, unended in _line_blocks(item_file, "latin-1", progress):
            frame = _split_frame(lines, "|", 2, unended, extra_allowed=True).rename(
                {"field_0": "id", "field_1": "title"})
            _raise_first(frame, [_structure_check(item_file, ("id", "title"), "'|'-separated", lambda t: t.split("|"),
                                                  unended, at_least=True), _key_check("id", item_file)])
            items.append(frame.select(pl.col("id").str.strip_chars().alias("item"), pl.col("title").str.strip_chars()))
        # later lines of an id replace its title (in the id's first place)
        catalog = (_nonempty(items, item_file).group_by("item", maintain_order=True).agg(pl.col("title").last())
                   .with_columns(pl.lit("").alias("description")))
    return _interactions(rows, catalog, str(data), extra_items=True)


def _load_recbole(inter: Path, progress: bool) -> Interactions:
    required = ("user_id", "item_id", "timestamp")
    rows = _atomic_rows(inter, required, (), progress, [_key_check(c, inter) for c in ("user_id", "item_id")]
                        + [_timestamp_check("timestamp", inter)], timestamp="timestamp")
    rows = rows.select(pl.col("user_id").str.strip_chars().alias("user"),
                       pl.col("item_id").str.strip_chars().alias("item"), pl.col("ts").alias("timestamp"))
    catalog = None
    item_file = inter.with_suffix(".item")
    if item_file.is_file():
        items = _atomic_rows(item_file, ("item_id", "movie_title"), ("release_year",), progress,
                             [_key_check("item_id", item_file)])
        # GroupLens titles carry the year ("Toy Story (1995)"); RecBole keeps it apart (and "unkonwn" for none).
        year = pl.col("release_year").str.strip_chars()
        title = pl.col("movie_title").str.strip_chars()
        catalog = (items.select(pl.col("item_id").str.strip_chars().alias("item"),
                                pl.when(year.str.contains(r"^\d+$")).then(pl.format("{} ({})", title, year))
                                .otherwise(title).alias("title"))
                   .group_by("item", maintain_order=True).agg(pl.col("title").last())
                   .with_columns(pl.lit("").alias("description")))
    return _interactions(rows, catalog, str(inter), extra_items=True)


def _atomic_rows(path: Path, required: tuple[str, ...], optional: tuple[str, ...], progress: bool,
                 checks: list[tuple[pl.Expr, Callable[[dict[str, Any]], None]]], timestamp: str | None = None
                 ) -> pl.DataFrame:
    """The named columns of a RecBole atomic file (tab-separated, header ``name:type``), "" where an optional one
    is absent; ``checks``: the value checks after the structural one; ``timestamp``: a column parsed into ``ts``."""
    parts = []
    header = lambda text, line: [h.split(":", 1)[0].strip() for h in text.split("\t")]  # noqa: E731
    blocks = _headed_blocks(path, "utf-8", progress, header, required)
    for names, header_line, lines, unended in blocks:  # noqa: B007 (header_line names the file's header after the loop)
        frame = _split_frame(lines, "\t", len(names), unended).rename(
            {f"field_{i}": n for i, n in enumerate(names)})
        frame = _with_timestamps(frame, timestamp) if timestamp else frame
        _raise_first(frame, [_structure_check(path, names, "tab-separated", lambda t: t.split("\t"), unended)]
                     + checks)
        parts.append(frame.select(*required, *[pl.col(c) if c in names else pl.lit("").alias(c) for c in optional],
                                  *(["ts"] if timestamp else [])))
    return _body(parts, path, header_line)


def _headed_blocks(path: Path, encoding: str, progress: bool, header: Callable[[str, int], list[str]],
                   required: tuple[str, ...]) -> Iterator[tuple[list[str], int, pl.DataFrame, int | None]]:
    """The blocks of a file whose first line names its columns: (the names, the header's line number, the
    block's lines after the header, the unended last line as ``_line_blocks``); ``header(text, line)`` splits it."""
    names: list[str] = []
    header_line = 1
    for lines, unended in _line_blocks(path, encoding, progress):
        if not names:
            header_line, text = lines.row(0)
            names = header(text, header_line)
            _columns(names, required, path)
            lines = lines.slice(1)
        yield names, header_line, lines, unended


def _body(parts: list[pl.DataFrame], path: Path, header_line: int) -> pl.DataFrame:
    """The rows after a header: at least one."""
    rows = pl.concat(parts)
    if not len(rows):
        raise DataFormatError(path, "no data rows after the header", line=header_line + 1)
    return rows


# --- the columnar machinery ------------------------------------------------------------------------------


def _line_blocks(path: Path, encoding: str, progress: bool = False) -> Iterator[tuple[pl.DataFrame, int | None]]:
    """The non-blank lines of ``path`` (gzip if it ends in ``.gz``) in blocks of whole lines: frames with columns
    ``line`` (1-based) and ``text`` (without its line ending), each with the number of the file's last line if
    it is in the block and has no line break (else None). An empty file is an error."""
    path = _existing_file(path)
    lines_before, rows, tail = 0, 0, b""
    bom = encoding == "utf-8-sig"
    codec = "utf-8" if bom else encoding
    with open(path, "rb") as raw, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"reading {path.name}",
                                       disable=not progress, leave=False) as bar:
        stream = gzip.GzipFile(fileobj=raw) if path.suffix == ".gz" else raw
        while True:
            try:
                block = stream.read(_BLOCK_BYTES)
            except (OSError, EOFError) as e:
                raise DataFormatError(path, f"unreadable ({e})", line=lines_before + tail.count(b"\n") + 1) from None
            if bom and lines_before == 0 and not tail and block.startswith(b"\xef\xbb\xbf"):
                block = block[3:]
            data = tail + block
            cut = data.rfind(b"\n") + 1 if block else len(data)
            chunk, tail = data[:cut], data[cut:]
            if chunk:
                frame, unended = _lines_frame(chunk, codec, path, lines_before)
                rows += len(frame)
                if len(frame):
                    yield frame, unended
                lines_before += chunk.count(b"\n")
            bar.update(raw.tell() - bar.n)
            bar.set_postfix(lines=lines_before)
            if not block:
                break
    if not rows:
        raise DataFormatError(path, "empty file", line=1)


def _lines_frame(chunk: bytes, encoding: str, path: Path, lines_before: int) -> tuple[pl.DataFrame, int | None]:
    """(the non-blank lines of ``chunk`` numbered from ``lines_before + 1``, the last one's number if it lacks a
    line break)."""
    try:
        text = chunk.decode(encoding)
    except UnicodeDecodeError as e:
        line_start = chunk.rfind(b"\n", 0, e.start) + 1
        raise DataFormatError(path, f"not valid {encoding} ({e.reason} at byte {e.start - line_start})",
                              line=lines_before + chunk.count(b"\n", 0, e.start) + 1) from None
    pieces = pl.Series("text", [text]).str.split("\n").explode()
    ended = chunk.endswith(b"\n")
    if ended:
        pieces = pieces.head(len(pieces) - 1)  # the empty piece after the final line break
    frame = pl.DataFrame({"line": pl.int_range(lines_before + 1, lines_before + 1 + len(pieces), eager=True),
                          "text": pieces.str.strip_chars_end("\r")})
    last = None if ended or not pieces[-1].strip() else lines_before + len(pieces)
    return frame.filter(pl.col("text").str.strip_chars() != ""), last


def _split_frame(lines: pl.DataFrame, separator: str, width: int, unended: int | None,
                 extra_allowed: bool = False) -> pl.DataFrame:
    """``lines`` with their first ``width`` fields (``field_0``...) and ``bad_structure``: fewer fields, more
    (unless ``extra_allowed``), or the file's unended last line."""
    fields = pl.col("text").str.splitn(separator, width + 1).alias("fields")
    frame = lines.with_columns(fields).unnest("fields")
    bad = pl.col(f"field_{width - 1}").is_null() | (pl.col("line") == (unended or 0))
    if not extra_allowed:
        bad = bad | pl.col(f"field_{width}").is_not_null()
    return frame.with_columns(bad.alias("bad_structure"))


def _csv_frame(lines: pl.DataFrame, names: list[str], path: Path) -> pl.DataFrame:
    """The fields of CSV lines (``field_0``...) and ``bad_structure``: a line without a quote is split at its
    commas; one with a quote must match the strict CSV grammar, its quoted fields then unquoted."""
    width = len(names)
    quoted = pl.col("text").str.contains('"', literal=True)
    plain = _split_frame(lines.filter(~quoted), ",", width, None).with_columns(
        pl.col("bad_structure") | pl.col("text").str.contains("\r", literal=True))
    groups = lines.filter(quoted).with_columns(
        pl.col("text").str.extract_groups("^" + ",".join([_CSV_FIELD] * width) + "$").alias("fields"))
    groups = groups.unnest("fields").rename({str(i + 1): f"field_{i}" for i in range(width)})
    unquote = [pl.when(pl.col(f).str.starts_with('"')).then(pl.col(f).str.slice(1, pl.col(f).str.len_chars() - 2)
                                                             .str.replace_all('""', '"', literal=True))
               .otherwise(pl.col(f)).alias(f) for f in (f"field_{i}" for i in range(width))]
    groups = groups.with_columns(*unquote, pl.col("field_0").is_null().alias("bad_structure"))
    columns = ["line", "text", *(f"field_{i}" for i in range(width)), "bad_structure"]
    frame = pl.concat([plain.select(columns), groups.select(columns)])
    return frame.sort("line") if len(groups) else frame


def _raise_first(frame: pl.DataFrame, checks: list[tuple[pl.Expr, Callable[[dict[str, Any]], None]]]) -> None:
    """Raise the error of the first row of ``frame`` that fails a check: ``checks`` are (mask of bad rows,
    raiser of that row's error), in the order a record's fields are checked. A mask may flag more than the
    errors (a JSON key that reads like a bool); its raiser, which checks the one value exactly, decides."""
    masks = [mask.fill_null(False).alias(f"_bad{i}") for i, (mask, _) in enumerate(checks)]
    flagged = frame.with_columns(masks).filter(pl.any_horizontal(f"_bad{i}" for i in range(len(checks))))
    for row in flagged.iter_rows(named=True):  # a mask may flag a valid value (e.g. the key "true"): it raises not
        for i, (_, fail) in enumerate(checks):
            if row[f"_bad{i}"]:
                fail(row)


def _csv_structure_check(path: Path, names: list[str]) -> tuple[pl.Expr, Callable[[dict[str, Any]], None]]:
    """A CSV line's structure; the csv module (strict) words the error of the line."""
    def explain(row: dict[str, Any]) -> None:
        fields = _csv_fields(row["text"], path, row["line"], names)
        _check_width(fields, names, path, row["line"], "comma-separated")
        raise DataFormatError(path, "malformed CSV", line=row["line"])
    return pl.col("bad_structure"), explain


def _structure_check(path: Path, names: tuple[str, ...] | list[str], separated: str, split: Callable[[str], list[str]],
                     unended: int | None, at_least: bool = False) -> tuple[pl.Expr, Callable[[dict[str, Any]], None]]:
    """A line's structure (its width, its line break); ``split`` cuts the line as the format does, to word the
    error."""
    def explain(row: dict[str, Any]) -> None:
        fields = split(row["text"])
        _check_complete(row["line"] != unended, fields, names, path, row["line"])
        if at_least:
            raise DataFormatError(path, f"expected {separated} fields '{'|'.join(names)}|...'", line=row["line"],
                                  field=names[min(len(fields), len(names) - 1)])
        _check_width(fields, names, path, row["line"], separated)
    return pl.col("bad_structure"), explain


def _key_check(column: str, path: Path) -> tuple[pl.Expr, Callable[[dict[str, Any]], None]]:
    """A user or item key: not empty after stripping."""
    def explain(row: dict[str, Any]) -> None:
        _key(row[column], path, row["line"], column)
    return pl.col(column).str.strip_chars() == "", explain


def _timestamp_expr(column: str) -> pl.Expr:
    """Int64 timestamps of text ``column``: digits, optionally with a zero fraction; null where that fails."""
    text = pl.col(column).str.strip_chars()
    return pl.when(text.str.contains(_INTEGRAL)).then(
        text.str.extract(r"^([+-]?\d+)").cast(pl.Int64, strict=False)).alias(column)


def _with_timestamps(frame: pl.DataFrame, column: str) -> pl.DataFrame:
    """``frame`` with ``ts``: its text ``column`` as Int64 (null where not an integer timestamp). Plain integers
    take one cast; only a column with other values (a fraction, whitespace, an error) goes through the full rule."""
    parsed = frame.get_column(column).cast(pl.Int64, strict=False)
    if parsed.null_count():
        parsed = frame.select(_timestamp_expr(column)).to_series()
    return frame.with_columns(parsed.alias("ts"))


def _timestamp_check(column: str, path: Path, json_line: bool = False) -> tuple[pl.Expr, Callable[[dict[str, Any]], None]]:
    """A timestamp, parsed by ``_with_timestamps`` into ``ts``."""
    def explain(row: dict[str, Any]) -> None:
        value = row[column]
        if json_line:
            value = _get(json.loads(row["text"]), column, path, row["line"])
        _timestamp(value, path, row["line"], column)
        raise DataFormatError(path, f"expected an integer timestamp (digits, optionally with a zero fraction), got "
                                    f"{value!r:.80}", line=row["line"], field=column)
    return pl.col("ts").is_null(), explain


def _keys(frame: pl.DataFrame, columns: tuple[str, ...]) -> list[pl.Expr]:
    """The key ``columns`` of ``frame`` without surrounding whitespace (stripped only where some key has it)."""
    edges = frame.select(pl.col(c).str.contains(r"^\s|\s$").any() for c in columns).row(0)
    return [pl.col(c).str.strip_chars() if edge else pl.col(c) for c, edge in zip(columns, edges)]


def _first_titles(rows: pl.DataFrame, titles: list[pl.DataFrame]) -> pl.DataFrame:
    """``rows`` without their ``title`` column, whose first non-empty value per item is appended to ``titles``."""
    titles.append(rows.filter(pl.col("title") != "").unique("item", keep="first", maintain_order=True)
                  .select("item", "title"))
    return rows.drop("title")


def _catalog(titles: list[pl.DataFrame]) -> pl.DataFrame | None:
    """(item, title, description) of each item's first non-empty title over ``_first_titles``' blocks; None
    when the source has no titles."""
    if not titles:
        return None
    return (pl.concat(titles).unique("item", keep="first", maintain_order=True)
            .with_columns(pl.lit("").alias("description")))


def _nonempty(parts: list[pl.DataFrame], path: Path, allow_empty: bool = False) -> pl.DataFrame:
    rows = pl.concat(parts) if parts else pl.DataFrame()
    if not len(rows) and not allow_empty:
        raise DataFormatError(path, "no data rows", line=1)
    return rows


def _interactions(rows: pl.DataFrame, catalog: pl.DataFrame | None, source: str, extra_items: bool) -> Interactions:
    """Interactions of ``rows`` (user, item, timestamp), dense ids in order of first appearance; ``catalog``
    (item, title, description) gives titles, and with ``extra_items`` adds its items no row names (after the
    others, in its order)."""
    user_keys, item_keys = pl.collect_all([rows.lazy().select(pl.col(c).unique(maintain_order=True))
                                           for c in ("user", "item")])  # the two on separate threads
    user_keys, item_keys = user_keys.to_series(), item_keys.to_series()
    if catalog is not None and extra_items:
        extra = catalog.get_column("item").filter(~catalog.get_column("item").is_in(item_keys.implode()))
        item_keys = pl.concat([item_keys, extra])
    titles = descriptions = None
    if catalog is not None:
        named = pl.DataFrame({"item": item_keys}).join(catalog, on="item", how="left", maintain_order="left")
        titles = named.get_column("title").fill_null("").to_list()
        descriptions = named.get_column("description").fill_null("").to_list()
    def dense(column: str, keys: pl.Series) -> Any:  # eager: the same replace inside a select is ~7x slower
        return rows.get_column(column).replace_strict(keys, pl.int_range(len(keys), eager=True),
                                                      return_dtype=pl.Int64).to_numpy()

    return Interactions(users=dense("user", user_keys), items=dense("item", item_keys),
                        timestamps=rows.get_column("timestamp").to_numpy(), user_keys=user_keys.to_list(),
                        item_keys=item_keys.to_list(), titles=titles or [], descriptions=descriptions or [],
                        source=source)


# --- JSON lines ------------------------------------------------------------------------------------------


def _json_frame(lines: pl.DataFrame, schema: dict[str, pl.DataType], path: Path) -> pl.DataFrame:
    """``lines`` with the fields of ``schema`` decoded from each line's JSON object (null where absent). A line
    polars cannot decode is found by bisection and explained by ``json.loads`` and the scalar checks."""
    dtype = pl.Struct(schema)
    try:
        return lines.with_columns(pl.col("text").str.json_decode(dtype).alias("json")).unnest("json")
    except pl.exceptions.PolarsError:
        bad = lines
        while len(bad) > 1:
            half = bad.head(len(bad) // 2)
            try:
                half.get_column("text").str.json_decode(dtype)
                bad = bad.slice(len(half))
            except pl.exceptions.PolarsError:
                bad = half
        line, text = bad.row(0)
        _explain_json(text, path, line, schema)
        raise DataFormatError(path, f"JSON of unexpected types (fields {', '.join(schema)})", line=line) from None


def _explain_json(text: str, path: Path, line: int, schema: dict[str, pl.DataType]) -> None:
    """Raise the error of one JSON line by the scalar checks, if they find one."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(path, f"invalid JSON ({e.msg} at column {e.colno})", line=line) from None
    if not isinstance(obj, dict):
        raise DataFormatError(path, f"expected a JSON object, got {type(obj).__name__}", line=line)
    for name in schema:
        if name == "timestamp":
            _timestamp(_get(obj, name, path, line), path, line, name)
        elif name in ("title", "description"):
            _text(obj.get(name), path, line, name)
        else:
            _key(_get(obj, name, path, line), path, line, name)


def _json_key_check(column: str, path: Path) -> tuple[pl.Expr, Callable[[dict[str, Any]], None]]:
    """A key field of a JSON line: a non-empty string or an integer. Polars decodes a bool or a float into
    text, so values that read like one are checked by ``json.loads`` of their line."""
    def explain(row: dict[str, Any]) -> None:
        _key(_get(json.loads(row["text"]), column, path, row["line"]), path, row["line"], column)
    key = pl.col(column)
    return key.is_null() | (key.str.strip_chars() == "") | key.str.contains(_NON_KEY_JSON), explain


def _json_title_check(path: Path) -> tuple[pl.Expr, Callable[[dict[str, Any]], None]]:
    """A meta line's ``title``: present (null is no title)."""
    def explain(row: dict[str, Any]) -> None:
        _text(_get(json.loads(row["text"]), "title", path, row["line"]), path, row["line"], "title")
    return pl.col("title").is_null(), explain


def _json_description_check(path: Path) -> tuple[pl.Expr, Callable[[dict[str, Any]], None]]:
    """A meta line's ``description``: strings only (polars decodes numbers and bools in the list into text)."""
    def explain(row: dict[str, Any]) -> None:
        _text(json.loads(row["text"]).get("description"), path, row["line"], "description")
    suspicious = pl.col("description").list.eval(pl.element().str.contains(_NON_TEXT_JSON)).list.any()
    return suspicious, explain


# --- the scalar checks: one record, to word an error -----------------------------------------------------


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
