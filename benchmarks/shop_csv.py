"""The example file of the README's "Your own data": the Taobao sample rewritten in another
shop's words, so that nothing of the project's own format is left to lean on.

    python benchmarks/shop_csv.py [SOURCE] [OUT]

SOURCE: the Taobao head file (default ../shared/data/taobao/UserBehavior_head84k.csv.gz);
OUT: default shop.csv. Columns `customer,sku,when,action,dept`; ids prefixed (C, SKU, D);
times as "YYYY-MM-DD HH:MM:SS" in UTC; pv, cart, buy, fav as view, basket, order, like; the
rows outside the data set's nine days and the truncated last row left out.
"""

from __future__ import annotations

import gzip
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / ".." / "shared" / "data" / "taobao" / "UserBehavior_head84k.csv.gz"
WORDS = {"pv": "view", "cart": "basket", "buy": "order", "fav": "like"}
WINDOW = (1511539200, 1512316800)  # hytrec.model.data.TAOBAO_WINDOW


def write_shop_csv(source: Path, out: Path) -> int:
    """Write OUT from SOURCE; return the rows written."""
    rows = 0
    with gzip.open(source, "rt", encoding="latin-1") as f, open(out, "w") as shop:
        shop.write("customer,sku,when,action,dept\n")
        for line in f:
            fields = line.rstrip("\n").split(",")
            if len(fields) != 5 or not WINDOW[0] <= int(fields[4]) < WINDOW[1]:
                continue
            user, item, category, behavior, ts = fields
            when = datetime.fromtimestamp(int(ts), UTC).strftime("%Y-%m-%d %H:%M:%S")
            shop.write(f"C{user},SKU{item},{when},{WORDS[behavior]},D{category}\n")
            rows += 1
    return rows


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else SOURCE
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("shop.csv")
    print(f"{write_shop_csv(source, out):,} rows -> {out}")
