"""Data: real-log loaders, the on-disk cache, user filters and train/valid/test splits.

Every loader returns the canonical `EventLog` of `hytrec.model.events`: columns of length N
(user, item, category, behavior, ts; int64), sorted by (user, ts) and stable with respect to
file order, so events with equal timestamps keep the order in which the file lists them.
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
- Any CSV/Parquet table through a `ColumnMap` (which column holds what; missing category ->
  0, missing behaviour -> a default, missing ts -> position in the file).

Bad rows (too few fields, non-integer id or timestamp, unknown behaviour, ...) raise
`BadRowError` naming the file, line and problem; `on_bad_row="skip"` drops them and the
`LoadReport` lists the line numbers (also logged as a warning).

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
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from hytrec.model.events import Behavior, EventLog, Vocabulary

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
CACHE_VERSION = 1


class BadRowError(ValueError):
    """A row that cannot be parsed; the message names the file, the line and the problem."""

    def __init__(self, path: Path | str, line: int, problem: str, row: str = ""):
        self.path, self.line, self.problem, self.row = str(path), line, problem, row
        shown = f" (row: {row[:80]!r})" if row else ""
        super().__init__(
            f"{path}:{line}: {problem}{shown}; pass on_bad_row='skip' to drop such rows"
        )


@dataclass
class LoadReport:
    """What a load read: rows parsed, events kept, and the bad rows skipped (1-based lines;
    for Parquet, 1-based row numbers)."""

    path: str
    fmt: str
    rows: int = 0
    events: int = 0
    bad_rows: int = 0
    bad_lines: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the first few, for the log
    seconds: float = 0.0
    cached: bool = False


@dataclass(frozen=True)
class ColumnMap:
    """Which columns of a CSV/Parquet table hold the event fields.

    category, behavior and ts may be None: category -> 0 (unknown), behavior ->
    `default_behavior`, ts -> the row's position in the table (stable order by file).
    CSV files need a header row naming the columns.
    """

    user: str = "user_id"
    item: str = "item_id"
    category: str | None = "category_id"
    behavior: str | None = "behavior"
    ts: str | None = "timestamp"
    delimiter: str = ","
    default_behavior: Behavior = Behavior.CLICK


# ---------------------------------------------------------------------------- reading


def _open_text(path: Path) -> io.TextIOBase:
    # latin-1 never fails to decode, and MovieLens' u.item is latin-1 (ids are ASCII anyway)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="latin-1", newline="")
    return open(path, encoding="latin-1", newline="")


def _lines(path: Path, progress: bool) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline); the bar shows only after 2 s."""
    with _open_text(path) as f:
        bar = tqdm(
            f,
            desc=f"reading {path.name}",
            unit=" lines",
            delay=2.0,
            disable=not progress,
            leave=False,
        )
        for number, line in enumerate(bar, start=1):
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
        if len(self.report.problems) < 10:
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
        stage = Behavior.parse(text)
    except ValueError:
        stage = Behavior.UNKNOWN
    if stage == Behavior.UNKNOWN:  # 0 is padding, never a real event
        raise ValueError(f"unknown behaviour {text!r}")
    return int(stage)


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


def _to_log(rows: _Rows) -> EventLog:
    """Encode, then sort by (user, ts); np.lexsort is stable, so file order breaks ties."""
    user, users = _vocab_column(rows.user)
    item, items = _vocab_column(rows.item)
    category, categories = _vocab_column(rows.category)
    behavior = np.asarray(rows.behavior, dtype=np.int64)
    ts = np.asarray(rows.ts, dtype=np.int64)
    order = np.lexsort((ts, user))
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
    Behaviour CLICK; category = the movie's genre set (see the module doc)."""
    path = Path(path)
    genres = _movie_genres(path)
    rows = _Rows(path, "movielens", on_bad_row)
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
    return _to_log(rows), rows.report


def read_foursquare(
    path: Path | str, on_bad_row: BadRowPolicy = "raise", progress: bool = True
) -> tuple[EventLog, LoadReport]:
    """Foursquare check-ins as a numpy array [N, 3] (`user_id, poi_id, minutes`), `.npy` or
    `.npy.gz`: ts = minutes * 60, category 0, CLICK (see the module doc). Rows need not be
    time-sorted: the log is sorted by (user, ts), stably by row."""
    path = Path(path)
    rows = _Rows(path, "foursquare", on_bad_row)
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
    """A CSV (with a header row) or Parquet table mapped by `columns`.

    Ids are kept as strings; ts must be integers (unix seconds or any ordered integer).
    Missing or empty values are bad rows. Line numbers count the header as line 1 (CSV);
    Parquet rows are numbered from 1.
    """
    path = Path(path)
    rows = _Rows(path, "table", on_bad_row)
    wanted = {
        "user": columns.user,
        "item": columns.item,
        "category": columns.category,
        "behavior": columns.behavior,
        "ts": columns.ts,
    }
    wanted = {k: v for k, v in wanted.items() if v is not None}
    if ".parquet" in path.suffixes:
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=list(dict.fromkeys(wanted.values())))
        data = {k: table.column(v).to_pylist() for k, v in wanted.items()}
        records = ((i + 1, {k: data[k][i] for k in wanted}) for i in range(table.num_rows))
    else:
        records = _csv_records(path, columns, wanted, progress)
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
            behavior = (
                _behavior(str(record["behavior"]))
                if "behavior" in record
                else int(columns.default_behavior)
            )
            ts = _int(str(record["ts"]), "timestamp") if "ts" in record else number
            rows.add(
                str(record["user"]),
                str(record["item"]),
                str(record["category"]) if "category" in record else None,
                behavior,
                ts,
            )
        except ValueError as e:
            rows.bad(number, str(e), str(record))
    return _to_log(rows), rows.report


def _csv_records(
    path: Path, columns: ColumnMap, wanted: dict[str, str], progress: bool
) -> Iterator[tuple[int, dict | str]]:
    """(line number, {field: value}) per data line, or (line number, problem)."""
    lines = _lines(path, progress)
    try:
        _, header_line = next(lines)
    except StopIteration:
        return
    header = next(csv.reader([header_line], delimiter=columns.delimiter))
    absent = [v for v in wanted.values() if v not in header]
    if absent:
        raise ValueError(f"{path}: header {header} lacks the column(s) {absent}")
    where = {k: header.index(v) for k, v in wanted.items()}
    for number, line in lines:
        fields = next(csv.reader([line], delimiter=columns.delimiter), [])
        if len(fields) != len(header):
            yield number, f"expected {len(header)} fields as in the header, got {len(fields)}"
        else:
            yield number, {k: fields[i] for k, i in where.items()}


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
            raise FileNotFoundError(
                f"dataset {name_or_path!r}: {path} is absent (set "
                f"HYTREC_SHARED_DATA or pass shared_data=)"
            )
        return path, fmt
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
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
    fmt = fmt or named_fmt or ("table" if columns is not None else detect_format(path))
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


def load_named(name_or_path: str | Path, shared_data: Path | str | None = None) -> EventLog:
    """A dataset for the commands: a saved `EventLog` (`EventLog.save`, STEM or STEM.npz), or
    a name or file for `load_dataset` with bad rows skipped (the Taobao head file ends with a
    truncated row) and logged."""
    if Path(name_or_path).with_suffix(".npz").is_file():
        return EventLog.load(Path(name_or_path))
    return load_dataset(name_or_path, shared_data=shared_data, on_bad_row="skip")


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
