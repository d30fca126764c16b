"""The Hub protocol's vocabulary, shared by the emulator's storage and its request handler.

Which files go through LFS (the Hub's default ``.gitattributes`` patterns and size threshold), repo
types and their URL prefixes, the rules for repo names and in-repo paths, git object ids, the
README front matter, and :class:`HubError`: an error that the handler answers as an HTTP error
response with the ``X-Error-Code``/``X-Error-Message`` headers huggingface_hub turns into its usual
exceptions.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from fnmatch import fnmatchcase
from typing import Any

try:  # optional: only used to read (and validate) the README front matter
    import yaml as _yaml
except ImportError:  # pragma: no cover - PyYAML ships with huggingface_hub
    _yaml = None

#: Files of this size or larger are uploaded through LFS.
LFS_SIZE_THRESHOLD = 10_000_000
#: Regular (non-LFS) files larger than this are refused in a commit, as on the Hub.
MAX_REGULAR_FILE_SIZE = 10 * 1024 * 1024

# The Hub's default `.gitattributes` for a new repo.
# fmt: off
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb",
    "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar",
    "*.tflite", "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
# fmt: on
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS)
# Extra patterns that go through LFS in the emulator (binary formats the Hub refuses as regular files).
_EXTRA_LFS_PATTERNS = ("*.png", "*.jpg", "*.jpeg", "*.gif", "*.webp", "*.gguf", "*.pdf")

TYPE_FROM_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
# Words that follow a repo id in `/api/{type}s/{repo_id}/...` URLs.
# fmt: off
REPO_ACTIONS = {
    "resolve", "tree", "revision", "refs", "commits", "commit", "preupload", "paths-info", "branch", "tag",
    "settings", "discussions", "blob", "raw", "lfs-files", "super-squash",
}
# fmt: on
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
PR_REF_RE = re.compile(r"^refs/pr/(\d+)$")
_FRONT_MATTER_RE = re.compile(r"^---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|$)", re.DOTALL)


class HubError(Exception):
    """A request the Hub would refuse: answered as HTTP ``status`` with ``message`` (and ``code``)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        body: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}


def now_iso() -> str:
    """The current UTC time as the Hub writes it, e.g. ``2024-05-01T12:00:00.123Z``."""
    now = _dt.datetime.now(_dt.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_oid(data: bytes) -> str:
    """The git object id (sha1) of a blob holding ``data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file that stands in the repo for an LFS object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def is_true(values: list[str] | None) -> bool:
    """Whether a query-string flag (``parse_qs`` values) is set, e.g. ``?recursive=1``."""
    return bool(values) and values[-1].strip().lower() in ("1", "true", "yes", "on")


def check_repo_path(path: Any) -> str:
    """Return ``path`` if it is a valid file path inside a repo; raise a 400 otherwise."""
    if not isinstance(path, str) or not path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.split("/")
    if path.startswith("/") or any(p in ("", ".", "..", ".git") for p in parts) or "\x00" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


def header_safe(text: str) -> str:
    """``text`` on one latin-1 line of at most 1000 characters, fit for an HTTP header."""
    text = " ".join(str(text).split())
    return text.encode("latin-1", "replace").decode("latin-1")[:1000]


def wants_lfs(path: str, size: int, sample: bytes) -> bool:
    """Whether the Hub would ask for this file to be uploaded through LFS (``preupload``)."""
    if size >= LFS_SIZE_THRESHOLD or b"\x00" in sample:
        return True
    name = path.rsplit("/", 1)[-1]
    for pattern in LFS_PATTERNS + _EXTRA_LFS_PATTERNS:
        target = path if "/" in pattern else name
        if fnmatchcase(target, pattern) or fnmatchcase(target.lower(), pattern):
            return True
    return False


def front_matter(text: str) -> dict | None:
    """A README's YAML front matter as a dict; ``None`` if absent, invalid, or PyYAML is missing."""
    block = _front_matter_block(text)
    if block is None:
        return None
    try:
        data = _yaml.safe_load(block)
    except _yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def front_matter_error(text: str) -> str | None:
    """Why a README's YAML front matter does not parse; ``None`` if it does (or cannot be checked)."""
    block = _front_matter_block(text)
    if block is None:
        return None
    try:
        _yaml.safe_load(block)
    except _yaml.YAMLError as e:
        return f"Invalid YAML: {e}"
    return None


def _front_matter_block(text: str) -> str | None:
    if _yaml is None or not text.startswith("---"):
        return None
    match = _FRONT_MATTER_RE.match(text)
    return None if match is None else match.group(1)
