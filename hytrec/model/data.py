"""Data: real-log loaders, the on-disk cache, user filters and train/valid/test splits.

Every loader returns the canonical `EventLog` of `hytrec.model.events`: columns of length N
(user, item, category, behavior, ts; int64), sorted by (user, ts) and stable with respect to
file order, so events with equal timestamps keep the order in which the file lists them
(but MovieLens' ratings.csv, listed by movie: `read_movielens`).
Vocabulary indices follow the ascending raw id (numeric for the integer-id formats), so the
same file always gives the same indices.

Formats (plain or gzipped; the reader chooses by the `.gz` suffix):

- Taobao UserBehavior CSV, no header: `user_id,item_id,category_id,behavior,timestamp`,
  integer ids, behavior in {pv, fav, cart, buy} (-> PRODUCT_CLICK, COLLECTION, ADD_TO_CART,
  PAYMENT through `Behavior.parse`), unix seconds.
- S3-Rec Amazon text (Beauty, Sports): one user per line, `user item item ...`, integer ids in
  chronological order, no timestamps. ts is the position in the user's line (0, 1, 2, ...),
  so time gaps are all 1 and carry no information; the category is 0 (unknown) because the
  files carry none (using the item as its own category would only duplicate the item
  embedding); behaviour is CLICK (a review is the only signal, treated like a rating).
- MovieLens `u.data` (`user<TAB>item<TAB>rating<TAB>ts`) or ML-1M `ratings.dat` (`::`),
  behaviour CLICK whatever the rating (the project's convention: ratings are clicks). The
  category of a movie is its full genre set from `u.item` (or `movies.dat`) next to it, e.g.
  "Comedy|Romance" (ML-100K: 216 sets): taking the first genre flag would make every
  "Action|..." movie an Action movie because of the alphabetical column order. Movies absent
  from the genre file get category 0.
- MovieLens latest (`ratings.csv`: a header, then `userId,movieId,rating,timestamp`), genre
  sets from `movies.csv` beside it (`movieId,title,genres`, titles quoted where they hold
  commas) as categories, exactly as for ML-100K; "(no genres listed)" is a category of its own.
- Foursquare check-ins as the STAN repository ships them (`NYC.npy`, gzipped): a numpy
  integer array [N, 3] of `user_id, poi_id, minutes since the first check-in of the data
  set`, grouped by user but not time-sorted within a user. ts = minutes * 60 (seconds since
  that first check-in, not unix time); category 0 (the file has none); behaviour CLICK (a
  check-in). A row is bad when an id is below 1 or the minute is negative; its "line" is
  its 1-based row number.
- Any CSV/TSV/Parquet table, e.g. a user's own file, through a `ColumnMap` (which column
  holds what, by header name or 0-based field number; missing category -> 0, missing
  behaviour -> a default, missing ts -> line number). Its behaviour words map to the funnel
  stages through the user's mapping, then `Behavior.parse`'s aliases; a word neither knows
  is an `UnmappedBehaviorError` listing every such word, or skipped, or given a stage
  (`ColumnMap.unknown_behavior`). Timestamps: unix seconds or milliseconds, ISO 8601 or a
  strptime pattern (`parse_time`). CSVs are UTF-8 (a byte-order mark is dropped) and parsed
  by the standard `csv` module, so quoted fields may hold delimiters and newlines.
  `ColumnMap.from_options` builds one from the command line's `--columns`/`--behaviors`
  text (`parse_columns`, `parse_behaviors`).

Bad rows (too few fields, non-integer id or timestamp, unknown behaviour, ...) raise
`BadRowError` naming the file, line and problem; `on_bad_row="skip"` drops them and the
`LoadReport` lists the line numbers (also logged as a warning).

`load_named` is what every command's `--dataset` goes through (a name, a file, a saved
EventLog; with `--columns`, a table). `summary` describes what a load read (counts, history
lengths, time span, bad rows, behaviour mapping) for `hytrec data inspect`.

`load_dataset` resolves the names in `DATASETS` against the shared data folder and caches
the parsed log under `.cache/hytrec/` (or $HYTREC_CACHE), keyed by the file's path, size,
mtime and the load options; the cached copy loads about 15x faster for the Taobao head
file (0.29 s -> 0.02 s on 2 cores).

Filters (`FilterConfig`, `apply_filters`) remove scalper-like, inactive and cold-start users
and rare items, reporting what each step removed. `temporal_split` returns index arrays
into the log (numpy only), one row per user, with the exact input prefix of every target
stated, so leakage checks are one comparison (leave-one-out, the split training and
evaluation use, is `hytrec.model.evaluate.leave_one_out`).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from hytrec.model.events import BEHAVIOR_ALIASES, Behavior, EventLog, Vocabulary, behavior_key

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Dataset name -> (path relative to the shared data folder, format).
DATASETS: dict[str, tuple[str, str]] = {
    "taobao": ("taobao/UserBehavior_head84k.csv.gz", "taobao"),
    "taobao-tail": ("taobao/UserBehavior_user_tail.csv.gz", "taobao"),
    "taobao-timeslice": ("taobao/UserBehavior_timeslice.csv.gz", "taobao"),
    "beauty": ("amazon/Beauty.txt.gz", "s3rec"),
    "sports": ("amazon/Sports_and_Outdoors.txt.gz", "s3rec"),
    "ml100k": ("movielens/u.data.gz", "movielens"),
    "ml-latest": ("movielens/ml-latest-small/ratings.csv.gz", "movielens"),
    "foursquare": ("foursquare/NYC.npy.gz", "foursquare"),
}
FORMATS = ("taobao", "s3rec", "movielens", "foursquare", "table")
BadRowPolicy = Literal["raise", "skip"]

# The official Taobao UserBehavior window, 2017-11-25 00:00 to 2017-12-04 00:00 (UTC+8),
# as unix seconds [start, end); ~0.04% of the head file's rows fall outside it.
TAOBAO_WINDOW = (1511539200, 1512316800)

# Bump when parsing changes, so that old cache entries are not reused.
CACHE_VERSION = 3

# How many bad rows a `LoadReport` describes in words (it lists every bad line number).
PROBLEMS_KEPT = 10


class DataError(ValueError):
    """A problem with the data a command was given; the command line prints its message
    (which names the file, and the line where there is one) instead of a traceback."""


class DatasetNotFoundError(FileNotFoundError):
    """Neither a dataset name nor a file (or a named dataset's file is absent)."""


class BadRowError(DataError):
    """A row that cannot be parsed; the message names the file, the line and the problem."""

    def __init__(self, path: Path | str, line: int, problem: str, row: str = ""):
        self.path, self.line, self.problem, self.row = str(path), line, problem, row
        shown = f" (row: {row[:80]!r})" if row else ""
        super().__init__(
            f"{path}:{line}: {problem}{shown}; pass on_bad_row='skip' to drop such rows"
        )


class MissingColumnError(DataError):
    """A column the `ColumnMap` names is not in the file; the message shows what the file has."""


class UnmappedBehaviorError(DataError):
    """Behaviour words that neither the mapping nor the aliases know, listed all at once."""

    def __init__(self, path: Path | str, words: dict[str, dict]):
        self.path, self.words = str(path), words
        shown = ", ".join(
            f"{word!r} ({entry['rows']} rows, first on line {entry['first_line']})"
            for word, entry in list(words.items())[:PROBLEMS_KEPT]
        )
        more = f" and {len(words) - PROBLEMS_KEPT} more" if len(words) > PROBLEMS_KEPT else ""
        stages = ", ".join(b.name.lower() for b in Behavior if b != Behavior.UNKNOWN)
        super().__init__(
            f"{path}: {len(words)} behaviour word(s) map to no behaviour: {shown}{more}. Map "
            f"them with --behaviors STAGE=WORD,WORD;... (stages: {stages}) or say what to do "
            "with them: --unknown-behavior skip, or a stage such as click"
        )


@dataclass
class LoadReport:
    """What a load read: rows parsed, events kept, and the bad rows skipped (1-based lines;
    for Parquet, 1-based row numbers). Tables also say how each behaviour word mapped:
    behaviors[word] = {"behavior": stage name or None, "source": "mapping" | "alias" |
    "fallback" (unknown_behavior) | "unmapped", "rows": n, "first_line": line}."""

    path: str
    fmt: str
    rows: int = 0
    events: int = 0
    bad_rows: int = 0
    bad_lines: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the first few, for the log
    seconds: float = 0.0
    cached: bool = False
    time_unit: str = ""  # "unix seconds", "positions", ...: whether ts can be shown as dates
    behaviors: dict[str, dict] = field(default_factory=dict)


# The fields a table can map, in the order `--columns` lists them; the first three required.
COLUMN_FIELDS = ("user", "item", "ts", "behavior", "category")
TIME_FORMATS = ("unix", "unix-ms", "iso")  # or a strptime pattern, e.g. "%d/%m/%Y %H:%M"
UNKNOWN_BEHAVIOR_POLICIES = ("error", "skip")  # or a stage name: the rows get that stage


@dataclass(frozen=True)
class ColumnMap:
    """Which columns of a CSV/TSV/Parquet table hold the event fields, and how to read them.

    Columns are header names (compared without surrounding spaces), or with header=False
    0-based field numbers ("0", "3"). category, behavior and ts may be None: category -> 0
    (unknown), behavior -> `default_behavior`, ts -> the line number (stable order by file).
    delimiter None: a tab for *.tsv(.gz), else a comma.
    behaviors: (word, stage) pairs, tried before `Behavior.parse`'s aliases; words compare
    in `behavior_key` form ("Add to cart" == "add_to_cart"). A word neither knows follows
    unknown_behavior: "error" (`UnmappedBehaviorError` after the whole file, listing every
    such word), "skip" (its rows are dropped, counted in the report) or a stage name.
    time_format: "unix" (seconds; decimals are floored), "unix-ms", "iso" (ISO 8601) or a
    strptime pattern; a time without a zone is UTC.
    """

    user: str = "user_id"
    item: str = "item_id"
    category: str | None = "category_id"
    behavior: str | None = "behavior"
    ts: str | None = "timestamp"
    delimiter: str | None = None
    default_behavior: Behavior = Behavior.CLICK
    header: bool = True
    behaviors: tuple[tuple[str, Behavior], ...] = ()
    unknown_behavior: str = "error"
    time_format: str = "unix"

    def __post_init__(self) -> None:
        if self.delimiter is not None and len(self.delimiter) != 1:
            raise ValueError(f"the delimiter must be one character, not {self.delimiter!r}")
        if self.time_format not in TIME_FORMATS and "%" not in self.time_format:
            raise ValueError(
                f"time format {self.time_format!r}: expected one of {', '.join(TIME_FORMATS)} "
                "or a strptime pattern such as '%Y-%m-%d %H:%M:%S'"
            )
        if self.unknown_behavior not in UNKNOWN_BEHAVIOR_POLICIES:
            stage(self.unknown_behavior, "unknown behaviour policy")
        if not self.header:
            words = [f"{k}={v!r}" for k, v in self.fields().items() if not v.isdigit()]
            if words:
                raise ValueError(
                    f"without a header, columns are 0-based field numbers: {', '.join(words)}"
                )
        mapped: dict[str, Behavior] = {}
        for word, to in self.behaviors:
            key = behavior_key(word)
            if mapped.setdefault(key, to) != to:
                raise ValueError(
                    f"behaviour word {word!r} is mapped to both {mapped[key].name.lower()} "
                    f"and {Behavior(to).name.lower()}"
                )

    def fields(self) -> dict[str, str]:
        """{field: column} of the fields this map reads, in `COLUMN_FIELDS` order."""
        named = {f: getattr(self, f) for f in COLUMN_FIELDS}
        return {f: column for f, column in named.items() if column is not None}

    @classmethod
    def from_options(
        cls,
        columns: str,
        behaviors: str | None = None,
        delimiter: str | None = None,
        header: bool = True,
        time_format: str = "unix",
        unknown_behavior: str = "error",
    ) -> ColumnMap:
        """The map the command line's --columns, --behaviors, --delimiter, --no-header,
        --time-format and --unknown-behavior describe (`parse_columns`, `parse_behaviors`);
        a missing behavior or category column means none (CLICK, category 0)."""
        named = parse_columns(columns)
        if delimiter is not None:
            delimiter = {"\\t": "\t", "tab": "\t"}.get(delimiter, delimiter)
        return cls(
            **{f: named.get(f) for f in COLUMN_FIELDS},
            delimiter=delimiter,
            header=header,
            behaviors=parse_behaviors(behaviors or ""),
            unknown_behavior=unknown_behavior,
            time_format=time_format,
        )


def stage(name: str, what: str = "behaviour") -> Behavior:
    """The funnel stage a name (or alias) stands for; ValueError naming it otherwise."""
    try:
        found = Behavior.parse(name)
    except ValueError:
        found = Behavior.UNKNOWN
    if found == Behavior.UNKNOWN:  # 0 is padding, never a real event
        stages = ", ".join(b.name.lower() for b in Behavior if b != Behavior.UNKNOWN)
        raise ValueError(f"{what} {name!r} is not a behaviour; the stages are {stages}")
    return found


def parse_columns(text: str) -> dict[str, str]:
    """ "user=customer,item=sku,ts=when[,behavior=action][,category=dept]" -> {field: column}.

    Fields are those of `COLUMN_FIELDS`; user, item and ts are required. A column is a
    header name or, for a file without one, a 0-based field number; it may hold "=" (the
    first one splits) but not ",".
    """
    columns: dict[str, str] = {}
    for part in text.split(","):
        name, equals, column = part.partition("=")
        name, column = name.strip(), column.strip()
        if not equals or not column:
            raise ValueError(f"--columns: {part!r} is not FIELD=COLUMN (in {text!r})")
        if name not in COLUMN_FIELDS:
            raise ValueError(
                f"--columns: unknown field {name!r}; the fields are {', '.join(COLUMN_FIELDS)}"
            )
        if name in columns:
            raise ValueError(f"--columns: {name} is given twice (in {text!r})")
        columns[name] = column
    missing = [name for name in COLUMN_FIELDS[:3] if name not in columns]
    if missing:
        raise ValueError(
            f"--columns: {', '.join(missing)} missing (in {text!r}); user, item and ts are required"
        )
    return columns


def parse_behaviors(text: str) -> tuple[tuple[str, Behavior], ...]:
    """ "click=pv,view;add_to_cart=basket" -> (("pv", CLICK), ("view", CLICK),
    ("basket", ADD_TO_CART)): STAGE=WORD,WORD groups separated by ";", stages by name or
    alias (`stage`), words in `behavior_key` form. A word under two stages is an error."""
    pairs: list[tuple[str, Behavior]] = []
    for group in text.split(";"):
        if not group.strip():
            continue
        name, equals, words = group.partition("=")
        if not equals:
            raise ValueError(f"--behaviors: {group!r} is not STAGE=WORD,WORD,...")
        to = stage(name, "--behaviors: stage")
        for word in words.split(","):
            if not behavior_key(word):
                raise ValueError(f"--behaviors: an empty word in {group!r}")
            pairs.append((behavior_key(word), to))
    ColumnMap(behaviors=tuple(pairs))  # checks that no word goes to two stages
    return tuple(pairs)


_DECIMAL = re.compile(r"[+-]?[0-9]+(\.[0-9]*)?")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_INT64 = (-(2**63), 2**63 - 1)


def parse_time(value: object, time_format: str = "unix") -> int:
    """Unix seconds (floored) of one timestamp under a `ColumnMap.time_format`; a datetime
    (from Parquet) is taken as it is. ValueError names the value and the format."""
    if isinstance(value, datetime):
        moment = value
    else:
        text = str(value).strip()
        if time_format in ("unix", "unix-ms"):
            if not _DECIMAL.fullmatch(text):
                unit = "seconds" if time_format == "unix" else "milliseconds"
                raise ValueError(f"timestamp {text!r} is not a number of {unit} ({time_format})")
            seconds = math.floor(Decimal(text) / (1000 if time_format == "unix-ms" else 1))
            if not _INT64[0] <= seconds <= _INT64[1]:
                raise ValueError(f"timestamp {text!r} is out of range")
            return seconds
        try:
            moment = (
                datetime.fromisoformat(text)
                if time_format == "iso"
                else datetime.strptime(text, time_format)
            )
        except ValueError:
            raise ValueError(
                f"timestamp {text!r} does not match the format {time_format!r}"
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(seconds=1)


# ---------------------------------------------------------------------------- reading


def _open_text(path: Path, encoding: str = "latin-1") -> io.TextIOBase:
    # latin-1 never fails to decode, and MovieLens' u.item is latin-1 (ids are ASCII anyway);
    # tables (a user's own file) are UTF-8, undecodable bytes kept apart by surrogateescape
    errors = "surrogateescape" if encoding.startswith("utf") else "strict"
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding=encoding, errors=errors, newline="")
    return open(path, encoding=encoding, errors=errors, newline="")


def _bar(lines: Iterator[str], path: Path, progress: bool) -> Iterator[str]:
    """A file's lines behind a progress bar that shows only after 2 s."""
    return tqdm(
        lines,
        desc=f"reading {path.name}",
        unit=" lines",
        delay=2.0,
        disable=not progress,
        leave=False,
    )


def _lines(path: Path, progress: bool) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline)."""
    with _open_text(path) as f:
        for number, line in enumerate(_bar(f, path, progress), start=1):
            yield number, line.rstrip("\r\n")


class _Rows:
    """Collects parsed columns and bad rows under one `on_bad_row` policy."""

    def __init__(self, path: Path, fmt: str, on_bad_row: BadRowPolicy):
        if on_bad_row not in ("raise", "skip"):
            raise ValueError(f"on_bad_row must be 'raise' or 'skip', not {on_bad_row!r}")
        self.path, self.on_bad_row = path, on_bad_row
        self.report = LoadReport(path=str(path), fmt=fmt)
        self.user: list = []
        self.item: list = []
        self.category: list = []
        self.behavior: list[int] = []
        self.ts: list[int] = []

    def bad(self, line: int, problem: str, row: str) -> None:
        if self.on_bad_row == "raise":
            raise BadRowError(self.path, line, problem, row)
        self.report.bad_rows += 1
        self.report.bad_lines.append(line)
        if len(self.report.problems) < PROBLEMS_KEPT:
            self.report.problems.append(f"line {line}: {problem}")

    def add(self, user, item, category, behavior: int, ts: int) -> None:
        self.user.append(user)
        self.item.append(item)
        self.category.append(category)
        self.behavior.append(behavior)
        self.ts.append(ts)


def _int(text: str, what: str) -> int:
    try:
        if text.isascii() and "_" not in text:  # int() would take "1_000" and "١٢"
            return int(text)
    except ValueError:
        pass
    raise ValueError(f"{what} {text!r} is not an integer")


def _behavior(text: str) -> int:
    try:
        return int(stage(text))
    except ValueError:
        raise ValueError(f"unknown behaviour {text!r}") from None


def _vocab_column(values: list | np.ndarray) -> tuple[np.ndarray, Vocabulary]:
    """Raw ids -> (indices >= 1, vocabulary in ascending raw-id order). None means unknown (0)."""
    arr = np.asarray(values, dtype=object)
    known = np.array([v is not None for v in arr], dtype=bool)
    out = np.zeros(len(arr), dtype=np.int64)
    if not known.any():
        return out, Vocabulary()
    raw = arr[known]
    if all(isinstance(v, int) for v in raw):
        raw = raw.astype(np.int64)  # numeric order for integer ids
    else:
        raw = raw.astype(str)
    uniq, inverse = np.unique(raw, return_inverse=True)
    out[known] = inverse + 1
    return out, Vocabulary(str(v) for v in uniq)


def _hash_pair(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint64 [N]: a fixed hash of each (a, b) pair of int64 columns (splitmix64's mix):
    an order that follows neither column."""
    x = a.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ b.astype(np.uint64)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _to_log(rows: _Rows, hash_ties: bool = False) -> EventLog:
    """Encode, then sort by (user, ts). np.lexsort is stable, so file order breaks ties; with
    `hash_ties`, a hash of (user, item) does instead, for files whose order within a user
    is not time (see `read_movielens`)."""
    user, users = _vocab_column(rows.user)
    item, items = _vocab_column(rows.item)
    category, categories = _vocab_column(rows.category)
    behavior = np.asarray(rows.behavior, dtype=np.int64)
    ts = np.asarray(rows.ts, dtype=np.int64)
    keys = (_hash_pair(user, item), ts, user) if hash_ties else (ts, user)
    order = np.lexsort(keys)
    rows.report.events = len(order)
    return EventLog(
        user=user[order],
        item=item[order],
        category=category[order],
        behavior=behavior[order],
        ts=ts[order],
        users=users,
        items=items,
        categories=categories,
    )


