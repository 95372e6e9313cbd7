"""``tllab-data download``: fetch a catalog dataset's published archives (``dataset.download``).

Each entry ``{folder, archive, url, md5}`` is skipped when ``<root>/<folder>`` exists; otherwise the
archive is downloaded to ``<root>/<archive>.part`` (an interrupted download continues where it
stopped, by an HTTP range request), checked against ``md5`` when the catalog has one, renamed, and
extracted into the root with ``torchvision.datasets.utils.extract_archive``; the archive is
deleted afterwards.
"""

from __future__ import annotations

import shutil
import urllib.error
import urllib.request
from pathlib import Path

from tllab.errors import DataError

__all__ = ["download_dataset"]

_CHUNK = 1 << 20


def _fetch(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest``, resuming a ``dest.part`` left by an earlier attempt."""
    part = dest.with_name(dest.name + ".part")
    done = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={done}-"} if done else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        mode = "ab" if done and response.status == 206 else "wb"  # 200: the server sends the whole file again
        with part.open(mode) as f:
            shutil.copyfileobj(response, f, _CHUNK)
    part.replace(dest)


def download_dataset(entries: list[dict], root: Path, name: str, timeout: float = 60.0,
                     log=print) -> list[str]:
    """Fetch and extract every entry that is not on disk yet; return the folders fetched.

    Raises:
        DataError: a download failed (one line: the URL, the reason, and what to put where by hand)
            or an archive does not match its checksum.
    """
    from torchvision.datasets.utils import check_integrity, extract_archive

    if not entries:
        raise DataError(f"{name} has no published archives in the catalog; put the data under {root} by hand.")
    root.mkdir(parents=True, exist_ok=True)
    fetched = []
    for entry in entries:
        folder, archive, url, md5 = entry["folder"], entry["archive"], entry["url"], entry.get("md5")
        if (root / folder).exists():
            log(f"{root / folder} exists; skipped")
            continue
        dest = root / archive
        if not (dest.exists() and check_integrity(str(dest), md5)):
            log(f"downloading {url} -> {dest}")
            try:
                _fetch(url, dest, timeout)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = getattr(e, "reason", None) or e
                raise DataError(f"cannot download {url} ({reason}); on a machine with internet, fetch it and extract "
                                f"it into {root} so that {root / folder} exists (then `tllab-data check {name} "
                                f"--root {root}`).") from None
            if not check_integrity(str(dest), md5):
                dest.unlink()
                raise DataError(f"{archive} from {url} does not match its checksum (md5 {md5}); it was deleted. "
                                "Download it again; if that fails too the published file has changed.")
        log(f"extracting {dest}")
        extract_archive(str(dest), str(root), remove_finished=True)
        if not (root / folder).exists():
            raise DataError(f"{archive} did not create {root / folder}; extract it by hand into {root}.")
        fetched.append(folder)
    return fetched
