"""One campaign: live counts (streamed), the messages table (filters, search, keyset paging), one
message's history, CSV export, the campaign's history and the campaign as of a chosen time.
"""
from __future__ import annotations

from services.api.console.routes import console_router

router = console_router()