def read_taobao(
    path: Path | str, on_bad_row: BadRowPolicy = "raise", progress: bool = True
) -> tuple[EventLog, LoadReport]:
    """Taobao UserBehavior CSV: `user_id,item_id,category_id,behavior,timestamp` per line.

    A first line holding exactly these column names is taken as a header and skipped.
    """
    path = Path(path)
    rows = _Rows(path, "taobao", on_bad_row)
    rows.report.time_unit = "unix seconds"
    for number, line in _lines(path, progress):
        parts = line.split(",")
        if number == 1 and parts == ["user_id", "item_id", "category_id", "behavior", "timestamp"]:
            continue
        rows.report.rows += 1
        if len(parts) != 5:
            rows.bad(number, f"expected 5 comma-separated fields, got {len(parts)}", line)
            continue
        try:
            rows.add(
                _int(parts[0], "user id"),
                _int(parts[1], "item id"),
                _int(parts[2], "category id"),
                _behavior(parts[3]),
                _int(parts[4], "timestamp"),
            )
        except ValueError as e:
            rows.bad(number, str(e), line)
    return _to_log(rows), rows.report


def read_s3rec(
    path: Path | str, on_bad_row: BadRowPolicy = "raise", progress: bool = True
) -> tuple[EventLog, LoadReport]:
    """S3-Rec text: `user item item ...` per line; ts = position, category 0, CLICK."""
    path = Path(path)
    rows = _Rows(path, "s3rec", on_bad_row)
    rows.report.time_unit = "positions"
    for number, line in _lines(path, progress):
        parts = line.split()
        rows.report.rows += 1
        if len(parts) < 2:
            rows.bad(number, "expected a user id and at least one item id", line)
            continue
        try:
            user = _int(parts[0], "user id")
            items = [_int(p, "item id") for p in parts[1:]]
        except ValueError as e:
            rows.bad(number, str(e), line)
            continue
        for position, item in enumerate(items):
            rows.add(user, item, None, int(Behavior.CLICK), position)
    return _to_log(rows), rows.report


