"""A user's own event file from the command line: `hytrec data inspect|convert`, and
--columns (with --behaviors, --time-format, ...) on every command that takes a dataset.

The file here speaks its own language: `customer,sku,when,action,dept`, actions view, basket
and order, ISO times; the expected figures are computed from the rows in plain Python."""

from __future__ import annotations

import calendar
import gzip
import json
import math
import tempfile
from datetime import UTC, datetime, timedelta, timezone
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hytrec.cli import build_parser, main
from hytrec.model.cli import column_map
from hytrec.model.data import (
    COLUMN_FIELDS,
    ColumnMap,
    DataError,
    MissingColumnError,
    UnmappedBehaviorError,
    load_named,
    load_named_with_report,
    parse_behaviors,
    parse_columns,
    parse_time,
    read_table,
)
from hytrec.model.events import Behavior, EventLog, behavior_key

COLUMNS = "user=customer,item=sku,ts=when,behavior=action,category=dept"
BEHAVIORS = "product_click=view;add_to_cart=basket;payment=order"
STAGE = {"view": Behavior.PRODUCT_CLICK, "basket": Behavior.ADD_TO_CART, "order": Behavior.PAYMENT}
OPTIONS = ["--columns", COLUMNS, "--behaviors", BEHAVIORS, "--time-format", "iso"]
TINY = '{"d_model": 16, "long_layers": 2, "softmax_every": 2, "short_window": 8, "dropout": 0}'
FAST = settings(
    max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


def shop_rows(users: int = 24, seed: int = 0) -> list[tuple[str, str, datetime, str, str]]:
    """(customer, sku, when, action, dept) rows in no particular order, 6 to 12 per customer."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        when = datetime(2024, 3, 1, tzinfo=UTC) + timedelta(hours=int(rng.integers(0, 48)))
        for k in range(6 + u % 7):
            when += timedelta(minutes=int(rng.integers(1, 600)))
            sku = int(rng.integers(0, 30))
            rows.append(
                (
                    f"cust{u:02d}",
                    f"sku-{sku:03d}",
                    when,
                    ("view", "basket", "order")[k % 3],
                    f"dept{sku % 5}",
                )
            )
    return [rows[i] for i in rng.permutation(len(rows))]


BAD = {4: "cust01,sku-001,yesterday,view,dept1", 9: "cust02,sku-002"}  # line -> bad row


def write_shop(path: Path, rows) -> Path:
    """The CSV with a header and the `BAD` rows at their lines."""
    lines = [f"{c},{s},{w.isoformat().replace('+00:00', 'Z')},{a},{d}" for c, s, w, a, d in rows]
    for line in sorted(BAD):
        lines.insert(line - 2, BAD[line])  # line 1 is the header
    path.write_text("customer,sku,when,action,dept\n" + "".join(line + "\n" for line in lines))
    return path


def raw_events(log: EventLog) -> list[tuple[str, str, str, int, int]]:
    return [
        (log.users.raw(u), log.items.raw(i), log.categories.raw(c), int(b), int(t))
        for u, i, c, b, t in zip(
            log.user, log.item, log.category, log.behavior, log.ts, strict=True
        )
    ]


def expected_events(rows) -> list[tuple[str, str, str, int, int]]:
    """What the loader must give: sorted by (user, time), ties in file order."""
    order = sorted(range(len(rows)), key=lambda i: (rows[i][0], rows[i][2], i))
    return [
        (c, s, d, int(STAGE[a]), int(w.timestamp())) for c, s, w, a, d in (rows[i] for i in order)
    ]


def order_statistic(values: list[int], q: float) -> int:
    """The smallest value with at least a share q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


# ---------------------------------------------------------------------------- the CLI path


def test_inspect_prints_and_writes_the_summary_of_a_foreign_csv(tmp_path, capsys):
    rows = shop_rows()
    path = write_shop(tmp_path / "shop.csv", rows)
    assert main(["data", "inspect", str(path), *OPTIONS, "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    s = json.loads((tmp_path / "s.json").read_text())

    per_user = [sum(r[0] == c for r in rows) for c in sorted({r[0] for r in rows})]
    assert (s["rows"], s["events"], s["users"], s["items"], s["categories"]) == (
        len(rows) + 2,
        len(rows),
        len({r[0] for r in rows}),
        len({r[1] for r in rows}),
        len({r[4] for r in rows}),
    )
    assert s["history_length"] == {
        name: order_statistic(per_user, q)
        for name, q in (("min", 0), ("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1))
    }
    first, last = min(r[2] for r in rows), max(r[2] for r in rows)
    assert s["time"]["first_date"] == first.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert s["time"]["last_date"] == last.strftime("%Y-%m-%d %H:%M:%S UTC")
    assert s["bad_rows"]["count"] == 2 and s["bad_rows"]["lines"] == sorted(BAD)
    assert "line 4: timestamp 'yesterday' does not match" in s["bad_rows"]["first"][0]
    assert "line 9: expected 5 fields as in the header, got 2" in s["bad_rows"]["first"][1]
    words = s["behavior_words"]
    for word, to in STAGE.items():
        count = sum(r[3] == word for r in rows)
        assert (words[word]["behavior"], words[word]["rows"]) == (to.name.lower(), count)
        assert s["events_by_behavior"][to.name.lower()] == count
    assert words["view"]["source"] == "mapping" and s["unmapped_words"] == {}
    assert f"{len(rows):,} events" in out and "line 9: expected 5 fields" in out
    assert "'basket' -> add_to_cart" in out


def test_inspect_lists_unmapped_words_and_the_other_commands_stop_on_them(tmp_path, capsys):
    rows = shop_rows(users=6)
    path = write_shop(tmp_path / "shop.csv", rows)
    plain = ["--columns", COLUMNS, "--time-format", "iso"]  # no --behaviors
    assert main(["data", "inspect", str(path), *plain, "--json", str(tmp_path / "s.json")]) == 0
    s = json.loads((tmp_path / "s.json").read_text())
    assert set(s["unmapped_words"]) == {"basket", "order"}  # "view" is a built-in alias
    assert s["behavior_words"]["view"]["source"] == "alias"
    assert s["events"] == sum(r[3] == "view" for r in rows)
    assert "convert, train and the other commands stop" in capsys.readouterr().err

    out = tmp_path / "log"
    assert main(["data", "convert", str(path), *plain, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    lines = path.read_text().splitlines()
    first = next(n for n, line in enumerate(lines, start=1) if line.split(",")[3:4] == ["basket"])
    basket = sum(r[3] == "basket" for r in rows)
    assert "2 behaviour word(s) map to no behaviour" in err and "--behaviors" in err
    assert f"'basket' ({basket} rows, first on line {first})" in err
    assert not out.with_suffix(".npz").exists()

    skip = [*plain, "--unknown-behavior", "skip"]
    assert main(["data", "convert", str(path), *skip, "--out", str(out)]) == 0
    assert len(EventLog.load(out)) == sum(r[3] == "view" for r in rows)
    assert (
        main(
            ["data", "convert", str(path), *plain, "--unknown-behavior", "click", "--out", str(out)]
        )
        == 0
    )
    log = EventLog.load(out)
    assert (
        len(log) == len(rows)
        and (log.behavior[log.behavior != Behavior.PRODUCT_CLICK] == Behavior.CLICK).all()
    )


def test_convert_train_evaluate_and_accuracy_from_the_cli(tmp_path, capsys):
    rows = shop_rows()
    path = write_shop(tmp_path / "shop.csv", rows)
    stem = tmp_path / "shop-log"
    assert main(["data", "convert", str(path), *OPTIONS, "--out", str(stem)]) == 0
    saved = EventLog.load(stem)
    assert raw_events(saved) == expected_events(rows)
    direct = load_named(path, columns=ColumnMap.from_options(COLUMNS, BEHAVIORS, time_format="iso"))
    assert raw_events(direct) == raw_events(saved)
    capsys.readouterr()

    checkpoint = tmp_path / "ckpt"
    train = ["train", "--dataset", str(path), *OPTIONS, "--out", str(checkpoint)]
    small = ["--model-config", TINY, "--epochs", "1", "--max-len", "16", "--batch-size", "16"]
    assert main([*train, *small]) == 0
    out = capsys.readouterr().out  # the epochs' lines, then the JSON
    assert json.loads(out[out.index("{\n") :])["checkpoint"] == str(checkpoint)
    from hytrec.model.registry import load_model

    model = load_model(checkpoint)
    assert model.items.raw_ids() == sorted({r[1] for r in rows})  # the file's own ids

    evaluate = ["evaluate", "--dataset", str(path), *OPTIONS, "--checkpoint", str(checkpoint)]
    assert main([*evaluate, "--output", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["dataset"] == str(path)
    users = len({r[0] for r in rows})
    assert [m["overall"]["users"] for m in report["models"].values()] == [
        users
    ] * 6  # the model, popularity, four heuristics

    accuracy = ["benchmark", "accuracy", "--dataset", str(path), *OPTIONS, "--models"]
    assert main([*accuracy, "--output", str(tmp_path / "acc")]) == 0  # the baselines alone
    report = json.loads((tmp_path / "acc.json").read_text())
    assert (report["events"], report["items"]) == (len(rows), len({r[1] for r in rows}))
    assert report["models"]["popularity"]["overall"]["users"] == users
    assert report["dataset"] == report["data_file"] == str(path)
    assert list(report["models"]) == [
        "popularity",
        "recent-items",
        "user-frequency",
        "recency-frequency",
        "item-transition",
    ]


def test_demo_and_replay_take_the_file_options(tmp_path, monkeypatch):
    import hytrec.bench.demo as demo

    path = write_shop(tmp_path / "shop.csv", shop_rows(users=4))
    seen = []
    monkeypatch.setattr(demo, "run_demo", seen.append)
    assert main(["demo", "--dataset", str(path), *OPTIONS]) == 0
    config = seen[0]
    assert config.columns == ColumnMap.from_options(COLUMNS, BEHAVIORS, time_format="iso")
    events, name = demo.load_events(config.dataset, config.columns)
    assert name == str(path) and len(events) == len(shop_rows(users=4))
    with pytest.raises(FileNotFoundError):  # a file of one's own is never swapped for synthetic
        demo.load_events(str(tmp_path / "absent.csv"), config.columns)

    args = build_parser().parse_args(["replay", str(path), *OPTIONS, "--no-header"])
    with pytest.raises(SystemExit, match="without a header, columns are 0-based field numbers"):
        column_map(args)


def test_file_options_need_columns_and_name_what_is_missing(tmp_path, capsys):
    path = write_shop(tmp_path / "shop.csv", shop_rows(users=3))
    args = build_parser().parse_args(
        ["train", "--dataset", "x", "--out", "y", "--behaviors", "a=b"]
    )
    with pytest.raises(SystemExit, match="--behaviors go with --columns"):
        column_map(args)

    wrong = "user=cust,item=sku,ts=time"
    assert main(["data", "inspect", str(path), "--columns", wrong]) == 2
    err = capsys.readouterr().err
    assert "no column 'cust' (user) or 'time' (ts)" in err
    assert "the header (line 1) reads ['customer', 'sku', 'when', 'action', 'dept']" in err

    headerless = tmp_path / "plain.tsv.gz"
    headerless.write_bytes(gzip.compress(b"u1\ti1\t100\nu1\ti2\t200\n"))
    assert (
        main(["data", "inspect", str(headerless), "--no-header", "--columns", "user=0,item=1,ts=3"])
        == 2
    )
    assert (
        "no field 3 (ts); line 1 has 3 fields (numbered from 0): ['u1', 'i1', '100']"
        in capsys.readouterr().err
    )
    assert (
        main(
            [
                "data",
                "convert",
                str(headerless),
                "--no-header",
                "--columns",
                "user=0,item=1,ts=2",
                "--out",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    assert raw_events(EventLog.load(tmp_path / "p")) == [
        ("u1", "i1", "<pad>", int(Behavior.CLICK), 100),
        ("u1", "i2", "<pad>", int(Behavior.CLICK), 200),
    ]
    assert main(["data", "inspect", str(tmp_path / "absent.csv"), "--columns", wrong]) == 2
    assert "absent.csv is neither a file nor a dataset name" in capsys.readouterr().err


# ---------------------------------------------------------------------------- parsers

# column names as a header may spell them: anything without "," or surrounding spaces,
# half of them holding "=" (the first "=" of FIELD=COLUMN splits)
names = st.text(
    st.characters(codec="utf-8", exclude_characters=",\r\n", exclude_categories=("Cs", "Cc")),
    min_size=1,
    max_size=8,
)
column_names = (
    st.tuples(names, st.sampled_from(["", "=", " = "]), names)
    .map(lambda parts: (parts[0] + parts[1] + parts[2] if parts[1] else parts[0]).strip())
    .filter(bool)
)
spaces = st.sampled_from(["", " ", "  "])


@FAST
@given(st.data())
def test_parse_columns_reads_back_what_was_written(data):
    optional = data.draw(st.lists(st.sampled_from(COLUMN_FIELDS[3:]), unique=True))
    fields = data.draw(st.permutations([*COLUMN_FIELDS[:3], *optional]))
    columns = {f: data.draw(column_names) for f in fields}
    text = ",".join(
        f"{data.draw(spaces)}{f}{data.draw(spaces)}={data.draw(spaces)}{c}"
        for f, c in columns.items()
    )
    assert parse_columns(text) == columns
    cm = ColumnMap.from_options(text)
    assert cm.fields() == {f: columns[f] for f in COLUMN_FIELDS if f in columns}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("user=a,item=b", "ts missing"),
        ("user=a,item=b,ts=c,when=d", "unknown field 'when'"),
        ("user=a,item=b,ts=c,user=d", "user is given twice"),
        ("user=a,item,ts=c", "'item' is not FIELD=COLUMN"),
        ("user=a,item= ,ts=c", "is not FIELD=COLUMN"),
    ],
)
def test_parse_columns_names_the_problem(text, problem):
    with pytest.raises(ValueError, match=problem):
        parse_columns(text)


# behaviour words as logs spell them: letters, digits, "_", "-" and inner spaces
words = st.from_regex(r"[A-Za-z][A-Za-z0-9_\- ]{0,10}[A-Za-z0-9]", fullmatch=True)
stages = st.sampled_from([b for b in Behavior if b != Behavior.UNKNOWN])


@FAST
@given(st.dictionaries(words, stages, min_size=1, max_size=8, dict_class=dict), st.data())
def test_parse_behaviors_reads_back_what_was_written(mapping, data):
    # a word may appear in several spellings, all the same key, all to one stage
    keyed = {}
    for word, to in mapping.items():
        keyed.setdefault(behavior_key(word), (word, to))
    groups: dict[Behavior, list[str]] = {}
    for word, to in keyed.values():
        groups.setdefault(to, []).append(word)
    names = {
        to: data.draw(st.sampled_from([to.name.lower(), to.name, to.name.replace("_", "-")]))
        for to in groups
    }
    text = ";".join(f"{names[to]}={','.join(ws)}" for to, ws in groups.items())
    pairs = parse_behaviors(text + data.draw(st.sampled_from(["", ";"])))
    assert dict(pairs) == {behavior_key(w): to for w, to in keyed.values()}
    assert len(pairs) == len(keyed)


def test_parse_behaviors_names_the_problem():
    assert parse_behaviors("cart=basket;buy=order") == (
        ("basket", Behavior.ADD_TO_CART),
        ("order", Behavior.PAYMENT),
    )  # stage aliases work as stage names
    with pytest.raises(ValueError, match="word 'basket' is mapped to both add_to_cart and payment"):
        parse_behaviors("add_to_cart=basket;payment=Basket")
    with pytest.raises(
        ValueError, match="stage 'shopping' is not a behaviour; the stages are click"
    ):
        parse_behaviors("shopping=basket")
    with pytest.raises(ValueError, match="stage 'unknown' is not a behaviour"):
        parse_behaviors("unknown=basket")
    with pytest.raises(ValueError, match="an empty word"):
        parse_behaviors("click=a,,b")
    with pytest.raises(ValueError, match="unknown behaviour policy 'maybe'"):
        ColumnMap(unknown_behavior="maybe")


@FAST
@given(
    st.lists(
        st.sampled_from(["view", "View ", "basket", "pv", "cart", "BUY", "refund", "x-ray"]),
        min_size=1,
        max_size=30,
    ),
    st.sampled_from(["error", "skip", "click", "collection"]),
)
def test_behaviour_words_follow_the_mapping_then_the_aliases_then_the_policy(actions, policy):
    # "view" is an alias of product_click, mapped here to click: the mapping wins
    mapping = "click=view;add_to_cart=basket"
    mine = {"view": Behavior.CLICK, "basket": Behavior.ADD_TO_CART}
    aliases = {"pv": Behavior.PRODUCT_CLICK, "cart": Behavior.ADD_TO_CART, "buy": Behavior.PAYMENT}
    fallback = None if policy in ("error", "skip") else Behavior.parse(policy)

    def to(word: str) -> Behavior | None:
        key = behavior_key(word)
        return mine.get(key) or aliases.get(key) or fallback

    lines = ["u,i,t,a", *(f"u{n % 3},i{n},{n},{a}" for n, a in enumerate(actions))]
    columns = ColumnMap.from_options(
        "user=u,item=i,ts=t,behavior=a", mapping, unknown_behavior=policy
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "a.csv"
        path.write_text("\n".join(lines) + "\n")
        unmapped = {a.strip() for a in actions if to(a) is None}
        if unmapped and policy == "error":
            with pytest.raises(UnmappedBehaviorError) as err:
                read_table(path, columns, progress=False)
            assert set(err.value.words) == unmapped
            first = {
                w: 2 + actions.index(next(a for a in actions if a.strip() == w)) for w in unmapped
            }
            assert {w: e["first_line"] for w, e in err.value.words.items()} == first
            return
        log, report = read_table(path, columns, progress=False)
    kept = [(n, a) for n, a in enumerate(actions) if to(a) is not None]
    got = sorted(zip(log.ts.tolist(), log.behavior.tolist(), strict=True))
    assert got == [(n, int(to(a))) for n, a in kept]
    counts = {w: sum(a.strip() == w for a in actions) for w in {a.strip() for a in actions}}
    assert {w: e["rows"] for w, e in report.behaviors.items()} == counts
    assert {w: e["behavior"] for w, e in report.behaviors.items()} == {
        w: to(w).name.lower() if to(w) else None for w in counts
    }


zones = st.sampled_from(
    [None, UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=5, minutes=30))]
)
moments = st.datetimes(datetime(1950, 1, 1), datetime(2100, 1, 1), timezones=zones)


@FAST
@given(moments)
def test_iso_and_pattern_times_are_unix_seconds_floored(moment):
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # no zone means UTC
    expected = calendar.timegm(aware.utctimetuple())  # whole seconds: floored
    assert parse_time(moment.isoformat(), "iso") == expected
    assert parse_time(moment.isoformat(sep=" "), "iso") == expected
    assert parse_time(moment, "iso") == expected  # Parquet hands datetimes over
    pattern = "%d/%m/%Y %H:%M:%S"
    assert parse_time(aware.astimezone(UTC).strftime(pattern), pattern) == expected
    with pytest.raises(ValueError, match="does not match the format '%d/%m/%Y %H:%M:%S'"):
        parse_time(moment.isoformat(), pattern)


@FAST
@given(st.integers(-(10**15), 10**15), st.integers(0, 999), st.booleans())
def test_unix_times_in_seconds_and_milliseconds(whole, fraction, negative):
    text = f"{'-' if negative else ''}{abs(whole)}.{fraction:03d}"
    assert parse_time(str(whole), "unix") == whole
    assert parse_time(text, "unix") == math.floor(Fraction(text))  # floored, not truncated
    assert parse_time(str(whole), "unix-ms") == whole // 1000
    assert parse_time(text, "unix-ms") == math.floor(Fraction(text) / 1000)
    for bad in ("1_000", "1e9", "", "12:00", "\u0661\u0662"):
        with pytest.raises(ValueError, match="is not a number of"):
            parse_time(bad, "unix")


# ---------------------------------------------------------------------------- bad rows


@FAST
@given(
    st.lists(
        st.tuples(st.integers(0, 9), st.integers(0, 99), st.integers(0, 10**6)),
        min_size=1,
        max_size=20,
    ),
    st.sampled_from(
        [
            ("u1,i1", "expected 3 fields"),
            ('u1,"i\n1"', "expected 3 fields"),  # a bad record over two lines
            ("u1,i1,soon", "timestamp 'soon'"),
            (",i1,5", "missing value"),
        ]
    ),
    st.data(),
)
def test_bad_rows_are_reported_at_the_line_they_start_on(rows, bad, data):
    # some item ids are quoted and hold a newline, so records and lines differ
    lines, starts = [], []
    line = 2  # after the header
    for u, i, t in rows:
        item = f'"i{i}\nx"' if i % 3 == 0 else f"i{i}"
        starts.append(line)
        lines.append(f"u{u},{item},{t}")
        line += 2 if i % 3 == 0 else 1
    at = data.draw(st.integers(0, len(rows)))
    bad_line = starts[at] if at < len(rows) else line
    lines.insert(at, bad[0])
    columns = ColumnMap.from_options("user=user,item=item,ts=ts")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.csv"
        path.write_text("user,item,ts\n" + "\n".join(lines) + "\n")
        with pytest.raises(DataError) as err:
            read_table(path, columns, progress=False)
        assert f"b.csv:{bad_line}: " in str(err.value) and bad[1] in str(err.value)
        log, report = read_table(path, columns, "skip", progress=False)
    assert report.bad_lines == [bad_line] and len(log) == len(rows) == report.rows - 1
    assert sorted(log.items.raw(int(i)) for i in log.item) == sorted(
        f"i{i}\nx" if i % 3 == 0 else f"i{i}" for _, i, _ in rows
    )


def test_a_missing_column_names_the_column_and_the_header(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("\ufeffcustomer, sku ,when\nc1,s1,5\n")  # a byte-order mark, spaced names
    log, _ = read_table(path, ColumnMap.from_options("user=customer,item=sku,ts=when"))
    assert raw_events(log) == [("c1", "s1", "<pad>", int(Behavior.CLICK), 5)]
    with pytest.raises(MissingColumnError) as err:
        read_table(path, ColumnMap.from_options("user=customer,item=sku,ts=time,behavior=action"))
    assert str(err.value) == (
        f"{path}: no column 'time' (ts) or 'action' (behavior); the header (line 1) reads "
        "['customer', 'sku', 'when']"
    )


def test_columns_read_a_named_datasets_file_as_a_table(shared_data):
    columns = ColumnMap.from_options("user=0,item=1,ts=4,behavior=3,category=2", header=False)
    table, report = load_named_with_report("taobao-tail", columns, shared_data, progress=False)
    assert report.fmt == "table" and report.behaviors["pv"]["source"] == "alias"
    native = load_named("taobao-tail", shared_data, progress=False)
    assert len(table) == 10_000  # a table's ids are strings, so its users sort another way
    assert sorted(raw_events(table)) == sorted(raw_events(native))


def test_the_demo_says_when_a_few_early_events_leave_nothing_to_train_on(tmp_path):
    from hytrec.bench.demo import DemoConfig, run_demo

    rows = shop_rows(users=6)
    rows[0] = (rows[0][0], rows[0][1], datetime(2020, 1, 1, tzinfo=UTC), "view", rows[0][4])
    path = write_shop(tmp_path / "shop.csv", rows)
    columns = ColumnMap.from_options(COLUMNS, BEHAVIORS, time_format="iso")
    config = DemoConfig(dataset=str(path), columns=columns, output=tmp_path / "run")
    with pytest.raises(DataError, match="leaving 1 to train on: a few events long before"):
        run_demo(config)
