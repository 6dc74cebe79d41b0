"""Where the New campaign screens keep a CSV between their steps, and what a campaign's import leaves behind.

- An upload: `DATA_DIR/console-uploads/ID/` (mode 0700), ID 24 random URL-safe characters. `contacts.csv` is the
  file as sent; `upload.json` the steps' choices (name, channel, mapping, the check's report, the template draft)
  and its owner: another user's ID answers as unknown. Deleted once the campaign is created, on Cancel, or a day
  after its last change (swept at each new upload). Nothing of it is in the browser but its ID.
- A campaign's import: `DATA_DIR/console-imports/CAMPAIGN_ID/`: `import.json` (the check's report, the mapping,
  the valid contacts' variable profile) and `invalid-rows.csv` (row, reason, the row's cells), kept with the
  campaign so its import report can be shown and downloaded, and the template edited against its variables.

One API instance's data folder: an instance behind a load balancer needs sticky sessions for the steps.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

UPLOADS_DIR = "console-uploads"
IMPORTS_DIR = "console-imports"
UPLOAD_LIFETIME_S = 24 * 3600
CONTACTS_FILE = "contacts.csv"
INVALID_ROWS_FILE = "invalid-rows.csv"
UPLOAD_META = "upload.json"
IMPORT_META = "import.json"
_ID = re.compile(r"[A-Za-z0-9_-]{24}")
_CAMPAIGN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
COPY_BLOCK = 1024 * 1024


def _write_json(path: Path, value: Any) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(value, ensure_ascii=False))
    os.replace(partial, path)  # a reader sees the old or the new file, never half of one


@dataclass
class Upload:
    upload_id: str
    folder: Path
    meta: dict[str, Any]

    @property
    def contacts_path(self) -> Path:
        return self.folder / CONTACTS_FILE

    @property
    def invalid_rows_path(self) -> Path:
        return self.folder / INVALID_ROWS_FILE

    def save(self) -> None:
        _write_json(self.folder / UPLOAD_META, self.meta)


class UploadStore:
    def __init__(self, data_dir: Path):
        self.uploads = Path(data_dir) / UPLOADS_DIR
        self.imports = Path(data_dir) / IMPORTS_DIR

    def create(self, owner: str, source: IO[bytes], meta: dict[str, Any], max_bytes: int) -> Upload | None:
        """A new upload holding `source` (copied in blocks), or None when it is over `max_bytes`."""
        self.uploads.mkdir(parents=True, exist_ok=True)
        self.sweep()
        upload_id = secrets.token_urlsafe(18)
        folder = self.uploads / upload_id
        folder.mkdir(mode=0o700)
        size = 0
        source.seek(0)
        with open(folder / CONTACTS_FILE, "wb") as target:
            while block := source.read(COPY_BLOCK):
                size += len(block)
                if size > max_bytes:
                    break
                target.write(block)
        if size > max_bytes:
            shutil.rmtree(folder, ignore_errors=True)
            return None
        upload = Upload(upload_id, folder, {**meta, "owner": owner, "size": size, "created": time.time()})
        upload.save()
        return upload

    def get(self, upload_id: str, owner: str) -> Upload | None:
        if not _ID.fullmatch(upload_id):
            return None
        folder = self.uploads / upload_id
        try:
            meta = json.loads((folder / UPLOAD_META).read_text())
        except (OSError, ValueError):
            return None
        if meta.get("owner") != owner:
            return None
        return Upload(upload_id, folder, meta)

    def discard(self, upload: Upload) -> None:
        shutil.rmtree(upload.folder, ignore_errors=True)

    def sweep(self, now: float | None = None) -> None:
        """Removes the uploads older than UPLOAD_LIFETIME_S (abandoned steps)."""
        now = time.time() if now is None else now
        for folder in self.uploads.glob("*"):
            try:
                if now - folder.stat().st_mtime > UPLOAD_LIFETIME_S:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                pass

    # ------------------------------------------------------------------ a campaign's import

    def import_folder(self, campaign_id: str) -> Path | None:
        return self.imports / campaign_id if _CAMPAIGN_ID.fullmatch(campaign_id) else None

    def keep_import(self, upload: Upload, campaign_id: str, record: dict[str, Any]) -> None:
        """The upload's invalid rows and `record` kept with the campaign; the upload itself is deleted."""
        folder = self.import_folder(campaign_id)
        if folder is None:
            raise ValueError(f"not a campaign id: {campaign_id!r}")
        folder.mkdir(parents=True, exist_ok=True)
        if upload.invalid_rows_path.exists():
            os.replace(upload.invalid_rows_path, folder / INVALID_ROWS_FILE)
        _write_json(folder / IMPORT_META, record)
        self.discard(upload)

    def campaign_import(self, campaign_id: str) -> dict[str, Any] | None:
        folder = self.import_folder(campaign_id)
        try:
            return json.loads((folder / IMPORT_META).read_text()) if folder else None
        except (OSError, ValueError):
            return None

    def save_campaign_import(self, campaign_id: str, record: dict[str, Any]) -> None:
        folder = self.import_folder(campaign_id)
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(folder / IMPORT_META, record)

    def invalid_rows_path(self, campaign_id: str) -> Path | None:
        folder = self.import_folder(campaign_id)
        path = folder / INVALID_ROWS_FILE if folder else None
        return path if path is not None and path.exists() else None
