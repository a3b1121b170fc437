"""Adapter paths stay inside the configured roots, whatever `..` or symlinks say."""

import os

import pytest

from loquetier.errors import LoquetierError
from loquetier.server.paths import AdapterPathError, resolve_adapter_path


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "adapters"
    (root / "a" / "b").mkdir(parents=True)
    other = tmp_path / "more"
    (other / "c").mkdir(parents=True)
    (tmp_path / "secret").mkdir()
    return [root, other]


def test_relative_and_absolute_inside(roots):
    root, other = roots
    assert resolve_adapter_path("a", roots) == root.resolve() / "a"
    assert resolve_adapter_path("a/b", roots) == root.resolve() / "a" / "b"
    assert resolve_adapter_path("c", roots) == other.resolve() / "c"  # second root
    assert resolve_adapter_path(str(root / "a"), roots) == root.resolve() / "a"
    assert resolve_adapter_path("a/b/../b", roots) == root.resolve() / "a" / "b"  # `..` that stays inside


@pytest.mark.parametrize("user_path", ["../secret", "a/../../secret", "a/b/../../../secret", "/etc", "/"])
def test_escapes_rejected(roots, user_path):
    with pytest.raises(AdapterPathError, match="outside the allowed roots"):
        resolve_adapter_path(user_path, roots)


def test_absolute_path_outside(roots, tmp_path):
    with pytest.raises(AdapterPathError, match="outside"):
        resolve_adapter_path(str(tmp_path / "secret"), roots)


def test_symlink_out_of_root_rejected(roots, tmp_path):
    root = roots[0]
    os.symlink(tmp_path / "secret", root / "link")
    with pytest.raises(AdapterPathError, match="outside"):
        resolve_adapter_path("link", roots)
    with pytest.raises(AdapterPathError, match="outside"):
        resolve_adapter_path(str(root / "link"), roots)


def test_symlink_inside_root_allowed(roots):
    root = roots[0]
    os.symlink(root / "a" / "b", root / "alias")
    assert resolve_adapter_path("alias", roots) == root.resolve() / "a" / "b"


def test_symlinked_root(roots, tmp_path):
    os.symlink(roots[0], tmp_path / "root_link")
    assert resolve_adapter_path("a", [tmp_path / "root_link"]) == roots[0].resolve() / "a"


def test_missing_and_disabled(roots):
    with pytest.raises(AdapterPathError, match="not found"):
        resolve_adapter_path("nope", roots)
    with pytest.raises(AdapterPathError, match="disabled"):
        resolve_adapter_path("a", [])
    with pytest.raises(AdapterPathError):
        resolve_adapter_path("", roots)
    with pytest.raises(AdapterPathError):
        resolve_adapter_path("a\0b", roots)


def test_error_is_user_facing():
    assert issubclass(AdapterPathError, ValueError) and issubclass(AdapterPathError, LoquetierError)