def _movie_genres(ratings: Path) -> dict[int, str]:
    """Movie id -> genre set ("Comedy|Romance") from u.item / movies.dat / movies.csv beside
    `ratings`."""
    folder = ratings.parent
    names = ("u.item", "u.item.gz", "movies.dat", "movies.dat.gz", "movies.csv", "movies.csv.gz")
    for name in names:
        path = folder / name
        if path.is_file():
            break
    else:
        log.warning("no u.item, movies.dat or movies.csv beside %s: every category is 0", ratings)
        return {}
    genres: dict[int, str] = {}
    if name.startswith("movies.csv"):  # ML latest: a header, then movieId,title,genres
        bad = []
        with _open_text(path) as f:
            for number, parts in enumerate(csv.reader(f), start=1):
                if number == 1:
                    continue
                if len(parts) == 3 and parts[0].isdigit():
                    genres[int(parts[0])] = parts[2]
                else:
                    bad.append(number)
        if bad:  # those movies' ratings keep category 0
            log.warning("%s: %d malformed line(s) skipped: %s", path, len(bad), bad[:20])
        return genres
    if name.startswith("movies"):  # ML-1M: id::title::Genre1|Genre2
        with _open_text(path) as f:
            for line in f:
                parts = line.rstrip("\r\n").split("::")
                if len(parts) == 3:
                    genres[int(parts[0])] = parts[2]
        return genres
    # ML-100K: 19 0/1 flags after 5 text fields; names in u.genre, else the README's list
    names = [
        "unknown",
        "Action",
        "Adventure",
        "Animation",
        "Children's",
        "Comedy",
        "Crime",
        "Documentary",
        "Drama",
        "Fantasy",
        "Film-Noir",
        "Horror",
        "Musical",
        "Mystery",
        "Romance",
        "Sci-Fi",
        "Thriller",
        "War",
        "Western",
    ]
    for genre_file in (folder / "u.genre", folder / "u.genre.gz"):
        if genre_file.is_file():
            with _open_text(genre_file) as f:
                names = [ln.split("|")[0] for ln in f.read().splitlines() if "|" in ln]
            break
    with _open_text(path) as f:
        for line in f:
            parts = line.rstrip("\r\n").split("|")
            if len(parts) >= 5 + len(names):
                flags = parts[5 : 5 + len(names)]
                genres[int(parts[0])] = (
                    "|".join(n for n, g in zip(names, flags, strict=True) if g == "1") or "unknown"
                )
    return genres


