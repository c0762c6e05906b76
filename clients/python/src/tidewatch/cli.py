"""``tidewatch-send``: stream a CSV file of samples and print the verdicts as JSON lines.

Two layouts, with or without a header line:

* ``timestamp,value``: one metric of one device (``--device``, ``--metric``; a header
  ``timestamp,NAME`` names the metric);
* ``timestamp,device_id,METRIC...``: a header naming the metrics is required; an empty
  cell leaves that metric out of the sample.

A timestamp is RFC 3339 (``2026-01-02T03:04:05Z``) or Unix seconds; empty means the
server's receive time. On a terminal, stderr shows how many verdicts arrived (and how
many were anomalies) as they arrive; redirected, stderr carries only errors. Exit code 0 when every sample was answered, 1 on an error (a
sample's own error is printed in its verdict and is not one), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import math
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TextIO

from google.protobuf.json_format import MessageToDict

from . import __version__
from .backoff import Backoff
from .client import connect
from .errors import TidewatchError
from .v1 import telemetry_pb2 as pb

__all__ = ["main", "read_samples"]


class CsvError(ValueError):
    """A line of the CSV input cannot be read."""


def _timestamp(text: str, line: int) -> datetime | None:
    text = text.strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise CsvError(f"line {line}: timestamp {text!r} is not finite")
        return datetime.fromtimestamp(seconds, tz=timezone.utc)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise CsvError(f"line {line}: {text!r} is neither RFC 3339 nor Unix seconds") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _is_timestamp(text: str) -> bool:
    try:
        _timestamp(text, 0)
    except CsvError:
        return False
    return True


def _value(text: str, line: int) -> float:
    try:
        # "NaN" and "inf" parse: the server judges them and answers with an error.
        return float(text)
    except ValueError:
        raise CsvError(f"line {line}: value {text!r} is not a number") from None


def read_samples(stream: TextIO, device: str = "", metric: str = "value") -> Iterator[pb.Sample]:
    """The samples of a CSV stream (layouts in the module doc)."""
    rows = csv.reader(stream)
    header: list[str] | None = None
    for line, row in enumerate(rows, start=1):
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None and line == 1 and not _is_timestamp(row[0]):
            header = [cell.strip() for cell in row]
            if len(header) == 2:
                metric = header[1] or metric
            elif len(header) < 2:
                raise CsvError("line 1: a header needs at least timestamp and one column")
            continue
        sample = pb.Sample()
        when = _timestamp(row[0], line)
        if when is not None:
            sample.time.FromDatetime(when)
        if len(row) == 2:
            sample.device_id = device
            sample.metrics[metric] = _value(row[1], line)
        elif len(row) >= 3:
            if header is None or len(header) != len(row):
                raise CsvError(
                    f"line {line}: {len(row)} columns need a header "
                    "timestamp,device_id,METRIC... with as many columns"
                )
            sample.device_id = row[1].strip()
            for name, cell in zip(header[2:], row[2:]):
                if cell.strip():
                    sample.metrics[name] = _value(cell, line)
        else:
            raise CsvError(f"line {line}: expected timestamp,value or timestamp,device_id,...")
        yield sample


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidewatch-send",
        description="Stream a CSV file of samples to tidewatch; print verdicts as JSON lines.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("file", help="CSV file, or - for standard input")
    parser.add_argument(
        "--addr", default="127.0.0.1:50051", help="server host:port (default %(default)s)"
    )
    parser.add_argument("--device", default="", help="device of timestamp,value rows")
    parser.add_argument(
        "--metric", default="value", help="metric of headerless timestamp,value rows"
    )
    parser.add_argument("--batch-size", type=int, default=100, help="samples per message")
    parser.add_argument("--detector", default="", help="detector name (server default)")
    parser.add_argument("--window-size", type=int, default=0, help="detector window override")
    parser.add_argument("--threshold", type=float, default=0.0, help="detector threshold")
    parser.add_argument("--min-samples", type=int, default=0, help="detector warm-up override")
    parser.add_argument(
        "--max-attempts",
        type=int,
        default=8,
        help="failed connection attempts in a row before giving up (default %(default)s)",
    )
    return parser


class Progress:
    """One stderr line, redrawn at most ten times a second, only on a terminal."""

    def __init__(self, out: TextIO, enabled: bool | None = None) -> None:
        self._out = out
        self._enabled = out.isatty() if enabled is None else enabled
        self._started = time.monotonic()
        self._drawn = 0.0
        self.verdicts = 0
        self.anomalies = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return (
            f"tidewatch-send: {self.verdicts} verdicts, {self.anomalies} anomalies "
            f"({self.verdicts / elapsed:.0f}/s)"
        )

    def add(self, verdict: pb.Verdict) -> None:
        self.verdicts += 1
        self.anomalies += verdict.anomaly
        now = time.monotonic()
        if self._enabled and now - self._drawn >= 0.1:
            self._drawn = now
            self._out.write("\r\x1b[2K" + self.line())
            self._out.flush()

    def finish(self) -> None:
        if self._enabled and self._drawn:
            self._out.write("\r\x1b[2K")
            self._out.flush()


async def _send(args: argparse.Namespace, stream: TextIO) -> None:
    detector = None
    if args.detector or args.window_size or args.threshold or args.min_samples:
        detector = pb.DetectorConfig(
            name=args.detector,
            window_size=args.window_size,
            threshold=args.threshold,
            min_samples=args.min_samples,
        )
    async with connect(args.addr) as client:
        samples = read_samples(stream, device=args.device, metric=args.metric)
        verdicts = client.ingest(
            samples,
            batch_size=args.batch_size,
            detector=detector,
            backoff=Backoff(max_attempts=args.max_attempts),
        )
        progress = Progress(sys.stderr)
        try:
            async for verdict in verdicts:
                line = MessageToDict(verdict, always_print_fields_with_no_presence=True)
                print(json.dumps(line, separators=(",", ":")), flush=True)
                progress.add(verdict)
        finally:
            progress.finish()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``tidewatch-send``."""
    args = _parser().parse_args(argv)
    if args.batch_size < 1:
        print("tidewatch-send: --batch-size must be at least 1", file=sys.stderr)
        return 2
    try:
        if args.file == "-":
            asyncio.run(_send(args, sys.stdin))
        else:
            with open(args.file, newline="", encoding="utf-8") as stream:
                asyncio.run(_send(args, stream))
    except (CsvError, OSError, TidewatchError) as error:
        print(f"tidewatch-send: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
