"""Benchmark: screening one full AddContacts chunk (prints figures; not a test).

The command handler screens every chunk of 1,000 contacts (validity, duplicates) inside its use case, so
its cost is paid once per chunk on the command path. Figures (best and median of `--repeat` runs, in ms):
- SMS: 1,000 E.164 numbers against 3,000 destinations already in the campaign;
- email: 1,000 addresses over 50 realistic domains, first with the domain cache cleared, then cached;
- CSV: the kernel's import rules reading a 1,000-row file and cutting it into AddContacts chunks.
tests/test_contacts.py checks what these runs return; the bound they used to assert (50 ms per chunk, on a
busy shared machine) is the figure to compare with here.

    python bench/contacts_timings.py [--repeat 20]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from schemas import destinations  # noqa: E402
from services.command_handler.domain.contacts import screen_chunk  # noqa: E402
from services.common.contacts_csv import add_contacts_envelope_bytes, chunk_contacts, parse_contacts_csv  # noqa: E402

CHUNK_BOUND_MS = 50.0  # the bound tests/test_contacts.py asserted before it moved here
DOMAINS = ["gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com"] + [
    f"company{i}.example.com" for i in range(45)]


def sms_chunk() -> list:
    return [(r, f"+1415555{r:04d}", {"name": "x"}) for r in range(2, 1002)]


def email_chunk() -> list:
    return [(r, f"first.last{r}@{DOMAINS[r % len(DOMAINS)]}", {}) for r in range(2, 1002)]


def timed_ms(work: Callable[[], object], repeat: int, before: Callable[[], object] | None = None) -> list[float]:
    figures = []
    for _ in range(repeat):
        if before is not None:
            before()
        start = time.perf_counter()
        work()
        figures.append((time.perf_counter() - start) * 1000)
    return figures


def report(name: str, figures: list[float], bound_ms: float | None = None) -> None:
    bound = f"  (bound was {bound_ms:g} ms)" if bound_ms is not None else ""
    print(f"{name:<44} best {min(figures):7.2f} ms  median {statistics.median(figures):7.2f} ms{bound}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()

    known = frozenset(f"+1415556{r:04d}" for r in range(300_000 // 100))
    sms = sms_chunk()
    report("SMS chunk, 3,000 known destinations", timed_ms(lambda: screen_chunk("sms", sms, known), args.repeat),
           CHUNK_BOUND_MS)

    email = email_chunk()
    report("email chunk, 50 domains, cache cleared",
           timed_ms(lambda: screen_chunk("email", email, frozenset()), args.repeat,
                    before=destinations._domain_verdict.cache_clear), CHUNK_BOUND_MS)
    report("email chunk, 50 domains, cached", timed_ms(lambda: screen_chunk("email", email, frozenset()),
                                                       args.repeat))

    text = "phone,name,code\n" + "".join(f"+1415555{r:04d},Name {r},C{r}\n" for r in range(1000))
    envelope = add_contacts_envelope_bytes("00000000-0000-4000-8000-000000000000", "bench")
    report("CSV of 1,000 rows read and chunked",
           timed_ms(lambda: list(chunk_contacts(parse_contacts_csv(text).contacts, envelope)), args.repeat))


if __name__ == "__main__":
    main()