def read_movielens(
    path: Path | str, on_bad_row: BadRowPolicy = "raise", progress: bool = True
) -> tuple[EventLog, LoadReport]:
    """MovieLens ratings: `user<TAB>item<TAB>rating<TAB>ts` (u.data), `::`-separated
    (ratings.dat) or `userId,movieId,rating,timestamp` after a header (ratings.csv, ML latest).
    Behaviour CLICK; category = the movie's genre set (see the module doc).

    ratings.csv lists each user's ratings by movieId, not by time, and people rate several
    movies in the same second (22 % of ml-latest-small's consecutive pairs, 19 % of its last
    events): file order would put every such run in ascending movieId, an order a model
    (item-transition: NDCG@10 0.109 on those last events, 0.042 on the others) learns and
    no live stream has. Its ties are broken by a hash of (user, movie) instead."""
    path = Path(path)
    genres = _movie_genres(path)
    rows = _Rows(path, "movielens", on_bad_row)
    rows.report.time_unit = "unix seconds"
    is_csv = path.name.removesuffix(".gz").endswith(".csv")
    for number, line in _lines(path, progress):
        if is_csv and number == 1 and line == "userId,movieId,rating,timestamp":
            continue
        if is_csv:
            parts = line.split(",")
        else:
            parts = line.split("::") if "::" in line else line.split("\t")
        rows.report.rows += 1
        if len(parts) != 4:
            rows.bad(number, f"expected 4 fields (user item rating ts), got {len(parts)}", line)
            continue
        try:
            item = _int(parts[1], "item id")
            rows.add(
                _int(parts[0], "user id"),
                item,
                genres.get(item),
                int(Behavior.CLICK),
                _int(parts[3], "timestamp"),
            )
        except ValueError as e:
            rows.bad(number, str(e), line)
    return _to_log(rows, hash_ties=is_csv), rows.report


def read_foursquare(
    path: Path | str, on_bad_row: BadRowPolicy = "raise", progress: bool = True
) -> tuple[EventLog, LoadReport]:
    """Foursquare check-ins as a numpy array [N, 3] (`user_id, poi_id, minutes`), `.npy` or
    `.npy.gz`: ts = minutes * 60, category 0, CLICK (see the module doc). Rows need not be
    time-sorted: the log is sorted by (user, ts), stably by row."""
    path = Path(path)
    rows = _Rows(path, "foursquare", on_bad_row)
    rows.report.time_unit = "seconds since the first check-in"
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            table = np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise ValueError(f"{path}: not a numpy array file ({err})") from err
    if table.ndim != 2 or table.shape[1] != 3 or not np.issubdtype(table.dtype, np.integer):
        raise ValueError(
            f"{path}: expected an integer array [N, 3] (user_id, poi_id, minutes), "
            f"got {table.dtype} {list(table.shape)}"
        )
    table = table.astype(np.int64)
    rows.report.rows = len(table)
    ok = (table[:, 0] >= 1) & (table[:, 1] >= 1) & (table[:, 2] >= 0)
    for number in np.flatnonzero(~ok) + 1:
        user, poi, minutes = table[number - 1]
        problem = "minute is negative" if user >= 1 and poi >= 1 else "id below 1"
        rows.bad(int(number), problem, f"{user},{poi},{minutes}")
    table = table[ok]
    user, users = _vocab_column(table[:, 0])
    item, items = _vocab_column(table[:, 1])
    ts = table[:, 2] * 60
    order = np.lexsort((ts, user))
    rows.report.events = len(order)
    n = len(order)
    events = EventLog(
        user=user[order],
        item=item[order],
        category=np.zeros(n, np.int64),
        behavior=np.full(n, int(Behavior.CLICK), np.int64),
        ts=ts[order],
        users=users,
        items=items,
        categories=Vocabulary(),
    )
    return events, rows.report


