"""Confine user-given adapter directories to the roots the operator allowed (`--lora-root`)."""

from __future__ import annotations

import os
from pathlib import Path

from loquetier.errors import LoquetierError


class AdapterPathError(LoquetierError, ValueError):
    """An adapter path is outside every allowed root, does not exist, or loading from paths is disabled."""

    code = "invalid_adapter_path"


def resolve_adapter_path(user_path: str, roots: list[Path]) -> Path:
    """The real path of the adapter directory `user_path`, which must lie inside one of `roots`.

    A relative path is taken relative to each root in turn; an absolute one must already be inside
    a root. Symlinks and `..` are resolved first, so neither can lead out of the roots.
    """
    if not roots:
        raise AdapterPathError("loading adapters from a path is disabled: start the server with "
                               "--lora-root DIR to allow adapter directories under DIR")
    if not user_path or "\0" in user_path:
        raise AdapterPathError(f"invalid adapter path {user_path!r}")
    requested = Path(user_path).expanduser()
    real_roots = [Path(os.path.realpath(root)) for root in roots]
    candidates = [requested] if requested.is_absolute() else [root / requested for root in real_roots]
    escaped = False
    for candidate in candidates:
        real = Path(os.path.realpath(candidate))
        if not any(real.is_relative_to(root) for root in real_roots):
            escaped = True
        elif real.is_dir():
            return real
    allowed = ", ".join(str(r) for r in real_roots)
    if escaped:
        raise AdapterPathError(f"adapter path {user_path!r} is outside the allowed roots ({allowed})")
    raise AdapterPathError(f"adapter directory {user_path!r} not found under the allowed roots ({allowed})")
