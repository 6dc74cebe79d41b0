"""The campaigns list (status badges, channel, counts, progress) with its action menu, and the
confirmation modals of Run (the product page's Run Campaign modal), Stop, Retry failed, Resume and Delete.
"""
from __future__ import annotations

from services.api.console.routes import console_router

router = console_router()