def read_table(
    path: Path | str,
    columns: ColumnMap = ColumnMap(),
    on_bad_row: BadRowPolicy = "raise",
    progress: bool = True,
) -> tuple[EventLog, LoadReport]:
    """A CSV/TSV (plain or gzipped) or Parquet table mapped by `columns`.

    Ids are kept as strings, without surrounding spaces; ts through `parse_time`. Missing or
    empty values, and timestamps that do not parse, are bad rows; behaviour words follow the
    map (see `ColumnMap`), and the report counts every word and what it became. A record's
    line is the line it starts on, the header being line 1; Parquet rows count from 1.
    """
    path = Path(path)
    rows = _Rows(path, "table", on_bad_row)
    rows.report.time_unit = "unix seconds" if columns.ts is not None else "line numbers"
    wanted = columns.fields()
    if ".parquet" in path.suffixes:
        import pyarrow.parquet as pq

        names = pq.read_schema(path).names
        _check_columns(path, wanted, names, "the file's columns are")
        table = pq.read_table(path, columns=list(dict.fromkeys(wanted.values())))
        data = {k: table.column(v).to_pylist() for k, v in wanted.items()}
        records = ((i + 1, {k: data[k][i] for k in wanted}) for i in range(table.num_rows))
    else:
        records = _csv_records(path, columns, wanted, progress)
    stages = _Stages(columns)
    for number, record in records:
        rows.report.rows += 1
        if isinstance(record, str):
            rows.bad(number, record, "")
            continue
        missing = [wanted[k] for k, v in record.items() if v is None or str(v).strip() == ""]
        if missing:
            rows.bad(number, f"missing value in column(s) {missing}", str(record))
            continue
        try:
            ts = parse_time(record["ts"], columns.time_format) if "ts" in record else number
        except ValueError as e:
            rows.bad(number, str(e), str(record))
            continue
        if "behavior" in record:
            behavior = stages(str(record["behavior"]).strip(), number)
            if behavior is None:  # unmapped: dropped here, raised below under "error"
                continue
        else:
            behavior = int(columns.default_behavior)
        rows.add(
            str(record["user"]).strip(),
            str(record["item"]).strip(),
            str(record["category"]).strip() if "category" in record else None,
            behavior,
            ts,
        )
    rows.report.behaviors = stages.words
    unmapped = stages.unmapped()
    if unmapped and columns.unknown_behavior == "error":
        raise UnmappedBehaviorError(path, unmapped)
    return _to_log(rows), rows.report


class _Stages:
    """Behaviour word -> stage code, or None for a word that maps to nothing; counts the
    rows of every word and says where its stage came from (`LoadReport.behaviors`)."""

    def __init__(self, columns: ColumnMap):
        self.mapping = {behavior_key(word): to for word, to in columns.behaviors}
        policy = columns.unknown_behavior
        self.fallback = None if policy in UNKNOWN_BEHAVIOR_POLICIES else stage(policy)
        self.words: dict[str, dict] = {}
        self.codes: dict[str, int | None] = {}

    def __call__(self, word: str, line: int) -> int | None:
        if word not in self.codes:
            key = behavior_key(word)
            alias = BEHAVIOR_ALIASES.get(key, Behavior.UNKNOWN)
            if key in self.mapping:
                to, source = self.mapping[key], "mapping"
            elif alias != Behavior.UNKNOWN:
                to, source = alias, "alias"
            elif self.fallback is not None:
                to, source = self.fallback, "fallback"
            else:
                to, source = None, "unmapped"
            self.codes[word] = None if to is None else int(to)
            self.words[word] = {
                "behavior": None if to is None else Behavior(to).name.lower(),
                "source": source,
                "rows": 0,
                "first_line": line,
            }
        self.words[word]["rows"] += 1
        return self.codes[word]

    def unmapped(self) -> dict[str, dict]:
        return {w: e for w, e in self.words.items() if e["source"] == "unmapped"}


def _check_columns(path: Path, wanted: dict[str, str], names: list[str], has: str) -> None:
    absent = [f"{column!r} ({name})" for name, column in wanted.items() if column not in names]
    if absent:
        raise MissingColumnError(f"{path}: no column {' or '.join(absent)}; {has} {names}")


def _csv_records(
    path: Path, columns: ColumnMap, wanted: dict[str, str], progress: bool
) -> Iterator[tuple[int, dict | str]]:
    """(line number, {field: value}) per record, or (line number, problem); a record's line
    is the one it starts on (a quoted field may span lines)."""
    tsv = path.name.removesuffix(".gz").endswith(".tsv")
    delimiter = columns.delimiter or ("\t" if tsv else ",")
    with _open_text(path, "utf-8-sig") as f:
        reader = csv.reader(_bar(f, path, progress), delimiter=delimiter)
        if columns.header:
            header = next(reader, None)
            if header is None:
                return
            names = [name.strip() for name in header]
            _check_columns(path, wanted, names, "the header (line 1) reads")
            where = {k: names.index(v) for k, v in wanted.items()}
            width, against = len(header), "as in the header"
        else:
            where = {k: int(v) for k, v in wanted.items()}
            width, against = None, "as on line 1"
        start = reader.line_num + 1
        try:
            for fields in reader:
                number, start = start, reader.line_num + 1
                if width is None:  # no header: the first line sets the width
                    width = len(fields)
                    beyond = [f"{i} ({k})" for k, i in where.items() if i >= width]
                    if beyond:
                        raise MissingColumnError(
                            f"{path}: no field {' or '.join(beyond)}; line 1 has {width} "
                            f"fields (numbered from 0): {fields}"
                        )
                if len(fields) != width:
                    yield number, f"expected {width} fields {against}, got {len(fields)}"
                else:
                    yield number, {k: fields[i] for k, i in where.items()}
        except csv.Error as err:  # e.g. a quote never closed runs past the field size limit
            raise DataError(f"{path}:{start}: unreadable as CSV from here on ({err})") from None


READERS = {
    "taobao": read_taobao,
    "s3rec": read_s3rec,
    "movielens": read_movielens,
    "foursquare": read_foursquare,
}


def detect_format(path: Path | str) -> str:
    """Format from the file name: *.parquet -> table, u.data*/ratings.dat*/ratings.csv ->
    movielens, *.npy -> foursquare, *.txt -> s3rec, *.csv -> taobao (pass fmt="table" with a
    ColumnMap for other CSVs)."""
    name = Path(path).name.removesuffix(".gz")
    if name.endswith(".parquet"):
        return "table"
    if name.startswith(("u.data", "ratings.dat")) or name == "ratings.csv":
        return "movielens"
    if name.endswith(".npy"):
        return "foursquare"
    if name.endswith(".txt"):
        return "s3rec"
    if name.endswith(".csv"):
        return "taobao"
    raise ValueError(f"cannot tell the format of {path}; pass fmt= one of {FORMATS}")


def read_events(
    path: Path | str,
    fmt: str | None = None,
    columns: ColumnMap | None = None,
    on_bad_row: BadRowPolicy = "raise",
    progress: bool = True,
) -> tuple[EventLog, LoadReport]:
    """Parse one file (no cache). fmt None: from the name, or "table" when columns is given."""
    path = Path(path)
    fmt = fmt or ("table" if columns is not None else detect_format(path))
    start = time.perf_counter()
    if fmt == "table":
        events, report = read_table(path, columns or ColumnMap(), on_bad_row, progress)
    elif fmt in READERS:
        events, report = READERS[fmt](path, on_bad_row, progress)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    report.seconds = time.perf_counter() - start
    if report.bad_rows:
        log.warning(
            "%s: skipped %d bad row(s) at line(s) %s: %s",
            path,
            report.bad_rows,
            report.bad_lines[:20],
            "; ".join(report.problems[:3]),
        )
    return events, report


