#!/usr/bin/env python3
"""Compare each setting's rows/s across the table sizes of one bench run.

usage: across_sizes.py RATES

RATES is the tab-separated file bench/run.sh writes, a line per run: rows,
build (or "floor"), scan order, writers, rows/s, the floor's rows/s at
that size, and the scan order the run took ("-" for the floor). A failed
run has "failed" for its rows/s. Prints a
line per setting: its rows/s at each size with the ratio to the floor and
the order taken beside it, and the rows/s at each later size as a
share of the rows/s at the first. A cost per row that stays flat as the
table grows keeps that share near 1.
"""

import sys


def main(path):
    sizes, settings, rates, floors, orders_taken, failed = [], [], {}, {}, {}, set()
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != 7:
                continue
            rows, build, order, writers, rate, floor, chosen = fields
            rows, floor = int(rows), int(floor)
            if rows not in sizes:
                sizes.append(rows)
            setting = (build, order, writers)
            if setting not in settings:
                settings.append(setting)
            if rate == "failed":
                failed.add((setting, rows))
                continue
            rate = int(rate)
            # A setting run twice at one size (a build listed twice) keeps its mean.
            rates.setdefault((setting, rows), []).append(rate)
            floors[(setting, rows)] = floor
            orders_taken.setdefault((setting, rows), set()).add(chosen)
    if len(sizes) < 2:
        return
    first = sizes[0]
    print(
        "across sizes: rows/s (x the floor at that size, order taken, and writers taken for auto);"
        f" share = rows/s at a size / rows/s at {first:,} rows"
    )
    for setting in settings:
        build, order, writers = setting
        name = "floor" if build == "floor" else f"{build}, {order} order, {writers} writer(s)"
        cells, shares = [], []
        base = None
        for rows in sizes:
            measured = rates.get((setting, rows))
            if not measured:
                cells.append(f"{rows:,}: {'failed' if (setting, rows) in failed else '-'}")
                continue
            rate = sum(measured) / len(measured)
            ratio = rate / floors[(setting, rows)]
            orders = "/".join(sorted(orders_taken[(setting, rows)] - {"-"}))
            cells.append(f"{rows:,}: {rate:,.0f} ({ratio:.2f}{', ' + orders if orders else ''})")
            if rows == first:
                base = rate
            elif base:
                shares.append(f"{rate / base:.2f} at {rows:,}")
        print(f"  {name}: " + ", ".join(cells) + (f"; share {', '.join(shares)}" if shares else ""))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
