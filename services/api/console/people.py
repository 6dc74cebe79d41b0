"""Opt-outs, channel settings, users, the audit log, and the operational view (operations' only screen).
"""
from __future__ import annotations

from services.api.console.routes import console_router

router = console_router()
