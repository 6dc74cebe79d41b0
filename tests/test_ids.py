"""The fast uuid5 the relay and the handler use makes exactly the ids uuid.uuid5 makes (ids are stored and
compared across versions: a different one would duplicate every republished record)."""
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common import ids

NAMES = ["", "message:1", "message:1000000", "block:3", "é:ü:\u4e2d", "x" * 300,
         f"{uuid.UUID(int=0)}:7:2.4", "channel-lock:sms"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("namespace", [ids.OUTREACH_NS, uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), uuid.uuid4()])
def test_uuid5_text_is_uuid5(namespace: uuid.UUID, name: str):
    expected = str(uuid.uuid5(namespace, name))
    assert ids.uuid5_text(namespace, name) == expected
    assert ids.uuid5_text(str(namespace), name) == expected
    assert ids.uuid5_text(str(namespace).upper(), name) == expected  # as uuid.UUID reads a namespace


def test_derived_ids_are_the_uuid5_of_their_facts():
    campaign_id = str(uuid.uuid4())
    for row in (2, 3, 10_001):
        assert ids.message_id(campaign_id, row) == str(uuid.uuid5(uuid.UUID(campaign_id), f"message:{row}"))
    origin = uuid.uuid4()
    assert ids.record_event_id(origin, 5, "2.3") == str(uuid.uuid5(ids.OUTREACH_NS, f"{origin}:5:2.3"))
    assert ids.record_event_id(str(origin), 5, 0) == str(uuid.uuid5(ids.OUTREACH_NS, f"{origin}:5:0"))


@given(namespace=st.uuids(), name=st.text())
def test_uuid5_text_is_uuid5_for_any_name(namespace: uuid.UUID, name: str):
    assert ids.uuid5_text(namespace, name) == str(uuid.uuid5(namespace, name))