# ---------------------------------------------------------------------------- named + cache


def shared_data_dir(shared_data: Path | str | None = None) -> Path:
    """The argument, else $HYTREC_SHARED_DATA, else ../shared/data beside the repository."""
    if shared_data is None:
        shared_data = os.environ.get("HYTREC_SHARED_DATA", REPO_ROOT / ".." / "shared" / "data")
    return Path(shared_data).resolve()


def cache_dir(cache: Path | str | None = None) -> Path:
    """The argument, else $HYTREC_CACHE, else .cache/hytrec under the repository root."""
    if cache is not None:
        return Path(cache)
    return Path(os.environ.get("HYTREC_CACHE", REPO_ROOT / ".cache" / "hytrec"))


def resolve(
    name_or_path: str | Path, shared_data: Path | str | None = None
) -> tuple[Path, str | None]:
    """(file path, format or None to detect) for a name of `DATASETS` or a path."""
    if str(name_or_path) in DATASETS:
        rel, fmt = DATASETS[str(name_or_path)]
        path = shared_data_dir(shared_data) / rel
        if not path.is_file():
            raise DatasetNotFoundError(
                f"dataset {name_or_path!r}: {path} is absent (set "
                f"HYTREC_SHARED_DATA or pass shared_data=)"
            )
        return path, fmt
    path = Path(name_or_path)
    if not path.is_file():
        raise DatasetNotFoundError(
            f"{path} is neither a file nor a dataset name ({', '.join(DATASETS)})"
        )
    return path, None


