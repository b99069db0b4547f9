#!/usr/bin/env python3
"""Summarise one `reencrypt run` from its JSON log and GNU time output.

usage: batch_stats.py LOG START END TIME_OUTPUT

LOG is the run's standard error with --log-format json and
RUST_LOG=reencrypt::pipeline=debug. START and END are the Unix times around
the process. Prints how the wall time splits into setup, pass, sweep
and finish. Then prints percentiles of the pass's batches (rows and
fetch, crypto and write milliseconds) and the peak resident set size.
In physical order a window is written in several transactions, and each is
logged as a batch with its phase, such as 2/3. Here the phases of a window
count as one batch, with the rows and milliseconds of all of them.
Then it prints the pass's rows/s in each fifth of its rows, to show
whether the pass slows down as it advances through the table. Last, it
prints the process's CPU time, user and system, and the cores it kept
busy on average over the wall time.
"""

import json
import math
import sys
from datetime import datetime


def epoch(timestamp):
    """Unix time of a UTC timestamp as tracing-subscriber writes it, e.g. 2026-12-04T21:47:01.201771Z."""
    whole, _, fraction = timestamp.rstrip("Z").partition(".")
    seconds = datetime.fromisoformat(whole + "+00:00").timestamp()
    return seconds + float("0." + fraction) if fraction else seconds


def percentile(values, fraction):
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def merge_phases(batches):
    """Joins the phases of each window of a range into one batch."""
    merged, open_of = [], {}
    for batch in batches:
        # With several writers a writer takes the phases of up to three
        # windows in turns, so the log numbers each window in its range.
        phase, key = batch.get("phase", "whole"), (batch.get("range"), batch.get("window"))
        if phase == "whole":
            merged.append(batch)
            continue
        # Builds before phases were numbered logged a window's two as first and second.
        phase = {"first": "1/2", "second": "2/2"}.get(phase, phase)
        number, _, of = phase.partition("/")
        window = open_of.pop(key, None)
        if window is not None:
            window = dict(window)
            for field in ("rows", "fetch_ms", "crypto_ms", "write_ms"):
                window[field] = float(window[field]) + float(batch[field])
        else:
            window = batch
        if number == of:
            merged.append(window)
        else:
            open_of[key] = window
    return merged + list(open_of.values())


def rates_by_fifth(batches, pass_start):
    """Rows/s of each fifth of the pass's rows, from the times its batches committed.

    A fifth ends at the batch that takes the rows past its share. When one
    batch ends several fifths, as in a short pass, they share the rate of
    the rows since the fifth before them ended.
    """
    total = sum(float(b["rows"]) for b in batches)
    if total <= 0:
        return []
    rates, done, since, since_rows = [], 0.0, pass_start, 0.0
    for batch in sorted(batches, key=lambda b: epoch(b["timestamp"])):
        done += float(batch["rows"])
        at = epoch(batch["timestamp"])
        ended = 0
        while len(rates) + ended < 5 and done >= total * (len(rates) + ended + 1) / 5:
            ended += 1
        if ended:
            rates.extend([(done - since_rows) / max(at - since, 1e-9)] * ended)
            since, since_rows = at, done
    return rates


def main():
    log_path, start, end, time_path = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    batches = {"Main": [], "Sweep": []}
    first_range = last_range_done = last_sweep_done = None
    with open(log_path) as log:
        for line in log:
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            message = event.get("message")
            at = epoch(event["timestamp"])
            if message == "Batch committed.":
                batches[event["pass"]].append(event)
            elif message == "Range started." and first_range is None:
                first_range = at
            elif message == "Range done.":
                last_range_done = at
            elif message == "Sweep done.":
                last_sweep_done = at

    if first_range is not None and last_range_done is not None:
        pass_end = last_range_done
        sweep_end = last_sweep_done or last_range_done
        print(
            f"  phases: setup {first_range - start:.2f} s, pass {pass_end - first_range:.2f} s, "
            f"sweep {sweep_end - pass_end:.2f} s ({len(batches['Sweep'])} batches), "
            f"finish {end - sweep_end:.2f} s"
        )
    main_pass = merge_phases(batches["Main"])
    if main_pass:
        print(f"  pass: {len(main_pass)} batches, ms per batch (p50 / p95 / p99 / max):")
        for field, label in (("rows", "rows"), ("fetch_ms", "fetch"), ("crypto_ms", "crypto"), ("write_ms", "write")):
            values = [float(b[field]) for b in main_pass]
            figures = " / ".join(f"{percentile(values, q):.0f}" for q in (0.50, 0.95, 0.99)) + f" / {max(values):.0f}"
            print(f"    {label:<7}{figures}")
    if batches["Main"] and first_range is not None:
        rates = rates_by_fifth(batches["Main"], first_range)
        if len(rates) == 5:
            figures = " / ".join(f"{rate:,.0f}" for rate in rates)
            print(f"    rows/s by fifth of the pass: {figures} (last / first: {rates[-1] / rates[0]:.2f})")
    cpu_seconds = 0.0
    with open(time_path) as timing:
        for line in timing:
            if "Maximum resident set size" in line:
                kib = int(line.rsplit(":", 1)[1])
                print(f"  peak RSS: {kib / 1024:.1f} MiB")
            elif "User time (seconds)" in line or "System time (seconds)" in line:
                cpu_seconds += float(line.rsplit(":", 1)[1])
    print(f"  CPU of the reencrypt process: {cpu_seconds:.2f} s, {cpu_seconds / (end - start):.2f} cores on average")


if __name__ == "__main__":
    main()
