"""Record batches that cannot be decoded never stop a consumer: they become one `UndecodableBatch` record.

aiokafka decodes a fetched batch while the consumer iterates it (CRC check, decompression, record parsing);
a batch that fails raises out of `getmany()` at the same offset forever, so one hostile or damaged batch (a
codec with no library, a corrupt compressed payload, a bad CRC) would stop the consumer for good, and a
restarted one would stop on it again. Here each fetched batch is decoded whole, first: one that fails is
handed to the consumer as a single `UndecodableBatch` at the batch's offset, carrying the batch's raw bytes
and the error, and the fetch position moves past it. The consumer parks it (`services.common.kafka.park`)
and goes on. Network errors are not decoding errors: they never get here.

Installed by replacing two module-level names aiokafka's fetcher uses (`MemoryRecords`, `PartitionRecords`):
aiokafka is pinned (pyproject.toml), and tests/test_hostile_input.py fails if a new version stops calling
them.
"""
from __future__ import annotations

import dataclasses
import logging
import struct
from typing import Any

from aiokafka.consumer import fetcher
from aiokafka.record.memory_records import MemoryRecords
from aiokafka.structs import ConsumerRecord

log = logging.getLogger(__name__)

UNDECODABLE_HEADER = "x-outreach-undecodable"
_BATCH_FRAME = struct.Struct(">qi")  # every message-set format starts a batch with offset (int64), size (int32)


@dataclasses.dataclass
class UndecodableBatch(ConsumerRecord):
    """A whole record batch that could not be decoded: `value` is its raw bytes, `error` why."""

    error: str = ""


def undecodable_error(record: Any) -> str | None:
    """Why `record` stands for a batch that could not be decoded, or None for an ordinary record."""
    return record.error if isinstance(record, UndecodableBatch) else None


class _RawKeepingRecords:
    """aiokafka's MemoryRecords, also answering each batch's raw bytes (the consumer parks them)."""

    def __init__(self, raw: bytes):
        self._records = MemoryRecords(raw)
        self._raw = memoryview(raw) if raw is not None else memoryview(b"")
        self._pos = 0
        self.last_raw = b""

    def has_next(self) -> bool:
        return self._records.has_next()

    def size_in_bytes(self) -> int:
        return self._records.size_in_bytes()

    def next_batch(self) -> Any:
        if len(self._raw) - self._pos >= _BATCH_FRAME.size:
            _, size = _BATCH_FRAME.unpack_from(self._raw, self._pos)
            end = self._pos + _BATCH_FRAME.size + max(size, 0)
            self.last_raw = bytes(self._raw[self._pos:end])
            self._pos = end
        return self._records.next_batch()


class _TolerantPartitionRecords(fetcher.PartitionRecords):
    """aiokafka's PartitionRecords, decoding each batch whole before yielding any of its records."""

    def _unpack_records(self):  # noqa: C901 - mirrors aiokafka's loop, whose branches it keeps
        tp = self._tp
        records = self._records
        while records.has_next():
            try:
                batch = records.next_batch()
            except Exception as exc:  # the framing itself is broken: nothing after it can be read either
                yield self._undecodable(records, self.next_fetch_offset, exc)
                return
            try:
                if self._check_crcs and not batch.validate_crc():
                    raise ValueError("invalid CRC")
                if self._isolation_level == fetcher.READ_COMMITTED and batch.producer_id is not None:
                    self._consume_aborted_up_to(batch.base_offset)
                    if batch.is_control_batch and self._contains_abort_marker(batch):
                        self._aborted_producers.discard(batch.producer_id)
                    if batch.is_transactional and batch.producer_id in self._aborted_producers:
                        self.next_fetch_offset = batch.next_offset
                        continue
                if batch.is_control_batch:
                    self.next_fetch_offset = batch.next_offset
                    continue
                decoded = [r for r in batch if r.offset >= self.next_fetch_offset]
            except Exception as exc:
                offset = max(batch.base_offset, self.next_fetch_offset)
                placeholder = self._undecodable(records, offset, exc)
                self.next_fetch_offset = max(batch.next_offset, offset + 1)  # a damaged header moves on too
                yield placeholder
                continue
            for record in decoded:
                consumer_record = self._consumer_record(tp, record)
                self.next_fetch_offset = record.offset + 1
                yield consumer_record
            self.next_fetch_offset = batch.next_offset

    def _undecodable(self, records: Any, offset: int, exc: Exception) -> UndecodableBatch:
        raw = getattr(records, "last_raw", b"")
        error = f"undecodable record batch: {type(exc).__name__}: {exc}"
        log.error("%s[%d]@%d: %s (%d bytes); it is skipped and parked", self._tp.topic, self._tp.partition,
                  offset, error, len(raw))
        return UndecodableBatch(self._tp.topic, self._tp.partition, offset, -1, 0, None, raw, None, -1, len(raw),
                                ((UNDECODABLE_HEADER, error.encode()),), error=error)


def install() -> None:
    """Make every aiokafka consumer in this process hand undecodable batches over instead of raising."""
    fetcher.MemoryRecords = _RawKeepingRecords
    fetcher.PartitionRecords = _TolerantPartitionRecords


install()