def _cache_key(path: Path, options: dict) -> str:
    st = path.stat()
    key = {
        "path": str(path.resolve()),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "version": CACHE_VERSION,
        **options,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def load_with_report(
    name_or_path: str | Path,
    *,
    fmt: str | None = None,
    columns: ColumnMap | None = None,
    on_bad_row: BadRowPolicy = "raise",
    shared_data: Path | str | None = None,
    cache: bool = True,
    cache_path: Path | str | None = None,
    progress: bool = True,
) -> tuple[EventLog, LoadReport]:
    """`load_dataset`, also returning the `LoadReport` (report.cached tells a cache hit)."""
    path, named_fmt = resolve(name_or_path, shared_data)
    fmt = fmt or ("table" if columns is not None else named_fmt or detect_format(path))
    if not cache:
        return read_events(path, fmt, columns, on_bad_row, progress)
    options = {
        "fmt": fmt,
        "columns": asdict(columns) if columns else None,
        "on_bad_row": on_bad_row,
    }
    # dots would confuse EventLog.save's with_suffix, so the stem has none
    stem = cache_dir(cache_path) / (
        path.name.replace(".", "_") + "-" + _cache_key(path, options)[:20]
    )
    report_file = stem.with_suffix(".report.json")
    start = time.perf_counter()
    if report_file.is_file():  # written last, so its presence means a complete entry
        events = EventLog.load(stem)
        report = LoadReport(**json.loads(report_file.read_text()))
        report.cached, report.seconds = True, time.perf_counter() - start
        return events, report
    events, report = read_events(path, fmt, columns, on_bad_row, progress)
    # write under a private name, then rename: concurrent loaders never see half an entry
    tmp = stem.with_name(f"{stem.name}-tmp{os.getpid()}")
    events.save(tmp)
    for suffix in (".npz", ".vocab.json"):
        os.replace(tmp.with_suffix(suffix), stem.with_suffix(suffix))
    tmp_report = tmp.with_suffix(".report.json")
    tmp_report.write_text(json.dumps(asdict(report)))
    os.replace(tmp_report, report_file)
    return events, report


def load_dataset(
    name_or_path: str | Path,
    *,
    fmt: str | None = None,
    columns: ColumnMap | None = None,
    on_bad_row: BadRowPolicy = "raise",
    shared_data: Path | str | None = None,
    cache: bool = True,
    cache_path: Path | str | None = None,
    progress: bool = True,
) -> EventLog:
    """The `EventLog` of a dataset name (`DATASETS`, in the shared data folder) or a file.

    fmt: one of `FORMATS`, else from the name (`detect_format`). columns: for fmt="table".
    on_bad_row: "raise" (a `BadRowError`) or "skip" (dropped, counted and logged).
    cache: reuse/write the parsed log under `cache_dir(cache_path)`.
    """
    events, _ = load_with_report(
        name_or_path,
        fmt=fmt,
        columns=columns,
        on_bad_row=on_bad_row,
        shared_data=shared_data,
        cache=cache,
        cache_path=cache_path,
        progress=progress,
    )
    return events


def _saved_log(name_or_path: str | Path) -> Path | None:
    """The stem of a saved `EventLog` given as STEM or STEM.npz, else None."""
    path = Path(name_or_path)
    if path.suffix == ".npz" and path.is_file():
        return path
    if not path.is_file() and path.with_suffix(".npz").is_file():
        return path
    return None


def load_named_with_report(
    name_or_path: str | Path,
    columns: ColumnMap | None = None,
    shared_data: Path | str | None = None,
    cache: bool = True,
    progress: bool = True,
) -> tuple[EventLog, LoadReport]:
    """`load_named`, also returning the `LoadReport` (a saved EventLog's says its size)."""
    saved = _saved_log(name_or_path)
    if saved is not None:
        if columns is not None:
            raise DataError(f"{name_or_path} is a saved EventLog: --columns is for CSV/TSV files")
        events = EventLog.load(saved)
        report = LoadReport(str(name_or_path), "eventlog", len(events), len(events))
        report.time_unit = "as saved"
        return events, report
    return load_with_report(
        name_or_path,
        columns=columns,
        on_bad_row="skip",
        shared_data=shared_data,
        cache=cache,
        progress=progress,
    )


def load_named(
    name_or_path: str | Path,
    shared_data: Path | str | None = None,
    columns: ColumnMap | None = None,
    progress: bool = True,
) -> EventLog:
    """A dataset for the commands (every `--dataset`): a saved `EventLog` (`EventLog.save`,
    STEM or STEM.npz), a table read through `columns` (a user's own CSV/TSV/Parquet file),
    or a name or file for `load_dataset`; bad rows are skipped and logged (the Taobao head
    file ends with a truncated row), unmapped behaviour words raise unless `columns` says
    what to do with them."""
    return load_named_with_report(name_or_path, columns, shared_data, progress=progress)[0]


def summary(events: EventLog, report: LoadReport) -> dict:
    """What a load read, for `hytrec data inspect`: counts, events per user (history
    length), the time span (as UTC dates for unix seconds), the bad rows and how each
    behaviour word mapped."""
    per_user = np.bincount(events.user)[1:]
    per_user = per_user[per_user > 0]
    quantiles = {"min": 0.0, "p50": 0.5, "p90": 0.9, "p99": 0.99, "max": 1.0}
    lengths = {
        name: int(np.quantile(per_user, q, method="inverted_cdf")) if len(per_user) else 0
        for name, q in quantiles.items()
    }
    span: dict = {"unit": report.time_unit}
    if len(events):
        # p1 and p99 show a few events far from the others (they stretch the time span)
        times = {"first": 0.0, "p1": 0.01, "p99": 0.99, "last": 1.0}
        span |= {k: int(np.quantile(events.ts, q, method="inverted_cdf")) for k, q in times.items()}
        if report.time_unit == "unix seconds":
            span |= {f"{k}_date": utc_date(span[k]) for k in times}
            span["days"] = round((span["last"] - span["first"]) / 86400, 2)
    by_stage = np.bincount(events.behavior, minlength=len(Behavior))
    words = report.behaviors
    return {
        "file": report.path,
        "format": report.fmt,
        "rows": report.rows,
        "events": len(events),
        "users": len(per_user),
        "items": len(np.unique(events.item[events.item > 0])),
        "categories": len(np.unique(events.category[events.category > 0])),
        "events_without_category": int((events.category == 0).sum()),
        "history_length": lengths,
        "time": span,
        "bad_rows": {
            "count": report.bad_rows,
            "lines": report.bad_lines[:100],
            "first": report.problems,
        },
        "behavior_words": words,
        "unmapped_words": {w: e for w, e in words.items() if e["source"] == "unmapped"},
        "events_by_behavior": {
            Behavior(b).name.lower(): int(n) for b, n in enumerate(by_stage) if n
        },
    }


def utc_date(ts: int) -> str:
    """Unix seconds as "YYYY-MM-DD HH:MM:SS UTC"."""
    try:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"{ts} (not a date)"


def summary_text(s: dict) -> str:
    """`summary` as the lines `hytrec data inspect` prints."""
    lengths, span, bad = s["history_length"], s["time"], s["bad_rows"]
    lines = [
        f"{s['file']} ({s['format']}): {s['rows']:,} rows -> {s['events']:,} events",
        f"users {s['users']:,}, items {s['items']:,}, categories {s['categories']:,} "
        f"({s['events_without_category']:,} events without one)",
        "events per user: " + ", ".join(f"{k} {v:,}" for k, v in lengths.items()),
    ]
    if "first_date" in span:
        lines.append(f"time: {span['first_date']} .. {span['last_date']} ({span['days']} days)")
        lines.append(f"  98 % of the events: {span['p1_date']} .. {span['p99_date']}")
    elif "first" in span:
        lines.append(f"time: {span['first']} .. {span['last']} ({span['unit']})")
        lines.append(f"  98 % of the events: {span['p1']} .. {span['p99']}")
    lines.append(f"bad rows: {bad['count']:,}" + (" (skipped)" if bad["count"] else ""))
    lines += [f"  {problem}" for problem in bad["first"]]
    if bad["count"] > len(bad["first"]):
        lines.append(f"  ... and {bad['count'] - len(bad['first']):,} more")
    if s["behavior_words"]:
        lines.append("behaviour words -> behaviour (rows, where the mapping came from):")
        ordered = sorted(s["behavior_words"].items(), key=lambda kv: -kv[1]["rows"])
        for word, e in ordered[:20]:
            to = e["behavior"] or "UNMAPPED"
            lines.append(f"  {word!r} -> {to} ({e['rows']:,}, {e['source']})")
        if len(ordered) > 20:
            lines.append(f"  ... and {len(ordered) - 20:,} more words")
    unmapped = s["unmapped_words"]
    if unmapped:
        rows = sum(e["rows"] for e in unmapped.values())
        lines.append(
            f"unmapped: {len(unmapped):,} word(s) in {rows:,} rows, left out of the events; "
            "--behaviors STAGE=WORD,... maps them, --unknown-behavior skip|STAGE decides for them"
        )
    lines.append(
        "events by behaviour: "
        + ", ".join(f"{k} {v:,}" for k, v in s["events_by_behavior"].items())
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- filters


@dataclass(frozen=True)
class FilterConfig:
    """Which users and items `apply_filters` removes, in this order.

    time_window: keep events with start <= ts < end (e.g. `TAOBAO_WINDOW`); None keeps all.
    scalper_*: a user with more events than max(scalper_min_events, the scalper_quantile of
        events per user) and no ADD_TO_CART or PAYMENT is a scalper/crawler-like account.
        Skipped when the log has no conversions at all (S3-Rec, MovieLens: all CLICK).
    inactive_fraction: a user whose last event is older than this fraction of the log's time
        range, counted back from the log's last event, is inactive (0.25: nothing in the last
        quarter). None skips it; meaningless for position timestamps (S3-Rec).
    min_events: users with fewer events are cold-start (after the steps above).
    min_item_events: items seen fewer times are dropped, alternating with min_events until
        both hold (k-core), at most `max_core_rounds` rounds. 0 skips it.
    compact: re-index the vocabularies to the ids that remain.
    """

    time_window: tuple[int, int] | None = None
    scalper_quantile: float = 0.999
    scalper_min_events: int = 1000
    inactive_fraction: float | None = None
    min_events: int = 5
    min_item_events: int = 0
    max_core_rounds: int = 20
    compact: bool = True


@dataclass
class FilterStep:
    name: str
    users_removed: int
    events_removed: int
    users_left: int
    events_left: int


@dataclass
class FilterReport:
    users_before: int
    events_before: int
    steps: list[FilterStep] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.users_before} users, {self.events_before} events"]
        lines += [
            f"  {s.name}: -{s.users_removed} users, -{s.events_removed} events -> "
            f"{s.users_left} users, {s.events_left} events"
            for s in self.steps
        ]
        return "\n".join(lines)


def select(events: EventLog, keep: np.ndarray) -> EventLog:
    """The events where the boolean mask `keep` [N] is True, vocabularies unchanged."""
    return EventLog(
        user=events.user[keep],
        item=events.item[keep],
        category=events.category[keep],
        behavior=events.behavior[keep],
        ts=events.ts[keep],
        users=events.users,
        items=events.items,
        categories=events.categories,
    )


def compact(events: EventLog) -> EventLog:
    """Re-index users, items and categories to the ids present (order kept, 0 stays 0)."""
    columns, vocabs = {}, {}
    for col, vocab in (("user", "users"), ("item", "items"), ("category", "categories")):
        values, old = getattr(events, col), getattr(events, vocab)
        used = np.unique(values[values > 0])
        mapping = np.zeros(len(old), dtype=np.int64)
        mapping[used] = np.arange(1, len(used) + 1)
        columns[col] = mapping[values]
        vocabs[vocab] = Vocabulary(old.raw(int(i)) for i in used)
    return EventLog(behavior=events.behavior, ts=events.ts, **columns, **vocabs)


def _users(events: EventLog) -> int:
    return len(np.unique(events.user))


def apply_filters(
    events: EventLog, config: FilterConfig = FilterConfig()
) -> tuple[EventLog, FilterReport]:
    """Apply `config` step by step; the report says what each step removed."""
    report = FilterReport(_users(events), len(events))

    def step(name: str, keep: np.ndarray) -> None:
        nonlocal events
        users = _users(events)
        before = len(events)
        events = select(events, keep)
        report.steps.append(
            FilterStep(
                name, users - _users(events), before - len(events), _users(events), len(events)
            )
        )

    if config.time_window is not None:
        lo, hi = config.time_window
        step(f"outside time window [{lo}, {hi})", (events.ts >= lo) & (events.ts < hi))

    conversion = np.isin(events.behavior, [Behavior.ADD_TO_CART, Behavior.PAYMENT])
    if len(events) and conversion.any():
        counts = np.bincount(events.user, minlength=len(events.users))
        converted = np.bincount(events.user, weights=conversion, minlength=len(counts)) > 0
        active = counts[counts > 0]
        limit = max(config.scalper_min_events, np.quantile(active, config.scalper_quantile))
        scalper = (counts > limit) & ~converted
        step(f"scalper-like (> {limit:.0f} events, no cart/buy)", ~scalper[events.user])

    if config.inactive_fraction is not None and len(events):
        t0, t1 = int(events.ts.min()), int(events.ts.max())
        since = t1 - config.inactive_fraction * (t1 - t0)
        last = np.full(len(events.users), np.iinfo(np.int64).min)
        np.maximum.at(last, events.user, events.ts)
        step(
            f"inactive (no event in the last {config.inactive_fraction:.0%} of the range)",
            last[events.user] >= since,
        )

    for round_ in range(config.max_core_rounds if config.min_item_events else 1):
        counts = np.bincount(events.user, minlength=len(events.users))
        step(
            f"cold-start (< {config.min_events} events)"
            + (f", round {round_ + 1}" if round_ else ""),
            counts[events.user] >= config.min_events,
        )
        if not config.min_item_events:
            break
        items = np.bincount(events.item, minlength=len(events.items))
        rare = items[events.item] < config.min_item_events
        if not rare.any():
            break
        step(f"rare items (< {config.min_item_events} events), round {round_ + 1}", ~rare)
    if config.compact:
        events = compact(events)
    return events, report


# ---------------------------------------------------------------------------- splits


def user_bounds(events: EventLog) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user index [U], start [U], stop [U]) of each user's contiguous run in the log."""
    if len(events) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.r_[True, events.user[1:] != events.user[:-1]])
    stops = np.r_[starts[1:], len(events)]
    return events.user[starts], starts.astype(np.int64), stops.astype(np.int64)


