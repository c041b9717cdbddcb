"""Downloading MVTec AD: resumable HTTP download, checksum check, safe extraction.

The official archive (about 4.9 GB) and the per-category archives published on the MVTec AD page
(https://www.mvtec.com/company/research/datasets/mvtec-ad) are listed below. Downloads go to
``<file>.part`` and resume from its length with an HTTP ``Range`` request (a server that ignores
Range restarts from zero); the finished file is checked against a SHA-256 or MD5 digest when one is
known or given, and only then renamed into place. Without network access the first connection
fails within ``timeout`` seconds with a message that names the alternative: download elsewhere,
extract, and point ``data.root`` at the folder holding the category folders.

Checksums: ``MVTEC_SHA256`` is the digest of the full archive as published by the anomalib project
(openvinotoolkit/anomalib, ``DOWNLOAD_INFO`` of its MVTec data module); it could not be re-checked from
this machine (no network). Per-category digests are not known here: pass ``sha256=``/``md5=`` to verify.

MVTec AD is licensed CC BY-NC-SA 4.0 (c) MVTec Software GmbH; cite Bergmann et al., CVPR 2019.
"""
from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import tarfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from tqdm.auto import tqdm

from .mvtec import CATEGORIES

log = logging.getLogger("apmask")

_SHARE = "https://www.mydrive.ch/shares/38536/3830184030e49fe74747669442f0f282/download"
MVTEC_URL = f"{_SHARE}/420938113-1629952094/mvtec_anomaly_detection.tar.xz"
MVTEC_SHA256 = "cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d"
MVTEC_CATEGORY_URLS = {
    "bottle": f"{_SHARE}/420937370-1629951468/bottle.tar.xz",
    "cable": f"{_SHARE}/420937413-1629951498/cable.tar.xz",
    "capsule": f"{_SHARE}/420937454-1629951595/capsule.tar.xz",
    "carpet": f"{_SHARE}/420937484-1629951672/carpet.tar.xz",
    "grid": f"{_SHARE}/420937487-1629951814/grid.tar.xz",
    "hazelnut": f"{_SHARE}/420937545-1629951845/hazelnut.tar.xz",
    "leather": f"{_SHARE}/420937607-1629951964/leather.tar.xz",
    "metal_nut": f"{_SHARE}/420937637-1629952063/metal_nut.tar.xz",
    "pill": "https://www.mydrive.ch/shares/43421/11a215a5749fcfb75e331ddd5f8e43ee/download/420938129-1629953099/pill.tar.xz",
    "screw": f"{_SHARE}/420938130-1629953152/screw.tar.xz",
    "tile": f"{_SHARE}/420938133-1629953189/tile.tar.xz",
    "toothbrush": f"{_SHARE}/420938134-1629953256/toothbrush.tar.xz",
    "transistor": f"{_SHARE}/420938166-1629953277/transistor.tar.xz",
    "wood": f"{_SHARE}/420938383-1629953354/wood.tar.xz",
    "zipper": f"{_SHARE}/420938385-1629953449/zipper.tar.xz",
}
_OFFLINE_HINT = ("If this machine is offline, download {url} elsewhere, extract it, and set data.root to the "
                 "folder that holds the category folders (e.g. `data.root=/path/to/mvtec_ad`, containing bottle/, cable/, ...).")


class DownloadError(RuntimeError):
    """A download failed (network, HTTP error or checksum); the message names the URL and the file."""


