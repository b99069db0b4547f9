#!/usr/bin/env python3
"""Compare each setting's rows/s across the table sizes and rounds of one bench run.

usage: across_sizes.py RATES

RATES is the tab-separated file bench/run.sh writes, a line per run: rows,
build (or "floor"), scan order, writers, rows/s, the floor's rows/s in the
same round, and the scan order the run took ("-" for the floor). A failed
run has "failed" for its rows/s. Prints a line per setting: its rows/s at
each size with the ratio to the floor and the order taken beside it, and
the rows/s at each later size as a share of the rows/s at the first. A
cost per row that stays flat as the table grows keeps that share near 1.

A setting measured more than once at a size (several rounds, or a build
listed twice) shows its median rows/s and the median of its ratios, each
ratio taken against the floor of its own round, with their range.
"""

import statistics
import sys


def main(path):
    sizes, settings, runs, orders_taken, failed = [], [], {}, {}, {}
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
                failed[(setting, rows)] = failed.get((setting, rows), 0) + 1
                continue
            runs.setdefault((setting, rows), []).append((int(rate), int(rate) / floor))
            orders_taken.setdefault((setting, rows), set()).add(chosen)
    repeated = any(len(runs.get(key, [])) + failed.get(key, 0) > 1 for key in runs.keys() | failed.keys())
    if len(sizes) < 2 and not repeated:
        return
    first = sizes[0]
    print(
        "across sizes and rounds: rows/s (x the floor of the same round, order taken, and writers"
        " taken for auto); with several runs, the medians and [lowest-highest ratio];"
        f" share = rows/s at a size / rows/s at {first:,} rows"
    )
    for setting in settings:
        build, order, writers = setting
        name = "floor" if build == "floor" else f"{build}, {order} order, {writers} writer(s)"
        cells, shares = [], []
        base = None
        for rows in sizes:
            measured = runs.get((setting, rows))
            if not measured:
                cells.append(f"{rows:,}: {'failed' if (setting, rows) in failed else '-'}")
                continue
            rate = statistics.median(r for r, _ in measured)
            ratios = [ratio for _, ratio in measured]
            spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 and build != "floor" else ""
            orders = "/".join(sorted(orders_taken[(setting, rows)] - {"-"}))
            cells.append(
                f"{rows:,}: {rate:,.0f} ({statistics.median(ratios):.2f}{spread}"
                f"{', ' + orders if orders else ''}"
                f"{f', {len(measured)} runs' if len(measured) > 1 else ''}"
                f"{f', {failed[(setting, rows)]} failed' if (setting, rows) in failed else ''})"
            )
            if rows == first:
                base = rate
            elif base:
                shares.append(f"{rate / base:.2f} at {rows:,}")
        print(f"  {name}: " + ", ".join(cells) + (f"; share {', '.join(shares)}" if shares else ""))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