SESSION_GAP_S = 1800  # 30 minutes: the common convention (WAVE2-MODELS.md, HPGR)


def sessionize(events: EventLog, gap_s: float = SESSION_GAP_S) -> tuple[np.ndarray, np.ndarray]:
    """(session id, position in its session), int64 [N] each, for the events of a log sorted
    by (user, ts). A session starts at a user's first event and wherever the gap to the
    previous event exceeds `gap_s`; ids count from each user's first session (0), so an
    event's session is fixed when it arrives."""
    n = len(events)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    first = np.r_[True, events.user[1:] != events.user[:-1]]  # [N] a user's first event
    new = first | np.r_[False, np.diff(events.ts) > gap_s]  # [N] a session's first event
    count = np.cumsum(new)  # sessions so far in the whole log, 1-based
    user_base = np.maximum.accumulate(np.where(first, count, 0))  # count at the user's start
    start_of = np.maximum.accumulate(np.where(new, np.arange(n), 0))  # its session's start
    return (count - user_base).astype(np.int64), (np.arange(n) - start_of).astype(np.int64)


def timestamps_are_positions(events: EventLog) -> bool:
    """Whether every user's ts is 0, 1, 2, ...: the position, not a time (the S3-Rec files,
    Beauty and Sports), so there are no sessions to cut."""
    n = len(events)
    first = np.r_[True, events.user[1:] != events.user[:-1]] if n else np.zeros(0, bool)
    start_of = np.maximum.accumulate(np.where(first, np.arange(n), 0)) if n else first
    return bool(n) and np.array_equal(events.ts, np.arange(n) - start_of)


def has_categories(events: EventLog) -> bool:
    """Whether any event has a known category (index > 0; 0 is unknown)."""
    return bool((events.category > 0).any())


def require_categories(events: EventLog, what: str) -> None:
    """Refuse a log without item categories for something that predicts them."""
    if not has_categories(events):
        raise DataError(
            f"{what} predicts the next category and retrieves items inside it, and this "
            "dataset has no item categories (every event's category is unknown, as in the "
            "shared foursquare, beauty and sports files). Use a dataset with categories "
            "(taobao, ml100k, ml-latest, or a file of your own with a category column)"
        )


def require_timestamps(events: EventLog, what: str) -> None:
    """Refuse a log whose timestamps are positions for something that cuts sessions."""
    if timestamps_are_positions(events):
        raise DataError(
            f"{what} cuts histories into sessions by the time between events, and this "
            "dataset has no times: its timestamps are each event's position in its user's "
            "history (the S3-Rec files beauty and sports). Use a dataset with timestamps "
            "(taobao, foursquare, ml100k, ml-latest, or a file of your own with a ts column)"
        )


@dataclass(frozen=True)
class TemporalSplit:
    """A global time cut, one row per user; arrays int64 [U], indices into the `EventLog`.

    training:   events with ts < valid_cut: start .. train_stop-1
    validation: targets train_stop .. valid_stop-1 (valid_cut <= ts < test_cut)
    test:       targets valid_stop .. stop-1 (ts >= test_cut)
    The input of a target i is start .. i-1 of its user: the training events and the
    events after the cut that happened before it (the streaming protocol); never i itself
    or anything later. Only users with at least one training event are scored.
    """

    user: np.ndarray
    start: np.ndarray
    train_stop: np.ndarray
    valid_stop: np.ndarray
    stop: np.ndarray
    valid_cut: int
    test_cut: int
    name: str = "temporal"

    def targets(self, which: str, first_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(input start, target index) for "valid" or "test", every event of the period or
        (first_only) each user's first one; the input is start .. target-1."""
        lo, hi = {
            "valid": (self.train_stop, self.valid_stop),
            "test": (self.valid_stop, self.stop),
        }[which]
        scored = (self.train_stop > self.start) & (hi > lo)
        lo, hi, start = lo[scored], hi[scored], self.start[scored]
        if first_only:
            return start, lo
        counts = hi - lo
        target = np.repeat(lo - np.cumsum(np.r_[0, counts[:-1]]), counts) + np.arange(counts.sum())
        return np.repeat(start, counts), target

    def train_mask(self, n: int) -> np.ndarray:
        """Boolean [n]: the log events that training may read."""
        return _ranges_mask(n, self.start, self.train_stop)


def temporal_split(
    events: EventLog,
    test_cut: int | None = None,
    valid_cut: int | None = None,
    test_quantile: float = 0.9,
    valid_quantile: float | None = None,
) -> TemporalSplit:
    """Split at global times; a cut left None is the given quantile of all timestamps
    (valid_cut defaults to test_cut, i.e. no validation period)."""
    if test_cut is None:
        test_cut = int(np.quantile(events.ts, test_quantile))
    if valid_cut is None:
        valid_cut = (
            int(np.quantile(events.ts, valid_quantile)) if valid_quantile is not None else test_cut
        )
    if valid_cut > test_cut:
        raise ValueError(f"valid_cut {valid_cut} is after test_cut {test_cut}")
    user, start, stop = user_bounds(events)

    # ts is sorted within each user's run, so a count per run gives the cut position
    def count_before(cut: int) -> np.ndarray:
        if not len(start):
            return start
        return np.add.reduceat((events.ts < cut).astype(np.int64), start)

    before_valid, before_test = count_before(valid_cut), count_before(test_cut)
    return TemporalSplit(
        user=user,
        start=start,
        train_stop=start + before_valid,
        valid_stop=start + before_test,
        stop=stop,
        valid_cut=valid_cut,
        test_cut=test_cut,
    )


def _ranges_mask(n: int, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    delta = np.zeros(n + 1, dtype=np.int64)
    np.add.at(delta, start, 1)
    np.add.at(delta, stop, -1)
    return np.cumsum(delta[:-1]) > 0