def file_digest(path: str | Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_digest(path: Path, sha256: Optional[str], md5: Optional[str], url: str) -> None:
    for algo, want in (("sha256", sha256), ("md5", md5)):
        if want:
            got = file_digest(path, algo)
            if got.lower() != want.lower():
                path.unlink(missing_ok=True)
                raise DownloadError(f"{algo} mismatch for {path} downloaded from {url}: expected {want}, got {got}; "
                                    "the partial file was deleted, run again to re-download")


def download_file(url: str, dest: str | Path, *, sha256: Optional[str] = None, md5: Optional[str] = None,
                  timeout: float = 20.0, chunk: int = 1 << 20, progress: bool = True) -> Path:
    """Download ``url`` to ``dest`` (resuming ``dest.part``), verify the digest(s) given, return ``dest``.

    An existing ``dest`` is only re-verified. Raises :class:`DownloadError` on network/HTTP failure
    (``timeout`` seconds per connection attempt and per read) or checksum mismatch."""
    dest = Path(dest)
    if dest.is_file():
        _check_digest(dest, sha256, md5, url)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    req = urllib.request.Request(url, headers={"User-Agent": "apmask", **({"Range": f"bytes={have}-"} if have else {})})
    try:
        try:
            resp = urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            if e.code != 416 or not have:  # 416: nothing left to fetch, the .part is complete
                raise
            resp = None
        if resp is not None:
            with resp:
                status = resp.status
                mode = "wb"
                if have and status == 206:
                    m = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
                    if not m or int(m.group(1)) != have:
                        raise DownloadError(f"server answered {url} with Content-Range "
                                            f"{resp.headers.get('Content-Range')!r} for a request from byte {have}")
                    mode = "ab"
                elif have:
                    log.info("server ignored the Range request for %s; restarting the download", url)
                    have = 0
                length = resp.headers.get("Content-Length")
                total = have + int(length) if length is not None else None
                with open(part, mode) as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                 desc=dest.name, disable=not progress, leave=False) as bar:
                    while block := resp.read(chunk):
                        f.write(block)
                        bar.update(len(block))
                if total is not None and part.stat().st_size != total:
                    raise DownloadError(f"download of {url} ended early ({part.stat().st_size} of {total} bytes in "
                                        f"{part}); run again to resume")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"HTTP {e.code} for {url} while writing {part}") from e
    except http.client.HTTPException as e:
        raise DownloadError(f"download of {url} broke off ({e!r}); {part} is kept, run again to resume") from e
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(f"cannot download {url} ({reason}). " + _OFFLINE_HINT.format(url=url)) from e
    _check_digest(part, sha256, md5, url)
    os.replace(part, dest)
    return dest


def extract_tar(archive: str | Path, into: str | Path) -> Path:
    """Extract a .tar[.gz|.xz] into ``into`` refusing paths that escape it (tarfile's "data" filter)."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    return into


def download_mvtec(root: str | Path, categories: Optional[Sequence[str]] = None, *, sha256: Optional[str] = None,
                   md5: Optional[str] = None, timeout: float = 20.0, keep_archive: bool = False,
                   progress: bool = True) -> Path:
    """Fetch MVTec AD into ``root`` so that ``root/<category>/train/good`` exists, and return ``root``.

    ``categories`` None: the full archive (checked against ``MVTEC_SHA256`` unless another digest is
    given); otherwise the per-category archives (checked when ``sha256``/``md5`` is given, which then
    must fit every one -- so pass digests for one category at a time). Categories already present
    are skipped. Use the result as ``data.root``."""
    root = Path(root)
    cats = list(CATEGORIES if categories is None else categories)
    unknown = [c for c in cats if c not in MVTEC_CATEGORY_URLS]
    if unknown:
        raise ValueError(f"unknown MVTec AD categories {unknown}; choose from {', '.join(CATEGORIES)}")
    todo = [c for c in cats if not (root / c / "train" / "good").is_dir()]
    if not todo:
        return root
    if categories is None:
        jobs = [(MVTEC_URL, sha256 or (None if md5 else MVTEC_SHA256))]
    else:
        jobs = [(MVTEC_CATEGORY_URLS[c], sha256) for c in todo]
    for url, digest in jobs:
        archive = download_file(url, root / url.rsplit("/", 1)[1], sha256=digest, md5=md5, timeout=timeout,
                                progress=progress)
        log.info("extracting %s into %s", archive, root)
        extract_tar(archive, root)
        if not keep_archive:
            archive.unlink()
    # some mirrors wrap the categories in one more folder: move them up
    for c in todo:
        if not (root / c).is_dir():
            nested = [p for p in root.glob(f"*/{c}") if (p / "train").is_dir()]
            if nested:
                shutil.move(str(nested[0]), str(root / c))
    missing = [c for c in todo if not (root / c / "train" / "good").is_dir()]
    if missing:
        raise DownloadError(f"after extraction {root} lacks {missing}; inspect the archive contents")
    return root
